//! The ingest-validator: reads raw events from `ingest.raw` (JSON from the edge, or Avro in
//! the Confluent wire format), validates them against their subject's schema and the configured
//! rules, enriches them (`ingested_at`, schema version) and appends each batch to the event
//! store and the outbox in one transaction, together with the batch's input offsets and its
//! rejects for the DLQ table.
//!
//! The store's offsets are the truth: the log's committed offsets are only advanced afterwards,
//! and messages below the store's offset are skipped on a (re)assignment, so a crash between
//! the append and the log commit stores nothing twice; the event store's unique event ids
//! absorb whatever slips through (devices resending, a member losing its partitions mid-batch).
//! This crate must never acknowledge input it has not appended or dead-lettered, never
//! dead-letter an outage, and never move a stored offset backwards.

mod validate;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use sluice_log::{Consumer, Log, TopicPartition};
use sluice_runtime::{DeadLetter, retry_transient};
use sluice_schemas::{EventCodec, SchemaSource};
use sluice_store::{AppendBatch, AppendEvent, ConsumerOffset, NewDeadLetter, Store};
use tokio_util::sync::CancellationToken;

pub use sluice_topology::IngestValidatorConfig;
pub use validate::{DLQ_ORIGIN_HEADER, Outcome, Reject, Validated, validate};

/// The processor's name in topologies and metrics.
pub const NAME: &str = "ingest-validator";

/// Errors that stop the validator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log refused something that retrying will not fix.
    #[error("ingest-validator {name}: log: {source}")]
    Log {
        /// The instance.
        name: String,
        /// The cause.
        source: sluice_log::Error,
    },
    /// The store refused something that retrying will not fix.
    #[error("ingest-validator {name}: store: {source}")]
    Store {
        /// The instance.
        name: String,
        /// The cause.
        source: sluice_store::Error,
    },
    /// Stopped at a crash point (tests only).
    #[error("ingest-validator {0}: crashed on purpose after the append")]
    Crashed(String),
}

/// Where the validator reads and how it is named.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The instance name: the DLQ's `processor` column.
    pub name: String,
    /// The consumer group, also the group of its offsets in the store.
    pub group: String,
    /// The raw topic.
    pub input: String,
    /// Event type → topic the relay publishes it to; unlisted types go to
    /// `events.<type with dashes>`.
    pub routes: BTreeMap<String, String>,
    /// Validation rules and batch size.
    pub config: IngestValidatorConfig,
    /// Longest wait for a batch to fill.
    pub max_wait: Duration,
    /// Longest wait between retries during an outage.
    pub max_backoff: Duration,
    /// How often the store's retention and time partitions are maintained (also once at
    /// start): the validator is the store's writer, so it keeps the store in shape.
    pub maintain_every: Duration,
    /// Stop right after the next append, before touching the log's offsets (crash tests).
    #[doc(hidden)]
    pub crash_after_append: bool,
}

impl Settings {
    /// Settings for an instance called `name` reading `input`, with defaults elsewhere.
    pub fn new(name: &str, input: &str) -> Settings {
        Settings {
            name: name.to_owned(),
            group: name.to_owned(),
            input: input.to_owned(),
            routes: BTreeMap::new(),
            config: IngestValidatorConfig::default(),
            max_wait: Duration::from_millis(50),
            max_backoff: Duration::from_secs(30),
            maintain_every: Duration::from_secs(3600),
            crash_after_append: false,
        }
    }

    fn topic_for(&self, event_type: &sluice_core::EventType) -> String {
        self.routes
            .get(event_type.as_str())
            .cloned()
            .unwrap_or_else(|| event_type.default_topic())
    }
}

/// Counters for tests, the bench and the metrics endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events appended to the store.
    pub appended: AtomicU64,
    /// Events already in the store (by event id), dropped.
    pub duplicates: AtomicU64,
    /// Messages dead-lettered.
    pub rejected: AtomicU64,
    /// Messages below the store's offset, skipped after a (re)assignment.
    pub skipped: AtomicU64,
    /// Retries during outages (registry, store).
    pub retried: AtomicU64,
    /// Store transactions.
    pub batches: AtomicU64,
}

/// Runs the validator until `shutdown` is cancelled or a fatal error.
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
    let mut consumer = log
        .consumer(&settings.group, &[settings.input.as_str()])
        .map_err(log_err)?;
    let mut worker = Worker {
        ctx: Ctx {
            settings,
            store,
            stats,
            shutdown: &shutdown,
        },
        codec,
        floors: HashMap::new(),
        assignment: Vec::new(),
    };
    let result = worker.run(&mut consumer).await;
    if matches!(result, Err(Error::Crashed(_))) {
        // A crash commits nothing: drop the consumer as a killed process would.
        return result;
    }
    match consumer.close().await {
        Ok(()) => result,
        // The store holds the offsets that matter; the log's only save re-reading.
        Err(e) if e.is_transient() => {
            tracing::warn!(validator = %settings.name, error = %e, "log offsets not committed on the way out");
            result
        }
        Err(e) => result.and(Err(log_err(e))),
    }
}

/// What appending needs, apart from the consumer and the validation state, so an append can
/// run beside the next batch's validation.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    settings: &'a Settings,
    store: &'a Store,
    stats: &'a Stats,
    shutdown: &'a CancellationToken,
}

struct Worker<'a, S> {
    ctx: Ctx<'a>,
    codec: &'a EventCodec<S>,
    /// Per partition, the next offset the store has; anything below is already stored.
    floors: HashMap<TopicPartition, i64>,
    /// The assignment the floors were loaded for.
    assignment: Vec<TopicPartition>,
}

impl<'a, S> std::ops::Deref for Worker<'a, S> {
    type Target = Ctx<'a>;
    fn deref(&self) -> &Ctx<'a> {
        &self.ctx
    }
}

impl<S: SchemaSource> Worker<'_, S> {
    /// Polls, validates and appends, with one batch in flight: while a batch is appended and
    /// committed, the next one is validated, so the database and the validator work at once.
    async fn run<C: Consumer>(&mut self, consumer: &mut C) -> Result<(), Error> {
        let name = &self.settings.name;
        let mut ready: Option<Prepared> = None;
        let mut maintained: Option<std::time::Instant> = None;
        while !self.shutdown.is_cancelled() {
            if maintained.is_none_or(|at| at.elapsed() >= self.settings.maintain_every) {
                self.maintain().await;
                maintained = Some(std::time::Instant::now());
            }
            // With a batch ready, take only what is there already: it must not wait for more.
            let wait = if ready.is_some() {
                Duration::ZERO
            } else {
                self.settings.max_wait
            };
            let polled = tokio::select! {
                polled = consumer.poll(self.settings.config.batch_size, wait) => polled,
                () = self.shutdown.cancelled() => break,
            };
            let batch = match polled {
                Ok(batch) => batch,
                Err(e) if e.is_transient() => {
                    tracing::warn!(validator = %name, error = %e, "poll failed; retrying");
                    self.pause(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => return Err(self.log_err(e)),
            };
            let mut assignment = consumer.assignment();
            // A batch's partitions count as assigned even if the assignment reads otherwise,
            // so no message is validated against floors loaded before its partition was ours.
            for m in &batch {
                let tp = m.topic_partition();
                if !assignment.contains(&tp) {
                    assignment.push(tp);
                }
            }
            assignment.sort();
            if assignment != self.assignment {
                // The floors must include the batch in flight before they are read again.
                if let Some(prepared) = ready.take()
                    && !self.finish(consumer, prepared).await?
                {
                    break;
                }
                if !self.load_floors().await? {
                    break;
                }
                self.assignment = assignment;
            }
            if batch.is_empty() {
                if let Some(prepared) = ready.take()
                    && !self.finish(consumer, prepared).await?
                {
                    break;
                }
                continue;
            }
            // The floors only matter for partitions whose batch in flight is older than this
            // one, so validating before that batch is finished reads them correctly.
            let (finished, prepared) = match ready.take() {
                Some(previous) => {
                    let ctx = self.ctx;
                    let (finished, prepared) =
                        tokio::join!(ctx.finish(consumer, previous), self.prepare(batch));
                    (
                        finished?.map(|offsets| self.raise_floors(&offsets)),
                        prepared,
                    )
                }
                None => (Some(()), self.prepare(batch).await),
            };
            let (Some(()), Some(prepared)) = (finished, prepared) else {
                // Shut down during an outage: what is not appended is read again.
                break;
            };
            ready = Some(prepared);
        }
        if let Some(prepared) = ready.take() {
            // Finish the batch in hand on the way out.
            self.finish(consumer, prepared).await?;
        }
        Ok(())
    }

    /// Appends a prepared batch and commits its offsets on the log. False if shut down first.
    async fn finish<C: Consumer>(
        &mut self,
        consumer: &mut C,
        prepared: Prepared,
    ) -> Result<bool, Error> {
        let ctx = self.ctx;
        let finished = ctx.finish(consumer, prepared).await?;
        Ok(finished
            .map(|offsets| self.raise_floors(&offsets))
            .is_some())
    }

    /// Applies retention and makes time partitions ahead. A failure is logged, not fatal:
    /// appends work without it, and the next round tries again.
    async fn maintain(&self) {
        match self.store.maintain(Utc::now()).await {
            Ok(report) => tracing::info!(
                validator = %self.settings.name,
                partitions_created = report.partitions_created.len(),
                partitions_dropped = report.partitions_dropped.len(),
                events_deleted = report.events_deleted,
                "store maintained"
            ),
            Err(e) => {
                tracing::warn!(validator = %self.settings.name, error = %e, "store maintenance failed; retrying next round");
            }
        }
    }

    fn raise_floors(&mut self, offsets: &[ConsumerOffset]) {
        for offset in offsets {
            self.floors.insert(
                TopicPartition::new(&offset.topic, offset.partition),
                offset.next_offset,
            );
        }
    }

    /// Validates a polled batch into up to `appenders` store transactions. `None` if shut down meanwhile.
    async fn prepare(&self, batch: Vec<sluice_log::Message>) -> Option<Prepared> {
        let settings = self.settings;
        // Per partition: its events and rejects, and the offset after its last message.
        let mut per_partition: BTreeMap<TopicPartition, (AppendBatch, i64)> = BTreeMap::new();
        let mut log_next: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        for msg in batch {
            let tp = msg.topic_partition();
            log_next.insert(tp.clone(), msg.offset + 1);
            if msg.offset < self.floors.get(&tp).copied().unwrap_or(0) {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (batch, next) = per_partition.entry(tp).or_default();
            *next = msg.offset + 1;
            let validated = retry_transient(
                || async {
                    match validate(&msg, self.codec, &settings.config, Utc::now()).await {
                        Outcome::Transient(detail) => Err(detail),
                        done => Ok(done),
                    }
                },
                |_| true,
                settings.max_backoff,
                self.shutdown,
                |detail, delay| {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(validator = %settings.name, error = %detail, retry_in = ?delay, "schema registry unreachable; retrying");
                },
            )
            .await;
            let Ok(Some(outcome)) = validated else {
                return None;
            };
            match outcome {
                Outcome::Valid(valid) => {
                    let Validated { event, value } = *valid;
                    batch.events.push(AppendEvent {
                        topic: settings.topic_for(&event.event_type),
                        key: event.aggregate_id.as_bytes().to_vec(),
                        value,
                        event,
                    });
                }
                Outcome::Rejected(reject) => {
                    tracing::debug!(validator = %settings.name, topic = %msg.topic, partition = msg.partition, offset = msg.offset, class = reject.class, reason = %reject.message, "rejected");
                    batch.dead_letters.push(NewDeadLetter::from(DeadLetter {
                        processor: settings.name.clone(),
                        event_id: reject.event_id,
                        topic: msg.topic.clone(),
                        partition: msg.partition,
                        offset: msg.offset,
                        schema_id: reject.schema_id,
                        key: msg.key,
                        headers: sluice_runtime::header_pairs(&msg.headers),
                        raw: msg.value,
                        error_class: reject.class,
                        error_message: reject.message,
                        attempts: 1,
                        failed_at: Utc::now(),
                    }));
                }
                Outcome::Transient(_) => unreachable!("retried above"),
            }
        }
        let appenders = settings.config.appenders.max(1);
        let mut batches: Vec<AppendBatch> = Vec::new();
        for (i, (tp, (mut batch, next_offset))) in per_partition.into_iter().enumerate() {
            batch.offsets.push(ConsumerOffset {
                group: settings.group.clone(),
                topic: tp.topic,
                partition: tp.partition,
                next_offset,
            });
            if i < appenders {
                batches.push(batch);
            } else {
                let into = &mut batches[i % appenders];
                into.events.extend(batch.events);
                into.dead_letters.extend(batch.dead_letters);
                into.offsets.extend(batch.offsets);
            }
        }
        Some(Prepared { batches, log_next })
    }

    /// Reloads the store's offsets of this group. False if shut down before it succeeded.
    async fn load_floors(&mut self) -> Result<bool, Error> {
        let group = &self.settings.group;
        let Some(offsets) = self
            .retrying("cannot read offsets from the store", || {
                self.store.consumer_offsets(group)
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
}

impl Ctx<'_> {
    /// Appends a prepared batch and commits its offsets on the log; returns the offsets now
    /// in the store, or `None` if shut down first.
    async fn finish<C: Consumer>(
        self,
        consumer: &mut C,
        prepared: Prepared,
    ) -> Result<Option<Vec<ConsumerOffset>>, Error> {
        let settings = self.settings;
        // One transaction per group of partitions, at once: each partition's offsets are its
        // own rows, so they never conflict.
        let appended =
            futures::future::join_all(prepared.batches.iter().map(|b| self.append(b))).await;
        let mut all = true;
        for done in appended {
            all &= done?;
        }
        if !all {
            // Shut down mid-outage: what was appended is in the store's offsets; the log
            // commit waits for the next run, which skips it.
            return Ok(None);
        }
        if settings.crash_after_append {
            return Err(Error::Crashed(settings.name.clone()));
        }
        let log_err = |source| Error::Log {
            name: settings.name.clone(),
            source,
        };
        for (tp, next) in prepared.log_next {
            match consumer.store(&tp, next) {
                Ok(()) | Err(sluice_log::Error::NotAssigned(_)) => {}
                Err(e) => return Err(log_err(e)),
            }
        }
        if let Err(e) = consumer.commit().await {
            if !e.is_transient() {
                return Err(log_err(e));
            }
            tracing::warn!(validator = %settings.name, error = %e, "log commit failed; the store has the offsets");
        }
        Ok(Some(
            prepared
                .batches
                .into_iter()
                .flat_map(|b| b.offsets)
                .collect(),
        ))
    }

    /// Appends in one transaction, retrying outages. False if shut down before it succeeded.
    async fn append(&self, batch: &AppendBatch) -> Result<bool, Error> {
        if batch.events.is_empty() && batch.dead_letters.is_empty() && batch.offsets.is_empty() {
            return Ok(true);
        }
        let Some(outcome) = self
            .retrying("store append failed", || self.store.append(batch))
            .await?
        else {
            return Ok(false);
        };
        let stats = self.stats;
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .appended
            .fetch_add(outcome.appended.len() as u64, Ordering::Relaxed);
        stats
            .duplicates
            .fetch_add(outcome.duplicates.len() as u64, Ordering::Relaxed);
        stats
            .rejected
            .fetch_add(batch.dead_letters.len() as u64, Ordering::Relaxed);
        Ok(true)
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
                tracing::warn!(validator = %self.settings.name, error = %e, retry_in = ?delay, "{what}; retrying, nothing committed");
            },
        )
        .await
        .map_err(|source| Error::Store {
            name: self.settings.name.clone(),
            source,
        })
    }

    /// Sleeps `delay` unless shut down first; true if it slept the whole time.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = self.shutdown.cancelled() => false,
        }
    }

    fn log_err(&self, source: sluice_log::Error) -> Error {
        Error::Log {
            name: self.settings.name.clone(),
            source,
        }
    }
}

struct Prepared {
    /// One store transaction each, for disjoint sets of partitions.
    batches: Vec<AppendBatch>,
    /// Next offset per partition for the log's commit, skipped messages included.
    log_next: BTreeMap<TopicPartition, i64>,
}
