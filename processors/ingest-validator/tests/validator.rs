//! The ingest-validator on the embedded log, against both store backends: poison isolation,
//! duplicates, and a crash between the store append and the log commit.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use serde_json::json;
use sluice_core::{Event, EventType, Source};
use sluice_ingest_validator::{Error, Settings, Stats};
use sluice_log::{
    EmbeddedLog, EmbeddedOptions, Header, Log, Producer, Record, TopicPartition, TopicSpec,
};
use sluice_schemas::{EventCodec, Registry, SchemaDir};
use sluice_store::testing::{on_each_backend, until};
use sluice_store::{DlqFilter, Store, StoreOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

struct Rig {
    _dir: tempfile::TempDir,
    log: EmbeddedLog,
    store: Store,
    codec: Arc<EventCodec<Arc<Registry>>>,
}

async fn rig_on(store_url: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedOptions::default()).unwrap();
    log.create_topic(&TopicSpec::new("ingest.raw", 2))
        .await
        .unwrap();
    let store = Store::connect(store_url, StoreOptions::default())
        .await
        .unwrap();
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

/// Runs `body` once on SQLite and once on a fresh Postgres database.
async fn on_both<F, Fut>(body: F)
where
    F: Fn(Rig) -> Fut,
    Fut: Future<Output = ()>,
{
    on_each_backend(async |url| body(rig_on(&url).await).await).await;
}

fn reading(device: &str, at: chrono::DateTime<Utc>) -> serde_json::Value {
    json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": "sensor.reading",
        "aggregate_id": device,
        "occurred_at": at.to_rfc3339(),
        "payload": {"temperature_c": 21.5, "seq": 7},
    })
}

impl Rig {
    async fn send(&self, key: &str, value: Vec<u8>) {
        let record = Record {
            key: Some(key.as_bytes().to_vec()),
            value,
            headers: vec![Header {
                key: "source".into(),
                value: b"mqtt".to_vec(),
            }],
            ..Record::default()
        };
        self.log
            .producer()
            .unwrap()
            .send("ingest.raw", vec![record])
            .await
            .unwrap();
    }

    async fn send_json(&self, key: &str, value: &serde_json::Value) {
        self.send(key, serde_json::to_vec(value).unwrap()).await;
    }

    fn start(
        &self,
        settings: Settings,
        stats: Arc<Stats>,
    ) -> (CancellationToken, JoinHandle<Result<(), Error>>) {
        let token = CancellationToken::new();
        let (log, store, codec, t) = (
            self.log.clone(),
            self.store.clone(),
            self.codec.clone(),
            token.clone(),
        );
        let task = tokio::spawn(async move {
            sluice_ingest_validator::run(&settings, &log, &store, &codec, &stats, t).await
        });
        (token, task)
    }

    fn log_committed(&self) -> i64 {
        (0..2)
            .filter_map(|p| {
                self.log
                    .committed("ingest-validator", &TopicPartition::new("ingest.raw", p))
                    .unwrap()
            })
            .sum()
    }

    async fn stored_offsets(&self) -> i64 {
        let offsets = self
            .store
            .consumer_offsets("ingest-validator")
            .await
            .unwrap();
        offsets.iter().map(|o| o.next_offset).sum()
    }
}

fn settings() -> Settings {
    Settings::new("ingest-validator", "ingest.raw")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_lands_in_the_dlq_with_its_class_and_valid_events_are_stored() {
    on_both(|rig| async move {
        let now = Utc::now();
        let good_json = reading("dev-1", now);
        rig.send_json("dev-1", &good_json).await;
        rig.send("dev-2", b"{\"event_type\": \"sensor.reading\", ".to_vec())
            .await;
        rig.send("dev-3", b"\x07\x00\x00\x00\x01garbage".to_vec())
            .await;
        rig.send("dev-4", sluice_schemas::wire::frame(9_999, b"\x02"))
            .await;
        let mut no_device = reading("dev-5", now);
        no_device.as_object_mut().unwrap().remove("aggregate_id");
        rig.send_json("dev-5", &no_device).await;
        let no_state = json!({
            "event_type": "device.status", "aggregate_id": "dev-6",
            "occurred_at": now.to_rfc3339(), "payload": {"reason": "cable"},
        });
        rig.send_json("dev-6", &no_state).await;
        let mut huge = reading("dev-7", now);
        huge["payload"]["extra"] = json!({"blob": "x".repeat(70_000)});
        rig.send_json("dev-7", &huge).await;
        rig.send_json("dev-8", &reading("dev-8", now + TimeDelta::days(365)))
            .await;
        let avro = Event::new(
            EventType::new("sensor.reading").unwrap(),
            "dev-9",
            now,
            json!({"temperature_c": 19.0}),
            Source::Http,
        )
        .unwrap();
        let (avro_bytes, _) = rig.codec.encode(&avro).await.unwrap();
        rig.send("dev-9", avro_bytes.clone()).await;
        let late_good = reading("dev-10", now - TimeDelta::hours(1));
        rig.send_json("dev-10", &late_good).await;

        let stats = Arc::new(Stats::default());
        let (token, task) = rig.start(settings(), stats.clone());
        until("all ten inputs in the store", DEADLINE, async || {
            rig.stored_offsets().await == 10
        })
        .await;
        token.cancel();
        task.await.unwrap().unwrap();

        assert_eq!(rig.store.event_count().await.unwrap(), 3);
        let stored = rig
            .store
            .event_by_id(avro.event_id)
            .await
            .unwrap()
            .expect("the Avro event is stored");
        assert_eq!(stored.event.payload["temperature_c"], json!(19.0));
        assert!(stored.event.ingested_at >= now, "enriched with ingested_at");
        assert_eq!(stored.event.metadata.schema_version, Some(2));
        let json_id = good_json["event_id"].as_str().unwrap().parse().unwrap();
        let stored = rig.store.event_by_id(json_id).await.unwrap().unwrap();
        assert_eq!(
            stored.event.metadata.source,
            Source::Mqtt,
            "source from the header"
        );
        assert_eq!(
            rig.store.outbox_depth().await.unwrap(),
            3,
            "one outbox entry per event"
        );

        let letters = rig.store.dlq_list(&DlqFilter::default()).await.unwrap();
        let mut classes: Vec<(String, String)> = letters
            .iter()
            .map(|l| (l.error_class.clone(), l.error_message.clone()))
            .collect();
        classes.sort();
        let names: Vec<&str> = classes.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "bad_magic",
                "invalid_json",
                "missing_field",
                "schema",
                "timestamp",
                "too_large",
                "unknown_schema"
            ],
            "{classes:#?}"
        );
        for letter in &letters {
            assert_eq!(letter.processor, "ingest-validator");
            assert_eq!(letter.topic, "ingest.raw");
            assert!(!letter.raw.is_empty(), "raw bytes kept");
        }
        let unknown = letters
            .iter()
            .find(|l| l.error_class == "unknown_schema")
            .unwrap();
        assert_eq!(unknown.schema_id, Some(9_999));
        assert_eq!(unknown.raw, sluice_schemas::wire::frame(9_999, b"\x02"));
        let schema = letters.iter().find(|l| l.error_class == "schema").unwrap();
        assert!(
            schema.error_message.contains("state"),
            "{}",
            schema.error_message
        );
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 7);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_stored_once() {
    on_both(|rig| async move {
        let event = reading("dev-1", Utc::now());
        for _ in 0..3 {
            rig.send_json("dev-1", &event).await;
        }
        let stats = Arc::new(Stats::default());
        let (token, task) = rig.start(settings(), stats.clone());
        until("all three read", DEADLINE, async || {
            rig.stored_offsets().await == 3
        })
        .await;
        token.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(rig.store.event_count().await.unwrap(), 1);
        assert_eq!(rig.store.outbox_depth().await.unwrap(), 1);
        assert_eq!(stats.duplicates.load(Ordering::Relaxed), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_append_and_log_commit_stores_nothing_twice() {
    on_both(|rig| async move {
        // No event ids: the validator derives them, so only offsets can keep these unique.
        for i in 0..20 {
            let mut event = reading(&format!("dev-{i}"), Utc::now());
            event.as_object_mut().unwrap().remove("event_id");
            rig.send_json(&format!("dev-{i}"), &event).await;
        }
        rig.send("dev-x", b"not json".to_vec()).await;
        let mut crashing = settings();
        crashing.crash_after_append = true;
        crashing.config.batch_size = 1_000;
        let (_token, task) = rig.start(crashing, Arc::new(Stats::default()));
        assert!(matches!(task.await.unwrap(), Err(Error::Crashed(_))));
        let appended = rig.store.event_count().await.unwrap();
        assert!(appended > 0, "the crash came after an append");
        assert_eq!(
            rig.log_committed(),
            0,
            "the crash came before the log commit"
        );

        let stats = Arc::new(Stats::default());
        let (token, task) = rig.start(settings(), stats.clone());
        // The restart has read everything once the log's offsets caught up with the store's
        // (the crashed run may have stored all 21 already).
        until(
            "all 21 inputs in the store and read again",
            DEADLINE,
            async || rig.stored_offsets().await == 21 && rig.log_committed() == 21,
        )
        .await;
        token.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(
            rig.store.event_count().await.unwrap(),
            20,
            "each event exactly once"
        );
        assert_eq!(rig.store.outbox_depth().await.unwrap(), 20);
        let letters = rig.store.dlq_list(&DlqFilter::default()).await.unwrap();
        assert_eq!(
            letters.len(),
            1,
            "the poison once, not again after the restart"
        );
        assert!(
            stats.skipped.load(Ordering::Relaxed) > 0,
            "restart skipped what was stored: {stats:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_validator_applies_retention_when_it_starts() {
    on_both(|rig| async move {
        let mut old = Event::new(
            EventType::new("sensor.reading").unwrap(),
            "dev-old",
            Utc::now() - TimeDelta::days(30),
            json!({"temperature_c": 1.0}),
            Source::Http,
        )
        .unwrap();
        old.ingested_at = old.occurred_at;
        let (value, _) = rig.codec.encode(&old).await.unwrap();
        rig.store
            .append(&sluice_store::AppendBatch {
                events: vec![sluice_store::AppendEvent {
                    topic: "events.sensor-reading".into(),
                    key: b"dev-old".to_vec(),
                    value,
                    event: old.clone(),
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(rig.store.event_count().await.unwrap(), 1);
        let (token, task) = rig.start(settings(), Arc::new(Stats::default()));
        until(
            "the 30-day-old event to be removed (retention 7 days)",
            DEADLINE,
            async || rig.store.event_by_id(old.event_id).await.unwrap().is_none(),
        )
        .await;
        token.cancel();
        task.await.unwrap().unwrap();
    })
    .await;
}
