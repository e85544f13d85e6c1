//! The projector on the embedded log, against both store backends: rollups equal a
//! from-scratch GROUP BY after duplicates, out-of-order and late readings; a crash between the
//! projection write and the log commit counts nothing twice; poison is dead-lettered.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use sluice_core::{Event, EventType, Source};
use sluice_log::{EmbeddedLog, EmbeddedOptions, Log, Producer, Record, TopicSpec};
use sluice_projector::{Error, Settings, Stats};
use sluice_schemas::{EventCodec, Registry, SchemaDir};
use sluice_store::testing::{on_each_backend, until};
use sluice_store::{DlqFilter, Resolution, Store, StoreOptions};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const READINGS: &str = "events.sensor-reading";
const STATUS: &str = "events.device-status";

struct Rig {
    _dir: tempfile::TempDir,
    log: EmbeddedLog,
    store: Store,
    codec: Arc<EventCodec<Arc<Registry>>>,
}

async fn rig_on(url: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedOptions::default()).unwrap();
    for topic in [READINGS, STATUS] {
        log.create_topic(&TopicSpec::new(topic, 3)).await.unwrap();
    }
    let store = Store::connect(url, StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    let registry = Arc::new(Registry::in_memory());
    let schemas = SchemaDir::load(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../schemas"
    )))
    .unwrap();
    registry.register_dir(&schemas).unwrap();
    Rig {
        _dir: dir,
        log,
        store,
        codec: Arc::new(EventCodec::new(registry)),
    }
}

fn reading(device: &str, at: DateTime<Utc>, temperature: f64) -> Event {
    Event::new(
        EventType::new(EventType::SENSOR_READING).unwrap(),
        device,
        at,
        json!({"temperature_c": temperature, "vibration_mm_s": temperature / 10.0}),
        Source::Mqtt,
    )
    .unwrap()
}

impl Rig {
    async fn publish(&self, topic: &str, events: &[Event]) {
        let mut records = Vec::new();
        for e in events {
            let (value, _) = self.codec.encode(e).await.unwrap();
            records.push(Record {
                key: Some(e.aggregate_id.as_bytes().to_vec()),
                value,
                ..Record::default()
            });
        }
        self.log
            .producer()
            .unwrap()
            .send(topic, records)
            .await
            .unwrap();
    }

    fn start(
        &self,
        settings: Settings,
        stats: Arc<Stats>,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<Result<(), Error>>,
    ) {
        let token = CancellationToken::new();
        let (log, store, codec, t) = (
            self.log.clone(),
            self.store.clone(),
            self.codec.clone(),
            token.clone(),
        );
        let task = tokio::spawn(async move {
            sluice_projector::run(&settings, &log, &store, &codec, &stats, t).await
        });
        (token, task)
    }

    async fn wait_for_readings(&self, n: u64) {
        let store = self.store.clone();
        until(&format!("{n} readings projected"), DEADLINE, async || {
            store.readings_count(1).await.unwrap() >= n
        })
        .await;
    }
}

fn settings() -> Settings {
    let mut s = Settings::new("projector", &[READINGS, STATUS]);
    s.max_backoff = Duration::from_millis(200);
    s
}

/// Readings over 3 devices and 3 hours, every seventh held back to the end (the last 86):
/// out of order, and late once the rest is projected.
fn stream() -> Vec<Event> {
    let start = Utc::now() - TimeDelta::hours(3);
    let mut events: Vec<Event> = (0..600)
        .map(|i| {
            let at = start + TimeDelta::seconds(i * 17);
            reading(&format!("dev-{}", i % 3), at, 15.0 + (i % 23) as f64)
        })
        .collect();
    // A deterministic shuffle: every seventh reading arrives at the end.
    let (late, mut on_time): (Vec<_>, Vec<_>) =
        events.drain(..).enumerate().partition(|(i, _)| i % 7 == 3);
    on_time.extend(late);
    on_time.into_iter().map(|(_, e)| e).collect()
}

fn assert_rollups_match(incremental: &[sluice_store::Rollup], scratch: &[sluice_store::Rollup]) {
    assert_eq!(incremental.len(), scratch.len());
    for (a, b) in incremental.iter().zip(scratch) {
        assert_eq!(
            (&a.device_id, a.bucket, &a.metric, a.count),
            (&b.device_id, b.bucket, &b.metric, b.count)
        );
        assert!((a.sum - b.sum).abs() < 1e-6, "{a:?} != {b:?}");
        assert_eq!(
            (a.min, a.max, a.last, a.last_at),
            (b.min, b.max, b.last, b.last_at)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_a_group_by_after_duplicates_and_late_readings() {
    on_each_backend(async |url| {
        let rig = rig_on(&url).await;
        let events = stream();
        let stats = Arc::new(Stats::default());
        let (token, task) = rig.start(settings(), stats.clone());
        rig.publish(READINGS, &events[..300]).await;
        // Devices resending: the same events again.
        rig.publish(READINGS, &events[100..200]).await;
        rig.publish(READINGS, &events[300..514]).await;
        rig.wait_for_readings(514).await;
        // The held-back readings arrive after their devices have moved on: late.
        rig.publish(READINGS, &events[514..]).await;
        rig.wait_for_readings(600).await;
        let stats_ref = stats.clone();
        until("duplicates seen", DEADLINE, async || {
            stats_ref
                .duplicates
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 100
        })
        .await;
        token.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(rig.store.readings_count(1).await.unwrap(), 600);
        assert!(stats.late.load(std::sync::atomic::Ordering::Relaxed) > 0);
        for resolution in [Resolution::Minute, Resolution::Hour] {
            assert_rollups_match(
                &rig.store.rollups(1, resolution, None).await.unwrap(),
                &rig.store.rollups_from_scratch(1, resolution).await.unwrap(),
            );
        }
        let latest = rig.store.device_latest(1, "dev-0").await.unwrap().unwrap();
        let newest = events
            .iter()
            .filter(|e| e.aggregate_id == "dev-0")
            .map(|e| e.occurred_at)
            .max()
            .unwrap();
        assert_eq!(
            latest.reading_at,
            Some(newest),
            "the newest reading wins, not the last to arrive"
        );
        assert!(latest.late_readings > 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_projection_and_log_commit_counts_nothing_twice() {
    on_each_backend(async |url| {
        let rig = rig_on(&url).await;
        let events = stream();
        rig.publish(READINGS, &events).await;
        let mut crashing = settings();
        crashing.crash_after_project = true;
        let (_, task) = rig.start(crashing, Arc::new(Stats::default()));
        assert!(matches!(task.await.unwrap(), Err(Error::Crashed(_))));
        let after_crash = rig.store.readings_count(1).await.unwrap();
        assert!(after_crash > 0, "the crash came after a projection write");
        let stats = Arc::new(Stats::default());
        let (token, task) = rig.start(settings(), stats.clone());
        rig.wait_for_readings(600).await;
        // Redelivered messages below the store's offsets are skipped, not projected again (a
        // partition the crash finished may be handed over last, so wait for it).
        let counted = stats.clone();
        until("the projected messages skipped", DEADLINE, async || {
            counted.skipped.load(std::sync::atomic::Ordering::Relaxed) >= after_crash
        })
        .await;
        token.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(
            stats.duplicates.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert_rollups_match(
            &rig.store
                .rollups(1, Resolution::Minute, None)
                .await
                .unwrap(),
            &rig.store
                .rollups_from_scratch(1, Resolution::Minute)
                .await
                .unwrap(),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_keep_the_newest_and_poison_is_dead_lettered() {
    on_each_backend(async |url| {
        let rig = rig_on(&url).await;
        let now = Utc::now();
        let status = |state: &str, at: DateTime<Utc>| {
            Event::new(
                EventType::new(EventType::DEVICE_STATUS).unwrap(),
                "dev-9",
                at,
                json!({"state": state}),
                Source::Mqtt,
            )
            .unwrap()
        };
        // The newer one arrives first.
        rig.publish(
            STATUS,
            &[
                status("offline", now),
                status("online", now - TimeDelta::minutes(5)),
            ],
        )
        .await;
        rig.log
            .producer()
            .unwrap()
            .send(
                READINGS,
                vec![Record {
                    key: Some(b"dev-9".to_vec()),
                    value: b"not avro".to_vec(),
                    ..Record::default()
                }],
            )
            .await
            .unwrap();
        rig.publish(READINGS, &[reading("dev-9", now, 20.0)]).await;
        let stats = Arc::new(Stats::default());
        let (token, task) = rig.start(settings(), stats.clone());
        rig.wait_for_readings(1).await;
        let store = rig.store.clone();
        until("the poison dead-lettered", DEADLINE, async || {
            !store
                .dlq_list(&DlqFilter::default())
                .await
                .unwrap()
                .is_empty()
        })
        .await;
        let store = rig.store.clone();
        until("both statuses projected", DEADLINE, async || {
            stats.statuses.load(std::sync::atomic::Ordering::Relaxed) >= 2
                && store.device_latest(1, "dev-9").await.unwrap().is_some()
        })
        .await;
        token.cancel();
        task.await.unwrap().unwrap();
        let latest = rig.store.device_latest(1, "dev-9").await.unwrap().unwrap();
        assert_eq!(latest.status.as_deref(), Some("offline"));
        let letters = rig.store.dlq_list(&DlqFilter::default()).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].raw, b"not avro");
        assert_eq!(letters[0].error_class, "undecodable");
    })
    .await;
}
