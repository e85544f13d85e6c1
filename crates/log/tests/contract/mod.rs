//! The log contract: one body per property, run against every implementation by the test files
//! beside this module. A body gets a fresh log and unique topic and group names.

// Each test binary runs the bodies its log supports.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sluice_log::{
    Consumer, Header, Log, Message, Producer, Record, SeekTo, TopicPartition, partition_for,
};
use tokio::time::{Instant, timeout};

/// How a body creates topics: through the log itself, or through the test broker where the
/// log's admin path cannot be used (librdkafka's mock cluster has no CreateTopics).
pub trait Topics {
    fn create(&self, name: &str, partitions: u32) -> impl std::future::Future<Output = ()>;
}

/// Longest a body waits for a condition (a rebalance, messages to arrive).
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn record(key: &str, value: &str, ts: i64) -> Record {
    Record {
        key: Some(key.as_bytes().to_vec()),
        value: value.as_bytes().to_vec(),
        headers: vec![Header {
            key: "traceparent".into(),
            value: format!("tp-{value}").into_bytes(),
        }],
        timestamp_ms: Some(ts),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls until `n` messages arrived (or the deadline passes, which fails the test).
pub async fn poll_n<C: Consumer>(c: &mut C, n: usize) -> Vec<Message> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            start.elapsed() < DEADLINE,
            "only {} of {n} messages arrived within {DEADLINE:?}",
            out.len()
        );
        out.extend(
            c.poll(n - out.len(), Duration::from_millis(200))
                .await
                .unwrap(),
        );
    }
    out
}

/// Polls (consuming nothing expected) until `check` holds on the consumer.
pub async fn poll_until<C: Consumer>(
    c: &mut C,
    what: &str,
    check: impl Fn(&C) -> bool,
) -> Vec<Message> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while !check(c) {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        seen.extend(c.poll(100, Duration::from_millis(100)).await.unwrap());
    }
    seen
}

pub async fn ordering_and_key_partitioning<L: Log, T: Topics>(
    log: &L,
    topics: &T,
    topic: &str,
    group: &str,
) {
    topics.create(topic, 3).await;
    let producer = log.producer().unwrap();
    let records: Vec<Record> = (0..60)
        .map(|i| {
            record(
                &format!("dev-{}", i % 7),
                &format!("v{i}"),
                1_700_000_000_000 + i,
            )
        })
        .collect();
    let delivered = producer.send(topic, records.clone()).await.unwrap();
    assert_eq!(delivered.len(), 60);
    for (r, d) in records.iter().zip(&delivered) {
        assert_eq!(
            d.partition,
            partition_for(r.key.as_ref().unwrap(), 3),
            "key → partition"
        );
    }

    let mut consumer = log.consumer(group, &[topic]).unwrap();
    let got = poll_n(&mut consumer, 60).await;
    let mut by_partition: BTreeMap<i32, Vec<&Message>> = BTreeMap::new();
    for m in &got {
        by_partition.entry(m.partition).or_default().push(m);
    }
    for (p, msgs) in by_partition {
        let offsets: Vec<i64> = msgs.iter().map(|m| m.offset).collect();
        let expected: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(
            offsets, expected,
            "partition {p} is contiguous and in order"
        );
    }
    // Per key, the order of production.
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for m in &got {
        let v: i64 = text(&m.value)[1..].parse().unwrap();
        per_key
            .entry(text(m.key.as_ref().unwrap()))
            .or_default()
            .push(v);
    }
    for (key, values) in per_key {
        let mut sorted = values.clone();
        sorted.sort();
        assert_eq!(values, sorted, "{key} kept its order");
    }
    // Values, headers and timestamps intact.
    for m in &got {
        let i: i64 = text(&m.value)[1..].parse().unwrap();
        assert_eq!(m.timestamp_ms, 1_700_000_000_000 + i);
        assert_eq!(m.headers, records[i as usize].headers);
        assert_eq!(m.topic, topic);
    }
    consumer.close().await.unwrap();
}

pub async fn resumes_exactly_at_the_committed_offset<L: Log, T: Topics>(
    log: &L,
    topics: &T,
    topic: &str,
    group: &str,
) {
    topics.create(topic, 1).await;
    let producer = log.producer().unwrap();
    let records = (0..20)
        .map(|i| record("k", &format!("v{i}"), 1_000 + i))
        .collect();
    producer.send(topic, records).await.unwrap();

    let mut first = log.consumer(group, &[topic]).unwrap();
    let batch = poll_n(&mut first, 20).await;
    // Processed 7 of the batch: store and commit exactly that.
    let tp = batch[0].topic_partition();
    first.store(&tp, batch[6].offset + 1).unwrap();
    first.commit().await.unwrap();
    drop(first);

    let mut second = log.consumer(group, &[topic]).unwrap();
    let again = poll_n(&mut second, 13).await;
    let offsets: Vec<i64> = again.iter().map(|m| m.offset).collect();
    assert_eq!(
        offsets,
        (7..20).collect::<Vec<_>>(),
        "no gap, no skip, no repeat"
    );
    second.close().await.unwrap();
}

pub async fn uncommitted_messages_are_redelivered<L: Log, T: Topics>(
    log: &L,
    topics: &T,
    topic: &str,
    group: &str,
) {
    topics.create(topic, 2).await;
    let producer = log.producer().unwrap();
    let records = (0..10)
        .map(|i| record(&format!("k{i}"), &format!("v{i}"), 1_000 + i))
        .collect();
    producer.send(topic, records).await.unwrap();

    let mut crashed = log.consumer(group, &[topic]).unwrap();
    let seen = poll_n(&mut crashed, 10).await;
    // Taken but never stored nor committed: the next member reads them again.
    drop(crashed);

    let mut next = log.consumer(group, &[topic]).unwrap();
    let again = poll_n(&mut next, 10).await;
    let mut a: Vec<_> = seen.iter().map(|m| (m.partition, m.offset)).collect();
    let mut b: Vec<_> = again.iter().map(|m| (m.partition, m.offset)).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    next.close().await.unwrap();
}

pub async fn group_members_split_partitions_and_take_over<L: Log, T: Topics>(
    log: &L,
    topics: &T,
    topic: &str,
    group: &str,
) {
    topics.create(topic, 4).await;
    let mut a = log.consumer(group, &[topic]).unwrap();
    poll_until(&mut a, "a to own all 4", |c| c.assignment().len() == 4).await;
    let mut b = log.consumer(group, &[topic]).unwrap();
    // Both must poll for the partitions to move.
    let start = Instant::now();
    while !(a.assignment().len() == 2 && b.assignment().len() == 2) {
        assert!(
            start.elapsed() < DEADLINE,
            "the group never split: {:?} / {:?}",
            a.assignment(),
            b.assignment()
        );
        a.poll(10, Duration::from_millis(50)).await.unwrap();
        b.poll(10, Duration::from_millis(50)).await.unwrap();
    }
    let mut all: Vec<TopicPartition> = a.assignment().into_iter().chain(b.assignment()).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4, "disjoint, and together every partition");

    let producer = log.producer().unwrap();
    let records = (0..40)
        .map(|i| record(&format!("k{i}"), &format!("v{i}"), 1_000 + i))
        .collect();
    producer.send(topic, records).await.unwrap();
    let a_count: usize = a.assignment().len();
    assert_eq!(a_count, 2);
    // a reads some of its share and commits only the first message of each partition.
    let start = Instant::now();
    let mut a_seen: Vec<Message> = Vec::new();
    while a_seen.is_empty() {
        assert!(start.elapsed() < DEADLINE);
        a_seen.extend(a.poll(100, Duration::from_millis(100)).await.unwrap());
    }
    let mut committed: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    for m in &a_seen {
        committed.entry(m.topic_partition()).or_insert(m.offset + 1);
    }
    for (tp, next) in &committed {
        a.store(tp, *next).unwrap();
    }
    a.close().await.unwrap();

    // b takes over every partition, and reads a's partitions from a's commits.
    let mut b_seen = poll_until(&mut b, "b to own all 4", |c| c.assignment().len() == 4).await;
    let start = Instant::now();
    loop {
        // Distinct messages: b's own partitions may come round again after the rebalance (b
        // committed nothing), and such repeats must not stand in for a's partitions.
        let total = b_seen
            .iter()
            .map(|m| (m.topic_partition(), m.offset))
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let expected: usize = 40 - committed.values().map(|n| *n as usize).sum::<usize>();
        if total >= expected {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "b read {total} of {expected}");
        b_seen.extend(b.poll(100, Duration::from_millis(100)).await.unwrap());
    }
    for (tp, next) in &committed {
        let first = b_seen
            .iter()
            .filter(|m| &m.topic_partition() == tp)
            .map(|m| m.offset)
            .min();
        assert_eq!(first, Some(*next), "{tp} resumes at a's commit");
    }
    b.close().await.unwrap();
}

/// A one-partition topic holding ten messages stamped 1 s … 10 s, and a consumer that has
/// read them all.
async fn ten_read_messages<L: Log, T: Topics>(
    log: &L,
    topics: &T,
    topic: &str,
    group: &str,
) -> (L::Producer, L::Consumer, TopicPartition) {
    topics.create(topic, 1).await;
    let producer = log.producer().unwrap();
    let records = (1..=10)
        .map(|i| record("k", &format!("v{i}"), i * 1_000))
        .collect();
    producer.send(topic, records).await.unwrap();
    let mut c = log.consumer(group, &[topic]).unwrap();
    poll_n(&mut c, 10).await;
    (producer, c, TopicPartition::new(topic, 0))
}

pub async fn seek_to_offsets<L: Log, T: Topics>(log: &L, topics: &T, topic: &str, group: &str) {
    let (producer, mut c, tp) = ten_read_messages(log, topics, topic, group).await;
    c.seek(&tp, SeekTo::Beginning).await.unwrap();
    assert_eq!(poll_n(&mut c, 1).await[0].offset, 0);
    c.seek(&tp, SeekTo::Offset(8)).await.unwrap();
    assert_eq!(poll_n(&mut c, 1).await[0].offset, 8);
    c.seek(&tp, SeekTo::End).await.unwrap();
    producer
        .send(topic, vec![record("k", "after-end", 20_000)])
        .await
        .unwrap();
    assert_eq!(poll_n(&mut c, 1).await[0].offset, 10);
    c.close().await.unwrap();
}

/// Not run on librdkafka's mock cluster: it answers every offsets-for-times request with -1.
pub async fn seek_by_timestamp<L: Log, T: Topics>(log: &L, topics: &T, topic: &str, group: &str) {
    let (_producer, mut c, tp) = ten_read_messages(log, topics, topic, group).await;
    c.seek(&tp, SeekTo::Timestamp(4_500)).await.unwrap();
    let after = poll_n(&mut c, 6).await;
    assert_eq!(after[0].timestamp_ms, 5_000);
    assert_eq!(after[0].offset, 4);
    c.close().await.unwrap();
}

pub async fn lag_and_pause<L: Log, T: Topics>(log: &L, topics: &T, topic: &str, group: &str) {
    topics.create(topic, 1).await;
    let producer = log.producer().unwrap();
    producer
        .send(
            topic,
            (0..10)
                .map(|i| record("k", &format!("v{i}"), 1_000 + i))
                .collect(),
        )
        .await
        .unwrap();
    let mut c = log.consumer(group, &[topic]).unwrap();
    let got = poll_n(&mut c, 10).await;
    let tp = got[0].topic_partition();
    c.store(&tp, 4).unwrap();
    c.commit().await.unwrap();
    let lag = c.lag().await.unwrap();
    assert_eq!(lag.len(), 1);
    assert_eq!(
        (lag[0].committed, lag[0].high_watermark, lag[0].lag),
        (Some(4), 10, 6)
    );

    c.pause(std::slice::from_ref(&tp)).unwrap();
    producer
        .send(topic, vec![record("k", "paused", 2_000)])
        .await
        .unwrap();
    let none = timeout(
        Duration::from_secs(5),
        c.poll(10, Duration::from_millis(300)),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(none.is_empty(), "a paused partition returned {none:?}");
    c.resume(&[tp]).unwrap();
    let resumed = poll_n(&mut c, 1).await;
    assert_eq!(text(&resumed[0].value), "paused");
    c.close().await.unwrap();
}
