//! Per-device rolling features of readings: for each metric, how far a value is from the
//! device's recent mean, how far it moved from the last normal value (both in units of the
//! device's recent spread), and how many times in a row it repeated.
//!
//! This is a contract with `models/train_anomaly.py`, which computes the same features to
//! train the model: the same f64 operations in the same order, so the model sees at run time
//! exactly what it was trained on. `metadata.json` carries a device's readings with their
//! features, and a test checks this code against them.
//!
//! The baseline is gated: a value far off it (z ≥ `gate_z`) does not move it, so a spike or a
//! drift does not drag the mean along and the reading after it is judged against the normal.
//! The spread comes from successive differences (half the EWMA of the squared step), so a slow
//! drift moves the mean, which is what it is measured against, but hardly the spread.
//! After `max_skips` gated values in a row the baseline restarts from the current value, so a
//! real level shift is learnt instead of flagged forever.

use serde::{Deserialize, Serialize};

/// The metrics, in feature order.
pub const METRICS: [&str; 3] = ["temperature_c", "humidity_pct", "vibration_mm_s"];

/// Features per metric.
pub const PER_METRIC: usize = 3;

/// Features per reading.
pub const WIDTH: usize = METRICS.len() * PER_METRIC;

/// The feature names, in the order the model takes them.
pub fn names() -> &'static [String] {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| {
        METRICS
            .iter()
            .flat_map(|m| ["z", "dz", "repeats"].map(|f| format!("{m}.{f}")))
            .collect()
    })
}

/// The state machine's parameters (`feature_params` in a model's metadata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureParams {
    /// EWMA weight once warmed up.
    pub alpha: f64,
    /// Observations before features are reported (zeros until then).
    pub warmup: u32,
    /// A value whose z is at least this does not update the baseline.
    pub gate_z: f64,
    /// Gated values in a row after which the baseline restarts.
    pub max_skips: u32,
    /// Largest repeat count reported.
    pub repeat_cap: u32,
    /// Added to each metric's spread, so a quiet device does not turn noise into big z.
    pub floor: Floors,
}

/// Spread floors per metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Floors {
    pub temperature_c: f64,
    pub humidity_pct: f64,
    pub vibration_mm_s: f64,
}

impl Floors {
    fn get(&self, metric: usize) -> f64 {
        match metric {
            0 => self.temperature_c,
            1 => self.humidity_pct,
            _ => self.vibration_mm_s,
        }
    }
}

impl FeatureParams {
    /// The parameters the shipped model was trained with (its metadata carries them too).
    pub fn shipped() -> FeatureParams {
        FeatureParams {
            alpha: 0.03,
            warmup: 10,
            gate_z: 3.0,
            max_skips: 30,
            repeat_cap: 20,
            floor: Floors {
                temperature_c: 0.05,
                humidity_pct: 0.2,
                vibration_mm_s: 0.01,
            },
        }
    }

    /// The statistical fallback's: an EWMA over about `window` readings, gated at the
    /// threshold it labels at.
    pub fn fallback(window: usize, z_threshold: f64) -> FeatureParams {
        FeatureParams {
            alpha: 2.0 / (window as f64 + 1.0),
            gate_z: z_threshold,
            ..FeatureParams::shipped()
        }
    }
}

/// One metric's baseline.
#[derive(Debug, Clone, Copy, Default)]
struct MetricState {
    n: u32,
    mean: f64,
    var: f64,
    last_ok: f64,
    last_raw: f64,
    repeats: u32,
    skips: u32,
}

impl MetricState {
    /// The features of `x` (z, dz, repeats), then `x` folded into the baseline.
    fn observe(&mut self, x: Option<f64>, floor: f64, p: &FeatureParams) -> [f64; PER_METRIC] {
        let Some(x) = x.filter(|x| x.is_finite()) else {
            return [0.0; PER_METRIC];
        };
        if self.n == 0 {
            *self = MetricState {
                n: 1,
                mean: x,
                var: 0.0,
                last_ok: x,
                last_raw: x,
                repeats: 0,
                skips: 0,
            };
            return [0.0; PER_METRIC];
        }
        let step = x - self.last_raw;
        self.repeats = if x == self.last_raw {
            self.repeats + 1
        } else {
            0
        };
        self.last_raw = x;
        let std = self.var.sqrt() + floor;
        let z = (x - self.mean).abs() / std;
        let dz = (x - self.last_ok).abs() / std;
        let rep = f64::from(self.repeats.min(p.repeat_cap));
        let warm = self.n >= p.warmup;
        if !warm || z < p.gate_z {
            self.n += 1;
            let a = p.alpha.max(1.0 / f64::from(self.n));
            let d = x - self.mean;
            self.mean += a * d;
            let half = step * step / 2.0;
            self.var = if self.n == 2 {
                half
            } else {
                (1.0 - a) * self.var + a * half
            };
            self.last_ok = x;
            self.skips = 0;
        } else {
            self.skips += 1;
            if self.skips >= p.max_skips {
                self.n = 1;
                self.mean = x;
                self.var = 0.0;
                self.last_ok = x;
                self.skips = 0;
            }
        }
        if warm {
            [z, dz, rep]
        } else {
            [0.0; PER_METRIC]
        }
    }
}

/// One device's baselines.
#[derive(Debug, Clone, Default)]
pub struct DeviceState {
    metrics: [MetricState; METRICS.len()],
}

/// A reading's metric values, in [`METRICS`] order.
pub type Values = [Option<f64>; METRICS.len()];

impl DeviceState {
    /// The feature row of `values` (f64, in [`names`] order); the baseline moves on.
    pub fn observe(&mut self, values: &Values, p: &FeatureParams) -> [f64; WIDTH] {
        let mut row = [0.0; WIDTH];
        for (i, state) in self.metrics.iter_mut().enumerate() {
            let f = state.observe(values[i], p.floor.get(i), p);
            row[i * PER_METRIC..(i + 1) * PER_METRIC].copy_from_slice(&f);
        }
        row
    }
}

/// The fallback's score of a feature row: the largest z of any metric.
pub fn max_z(row: &[f64; WIDTH]) -> f64 {
    (0..METRICS.len())
        .map(|i| row[i * PER_METRIC])
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noisy(i: u32) -> f64 {
        // Deterministic noise in ±0.3.
        f64::from((i * 7919) % 61) / 100.0 - 0.3
    }

    #[test]
    fn features_are_zero_while_warming_up_and_a_spike_stands_out() {
        let p = FeatureParams::shipped();
        let mut dev = DeviceState::default();
        for i in 0..p.warmup {
            let row = dev.observe(&[Some(20.0 + noisy(i)), None, None], &p);
            assert_eq!(row, [0.0; WIDTH], "reading {i} is warm-up");
        }
        let calm = dev.observe(&[Some(20.0), None, None], &p);
        assert!(calm[0] < 3.0, "a normal value has a small z: {calm:?}");
        let spike = dev.observe(&[Some(35.0), None, None], &p);
        assert!(spike[0] > 20.0, "a spike has a large z: {spike:?}");
        let after = dev.observe(&[Some(20.1), None, None], &p);
        assert!(
            after[0] < 3.0 && after[1] < 3.0,
            "the spike did not move the baseline: {after:?}"
        );
    }

    #[test]
    fn repeats_count_identical_values_in_a_row() {
        let p = FeatureParams::shipped();
        let mut dev = DeviceState::default();
        for i in 0..20 {
            dev.observe(&[None, Some(50.0 + noisy(i)), None], &p);
        }
        let reps: Vec<f64> = (0..4)
            .map(|_| dev.observe(&[None, Some(47.3), None], &p)[5])
            .collect();
        assert_eq!(reps, [0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn a_lasting_level_shift_is_learnt() {
        let p = FeatureParams::shipped();
        let mut dev = DeviceState::default();
        for i in 0..50 {
            dev.observe(&[None, None, Some(1.0 + noisy(i) / 10.0)], &p);
        }
        let shifted: Vec<f64> = (0..80)
            .map(|i| dev.observe(&[None, None, Some(5.0 + noisy(i) / 10.0)], &p)[6])
            .collect();
        assert!(shifted[0] > 10.0, "the shift is flagged at first");
        assert!(
            shifted[79] < 3.0,
            "after max_skips the new level is the baseline: {:?}",
            &shifted[60..]
        );
    }

    #[test]
    fn a_missing_or_non_finite_metric_scores_zero_and_leaves_the_baseline() {
        let p = FeatureParams::shipped();
        let mut a = DeviceState::default();
        let mut b = DeviceState::default();
        for i in 0..30 {
            let v = [Some(20.0 + noisy(i)), Some(40.0), Some(2.0)];
            assert_eq!(a.observe(&v, &p), b.observe(&v, &p));
            let row = a.observe(&[None, Some(f64::NAN), None], &p);
            assert_eq!(row, [0.0; WIDTH]);
        }
    }

    #[test]
    fn names_follow_the_metric_order() {
        let names = names();
        assert_eq!(names.len(), WIDTH);
        assert_eq!(names[0], "temperature_c.z");
        assert_eq!(names[5], "humidity_pct.repeats");
        assert_eq!(names[8], "vibration_mm_s.repeats");
    }
}
