//! The HTTP ingest API over real HTTP, on the embedded log (and the mock Kafka cluster for an
//! outage), with keys in a SQLite store: every status code it can answer, and what reaches the
//! raw topic behind each.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_core::{Event, EventType, Source};
use sluice_http_ingest::{AVRO, AVRO_BATCH, Ingest, Settings, Stats};
use sluice_log::{Consumer, EmbeddedLog, EmbeddedOptions, KafkaLog, Log, TopicSpec};
use sluice_schemas::{EventCodec, Registry, SchemaDir};
use sluice_store::{Role, Store, StoreOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Api {
    _dir: tempfile::TempDir,
    url: String,
    log: EmbeddedLog,
    store: Store,
    codec: Arc<EventCodec<Arc<Registry>>>,
    device_key: String,
    stop: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn codec() -> Arc<EventCodec<Arc<Registry>>> {
    let registry = Arc::new(Registry::in_memory());
    let schemas = SchemaDir::load(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../schemas"
    )))
    .unwrap();
    registry.register_dir(&schemas).unwrap();
    Arc::new(EventCodec::new(registry))
}

async fn store_in(dir: &tempfile::TempDir) -> Store {
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = Store::connect(&url, StoreOptions::default()).await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn start<P: sluice_log::Producer>(
    settings: Settings,
    producer: P,
    store: Store,
    codec: Arc<EventCodec<Arc<Registry>>>,
) -> (String, CancellationToken) {
    let ingest = Ingest::new(settings, producer, store, codec, Arc::new(Stats::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { sluice_http_ingest::serve(&ingest, listener, s).await });
    (url, stop)
}

async fn api_with(configure: impl FnOnce(&mut Settings)) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedOptions::default()).unwrap();
    log.create_topic(&TopicSpec::new("ingest.raw", 2))
        .await
        .unwrap();
    let store = store_in(&dir).await;
    let (_, device_key) = store
        .create_api_key(Role::Device, Some("test"))
        .await
        .unwrap();
    let mut settings = Settings::new("http-ingest", "ingest.raw");
    configure(&mut settings);
    let codec = codec();
    let (url, stop) = start(
        settings,
        log.producer().unwrap(),
        store.clone(),
        codec.clone(),
    )
    .await;
    Api {
        _dir: dir,
        url,
        log,
        store,
        codec,
        device_key,
        stop,
    }
}

async fn api() -> Api {
    api_with(|_| {}).await
}

fn reading(device: &str) -> Value {
    json!({
        "event_id": Uuid::new_v4().to_string(),
        "event_type": "sensor.reading",
        "aggregate_id": device,
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "payload": {"temperature_c": 21.5},
    })
}

impl Api {
    fn post(&self, key: Option<&str>) -> reqwest::RequestBuilder {
        let request = reqwest::Client::new().post(format!("{}/v1/events", self.url));
        match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    async fn send(&self, body: &Value) -> (StatusCode, Value) {
        let response = self
            .post(Some(&self.device_key))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    /// Every value on the raw topic, as JSON where it is JSON, with its key.
    async fn raw(&self) -> Vec<(String, Vec<u8>)> {
        let mut consumer = self
            .log
            .consumer(&format!("read-{}", Uuid::new_v4()), &["ingest.raw"])
            .unwrap();
        let mut out = Vec::new();
        loop {
            let batch = consumer
                .poll(1000, Duration::from_millis(300))
                .await
                .unwrap();
            if batch.is_empty() {
                return out;
            }
            for m in batch {
                out.push((String::from_utf8(m.key.unwrap()).unwrap(), m.value));
            }
        }
    }

    async fn raw_ids(&self) -> BTreeSet<String> {
        self.raw()
            .await
            .iter()
            .map(|(_, v)| {
                serde_json::from_slice::<Value>(v).unwrap()["event_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }
}

fn ids(body: &Value) -> BTreeSet<String> {
    body["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn one_event_and_a_batch_are_answered_202_after_they_are_on_the_log() {
    let api = api().await;
    let one = reading("dev-1");
    let (status, body) = api.send(&one).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        ids(&body),
        BTreeSet::from([one["event_id"].as_str().unwrap().to_owned()])
    );

    let batch: Vec<Value> = (0..50)
        .map(|i| reading(&format!("dev-{}", i % 5)))
        .collect();
    let (status, body) = api.send(&json!(batch)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(ids(&body).len(), 50);

    // Answered only once written: everything acknowledged is already on the topic.
    let raw = api.raw().await;
    assert_eq!(raw.len(), 51);
    assert_eq!(api.raw_ids().await.len(), 51);
    for (key, value) in raw {
        let v: Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(v["aggregate_id"], key.as_str(), "keyed by device");
    }
}

#[tokio::test]
async fn a_retried_event_without_an_id_gets_the_same_id() {
    let api = api().await;
    let mut event = reading("dev-1");
    event.as_object_mut().unwrap().remove("event_id");
    let (s1, b1) = api.send(&event).await;
    let (s2, b2) = api.send(&event).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(ids(&b1), ids(&b2));
    assert_eq!(api.raw_ids().await, ids(&b1));
}

#[tokio::test]
async fn a_mixed_batch_writes_the_valid_events_and_names_the_others() {
    let api = api().await;
    let good = [reading("dev-1"), reading("dev-2")];
    let mut no_type = reading("dev-3");
    no_type.as_object_mut().unwrap().remove("event_type");
    let mut bad_time = reading("dev-4");
    bad_time["occurred_at"] = json!("last tuesday");
    let batch = json!([good[0], no_type, good[1], bad_time, 42]);
    let (status, body) = api.send(&batch).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let expected: BTreeSet<String> = good
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids(&body), expected);
    let rejected = body["rejected"].as_array().unwrap();
    let indexes: Vec<u64> = rejected
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [1, 3, 4]);
    assert!(
        rejected[0]["reason"]
            .as_str()
            .unwrap()
            .contains("event_type is required")
    );
    assert!(rejected[1]["reason"].as_str().unwrap().contains("RFC 3339"));
    assert!(
        rejected[2]["reason"]
            .as_str()
            .unwrap()
            .contains("JSON object")
    );
    assert_eq!(api.raw_ids().await, expected, "the valid ones were written");
}

#[tokio::test]
async fn a_body_that_is_not_json_is_answered_400() {
    let api = api().await;
    let response = api
        .post(Some(&api.device_key))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("not JSON"));
    let response = api
        .post(Some(&api.device_key))
        .header("content-type", "text/csv")
        .body("a,b")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(api.raw().await.is_empty());
}

#[tokio::test]
async fn missing_unknown_and_revoked_keys_are_answered_401_and_a_viewer_403() {
    let api = api().await;
    let event = reading("dev-1");
    let status = |r: reqwest::Response| r.status();
    assert_eq!(
        status(api.post(None).json(&event).send().await.unwrap()),
        StatusCode::UNAUTHORIZED
    );
    let malformed = reqwest::Client::new()
        .post(format!("{}/v1/events", api.url))
        .header("authorization", "Basic abc")
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(malformed.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        status(
            api.post(Some("sk_000000000000_00"))
                .json(&event)
                .send()
                .await
                .unwrap()
        ),
        StatusCode::UNAUTHORIZED
    );

    let (revoked, token) = api.store.create_api_key(Role::Device, None).await.unwrap();
    assert!(api.store.revoke_api_key(&revoked.id).await.unwrap());
    assert_eq!(
        status(api.post(Some(&token)).json(&event).send().await.unwrap()),
        StatusCode::UNAUTHORIZED
    );

    let (_, viewer) = api.store.create_api_key(Role::Viewer, None).await.unwrap();
    let response = api.post(Some(&viewer)).json(&event).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("role viewer"));

    let (_, admin) = api.store.create_api_key(Role::Admin, None).await.unwrap();
    assert_eq!(
        status(api.post(Some(&admin)).json(&event).send().await.unwrap()),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        api.raw().await.len(),
        1,
        "only the admin's event was written"
    );
}

#[tokio::test]
async fn bodies_and_batches_over_the_limits_are_answered_413() {
    let api = api_with(|s| {
        s.config.max_body_bytes = 4096;
        s.config.max_batch = 10;
        s.config.max_event_bytes = 1024;
    })
    .await;
    let mut big = reading("dev-1");
    big["payload"]["note"] = json!("x".repeat(5000));
    let (status, body) = api.send(&big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let batch: Vec<Value> = (0..11).map(|_| reading("dev-1")).collect();
    let (status, body) = api.send(&json!(batch)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"].as_str().unwrap().contains("limit of 10"));
    // Within the body limit but over the per-event limit: that event is refused, not the rest.
    let mut fat = reading("dev-1");
    fat["payload"]["note"] = json!("x".repeat(1500));
    let (status, body) = api.send(&json!([reading("dev-2"), fat])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["rejected"][0]["index"], 1);
    assert_eq!(api.raw().await.len(), 1);
}

#[tokio::test]
async fn a_key_over_its_rate_is_answered_429_with_retry_after() {
    let api = api_with(|s| {
        s.config.rate_limit_per_key = 20;
        s.config.max_batch = 20;
    })
    .await;
    let batch: Vec<Value> = (0..20).map(|_| reading("dev-1")).collect();
    let (status, _) = api.send(&json!(batch)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let response = api
        .post(Some(&api.device_key))
        .json(&json!(batch))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "retry after {retry} s");
    // Another key has its own allowance.
    let (_, other) = api.store.create_api_key(Role::Device, None).await.unwrap();
    let response = api
        .post(Some(&other))
        .json(&json!(batch))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(api.raw().await.len(), 40);
}

#[tokio::test]
async fn avro_events_in_the_wire_format_are_accepted_one_or_many() {
    let api = api().await;
    let mut wire = Vec::new();
    let mut sent = BTreeSet::new();
    for i in 0..3 {
        let event = Event::new(
            EventType::new(EventType::SENSOR_READING).unwrap(),
            format!("dev-{i}"),
            chrono::Utc::now(),
            json!({"temperature_c": 20.0 + i as f64}),
            Source::Http,
        )
        .unwrap();
        sent.insert(event.event_id.to_string());
        wire.push(api.codec.encode(&event).await.unwrap().0);
    }
    let response = api
        .post(Some(&api.device_key))
        .header("content-type", AVRO)
        .body(wire[0].clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let mut batch = Vec::new();
    for w in &wire[1..] {
        batch.extend_from_slice(&(w.len() as u32).to_be_bytes());
        batch.extend_from_slice(w);
    }
    let response = api
        .post(Some(&api.device_key))
        .header("content-type", AVRO_BATCH)
        .body(batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let raw = api.raw().await;
    let mut got = BTreeSet::new();
    for (_, value) in &raw {
        got.insert(api.codec.decode(value).await.unwrap().event_id.to_string());
    }
    assert_eq!(got, sent, "written unchanged, in the wire format");
    let response = api
        .post(Some(&api.device_key))
        .header("content-type", AVRO)
        .body(vec![9u8, 1, 2])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_outage_is_answered_503_never_202() {
    let cluster = sluice_log::kafka::mock_cluster(1).unwrap();
    let log = KafkaLog::on_mock(&cluster).with_option("message.timeout.ms", "1500");
    cluster.create_topic("ingest.raw", 1, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir).await;
    let (_, key) = store.create_api_key(Role::Device, None).await.unwrap();
    let mut settings = Settings::new("http-ingest", "ingest.raw");
    settings.config.persist_timeout = Duration::from_secs(1);
    let (url, _stop) = start(settings, log.producer().unwrap(), store, codec()).await;
    let client = reqwest::Client::new();
    let post = || {
        client
            .post(format!("{url}/v1/events"))
            .bearer_auth(&key)
            .json(&reading("dev-1"))
            .send()
    };
    assert_eq!(post().await.unwrap().status(), StatusCode::ACCEPTED);
    cluster.broker_down(1).unwrap();
    let response = post().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("cannot persist"));
}
