//! A Mosquitto broker of a test's own, on a free port, and `mosquitto_pub` to publish to it:
//! the bridge is tested against a broker nobody here wrote.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `mosquitto`, stopped (by its PID) when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

/// A user the broker knows when started with [`Mosquitto::with_password`].
pub const USER: &str = "bridge";
/// That user's password.
pub const PASSWORD: &str = "s3cret-bridge";

impl Mosquitto {
    /// Starts an anonymous broker on a free port.
    pub fn start() -> Mosquitto {
        Self::launch(
            tempfile::tempdir().expect("temp dir"),
            free_port(),
            "allow_anonymous true\n".to_owned(),
        )
    }

    /// Starts a broker that only lets [`USER`] in with [`PASSWORD`].
    pub fn with_password() -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("passwd");
        let status = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&file)
            .args([USER, PASSWORD])
            .status()
            .expect("mosquitto_passwd runs");
        assert!(status.success(), "mosquitto_passwd failed");
        let extra = format!("allow_anonymous false\npassword_file {}\n", file.display());
        Self::launch(dir, free_port(), extra)
    }

    /// Starts a broker that speaks only TLS, with a certificate for 127.0.0.1 signed by a CA
    /// of its own; returns it and the CA certificate (PEM) clients must trust.
    pub fn with_tls() -> (Mosquitto, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl runs (is it installed?)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=sluice-test-ca",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write san.ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        // Mosquitto started as root reads these after dropping to its own user.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let open =
                |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
            open(d, 0o755).expect("chmod");
            for f in ["ca.pem", "server.pem", "server.key"] {
                open(&d.join(f), 0o644).expect("chmod");
            }
        }
        let ca = d.join("ca.pem");
        let extra = format!(
            "allow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\n",
            ca.display(),
            d.join("server.pem").display(),
            d.join("server.key").display()
        );
        (Self::launch(dir, free_port(), extra), ca)
    }

    fn launch(dir: tempfile::TempDir, port: u16, extra: String) -> Mosquitto {
        let conf = dir.path().join("mosquitto.conf");
        // A wide in-flight window and an unbounded queue: the broker must not be the one
        // that drops messages while a bridge is down.
        let text = format!(
            "listener {port} 127.0.0.1\nmax_inflight_messages 1000\nmax_queued_messages 0\n\
             persistence false\nlog_dest stderr\nlog_type error\n{extra}"
        );
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
        };
        m.spawn(&conf);
        m
    }

    fn spawn(&mut self, conf: &Path) {
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts (is it installed?)");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker (an outage); [`Mosquitto::restart`] brings it back on the same port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port after [`Mosquitto::stop`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let conf = self.dir.path().join("mosquitto.conf");
        self.spawn(&conf);
    }

    /// The broker's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn mosquitto_bin() -> PathBuf {
    ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("mosquitto"))
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Publishes each of `lines` as one QoS 1 message to `topic` with `mosquitto_pub -l`, and
/// waits for it to finish (every message acknowledged by the broker).
pub fn publish_lines(port: u16, topic: &str, lines: &[String], auth: Option<(&str, &str)>) {
    let mut extra = Vec::new();
    if let Some((user, password)) = auth {
        extra.extend(["-u", user, "-P", password].map(str::to_owned));
    }
    publish_lines_with(port, topic, lines, &extra);
}

/// [`publish_lines`] with more `mosquitto_pub` arguments (e.g. `--cafile`).
pub fn publish_lines_with(port: u16, topic: &str, lines: &[String], extra: &[String]) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"]);
    cmd.args(["-t", topic, "-l"]).args(extra);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub starts (is it installed?)");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for line in lines {
            stdin
                .write_all(line.as_bytes())
                .expect("write to mosquitto_pub");
            stdin.write_all(b"\n").expect("write to mosquitto_pub");
        }
    }
    let out = child.wait_with_output().expect("mosquitto_pub ends");
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
