//! An event as what it contributes to the read models.

use std::collections::BTreeMap;

use serde_json::Value;
use sluice_core::{Event, EventType};
use sluice_store::{Reading, StatusChange};

/// What one event contributes.
#[derive(Debug, Clone, PartialEq)]
pub enum Projected {
    /// A sensor reading: a row of the time series, its rollups, the device's latest reading.
    Reading(Box<Reading>),
    /// A status change: the device's latest status.
    Status(StatusChange),
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

    #[test]
    fn other_types_are_passed_over() {
        let e = event("inference.result", json!({"score": 0.1}));
        assert_eq!(project(&e).unwrap(), Projected::Other);
    }
}
