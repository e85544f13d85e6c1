//! The [`Log`] on Apache Kafka (or Redpanda) through rdkafka/librdkafka.
//!
//! - The producer is idempotent with `acks=all` and librdkafka's `murmur2_random` partitioner,
//!   so a keyed record lands where [`crate::partition_for`] (and a Java client) puts it, and
//!   [`Producer::send`] resolves only once every record is acknowledged by all in-sync replicas.
//! - The consumer is a group member that never commits on its own: it commits only offsets the
//!   caller stored, and only on [`Consumer::commit`], when partitions are revoked, and on close.
//!   Its librdkafka handle lives on one dedicated thread that runs every blocking call, so
//!   rebalance callbacks (and the commits they make) never block the async runtime, and a
//!   librdkafka shutdown that hangs (rust-rdkafka issue 453) hangs only that thread.
//! - `poll` is cancel-safe: messages fetched by a poll whose caller stopped waiting are
//!   returned by the next one (unless a seek or rebalance made them stale).
//!
//! This module must never report a record as delivered before Kafka acknowledged it, never
//! swallow a delivery or commit error, and never commit an offset the caller did not store.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::message::{BorrowedMessage, Header as KafkaHeader, Headers as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset as KafkaOffset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::{
    Consumer, Delivered, Error, Header, Log, Message, Offset, PartitionLag, Producer, Record,
    Result, SeekTo, TopicPartition, TopicSpec,
};

/// librdkafka's in-process mock cluster: a real Kafka-protocol broker, for tests and
/// `sluice bench log --log kafka-mock://`.
pub type MockCluster =
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// Starts a mock cluster of `brokers` brokers.
pub fn mock_cluster(brokers: i32) -> Result<MockCluster> {
    MockCluster::new(brokers).map_err(|e| Error::Fatal(format!("mock cluster: {e}")))
}

/// How long blocking librdkafka calls (metadata, commit, seek, lag, close) may take by default.
const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait before enqueuing again when librdkafka's producer queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(20);
/// Operations queued for a consumer's thread; more means the thread is stuck, so callers get
/// an error instead of an ever-growing queue.
const CONSUMER_JOB_QUEUE: usize = 16;
/// Longest single wait of a poll; bounds `Instant` arithmetic for huge timeouts.
const MAX_POLL_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Producer settings that may be overridden with [`KafkaLog::with_option`].
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[("linger.ms", "5"), ("message.timeout.ms", "30000")];
/// Producer settings the guarantees rest on; applied after the caller's options so they
/// cannot be weakened by accident.
const PRODUCER_REQUIRED: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    // Keyed records go where `crate::partition_for` says (Kafka's Java default).
    ("partitioner", "murmur2_random"),
    // Topics are created on purpose; a typo must fail, not create a topic.
    ("allow.auto.create.topics", "false"),
];
/// Consumer settings the offset contract rests on; applied after the caller's options.
const CONSUMER_REQUIRED: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    // The trait promises that a new group starts at the beginning.
    ("auto.offset.reset", "earliest"),
    ("enable.partition.eof", "false"),
    ("allow.auto.create.topics", "false"),
];

/// A Kafka cluster as a [`Log`].
#[derive(Clone)]
pub struct KafkaLog {
    bootstrap_servers: String,
    /// Extra librdkafka properties for every client, in the order given (later wins).
    options: Vec<(String, String)>,
    /// Extra librdkafka properties for consumers only, applied after `options`.
    consumer_options: Vec<(String, String)>,
    operation_timeout: Duration,
    /// Created on first use, shared by clones; `None` until then.
    admin: Arc<Mutex<Option<Arc<AdminClient<DefaultClientContext>>>>>,
}

impl fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Option values may hold credentials (sasl.password): show only their names.
        let option_keys: Vec<&str> = self.options.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("KafkaLog")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("options", &option_keys)
            .field("operation_timeout", &self.operation_timeout)
            .finish()
    }
}

impl KafkaLog {
    /// A log on the brokers of a `kafka://host:port[,host:port...]` URL.
    pub fn from_url(url: &str) -> Result<KafkaLog> {
        let invalid = |reason: &str| Error::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| invalid("expected kafka://host:port[,host:port...]"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Err(invalid("no broker address after kafka://"));
        }
        if rest.contains(['/', '?', '#', '@']) {
            return Err(invalid(
                "only host:port pairs are allowed (no path, query or credentials; pass \
                 security settings with KafkaLog::with_option)",
            ));
        }
        let mut servers = Vec::new();
        for server in rest.split(',') {
            let server = server.trim();
            let (host, port) = server
                .rsplit_once(':')
                .ok_or_else(|| invalid(&format!("broker {server:?} has no port")))?;
            if host.is_empty() {
                return Err(invalid(&format!("broker {server:?} has no host")));
            }
            match port.parse::<u16>() {
                Ok(port) if port > 0 => {}
                _ => return Err(invalid(&format!("broker {server:?} has an invalid port"))),
            }
            servers.push(server);
        }
        Ok(KafkaLog::new(&servers.join(",")))
    }

    /// A log on these brokers (librdkafka's `bootstrap.servers`: `host:port,host:port`).
    pub fn new(bootstrap_servers: &str) -> KafkaLog {
        KafkaLog {
            bootstrap_servers: bootstrap_servers.to_owned(),
            options: Vec::new(),
            consumer_options: Vec::new(),
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            admin: Arc::new(Mutex::new(None)),
        }
    }

    /// A log on librdkafka's mock cluster. The mock answers a fetch that finds no data only
    /// after the consumer's whole `fetch.wait.max.ms` (a real broker answers as soon as data
    /// arrives), so the wait is shortened here or every message would wait up to 500 ms.
    pub fn on_mock(cluster: &MockCluster) -> KafkaLog {
        let mut log = KafkaLog::new(&cluster.bootstrap_servers());
        // Consumers only: producers warn about properties that are not theirs.
        log.consumer_options
            .push(("fetch.wait.max.ms".to_owned(), "5".to_owned()));
        log
    }

    /// Sets a librdkafka property on every client this log creates (e.g. security settings,
    /// `message.timeout.ms`, `session.timeout.ms`). Settings the guarantees rest on (`acks`,
    /// idempotence, the partitioner, manual offset commits) cannot be overridden.
    pub fn with_option(mut self, key: &str, value: &str) -> Self {
        self.options.push((key.to_owned(), value.to_owned()));
        // Clients created from now on must see the option.
        self.admin = Arc::new(Mutex::new(None));
        self
    }

    /// How long a blocking broker operation (metadata, commit, seek, lag, leaving the group)
    /// may take before it fails with [`Error::Transient`]. 30 s by default.
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// The brokers, as given to librdkafka.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The configuration shared by every client: brokers, then defaults, then the caller's
    /// options, then `required`.
    fn config(&self, defaults: &[(&str, &str)], required: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        config.set("client.id", "sluice");
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.options {
            config.set(key, value);
        }
        for (key, value) in required {
            if let Some(given) = config.get(key).filter(|given| given != value) {
                tracing::warn!(key, given, forced = value, "ignoring Kafka option");
            }
            config.set(*key, *value);
        }
        config
    }

    fn admin(&self) -> Result<Arc<AdminClient<DefaultClientContext>>> {
        let mut admin = lock(&self.admin);
        if let Some(client) = admin.as_ref() {
            return Ok(client.clone());
        }
        let client: AdminClient<DefaultClientContext> = self
            .config(&[], &[("allow.auto.create.topics", "false")])
            .create()
            .map_err(|e| kafka_error("create the Kafka admin client", None, e))?;
        let client = Arc::new(client);
        *admin = Some(client.clone());
        Ok(client)
    }
}

impl Log for KafkaLog {
    type Producer = KafkaProducer;
    type Consumer = KafkaConsumer;

    async fn create_topic(&self, spec: &TopicSpec) -> Result<()> {
        let partitions = i32::try_from(spec.partitions)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                Error::Fatal(format!(
                    "topic {:?}: cannot create {} partitions",
                    spec.name, spec.partitions
                ))
            })?;
        let retention_ms = spec.retention.map(|r| r.as_millis().to_string());
        let retention_bytes = spec.retention_bytes.map(|b| b.to_string());
        // -1: the brokers' default replication factor (needs Kafka 2.4+).
        let mut topic = NewTopic::new(&spec.name, partitions, TopicReplication::Fixed(-1));
        if let Some(ms) = &retention_ms {
            topic = topic.set("retention.ms", ms);
        }
        if let Some(bytes) = &retention_bytes {
            topic = topic.set("retention.bytes", bytes);
        }
        let options = AdminOptions::new()
            .request_timeout(Some(self.operation_timeout))
            .operation_timeout(Some(self.operation_timeout));
        let admin = self.admin()?;
        let what = format!("create topic {:?}", spec.name);
        let results = tokio::time::timeout(
            self.operation_timeout + Duration::from_secs(1),
            admin.create_topics([&topic], &options),
        )
        .await
        .map_err(|_| timed_out(&what, self.operation_timeout))?
        .map_err(|e| kafka_error(&what, Some(&spec.name), e))?;
        for result in results {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    let existing = self.partitions(&spec.name).await?;
                    if existing != spec.partitions {
                        return Err(Error::Fatal(format!(
                            "topic {:?} exists with {existing} partitions, not {}",
                            spec.name, spec.partitions
                        )));
                    }
                }
                Err((_, code)) => {
                    return Err(code_error(&what, Some(&spec.name), code, &code.to_string()));
                }
            }
        }
        Ok(())
    }

    async fn partitions(&self, topic: &str) -> Result<u32> {
        let admin = self.admin()?;
        let timeout = self.operation_timeout;
        let owned_topic = topic.to_owned();
        // A metadata request blocks for up to `timeout`; keep it off the async workers.
        let metadata = tokio::task::spawn_blocking(move || {
            admin.inner().fetch_metadata(Some(&owned_topic), timeout)
        })
        .await
        .map_err(|e| Error::Fatal(format!("metadata task of topic {topic:?} failed: {e}")))?
        .map_err(|e| kafka_error(&format!("read metadata of topic {topic:?}"), Some(topic), e))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| Error::UnknownTopic(topic.to_owned()))?;
        if let Some(err) = found.error() {
            let code = RDKafkaErrorCode::from(err);
            return Err(code_error(
                &format!("read metadata of topic {topic:?}"),
                Some(topic),
                code,
                &code.to_string(),
            ));
        }
        match u32::try_from(found.partitions().len()) {
            Ok(0) | Err(_) => Err(Error::Transient(format!(
                "topic {topic:?} has no partitions in the metadata yet"
            ))),
            Ok(n) => Ok(n),
        }
    }

    fn producer(&self) -> Result<KafkaProducer> {
        let producer = self
            .config(PRODUCER_DEFAULTS, PRODUCER_REQUIRED)
            .create()
            .map_err(|e| kafka_error("create the Kafka producer", None, e))?;
        Ok(KafkaProducer { producer })
    }

    fn consumer(&self, group: &str, topics: &[&str]) -> Result<KafkaConsumer> {
        KafkaConsumer::start(self, group, topics)
    }
}

/// Produces to Kafka: idempotent, `acks=all`, keys partitioned like Kafka's Java client.
#[derive(Clone)]
pub struct KafkaProducer {
    producer: FutureProducer,
}

impl fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProducer").finish_non_exhaustive()
    }
}

impl Producer for KafkaProducer {
    async fn send(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Delivered>> {
        let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(records.len());
        let mut enqueue_error = None;
        for record in &records {
            match self.enqueue(topic, record).await {
                Ok(delivery) => pending.push(delivery),
                Err(e) => {
                    enqueue_error = Some(e);
                    break;
                }
            }
        }
        // Await everything already enqueued even after an error, so nothing of this call is
        // still in flight when it returns (a caller's retry then cannot race it).
        let results = futures::future::join_all(pending).await;
        if let Some(e) = enqueue_error {
            return Err(e);
        }
        let mut delivered = Vec::with_capacity(results.len());
        let mut failures = 0usize;
        let mut first_error = None;
        for result in results {
            let outcome = match result {
                Ok(Ok(delivery)) => Ok(Delivered {
                    partition: delivery.partition,
                    offset: delivery.offset,
                }),
                Ok(Err((e, _))) => Err(kafka_error(
                    &format!("deliver to topic {topic:?}"),
                    Some(topic),
                    e,
                )),
                Err(_canceled) => Err(Error::Transient(format!(
                    "producer shut down before delivery to topic {topic:?} was confirmed"
                ))),
            };
            match outcome {
                Ok(d) => delivered.push(d),
                Err(e) => {
                    failures += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(delivered),
            Some(e) => {
                tracing::warn!(
                    topic,
                    failed = failures,
                    total = records.len(),
                    error = %e,
                    "Kafka delivery failed"
                );
                Err(e)
            }
        }
    }
}

impl KafkaProducer {
    /// Hands one record to librdkafka, waiting while its queue is full (never dropping it).
    async fn enqueue(&self, topic: &str, record: &Record) -> Result<DeliveryFuture> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for header in &record.headers {
            headers = headers.insert(KafkaHeader {
                key: &header.key,
                value: Some(&header.value),
            });
        }
        let mut future_record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&record.value)
            .headers(headers);
        if let Some(key) = &record.key {
            future_record = future_record.key(key);
        }
        if let Some(timestamp) = record.timestamp_ms {
            future_record = future_record.timestamp(timestamp);
        }
        loop {
            match self.producer.send_result(future_record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    future_record = back;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((e, _)) => {
                    return Err(kafka_error(
                        &format!("produce to topic {topic:?}"),
                        Some(topic),
                        e,
                    ));
                }
            }
        }
    }
}

/// A member of a Kafka consumer group.
///
/// The librdkafka consumer lives on a dedicated thread; every blocking operation is a job for
/// that thread, so rebalances (which run inside librdkafka's poll) happen there too. Offsets
/// given to [`Consumer::store`] are kept here, not in librdkafka, and committed explicitly.
pub struct KafkaConsumer {
    group: String,
    /// For calls that only flip local state (pause, resume). Dropped before `jobs`, so the
    /// consumer thread holds the last reference and the (possibly slow) destroy runs there.
    consumer: Option<Arc<GroupConsumer>>,
    jobs: Option<SyncSender<Job>>,
    state: Arc<GroupState>,
    /// A poll whose caller stopped waiting; its messages go to the next `poll` rather than
    /// being lost (librdkafka's fetch position is already past them).
    inflight_poll: Option<oneshot::Receiver<Result<PolledBatch>>>,
    /// Polled messages not handed out yet (a cancelled poll, or more than `max`), all from
    /// assignment generation `buffered_generation`.
    buffered: VecDeque<Message>,
    buffered_generation: u64,
    /// Partitions paused by the caller: their buffered messages wait for `resume`.
    paused: BTreeSet<TopicPartition>,
    /// Fires when the consumer thread has left the group and destroyed the consumer.
    stopped: Option<oneshot::Receiver<()>>,
    operation_timeout: Duration,
}

type GroupConsumer = BaseConsumer<GroupContext>;
type Job = Box<dyn FnOnce(&GroupConsumer) + Send>;

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("group", &self.group)
            .field("assignment", &self.state.offsets().assigned)
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    fn start(log: &KafkaLog, group: &str, topics: &[&str]) -> Result<KafkaConsumer> {
        let mut config = log.config(&[], &[]);
        for (key, value) in &log.consumer_options {
            config.set(key, value);
        }
        for (key, value) in CONSUMER_REQUIRED {
            config.set(*key, *value);
        }
        config.set("group.id", group);
        let state = Arc::new(GroupState {
            group: group.to_owned(),
            offsets: Mutex::new(GroupOffsets::default()),
        });
        let consumer: GroupConsumer = config
            .create_with_context(GroupContext(state.clone()))
            .map_err(|e| kafka_error(&format!("create a consumer of group {group:?}"), None, e))?;
        consumer.subscribe(topics).map_err(|e| {
            kafka_error(&format!("subscribe group {group:?} to {topics:?}"), None, e)
        })?;
        let consumer = Arc::new(consumer);
        let (jobs, job_queue) = mpsc::sync_channel(CONSUMER_JOB_QUEUE);
        let (stopped_tx, stopped) = oneshot::channel();
        let drain = log.operation_timeout;
        let thread_consumer = consumer.clone();
        thread::Builder::new()
            .name(format!("kafka-consumer-{group}"))
            .spawn(move || run_consumer(thread_consumer, job_queue, drain, stopped_tx))
            .map_err(|e| Error::Fatal(format!("cannot start the consumer thread: {e}")))?;
        Ok(KafkaConsumer {
            group: group.to_owned(),
            consumer: Some(consumer),
            jobs: Some(jobs),
            state,
            inflight_poll: None,
            buffered: VecDeque::new(),
            buffered_generation: 0,
            paused: BTreeSet::new(),
            stopped: Some(stopped),
            operation_timeout: log.operation_timeout,
        })
    }

    /// Queues `f` on the consumer thread and returns where its result will arrive.
    fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&GroupConsumer) -> Result<T> + Send + 'static,
    ) -> Result<oneshot::Receiver<Result<T>>> {
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| Error::Fatal(format!("consumer of group {:?} is closed", self.group)))?;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |consumer| {
            // The caller may have stopped waiting; then there is nobody to tell.
            let _ = tx.send(f(consumer));
        });
        match jobs.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(Error::Transient(format!(
                "consumer of group {:?} is busy: earlier operations have not finished",
                self.group
            ))),
            Err(TrySendError::Disconnected(_)) => Err(Error::Fatal(format!(
                "consumer thread of group {:?} has stopped",
                self.group
            ))),
        }
    }

    /// Runs `f` on the consumer thread, waiting at most `wait` for it.
    fn call<T: Send + 'static>(
        &self,
        what: String,
        wait: Duration,
        f: impl FnOnce(&GroupConsumer) -> Result<T> + Send + 'static,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        let submitted = self.submit(f);
        let group = self.group.clone();
        async move {
            let rx = submitted?;
            match tokio::time::timeout(wait, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(Error::Fatal(format!(
                    "consumer thread of group {group:?} stopped during {what}"
                ))),
                Err(_) => Err(timed_out(&what, wait)),
            }
        }
    }

    fn check_assigned(&self, partition: &TopicPartition) -> Result<()> {
        if self.state.offsets().assigned.contains(partition) {
            Ok(())
        } else {
            Err(Error::NotAssigned(partition.clone()))
        }
    }
}

impl Consumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let ready = self.take_buffered(max);
        if !ready.is_empty() {
            return Ok(ready);
        }
        if self.inflight_poll.is_none() {
            self.inflight_poll = Some(self.submit(move |c| poll_batch(c, max, timeout))?);
        }
        // The job itself stops after `timeout`; the margin covers jobs queued before it.
        let wait = timeout.min(MAX_POLL_WAIT) + self.operation_timeout;
        self.await_inflight_poll(wait).await?;
        Ok(self.take_buffered(max))
    }

    fn store(&mut self, partition: &TopicPartition, next: Offset) -> Result<()> {
        if next < 0 {
            return Err(Error::Fatal(format!(
                "cannot store offset {next} for {partition}"
            )));
        }
        let mut offsets = self.state.offsets();
        if !offsets.assigned.contains(partition) {
            return Err(Error::NotAssigned(partition.clone()));
        }
        offsets.stored.insert(partition.clone(), next);
        Ok(())
    }

    async fn commit(&mut self) -> Result<()> {
        let pending = self.state.offsets().uncommitted();
        if pending.is_empty() {
            return Ok(());
        }
        let list = partition_list(&pending)?;
        let group = self.group.clone();
        self.call(
            format!("commit of group {group:?}"),
            self.operation_timeout,
            move |consumer| {
                consumer.commit(&list, CommitMode::Sync).map_err(|e| {
                    kafka_error(&format!("commit offsets of group {group:?}"), None, e)
                })
            },
        )
        .await?;
        self.state.offsets().mark_committed(&pending);
        Ok(())
    }

    async fn seek(&mut self, partition: &TopicPartition, to: SeekTo) -> Result<()> {
        self.check_assigned(partition)?;
        // Messages polled before the seek must not be returned after it.
        self.await_inflight_poll(self.operation_timeout).await?;
        self.buffered
            .retain(|m| m.partition != partition.partition || m.topic != partition.topic);
        let tp = partition.clone();
        let timeout = self.operation_timeout;
        self.call(format!("seek of {tp}"), timeout * 2, move |consumer| {
            let offset = match to {
                SeekTo::Offset(offset) if offset >= 0 => KafkaOffset::Offset(offset),
                SeekTo::Offset(offset) => {
                    return Err(Error::Fatal(format!("cannot seek {tp} to offset {offset}")));
                }
                SeekTo::Beginning => KafkaOffset::Beginning,
                SeekTo::End => KafkaOffset::End,
                SeekTo::Timestamp(ms) => offset_for_time(consumer, &tp, ms, timeout)?,
            };
            consumer
                .seek(&tp.topic, tp.partition, offset, timeout)
                .map_err(|e| kafka_error(&format!("seek {tp} to {to:?}"), Some(&tp.topic), e))
        })
        .await
    }

    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<()> {
        for partition in partitions {
            self.check_assigned(partition)?;
        }
        self.pause_or_resume(partitions, true)?;
        self.paused.extend(partitions.iter().cloned());
        Ok(())
    }

    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<()> {
        for partition in partitions {
            self.check_assigned(partition)?;
        }
        self.pause_or_resume(partitions, false)?;
        for partition in partitions {
            self.paused.remove(partition);
        }
        Ok(())
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.state.offsets().assigned.iter().cloned().collect()
    }

    fn lag(&self) -> impl Future<Output = Result<Vec<PartitionLag>>> + Send {
        let assigned: Vec<TopicPartition> = self.assignment();
        let timeout = self.operation_timeout;
        let wait = timeout * (assigned.len() as u32 + 1);
        let group = self.group.clone();
        self.call(format!("lag of group {group:?}"), wait, move |consumer| {
            if assigned.is_empty() {
                return Ok(Vec::new());
            }
            let mut list = TopicPartitionList::with_capacity(assigned.len());
            for tp in &assigned {
                list.add_partition(&tp.topic, tp.partition);
            }
            let committed = consumer.committed_offsets(list, timeout).map_err(|e| {
                kafka_error(
                    &format!("read committed offsets of group {group:?}"),
                    None,
                    e,
                )
            })?;
            let mut lags = Vec::with_capacity(assigned.len());
            for tp in assigned {
                let committed =
                    committed
                        .find_partition(&tp.topic, tp.partition)
                        .and_then(|elem| match elem.offset() {
                            KafkaOffset::Offset(offset) => Some(offset),
                            _ => None,
                        });
                let (low, high) = consumer
                    .fetch_watermarks(&tp.topic, tp.partition, timeout)
                    .map_err(|e| {
                        kafka_error(&format!("read watermarks of {tp}"), Some(&tp.topic), e)
                    })?;
                // Without a commit the group starts at the oldest message kept.
                let lag = (high - committed.unwrap_or(low)).max(0);
                lags.push(PartitionLag {
                    partition: tp,
                    committed,
                    high_watermark: high,
                    lag,
                });
            }
            Ok(lags)
        })
    }

    async fn close(mut self) -> Result<()> {
        // A poll abandoned by its caller may still hold the consumer thread; its messages were
        // not stored, so the next owner of their partitions reads them again.
        if let Some(rx) = self.inflight_poll.take() {
            let _ = tokio::time::timeout(self.operation_timeout, rx).await;
        }
        let committed = self.commit().await;
        // Closing the job queue makes the thread unsubscribe (the revoke commits anything
        // stored since), leave the group, and destroy the consumer.
        self.consumer = None;
        self.jobs = None;
        if let Some(stopped) = self.stopped.take() {
            let wait = self.operation_timeout * 2;
            if tokio::time::timeout(wait, stopped).await.is_err() {
                // librdkafka may hang in destroy (rust-rdkafka issue 453); only the consumer's
                // own thread is stuck, and the group reassigns after the session timeout.
                tracing::warn!(
                    group = %self.group,
                    ?wait,
                    "Kafka consumer did not shut down in time; leaving it behind"
                );
            }
        }
        committed
    }
}

impl KafkaConsumer {
    /// Waits for a poll job still running (from a cancelled `poll`) and buffers its messages.
    async fn await_inflight_poll(&mut self, wait: Duration) -> Result<()> {
        let Some(rx) = self.inflight_poll.as_mut() else {
            return Ok(());
        };
        let received = match tokio::time::timeout(wait, rx).await {
            Ok(received) => received,
            // Keep the receiver: the batch is picked up later.
            Err(_) => return Err(timed_out("poll", wait)),
        };
        self.inflight_poll = None;
        let (generation, batch) = received.unwrap_or_else(|_| {
            Err(Error::Fatal(format!(
                "consumer thread of group {:?} stopped during poll",
                self.group
            )))
        })?;
        if generation != self.buffered_generation {
            self.buffered.clear();
            self.buffered_generation = generation;
        }
        self.buffered.extend(batch);
        Ok(())
    }

    /// Up to `max` buffered messages of partitions that are not paused, in order.
    fn take_buffered(&mut self, max: usize) -> Vec<Message> {
        let generation = self.state.offsets().generation;
        if generation != self.buffered_generation {
            // The assignment changed since: librdkafka reads revoked or reassigned partitions
            // again from the committed offset, so these copies would be stale or duplicates.
            self.buffered.clear();
            self.paused.clear();
            self.buffered_generation = generation;
        }
        if self.buffered.is_empty() {
            return Vec::new();
        }
        let mut ready = Vec::new();
        let mut kept = VecDeque::new();
        for message in self.buffered.drain(..) {
            let paused =
                !self.paused.is_empty() && self.paused.contains(&message.topic_partition());
            if ready.len() < max && !paused {
                ready.push(message);
            } else {
                kept.push_back(message);
            }
        }
        self.buffered = kept;
        ready
    }

    fn pause_or_resume(&self, partitions: &[TopicPartition], pause: bool) -> Result<()> {
        if partitions.is_empty() {
            return Ok(());
        }
        let consumer = self
            .consumer
            .as_ref()
            .ok_or_else(|| Error::Fatal(format!("consumer of group {:?} is closed", self.group)))?;
        let entries: Vec<_> = partitions.iter().map(|tp| (tp.clone(), None)).collect();
        let list = partition_list(&entries)?;
        // Only flips flags in librdkafka (thread-safe, no network), so no need to queue it
        // behind a running poll.
        let (what, result) = if pause {
            ("pause", consumer.pause(&list))
        } else {
            ("resume", consumer.resume(&list))
        };
        result.map_err(|e| kafka_error(&format!("{what} {partitions:?}"), None, e))
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        // Order matters: release our reference first so that the consumer thread, which sees
        // the closed job queue next, holds the last one and destroys the consumer off the
        // async runtime.
        self.consumer = None;
        self.jobs = None;
    }
}

/// Runs the jobs of one consumer until every handle is gone, then leaves the group.
fn run_consumer(
    consumer: Arc<GroupConsumer>,
    jobs: Receiver<Job>,
    drain: Duration,
    stopped: oneshot::Sender<()>,
) {
    for job in jobs.iter() {
        job(&consumer);
    }
    // Unsubscribing revokes the assignment inside the next polls; the revoke commits what was
    // stored. Messages polled here are dropped unstored, so the next owner reads them again.
    consumer.unsubscribe();
    let deadline = Instant::now() + drain;
    while !consumer.context().offsets().assigned.is_empty() && Instant::now() < deadline {
        let _ = consumer.poll(Duration::from_millis(100));
    }
    // With the assignment gone, dropping closes the consumer (LeaveGroup) and destroys it.
    drop(consumer);
    let _ = stopped.send(());
}

/// Messages polled in one job, with the assignment generation they belong to.
type PolledBatch = (u64, Vec<Message>);

/// Up to `max` messages, waiting at most `timeout` for the first.
fn poll_batch(consumer: &GroupConsumer, max: usize, timeout: Duration) -> Result<PolledBatch> {
    let deadline = Instant::now() + timeout.min(MAX_POLL_WAIT);
    let mut batch = Vec::new();
    let mut generation = consumer.context().offsets().generation;
    while batch.len() < max {
        let wait = if batch.is_empty() {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::ZERO
        };
        let polled = consumer.poll(wait);
        let now = consumer.context().offsets().generation;
        if now != generation {
            // A rebalance was served inside this poll: partitions kept or given back are read
            // again from their committed offset, so what was fetched before would be delivered
            // twice (or by two members).
            batch.clear();
            generation = now;
        }
        match polled {
            Some(Ok(message)) => batch.push(owned_message(&message)),
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                return Err(Error::Fatal(format!(
                    "consumer of group {:?} failed: {e}",
                    consumer.context().group
                )));
            }
            Some(Err(e)) => {
                // Broker outages and the like: librdkafka reconnects and refetches by itself,
                // and polling returning nothing is the right answer meanwhile.
                tracing::warn!(group = %consumer.context().group, error = %e, "Kafka consumer error");
            }
            // Nothing more right now, or a rebalance was served.
            None => {
                if !batch.is_empty() || Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    Ok((generation, batch))
}

fn owned_message(message: &BorrowedMessage<'_>) -> Message {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| Header {
                    key: h.key.to_owned(),
                    value: h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    Message {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
        // -1 is Kafka's "no timestamp" (only from pre-0.10 message formats).
        timestamp_ms: message.timestamp().to_millis().unwrap_or(-1),
    }
}

/// The offset of the first message of `tp` at or after `ms`; the end if there is none.
fn offset_for_time(
    consumer: &GroupConsumer,
    tp: &TopicPartition,
    ms: i64,
    timeout: Duration,
) -> Result<KafkaOffset> {
    let mut query = TopicPartitionList::with_capacity(1);
    // offsets_for_times takes the timestamp in the offset field.
    query
        .add_partition_offset(&tp.topic, tp.partition, KafkaOffset::Offset(ms))
        .map_err(|e| kafka_error(&format!("look up {tp} at {ms} ms"), Some(&tp.topic), e))?;
    let answer = consumer
        .offsets_for_times(query, timeout)
        .map_err(|e| kafka_error(&format!("look up {tp} at {ms} ms"), Some(&tp.topic), e))?;
    let elem = answer
        .find_partition(&tp.topic, tp.partition)
        .ok_or_else(|| Error::UnknownPartition(tp.clone()))?;
    elem.error()
        .map_err(|e| kafka_error(&format!("look up {tp} at {ms} ms"), Some(&tp.topic), e))?;
    Ok(match elem.offset() {
        KafkaOffset::Offset(offset) => KafkaOffset::Offset(offset),
        // No message that new: read what comes next.
        _ => KafkaOffset::End,
    })
}

fn partition_list(entries: &[(TopicPartition, Option<Offset>)]) -> Result<TopicPartitionList> {
    let mut list = TopicPartitionList::with_capacity(entries.len());
    for (tp, offset) in entries {
        match offset {
            Some(offset) => list
                .add_partition_offset(&tp.topic, tp.partition, KafkaOffset::Offset(*offset))
                .map_err(|e| kafka_error(&format!("offset {offset} of {tp}"), None, e))?,
            None => {
                list.add_partition(&tp.topic, tp.partition);
            }
        }
    }
    Ok(list)
}

/// Offsets and assignment of one consumer, shared by its handle and its rebalance callback.
struct GroupState {
    group: String,
    offsets: Mutex<GroupOffsets>,
}

impl GroupState {
    fn offsets(&self) -> MutexGuard<'_, GroupOffsets> {
        lock(&self.offsets)
    }
}

#[derive(Debug, Default)]
struct GroupOffsets {
    /// Changes whenever partitions are assigned or revoked.
    generation: u64,
    /// The partitions this member owns now.
    assigned: BTreeSet<TopicPartition>,
    /// Next offset to read, as stored by the caller.
    stored: BTreeMap<TopicPartition, Offset>,
    /// What this member last committed successfully.
    committed: BTreeMap<TopicPartition, Offset>,
}

impl GroupOffsets {
    fn uncommitted(&self) -> Vec<(TopicPartition, Option<Offset>)> {
        self.stored
            .iter()
            .filter(|(tp, offset)| self.committed.get(*tp) != Some(*offset))
            .map(|(tp, offset)| (tp.clone(), Some(*offset)))
            .collect()
    }

    fn mark_committed(&mut self, done: &[(TopicPartition, Option<Offset>)]) {
        for (tp, offset) in done {
            // A partition revoked meanwhile is no longer ours to track.
            if let (Some(offset), true) = (offset, self.assigned.contains(tp)) {
                self.committed.insert(tp.clone(), *offset);
            }
        }
    }
}

/// The context librdkafka holds; a newtype so the shared state can also live in the handle.
struct GroupContext(Arc<GroupState>);

impl std::ops::Deref for GroupContext {
    type Target = GroupState;
    fn deref(&self) -> &GroupState {
        &self.0
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let revoked: Vec<TopicPartition> = list
                    .elements()
                    .iter()
                    .map(|e| TopicPartition::new(e.topic(), e.partition()))
                    .collect();
                let pending: Vec<(TopicPartition, Option<Offset>)> = {
                    let mut offsets = self.offsets();
                    let pending = offsets
                        .uncommitted()
                        .into_iter()
                        .filter(|(tp, _)| revoked.contains(tp))
                        .collect();
                    offsets.generation += 1;
                    // From here on `store` refuses these partitions.
                    for tp in &revoked {
                        offsets.assigned.remove(tp);
                        offsets.stored.remove(tp);
                        offsets.committed.remove(tp);
                    }
                    pending
                };
                if pending.is_empty() {
                    return;
                }
                if consumer.assignment_lost() {
                    // Another member may own them already; its reads start at the last commit.
                    tracing::warn!(
                        group = %self.group,
                        partitions = pending.len(),
                        "assignment lost; stored offsets not committed, messages will be redelivered"
                    );
                    return;
                }
                let result = partition_list(&pending).and_then(|list| {
                    consumer.commit(&list, CommitMode::Sync).map_err(|e| {
                        kafka_error(
                            &format!("commit revoked partitions of group {:?}", self.group),
                            None,
                            e,
                        )
                    })
                });
                match result {
                    Ok(()) => tracing::debug!(
                        group = %self.group,
                        partitions = pending.len(),
                        "committed stored offsets of revoked partitions"
                    ),
                    // Nothing is lost: the new owner reads again from the last commit.
                    Err(e) => tracing::warn!(
                        group = %self.group,
                        error = %e,
                        "could not commit revoked partitions; their messages will be redelivered"
                    ),
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "Kafka rebalance error");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let mut offsets = self.offsets();
            offsets.generation += 1;
            for elem in list.elements() {
                let tp = TopicPartition::new(elem.topic(), elem.partition());
                // Reading starts at the group's committed offset; forget older local state.
                offsets.stored.remove(&tp);
                offsets.committed.remove(&tp);
                offsets.assigned.insert(tp);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent even if a holder panicked: every update is one insert
    // or remove.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn timed_out(what: &str, after: Duration) -> Error {
    Error::Transient(format!(
        "{what} did not complete within {after:?} (it may still take effect)"
    ))
}

/// What an rdkafka error means for the caller.
fn kafka_error(what: &str, topic: Option<&str>, err: KafkaError) -> Error {
    let message = err.to_string();
    match (&err, err.rdkafka_error_code()) {
        (KafkaError::MessageConsumptionFatal(_), _) => Error::Fatal(format!("{what}: {message}")),
        (KafkaError::AdminOp(code), _) => code_error(what, topic, *code, &message),
        (_, Some(code)) => code_error(what, topic, code, &message),
        // Seeks report librdkafka's text only; they fail on timeouts and state changes.
        (KafkaError::Seek(_), None) => Error::Transient(format!("{what}: {message}")),
        (KafkaError::Canceled, None) => {
            Error::Transient(format!("{what}: the Kafka client shut down"))
        }
        // Configuration, creation and argument errors: retrying does not help.
        (_, None) => Error::Fatal(format!("{what}: {message}")),
    }
}

fn code_error(what: &str, topic: Option<&str>, code: RDKafkaErrorCode, message: &str) -> Error {
    use RDKafkaErrorCode as C;
    match code {
        // The cluster is unreachable, electing, rebalancing or overloaded: try again later.
        C::BrokerTransportFailure
        | C::Resolve
        | C::MessageTimedOut
        | C::AllBrokersDown
        | C::OperationTimedOut
        | C::QueueFull
        | C::ISRInsufficient
        | C::NodeUpdate
        | C::WaitingForCoordinator
        | C::InProgress
        | C::PreviousInProgress
        | C::State
        | C::TimedOutQueue
        | C::WaitCache
        | C::Retry
        | C::PurgeQueue
        | C::PurgeInflight
        | C::AssignmentLost
        | C::Interrupted
        | C::BrokerDestroy
        | C::DestroyBroker
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::RequestTimedOut
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable
        | C::NetworkException
        | C::CoordinatorLoadInProgress
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::IllegalGeneration
        | C::UnknownMemberId
        | C::RebalanceInProgress
        | C::KafkaStorageError
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::OffsetNotAvailable
        | C::PreferredLeaderNotAvailable
        | C::EligibleLeadersNotAvailable
        | C::ThrottlingQuotaExceeded
        | C::UnstableOffsetCommit
        | C::ConcurrentTransactions
        | C::NotController
        | C::ReassignmentInProgress => Error::Transient(format!("{what}: {message}")),
        C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidMessageSize => {
            Error::TooLarge(format!("{what}: {message}"))
        }
        C::UnknownTopic | C::UnknownTopicOrPartition => match topic {
            Some(topic) => Error::UnknownTopic(topic.to_owned()),
            None => Error::Fatal(format!("{what}: {message}")),
        },
        // Misconfiguration, authorization, protocol and idempotence failures.
        _ => Error::Fatal(format!("{what}: {message}")),
    }
}
