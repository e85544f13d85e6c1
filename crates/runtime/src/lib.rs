//! The processor runtime: the one loop every processor runs in.
//!
//! consume → decode (Confluent wire format) → [`Processor::process`] → produce outputs → store
//! the input's offset → commit. A processor only turns an event into outputs on named ports or
//! an error with a domain; everything else is here, written once:
//!
//! - *rejected* (bad data, or bytes that do not decode): the raw message goes to the DLQ sink
//!   with its provenance and the partition moves on;
//! - *transient* (an outage): retried at once, then after 1 s, 2 s, and backing off up to a cap
//!   for as long as it takes, with the partitions paused and nothing committed;
//! - *fatal* (a bug or a misconfiguration): the loop stops with the error.
//!
//! An input's offset is stored only after every output it produced was acknowledged by the
//! log, so a crash at any point means redelivery, never loss. This crate must never commit an
//! offset past an input whose outputs are not durable, and never drop an input silently.

mod dlq;
mod metrics;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use sluice_core::Event;
use sluice_log::{Consumer, Header, Log, Message, Producer, Record, TopicPartition};
use sluice_schemas::{EventCodec, SchemaSource};
use tokio_util::sync::CancellationToken;

pub use dlq::{DeadLetter, DlqSink, MemoryDlq, header_pairs};
pub use metrics::{CountingMetrics, Metrics, NoMetrics};

/// Any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a processor does with one event.
pub trait Processor: Send + Sync + 'static {
    /// The processor's kind, for logs and DLQ entries.
    const NAME: &'static str;

    /// Whether the loop hands each poll's events to [`Processor::process_batch`] at once (a
    /// model scoring many rows in one call). Default: no, each goes to `process`.
    const BATCHES: bool = false;

    /// Turns `event` into zero or more outputs on named ports, or an error with a domain.
    fn process(
        &self,
        event: Event,
        out: &mut Outputs,
    ) -> impl Future<Output = Result<(), ProcessError>> + Send;

    /// Processes a poll's decoded events, in order, returning for each what `process` would
    /// have. Called only when [`Processor::BATCHES`]; an event whose result is transient is
    /// retried through `process`, like any other.
    fn process_batch(
        &self,
        events: &[Event],
    ) -> impl Future<Output = Vec<Result<Outputs, ProcessError>>> + Send {
        async move {
            let mut results = Vec::with_capacity(events.len());
            for event in events {
                let mut out = Outputs::default();
                results.push(self.process(event.clone(), &mut out).await.map(|()| out));
            }
            results
        }
    }
}

/// Why an event could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Bad data: dead-lettered, and the partition moves on. `reason` is a short fixed code
    /// (a metric label), `detail` the human message.
    #[error("rejected ({reason}): {detail}")]
    Rejected {
        /// Reason code, e.g. `schema`, `range`.
        reason: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// An outage: retried with backoff, nothing committed meanwhile.
    #[error("transient: {0}")]
    Transient(BoxError),
    /// A bug or misconfiguration: the processor stops.
    #[error("fatal: {0}")]
    Fatal(BoxError),
}

/// The outputs of one event, by port.
#[derive(Debug, Default)]
pub struct Outputs {
    items: Vec<(String, Event)>,
}

impl Outputs {
    /// Emits `event` on `port`.
    pub fn emit(&mut self, port: &str, event: Event) {
        self.items.push((port.to_owned(), event));
    }

    /// What was emitted so far.
    pub fn events(&self) -> impl Iterator<Item = (&str, &Event)> {
        self.items.iter().map(|(p, e)| (p.as_str(), e))
    }
}

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Instance name (the topology's processor name); also names DLQ entries.
    pub name: String,
    /// Consumer group.
    pub group: String,
    /// Input topics.
    pub inputs: Vec<String>,
    /// Output port → topic.
    pub ports: BTreeMap<String, String>,
    /// Most messages handled per poll (the micro-batch).
    pub max_batch: usize,
    /// Longest wait for the first message of a batch.
    pub max_wait: Duration,
    /// Waits between attempts of a transient failure after the immediate retry; the last one
    /// repeats, doubling up to `max_backoff`.
    pub backoff: Vec<Duration>,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// How long shutdown may take to finish in-flight work and commit.
    pub shutdown_deadline: Duration,
}

impl RuntimeConfig {
    /// A configuration with the defaults: batches of 500, 50 ms wait, backoff 1 s, 2 s, … up
    /// to 30 s, 30 s to shut down.
    pub fn new(name: &str, inputs: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            group: name.to_owned(),
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
            ports: BTreeMap::new(),
            max_batch: 500,
            max_wait: Duration::from_millis(50),
            backoff: DEFAULT_BACKOFF.to_vec(),
            max_backoff: Duration::from_secs(30),
            shutdown_deadline: Duration::from_secs(30),
        }
    }

    /// Routes `port` to `topic`.
    pub fn port(mut self, port: &str, topic: &str) -> Self {
        self.ports.insert(port.to_owned(), topic.to_owned());
        self
    }

    fn delay(&self, retry: u32) -> Duration {
        backoff_delay(&self.backoff, self.max_backoff, retry)
    }
}

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The processor said so.
    #[error("processor {name} stopped on a fatal error: {source}")]
    Fatal {
        /// The instance.
        name: String,
        /// The error.
        source: BoxError,
    },
    /// The log failed in a way retrying cannot fix.
    #[error("processor {name}: {source}")]
    Log {
        /// The instance.
        name: String,
        /// The error.
        source: sluice_log::Error,
    },
    /// A port the processor emitted on is not routed to a topic.
    #[error("processor {name} emitted on port {port:?}, which the topology does not route")]
    UnknownPort {
        /// The instance.
        name: String,
        /// The port.
        port: String,
    },
    /// Shutdown did not finish within the deadline; uncommitted work will be redelivered.
    #[error("processor {0} did not finish shutting down in time")]
    ShutdownTimeout(String),
}

/// A message's decoded event and, when its batch was processed at once, its first outcome.
type Processed = (Event, Option<Result<Outputs, ProcessError>>);

/// One message being worked on.
struct Pending {
    tp: TopicPartition,
    next: i64,
    outputs: Vec<(String, Record)>,
}

/// Runs `processor` until `shutdown` is cancelled or a fatal error.
pub async fn run<P, L, S, D, M>(
    processor: &P,
    config: &RuntimeConfig,
    log: &L,
    codec: &EventCodec<S>,
    dlq: &D,
    metrics: &M,
    shutdown: CancellationToken,
) -> Result<(), RunError>
where
    P: Processor,
    L: Log,
    S: SchemaSource,
    D: DlqSink,
    M: Metrics,
{
    let log_err = |source| RunError::Log {
        name: config.name.clone(),
        source,
    };
    let inputs: Vec<&str> = config.inputs.iter().map(String::as_str).collect();
    let mut consumer = log.consumer(&config.group, &inputs).map_err(log_err)?;
    let producer = log.producer().map_err(log_err)?;
    let mut runner = Runner {
        processor,
        config,
        codec,
        dlq,
        metrics,
        producer,
        shutdown: shutdown.clone(),
        commit_pending: false,
    };
    let result = runner.run(&mut consumer).await;
    // Whatever happened, commit what is stored and leave the group within the deadline.
    match tokio::time::timeout(config.shutdown_deadline, consumer.close()).await {
        Ok(Ok(())) => result,
        // E.g. a commit refused mid-rebalance: those inputs are read again, nothing is lost.
        Ok(Err(e)) if e.is_transient() => {
            tracing::warn!(processor = %config.name, error = %e, "offsets not committed on the way out; the inputs since the last commit will be processed again");
            result
        }
        Ok(Err(e)) => result.and(Err(log_err(e))),
        Err(_) => result.and(Err(RunError::ShutdownTimeout(config.name.clone()))),
    }
}

struct Runner<'a, P, S, D, M, Pr> {
    processor: &'a P,
    config: &'a RuntimeConfig,
    codec: &'a EventCodec<S>,
    dlq: &'a D,
    metrics: &'a M,
    producer: Pr,
    shutdown: CancellationToken,
    /// A commit failed transiently and is retried when the loop is idle.
    commit_pending: bool,
}

enum Step {
    Done(Pending),
    /// Give up on this message for now (shutdown, or its partition moved away).
    Abandon,
}

impl<P, S, D, M, Pr> Runner<'_, P, S, D, M, Pr>
where
    P: Processor,
    S: SchemaSource,
    D: DlqSink,
    M: Metrics,
    Pr: Producer,
{
    async fn run<C: Consumer>(&mut self, consumer: &mut C) -> Result<(), RunError> {
        while !self.shutdown.is_cancelled() {
            let batch = tokio::select! {
                polled = consumer.poll(self.config.max_batch, self.config.max_wait) => polled,
                () = self.shutdown.cancelled() => break,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) if e.is_transient() => {
                    tracing::warn!(processor = %self.config.name, error = %e, "poll failed; retrying");
                    self.wait(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => return Err(self.log_err(e)),
            };
            if batch.is_empty() {
                if self.commit_pending {
                    self.commit(consumer).await?;
                }
                continue;
            }
            let mut done: Vec<Pending> = Vec::with_capacity(batch.len());
            let mut abandoned: Vec<TopicPartition> = Vec::new();
            let mut first = self.process_ahead(&batch).await;
            for (i, msg) in batch.into_iter().enumerate() {
                if abandoned.contains(&msg.topic_partition()) {
                    continue;
                }
                let started = std::time::Instant::now();
                let ahead = first.get_mut(i).and_then(Option::take);
                match self.handle(consumer, &msg, &mut done, ahead).await? {
                    Step::Done(p) => {
                        self.metrics.processed(&self.config.name, started.elapsed());
                        done.push(p);
                    }
                    Step::Abandon => {
                        // Later messages of that partition must not be processed past it.
                        abandoned.push(msg.topic_partition());
                        if self.shutdown.is_cancelled() {
                            break;
                        }
                    }
                }
            }
            self.flush(consumer, &mut done).await?;
        }
        Ok(())
    }

    /// For a batching processor, decodes the poll and processes what decoded in one call:
    /// each message's event and first outcome, by position. Messages that do not decode get
    /// `None` and take the usual path (DLQ, or retry when the registry is down).
    async fn process_ahead(&self, batch: &[Message]) -> Vec<Option<Processed>> {
        if !P::BATCHES {
            return Vec::new();
        }
        let mut decoded = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for msg in batch {
            let event = self
                .codec
                .decode(&msg.value)
                .await
                .ok()
                .map(|e| marked(e, msg));
            decoded.push(event.is_some());
            events.extend(event);
        }
        if events.is_empty() {
            return Vec::new();
        }
        // A processor returning fewer results than events leaves the rest to `process`.
        let mut results = self.processor.process_batch(&events).await.into_iter();
        let mut events = events.into_iter();
        decoded
            .into_iter()
            .map(|ok| {
                if ok {
                    events.next().map(|e| (e, results.next()))
                } else {
                    None
                }
            })
            .collect()
    }

    /// Decodes and processes one message, retrying transient failures. Before a retry wait,
    /// the work done so far in the batch is flushed, so an outage holds back only this message.
    /// `ahead` is the message's event and first outcome when the batch was processed at once.
    async fn handle<C: Consumer>(
        &mut self,
        consumer: &mut C,
        msg: &Message,
        done: &mut Vec<Pending>,
        ahead: Option<Processed>,
    ) -> Result<Step, RunError> {
        let tp = msg.topic_partition();
        let (event, mut first) = match ahead {
            Some((event, first)) => (event, first),
            None => match self.decode(consumer, msg, done).await? {
                Ok(event) => (event, None),
                Err(step) => return Ok(step),
            },
        };
        let mut attempt = 1u32;
        loop {
            let (out, outcome) = match first.take() {
                Some(Ok(out)) => (out, Ok(())),
                Some(Err(e)) => (Outputs::default(), Err(e)),
                None => {
                    let mut out = Outputs::default();
                    let outcome = self.processor.process(event.clone(), &mut out).await;
                    (out, outcome)
                }
            };
            match outcome {
                Ok(()) => match self.encode(&out).await {
                    Ok(outputs) => {
                        return Ok(Step::Done(Pending {
                            tp,
                            next: msg.offset + 1,
                            outputs,
                        }));
                    }
                    Err(EncodeError::Port(port)) => {
                        return Err(RunError::UnknownPort {
                            name: self.config.name.clone(),
                            port,
                        });
                    }
                    Err(EncodeError::Transient(detail)) => {
                        if !self
                            .retry_later(consumer, msg, done, attempt, &detail)
                            .await?
                        {
                            return Ok(Step::Abandon);
                        }
                    }
                    Err(EncodeError::Invalid(detail)) => {
                        // The processor made an output its schema refuses: deterministic, so
                        // isolate the input rather than stop the partition.
                        self.dead_letter(msg, Some(&event), "output_schema", &detail, attempt)
                            .await?;
                        return Ok(Step::Done(Pending {
                            tp,
                            next: msg.offset + 1,
                            outputs: Vec::new(),
                        }));
                    }
                },
                Err(ProcessError::Rejected { reason, detail }) => {
                    self.metrics.rejected(&self.config.name, reason);
                    self.dead_letter(msg, Some(&event), reason, &detail, attempt)
                        .await?;
                    return Ok(Step::Done(Pending {
                        tp,
                        next: msg.offset + 1,
                        outputs: Vec::new(),
                    }));
                }
                Err(ProcessError::Transient(e)) => {
                    if !self
                        .retry_later(consumer, msg, done, attempt, &e.to_string())
                        .await?
                    {
                        return Ok(Step::Abandon);
                    }
                }
                Err(ProcessError::Fatal(source)) => {
                    // Keep what finished before the bug.
                    self.flush(consumer, done).await?;
                    return Err(RunError::Fatal {
                        name: self.config.name.clone(),
                        source,
                    });
                }
            }
            attempt += 1;
        }
    }

    /// Decodes `msg`, retrying while the registry is unreachable. `Err` is the message's end:
    /// dead-lettered (bytes that do not decode), or abandoned.
    async fn decode<C: Consumer>(
        &mut self,
        consumer: &mut C,
        msg: &Message,
        done: &mut Vec<Pending>,
    ) -> Result<Result<Event, Step>, RunError> {
        let mut attempt = 1u32;
        loop {
            match self.codec.decode(&msg.value).await {
                Ok(e) => return Ok(Ok(marked(e, msg))),
                // The registry is unreachable: an outage, not bad data.
                Err(e @ sluice_schemas::Error::Remote(_)) => {
                    if !self
                        .retry_later(consumer, msg, done, attempt, &e.to_string())
                        .await?
                    {
                        return Ok(Err(Step::Abandon));
                    }
                    attempt += 1;
                }
                Err(e) => {
                    self.metrics.rejected(&self.config.name, "decode");
                    self.dead_letter(msg, None, "decode", &e.to_string(), 1)
                        .await?;
                    return Ok(Err(Step::Done(Pending {
                        tp: msg.topic_partition(),
                        next: msg.offset + 1,
                        outputs: Vec::new(),
                    })));
                }
            }
        }
    }

    /// Waits before retry `attempt + 1` of `msg`: flushes finished work, pauses the consumer's
    /// partitions and keeps polling so the group membership stays alive. Returns false when
    /// the message must be abandoned (shutdown, or its partition was taken away).
    async fn retry_later<C: Consumer>(
        &mut self,
        consumer: &mut C,
        msg: &Message,
        done: &mut Vec<Pending>,
        attempt: u32,
        detail: &str,
    ) -> Result<bool, RunError> {
        self.metrics.retried(&self.config.name);
        let delay = self.config.delay(attempt);
        tracing::warn!(processor = %self.config.name, topic = %msg.topic, partition = msg.partition, offset = msg.offset, attempt, retry_in = ?delay, error = %detail, "transient failure; not committing");
        self.flush(consumer, done).await?;
        if delay.is_zero() {
            return Ok(!self.shutdown.is_cancelled());
        }
        let assigned = consumer.assignment();
        consumer.pause(&assigned).map_err(|e| self.log_err(e))?;
        let until = tokio::time::Instant::now() + delay;
        let mut still_owned = true;
        while tokio::time::Instant::now() < until && !self.shutdown.is_cancelled() {
            let left = until - tokio::time::Instant::now();
            tokio::select! {
                polled = consumer.poll(1, left) => {
                    // Paused: nothing comes back but rebalances.
                    if let Err(e) = polled && !e.is_transient() {
                        return Err(self.log_err(e));
                    }
                }
                () = self.shutdown.cancelled() => {}
            }
            if !consumer.assignment().contains(&msg.topic_partition()) {
                still_owned = false;
                break;
            }
        }
        let now_assigned = consumer.assignment();
        consumer
            .resume(&now_assigned)
            .map_err(|e| self.log_err(e))?;
        Ok(still_owned && !self.shutdown.is_cancelled())
    }

    async fn encode(&self, out: &Outputs) -> Result<Vec<(String, Record)>, EncodeError> {
        let mut records = Vec::with_capacity(out.items.len());
        for (port, event) in &out.items {
            let topic = self
                .config
                .ports
                .get(port)
                .ok_or_else(|| EncodeError::Port(port.clone()))?;
            let (value, _) = self.codec.encode(event).await.map_err(|e| match e {
                sluice_schemas::Error::Remote(_) => EncodeError::Transient(e.to_string()),
                other => EncodeError::Invalid(other.to_string()),
            })?;
            records.push((topic.clone(), record_of(event, value)));
        }
        Ok(records)
    }

    /// Produces the outputs of finished messages (waiting for every acknowledgement), then
    /// stores their offsets and commits. Produce and commit failures are retried until they
    /// succeed or shutdown; nothing is stored before its outputs are durable.
    async fn flush<C: Consumer>(
        &mut self,
        consumer: &mut C,
        done: &mut Vec<Pending>,
    ) -> Result<(), RunError> {
        if done.is_empty() {
            return Ok(());
        }
        let mut by_topic: BTreeMap<String, Vec<Record>> = BTreeMap::new();
        for p in done.iter_mut() {
            for (topic, record) in p.outputs.drain(..) {
                by_topic.entry(topic).or_default().push(record);
            }
        }
        for (topic, records) in by_topic {
            let mut attempt = 1;
            loop {
                match self.producer.send(&topic, records.clone()).await {
                    Ok(_) => break,
                    Err(e) if e.is_transient() && !self.shutdown.is_cancelled() => {
                        self.metrics.retried(&self.config.name);
                        let delay = self.config.delay(attempt + 1);
                        tracing::warn!(processor = %self.config.name, %topic, error = %e, retry_in = ?delay, "produce failed; retrying");
                        self.wait(delay).await;
                        attempt += 1;
                    }
                    // Shutting down or not retryable: nothing is stored, so all of it comes back.
                    Err(e) => {
                        done.clear();
                        return Err(self.log_err(e));
                    }
                }
            }
        }
        for p in done.drain(..) {
            // The partition may have moved during a wait; its new owner redoes the work.
            if consumer.assignment().contains(&p.tp) {
                consumer.store(&p.tp, p.next).map_err(|e| self.log_err(e))?;
            }
        }
        self.commit(consumer).await
    }

    /// Commits what is stored. A transient failure does not hold the loop: the offsets stay
    /// stored and go out with the next commit, the next revoke, or on close, and the loop must
    /// keep polling because a commit refused during a rebalance only succeeds once that poll
    /// has served the rebalance. A crash meanwhile redelivers those inputs; nothing is lost.
    async fn commit<C: Consumer>(&mut self, consumer: &mut C) -> Result<(), RunError> {
        match consumer.commit().await {
            Ok(()) => {
                self.commit_pending = false;
                Ok(())
            }
            Err(e) if e.is_transient() => {
                self.metrics.retried(&self.config.name);
                tracing::warn!(processor = %self.config.name, error = %e, "commit failed; offsets stay stored and are committed again shortly");
                self.commit_pending = true;
                Ok(())
            }
            Err(e) => Err(self.log_err(e)),
        }
    }

    async fn dead_letter(
        &self,
        msg: &Message,
        event: Option<&Event>,
        class: &'static str,
        detail: &str,
        attempts: u32,
    ) -> Result<(), RunError> {
        let letter = DeadLetter {
            processor: self.config.name.clone(),
            event_id: event.map(|e| e.event_id),
            topic: msg.topic.clone(),
            partition: msg.partition,
            offset: msg.offset,
            schema_id: sluice_schemas::wire::unframe(&msg.value)
                .ok()
                .map(|(id, _)| id),
            raw: msg.value.clone(),
            key: msg.key.clone(),
            headers: dlq::header_pairs(&msg.headers),
            error_class: class,
            error_message: detail.to_owned(),
            attempts,
            failed_at: chrono::Utc::now(),
        };
        tracing::warn!(processor = %self.config.name, topic = %msg.topic, partition = msg.partition, offset = msg.offset, class, error = %detail, "dead-lettered");
        // The DLQ is storage like any other: if it is down, the message waits, it is not lost.
        let mut attempt = 1;
        loop {
            match self.dlq.put(letter.clone()).await {
                Ok(()) => {
                    self.metrics.dead_lettered(&self.config.name, class);
                    return Ok(());
                }
                Err(e) if !self.shutdown.is_cancelled() => {
                    let delay = self.config.delay(attempt + 1);
                    tracing::warn!(processor = %self.config.name, error = %e, retry_in = ?delay, "DLQ write failed; retrying");
                    self.wait(delay).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(RunError::Fatal {
                        name: self.config.name.clone(),
                        source: e,
                    });
                }
            }
        }
    }

    async fn wait(&self, delay: Duration) {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    fn log_err(&self, source: sluice_log::Error) -> RunError {
        RunError::Log {
            name: self.config.name.clone(),
            source,
        }
    }
}

enum EncodeError {
    Port(String),
    Transient(String),
    Invalid(String),
}

/// The wait before retry `retry` of a transient failure: retry 1 is immediate, then the
/// `steps`, then the last step doubling up to `max` (1 s, 2 s, 4 s, … for `[1 s, 2 s]`).
pub fn backoff_delay(steps: &[Duration], max: Duration, retry: u32) -> Duration {
    if retry <= 1 {
        return Duration::ZERO;
    }
    let i = (retry - 2) as usize;
    match steps.get(i) {
        Some(d) => *d,
        None => {
            let last = steps.last().copied().unwrap_or(Duration::from_secs(1));
            let extra = (i + 1 - steps.len()).min(16) as u32;
            last.saturating_mul(2u32.saturating_pow(extra)).min(max)
        }
    }
}

/// The default backoff steps: 1 s, 2 s (then 4 s, 8 s, … up to a cap).
pub const DEFAULT_BACKOFF: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(2)];

/// Runs `op` until it succeeds or fails for good, waiting `backoff_delay(DEFAULT_BACKOFF, max,
/// failures + 1)` after each transient failure (1 s, 2 s, 4 s, …), and telling `on_retry` the
/// error and the wait. `None` if `shutdown` fires first. Nothing may be committed meanwhile;
/// that is the caller's side of the contract.
pub async fn retry_transient<T, E, Fut>(
    mut op: impl FnMut() -> Fut,
    is_transient: impl Fn(&E) -> bool,
    max: Duration,
    shutdown: &CancellationToken,
    mut on_retry: impl FnMut(&E, Duration),
) -> Result<Option<T>, E>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut failures = 0;
    loop {
        match op().await {
            Ok(value) => return Ok(Some(value)),
            Err(e) if is_transient(&e) => {
                failures += 1;
                let delay = backoff_delay(&DEFAULT_BACKOFF, max, failures + 1);
                on_retry(&e, delay);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = interrupt => {}
                _ = term.recv() => {}
            }
        } else {
            let _ = interrupt.await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// Cancels `token` on SIGINT or SIGTERM. The handlers are installed before this returns, so
/// a signal sent right after (say, just after a start line was logged) stops the work cleanly
/// instead of killing the process. Must be called inside a Tokio runtime.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::info!("shutdown requested");
            token.cancel();
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        token.cancel();
    });
    Ok(())
}

/// The record of `event` encoded as `value`: keyed by its aggregate (so in order per
/// aggregate), stamped with device time, and headers for its type, trace and replay mark.
pub fn record_of(event: &Event, value: Vec<u8>) -> Record {
    let mut headers = vec![Header {
        key: "event_type".into(),
        value: event.event_type.as_str().as_bytes().to_vec(),
    }];
    if let Some(trace) = &event.metadata.trace {
        headers.push(Header {
            key: "traceparent".into(),
            value: trace.traceparent.as_bytes().to_vec(),
        });
    }
    if let Some(replay) = &event.metadata.replay {
        headers.extend(replay.headers().map(|(key, value)| Header {
            key: key.into(),
            value,
        }));
    }
    Record {
        key: Some(event.aggregate_id.as_bytes().to_vec()),
        value,
        headers,
        timestamp_ms: Some(event.occurred_at.timestamp_millis()),
    }
}

/// `event` with the replay mark its record's headers carry, if any.
fn marked(mut event: Event, msg: &Message) -> Event {
    event.metadata.replay = sluice_core::Replay::from_headers(
        msg.headers
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_slice())),
    );
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_then_the_steps_then_doubling_to_the_cap() {
        let secs =
            |retry| backoff_delay(&DEFAULT_BACKOFF, Duration::from_secs(30), retry).as_secs();
        let waits: Vec<u64> = (1..=8).map(secs).collect();
        assert_eq!(waits, [0, 1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(secs(1_000), 30, "no overflow far out");
    }
}
