//! The statistical fallback: it scores when no model is configured and when ONNX Runtime
//! cannot be loaded, and every result says so. This binary never loads ONNX Runtime (the
//! library is loaded once per process), so these tests live apart from the model's.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::*;
use serde_json::json;
use sluice_inferencer::{
    FALLBACK_MODEL, FALLBACK_VERSION, Inferencer, InferencerConfig, ModelConfig, Settings,
};
use sluice_runtime::MemoryDlq;

fn result(out: sluice_runtime::Outputs) -> serde_json::Value {
    out.events().next().unwrap().1.payload.clone()
}

#[tokio::test]
async fn without_a_model_the_fallback_scores_and_flags_a_spike() {
    let inferencer = Inferencer::start(
        Settings::new("inferencer", InferencerConfig::default()),
        None,
    )
    .await;
    let at = chrono::Utc::now();
    let mut events: Vec<_> = (0..40)
        .map(|i| {
            reading(
                "dev-1",
                at + chrono::TimeDelta::seconds(i),
                json!({"temperature_c": 20.0 + (i % 5) as f64 / 10.0}),
            )
        })
        .collect();
    events.push(reading(
        "dev-1",
        at + chrono::TimeDelta::seconds(41),
        json!({"temperature_c": 35.0, "site": "plant-2"}),
    ));
    let results: Vec<_> = inferencer
        .score(&events)
        .await
        .into_iter()
        .map(|r| result(r.unwrap()))
        .collect();
    for r in &results {
        assert_eq!(r["model_name"], FALLBACK_MODEL);
        assert_eq!(r["model_version"], FALLBACK_VERSION);
        assert_eq!(r["threshold"], 3.0);
    }
    let labels: Vec<&str> = results
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels[..40],
        ["normal"; 40],
        "the steady readings are normal"
    );
    let spike = &results[40];
    assert_eq!(spike["label"], "anomaly", "{spike}");
    assert!(spike["score"].as_f64().unwrap() > 3.0);
    assert_eq!(spike["site"], "plant-2");
    assert_eq!(
        inferencer.stats().fallback_scored.load(Ordering::Relaxed),
        41
    );
}

#[tokio::test]
async fn when_onnx_runtime_cannot_be_loaded_the_fallback_scores_in_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("libonnxruntime.so");
    std::fs::write(&bogus, b"not a shared library").unwrap();
    let mut config = InferencerConfig::default();
    config.models.insert(
        "sensor.reading".into(),
        ModelConfig {
            path: shipped_model().display().to_string(),
            version: "latest".into(),
            threshold: None,
            features: Default::default(),
        },
    );
    config.reload_interval = std::time::Duration::from_millis(20);
    let mut settings = Settings::new("inferencer", config);
    settings.ort_library = Some(bogus);
    let inferencer = Arc::new(Inferencer::start(settings, None).await);
    assert_eq!(inferencer.model_of("sensor.reading"), None);

    let rig = rig().await;
    let (token, task) = rig.start(inferencer.clone(), Arc::new(MemoryDlq::default()));
    let mut reader = rig.reader();
    let (events, _) = fleet(3, 30, 0.0, 1);
    rig.produce(&events).await;
    reader.until("30 results", |got| got.len() >= 30).await;
    let models: HashSet<_> = reader
        .got
        .iter()
        .map(|e| e.payload["model_name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        models,
        HashSet::from([FALLBACK_MODEL.to_owned()]),
        "every result says the fallback scored it"
    );
    // Reloads kept failing the same way meanwhile; nothing was loaded.
    assert_eq!(inferencer.stats().loads.load(Ordering::Relaxed), 0);
    token.cancel();
    task.await.unwrap().unwrap();
}
