//! Our signatures checked by an implementation Sluice did not write: a Python receiver using
//! the PyPI `standardwebhooks` package (tests/receiver.py).
//!
//! The package is installed once into a virtual environment under the target directory
//! (`target/tmp/standardwebhooks-<version>-venv`), created with `python3 -m venv` and pip from
//! PyPI. Without python3, venv or pip the test fails with a message saying what is missing; it
//! is never skipped.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::endpoint_with;
use sluice_executor::{Breaker, Deliverer, Destinations, Status};

/// The pinned version of the PyPI `standardwebhooks` package.
const STANDARDWEBHOOKS: &str = "1.1.0";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Another valid secret: what a receiver configured with [`SECRET`] must reject.
const WRONG_SECRET: &str = "whsec_dGhpcyBpcyBub3QgdGhlIHJpZ2h0IGtleSBhdCBhbGw=";

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The venv's python, creating the venv on first use. A file lock serialises test processes
/// (nextest runs each test in its own); a marker file says the install completed.
fn venv_python() -> PathBuf {
    let python3_works = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        python3_works,
        "python3 is not installed or not on PATH: this test verifies webhook signatures with \
         the PyPI `standardwebhooks` package and needs python3 with venv and pip (Debian: \
         apt-get install python3 python3-venv python3-pip)"
    );
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(tmp).unwrap();
    let venv = tmp.join(format!("standardwebhooks-{STANDARDWEBHOOKS}-venv"));
    let lock = File::create(tmp.join("standardwebhooks-venv.lock")).unwrap();
    lock.lock().unwrap();
    let ready = venv.join(".sluice-ready");
    if !ready.exists() {
        // A half-made venv from an interrupted run is made again.
        let _ = fs::remove_dir_all(&venv);
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv (needs the venv module: apt-get install python3-venv)",
        );
        run(
            Command::new(venv.join("bin/python")).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                &format!("standardwebhooks=={STANDARDWEBHOOKS}"),
            ]),
            "pip install standardwebhooks from PyPI (needs pip in the venv and PyPI reachable)",
        );
        fs::write(&ready, STANDARDWEBHOOKS).unwrap();
    }
    lock.unlock().unwrap();
    venv.join("bin/python")
}

/// The Python receiver, killed when dropped.
struct PyReceiver {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PyReceiver {
    fn start(secret: &str) -> PyReceiver {
        let python = venv_python();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("received.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/receiver.py");
        let mut child = Command::new(python)
            .arg("-u")
            .arg(script)
            .arg(secret)
            .arg(&log)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the Python receiver");
        // Wait for its `listening PORT` line, with a deadline.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut receiver = PyReceiver {
            child,
            port: 0,
            log,
            _dir: dir,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the Python receiver did not report its port within 30 s");
        receiver.port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the receiver: {line:?}"));
        receiver
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PyReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn deliverer() -> Deliverer {
    // The receiver is on loopback.
    Deliverer::new(Destinations::new(&[], true).unwrap()).unwrap()
}

// Non-ASCII on purpose: the signature covers the body's bytes.
const BODY: &[u8] = r#"{"action":"notify","note":"température élevée","score":0.97}"#.as_bytes();

#[tokio::test]
async fn standardwebhooks_package_verifies_our_signature() {
    let receiver = PyReceiver::start(SECRET);
    let ep = endpoint_with(
        &receiver.url(),
        Duration::from_secs(10),
        SECRET,
        Breaker::default(),
    );
    let d = deliverer();
    for id in ["msg_2f1c0c0e-1", "msg_2f1c0c0e-2"] {
        let attempt = d.attempt(&ep, id, BODY).await;
        assert_eq!(attempt.status, Status::Delivered, "{attempt:?}");
        assert_eq!(attempt.http_code, Some(204));
    }
    assert_eq!(receiver.log(), "msg_2f1c0c0e-1 ok\nmsg_2f1c0c0e-2 ok\n");
}

#[tokio::test]
async fn standardwebhooks_package_rejects_a_wrong_secret() {
    let receiver = PyReceiver::start(SECRET);
    let ep = endpoint_with(
        &receiver.url(),
        Duration::from_secs(10),
        WRONG_SECRET,
        Breaker::default(),
    );
    let attempt = deliverer().attempt(&ep, "msg_tampered", BODY).await;
    assert_eq!(
        attempt.status,
        Status::Failed { retryable: false },
        "{attempt:?}"
    );
    assert_eq!(attempt.http_code, Some(401));
    assert_eq!(receiver.log(), "msg_tampered bad\n");
}
