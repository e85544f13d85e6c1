//! The HTTP ingest API: `POST /v1/events` with one event or a batch, JSON or Avro, behind API
//! keys with a per-key rate limit and size limits.
//!
//! It answers 202 only after the log acknowledged every accepted event, and 503 (never 202)
//! when it cannot persist. It checks shape and size; the ingest-validator stays the authority
//! on schemas. In a batch the valid events are written and the answer (400) lists the others
//! by index with their reason. An event without an id gets one derived from its bytes, so a
//! client that retries the same request gets the same ids and the store absorbs the copies.
//!
//! Bodies:
//! - `application/json`: an event object, or an array of them:
//!   `{event_id?, event_type, aggregate_id, occurred_at, payload, traceparent?, tracestate?}`.
//! - `application/vnd.sluice.avro`: one event in the Confluent wire format.
//! - `application/vnd.sluice.avro-batch`: wire-format events, each preceded by its length as a
//!   4-byte big-endian integer.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::DateTime;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::{Map, Value, json};
use sluice_core::{EventType, SLUICE_NAMESPACE, check_aggregate_id};
use sluice_log::{Header, Producer, Record};
use sluice_schemas::{EventCodec, SchemaSource};
use sluice_store::{ApiKey, Store};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use sluice_topology::HttpIngestConfig;

/// The processor's name in topologies and metrics.
pub const NAME: &str = "http-ingest";
/// Content type of one wire-format Avro event.
pub const AVRO: &str = "application/vnd.sluice.avro";
/// Content type of length-prefixed wire-format Avro events.
pub const AVRO_BATCH: &str = "application/vnd.sluice.avro-batch";
/// How long a verified (or refused) key is trusted before it is looked up again: a revoked
/// key stops working within this.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(10);

/// How the API runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The instance name, for logs.
    pub name: String,
    /// Limits and address.
    pub config: HttpIngestConfig,
    /// The raw topic written to.
    pub output: String,
}

impl Settings {
    /// Settings for an instance called `name` writing to `output`, with defaults elsewhere.
    pub fn new(name: &str, output: &str) -> Settings {
        Settings {
            name: name.to_owned(),
            config: HttpIngestConfig::default(),
            output: output.to_owned(),
        }
    }
}

/// What the API has answered, for progress lines and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests to `/v1/events`.
    pub requests: AtomicU64,
    /// Events written to the log.
    pub accepted: AtomicU64,
    /// Events refused with a reason (400).
    pub rejected: AtomicU64,
    /// Requests refused for their key (401, 403).
    pub unauthorized: AtomicU64,
    /// Requests refused for the rate limit (429).
    pub rate_limited: AtomicU64,
    /// Requests answered 503.
    pub unavailable: AtomicU64,
}

/// The API's state, shared by its requests.
pub struct Ingest<P, S> {
    settings: Settings,
    producer: P,
    codec: Arc<EventCodec<S>>,
    store: Store,
    keys: moka::future::Cache<String, Option<ApiKey>>,
    limiter: DefaultKeyedRateLimiter<String>,
    stats: Arc<Stats>,
}

impl<P, S> std::fmt::Debug for Ingest<P, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<P: Producer, S: SchemaSource + 'static> Ingest<P, S> {
    /// The API writing with `producer`, checking keys in `store`, decoding Avro with `codec`.
    pub fn new(
        settings: Settings,
        producer: P,
        store: Store,
        codec: Arc<EventCodec<S>>,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        let per_second = NonZeroU32::new(settings.config.rate_limit_per_key.max(1)).expect("≥ 1");
        // A burst as large as the largest batch, so a full batch is never refused for good.
        let burst = NonZeroU32::new(
            settings
                .config
                .rate_limit_per_key
                .max(settings.config.max_batch as u32)
                .max(1),
        )
        .expect("≥ 1");
        Arc::new(Ingest {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            keys: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(KEY_CACHE_TTL)
                .build(),
            settings,
            producer,
            codec,
            store,
            stats,
        })
    }

    /// The routes: `POST /v1/events`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/events", post(post_events::<P, S>))
            .with_state(self.clone())
    }
}

/// Serves `ingest` on `listener` until `shutdown` fires, then finishes the requests in hand.
pub async fn serve<P: Producer, S: SchemaSource + 'static>(
    ingest: &Arc<Ingest<P, S>>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, ingest.router())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// A refusal of the whole request.
fn refuse(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": reason.into() }))).into_response()
}

async fn post_events<P: Producer, S: SchemaSource + 'static>(
    State(app): State<Arc<Ingest<P, S>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    app.stats.requests.fetch_add(1, Ordering::Relaxed);
    let key = match app.authenticate(&headers).await {
        Ok(key) => key,
        Err(response) => return response,
    };
    let limit = app.settings.config.max_body_bytes;
    let too_large = || {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return too_large();
    }
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return too_large();
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let items = match content_type.as_deref() {
        None | Some("application/json") => match split_json(&bytes) {
            Ok(items) => items,
            Err(reason) => return refuse(StatusCode::BAD_REQUEST, reason),
        },
        Some(AVRO) => vec![Item::Avro(bytes.clone())],
        Some(AVRO_BATCH) => match split_avro_batch(&bytes) {
            Ok(items) => items,
            Err(reason) => return refuse(StatusCode::BAD_REQUEST, reason),
        },
        Some(other) => {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content type {other:?} is not application/json, {AVRO} or {AVRO_BATCH}"),
            );
        }
    };
    let max_batch = app.settings.config.max_batch;
    if items.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "the request holds no events");
    }
    if items.len() > max_batch {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a batch of {} events exceeds the limit of {max_batch}",
                items.len()
            ),
        );
    }
    if let Err(response) = app.admit(&key, items.len()) {
        return response;
    }
    let mut accepted = Vec::new();
    let mut records = Vec::new();
    let mut rejected = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match app.check(item).await {
            Ok((id, record)) => {
                accepted.push(id);
                records.push(record);
            }
            Err(reason) => rejected.push(json!({ "index": index, "reason": reason })),
        }
    }
    if !records.is_empty() {
        let timeout = app.settings.config.persist_timeout;
        let sent = tokio::time::timeout(timeout, app.producer.send(&app.settings.output, records));
        let failure = match sent.await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("the log did not acknowledge within {timeout:?}")),
        };
        if let Some(reason) = failure {
            app.stats.unavailable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(processor = %app.settings.name, error = %reason, "cannot persist a request");
            let mut response = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot persist the events, retry later: {reason}"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
    }
    app.stats
        .accepted
        .fetch_add(accepted.len() as u64, Ordering::Relaxed);
    app.stats
        .rejected
        .fetch_add(rejected.len() as u64, Ordering::Relaxed);
    if rejected.is_empty() {
        (
            StatusCode::ACCEPTED,
            axum::Json(json!({ "accepted": accepted })),
        )
            .into_response()
    } else {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "accepted": accepted, "rejected": rejected })),
        )
            .into_response()
    }
}

impl<P: Producer, S: SchemaSource + 'static> Ingest<P, S> {
    /// The request's key, or the 401/403/503 answer.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<ApiKey, Response> {
        let unauthorized = |reason: &str| {
            self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            let mut r = refuse(StatusCode::UNAUTHORIZED, reason);
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized("missing Authorization: Bearer <API key>"));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(unauthorized("Authorization must be Bearer <API key>"));
        };
        let store = self.store.clone();
        let owned = token.to_owned();
        let found = self
            .keys
            .try_get_with(
                owned.clone(),
                async move { store.verify_api_key(&owned).await },
            )
            .await;
        match found {
            Ok(Some(key)) if key.role.may_ingest() => Ok(key),
            Ok(Some(key)) => {
                self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
                Err(refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "key {} has role {}; sending events needs role device or admin",
                        key.id, key.role
                    ),
                ))
            }
            Ok(None) => Err(unauthorized("unknown or revoked API key")),
            Err(e) => {
                self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot check the API key, retry later: {e}"),
                ))
            }
        }
    }

    /// Takes `n` events from the key's allowance, or answers 429 with when to retry.
    #[allow(clippy::result_large_err)]
    fn admit(&self, key: &ApiKey, n: usize) -> Result<(), Response> {
        let n = NonZeroU32::new(n as u32).expect("a batch is not empty");
        let wait = match self.limiter.check_key_n(&key.id, n) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(not_until)) => not_until.wait_time_from(DefaultClock::default().now()),
            // Cannot happen: the burst is at least the largest batch.
            Err(_) => Duration::from_secs(1),
        };
        self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut r = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "key {} is over its limit of {} events/s; retry in {seconds} s",
                key.id, self.settings.config.rate_limit_per_key
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        Err(r)
    }

    /// The event's id and its record, or why it is refused.
    async fn check(&self, item: Item) -> Result<(Uuid, Record), String> {
        let max = self.settings.config.max_event_bytes;
        let source = Header {
            key: "source".to_owned(),
            value: b"http".to_vec(),
        };
        match item {
            Item::Json(value) => {
                let (id, device, bytes) = check_json(value)?;
                if bytes.len() > max {
                    return Err(format!(
                        "event is {} bytes, over the limit of {max}",
                        bytes.len()
                    ));
                }
                Ok((
                    id,
                    Record {
                        key: Some(device.into_bytes()),
                        value: bytes,
                        headers: vec![source],
                        timestamp_ms: None,
                    },
                ))
            }
            Item::Avro(bytes) => {
                if bytes.len() > max {
                    return Err(format!(
                        "event is {} bytes, over the limit of {max}",
                        bytes.len()
                    ));
                }
                let event = self
                    .codec
                    .decode(&bytes)
                    .await
                    .map_err(|e| format!("not a wire-format Avro event: {e}"))?;
                Ok((
                    event.event_id,
                    Record {
                        key: Some(event.aggregate_id.into_bytes()),
                        value: bytes.to_vec(),
                        headers: vec![source],
                        timestamp_ms: None,
                    },
                ))
            }
        }
    }
}

/// One event of a request, not yet checked.
#[derive(Debug)]
enum Item {
    Json(Value),
    Avro(Bytes),
}

fn split_json(bytes: &[u8]) -> Result<Vec<Item>, String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Array(events)) => Ok(events.into_iter().map(Item::Json).collect()),
        Ok(event @ Value::Object(_)) => Ok(vec![Item::Json(event)]),
        Ok(_) => Err("the body must be an event object or an array of events".to_owned()),
        Err(e) => Err(format!("the body is not JSON: {e}")),
    }
}

fn split_avro_batch(mut bytes: &[u8]) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    while !bytes.is_empty() {
        let Some((len, rest)) = bytes.split_first_chunk::<4>() else {
            return Err(format!("event {}: truncated length prefix", items.len()));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return Err(format!(
                "event {}: length {len} runs past the end of the body",
                items.len()
            ));
        }
        items.push(Item::Avro(Bytes::copy_from_slice(&rest[..len])));
        bytes = &rest[len..];
    }
    Ok(items)
}

/// Checks a JSON event's shape and returns its id, its device and the bytes to write (with
/// the id filled in).
fn check_json(value: Value) -> Result<(Uuid, String, Vec<u8>), String> {
    let Value::Object(mut doc) = value else {
        return Err("an event must be a JSON object".to_owned());
    };
    let text = |doc: &Map<String, Value>, field: &str, required: bool| match doc.get(field) {
        None | Some(Value::Null) if required => Err(format!("{field} is required")),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("{field} must be a string, got {other}")),
    };
    let event_type = text(&doc, "event_type", true)?.expect("required");
    EventType::new(event_type).map_err(|e| e.to_string())?;
    let device = text(&doc, "aggregate_id", true)?.expect("required");
    check_aggregate_id(&device).map_err(|e| e.to_string())?;
    let occurred_at = text(&doc, "occurred_at", true)?.expect("required");
    DateTime::parse_from_rfc3339(&occurred_at)
        .map_err(|e| format!("occurred_at {occurred_at:?} is not RFC 3339: {e}"))?;
    match doc.get("payload") {
        Some(Value::Object(_)) => {}
        None | Some(Value::Null) => return Err("payload is required".to_owned()),
        Some(other) => return Err(format!("payload must be an object, got {other}")),
    }
    text(&doc, "traceparent", false)?;
    text(&doc, "tracestate", false)?;
    let id = match text(&doc, "event_id", false)? {
        Some(id) => {
            Uuid::parse_str(&id).map_err(|e| format!("event_id {id:?} is not a UUID: {e}"))?
        }
        None => {
            // Same event, same id: a retried request is absorbed by the store.
            let bytes = serde_json::to_vec(&doc).expect("a JSON map serializes");
            let mut name = b"http\0".to_vec();
            name.extend_from_slice(&bytes);
            let id = Uuid::new_v5(&SLUICE_NAMESPACE, &name);
            doc.insert("event_id".to_owned(), Value::String(id.to_string()));
            id
        }
    };
    let bytes = serde_json::to_vec(&doc).expect("a JSON map serializes");
    Ok((id, device, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Value {
        json!({
            "event_type": "sensor.reading",
            "aggregate_id": "dev-1",
            "occurred_at": "2026-11-23T10:00:00Z",
            "payload": {"temperature_c": 20.5},
        })
    }

    #[test]
    fn an_event_without_id_gets_the_same_id_each_time() {
        let (a, device, bytes) = check_json(event()).unwrap();
        let (b, _, _) = check_json(event()).unwrap();
        assert_eq!(a, b);
        assert_eq!(device, "dev-1");
        let written: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(written["event_id"], a.to_string());
    }

    #[test]
    fn each_missing_or_wrong_field_is_named() {
        let cases = [
            ("event_type", Value::Null, "event_type is required"),
            ("event_type", json!("Bad Type"), "event type"),
            ("aggregate_id", json!(""), "aggregate"),
            ("occurred_at", json!("yesterday"), "RFC 3339"),
            ("payload", json!([1]), "payload must be an object"),
            ("event_id", json!("nope"), "not a UUID"),
        ];
        for (field, value, expected) in cases {
            let mut e = event();
            if value.is_null() {
                e.as_object_mut().unwrap().remove(field);
            } else {
                e[field] = value;
            }
            let reason = check_json(e).unwrap_err();
            assert!(
                reason.to_lowercase().contains(&expected.to_lowercase()),
                "{field}: {reason:?} should mention {expected:?}"
            );
        }
    }

    #[test]
    fn avro_batches_split_on_their_length_prefixes() {
        let mut body = Vec::new();
        for part in [&b"\0\0\0\0\x01ab"[..], b"\0\0\0\0\x02c"] {
            body.extend_from_slice(&(part.len() as u32).to_be_bytes());
            body.extend_from_slice(part);
        }
        let items = split_avro_batch(&body).unwrap();
        assert_eq!(items.len(), 2);
        body.push(0);
        assert!(split_avro_batch(&body).unwrap_err().contains("truncated"));
    }
}
