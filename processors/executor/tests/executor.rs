//! The executor loop on the embedded log and a SQLite store, against real local receivers:
//! retries wait their backoff and deliver once, replays deliver nothing twice, a dead endpoint
//! does not hold up a healthy one, and a 404 is a failure that ends in the DLQ.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;
use sluice_core::{Event, EventType, Source};
use sluice_executor::{
    Breaker, Deliverer, Destinations, Limits, Outbound, Rate, ResolvedEndpoint, Settings, Stats,
};
use sluice_log::{EmbeddedLog, EmbeddedOptions, Log, Producer, Record, TopicSpec};
use sluice_schemas::{EventCodec, Registry, SchemaDir};
use sluice_store::{ActionStatus, LedgerOutcome, Store, StoreOptions};
use sluice_topology::{Endpoint, ExecutorConfig};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const DEADLINE: Duration = Duration::from_secs(30);

/// Answers `/fail/<n>/...` with 503 for its first n requests per webhook id, then 200;
/// `/missing` with 404; anything else 200. Keeps every request's webhook id and time.
#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<(String, String, Instant)>>,
    per_id: Mutex<std::collections::HashMap<String, usize>>,
    ok: AtomicUsize,
}

async fn handle(
    State(seen): State<Arc<Seen>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> StatusCode {
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    seen.requests
        .lock()
        .unwrap()
        .push((path.clone(), id.clone(), Instant::now()));
    let n = {
        let mut per = seen.per_id.lock().unwrap();
        let n = per.entry(id).or_default();
        *n += 1;
        *n
    };
    let parts: Vec<&str> = path.split('/').collect();
    let status = match parts.as_slice() {
        ["fail", k, ..] if n <= k.parse::<usize>().unwrap_or(0) => StatusCode::SERVICE_UNAVAILABLE,
        ["missing", ..] => StatusCode::NOT_FOUND,
        _ => StatusCode::OK,
    };
    if status == StatusCode::OK {
        seen.ok.fetch_add(1, Ordering::SeqCst);
    }
    status
}

async fn receiver() -> (String, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/{*path}", axum::routing::post(handle))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

/// A port nothing listens on.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}/down", l.local_addr().unwrap())
}

struct Rig {
    _dir: tempfile::TempDir,
    log: EmbeddedLog,
    store: Store,
    codec: Arc<EventCodec<Arc<Registry>>>,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedOptions::default()).unwrap();
    log.create_topic(&TopicSpec::new("actions.requested", 2))
        .await
        .unwrap();
    log.create_topic(&TopicSpec::new("actions.results", 1))
        .await
        .unwrap();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let opts = StoreOptions {
        migrate_on_connect: true,
        ..StoreOptions::default()
    };
    let store = Store::connect(&url, opts).await.unwrap();
    let registry = Arc::new(Registry::in_memory());
    let schemas = SchemaDir::load(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../schemas"
    )))
    .unwrap();
    registry.register_dir(&schemas).unwrap();
    Rig {
        _dir: dir,
        log,
        store,
        codec: Arc::new(EventCodec::new(registry)),
    }
}

fn config(endpoints: &[(&str, String)]) -> ExecutorConfig {
    ExecutorConfig {
        endpoints: endpoints
            .iter()
            .map(|(name, url)| Endpoint {
                name: (*name).to_owned(),
                url: url.clone(),
                secret_env: "TEST_SECRET".into(),
                timeout: Duration::from_secs(2),
            })
            .collect(),
        retry_backoff: vec![Duration::from_millis(200), Duration::from_millis(400)],
        breaker_failures: 3,
        breaker_cooldown: Duration::from_secs(60),
        allow_private: true,
        ..ExecutorConfig::default()
    }
}

/// An `action.requested` for `endpoint`, as the router derives it from `input`.
fn request(input: Uuid, endpoint: &str, device: &str) -> Event {
    let cause = Event {
        event_id: input,
        ..Event::new(
            EventType::new(EventType::INFERENCE_RESULT).unwrap(),
            device,
            chrono::Utc::now(),
            json!({}),
            Source::Processor("inferencer".into()),
        )
        .unwrap()
    };
    cause.derive(
        &format!("action/alert@1/{endpoint}"),
        EventType::new(EventType::ACTION_REQUESTED).unwrap(),
        json!({
            "input_event_id": input.to_string(),
            "rule_id": "alert",
            "rule_version": 1,
            "endpoint": endpoint,
            "destructive": false,
            "denied": false,
            "body": json!({"device": device}).to_string(),
            "suppressed": false,
        }),
        Source::Processor("action-router".into()),
        chrono::Utc::now(),
    )
}

impl Rig {
    async fn produce(&self, events: &[Event]) {
        let mut records = Vec::new();
        for e in events {
            let (value, _) = self.codec.encode(e).await.unwrap();
            records.push(Record {
                key: Some(e.aggregate_id.as_bytes().to_vec()),
                value,
                ..Record::default()
            });
        }
        self.log
            .producer()
            .unwrap()
            .send("actions.requested", records)
            .await
            .unwrap();
    }

    fn start(
        &self,
        config: ExecutorConfig,
    ) -> (
        Arc<Stats>,
        CancellationToken,
        tokio::task::JoinHandle<Result<(), sluice_executor::RunError>>,
    ) {
        let destinations = Destinations::from_config(&config).unwrap();
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| {
                let breaker = Breaker::new(config.breaker_failures, config.breaker_cooldown);
                ResolvedEndpoint::from_vars(e.clone(), breaker, |_| Some(SECRET.to_owned()))
                    .unwrap()
            })
            .collect();
        let outbound = Outbound {
            deliverer: Deliverer::new(destinations).unwrap(),
            endpoints,
            limits: {
                let n = std::num::NonZeroU32::new(10_000).unwrap();
                let rate = Rate {
                    per_second: n,
                    burst: n,
                };
                Limits::new(rate, rate)
            },
        };
        let mut settings = Settings::new("executor", "actions.requested", config);
        settings.results = Some("actions.results".into());
        let stats = Arc::new(Stats::default());
        let token = CancellationToken::new();
        let (log, store, codec, st, t) = (
            self.log.clone(),
            self.store.clone(),
            self.codec.clone(),
            stats.clone(),
            token.clone(),
        );
        let task = tokio::spawn(async move {
            sluice_executor::run::run(&settings, &log, &store, &*codec, outbound, &st, t).await
        });
        (stats, token, task)
    }
}

async fn until(what: &str, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_retried_on_its_backoff_and_delivered_once_even_on_replay() {
    let rig = rig().await;
    let (base, seen) = receiver().await;
    let (stats, token, task) = rig.start(config(&[("flaky", format!("{base}/fail/2"))]));
    let input = Uuid::new_v4();
    let action = request(input, "flaky", "dev-1");
    rig.produce(std::slice::from_ref(&action)).await;

    until("the third attempt's 200", || {
        seen.ok.load(Ordering::SeqCst) == 1
    })
    .await;
    let times: Vec<Instant> = seen.requests.lock().unwrap().iter().map(|r| r.2).collect();
    assert_eq!(times.len(), 3, "two failures, then the delivery");
    assert!(
        times[1] - times[0] >= Duration::from_millis(200),
        "first backoff"
    );
    assert!(
        times[2] - times[1] >= Duration::from_millis(400),
        "second backoff"
    );
    let id = action.event_id.to_string();
    assert!(
        seen.requests.lock().unwrap().iter().all(|r| r.1 == id),
        "every attempt carries the action id as webhook-id"
    );
    until("the ledger's third row", || {
        futures::executor::block_on(rig.store.action_ledger(action.event_id))
            .map(|l| l.len() == 3)
            .unwrap_or(false)
    })
    .await;
    let ledger = rig.store.action_ledger(action.event_id).await.unwrap();
    let outcomes: Vec<LedgerOutcome> = ledger.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            LedgerOutcome::Retrying,
            LedgerOutcome::Retrying,
            LedgerOutcome::Delivered
        ]
    );
    assert_eq!(ledger[0].http_status, Some(503));
    let row = rig.store.action(action.event_id).await.unwrap().unwrap();
    assert_eq!(row.status, ActionStatus::Delivered);

    // A replay: the same request again, and the same finding re-derived under a new id.
    let mut again = request(input, "flaky", "dev-1");
    again.event_id = Uuid::new_v4();
    rig.produce(&[action.clone(), again]).await;
    until("both replays absorbed", || {
        stats.duplicates.load(Ordering::Relaxed) == 2
    })
    .await;
    // Nothing was scheduled for them, so nothing can be sent again.
    assert_eq!(rig.store.actions_pending().await.unwrap(), 0);
    assert_eq!(seen.ok.load(Ordering::SeqCst), 1, "delivered once");
    assert_eq!(seen.requests.lock().unwrap().len(), 3, "no further request");
    token.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_does_not_hold_up_a_healthy_one_and_a_404_is_a_failure() {
    let rig = rig().await;
    let (base, seen) = receiver().await;
    let (stats, token, task) = rig.start(config(&[
        ("healthy", format!("{base}/ok")),
        ("dead", dead_url()),
        ("wrong", format!("{base}/missing")),
    ]));
    let mut requests = Vec::new();
    for i in 0..20 {
        requests.push(request(Uuid::new_v4(), "dead", &format!("dev-{i}")));
        requests.push(request(Uuid::new_v4(), "healthy", &format!("dev-{i}")));
    }
    let wrong = request(Uuid::new_v4(), "wrong", "dev-x");
    requests.push(wrong.clone());
    let started = Instant::now();
    rig.produce(&requests).await;
    until("20 healthy deliveries", || {
        seen.ok.load(Ordering::SeqCst) == 20
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the healthy endpoint was not held up: {:?}",
        started.elapsed()
    );
    until("the breaker to short-circuit the dead endpoint", || {
        stats.short_circuited.load(Ordering::Relaxed) > 0
    })
    .await;
    until("the 404 to be given up on", || {
        futures::executor::block_on(rig.store.action(wrong.event_id))
            .ok()
            .flatten()
            .is_some_and(|r| r.status == ActionStatus::Dead)
    })
    .await;
    let ledger = rig.store.action_ledger(wrong.event_id).await.unwrap();
    assert_eq!(ledger.len(), 1, "a 404 is not retried: {ledger:?}");
    assert_eq!(ledger[0].http_status, Some(404));
    token.cancel();
    task.await.unwrap().unwrap();
}
