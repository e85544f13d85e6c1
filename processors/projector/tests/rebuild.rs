//! The set-based rebuild on PostgreSQL (`Store::rebuild_step`) builds the same version as the
//! projector's own path: the same events, projected batch by batch with
//! `sluice_projector::project` and `Store::project` into version 1, and rebuilt step by step in
//! two lanes from the event store into version 2, give equal readings (row for row), equal
//! latest state (late counts included) and equal rollups; unprojectable events are counted
//! and skipped; a step done again changes nothing.
//!
//! SQLite has no set-based path: a rebuild there goes through `Store::project`, which
//! `crates/cli/tests/operations.rs` covers.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sluice_core::{Event, EventType, Source};
use sluice_projector::Projected;
use sluice_store::testing::on_postgres;
use sluice_store::{
    AppendBatch, AppendEvent, ProjectionBatch, RebuildOutcome, RebuildStep, Resolution, Store,
    StoreOptions,
};
use sqlx::{Connection, PgConnection};

/// Positions per step (and per batch of the projector's path): small, so that devices span
/// many steps and readings held back arrive late.
const STEP: i64 = 41;

fn event(kind: &str, device: &str, at: DateTime<Utc>, payload: Value) -> Event {
    Event::new(
        EventType::new(kind).unwrap(),
        device,
        at,
        payload,
        Source::Mqtt,
    )
    .unwrap()
}

/// Readings of five devices over three hours with every shape the mapping must agree on (null
/// and missing metrics, `extra` with a non-number, whole and fractional `seq`, two readings at
/// the same instant), status events, two unprojectable events and an inference result; every
/// seventh reading held back to the end, so it arrives late.
fn history() -> Vec<Event> {
    let start = Utc::now() - TimeDelta::hours(3);
    let mut readings = Vec::new();
    for i in 0..900i64 {
        let device = format!("dev-{}", i % 5);
        let at = start + TimeDelta::seconds(i * 11);
        let mut p = json!({
            "temperature_c": 15.0 + (i % 23) as f64 * 0.37,
            "vibration_mm_s": (i % 7) as f64 / 10.0,
            "seq": i,
        });
        match i % 6 {
            0 => p["humidity_pct"] = Value::Null,
            1 => p["humidity_pct"] = json!(40.5 + (i % 5) as f64),
            2 => p["extra"] = json!({"rssi": -60.5 - (i % 4) as f64, "fw": "1.2"}),
            3 => p["seq"] = json!(1.5),
            4 => p["battery_pct"] = json!(100 - i % 50),
            _ => p["pressure_hpa"] = json!(1013.25),
        }
        readings.push(event(EventType::SENSOR_READING, &device, at, p));
    }
    // The same instant twice: the greater event id is the newest.
    let tie = readings[500].occurred_at;
    readings.push(event(
        EventType::SENSOR_READING,
        "dev-0",
        tie,
        json!({"temperature_c": 99.0}),
    ));
    let (late, mut events): (Vec<_>, Vec<_>) = readings
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 7 == 3);
    let mut events: Vec<Event> = events.drain(..).map(|(_, e)| e).collect();
    for (k, state) in ["online", "offline", "online", "maintenance"]
        .iter()
        .enumerate()
    {
        let at = start + TimeDelta::minutes(40 * k as i64);
        let reason = if k % 2 == 1 {
            json!({"state": state, "reason": "power"})
        } else {
            json!({"state": state})
        };
        events.insert(
            100 * k,
            event(EventType::DEVICE_STATUS, "dev-1", at, reason),
        );
    }
    events.insert(
        333,
        event(
            EventType::DEVICE_STATUS,
            "dev-quiet",
            start,
            json!({"state": "online"}),
        ),
    );
    // Unprojectable: a metric that is not a number, a status without a state.
    events.insert(
        50,
        event(
            EventType::SENSOR_READING,
            "dev-2",
            start,
            json!({"temperature_c": "hot"}),
        ),
    );
    events.insert(
        51,
        event(EventType::DEVICE_STATUS, "dev-2", start, json!({"why": 1})),
    );
    // Not a type the projections are built from.
    events.insert(
        52,
        event(
            EventType::INFERENCE_RESULT,
            "dev-2",
            start,
            json!({"label": "normal"}),
        ),
    );
    events.extend(late.into_iter().map(|(_, e)| e));
    events
}

/// Appends the events in order; returns them by position.
async fn append(store: &Store, events: &[Event]) -> BTreeMap<i64, Event> {
    let mut by_position = BTreeMap::new();
    for chunk in events.chunks(200) {
        let batch = AppendBatch {
            events: chunk
                .iter()
                .map(|e| AppendEvent {
                    event: e.clone(),
                    topic: "events".into(),
                    key: e.aggregate_id.as_bytes().to_vec(),
                    value: Vec::new(),
                })
                .collect(),
            ..AppendBatch::default()
        };
        let outcome = store.append(&batch).await.unwrap();
        for a in outcome.appended {
            let e = chunk.iter().find(|e| e.event_id == a.event_id).unwrap();
            by_position.insert(a.position, e.clone());
        }
    }
    by_position
}

/// Rows of `table` in `version` that the other version lacks, both ways.
async fn differences(conn: &mut PgConnection, table: &str, columns: &str) -> i64 {
    let sql = format!(
        "SELECT (SELECT count(*) FROM (SELECT {columns} FROM {table} WHERE version = 1
                                       EXCEPT SELECT {columns} FROM {table} WHERE version = 2) a)
              + (SELECT count(*) FROM (SELECT {columns} FROM {table} WHERE version = 2
                                       EXCEPT SELECT {columns} FROM {table} WHERE version = 1) b)"
    );
    sqlx::query_scalar(&sql).fetch_one(conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_based_rebuild_equals_the_projectors_own_path() {
    on_postgres(async |url| rebuild_equals_projection(&url).await).await;
}

async fn rebuild_equals_projection(url: &str) {
    let store = Store::connect(url, StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    let events = history();
    let by_position = append(&store, &events).await;
    let last = store.last_position().await.unwrap();
    assert_eq!(last, *by_position.keys().last().unwrap());

    // Version 1: the projector's path, one batch per step of positions.
    let mut unprojectable_v1 = 0;
    let mut after = 0;
    while after < last {
        let mut batch = ProjectionBatch {
            version: 1,
            ..ProjectionBatch::default()
        };
        for e in by_position.range(after + 1..=after + STEP).map(|(_, e)| e) {
            if !matches!(
                e.event_type.as_str(),
                EventType::SENSOR_READING | EventType::DEVICE_STATUS
            ) {
                continue;
            }
            match sluice_projector::project(e) {
                Ok(Projected::Reading(r)) => batch.readings.push(*r),
                Ok(Projected::Status(s)) => batch.statuses.push(s),
                Ok(_) => unreachable!("only readings and statuses are selected"),
                Err(_) => unprojectable_v1 += 1,
            }
        }
        store.project(&batch).await.unwrap();
        after += STEP;
    }

    // Version 2: set-based, two lanes at once per step.
    let mut total = RebuildOutcome::default();
    let mut after = 0;
    while after < last {
        let step = |lane| RebuildStep {
            version: 2,
            after,
            upto: (after + STEP).min(last),
            lane,
            lanes: 2,
        };
        let (lane0, lane1) = (step(0), step(1));
        let (a, b) = tokio::join!(store.rebuild_step(&lane0), store.rebuild_step(&lane1));
        total += a.unwrap();
        total += b.unwrap();
        after += STEP;
    }
    let projected_types = events
        .iter()
        .filter(|e| e.event_type.as_str() != EventType::INFERENCE_RESULT)
        .count() as u64;
    assert_eq!(total.events, projected_types);
    assert_eq!((total.unprojectable, unprojectable_v1), (2, 2));
    let readings = store.readings_count(1).await.unwrap();
    assert_eq!(total.readings, readings);
    assert_eq!(store.readings_count(2).await.unwrap(), readings);

    // A step done again (a crash after its commit, before the job's progress) adds nothing.
    let again = store
        .rebuild_step(&RebuildStep {
            version: 2,
            after: 0,
            upto: STEP,
            lane: 0,
            lanes: 1,
        })
        .await
        .unwrap();
    assert_eq!((again.readings, again.statuses), (0, 0));
    assert!(again.events > 0);

    let mut conn = PgConnection::connect(url).await.unwrap();
    let reading_columns = "event_id, device_id, at, ingested_at, seq, temperature_c, \
                           humidity_pct, pressure_hpa, vibration_mm_s, battery_pct, extra";
    assert_eq!(differences(&mut conn, "readings", reading_columns).await, 0);
    let seqs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM readings WHERE version = 2 AND seq IS NULL")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(seqs > 0, "a fractional seq is no seq");
    let extras: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM readings WHERE version = 2 AND extra = '{\"rssi\": -60.5}'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(extras > 0, "extra keeps its numbers only");
    let latest_columns = "device_id, last_seen, reading_at, reading_event_id, reading, status, \
                          status_reason, status_at, status_event_id, late_readings";
    assert_eq!(
        differences(&mut conn, "device_latest", latest_columns).await,
        0
    );
    let late: i64 =
        sqlx::query_scalar("SELECT sum(late_readings)::int8 FROM device_latest WHERE version = 2")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(late > 0, "the held-back readings are late");
    conn.close().await.unwrap();
    let quiet = store.device_latest(2, "dev-quiet").await.unwrap().unwrap();
    assert_eq!(
        (quiet.status.as_deref(), quiet.reading_at),
        (Some("online"), None)
    );

    for resolution in [Resolution::Minute, Resolution::Hour] {
        let v1 = store.rollups(1, resolution, None).await.unwrap();
        let v2 = store.rollups(2, resolution, None).await.unwrap();
        assert_eq!(v1.len(), v2.len(), "{resolution:?}");
        for (a, b) in v1.iter().zip(&v2) {
            assert_eq!(
                (
                    &a.device_id,
                    a.bucket,
                    &a.metric,
                    a.count,
                    a.min,
                    a.max,
                    a.last,
                    a.last_at
                ),
                (
                    &b.device_id,
                    b.bucket,
                    &b.metric,
                    b.count,
                    b.min,
                    b.max,
                    b.last,
                    b.last_at
                ),
            );
            assert!(
                (a.sum - b.sum).abs() <= 1e-9 * a.sum.abs().max(1.0),
                "{a:?} {b:?}"
            );
        }
    }
    store.close().await;
}
