//! The outbox-relay on the embedded log, against both store backends: concurrent writers
//! committing out of id order, a crash between publish and delete, and failing topics.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use sluice_core::{Event, EventType, Source};
use sluice_log::{Consumer, EmbeddedLog, EmbeddedOptions, Log, TopicSpec};
use sluice_outbox_relay::{Error, Settings, Stats};
use sluice_store::testing::{on_each_backend, until};
use sluice_store::{AppendBatch, AppendEvent, Store, StoreOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const TOPIC: &str = "events.sensor-reading";

struct Rig {
    _dir: tempfile::TempDir,
    log: EmbeddedLog,
    store: Store,
}

async fn rig_on(store_url: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), EmbeddedOptions::default()).unwrap();
    log.create_topic(&TopicSpec::new(TOPIC, 4)).await.unwrap();
    let store = Store::connect(store_url, StoreOptions::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    Rig {
        _dir: dir,
        log,
        store,
    }
}

/// Runs `body` once on SQLite and once on a fresh Postgres database.
async fn on_both<F, Fut>(body: F)
where
    F: Fn(Rig) -> Fut,
    Fut: Future<Output = ()>,
{
    on_each_backend(async |url| body(rig_on(&url).await).await).await;
}

/// An outbox-bound event whose value is "<aggregate>/<seq>", so the topic can be checked
/// without decoding.
fn entry(device: &str, seq: u32, topic: &str) -> AppendEvent {
    let event = Event::new(
        EventType::new("sensor.reading").unwrap(),
        device,
        Utc::now(),
        json!({"seq": seq}),
        Source::Simulator,
    )
    .unwrap();
    AppendEvent {
        topic: topic.to_owned(),
        key: device.as_bytes().to_vec(),
        value: format!("{device}/{seq}").into_bytes(),
        event,
    }
}

fn batch(events: Vec<AppendEvent>) -> AppendBatch {
    AppendBatch {
        events,
        ..AppendBatch::default()
    }
}

impl Rig {
    fn start(
        &self,
        settings: Settings,
        stats: Arc<Stats>,
    ) -> (CancellationToken, JoinHandle<Result<(), Error>>) {
        let token = CancellationToken::new();
        let (log, store, t) = (self.log.clone(), self.store.clone(), token.clone());
        let task = tokio::spawn(async move {
            sluice_outbox_relay::run(&settings, &log, &store, &stats, t).await
        });
        (token, task)
    }

    /// Every value on the topic, per aggregate in partition order.
    async fn published(&self, at_least: usize) -> BTreeMap<String, Vec<u32>> {
        let group = format!("reader-{}", uuid::Uuid::new_v4().simple());
        let mut consumer = self.log.consumer(&group, &[TOPIC]).unwrap();
        let start = std::time::Instant::now();
        let mut got = Vec::new();
        while got.len() < at_least && start.elapsed() < DEADLINE {
            got.extend(
                consumer
                    .poll(10_000, Duration::from_millis(50))
                    .await
                    .unwrap(),
            );
        }
        got.extend(
            consumer
                .poll(10_000, Duration::from_millis(100))
                .await
                .unwrap(),
        );
        got.sort_by_key(|m| (m.partition, m.offset));
        let mut by_aggregate: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for m in got {
            let text = String::from_utf8(m.value).unwrap();
            let (device, seq) = text.split_once('/').unwrap();
            by_aggregate
                .entry(device.to_owned())
                .or_default()
                .push(seq.parse().unwrap());
        }
        by_aggregate
    }
}

fn fast() -> Settings {
    let mut settings = Settings::new("outbox-relay");
    settings.config.poll_interval = Duration::from_millis(200);
    settings.config.batch_size = 64;
    settings
}

/// A cheap deterministic spread of delays, so commits interleave differently per writer.
fn hold(writer: u32, round: u32) -> Duration {
    Duration::from_millis(u64::from((writer * 7 + round * 13) % 17))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_committing_out_of_order_are_relayed_once_each_in_order() {
    on_both(|rig| async move {
        const WRITERS: u32 = 8;
        const ROUNDS: u32 = 15;
        const PER_BATCH: u32 = 3;
        let stats = Arc::new(Stats::default());
        let (token, relay) = rig.start(fast(), stats.clone());
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let store = rig.store.clone();
            writers.push(tokio::spawn(async move {
                // Each writer owns its devices, as a validator owns its partitions.
                for round in 0..ROUNDS {
                    let events = (0..PER_BATCH)
                        .map(|i| entry(&format!("w{w}-d{i}"), round, TOPIC))
                        .collect();
                    store
                        .append_with_delay(&batch(events), hold(w, round))
                        .await
                        .unwrap();
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        let total = (WRITERS * ROUNDS * PER_BATCH) as u64;
        until("every entry published", DEADLINE, async || {
            stats.published.load(Ordering::Relaxed) == total
        })
        .await;
        token.cancel();
        relay.await.unwrap().unwrap();
        assert_eq!(rig.store.outbox_depth().await.unwrap(), 0);
        let published = rig.published(total as usize).await;
        assert_eq!(published.len(), (WRITERS * PER_BATCH) as usize);
        let in_order: Vec<u32> = (0..ROUNDS).collect();
        for (device, seqs) in &published {
            assert_eq!(seqs, &in_order, "{device}: each event once, in order");
        }
        assert!(
            stats.passes.load(Ordering::Relaxed) > 1,
            "the relay ran while writers were committing"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_publish_and_delete_loses_nothing() {
    on_both(|rig| async move {
        let events = (0..40)
            .map(|i| entry(&format!("d{}", i % 4), i, TOPIC))
            .collect();
        rig.store.append(&batch(events)).await.unwrap();
        let mut crashing = fast();
        crashing.crash_after_publish = true;
        let (_token, task) = rig.start(crashing, Arc::new(Stats::default()));
        assert!(matches!(task.await.unwrap(), Err(Error::Crashed(_))));
        assert_eq!(
            rig.store.outbox_depth().await.unwrap(),
            40,
            "nothing deleted before the crash"
        );

        let stats = Arc::new(Stats::default());
        let (token, task) = rig.start(fast(), stats.clone());
        until("the outbox drained", DEADLINE, async || {
            rig.store.outbox_depth().await.unwrap() == 0
        })
        .await;
        token.cancel();
        task.await.unwrap().unwrap();
        let published = rig.published(80).await;
        let mut seen = BTreeSet::new();
        let mut copies = 0;
        for seqs in published.values() {
            copies += seqs.len();
            seen.extend(seqs.iter().copied());
        }
        assert_eq!(seen, (0..40).collect(), "every event reached the topic");
        assert!(
            copies > 40,
            "the crashed pass was published again (duplicates are allowed)"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_fail_stay_with_their_attempts_while_others_flow() {
    on_both(|rig| async move {
        rig.store
            .append(&batch(vec![
                entry("d1", 0, "no-such-topic"),
                entry("d2", 0, TOPIC),
                entry("d2", 1, TOPIC),
            ]))
            .await
            .unwrap();
        let stats = Arc::new(Stats::default());
        let (token, task) = rig.start(fast(), stats.clone());
        until("the good entries published", DEADLINE, async || {
            stats.published.load(Ordering::Relaxed) == 2
        })
        .await;
        until("a failure recorded", DEADLINE, async || {
            stats.failed.load(Ordering::Relaxed) >= 1
        })
        .await;
        token.cancel();
        task.await.unwrap().unwrap();
        let left = rig.store.outbox_fetch(10).await.unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].topic, "no-such-topic");
        assert!(left[0].attempts >= 1);
        assert!(
            left[0]
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("no-such-topic"),
            "{:?}",
            left[0].last_error
        );
        assert_eq!(rig.published(2).await["d2"], vec![0, 1]);
    })
    .await;
}
