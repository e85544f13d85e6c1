//! The simulator against a small ingest API of the test's own that validates each event the
//! way the real one answers (202, or 400 with the accepted and the rejected), and can be told
//! to answer 429 or 503 first, or to refuse the key.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::faulty_fleet;
use serde_json::{Value, json};
use sluice_simulator::{Counters, Report, Target, run};
use tokio_util::sync::CancellationToken;

const KEY: &str = "test-key";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scripted {
    TooManyRequests,
    Unavailable,
}

#[derive(Default)]
struct Api {
    script: Mutex<VecDeque<Scripted>>,
    posts: Mutex<Vec<Posted>>,
}

struct Posted {
    at: Instant,
    status: StatusCode,
    body: Bytes,
    accepted: u64,
    rejected: u64,
}

async fn events(State(api): State<Arc<Api>>, headers: HeaderMap, body: Bytes) -> Response {
    let (status, answer, accepted, rejected) = answer(&api, &headers, &body);
    api.posts.lock().unwrap().push(Posted {
        at: Instant::now(),
        status,
        body,
        accepted,
        rejected,
    });
    let mut response = (status, axum::Json(answer)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, "1".parse().unwrap());
    }
    response
}

fn answer(api: &Api, headers: &HeaderMap, body: &[u8]) -> (StatusCode, Value, u64, u64) {
    let bearer = format!("Bearer {KEY}");
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(&bearer)
    {
        return (StatusCode::UNAUTHORIZED, json!({"error": "bad key"}), 0, 0);
    }
    if headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        != Some("application/json")
    {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, json!({}), 0, 0);
    }
    match api.script.lock().unwrap().pop_front() {
        Some(Scripted::TooManyRequests) => {
            return (StatusCode::TOO_MANY_REQUESTS, json!({}), 0, 0);
        }
        Some(Scripted::Unavailable) => return (StatusCode::SERVICE_UNAVAILABLE, json!({}), 0, 0),
        None => {}
    }
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(body) else {
        panic!(
            "the body is not a JSON array: {}",
            String::from_utf8_lossy(body)
        );
    };
    let (mut accepted, mut rejected) = (Vec::new(), Vec::new());
    for (index, item) in items.iter().enumerate() {
        match check(item) {
            Ok(id) => accepted.push(id),
            Err(reason) => rejected.push(json!({"index": index, "reason": reason})),
        }
    }
    let (a, r) = (accepted.len() as u64, rejected.len() as u64);
    if rejected.is_empty() {
        (StatusCode::ACCEPTED, json!({"accepted": accepted}), a, r)
    } else {
        let answer = json!({"accepted": accepted, "rejected": rejected});
        (StatusCode::BAD_REQUEST, answer, a, r)
    }
}

/// What the ingest API requires of an event.
fn check(item: &Value) -> Result<String, String> {
    let obj = item.as_object().ok_or("not an object")?;
    let text = |field: &str| {
        obj.get(field)
            .and_then(Value::as_str)
            .ok_or(format!("{field} is required"))
    };
    let id = uuid::Uuid::parse_str(text("event_id")?).map_err(|e| e.to_string())?;
    let event_type = text("event_type")?;
    let device = text("aggregate_id")?;
    chrono::DateTime::parse_from_rfc3339(text("occurred_at")?).map_err(|e| e.to_string())?;
    let payload = obj
        .get("payload")
        .and_then(Value::as_object)
        .ok_or("payload is required")?;
    assert!(device.starts_with("dev-"), "{device}");
    match event_type {
        "sensor.reading" => assert!(payload.contains_key("seq"), "{item}"),
        "device.status" => assert!(payload.contains_key("state"), "{item}"),
        other => panic!("event_type {other}"),
    }
    Ok(id.to_string())
}

async fn serve(api: Arc<Api>) -> String {
    let app = Router::new()
        .route("/v1/events", post(events))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn simulate(url: String, key: &str, run_for: Option<Duration>) -> Report {
    let target = Target::Http {
        url,
        key: key.to_owned(),
        batch: 100,
    };
    let config = faulty_fleet(2_000);
    let run = run(
        &config,
        &target,
        None,
        Arc::new(Counters::default()),
        CancellationToken::new(),
        run_for,
    );
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run ends")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_batches_retries_429_and_503_and_counts_rejections() {
    let api = Arc::new(Api::default());
    api.script
        .lock()
        .unwrap()
        .extend([Scripted::TooManyRequests, Scripted::Unavailable]);
    let url = serve(api.clone()).await;
    let report = simulate(url, KEY, Some(Duration::from_secs(2))).await;

    assert_eq!(report.stopped_early, None, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.sent, report.acknowledged + report.rejected);
    assert!(report.sent >= 2_000, "{report:?}");
    let posts = api.posts.lock().unwrap();
    let accepted: u64 = posts.iter().map(|p| p.accepted).sum();
    let rejected: u64 = posts.iter().map(|p| p.rejected).sum();
    assert_eq!((accepted, rejected), (report.acknowledged, report.rejected));
    // Exactly the malformed ones (and their copies) are refused.
    assert!(report.rejected >= report.malformed_sent && report.malformed_sent > 0);

    // The batch answered 429 came back, unchanged, after Retry-After; the 503 one too.
    let first = &posts[0];
    assert_eq!(first.status, StatusCode::TOO_MANY_REQUESTS);
    let retried = posts[1..].iter().find(|p| p.body == first.body).unwrap();
    assert!(retried.at - first.at >= Duration::from_millis(950));
    assert!(matches!(
        retried.status,
        StatusCode::ACCEPTED | StatusCode::BAD_REQUEST
    ));
    let second = &posts[1];
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        posts[2..]
            .iter()
            .any(|p| p.body == second.body && p.status != StatusCode::SERVICE_UNAVAILABLE)
    );

    // Duplicates: the same element in two of the batches that were settled.
    let mut copies: HashMap<String, u64> = HashMap::new();
    for post in posts.iter().filter(|p| p.accepted + p.rejected > 0) {
        let items: Vec<Value> = serde_json::from_slice(&post.body).unwrap();
        assert!(items.len() <= 101);
        for item in items {
            *copies.entry(item.to_string()).or_default() += 1;
        }
    }
    let twice = copies.values().filter(|&&c| c == 2).count() as u64;
    assert!(copies.values().all(|&c| c <= 2));
    assert_eq!(twice, report.duplicates_sent);
    assert!(twice > 0);
}

#[tokio::test]
async fn stops_on_a_refused_key() {
    let api = Arc::new(Api::default());
    let url = serve(api.clone()).await;
    let report = simulate(url, "wrong-key", None).await;
    let reason = report.stopped_early.clone().unwrap();
    assert!(reason.contains("401"), "{reason}");
    assert!(
        !reason.contains("wrong-key"),
        "no key in messages: {reason}"
    );
    assert_eq!(report.acknowledged, 0);
    assert_eq!(report.failed, report.sent);
    assert!(report.sent > 0);
    // It stopped rather than kept trying: at most the requests already in flight got a 401.
    let posts = api.posts.lock().unwrap();
    assert!(posts.iter().all(|p| p.status == StatusCode::UNAUTHORIZED));
    assert!(posts.len() <= 10, "{} requests", posts.len());
}
