//! The Kafka log against librdkafka's in-process mock cluster: a real Kafka-protocol broker
//! (three of them) with fault injection, so these tests exercise the real client end to end.
//!
//! Every test uses its own cluster, topics and groups, and every wait has a deadline.

mod contract;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sluice_log::kafka::{KafkaConsumer, KafkaLog};
use sluice_log::{
    Consumer, Error, Header, Log, Message, Offset, Partition, Producer, Record, SeekTo,
    TopicPartition, TopicSpec, partition_for,
};

type Cluster = MockCluster<'static, DefaultProducerContext>;

/// Upper bound for a whole test: a hang is a failure, not a stuck CI job.
const TEST_DEADLINE: Duration = Duration::from_secs(90);
/// Upper bound for one wait on a condition (group joins take ~3 s on the mock cluster).
const WAIT: Duration = Duration::from_secs(30);
const BROKERS: [i32; 3] = [1, 2, 3];

async fn bounded<F: Future<Output = ()>>(test: F) {
    if tokio::time::timeout(TEST_DEADLINE, test).await.is_err() {
        panic!("test did not finish within {TEST_DEADLINE:?}");
    }
}

fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn cluster() -> Cluster {
    MockCluster::new(3).expect("mock cluster")
}

/// A log on the mock cluster with timeouts short enough for tests.
fn log_on(cluster: &Cluster) -> KafkaLog {
    KafkaLog::on_mock(cluster)
        .with_option("session.timeout.ms", "6000")
        .with_option("heartbeat.interval.ms", "500")
        .with_option("topic.metadata.refresh.interval.ms", "1000")
        .with_option("reconnect.backoff.max.ms", "500")
        .with_operation_timeout(Duration::from_secs(10))
}

fn topic_on(cluster: &Cluster, prefix: &str, partitions: i32) -> String {
    let topic = unique(prefix);
    cluster
        .create_topic(&topic, partitions, 3)
        .expect("create topic on the mock cluster");
    topic
}

fn record(key: Option<&str>, value: &str) -> Record {
    Record {
        key: key.map(|k| k.as_bytes().to_vec()),
        value: value.as_bytes().to_vec(),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

fn values(records: &[Record]) -> Vec<Record> {
    records.to_vec()
}

/// Polls until `done` holds for what was received, failing after [`WAIT`].
async fn poll_until(
    consumer: &mut KafkaConsumer,
    what: &str,
    mut done: impl FnMut(&KafkaConsumer, &[Message]) -> bool,
) -> Vec<Message> {
    let deadline = Instant::now() + WAIT;
    let mut received = Vec::new();
    while !done(consumer, &received) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: got {} messages, assignment {:?}",
            received.len(),
            consumer.assignment()
        );
        let batch = consumer
            .poll(100, Duration::from_millis(200))
            .await
            .expect("poll");
        received.extend(batch);
    }
    received
}

async fn poll_count(consumer: &mut KafkaConsumer, n: usize) -> Vec<Message> {
    let messages = poll_until(consumer, &format!("{n} messages"), |_, got| got.len() >= n).await;
    assert_eq!(messages.len(), n, "more messages than expected");
    messages
}

/// The first message polled.
async fn first_after(consumer: &mut KafkaConsumer) -> Message {
    let got = poll_until(consumer, "a message", |_, got| !got.is_empty()).await;
    got[0].clone()
}

/// Polls for `quiet` and asserts nothing arrives.
async fn assert_nothing_more(consumer: &mut KafkaConsumer, quiet: Duration) {
    let batch = consumer.poll(100, quiet).await.expect("poll");
    assert!(
        batch.is_empty(),
        "unexpected messages: {:?}",
        batch
            .iter()
            .map(|m| (m.partition, m.offset))
            .collect::<Vec<_>>()
    );
}

fn offsets(messages: &[Message]) -> Vec<Offset> {
    messages.iter().map(|m| m.offset).collect()
}

async fn send_values(log: &KafkaLog, topic: &str, values: impl IntoIterator<Item = String>) {
    let producer = log.producer().expect("producer");
    let records: Vec<Record> = values.into_iter().map(|v| record(None, &v)).collect();
    let n = records.len();
    let delivered = producer.send(topic, records).await.expect("send");
    assert_eq!(delivered.len(), n);
}

#[test]
fn urls_are_parsed_and_bad_ones_explained() {
    let log = KafkaLog::from_url("kafka://broker-1:9092,broker-2:9093").expect("valid URL");
    assert_eq!(log.bootstrap_servers(), "broker-1:9092,broker-2:9093");
    let log = KafkaLog::from_url("kafka://[::1]:9092/").expect("IPv6 with trailing slash");
    assert_eq!(log.bootstrap_servers(), "[::1]:9092");

    for (url, reason) in [
        ("embedded://data", "expected kafka://"),
        ("kafka://", "no broker"),
        ("kafka://broker", "has no port"),
        ("kafka://:9092", "has no host"),
        ("kafka://broker:nine", "invalid port"),
        ("kafka://broker:0", "invalid port"),
        ("kafka://broker:9092,", "has no port"),
        ("kafka://broker:9092/topic", "only host:port"),
        ("kafka://user:pw@broker:9092", "only host:port"),
    ] {
        match KafkaLog::from_url(url) {
            Err(Error::InvalidUrl {
                url: got,
                reason: why,
            }) => {
                assert_eq!(got, url);
                assert!(
                    why.contains(reason),
                    "{url}: {why:?} should mention {reason:?}"
                );
            }
            other => panic!("{url}: expected InvalidUrl, got {other:?}"),
        }
    }
}

/// Test 1: values, keys, headers, timestamps and per-partition order survive the round trip,
/// and every keyed record lands on `partition_for(key, partitions)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_then_consume_round_trips_records() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster);
        let topic = topic_on(&cluster, "round-trip", 4);
        assert_eq!(log.partitions(&topic).await.expect("partitions"), 4);

        let base_ts = 1_700_000_000_000i64;
        let mut records: Vec<Record> = (0..40)
            .map(|i| Record {
                key: Some(format!("device-{}", i % 10).into_bytes()),
                value: format!("reading-{i}").into_bytes(),
                headers: vec![
                    Header {
                        key: "traceparent".into(),
                        value: format!("00-{i:032x}-01").into_bytes(),
                    },
                    Header {
                        key: "n".into(),
                        value: vec![i as u8, 0, 255],
                    },
                ],
                timestamp_ms: Some(base_ts + i),
            })
            .collect();
        // Edge cases: an empty payload, a record without key, headers or timestamp.
        records.push(Record {
            key: Some(b"device-empty".to_vec()),
            value: Vec::new(),
            headers: vec![Header {
                key: "empty".into(),
                value: Vec::new(),
            }],
            timestamp_ms: Some(base_ts + 1000),
        });
        records.push(record(None, "keyless"));

        let producer = log.producer().expect("producer");
        let before_send = now_ms();
        let delivered = producer.send(&topic, values(&records)).await.expect("send");
        assert_eq!(delivered.len(), records.len());

        for (record, where_) in records.iter().zip(&delivered) {
            if let Some(key) = &record.key {
                assert_eq!(
                    where_.partition,
                    partition_for(key, 4),
                    "key {:?} landed on another partition than partition_for says",
                    String::from_utf8_lossy(key)
                );
            }
        }
        // Offsets grow per partition in input order.
        let mut last: BTreeMap<Partition, Offset> = BTreeMap::new();
        for d in &delivered {
            if let Some(previous) = last.insert(d.partition, d.offset) {
                assert!(
                    d.offset > previous,
                    "offsets out of order on {}",
                    d.partition
                );
            }
        }

        let mut consumer = log.consumer(&unique("group"), &[&topic]).expect("consumer");
        let messages = poll_count(&mut consumer, records.len()).await;

        let by_place: BTreeMap<(Partition, Offset), &Record> = delivered
            .iter()
            .zip(&records)
            .map(|(d, r)| ((d.partition, d.offset), r))
            .collect();
        for message in &messages {
            assert_eq!(message.topic, topic);
            let sent = by_place
                .get(&(message.partition, message.offset))
                .unwrap_or_else(|| {
                    panic!(
                        "unexpected message at {}/{}",
                        message.partition, message.offset
                    )
                });
            assert_eq!(message.key, sent.key);
            assert_eq!(message.value, sent.value);
            assert_eq!(message.headers, sent.headers);
            match sent.timestamp_ms {
                Some(ts) => assert_eq!(message.timestamp_ms, ts),
                // Without one, the producer stamps the send time.
                None => assert!(message.timestamp_ms >= before_send - 1000),
            }
        }
        // Per partition, messages arrive in the order they were sent.
        let mut seen: BTreeMap<Partition, Vec<Offset>> = BTreeMap::new();
        for message in &messages {
            seen.entry(message.partition)
                .or_default()
                .push(message.offset);
        }
        let mut sent_order: BTreeMap<Partition, Vec<Offset>> = BTreeMap::new();
        for d in &delivered {
            sent_order.entry(d.partition).or_default().push(d.offset);
        }
        assert_eq!(seen, sent_order);

        consumer.close().await.expect("close");
    })
    .await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// librdkafka's partitioner and `partition_for` agree on many keys and partition counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_where_partition_for_says() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster);
        let producer = log.producer().expect("producer");
        for partitions in [1u32, 3, 7, 16] {
            let topic = topic_on(&cluster, "keys", partitions as i32);
            let keys: Vec<String> = (0..200)
                .map(|i| format!("sensor-{i}-{}", i * 7919))
                .collect();
            let records = keys.iter().map(|k| record(Some(k), "x")).collect();
            let delivered = producer.send(&topic, records).await.expect("send");
            for (key, d) in keys.iter().zip(&delivered) {
                assert_eq!(
                    d.partition,
                    partition_for(key.as_bytes(), partitions),
                    "{key} with {partitions} partitions"
                );
            }
            let used: BTreeSet<_> = delivered.iter().map(|d| d.partition).collect();
            assert_eq!(
                used.len(),
                partitions as usize,
                "200 keys should use every partition"
            );
        }
    })
    .await;
}

/// Test 2: a new member of the group resumes exactly at the committed offset, also when the
/// commit was in the middle of a polled batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_consumer_resumes_at_committed_offset() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster);
        let topic = topic_on(&cluster, "resume", 1);
        send_values(&log, &topic, (0..20).map(|i| format!("m{i}"))).await;
        let group = unique("group");
        let tp = TopicPartition::new(&topic, 0);

        let mut first = log.consumer(&group, &[&topic]).expect("consumer");
        let batch = poll_count(&mut first, 20).await;
        assert_eq!(offsets(&batch), (0..20).collect::<Vec<_>>());
        // Processed 7 of the 20: the next to read is batch[6].offset + 1.
        first.store(&tp, batch[6].offset + 1).expect("store");
        first.commit().await.expect("commit");
        first.close().await.expect("close");

        let mut second = log.consumer(&group, &[&topic]).expect("consumer");
        let rest = poll_count(&mut second, 13).await;
        assert_eq!(
            offsets(&rest),
            (7..20).collect::<Vec<_>>(),
            "no gap, no skip"
        );
        assert_eq!(rest[0].value, b"m7");
        assert_nothing_more(&mut second, Duration::from_millis(500)).await;
        second.close().await.expect("close");
    })
    .await;
}

/// Test 3: messages polled but never stored are delivered again to the next member, whether
/// the first one was dropped or closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstored_messages_are_redelivered() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster);
        let topic = topic_on(&cluster, "redeliver", 1);
        send_values(&log, &topic, (0..10).map(|i| format!("m{i}"))).await;
        let group = unique("group");
        let tp = TopicPartition::new(&topic, 0);

        let mut first = log.consumer(&group, &[&topic]).expect("consumer");
        let all = poll_count(&mut first, 10).await;
        first.store(&tp, all[2].offset + 1).expect("store");
        first.commit().await.expect("commit");
        // Messages 3..10 were polled but not processed; the consumer just goes away.
        drop(first);

        let mut second = log.consumer(&group, &[&topic]).expect("consumer");
        let again = poll_count(&mut second, 7).await;
        assert_eq!(offsets(&again), (3..10).collect::<Vec<_>>());
        // Closing without storing commits nothing new either.
        second.close().await.expect("close");

        let mut third = log.consumer(&group, &[&topic]).expect("consumer");
        let once_more = poll_count(&mut third, 7).await;
        assert_eq!(offsets(&once_more), (3..10).collect::<Vec<_>>());
        third.close().await.expect("close");
    })
    .await;
}

/// Offsets stored but not yet committed are committed when the partitions are revoked, even
/// if the consumer goes away without `commit` or `close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_commits_what_was_stored() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster);
        let topic = topic_on(&cluster, "drop-stored", 1);
        send_values(&log, &topic, (0..10).map(|i| format!("m{i}"))).await;
        let group = unique("group");
        let tp = TopicPartition::new(&topic, 0);

        let mut first = log.consumer(&group, &[&topic]).expect("consumer");
        poll_count(&mut first, 10).await;
        first.store(&tp, 6).expect("store");
        drop(first);

        let mut second = log.consumer(&group, &[&topic]).expect("consumer");
        let rest = poll_count(&mut second, 4).await;
        assert_eq!(offsets(&rest), vec![6, 7, 8, 9]);
        second.close().await.expect("close");
    })
    .await;
}

/// Keys spread evenly: `per_partition` keys for each of `partitions` partitions.
fn even_keys(partitions: u32, per_partition: usize) -> Vec<String> {
    let mut count = vec![0usize; partitions as usize];
    let mut keys = Vec::new();
    let mut i = 0;
    while keys.len() < partitions as usize * per_partition {
        let key = format!("k{i}");
        let p = partition_for(key.as_bytes(), partitions) as usize;
        if count[p] < per_partition {
            count[p] += 1;
            keys.push(key);
        }
        i += 1;
    }
    keys
}

/// Polls two members until they split the partitions between them.
async fn poll_until_split(
    c1: &mut KafkaConsumer,
    c2: &mut KafkaConsumer,
    all: &BTreeSet<TopicPartition>,
    got1: &mut Vec<Message>,
    got2: &mut Vec<Message>,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        got1.extend(
            c1.poll(100, Duration::from_millis(200))
                .await
                .expect("poll"),
        );
        got2.extend(
            c2.poll(100, Duration::from_millis(200))
                .await
                .expect("poll"),
        );
        let a1: BTreeSet<_> = c1.assignment().into_iter().collect();
        let a2: BTreeSet<_> = c2.assignment().into_iter().collect();
        if !a1.is_empty()
            && !a2.is_empty()
            && a1.is_disjoint(&a2)
            && a1.union(&a2).cloned().collect::<BTreeSet<_>>() == *all
        {
            return;
        }
        assert!(Instant::now() < deadline, "no split: {a1:?} / {a2:?}");
    }
}

/// Asserts that `read` (one partition's offsets, in arrival order) is one or more contiguous
/// runs up to `end`, each starting at one of `starts`: a rebalance may deliver messages again
/// from the committed offset, but never skips one.
fn assert_no_skip(read: &[Offset], starts: &[Offset], end: Offset, what: &str) {
    assert!(!read.is_empty(), "{what}: nothing read");
    let mut runs: Vec<Vec<Offset>> = Vec::new();
    for &offset in read {
        match runs.last_mut() {
            Some(run) if run.last().is_some_and(|&last| offset == last + 1) => run.push(offset),
            _ => runs.push(vec![offset]),
        }
    }
    for run in &runs {
        assert!(
            starts.contains(&run[0]),
            "{what}: a run starts at {} in {read:?}",
            run[0]
        );
    }
    let last = runs.last().and_then(|run| run.last()).copied();
    assert_eq!(last, Some(end - 1), "{what}: read {read:?}");
    if runs.len() > 1 {
        eprintln!("{what}: delivered again after another rebalance: {read:?}");
    }
}

fn read_of(messages: &[Message], partition: Partition) -> Vec<Offset> {
    messages
        .iter()
        .filter(|m| m.partition == partition)
        .map(|m| m.offset)
        .collect()
}

/// Test 4: two members split the partitions; when one closes, the other takes over all of
/// them and reads exactly what the first had not committed. A rebalance never skips a
/// message: the new owner starts at the committed or the stored offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_split_and_take_over_partitions() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster);
        let topic = topic_on(&cluster, "split", 4);
        let all: BTreeSet<TopicPartition> =
            (0..4).map(|p| TopicPartition::new(&topic, p)).collect();
        let producer = log.producer().expect("producer");
        let records = even_keys(4, 10)
            .iter()
            .map(|k| record(Some(k), k))
            .collect();
        producer.send(&topic, records).await.expect("send");
        let end: Offset = 10;
        let group = unique("group");

        // Alone, the first member owns everything. It commits 4 messages of each partition and
        // stores a fifth without committing it.
        let mut c1 = log.consumer(&group, &[&topic]).expect("consumer");
        poll_count(&mut c1, 40).await;
        assert_eq!(c1.assignment().into_iter().collect::<BTreeSet<_>>(), all);
        for tp in &all {
            c1.store(tp, 4).expect("store");
        }
        c1.commit().await.expect("commit");
        for tp in &all {
            c1.store(tp, 5).expect("store");
        }

        // A second member joins; they split the partitions and read them to the end.
        let mut c2 = log.consumer(&group, &[&topic]).expect("consumer");
        let (mut got1, mut got2) = (Vec::new(), Vec::new());
        poll_until_split(&mut c1, &mut c2, &all, &mut got1, &mut got2).await;
        let owned1: BTreeSet<Partition> = c1.assignment().iter().map(|tp| tp.partition).collect();
        let owned2: BTreeSet<Partition> = c2.assignment().iter().map(|tp| tp.partition).collect();
        let read_to_end = |got: &[Message], owned: &BTreeSet<Partition>| {
            owned
                .iter()
                .all(|&p| read_of(got, p).last() == Some(&(end - 1)))
        };
        let deadline = Instant::now() + WAIT;
        while !(read_to_end(&got1, &owned1) && read_to_end(&got2, &owned2)) {
            assert!(
                Instant::now() < deadline,
                "members did not read their partitions"
            );
            got1.extend(
                c1.poll(100, Duration::from_millis(200))
                    .await
                    .expect("poll"),
            );
            got2.extend(
                c2.poll(100, Duration::from_millis(200))
                    .await
                    .expect("poll"),
            );
        }
        for (got, owned) in [(&got1, &owned1), (&got2, &owned2)] {
            assert!(
                got.iter().all(|m| owned.contains(&m.partition)),
                "read a partition not owned"
            );
            for &p in owned {
                let read = read_of(got, p);
                // 5 when the revoke's commit went through (Kafka accepts commits while a
                // rebalance is being prepared); 4 when the coordinator refused it (the mock
                // cluster does): then message 4 is delivered again, never skipped.
                assert_no_skip(
                    &read,
                    &[4, 5],
                    end,
                    &format!("partition {p} after the join"),
                );
                eprintln!("after the join, partition {p} resumed at {}", read[0]);
            }
        }

        // The first member commits up to 7 on its partitions, reads on without processing,
        // then leaves.
        for &p in &owned1 {
            c1.store(&TopicPartition::new(&topic, p), 7).expect("store");
        }
        c1.commit().await.expect("commit");
        let foreign = TopicPartition::new(&topic, *owned2.iter().next().expect("c2 owns some"));
        assert!(matches!(c1.store(&foreign, 1), Err(Error::NotAssigned(_))));
        c1.close().await.expect("close");

        let taken_over = poll_until(&mut c2, "the takeover", |c, got| {
            c.assignment().into_iter().collect::<BTreeSet<_>>() == all
                && owned1
                    .iter()
                    .all(|&p| read_of(got, p).last() == Some(&(end - 1)))
        })
        .await;
        for &p in &owned1 {
            // Exactly after what the first member committed (again after any extra rebalance).
            assert_no_skip(
                &read_of(&taken_over, p),
                &[7],
                end,
                &format!("partition {p} taken over"),
            );
        }
        c2.close().await.expect("close");
    })
    .await;
}

/// Test 5 (mock part): seeking to offsets, the beginning and the end moves the read position;
/// partitions not assigned are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_moves_the_read_position() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster);
        let topic = topic_on(&cluster, "seek", 1);
        send_values(&log, &topic, (0..10).map(|i| format!("m{i}"))).await;
        let tp = TopicPartition::new(&topic, 0);
        let mut consumer = log.consumer(&unique("group"), &[&topic]).expect("consumer");
        poll_count(&mut consumer, 10).await;

        consumer.seek(&tp, SeekTo::Offset(3)).await.expect("seek");
        assert_eq!(
            offsets(&poll_count(&mut consumer, 7).await),
            (3..10).collect::<Vec<_>>()
        );

        consumer.seek(&tp, SeekTo::Beginning).await.expect("seek");
        assert_eq!(first_after(&mut consumer).await.offset, 0);

        consumer.seek(&tp, SeekTo::Offset(8)).await.expect("seek");
        assert_eq!(first_after(&mut consumer).await.offset, 8);

        consumer.seek(&tp, SeekTo::End).await.expect("seek");
        assert_nothing_more(&mut consumer, Duration::from_millis(500)).await;
        send_values(&log, &topic, ["late".to_owned()]).await;
        let m = first_after(&mut consumer).await;
        assert_eq!((m.offset, m.value.as_slice()), (10, b"late".as_slice()));

        let elsewhere = TopicPartition::new(&topic, 3);
        assert!(matches!(
            consumer.seek(&elsewhere, SeekTo::Beginning).await,
            Err(Error::NotAssigned(p)) if p == elsewhere
        ));
        assert!(matches!(
            consumer.store(&elsewhere, 1),
            Err(Error::NotAssigned(_))
        ));
        assert!(matches!(
            consumer.pause(std::slice::from_ref(&elsewhere)),
            Err(Error::NotAssigned(_))
        ));
        consumer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_poll_loses_nothing() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster);
        let topic = topic_on(&cluster, "cancel", 1);
        let mut consumer = log.consumer(&unique("group"), &[&topic]).expect("consumer");
        poll_until(&mut consumer, "the assignment", |c, _| {
            !c.assignment().is_empty()
        })
        .await;

        // The caller gives up on a poll that is still waiting for messages...
        let cancelled = tokio::time::timeout(
            Duration::from_millis(300),
            consumer.poll(100, Duration::from_secs(3)),
        )
        .await;
        assert!(cancelled.is_err(), "nothing to read yet");
        // ...which then fetches the messages produced meanwhile.
        send_values(&log, &topic, (0..5).map(|i| format!("m{i}"))).await;

        let mut received = Vec::new();
        let deadline = Instant::now() + WAIT;
        while received.len() < 5 {
            assert!(Instant::now() < deadline, "got {:?}", offsets(&received));
            let batch = consumer
                .poll(2, Duration::from_millis(500))
                .await
                .expect("poll");
            assert!(
                batch.len() <= 2,
                "poll returned {} messages for max 2",
                batch.len()
            );
            received.extend(batch);
        }
        assert_eq!(offsets(&received), vec![0, 1, 2, 3, 4]);
        assert_nothing_more(&mut consumer, Duration::from_millis(300)).await;
        consumer.close().await.expect("close");
    })
    .await;
}

/// Paused partitions return nothing until resumed, then continue where they stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster);
        let topic = topic_on(&cluster, "pause", 1);
        send_values(&log, &topic, (0..5).map(|i| format!("m{i}"))).await;
        let tp = TopicPartition::new(&topic, 0);
        let mut consumer = log.consumer(&unique("group"), &[&topic]).expect("consumer");
        poll_count(&mut consumer, 5).await;

        consumer.pause(std::slice::from_ref(&tp)).expect("pause");
        send_values(&log, &topic, (5..8).map(|i| format!("m{i}"))).await;
        assert_nothing_more(&mut consumer, Duration::from_millis(1000)).await;

        consumer.resume(std::slice::from_ref(&tp)).expect("resume");
        let rest = poll_count(&mut consumer, 3).await;
        assert_eq!(offsets(&rest), vec![5, 6, 7]);
        consumer.close().await.expect("close");
    })
    .await;
}

/// Test 6a: produce errors injected into the broker are retried by the idempotent producer:
/// the send succeeds and the topic holds every record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_produce_errors_are_retried_without_duplicates() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster);
        let topic = topic_on(&cluster, "retry", 1);
        let producer = log.producer().expect("producer");
        // Warm up (producer id, metadata) so the injected errors hit the produce requests.
        producer
            .send(&topic, vec![record(None, "warm-up")])
            .await
            .expect("send");

        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            ],
        );
        let records: Vec<Record> = (0..10).map(|i| record(None, &format!("m{i}"))).collect();
        let delivered = producer
            .send(&topic, records)
            .await
            .expect("send is retried");
        assert_eq!(delivered.len(), 10);

        let mut consumer = log.consumer(&unique("group"), &[&topic]).expect("consumer");
        let messages = poll_count(&mut consumer, 11).await;
        let values: Vec<String> = messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.value).into_owned())
            .collect();
        let mut expected = vec!["warm-up".to_owned()];
        expected.extend((0..10).map(|i| format!("m{i}")));
        assert_eq!(values, expected, "every record once, in order");
        assert_nothing_more(&mut consumer, Duration::from_millis(500)).await;
        let lag = consumer.lag().await.expect("lag");
        assert_eq!(lag[0].high_watermark, 11, "no duplicate was appended");
        consumer.close().await.expect("close");
    })
    .await;
}

/// Test 6b: with every broker down, `send` fails (transiently) once `message.timeout.ms` is
/// over, instead of hanging or reporting success; once brokers are back, sends succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_fails_when_all_brokers_are_down() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster).with_option("message.timeout.ms", "2000");
        let topic = topic_on(&cluster, "down", 2);
        let producer = log.producer().expect("producer");
        producer
            .send(&topic, vec![record(Some("a"), "before")])
            .await
            .expect("send");

        for id in BROKERS {
            cluster.broker_down(id).expect("broker down");
        }
        let started = Instant::now();
        let result = producer
            .send(
                &topic,
                vec![record(Some("a"), "lost?"), record(Some("b"), "lost?")],
            )
            .await;
        let took = started.elapsed();
        match result {
            Err(e) => assert!(e.is_transient(), "an outage is transient: {e}"),
            Ok(d) => panic!("send reported success with every broker down: {d:?}"),
        }
        assert!(took < Duration::from_secs(10), "send took {took:?}");

        for id in BROKERS {
            cluster.broker_up(id).expect("broker up");
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match producer
                .send(&topic, vec![record(Some("a"), "after")])
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    assert!(e.is_transient(), "{e}");
                    assert!(Instant::now() < deadline, "no recovery: {e}");
                }
            }
        }
    })
    .await;
}

/// Test 6c: a commit that the coordinator rejects is reported, never silently dropped: the
/// offsets stay stored, a later commit makes them durable, and a new member resumes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commits_are_reported_and_retried() {
    bounded(async {
        let cluster = cluster();
        // A session longer than the outage below, so that the member keeps its partition.
        let log = log_on(&cluster).with_option("session.timeout.ms", "30000");
        let topic = topic_on(&cluster, "commit-fail", 1);
        send_values(&log, &topic, (0..10).map(|i| format!("m{i}"))).await;
        let group = unique("group");
        let tp = TopicPartition::new(&topic, 0);
        let mut consumer = log.consumer(&group, &[&topic]).expect("consumer");
        poll_count(&mut consumer, 10).await;

        // The coordinator refuses offset commits (as while it is moving or overloaded).
        cluster.request_errors(
            RDKafkaApiKey::OffsetCommit,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 1],
        );
        consumer.store(&tp, 4).expect("store");
        let first = consumer.commit().await;
        assert!(
            first.is_err(),
            "a rejected commit must be an error, got {first:?}"
        );
        let lag = consumer.lag().await.expect("lag");
        assert_eq!(lag[0].committed, None, "nothing committed yet");

        // The stored offset is still pending: the next commit makes it durable.
        consumer.commit().await.expect("commit after the fault");
        let lag = consumer.lag().await.expect("lag");
        assert_eq!(lag[0].committed, Some(4));

        // Retriable coordinator errors are retried inside the commit (or reported); either
        // way the offset ends up durable.
        cluster.request_errors(
            RDKafkaApiKey::OffsetCommit,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            ],
        );
        consumer.store(&tp, 6).expect("store");
        let deadline = Instant::now() + WAIT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match consumer.commit().await {
                Ok(()) => break,
                Err(e) => {
                    assert!(e.is_transient(), "coordinator errors are transient: {e}");
                    assert!(Instant::now() < deadline, "commit never succeeded: {e}");
                }
            }
        }
        eprintln!("commit with retriable coordinator errors took {attempts} call(s)");
        let lag = consumer.lag().await.expect("lag");
        assert_eq!(lag[0].committed, Some(6));

        // With every broker down the commit fails in bounded time (or is retried until they
        // return); it is never reported committed when it is not, and the stored offset stays
        // pending until a commit succeeds.
        consumer.store(&tp, 8).expect("store");
        for id in BROKERS {
            cluster.broker_down(id).expect("broker down");
        }
        let started = Instant::now();
        let during_outage = consumer.commit().await;
        let took = started.elapsed();
        eprintln!("commit with all brokers down: {during_outage:?} after {took:?}");
        assert!(took < Duration::from_secs(15), "commit took {took:?}");
        for id in BROKERS {
            cluster.broker_up(id).expect("broker up");
        }
        if let Err(e) = &during_outage {
            assert!(e.is_transient(), "an outage is transient: {e}");
            let deadline = Instant::now() + WAIT;
            while let Err(e) = consumer.commit().await {
                assert!(Instant::now() < deadline, "commit never recovered: {e}");
            }
        }
        consumer.close().await.expect("close");

        let mut next = log.consumer(&group, &[&topic]).expect("consumer");
        let rest = poll_count(&mut next, 2).await;
        assert_eq!(offsets(&rest), vec![8, 9]);
        next.close().await.expect("close");
    })
    .await;
}

/// Test 7: lag is the high watermark minus the committed offset (the low watermark before any
/// commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_high_watermark_minus_committed() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster);
        let topic = topic_on(&cluster, "lag", 1);
        send_values(&log, &topic, (0..10).map(|i| format!("m{i}"))).await;
        let tp = TopicPartition::new(&topic, 0);
        let mut consumer = log.consumer(&unique("group"), &[&topic]).expect("consumer");
        poll_count(&mut consumer, 10).await;

        let lag = consumer.lag().await.expect("lag");
        assert_eq!(lag.len(), 1);
        assert_eq!(lag[0].partition, tp);
        assert_eq!(
            (lag[0].committed, lag[0].high_watermark, lag[0].lag),
            (None, 10, 10)
        );

        consumer.store(&tp, 4).expect("store");
        let lag = consumer.lag().await.expect("lag");
        assert_eq!(lag[0].lag, 10, "stored is not committed");
        consumer.commit().await.expect("commit");
        let lag = consumer.lag().await.expect("lag");
        assert_eq!(
            (lag[0].committed, lag[0].high_watermark, lag[0].lag),
            (Some(4), 10, 6)
        );

        send_values(&log, &topic, (10..15).map(|i| format!("m{i}"))).await;
        let lag = consumer.lag().await.expect("lag");
        assert_eq!(
            (lag[0].committed, lag[0].high_watermark, lag[0].lag),
            (Some(4), 15, 11)
        );
        consumer.close().await.expect("close");
    })
    .await;
}

/// Topic metadata: partition counts, unknown topics, and producing to one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_and_their_partitions() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster).with_option("topic.metadata.propagation.max.ms", "1000");
        let topic = topic_on(&cluster, "meta", 6);
        assert_eq!(log.partitions(&topic).await.expect("partitions"), 6);

        let missing = unique("missing");
        match log.partitions(&missing).await {
            Err(Error::UnknownTopic(t)) => assert_eq!(t, missing),
            other => panic!("expected UnknownTopic, got {other:?}"),
        }
        // Producing must not create the topic behind our back, and must say why it failed.
        let producer = log.producer().expect("producer");
        let result = producer.send(&missing, vec![record(None, "x")]).await;
        assert!(
            matches!(&result, Err(e) if !e.is_transient()),
            "producing to a missing topic: {result:?}"
        );
        assert!(matches!(
            log.partitions(&missing).await,
            Err(Error::UnknownTopic(_))
        ));
    })
    .await;
}

/// `create_topic` goes through the admin API. The mock cluster does not implement
/// CreateTopics, so this shows the failure is reported (and quickly), not swallowed. Creating
/// a topic on a real broker is not tested here: this machine has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_topic_reports_broker_refusal() {
    bounded(async {
        let cluster = cluster();
        let log = log_on(&cluster).with_operation_timeout(Duration::from_secs(2));
        let name = unique("created");
        let started = Instant::now();
        let result = log.create_topic(&TopicSpec::new(&name, 3)).await;
        eprintln!(
            "create_topic on the mock cluster: {result:?} after {:?}",
            started.elapsed()
        );
        match result {
            Ok(()) => assert_eq!(log.partitions(&name).await.expect("partitions"), 3),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        assert!(matches!(
            log.create_topic(&TopicSpec::new(&name, 0)).await,
            Err(Error::Fatal(_))
        ));
    })
    .await;
}

/// The shared contract bodies, on the mock cluster (which creates the topics: it has no
/// CreateTopics).
mod shared {
    use super::*;

    struct Mock<'a>(&'a Cluster);

    impl contract::Topics for Mock<'_> {
        async fn create(&self, name: &str, partitions: u32) {
            self.0
                .create_topic(name, partitions as i32, 3)
                .expect("create topic on the mock cluster");
        }
    }

    macro_rules! contract {
        ($($name:ident),* $(,)?) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                bounded(async {
                    let cluster = cluster();
                    let log = log_on(&cluster);
                    let topic = unique("contract");
                    contract::$name(&log, &Mock(&cluster), &topic, &format!("{topic}-g")).await;
                })
                .await;
            }
        )*};
    }

    contract!(
        ordering_and_key_partitioning,
        resumes_exactly_at_the_committed_offset,
        uncommitted_messages_are_redelivered,
        group_members_split_partitions_and_take_over,
        seek_to_offsets,
        lag_and_pause,
    );
}
