//! The simulator against a real Mosquitto: what arrives, in what shape, and what happens when
//! the broker is away, refuses us, or restarts.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{faulty_fleet, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use sluice_mqtt_bridge::testing::{Mosquitto, PASSWORD, USER, free_port};
use sluice_simulator::{Counters, FleetConfig, GIVE_UP_AFTER, Report, Target, run};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Subscribes to `devices/#` with QoS 1 and keeps every message in arrival order.
async fn subscribe(port: u16) -> (AsyncClient, Received) {
    let mut options = MqttOptions::new(format!("test-{}", Uuid::new_v4()), "127.0.0.1", port);
    options
        .set_inflight(1000)
        .set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client
        .subscribe("devices/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let received: Received = Arc::default();
    let (subscribed, on_subscribed) = tokio::sync::oneshot::channel();
    let sink = received.clone();
    tokio::spawn(async move {
        let mut subscribed = Some(subscribed);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    sink.lock().unwrap().push((p.topic, p.payload.to_vec()));
                }
                Ok(_) => {}
                // The broker was stopped at the end of the test; anything earlier shows up as
                // missing messages.
                Err(_) => break,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), on_subscribed)
        .await
        .expect("SUBACK in time")
        .unwrap();
    (client, received)
}

async fn run_for(config: &FleetConfig, url: String, d: Duration) -> Report {
    run(
        config,
        &Target::Mqtt { url },
        None,
        Arc::default(),
        CancellationToken::new(),
        Some(d),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_arrives_in_the_edge_format_with_its_faults_and_truth() {
    let broker = Mosquitto::start();
    let (_client, received) = subscribe(broker.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let truth = dir.path().join("truth.jsonl");
    let config = faulty_fleet(1_000);
    let report = run(
        &config,
        &Target::Mqtt { url: broker.url() },
        Some(&truth),
        Arc::default(),
        CancellationToken::new(),
        Some(Duration::from_secs(2)),
    )
    .await
    .unwrap();

    assert_eq!(report.acknowledged, report.sent, "{report:?}");
    assert_eq!((report.failed, report.rejected), (0, 0), "{report:?}");
    assert!(report.sent >= 1_000, "{report:?}");
    assert_eq!(report.stopped_early, None);
    let expected = report.sent as usize;
    wait_until(
        "the subscriber has every message",
        Duration::from_secs(20),
        || received.lock().unwrap().len() >= expected,
    )
    .await;
    let messages = received.lock().unwrap().clone();
    assert_eq!(messages.len(), expected);

    // Duplicates: the same bytes twice, nothing more often.
    let mut copies: HashMap<&[u8], u64> = HashMap::new();
    for (_, payload) in &messages {
        *copies.entry(payload).or_default() += 1;
    }
    assert!(copies.values().all(|&c| c <= 2));
    let twice = copies.values().filter(|&&c| c == 2).count() as u64;
    assert_eq!(twice, report.duplicates_sent);
    assert!(twice > 0, "{report:?}");

    let (mut malformed, mut status) = (0, 0);
    let mut events: HashMap<String, (String, Value)> = HashMap::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut first_copies = HashSet::new();
    for (topic, payload) in &messages {
        if !first_copies.insert(payload.as_slice()) {
            continue;
        }
        let parts: Vec<&str> = topic.split('/').collect();
        let [root, device, leaf] = parts[..] else {
            panic!("topic {topic}");
        };
        assert_eq!(root, "devices");
        assert!(
            device.len() == 9
                && device.starts_with("dev-")
                && device[4..].bytes().all(|b| b.is_ascii_digit()),
            "{device}"
        );
        status += usize::from(leaf == "status");
        let doc = match serde_json::from_slice::<Value>(payload) {
            Ok(doc) if doc.get("occurred_at").is_some() && doc.get("payload").is_some() => doc,
            _ => {
                malformed += 1;
                continue;
            }
        };
        let id = Uuid::parse_str(doc["event_id"].as_str().unwrap()).unwrap();
        assert_eq!(id.get_version_num(), 4);
        let at = doc["occurred_at"].as_str().unwrap();
        assert!(at.len() == 27 && at.ends_with('Z'), "{at}");
        chrono::DateTime::parse_from_rfc3339(at).unwrap();
        let body = doc["payload"].as_object().unwrap();
        let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
        keys.sort_unstable();
        match leaf {
            "telemetry" => {
                assert_eq!(
                    keys,
                    [
                        "battery_pct",
                        "firmware",
                        "humidity_pct",
                        "seq",
                        "site",
                        "temperature_c",
                        "vibration_mm_s"
                    ]
                );
                let seq = body["seq"].as_u64().unwrap();
                let last = last_seq.insert(device.to_owned(), seq).unwrap_or(0);
                assert!(seq > last, "{device}: seq {seq} after {last}");
            }
            "status" => {
                assert_eq!(
                    keys,
                    ["battery_pct", "firmware", "reason", "rssi_dbm", "state"]
                );
                let state = body["state"].as_str().unwrap();
                assert!(
                    ["online", "offline", "degraded", "maintenance"].contains(&state),
                    "{state}"
                );
            }
            other => panic!("topic leaf {other}"),
        }
        events.insert(id.to_string(), (device.to_owned(), doc));
    }
    assert_eq!(malformed, report.malformed_sent);
    assert!(malformed > 0, "{report:?}");
    assert_eq!(status as u64, report.status_sent);
    assert!(status > 0, "{report:?}");

    // The ground truth names events that arrived, with the values they carried.
    let lines = std::fs::read_to_string(&truth).unwrap();
    let lines: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, report.anomalies);
    assert!(!lines.is_empty(), "{report:?}");
    for line in &lines {
        let (device, doc) = &events[line["event_id"].as_str().unwrap()];
        assert_eq!(line["device"], device.as_str());
        assert_eq!(line["occurred_at"], doc["occurred_at"]);
        let metric = line["metric"].as_str().unwrap();
        assert_eq!(line["value"], doc["payload"][metric], "{line}");
        assert!(["spike", "drift", "stuck"].contains(&line["kind"].as_str().unwrap()));
    }
}

#[tokio::test]
async fn gives_up_with_a_reason_when_the_broker_is_never_reachable() {
    let url = format!("mqtt://127.0.0.1:{}", free_port());
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let report = tokio::time::timeout(
        GIVE_UP_AFTER + Duration::from_secs(10),
        run(
            &faulty_fleet(200),
            &Target::Mqtt { url: url.clone() },
            None,
            counters,
            CancellationToken::new(),
            None,
        ),
    )
    .await
    .expect("the run stops on its own")
    .unwrap();
    assert!(started.elapsed() >= GIVE_UP_AFTER);
    let reason = report.stopped_early.clone().unwrap();
    assert!(
        reason.starts_with(&format!("nothing delivered to {url}")),
        "{reason}"
    );
    assert!(reason.contains("refused"), "{reason}");
    assert_eq!(report.acknowledged, 0);
    assert_eq!(report.failed, report.sent);
}

#[tokio::test]
async fn stops_at_once_when_the_broker_refuses_the_credentials_and_works_with_good_ones() {
    let broker = Mosquitto::with_password();
    let bad = format!("mqtt://{USER}:wrong@127.0.0.1:{}", broker.port());
    let started = Instant::now();
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        run(
            &faulty_fleet(200),
            &Target::Mqtt { url: bad },
            None,
            Arc::default(),
            CancellationToken::new(),
            None,
        ),
    )
    .await
    .expect("the run stops on its own")
    .unwrap();
    assert!(started.elapsed() < GIVE_UP_AFTER);
    let reason = report.stopped_early.clone().unwrap();
    assert!(reason.contains("refused the connection"), "{reason}");
    assert!(
        !reason.contains("wrong"),
        "no password in messages: {reason}"
    );
    assert_eq!(report.acknowledged, 0);

    let good = format!("mqtt://{USER}:{PASSWORD}@127.0.0.1:{}", broker.port());
    let report = run_for(&faulty_fleet(200), good, Duration::from_millis(500)).await;
    assert!(report.acknowledged > 0, "{report:?}");
    assert_eq!(report.acknowledged, report.sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rides_out_a_broker_restart() {
    let mut broker = Mosquitto::start();
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let handle = tokio::spawn({
        let (counters, stop, url) = (counters.clone(), stop.clone(), broker.url());
        async move {
            let config = faulty_fleet(500);
            run(&config, &Target::Mqtt { url }, None, counters, stop, None).await
        }
    });
    let acked = || counters.acknowledged.load(Ordering::Relaxed);
    let sent = || counters.sent.load(Ordering::Relaxed);
    wait_until("some are acknowledged", Duration::from_secs(10), || {
        acked() >= 200
    })
    .await;

    tokio::task::block_in_place(|| broker.stop());
    let acked_when_down = acked();
    let sent_when_down = sent();
    // The fleet keeps sending into the client's queue while the broker is away.
    wait_until("more are sent", Duration::from_secs(10), || {
        sent() >= sent_when_down + 200
    })
    .await;
    tokio::task::block_in_place(|| broker.restart());
    wait_until("acknowledgements resume", Duration::from_secs(30), || {
        acked() >= acked_when_down + 500
    })
    .await;
    stop.cancel();
    let report = handle.await.unwrap().unwrap();
    assert_eq!(report.stopped_early, None);
    assert_eq!(
        report.sent,
        report.acknowledged + report.failed,
        "{report:?}"
    );
    assert!(report.last_error.is_some(), "{report:?}");
}
