//! `sluice dev` end to end, as a user runs it: publish over MQTT (with `mosquitto_pub`) and
//! HTTP (with the dev key), see the events in the store, stop with SIGTERM, start again on the
//! same directory, publish more (and some again): nothing lost, nothing stored twice.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_mqtt_bridge::testing::publish_lines;
use sluice_store::{Store, StoreOptions};
use uuid::Uuid;

mod common;
use common::{Dev, block_on, post, repo};

fn readings(n: usize) -> (Vec<Uuid>, Vec<String>) {
    (0..n)
        .map(|i| {
            let id = Uuid::new_v4();
            let body = json!({
                "event_id": id.to_string(),
                "occurred_at": chrono::Utc::now().to_rfc3339(),
                "payload": {"seq": i, "temperature_c": 21.0},
            });
            (id, body.to_string())
        })
        .unzip()
}

fn http_events(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "event_id": Uuid::new_v4().to_string(),
                "event_type": "sensor.reading",
                "aggregate_id": format!("http-dev-{}", i % 7),
                "occurred_at": chrono::Utc::now().to_rfc3339(),
                "payload": {"humidity_pct": 40.0},
            })
        })
        .collect()
}

fn id_of(event: &Value) -> Uuid {
    Uuid::parse_str(event["event_id"].as_str().unwrap()).unwrap()
}

/// Waits until the store holds `ids` (and nothing more), reading it from this process.
fn assert_store_holds_exactly(data: &Path, ids: &[Uuid]) {
    let url = format!("sqlite://{}", data.join("sluice.db").display());
    block_on(async {
        let store = Store::connect(&url, StoreOptions::default()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while store.event_count().await.unwrap() < ids.len() as u64 {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {} events",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            store.event_count().await.unwrap(),
            ids.len() as u64,
            "nothing twice"
        );
        for id in ids {
            assert!(
                store.event_by_id(*id).await.unwrap().is_some(),
                "{id} is missing"
            );
        }
        store.close().await;
    });
}

#[test]
fn dev_takes_mqtt_and_http_and_continues_after_a_restart_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut all = Vec::new();

    let dev = Dev::start(&data, &[]);
    let (mqtt_ids, lines) = readings(300);
    publish_lines(dev.mqtt_port(), "devices/dev-1/telemetry", &lines, None);
    let first_http = http_events(200);
    post(&dev, &first_http[..100]);
    post(&dev, &first_http[100..]);
    all.extend(mqtt_ids);
    all.extend(first_http.iter().map(id_of));
    assert_store_holds_exactly(&data, &all);
    let summary = dev.stop();
    assert!(
        summary.starts_with("sluice dev stopped: 500 written"),
        "{summary}"
    );
    // A clean stop waits for the projector too: every reading is in the read models.
    assert_projected(&data, 500);

    let dev = Dev::start(&data, &[]);
    let (more_ids, mut lines) = readings(100);
    // A device resending what it already sent, and a client retrying a batch.
    lines.extend(lines[..20].to_vec());
    publish_lines(dev.mqtt_port(), "devices/dev-2/telemetry", &lines, None);
    let second_http = http_events(100);
    post(&dev, &second_http);
    post(&dev, &first_http[..50]);
    all.extend(more_ids);
    all.extend(second_http.iter().map(id_of));
    assert_store_holds_exactly(&data, &all);
    // The SQL endpoint loaded the first run's readings and follows the second's.
    let deadline = Instant::now() + Duration::from_secs(60);
    while dev.sql("SELECT count(*) AS n FROM readings") != "n\n700\n" {
        assert!(
            Instant::now() < deadline,
            "the SQL endpoint never saw 700 readings"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let tables = dev.psql("\\d");
    assert!(
        tables.contains("device_latest") && tables.contains("readings_1h"),
        "{tables}"
    );
    let latest = dev.psql("SELECT count(*) FROM device_latest WHERE device_id = 'dev-2'");
    assert!(latest.contains("\n        1\n"), "{latest}");
    dev.stop();
    assert_projected(&data, 700);
    // `sluice sql` reads a stopped data directory directly.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["sql", "--data-dir"])
        .arg(&data)
        .args(["--format", "csv", "SELECT count(*) AS n FROM readings"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "n\n700\n");
}

fn assert_projected(data: &Path, readings: u64) {
    let url = format!("sqlite://{}", data.join("sluice.db").display());
    block_on(async {
        let store = Store::connect(&url, StoreOptions::default()).await.unwrap();
        assert_eq!(store.readings_count(1).await.unwrap(), readings);
        assert!(store.device_latest(1, "dev-1").await.unwrap().is_some());
        store.close().await;
    });
}

#[test]
fn dev_with_a_simulated_fleet_fills_the_store_and_stops_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("dev")
        .arg("--data-dir")
        .arg(&data)
        .args(["--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args([
            "--registry-addr",
            "127.0.0.1:0",
            "--sql-addr",
            "127.0.0.1:0",
        ])
        .args(["--pg-addr", "127.0.0.1:0"])
        .args(["--simulate", "20", "--rate", "200", "--for", "4s"])
        .env_remove("SLUICE_LOG")
        .current_dir(repo())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap();
    let events: u64 = summary
        .split(", ")
        .find_map(|part| part.strip_suffix(" events in the store"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no event count in {summary:?}"));
    // 4 s at 200/s, less start-up: hundreds, not a handful.
    assert!(events >= 300, "{summary}");
}

#[test]
fn simulate_publishes_to_a_real_broker_and_reports_json() {
    let broker = sluice_mqtt_bridge::testing::Mosquitto::start();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "simulate",
            "--devices",
            "10",
            "--rate",
            "500",
            "--for",
            "2s",
            "--json",
        ])
        .args(["--seed", "7", "--mqtt", &broker.url()])
        .env_remove("SLUICE_LOG")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent >= 500, "{report}");
    assert_eq!(report["acknowledged"].as_u64().unwrap(), sent, "{report}");
    assert_eq!(report["failed"], 0);
}

#[test]
fn simulate_without_a_reachable_target_exits_1_with_the_reason() {
    let port = sluice_mqtt_bridge::testing::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["simulate", "--devices", "2", "--rate", "10", "--for", "30s"])
        .args(["--mqtt", &format!("mqtt://127.0.0.1:{port}")])
        .env_remove("SLUICE_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error:"), "{err}");
}

#[test]
fn dev_scores_readings_and_an_anomaly_reaches_sql_and_a_signed_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let dev = Dev::start(&data, &[]);
    let model = &dev.banner["model"];
    assert!(
        model.starts_with("sensor.reading: reading-iforest version "),
        "the shipped model scores, on ONNX Runtime (scripts/fetch-onnxruntime): {model}"
    );
    // A device's calm readings, then a spike.
    let t0 = chrono::Utc::now() - chrono::TimeDelta::minutes(1);
    let lines: Vec<String> = (0..41)
        .map(|i| {
            let temperature = if i == 40 {
                45.0
            } else {
                21.0 + f64::from(i % 3) / 10.0
            };
            json!({
                "event_id": Uuid::new_v4().to_string(),
                "occurred_at": (t0 + chrono::TimeDelta::seconds(i64::from(i))).to_rfc3339(),
                "payload": {"seq": i, "temperature_c": temperature},
            })
            .to_string()
        })
        .collect();
    publish_lines(dev.mqtt_port(), "devices/dev-9/telemetry", &lines, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let query = "SELECT device_id, model_name, model_version FROM anomalies";
    loop {
        let found = dev.sql(query);
        if found.contains("dev-9,reading-iforest,") {
            assert_eq!(found.lines().count(), 2, "only the spike: {found}");
            break;
        }
        assert!(Instant::now() < deadline, "no anomaly served: {found}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The router asked for an alert and the executor delivered it, signed, to the demo
    // receiver, which checked the signature.
    assert!(
        dev.banner["webhooks"].contains("demo receiver"),
        "{:?}",
        dev.banner
    );
    let webhooks = data.join("webhooks.jsonl");
    let delivered = loop {
        let text = std::fs::read_to_string(&webhooks).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("Anomaly on dev-9")) {
            break serde_json::from_str::<Value>(line).unwrap();
        }
        assert!(Instant::now() < deadline, "no webhook delivered: {text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(delivered["verified"], true, "{delivered}");
    // The action ledger is served over SQL.
    loop {
        let ledger = dev.sql("SELECT endpoint, outcome, http_status FROM action_ledger");
        if ledger.contains("ops-webhook,delivered,204") {
            break;
        }
        assert!(Instant::now() < deadline, "no ledger row served: {ledger}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        delivered["body"]["text"]
            .as_str()
            .unwrap()
            .contains("from reading-iforest 1"),
        "{delivered}"
    );
    dev.stop();
}
