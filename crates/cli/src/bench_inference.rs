//! `sluice bench inference`: the model's scoring throughput at batch sizes 1, 64 and 1024, and
//! the latency micro-batching adds per reading at a steady arrival rate, on one thread.
//!
//! Feature rows come from a simulated fleet run through the inferencer's feature code. The
//! baseline, measured in the same run, is the statistical fallback's scoring of the same rows
//! (features and a z-score, no model), so the ratios say what the model costs beyond it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use sluice_inferencer::features::{self, DeviceState, FeatureParams, Values};
use sluice_inferencer::model::{self, OnnxModel};
use sluice_simulator::{Body, Fleet, FleetConfig};

use crate::cli::BenchInferenceArgs;

/// Throughput at one batch size.
#[derive(Debug, Serialize)]
pub struct BatchFigures {
    /// Rows per model call.
    pub batch: usize,
    /// Rows scored.
    pub rows: usize,
    /// Rows per second.
    pub rows_per_s: f64,
    /// Microseconds per row.
    pub us_per_row: f64,
    /// Time per row against the fallback's (the fallback's rows_per_s / rows_per_s).
    pub cost_vs_fallback: f64,
}

/// Latency added by micro-batching at a steady rate.
#[derive(Debug, Serialize)]
pub struct PacedFigures {
    /// Readings per second offered.
    pub rate: u64,
    /// Readings scored.
    pub readings: usize,
    /// Readings per second achieved.
    pub achieved_per_s: f64,
    /// Largest batch.
    pub max_batch: usize,
    /// Mean batch.
    pub mean_batch: f64,
    /// From a reading's arrival to its score, ms.
    pub p50_ms: f64,
    /// ms.
    pub p99_ms: f64,
    /// ms.
    pub max_ms: f64,
}

/// What `sluice bench inference` prints.
#[derive(Debug, Serialize)]
pub struct InferenceReport {
    /// The model and version.
    pub model: String,
    /// The folder it was loaded from.
    pub model_dir: String,
    /// ONNX Runtime's library.
    pub onnxruntime: String,
    /// Time to load the model (graph read and optimised), ms.
    pub load_ms: f64,
    /// Feature rows per second (per-device rolling state), the part before the model.
    pub features_per_s: f64,
    /// The baseline: the fallback's scoring of the same readings (features and z-score).
    pub fallback_per_s: f64,
    /// Model throughput per batch size.
    pub batches: Vec<BatchFigures>,
    /// Micro-batching at `rate`.
    pub paced: PacedFigures,
}

pub fn bench_inference(args: &BenchInferenceArgs) -> Result<ExitCode> {
    if args.rows < 1024 {
        bail!("--rows must be at least 1024 (one batch of the largest size)");
    }
    let dir = model::resolve(&args.model, "latest")
        .with_context(|| format!("no model to bench in {}", args.model.display()))?;
    eprintln!("bench inference: loading {}", dir.display());
    let started = Instant::now();
    let model = OnnxModel::load(&dir, None).with_context(|| {
        "the bench needs ONNX Runtime and the model; scripts/fetch-onnxruntime fetches the runtime"
    })?;
    let load_ms = ms(started.elapsed());
    let params = model.metadata.feature_params.clone();

    eprintln!("bench inference: simulating {} readings", args.rows);
    let readings = fleet_values(args.rows);
    let started = Instant::now();
    let rows = feature_rows(&readings, &params);
    let features_per_s = readings.len() as f64 / started.elapsed().as_secs_f64();
    let fallback = FeatureParams::fallback(30, 3.0);
    let started = Instant::now();
    let mut flagged = 0usize;
    let mut states = DeviceStates::default();
    for (device, values) in &readings {
        let row = states.get(*device).observe(values, &fallback);
        flagged += usize::from(features::max_z(&row) >= 3.0);
    }
    let fallback_per_s = readings.len() as f64 / started.elapsed().as_secs_f64();
    std::hint::black_box(flagged);

    let count = rows.len() / features::WIDTH;
    let mut batches = Vec::new();
    for batch in [1usize, 64, 1024] {
        // Batch 1 is slow by nature; a tenth of the rows gives a steady figure.
        let n = if batch == 1 { count / 10 } else { count };
        let n = n - n % batch;
        let started = Instant::now();
        for chunk in rows[..n * features::WIDTH].chunks(batch * features::WIDTH) {
            std::hint::black_box(model.score(chunk)?);
        }
        let secs = started.elapsed().as_secs_f64();
        let rows_per_s = n as f64 / secs;
        eprintln!("bench inference: batch {batch}: {rows_per_s:.0} rows/s");
        batches.push(BatchFigures {
            batch,
            rows: n,
            rows_per_s,
            us_per_row: secs * 1e6 / n as f64,
            cost_vs_fallback: fallback_per_s / rows_per_s,
        });
    }
    let paced = paced(&model, &readings, &params, args)?;
    let report = InferenceReport {
        model: format!("{} version {}", model.metadata.name, model.metadata.version),
        model_dir: dir.display().to_string(),
        onnxruntime: model::runtime_library().display().to_string(),
        load_ms,
        features_per_s,
        fallback_per_s,
        batches,
        paced,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// Readings arrive every 1/rate s; whenever the scorer is free it takes what has arrived (up
/// to `max_batch`, as the processor loop's poll does), computes features and scores them in one
/// call. A reading's latency is from its arrival to the end of that call.
fn paced(
    model: &OnnxModel,
    readings: &[(usize, Values)],
    params: &FeatureParams,
    args: &BenchInferenceArgs,
) -> Result<PacedFigures> {
    let total = ((args.rate as f64 * args.seconds) as usize).min(readings.len());
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let mut states = DeviceStates::default();
    let mut latencies = Vec::with_capacity(total);
    let mut sizes = Vec::new();
    let mut rows = Vec::with_capacity(args.max_batch * features::WIDTH);
    let start = Instant::now();
    let arrival = |i: usize| start + interval * i as u32;
    let mut next = 0;
    while next < total {
        let now = Instant::now();
        if arrival(next) > now {
            std::thread::sleep(arrival(next) - now);
            continue;
        }
        let mut end = next;
        while end < total && end - next < args.max_batch && arrival(end) <= now {
            end += 1;
        }
        rows.clear();
        for (device, values) in &readings[next..end] {
            let row = states.get(*device).observe(values, params);
            rows.extend(row.iter().map(|&x| x as f32));
        }
        std::hint::black_box(model.score(&rows)?);
        let done = Instant::now();
        latencies.extend((next..end).map(|i| done - arrival(i)));
        sizes.push(end - next);
        next = end;
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| ms(latencies[((latencies.len() - 1) as f64 * p) as usize]);
    Ok(PacedFigures {
        rate: args.rate,
        readings: total,
        achieved_per_s: total as f64 / elapsed,
        max_batch: sizes.iter().copied().max().unwrap_or(0),
        mean_batch: total as f64 / sizes.len().max(1) as f64,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    })
}

/// Per-device states by device index.
#[derive(Default)]
struct DeviceStates(Vec<DeviceState>);

impl DeviceStates {
    fn get(&mut self, device: usize) -> &mut DeviceState {
        if device >= self.0.len() {
            self.0.resize_with(device + 1, DeviceState::default);
        }
        &mut self.0[device]
    }
}

/// `n` readings of a 200-device fleet (anomalies at 1 %), as (device index, metric values).
fn fleet_values(n: usize) -> Vec<(usize, Values)> {
    const DEVICES: u32 = 200;
    let mut fleet = Fleet::new(FleetConfig {
        devices: DEVICES,
        rate: DEVICES,
        anomaly_rate: 0.01,
        malformed_rate: 0.0,
        duplicate_rate: 0.0,
        status_rate: 0.0,
        late_rate: 0.0,
        ..FleetConfig::default()
    });
    let mut now: DateTime<Utc> = Utc::now();
    let step = TimeDelta::microseconds(1_000_000 / i64::from(DEVICES));
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        now += step;
        let event = fleet.next_event(now);
        if let Body::Reading(r) = &event.body {
            let device = event.device[4..].parse::<usize>().unwrap_or(0);
            out.push((
                device,
                [
                    Some(r.temperature_c),
                    Some(r.humidity_pct),
                    Some(r.vibration_mm_s),
                ],
            ));
        }
    }
    out
}

fn feature_rows(readings: &[(usize, Values)], params: &FeatureParams) -> Vec<f32> {
    let mut states = DeviceStates::default();
    let mut rows = Vec::with_capacity(readings.len() * features::WIDTH);
    for (device, values) in readings {
        let row = states.get(*device).observe(values, params);
        rows.extend(row.iter().map(|&x| x as f32));
    }
    rows
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print(r: &InferenceReport) {
    println!("model       {} ({})", r.model, r.model_dir);
    println!("runtime     {}", r.onnxruntime);
    println!("load        {:.1} ms", r.load_ms);
    println!("features    {:.0} rows/s", r.features_per_s);
    println!(
        "baseline    {:.0} rows/s (the {} fallback: features and z-score)",
        r.fallback_per_s,
        sluice_inferencer::FALLBACK_MODEL
    );
    println!("batch        rows/s      µs/row   time per row vs fallback");
    for b in &r.batches {
        println!(
            "{:>5}  {:>12.0}  {:>10.2}   {:>9.0}x",
            b.batch, b.rows_per_s, b.us_per_row, b.cost_vs_fallback
        );
    }
    let p = &r.paced;
    println!(
        "paced       {} readings at {}/s (achieved {:.0}/s), batches mean {:.1} max {}",
        p.readings, p.rate, p.achieved_per_s, p.mean_batch, p.max_batch
    );
    println!(
        "added latency per reading: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        p.p50_ms, p.p99_ms, p.max_ms
    );
}
