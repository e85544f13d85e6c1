//! The processor loop on the embedded log: transient failures hold the partition without
//! committing and resume exactly; poison goes to the DLQ and the partition moves on; fatal
//! stops; shutdown commits and leaves.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use sluice_core::{Event, EventType, Source};
use sluice_log::kafka::MockCluster;
use sluice_log::{
    Consumer, EmbeddedLog, EmbeddedOptions, Header, KafkaLog, Log, Producer, Record,
    TopicPartition, TopicSpec,
};
use sluice_runtime::{
    CountingMetrics, MemoryDlq, Outputs, ProcessError, Processor, RunError, RuntimeConfig,
};
use sluice_schemas::{EventCodec, Registry, SchemaDir};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);

/// Scores readings; fails transiently while `down`, rejects devices named `bad-*`, and stops
/// on `boom`. Takes `pace_ms` per event.
#[derive(Default)]
struct Scorer {
    down: AtomicBool,
    attempts: AtomicU32,
    pace_ms: AtomicU64,
}

impl Processor for Scorer {
    const NAME: &'static str = "scorer";

    async fn process(&self, event: Event, out: &mut Outputs) -> Result<(), ProcessError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let pace = self.pace_ms.load(Ordering::SeqCst);
        if pace > 0 {
            tokio::time::sleep(Duration::from_millis(pace)).await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(ProcessError::Transient("model server unreachable".into()));
        }
        if event.aggregate_id.starts_with("bad") {
            return Err(ProcessError::Rejected {
                reason: "test",
                detail: format!("{} is not a real device", event.aggregate_id),
            });
        }
        if event.aggregate_id == "boom" {
            return Err(ProcessError::Fatal("model file is corrupt".into()));
        }
        let temp = event.payload["temperature_c"].as_f64().unwrap_or_default();
        let derived = event.derive(
            "scorer/test@1",
            EventType::new("inference.result").unwrap(),
            json!({
                "input_event_id": event.event_id.to_string(),
                "model_name": "test", "model_version": "1",
                "score": temp / 100.0, "label": "normal", "threshold": 0.8,
                "features": {"temperature_c": temp}, "site": null,
            }),
            Source::Processor("scorer".into()),
            event.ingested_at,
        );
        out.emit("scores", derived);
        Ok(())
    }
}

/// Scores a poll's readings in one call, like a model; the first try of device `flaky` fails
/// transiently inside the batch.
#[derive(Default)]
struct BatchScorer {
    inner: Scorer,
    batches: std::sync::Mutex<Vec<usize>>,
}

impl Processor for BatchScorer {
    const NAME: &'static str = "batch-scorer";
    const BATCHES: bool = true;

    async fn process(&self, event: Event, out: &mut Outputs) -> Result<(), ProcessError> {
        self.inner.process(event, out).await
    }

    async fn process_batch(&self, events: &[Event]) -> Vec<Result<Outputs, ProcessError>> {
        self.batches.lock().unwrap().push(events.len());
        let mut results = Vec::new();
        for event in events {
            if event.aggregate_id == "flaky" {
                results.push(Err(ProcessError::Transient("model busy".into())));
                continue;
            }
            let mut out = Outputs::default();
            results.push(
                self.inner
                    .process(event.clone(), &mut out)
                    .await
                    .map(|()| out),
            );
        }
        results
    }
}

struct Rig<L> {
    _dir: Option<tempfile::TempDir>,
    _cluster: Option<MockCluster>,
    log: L,
    codec: Arc<EventCodec<Arc<Registry>>>,
    config: RuntimeConfig,
}

async fn rig(partitions: u32) -> Rig<EmbeddedLog> {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), EmbeddedOptions::default()).unwrap();
    log.create_topic(&TopicSpec::new("in", partitions))
        .await
        .unwrap();
    log.create_topic(&TopicSpec::new("out", 1)).await.unwrap();
    Rig {
        _dir: Some(dir),
        ..rig_on(log)
    }
}

/// A rig on librdkafka's in-process mock cluster (a real Kafka-protocol broker).
fn kafka_rig(partitions: u32) -> Rig<KafkaLog> {
    let cluster = sluice_log::kafka::mock_cluster(1).unwrap();
    cluster.create_topic("in", partitions as i32, 1).unwrap();
    cluster.create_topic("out", 1, 1).unwrap();
    let log = KafkaLog::on_mock(&cluster)
        .with_option("session.timeout.ms", "6000")
        .with_option("heartbeat.interval.ms", "500")
        .with_operation_timeout(Duration::from_secs(10));
    Rig {
        _cluster: Some(cluster),
        ..rig_on(log)
    }
}

fn rig_on<L: Log>(log: L) -> Rig<L> {
    let registry = Arc::new(Registry::in_memory());
    let schemas = SchemaDir::load(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../schemas"
    )))
    .unwrap();
    registry.register_dir(&schemas).unwrap();
    let mut config = RuntimeConfig::new("scorer", &["in"]).port("scores", "out");
    config.backoff = vec![Duration::from_millis(10), Duration::from_millis(20)];
    config.max_backoff = Duration::from_millis(50);
    config.max_wait = Duration::from_millis(20);
    Rig {
        _dir: None,
        _cluster: None,
        log,
        codec: Arc::new(EventCodec::new(registry)),
        config,
    }
}

fn reading(device: &str, temp: f64) -> Event {
    Event::new(
        EventType::new("sensor.reading").unwrap(),
        device,
        chrono::Utc::now(),
        json!({"temperature_c": temp}),
        Source::Mqtt,
    )
    .unwrap()
}

impl<L: Log + Clone + Send + Sync + 'static> Rig<L> {
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
            .send("in", records)
            .await
            .unwrap();
    }

    async fn produce_raw(&self, key: &str, bytes: &[u8]) {
        let record = Record {
            key: Some(key.as_bytes().to_vec()),
            value: bytes.to_vec(),
            ..Record::default()
        };
        self.log
            .producer()
            .unwrap()
            .send("in", vec![record])
            .await
            .unwrap();
    }

    /// Everything on `out`, decoded, read by a fresh group.
    async fn outputs(&self, expect: usize) -> Vec<Event> {
        let group = format!("reader-{}", uuid::Uuid::new_v4().simple());
        let mut c = self.log.consumer(&group, &["out"]).unwrap();
        let start = Instant::now();
        let mut got = Vec::new();
        loop {
            got.extend(c.poll(1000, Duration::from_millis(50)).await.unwrap());
            if got.len() >= expect || start.elapsed() > DEADLINE {
                break;
            }
        }
        // One more short poll to catch duplicates beyond what was expected.
        got.extend(c.poll(1000, Duration::from_millis(100)).await.unwrap());
        let mut events = Vec::new();
        for m in got {
            events.push(self.codec.decode(&m.value).await.unwrap());
        }
        events
    }

    fn start<P: Processor>(
        &self,
        scorer: Arc<P>,
        dlq: Arc<MemoryDlq>,
        metrics: Arc<CountingMetrics>,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<Result<(), RunError>>,
    ) {
        let token = CancellationToken::new();
        let (log, codec, config, t) = (
            self.log.clone(),
            self.codec.clone(),
            self.config.clone(),
            token.clone(),
        );
        let task = tokio::spawn(async move {
            sluice_runtime::run(&*scorer, &config, &log, &*codec, &*dlq, &*metrics, t).await
        });
        (token, task)
    }
}

impl Rig<EmbeddedLog> {
    fn committed(&self, partition: i32) -> Option<i64> {
        self.log
            .committed("scorer", &TopicPartition::new("in", partition))
            .unwrap()
    }
}

async fn until(what: &str, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_transient_failure_commits_nothing_and_resumes_exactly() {
    let rig = rig(1).await;
    let inputs: Vec<Event> = (0..10)
        .map(|i| reading(&format!("dev-{i}"), 20.0 + i as f64))
        .collect();
    rig.produce(&inputs).await;
    let scorer = Arc::new(Scorer::default());
    scorer.down.store(true, Ordering::SeqCst);
    let (dlq, metrics) = (
        Arc::new(MemoryDlq::default()),
        Arc::new(CountingMetrics::default()),
    );
    let (token, task) = rig.start(scorer.clone(), dlq.clone(), metrics.clone());

    // Immediate retry, 10 ms, 20 ms, then 40 ms, 50 ms…: wait for several attempts.
    until("six attempts", || {
        scorer.attempts.load(Ordering::SeqCst) >= 6
    })
    .await;
    assert_eq!(
        rig.committed(0),
        None,
        "nothing committed during the outage"
    );
    assert!(dlq.letters().is_empty(), "an outage is not poison");
    assert!(rig.outputs(0).await.is_empty());
    assert!(metrics.retried.load(Ordering::Relaxed) >= 5);

    scorer.down.store(false, Ordering::SeqCst);
    let out = rig.outputs(10).await;
    assert_eq!(out.len(), 10, "each input once, none twice");
    for (input, output) in inputs.iter().zip(&out) {
        assert_eq!(
            output.metadata.causation_id,
            Some(input.event_id),
            "in input order"
        );
        assert_eq!(
            output.event_id,
            sluice_core::derived_event_id(input.event_id, "scorer/test@1")
        );
    }
    until("the commit of all ten", || rig.committed(0) == Some(10)).await;
    token.cancel();
    task.await.unwrap().unwrap();
    assert!(dlq.letters().is_empty());
}

#[tokio::test]
async fn poison_goes_to_the_dlq_and_the_partition_moves_on() {
    let rig = rig(1).await;
    rig.produce(&[
        reading("dev-1", 1.0),
        reading("dev-2", 2.0),
        reading("dev-3", 3.0),
    ])
    .await;
    rig.produce_raw("dev-x", b"{\"temperature_c\": 20}").await; // JSON, not the wire format
    let rejected = reading("bad-1", 4.0);
    rig.produce(std::slice::from_ref(&rejected)).await;
    rig.produce(&[
        reading("dev-4", 5.0),
        reading("dev-5", 6.0),
        reading("dev-6", 7.0),
    ])
    .await;

    let scorer = Arc::new(Scorer::default());
    let (dlq, metrics) = (
        Arc::new(MemoryDlq::default()),
        Arc::new(CountingMetrics::default()),
    );
    let (token, task) = rig.start(scorer, dlq.clone(), metrics.clone());
    until("all eight committed", || rig.committed(0) == Some(8)).await;
    token.cancel();
    task.await.unwrap().unwrap();

    let out = rig.outputs(6).await;
    assert_eq!(out.len(), 6);
    let letters = dlq.letters();
    assert_eq!(letters.len(), 2, "{letters:#?}");
    let decode = &letters[0];
    assert_eq!(
        (decode.error_class, decode.offset, decode.topic.as_str()),
        ("decode", 3, "in")
    );
    assert_eq!(decode.raw, b"{\"temperature_c\": 20}", "raw bytes kept");
    assert_eq!((decode.event_id, decode.schema_id), (None, None));
    assert!(
        decode.error_message.contains("magic byte"),
        "{}",
        decode.error_message
    );
    let test = &letters[1];
    assert_eq!(
        (test.error_class, test.offset, test.event_id),
        ("test", 4, Some(rejected.event_id))
    );
    assert!(test.schema_id.is_some());
    assert_eq!(test.processor, "scorer");
    assert_eq!(
        test.key.as_deref(),
        Some(b"bad-1".as_slice()),
        "key kept for a re-drive"
    );
    assert_eq!(metrics.dead_lettered.load(Ordering::Relaxed), 2);
}

/// A replayed record's mark (its headers) reaches the processor on the event, and every
/// output derived from it carries the same headers onward; unmarked records stay unmarked.
#[tokio::test]
async fn replay_marks_travel_from_input_headers_to_outputs() {
    let rig = rig(1).await;
    let replayed = reading("dev-1", 1.0);
    let mark = sluice_core::Replay {
        job_id: "job-7".into(),
        fire_actions: false,
        rescore: true,
    };
    let (value, _) = rig.codec.encode(&replayed).await.unwrap();
    let record = Record {
        key: Some(b"dev-1".to_vec()),
        value,
        headers: mark
            .headers()
            .into_iter()
            .map(|(key, value)| Header {
                key: key.into(),
                value,
            })
            .collect(),
        ..Record::default()
    };
    rig.log
        .producer()
        .unwrap()
        .send("in", vec![record])
        .await
        .unwrap();
    rig.produce(&[reading("dev-2", 2.0)]).await;

    let (dlq, metrics) = (
        Arc::new(MemoryDlq::default()),
        Arc::new(CountingMetrics::default()),
    );
    let (token, task) = rig.start(Arc::new(Scorer::default()), dlq, metrics);
    until("both committed", || rig.committed(0) == Some(2)).await;
    token.cancel();
    task.await.unwrap().unwrap();

    let group = format!("reader-{}", uuid::Uuid::new_v4().simple());
    let mut c = rig.log.consumer(&group, &["out"]).unwrap();
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < 2 && start.elapsed() < DEADLINE {
        got.extend(c.poll(10, Duration::from_millis(50)).await.unwrap());
    }
    assert_eq!(got.len(), 2);
    let marks: Vec<Option<sluice_core::Replay>> = got
        .iter()
        .map(|m| {
            sluice_core::Replay::from_headers(
                m.headers
                    .iter()
                    .map(|h| (h.key.as_str(), h.value.as_slice())),
            )
        })
        .collect();
    assert_eq!(marks, [Some(mark), None]);
}

#[tokio::test]
async fn a_fatal_error_stops_the_loop_after_keeping_earlier_work() {
    let rig = rig(1).await;
    rig.produce(&[
        reading("dev-1", 1.0),
        reading("dev-2", 2.0),
        reading("boom", 3.0),
        reading("dev-4", 4.0),
    ])
    .await;
    let (dlq, metrics) = (
        Arc::new(MemoryDlq::default()),
        Arc::new(CountingMetrics::default()),
    );
    let (_token, task) = rig.start(Arc::new(Scorer::default()), dlq.clone(), metrics);
    let result = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    match result {
        Err(RunError::Fatal { name, source }) => {
            assert_eq!(name, "scorer");
            assert!(source.to_string().contains("corrupt"));
        }
        other => panic!("expected a fatal stop, got {other:?}"),
    }
    assert_eq!(
        rig.committed(0),
        Some(2),
        "the two before the bug are committed, the rest is not"
    );
    assert_eq!(rig.outputs(2).await.len(), 2);
    assert!(dlq.letters().is_empty(), "a bug is not poison");
}

#[tokio::test]
async fn shutdown_commits_and_returns_within_the_deadline() {
    let rig = rig(2).await;
    rig.produce(
        &(0..50)
            .map(|i| reading(&format!("dev-{i}"), 1.0))
            .collect::<Vec<_>>(),
    )
    .await;
    let (dlq, metrics) = (
        Arc::new(MemoryDlq::default()),
        Arc::new(CountingMetrics::default()),
    );
    let (token, task) = rig.start(Arc::new(Scorer::default()), dlq, metrics.clone());
    until("all processed", || {
        metrics.processed.load(Ordering::Relaxed) >= 50
    })
    .await;
    let asked = Instant::now();
    token.cancel();
    task.await.unwrap().unwrap();
    assert!(asked.elapsed() < Duration::from_secs(5));
    let total = rig.committed(0).unwrap_or(0) + rig.committed(1).unwrap_or(0);
    assert_eq!(
        total, 50,
        "everything processed is committed on the way out"
    );
}

#[tokio::test]
async fn a_transient_outage_during_shutdown_leaves_the_input_uncommitted() {
    let rig = rig(1).await;
    rig.produce(&[reading("dev-1", 1.0)]).await;
    let scorer = Arc::new(Scorer::default());
    scorer.down.store(true, Ordering::SeqCst);
    let (dlq, metrics) = (
        Arc::new(MemoryDlq::default()),
        Arc::new(CountingMetrics::default()),
    );
    let (token, task) = rig.start(scorer.clone(), dlq, metrics);
    until("a retry", || scorer.attempts.load(Ordering::SeqCst) >= 2).await;
    token.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(
        rig.committed(0),
        None,
        "the failing input will be read again"
    );
    assert!(rig.outputs(0).await.is_empty());
}

/// A second member joins while the first is in the middle of a batch. The first finishes,
/// produces and commits that batch before giving partitions up, and the newcomer starts at
/// those commits: every input is processed, none lost, and with `exactly_once` none redone.
async fn a_joining_member_takes_over_only_drained_partitions<L>(mut rig: Rig<L>, exactly_once: bool)
where
    L: Log + Clone + Send + Sync + 'static,
{
    const N: usize = 400;
    // Small batches, so that the first member polls (and can hand partitions over) often.
    rig.config.max_batch = 20;
    let inputs: Vec<Event> = (0..N)
        .map(|i| reading(&format!("dev-{}", i % 40), i as f64))
        .collect();
    rig.produce(&inputs).await;
    let (first, second) = (Arc::new(Scorer::default()), Arc::new(Scorer::default()));
    first.pace_ms.store(5, Ordering::SeqCst);
    second.pace_ms.store(5, Ordering::SeqCst);
    let dlq = Arc::new(MemoryDlq::default());
    let (m1, m2) = (
        Arc::new(CountingMetrics::default()),
        Arc::new(CountingMetrics::default()),
    );
    let (t1, task1) = rig.start(first, dlq.clone(), m1.clone());
    until("the first member to be busy", || {
        m1.processed.load(Ordering::Relaxed) >= 20
    })
    .await;
    let (t2, task2) = rig.start(second, dlq.clone(), m2.clone());

    let distinct = |out: &[Event]| {
        let mut causes: Vec<_> = out.iter().map(|e| e.metadata.causation_id).collect();
        causes.sort();
        causes.dedup();
        causes.len()
    };
    let waiting = Instant::now();
    let mut out = rig.outputs(N).await;
    // Redone inputs count towards `outputs`; wait for every distinct one (or the deadline).
    while distinct(&out) < N && waiting.elapsed() < DEADLINE {
        out = rig.outputs(out.len() + 1).await;
    }
    t1.cancel();
    t2.cancel();
    task1.await.unwrap().unwrap();
    task2.await.unwrap().unwrap();
    let (p1, p2) = (
        m1.processed.load(Ordering::Relaxed),
        m2.processed.load(Ordering::Relaxed),
    );
    assert!(
        p2 > 0,
        "the second member got partitions (first {p1}, second {p2})"
    );
    assert_eq!(distinct(&out), N, "every input reached the output");
    if exactly_once {
        assert_eq!(
            p1 + p2,
            N as u64,
            "nothing processed twice (first {p1}, second {p2})"
        );
        assert_eq!(out.len(), N, "each input exactly once");
    }
    assert!(dlq.letters().is_empty());
}

#[tokio::test]
async fn embedded_joining_member_takes_over_only_drained_partitions() {
    a_joining_member_takes_over_only_drained_partitions(rig(4).await, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_joining_member_takes_over_only_drained_partitions() {
    // The mock refuses commits while its group is joining (a real broker takes them until the
    // rebalance completes), so the batch in flight at the join may be processed twice there.
    a_joining_member_takes_over_only_drained_partitions(kafka_rig(4), false).await;
}

#[tokio::test]
async fn a_batching_processor_gets_the_poll_at_once_and_retries_one_event_alone() {
    let rig = rig(1).await;
    let mut inputs: Vec<Event> = (0..5)
        .map(|i| reading(&format!("dev-{i}"), 20.0 + i as f64))
        .collect();
    inputs.insert(2, reading("flaky", 30.0));
    rig.produce(&inputs).await;
    rig.produce_raw("dev-x", b"not the wire format").await;
    let scorer = Arc::new(BatchScorer::default());
    let dlq = Arc::new(MemoryDlq::default());
    let (token, task) = rig.start(
        scorer.clone(),
        dlq.clone(),
        Arc::new(CountingMetrics::default()),
    );

    let out = rig.outputs(6).await;
    let causes: Vec<_> = out.iter().map(|e| e.metadata.causation_id).collect();
    let expected: Vec<_> = inputs.iter().map(|e| Some(e.event_id)).collect();
    assert_eq!(
        causes, expected,
        "each input once, in order, flaky included"
    );
    until("the commit of all seven", || rig.committed(0) == Some(7)).await;
    token.cancel();
    task.await.unwrap().unwrap();

    let batches = scorer.batches.lock().unwrap().clone();
    assert_eq!(
        batches.iter().sum::<usize>(),
        6,
        "every decoded input went through a batch once: {batches:?}"
    );
    assert!(
        batches.iter().any(|&n| n > 1),
        "polls were batched: {batches:?}"
    );
    assert!(
        scorer.inner.attempts.load(Ordering::SeqCst) >= 6,
        "flaky was retried through process"
    );
    let letters = dlq.letters();
    assert_eq!(letters.len(), 1, "the undecodable message is dead-lettered");
    assert_eq!(letters[0].error_class, "decode");
}
