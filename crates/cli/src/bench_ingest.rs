//! `sluice bench ingest`: raw JSON readings through the ingest-validator and the outbox-relay,
//! both running in this process on the log and store given, and read back from the events
//! topic by a consumer group. Reports append and relay throughput and the relay lag, beside a
//! raw `COPY` of the same rows into scratch tables like the store's (PostgreSQL only), measured
//! in the same run.
//!
//! The bench's topics and groups are named per run (`bench-raw-<stamp>`,
//! `bench-events-<stamp>`), so runs never collide; its events stay in the store.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use sluice_core::{Event, EventType, Source};
use sluice_log::bench::Latency;
use sluice_log::{Consumer, EmbeddedLog, KafkaLog, Log, Producer, Record, TopicSpec};
use sluice_schemas::{EventCodec, Registry};
use sluice_store::{AppendEvent, Backend, Store, StoreOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::BenchIngestArgs;
use crate::commands::{load_schemas, runtime};

type Codec = EventCodec<Arc<Registry>>;

/// The event type the bench pushes.
const EVENT_TYPE: &str = "sensor.reading";
/// Aggregate ids of the warm-up events, which are not measured.
const WARM_UP: &str = "warm-up-";
/// How long setup steps (group joins, the warm-up round trip, shutdown) may take.
const SETUP_LIMIT: Duration = Duration::from_secs(60);

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct IngestReport {
    /// Events pushed through (warm-up not included).
    pub events: u64,
    /// Raw records per produce call.
    pub batch: usize,
    /// Distinct devices.
    pub devices: u64,
    /// Partitions of the raw and events topics.
    pub partitions: u32,
    /// Most events per store transaction and per relay pass.
    pub append_batch: usize,
    /// The requested produce rate, if paced.
    pub rate: Option<u64>,
    /// `postgres` or `sqlite`.
    pub store: &'static str,
    /// `embedded`, `kafka` or `kafka-mock`.
    pub log: &'static str,
    /// Events the validator appended (new to the store).
    pub appended: u64,
    /// Outbox entries the relay published and deleted.
    pub published: u64,
    /// Distinct events read back from the events topic.
    pub relayed: u64,
    /// Events read back more than once (a retried publish).
    pub duplicates_on_topic: u64,
    /// Raw events acknowledged by the log per second while producing.
    pub produce_events_per_s: f64,
    /// N / (first produce → the store has all N).
    pub appended_events_per_s: f64,
    /// N / (first produce → the relay published all N and all N were read back).
    pub relayed_events_per_s: f64,
    /// Time read back from the events topic minus the event's `ingested_at`.
    pub relay_lag_ms: Latency,
    /// Rows per second of one `COPY` of the same rows into a table like `events`
    /// (PostgreSQL only).
    pub copy_rows_per_s: Option<f64>,
    /// Rows per second of `COPY`s of the same rows into tables like `events`, `event_ids` and
    /// `outbox`, in one transaction: everything an append writes (PostgreSQL only).
    pub copy_all_tables_rows_per_s: Option<f64>,
    /// `appended_events_per_s / copy_rows_per_s`, for unpaced runs.
    pub appended_vs_copy: Option<f64>,
    /// `appended_events_per_s / copy_all_tables_rows_per_s`, for unpaced runs.
    pub appended_vs_copy_all_tables: Option<f64>,
    /// What the baseline is, or why there is none.
    pub copy_baseline: String,
}

pub fn bench_ingest(args: &BenchIngestArgs) -> Result<ExitCode> {
    ensure!(
        args.events > 0
            && args.batch > 0
            && args.devices > 0
            && args.partitions > 0
            && args.append_batch > 0
            && args.rate != Some(0),
        "the bench needs --events, --batch, --devices, --partitions, --append-batch and --rate \
         of at least 1"
    );
    let registry = Arc::new(Registry::in_memory());
    registry
        .register_dir(&load_schemas(&args.schemas)?)
        .with_context(|| format!("cannot register the schemas of {}", args.schemas.display()))?;
    let codec = Arc::new(EventCodec::new(registry));
    let report = runtime()?.block_on(async {
        let opts = StoreOptions {
            migrate_on_connect: true,
            ..StoreOptions::default()
        };
        let store = Store::connect(&args.store, opts).await.with_context(|| {
            format!(
                "cannot open the store {}",
                crate::commands::redact(&args.store)
            )
        })?;
        let waiting = store.outbox_depth().await?;
        ensure!(
            waiting == 0,
            "the store's outbox has {waiting} entries waiting; the bench's relay would publish \
             them too. Use a store no relay serves (or let its relay drain it)"
        );
        let report = on_log(args, &store, codec).await;
        store.close().await;
        report
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

async fn on_log(args: &BenchIngestArgs, store: &Store, codec: Arc<Codec>) -> Result<IngestReport> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let names = Names {
        raw: format!("bench-raw-{stamp}"),
        events: format!("bench-events-{stamp}"),
        stamp: stamp.to_string(),
    };
    let url = args.log.as_str();
    if url.starts_with("embedded://") {
        let log = EmbeddedLog::from_url(url)?;
        create_topics(&log, &names, args.partitions).await?;
        drive(Arc::new(log), "embedded", args, store, codec, &names).await
    } else if url == "kafka-mock://" {
        // An in-process mock cluster (a real Kafka-protocol broker) for this run only; it has
        // no CreateTopics, so the topics are made on the cluster directly.
        let cluster = sluice_log::kafka::mock_cluster(1)?;
        for topic in [&names.raw, &names.events] {
            cluster
                .create_topic(topic, args.partitions as i32, 1)
                .map_err(|e| anyhow!("mock cluster: cannot create {topic}: {e}"))?;
        }
        let log = KafkaLog::on_mock(&cluster);
        drive(Arc::new(log), "kafka-mock", args, store, codec, &names).await
    } else if url.starts_with("kafka://") {
        let log = KafkaLog::from_url(url)?;
        create_topics(&log, &names, args.partitions).await?;
        drive(Arc::new(log), "kafka", args, store, codec, &names).await
    } else {
        Err(sluice_log::Error::InvalidUrl {
            url: url.to_owned(),
            reason: "expected embedded://DIR, kafka://host:port or kafka-mock://".into(),
        }
        .into())
    }
}

struct Names {
    raw: String,
    events: String,
    stamp: String,
}

async fn create_topics<L: Log>(log: &L, names: &Names, partitions: u32) -> Result<()> {
    for topic in [&names.raw, &names.events] {
        log.create_topic(&TopicSpec::new(topic, partitions))
            .await
            .with_context(|| format!("cannot create topic {topic}"))?;
    }
    Ok(())
}

/// The run itself: validator and relay on their own tasks, warm-up, the measured push, then the
/// COPY baseline.
async fn drive<L: Log>(
    log: Arc<L>,
    log_kind: &'static str,
    args: &BenchIngestArgs,
    store: &Store,
    codec: Arc<Codec>,
    names: &Names,
) -> Result<IngestReport> {
    let n = args.events;
    let token = CancellationToken::new();
    // Whatever goes wrong, the processors are told to stop.
    let _stop = token.clone().drop_guard();

    let validator_stats = Arc::new(sluice_ingest_validator::Stats::default());
    let relay_stats = Arc::new(sluice_outbox_relay::Stats::default());
    let mut validator = {
        let mut settings = sluice_ingest_validator::Settings::new(
            &format!("bench-ingest-validator-{}", names.stamp),
            &names.raw,
        );
        settings
            .routes
            .insert(EVENT_TYPE.to_owned(), names.events.clone());
        settings.config.batch_size = args.append_batch;
        let (log, store, codec, stats, token) = (
            log.clone(),
            store.clone(),
            codec.clone(),
            validator_stats.clone(),
            token.clone(),
        );
        Some(tokio::spawn(async move {
            sluice_ingest_validator::run(&settings, &*log, &store, &*codec, &stats, token)
                .await
                .context("the ingest-validator failed")
        }))
    };
    let mut relay = {
        let mut settings = sluice_outbox_relay::Settings::new("bench-outbox-relay");
        settings.config.batch_size = args.append_batch;
        let (log, store, stats, token) = (
            log.clone(),
            store.clone(),
            relay_stats.clone(),
            token.clone(),
        );
        Some(tokio::spawn(async move {
            sluice_outbox_relay::run(&settings, &*log, &store, &stats, token)
                .await
                .context("the outbox-relay failed")
        }))
    };

    let mut consumer = log.consumer(&format!("bench-reader-{}", names.stamp), &[&names.events])?;
    let producer = log.producer()?;
    let warm = warm_up(
        &mut consumer,
        &producer,
        &codec,
        names,
        args.partitions,
        &validator_stats,
        &relay_stats,
        [&mut validator, &mut relay],
    )
    .await?;
    let base_appended = validator_stats.appended.load(Ordering::Relaxed);
    let base_published = relay_stats.published.load(Ordering::Relaxed);
    ensure!(
        base_appended == warm && base_published == warm,
        "the store or the outbox held more than the bench's own events (appended {base_appended}, \
         published {base_published}, expected {warm})"
    );

    let produced = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut producing = Some(tokio::spawn(produce(
        producer,
        names.raw.clone(),
        Push {
            events: n,
            batch: args.batch,
            devices: args.devices,
            rate: args.rate,
        },
        start,
        produced.clone(),
    )));
    let mut reading = Some(tokio::spawn(read_back(
        consumer,
        codec.clone(),
        n,
        consumed.clone(),
        start,
    )));

    // Watch the counters until every stage has all N, or something fails or stalls.
    let patience = SETUP_LIMIT
        + args.rate.map_or(Duration::ZERO, |r| {
            Duration::from_secs_f64(2.0 * args.batch as f64 / r as f64)
        });
    let mut appended_at = None;
    let mut published_at = None;
    let mut produce_elapsed = None;
    let mut read = None;
    let mut next_tenth = 1;
    let mut last_counts = [0; 4];
    let mut last_change = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let appended = validator_stats.appended.load(Ordering::Relaxed) - base_appended;
        let published = relay_stats.published.load(Ordering::Relaxed) - base_published;
        if appended_at.is_none() && appended >= n {
            appended_at = Some(start.elapsed());
        }
        if published_at.is_none() && published >= n {
            published_at = Some(start.elapsed());
        }
        check_rejects(&validator_stats)?;
        check_running(&mut [&mut validator, &mut relay]).await?;
        if let Some(done) = finished(&mut producing).await {
            produce_elapsed = Some(done?);
        }
        if let Some(done) = finished(&mut reading).await {
            read = Some(done?);
        }
        let counts = [
            produced.load(Ordering::Relaxed),
            appended,
            published,
            consumed.load(Ordering::Relaxed),
        ];
        let tenth = counts[3] * 10 / n;
        if tenth >= next_tenth {
            eprintln!(
                "  {:>3}% relayed after {:.1} s (produced {}, appended {}, published {}, read back {})",
                tenth * 10,
                start.elapsed().as_secs_f64(),
                counts[0],
                counts[1],
                counts[2],
                counts[3]
            );
            next_tenth = tenth + 1;
        }
        if counts != last_counts {
            last_counts = counts;
            last_change = Instant::now();
        } else if last_change.elapsed() > patience {
            bail!(
                "the bench stalled: no progress in {:.0} s (produced {}, appended {}, \
                 published {}, read back {} of {n})",
                patience.as_secs_f64(),
                counts[0],
                counts[1],
                counts[2],
                counts[3]
            );
        }
        if appended_at.is_some()
            && published_at.is_some()
            && produce_elapsed.is_some()
            && read.is_some()
        {
            break;
        }
    }
    let (appended_at, published_at, produce_elapsed, read) = (
        appended_at.unwrap_or_default(),
        published_at.unwrap_or_default(),
        produce_elapsed.unwrap_or_default(),
        read.context("the reader finished without a result")?,
    );
    let appended = validator_stats.appended.load(Ordering::Relaxed) - base_appended;
    let published = relay_stats.published.load(Ordering::Relaxed) - base_published;

    token.cancel();
    for (what, task) in [("ingest-validator", validator), ("outbox-relay", relay)] {
        if let Some(task) = task {
            match tokio::time::timeout(SETUP_LIMIT, task).await {
                Err(_) => bail!("the {what} did not stop within a minute"),
                Ok(joined) => joined.with_context(|| format!("the {what} panicked"))??,
            }
        }
    }
    let Read {
        consumer,
        mut lags_ms,
        done_at,
        duplicates,
    } = read;
    if let Err(e) = consumer.close().await {
        tracing::warn!(error = %e, "the reader did not leave its group cleanly");
    }

    let (copy, copy_baseline) = match store.backend() {
        Backend::Postgres => {
            eprintln!("  COPY baseline: copying the same {n} rows into scratch tables");
            let rows = copy_rows(&codec, args, &names.events).await?;
            let baseline = sluice_store::bench::copy_baseline(&args.store, &rows)
                .await
                .context("the COPY baseline failed")?;
            (
                Some(baseline),
                "COPY (CSV) of the same rows into scratch tables LIKE the store's, \
                 one transaction; dropped afterwards"
                    .to_owned(),
            )
        }
        Backend::Sqlite => (
            None,
            "none: SQLite has no COPY (the baseline is PostgreSQL only)".to_owned(),
        ),
    };

    lags_ms.sort_unstable_by(f64::total_cmp);
    let pct = |p: f64| {
        let i = ((lags_ms.len() as f64 * p).ceil() as usize).clamp(1, lags_ms.len()) - 1;
        lags_ms[i]
    };
    let appended_events_per_s = n as f64 / appended_at.as_secs_f64();
    let paced = args.rate.is_some();
    Ok(IngestReport {
        events: n,
        batch: args.batch,
        devices: args.devices,
        partitions: args.partitions,
        append_batch: args.append_batch,
        rate: args.rate,
        store: match store.backend() {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        },
        log: log_kind,
        appended,
        published,
        relayed: lags_ms.len() as u64,
        duplicates_on_topic: duplicates,
        produce_events_per_s: n as f64 / produce_elapsed.as_secs_f64(),
        appended_events_per_s,
        relayed_events_per_s: n as f64 / published_at.max(done_at).as_secs_f64(),
        relay_lag_ms: Latency {
            p50: pct(0.50),
            p99: pct(0.99),
            max: pct(1.0),
        },
        copy_rows_per_s: copy.map(|c| c.events_rows_per_s),
        copy_all_tables_rows_per_s: copy.map(|c| c.all_tables_rows_per_s),
        appended_vs_copy: copy
            .filter(|_| !paced)
            .map(|c| appended_events_per_s / c.events_rows_per_s),
        appended_vs_copy_all_tables: copy
            .filter(|_| !paced)
            .map(|c| appended_events_per_s / c.all_tables_rows_per_s),
        copy_baseline,
    })
}

/// Sends one event per partition of the raw topic through the whole path and waits until it
/// is appended, published and read back, so the figures measure the pipeline, not group joins
/// and first connections. Returns how many warm-up events there were.
#[allow(clippy::too_many_arguments)]
async fn warm_up<C: Consumer, P: Producer>(
    consumer: &mut C,
    producer: &P,
    codec: &Codec,
    names: &Names,
    partitions: u32,
    validator_stats: &sluice_ingest_validator::Stats,
    relay_stats: &sluice_outbox_relay::Stats,
    mut tasks: [&mut Option<Task>; 2],
) -> Result<u64> {
    let deadline = Instant::now() + SETUP_LIMIT;
    let stuck = |what: &str| anyhow!("the bench warm-up timed out: {what}");
    while consumer.assignment().len() < partitions as usize {
        ensure!(
            Instant::now() < deadline,
            stuck("the reader did not get its partitions within a minute")
        );
        let early = consumer.poll(1, Duration::from_millis(100)).await?;
        ensure!(early.is_empty(), "the bench's events topic is not empty");
    }
    let mut keys = BTreeMap::new();
    for i in 0.. {
        let device = format!("{WARM_UP}{i}");
        keys.entry(sluice_log::partition_for(device.as_bytes(), partitions))
            .or_insert(device);
        if keys.len() == partitions as usize {
            break;
        }
    }
    let occurred = now_text();
    let records = keys
        .values()
        .enumerate()
        .map(|(i, device)| reading(i as u64, device, &occurred))
        .collect();
    producer.send(&names.raw, records).await?;
    let want = u64::from(partitions);
    let mut seen = HashSet::new();
    loop {
        check_rejects(validator_stats)?;
        check_running(&mut tasks).await?;
        let done = seen.len() as u64 == want
            && validator_stats.appended.load(Ordering::Relaxed) >= want
            && relay_stats.published.load(Ordering::Relaxed) >= want;
        if done {
            return Ok(want);
        }
        ensure!(
            Instant::now() < deadline,
            stuck("the warm-up events did not come back within a minute")
        );
        let batch = consumer
            .poll(partitions as usize, Duration::from_millis(20))
            .await?;
        for m in &batch {
            let event = codec
                .decode(&m.value)
                .await
                .context("cannot decode an event read back")?;
            consumer.store(&m.topic_partition(), m.offset + 1)?;
            ensure!(
                event.aggregate_id.starts_with(WARM_UP),
                "an unexpected event on the bench's events topic: {}",
                event.event_id
            );
            seen.insert(event.event_id);
        }
        if !batch.is_empty() {
            consumer.commit().await?;
        }
    }
}

/// What to push.
#[derive(Debug, Clone, Copy)]
struct Push {
    events: u64,
    batch: usize,
    devices: u64,
    rate: Option<u64>,
}

/// Produces the readings, paced by schedule when `rate` is set; returns the time from `start`
/// to the last acknowledgement.
async fn produce<P: Producer>(
    producer: P,
    topic: String,
    push: Push,
    start: Instant,
    produced: Arc<AtomicU64>,
) -> Result<Duration> {
    let mut sent = 0u64;
    while sent < push.events {
        if let Some(rate) = push.rate {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + due)).await;
        }
        let n = (push.events - sent).min(push.batch as u64);
        let occurred = now_text();
        let records = (sent..sent + n)
            .map(|i| reading(i, &device(i, push.devices), &occurred))
            .collect();
        producer
            .send(&topic, records)
            .await
            .with_context(|| format!("cannot produce to {topic}"))?;
        sent += n;
        produced.store(sent, Ordering::Relaxed);
    }
    let elapsed = start.elapsed();
    // Dropping a Kafka producer blocks while librdkafka shuts down.
    tokio::task::spawn_blocking(move || drop(producer));
    Ok(elapsed)
}

fn device(i: u64, devices: u64) -> String {
    format!("dev-{:05}", i % devices)
}

fn now_text() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn temperature(i: u64) -> f64 {
    20.0 + (i % 100) as f64 / 10.0
}

/// One raw reading as the edge writes it.
fn reading(i: u64, device: &str, occurred_at: &str) -> Record {
    let value = format!(
        r#"{{"event_id":"{}","event_type":"{EVENT_TYPE}","aggregate_id":"{device}","occurred_at":"{occurred_at}","payload":{{"temperature_c":{:.1},"humidity_pct":40.0,"seq":{i}}}}}"#,
        Uuid::new_v4(),
        temperature(i)
    );
    Record {
        key: Some(device.as_bytes().to_vec()),
        value: value.into_bytes(),
        ..Record::default()
    }
}

/// What the reader saw.
struct Read<C> {
    consumer: C,
    /// Relay lag of each distinct bench event, in the order read.
    lags_ms: Vec<f64>,
    /// From `start` to the N-th distinct event.
    done_at: Duration,
    duplicates: u64,
}

/// Reads the events topic with a consumer group (committing every poll) until all `n` bench
/// events were seen, recording each one's relay lag.
async fn read_back<C: Consumer>(
    mut consumer: C,
    codec: Arc<Codec>,
    n: u64,
    consumed: Arc<AtomicU64>,
    start: Instant,
) -> Result<Read<C>> {
    let mut seen = HashSet::with_capacity(n as usize);
    let mut lags_ms = Vec::with_capacity(n as usize);
    let mut duplicates = 0;
    while (seen.len() as u64) < n {
        let batch = consumer.poll(5_000, Duration::from_millis(500)).await?;
        let now = Utc::now();
        for m in &batch {
            let event = codec
                .decode(&m.value)
                .await
                .context("cannot decode an event read back")?;
            consumer.store(&m.topic_partition(), m.offset + 1)?;
            if event.aggregate_id.starts_with(WARM_UP) {
                continue;
            }
            if seen.insert(event.event_id) {
                let lag = now.signed_duration_since(event.ingested_at);
                lags_ms.push(lag.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3);
            } else {
                duplicates += 1;
            }
        }
        if !batch.is_empty() {
            consumer.commit().await?;
            consumed.store(seen.len() as u64, Ordering::Relaxed);
        }
    }
    Ok(Read {
        consumer,
        lags_ms,
        done_at: start.elapsed(),
        duplicates,
    })
}

/// The same rows the validator stored, built again for the COPY baseline: same shape, fresh
/// ids, the latest schema's version and wire-format value.
async fn copy_rows(codec: &Codec, args: &BenchIngestArgs, topic: &str) -> Result<Vec<AppendEvent>> {
    let event_type = EventType::new(EVENT_TYPE)?;
    let version = codec.latest(event_type.subject()).await?.0.version;
    let mut rows = Vec::with_capacity(args.events as usize);
    for i in 0..args.events {
        let device = device(i, args.devices);
        let payload = serde_json::json!({
            "temperature_c": temperature(i),
            "humidity_pct": 40.0,
            "seq": i,
        });
        let mut event = Event::new(
            event_type.clone(),
            &device,
            Utc::now(),
            payload,
            Source::Http,
        )?;
        event.metadata.schema_version = Some(version);
        let (value, _) = codec.encode(&event).await?;
        rows.push(AppendEvent {
            event,
            topic: topic.to_owned(),
            key: device.into_bytes(),
            value,
        });
    }
    Ok(rows)
}

fn check_rejects(stats: &sluice_ingest_validator::Stats) -> Result<()> {
    let rejected = stats.rejected.load(Ordering::Relaxed);
    ensure!(
        rejected == 0,
        "{rejected} of the bench's events were rejected (dead-lettered); see the store's dlq table"
    );
    Ok(())
}

/// A processor running on its own task.
type Task = JoinHandle<Result<()>>;

/// Fails if a processor task ended: before the bench cancels them, they must not.
async fn check_running(tasks: &mut [&mut Option<Task>; 2]) -> Result<()> {
    for task in tasks.iter_mut() {
        match finished(task).await {
            None => {}
            Some(Ok(())) => bail!("a processor stopped before the bench ended"),
            Some(Err(e)) => return Err(e),
        }
    }
    Ok(())
}

/// The task's result once it has finished (taking it), else `None`.
async fn finished<T>(task: &mut Option<JoinHandle<T>>) -> Option<T> {
    if !task.as_ref().is_some_and(JoinHandle::is_finished) {
        return None;
    }
    let handle = task.take()?;
    match handle.await {
        Ok(value) => Some(value),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn print_report(r: &IngestReport) {
    println!(
        "ingest bench on {} + {}: {} {EVENT_TYPE} events from {} devices, produce batches of {}, \
         store batches of {}, {} partitions{}",
        r.store,
        r.log,
        r.events,
        r.devices,
        r.batch,
        r.append_batch,
        r.partitions,
        r.rate
            .map_or(String::new(), |rate| format!(", paced at {rate} events/s"))
    );
    println!("  produce   {:>9.0} events/s", r.produce_events_per_s);
    println!(
        "  appended  {:>9.0} events/s  ({} events in the store)",
        r.appended_events_per_s, r.appended
    );
    println!(
        "  relayed   {:>9.0} events/s  ({} published, {} read back, {} duplicates)",
        r.relayed_events_per_s, r.published, r.relayed, r.duplicates_on_topic
    );
    println!(
        "  relay lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (read back minus ingested_at)",
        r.relay_lag_ms.p50, r.relay_lag_ms.p99, r.relay_lag_ms.max
    );
    match (r.copy_rows_per_s, r.copy_all_tables_rows_per_s) {
        (Some(events), Some(all)) => {
            println!(
                "  COPY      {events:>9.0} rows/s into a table like events; {all:.0} rows/s into \
                 tables like events, event_ids and outbox"
            );
            match (r.appended_vs_copy, r.appended_vs_copy_all_tables) {
                (Some(a), Some(b)) => println!(
                    "  ratio     appended/COPY {a:.2} (events only), {b:.2} (all three tables)"
                ),
                _ => println!("  ratio     none for a paced run"),
            }
        }
        _ => println!("  COPY      {}", r.copy_baseline),
    }
}
