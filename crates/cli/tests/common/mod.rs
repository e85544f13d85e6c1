//! What the end-to-end tests of the CLI share: a `sluice dev` started as a user starts it,
//! with the addresses its banner prints, and the commands run against it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A running `sluice dev` and the addresses its banner printed.
pub struct Dev {
    pub child: Child,
    pub banner: BTreeMap<String, String>,
    pub stdout: mpsc::Receiver<String>,
}

impl Dev {
    pub fn start(data: &Path, extra: &[&str]) -> Dev {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("dev")
            .arg("--data-dir")
            .arg(data)
            .args(["--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args([
                "--registry-addr",
                "127.0.0.1:0",
                "--sql-addr",
                "127.0.0.1:0",
            ])
            .args(["--pg-addr", "127.0.0.1:0"])
            .args(extra)
            .env_remove("SLUICE_LOG")
            .current_dir(repo())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(
            move || for _ in BufReader::new(stderr).lines().map_while(Result::ok) {},
        );
        let mut banner = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("the banner within a minute");
            if line.starts_with("Ctrl-C stops it") {
                break;
            }
            if let Some((k, v)) = line.strip_prefix("  ").and_then(|r| r.split_once(' ')) {
                banner.insert(k.to_owned(), v.trim().to_owned());
            }
        }
        Dev {
            child,
            banner,
            stdout: rx,
        }
    }

    pub fn mqtt_port(&self) -> u16 {
        let url = &self.banner["mqtt"];
        url.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn http(&self) -> String {
        self.banner["http"].clone()
    }

    pub fn key(&self) -> String {
        self.key_of("api-key")
    }

    pub fn key_of(&self, line: &str) -> String {
        let file = self.banner[line].split(' ').next().unwrap().to_owned();
        std::fs::read_to_string(file).unwrap().trim().to_owned()
    }

    /// `sluice sql` against the endpoint the banner printed, as CSV.
    pub fn sql(&self, query: &str) -> String {
        let endpoint = self.banner["sql"].trim_end_matches("/v1/query").to_owned();
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["sql", "--endpoint", &endpoint, "--format", "csv", query])
            .env("SLUICE__API_KEY", self.key_of("sql-key"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `psql` against the Postgres port the banner printed.
    pub fn psql(&self, command: &str) -> String {
        let addr = self.banner["postgres"]
            .trim_start_matches("postgres://")
            .to_owned();
        let (host, port) = addr.rsplit_once(':').unwrap();
        let out = Command::new("psql")
            .args([
                "-X", "-h", host, "-p", port, "-U", "analyst", "-d", "sluice", "-c", command,
            ])
            .env("PGPASSWORD", self.key_of("sql-key"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGTERM; the exit must be clean and the last line the summary.
    pub fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = self.child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
        // The reader thread ends at the pipe's end; its last lines may still be on the way.
        let mut lines = Vec::new();
        while let Ok(line) = self.stdout.recv_timeout(Duration::from_secs(5)) {
            lines.push(line);
        }
        lines.last().cloned().unwrap_or_default()
    }
}

/// Posts `events` to the dev's HTTP ingest API with its key; they must be accepted.
pub fn post(dev: &Dev, events: &[serde_json::Value]) {
    let status = block_on(async {
        reqwest::Client::new()
            .post(dev.http())
            .bearer_auth(dev.key())
            .json(&events)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, reqwest::StatusCode::ACCEPTED);
}
