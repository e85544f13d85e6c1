//! The executor loop: intake of `action.requested` into the store's action schedule, and
//! delivery of due actions, side by side.
//!
//! Intake is effectively once, like the projector: a poll's requests and its input offsets
//! are written in one store transaction, deduplicated on (input event, rule, rule version,
//! endpoint); the store's offsets are the truth after a (re)assignment, and the log's are
//! committed afterwards. So a restart or a replay of `actions.requested` never schedules an
//! action twice, and a delivered action is never delivered again.
//!
//! Delivery claims due actions with a lease (so two executors never attempt one action at
//! once), attempts them concurrently, and records each attempt with the action's next step:
//! delivered, retry at a time from the backoff schedule, short-circuited by an open breaker
//! (no request, rescheduled), or dead (to the DLQ) after the last retry. A failing endpoint's
//! actions wait in the store, not in a consumer loop, so they never hold up other endpoints.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{SubsecRound, Utc};
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_core::{Event, EventType, Source};
use sluice_log::{Consumer, Header, Log, Message, Producer, Record, TopicPartition};
use sluice_runtime::{DeadLetter, DlqSink};
use sluice_schemas::{EventCodec, SchemaSource};
use sluice_store::{
    ActionSource, AttemptRecord, ConsumerOffset, DueAction, Intake, NewAction, NextStep, Store,
};
use sluice_topology::ExecutorConfig;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Deliverer, Limits, ResolvedEndpoint, Status, backoff};

/// Where the executor reads and how it delivers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The instance name (DLQ entries, logs).
    pub name: String,
    /// The consumer group, also the group of its offsets in the store.
    pub group: String,
    /// The `actions.requested` topic.
    pub input: String,
    /// Where `action.result` events go; none: the ledger only.
    pub results: Option<String>,
    /// Retries, breaker, destinations.
    pub config: ExecutorConfig,
    /// Most requests per poll.
    pub batch_size: usize,
    /// Longest wait for the first request of a poll.
    pub max_wait: Duration,
    /// Most actions claimed at once.
    pub claim_batch: u32,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// How long a claim holds an action; longer than any endpoint's timeout.
    pub lease: Duration,
    /// Wait between claims when nothing is due.
    pub idle: Duration,
    /// Longest wait between retries of a store or log outage.
    pub max_backoff: Duration,
}

impl Settings {
    /// Settings for an instance called `name` reading `input`, with defaults elsewhere.
    pub fn new(name: &str, input: &str, config: ExecutorConfig) -> Settings {
        let longest = config
            .endpoints
            .iter()
            .map(|e| e.timeout)
            .max()
            .unwrap_or(Duration::from_secs(30));
        Settings {
            name: name.to_owned(),
            group: name.to_owned(),
            input: input.to_owned(),
            results: None,
            config,
            batch_size: 500,
            max_wait: Duration::from_millis(50),
            claim_batch: 256,
            concurrency: 64,
            // Past the longest attempt: a claim dies with its executor only this much later.
            lease: longest + Duration::from_secs(5),
            idle: Duration::from_millis(20),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// What the executor has done, for progress lines and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests scheduled for delivery.
    pub enqueued: AtomicU64,
    /// Requests absorbed as duplicates of a scheduled action (replays, redeliveries).
    pub duplicates: AtomicU64,
    /// Requests recorded as denied (destructive and not allowed, or no such endpoint).
    pub denied: AtomicU64,
    /// Requests recorded as suppressed (replays).
    pub suppressed: AtomicU64,
    /// Actions delivered.
    pub delivered: AtomicU64,
    /// Failed attempts scheduled for a retry.
    pub retried: AtomicU64,
    /// Attempts not made because the endpoint's breaker was open.
    pub short_circuited: AtomicU64,
    /// Actions given up on (DLQ).
    pub dead: AtomicU64,
    /// Requests that are not action requests (DLQ).
    pub rejected: AtomicU64,
    /// Requests below the store's offset, skipped after a (re)assignment.
    pub skipped: AtomicU64,
}

/// Errors that stop the executor.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The log refused something that retrying will not fix.
    #[error("executor {name}: log: {source}")]
    Log {
        /// The instance.
        name: String,
        /// The cause.
        source: sluice_log::Error,
    },
    /// The store refused something that retrying will not fix.
    #[error("executor {name}: store: {source}")]
    Store {
        /// The instance.
        name: String,
        /// The cause.
        source: sluice_store::Error,
    },
}

/// How actions leave: the HTTP client with the destination policy, the endpoints with their
/// secrets and breakers (resolved by the caller, from its environment), and the rate limits.
#[derive(Debug)]
pub struct Outbound {
    /// The client.
    pub deliverer: Deliverer,
    /// The endpoints.
    pub endpoints: Vec<ResolvedEndpoint>,
    /// Global and per-endpoint rate limits.
    pub limits: Limits,
}

/// Runs intake and delivery until `shutdown`.
pub async fn run<L: Log, S: SchemaSource>(
    settings: &Settings,
    log: &L,
    store: &Store,
    codec: &EventCodec<S>,
    outbound: Outbound,
    stats: &Stats,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let Outbound {
        deliverer,
        endpoints,
        limits,
    } = outbound;
    let (deliverer, limits) = (&deliverer, &limits);
    let endpoints: HashMap<String, Arc<ResolvedEndpoint>> = endpoints
        .into_iter()
        .map(|e| (e.name().to_owned(), Arc::new(e)))
        .collect();
    let producer = log.producer().map_err(|source| RunError::Log {
        name: settings.name.clone(),
        source,
    })?;
    let delivery = Delivery {
        settings,
        store,
        codec,
        deliverer,
        endpoints: &endpoints,
        limits,
        stats,
        producer,
    };
    let intake = IntakeLoop {
        settings,
        store,
        codec,
        endpoints: &endpoints,
        stats,
        floors: HashMap::new(),
        assignment: Vec::new(),
    };
    let (a, b) = tokio::join!(intake.run(log, &shutdown), delivery.run(&shutdown));
    a.and(b)
}

/// The intake half.
struct IntakeLoop<'a, S> {
    settings: &'a Settings,
    store: &'a Store,
    codec: &'a EventCodec<S>,
    endpoints: &'a HashMap<String, Arc<ResolvedEndpoint>>,
    stats: &'a Stats,
    floors: HashMap<TopicPartition, i64>,
    assignment: Vec<TopicPartition>,
}

impl<S: SchemaSource> IntakeLoop<'_, S> {
    async fn run<L: Log>(mut self, log: &L, shutdown: &CancellationToken) -> Result<(), RunError> {
        let name = &self.settings.name;
        let log_err = |source| RunError::Log {
            name: name.clone(),
            source,
        };
        let mut consumer = log
            .consumer(&self.settings.group, &[self.settings.input.as_str()])
            .map_err(log_err)?;
        let result = self.poll_loop(&mut consumer, shutdown).await;
        match consumer.close().await {
            Ok(()) => result,
            Err(e) if e.is_transient() => result,
            Err(e) => result.and(Err(log_err(e))),
        }
    }

    async fn poll_loop<C: Consumer>(
        &mut self,
        consumer: &mut C,
        shutdown: &CancellationToken,
    ) -> Result<(), RunError> {
        while !shutdown.is_cancelled() {
            let polled = tokio::select! {
                polled = consumer.poll(self.settings.batch_size, self.settings.max_wait) => polled,
                () = shutdown.cancelled() => break,
            };
            let batch = match polled {
                Ok(b) => b,
                Err(e) if e.is_transient() => {
                    tracing::warn!(executor = %self.settings.name, error = %e, "poll failed; retrying");
                    pause(Duration::from_secs(1), shutdown).await;
                    continue;
                }
                Err(e) => {
                    return Err(RunError::Log {
                        name: self.settings.name.clone(),
                        source: e,
                    });
                }
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
                let group = &self.settings.group;
                let Some(offsets) = retrying(self.settings, shutdown, || {
                    self.store.consumer_offsets(group)
                })
                .await?
                else {
                    break;
                };
                self.floors = offsets
                    .into_iter()
                    .map(|o| (TopicPartition::new(&o.topic, o.partition), o.next_offset))
                    .collect();
                self.assignment = assignment;
            }
            if batch.is_empty() {
                continue;
            }
            if !self.take(consumer, batch, shutdown).await? {
                break;
            }
        }
        Ok(())
    }

    /// Schedules one poll's requests with their offsets; false if shut down first.
    async fn take<C: Consumer>(
        &mut self,
        consumer: &mut C,
        batch: Vec<Message>,
        shutdown: &CancellationToken,
    ) -> Result<bool, RunError> {
        let mut actions = Vec::new();
        let mut next: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        let mut stored: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        for msg in batch {
            let tp = msg.topic_partition();
            stored.insert(tp.clone(), msg.offset + 1);
            if msg.offset < self.floors.get(&tp).copied().unwrap_or(0) {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            next.insert(tp, msg.offset + 1);
            let event = loop {
                match self.codec.decode(&msg.value).await {
                    Err(sluice_schemas::Error::Remote(e)) => {
                        tracing::warn!(executor = %self.settings.name, error = %e, "schema registry unreachable; retrying");
                        if !pause(Duration::from_secs(1), shutdown).await {
                            return Ok(false);
                        }
                    }
                    other => break other,
                }
            };
            match event
                .map_err(|e| e.to_string())
                .and_then(|e| self.request(&e, &msg))
            {
                Ok(action) => actions.push(action),
                Err(detail) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    let letter = DeadLetter {
                        processor: self.settings.name.clone(),
                        event_id: None,
                        topic: msg.topic.clone(),
                        partition: msg.partition,
                        offset: msg.offset,
                        schema_id: sluice_schemas::wire::unframe(&msg.value)
                            .ok()
                            .map(|(id, _)| id),
                        raw: msg.value.clone(),
                        key: msg.key.clone(),
                        headers: sluice_runtime::header_pairs(&msg.headers),
                        error_class: "invalid_request",
                        error_message: detail,
                        attempts: 1,
                        failed_at: Utc::now(),
                    };
                    // Before the offsets: a crash between may record it twice, never lose it.
                    loop {
                        match self.store.put(letter.clone()).await {
                            Ok(()) => break,
                            Err(e) => {
                                tracing::warn!(executor = %self.settings.name, error = %e, "DLQ write failed; retrying");
                                if !pause(Duration::from_secs(1), shutdown).await {
                                    return Ok(false);
                                }
                            }
                        }
                    }
                }
            }
        }
        let offsets: Vec<ConsumerOffset> = next
            .iter()
            .map(|(tp, &next_offset)| ConsumerOffset {
                group: self.settings.group.clone(),
                topic: tp.topic.clone(),
                partition: tp.partition,
                next_offset,
            })
            .collect();
        if !offsets.is_empty() {
            let store = self.store;
            let Some(outcome) = retrying(self.settings, shutdown, || {
                store.enqueue_actions(&actions, &offsets)
            })
            .await?
            else {
                return Ok(false);
            };
            let count = |v: &Vec<Uuid>| v.len() as u64;
            self.stats
                .enqueued
                .fetch_add(count(&outcome.enqueued), Ordering::Relaxed);
            self.stats
                .duplicates
                .fetch_add(count(&outcome.duplicates), Ordering::Relaxed);
            self.stats
                .denied
                .fetch_add(count(&outcome.denied), Ordering::Relaxed);
            self.stats
                .suppressed
                .fetch_add(count(&outcome.suppressed), Ordering::Relaxed);
            for (tp, n) in &next {
                self.floors.insert(tp.clone(), *n);
            }
        }
        for (tp, n) in stored {
            if consumer.assignment().contains(&tp)
                && let Err(e) = consumer.store(&tp, n)
            {
                tracing::warn!(executor = %self.settings.name, error = %e, "cannot store a log offset; the store's offsets still hold");
            }
        }
        if let Err(e) = consumer.commit().await {
            tracing::debug!(executor = %self.settings.name, error = %e, "log commit failed; the store's offsets hold");
        }
        Ok(true)
    }

    /// The schedule entry of an `action.requested` event.
    fn request(&self, event: &Event, msg: &Message) -> Result<NewAction, String> {
        if event.event_type.as_str() != EventType::ACTION_REQUESTED {
            return Err(format!(
                "{} is not an {}",
                event.event_type,
                EventType::ACTION_REQUESTED
            ));
        }
        let p = &event.payload;
        let text = |field: &str| {
            p.get(field)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("the request has no {field}"))
        };
        let flag = |field: &str| p.get(field).and_then(Value::as_bool).unwrap_or(false);
        let endpoint = text("endpoint")?;
        let input_event_id = text("input_event_id")?
            .parse::<Uuid>()
            .map_err(|e| format!("input_event_id: {e}"))?;
        let rule_version = p
            .get("rule_version")
            .and_then(Value::as_i64)
            .and_then(|v| i32::try_from(v).ok())
            .ok_or("the request has no rule_version")?;
        let intake = if flag("suppressed") {
            Intake::Suppressed
        } else if flag("denied") {
            Intake::Denied {
                reason: "a destructive action its rule does not allow (allow_destructive)".into(),
            }
        } else if !self.endpoints.contains_key(&endpoint) {
            Intake::Denied {
                reason: format!("no endpoint named {endpoint:?} in this executor"),
            }
        } else {
            Intake::Deliver
        };
        Ok(NewAction {
            action_id: event.event_id,
            input_event_id,
            rule_id: text("rule_id")?,
            rule_version,
            endpoint,
            device_id: event.aggregate_id.clone(),
            body: text("body")?,
            destructive: flag("destructive"),
            requested_at: event.ingested_at,
            intake,
            source: ActionSource {
                topic: msg.topic.clone(),
                partition: msg.partition,
                offset: msg.offset,
            },
        })
    }
}

/// The delivery half.
struct Delivery<'a, S, P> {
    settings: &'a Settings,
    store: &'a Store,
    codec: &'a EventCodec<S>,
    deliverer: &'a Deliverer,
    endpoints: &'a HashMap<String, Arc<ResolvedEndpoint>>,
    limits: &'a Limits,
    stats: &'a Stats,
    producer: P,
}

impl<S: SchemaSource, P: Producer> Delivery<'_, S, P> {
    async fn run(&self, shutdown: &CancellationToken) -> Result<(), RunError> {
        while !shutdown.is_cancelled() {
            let store = self.store;
            let (limit, lease) = (self.settings.claim_batch, self.settings.lease);
            let Some(due) = retrying(self.settings, shutdown, || {
                store.claim_due_actions(Utc::now(), limit, lease)
            })
            .await?
            else {
                break;
            };
            if due.is_empty() {
                pause(self.settings.idle, shutdown).await;
                continue;
            }
            let results: Vec<Option<Event>> = futures::stream::iter(due)
                .map(|action| self.deliver(action, shutdown))
                .buffer_unordered(self.settings.concurrency.max(1))
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
            self.publish(results.into_iter().flatten().collect()).await;
        }
        Ok(())
    }

    /// One attempt at `action`, recorded; returns its `action.result` event.
    async fn deliver(
        &self,
        action: DueAction,
        shutdown: &CancellationToken,
    ) -> Result<Option<Event>, RunError> {
        let attempt_no = action.attempts + 1;
        let Some(endpoint) = self.endpoints.get(&action.endpoint) else {
            // The endpoint left the configuration since the action was scheduled.
            let record = AttemptRecord {
                at: Utc::now(),
                http_status: None,
                latency: None,
                error: Some(format!("no endpoint named {:?} any more", action.endpoint)),
            };
            return self
                .record(
                    &action,
                    record,
                    NextStep::Dead,
                    "failed",
                    attempt_no,
                    shutdown,
                )
                .await;
        };
        while let Err(wait) = self.limits.try_acquire(&action.endpoint) {
            if !pause(wait, shutdown).await {
                return Ok(None);
            }
        }
        let id = action.action_id.to_string();
        let attempt = self
            .deliverer
            .attempt(endpoint, &id, action.body.as_bytes())
            .await;
        let now = Utc::now();
        let (next, outcome) = match &attempt.status {
            Status::Delivered => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                (NextStep::Delivered, "delivered")
            }
            Status::ShortCircuited { until } => {
                self.stats.short_circuited.fetch_add(1, Ordering::Relaxed);
                let wait = until.saturating_duration_since(Instant::now());
                let until = now + chrono::Duration::from_std(wait).unwrap_or_default();
                (NextStep::ShortCircuited { until }, "short_circuited")
            }
            Status::Failed { retryable: true } => {
                match backoff(&self.settings.config.retry_backoff, attempt_no) {
                    Some(delay) => {
                        self.stats.retried.fetch_add(1, Ordering::Relaxed);
                        let at = now + chrono::Duration::from_std(delay).unwrap_or_default();
                        (NextStep::RetryAt(at), "retrying")
                    }
                    None => {
                        self.stats.dead.fetch_add(1, Ordering::Relaxed);
                        (NextStep::Dead, "failed")
                    }
                }
            }
            Status::Failed { retryable: false } | Status::Refused(_) => {
                self.stats.dead.fetch_add(1, Ordering::Relaxed);
                (NextStep::Dead, "failed")
            }
        };
        let record = AttemptRecord {
            at: now,
            http_status: attempt.http_code,
            latency: Some(attempt.latency),
            error: attempt.error.clone(),
        };
        self.record(&action, record, next, outcome, attempt_no, shutdown)
            .await
    }

    async fn record(
        &self,
        action: &DueAction,
        record: AttemptRecord,
        next: NextStep,
        outcome: &str,
        attempt: u32,
        shutdown: &CancellationToken,
    ) -> Result<Option<Event>, RunError> {
        let store = self.store;
        let recorded = retrying(self.settings, shutdown, || {
            store.record_attempt(action.action_id, &record, next)
        })
        .await?;
        if recorded.is_none() {
            // Shut down before the record: the lease runs out and the attempt is made again.
            return Ok(None);
        }
        if self.settings.results.is_none() {
            return Ok(None);
        }
        let payload = json!({
            "action_id": action.action_id.to_string(),
            "rule_id": action.rule_id,
            "rule_version": action.rule_version,
            "endpoint": action.endpoint,
            "outcome": outcome,
            "attempt": attempt,
            "http_status": record.http_status,
            "latency_ms": record.latency.map(|l| l.as_millis() as i64),
            "error": record.error,
        });
        let step = format!("result/{attempt}/{outcome}");
        Ok(Some(Event {
            event_id: sluice_core::derived_event_id(action.action_id, &step),
            event_type: EventType::new(EventType::ACTION_RESULT).expect("a valid event type"),
            aggregate_id: action.device_id.clone(),
            occurred_at: record.at.trunc_subsecs(6),
            ingested_at: record.at.trunc_subsecs(6),
            payload,
            metadata: sluice_core::Metadata {
                source: Source::Processor(self.settings.name.clone()),
                trace: None,
                schema_version: None,
                causation_id: Some(action.action_id),
                replay: None,
            },
        }))
    }

    /// Produces the results; the ledger is the record, so a failure here is logged, not fatal.
    async fn publish(&self, results: Vec<Event>) {
        let Some(topic) = &self.settings.results else {
            return;
        };
        if results.is_empty() {
            return;
        }
        let mut records = Vec::with_capacity(results.len());
        for event in &results {
            match self.codec.encode(event).await {
                Ok((value, _)) => records.push(Record {
                    key: Some(event.aggregate_id.as_bytes().to_vec()),
                    value,
                    headers: vec![Header {
                        key: "event_type".into(),
                        value: EventType::ACTION_RESULT.as_bytes().to_vec(),
                    }],
                    timestamp_ms: Some(event.occurred_at.timestamp_millis()),
                }),
                Err(e) => {
                    tracing::warn!(executor = %self.settings.name, error = %e, "cannot encode an action result; the ledger has it");
                }
            }
        }
        if let Err(e) = self.producer.send(topic, records).await {
            tracing::warn!(executor = %self.settings.name, %topic, error = %e, "action results not published; the ledger has them");
        }
    }
}

/// Runs a store operation until it succeeds, backing off on outages. `None` if shut down.
async fn retrying<T, F, Fut>(
    settings: &Settings,
    shutdown: &CancellationToken,
    op: F,
) -> Result<Option<T>, RunError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sluice_store::Result<T>>,
{
    sluice_runtime::retry_transient(
        op,
        sluice_store::Error::is_transient,
        settings.max_backoff,
        shutdown,
        |e, delay| {
            tracing::warn!(executor = %settings.name, error = %e, retry_in = ?delay, "store unavailable; retrying");
        },
    )
    .await
    .map_err(|source| RunError::Store {
        name: settings.name.clone(),
        source,
    })
}

/// Waits `d` or until shutdown; false on shutdown.
async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = shutdown.cancelled() => false,
    }
}
