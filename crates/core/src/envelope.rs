//! The event envelope every Sluice component speaks.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::{Error, Result, derived_event_id};

/// Longest aggregate (device) id accepted; it is a Kafka key and an index column.
pub const MAX_AGGREGATE_ID_LEN: usize = 256;

/// One event: what happened (`event_type`, `payload`), to what (`aggregate_id`), when on the
/// device (`occurred_at`) and when Sluice took it in (`ingested_at`).
///
/// Timestamps carry microsecond precision, the precision of the Avro `timestamp-micros` and of
/// Postgres `timestamptz`, so an event survives every encoding unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Unique id: client-supplied, assigned at ingest, or derived (see [`derived_event_id`]).
    pub event_id: Uuid,
    /// What kind of event this is, e.g. `sensor.reading`; also names its schema subject.
    pub event_type: EventType,
    /// The device (or other aggregate) the event belongs to; the partition key.
    pub aggregate_id: String,
    /// Device time.
    pub occurred_at: DateTime<Utc>,
    /// Time Sluice accepted the event.
    pub ingested_at: DateTime<Utc>,
    /// The event body; its shape is given by the event type's schema.
    pub payload: serde_json::Value,
    /// Provenance and tracing.
    pub metadata: Metadata,
}

impl Event {
    /// A new event with a random id, ingested now.
    pub fn new(
        event_type: EventType,
        aggregate_id: impl Into<String>,
        occurred_at: DateTime<Utc>,
        payload: serde_json::Value,
        source: Source,
    ) -> Result<Self> {
        let aggregate_id = aggregate_id.into();
        check_aggregate_id(&aggregate_id)?;
        Ok(Self {
            event_id: Uuid::new_v4(),
            event_type,
            aggregate_id,
            occurred_at: occurred_at.trunc_subsecs(6),
            ingested_at: Utc::now().trunc_subsecs(6),
            payload,
            metadata: Metadata::from_source(source),
        })
    }

    /// An event derived from `self` by `step` (an inference, an action): its id is a function of
    /// this event's id and `step`, so replays and retries derive the same id. It keeps the
    /// aggregate, the device time and the trace of its cause.
    pub fn derive(
        &self,
        step: &str,
        event_type: EventType,
        payload: serde_json::Value,
        source: Source,
        ingested_at: DateTime<Utc>,
    ) -> Event {
        Event {
            event_id: derived_event_id(self.event_id, step),
            event_type,
            aggregate_id: self.aggregate_id.clone(),
            occurred_at: self.occurred_at,
            ingested_at: ingested_at.trunc_subsecs(6),
            payload,
            metadata: Metadata {
                source,
                trace: self.metadata.trace.clone(),
                schema_version: None,
                causation_id: Some(self.event_id),
                replay: self.metadata.replay.clone(),
            },
        }
    }
}

/// Checks an aggregate id: non-empty, bounded, no control characters (it ends up in keys, logs
/// and file names).
pub fn check_aggregate_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidAggregateId(id.to_owned(), "empty"));
    }
    if id.len() > MAX_AGGREGATE_ID_LEN {
        return Err(Error::InvalidAggregateId(
            id.chars().take(32).collect(),
            "longer than 256 bytes",
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::InvalidAggregateId(
            id.to_owned(),
            "contains control characters",
        ));
    }
    Ok(())
}

/// An event type such as `sensor.reading`: lowercase words of `[a-z0-9_]` joined by dots,
/// starting with a letter. It is also the schema subject of the event's Avro schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(String);

impl EventType {
    /// Readings from a device's sensors.
    pub const SENSOR_READING: &'static str = "sensor.reading";
    /// A device's connectivity and health.
    pub const DEVICE_STATUS: &'static str = "device.status";
    /// A model's score of an input event.
    pub const INFERENCE_RESULT: &'static str = "inference.result";
    /// An action the router asks the executor to carry out.
    pub const ACTION_REQUESTED: &'static str = "action.requested";
    /// The outcome of an action.
    pub const ACTION_RESULT: &'static str = "action.result";

    /// Parses and checks an event type.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let word_ok = |w: &str| {
            w.starts_with(|c: char| c.is_ascii_lowercase())
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if name.len() <= 128 && name.contains('.') && name.split('.').all(word_ok) {
            Ok(Self(name))
        } else {
            Err(Error::InvalidEventType(name))
        }
    }

    /// The type as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The schema subject holding this type's Avro schemas (the type's own name).
    pub fn subject(&self) -> &str {
        &self.0
    }

    /// The conventional topic the outbox relay publishes this type to: `events.<type>` with
    /// dots turned into dashes (`sensor.reading` → `events.sensor-reading`).
    pub fn default_topic(&self) -> String {
        format!("events.{}", self.0.replace('.', "-"))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for EventType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl Serialize for EventType {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// Provenance and tracing of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Where the event entered Sluice or which processor made it.
    pub source: Source,
    /// W3C trace context carried from the edge through every hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
    /// Version of the event type's schema the payload was written with, once validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<u32>,
    /// For a derived event, the id of the event it was derived from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Set when the event (or the event it derives from) was re-published by an operator's
    /// replay. Travels in record headers ([`Replay::headers`]), never in the stored body.
    #[serde(skip)]
    pub replay: Option<Replay>,
}

/// The mark of a replayed event: which job re-published it and which side effects it may
/// have. Derived events inherit it, so an inference scored from a replayed reading is a replay
/// too, and the action router suppresses its actions unless the job fires them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The replay job.
    pub job_id: String,
    /// Whether the action router requests actions as usual (the executor's dedup still
    /// stops anything delivered before); suppressed by default.
    pub fire_actions: bool,
    /// Whether the inferencer scores replayed readings again; skipped by default.
    pub rescore: bool,
}

impl Replay {
    /// Header naming the replay job.
    pub const JOB_HEADER: &'static str = "sluice-replay";
    /// Header saying what the router does: `fire` or `suppress`.
    pub const ACTIONS_HEADER: &'static str = "sluice-replay-actions";
    /// Header saying what the inferencer does: `rescore` or `skip`.
    pub const RESCORE_HEADER: &'static str = "sluice-replay-inference";

    /// The record headers that carry this mark.
    pub fn headers(&self) -> [(&'static str, Vec<u8>); 3] {
        [
            (Self::JOB_HEADER, self.job_id.clone().into_bytes()),
            (
                Self::ACTIONS_HEADER,
                if self.fire_actions {
                    "fire"
                } else {
                    "suppress"
                }
                .into(),
            ),
            (
                Self::RESCORE_HEADER,
                if self.rescore { "rescore" } else { "skip" }.into(),
            ),
        ]
    }

    /// The mark carried by `headers`, if any. Anything but an explicit `fire` / `rescore`
    /// means suppressed / skipped: a replay fails safe.
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Option<Replay> {
        let mut job = None;
        let mut fire_actions = false;
        let mut rescore = false;
        for (key, value) in headers {
            match key {
                Self::JOB_HEADER => job = Some(String::from_utf8_lossy(value).into_owned()),
                Self::ACTIONS_HEADER => fire_actions = value == b"fire",
                Self::RESCORE_HEADER => rescore = value == b"rescore",
                _ => {}
            }
        }
        job.map(|job_id| Replay {
            job_id,
            fire_actions,
            rescore,
        })
    }
}

impl Metadata {
    /// Metadata with only a source.
    pub fn from_source(source: Source) -> Self {
        Self {
            source,
            trace: None,
            schema_version: None,
            causation_id: None,
            replay: None,
        }
    }
}

/// Where an event came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// Through the MQTT bridge.
    Mqtt,
    /// Through the HTTP ingest API.
    Http,
    /// From `sluice simulate` or `sluice dev --simulate`.
    Simulator,
    /// Re-published from the event store by an operator's replay.
    Replay,
    /// Made by a processor, named.
    Processor(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Mqtt => f.write_str("mqtt"),
            Source::Http => f.write_str("http"),
            Source::Simulator => f.write_str("simulator"),
            Source::Replay => f.write_str("replay"),
            Source::Processor(name) => write!(f, "processor:{name}"),
        }
    }
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mqtt" => Ok(Source::Mqtt),
            "http" => Ok(Source::Http),
            "simulator" => Ok(Source::Simulator),
            "replay" => Ok(Source::Replay),
            _ => match s.strip_prefix("processor:") {
                Some(name) if !name.is_empty() => Ok(Source::Processor(name.to_owned())),
                _ => Err(format!(
                    "unknown source {s:?}: expected mqtt, http, simulator, replay or processor:<name>"
                )),
            },
        }
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// W3C trace context (`traceparent`, `tracestate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceContext {
    /// `00-<trace id>-<parent id>-<flags>`.
    pub traceparent: String,
    /// Vendor-specific state, passed through untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// Checks the `traceparent` shape; `tracestate` is passed through as is.
    pub fn new(traceparent: impl Into<String>, tracestate: Option<String>) -> Result<Self> {
        let traceparent = traceparent.into();
        let parts: Vec<&str> = traceparent.split('-').collect();
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        };
        let ok = parts.len() == 4
            && hex(parts[0], 2)
            && parts[0] != "ff"
            && hex(parts[1], 32)
            && parts[1] != "0".repeat(32)
            && hex(parts[2], 16)
            && parts[2] != "0".repeat(16)
            && hex(parts[3], 2);
        if ok {
            Ok(Self {
                traceparent,
                tracestate,
            })
        } else {
            Err(Error::InvalidTraceparent(traceparent))
        }
    }

    /// The 32-hex-digit trace id.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn reading() -> Event {
        Event::new(
            EventType::new("sensor.reading").unwrap(),
            "dev-1",
            Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap(),
            serde_json::json!({"temperature_c": 21.5}),
            Source::Mqtt,
        )
        .unwrap()
    }

    #[test]
    fn event_types_are_checked() {
        assert!(EventType::new("sensor.reading").is_ok());
        assert!(EventType::new("a.b_2.c").is_ok());
        for bad in [
            "",
            "sensor",
            "Sensor.reading",
            "sensor..reading",
            ".x",
            "x.",
            "a.2b",
            "a-b.c",
        ] {
            assert!(EventType::new(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn default_topic_follows_the_convention() {
        let t = EventType::new("sensor.reading").unwrap();
        assert_eq!(t.default_topic(), "events.sensor-reading");
    }

    #[test]
    fn aggregate_ids_are_checked() {
        assert!(check_aggregate_id("dev-1").is_ok());
        assert!(check_aggregate_id("").is_err());
        assert!(check_aggregate_id("a\nb").is_err());
        assert!(check_aggregate_id(&"x".repeat(257)).is_err());
    }

    #[test]
    fn derived_events_are_deterministic_and_keep_their_cause() {
        let input = reading();
        let t = EventType::new("inference.result").unwrap();
        let now = Utc::now();
        let a = input.derive(
            "inferencer/m@1",
            t.clone(),
            serde_json::json!({}),
            Source::Processor("inferencer".into()),
            now,
        );
        let b = input.derive(
            "inferencer/m@1",
            t,
            serde_json::json!({}),
            Source::Processor("inferencer".into()),
            now,
        );
        assert_eq!(a.event_id, b.event_id);
        assert_ne!(a.event_id, input.event_id);
        assert_eq!(a.metadata.causation_id, Some(input.event_id));
        assert_eq!(a.aggregate_id, input.aggregate_id);
    }

    #[test]
    fn traceparent_is_checked() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            TraceContext::new(ok, None).unwrap().trace_id(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(TraceContext::new("00-abc-def-01", None).is_err());
        assert!(TraceContext::new(ok.to_uppercase(), None).is_err());
        let zero = format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32));
        assert!(TraceContext::new(zero, None).is_err());
    }

    #[test]
    fn sources_round_trip_as_text() {
        for s in [
            Source::Mqtt,
            Source::Http,
            Source::Simulator,
            Source::Replay,
            Source::Processor("inferencer".into()),
        ] {
            assert_eq!(s.to_string().parse::<Source>().unwrap(), s);
        }
        assert!("processor:".parse::<Source>().is_err());
        assert!("ftp".parse::<Source>().is_err());
    }

    #[test]
    fn json_rejects_unknown_envelope_fields() {
        let mut v = serde_json::to_value(reading()).unwrap();
        v["colour"] = serde_json::json!("red");
        assert!(serde_json::from_value::<Event>(v).is_err());
    }

    proptest! {
        #[test]
        fn envelope_round_trips_through_json(
            id in any::<u128>(),
            dev in "[a-zA-Z0-9_:-]{1,40}",
            occurred in 0i64..4_102_444_800_000_000,
            ingested in 0i64..4_102_444_800_000_000,
            temp in -100.0f64..200.0,
            trace in proptest::option::of("[0-9a-f]{32}"),
            version in proptest::option::of(1u32..100),
        ) {
            let event = Event {
                event_id: Uuid::from_u128(id),
                event_type: EventType::new("sensor.reading").unwrap(),
                aggregate_id: dev,
                occurred_at: DateTime::from_timestamp_micros(occurred).unwrap(),
                ingested_at: DateTime::from_timestamp_micros(ingested).unwrap(),
                payload: serde_json::json!({"temperature_c": temp}),
                metadata: Metadata {
                    source: Source::Http,
                    trace: trace.map(|t| TraceContext { traceparent: format!("00-{t}-00f067aa0ba902b7-01"), tracestate: None }),
                    schema_version: version,
                    causation_id: None,
                    replay: None,
                },
            };
            let json = serde_json::to_string(&event).unwrap();
            prop_assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);
        }
    }
}
