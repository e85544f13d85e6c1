//! The `sluice` binary as a user runs it: exit codes, what it prints, a registry it serves,
//! migrations, processors it runs, and the ingest bench.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sluice_store::testing::TestDatabase;
use sluice_store::{Store, StoreOptions};

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run sluice")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_the_whole_command_tree() {
    let out = sluice(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for command in [
        "dev", "run", "topology", "schemas", "registry", "simulate", "sql", "replay", "dlq",
        "keys", "migrate", "bench",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "{command} missing from --help:\n{help}"
        );
    }
}

#[test]
fn commands_of_later_components_say_so_and_exit_2() {
    let out = sluice(&["bench", "pipeline"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("not available"), "{err}");
    assert!(out.stdout.is_empty(), "printed to stdout");
}

/// Operator commands say why they cannot start: no data where they look, or a store URL
/// without an operator key; and nothing is created on the way.
#[test]
fn operator_commands_need_data_and_an_operator_key() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("nothing-here");
    let out = sluice(&["dlq", "list", "--data-dir", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no Sluice data in"),
        "{}",
        text(&out.stderr)
    );
    assert!(!empty.exists(), "nothing created");
    let db = format!("sqlite://{}", dir.path().join("s.db").display());
    let out = sluice(&["replay", "list", "--store", &db]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--key"), "{}", text(&out.stderr));
    let out = sluice(&["replay", "--data-dir", empty.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "neither --to-topic nor --rebuild"
    );
}

#[test]
fn the_default_topology_validates() {
    let out = sluice(&["topology", "validate", "topologies/default.yaml"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("topologies/default.yaml: ok"));
}

#[test]
fn three_mistakes_are_all_reported_and_exit_1() {
    let fixture = "crates/topology/tests/fixtures/three-mistakes.yaml";
    let out = sluice(&["topology", "validate", fixture, "--schemas", "schemas"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for line in &lines {
        // `FILE: location: message`
        assert!(line.starts_with(fixture), "{line}");
        assert!(line.matches(": ").count() >= 2, "no location in {line}");
    }
    assert!(text(&out.stderr).contains("3 problems"));
}

#[test]
fn a_missing_topology_file_is_one_clear_line() {
    let out = sluice(&["topology", "validate", "topologies/nope.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("nope.yaml"), "{all}");
}

#[test]
fn graph_draws_mermaid_and_dot() {
    let mermaid = sluice(&["topology", "graph", "topologies/default.yaml"]);
    assert!(mermaid.status.success());
    let m = text(&mermaid.stdout);
    assert!(m.starts_with("flowchart LR"), "{m}");
    assert!(
        m.contains("ingest-validator") && m.contains("events.sensor-reading"),
        "{m}"
    );

    let dot = sluice(&[
        "topology",
        "graph",
        "topologies/default.yaml",
        "--format",
        "dot",
    ]);
    assert!(dot.status.success());
    let d = text(&dot.stdout);
    assert!(
        d.starts_with("digraph") && d.trim_end().ends_with('}'),
        "{d}"
    );
}

#[test]
fn schemas_check_passes_on_the_repo() {
    let out = sluice(&["schemas", "check"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("5 subjects"));
}

#[test]
fn schemas_check_fails_on_a_field_added_without_default() {
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("device.status");
    fs::create_dir(&subject).unwrap();
    let v1 = fs::read_to_string(repo().join("schemas/device.status/1.avsc")).unwrap();
    fs::write(subject.join("1.avsc"), &v1).unwrap();
    let mut v2: serde_json::Value = serde_json::from_str(&v1).unwrap();
    for field in v2["fields"].as_array_mut().unwrap() {
        if field["name"] == "payload" {
            field["type"]["fields"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"name": "site", "type": "string"}));
        }
    }
    fs::write(subject.join("2.avsc"), v2.to_string()).unwrap();

    let out = sluice(&["schemas", "check", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("device.status v2 breaks BACKWARD"),
        "{stdout}"
    );
    assert!(stdout.contains("payload.site"), "{stdout}");
}

/// A running `sluice registry serve`, stopped with SIGTERM by `terminate`.
struct Served {
    child: std::process::Child,
    url: String,
}

impl Served {
    fn start(data: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "registry",
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--schemas",
                "schemas",
            ])
            .arg("--data-dir")
            .arg(data)
            .current_dir(repo())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("registry listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self { child, url }
    }

    fn terminate(self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        // Wait for the exit itself, on a thread, with a deadline.
        let (tx, rx) = std::sync::mpsc::channel();
        let mut child = self.child;
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("registry did not stop on SIGTERM")
            .unwrap()
    }
}

#[test]
fn registry_serve_persists_ids_across_restarts_and_stops_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get = |url: String| {
        rt.block_on(async move {
            reqwest::get(url)
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        })
    };

    let first = Served::start(data.path());
    let subjects = get(format!("{}/subjects", first.url));
    assert_eq!(subjects.as_array().unwrap().len(), 5, "{subjects}");
    let latest = get(format!(
        "{}/subjects/sensor.reading/versions/latest",
        first.url
    ));
    assert_eq!(latest["version"], 2, "{latest}");
    assert!(first.terminate().success());

    let second = Served::start(data.path());
    let again = get(format!(
        "{}/subjects/sensor.reading/versions/latest",
        second.url
    ));
    assert_eq!(again["id"], latest["id"]);
    let by_id = get(format!("{}/schemas/ids/{}", second.url, latest["id"]));
    assert_eq!(by_id["schema"], latest["schema"]);
    assert!(second.terminate().success());
}

#[test]
fn bench_log_on_the_embedded_log_prints_figures_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("embedded://{}", dir.path().display());
    let out = sluice(&[
        "bench",
        "log",
        "--log",
        &url,
        "--messages",
        "3000",
        "--batch",
        "500",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["messages"], 3000);
    for field in [
        "produce_msgs_per_s",
        "consume_msgs_per_s",
        "baseline_fsync_msgs_per_s",
        "produce_vs_baseline",
    ] {
        assert!(
            report[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {report}"
        );
    }
    let latency = &report["latency_ms"];
    assert!(latency["p50"].as_f64().unwrap() <= latency["p99"].as_f64().unwrap());
    assert!(latency["p99"].as_f64().unwrap() <= latency["max"].as_f64().unwrap());
}

#[test]
fn bench_log_refuses_an_unknown_log_url() {
    let out = sluice(&[
        "bench",
        "log",
        "--log",
        "carrier-pigeon://x",
        "--messages",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid log URL"),
        "{}",
        text(&out.stderr)
    );
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Runs `sluice migrate` twice on `url`: the first creates the schema, the second finds it up
/// to date; then the store answers on it.
fn migrate_twice(url: &str) {
    let first = sluice(&["migrate", "--store", url]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let said = text(&first.stdout);
    assert!(
        said.starts_with("migrated ") && said.contains("schema created"),
        "{said}"
    );

    let second = sluice(&["migrate", "--store", url]);
    assert!(second.status.success(), "{}", text(&second.stderr));
    let said = text(&second.stdout);
    assert!(said.trim_end().ends_with(": up to date"), "{said}");
    assert!(!said.contains("created"), "{said}");

    block_on(async {
        let store = Store::connect(url, StoreOptions::default()).await.unwrap();
        assert_eq!(store.event_count().await.unwrap(), 0);
        assert_eq!(store.outbox_depth().await.unwrap(), 0);
        store.close().await;
    });
}

#[test]
fn migrate_creates_the_schema_once_on_a_fresh_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    migrate_twice(&format!("sqlite://{}/new/sluice.db", dir.path().display()));
}

#[test]
fn migrate_creates_the_schema_once_on_a_fresh_postgres_database() {
    let db = block_on(TestDatabase::create());
    migrate_twice(&db.url);
    block_on(db.drop_now());
}

#[test]
fn migrate_refuses_an_unknown_store_url_in_one_line() {
    let out = sluice(&["migrate", "--store", "mysql://localhost/x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("mysql://localhost/x") && err.contains("sqlite://PATH"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

fn bench_ingest_json(store: &str, log_dir: &Path) -> serde_json::Value {
    let log = format!("embedded://{}", log_dir.display());
    let out = sluice(&[
        "bench",
        "ingest",
        "--store",
        store,
        "--log",
        &log,
        "--events",
        "2000",
        "--batch",
        "250",
        "--devices",
        "50",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("100% relayed"),
        "no progress: {}",
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["events"], 2000, "{report}");
    assert_eq!(report["appended"], 2000, "{report}");
    assert_eq!(report["published"], 2000, "{report}");
    assert_eq!(report["relayed"], 2000, "{report}");
    for field in [
        "produce_events_per_s",
        "appended_events_per_s",
        "relayed_events_per_s",
    ] {
        assert!(
            report[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {report}"
        );
    }
    let lag = &report["relay_lag_ms"];
    assert!(lag["p50"].as_f64().unwrap() >= 0.0, "{report}");
    assert!(lag["p50"].as_f64().unwrap() <= lag["p99"].as_f64().unwrap());
    assert!(lag["p99"].as_f64().unwrap() <= lag["max"].as_f64().unwrap());
    report
}

#[test]
fn bench_ingest_on_the_embedded_log_and_sqlite_relays_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/sluice.db", dir.path().display());
    let report = bench_ingest_json(&store, &dir.path().join("log"));
    assert_eq!(report["store"], "sqlite");
    assert!(report["copy_rows_per_s"].is_null(), "{report}");
    assert!(report["appended_vs_copy"].is_null(), "{report}");
    assert!(
        report["copy_baseline"].as_str().unwrap().contains("SQLite"),
        "{report}"
    );
    // The events are real: a second run on the same store and log adds its own.
    bench_ingest_json(&store, &dir.path().join("log"));
    let count = block_on(async {
        let store = Store::connect(&store, StoreOptions::default())
            .await
            .unwrap();
        let count = store.event_count().await.unwrap();
        store.close().await;
        count
    });
    // 2 × 2000, plus one warm-up event per partition per run.
    assert_eq!(count, 2 * (2000 + 6));
}

#[test]
fn bench_ingest_on_postgres_reports_a_copy_baseline() {
    let db = block_on(TestDatabase::create());
    let dir = tempfile::tempdir().unwrap();
    let report = bench_ingest_json(&db.url, dir.path());
    assert_eq!(report["store"], "postgres");
    for field in [
        "copy_rows_per_s",
        "copy_all_tables_rows_per_s",
        "appended_vs_copy",
        "appended_vs_copy_all_tables",
    ] {
        assert!(
            report[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {report}"
        );
    }
    block_on(db.drop_now());
}

#[test]
fn bench_ingest_refuses_a_store_with_a_waiting_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/sluice.db", dir.path().display());
    block_on(async {
        let s = Store::connect(
            &store,
            StoreOptions {
                migrate_on_connect: true,
                ..StoreOptions::default()
            },
        )
        .await
        .unwrap();
        let event = sluice_core::Event::new(
            sluice_core::EventType::new("sensor.reading").unwrap(),
            "dev-1",
            chrono::Utc::now(),
            serde_json::json!({"temperature_c": 20.0}),
            sluice_core::Source::Http,
        )
        .unwrap();
        let batch = sluice_store::AppendBatch {
            events: vec![sluice_store::AppendEvent {
                event,
                topic: "events.sensor-reading".into(),
                key: b"dev-1".to_vec(),
                value: vec![0],
            }],
            ..Default::default()
        };
        s.append(&batch).await.unwrap();
        s.close().await;
    });
    let log = format!("embedded://{}/log", dir.path().display());
    let out = sluice(&[
        "bench", "ingest", "--store", &store, "--log", &log, "--events", "10",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("outbox has 1 entries waiting"),
        "{}",
        text(&out.stderr)
    );
}

/// Starts `sluice run <processor>` on a fresh embedded log and SQLite store, waits for its
/// start line, sends SIGTERM and expects a clean exit within 10 s.
fn run_until_sigterm(processor: &str) -> Vec<String> {
    run_until_sigterm_with(processor, &[])
}

/// Like [`run_until_sigterm`], with `env` set; returns its log lines.
fn run_until_sigterm_with(processor: &str, env: &[(&str, String)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["run", processor, "--topology", "topologies/default.yaml"])
        .arg("--log")
        .arg(format!("embedded://{}/log", dir.path().display()))
        .arg("--store")
        .arg(format!("sqlite://{}/s.db", dir.path().display()))
        .arg("--migrate")
        .env_remove("SLUICE_LOG")
        .env_remove("SLUICE_LOG_FORMAT")
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Every stderr line, as it comes, on a thread of its own.
    let (lines_tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let started = line.contains(" started");
                seen.push(line);
                if started {
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!(
                    "{processor} did not log its start ({e}):\n{}",
                    seen.join("\n")
                );
            }
        }
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{processor} did not stop within 10 s of SIGTERM"))
        .unwrap();
    // The reader thread ends at the pipe's end; its last lines may still be on the way.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        seen.push(line);
    }
    assert_eq!(status.code(), Some(0), "{}", seen.join("\n"));
    assert!(
        seen.iter()
            .any(|l| l.contains("stopped") && l.contains("ok=true")),
        "{}",
        seen.join("\n")
    );
    seen
}

#[test]
fn run_action_router_starts_and_stops_cleanly_on_sigterm() {
    let lines = run_until_sigterm("action-router");
    let start = lines.iter().find(|l| l.contains(" started")).unwrap();
    assert!(start.contains("rules=2"), "{start}");
}

#[test]
fn run_executor_starts_with_its_secret_and_stops_cleanly_on_sigterm() {
    let lines = run_until_sigterm_with(
        "executor",
        &[(
            "SLUICE_OPS_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned(),
        )],
    );
    let start = lines.iter().find(|l| l.contains(" started")).unwrap();
    assert!(start.contains("ops-webhook"), "{start}");
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")),
        "the secret is never logged"
    );
}

#[test]
fn run_executor_without_its_secret_names_the_variable_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "executor", "--topology", "topologies/default.yaml"])
        .arg("--log")
        .arg(format!("embedded://{}/log", dir.path().display()))
        .arg("--store")
        .arg(format!("sqlite://{}/s.db", dir.path().display()))
        .arg("--migrate")
        .env_remove("SLUICE_OPS_WEBHOOK_SECRET")
        .current_dir(repo())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("SLUICE_OPS_WEBHOOK_SECRET"), "{err}");
}

#[test]
fn run_inferencer_starts_with_the_shipped_model_and_stops_cleanly_on_sigterm() {
    let lines = run_until_sigterm("inferencer");
    let start = lines.iter().find(|l| l.contains(" started")).unwrap();
    assert!(
        start.contains("sensor.reading: reading-iforest version 1"),
        "the start line names the model (ONNX Runtime from scripts/fetch-onnxruntime): {start}"
    );
}

#[test]
fn run_inferencer_without_onnx_runtime_scores_with_the_fallback_and_says_how_to_fix_it() {
    let lines = run_until_sigterm_with(
        "inferencer",
        &[(
            "ORT_DYLIB_PATH",
            "/nonexistent/libonnxruntime.so".to_owned(),
        )],
    );
    let all = lines.join("\n");
    let start = lines.iter().find(|l| l.contains(" started")).unwrap();
    assert!(start.contains("sensor.reading: ewma-zscore"), "{all}");
    let problems: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("model not loaded"))
        .collect();
    assert_eq!(problems.len(), 1, "logged once: {all}");
    assert!(problems[0].contains("scripts/fetch-onnxruntime"), "{all}");
}

#[test]
fn run_ingest_validator_starts_and_stops_cleanly_on_sigterm() {
    run_until_sigterm("ingest-validator");
}

#[test]
fn run_outbox_relay_starts_and_stops_cleanly_on_sigterm() {
    run_until_sigterm("outbox-relay");
}

#[test]
fn run_mqtt_bridge_starts_and_stops_cleanly_on_sigterm() {
    let broker = sluice_mqtt_bridge::testing::Mosquitto::start();
    run_until_sigterm_with("mqtt-bridge", &[("SLUICE__MQTT_BROKER", broker.url())]);
}

#[test]
fn run_http_ingest_starts_and_stops_cleanly_on_sigterm() {
    run_until_sigterm_with(
        "http-ingest",
        &[("SLUICE__HTTP_ADDR", "127.0.0.1:0".to_owned())],
    );
}

#[test]
fn run_query_starts_and_stops_cleanly_on_sigterm() {
    run_until_sigterm_with(
        "query",
        &[
            ("SLUICE__QUERY_HTTP_ADDR", "127.0.0.1:0".to_owned()),
            ("SLUICE__QUERY_PG_ADDR", "127.0.0.1:0".to_owned()),
        ],
    );
}

#[test]
fn run_lists_the_topology_processors_when_the_name_is_unknown() {
    let out = sluice(&[
        "run",
        "ingest-validatr",
        "--topology",
        "topologies/default.yaml",
        "--log",
        "embedded:///nonexistent",
        "--store",
        "sqlite:///nonexistent/s.db",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("ingest-validatr") && err.contains("ingest-validator, outbox-relay"),
        "{err}"
    );
}

#[test]
fn run_without_a_store_is_a_usage_error() {
    let out = sluice(&[
        "run",
        "outbox-relay",
        "--topology",
        "topologies/default.yaml",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--store"),
        "{}",
        text(&out.stderr)
    );
}

/// `sluice run <processor>` on `dir`'s embedded log and `store`, stderr drained on a thread.
fn spawn_run(processor: &str, dir: &Path, store: &str) -> std::process::Child {
    spawn_run_with(processor, "topologies/default.yaml", &[], dir, store)
}

/// `sluice run <processor>` on `topology` with `env` set.
fn spawn_run_with(
    processor: &str,
    topology: &str,
    env: &[(&str, &str)],
    dir: &Path,
    store: &str,
) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", processor, "--topology", topology])
        .envs(env.iter().copied())
        .arg("--log")
        .arg(format!("embedded://{}/log", dir.display()))
        .args(["--store", store, "--migrate"])
        .env_remove("SLUICE_LOG")
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || for _ in BufReader::new(stderr).lines().map_while(Result::ok) {});
    child
}

/// Waits (at most a minute) until `check` holds, reading the store from this process.
fn wait_for(what: &str, store: &Store, check: impl AsyncFn(&Store) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !block_on(check(store)) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(mut child: std::process::Child, signal: &str) {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    if signal == "-TERM" {
        assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
    }
}

/// The write path survives `kill -9` of each processor mid-stream: the validator between
/// appends and log commits, the relay between publishes and deletes. After restarts the store
/// has every event exactly once and every event reached its topic (copies allowed).
#[test]
fn kill_9_of_the_validator_and_the_relay_loses_nothing_and_stores_nothing_twice() {
    const N: usize = 30_000;
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}/s.db", dir.path().display());
    let ids: Vec<String> = (0..N).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    block_on(async {
        use sluice_log::{Log, Producer};
        let log =
            sluice_log::EmbeddedLog::from_url(&format!("embedded://{}/log", dir.path().display()))
                .unwrap();
        log.create_topic(&sluice_log::TopicSpec::new("ingest.raw", 6))
            .await
            .unwrap();
        let producer = log.producer().unwrap();
        let now = chrono::Utc::now().to_rfc3339();
        for chunk in ids.chunks(1_000) {
            let records = chunk
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let device = format!("dev-{}", i % 50);
                    let value = serde_json::json!({
                        "event_id": id, "event_type": "sensor.reading", "aggregate_id": device,
                        "occurred_at": now, "payload": {"temperature_c": 20.5},
                    });
                    sluice_log::Record {
                        key: Some(device.into_bytes()),
                        value: serde_json::to_vec(&value).unwrap(),
                        ..sluice_log::Record::default()
                    }
                })
                .collect();
            producer.send("ingest.raw", records).await.unwrap();
        }
    });
    let store = block_on(Store::connect(&store_url, StoreOptions::default())).unwrap();
    block_on(store.migrate()).unwrap();

    let validator = spawn_run("ingest-validator", dir.path(), &store_url);
    wait_for("the validator to be mid-stream", &store, async |s| {
        s.event_count().await.unwrap() > 0
    });
    stop(validator, "-KILL");
    let at_kill = block_on(store.event_count()).unwrap() as usize;
    assert!(at_kill < N, "killed mid-stream ({at_kill} of {N} stored)");
    let validator = spawn_run("ingest-validator", dir.path(), &store_url);
    wait_for("every input in the store", &store, async |s| {
        let offsets = s.consumer_offsets("ingest-validator").await.unwrap();
        offsets.iter().map(|o| o.next_offset).sum::<i64>() == N as i64
    });
    stop(validator, "-TERM");
    assert_eq!(
        block_on(store.event_count()).unwrap(),
        N as u64,
        "each event exactly once"
    );
    assert_eq!(block_on(store.outbox_depth()).unwrap(), N as u64);

    let relay = spawn_run("outbox-relay", dir.path(), &store_url);
    wait_for("the relay to be mid-stream", &store, async |s| {
        s.outbox_depth().await.unwrap() < N as u64
    });
    stop(relay, "-KILL");
    let relay = spawn_run("outbox-relay", dir.path(), &store_url);
    wait_for("the outbox to drain", &store, async |s| {
        s.outbox_depth().await.unwrap() == 0
    });
    stop(relay, "-TERM");

    let published = block_on(async {
        use sluice_log::{Consumer, Log};
        let log =
            sluice_log::EmbeddedLog::from_url(&format!("embedded://{}/log", dir.path().display()))
                .unwrap();
        let registry = std::sync::Arc::new(sluice_schemas::Registry::in_memory());
        registry
            .register_dir(&sluice_schemas::SchemaDir::load(&repo().join("schemas")).unwrap())
            .unwrap();
        let codec = sluice_schemas::EventCodec::new(registry);
        let mut consumer = log.consumer("check", &["events.sensor-reading"]).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        let mut copies = 0;
        loop {
            let batch = consumer
                .poll(10_000, Duration::from_millis(500))
                .await
                .unwrap();
            if batch.is_empty() {
                break;
            }
            for m in batch {
                copies += 1;
                seen.insert(codec.decode(&m.value).await.unwrap().event_id.to_string());
            }
        }
        (seen, copies)
    });
    let expected: std::collections::BTreeSet<String> = ids.into_iter().collect();
    assert!(published.1 >= N, "{} copies", published.1);
    assert_eq!(published.0, expected, "every event reached its topic");
}

#[test]
fn bench_project_on_sqlite_projects_every_reading_and_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/sluice.db", dir.path().display());
    let out = sluice(&[
        "bench",
        "project",
        "--store",
        &store,
        "--readings",
        "3000",
        "--devices",
        "50",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["readings"], 3000);
    assert!(
        report["projected_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        report["copy_rows_per_s"].is_null(),
        "no COPY on SQLite: {report}"
    );
    // Its scratch projection version is dropped afterwards.
    let version = i32::try_from(report["version"].as_i64().unwrap()).unwrap();
    assert_ne!(version, 1, "never the live version");
    let left = block_on(async {
        let store = Store::connect(&store, StoreOptions::default())
            .await
            .unwrap();
        let n = store.readings_count(version).await.unwrap();
        store.close().await;
        n
    });
    assert_eq!(left, 0);
}

#[test]
fn bench_query_times_the_endpoint_against_postgres_and_leaves_no_trace() {
    let db = block_on(sluice_store::testing::TestDatabase::create());
    let out = sluice(&[
        "bench",
        "query",
        "--store",
        &db.url,
        "--rows",
        "5000",
        "--devices",
        "50",
        "--runs",
        "5",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let queries = report["queries"].as_array().unwrap();
    assert_eq!(queries.len(), 5, "{report}");
    for q in queries {
        // The bench itself fails when the two sides answer different row counts.
        assert!(q["rows"].as_u64().unwrap() > 0, "{q}");
        assert!(q["sluice_p50_ms"].as_f64().unwrap() > 0.0, "{q}");
        assert!(q["postgres_p50_ms"].as_f64().unwrap() > 0.0, "{q}");
    }
    let version = i32::try_from(report["version"].as_i64().unwrap()).unwrap();
    let (left, live_keys) = block_on(async {
        let store = Store::connect(&db.url, StoreOptions::default())
            .await
            .unwrap();
        let n = store.readings_count(version).await.unwrap();
        let keys = store.list_api_keys().await.unwrap();
        store.close().await;
        (n, keys.iter().filter(|k| k.revoked_at.is_none()).count())
    });
    assert_eq!(left, 0, "the scratch version is dropped");
    assert_eq!(live_keys, 0, "its key is revoked");
    block_on(db.drop_now());
}

/// The replay bench runs both jobs in a scratch database beside the one given, checks the
/// rebuilt rollups itself (it fails when they differ from a GROUP BY), and drops it; the
/// database given is not written to.
#[test]
fn bench_replay_runs_both_jobs_in_a_scratch_database_and_drops_it() {
    let db = block_on(sluice_store::testing::TestDatabase::create());
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "bench",
            "replay",
            "--store",
            &db.url,
            "--events",
            "3000",
            "--devices",
            "30",
            "--json",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["events"], 3000, "{report}");
    assert!(
        report["rollups_verified"].as_u64().unwrap() >= 30,
        "{report}"
    );
    for figure in [
        "copy_rows_per_s",
        "log_produce_msgs_per_s",
        "replay_events_per_s",
        "rebuild_events_per_s",
        "replay_vs_log",
        "rebuild_vs_copy",
    ] {
        assert!(report[figure].as_f64().unwrap() > 0.0, "{figure}: {report}");
    }
    let (scratch, events) = block_on(async {
        let mut admin = sluice_store::testing::admin().await;
        let scratch: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'sluice_bench_replay_' || $1 || '_%'",
        )
        .bind(pid.to_string())
        .fetch_one(&mut admin)
        .await
        .unwrap();
        let store = Store::connect(&db.url, StoreOptions::default())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let events = store.last_position().await.unwrap();
        store.close().await;
        (scratch, events)
    });
    assert_eq!(scratch, 0, "the scratch database is dropped");
    assert_eq!(events, 0, "the store given is not written to");
    block_on(db.drop_now());
}

#[test]
fn sql_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice(&[
        "sql",
        "--data-dir",
        &dir.path().display().to_string(),
        "SELECT 1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("run `sluice dev` first"),
        "{}",
        text(&out.stderr)
    );
    let out = sluice(&["sql", "--endpoint", "http://127.0.0.1:9", "SELECT 1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("API key"),
        "{}",
        text(&out.stderr)
    );
    let out = sluice(&["sql", "--format", "yaml", "SELECT 1"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bench_inference_prints_throughput_per_batch_size_and_paced_latency_as_json() {
    let out = sluice(&[
        "bench",
        "inference",
        "--rows",
        "4096",
        "--seconds",
        "0.3",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["model"], "reading-iforest version 1");
    let sizes: Vec<u64> = report["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["batch"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [1, 64, 1024]);
    for b in report["batches"].as_array().unwrap() {
        assert!(b["rows_per_s"].as_f64().unwrap() > 0.0, "{report}");
        assert!(b["cost_vs_fallback"].as_f64().unwrap() > 0.0, "{report}");
    }
    let paced = &report["paced"];
    assert_eq!(paced["readings"], 3000, "0.3 s at 10,000/s: {report}");
    assert!(paced["p99_ms"].as_f64().unwrap() >= paced["p50_ms"].as_f64().unwrap());
    assert!(paced["max_batch"].as_u64().unwrap() <= 64);
}

#[test]
fn bench_detection_scores_the_projection_against_the_truth_file() {
    use sluice_store::{Anomaly, ProjectionBatch};
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}/sluice.db", dir.path().display());
    let at: chrono::DateTime<chrono::Utc> = "2026-06-01T12:00:00Z".parse().unwrap();
    let ids: Vec<uuid::Uuid> = (0..6).map(|_| uuid::Uuid::new_v4()).collect();
    // Truth: readings 0..4 were anomalous. The model flagged 0, 1 and 5; the fallback 0..4.
    let truth: String = ids[..4]
        .iter()
        .map(|id| {
            format!(
                "{{\"event_id\":\"{id}\",\"device\":\"dev-00001\",\"occurred_at\":\"{}\",\"metric\":\"temperature_c\",\"kind\":\"spike\",\"value\":40.0}}\n",
                at.to_rfc3339()
            )
        })
        .collect();
    let truth_file = dir.path().join("truth.jsonl");
    std::fs::write(&truth_file, truth).unwrap();
    let anomaly = |input: uuid::Uuid, model: &str| Anomaly {
        event_id: uuid::Uuid::new_v4(),
        input_event_id: input,
        device_id: "dev-00001".into(),
        at,
        score: 0.9,
        threshold: 0.5,
        model_name: model.into(),
        model_version: "1".into(),
        features: Default::default(),
        site: None,
    };
    let mut anomalies: Vec<Anomaly> = [0, 1, 5]
        .iter()
        .map(|&i| anomaly(ids[i], "reading-iforest"))
        .collect();
    anomalies.extend(ids[..4].iter().map(|&id| anomaly(id, "ewma-zscore")));
    // Flagged a day later: outside the truth's span, not counted.
    let mut stale = anomaly(uuid::Uuid::new_v4(), "reading-iforest");
    stale.at = at + chrono::TimeDelta::days(1);
    anomalies.push(stale);
    block_on(async {
        let opts = StoreOptions {
            migrate_on_connect: true,
            ..StoreOptions::default()
        };
        let store = Store::connect(&store_url, opts).await.unwrap();
        let batch = ProjectionBatch {
            version: 1,
            anomalies,
            ..ProjectionBatch::default()
        };
        store.project(&batch).await.unwrap();
        store.close().await;
    });
    let out = sluice(&[
        "bench",
        "detection",
        "--truth",
        truth_file.to_str().unwrap(),
        "--store",
        &store_url,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["truth"], 4);
    let models = report["models"].as_array().unwrap();
    let figures = |name: &str| {
        let m = models.iter().find(|m| m["model"] == name).unwrap();
        (
            m["flagged"].as_u64().unwrap(),
            m["hits"].as_u64().unwrap(),
            m["precision"].as_f64().unwrap(),
            m["recall"].as_f64().unwrap(),
        )
    };
    let (flagged, hits, p, r) = figures("reading-iforest");
    assert_eq!((flagged, hits), (3, 2));
    assert!(
        (p - 2.0 / 3.0).abs() < 1e-9 && (r - 0.5).abs() < 1e-9,
        "{report}"
    );
    assert_eq!(figures("ewma-zscore"), (4, 4, 1.0, 1.0));
}

#[test]
fn bench_executor_prints_signed_and_plain_delivery_rates_and_the_short_circuit_cost() {
    let out = sluice(&["bench", "executor", "--deliveries", "300", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["deliveries"], 300);
    for field in [
        "delivered_per_s",
        "baseline_per_s",
        "ratio",
        "short_circuit_us",
    ] {
        assert!(report[field].as_f64().unwrap() > 0.0, "{field}: {report}");
    }
    assert!(report["p99_ms"].as_f64().unwrap() >= report["p50_ms"].as_f64().unwrap());
}

/// A webhook receiver on its own thread that records every webhook-id it is sent, answering
/// 204 after `delay` so that deliveries are in flight when a test kills the sender.
fn webhook_log(delay: Duration) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let ids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = ids.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
                    let seen = seen.clone();
                    async move {
                        tokio::time::sleep(delay).await;
                        let id = headers
                            .get("webhook-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        seen.lock().unwrap().push(id);
                        axum::http::StatusCode::NO_CONTENT
                    }
                });
                axum::serve(listener, app).await.unwrap();
            });
    });
    let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    (format!("http://{addr}/hooks/sluice"), ids)
}

#[test]
fn kill_9_of_the_executor_mid_delivery_delivers_every_action_once_per_webhook_id() {
    const N: usize = 600;
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}/s.db", dir.path().display());
    let (url, received) = webhook_log(Duration::from_millis(5));
    // The default topology, delivering to this test's receiver; a short timeout keeps the
    // claims of the killed executor (timeout + 5 s) from holding the test up long.
    let topology = dir.path().join("topology.yaml");
    let text = fs::read_to_string(repo().join("topologies/default.yaml"))
        .unwrap()
        .replace("http://127.0.0.1:9000/hooks/sluice", &url)
        .replace("timeout: 30s", "timeout: 1s");
    fs::write(&topology, text).unwrap();
    let topology = topology.to_str().unwrap();
    let actions: Vec<uuid::Uuid> = block_on(async {
        use sluice_log::{Log, Producer};
        let log =
            sluice_log::EmbeddedLog::from_url(&format!("embedded://{}/log", dir.path().display()))
                .unwrap();
        log.create_topic(&sluice_log::TopicSpec::new("actions.requested", 6))
            .await
            .unwrap();
        let registry = std::sync::Arc::new(sluice_schemas::Registry::in_memory());
        registry
            .register_dir(&sluice_schemas::SchemaDir::load(&repo().join("schemas")).unwrap())
            .unwrap();
        let codec = sluice_schemas::EventCodec::new(registry);
        let mut ids = Vec::new();
        let mut records = Vec::new();
        for i in 0..N {
            let device = format!("dev-{}", i % 50);
            let event = sluice_core::Event::new(
                sluice_core::EventType::new("action.requested").unwrap(),
                &device,
                chrono::Utc::now(),
                serde_json::json!({
                    "input_event_id": uuid::Uuid::new_v4().to_string(),
                    "rule_id": "anomaly-alert", "rule_version": 2, "endpoint": "ops-webhook",
                    "destructive": false, "denied": false, "suppressed": false,
                    "body": serde_json::json!({"text": format!("alert {i}")}).to_string(),
                }),
                sluice_core::Source::Processor("action-router".into()),
            )
            .unwrap();
            ids.push(event.event_id);
            let (value, _) = codec.encode(&event).await.unwrap();
            records.push(sluice_log::Record {
                key: Some(device.into_bytes()),
                value,
                ..sluice_log::Record::default()
            });
        }
        log.producer()
            .unwrap()
            .send("actions.requested", records)
            .await
            .unwrap();
        ids
    });
    let store = block_on(Store::connect(&store_url, StoreOptions::default())).unwrap();
    block_on(store.migrate()).unwrap();
    let env = [("SLUICE_OPS_WEBHOOK_SECRET", SECRET)];

    let executor = spawn_run_with("executor", topology, &env, dir.path(), &store_url);
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.lock().unwrap().len() < N / 4 {
        assert!(Instant::now() < deadline, "no deliveries under way");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop(executor, "-KILL");
    let at_kill = received.lock().unwrap().len();
    assert!(
        at_kill < N,
        "killed mid-delivery ({at_kill} of {N} delivered)"
    );
    let executor = spawn_run_with("executor", topology, &env, dir.path(), &store_url);
    let distinct = || {
        received
            .lock()
            .unwrap()
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while distinct() < N {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} delivered",
            distinct()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for("every action recorded delivered", &store, async |s| {
        s.actions_pending().await.unwrap() == 0
    });
    stop(executor, "-TERM");
    let got = received.lock().unwrap().clone();
    let expected: std::collections::HashSet<String> =
        actions.iter().map(ToString::to_string).collect();
    let ids: std::collections::HashSet<String> = got.iter().cloned().collect();
    assert_eq!(ids, expected, "every action reached the receiver");
    // Only what was in flight at the kill (its record lost with the process) was sent again,
    // under the same webhook-id, which the receiver deduplicates on.
    let resent = got.len() - ids.len();
    println!("killed after {at_kill} of {N} deliveries; {resent} sent again after the restart");
    assert!(resent <= 64, "{resent} deliveries sent twice");
    for id in &actions {
        let row = block_on(store.action(*id)).unwrap().unwrap();
        assert_eq!(row.status, sluice_store::ActionStatus::Delivered);
    }
}
