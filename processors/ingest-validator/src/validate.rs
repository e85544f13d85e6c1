//! One raw message in, a validated and enriched event (with its wire-format value) or a
//! rejection with a fixed error class out. No I/O beyond the schema registry.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::Value;
use sluice_core::{
    Event, EventType, Metadata, SLUICE_NAMESPACE, Source, TraceContext, check_aggregate_id,
};
use sluice_log::Message;
use sluice_schemas::{EventCodec, SchemaSource};
use sluice_topology::{FieldRange, IngestValidatorConfig};
use uuid::Uuid;

/// An event ready to append: the envelope and the bytes the relay will publish.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The enriched envelope.
    pub event: Event,
    /// Its wire-format value (latest schema of its subject).
    pub value: Vec<u8>,
}

/// Why a raw message was refused. `class` is a fixed code for metrics and DLQ filters.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    /// `too_large`, `invalid_json`, `bad_magic`, `unknown_schema`, `decode`, `missing_field`,
    /// `invalid_field`, `unknown_event_type`, `schema`, `timestamp` or `out_of_range`.
    pub class: &'static str,
    /// For the operator.
    pub message: String,
    /// The event id, when the message got that far.
    pub event_id: Option<Uuid>,
    /// The schema id of an Avro message.
    pub schema_id: Option<u32>,
}

/// What came of one message.
#[derive(Debug)]
pub enum Outcome {
    /// Valid: append it.
    Valid(Box<Validated>),
    /// Invalid: dead-letter it.
    Rejected(Reject),
    /// The registry could not be asked: retry later, do not dead-letter.
    Transient(String),
}

fn reject(class: &'static str, message: impl Into<String>) -> Outcome {
    Outcome::Rejected(Reject {
        class,
        message: message.into(),
        event_id: None,
        schema_id: None,
    })
}

/// Validates and enriches one raw message from `ingest.raw`, read at `now`.
pub async fn validate<S: SchemaSource>(
    msg: &Message,
    codec: &EventCodec<S>,
    config: &IngestValidatorConfig,
    now: DateTime<Utc>,
) -> Outcome {
    if msg.value.len() > config.max_payload_bytes {
        return reject(
            "too_large",
            format!(
                "message of {} bytes is over the limit of {} bytes",
                msg.value.len(),
                config.max_payload_bytes
            ),
        );
    }
    let mut schema_id = None;
    let mut event = match msg.value.first() {
        Some(0) => {
            schema_id = sluice_schemas::wire::unframe(&msg.value)
                .ok()
                .map(|(id, _)| id);
            match codec.decode(&msg.value).await {
                Ok(event) => event,
                Err(sluice_schemas::Error::Remote(e)) => return Outcome::Transient(e),
                Err(e @ sluice_schemas::Error::SchemaNotFound(_)) => {
                    return Outcome::Rejected(Reject {
                        class: "unknown_schema",
                        message: e.to_string(),
                        event_id: None,
                        schema_id,
                    });
                }
                Err(e) => {
                    return Outcome::Rejected(Reject {
                        class: "decode",
                        message: e.to_string(),
                        event_id: None,
                        schema_id,
                    });
                }
            }
        }
        Some(b'{') => match serde_json::from_slice::<Value>(&msg.value) {
            Ok(json) => match from_json(json, msg) {
                Ok(event) => event,
                Err(rejected) => return rejected,
            },
            Err(e) => return reject("invalid_json", format!("not valid JSON: {e}")),
        },
        Some(b) => {
            return reject(
                "bad_magic",
                format!(
                    "first byte 0x{b:02x} is neither a JSON object nor the wire format's magic byte 0"
                ),
            );
        }
        None => return reject("invalid_json", "empty message"),
    };
    let with_id = |class, message: String| {
        Outcome::Rejected(Reject {
            class,
            message,
            event_id: Some(event.event_id),
            schema_id,
        })
    };
    let ahead = event.occurred_at.signed_duration_since(now);
    if ahead.to_std().is_ok_and(|d| d > config.max_future) {
        return with_id(
            "timestamp",
            format!(
                "occurred_at {} is {} ahead of the validator's clock (limit {})",
                event.occurred_at.to_rfc3339(),
                human(ahead),
                humantime_like(config.max_future)
            ),
        );
    }
    let behind = now.signed_duration_since(event.occurred_at);
    if behind.to_std().is_ok_and(|d| d > config.max_past) {
        return with_id(
            "timestamp",
            format!(
                "occurred_at {} is {} behind the validator's clock (limit {})",
                event.occurred_at.to_rfc3339(),
                human(behind),
                humantime_like(config.max_past)
            ),
        );
    }
    if let Some(ranges) = config.ranges.get(event.event_type.as_str())
        && let Err(message) = check_ranges(&event.payload, ranges)
    {
        return with_id("out_of_range", message);
    }
    let latest = match codec.latest(event.event_type.subject()).await {
        Ok(latest) => latest,
        Err(sluice_schemas::Error::Remote(e)) => return Outcome::Transient(e),
        Err(sluice_schemas::Error::SubjectNotFound(_)) => {
            return with_id(
                "unknown_event_type",
                format!(
                    "no schema is registered for event type {}",
                    event.event_type
                ),
            );
        }
        Err(e) => return Outcome::Transient(e.to_string()),
    };
    event.ingested_at = now;
    event.metadata.schema_version = Some(latest.0.version);
    match codec.encode(&event).await {
        Ok((value, _)) => Outcome::Valid(Box::new(Validated { event, value })),
        Err(sluice_schemas::Error::Remote(e)) => Outcome::Transient(e),
        Err(e) => with_id("schema", e.to_string()),
    }
}

/// The JSON form the edge writes: `{event_id?, event_type, aggregate_id, occurred_at,
/// payload, traceparent?, tracestate?}`; the source comes from the record's `source` header.
fn from_json(json: Value, msg: &Message) -> Result<Event, Outcome> {
    let Value::Object(mut doc) = json else {
        return Err(reject("invalid_json", "not a JSON object"));
    };
    let mut text = |field: &str| match doc.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(reject(
            "invalid_field",
            format!("{field} must be a string, got {other}"),
        )),
    };
    let event_id = text("event_id")?;
    let event_type = text("event_type")?;
    let aggregate_id = text("aggregate_id")?;
    let occurred_at = text("occurred_at")?;
    let traceparent = text("traceparent")?;
    let tracestate = text("tracestate")?;
    let missing = |field: &str| reject("missing_field", format!("{field} is required"));
    let event_type = event_type.ok_or_else(|| missing("event_type"))?;
    let aggregate_id = aggregate_id.ok_or_else(|| missing("aggregate_id"))?;
    let occurred_at = occurred_at.ok_or_else(|| missing("occurred_at"))?;
    let payload = match doc.remove("payload") {
        None | Some(Value::Null) => return Err(missing("payload")),
        Some(p @ Value::Object(_)) => p,
        Some(other) => {
            return Err(reject(
                "invalid_field",
                format!("payload must be an object, got {other}"),
            ));
        }
    };
    let invalid = |e: &dyn std::fmt::Display| reject("invalid_field", e.to_string());
    let event_type = EventType::new(event_type).map_err(|e| invalid(&e))?;
    let occurred_at = DateTime::parse_from_rfc3339(&occurred_at)
        .map_err(|e| invalid(&format!("occurred_at {occurred_at:?} is not RFC 3339: {e}")))?
        .with_timezone(&Utc);
    check_aggregate_id(&aggregate_id).map_err(|e| invalid(&e))?;
    let event_id = match event_id {
        Some(id) => Uuid::parse_str(&id)
            .map_err(|e| invalid(&format!("event_id {id:?} is not a UUID: {e}")))?,
        // Derived from where the message sits, so a redelivery gets the same id; a dead
        // letter re-driven by an operator keeps the place it first had.
        None => Uuid::new_v5(&SLUICE_NAMESPACE, origin(msg).as_bytes()),
    };
    // Built directly rather than with `Event::new`, which draws a random id (a syscall per
    // event on the hot path) only to have it replaced; `ingested_at` is set by the caller.
    let mut event = Event {
        event_id,
        event_type,
        aggregate_id,
        occurred_at: occurred_at.trunc_subsecs(6),
        ingested_at: occurred_at.trunc_subsecs(6),
        payload,
        metadata: Metadata::from_source(source_of(msg)),
    };
    if let Some(traceparent) = traceparent {
        event.metadata.trace =
            Some(TraceContext::new(traceparent, tracestate).map_err(|e| invalid(&e))?);
    }
    Ok(event)
}

/// Header a DLQ re-drive sets to the record's first place, `<topic>:<partition>:<offset>`.
pub const DLQ_ORIGIN_HEADER: &str = "sluice-dlq-origin";

/// Where the record was first consumed: what an id is derived from when the device sent none.
fn origin(msg: &Message) -> String {
    let first = msg
        .headers
        .iter()
        .find(|h| h.key == DLQ_ORIGIN_HEADER)
        .and_then(|h| std::str::from_utf8(&h.value).ok());
    match first {
        Some(place) => format!("ingest:{place}"),
        None => format!("ingest:{}:{}:{}", msg.topic, msg.partition, msg.offset),
    }
}

fn source_of(msg: &Message) -> Source {
    let header = msg
        .headers
        .iter()
        .find(|h| h.key == "source")
        .map(|h| h.value.as_slice());
    match header {
        Some(b"mqtt") => Source::Mqtt,
        Some(b"simulator") => Source::Simulator,
        Some(b"replay") => Source::Replay,
        _ => Source::Http,
    }
}

fn check_ranges(payload: &Value, ranges: &BTreeMap<String, FieldRange>) -> Result<(), String> {
    for (field, range) in ranges {
        let Some(value) = payload.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let Some(x) = value.as_f64() else {
            return Err(format!("payload.{field} must be a number, got {value}"));
        };
        if range.min.is_some_and(|min| x < min) || range.max.is_some_and(|max| x > max) {
            return Err(format!(
                "payload.{field} = {x} is outside [{}, {}]",
                range.min.map_or("-inf".into(), |v| v.to_string()),
                range.max.map_or("+inf".into(), |v| v.to_string())
            ));
        }
    }
    Ok(())
}

fn human(d: chrono::TimeDelta) -> String {
    humantime_like(d.to_std().unwrap_or_default())
}

fn humantime_like(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7_200 => format!("{}m", s / 60),
        7_200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_accept_bounds_and_refuse_outside() {
        let ranges = BTreeMap::from([(
            "temperature_c".to_owned(),
            FieldRange {
                min: Some(-60.0),
                max: Some(150.0),
            },
        )]);
        assert!(check_ranges(&serde_json::json!({"temperature_c": 150.0}), &ranges).is_ok());
        assert!(check_ranges(&serde_json::json!({"humidity": 3}), &ranges).is_ok());
        let err = check_ranges(&serde_json::json!({"temperature_c": 151}), &ranges).unwrap_err();
        assert!(err.contains("outside [-60, 150]"), "{err}");
        assert!(check_ranges(&serde_json::json!({"temperature_c": "hot"}), &ranges).is_err());
    }
}
