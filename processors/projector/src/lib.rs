//! The projector: reads the events topics (Avro in the wire format) and keeps the read models
//! in the store: each device's latest reading and status, the readings time series,
//! per-device 1-minute and 1-hour rollups, maintained incrementally, and the anomalies the
//! inferencer found (`inference.result` labelled `anomaly`; normal scores are only counted).
//!
//! Effectively once, like the ingest-validator: a batch's projections and its input offsets
//! are written in one store transaction, the store's offsets are the truth (messages below
//! them are skipped after a (re)assignment), and the log's offsets are committed afterwards.
//! Readings and anomalies are unique by event id, so a redelivered reading never counts twice
//! in a rollup and a redelivered anomaly is stored once.
//! Undecodable messages go to the DLQ table with their bytes. This crate must never count a
//! reading twice, acknowledge input it has not projected or dead-lettered, or dead-letter an
//! outage.

mod project;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use sluice_log::{Consumer, Log, Message, TopicPartition};
use sluice_runtime::{DeadLetter, retry_transient};
use sluice_schemas::{EventCodec, SchemaSource};
use sluice_store::{ConsumerOffset, NewDeadLetter, ProjectionBatch, Store};
use tokio_util::sync::CancellationToken;

pub use project::{Projected, project};
pub use sluice_topology::ProjectorConfig;

/// The processor's name in topologies and metrics.
pub const NAME: &str = "projector";

/// Errors that stop the projector.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log refused something that retrying will not fix.
    #[error("projector {name}: log: {source}")]
    Log {
        /// The instance.
        name: String,
        /// The cause.
        source: sluice_log::Error,
    },
    /// The store refused something that retrying will not fix.
    #[error("projector {name}: store: {source}")]
    Store {
        /// The instance.
        name: String,
        /// The cause.
        source: sluice_store::Error,
    },
    /// Stopped at a crash point (tests only).
    #[error("projector {0}: crashed on purpose after writing projections")]
    Crashed(String),
}

/// Where the projector reads and what it writes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The instance name: the DLQ's `processor` column.
    pub name: String,
    /// The consumer group, also the group of its offsets in the store.
    pub group: String,
    /// The events topics.
    pub inputs: Vec<String>,
    /// The projection version written while the store records none; after that, the live one
    /// recorded in the store (and the one a rebuild is building, beside it).
    pub version: i32,
    /// Rollups and retention.
    pub config: ProjectorConfig,
    /// Most messages per poll; they are written in up to `writers` store transactions.
    pub batch_size: usize,
    /// Store transactions in flight at once, each for its own partitions (so each device's
    /// rows are written by one of them).
    pub writers: usize,
    /// Longest wait for the first message of a batch.
    pub max_wait: Duration,
    /// Longest wait between retries during an outage.
    pub max_backoff: Duration,
    /// How often the retention (`config.retention`) of readings and anomalies is applied and
    /// partitions made ahead; also once at the start.
    pub maintain_every: Duration,
    /// Stop right after the next projection write, before the log commit (crash tests).
    #[doc(hidden)]
    pub crash_after_project: bool,
}

impl Settings {
    /// Settings for an instance called `name` reading `inputs`, with defaults elsewhere.
    pub fn new(name: &str, inputs: &[&str]) -> Settings {
        Settings {
            name: name.to_owned(),
            group: name.to_owned(),
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
            version: 1,
            config: ProjectorConfig::default(),
            // Larger polls fold more readings of a device into one rollup and latest-state
            // upsert; under light load a poll takes what is there after `max_wait`.
            batch_size: 5000,
            writers: 2,
            max_wait: Duration::from_millis(50),
            max_backoff: Duration::from_secs(30),
            maintain_every: Duration::from_secs(3600),
            crash_after_project: false,
        }
    }
}

/// What the projector has done, for progress lines and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// New readings projected.
    pub readings: AtomicU64,
    /// Readings already projected (by event id), ignored.
    pub duplicates: AtomicU64,
    /// New readings older than their device's latest minute.
    pub late: AtomicU64,
    /// Status changes projected.
    pub statuses: AtomicU64,
    /// Anomalies (inference results labelled `anomaly`) newly stored; redelivered ones are
    /// not counted.
    pub anomalies: AtomicU64,
    /// Inference results labelled `normal`: seen and counted, not stored.
    pub normal_scores: AtomicU64,
    /// Events of other types, passed over.
    pub ignored: AtomicU64,
    /// Messages dead-lettered.
    pub rejected: AtomicU64,
    /// Messages below the store's offset, skipped after a (re)assignment.
    pub skipped: AtomicU64,
    /// Retries during outages.
    pub retried: AtomicU64,
}

/// Runs the projector until `shutdown` is cancelled or a fatal error.
pub async fn run<L: Log, S: SchemaSource>(
    settings: &Settings,
    log: &L,
    store: &Store,
    codec: &EventCodec<S>,
    stats: &Stats,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let log_err = |source| Error::Log {
        name: settings.name.clone(),
        source,
    };
    let topics: Vec<&str> = settings.inputs.iter().map(String::as_str).collect();
    let mut consumer = log.consumer(&settings.group, &topics).map_err(log_err)?;
    let mut worker = Worker {
        settings,
        store,
        codec,
        stats,
        shutdown: &shutdown,
        floors: HashMap::new(),
        assignment: Vec::new(),
    };
    let result = worker.run(&mut consumer).await;
    if matches!(result, Err(Error::Crashed(_))) {
        return result;
    }
    match consumer.close().await {
        Ok(()) => result,
        Err(e) if e.is_transient() => {
            tracing::warn!(projector = %settings.name, error = %e, "log offsets not committed on the way out");
            result
        }
        Err(e) => result.and(Err(log_err(e))),
    }
}

struct Worker<'a, S> {
    settings: &'a Settings,
    store: &'a Store,
    codec: &'a EventCodec<S>,
    stats: &'a Stats,
    shutdown: &'a CancellationToken,
    /// Per partition, the next offset the store has; anything below is already projected.
    floors: HashMap<TopicPartition, i64>,
    assignment: Vec<TopicPartition>,
}

impl<S: SchemaSource> Worker<'_, S> {
    async fn run<C: Consumer>(&mut self, consumer: &mut C) -> Result<(), Error> {
        let mut maintained: Option<std::time::Instant> = None;
        while !self.shutdown.is_cancelled() {
            if maintained.is_none_or(|at| at.elapsed() >= self.settings.maintain_every) {
                self.maintain().await;
                maintained = Some(std::time::Instant::now());
            }
            let polled = tokio::select! {
                polled = consumer.poll(self.settings.batch_size, self.settings.max_wait) => polled,
                () = self.shutdown.cancelled() => break,
            };
            let batch = match polled {
                Ok(batch) => batch,
                Err(e) if e.is_transient() => {
                    tracing::warn!(projector = %self.settings.name, error = %e, "poll failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = self.shutdown.cancelled() => break,
                    }
                    continue;
                }
                Err(e) => return Err(self.log_err(e)),
            };
            let mut assignment = consumer.assignment();
            for m in &batch {
                let tp = m.topic_partition();
                if !assignment.contains(&tp) {
                    assignment.push(tp);
                }
            }
            assignment.sort();
            if assignment != self.assignment {
                if !self.load_floors().await? {
                    break;
                }
                self.assignment = assignment;
            }
            if batch.is_empty() {
                continue;
            }
            if !self.handle(consumer, batch).await? {
                break;
            }
        }
        Ok(())
    }

    /// Projects one polled batch and commits its offsets. False if shut down first.
    async fn handle<C: Consumer>(
        &mut self,
        consumer: &mut C,
        batch: Vec<Message>,
    ) -> Result<bool, Error> {
        let settings = self.settings;
        // Per partition: what it projects and the offset after its last message.
        let mut per_partition: BTreeMap<TopicPartition, (ProjectionBatch, i64)> = BTreeMap::new();
        let mut dead = Vec::new();
        let mut log_next: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        for msg in batch {
            let tp = msg.topic_partition();
            log_next.insert(tp.clone(), msg.offset + 1);
            if msg.offset < self.floors.get(&tp).copied().unwrap_or(0) {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (projection, next) = per_partition.entry(tp).or_insert_with(|| {
                let batch = ProjectionBatch {
                    version: settings.version,
                    ..ProjectionBatch::default()
                };
                (batch, 0)
            });
            *next = msg.offset + 1;
            let decoded = retry_transient(
                || async {
                    match self.codec.decode(&msg.value).await {
                        Err(sluice_schemas::Error::Remote(e)) => Err(e),
                        other => Ok(other),
                    }
                },
                |_| true,
                settings.max_backoff,
                self.shutdown,
                |e, delay| {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(projector = %settings.name, error = %e, retry_in = ?delay, "schema registry unreachable; retrying");
                },
            )
            .await;
            let Ok(Some(decoded)) = decoded else {
                return Ok(false);
            };
            let outcome = decoded
                .map_err(|e| ("undecodable", e.to_string()))
                .and_then(|event| project(&event).map_err(|e| ("invalid_payload", e)));
            match outcome {
                Ok(Projected::Reading(r)) => projection.readings.push(*r),
                Ok(Projected::Status(s)) => projection.statuses.push(s),
                Ok(Projected::Anomaly(a)) => projection.anomalies.push(*a),
                Ok(Projected::NormalScore) => {
                    self.stats.normal_scores.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Projected::Other) => {
                    self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                }
                Err((class, message)) => dead.push(NewDeadLetter::from(DeadLetter {
                    processor: settings.name.clone(),
                    event_id: None,
                    topic: msg.topic.clone(),
                    partition: msg.partition,
                    offset: msg.offset,
                    schema_id: sluice_schemas::wire::unframe(&msg.value)
                        .ok()
                        .map(|(id, _)| id),
                    key: msg.key,
                    headers: sluice_runtime::header_pairs(&msg.headers),
                    raw: msg.value,
                    error_class: class,
                    error_message: message,
                    attempts: 1,
                    failed_at: Utc::now(),
                })),
            }
        }
        // Partitions spread over the writers; a partition (and so a device) is in one only.
        let writers = settings.writers.max(1);
        let mut lanes: Vec<ProjectionBatch> = Vec::new();
        for (i, (tp, (mut projection, next_offset))) in per_partition.into_iter().enumerate() {
            projection.offsets.push(ConsumerOffset {
                group: settings.group.clone(),
                topic: tp.topic,
                partition: tp.partition,
                next_offset,
            });
            if i < writers {
                lanes.push(projection);
            } else {
                let into = &mut lanes[i % writers];
                into.readings.extend(projection.readings);
                into.statuses.extend(projection.statuses);
                into.anomalies.extend(projection.anomalies);
                into.offsets.extend(projection.offsets);
            }
        }
        // Dead letters first: a crash between the two may record one twice, never lose one.
        for letter in dead {
            let store = self.store;
            if self
                .retrying("cannot write a dead letter", || {
                    store.dlq_put(letter.clone())
                })
                .await?
                .is_none()
            {
                return Ok(false);
            }
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        }
        // The versions to write, asked after the batch was read: a rebuild that started
        // before this read gets the batch here; one that started after reads these events
        // from the event store, where they already are (docs/operations.md, "Rebuilds").
        let store = self.store;
        let Some(targets) = self
            .retrying("cannot read the projection versions", || {
                store.projection_targets(&settings.name, settings.version)
            })
            .await?
        else {
            return Ok(false);
        };
        for lane in &mut lanes {
            lane.version = targets[0];
        }
        // A version being rebuilt is written first and without offsets: a crash between the
        // two writes redoes both, and both are idempotent.
        for &building in &targets[1..] {
            let copies: Vec<ProjectionBatch> = lanes
                .iter()
                .map(|lane| ProjectionBatch {
                    version: building,
                    offsets: Vec::new(),
                    ..lane.clone()
                })
                .collect();
            let written = futures::future::join_all(copies.iter().map(|copy| {
                self.retrying("cannot write the version being rebuilt", move || {
                    store.project(copy)
                })
            }))
            .await;
            for w in written {
                if w?.is_none() {
                    return Ok(false);
                }
            }
        }
        // Each lane commits its own partitions' offsets, so one may commit without another
        // (a retry or a crash then redoes only the other's partitions).
        let written =
            futures::future::join_all(lanes.iter().map(|lane| {
                self.retrying("cannot write projections", move || store.project(lane))
            }))
            .await;
        let mut stopped = false;
        for (lane, written) in lanes.iter().zip(written) {
            let Some(outcome) = written? else {
                stopped = true;
                continue;
            };
            let stats = self.stats;
            stats
                .readings
                .fetch_add(outcome.readings, Ordering::Relaxed);
            stats
                .duplicates
                .fetch_add(outcome.duplicates, Ordering::Relaxed);
            stats.late.fetch_add(outcome.late, Ordering::Relaxed);
            stats
                .statuses
                .fetch_add(outcome.statuses, Ordering::Relaxed);
            stats
                .anomalies
                .fetch_add(outcome.anomalies, Ordering::Relaxed);
            for o in &lane.offsets {
                self.floors
                    .insert(TopicPartition::new(&o.topic, o.partition), o.next_offset);
            }
        }
        if stopped {
            return Ok(false);
        }
        if settings.crash_after_project {
            return Err(Error::Crashed(settings.name.clone()));
        }
        for (tp, next) in log_next {
            match consumer.store(&tp, next) {
                Ok(()) | Err(sluice_log::Error::NotAssigned(_)) => {}
                Err(e) => return Err(self.log_err(e)),
            }
        }
        if let Err(e) = consumer.commit().await {
            if !e.is_transient() {
                return Err(self.log_err(e));
            }
            tracing::warn!(projector = %settings.name, error = %e, "log commit failed; the store has the offsets");
        }
        Ok(true)
    }

    /// Applies the retention of readings and anomalies and makes the readings' time partitions
    /// ahead. A failure is logged, not fatal: projecting works without it, and the next round
    /// tries again.
    async fn maintain(&self) {
        let retention = self.settings.config.retention;
        match self.store.maintain_readings(Utc::now(), retention).await {
            Ok(report) => tracing::info!(
                projector = %self.settings.name,
                partitions_created = report.partitions_created.len(),
                partitions_dropped = report.partitions_dropped.len(),
                readings_deleted = report.readings_deleted,
                anomalies_deleted = report.anomalies_deleted,
                "readings and anomalies maintained"
            ),
            Err(e) => {
                tracing::warn!(projector = %self.settings.name, error = %e, "readings maintenance failed; retrying next round");
            }
        }
    }

    async fn load_floors(&mut self) -> Result<bool, Error> {
        let (store, group) = (self.store, &self.settings.group);
        let Some(offsets) = self
            .retrying("cannot read offsets from the store", || {
                store.consumer_offsets(group)
            })
            .await?
        else {
            return Ok(false);
        };
        self.floors = offsets
            .into_iter()
            .map(|o| (TopicPartition::new(&o.topic, o.partition), o.next_offset))
            .collect();
        Ok(true)
    }

    fn log_err(&self, source: sluice_log::Error) -> Error {
        Error::Log {
            name: self.settings.name.clone(),
            source,
        }
    }

    /// Runs a store operation until it succeeds, backing off on outages without committing
    /// anything. `None` if shut down first.
    async fn retrying<T, F, Fut>(&self, what: &str, op: F) -> Result<Option<T>, Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = sluice_store::Result<T>>,
    {
        retry_transient(
            op,
            sluice_store::Error::is_transient,
            self.settings.max_backoff,
            self.shutdown,
            |e, delay| {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(projector = %self.settings.name, error = %e, retry_in = ?delay, "{what}; retrying, nothing committed");
            },
        )
        .await
        .map_err(|source| Error::Store {
            name: self.settings.name.clone(),
            source,
        })
    }
}
