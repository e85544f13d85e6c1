//! The projector on the embedded log, against both store backends: rollups equal a
//! from-scratch GROUP BY after duplicates, out-of-order and late readings; a crash between the
//! projection write and the log commit counts nothing twice; poison is dead-lettered;
//! inference results labelled anomaly are stored once, normal ones only counted.

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
use sluice_store::{Anomaly, DlqFilter, Resolution, Store, StoreOptions};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const READINGS: &str = "events.sensor-reading";
const STATUS: &str = "events.device-status";
const INFERENCES: &str = "inferences";

struct Rig {
    _dir: tempfile::TempDir,
    log: EmbeddedLog,
    store: Store,
    codec: Arc<EventCodec<Arc<Registry>>>,
}

async fn rig_on(url: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedOptions::default()).unwrap();
    for topic in [READINGS, STATUS, INFERENCES] {
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

/// The inference result of `reading` as the inferencer emits it: its id derived from the
/// reading and the model, the reading's device and device time.
fn inference(reading: &Event, score: f64, site: Option<&str>) -> Event {
    let threshold = 0.7;
    let label = if score >= threshold {
        "anomaly"
    } else {
        "normal"
    };
    reading.derive(
        "inferencer/anomaly-iforest@3",
        EventType::new(EventType::INFERENCE_RESULT).unwrap(),
        json!({
            "input_event_id": reading.event_id.to_string(),
            "model_name": "anomaly-iforest",
            "model_version": "3",
            "score": score,
            "label": label,
            "threshold": threshold,
            "features": {
                "temperature_c": reading.payload["temperature_c"],
                "vibration_mm_s": reading.payload["vibration_mm_s"],
            },
            "site": site,
        }),
        Source::Processor("inferencer".into()),
        Utc::now(),
    )
}

/// The anomaly row an anomalous result must become.
fn expected(result: &Event) -> Anomaly {
    let p = &result.payload;
    Anomaly {
        event_id: result.event_id,
        input_event_id: p["input_event_id"].as_str().unwrap().parse().unwrap(),
        device_id: result.aggregate_id.clone(),
        at: result.occurred_at,
        score: p["score"].as_f64().unwrap(),
        threshold: p["threshold"].as_f64().unwrap(),
        model_name: "anomaly-iforest".into(),
        model_version: "3".into(),
        features: serde_json::from_value(p["features"].clone()).unwrap(),
        site: p["site"].as_str().map(str::to_owned),
    }
}

impl Rig {
    /// `event` encoded with a schema of its own: `inference.result` with `input_event_id` a
    /// plain string, registered under another subject. It decodes, but its payload is not one
    /// the projector can store.
    async fn encode_loosely(&self, event: &Event) -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../schemas/inference.result/1.avsc"
        );
        let mut schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let fields = schema["fields"].as_array_mut().unwrap();
        let payload = fields.iter_mut().find(|f| f["name"] == "payload").unwrap();
        for f in payload["type"]["fields"].as_array_mut().unwrap() {
            if f["name"] == "input_event_id" {
                f["type"] = json!("string");
            }
        }
        let registered = self
            .codec
            .source()
            .register("test.loose-inference", &schema.to_string())
            .unwrap();
        let schema = self.codec.schema_by_id(registered.id).await.unwrap();
        let body = sluice_schemas::encode_body(event, &schema).unwrap();
        sluice_schemas::wire::frame(registered.id, &body)
    }

    async fn send_raw(&self, topic: &str, key: &str, value: Vec<u8>) {
        self.log
            .producer()
            .unwrap()
            .send(
                topic,
                vec![Record {
                    key: Some(key.as_bytes().to_vec()),
                    value,
                    ..Record::default()
                }],
            )
            .await
            .unwrap();
    }

    /// Waits until the store's offsets of `topic` cover `messages` messages: all of them
    /// projected, counted or dead-lettered.
    async fn wait_for_offsets(&self, group: &str, topic: &str, messages: i64) {
        let store = self.store.clone();
        until(
            &format!("{messages} messages of {topic} taken in"),
            DEADLINE,
            async || {
                let offsets = store.consumer_offsets(group).await.unwrap();
                offsets
                    .iter()
                    .filter(|o| o.topic == topic)
                    .map(|o| o.next_offset)
                    .sum::<i64>()
                    >= messages
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_are_stored_once_and_normal_scores_are_counted_not_stored() {
    on_each_backend(async |url| {
        let rig = rig_on(&url).await;
        let start = Utc::now() - TimeDelta::hours(1);
        let readings: Vec<Event> = (0..40)
            .map(|i| {
                let at = start + TimeDelta::seconds(i * 13) + TimeDelta::microseconds(i);
                reading(&format!("dev-{}", i % 4), at, 20.0 + i as f64)
            })
            .collect();
        // Every fifth reading is anomalous; sites known for some devices only.
        let results: Vec<Event> = readings
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let score = if i % 5 == 0 {
                    0.9 + i as f64 / 1000.0
                } else {
                    0.2
                };
                inference(r, score, (i % 2 == 0).then_some("plant-3"))
            })
            .collect();
        let (anomalous, normal): (Vec<&Event>, Vec<&Event>) = results
            .iter()
            .partition(|e| e.payload["label"] == "anomaly");
        assert_eq!((anomalous.len(), normal.len()), (8, 32));

        let mut settings = Settings::new("projector", &[READINGS, STATUS, INFERENCES]);
        settings.max_backoff = Duration::from_millis(200);
        let stats = Arc::new(Stats::default());
        let (token, task) = rig.start(settings, stats.clone());
        rig.publish(READINGS, &readings).await;
        rig.publish(INFERENCES, &results).await;
        // The inferencer redelivering (a retry, a restart): the first half again.
        rig.publish(INFERENCES, &results[..20]).await;
        // Poison on the inferences topic: bytes that are not Avro, and a result whose
        // input_event_id is not a UUID.
        rig.send_raw(INFERENCES, "dev-0", b"not avro".to_vec())
            .await;
        let mut bad = inference(&readings[0], 0.99, None);
        bad.event_id = uuid::Uuid::new_v4();
        bad.payload["input_event_id"] = json!("not-a-uuid");
        let loose = rig.encode_loosely(&bad).await;
        rig.send_raw(INFERENCES, "dev-0", loose).await;
        rig.wait_for_offsets("projector", INFERENCES, 40 + 20 + 2)
            .await;
        rig.wait_for_readings(40).await;
        token.cancel();
        task.await.unwrap().unwrap();

        let mut want: Vec<Anomaly> = anomalous.iter().map(|e| expected(e)).collect();
        want.sort_by(|a, b| {
            (&a.device_id, a.at, a.event_id).cmp(&(&b.device_id, b.at, b.event_id))
        });
        let stored = rig.store.anomalies(1, None).await.unwrap();
        assert_eq!(stored, want, "each anomaly once, as the inferencer sent it");
        assert!(
            stored
                .iter()
                .all(|a| normal.iter().all(|n| n.event_id != a.event_id)),
            "no normal result stored"
        );
        assert_eq!(
            rig.store.anomalies(1, Some("dev-0")).await.unwrap().len(),
            anomalous
                .iter()
                .filter(|e| e.aggregate_id == "dev-0")
                .count()
        );
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            count(&stats.anomalies),
            8,
            "redelivered anomalies not counted again"
        );
        // 32 normal results, and the 16 of the first half of the stream sent again.
        let normal_again = results[..20]
            .iter()
            .filter(|e| e.payload["label"] == "normal")
            .count() as u64;
        assert_eq!(count(&stats.normal_scores), 32 + normal_again);
        assert_eq!(count(&stats.ignored), 0);
        assert_eq!(count(&stats.rejected), 2);

        let letters = rig.store.dlq_list(&DlqFilter::default()).await.unwrap();
        let mut classes: Vec<(&str, &str)> = letters
            .iter()
            .map(|l| (l.topic.as_str(), l.error_class.as_str()))
            .collect();
        classes.sort();
        assert_eq!(
            classes,
            vec![(INFERENCES, "invalid_payload"), (INFERENCES, "undecodable")]
        );
        let invalid = letters
            .iter()
            .find(|l| l.error_class == "invalid_payload")
            .unwrap();
        assert!(
            invalid.error_message.contains("input_event_id"),
            "{}",
            invalid.error_message
        );
    })
    .await;
}
