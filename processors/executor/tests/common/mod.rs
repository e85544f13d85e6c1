//! A real local HTTP receiver for the delivery tests: it counts every request it gets, keeps
//! them, and answers by path.

#![allow(dead_code)] // each test binary uses part of it

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use sluice_executor::{Breaker, ResolvedEndpoint, Secret};
use sluice_topology::Endpoint;
use tokio::net::TcpListener;

/// A secret for tests (the Standard Webhooks example key).
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Default)]
struct Shared {
    hits: AtomicUsize,
    requests: Mutex<Vec<Received>>,
    redirect_to: Mutex<Option<String>>,
}

/// A running receiver. Paths: `/ok` answers 200, `/missing` 404, `/slow` answers after a
/// minute, `/loop` redirects to itself, `/redirect` redirects to [`Receiver::redirect_to`].
#[derive(Debug, Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Receiver {
    /// Starts a receiver on `ip`, on an ephemeral port.
    pub async fn start(ip: &str) -> Receiver {
        let ip: IpAddr = ip.parse().unwrap();
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        Receiver::serve(listener)
    }

    /// Starts a receiver on an existing listener.
    pub fn serve(listener: TcpListener) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(handle).with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { addr, shared }
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sets where `/redirect` points.
    pub fn redirect_to(&self, url: &str) {
        *self.shared.redirect_to.lock().unwrap() = Some(url.to_owned());
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Received> {
        self.shared.requests.lock().unwrap().clone()
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.hits.fetch_add(1, Ordering::SeqCst);
    shared.requests.lock().unwrap().push(Received {
        path: uri.path().to_owned(),
        headers,
        body,
    });
    let redirect = |to: &str| {
        (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, to.to_owned())],
        )
            .into_response()
    };
    match uri.path() {
        "/ok" => StatusCode::OK.into_response(),
        "/missing" => (StatusCode::NOT_FOUND, "no such hook").into_response(),
        "/slow" => {
            // Longer than any test's timeout; the request is abandoned by the client.
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::OK.into_response()
        }
        "/loop" => redirect("/loop"),
        "/redirect" => {
            let to = shared.redirect_to.lock().unwrap().clone();
            redirect(&to.expect("redirect target set"))
        }
        _ => StatusCode::IM_A_TEAPOT.into_response(),
    }
}

/// An endpoint named `test` to `url` with `timeout`, [`SECRET`] and `breaker`.
pub fn endpoint_with(
    url: &str,
    timeout: Duration,
    secret: &str,
    breaker: Breaker,
) -> ResolvedEndpoint {
    let config = Endpoint {
        name: "test".into(),
        url: url.into(),
        secret_env: "SLUICE_TEST_SECRET".into(),
        timeout,
    };
    ResolvedEndpoint::new(config, Secret::parse(secret).unwrap(), breaker).unwrap()
}

/// An endpoint to `url` with a 10 s timeout and the default breaker.
pub fn endpoint(url: &str) -> ResolvedEndpoint {
    endpoint_with(url, Duration::from_secs(10), SECRET, Breaker::default())
}
