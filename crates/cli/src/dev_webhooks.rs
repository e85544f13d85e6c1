//! `sluice dev`'s demo webhook receiver: where the executor delivers when no `--webhook-url`
//! is given. It checks each request's Standard Webhooks signature against the dev secret and
//! appends what it got to `webhooks.jsonl` in the data directory, so a developer sees the
//! whole path from a reading to a signed delivery without running anything else.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use rand::RngCore;
use serde_json::{Value, json};
use sluice_executor::Secret;
use tokio_util::sync::CancellationToken;

/// A running demo receiver.
#[derive(Debug)]
pub(crate) struct DemoReceiver {
    /// Where to deliver.
    pub url: String,
    /// The file it appends deliveries to.
    pub log: PathBuf,
}

struct Shared {
    secret: Secret,
    file: Mutex<std::fs::File>,
}

/// The dev signing secret, made once per data directory (`dev-webhook-secret`, owner-only).
pub(crate) fn dev_secret(data_dir: &Path) -> Result<String> {
    let file = data_dir.join("dev-webhook-secret");
    if let Ok(text) = std::fs::read_to_string(&file) {
        return Ok(text.trim().to_owned());
    }
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    crate::dev::write_private(&file, &secret)
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(secret)
}

/// Starts the receiver on 127.0.0.1 (an ephemeral port) until `token` is cancelled.
pub(crate) async fn start(
    data_dir: &Path,
    secret: &str,
    token: CancellationToken,
) -> Result<DemoReceiver> {
    let log = data_dir.join("webhooks.jsonl");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let shared = Arc::new(Shared {
        secret: secret.parse().context("the dev webhook secret")?,
        file: Mutex::new(file),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the demo webhook receiver")?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(receive).with_state(shared);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await;
    });
    Ok(DemoReceiver {
        url: format!("http://{addr}/hooks/sluice"),
        log,
    })
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let id = header("webhook-id");
    let now = chrono::Utc::now();
    let verified = sluice_executor::sign::verify(
        &shared.secret,
        &id,
        &header("webhook-timestamp"),
        &header("webhook-signature"),
        &body,
        u64::try_from(now.timestamp()).unwrap_or_default(),
    )
    .is_ok();
    let content: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    let line = json!({
        "webhook_id": id,
        "verified": verified,
        "received_at": now.to_rfc3339(),
        "body": content,
    });
    if let Ok(mut file) = shared.file.lock() {
        let _ = writeln!(file, "{line}");
    }
    if verified {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::UNAUTHORIZED
    }
}
