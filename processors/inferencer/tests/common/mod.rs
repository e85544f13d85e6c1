//! What the inferencer's tests share: a pipeline rig on the embedded log, and simulated fleets.

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;
use sluice_core::{Event, EventType, Source};
use sluice_inferencer::{Inferencer, NAME, PORT};
use sluice_log::{EmbeddedLog, EmbeddedOptions, Log, Producer, Record, TopicSpec};
use sluice_runtime::{MemoryDlq, NoMetrics, RunError, RuntimeConfig};
use sluice_schemas::{EventCodec, Registry, SchemaDir};
use sluice_simulator::{Body, Fleet, FleetConfig};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const DEADLINE: Duration = Duration::from_secs(30);

/// The shipped model's folder.
pub fn shipped_model() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/reading-iforest"
    ))
}

/// A reading of `device` at `at`.
pub fn reading(device: &str, at: DateTime<Utc>, payload: Value) -> Event {
    Event::new(
        EventType::new(EventType::SENSOR_READING).unwrap(),
        device,
        at,
        payload,
        Source::Mqtt,
    )
    .unwrap()
}

/// The readings of a simulated fleet, one second of device time per device round, with the
/// ids of the anomalous ones (the simulator's ground truth).
pub fn fleet(
    devices: u32,
    readings: usize,
    anomaly_rate: f64,
    seed: u64,
) -> (Vec<Event>, HashSet<Uuid>) {
    let mut fleet = Fleet::new(FleetConfig {
        devices,
        rate: devices,
        anomaly_rate,
        malformed_rate: 0.0,
        duplicate_rate: 0.0,
        seed,
        status_rate: 0.0,
        late_rate: 0.0,
    });
    let start: DateTime<Utc> = "2026-06-01T00:00:00Z".parse().unwrap();
    let step = TimeDelta::microseconds(1_000_000 / i64::from(devices));
    let mut events = Vec::with_capacity(readings);
    let mut truth = HashSet::new();
    let mut now = start;
    while events.len() < readings {
        now += step;
        let sim = fleet.next_event(now);
        let Body::Reading(r) = &sim.body else {
            continue;
        };
        let mut event = reading(
            &sim.device,
            sim.occurred_at,
            serde_json::to_value(r).unwrap(),
        );
        event.event_id = sim.event_id;
        if sim.anomaly.is_some() {
            truth.insert(sim.event_id);
        }
        events.push(event);
    }
    (events, truth)
}

/// Precision and recall of `flagged` against `truth`.
pub fn precision_recall(truth: &HashSet<Uuid>, flagged: &HashSet<Uuid>) -> (f64, f64) {
    let hits = flagged.intersection(truth).count() as f64;
    let precision = if flagged.is_empty() {
        0.0
    } else {
        hits / flagged.len() as f64
    };
    let recall = if truth.is_empty() {
        0.0
    } else {
        hits / truth.len() as f64
    };
    (precision, recall)
}

/// An embedded log with the readings and inferences topics, and a codec on the repo's schemas.
pub struct Rig {
    _dir: tempfile::TempDir,
    pub log: EmbeddedLog,
    pub codec: Arc<EventCodec<Arc<Registry>>>,
    pub config: RuntimeConfig,
}

pub async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), EmbeddedOptions::default()).unwrap();
    log.create_topic(&TopicSpec::new("events.sensor-reading", 2))
        .await
        .unwrap();
    log.create_topic(&TopicSpec::new("inferences", 1))
        .await
        .unwrap();
    let registry = Arc::new(Registry::in_memory());
    let schemas = SchemaDir::load(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../schemas"
    )))
    .unwrap();
    registry.register_dir(&schemas).unwrap();
    let mut config = RuntimeConfig::new(NAME, &["events.sensor-reading"]).port(PORT, "inferences");
    config.max_wait = Duration::from_millis(5);
    config.max_batch = 64;
    Rig {
        _dir: dir,
        log,
        codec: Arc::new(EventCodec::new(registry)),
        config,
    }
}

impl Rig {
    pub async fn produce(&self, events: &[Event]) {
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
            .send("events.sensor-reading", records)
            .await
            .unwrap();
    }

    pub async fn produce_raw(&self, key: &str, value: Vec<u8>) {
        let record = Record {
            key: Some(key.as_bytes().to_vec()),
            value,
            ..Record::default()
        };
        self.log
            .producer()
            .unwrap()
            .send("events.sensor-reading", vec![record])
            .await
            .unwrap();
    }

    /// Runs `inferencer` in the processor loop until the token is cancelled.
    pub fn start(
        &self,
        inferencer: Arc<Inferencer>,
        dlq: Arc<MemoryDlq>,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<Result<(), RunError>>,
    ) {
        let token = CancellationToken::new();
        let (log, codec, config, t) = (
            self.log.clone(),
            self.codec.clone(),
            self.config.clone(),
            token.clone(),
        );
        let watch = inferencer.clone().watch(token.clone());
        tokio::spawn(watch);
        let task = tokio::spawn(async move {
            sluice_runtime::run(&*inferencer, &config, &log, &*codec, &*dlq, &NoMetrics, t).await
        });
        (token, task)
    }

    /// A reader of the inferences topic.
    pub fn reader(&self) -> Reader {
        let group = format!("reader-{}", Uuid::new_v4().simple());
        Reader {
            consumer: self.log.consumer(&group, &["inferences"]).unwrap(),
            codec: self.codec.clone(),
            got: Vec::new(),
        }
    }
}

pub struct Reader {
    consumer: <EmbeddedLog as Log>::Consumer,
    codec: Arc<EventCodec<Arc<Registry>>>,
    pub got: Vec<Event>,
}

impl Reader {
    /// Reads until `done` holds for what was read, or fails at the deadline.
    pub async fn until(&mut self, what: &str, done: impl Fn(&[Event]) -> bool) {
        use sluice_log::Consumer;
        let start = Instant::now();
        while !done(&self.got) {
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; read {} results",
                self.got.len()
            );
            for m in self
                .consumer
                .poll(1000, Duration::from_millis(50))
                .await
                .unwrap()
            {
                self.got.push(self.codec.decode(&m.value).await.unwrap());
            }
        }
    }
}
