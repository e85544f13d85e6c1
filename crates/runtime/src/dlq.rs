//! Where poison messages go. The DLQ table comes with the store; the runtime only needs this
//! interface, and tests read [`MemoryDlq`].

use std::future::Future;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::BoxError;

/// A message a processor could not handle, with everything needed to inspect and re-drive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The processor instance.
    pub processor: String,
    /// The event id, when the message decoded.
    pub event_id: Option<Uuid>,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Schema id from the wire-format header, when there was one.
    pub schema_id: Option<u32>,
    /// The message value exactly as consumed.
    pub raw: Vec<u8>,
    /// The message key, so a re-drive lands on the same partition.
    pub key: Option<Vec<u8>>,
    /// The message headers, in order, so a re-drive carries them again.
    pub headers: Vec<(String, Vec<u8>)>,
    /// A short fixed code: `decode`, `output_schema`, or the processor's reason.
    pub error_class: &'static str,
    /// The human message.
    pub error_message: String,
    /// Attempts made before giving up.
    pub attempts: u32,
    /// When it was given up on.
    pub failed_at: DateTime<Utc>,
}

/// A message's headers as the DLQ keeps them.
pub fn header_pairs(headers: &[sluice_log::Header]) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect()
}

/// Stores dead letters durably.
pub trait DlqSink: Send + Sync {
    /// Stores one; an error means it was not stored (the runtime retries).
    fn put(&self, letter: DeadLetter) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// Dead letters in memory, for tests and dry runs.
#[derive(Debug, Default)]
pub struct MemoryDlq {
    letters: Mutex<Vec<DeadLetter>>,
}

impl MemoryDlq {
    /// Everything stored so far.
    pub fn letters(&self) -> Vec<DeadLetter> {
        self.letters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl DlqSink for MemoryDlq {
    async fn put(&self, letter: DeadLetter) -> Result<(), BoxError> {
        self.letters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(letter);
        Ok(())
    }
}
