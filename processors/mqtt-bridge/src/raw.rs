//! An MQTT message as the record the bridge writes to the raw topic.
//!
//! A JSON object on a mapped topic becomes the edge's JSON form (`{event_id, event_type,
//! aggregate_id, occurred_at, payload, ...}`), with the event type and the device id taken
//! from the topic. Anything else (Avro in the wire format, bytes that are not a JSON object, a
//! topic no mapping covers) is written unchanged: the ingest-validator is the authority on
//! what is valid, and it dead-letters what is not with the bytes as the device sent them.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use sluice_core::SLUICE_NAMESPACE;
use sluice_log::{Header, Record};
use sluice_topology::TopicMapping;
use uuid::Uuid;

/// Fields of the edge form that stay beside `payload` when a device sends a flat object.
const ENVELOPE_FIELDS: [&str; 6] = [
    "event_id",
    "event_type",
    "aggregate_id",
    "occurred_at",
    "traceparent",
    "tracestate",
];

/// The record for a message that arrived on `topic` with `payload`, at `now`.
pub fn to_record(
    mappings: &[TopicMapping],
    topic: &str,
    payload: &[u8],
    now: DateTime<Utc>,
) -> Record {
    let mapped = mappings
        .iter()
        .find(|m| rumqttc::matches(topic, &m.filter))
        .and_then(|m| Some((m, topic.split('/').nth(m.aggregate_level)?)));
    let headers = vec![
        Header {
            key: "source".to_owned(),
            value: b"mqtt".to_vec(),
        },
        Header {
            key: "mqtt_topic".to_owned(),
            value: topic.as_bytes().to_vec(),
        },
    ];
    let Some((mapping, device)) = mapped else {
        return Record {
            key: None,
            value: payload.to_vec(),
            headers,
            timestamp_ms: None,
        };
    };
    let value = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(doc)) => normalize(doc, mapping, device, topic, payload, now),
        // Avro in the wire format, or bytes the validator will refuse with their reason.
        _ => payload.to_vec(),
    };
    Record {
        key: Some(device.as_bytes().to_vec()),
        value,
        headers,
        timestamp_ms: None,
    }
}

fn normalize(
    mut doc: Map<String, Value>,
    mapping: &TopicMapping,
    device: &str,
    topic: &str,
    raw: &[u8],
    now: DateTime<Utc>,
) -> Vec<u8> {
    // The topic says who sent it: a device cannot speak for another one.
    doc.insert(
        "event_type".into(),
        Value::String(mapping.event_type.clone()),
    );
    doc.insert("aggregate_id".into(), Value::String(device.to_owned()));
    if !doc.contains_key("payload") {
        let fields: Vec<String> = doc
            .keys()
            .filter(|k| !ENVELOPE_FIELDS.contains(&k.as_str()))
            .cloned()
            .collect();
        let payload: Map<String, Value> = fields
            .into_iter()
            .filter_map(|k| doc.remove(&k).map(|v| (k, v)))
            .collect();
        doc.insert("payload".into(), Value::Object(payload));
    }
    let timed = doc.contains_key("occurred_at");
    if !timed {
        doc.insert(
            "occurred_at".into(),
            Value::String(now.to_rfc3339_opts(SecondsFormat::Micros, true)),
        );
    }
    if !doc.contains_key("event_id") {
        // A redelivery carries the same bytes, so it gets the same id and the store absorbs
        // it. Without a device time two equal readings would be one event; those get a fresh
        // id instead, and a redelivery of them cannot be told from a new reading.
        let id = if timed {
            let mut name = Vec::with_capacity(topic.len() + 1 + raw.len());
            name.extend_from_slice(topic.as_bytes());
            name.push(0);
            name.extend_from_slice(raw);
            Uuid::new_v5(&SLUICE_NAMESPACE, &name)
        } else {
            Uuid::new_v4()
        };
        doc.insert("event_id".into(), Value::String(id.to_string()));
    }
    serde_json::to_vec(&Value::Object(doc)).expect("a JSON map serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mappings() -> Vec<TopicMapping> {
        sluice_topology::MqttBridgeConfig::default().mapping
    }

    fn json(record: &Record) -> Map<String, Value> {
        match serde_json::from_slice(&record.value).unwrap() {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn flat_reading_is_wrapped_with_type_and_device_from_the_topic() {
        let now = Utc::now();
        let r = to_record(
            &mappings(),
            "devices/d-7/telemetry",
            br#"{"temperature_c": 21.5, "aggregate_id": "someone-else"}"#,
            now,
        );
        assert_eq!(r.key.as_deref(), Some(&b"d-7"[..]));
        let doc = json(&r);
        assert_eq!(doc["event_type"], "sensor.reading");
        assert_eq!(doc["aggregate_id"], "d-7");
        assert_eq!(doc["payload"]["temperature_c"], 21.5);
        assert_eq!(
            doc["occurred_at"],
            now.to_rfc3339_opts(SecondsFormat::Micros, true)
        );
        assert!(Uuid::parse_str(doc["event_id"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn a_timed_message_gets_the_same_id_when_redelivered() {
        let body = br#"{"occurred_at": "2026-11-23T10:00:00Z", "payload": {"temperature_c": 1.0}}"#;
        let topic = "devices/d-1/telemetry";
        let a = json(&to_record(&mappings(), topic, body, Utc::now()));
        let b = json(&to_record(&mappings(), topic, body, Utc::now()));
        assert_eq!(a["event_id"], b["event_id"]);
        let other = json(&to_record(
            &mappings(),
            "devices/d-2/telemetry",
            body,
            Utc::now(),
        ));
        assert_ne!(a["event_id"], other["event_id"]);
    }

    #[test]
    fn a_device_event_id_is_kept() {
        let id = Uuid::new_v4().to_string();
        let body = format!(r#"{{"event_id": "{id}", "payload": {{"state": "online"}}}}"#);
        let doc = json(&to_record(
            &mappings(),
            "devices/d-1/status",
            body.as_bytes(),
            Utc::now(),
        ));
        assert_eq!(doc["event_id"], id.as_str());
        assert_eq!(doc["event_type"], "device.status");
    }

    #[test]
    fn bytes_that_are_not_a_json_object_pass_unchanged_for_the_validator_to_judge() {
        for body in [&b"\x00\x00\x00\x00\x01avro"[..], b"not json", b"[1,2]"] {
            let r = to_record(&mappings(), "devices/d-1/telemetry", body, Utc::now());
            assert_eq!(r.value, body);
            assert_eq!(r.key.as_deref(), Some(&b"d-1"[..]));
        }
        let r = to_record(&mappings(), "elsewhere/x", b"{}", Utc::now());
        assert_eq!(r.value, b"{}");
        assert_eq!(r.key, None);
        assert!(
            r.headers
                .iter()
                .any(|h| h.key == "mqtt_topic" && h.value == b"elsewhere/x")
        );
    }
}
