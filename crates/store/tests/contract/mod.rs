//! The store contract: one body per behaviour, run against every backend by the test files
//! beside this module (`postgres.rs`, `sqlite.rs`). A body gets a harness on a fresh, empty
//! database of its own.

// Each test binary runs the bodies its backend supports.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use sluice_core::{Event, EventType, Metadata, Source, TraceContext};
use sluice_runtime::{DeadLetter, DlqSink};
use sluice_store::{
    AppendBatch, AppendEvent, Backend, ConsumerOffset, DlqCount, DlqFilter, DlqStatus, EventQuery,
    NewDeadLetter, Store,
};
use uuid::Uuid;

mod actions;
mod keys;
mod projections;
pub use actions::*;
pub use keys::*;
pub use projections::*;

/// A fresh database, and ways to reach it from outside the store under test.
pub trait Harness: Sync {
    /// A new store on the database (like another process would open), not migrated.
    fn connect(&self) -> impl Future<Output = Store> + Send;
    /// Runs `sql` directly on the database; the error as text.
    fn exec(&self, sql: &str) -> impl Future<Output = Result<u64, String>> + Send;
    /// Runs a query returning one integer directly on the database.
    fn scalar(&self, sql: &str) -> impl Future<Output = i64> + Send;
    /// Runs a query returning one byte string directly on the database.
    fn blob(&self, sql: &str) -> impl Future<Output = Vec<u8>> + Send;

    /// A new, migrated store.
    fn open(&self) -> impl Future<Output = Store> + Send {
        async {
            let store = self.connect().await;
            store.migrate().await.expect("migrate");
            store
        }
    }
}

/// Now, at the store's precision.
pub fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

pub fn reading(aggregate: &str, seq: u64, ingested_at: DateTime<Utc>) -> Event {
    Event {
        event_id: Uuid::new_v4(),
        event_type: EventType::new("sensor.reading").unwrap(),
        aggregate_id: aggregate.to_owned(),
        occurred_at: ingested_at - TimeDelta::milliseconds(250),
        ingested_at,
        payload: json!({"seq": seq, "temperature_c": 21.5 + seq as f64 / 10.0}),
        metadata: Metadata::from_source(Source::Mqtt),
    }
}

/// The outbox message of `e`: the value names the aggregate and the sequence number, so a
/// drain can check per-aggregate order from the outbox alone.
pub fn publish(e: Event) -> AppendEvent {
    let seq = e.payload["seq"].as_u64().unwrap_or(0);
    AppendEvent {
        topic: e.event_type.default_topic(),
        key: e.aggregate_id.as_bytes().to_vec(),
        value: format!("{}:{seq}", e.aggregate_id).into_bytes(),
        event: e,
    }
}

pub fn batch(events: impl IntoIterator<Item = Event>) -> AppendBatch {
    AppendBatch {
        events: events.into_iter().map(publish).collect(),
        ..AppendBatch::default()
    }
}

fn offset(group: &str, topic: &str, partition: i32, next_offset: i64) -> ConsumerOffset {
    ConsumerOffset {
        group: group.into(),
        topic: topic.into(),
        partition,
        next_offset,
    }
}

fn ids(events: &[Event]) -> Vec<Uuid> {
    events.iter().map(|e| e.event_id).collect()
}

/// A small deterministic generator, so failures reproduce.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

// ---- migrations ------------------------------------------------------------------------------

pub async fn migrations_are_idempotent_and_safe_concurrently<H: Harness>(h: &H) {
    let (a, b) = (h.connect().await, h.connect().await);
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.expect("first concurrent migrate");
    rb.expect("second concurrent migrate");
    a.migrate().await.expect("migrating again changes nothing");
    let e = reading("dev-1", 1, now());
    let out = b.append(&batch([e.clone()])).await.unwrap();
    assert_eq!(out.appended.len(), 1);
    assert_eq!(a.event_by_id(e.event_id).await.unwrap().unwrap().event, e);

    // A database migrated by other files than ours is a schema mismatch: fatal, not retried.
    let tamper = match a.backend() {
        Backend::Postgres => {
            "UPDATE _sqlx_migrations SET checksum = '\\x00'::bytea WHERE version = 1"
        }
        Backend::Sqlite => "UPDATE _sqlx_migrations SET checksum = x'00' WHERE version = 1",
    };
    assert_eq!(h.exec(tamper).await.unwrap(), 1);
    let err = a
        .migrate()
        .await
        .expect_err("a changed migration is refused");
    assert!(!err.is_transient(), "schema mismatch must be fatal: {err}");
}

// ---- events ----------------------------------------------------------------------------------

pub async fn append_round_trips_events<H: Harness>(h: &H) {
    let store = h.open().await;
    let t = now();
    let mut events = Vec::new();
    for i in 0..6u64 {
        let mut e = reading(
            &format!("dev-{}", i % 2),
            i,
            t + TimeDelta::microseconds(i as i64),
        );
        e.occurred_at = DateTime::from_timestamp_micros(1_700_000_000_123_456 + i as i64).unwrap();
        events.push(e);
    }
    events[1].payload = json!({
        "nested": {"list": [1, -2, 3.25, null, true], "text": "Grüße \"quoted\" ✓"},
        "big": u64::MAX,
        "small": -9_007_199_254_740_993_i64,
        "float": 0.1 + 0.2,
        "tiny": 1e-300,
    });
    events[2].event_type = EventType::new("device.status").unwrap();
    events[3].metadata = Metadata {
        source: Source::Processor("inferencer".into()),
        trace: Some(
            TraceContext::new(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("vendor=x".into()),
            )
            .unwrap(),
        ),
        schema_version: Some(7),
        causation_id: Some(Uuid::new_v4()),
        replay: None,
    };

    let out = store.append(&batch(events.clone())).await.unwrap();
    assert!(out.duplicates.is_empty());
    assert_eq!(
        out.appended.iter().map(|a| a.event_id).collect::<Vec<_>>(),
        ids(&events)
    );
    let positions: Vec<i64> = out.appended.iter().map(|a| a.position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions follow batch order: {positions:?}"
    );

    for (e, a) in events.iter().zip(&out.appended) {
        let got = store
            .event_by_id(e.event_id)
            .await
            .unwrap()
            .expect("stored");
        assert_eq!(got.event, *e, "round trip of {}", e.event_id);
        assert_eq!(got.position, a.position);
    }
    assert!(store.event_by_id(Uuid::new_v4()).await.unwrap().is_none());
    assert_eq!(store.event_count().await.unwrap(), 6);

    let all = store.events_after(0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|s| s.event.clone()).collect::<Vec<_>>(),
        events
    );
    let page = store.events_after(positions[1], 2).await.unwrap();
    assert_eq!(
        page.iter().map(|s| s.position).collect::<Vec<_>>(),
        positions[2..4]
    );

    // Filters: type, aggregate, time range (ingested_at, [from, to)), and paging.
    let q = |f: &dyn Fn(&mut EventQuery)| {
        let mut q = EventQuery::default();
        f(&mut q);
        q
    };
    let by_type = store
        .events_in_range(&q(&|q| {
            q.event_types = vec![EventType::new("device.status").unwrap()]
        }))
        .await
        .unwrap();
    assert_eq!(by_type.len(), 1);
    assert_eq!(by_type[0].event, events[2]);
    let by_agg = store
        .events_in_range(&q(&|q| q.aggregate_ids = vec!["dev-1".into()]))
        .await
        .unwrap();
    let two = q(&|q| {
        q.aggregate_ids = vec!["dev-1".into(), "dev-0".into()];
        q.event_types = vec![
            EventType::new("sensor.reading").unwrap(),
            EventType::new("device.status").unwrap(),
        ];
    });
    assert_eq!(
        store.events_in_range(&two).await.unwrap().len() as u64,
        store.count_events(&two).await.unwrap()
    );
    assert_eq!(
        store.count_events(&EventQuery::default()).await.unwrap(),
        events.len() as u64
    );
    assert_eq!(
        by_agg.iter().map(|s| s.event.event_id).collect::<Vec<_>>(),
        vec![events[1].event_id, events[3].event_id, events[5].event_id]
    );
    let (from, to) = (events[2].ingested_at, events[4].ingested_at);
    let in_time = store
        .events_in_range(&q(&|q| {
            q.from = Some(from);
            q.to = Some(to);
        }))
        .await
        .unwrap();
    assert_eq!(
        in_time.iter().map(|s| s.event.event_id).collect::<Vec<_>>(),
        vec![events[2].event_id, events[3].event_id]
    );
    let paged = store
        .events_in_range(&q(&|q| {
            q.aggregate_ids = vec!["dev-0".into()];
            q.after_position = positions[0];
            q.limit = 1;
        }))
        .await
        .unwrap();
    assert_eq!(paged.len(), 1);
    assert_eq!(paged[0].event, events[2]);
}

pub async fn duplicates_are_skipped_and_reported<H: Harness>(h: &H) {
    let store = h.open().await;
    let t = now();
    let a = reading("dev-1", 1, t);
    let b = reading("dev-1", 2, t);
    let mut a_again = reading("dev-1", 99, t);
    a_again.event_id = a.event_id;

    let out = store
        .append(&batch([a.clone(), b.clone(), a_again.clone()]))
        .await
        .unwrap();
    assert_eq!(
        out.appended.iter().map(|x| x.event_id).collect::<Vec<_>>(),
        vec![a.event_id, b.event_id]
    );
    assert_eq!(out.duplicates, vec![a.event_id], "repeat within the batch");
    assert_eq!(
        store.event_by_id(a.event_id).await.unwrap().unwrap().event,
        a,
        "the first occurrence is the one stored"
    );

    let c = reading("dev-2", 1, t);
    let out = store
        .append(&batch([b.clone(), c.clone(), a.clone()]))
        .await
        .unwrap();
    assert_eq!(
        out.appended.iter().map(|x| x.event_id).collect::<Vec<_>>(),
        vec![c.event_id]
    );
    assert_eq!(
        out.duplicates,
        vec![b.event_id, a.event_id],
        "repeats across batches"
    );

    assert_eq!(store.event_count().await.unwrap(), 3);
    let outbox = store.outbox_fetch(100).await.unwrap();
    assert_eq!(
        outbox.iter().map(|o| o.event_id).collect::<Vec<_>>(),
        vec![a.event_id, b.event_id, c.event_id],
        "one outbox entry per newly stored event, none for duplicates"
    );
    assert_eq!(
        outbox[0].value, b"dev-1:1",
        "the first occurrence's message"
    );
}

/// Several stores appending the same ids at once, each in its own order: every id is stored
/// once, reported new exactly once, and no append fails (no deadlock between them).
pub async fn concurrent_appends_of_the_same_ids_store_each_once<H: Harness>(h: &H) {
    const N: u64 = 1000;
    let store = h.open().await;
    let t = now();
    let events: Vec<Event> = (0..N)
        .map(|i| reading(&format!("dev-{}", i % 6), i, t))
        .collect();
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(4));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..4u64 {
        let store = h.connect().await;
        // Warm up (connections, partitions), so the contended appends start together.
        store
            .append(&batch([reading("warm-up", w, t)]))
            .await
            .unwrap();
        let mut mine = events.clone();
        let mut rng = Lcg(w + 1);
        for i in (1..mine.len()).rev() {
            mine.swap(i, rng.next(i as u64 + 1) as usize);
        }
        let start = start.clone();
        tasks.spawn(async move {
            start.wait().await;
            store.append(&batch(mine)).await
        });
    }
    let mut new = HashMap::<Uuid, usize>::new();
    while let Some(r) = tasks.join_next().await {
        let out = r.unwrap().expect("concurrent append");
        assert_eq!((out.appended.len() + out.duplicates.len()) as u64, N);
        for a in out.appended {
            *new.entry(a.event_id).or_default() += 1;
        }
    }
    assert_eq!(new.len() as u64, N);
    assert!(
        new.values().all(|&n| n == 1),
        "each id reported new exactly once"
    );
    assert_eq!(store.event_count().await.unwrap(), N + 4);
    assert_eq!(store.outbox_depth().await.unwrap(), N + 4);
}

pub async fn events_are_append_only<H: Harness>(h: &H) {
    let store = h.open().await;
    let e = reading("dev-1", 1, now());
    store.append(&batch([e.clone()])).await.unwrap();
    let err = h
        .exec("UPDATE events SET aggregate_id = 'tampered'")
        .await
        .expect_err("an UPDATE of events is refused");
    assert!(err.contains("append-only"), "{err}");
    assert_eq!(
        store.event_by_id(e.event_id).await.unwrap().unwrap().event,
        e
    );
}

// ---- transactions ----------------------------------------------------------------------------

pub async fn a_failed_append_stores_nothing<H: Harness>(h: &H) {
    let store = h.open().await;
    let t = now();
    let events: Vec<Event> = (0..3).map(|i| reading("dev-1", i, t)).collect();
    let mut b = batch(events.clone());
    b.dead_letters
        .push(letter("validator", "schema", b"{}".to_vec(), t).into());
    // The offset is checked by the database, after the events and the outbox were written:
    // the whole transaction must roll back.
    b.offsets.push(offset("g", "ingest.raw", 0, -1));
    let err = store.append(&b).await.expect_err("negative offset refused");
    assert!(
        !err.is_transient(),
        "a constraint violation is fatal: {err}"
    );

    assert_eq!(store.event_count().await.unwrap(), 0, "no event");
    assert_eq!(store.outbox_depth().await.unwrap(), 0, "no outbox entry");
    assert!(
        store.dlq_counts().await.unwrap().is_empty(),
        "no dead letter"
    );
    assert!(
        store.consumer_offsets("g").await.unwrap().is_empty(),
        "no offset"
    );

    // The ids were not claimed either: the same batch, fixed, stores every event as new.
    b.offsets[0].next_offset = 3;
    let out = store.append(&b).await.unwrap();
    assert_eq!(out.appended.len(), 3);
    assert!(out.duplicates.is_empty());
    assert_eq!(out.dead_letter_ids.len(), 1);
    assert_eq!(store.outbox_depth().await.unwrap(), 3);
}

pub async fn offsets_commit_with_the_batch<H: Harness>(h: &H) {
    let store = h.open().await;
    let t = now();
    let e1 = reading("dev-1", 1, t);
    let mut b = batch([e1.clone()]);
    b.offsets = vec![
        offset("validator", "ingest.raw", 0, 10),
        offset("validator", "ingest.raw", 1, 4),
        offset("validator", "ingest.raw", 0, 12), // the last one for a partition wins
        offset("other", "ingest.raw", 0, 7),
    ];
    store.append(&b).await.unwrap();
    assert_eq!(
        store.consumer_offsets("validator").await.unwrap(),
        vec![
            offset("validator", "ingest.raw", 0, 12),
            offset("validator", "ingest.raw", 1, 4),
        ]
    );
    assert_eq!(
        store.consumer_offsets("other").await.unwrap(),
        vec![offset("other", "ingest.raw", 0, 7)]
    );
    assert!(store.consumer_offsets("nobody").await.unwrap().is_empty());

    // Redelivery after a crash: the events are duplicates, but the offsets still move on.
    let mut again = batch([e1]);
    again.offsets = vec![offset("validator", "ingest.raw", 1, 9)];
    let out = store.append(&again).await.unwrap();
    assert!(out.appended.is_empty());
    assert_eq!(
        store.consumer_offsets("validator").await.unwrap(),
        vec![
            offset("validator", "ingest.raw", 0, 12),
            offset("validator", "ingest.raw", 1, 9),
        ]
    );

    // Offsets alone.
    let only = AppendBatch {
        offsets: vec![offset("validator", "events.x", 2, 1)],
        ..AppendBatch::default()
    };
    store.append(&only).await.unwrap();
    assert_eq!(store.consumer_offsets("validator").await.unwrap().len(), 3);
}

// ---- outbox ----------------------------------------------------------------------------------

pub async fn outbox_fetch_delete_and_failures<H: Harness>(h: &H) {
    let store = h.open().await;
    let t = now();
    let first: Vec<Event> = (0..3).map(|i| reading("dev-a", i, t)).collect();
    let second: Vec<Event> = (3..5).map(|i| reading("dev-b", i, t)).collect();
    store.append(&batch(first.clone())).await.unwrap();
    store.append(&batch(second.clone())).await.unwrap();
    let all: Vec<Event> = first.iter().chain(&second).cloned().collect();

    assert_eq!(store.outbox_depth().await.unwrap(), 5);
    let got = store.outbox_fetch(3).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.windows(2).all(|w| w[0].id < w[1].id), "ordered by id");
    for (o, e) in got.iter().zip(&all) {
        assert_eq!(o.event_id, e.event_id);
        assert_eq!(o.aggregate_id, e.aggregate_id);
        assert_eq!(o.topic, "events.sensor-reading");
        assert_eq!(o.key, e.aggregate_id.as_bytes());
        assert_eq!(o.value, publish(e.clone()).value);
        assert_eq!((o.attempts, o.last_error.as_deref()), (0, None));
    }

    let failed = [got[0].id, got[1].id];
    assert_eq!(
        store
            .outbox_record_failure(&failed, "broker down")
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .outbox_record_failure(&failed[..1], "still down")
            .await
            .unwrap(),
        1
    );
    let again = store.outbox_fetch(3).await.unwrap();
    assert_eq!(
        again.iter().map(|o| o.id).collect::<Vec<_>>(),
        got.iter().map(|o| o.id).collect::<Vec<_>>(),
        "failed entries stay, in place"
    );
    assert_eq!(
        (again[0].attempts, again[0].last_error.as_deref()),
        (2, Some("still down"))
    );
    assert_eq!(
        (again[1].attempts, again[1].last_error.as_deref()),
        (1, Some("broker down"))
    );
    assert_eq!(
        (again[2].attempts, again[2].last_error.as_deref()),
        (0, None)
    );

    let published: Vec<i64> = got.iter().map(|o| o.id).collect();
    assert_eq!(store.outbox_delete(&published).await.unwrap(), 3);
    assert_eq!(
        store.outbox_delete(&published).await.unwrap(),
        0,
        "already gone"
    );
    assert_eq!(store.outbox_delete(&[]).await.unwrap(), 0);
    assert_eq!(store.outbox_depth().await.unwrap(), 2);
    let rest = store.outbox_fetch(10).await.unwrap();
    assert_eq!(
        rest.iter().map(|o| o.event_id).collect::<Vec<_>>(),
        ids(&second)
    );
    // The events themselves are untouched by the outbox.
    assert_eq!(store.event_count().await.unwrap(), 5);
}

pub async fn listener_wakes_on_append<H: Harness>(h: &H) {
    let store = h.open().await;
    let mut listener = store.outbox_listener().await.unwrap();
    assert!(
        !listener.wait(Duration::from_millis(300)).await.unwrap(),
        "nothing appended, no wake-up"
    );

    // The wait is polled first, so it is already waiting when the append commits.
    let one = batch([reading("dev-1", 1, now())]);
    let started = std::time::Instant::now();
    let (woken, appended) =
        tokio::join!(listener.wait(Duration::from_secs(10)), store.append(&one));
    appended.unwrap();
    assert!(woken.unwrap(), "an append wakes the listener");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Postgres wakes listeners of every process; SQLite only those of the same store.
    if store.backend() == Backend::Postgres {
        let other = h.connect().await;
        other
            .append(&batch([reading("dev-2", 1, now())]))
            .await
            .unwrap();
        assert!(
            listener.wait(Duration::from_secs(10)).await.unwrap(),
            "another process's append wakes the listener"
        );
    }

    // A batch with offsets only wrote nothing to publish.
    let only = AppendBatch {
        offsets: vec![offset("g", "t", 0, 1)],
        ..AppendBatch::default()
    };
    store.append(&only).await.unwrap();
    assert!(
        !listener.wait(Duration::from_millis(300)).await.unwrap(),
        "no outbox rows, no wake-up"
    );

    // Wake-ups that arrive while nobody waits are not lost.
    store
        .append(&batch([reading("dev-1", 2, now())]))
        .await
        .unwrap();
    store
        .append(&batch([reading("dev-1", 3, now())]))
        .await
        .unwrap();
    assert!(listener.wait(Duration::from_secs(10)).await.unwrap());
}

/// Eight writers own distinct aggregates and append small batches, each holding its
/// transaction open for a random time so that commits come out of id order, while a drain
/// repeatedly fetches, records and deletes. Every event is drained exactly once, and each
/// aggregate's events in the order they were appended.
pub async fn concurrent_writers_drain_exactly_once_in_order<H: Harness>(h: &H) {
    const WRITERS: u64 = 8;
    const BATCHES: u64 = 20;
    const AGGREGATES: u64 = 3;
    let store = h.open().await;
    let mut listener = store.outbox_listener().await.unwrap();

    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.spawn(async move {
            let mut rng = Lcg(w * 7 + 3);
            let mut seq = [0u64; AGGREGATES as usize];
            let mut appended = Vec::new();
            for _ in 0..BATCHES {
                let n = 1 + rng.next(5);
                let events: Vec<Event> = (0..n)
                    .map(|_| {
                        let a = rng.next(AGGREGATES) as usize;
                        seq[a] += 1;
                        reading(&format!("w{w}-a{a}"), seq[a], now())
                    })
                    .collect();
                let hold = Duration::from_millis(rng.next(15));
                let out = store
                    .append_with_delay(&batch(events.clone()), hold)
                    .await
                    .expect("append");
                assert_eq!(out.appended.len(), events.len());
                appended.extend(events.into_iter().map(|e| e.event_id));
            }
            appended
        });
    }

    let mut drained: HashMap<Uuid, usize> = HashMap::new();
    let mut per_aggregate: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut highest_id = 0;
    let mut out_of_order = 0;
    let mut appended = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(std::time::Instant::now() < deadline, "drain did not finish");
        let entries = store.outbox_fetch(50).await.unwrap();
        if entries.is_empty() {
            if writers.is_empty() {
                break;
            }
            while let Some(r) = writers.try_join_next() {
                appended.extend(r.unwrap());
            }
            // Like the relay: wake on the next append, or soon, to see writers finish.
            listener.wait(Duration::from_millis(20)).await.unwrap();
            continue;
        }
        for e in &entries {
            if e.id < highest_id {
                // Committed after a higher id was already drained: a relay reading
                // "id > last seen" would have skipped it.
                out_of_order += 1;
            }
            highest_id = highest_id.max(e.id);
            *drained.entry(e.event_id).or_default() += 1;
            let value = String::from_utf8(e.value.clone()).unwrap();
            let (aggregate, seq) = value.rsplit_once(':').unwrap();
            per_aggregate
                .entry(aggregate.to_owned())
                .or_default()
                .push(seq.parse().unwrap());
        }
        let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
        assert_eq!(store.outbox_delete(&ids).await.unwrap(), ids.len() as u64);
    }
    while let Some(r) = writers.join_next().await {
        appended.extend(r.unwrap());
    }

    assert_eq!(drained.len(), appended.len(), "every event drained");
    assert!(
        appended.iter().all(|id| drained.get(id) == Some(&1)),
        "each exactly once"
    );
    for (aggregate, seqs) in &per_aggregate {
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, &expected, "{aggregate} drained in append order");
    }
    assert_eq!(store.outbox_depth().await.unwrap(), 0);
    assert_eq!(store.event_count().await.unwrap(), appended.len() as u64);
    if store.backend() == Backend::Postgres {
        // SQLite has one writer, so its commits follow id order; Postgres's must not have,
        // or this test did not exercise what it is for.
        assert!(
            out_of_order > 0,
            "no commit came out of id order; the test proved nothing"
        );
    }
}

// ---- DLQ -------------------------------------------------------------------------------------

fn letter(
    processor: &str,
    class: &'static str,
    raw: Vec<u8>,
    failed_at: DateTime<Utc>,
) -> DeadLetter {
    DeadLetter {
        processor: processor.into(),
        event_id: None,
        topic: "ingest.raw".into(),
        partition: 2,
        offset: 41,
        schema_id: None,
        raw,
        key: Some(b"dev-1".to_vec()),
        headers: vec![("source".into(), b"mqtt".to_vec())],
        error_class: class,
        error_message: format!("{class} failed"),
        attempts: 3,
        failed_at,
    }
}

pub async fn dead_letters_round_trip<H: Harness>(h: &H) {
    let store = h.open().await;
    let t0 = now() - TimeDelta::hours(1);
    // Nanoseconds are cut to the store's microseconds.
    let t1 = DateTime::from_timestamp(t0.timestamp(), 123_456_789).unwrap();
    let avro = vec![0u8, 0, 0, 0, 1, 0xff, 0xfe, 0x00, 0x80];

    let mut l1 = letter("validator", "decode", avro.clone(), t1);
    l1.schema_id = Some(u32::MAX);
    let mut l2 = letter(
        "validator",
        "schema",
        br#"{"temp": "hot"}"#.to_vec(),
        t0 + TimeDelta::minutes(10),
    );
    l2.event_id = Some(Uuid::new_v4());
    l2.offset = i64::MAX;
    // Valid JSON that jsonb cannot hold: stored without a decoded form, never refused.
    let l3 = letter(
        "projector",
        "decode",
        br#"{"bad": "nul\u0000"}"#.to_vec(),
        t0 + TimeDelta::minutes(20),
    );
    let l4 = letter(
        "projector",
        "range",
        vec![1, 2, 3],
        t0 + TimeDelta::minutes(30),
    );

    let id1 = store.dlq_put(l1.clone()).await.unwrap();
    DlqSink::put(&store, l2.clone()).await.unwrap();
    let id3 = store.dlq_put(l3.clone()).await.unwrap();
    let with_batch = AppendBatch {
        dead_letters: vec![NewDeadLetter {
            letter: l4.clone(),
            decoded: Some(json!({"reading": 1e9})),
        }],
        ..AppendBatch::default()
    };
    let id4 = store.append(&with_batch).await.unwrap().dead_letter_ids[0];

    let all = store.dlq_list(&DlqFilter::default()).await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(all.windows(2).all(|w| w[0].dlq_id < w[1].dlq_id));
    let id2 = all[1].dlq_id;
    assert_eq!(
        [all[0].dlq_id, all[2].dlq_id, all[3].dlq_id],
        [id1, id3, id4]
    );

    let e1 = store.dlq_get(id1).await.unwrap().unwrap();
    assert_eq!(e1.raw, avro, "raw bytes exactly");
    assert_eq!(e1.decoded, None, "not JSON");
    assert_eq!(e1.schema_id, Some(u32::MAX));
    assert_eq!(
        e1.failed_at,
        DateTime::from_timestamp_micros(t1.timestamp_micros()).unwrap()
    );
    assert_eq!(
        (
            e1.processor.as_str(),
            e1.topic.as_str(),
            e1.partition,
            e1.offset
        ),
        ("validator", "ingest.raw", 2, 41)
    );
    assert_eq!(
        (e1.error_class.as_str(), e1.error_message.as_str()),
        ("decode", "decode failed")
    );
    assert_eq!(
        (e1.attempts, e1.status, e1.event_id),
        (3, DlqStatus::Pending, None)
    );
    assert_eq!(
        (e1.status_changed_by.as_deref(), e1.status_changed_at),
        (None, None)
    );
    let e2 = store.dlq_get(id2).await.unwrap().unwrap();
    assert_eq!(
        e2.decoded,
        Some(json!({"temp": "hot"})),
        "JSON raw bytes are decoded"
    );
    assert_eq!((e2.event_id, e2.offset), (l2.event_id, i64::MAX));
    let e3 = store.dlq_get(id3).await.unwrap().unwrap();
    assert_eq!(
        (e3.raw.as_slice(), e3.decoded.as_ref()),
        (l3.raw.as_slice(), None)
    );
    let e4 = store.dlq_get(id4).await.unwrap().unwrap();
    assert_eq!(
        e4.decoded,
        Some(json!({"reading": 1e9})),
        "the caller's decoded form"
    );
    assert!(store.dlq_get(id4 + 1000).await.unwrap().is_none());

    let list = |f: DlqFilter| {
        let store = store.clone();
        async move {
            store
                .dlq_list(&f)
                .await
                .unwrap()
                .iter()
                .map(|e| e.dlq_id)
                .collect::<Vec<_>>()
        }
    };
    let by_processor = DlqFilter {
        processor: Some("validator".into()),
        ..DlqFilter::default()
    };
    assert_eq!(list(by_processor).await, vec![id1, id2]);
    let by_class = DlqFilter {
        error_class: Some("decode".into()),
        ..DlqFilter::default()
    };
    assert_eq!(list(by_class).await, vec![id1, id3]);
    let window = DlqFilter {
        since: Some(t0 + TimeDelta::minutes(10)),
        until: Some(t0 + TimeDelta::minutes(30)),
        ..DlqFilter::default()
    };
    assert_eq!(
        list(window).await,
        vec![id2, id3],
        "since inclusive, until exclusive"
    );
    let page = DlqFilter {
        after_id: id1,
        limit: 2,
        ..DlqFilter::default()
    };
    assert_eq!(list(page).await, vec![id2, id3]);

    // Status moves only from pending, once, and records who and when.
    let before = now();
    assert_eq!(
        store
            .dlq_set_status(
                &[id2, id1],
                DlqStatus::Discarded,
                "alice",
                Some("bad firmware")
            )
            .await
            .unwrap(),
        vec![id1, id2]
    );
    assert_eq!(
        store
            .dlq_set_status(&[id1, id2], DlqStatus::Replayed, "bob", None)
            .await
            .unwrap(),
        Vec::<i64>::new()
    );
    assert_eq!(
        store
            .dlq_set_status(&[id1, id3], DlqStatus::Replayed, "bob", None)
            .await
            .unwrap(),
        vec![id3]
    );
    let e1 = store.dlq_get(id1).await.unwrap().unwrap();
    assert_eq!(
        (e1.status, e1.status_changed_by.as_deref()),
        (DlqStatus::Discarded, Some("alice"))
    );
    assert!(e1.status_changed_at.unwrap() >= before);
    assert_eq!(e1.reason.as_deref(), Some("bad firmware"));
    assert_eq!(
        (e1.key.as_deref(), e1.headers.as_slice()),
        (
            Some(b"dev-1".as_slice()),
            [("source".to_owned(), b"mqtt".to_vec())].as_slice()
        ),
        "key and headers kept for a re-drive"
    );
    // Every change is audited, with who, what and why; refused changes are not.
    let audit = store
        .audit_log(Some(&format!("dlq:{id1}")), 10)
        .await
        .unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(
        (audit[0].who.as_str(), audit[0].action.as_str()),
        ("alice", "dlq.discard")
    );
    assert_eq!(audit[0].detail, json!({"reason": "bad firmware"}));
    let audit3 = store
        .audit_log(Some(&format!("dlq:{id3}")), 10)
        .await
        .unwrap();
    assert_eq!(
        audit3.iter().map(|a| a.action.as_str()).collect::<Vec<_>>(),
        ["dlq.replay"]
    );
    assert_eq!(
        store.dlq_get(id3).await.unwrap().unwrap().status,
        DlqStatus::Replayed
    );
    assert!(
        store
            .dlq_set_status(&[id4], DlqStatus::Pending, "eve", None)
            .await
            .is_err()
    );
    let pending = DlqFilter {
        status: Some(DlqStatus::Pending),
        ..DlqFilter::default()
    };
    assert_eq!(list(pending).await, vec![id4]);

    let count = |p: &str, c: &str, s, n| DlqCount {
        processor: p.into(),
        error_class: c.into(),
        status: s,
        count: n,
    };
    let mut counts = store.dlq_counts().await.unwrap();
    counts.sort();
    assert_eq!(
        counts,
        vec![
            count("projector", "decode", DlqStatus::Replayed, 1),
            count("projector", "range", DlqStatus::Pending, 1),
            count("validator", "decode", DlqStatus::Discarded, 1),
            count("validator", "schema", DlqStatus::Discarded, 1),
        ]
    );
}

// ---- retention and partitions ----------------------------------------------------------------

pub async fn retention_drops_old_events_and_keeps_recent_ones<H: Harness>(h: &H) {
    let store = h.open().await;
    let now = now();
    let day = TimeDelta::days(1);
    let cutoff = now - day * 7;
    // Partitions as they were ten days ago (Postgres), so old events land in real partitions.
    store.maintain(now - day * 10).await.unwrap();

    let old: Vec<Event> = (0..3)
        .map(|i| reading("dev-1", i, now - day * 10 + TimeDelta::hours(1)))
        .collect();
    let kept: Vec<Event> = vec![
        reading("dev-1", 10, now - day * 6),
        reading("dev-1", 11, now - TimeDelta::hours(1)),
        reading("dev-1", 12, now),
    ];
    // Past retention, but on Postgres in the (daily) partition that straddles the cutoff,
    // which is only dropped once all of it is past retention.
    let midnight = cutoff.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let straddler = reading("dev-1", 13, midnight);
    let all: Vec<Event> = old
        .iter()
        .chain(&kept)
        .chain([&straddler])
        .cloned()
        .collect();
    let out = store.append(&batch(all)).await.unwrap();
    assert_eq!(out.appended.len(), 7);

    let report = store.maintain(now).await.unwrap();
    for e in &old {
        assert!(
            store.event_by_id(e.event_id).await.unwrap().is_none(),
            "old event removed"
        );
    }
    for e in &kept {
        assert_eq!(
            store.event_by_id(e.event_id).await.unwrap().unwrap().event,
            *e
        );
    }
    let straddler_kept = store
        .event_by_id(straddler.event_id)
        .await
        .unwrap()
        .is_some();
    match store.backend() {
        Backend::Postgres => {
            let old_partition = format!("events_p{}", (now - day * 10).format("%Y%m%d_000000"));
            assert!(
                report.partitions_dropped.contains(&old_partition),
                "{old_partition} dropped: {report:?}"
            );
            assert_eq!(
                report.event_ids_pruned, 3,
                "ids of dropped events pruned: {report:?}"
            );
            for p in store.partitions().await.unwrap() {
                if let Some((_, to)) = p.range {
                    assert!(to > cutoff, "{} is entirely past retention", p.name);
                }
            }
            assert!(
                straddler_kept,
                "its partition is not entirely past retention"
            );
            assert_eq!(h.scalar("SELECT count(*) FROM event_ids").await, 4);
            assert_eq!(store.event_count().await.unwrap(), 4);
            // An event still stored keeps its id claimed.
            let out = store.append(&batch([straddler.clone()])).await.unwrap();
            assert_eq!(out.duplicates, vec![straddler.event_id]);
        }
        Backend::Sqlite => {
            assert_eq!(report.events_deleted, 4, "{report:?}");
            assert!(!straddler_kept, "SQLite deletes by row");
            assert_eq!(store.event_count().await.unwrap(), 3);
        }
    }

    // The ids of removed events are forgotten with them: the duplicate check covers retention.
    let mut back = old[0].clone();
    back.ingested_at = now;
    let out = store.append(&batch([back.clone()])).await.unwrap();
    assert_eq!(out.appended.len(), 1, "an expired id is new again");
    assert_eq!(
        store
            .event_by_id(back.event_id)
            .await
            .unwrap()
            .unwrap()
            .event,
        back
    );

    // Maintaining again changes nothing.
    let before = store.event_count().await.unwrap();
    let again = store.maintain(now).await.unwrap();
    assert!(again.partitions_dropped.is_empty() && again.partitions_created.is_empty());
    assert_eq!((again.events_deleted, again.event_ids_pruned), (0, 0));
    assert_eq!(store.event_count().await.unwrap(), before);
}

pub async fn appends_outside_ready_partitions_still_work<H: Harness>(h: &H) {
    let store = h.open().await;
    let now = now();
    let day = TimeDelta::days(1);
    let soon = reading("dev-1", 1, now + day * 5); // past the partitions made ahead
    let late = reading("dev-1", 2, now - day * 3); // before the first partition
    let far = reading("dev-1", 3, now + day * 400); // beyond on-demand creation
    let current = reading("dev-1", 4, now);
    let out = store
        .append(&batch([
            soon.clone(),
            late.clone(),
            far.clone(),
            current.clone(),
        ]))
        .await
        .unwrap();
    assert_eq!(out.appended.len(), 4);
    for e in [&soon, &late, &far, &current] {
        assert_eq!(
            store.event_by_id(e.event_id).await.unwrap().unwrap().event,
            *e
        );
    }
    if store.backend() == Backend::Postgres {
        let parts = store.partitions().await.unwrap();
        for e in [&soon, &late, &current] {
            assert!(
                parts.iter().any(|p| p
                    .range
                    .is_some_and(|(a, b)| a <= e.ingested_at && e.ingested_at < b)),
                "a partition was made for {}: {parts:?}",
                e.ingested_at
            );
        }
        assert_eq!(
            h.scalar("SELECT count(*) FROM events_default").await,
            1,
            "far → default"
        );
    }

    // Time moves on to the far event: its partition is made (its row moves out of the
    // default partition) and everything else is past retention.
    let report = store.maintain(now + day * 400).await.unwrap();
    let stored = store
        .event_by_id(far.event_id)
        .await
        .unwrap()
        .expect("far event kept");
    assert_eq!(stored.event, far);
    assert_eq!(
        stored.position, out.appended[2].position,
        "moved rows keep their position"
    );
    assert_eq!(store.event_count().await.unwrap(), 1);
    if store.backend() == Backend::Postgres {
        assert!(!report.partitions_created.is_empty());
        assert!(report.partitions_dropped.len() >= 3, "{report:?}");
        assert_eq!(h.scalar("SELECT count(*) FROM events_default").await, 0);
    }
    // Appends go on as before, and positions never go back, although the newest event
    // (`current`) was removed.
    let next = reading("dev-1", 5, now);
    let added = store.append(&batch([next])).await.unwrap().appended;
    assert_eq!(added.len(), 1);
    let highest = out.appended.iter().map(|a| a.position).max().unwrap();
    assert!(
        added[0].position > highest,
        "{} after {highest}",
        added[0].position
    );
}
