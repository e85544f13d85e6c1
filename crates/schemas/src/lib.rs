//! Avro schemas of Sluice's events: the schemas folder, evolution rules, JSON ↔ Avro conversion
//! (which is how payloads are validated), the Confluent wire format, a client for any
//! Confluent-compatible registry, and the registry subset Sluice serves itself.
//!
//! This crate must never guess a schema: every encoded value names the exact schema id it was
//! written with, and a value that does not match its schema is an error, never coerced.

pub mod codec;
pub mod compat;
pub mod convert;
pub mod dir;
pub mod http;
pub mod registry;
pub mod wire;

use std::path::PathBuf;

pub use codec::{EventCodec, decode_body, encode_body};
pub use compat::Compatibility;
pub use dir::{Problem, SchemaDir};
pub use registry::{AnySchemas, HttpRegistry, Registry, SchemaSource, SubjectVersion, VersionRef};

/// Errors of schemas, encoding and the registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bytes that are not a wire-format value.
    #[error("not a Sluice Kafka value: {0}")]
    Wire(String),
    /// Avro encoding or decoding failed.
    #[error("Avro: {0}")]
    Avro(String),
    /// Text that is not a valid Avro schema.
    #[error("invalid schema: {0}")]
    InvalidSchema(String),
    /// A payload that does not match its schema.
    #[error("{path}: {message}")]
    Payload {
        /// Where in the event, e.g. `$.payload.temperature_c`.
        path: String,
        /// What is wrong there.
        message: String,
    },
    /// A decoded record that is not a Sluice envelope.
    #[error("envelope: {0}")]
    Envelope(String),
    /// No such subject in the registry.
    #[error("subject {0:?} not found")]
    SubjectNotFound(String),
    /// No such version of a subject.
    #[error("version {version} of subject {subject:?} not found")]
    VersionNotFound {
        /// The subject.
        subject: String,
        /// The version asked for.
        version: u32,
    },
    /// No schema with this id.
    #[error("schema {0} not found")]
    SchemaNotFound(u32),
    /// The schema is not registered under the subject.
    #[error("schema not found under subject {0:?}")]
    SchemaNotInSubject(String),
    /// A subject name that cannot be used.
    #[error("invalid subject name {0:?}")]
    InvalidSubject(String),
    /// A registration refused by the subject's compatibility level.
    #[error("schema is incompatible with subject {subject:?} under {level}: {}", violations.join("; "))]
    Incompatible {
        /// The subject.
        subject: String,
        /// The level in force.
        level: Compatibility,
        /// Every violation found.
        violations: Vec<String>,
    },
    /// The registry's file could not be read or written.
    #[error("registry storage {}: {source}", path.display())]
    Storage {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The registry's file is not what the registry wrote.
    #[error("registry file {} is corrupt: {message}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What failed to parse.
        message: String,
    },
    /// A remote registry answered with an error or not at all.
    #[error("schema registry: {0}")]
    Remote(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
