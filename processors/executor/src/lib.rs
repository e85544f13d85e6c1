//! The executor's delivery core: turns one requested action into one signed webhook request
//! and a classified outcome for the action ledger.
//!
//! - [`sign`]: Standard Webhooks signatures (`webhook-id`, `webhook-timestamp`,
//!   `webhook-signature`) with a `whsec_` secret.
//! - [`guard`]: the destination policy (allowed hosts, no private addresses), enforced at DNS
//!   resolution, on literal addresses and on every redirect.
//! - [`breaker`]: a circuit breaker per endpoint.
//! - [`limit`]: global and per-endpoint rate limits.
//! - [`deliver`]: the HTTP client, one attempt, its classification, and the retry schedule.
//!
//! The executor is the only component that holds endpoint secrets. This crate must never log,
//! print or return a secret, never send a request to a destination the policy refuses, and
//! never retry on its own: the executor loop owns the schedule, the ledger and the DLQ.

pub mod breaker;
pub mod deliver;
pub mod guard;
pub mod limit;
pub mod run;
pub mod sign;

pub use breaker::{Admit, Breaker};
pub use deliver::{
    Attempt, Deliverer, ResolvedEndpoint, Status, backoff, resolve_endpoints,
    resolve_endpoints_with,
};
pub use guard::{Destinations, Refusal};
pub use limit::{Limits, Rate};
pub use run::{Outbound, RunError, Settings, Stats};
pub use sign::{Secret, SignedHeaders};

/// Errors of setting up delivery (startup errors); delivery outcomes are [`Attempt`]s.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The variable named by `secret_env` is not set.
    #[error(
        "endpoint `{endpoint}`: environment variable `{var}` (its secret_env) is not set; it \
         must hold the endpoint's `whsec_...` signing secret"
    )]
    MissingSecret {
        /// Endpoint name.
        endpoint: String,
        /// Variable name.
        var: String,
    },
    /// The variable named by `secret_env` does not hold a valid secret.
    #[error(
        "endpoint `{endpoint}`: environment variable `{var}` (its secret_env) does not hold a \
         valid signing secret: {reason}"
    )]
    InvalidSecret {
        /// Endpoint name.
        endpoint: String,
        /// Variable name.
        var: String,
        /// What is wrong (never the secret itself).
        reason: String,
    },
    /// The endpoint's URL does not parse.
    #[error("endpoint `{endpoint}`: `{url}` is not a valid URL: {reason}")]
    Url {
        /// Endpoint name.
        endpoint: String,
        /// The URL as configured.
        url: String,
        /// The parser's reason.
        reason: String,
    },
    /// The destination policy refuses the endpoint's URL.
    #[error("endpoint `{endpoint}`: {refusal}")]
    Destination {
        /// Endpoint name.
        endpoint: String,
        /// Why.
        refusal: Refusal,
    },
    /// Two endpoints have the same name.
    #[error("endpoint `{0}` is defined more than once")]
    DuplicateEndpoint(String),
    /// An `allow_hosts` entry is invalid.
    #[error(transparent)]
    AllowHosts(guard::BadHostPattern),
    /// The HTTP client could not be built (TLS backend initialisation).
    #[error("building the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// Several of the above, all reported at once.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Many(Vec<Error>),
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
