//! `sluice bench project`: Avro readings through the projector on a scratch embedded log into
//! the store given. Reports readings projected per second (rollups and latest state included)
//! and, when paced, the projection lag; on PostgreSQL also a raw `COPY` of the same rows into a
//! table like `events`, measured in the same run.
//!
//! It writes a projection version of its own (and a consumer group of its own) and drops that
//! version afterwards, so the live read models are untouched.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{TimeDelta, Utc};
use serde::Serialize;
use sluice_core::{Event, EventType, Source};
use sluice_log::bench::Latency;
use sluice_log::{EmbeddedLog, EmbeddedOptions, Log, Producer, Record, TopicSpec};
use sluice_schemas::{EventCodec, Registry};
use sluice_store::{AppendEvent, Backend, Store, StoreOptions};
use tokio_util::sync::CancellationToken;

use crate::cli::BenchProjectArgs;
use crate::commands::{load_schemas, runtime};

/// How long the projector may take to catch up after the last produce.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(600);

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectReport {
    /// Readings pushed through.
    pub readings: u64,
    /// Distinct devices.
    pub devices: u64,
    /// The requested produce rate, if paced.
    pub rate: Option<u64>,
    /// `postgres` or `sqlite`.
    pub store: &'static str,
    /// The scratch projection version written, and dropped at the end.
    pub version: i32,
    /// Readings per second from the first produce until all were projected.
    pub projected_per_s: f64,
    /// Paced runs: time from a batch's produce until the store held as many readings, in ms.
    pub lag_ms: Option<Latency>,
    /// PostgreSQL: one `COPY` of the same rows into a table like `events`, rows per second.
    pub copy_rows_per_s: Option<f64>,
    /// `projected_per_s / copy_rows_per_s`, unpaced runs only.
    pub projected_vs_copy: Option<f64>,
}

pub fn bench_project(args: &BenchProjectArgs) -> Result<ExitCode> {
    if args.readings == 0 || args.devices == 0 || args.batch == 0 {
        bail!("--readings, --devices and --batch must be at least 1");
    }
    let registry = Arc::new(Registry::in_memory());
    registry
        .register_dir(&load_schemas(&args.schemas)?)
        .with_context(|| format!("cannot register the schemas of {}", args.schemas.display()))?;
    let codec = Arc::new(EventCodec::new(registry));
    let report = runtime()?.block_on(run(args, codec))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "projector bench on {}: {} readings from {} devices{}",
        report.store,
        report.readings,
        report.devices,
        report
            .rate
            .map_or(String::new(), |r| format!(", paced at {r} readings/s"))
    );
    let ratio = match (report.copy_rows_per_s, report.projected_vs_copy) {
        (Some(copy), Some(ratio)) => {
            format!(
                "  (COPY of the same rows into an events table: {copy:.0} rows/s; ratio {ratio:.2})"
            )
        }
        _ => String::new(),
    };
    println!(
        "  projected  {:>10.0} readings/s, rollups and latest state included{ratio}",
        report.projected_per_s
    );
    if let Some(lag) = &report.lag_ms {
        println!(
            "  lag        p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (produce to projected)",
            lag.p50, lag.p99, lag.max
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(
    args: &BenchProjectArgs,
    codec: Arc<EventCodec<Arc<Registry>>>,
) -> Result<ProjectReport> {
    let store = Store::connect(
        &args.store,
        StoreOptions {
            migrate_on_connect: true,
            ..StoreOptions::default()
        },
    )
    .await
    .with_context(|| {
        format!(
            "cannot open the store {}",
            crate::commands::redact(&args.store)
        )
    })?;
    let dir = tempfile::tempdir().context("cannot make a scratch folder for the log")?;
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedOptions::default())?;
    let topic = "bench-readings";
    log.create_topic(&TopicSpec::new(topic, 6)).await?;
    let stamp = Utc::now().timestamp_micros();
    // A version of its own, far from the live one, dropped at the end.
    let version = 1_000_000 + (stamp % 1_000_000) as i32;

    eprintln!("  encoding {} readings", args.readings);
    let start = Utc::now() - TimeDelta::hours(1);
    let mut events = Vec::with_capacity(args.readings as usize);
    let mut batches: Vec<Vec<Record>> = Vec::new();
    let mut current = Vec::with_capacity(args.batch);
    for i in 0..args.readings {
        let device = format!("bench-dev-{}", i % args.devices);
        let at = start + TimeDelta::milliseconds(i as i64 * 3_600_000 / args.readings as i64);
        let event = Event::new(
            EventType::new(EventType::SENSOR_READING)?,
            &device,
            at,
            serde_json::json!({
                "seq": i, "temperature_c": 20.0 + (i % 17) as f64 / 2.0,
                "humidity_pct": 40.0 + (i % 11) as f64, "vibration_mm_s": (i % 7) as f64 / 10.0,
                "battery_pct": 100.0 - (i % 50) as f64,
            }),
            Source::Simulator,
        )?;
        let (value, _) = codec.encode(&event).await?;
        current.push(Record {
            key: Some(device.into_bytes()),
            value,
            ..Record::default()
        });
        if current.len() == args.batch {
            batches.push(std::mem::take(&mut current));
        }
        events.push(event);
    }
    if !current.is_empty() {
        batches.push(current);
    }

    let mut settings = sluice_projector::Settings::new("bench-projector", &[topic]);
    settings.group = format!("bench-projector-{stamp}");
    settings.version = version;
    let stats = Arc::new(sluice_projector::Stats::default());
    let token = CancellationToken::new();
    let projector = {
        let (log, store, codec, stats, token) = (
            log.clone(),
            store.clone(),
            codec.clone(),
            stats.clone(),
            token.clone(),
        );
        tokio::spawn(async move {
            sluice_projector::run(&settings, &log, &store, &codec, &stats, token).await
        })
    };

    // The projector's count of readings committed, sampled every millisecond, says when each
    // produce was projected. (Not `count(*)` on the store: at this rate that query would take
    // a good part of the database's CPU from the projector.) Checked against the store below.
    let samples = Arc::new(std::sync::Mutex::new(Vec::<(Instant, u64)>::new()));
    let sampler = {
        let (stats, samples, n) = (stats.clone(), samples.clone(), args.readings);
        tokio::spawn(async move {
            loop {
                let count = stats.readings.load(std::sync::atomic::Ordering::Relaxed);
                samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), count));
                if count >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let producer = log.producer()?;
    let began = Instant::now();
    let mut produced: Vec<(Instant, u64)> = Vec::with_capacity(batches.len());
    let mut total = 0u64;
    let every = args
        .rate
        .map(|r| Duration::from_secs_f64(args.batch as f64 / r.max(1) as f64));
    for (i, batch) in batches.into_iter().enumerate() {
        if let Some(every) = every {
            let due = began + every * i as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        total += batch.len() as u64;
        let at = Instant::now();
        producer.send(topic, batch).await?;
        produced.push((at, total));
    }
    eprintln!("  produced {total}; waiting for the projector");
    let caught_up = tokio::time::timeout(CATCH_UP_LIMIT, sampler).await;
    token.cancel();
    let outcome = projector.await.context("the projector panicked")?;
    if caught_up.is_err() {
        bail!("the projector did not catch up within {CATCH_UP_LIMIT:?}");
    }
    outcome.context("the projector failed")?;
    let stored = store.readings_count(version).await?;
    if stored != args.readings {
        bail!(
            "the store holds {stored} readings of the {} projected",
            args.readings
        );
    }
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let done_at = samples.last().map_or(began, |(t, _)| *t);
    let projected_per_s = args.readings as f64 / done_at.duration_since(began).as_secs_f64();
    let lag_ms = args.rate.map(|_| {
        let mut lags: Vec<f64> = produced
            .iter()
            .map(|(at, count)| {
                let seen = samples
                    .iter()
                    .find(|(_, c)| c >= count)
                    .map_or(done_at, |(t, _)| *t);
                seen.saturating_duration_since(*at).as_secs_f64() * 1000.0
            })
            .collect();
        lags.sort_by(f64::total_cmp);
        let pct = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize];
        Latency {
            p50: pct(0.5),
            p99: pct(0.99),
            max: pct(1.0),
        }
    });
    let copy = if store.backend() == Backend::Postgres {
        eprintln!("  COPY baseline: copying the same rows into a scratch table");
        let rows: Vec<AppendEvent> = events
            .into_iter()
            .map(|event| AppendEvent {
                topic: topic.to_owned(),
                key: Vec::new(),
                value: Vec::new(),
                event,
            })
            .collect();
        Some(sluice_store::bench::copy_baseline(&args.store, &rows).await?)
    } else {
        None
    };
    let dropped = store.drop_projection_version(version).await?;
    tracing::debug!(dropped, version, "bench projection dropped");
    store.close().await;
    Ok(ProjectReport {
        readings: args.readings,
        devices: args.devices,
        rate: args.rate,
        store: match store.backend() {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        },
        version,
        projected_per_s,
        lag_ms,
        copy_rows_per_s: copy.map(|c| c.events_rows_per_s),
        projected_vs_copy: copy
            .filter(|_| args.rate.is_none())
            .map(|c| projected_per_s / c.events_rows_per_s),
    })
}
