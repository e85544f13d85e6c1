//! An event as what it contributes to the read models.

use std::collections::BTreeMap;

use serde_json::Value;
use sluice_core::{Event, EventType};
use sluice_store::{Anomaly, Reading, StatusChange};
use uuid::Uuid;

/// What one event contributes.
#[derive(Debug, Clone, PartialEq)]
pub enum Projected {
    /// A sensor reading: a row of the time series, its rollups, the device's latest reading.
    Reading(Box<Reading>),
    /// A status change: the device's latest status.
    Status(StatusChange),
    /// An inference result labelled `anomaly`: a row of the `anomalies` table.
    Anomaly(Box<Anomaly>),
    /// An inference result labelled `normal`: counted, not stored (every reading is scored;
    /// keeping the normal scores would double the readings).
    NormalScore,
    /// An event type the projector keeps no model of (yet).
    Other,
}

/// The projection of `event`, or why its payload cannot be projected.
pub fn project(event: &Event) -> Result<Projected, String> {
    let payload = event
        .payload
        .as_object()
        .ok_or_else(|| format!("payload of {} is not an object", event.event_type))?;
    let number = |field: &str| -> Result<Option<f64>, String> {
        match payload.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| format!("{field} is not a finite number: {v}")),
        }
    };
    match event.event_type.as_str() {
        EventType::SENSOR_READING => {
            let extra: BTreeMap<String, f64> = match payload.get("extra") {
                Some(Value::Object(m)) => m
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect(),
                _ => BTreeMap::new(),
            };
            Ok(Projected::Reading(Box::new(Reading {
                event_id: event.event_id,
                device_id: event.aggregate_id.clone(),
                at: event.occurred_at,
                ingested_at: event.ingested_at,
                seq: payload.get("seq").and_then(Value::as_i64),
                temperature_c: number("temperature_c")?,
                humidity_pct: number("humidity_pct")?,
                pressure_hpa: number("pressure_hpa")?,
                vibration_mm_s: number("vibration_mm_s")?,
                battery_pct: number("battery_pct")?,
                extra,
                payload: event.payload.clone(),
            })))
        }
        EventType::DEVICE_STATUS => {
            let state = payload
                .get("state")
                .and_then(Value::as_str)
                .ok_or("a device.status payload needs a state")?;
            Ok(Projected::Status(StatusChange {
                event_id: event.event_id,
                device_id: event.aggregate_id.clone(),
                at: event.occurred_at,
                state: state.to_owned(),
                reason: payload
                    .get("reason")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            }))
        }
        EventType::INFERENCE_RESULT => {
            let text = |field: &str| -> Result<&str, String> {
                payload
                    .get(field)
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("an inference.result payload needs {field} as text"))
            };
            let required = |field: &str| -> Result<f64, String> {
                number(field)?.ok_or_else(|| format!("an inference.result payload needs a {field}"))
            };
            // Everything is checked whatever the label: a malformed result is poison even
            // when it would not be stored.
            let input = text("input_event_id")?;
            let input_event_id = Uuid::parse_str(input)
                .map_err(|e| format!("input_event_id is not a UUID: {input:?}: {e}"))?;
            let model_name = text("model_name")?;
            let model_version = text("model_version")?;
            let score = required("score")?;
            let threshold = required("threshold")?;
            let features = match payload.get("features") {
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| {
                        v.as_f64()
                            .filter(|x| x.is_finite())
                            .map(|x| (k.clone(), x))
                            .ok_or_else(|| format!("feature {k} is not a finite number: {v}"))
                    })
                    .collect::<Result<BTreeMap<String, f64>, String>>()?,
                _ => return Err("an inference.result payload needs features as an object".into()),
            };
            let site = match payload.get("site") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(v) => return Err(format!("site is not text: {v}")),
            };
            match text("label")? {
                "normal" => Ok(Projected::NormalScore),
                "anomaly" => Ok(Projected::Anomaly(Box::new(Anomaly {
                    event_id: event.event_id,
                    input_event_id,
                    device_id: event.aggregate_id.clone(),
                    at: event.occurred_at,
                    score,
                    threshold,
                    model_name: model_name.to_owned(),
                    model_version: model_version.to_owned(),
                    features,
                    site,
                }))),
                other => Err(format!(
                    "label is neither \"normal\" nor \"anomaly\": {other:?}"
                )),
            }
        }
        _ => Ok(Projected::Other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_core::Source;

    fn event(event_type: &str, payload: Value) -> Event {
        Event::new(
            EventType::new(event_type).unwrap(),
            "dev-1",
            chrono::Utc::now(),
            payload,
            Source::Mqtt,
        )
        .unwrap()
    }

    #[test]
    fn a_reading_keeps_its_typed_fields_and_extras() {
        let e = event(
            "sensor.reading",
            json!({"seq": 4, "temperature_c": 20.5, "humidity_pct": null, "extra": {"co2_ppm": 410.0}}),
        );
        let Projected::Reading(r) = project(&e).unwrap() else {
            panic!("not a reading");
        };
        assert_eq!(r.event_id, e.event_id);
        assert_eq!(r.seq, Some(4));
        assert_eq!(r.temperature_c, Some(20.5));
        assert_eq!(r.humidity_pct, None);
        assert_eq!(r.extra["co2_ppm"], 410.0);
    }

    #[test]
    fn a_status_needs_its_state() {
        let ok = event(
            "device.status",
            json!({"state": "offline", "reason": "battery"}),
        );
        let Projected::Status(s) = project(&ok).unwrap() else {
            panic!("not a status");
        };
        assert_eq!(
            (s.state.as_str(), s.reason.as_deref()),
            ("offline", Some("battery"))
        );
        let bad = event("device.status", json!({"reason": "?"}));
        assert!(project(&bad).unwrap_err().contains("state"));
    }

    fn inference(label: &str) -> Value {
        json!({
            "input_event_id": "0b9f3c52-2a4e-4f0e-9c1d-6f7a8b9c0d1e",
            "model_name": "anomaly-iforest",
            "model_version": "3",
            "score": 0.93,
            "label": label,
            "threshold": 0.7,
            "features": {"temperature_c": 81.5, "vibration_mm_s": 4.0},
            "site": "plant-3",
        })
    }

    #[test]
    fn an_anomaly_keeps_its_model_score_and_features() {
        let e = event("inference.result", inference("anomaly"));
        let Projected::Anomaly(a) = project(&e).unwrap() else {
            panic!("not an anomaly");
        };
        assert_eq!(a.event_id, e.event_id);
        assert_eq!(
            a.input_event_id.to_string(),
            "0b9f3c52-2a4e-4f0e-9c1d-6f7a8b9c0d1e"
        );
        assert_eq!((a.device_id.as_str(), a.at), ("dev-1", e.occurred_at));
        assert_eq!((a.score, a.threshold), (0.93, 0.7));
        assert_eq!(
            (a.model_name.as_str(), a.model_version.as_str()),
            ("anomaly-iforest", "3")
        );
        assert_eq!(a.features["temperature_c"], 81.5);
        assert_eq!(a.site.as_deref(), Some("plant-3"));

        let mut no_site = inference("anomaly");
        no_site["site"] = Value::Null;
        let Projected::Anomaly(a) = project(&event("inference.result", no_site)).unwrap() else {
            panic!("not an anomaly");
        };
        assert_eq!(a.site, None);
    }

    #[test]
    fn a_normal_score_is_counted_not_stored() {
        let e = event("inference.result", inference("normal"));
        assert_eq!(project(&e).unwrap(), Projected::NormalScore);
    }

    #[test]
    fn a_malformed_inference_is_refused_whatever_its_label() {
        let cases: [(&str, Value, &str); 8] = [
            ("input_event_id", json!("not-a-uuid"), "UUID"),
            ("input_event_id", Value::Null, "input_event_id"),
            ("model_name", json!(3), "model_name"),
            ("score", json!("high"), "score"),
            ("threshold", Value::Null, "threshold"),
            ("features", json!({"t": "hot"}), "feature t"),
            ("site", json!(7), "site"),
            ("label", json!("weird"), "label"),
        ];
        for (field, value, says) in cases {
            for label in ["normal", "anomaly"] {
                let mut p = inference(label);
                p[field] = value.clone();
                let err = project(&event("inference.result", p)).unwrap_err();
                assert!(err.contains(says), "{field} = {value}: {err}");
            }
        }
        let mut p = inference("anomaly");
        p.as_object_mut().unwrap().remove("features");
        assert!(
            project(&event("inference.result", p))
                .unwrap_err()
                .contains("features")
        );
    }

    #[test]
    fn other_types_are_passed_over() {
        let e = event("action.result", json!({"status": "delivered"}));
        assert_eq!(project(&e).unwrap(), Projected::Other);
    }
}
