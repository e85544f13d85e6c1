//! What the component tests share: a Mosquitto of the test's own, and waiting on conditions.

#![allow(dead_code)] // each test binary uses a part

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_simulator::FleetConfig;

/// A running `mosquitto` on a free port of 127.0.0.1, killed (by its PID) when dropped.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

pub const USER: &str = "sim";
pub const PASSWORD: &str = "s3cret-sim";

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::launch("allow_anonymous true\n".to_owned(), |_| {})
    }

    /// A broker that only lets [`USER`] in, with [`PASSWORD`].
    pub fn with_password() -> Mosquitto {
        Self::launch(String::new(), |dir| {
            let file = dir.join("passwd");
            let status = Command::new("mosquitto_passwd")
                .args(["-b", "-c"])
                .arg(&file)
                .args([USER, PASSWORD])
                .status()
                .expect("mosquitto_passwd runs");
            assert!(status.success(), "mosquitto_passwd failed");
        })
    }

    fn launch(extra: String, prepare: impl FnOnce(&Path)) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        prepare(dir.path());
        let extra = if extra.is_empty() {
            format!(
                "allow_anonymous false\npassword_file {}\n",
                dir.path().join("passwd").display()
            )
        } else {
            extra
        };
        let port = free_port();
        // No limit on what the broker queues for the test's subscriber: it must not be the
        // one that drops messages.
        let conf = format!(
            "listener {port} 127.0.0.1\nmax_inflight_messages 1000\nmax_queued_messages 0\n\
             persistence false\nlog_dest stderr\nlog_type error\n{extra}"
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_until_blocking("mosquitto listens", Duration::from_secs(10), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
        });
    }

    /// An outage: the broker goes away, and [`Mosquitto::restart`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Polls `condition` until it holds; panics naming `what` after `timeout`.
pub fn wait_until_blocking(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `condition` until it holds; panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A small fleet with every fault turned up so a short run shows each of them.
pub fn faulty_fleet(rate: u32) -> FleetConfig {
    FleetConfig {
        devices: 20,
        rate,
        anomaly_rate: 0.05,
        malformed_rate: 0.02,
        duplicate_rate: 0.02,
        seed: 42,
        status_rate: 0.05,
        late_rate: 0.0,
    }
}
