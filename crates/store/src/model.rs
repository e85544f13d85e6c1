//! What goes into the store and what comes out of it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sluice_core::{Event, EventType};
use sluice_runtime::DeadLetter;
use uuid::Uuid;

/// One event to append, with the outbox message that publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendEvent {
    /// The event.
    pub event: Event,
    /// Topic the outbox relay publishes it to (usually `events.<type>`).
    pub topic: String,
    /// Message key: the aggregate id's bytes, so one device's events share a partition.
    pub key: Vec<u8>,
    /// Message value, already encoded (Confluent wire format).
    pub value: Vec<u8>,
}

/// A consumer group's position in one partition: the next offset to read (Kafka convention).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConsumerOffset {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Next offset to read; never negative.
    pub next_offset: i64,
}

/// A dead letter to store, with its decoded payload when the caller has one.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeadLetter {
    /// The dead letter.
    pub letter: DeadLetter,
    /// Decoded payload. When `None`, the raw bytes are stored decoded if they are JSON.
    pub decoded: Option<serde_json::Value>,
}

impl From<DeadLetter> for NewDeadLetter {
    fn from(letter: DeadLetter) -> Self {
        Self {
            letter,
            decoded: None,
        }
    }
}

/// Everything one input batch produces, written in one transaction: either all of it is
/// stored, or none of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppendBatch {
    /// Events, in order. An event whose id is already stored (or appears earlier in the batch)
    /// is skipped and reported, and gets no outbox entry.
    pub events: Vec<AppendEvent>,
    /// Rejects from the same input batch.
    pub dead_letters: Vec<NewDeadLetter>,
    /// Input offsets to commit with the writes (upserted; for the same group, topic and
    /// partition the last one wins).
    pub offsets: Vec<ConsumerOffset>,
}

/// An event the batch stored, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The event id.
    pub event_id: Uuid,
    /// Its global position.
    pub position: i64,
}

/// What an append did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Newly stored events, in batch order (positions increase in that order).
    pub appended: Vec<Appended>,
    /// Ids skipped as duplicates, in batch order (an id repeated in the batch is listed once
    /// per repetition).
    pub duplicates: Vec<Uuid>,
    /// Ids of the dead letters stored, in batch order.
    pub dead_letter_ids: Vec<i64>,
}

/// An event read back from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Global position. Assigned at append; not commit-ordered on Postgres (see docs/store.md).
    pub position: i64,
    /// The event, exactly as appended (timestamps at microsecond precision).
    pub event: Event,
}

/// Which events to read. Times are `ingested_at` (the partition key): `from` inclusive, `to`
/// exclusive. Results are ordered by position; page with `after_position`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventQuery {
    /// Earliest `ingested_at`, inclusive.
    pub from: Option<DateTime<Utc>>,
    /// Latest `ingested_at`, exclusive.
    pub to: Option<DateTime<Utc>>,
    /// Only these types (any type when empty).
    pub event_types: Vec<EventType>,
    /// Only these aggregates (any when empty).
    pub aggregate_ids: Vec<String>,
    /// Only positions greater than this.
    pub after_position: i64,
    /// At most this many.
    pub limit: u32,
}

impl Default for EventQuery {
    fn default() -> Self {
        Self {
            from: None,
            to: None,
            event_types: Vec::new(),
            aggregate_ids: Vec::new(),
            after_position: 0,
            limit: 1000,
        }
    }
}

/// One message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Outbox id: the relay publishes in this order.
    pub id: i64,
    /// The event it publishes.
    pub event_id: Uuid,
    /// The event's aggregate.
    pub aggregate_id: String,
    /// Destination topic.
    pub topic: String,
    /// Message key.
    pub key: Vec<u8>,
    /// Message value.
    pub value: Vec<u8>,
    /// Failed publish attempts so far.
    pub attempts: u32,
    /// The last publish error.
    pub last_error: Option<String>,
}

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DlqStatus {
    /// Waiting for an operator.
    Pending,
    /// Re-driven to its input topic.
    Replayed,
    /// Given up on by an operator.
    Discarded,
}

impl DlqStatus {
    /// The status as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            DlqStatus::Pending => "pending",
            DlqStatus::Replayed => "replayed",
            DlqStatus::Discarded => "discarded",
        }
    }
}

impl fmt::Display for DlqStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DlqStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(DlqStatus::Pending),
            "replayed" => Ok(DlqStatus::Replayed),
            "discarded" => Ok(DlqStatus::Discarded),
            _ => Err(format!(
                "unknown DLQ status {s:?}: expected pending, replayed or discarded"
            )),
        }
    }
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct DlqEntry {
    /// Id.
    pub dlq_id: i64,
    /// The processor that gave up.
    pub processor: String,
    /// The event id, when the message decoded.
    pub event_id: Option<Uuid>,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Schema id from the wire-format header.
    pub schema_id: Option<u32>,
    /// The message value exactly as consumed.
    pub raw: Vec<u8>,
    /// The message key.
    pub key: Option<Vec<u8>>,
    /// The message headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The payload decoded, when possible.
    pub decoded: Option<serde_json::Value>,
    /// Short fixed code (a metric label).
    pub error_class: String,
    /// Human message.
    pub error_message: String,
    /// When it was given up on (microsecond precision).
    pub failed_at: DateTime<Utc>,
    /// Attempts made.
    pub attempts: u32,
    /// Status.
    pub status: DlqStatus,
    /// Who last changed the status.
    pub status_changed_by: Option<String>,
    /// When the status was last changed.
    pub status_changed_at: Option<DateTime<Utc>>,
    /// Why it was discarded (or the note given with a re-drive).
    pub reason: Option<String>,
}

/// Which dead letters to list. Results are ordered by id; page with `after_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqFilter {
    /// Only this processor.
    pub processor: Option<String>,
    /// Only this error class.
    pub error_class: Option<String>,
    /// Only this status.
    pub status: Option<DlqStatus>,
    /// Failed at or after.
    pub since: Option<DateTime<Utc>>,
    /// Failed before.
    pub until: Option<DateTime<Utc>>,
    /// Only ids greater than this.
    pub after_id: i64,
    /// At most this many.
    pub limit: u32,
}

impl Default for DlqFilter {
    fn default() -> Self {
        Self {
            processor: None,
            error_class: None,
            status: None,
            since: None,
            until: None,
            after_id: 0,
            limit: 1000,
        }
    }
}

/// How many dead letters share a processor, error class and status.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DlqCount {
    /// Processor.
    pub processor: String,
    /// Error class.
    pub error_class: String,
    /// Status.
    pub status: DlqStatus,
    /// Count.
    pub count: u64,
}

/// A time partition of the event store (Postgres only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Table name.
    pub name: String,
    /// Range of `ingested_at` it holds, `[from, to)`; `None` for the default partition.
    pub range: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

/// What [`maintain`](crate::Store::maintain) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintainReport {
    /// Partitions created (Postgres).
    pub partitions_created: Vec<String>,
    /// Partitions dropped because everything in them is past retention (Postgres).
    pub partitions_dropped: Vec<String>,
    /// Events deleted row by row (SQLite; on Postgres, rows of the default partition).
    pub events_deleted: u64,
    /// Event ids forgotten by the duplicate check (Postgres's `event_ids`).
    pub event_ids_pruned: u64,
    /// Readings deleted row by row by [`maintain_readings`](crate::Store::maintain_readings)
    /// (SQLite; on Postgres, rows of the default partition).
    pub readings_deleted: u64,
    /// Anomalies deleted by [`maintain_readings`](crate::Store::maintain_readings) (both
    /// backends; row by row).
    pub anomalies_deleted: u64,
    /// Finished actions deleted by [`maintain`](crate::Store::maintain).
    pub actions_deleted: u64,
    /// Action ledger rows deleted by [`maintain`](crate::Store::maintain): those of the
    /// actions deleted, and any older than retention whose action is gone.
    pub action_ledger_deleted: u64,
}
