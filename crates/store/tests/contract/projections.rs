//! The projector's read models: incremental rollups equal rollups computed from scratch
//! whatever the batching, repeats and arrival order; latest state only moves forward; offsets
//! commit with the projection; versions do not touch each other; anomalies are stored once,
//! roll back with the offsets, go with retention and are readable through `select`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use sluice_store::{
    Anomaly, Column, ColumnType, ConsumerOffset, Error, Filter, Op, ProjectionBatch,
    ProjectionOutcome, Reading, Resolution, Rollup, Select, StatusChange, Store, Value,
    VersionState,
};
use uuid::Uuid;

use super::{Harness, Lcg};

const GROUP: &str = "projector";
const TOPIC: &str = "events.sensor.reading";

/// 2026-01-01T10:00:00Z: a fixed base, so buckets are known.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_261_600, 0).unwrap()
}

fn at(seconds: i64) -> DateTime<Utc> {
    t0() + TimeDelta::seconds(seconds)
}

fn reading_at(device: &str, at: DateTime<Utc>, temperature_c: f64) -> Reading {
    Reading {
        event_id: Uuid::new_v4(),
        device_id: device.to_owned(),
        at,
        ingested_at: at + TimeDelta::milliseconds(300),
        seq: None,
        temperature_c: Some(temperature_c),
        humidity_pct: None,
        pressure_hpa: None,
        vibration_mm_s: None,
        battery_pct: None,
        extra: BTreeMap::new(),
        payload: json!({"temperature_c": temperature_c}),
    }
}

fn status(device: &str, at: DateTime<Utc>, state: &str, reason: Option<&str>) -> StatusChange {
    StatusChange {
        event_id: Uuid::new_v4(),
        device_id: device.to_owned(),
        at,
        state: state.to_owned(),
        reason: reason.map(str::to_owned),
    }
}

fn readings(version: i32, readings: &[&Reading]) -> ProjectionBatch {
    ProjectionBatch {
        version,
        readings: readings.iter().map(|r| (*r).clone()).collect(),
        ..ProjectionBatch::default()
    }
}

fn offset(partition: i32, next_offset: i64) -> ConsumerOffset {
    ConsumerOffset {
        group: GROUP.into(),
        topic: TOPIC.into(),
        partition,
        next_offset,
    }
}

/// Equal, with sums compared up to rounding (they are added in a different order).
fn assert_rollups_eq(got: &[Rollup], want: &[Rollup], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: number of rollups");
    for (g, w) in got.iter().zip(want) {
        let key = (&w.device_id, w.bucket, &w.metric);
        assert_eq!((&g.device_id, g.bucket, &g.metric), key, "{what}: order");
        assert_eq!(
            (g.count, g.min, g.max, g.last, g.last_at),
            (w.count, w.min, w.max, w.last, w.last_at),
            "{what}: {key:?}"
        );
        let tolerance = 1e-9 * w.sum.abs().max(1.0);
        assert!(
            (g.sum - w.sum).abs() <= tolerance,
            "{what}: sum of {key:?}: {} vs {}",
            g.sum,
            w.sum
        );
    }
}

/// The rollups of `readings` (distinct ids), computed here: the oracle both stores must match.
fn expected_rollups(readings: &[Reading], res: Resolution) -> Vec<Rollup> {
    let width = match res {
        Resolution::Minute => 60_000_000,
        Resolution::Hour => 3_600_000_000,
    };
    let mut out: BTreeMap<(String, i64, &str), (Rollup, Uuid)> = BTreeMap::new();
    for r in readings {
        let bucket = r.at.timestamp_micros().div_euclid(width) * width;
        for (metric, v) in r.metrics() {
            let key = (r.device_id.clone(), bucket, metric);
            let (x, last_id) = out.entry(key).or_insert_with(|| {
                let x = Rollup {
                    device_id: r.device_id.clone(),
                    bucket: DateTime::from_timestamp_micros(bucket).unwrap(),
                    metric: metric.to_owned(),
                    count: 0,
                    min: v,
                    max: v,
                    sum: 0.0,
                    last: v,
                    last_at: r.at,
                };
                (x, r.event_id)
            });
            x.count += 1;
            x.min = x.min.min(v);
            x.max = x.max.max(v);
            x.sum += v;
            if (r.at, r.event_id) > (x.last_at, *last_id) {
                (x.last, x.last_at, *last_id) = (v, r.at, r.event_id);
            }
        }
    }
    out.into_values().map(|(x, _)| x).collect()
}

fn random_reading(rng: &mut Lcg, devices: u64, ats: &[DateTime<Utc>]) -> Reading {
    let metric = |rng: &mut Lcg| {
        // Mostly present; values with fractions so sums round differently by order.
        (rng.next(5) > 0).then(|| (rng.next(20_001) as f64 - 10_000.0) / 7.0)
    };
    let mut r = Reading {
        event_id: Uuid::new_v4(),
        device_id: format!("dev-{}", rng.next(devices)),
        at: ats[rng.next(ats.len() as u64) as usize],
        ingested_at: t0(),
        seq: Some(rng.next(1000) as i64),
        temperature_c: metric(rng),
        humidity_pct: metric(rng),
        pressure_hpa: metric(rng),
        vibration_mm_s: metric(rng),
        battery_pct: metric(rng),
        extra: BTreeMap::new(),
        payload: json!({}),
    };
    if rng.next(4) == 0 {
        r.extra.insert("rpm".into(), rng.next(5000) as f64);
    }
    r.payload = json!({"temperature_c": r.temperature_c, "extra": r.extra});
    r
}

/// Random readings over a few devices and an hour, sent in random batches with repeats (in the
/// same batch and in later ones), out of order and late: the incremental rollups equal the
/// rollups from scratch and an independent computation, every reading is stored once, the
/// outcomes add up, and latest state and late counts are as the documented rule says.
pub async fn incremental_rollups_equal_rollups_from_scratch<H: Harness>(h: &H) {
    let store = h.open().await;
    let mut rng = Lcg(0x5eed_0003);
    for case in 1..=120 {
        let version = case;
        let devices = 1 + rng.next(3);
        // Times on a grid with bucket edges and repeats (ties broken by event id), plus odd
        // microseconds, over a little more than an hour so the hour rollups have two buckets.
        let ats: Vec<DateTime<Utc>> = (0..8 + rng.next(24))
            .map(|_| {
                let s = rng.next(4_000) as i64;
                let edge = [0, 59_999_999, 60_000_000, 1][rng.next(4) as usize];
                t0() + TimeDelta::seconds(s / 60 * 60)
                    + TimeDelta::microseconds(edge)
                    + TimeDelta::microseconds(if rng.next(3) == 0 {
                        0
                    } else {
                        s % 60 * 1_000_003
                    })
            })
            .collect();
        let distinct: Vec<Reading> = (0..5 + rng.next(40))
            .map(|_| random_reading(&mut rng, devices, &ats))
            .collect();
        // Send everything once in random order, with repeats mixed in.
        let mut sent: Vec<Reading> = Vec::new();
        let mut order: Vec<usize> = (0..distinct.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.next(i as u64 + 1) as usize);
        }
        for &i in &order {
            sent.push(distinct[i].clone());
            if rng.next(4) == 0 {
                let j = order[rng.next(order.len() as u64) as usize];
                sent.push(distinct[j].clone());
            }
        }

        let mut totals = ProjectionOutcome::default();
        let mut stored: HashMap<String, DateTime<Utc>> = HashMap::new(); // newest reading
        let mut seen: HashSet<Uuid> = HashSet::new();
        let mut expected_late: HashMap<String, i64> = HashMap::new();
        let mut rest = sent.as_slice();
        let mut next_offset = 0;
        while !rest.is_empty() {
            let n = (1 + rng.next(12) as usize).min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            next_offset += n as i64;
            let batch = ProjectionBatch {
                version,
                readings: chunk.to_vec(),
                statuses: Vec::new(),
                anomalies: Vec::new(),
                offsets: vec![offset(0, next_offset)],
            };
            // The rule: late when the minute is before the minute of the device's newest
            // reading stored before this batch.
            let minute = |t: DateTime<Utc>| t.timestamp_micros().div_euclid(60_000_000);
            let before = stored.clone();
            let mut late = 0;
            for r in chunk {
                if !seen.insert(r.event_id) {
                    continue;
                }
                if before
                    .get(&r.device_id)
                    .is_some_and(|&newest| minute(r.at) < minute(newest))
                {
                    late += 1;
                    *expected_late.entry(r.device_id.clone()).or_default() += 1;
                }
                let newest = stored.entry(r.device_id.clone()).or_insert(r.at);
                *newest = (*newest).max(r.at);
            }
            let out = store.project(&batch).await.unwrap();
            assert_eq!(out.readings + out.duplicates, n as u64, "case {case}");
            assert_eq!(out.late, late, "case {case}: late readings in a batch");
            totals.readings += out.readings;
            totals.duplicates += out.duplicates;
            totals.late += out.late;
        }

        let what = |res| format!("case {case}, {res:?}");
        assert_eq!(totals.readings, distinct.len() as u64, "case {case}");
        assert_eq!(
            totals.readings + totals.duplicates,
            sent.len() as u64,
            "case {case}"
        );
        assert_eq!(
            store.readings_count(version).await.unwrap(),
            distinct.len() as u64,
            "case {case}"
        );
        for res in [Resolution::Minute, Resolution::Hour] {
            let incremental = store.rollups(version, res, None).await.unwrap();
            let scratch = store.rollups_from_scratch(version, res).await.unwrap();
            assert!(!incremental.is_empty(), "{}", what(res));
            assert_rollups_eq(&incremental, &scratch, &what(res));
            assert_rollups_eq(&incremental, &expected_rollups(&distinct, res), &what(res));
        }
        let one = "dev-0";
        let only: Vec<Rollup> = store
            .rollups(version, Resolution::Minute, Some(one))
            .await
            .unwrap();
        assert!(only.iter().all(|r| r.device_id == one));
        assert_eq!(
            only.len(),
            expected_rollups(&distinct, Resolution::Minute)
                .iter()
                .filter(|r| r.device_id == one)
                .count()
        );

        for d in 0..devices {
            let device = format!("dev-{d}");
            let mine: Vec<&Reading> = distinct.iter().filter(|r| r.device_id == device).collect();
            let latest = store.device_latest(version, &device).await.unwrap();
            let Some(newest) = mine.iter().max_by_key(|r| (r.at, r.event_id)) else {
                assert_eq!(latest, None, "case {case}: {device} never seen");
                continue;
            };
            let latest = latest.expect("a device with readings has a latest state");
            assert_eq!(latest.reading_at, Some(newest.at), "case {case}");
            assert_eq!(
                latest.reading.as_ref(),
                Some(&newest.payload),
                "case {case}"
            );
            assert_eq!(latest.last_seen, newest.at, "case {case}");
            assert_eq!(
                latest.late_readings,
                expected_late.get(&device).copied().unwrap_or(0),
                "case {case}: late readings of {device}"
            );
        }
        assert_eq!(
            store.consumer_offsets(GROUP).await.unwrap(),
            vec![offset(0, next_offset)],
            "case {case}"
        );
    }
}

/// Latest state keeps the newest reading and status whatever the arrival order; repeats and
/// older events change nothing; late readings are counted per device.
pub async fn device_latest_keeps_the_newest<H: Harness>(h: &H) {
    let store = h.open().await;
    let v = 1;
    let r20 = reading_at("pump-1", at(20 * 60), 20.0);
    let r10 = reading_at("pump-1", at(10 * 60), 10.0);
    let r05 = reading_at("pump-1", at(5 * 60 + 59), 5.0);
    let r20b = reading_at("pump-1", at(20 * 60 + 10), 20.5);

    let out = store.project(&readings(v, &[&r20])).await.unwrap();
    assert_eq!((out.readings, out.late), (1, 0));
    // Older minutes than the newest stored reading: late, counted, and they change no latest.
    let out = store.project(&readings(v, &[&r10, &r05])).await.unwrap();
    assert_eq!((out.readings, out.duplicates, out.late), (2, 0, 2));
    let l = store.device_latest(v, "pump-1").await.unwrap().unwrap();
    assert_eq!(l.reading_at, Some(r20.at));
    assert_eq!(l.reading, Some(r20.payload.clone()));
    assert_eq!(l.last_seen, r20.at);
    assert_eq!(l.late_readings, 2);
    // The same minute as the newest is not late; a newer one replaces the latest reading.
    let out = store.project(&readings(v, &[&r20b, &r20])).await.unwrap();
    assert_eq!((out.readings, out.duplicates, out.late), (1, 1, 0));
    let l = store.device_latest(v, "pump-1").await.unwrap().unwrap();
    assert_eq!(
        (l.reading_at, l.reading.clone(), l.late_readings),
        (Some(r20b.at), Some(r20b.payload.clone()), 2)
    );
    // The late ones went to their own buckets.
    let minutes: Vec<(DateTime<Utc>, i64)> = store
        .rollups(v, Resolution::Minute, Some("pump-1"))
        .await
        .unwrap()
        .iter()
        .map(|r| (r.bucket, r.count))
        .collect();
    assert_eq!(
        minutes,
        vec![(at(5 * 60), 1), (at(10 * 60), 1), (at(20 * 60), 2)]
    );

    // Within one batch, readings are taken in device-time order: none is late relative to
    // another of the same batch, whatever their order in it.
    let a = reading_at("fan-2", at(40 * 60), 1.0);
    let b = reading_at("fan-2", at(38 * 60), 2.0);
    let out = store.project(&readings(v, &[&a, &b])).await.unwrap();
    assert_eq!((out.readings, out.late), (2, 0));
    let l = store.device_latest(v, "fan-2").await.unwrap().unwrap();
    assert_eq!((l.reading_at, l.late_readings), (Some(a.at), 0));

    // Statuses: newest by device time, whatever the arrival order; repeats are harmless.
    let online = status("pump-1", at(60), "online", None);
    let offline = status("pump-1", at(3 * 60), "offline", Some("battery"));
    let later = status("pump-1", at(30 * 60), "online", Some("reboot"));
    let with = |statuses: Vec<StatusChange>| ProjectionBatch {
        version: v,
        statuses,
        ..ProjectionBatch::default()
    };
    assert_eq!(
        store
            .project(&with(vec![offline.clone()]))
            .await
            .unwrap()
            .statuses,
        1
    );
    let out = store
        .project(&with(vec![online.clone(), offline.clone()]))
        .await
        .unwrap();
    assert_eq!(
        out.statuses, 0,
        "an older status and a repeat change nothing"
    );
    let l = store.device_latest(v, "pump-1").await.unwrap().unwrap();
    assert_eq!(
        (l.status.as_deref(), l.status_reason.as_deref(), l.status_at),
        (Some("offline"), Some("battery"), Some(offline.at))
    );
    assert_eq!(
        l.reading_at,
        Some(r20b.at),
        "a status leaves the reading alone"
    );
    assert_eq!(l.last_seen, r20b.at);
    let out = store
        .project(&with(vec![later.clone(), later.clone(), online.clone()]))
        .await
        .unwrap();
    assert_eq!(out.statuses, 1);
    let l = store.device_latest(v, "pump-1").await.unwrap().unwrap();
    assert_eq!(
        (l.status.as_deref(), l.status_reason.as_deref(), l.status_at),
        (Some("online"), Some("reboot"), Some(later.at))
    );
    assert_eq!(l.last_seen, later.at, "last_seen is the newest of anything");
    assert_eq!(l.late_readings, 2);

    // A device only heard from by status has no reading.
    let s = status("valve-9", at(90), "offline", None);
    store.project(&with(vec![s.clone()])).await.unwrap();
    let l = store.device_latest(v, "valve-9").await.unwrap().unwrap();
    assert_eq!((l.reading_at, l.reading, l.last_seen), (None, None, s.at));
    assert_eq!(store.device_latest(v, "nobody").await.unwrap(), None);
}

/// Offsets commit with the projection; a batch that fails stores nothing of it.
pub async fn projection_offsets_commit_atomically<H: Harness>(h: &H) {
    let store = h.open().await;
    let v = 1;
    let first = reading_at("dev-1", at(0), 1.0);
    let mut b = readings(v, &[&first]);
    b.offsets = vec![offset(0, 5), offset(1, 2), offset(0, 7)];
    store.project(&b).await.unwrap();
    assert_eq!(
        store.consumer_offsets(GROUP).await.unwrap(),
        vec![offset(0, 7), offset(1, 2)],
        "the last offset per partition wins"
    );
    let rollups = store.rollups(v, Resolution::Minute, None).await.unwrap();
    let latest = store.device_latest(v, "dev-1").await.unwrap();

    // The offset is checked by the database after everything else was written.
    let r = reading_at("dev-1", at(120), 2.0);
    let old = reading_at("dev-1", at(-120), 0.5);
    let mut b = readings(v, &[&r, &old]);
    b.statuses = vec![status("dev-1", at(130), "offline", None)];
    b.offsets = vec![offset(0, -1)];
    let err = store
        .project(&b)
        .await
        .expect_err("negative offset refused");
    assert!(
        !err.is_transient(),
        "a constraint violation is fatal: {err}"
    );
    assert_eq!(store.readings_count(v).await.unwrap(), 1, "no reading");
    assert_eq!(
        store.rollups(v, Resolution::Minute, None).await.unwrap(),
        rollups
    );
    assert!(
        store
            .rollups(v, Resolution::Hour, None)
            .await
            .unwrap()
            .len()
            == 1
    );
    assert_eq!(store.device_latest(v, "dev-1").await.unwrap(), latest);
    assert_eq!(
        store.consumer_offsets(GROUP).await.unwrap(),
        vec![offset(0, 7), offset(1, 2)]
    );

    // Nothing was claimed: the batch, fixed, stores its readings as new.
    b.offsets = vec![offset(0, 9)];
    let out = store.project(&b).await.unwrap();
    assert_eq!(
        (out.readings, out.duplicates, out.late, out.statuses),
        (2, 0, 1, 1)
    );
    assert_eq!(
        store.consumer_offsets(GROUP).await.unwrap()[0],
        offset(0, 9)
    );

    // A metric that is not a number is refused before anything is written.
    let mut nan = reading_at("dev-1", at(300), 0.0);
    nan.humidity_pct = Some(f64::NAN);
    let mut b = readings(v, &[&nan]);
    b.offsets = vec![offset(0, 10)];
    let err = store.project(&b).await.expect_err("NaN refused");
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert_eq!(store.readings_count(v).await.unwrap(), 3);
    assert_eq!(
        store.consumer_offsets(GROUP).await.unwrap()[0],
        offset(0, 9)
    );
}

/// What every table of one version holds, for comparing before and after.
async fn snapshot(store: &Store, version: i32) -> impl PartialEq + std::fmt::Debug {
    (
        store.readings_count(version).await.unwrap(),
        store
            .rollups(version, Resolution::Minute, None)
            .await
            .unwrap(),
        store
            .rollups(version, Resolution::Hour, None)
            .await
            .unwrap(),
        store.device_latest(version, "dev-1").await.unwrap(),
        store.device_latest(version, "dev-2").await.unwrap(),
    )
}

/// A rebuild writes a new version beside the live one without touching it, and dropping a
/// version removes only its rows.
pub async fn projection_versions_are_independent<H: Harness>(h: &H) {
    let store = h.open().await;
    let a = reading_at("dev-1", at(0), 1.0);
    let b = reading_at("dev-1", at(3_700), 2.0);
    let c = reading_at("dev-2", at(10), 3.0);
    let out = store.project(&readings(1, &[&a, &b, &c])).await.unwrap();
    assert_eq!(out.readings, 3);
    let v1 = snapshot(&store, 1).await;

    // The same events are new in version 2, and more go there only.
    let out = store.project(&readings(2, &[&a, &b, &c])).await.unwrap();
    assert_eq!((out.readings, out.duplicates, out.late), (3, 0, 0));
    let d = reading_at("dev-1", at(-3_600), 4.0);
    let mut batch = readings(2, &[&d]);
    batch.statuses = vec![status("dev-2", at(20), "offline", None)];
    let out = store.project(&batch).await.unwrap();
    assert_eq!((out.readings, out.late, out.statuses), (1, 1, 1));
    assert_eq!(snapshot(&store, 1).await, v1, "version 1 untouched");
    assert_eq!(store.readings_count(2).await.unwrap(), 4);
    let latest2 = store.device_latest(2, "dev-1").await.unwrap().unwrap();
    assert_eq!(latest2.late_readings, 1);

    // Version 2: 4 readings, 4 minute rollups, 4 hour rollups, 2 devices.
    assert_eq!(
        store.drop_projection_version(2).await.unwrap(),
        4 + 4 + 4 + 2
    );
    assert_eq!(store.readings_count(2).await.unwrap(), 0);
    assert!(
        store
            .rollups(2, Resolution::Minute, None)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .rollups(2, Resolution::Hour, None)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.device_latest(2, "dev-1").await.unwrap(), None);
    assert_eq!(snapshot(&store, 1).await, v1, "version 1 kept");
    assert_eq!(store.drop_projection_version(2).await.unwrap(), 0);
}

/// The projector's retention of readings: old readings go (on Postgres with their time
/// partitions), recent ones and every rollup stay; readings land in time partitions made ahead
/// or on demand, and stay unique by event id across them.
pub async fn readings_retention_keeps_recent_readings_and_rollups<H: Harness>(h: &H) {
    let store = h.open().await;
    let v = 1;
    let now = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    let day = TimeDelta::days(1);
    let retention = std::time::Duration::from_secs(7 * 24 * 3600);
    // Partitions as they were ten days ago (Postgres), so the old reading lands in one.
    store
        .maintain_readings(now - day * 10, retention)
        .await
        .unwrap();
    let old = reading_at("dev-1", now - day * 10 + TimeDelta::hours(1), 1.0);
    let ancient = reading_at("dev-1", now - day * 400, 2.0);
    let recent = reading_at("dev-1", now - day * 3, 3.0);
    let current = reading_at("dev-2", now, 4.0);
    let out = store
        .project(&readings(v, &[&old, &ancient, &recent, &current]))
        .await
        .unwrap();
    assert_eq!(out.readings, 4);
    let minutes = store.rollups(v, Resolution::Minute, None).await.unwrap();
    let hours = store.rollups(v, Resolution::Hour, None).await.unwrap();
    assert_eq!((minutes.len(), hours.len()), (4, 4));

    let report = store.maintain_readings(now, retention).await.unwrap();
    assert_eq!(store.readings_count(v).await.unwrap(), 2, "{report:?}");
    assert_eq!(
        store.rollups(v, Resolution::Minute, None).await.unwrap(),
        minutes,
        "rollups are kept"
    );
    assert_eq!(
        store.rollups(v, Resolution::Hour, None).await.unwrap(),
        hours
    );
    match store.backend() {
        sluice_store::Backend::Postgres => {
            let old_partition = format!("readings_p{}", (now - day * 10).format("%Y%m%d_000000"));
            assert!(
                report.partitions_dropped.contains(&old_partition),
                "{old_partition} dropped: {report:?}"
            );
            assert_eq!(report.readings_deleted, 1, "the ancient one: {report:?}");
            // The recent reading got a partition on demand, the current one a partition made
            // ahead: the default partition holds nothing.
            assert_eq!(h.scalar("SELECT count(*) FROM readings_default").await, 0);
        }
        sluice_store::Backend::Sqlite => assert_eq!(report.readings_deleted, 2, "{report:?}"),
    }
    // Still unique by event id in whatever partition the reading is.
    let out = store
        .project(&readings(v, &[&recent, &current]))
        .await
        .unwrap();
    assert_eq!((out.readings, out.duplicates), (0, 2));
    assert_eq!(
        store
            .maintain_readings(now, retention)
            .await
            .unwrap()
            .readings_deleted,
        0
    );
}

fn anomaly_at(device: &str, at: DateTime<Utc>, score: f64) -> Anomaly {
    Anomaly {
        event_id: Uuid::new_v4(),
        input_event_id: Uuid::new_v4(),
        device_id: device.to_owned(),
        at,
        score,
        threshold: 0.7,
        model_name: "anomaly-iforest".to_owned(),
        model_version: "3".to_owned(),
        features: BTreeMap::from([
            ("temperature_c".to_owned(), 81.25),
            ("vibration_mm_s".to_owned(), 0.1 + 0.2),
        ]),
        site: Some("plant-3".to_owned()),
    }
}

fn anomalies(version: i32, anomalies: &[&Anomaly]) -> ProjectionBatch {
    ProjectionBatch {
        version,
        anomalies: anomalies.iter().map(|a| (*a).clone()).collect(),
        ..ProjectionBatch::default()
    }
}

/// Anomalies are stored once per event id whatever the redelivery (within a batch, in a later
/// batch, beside readings), read back exactly (features, no site, microseconds), by device and
/// in order; versions are independent and dropping one removes its anomalies.
pub async fn anomalies_are_stored_once_per_event_id<H: Harness>(h: &H) {
    let store = h.open().await;
    let v = 1;
    let a = anomaly_at("pump-1", at(60) + TimeDelta::microseconds(7), 0.91);
    let b = anomaly_at("pump-1", at(30), 0.75);
    let mut c = anomaly_at("fan-2", at(10), 0.8);
    (c.site, c.features) = (None, BTreeMap::new());

    let out = store.project(&anomalies(v, &[&a, &b, &a])).await.unwrap();
    assert_eq!(out.anomalies, 2, "a repeat within the batch is stored once");
    // Redelivered beside a new one and a reading: only the new one counts.
    let r = reading_at("pump-1", at(60), 80.0);
    let mut batch = anomalies(v, &[&b, &c, &a]);
    batch.readings = vec![r.clone()];
    batch.offsets = vec![offset(0, 3)];
    let out = store.project(&batch).await.unwrap();
    assert_eq!((out.anomalies, out.readings), (1, 1));
    let out = store.project(&batch).await.unwrap();
    assert_eq!((out.anomalies, out.readings, out.duplicates), (0, 0, 1));
    assert_eq!(h.scalar("SELECT count(*) FROM anomalies").await, 3);

    let all = store.anomalies(v, None).await.unwrap();
    assert_eq!(
        all,
        vec![c.clone(), b.clone(), a.clone()],
        "by device, then time"
    );
    assert_eq!(
        store.anomalies(v, Some("pump-1")).await.unwrap(),
        vec![b.clone(), a.clone()]
    );
    assert!(store.anomalies(v, Some("nobody")).await.unwrap().is_empty());

    // Another version takes the same events as new, and goes without touching version 1.
    let out = store.project(&anomalies(2, &[&a, &b])).await.unwrap();
    assert_eq!(out.anomalies, 2);
    assert_eq!(store.anomalies(v, None).await.unwrap(), all);
    assert_eq!(store.drop_projection_version(2).await.unwrap(), 2);
    assert!(store.anomalies(2, None).await.unwrap().is_empty());
    assert_eq!(store.anomalies(v, None).await.unwrap(), all);
}

/// A batch that fails stores none of its anomalies (nor anything else), and its offsets stay
/// where they were; fixed, it stores them as new. Non-finite scores and features are refused
/// before anything is written.
pub async fn anomalies_commit_with_the_offsets<H: Harness>(h: &H) {
    let store = h.open().await;
    let v = 1;
    let first = anomaly_at("dev-1", at(0), 0.9);
    let mut b = anomalies(v, &[&first]);
    b.offsets = vec![offset(0, 4)];
    assert_eq!(store.project(&b).await.unwrap().anomalies, 1);

    let second = anomaly_at("dev-1", at(60), 0.95);
    let third = anomaly_at("dev-2", at(90), 0.99);
    let r = reading_at("dev-1", at(60), 70.0);
    let mut b = anomalies(v, &[&second, &third]);
    b.readings = vec![r];
    b.offsets = vec![offset(0, -1)];
    let err = store
        .project(&b)
        .await
        .expect_err("negative offset refused");
    assert!(!err.is_transient(), "{err}");
    assert_eq!(store.anomalies(v, None).await.unwrap(), vec![first.clone()]);
    assert_eq!(store.readings_count(v).await.unwrap(), 0);
    assert_eq!(
        store.consumer_offsets(GROUP).await.unwrap(),
        vec![offset(0, 4)]
    );

    b.offsets = vec![offset(0, 6)];
    let out = store.project(&b).await.unwrap();
    assert_eq!((out.anomalies, out.readings), (2, 1));
    assert_eq!(store.anomalies(v, None).await.unwrap().len(), 3);
    assert_eq!(
        store.consumer_offsets(GROUP).await.unwrap(),
        vec![offset(0, 6)]
    );

    for bad in [
        Anomaly {
            score: f64::NAN,
            ..anomaly_at("dev-3", at(0), 0.0)
        },
        Anomaly {
            threshold: f64::INFINITY,
            ..anomaly_at("dev-3", at(0), 0.9)
        },
        Anomaly {
            features: BTreeMap::from([("x".to_owned(), f64::NEG_INFINITY)]),
            ..anomaly_at("dev-3", at(0), 0.9)
        },
    ] {
        let mut b = anomalies(v, &[&bad]);
        b.offsets = vec![offset(0, 7)];
        let err = store.project(&b).await.expect_err("not finite: refused");
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
    assert_eq!(store.anomalies(v, None).await.unwrap().len(), 3);
    assert_eq!(
        store.consumer_offsets(GROUP).await.unwrap(),
        vec![offset(0, 6)]
    );
}

/// The projector's retention removes anomalies older than it by device time, in every
/// version, and keeps the recent ones (which stay unique by event id).
pub async fn anomalies_retention_keeps_recent_ones<H: Harness>(h: &H) {
    let store = h.open().await;
    let now = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    let day = TimeDelta::days(1);
    let retention = std::time::Duration::from_secs(7 * 24 * 3600);
    let old = anomaly_at("dev-1", now - day * 8, 0.9);
    let ancient = anomaly_at("dev-2", now - day * 400, 0.9);
    let edge = anomaly_at("dev-1", now - day * 7 + TimeDelta::seconds(60), 0.9);
    let recent = anomaly_at("dev-1", now - TimeDelta::hours(1), 0.9);
    for v in [1, 2] {
        let out = store
            .project(&anomalies(v, &[&old, &ancient, &edge, &recent]))
            .await
            .unwrap();
        assert_eq!(out.anomalies, 4);
    }

    let report = store.maintain_readings(now, retention).await.unwrap();
    assert_eq!(report.anomalies_deleted, 4, "two per version: {report:?}");
    for v in [1, 2] {
        assert_eq!(
            store.anomalies(v, None).await.unwrap(),
            vec![edge.clone(), recent.clone()],
            "version {v}"
        );
    }
    let out = store
        .project(&anomalies(1, &[&edge, &recent]))
        .await
        .unwrap();
    assert_eq!(out.anomalies, 0);
    assert_eq!(
        store
            .maintain_readings(now, retention)
            .await
            .unwrap()
            .anomalies_deleted,
        0
    );
    assert_eq!(h.scalar("SELECT count(*) FROM anomalies").await, 4);
}

/// `Store::select` reads the anomalies table on both backends: UUIDs and the feature map as
/// text, times as microseconds, NULL sites, filters on text, time and UUID columns.
pub async fn select_reads_anomalies<H: Harness>(h: &H) {
    let store = h.open().await;
    let before = Utc::now() - TimeDelta::seconds(5);
    let a = anomaly_at("pump-1", at(0) + TimeDelta::microseconds(123), 0.875);
    let mut b = anomaly_at("pump-1", at(120), 1.5);
    b.site = None;
    let c = anomaly_at("fan-2", at(60), 0.9);
    store.project(&anomalies(1, &[&a, &b, &c])).await.unwrap();
    store.project(&anomalies(2, &[&a])).await.unwrap();
    let after = Utc::now() + TimeDelta::seconds(5);

    let columns: Vec<(String, ColumnType)> = [
        ("version", ColumnType::Int),
        ("event_id", ColumnType::Uuid),
        ("input_event_id", ColumnType::Uuid),
        ("device_id", ColumnType::Text),
        ("at", ColumnType::Timestamp),
        ("score", ColumnType::Float),
        ("threshold", ColumnType::Float),
        ("model_name", ColumnType::Text),
        ("model_version", ColumnType::Text),
        ("features", ColumnType::Json),
        ("site", ColumnType::Text),
        ("projected_at", ColumnType::Timestamp),
    ]
    .into_iter()
    .map(|(c, t)| (c.to_owned(), t))
    .collect();
    let select = |filters: Vec<Filter>| Select {
        table: "anomalies".into(),
        columns: columns.clone(),
        filters,
        limit: None,
    };
    let eq = |column: &str, value: Value| Filter {
        column: column.into(),
        op: Op::Eq,
        value,
    };

    let got = store
        .select(&select(vec![
            eq("version", Value::Int(1)),
            eq("device_id", Value::Text("pump-1".into())),
            Filter {
                column: "at".into(),
                op: Op::GtEq,
                value: Value::Timestamp(at(60)),
            },
        ]))
        .await
        .unwrap();
    let one = |c: &Column| c.len();
    assert!(got.iter().all(|c| one(c) == 1), "only b: {got:?}");
    assert_eq!(got[0], Column::Int(vec![Some(1)]));
    assert_eq!(got[1], Column::Text(vec![Some(b.event_id.to_string())]));
    assert_eq!(
        got[2],
        Column::Text(vec![Some(b.input_event_id.to_string())])
    );
    assert_eq!(got[3], Column::Text(vec![Some("pump-1".into())]));
    assert_eq!(
        got[4],
        Column::Timestamp(vec![Some(b.at.timestamp_micros())])
    );
    assert_eq!(got[5], Column::Float(vec![Some(1.5)]));
    assert_eq!(got[6], Column::Float(vec![Some(0.7)]));
    assert_eq!(got[7], Column::Text(vec![Some("anomaly-iforest".into())]));
    assert_eq!(got[8], Column::Text(vec![Some("3".into())]));
    let Column::Text(features) = &got[9] else {
        panic!("features as text: {got:?}");
    };
    let features: BTreeMap<String, f64> =
        serde_json::from_str(features[0].as_deref().unwrap()).unwrap();
    assert_eq!(features, b.features);
    assert_eq!(got[10], Column::Text(vec![None]), "no site is NULL");
    let Column::Timestamp(projected) = &got[11] else {
        panic!("projected_at as a time: {got:?}");
    };
    let projected = projected[0].unwrap();
    assert!(
        (before.timestamp_micros()..=after.timestamp_micros()).contains(&projected),
        "projected_at is when it was stored: {projected}"
    );

    // By event id (a UUID column compared as text), in every version.
    let got = store
        .select(&select(vec![eq(
            "event_id",
            Value::Text(a.event_id.to_string()),
        )]))
        .await
        .unwrap();
    let Column::Int(versions) = &got[0] else {
        panic!("{got:?}");
    };
    let mut versions = versions.clone();
    versions.sort();
    assert_eq!(versions, vec![Some(1), Some(2)]);
    assert_eq!(
        got[4],
        Column::Timestamp(vec![Some(a.at.timestamp_micros()); 2]),
        "microseconds kept"
    );

    let all = store.select(&select(vec![])).await.unwrap();
    assert_eq!(all[0].len(), 4);
}

/// A rebuild's version: writers write live and building, a second rebuild is refused, a
/// resumed job gets its version back, the switch is atomic and carries the anomalies over, and
/// the retired version's rows go.
pub async fn projection_versions_rebuild_and_switch<H: Harness>(h: &H) {
    let store = h.open().await;
    assert_eq!(store.projection_targets("projector", 1).await.unwrap(), [1]);
    assert_eq!(store.live_version("projector", 1).await.unwrap(), 1);
    let a = reading_at("dev-1", at(0), 1.0);
    let alarm = anomaly_at("dev-1", at(0), 0.9);
    store.project(&readings(1, &[&a])).await.unwrap();
    store.project(&anomalies(1, &[&alarm])).await.unwrap();
    // Leftovers under the next number (an earlier crashed rebuild) are cleared.
    store.project(&readings(2, &[&a])).await.unwrap();

    let v = store
        .begin_projection_version("projector", 1, "job-a")
        .await
        .unwrap();
    assert_eq!(v, 2);
    assert_eq!(store.readings_count(2).await.unwrap(), 0, "cleared");
    assert_eq!(
        store.projection_targets("projector", 1).await.unwrap(),
        [1, 2]
    );
    assert_eq!(store.live_version("projector", 1).await.unwrap(), 1);
    assert_eq!(
        store
            .begin_projection_version("projector", 1, "job-a")
            .await
            .unwrap(),
        2,
        "a resumed job gets its version back"
    );
    let err = store
        .begin_projection_version("projector", 1, "job-b")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("job-a"), "{err}");
    assert!(
        store
            .switch_projection_version("projector", 3, "op")
            .await
            .is_err(),
        "only the building version can go live"
    );

    let b = reading_at("dev-1", at(60), 2.0);
    for version in [2, 1] {
        store.project(&readings(version, &[&a, &b])).await.unwrap();
    }
    let retired = store
        .switch_projection_version("projector", 2, "key:op")
        .await
        .unwrap();
    assert_eq!(retired, 1);
    assert_eq!(store.projection_targets("projector", 1).await.unwrap(), [2]);
    assert_eq!(store.live_version("projector", 1).await.unwrap(), 2);
    assert_eq!(
        store.anomalies(2, None).await.unwrap(),
        store.anomalies(1, None).await.unwrap(),
        "anomalies carried over"
    );
    assert_eq!(
        store.rollups(2, Resolution::Minute, None).await.unwrap(),
        store.rollups(1, Resolution::Minute, None).await.unwrap()
    );
    let audit = store
        .audit_log(Some("projection:projector"), 10)
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].detail, json!({"from": 1, "to": 2}));

    assert!(store.drop_retired_version("projector", 1).await.unwrap() > 0);
    assert_eq!(store.readings_count(1).await.unwrap(), 0);
    let states: Vec<(i32, VersionState)> = store
        .projection_versions("projector")
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.state))
        .collect();
    assert_eq!(states, [(2, VersionState::Live)]);

    // The next rebuild takes 3; abandoning it leaves the live one alone.
    let v3 = store
        .begin_projection_version("projector", 1, "job-c")
        .await
        .unwrap();
    assert_eq!(v3, 3);
    store.project(&readings(3, &[&a])).await.unwrap();
    store
        .abandon_projection_version("projector", 3)
        .await
        .unwrap();
    assert_eq!(store.readings_count(3).await.unwrap(), 0);
    assert_eq!(store.projection_targets("projector", 1).await.unwrap(), [2]);
    assert_eq!(store.readings_count(2).await.unwrap(), 2);
}

/// Replay jobs: created running with an audit row, progress reports the state (so a worker
/// sees a cancel), a crashed job is resumed only once its heartbeat is stale, finished jobs
/// stay finished.
pub async fn replay_jobs_progress_resume_and_cancel<H: Harness>(h: &H) {
    use sluice_store::{JobState, NewReplayJob};
    let store = h.open().await;
    let new = |id: &str| NewReplayJob {
        job_id: id.into(),
        created_by: "local:alice".into(),
        selection: json!({"types": ["sensor.reading"]}),
        target: "topic:events.sensor-reading".into(),
        total: 10,
    };
    let job = store.create_replay_job(&new("j1")).await.unwrap();
    assert_eq!(
        (job.state, job.total, job.done, job.cursor),
        (JobState::Running, 10, 0, 0)
    );
    assert!(
        store.create_replay_job(&new("j1")).await.is_err(),
        "ids are unique"
    );
    assert_eq!(
        store.replay_job_progress("j1", 41, 4).await.unwrap(),
        JobState::Running
    );
    let job = store.replay_job("j1").await.unwrap().unwrap();
    assert_eq!((job.cursor, job.done), (41, 4));

    // A live worker keeps the job: resume is refused until the heartbeat is stale.
    let err = store
        .resume_replay_job("j1", "local:bob", Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("heard of"), "{err}");
    let resumed = store
        .resume_replay_job("j1", "local:bob", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        (resumed.state, resumed.cursor, resumed.done),
        (JobState::Running, 41, 4)
    );

    // Cancel: a running job is asked; its worker sees it and finishes as cancelled.
    assert_eq!(
        store
            .cancel_replay_job("j1", "local:carol", Duration::from_secs(60))
            .await
            .unwrap(),
        JobState::Cancelling
    );
    assert_eq!(
        store.replay_job_progress("j1", 50, 5).await.unwrap(),
        JobState::Cancelling
    );
    store
        .finish_replay_job("j1", JobState::Cancelled, None)
        .await
        .unwrap();
    assert!(
        store
            .resume_replay_job("j1", "local:bob", Duration::ZERO)
            .await
            .is_err(),
        "a cancelled job stays cancelled"
    );
    assert_eq!(
        store.replay_job_progress("j1", 60, 6).await.unwrap(),
        JobState::Cancelled,
        "no progress after the end"
    );
    assert_eq!(store.replay_job("j1").await.unwrap().unwrap().cursor, 50);

    // A failed job resumes at once and keeps its cursor; listing is newest first.
    store.create_replay_job(&new("j2")).await.unwrap();
    store.replay_job_progress("j2", 7, 1).await.unwrap();
    store
        .finish_replay_job("j2", JobState::Failed, Some("broker down"))
        .await
        .unwrap();
    let j2 = store.replay_job("j2").await.unwrap().unwrap();
    assert_eq!(
        (j2.state, j2.error.as_deref()),
        (JobState::Failed, Some("broker down"))
    );
    let j2 = store
        .resume_replay_job("j2", "local:bob", Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        (j2.state, j2.cursor, j2.error),
        (JobState::Running, 7, None)
    );
    let ids: Vec<String> = store
        .replay_jobs(10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(store.replay_job("nope").await.unwrap().is_none());

    let actions: Vec<String> = store
        .audit_log(None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.target == "replay:j1")
        .map(|a| format!("{} {}", a.who, a.action))
        .collect();
    assert_eq!(
        actions,
        [
            "local:alice replay.start",
            "local:bob replay.resume",
            "local:carol replay.cancel"
        ]
    );
}
