//! Events ↔ Kafka values: the envelope and its payload as one Avro record of the event type's
//! subject, framed in the Confluent wire format.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use chrono::DateTime;
use serde_json::{Value as Json, json};
use sluice_core::{Event, EventType, Metadata, TraceContext};

use crate::convert::{Names, avro_to_json, to_avro, write_avro, write_default};
use crate::registry::{SchemaSource, SubjectVersion};
use crate::{Error, Result, wire};

/// Encodes `event` with `schema` (the latest version of its subject, usually) into an Avro body.
/// The payload is checked against the schema on the way: this is the validation of a payload.
pub fn encode_body(event: &Event, schema: &Schema) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_event(event, schema, &Names::of(schema)?, &mut out)?;
    Ok(out)
}

/// Writes the Avro body of `event` under `schema` to `out`: the envelope fields, then the
/// payload, each checked as [`event_to_avro`] checks them (same errors), without building the
/// Avro value or copying the payload.
fn write_event(event: &Event, schema: &Schema, names: &Names, out: &mut Vec<u8>) -> Result<()> {
    let Schema::Record(r) = schema else {
        // Not an envelope record: the general path gives the error it always gave.
        return write_avro(&envelope(event), schema, names, &mut String::from("$"), out);
    };
    let envelope = envelope(event);
    let Json::Object(fields) = &envelope else {
        unreachable!("the envelope is an object")
    };
    let mut path = String::from("$");
    if let Some(unknown) = fields
        .keys()
        .map(String::as_str)
        .chain(["payload"])
        .find(|k| !r.lookup.contains_key(*k))
    {
        let known: Vec<&str> = r.fields.iter().map(|f| f.name.as_str()).collect();
        return Err(Error::Payload {
            path: format!("$.{unknown}"),
            message: format!("unknown field (known: {})", known.join(", ")),
        });
    }
    for field in &r.fields {
        let value = if field.name == "payload" {
            &event.payload
        } else if let Some(v) = fields.get(&field.name) {
            v
        } else {
            path.push('.');
            path.push_str(&field.name);
            match &field.default {
                Some(default) => write_default(default, &field.schema, names, &mut path, out)?,
                None => {
                    return Err(Error::Payload {
                        path,
                        message: "required field is missing".into(),
                    });
                }
            }
            path.truncate(1);
            continue;
        };
        path.push('.');
        path.push_str(&field.name);
        write_avro(value, &field.schema, names, &mut path, out)?;
        path.truncate(1);
    }
    Ok(())
}

/// The envelope fields of an event as JSON, without the payload.
fn envelope(event: &Event) -> Json {
    let m = &event.metadata;
    json!({
        "event_id": event.event_id.to_string(),
        "event_type": event.event_type.as_str(),
        "aggregate_id": event.aggregate_id,
        "occurred_at": event.occurred_at.timestamp_micros(),
        "ingested_at": event.ingested_at.timestamp_micros(),
        "metadata": {
            "source": m.source.to_string(),
            "traceparent": m.trace.as_ref().map(|t| t.traceparent.as_str()),
            "tracestate": m.trace.as_ref().and_then(|t| t.tracestate.as_deref()),
            "schema_version": m.schema_version,
            "causation_id": m.causation_id.map(|id| id.to_string()),
        },
    })
}

/// Decodes an Avro body written with `schema` into an event.
pub fn decode_body(mut body: &[u8], schema: &Schema) -> Result<Event> {
    let value = GenericDatumReader::builder(schema)
        .build()
        .and_then(|r| r.read_value(&mut body))
        .map_err(|e| Error::Avro(e.to_string()))?;
    if !body.is_empty() {
        return Err(Error::Avro(format!(
            "{} trailing bytes after the record",
            body.len()
        )));
    }
    avro_to_event(value)
}

/// The Avro record of an event under `schema`.
pub fn event_to_avro(event: &Event, schema: &Schema) -> Result<Value> {
    let mut envelope = envelope(event);
    envelope["payload"] = event.payload.clone();
    let names = Names::of(schema)?;
    to_avro(&envelope, schema, &names, &mut String::from("$"))
}

/// The event held in a decoded Avro record.
pub fn avro_to_event(value: Value) -> Result<Event> {
    let Value::Record(fields) = value else {
        return Err(Error::Envelope("the value is not a record".into()));
    };
    let mut fields: HashMap<String, Value> = fields.into_iter().collect();
    let mut take = |name: &str| {
        fields
            .remove(name)
            .ok_or_else(|| Error::Envelope(format!("missing envelope field {name}")))
    };
    let event_id = uuid(take("event_id")?, "event_id")?
        .ok_or_else(|| Error::Envelope("event_id is null".into()))?;
    let event_type = EventType::new(string(take("event_type")?, "event_type")?)
        .map_err(|e| Error::Envelope(e.to_string()))?;
    let aggregate_id = string(take("aggregate_id")?, "aggregate_id")?;
    let occurred_at = timestamp(take("occurred_at")?, "occurred_at")?;
    let ingested_at = timestamp(take("ingested_at")?, "ingested_at")?;
    let metadata = metadata(take("metadata")?)?;
    let payload = avro_to_json(&take("payload")?)?;
    Ok(Event {
        event_id,
        event_type,
        aggregate_id,
        occurred_at,
        ingested_at,
        payload,
        metadata,
    })
}

fn metadata(value: Value) -> Result<Metadata> {
    let Value::Record(fields) = value else {
        return Err(Error::Envelope("metadata is not a record".into()));
    };
    let mut source = None;
    let (mut traceparent, mut tracestate, mut schema_version, mut causation_id) =
        (None, None, None, None);
    for (name, value) in fields {
        let value = unwrap_union(value);
        match (name.as_str(), value) {
            ("source", v) => source = Some(string(v, "metadata.source")?),
            (_, Value::Null) => {}
            ("traceparent", v) => traceparent = Some(string(v, "metadata.traceparent")?),
            ("tracestate", v) => tracestate = Some(string(v, "metadata.tracestate")?),
            ("schema_version", Value::Int(v)) => {
                schema_version = Some(u32::try_from(v).map_err(|_| {
                    Error::Envelope(format!("metadata.schema_version {v} is negative"))
                })?)
            }
            ("causation_id", v) => causation_id = uuid(v, "metadata.causation_id")?,
            // Fields added by later metadata versions are carried by the schema, not the envelope.
            _ => {}
        }
    }
    let source = source
        .ok_or_else(|| Error::Envelope("missing metadata.source".into()))?
        .parse()
        .map_err(Error::Envelope)?;
    let trace = match traceparent {
        Some(tp) => {
            Some(TraceContext::new(tp, tracestate).map_err(|e| Error::Envelope(e.to_string()))?)
        }
        None => None,
    };
    Ok(Metadata {
        source,
        trace,
        schema_version,
        causation_id,
        replay: None,
    })
}

fn unwrap_union(value: Value) -> Value {
    match value {
        Value::Union(_, inner) => *inner,
        other => other,
    }
}

fn string(value: Value, field: &str) -> Result<String> {
    match unwrap_union(value) {
        Value::String(s) => Ok(s),
        other => Err(Error::Envelope(format!(
            "{field} is {other:?}, expected a string"
        ))),
    }
}

fn uuid(value: Value, field: &str) -> Result<Option<uuid::Uuid>> {
    match unwrap_union(value) {
        Value::Null => Ok(None),
        Value::Uuid(u) => Ok(Some(u)),
        Value::String(s) => uuid::Uuid::parse_str(&s)
            .map(Some)
            .map_err(|e| Error::Envelope(format!("{field}: invalid UUID {s:?}: {e}"))),
        other => Err(Error::Envelope(format!(
            "{field} is {other:?}, expected a UUID"
        ))),
    }
}

fn timestamp(value: Value, field: &str) -> Result<DateTime<chrono::Utc>> {
    let micros = match unwrap_union(value) {
        Value::TimestampMicros(t) | Value::Long(t) => t,
        Value::TimestampMillis(t) => t.saturating_mul(1000),
        other => {
            return Err(Error::Envelope(format!(
                "{field} is {other:?}, expected a timestamp"
            )));
        }
    };
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| Error::Envelope(format!("{field} {micros} µs is out of range")))
}

/// Encodes and decodes events in the wire format, with schemas from a registry (Sluice's own,
/// in process, or any Confluent-compatible one over HTTP). Schemas are cached: an id names one
/// schema forever, so a decode needs the registry once per id.
#[derive(Debug)]
pub struct EventCodec<S> {
    source: S,
    by_id: RwLock<HashMap<u32, Arc<Schema>>>,
    latest: RwLock<HashMap<String, Arc<(SubjectVersion, Schema)>>>,
    /// The named types of the schemas encoded with, by schema id.
    names: RwLock<HashMap<u32, Arc<Names>>>,
}

impl<S: SchemaSource> EventCodec<S> {
    /// A codec reading schemas from `source`.
    pub fn new(source: S) -> Self {
        Self {
            source,
            by_id: RwLock::default(),
            latest: RwLock::default(),
            names: RwLock::default(),
        }
    }

    /// The registry behind this codec.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Encodes `event` with the latest schema of its subject and stamps nothing: the payload must
    /// match that schema. Returns the framed bytes and the subject version used.
    pub async fn encode(&self, event: &Event) -> Result<(Vec<u8>, u32)> {
        let latest = self.latest(event.event_type.subject()).await?;
        let (version, schema) = (&latest.0, &latest.1);
        let cached = read(&self.names).get(&version.id).cloned();
        let names = match cached {
            Some(n) => n,
            None => {
                let n = Arc::new(Names::of(schema)?);
                write(&self.names).insert(version.id, n.clone());
                n
            }
        };
        let mut out = Vec::with_capacity(128);
        out.push(wire::MAGIC);
        out.extend_from_slice(&version.id.to_be_bytes());
        write_event(event, schema, &names, &mut out)?;
        Ok((out, version.version))
    }

    /// Decodes framed bytes with the writer's schema named by their id.
    pub async fn decode(&self, bytes: &[u8]) -> Result<Event> {
        let (id, body) = wire::unframe(bytes)?;
        let schema = self.schema_by_id(id).await?;
        decode_body(body, &schema)
    }

    /// The schema with registry id `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>> {
        if let Some(s) = read(&self.by_id).get(&id) {
            return Ok(s.clone());
        }
        let text = self.source.schema_by_id(id).await?;
        let schema = Arc::new(parse(&text)?);
        write(&self.by_id).insert(id, schema.clone());
        Ok(schema)
    }

    /// The latest version of `subject`, cached until [`EventCodec::forget_latest`].
    pub async fn latest(&self, subject: &str) -> Result<Arc<(SubjectVersion, Schema)>> {
        if let Some(l) = read(&self.latest).get(subject) {
            return Ok(l.clone());
        }
        let version = self.source.latest(subject).await?;
        let schema = parse(&version.schema)?;
        let entry = Arc::new((version, schema));
        write(&self.latest).insert(subject.to_owned(), entry.clone());
        Ok(entry)
    }

    /// Drops the cached latest versions, so the next encode picks up newly registered ones.
    pub fn forget_latest(&self) {
        write(&self.latest).clear();
    }
}

fn parse(text: &str) -> Result<Schema> {
    Schema::parse_str(text).map_err(|e| Error::InvalidSchema(e.to_string()))
}

// A poisoned cache lock only means another thread panicked mid-insert of a complete value.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}
