//! The log: topics of partitioned, ordered messages with consumer-group offsets. One trait
//! ([`Log`]), two implementations: Kafka through rdkafka (`kafka://host:port,...`) and a durable
//! on-disk log for one process (`embedded://DIR`). Processors never see which one they run on.
//!
//! This crate must never acknowledge a produce before the message is durable (Kafka: `acks=all`
//! with the idempotent producer; embedded: written and fsynced), and never commit an offset the
//! caller did not store.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub mod bench;
pub mod embedded;
mod fsutil;
pub mod kafka;
pub mod partitioner;

pub use embedded::{EmbeddedLog, EmbeddedOptions};
pub use kafka::KafkaLog;
pub use partitioner::{murmur2, partition_for};

/// A partition number.
pub type Partition = i32;
/// A message offset within a partition.
pub type Offset = i64;

/// A message header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name, e.g. `traceparent`.
    pub key: String,
    /// Header value.
    pub value: Vec<u8>,
}

/// A message to produce.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Partitioning key; records with the same key land on the same partition (Kafka's
    /// murmur2, as Java clients do). Records without a key are spread over partitions.
    pub key: Option<Vec<u8>>,
    /// The payload.
    pub value: Vec<u8>,
    /// Headers, in order.
    pub headers: Vec<Header>,
    /// Milliseconds since the epoch; now when absent.
    pub timestamp_ms: Option<i64>,
}

/// Where a produced record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The partition.
    pub partition: Partition,
    /// The offset.
    pub offset: Offset,
}

/// A consumed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: Partition,
    /// The offset.
    pub offset: Offset,
    /// The key.
    pub key: Option<Vec<u8>>,
    /// The payload.
    pub value: Vec<u8>,
    /// Headers, in order.
    pub headers: Vec<Header>,
    /// Milliseconds since the epoch.
    pub timestamp_ms: i64,
}

impl Message {
    /// The message's topic and partition.
    pub fn topic_partition(&self) -> TopicPartition {
        TopicPartition::new(&self.topic, self.partition)
    }
}

/// A topic and one of its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: Partition,
}

impl TopicPartition {
    /// `topic`/`partition`.
    pub fn new(topic: &str, partition: Partition) -> Self {
        Self {
            topic: topic.to_owned(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// The name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
    /// Messages older than this may be deleted.
    pub retention: Option<Duration>,
    /// A partition larger than this may lose its oldest messages.
    pub retention_bytes: Option<u64>,
}

impl TopicSpec {
    /// A topic with `partitions` partitions and no retention limits.
    pub fn new(name: &str, partitions: u32) -> Self {
        Self {
            name: name.to_owned(),
            partitions,
            retention: None,
            retention_bytes: None,
        }
    }
}

/// Where a consumer should read a partition from next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTo {
    /// This offset.
    Offset(Offset),
    /// The first message with a timestamp at or after this (ms since the epoch).
    Timestamp(i64),
    /// The oldest message kept.
    Beginning,
    /// After the newest message.
    End,
}

/// How far a group is behind on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: TopicPartition,
    /// The group's committed offset (the next offset it will read), if any.
    pub committed: Option<Offset>,
    /// The offset the next produced message will get.
    pub high_watermark: Offset,
    /// Messages not yet committed by the group.
    pub lag: i64,
}

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A log URL that cannot be used.
    #[error("invalid log URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The topic does not exist.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// The partition does not exist.
    #[error("unknown partition {0}")]
    UnknownPartition(TopicPartition),
    /// The operation needs a partition this consumer is not assigned.
    #[error("partition {0} is not assigned to this consumer")]
    NotAssigned(TopicPartition),
    /// A record or header that the log cannot hold.
    #[error("record too large: {0}")]
    TooLarge(String),
    /// The broker or the disk failed; the operation may succeed if retried.
    #[error("transient log failure: {0}")]
    Transient(String),
    /// The log cannot go on (corrupt data, misconfiguration).
    #[error("log failure: {0}")]
    Fatal(String),
    /// An I/O error of the embedded log.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl Error {
    /// Whether retrying the same operation later may succeed (an outage, not a bug).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Transient(_) | Error::Io { .. })
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A log: creates topics and hands out producers and consumers.
pub trait Log: Send + Sync + 'static {
    /// The producer type.
    type Producer: Producer;
    /// The consumer type.
    type Consumer: Consumer;

    /// Creates a topic; creating one that exists with the same partition count is not an error.
    fn create_topic(&self, spec: &TopicSpec) -> impl Future<Output = Result<()>> + Send;
    /// The number of partitions of `topic`.
    fn partitions(&self, topic: &str) -> impl Future<Output = Result<u32>> + Send;
    /// A producer.
    fn producer(&self) -> Result<Self::Producer>;
    /// A consumer in `group`, subscribed to `topics`. Partitions are split among the group's
    /// members and move when members join or leave. A new group starts at the beginning.
    fn consumer(&self, group: &str, topics: &[&str]) -> Result<Self::Consumer>;
}

/// Writes records to topics.
pub trait Producer: Send + Sync + 'static {
    /// Produces `records` to `topic` and resolves once every one is durable, with where each
    /// went, in order. The partition comes from the key ([`partition_for`]). If it fails, some
    /// records may have been written (the caller retries; consumers dedupe on event id).
    fn send(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> impl Future<Output = Result<Vec<Delivered>>> + Send;
}

/// Reads a group's share of its topics, in order per partition.
///
/// Offsets follow Kafka's convention: the offset stored and committed for a partition is the
/// next one to read (the last processed message's offset + 1).
pub trait Consumer: Send + 'static {
    /// Up to `max` messages, waiting at most `timeout` for the first one. Empty on timeout.
    /// A rebalance happens inside `poll`: partitions taken away have their stored offsets
    /// committed first, and messages returned but not stored are delivered again to the new
    /// owner.
    fn poll(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Message>>> + Send;
    /// Marks everything before `next` on `partition` as processed; [`Consumer::commit`] makes
    /// it durable.
    fn store(&mut self, partition: &TopicPartition, next: Offset) -> Result<()>;
    /// Commits the stored offsets durably.
    fn commit(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// Moves the read position of an assigned partition.
    fn seek(
        &mut self,
        partition: &TopicPartition,
        to: SeekTo,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Stops returning messages of these partitions until resumed (backpressure).
    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<()>;
    /// Returns messages of these partitions again.
    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<()>;
    /// The partitions this consumer owns now.
    fn assignment(&self) -> Vec<TopicPartition>;
    /// Lag of the group on this consumer's partitions.
    fn lag(&self) -> impl Future<Output = Result<Vec<PartitionLag>>> + Send;
    /// Commits stored offsets and leaves the group, handing its partitions to the others.
    fn close(self) -> impl Future<Output = Result<()>> + Send;
}
