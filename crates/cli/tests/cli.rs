//! The `sluice` binary as a user runs it: exit codes, what it prints, and a registry it serves.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

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
    for args in [
        &["dev"][..],
        &["run", "projector", "--topology", "topologies/default.yaml"],
        &["dlq", "list"],
        &["migrate", "--store", "sqlite://x.db"],
    ] {
        let out = sluice(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("not available"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    }
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
