//! The fleet model: devices, their readings, status changes and the faults injected into them.
//! No I/O and no clock of its own (`now` is passed in); all randomness comes from one `StdRng`
//! seeded from the config, so the same seed and the same `now`s give the same events.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::f64::consts::TAU;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::Serialize;
use uuid::Uuid;

use crate::FleetConfig;

/// Sites with their UTC offset in hours, so the fleet's daily cycles are not all in phase.
const SITES: [(&str, f64); 6] = [
    ("plant-1", 0.0),
    ("plant-2", 1.0),
    ("plant-3", -5.0),
    ("plant-4", 8.0),
    ("warehouse-1", 0.0),
    ("warehouse-2", -8.0),
];
/// Firmware versions, oldest first; maintenance moves a device one step up.
const FIRMWARE: [&str; 4] = ["1.4.2", "1.5.0", "1.5.1", "2.0.0"];

/// Late readings are held back between these many seconds (log-uniform).
const LATE_MIN_S: f64 = 5.0;
const LATE_MAX_S: f64 = 300.0;
/// At most this many late readings wait at once; beyond it a reading goes out on time, so a
/// high rate cannot grow the queue without bound.
const MAX_HELD: usize = 100_000;
/// Drift and stuck episodes last this many of the device's readings.
const EPISODE_LEN: std::ops::RangeInclusive<u32> = 10..=30;
/// Mean readings per episode: spike 1, drift and stuck 20 each, kinds equally likely.
const MEAN_EPISODE_LEN: f64 = (1.0 + 20.0 + 20.0) / 3.0;
/// A device that leaves `online` comes back after this many of its report slots.
const OUTAGE_SLOTS: std::ops::RangeInclusive<u32> = 5..=30;

/// What a simulated event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimKind {
    /// A `sensor.reading`.
    Reading,
    /// A `device.status`.
    Status,
}

/// One event of the fleet, before it is put on the wire.
#[derive(Debug, Clone)]
pub struct SimEvent {
    pub event_id: Uuid,
    /// The device id, e.g. `dev-00042`.
    pub device: Arc<str>,
    /// Device time. Earlier than the `now` it was emitted at when `late`.
    pub occurred_at: DateTime<Utc>,
    pub body: Body,
    /// The anomaly injected into this reading, if any (the ground truth).
    pub anomaly: Option<Anomaly>,
    /// Set when the event is to be sent broken.
    pub malformed: Option<Malformation>,
    /// Set when the event is to be sent twice (same bytes), as a redelivery would.
    pub duplicate: bool,
    /// Set when the reading was held back and is sent after younger ones.
    pub late: bool,
}

impl SimEvent {
    pub fn kind(&self) -> SimKind {
        match self.body {
            Body::Reading(_) => SimKind::Reading,
            Body::Status(_) => SimKind::Status,
        }
    }

    /// The envelope's `event_type`.
    pub fn event_type(&self) -> &'static str {
        match self.body {
            Body::Reading(_) => "sensor.reading",
            Body::Status(_) => "device.status",
        }
    }
}

/// The payload, serialized as the schema's payload record.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Body {
    Reading(Reading),
    Status(Status),
}

/// `sensor.reading` payload (schemas/sensor.reading/2.avsc).
#[derive(Debug, Clone, Serialize)]
pub struct Reading {
    pub seq: u64,
    pub temperature_c: f64,
    pub humidity_pct: f64,
    pub vibration_mm_s: f64,
    pub battery_pct: f64,
    pub site: &'static str,
    pub firmware: &'static str,
}

/// `device.status` payload (schemas/device.status/1.avsc).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub state: DeviceState,
    pub reason: &'static str,
    pub battery_pct: f64,
    pub rssi_dbm: i32,
    pub firmware: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    Online,
    Offline,
    Degraded,
    Maintenance,
}

/// A metric an anomaly can be injected into; serialized as its payload field name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Metric {
    #[serde(rename = "temperature_c")]
    TemperatureC,
    #[serde(rename = "humidity_pct")]
    HumidityPct,
    #[serde(rename = "vibration_mm_s")]
    VibrationMmS,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AnomalyKind {
    /// One reading far off the device's normal.
    Spike,
    /// A growing offset over several consecutive readings.
    Drift,
    /// The same value repeated, noise and all gone, over several readings.
    Stuck,
}

/// The ground truth of one anomalous reading.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Anomaly {
    pub metric: Metric,
    pub kind: AnomalyKind,
    /// The value sent for `metric`.
    pub value: f64,
}

/// How a malformed message is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformation {
    /// Not JSON: the message cut short. Over HTTP the cut text is sent as a JSON string, since
    /// a broken element would make the whole batch unreadable.
    InvalidJson,
    /// A required envelope field left out.
    MissingField(&'static str),
}

const MISSING_FIELDS: [&str; 2] = ["occurred_at", "payload"];

/// The simulated fleet: call [`Fleet::next_event`] for each event to send.
#[derive(Debug)]
pub struct Fleet {
    config: FleetConfig,
    rng: StdRng,
    devices: Vec<Device>,
    /// Devices report in turn, like devices on a fixed period.
    next: usize,
    held: BinaryHeap<Held>,
    /// Tie-breaker that keeps the release order of equal times deterministic.
    held_count: u64,
    /// Chance that a reading outside an episode starts one; see `episode_start_probability`.
    episode_start: f64,
}

#[derive(Debug)]
struct Device {
    id: Arc<str>,
    site: &'static str,
    utc_offset_h: f64,
    firmware: usize,
    seq: u64,
    battery: f64,
    drain_per_reading: f64,
    temp_base: f64,
    temp_amp: f64,
    humid_base: f64,
    humid_amp: f64,
    vib_base: f64,
    rssi_base: f64,
    state: DeviceState,
    /// Report slots left before a non-online device comes back.
    state_left: u32,
    episode: Option<Episode>,
}

#[derive(Debug)]
struct Episode {
    metric: Metric,
    kind: AnomalyKind,
    len: u32,
    step: u32,
    /// Spike and drift: the signed offset (at the end, for drift). Stuck: the frozen value.
    magnitude: f64,
}

#[derive(Debug)]
struct Held {
    release_at: DateTime<Utc>,
    order: u64,
    event: SimEvent,
}

// Reversed, so the BinaryHeap (a max-heap) pops the earliest release first.
impl Ord for Held {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.release_at, other.order).cmp(&(self.release_at, self.order))
    }
}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Held {}

impl Fleet {
    /// A fleet of `config.devices` devices (at least one). Rates outside 0..=1 are clamped
    /// here; [`FleetConfig::validate`] reports them.
    pub fn new(config: FleetConfig) -> Fleet {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let devices = (1..=config.devices.max(1))
            .map(|i| Device::new(i, &mut rng))
            .collect();
        let episode_start = episode_start_probability(config.anomaly_rate.clamp(0.0, 1.0));
        Fleet {
            config,
            rng,
            devices,
            next: 0,
            held: BinaryHeap::new(),
            held_count: 0,
            episode_start,
        }
    }

    /// The next event to send at `now`: a held-back late reading whose time has come, or the
    /// next device's report.
    pub fn next_event(&mut self, now: DateTime<Utc>) -> SimEvent {
        if self.held.peek().is_some_and(|h| h.release_at <= now)
            && let Some(held) = self.held.pop()
        {
            return self.finish(held.event);
        }
        let late_rate = self.config.late_rate.clamp(0.0, 0.9);
        loop {
            let d = self.next;
            self.next = (self.next + 1) % self.devices.len();
            let Some(mut event) = self.slot(d, now) else {
                continue; // the device is offline
            };
            if event.kind() == SimKind::Reading
                && event.anomaly.is_none()
                && self.held.len() < MAX_HELD
                && self.rng.gen_bool(late_rate)
            {
                let delay_s = (self.rng.gen_range(LATE_MIN_S.ln()..LATE_MAX_S.ln())).exp();
                event.late = true;
                self.held_count += 1;
                self.held.push(Held {
                    release_at: now + TimeDelta::microseconds((delay_s * 1e6) as i64),
                    order: self.held_count,
                    event,
                });
                continue;
            }
            return self.finish(event);
        }
    }

    /// The device's report for this slot: a reading, a status change, or nothing while it is
    /// offline or in maintenance.
    fn slot(&mut self, d: usize, now: DateTime<Utc>) -> Option<SimEvent> {
        let status_rate = self.config.status_rate.clamp(0.0, 1.0);
        let dev = &mut self.devices[d];
        if dev.state != DeviceState::Online {
            dev.state_left = dev.state_left.saturating_sub(1);
            if dev.state_left == 0 {
                let reason = match dev.state {
                    DeviceState::Offline => "reconnected",
                    DeviceState::Maintenance => "firmware updated",
                    _ => "recovered",
                };
                dev.state = DeviceState::Online;
                return Some(self.status(d, now, reason));
            }
            if dev.state != DeviceState::Degraded {
                return None;
            }
        } else if self.rng.gen_bool(status_rate / 2.0) {
            // Half the status events take a device down, the other half bring it back.
            let roll: f64 = self.rng.r#gen();
            let (state, reason) = if roll < 0.4 {
                let reasons = ["power loss", "network unreachable", "scheduled reboot"];
                (DeviceState::Offline, reasons[self.rng.gen_range(0..3)])
            } else if roll < 0.8 {
                let reason = if dev.battery < 20.0 {
                    "low battery"
                } else {
                    ["sensor fault", "weak signal", "high internal temperature"]
                        [self.rng.gen_range(0..3)]
                };
                (DeviceState::Degraded, reason)
            } else {
                dev.firmware = (dev.firmware + 1).min(FIRMWARE.len() - 1);
                (DeviceState::Maintenance, "firmware update")
            };
            dev.state = state;
            dev.state_left = self.rng.gen_range(OUTAGE_SLOTS);
            return Some(self.status(d, now, reason));
        }
        Some(self.reading(d, now))
    }

    fn status(&mut self, d: usize, now: DateTime<Utc>, reason: &'static str) -> SimEvent {
        let noise: f64 = self.rng.sample(StandardNormal);
        let event_id = self.uuid();
        let dev = &self.devices[d];
        SimEvent {
            event_id,
            device: dev.id.clone(),
            occurred_at: now,
            body: Body::Status(Status {
                state: dev.state,
                reason,
                battery_pct: round(dev.battery, 1),
                rssi_dbm: (dev.rssi_base + 3.0 * noise).round().clamp(-120.0, -30.0) as i32,
                firmware: FIRMWARE[dev.firmware],
            }),
            anomaly: None,
            malformed: None,
            duplicate: false,
            late: false,
        }
    }

    fn reading(&mut self, d: usize, now: DateTime<Utc>) -> SimEvent {
        let event_id = self.uuid();
        let [n1, n2, n3]: [f64; 3] = [
            self.rng.sample(StandardNormal),
            self.rng.sample(StandardNormal),
            self.rng.sample(StandardNormal),
        ];
        let start_episode = self.devices[d].episode.is_none() && {
            let p = self.episode_start;
            self.rng.gen_bool(p)
        };
        if start_episode {
            let episode = self.new_episode(d);
            self.devices[d].episode = Some(episode);
        }
        let dev = &mut self.devices[d];
        dev.seq += 1;
        // Local hour of day: warmest and busiest mid-afternoon.
        let hour = (now.timestamp() as f64 / 3600.0 + dev.utc_offset_h).rem_euclid(24.0);
        let day = (TAU * (hour - 9.0) / 24.0).sin();
        let activity = (day + 1.0) / 2.0;
        let mut temperature = dev.temp_base + dev.temp_amp * day + 0.3 * n1;
        let mut humidity = (dev.humid_base - dev.humid_amp * day + 1.0 * n2).clamp(0.0, 100.0);
        let mut vibration =
            (dev.vib_base * (0.6 + 0.8 * activity) + 0.1 * dev.vib_base * n3).max(0.0);
        dev.battery -= dev.drain_per_reading;
        if dev.battery < 5.0 {
            dev.battery = 100.0; // replaced
        }

        let mut anomaly = None;
        if let Some(ep) = &mut dev.episode {
            ep.step += 1;
            let normal = match ep.metric {
                Metric::TemperatureC => temperature,
                Metric::HumidityPct => humidity,
                Metric::VibrationMmS => vibration,
            };
            let value = match ep.kind {
                AnomalyKind::Spike => normal + ep.magnitude,
                AnomalyKind::Drift => {
                    normal + ep.magnitude * f64::from(ep.step) / f64::from(ep.len)
                }
                AnomalyKind::Stuck => {
                    if ep.step == 1 {
                        ep.magnitude = normal;
                    }
                    ep.magnitude
                }
            };
            let value = match ep.metric {
                Metric::TemperatureC => {
                    temperature = value;
                    round(value, 2)
                }
                Metric::HumidityPct => {
                    humidity = value.clamp(0.0, 100.0);
                    round(humidity, 1)
                }
                Metric::VibrationMmS => {
                    vibration = value.max(0.0);
                    round(vibration, 3)
                }
            };
            anomaly = Some(Anomaly {
                metric: ep.metric,
                kind: ep.kind,
                value,
            });
            if ep.step >= ep.len {
                dev.episode = None;
            }
        }
        SimEvent {
            event_id,
            device: dev.id.clone(),
            occurred_at: now,
            body: Body::Reading(Reading {
                seq: dev.seq,
                temperature_c: round(temperature, 2),
                humidity_pct: round(humidity, 1),
                vibration_mm_s: round(vibration, 3),
                battery_pct: round(dev.battery, 1),
                site: dev.site,
                firmware: FIRMWARE[dev.firmware],
            }),
            anomaly,
            malformed: None,
            duplicate: false,
            late: false,
        }
    }

    fn new_episode(&mut self, d: usize) -> Episode {
        let rng = &mut self.rng;
        let metric = match rng.gen_range(0..3) {
            0 => Metric::TemperatureC,
            1 => Metric::HumidityPct,
            _ => Metric::VibrationMmS,
        };
        let (kind, len) = match rng.gen_range(0..3) {
            0 => (AnomalyKind::Spike, 1),
            1 => (AnomalyKind::Drift, rng.gen_range(EPISODE_LEN)),
            _ => (AnomalyKind::Stuck, rng.gen_range(EPISODE_LEN)),
        };
        let sign = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
        let dev = &self.devices[d];
        // Well outside the device's own noise (σ 0.3 °C, 1 %, 10 % of vibration).
        let magnitude = match (kind, metric) {
            (AnomalyKind::Stuck, _) => 0.0,
            (AnomalyKind::Spike, Metric::TemperatureC) => sign * rng.gen_range(12.0..25.0),
            (AnomalyKind::Drift, Metric::TemperatureC) => sign * rng.gen_range(6.0..12.0),
            // Humidity moves toward the far side so the clamp to 0..100 does not eat it.
            (_, Metric::HumidityPct) => {
                let toward = if dev.humid_base > 50.0 { -1.0 } else { 1.0 };
                let size = if kind == AnomalyKind::Spike {
                    rng.gen_range(30.0..45.0)
                } else {
                    rng.gen_range(15.0..30.0)
                };
                toward * size
            }
            // Vibration only goes up: a machine shaking, not a sensor reading below zero.
            (AnomalyKind::Spike, Metric::VibrationMmS) => dev.vib_base * rng.gen_range(4.0..8.0),
            (AnomalyKind::Drift, Metric::VibrationMmS) => dev.vib_base * rng.gen_range(2.0..4.0),
        };
        Episode {
            metric,
            kind,
            len,
            step: 0,
            magnitude,
        }
    }

    /// Decides, at the moment of sending, whether the event goes out twice or broken.
    fn finish(&mut self, mut event: SimEvent) -> SimEvent {
        let duplicate_rate = self.config.duplicate_rate.clamp(0.0, 1.0);
        let malformed_rate = self.config.malformed_rate.clamp(0.0, 1.0);
        event.duplicate = self.rng.gen_bool(duplicate_rate);
        // Anomalies are never sent broken: the ground truth lists only events that can arrive.
        if self.rng.gen_bool(malformed_rate) && event.anomaly.is_none() {
            event.malformed = Some(if self.rng.gen_bool(0.5) {
                Malformation::InvalidJson
            } else {
                Malformation::MissingField(MISSING_FIELDS[self.rng.gen_range(0..2)])
            });
        }
        event
    }

    /// A version 4 UUID from the seeded generator (reproducible, and no system call).
    fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.r#gen()).into_uuid()
    }
}

impl Device {
    fn new(i: u32, rng: &mut StdRng) -> Device {
        let (site, utc_offset_h) = SITES[rng.gen_range(0..SITES.len())];
        let temp_noise: f64 = rng.sample(StandardNormal);
        Device {
            id: Arc::from(format!("dev-{i:05}")),
            site,
            utc_offset_h,
            firmware: rng.gen_range(0..FIRMWARE.len()),
            seq: 0,
            battery: rng.gen_range(40.0..100.0),
            drain_per_reading: rng.gen_range(0.0005..0.002),
            temp_base: 21.0 + 3.0 * temp_noise,
            temp_amp: rng.gen_range(1.5..5.0),
            humid_base: rng.gen_range(30.0..70.0),
            humid_amp: rng.gen_range(3.0..10.0),
            vib_base: rng.gen_range(0.8..4.0),
            rssi_base: rng.gen_range(-95.0..-55.0),
            state: DeviceState::Online,
            state_left: 0,
            episode: None,
        }
    }
}

/// The chance per reading outside an episode of starting one, so that the share of anomalous
/// readings is `rate`: with episodes of mean length L, a device spends L readings of every
/// (1/p − 1 + L) in one, and solving L / (1/p − 1 + L) = rate gives p.
fn episode_start_probability(rate: f64) -> f64 {
    if rate <= 0.0 {
        return 0.0;
    }
    (rate / (MEAN_EPISODE_LEN * (1.0 - rate) + rate)).clamp(0.0, 1.0)
}

fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(seed: u64) -> FleetConfig {
        FleetConfig {
            devices: 50,
            seed,
            ..FleetConfig::default()
        }
    }

    /// `n` events with a clock that moves 1 ms per event from a fixed start.
    fn events(config: FleetConfig, n: usize) -> Vec<(DateTime<Utc>, SimEvent)> {
        let start = DateTime::parse_from_rfc3339("2025-06-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut fleet = Fleet::new(config);
        (0..n)
            .map(|i| {
                let now = start + TimeDelta::milliseconds(i as i64);
                (now, fleet.next_event(now))
            })
            .collect()
    }

    fn encoded(events: &[(DateTime<Utc>, SimEvent)]) -> Vec<Vec<u8>> {
        events
            .iter()
            .map(|(_, e)| {
                let mut buf = Vec::new();
                crate::encode::write_http(e, &mut buf);
                buf
            })
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_events_and_another_seed_does_not() {
        let a = encoded(&events(config(7), 5_000));
        let b = encoded(&events(config(7), 5_000));
        let c = encoded(&events(config(8), 5_000));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn anomalies_are_injected_at_about_the_configured_rate() {
        // Episodes make the count lumpy (≈14 readings each), so rates low enough to give only a
        // few dozen episodes in a test-sized run would need a loose bound to mean anything.
        for rate in [0.01, 0.05, 0.2] {
            let cfg = FleetConfig {
                anomaly_rate: rate,
                ..config(42)
            };
            let evs = events(cfg, 300_000);
            let readings = evs
                .iter()
                .filter(|(_, e)| e.kind() == SimKind::Reading)
                .count();
            let anomalous = evs.iter().filter(|(_, e)| e.anomaly.is_some()).count();
            let share = anomalous as f64 / readings as f64;
            assert!(
                (share - rate).abs() < rate * 0.3,
                "rate {rate}: {anomalous} of {readings} readings anomalous ({share})"
            );
            let kinds: Vec<AnomalyKind> = evs
                .iter()
                .filter_map(|(_, e)| e.anomaly.map(|a| a.kind))
                .collect();
            for kind in [AnomalyKind::Spike, AnomalyKind::Drift, AnomalyKind::Stuck] {
                assert!(kinds.contains(&kind), "rate {rate}: no {kind:?}");
            }
        }
    }

    #[test]
    fn no_anomalies_when_the_rate_is_zero() {
        let cfg = FleetConfig {
            anomaly_rate: 0.0,
            ..config(1)
        };
        assert!(events(cfg, 50_000).iter().all(|(_, e)| e.anomaly.is_none()));
    }

    #[test]
    fn an_anomaly_is_what_the_reading_carries() {
        let cfg = FleetConfig {
            anomaly_rate: 0.05,
            ..config(3)
        };
        // Per device, the metric and value of its previous reading if that one was stuck.
        let mut prev: HashMap<Arc<str>, (Metric, f64)> = HashMap::new();
        let (mut pairs, mut same) = (0, 0);
        for (_, e) in events(cfg, 100_000) {
            let Body::Reading(r) = &e.body else { continue };
            let Some(a) = e.anomaly else {
                prev.remove(&e.device);
                continue;
            };
            let sent = match a.metric {
                Metric::TemperatureC => r.temperature_c,
                Metric::HumidityPct => r.humidity_pct,
                Metric::VibrationMmS => r.vibration_mm_s,
            };
            assert_eq!(sent, a.value, "{e:?}");
            assert!(e.malformed.is_none() && !e.late);
            if a.kind == AnomalyKind::Stuck {
                if let Some((metric, value)) = prev.get(&e.device)
                    && *metric == a.metric
                {
                    pairs += 1;
                    same += usize::from(*value == a.value);
                }
                prev.insert(e.device.clone(), (a.metric, a.value));
            } else {
                prev.remove(&e.device);
            }
        }
        // Back-to-back stuck episodes may differ; within one the value does not move.
        assert!(pairs > 50 && same * 10 >= pairs * 9, "{same} of {pairs}");
    }

    #[test]
    fn readings_are_plausible_and_seq_increases_per_device() {
        let cfg = FleetConfig {
            anomaly_rate: 0.0,
            late_rate: 0.01,
            ..config(5)
        };
        let mut last_seq: HashMap<Arc<str>, u64> = HashMap::new();
        let mut late = 0;
        for (now, e) in events(cfg, 200_000) {
            assert!(
                e.device.starts_with("dev-") && e.device.len() == 9,
                "{}",
                e.device
            );
            let Body::Reading(r) = &e.body else { continue };
            assert!((-10.0..50.0).contains(&r.temperature_c), "{r:?}");
            assert!((0.0..=100.0).contains(&r.humidity_pct), "{r:?}");
            assert!((0.0..20.0).contains(&r.vibration_mm_s), "{r:?}");
            assert!((0.0..=100.0).contains(&r.battery_pct), "{r:?}");
            if e.late {
                late += 1;
                let behind = (now - e.occurred_at).num_milliseconds();
                assert!((5_000..=300_000).contains(&behind), "{behind} ms late");
                assert!(
                    r.seq < last_seq[&e.device],
                    "a late reading is an older one"
                );
            } else {
                assert_eq!(e.occurred_at, now);
                let last = last_seq.insert(e.device.clone(), r.seq).unwrap_or(0);
                assert!(r.seq > last, "{}: seq {} after {last}", e.device, r.seq);
            }
        }
        // 200 s of simulated time: only the readings held less than that come out.
        assert!(late > 500, "{late} late readings");
    }

    #[test]
    fn status_duplicate_and_malformed_shares_follow_the_config() {
        let cfg = FleetConfig {
            status_rate: 0.02,
            duplicate_rate: 0.01,
            malformed_rate: 0.005,
            ..config(9)
        };
        let n = 200_000;
        let evs = events(cfg, n);
        let share = |f: &dyn Fn(&SimEvent) -> bool| {
            evs.iter().filter(|(_, e)| f(e)).count() as f64 / n as f64
        };
        let status = share(&|e| e.kind() == SimKind::Status);
        let dup = share(&|e| e.duplicate);
        let malformed = share(&|e| e.malformed.is_some());
        assert!((0.014..0.026).contains(&status), "status {status}");
        assert!((0.008..0.012).contains(&dup), "duplicates {dup}");
        assert!((0.004..0.006).contains(&malformed), "malformed {malformed}");
        let states: Vec<DeviceState> = evs
            .iter()
            .filter_map(|(_, e)| match &e.body {
                Body::Status(s) => Some(s.state),
                Body::Reading(_) => None,
            })
            .collect();
        for state in [
            DeviceState::Online,
            DeviceState::Offline,
            DeviceState::Degraded,
            DeviceState::Maintenance,
        ] {
            assert!(states.contains(&state), "no {state:?}");
        }
    }

    #[test]
    fn an_offline_device_sends_no_readings_until_it_is_back() {
        let cfg = FleetConfig {
            status_rate: 0.05,
            ..config(11)
        };
        let mut state: HashMap<Arc<str>, DeviceState> = HashMap::new();
        for (_, e) in events(cfg, 100_000) {
            match &e.body {
                Body::Status(s) => {
                    let before = state.insert(e.device.clone(), s.state);
                    // Every change is down from online or back up to it.
                    let before = before.unwrap_or(DeviceState::Online);
                    assert!(
                        (before == DeviceState::Online) != (s.state == DeviceState::Online),
                        "{before:?} -> {:?}",
                        s.state
                    );
                }
                Body::Reading(_) if !e.late => {
                    let now = state.get(&e.device).copied().unwrap_or(DeviceState::Online);
                    assert!(
                        matches!(now, DeviceState::Online | DeviceState::Degraded),
                        "{} sent a reading while {now:?}",
                        e.device
                    );
                }
                Body::Reading(_) => {}
            }
        }
    }

    #[test]
    fn the_episode_start_probability_gives_the_rate_back() {
        for rate in [0.0001, 0.01, 0.5, 1.0] {
            let p = episode_start_probability(rate);
            let share = MEAN_EPISODE_LEN / (1.0 / p - 1.0 + MEAN_EPISODE_LEN);
            assert!((share - rate).abs() < 1e-9, "{rate}: {share}");
        }
        assert_eq!(episode_start_probability(0.0), 0.0);
    }
}
