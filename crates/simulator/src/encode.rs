//! The wire formats Sluice's edge accepts, written into reused buffers.
//!
//! MQTT: topic `devices/<id>/telemetry` or `devices/<id>/status`, payload
//! `{"event_id", "occurred_at", "payload"}`. HTTP: one element of the `POST /v1/events` array,
//! `{"event_id", "event_type", "aggregate_id", "occurred_at", "payload"}`. `occurred_at` is
//! RFC 3339 in UTC with microseconds (`2025-06-01T12:00:00.123456Z`).

use std::fmt;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Serialize, Serializer};
use uuid::Uuid;

use crate::fleet::{Anomaly, Body, Malformation, SimEvent, SimKind};

/// The MQTT topic of an event.
pub fn mqtt_topic(event: &SimEvent) -> String {
    let leaf = match event.kind() {
        SimKind::Reading => "telemetry",
        SimKind::Status => "status",
    };
    format!("devices/{}/{leaf}", event.device)
}

/// Appends the MQTT payload of `event` (broken, when it is malformed).
pub fn write_mqtt(event: &SimEvent, buf: &mut Vec<u8>) {
    let missing = missing_field(event);
    let message = MqttMessage {
        event_id: &event.event_id,
        occurred_at: (missing != Some("occurred_at")).then_some(Micros(event.occurred_at)),
        payload: (missing != Some("payload")).then_some(&event.body),
    };
    let start = buf.len();
    to_buf(buf, &message);
    if event.malformed == Some(Malformation::InvalidJson) {
        cut(buf, start);
    }
}

/// Appends `event` as one element of an HTTP batch (the caller writes the brackets and commas).
pub fn write_http(event: &SimEvent, buf: &mut Vec<u8>) {
    let missing = missing_field(event);
    let message = HttpEvent {
        event_id: &event.event_id,
        event_type: event.event_type(),
        aggregate_id: &event.device,
        occurred_at: (missing != Some("occurred_at")).then_some(Micros(event.occurred_at)),
        payload: (missing != Some("payload")).then_some(&event.body),
    };
    if event.malformed == Some(Malformation::InvalidJson) {
        // Cut text, sent as a JSON string: the array around it must stay readable.
        let mut text = Vec::new();
        to_buf(&mut text, &message);
        cut(&mut text, 0);
        let text = String::from_utf8_lossy(&text);
        to_buf(buf, &text);
    } else {
        to_buf(buf, &message);
    }
}

/// Appends the ground-truth line of an anomalous event, newline included.
pub fn write_truth(event: &SimEvent, anomaly: &Anomaly, buf: &mut Vec<u8>) {
    to_buf(
        buf,
        &TruthLine {
            event_id: &event.event_id,
            device: &event.device,
            occurred_at: Micros(event.occurred_at),
            metric: anomaly.metric,
            kind: anomaly.kind,
            value: anomaly.value,
        },
    );
    buf.push(b'\n');
}

fn missing_field(event: &SimEvent) -> Option<&'static str> {
    match event.malformed {
        Some(Malformation::MissingField(field)) => Some(field),
        _ => None,
    }
}

/// Keeps two thirds of what was written from `start`: an object cut short is never valid JSON.
fn cut(buf: &mut Vec<u8>, start: usize) {
    let len = buf.len() - start;
    buf.truncate(start + len * 2 / 3);
}

fn to_buf<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) {
    // Writing to a Vec has no I/O error, and these types always serialize.
    serde_json::to_writer(buf, value).expect("serializing an event to memory cannot fail");
}

#[derive(Serialize)]
struct MqttMessage<'a> {
    event_id: &'a Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    occurred_at: Option<Micros>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a Body>,
}

#[derive(Serialize)]
struct HttpEvent<'a> {
    event_id: &'a Uuid,
    event_type: &'static str,
    aggregate_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    occurred_at: Option<Micros>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a Body>,
}

#[derive(Serialize)]
struct TruthLine<'a> {
    event_id: &'a Uuid,
    device: &'a str,
    occurred_at: Micros,
    metric: crate::fleet::Metric,
    kind: crate::fleet::AnomalyKind,
    value: f64,
}

/// A time written as `YYYY-MM-DDTHH:MM:SS.ffffffZ` without going through a format string.
#[derive(Clone, Copy)]
pub(crate) struct Micros(pub DateTime<Utc>);

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            // A leap second shows as nanoseconds past 1e9.
            (t.nanosecond() / 1_000) % 1_000_000
        )
    }
}

impl Serialize for Micros {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::Value;

    use super::*;
    use crate::fleet::{DeviceState, Reading, Status};

    fn event(body: Body) -> SimEvent {
        SimEvent {
            event_id: Uuid::parse_str("6f1c2a8e-3b4d-4e5f-9a0b-1c2d3e4f5a6b").unwrap(),
            device: Arc::from("dev-00042"),
            occurred_at: DateTime::parse_from_rfc3339("2025-06-01T12:34:56.789012345Z")
                .unwrap()
                .with_timezone(&Utc),
            body,
            anomaly: None,
            malformed: None,
            duplicate: false,
            late: false,
        }
    }

    fn reading() -> SimEvent {
        event(Body::Reading(Reading {
            seq: 7,
            temperature_c: 21.37,
            humidity_pct: 45.2,
            vibration_mm_s: 1.234,
            battery_pct: 88.1,
            site: "plant-3",
            firmware: "1.5.0",
        }))
    }

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn an_mqtt_reading_is_the_envelope_the_bridge_reads() {
        let e = reading();
        let mut buf = Vec::new();
        write_mqtt(&e, &mut buf);
        assert_eq!(mqtt_topic(&e), "devices/dev-00042/telemetry");
        assert_eq!(
            parse(&buf),
            serde_json::json!({
                "event_id": "6f1c2a8e-3b4d-4e5f-9a0b-1c2d3e4f5a6b",
                "occurred_at": "2025-06-01T12:34:56.789012Z",
                "payload": {
                    "seq": 7, "temperature_c": 21.37, "humidity_pct": 45.2,
                    "vibration_mm_s": 1.234, "battery_pct": 88.1,
                    "site": "plant-3", "firmware": "1.5.0"
                }
            })
        );
    }

    #[test]
    fn an_http_status_is_a_full_event() {
        let e = event(Body::Status(Status {
            state: DeviceState::Degraded,
            reason: "low battery",
            battery_pct: 12.5,
            rssi_dbm: -80,
            firmware: "2.0.0",
        }));
        let mut buf = Vec::new();
        write_http(&e, &mut buf);
        assert_eq!(mqtt_topic(&e), "devices/dev-00042/status");
        assert_eq!(
            parse(&buf),
            serde_json::json!({
                "event_id": "6f1c2a8e-3b4d-4e5f-9a0b-1c2d3e4f5a6b",
                "event_type": "device.status",
                "aggregate_id": "dev-00042",
                "occurred_at": "2025-06-01T12:34:56.789012Z",
                "payload": {
                    "state": "degraded", "reason": "low battery", "battery_pct": 12.5,
                    "rssi_dbm": -80, "firmware": "2.0.0"
                }
            })
        );
    }

    #[test]
    fn malformed_messages_are_broken_the_way_they_say() {
        let mut e = reading();
        e.malformed = Some(Malformation::InvalidJson);
        let mut buf = b"prefix".to_vec();
        write_mqtt(&e, &mut buf);
        assert!(buf.starts_with(b"prefix{"));
        assert!(serde_json::from_slice::<Value>(&buf[6..]).is_err());
        // Over HTTP it stays a JSON value, but not an object.
        buf.clear();
        write_http(&e, &mut buf);
        let text = parse(&buf);
        let text = text.as_str().unwrap();
        assert!(text.starts_with("{\"event_id\""));
        assert!(serde_json::from_str::<Value>(text).is_err());

        for field in ["occurred_at", "payload"] {
            e.malformed = Some(Malformation::MissingField(field));
            for write in [write_mqtt, write_http] {
                buf.clear();
                write(&e, &mut buf);
                let doc = parse(&buf);
                assert!(doc.get(field).is_none(), "{doc}");
                assert!(doc.get("event_id").is_some(), "{doc}");
            }
        }
    }

    #[test]
    fn times_have_six_fraction_digits_and_a_z() {
        let t = DateTime::parse_from_rfc3339("2025-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(Micros(t).to_string(), "2025-01-02T03:04:05.000000Z");
        let t = t + chrono::TimeDelta::nanoseconds(1_999);
        assert_eq!(Micros(t).to_string(), "2025-01-02T03:04:05.000001Z");
    }
}
