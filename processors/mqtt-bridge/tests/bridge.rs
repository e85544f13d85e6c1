//! The mqtt-bridge against real brokers (a Mosquitto of the test's own, and the embedded
//! rumqttd), feeding an ingest-validator on the embedded log and a SQLite store: what is
//! published with QoS 1 reaches the event store exactly once, through crashes, outages,
//! shared subscriptions and authentication.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use sluice_log::{EmbeddedLog, EmbeddedOptions, Log, TopicSpec};
use sluice_mqtt_bridge::testing::{Mosquitto, PASSWORD, USER, publish_lines, publish_lines_with};
use sluice_mqtt_bridge::{EmbeddedBroker, Error, Settings, Stats};
use sluice_schemas::{EventCodec, Registry, SchemaDir};
use sluice_store::testing::until;
use sluice_store::{Store, StoreOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

/// An embedded log, a SQLite store, and an ingest-validator between them.
struct Rig {
    _dir: tempfile::TempDir,
    log: EmbeddedLog,
    store: Store,
    validator: CancellationToken,
}

impl Rig {
    async fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedOptions::default()).unwrap();
        log.create_topic(&TopicSpec::new("ingest.raw", 3))
            .await
            .unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let store = Store::connect(&url, StoreOptions::default()).await.unwrap();
        store.migrate().await.unwrap();
        let registry = Arc::new(Registry::in_memory());
        let schemas = SchemaDir::load(&PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../schemas"
        )))
        .unwrap();
        registry.register_dir(&schemas).unwrap();
        let validator = CancellationToken::new();
        let (l, s, t) = (log.clone(), store.clone(), validator.clone());
        tokio::spawn(async move {
            let settings = sluice_ingest_validator::Settings::new("ingest-validator", "ingest.raw");
            let codec = EventCodec::new(registry);
            let stats = Arc::new(sluice_ingest_validator::Stats::default());
            sluice_ingest_validator::run(&settings, &l, &s, &codec, &stats, t).await
        });
        Rig {
            _dir: dir,
            log,
            store,
            validator,
        }
    }

    fn bridge(&self, settings: Settings) -> Bridge {
        let stats = Arc::new(Stats::default());
        let token = CancellationToken::new();
        let (log, s, t) = (self.log.clone(), stats.clone(), token.clone());
        let task =
            tokio::spawn(async move { sluice_mqtt_bridge::run(&settings, &log, &s, t).await });
        Bridge { stats, token, task }
    }

    async fn wait_for_events(&self, n: u64) {
        let store = self.store.clone();
        until(&format!("{n} events in the store"), DEADLINE, async || {
            store.event_count().await.unwrap() >= n
        })
        .await;
    }

    /// Every id is in the store once, and nothing else is.
    async fn assert_exactly(&self, ids: &[Uuid]) {
        self.wait_for_events(ids.len() as u64).await;
        assert_eq!(self.store.event_count().await.unwrap(), ids.len() as u64);
        for id in ids {
            assert!(
                self.store.event_by_id(*id).await.unwrap().is_some(),
                "event {id} is missing"
            );
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.validator.cancel();
    }
}

struct Bridge {
    stats: Arc<Stats>,
    token: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl Bridge {
    async fn stop(self) {
        self.token.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn settings(broker: &str, client: &str) -> Settings {
    let mut s = Settings::new("mqtt-bridge", "ingest.raw");
    s.config.broker = broker.to_owned();
    s.config.client_id = Some(client.to_owned());
    s.max_backoff = Duration::from_millis(500);
    s
}

/// `n` readings with their own event ids, as devices would publish them.
fn readings(n: usize) -> (Vec<Uuid>, Vec<String>) {
    let at = chrono::Utc::now();
    (0..n)
        .map(|i| {
            let id = Uuid::new_v4();
            let body = json!({
                "event_id": id.to_string(),
                "occurred_at": (at - chrono::TimeDelta::milliseconds(i as i64)).to_rfc3339(),
                "payload": {"seq": i, "temperature_c": 20.0 + (i % 10) as f64},
            });
            (id, body.to_string())
        })
        .unzip()
}

async fn subscribed(bridge: &Bridge, connections: u64) {
    // Every connection subscribes to each topic filter; wait for the broker to grant them all.
    let filters = sluice_mqtt_bridge::MqttBridgeConfig::default().topics.len() as u64;
    let stats = bridge.stats.clone();
    until("the bridge subscribed", DEADLINE, async || {
        stats.connections.load(Ordering::Relaxed) >= connections
            && stats.subscriptions.load(Ordering::Relaxed) >= connections * filters
    })
    .await;
}

async fn publish(
    port: u16,
    topic: &str,
    lines: Vec<String>,
    auth: Option<(&'static str, &'static str)>,
) {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || publish_lines(port, &topic, &lines, auth))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_through_mosquitto_reach_the_store_exactly_once() {
    let broker = Mosquitto::start();
    let rig = Rig::new().await;
    let bridge = rig.bridge(settings(&broker.url(), "bridge-a"));
    subscribed(&bridge, 1).await;
    let (ids, mut lines) = readings(2000);
    // Redeliveries, as a device whose PUBACK was lost sends them: same bytes again.
    lines.extend(lines[..100].to_vec());
    publish(broker.port(), "devices/dev-1/telemetry", lines, None).await;
    rig.assert_exactly(&ids).await;
    assert!(bridge.stats.acknowledged.load(Ordering::Relaxed) >= 2100);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_through_the_embedded_broker_reach_the_store_exactly_once() {
    let broker = EmbeddedBroker::start(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let rig = Rig::new().await;
    let bridge = rig.bridge(settings(&broker.url(), "bridge-embedded"));
    subscribed(&bridge, 1).await;
    let (ids, mut lines) = readings(2000);
    lines.extend(lines[..100].to_vec());
    publish(broker.addr().port(), "devices/dev-2/telemetry", lines, None).await;
    rig.assert_exactly(&ids).await;
    // Status messages are mapped by their topic too.
    let status = json!({"event_id": Uuid::new_v4().to_string(), "occurred_at": chrono::Utc::now().to_rfc3339(), "payload": {"state": "online"}});
    let id = Uuid::parse_str(status["event_id"].as_str().unwrap()).unwrap();
    publish(
        broker.addr().port(),
        "devices/dev-2/status",
        vec![status.to_string()],
        None,
    )
    .await;
    rig.wait_for_events(2001).await;
    let event = rig.store.event_by_id(id).await.unwrap().unwrap();
    assert_eq!(event.event.event_type.as_str(), "device.status");
    assert_eq!(event.event.aggregate_id, "dev-2");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_bridge_mid_stream_and_restarting_loses_nothing() {
    let broker = Mosquitto::start();
    let rig = Rig::new().await;
    let first = rig.bridge(settings(&broker.url(), "bridge-kill"));
    subscribed(&first, 1).await;
    let (ids, lines) = readings(6000);
    let port = broker.port();
    let publisher = tokio::spawn(publish(port, "devices/dev-3/telemetry", lines, None));
    let stats = first.stats.clone();
    until("the bridge acknowledged some", DEADLINE, async || {
        stats.acknowledged.load(Ordering::Relaxed) >= 500
    })
    .await;
    // A crash: the connection drops with messages received and not acknowledged.
    first.task.abort();
    let _ = first.task.await;
    let acked_before = stats.acknowledged.load(Ordering::Relaxed);
    assert!(
        acked_before < 6000,
        "the kill came too late to test anything"
    );
    let second = rig.bridge(settings(&broker.url(), "bridge-kill"));
    publisher.await.unwrap();
    rig.assert_exactly(&ids).await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_in_a_shared_group_split_the_messages() {
    let broker = Mosquitto::start();
    let rig = Rig::new().await;
    let shared = |client: &str| {
        let mut s = settings(&broker.url(), client);
        s.config.shared_group = Some("sluice".to_owned());
        s
    };
    let a = rig.bridge(shared("bridge-shared-a"));
    let b = rig.bridge(shared("bridge-shared-b"));
    subscribed(&a, 1).await;
    subscribed(&b, 1).await;
    let (ids, lines) = readings(2000);
    publish(broker.port(), "devices/dev-4/telemetry", lines, None).await;
    rig.assert_exactly(&ids).await;
    let (got_a, got_b) = (
        a.stats.received.load(Ordering::Relaxed),
        b.stats.received.load(Ordering::Relaxed),
    );
    assert!(
        got_a > 0 && got_b > 0,
        "one replica got everything: {got_a} / {got_b}"
    );
    assert_eq!(got_a + got_b, 2000, "each message goes to one replica");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_keep_the_bridge_retrying_and_right_ones_deliver() {
    let broker = Mosquitto::with_password();
    let rig = Rig::new().await;
    let mut wrong = settings(&broker.url(), "bridge-wrong");
    wrong.config.username = Some(USER.to_owned());
    wrong.password = Some("not-the-password".to_owned());
    let refused = rig.bridge(wrong);
    let stats = refused.stats.clone();
    until("connection refused twice", DEADLINE, async || {
        stats.connection_errors.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert!(
        !refused.task.is_finished(),
        "a refused login must not stop the bridge"
    );
    assert_eq!(refused.stats.connections.load(Ordering::Relaxed), 0);
    refused.stop().await;

    let mut right = settings(&broker.url(), "bridge-right");
    right.config.username = Some(USER.to_owned());
    right.password = Some(PASSWORD.to_owned());
    let bridge = rig.bridge(right);
    subscribed(&bridge, 1).await;
    let (ids, lines) = readings(200);
    publish(
        broker.port(),
        "devices/dev-5/telemetry",
        lines,
        Some((USER, PASSWORD)),
    )
    .await;
    rig.assert_exactly(&ids).await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_does_not_stop_the_bridge() {
    let mut broker = Mosquitto::start();
    let rig = Rig::new().await;
    let bridge = rig.bridge(settings(&broker.url(), "bridge-outage"));
    subscribed(&bridge, 1).await;
    let (first_ids, lines) = readings(300);
    publish(broker.port(), "devices/dev-6/telemetry", lines, None).await;
    rig.assert_exactly(&first_ids).await;

    broker.stop();
    let stats = bridge.stats.clone();
    until("the bridge noticed the outage", DEADLINE, async || {
        stats.connection_errors.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert!(
        !bridge.task.is_finished(),
        "an outage must not stop the bridge"
    );
    broker.restart();
    subscribed(&bridge, 2).await;
    let (more_ids, lines) = readings(300);
    publish(broker.port(), "devices/dev-6/telemetry", lines, None).await;
    let all: Vec<Uuid> = first_ids.into_iter().chain(more_ids).collect();
    rig.assert_exactly(&all).await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_their_bytes() {
    let broker = Mosquitto::start();
    let rig = Rig::new().await;
    let bridge = rig.bridge(settings(&broker.url(), "bridge-malformed"));
    subscribed(&bridge, 1).await;
    let (ids, mut lines) = readings(10);
    lines.push("this is not json".to_owned());
    lines.push(r#"{"occurred_at": "yesterday", "payload": {}}"#.to_owned());
    publish(broker.port(), "devices/dev-7/telemetry", lines, None).await;
    rig.assert_exactly(&ids).await;
    let store = rig.store.clone();
    until("two dead letters", DEADLINE, async || {
        store
            .dlq_list(&sluice_store::DlqFilter::default())
            .await
            .unwrap()
            .len()
            == 2
    })
    .await;
    let letters = rig
        .store
        .dlq_list(&sluice_store::DlqFilter::default())
        .await
        .unwrap();
    assert!(letters.iter().any(|l| l.raw == b"this is not json"));
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_speaks_tls_to_a_broker_with_its_own_ca() {
    let (broker, ca) = Mosquitto::with_tls();
    let rig = Rig::new().await;
    let mut tls = settings(
        &format!("mqtts://127.0.0.1:{}", broker.port()),
        "bridge-tls",
    );
    tls.config.tls_ca = Some(ca.display().to_string());
    let bridge = rig.bridge(tls);
    subscribed(&bridge, 1).await;
    let (ids, lines) = readings(200);
    let (port, extra) = (
        broker.port(),
        vec!["--cafile".to_owned(), ca.display().to_string()],
    );
    tokio::task::spawn_blocking(move || {
        publish_lines_with(port, "devices/dev-8/telemetry", &lines, &extra)
    })
    .await
    .unwrap();
    rig.assert_exactly(&ids).await;
    bridge.stop().await;

    // Without the CA the broker's certificate is not trusted: no connection, no crash.
    let untrusted = rig.bridge(settings(
        &format!("mqtts://127.0.0.1:{}", broker.port()),
        "bridge-untrusted",
    ));
    let stats = untrusted.stats.clone();
    until("a refused TLS handshake", DEADLINE, async || {
        stats.connection_errors.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert_eq!(untrusted.stats.connections.load(Ordering::Relaxed), 0);
    untrusted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_in_the_wire_format_passes_through_to_the_store() {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let broker = EmbeddedBroker::start(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let rig = Rig::new().await;
    let bridge = rig.bridge(settings(&broker.url(), "bridge-avro"));
    subscribed(&bridge, 1).await;
    let registry = Arc::new(Registry::in_memory());
    registry
        .register_dir(
            &SchemaDir::load(&PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../schemas"
            )))
            .unwrap(),
        )
        .unwrap();
    let codec = EventCodec::new(registry);
    let event = sluice_core::Event::new(
        sluice_core::EventType::new("sensor.reading").unwrap(),
        "dev-9",
        chrono::Utc::now(),
        json!({"temperature_c": 19.5}),
        sluice_core::Source::Mqtt,
    )
    .unwrap();
    let (bytes, _) = codec.encode(&event).await.unwrap();
    let (client, mut events) = AsyncClient::new(
        MqttOptions::new("avro-device", "127.0.0.1", broker.addr().port()),
        10,
    );
    client
        .publish("devices/dev-9/telemetry", QoS::AtLeastOnce, false, bytes)
        .await
        .unwrap();
    let poller = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    rig.assert_exactly(&[event.event_id]).await;
    let stored = rig
        .store
        .event_by_id(event.event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.event.payload["temperature_c"], 19.5);
    poller.abort();
    bridge.stop().await;
}
