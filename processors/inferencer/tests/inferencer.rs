//! The inferencer with the shipped ONNX model on a real ONNX Runtime (scripts/test fetches it):
//! scores equal the training library's, features equal the training code's, a new version is
//! picked up while running, bad readings are dead-lettered, and the model finds the
//! simulator's anomalies.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::*;
use serde_json::json;
use sluice_inferencer::features::{DeviceState, WIDTH};
use sluice_inferencer::model::{self, Metadata, OnnxModel};
use sluice_inferencer::{FALLBACK_MODEL, Inferencer, InferencerConfig, ModelConfig, Settings};
use sluice_runtime::MemoryDlq;

/// Fails, saying how to fix it, when ONNX Runtime is not there: these tests must not pass on
/// the fallback alone.
fn load_shipped() -> OnnxModel {
    if let Err(e) = model::runtime(None) {
        panic!("these tests run the ONNX model for real: {e}");
    }
    OnnxModel::load(&shipped_model().join("1"), None).unwrap()
}

fn config_with(path: &Path, reload_ms: u64) -> InferencerConfig {
    let mut config = InferencerConfig::default();
    config.models.insert(
        "sensor.reading".into(),
        ModelConfig {
            path: path.display().to_string(),
            version: "latest".into(),
            threshold: None,
            features: Default::default(),
        },
    );
    config.reload_interval = std::time::Duration::from_millis(reload_ms);
    config
}

#[test]
fn rust_scores_equal_the_reference_outputs_of_sklearn() {
    let model = load_shipped();
    let reference = model
        .metadata
        .reference
        .clone()
        .expect("metadata has reference rows");
    assert!(reference.rows.len() >= 4, "a few reference rows");
    let rows: Vec<f32> = reference.rows.iter().flatten().copied().collect();
    let scores = model.score(&rows).unwrap();
    for (i, (got, want)) in scores.iter().zip(&reference.scores).enumerate() {
        assert!(
            (f64::from(*got) - want).abs() <= 1e-5,
            "row {i}: ONNX Runtime {got}, sklearn {want}"
        );
    }
    assert_eq!(scores.len(), reference.scores.len());
    // Batched or alone, a row scores the same.
    for (i, row) in reference.rows.iter().enumerate() {
        assert_eq!(model.score(row).unwrap()[0], scores[i], "row {i} alone");
    }
}

#[test]
fn rust_features_equal_the_training_codes() {
    let text = std::fs::read_to_string(shipped_model().join("1/metadata.json")).unwrap();
    let meta: Metadata = serde_json::from_str(&text).unwrap();
    let reference = meta
        .feature_reference
        .expect("metadata has a feature reference");
    assert!(reference.readings.len() >= 20);
    let mut device = DeviceState::default();
    for (i, (reading, want)) in reference
        .readings
        .iter()
        .zip(&reference.features)
        .enumerate()
    {
        let values = [reading[0], reading[1], reading[2]];
        let got = device.observe(&values, &meta.feature_params);
        assert_eq!(want.len(), WIDTH);
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                *g as f32, *w,
                "reading {i}, feature {} ({})",
                k, meta.features[k]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_version_is_picked_up_while_running() {
    load_shipped();
    let models = tempfile::tempdir().unwrap();
    copy_version(&shipped_model().join("1"), &models.path().join("1"), "1");
    let rig = rig().await;
    let inferencer = Arc::new(
        Inferencer::start(
            Settings::new("inferencer", config_with(models.path(), 50)),
            None,
        )
        .await,
    );
    assert_eq!(
        inferencer.model_of("sensor.reading"),
        Some(("reading-iforest".into(), "1".into()))
    );
    let (token, task) = rig.start(inferencer.clone(), Arc::new(MemoryDlq::default()));
    let mut reader = rig.reader();

    let at = chrono::Utc::now();
    let first: Vec<_> = (0..20)
        .map(|i| {
            reading(
                "dev-1",
                at + chrono::TimeDelta::seconds(i),
                json!({"temperature_c": 20.0 + (i % 3) as f64 / 10.0}),
            )
        })
        .collect();
    rig.produce(&first).await;
    reader.until("20 results", |got| got.len() >= 20).await;
    assert!(
        reader
            .got
            .iter()
            .all(|e| e.payload["model_name"] == "reading-iforest"
                && e.payload["model_version"] == "1")
    );

    // Version 2 appears beside 1: `latest` moves to it without a restart.
    copy_version(&shipped_model().join("1"), &models.path().join("2"), "2");
    let deadline = std::time::Instant::now() + DEADLINE;
    while inferencer.model_of("sensor.reading").map(|m| m.1) != Some("2".into()) {
        assert!(
            std::time::Instant::now() < deadline,
            "version 2 was not loaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let second: Vec<_> = (20..30)
        .map(|i| {
            reading(
                "dev-1",
                at + chrono::TimeDelta::seconds(i),
                json!({"temperature_c": 20.1}),
            )
        })
        .collect();
    rig.produce(&second).await;
    reader.until("30 results", |got| got.len() >= 30).await;
    for e in &reader.got[20..] {
        assert_eq!(
            e.payload["model_version"], "2",
            "results after the reload name version 2"
        );
    }
    let ids: HashSet<_> = reader.got.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 30, "one result per reading");
    assert_eq!(inferencer.stats().loads.load(Ordering::Relaxed), 2);
    token.cancel();
    task.await.unwrap().unwrap();
}

/// Copies a model version folder, naming it `version` in its metadata.
fn copy_version(from: &Path, to: &Path, version: &str) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("model.onnx"), to.join("model.onnx")).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("metadata.json")).unwrap())
            .unwrap();
    meta["version"] = json!(version);
    std::fs::write(to.join("metadata.json"), meta.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_that_cannot_be_scored_is_dead_lettered_and_the_partition_moves_on() {
    load_shipped();
    let rig = rig().await;
    let inferencer = Arc::new(
        Inferencer::start(
            Settings::new("inferencer", config_with(&shipped_model(), 60_000)),
            None,
        )
        .await,
    );
    let dlq = Arc::new(MemoryDlq::default());
    let (token, task) = rig.start(inferencer.clone(), dlq.clone());
    let mut reader = rig.reader();
    let at = chrono::Utc::now();
    let bad = reading("dev-1", at, json!({"battery_pct": 80.0, "site": "plant-1"}));
    let good: Vec<_> = (1..4)
        .map(|i| {
            reading(
                "dev-1",
                at + chrono::TimeDelta::seconds(i),
                json!({"temperature_c": 21.0}),
            )
        })
        .collect();
    rig.produce(std::slice::from_ref(&bad)).await;
    rig.produce(&good).await;
    rig.produce_raw("dev-1", b"not an event".to_vec()).await;
    reader
        .until("the three good readings", |got| got.len() >= 3)
        .await;
    let causes: Vec<_> = reader
        .got
        .iter()
        .map(|e| e.metadata.causation_id.unwrap())
        .collect();
    assert_eq!(causes, good.iter().map(|e| e.event_id).collect::<Vec<_>>());
    let deadline = std::time::Instant::now() + DEADLINE;
    while dlq.letters().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "dead letters: {:?}",
            dlq.letters()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let letters = dlq.letters();
    assert_eq!(letters[0].event_id, Some(bad.event_id));
    assert_eq!(letters[0].error_class, "features");
    assert!(
        letters[0].error_message.contains("temperature_c"),
        "{}",
        letters[0].error_message
    );
    assert!(!letters[0].raw.is_empty(), "the DLQ keeps the bytes");
    assert_eq!(letters[1].error_class, "decode");
    token.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_have_deterministic_ids_and_say_which_model_scored() {
    load_shipped();
    let (events, _) = fleet(5, 100, 0.0, 7);
    let run = || async {
        let inferencer = Inferencer::start(
            Settings::new("inferencer", config_with(&shipped_model(), 60_000)),
            None,
        )
        .await;
        let results = inferencer.score(&events).await;
        results
            .into_iter()
            .map(|r| {
                let out = r.unwrap();
                let (_, e) = out.events().next().unwrap();
                e.clone()
            })
            .collect::<Vec<_>>()
    };
    let (a, b) = (run().await, run().await);
    assert_eq!(a.len(), 100);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            x.event_id, y.event_id,
            "a replay derives the same result ids"
        );
        assert_eq!(x.payload, y.payload);
        assert_eq!(x.payload["model_name"], "reading-iforest");
        assert_eq!(x.payload["model_version"], "1");
        assert_eq!(x.payload["features"].as_object().unwrap().len(), WIDTH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_model_finds_the_simulators_anomalies() {
    load_shipped();
    // A fleet the model never saw (its training used other seeds), anomalies at 1 %.
    let (events, truth) = fleet(200, 120_000, 0.01, 20_261_124);
    let score = |config: InferencerConfig| {
        let events = &events;
        async move {
            let inferencer = Inferencer::start(Settings::new("inferencer", config), None).await;
            let mut flagged = HashSet::new();
            let mut models = HashSet::new();
            for chunk in events.chunks(256) {
                for (event, r) in chunk.iter().zip(inferencer.score(chunk).await) {
                    let out = r.unwrap();
                    let (_, result) = out.events().next().unwrap();
                    models.insert(result.payload["model_name"].as_str().unwrap().to_owned());
                    if result.payload["label"] == "anomaly" {
                        flagged.insert(event.event_id);
                    }
                }
            }
            (flagged, models)
        }
    };
    let (model_flagged, models) = score(config_with(&shipped_model(), 60_000)).await;
    assert_eq!(models, HashSet::from(["reading-iforest".to_owned()]));
    let (fallback_flagged, models) = score(InferencerConfig::default()).await;
    assert_eq!(models, HashSet::from([FALLBACK_MODEL.to_owned()]));
    let (p, r) = precision_recall(&truth, &model_flagged);
    let (fp, fr) = precision_recall(&truth, &fallback_flagged);
    println!(
        "{} readings, {} anomalous: reading-iforest precision {p:.3} recall {r:.3}; {FALLBACK_MODEL} precision {fp:.3} recall {fr:.3}",
        events.len(),
        truth.len()
    );
    assert!(
        p >= 0.8 && r >= 0.8,
        "the model: precision {p:.3}, recall {r:.3}"
    );
    assert!(
        fr > 0.3,
        "the fallback finds anomalies too: precision {fp:.3}, recall {fr:.3}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_devices_features_are_rebuilt_from_its_readings_in_the_store() {
    load_shipped();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let opts = sluice_store::StoreOptions {
        migrate_on_connect: true,
        ..Default::default()
    };
    let store = sluice_store::Store::connect(&url, opts).await.unwrap();
    let (events, _) = fleet(1, 41, 0.0, 3);
    let (history, next) = events.split_at(40);
    // The projector stored the device's first 40 readings before the inferencer restarted.
    let readings = history
        .iter()
        .map(|e| sluice_store::Reading {
            event_id: e.event_id,
            device_id: e.aggregate_id.clone(),
            at: e.occurred_at,
            ingested_at: e.ingested_at,
            seq: e.payload["seq"].as_i64(),
            temperature_c: e.payload["temperature_c"].as_f64(),
            humidity_pct: e.payload["humidity_pct"].as_f64(),
            pressure_hpa: None,
            vibration_mm_s: e.payload["vibration_mm_s"].as_f64(),
            battery_pct: e.payload["battery_pct"].as_f64(),
            extra: Default::default(),
            payload: e.payload.clone(),
        })
        .collect();
    store
        .project(&sluice_store::ProjectionBatch {
            version: 1,
            readings,
            ..Default::default()
        })
        .await
        .unwrap();

    let features =
        |out: sluice_runtime::Outputs| out.events().next().unwrap().1.payload["features"].clone();
    // One inferencer saw every reading; the restarted one sees only the last.
    let config = config_with(&shipped_model(), 60_000);
    let always = Inferencer::start(Settings::new("inferencer", config.clone()), None).await;
    let mut whole = always.score(&events).await;
    let expected = features(whole.pop().unwrap().unwrap());
    let restarted = Inferencer::start(
        Settings::new("inferencer", config.clone()),
        Some(store.clone()),
    )
    .await;
    let got = features(restarted.score(next).await.pop().unwrap().unwrap());
    assert_eq!(got, expected, "the same features as without the restart");
    assert_eq!(restarted.stats().warmed.load(Ordering::Relaxed), 1);
    // Without the store the device starts cold: warming up, all features zero.
    let cold = Inferencer::start(Settings::new("inferencer", config), None).await;
    let zeros = features(cold.score(next).await.pop().unwrap().unwrap());
    assert!(
        zeros.as_object().unwrap().values().all(|v| v == 0.0),
        "{zeros}"
    );
    store.close().await;
}
