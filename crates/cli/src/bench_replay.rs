//! `sluice bench replay`: the two operator jobs of `sluice replay`, run by the same code on a
//! scratch PostgreSQL database of their own (created on the server of `--store`, dropped at the
//! end; the store itself is never written to):
//!
//! - N readings are seeded into the event store by `COPY`: the same-run baseline of the rebuild
//!   (raw `COPY` rows/s into `events` and `event_ids`);
//! - they are replayed to a topic of a scratch embedded log, beside that log's own produce rate
//!   for records of the same size (`sluice bench log`'s producer);
//! - the projector's read models are rebuilt from them into a new version, which is then checked
//!   against a from-scratch `GROUP BY` of its readings.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{TimeDelta, Utc};
use serde::Serialize;
use sluice_core::{Event, EventType, Source};
use sluice_log::{EmbeddedLog, EmbeddedOptions, Log, TopicSpec};
use sluice_schemas::{AnySchemas, EventCodec, Registry};
use sluice_store::bench::{ScratchDatabase, seed_events};
use sluice_store::{AppendEvent, NewReplayJob, Resolution, Store, StoreOptions};
use tokio_util::sync::CancellationToken;

use crate::cli::{BenchReplayArgs, ReplayActions, ReplayInference};
use crate::commands::{load_schemas, redact, runtime};
use crate::ops::progress;
use crate::replay::{Built, Ended, Pacer, Selection, steps, to_topic};

/// Events per seeding `COPY`.
const SEED_CHUNK: u64 = 100_000;
/// Seconds between a device's readings in the seeded history.
const EVERY_S: i64 = 10;

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// Readings in the event store.
    pub events: u64,
    /// Distinct devices.
    pub devices: u64,
    /// Baseline: raw `COPY` of the events into `events` and `event_ids`, rows per second.
    pub copy_rows_per_s: f64,
    /// Baseline: the embedded log's own produce rate for records of the replayed size.
    pub log_produce_msgs_per_s: f64,
    /// Bytes per replayed record value (the baseline's message size).
    pub record_bytes: usize,
    /// `sluice replay --to-topic`: events read from the store, encoded, marked and acknowledged
    /// by the log, per second.
    pub replay_events_per_s: f64,
    /// `replay_events_per_s / log_produce_msgs_per_s`.
    pub replay_vs_log: f64,
    /// `sluice replay --rebuild`: events per second into the new version (readings, rollups,
    /// latest state).
    pub rebuild_events_per_s: f64,
    /// `rebuild_events_per_s / copy_rows_per_s`.
    pub rebuild_vs_copy: f64,
    /// Seconds the rebuild took.
    pub rebuild_s: f64,
    /// 1-minute rollup rows of the rebuilt version, all equal to a `GROUP BY` of its readings.
    pub rollups_verified: usize,
}

pub fn bench_replay(args: &BenchReplayArgs) -> Result<ExitCode> {
    if args.events == 0 || args.devices == 0 {
        bail!("--events and --devices must be at least 1");
    }
    if !(args.store.starts_with("postgres://") || args.store.starts_with("postgresql://")) {
        bail!(
            "bench replay runs on PostgreSQL, where the replay and rebuild targets are: give \
             --store postgres://USER@HOST:PORT/DB (it works in a scratch database beside it)"
        );
    }
    let registry = Arc::new(Registry::in_memory());
    registry
        .register_dir(&load_schemas(&args.schemas)?)
        .with_context(|| format!("cannot register the schemas of {}", args.schemas.display()))?;
    let codec = Arc::new(EventCodec::new(AnySchemas::Local(registry)));
    let report = runtime()?.block_on(async {
        let scratch = ScratchDatabase::create(
            &args.store,
            &format!("sluice_bench_replay_{}", std::process::id()),
        )
        .await
        .with_context(|| {
            format!(
                "cannot create a scratch database on the server of {}",
                redact(&args.store)
            )
        })?;
        let url = scratch.url.clone();
        // Ctrl-C ends the run, not the process: the scratch database is still dropped.
        let result = tokio::select! {
            r = run(args, &url, codec) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        // Dropped whatever happened; a failure to drop is reported only if the run worked.
        let dropped = scratch.drop_now().await;
        let report = result?;
        dropped.context("cannot drop the bench's scratch database")?;
        anyhow::Ok(report)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let r = &report;
    println!(
        "replay bench on PostgreSQL: {} readings from {} devices",
        r.events, r.devices
    );
    println!(
        "  baseline   COPY into events      {:>10.0} rows/s",
        r.copy_rows_per_s
    );
    println!(
        "  baseline   log produce           {:>10.0} msgs/s ({} B records)",
        r.log_produce_msgs_per_s, r.record_bytes
    );
    println!(
        "  replay     to a topic            {:>10.0} events/s  ({:.2}x the log's produce rate)",
        r.replay_events_per_s, r.replay_vs_log
    );
    println!(
        "  rebuild    of the projector      {:>10.0} events/s  ({:.2}x COPY; {:.1} s; {} 1-minute rollups equal a GROUP BY)",
        r.rebuild_events_per_s, r.rebuild_vs_copy, r.rebuild_s, r.rollups_verified
    );
    Ok(ExitCode::SUCCESS)
}

async fn run(
    args: &BenchReplayArgs,
    url: &str,
    codec: Arc<EventCodec<AnySchemas>>,
) -> Result<ReplayReport> {
    let store = Store::connect(
        url,
        StoreOptions {
            migrate_on_connect: true,
            ..StoreOptions::default()
        },
    )
    .await
    .context("cannot open the scratch store")?;
    let result = measure(args, url, &store, codec).await;
    store.close().await;
    result
}

async fn measure(
    args: &BenchReplayArgs,
    url: &str,
    store: &Store,
    codec: Arc<EventCodec<AnySchemas>>,
) -> Result<ReplayReport> {
    // The seeded history ends now: one reading per device every 10 s.
    let rounds = args.events.div_ceil(args.devices) as i64;
    let start = Utc::now() - TimeDelta::seconds(rounds * EVERY_S);
    let bar = progress(args.events, "seed (COPY)");
    let mut copying = Duration::ZERO;
    let mut record_bytes = 0;
    let mut i = 0u64;
    while i < args.events {
        let n = SEED_CHUNK.min(args.events - i);
        let mut rows = Vec::with_capacity(n as usize);
        for k in i..i + n {
            let round = (k / args.devices) as i64;
            let at = start + TimeDelta::seconds(round * EVERY_S);
            let mut event = Event::new(
                EventType::new(EventType::SENSOR_READING)?,
                format!("bench-dev-{}", k % args.devices),
                at,
                serde_json::json!({
                    "seq": round,
                    "temperature_c": 20.0 + (k % 17) as f64 / 2.0,
                    "humidity_pct": 40.0 + (k % 11) as f64,
                    "pressure_hpa": 1000.0 + (k % 29) as f64,
                    "vibration_mm_s": (k % 7) as f64 / 10.0,
                    "battery_pct": 100.0 - (round % 100) as f64,
                }),
                Source::Simulator,
            )?;
            event.ingested_at = at + TimeDelta::milliseconds(20);
            event.metadata.schema_version = Some(1);
            if record_bytes == 0 {
                record_bytes = codec.encode(&event).await?.0.len();
            }
            rows.push(AppendEvent {
                key: event.aggregate_id.as_bytes().to_vec(),
                event,
                topic: String::new(),
                value: Vec::new(),
            });
        }
        copying += seed_events(url, &rows, i as i64 + 1).await?;
        i += n;
        bar.set_position(i);
    }
    bar.finish_and_clear();
    let copy_rows_per_s = args.events as f64 / copying.as_secs_f64().max(1e-9);
    eprintln!(
        "  seeded {} events: {copy_rows_per_s:.0} rows/s by COPY",
        args.events
    );

    // The log: its own produce rate first, then the replay, on scratch folders of their own.
    let dir = tempfile::tempdir().context("cannot make a scratch folder for the log")?;
    let baseline_log = EmbeddedLog::open(&dir.path().join("baseline"), EmbeddedOptions::default())?;
    let baseline = sluice_log::bench::run(
        &baseline_log,
        &sluice_log::bench::BenchOptions {
            messages: args.events.min(1_000_000),
            size: record_bytes.max(8),
            batch: 5_000,
            partitions: 6,
            rate: None,
        },
        None,
        |_| {},
    )
    .await
    .context("the log baseline failed")?;
    drop(baseline_log);
    eprintln!(
        "  log baseline: {:.0} msgs/s produced",
        baseline.produce_msgs_per_s
    );

    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedOptions::default())?;
    let topic = "bench-replay";
    log.create_topic(&TopicSpec::new(topic, 6)).await?;
    let selection = Selection {
        from: None,
        to: None,
        types: Vec::new(),
        aggregates: Vec::new(),
        rate: None,
        actions: ReplayActions::Suppress,
        inference: ReplayInference::Skip,
    };
    let stop = CancellationToken::new();
    let job = store
        .create_replay_job(&NewReplayJob {
            job_id: "bench-topic".into(),
            created_by: "bench".into(),
            selection: serde_json::to_value(&selection)?,
            target: format!("topic:{topic}"),
            total: args.events,
        })
        .await?;
    let began = Instant::now();
    match to_topic(store, &job, &selection, &log, topic, &codec, &stop).await? {
        Ended::Done(summary) => eprintln!("  {summary}"),
        _ => bail!("the replay stopped before the end"),
    }
    let replay_events_per_s = args.events as f64 / began.elapsed().as_secs_f64();
    let acknowledged = store.replay_job(&job.job_id).await?.map_or(0, |j| j.done);
    if acknowledged != args.events {
        bail!(
            "the log acknowledged {acknowledged} replayed events of {}",
            args.events
        );
    }
    drop(log);

    let version = store
        .begin_projection_version("projector", 1, "bench-rebuild")
        .await?;
    let job = store
        .create_replay_job(&NewReplayJob {
            job_id: "bench-rebuild".into(),
            created_by: "bench".into(),
            selection: serde_json::to_value(&selection)?,
            target: "rebuild:projector".into(),
            total: args.events,
        })
        .await?;
    let bar = progress(args.events, &format!("rebuild v{version}"));
    let began = Instant::now();
    let built = steps(
        store,
        &job,
        version,
        None,
        &bar,
        &Pacer::new(None, 0),
        &stop,
    )
    .await?;
    let rebuild = began.elapsed();
    bar.finish_and_clear();
    let Built::Whole { done, .. } = built else {
        bail!("the rebuild stopped before the end")
    };
    let stored = store.readings_count(version).await?;
    if done != args.events || stored != args.events {
        bail!(
            "the rebuild saw {done} events and stored {stored} readings of {}",
            args.events
        );
    }
    let mut rollups_verified = 0;
    for resolution in [Resolution::Minute, Resolution::Hour] {
        let built = store.rollups(version, resolution, None).await?;
        let scratch = store.rollups_from_scratch(version, resolution).await?;
        let same = built.len() == scratch.len()
            && built.iter().zip(&scratch).all(|(a, b)| {
                (
                    &a.device_id,
                    a.bucket,
                    &a.metric,
                    a.count,
                    a.min,
                    a.max,
                    a.last,
                ) == (
                    &b.device_id,
                    b.bucket,
                    &b.metric,
                    b.count,
                    b.min,
                    b.max,
                    b.last,
                ) && (a.sum - b.sum).abs() <= 1e-9 * a.sum.abs().max(1.0)
            });
        if !same {
            bail!("the rebuilt {resolution:?} rollups differ from a GROUP BY of the readings");
        }
        if resolution == Resolution::Minute {
            rollups_verified = built.len();
        }
    }
    let rebuild_events_per_s = args.events as f64 / rebuild.as_secs_f64();
    Ok(ReplayReport {
        events: args.events,
        devices: args.devices,
        copy_rows_per_s,
        log_produce_msgs_per_s: baseline.produce_msgs_per_s,
        record_bytes,
        replay_events_per_s,
        replay_vs_log: replay_events_per_s / baseline.produce_msgs_per_s,
        rebuild_events_per_s,
        rebuild_vs_copy: rebuild_events_per_s / copy_rows_per_s,
        rebuild_s: rebuild.as_secs_f64(),
        rollups_verified,
    })
}
