//! The shared vocabulary of Sluice: the event envelope, deterministic ids for derived events,
//! and the names every component agrees on.
//!
//! This crate must never do I/O (no network, no files, no clock reads outside
//! [`Event::new`]'s convenience constructor), so that every other crate can depend on it
//! without pulling in a runtime.

mod envelope;
mod ids;

pub use envelope::{
    Event, EventType, MAX_AGGREGATE_ID_LEN, Metadata, Replay, Source, TraceContext,
    check_aggregate_id,
};
pub use ids::{SLUICE_NAMESPACE, derived_event_id};

/// Errors from building or checking envelope values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// An event type must look like `sensor.reading`: lowercase dotted words.
    #[error(
        "invalid event type {0:?}: expected lowercase words joined by dots, like \"sensor.reading\""
    )]
    InvalidEventType(String),
    /// An aggregate id must be non-empty printable text of bounded length.
    #[error("invalid aggregate id {0:?}: {1}")]
    InvalidAggregateId(String, &'static str),
    /// A W3C `traceparent` that does not follow `00-<32 hex>-<16 hex>-<2 hex>`.
    #[error("invalid traceparent {0:?}: expected 00-<32 hex>-<16 hex>-<2 hex>")]
    InvalidTraceparent(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
