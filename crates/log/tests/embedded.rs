//! The log contract and the durability of the embedded log (`embedded://DIR`).

mod contract;

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_log::{
    Consumer, EmbeddedLog, EmbeddedOptions, Log, Producer, TopicPartition, TopicSpec,
};

fn open(dir: &std::path::Path) -> EmbeddedLog {
    EmbeddedLog::open(dir, EmbeddedOptions::default()).unwrap()
}

/// The embedded log creates its own topics.
struct Own<'a>(&'a EmbeddedLog);

impl contract::Topics for Own<'_> {
    async fn create(&self, name: &str, partitions: u32) {
        self.0
            .create_topic(&TopicSpec::new(name, partitions))
            .await
            .unwrap();
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let dir = tempfile::tempdir().unwrap();
            let log = open(dir.path());
            contract::$name(&log, &Own(&log), "t", "g").await;
        }
    )*};
}

contract!(
    ordering_and_key_partitioning,
    resumes_exactly_at_the_committed_offset,
    uncommitted_messages_are_redelivered,
    group_members_split_partitions_and_take_over,
    seek_to_offsets,
    seek_by_timestamp,
    lag_and_pause,
);

#[tokio::test]
async fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        log.create_topic(&TopicSpec::new("t", 2)).await.unwrap();
        let records = (0..50)
            .map(|i| contract::record(&format!("k{i}"), &format!("v{i}"), i))
            .collect();
        log.producer().unwrap().send("t", records).await.unwrap();
        let mut c = log.consumer("g", &["t"]).unwrap();
        let got = contract::poll_n(&mut c, 50).await;
        for m in got.iter().filter(|m| m.offset < 3) {
            c.store(&m.topic_partition(), m.offset + 1).unwrap();
        }
        c.close().await.unwrap();
    }
    let log = open(dir.path());
    assert_eq!(log.partitions("t").await.unwrap(), 2);
    let mut c = log.consumer("g", &["t"]).unwrap();
    let again = contract::poll_n(&mut c, 44).await;
    assert!(again.iter().all(|m| m.offset >= 3));
    // Appends continue after the recovered end.
    let d = log
        .producer()
        .unwrap()
        .send("t", vec![contract::record("k1", "new", 99)])
        .await
        .unwrap();
    assert!(d[0].offset >= 3);
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        log.create_topic(&TopicSpec::new("t", 1)).await.unwrap();
        let records = (0..5)
            .map(|i| contract::record("k", &format!("v{i}"), i))
            .collect();
        log.producer().unwrap().send("t", records).await.unwrap();
    }
    // A crash in the middle of writing the next batch leaves half a frame.
    let segment = dir.path().join("topics/t/0/00000000000000000000.log");
    let mut f = OpenOptions::new().append(true).open(&segment).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(f);

    let log = open(dir.path());
    let d = log
        .producer()
        .unwrap()
        .send("t", vec![contract::record("k", "v5", 5)])
        .await
        .unwrap();
    assert_eq!(d[0].offset, 5);
    let mut c = log.consumer("g", &["t"]).unwrap();
    let got = contract::poll_n(&mut c, 6).await;
    let values: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.value).into_owned())
        .collect();
    assert_eq!(values, ["v0", "v1", "v2", "v3", "v4", "v5"]);
}

#[tokio::test]
async fn retention_deletes_old_segments_and_consumers_skip_to_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(
        dir.path(),
        EmbeddedOptions {
            segment_bytes: 1_000,
            ..EmbeddedOptions::default()
        },
    )
    .unwrap();
    let spec = TopicSpec {
        retention: Some(Duration::from_secs(3600)),
        ..TopicSpec::new("t", 1)
    };
    log.create_topic(&spec).await.unwrap();
    let producer = log.producer().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Old records in small batches fill several segments, then fresh ones.
    for i in 0..20 {
        producer
            .send(
                "t",
                vec![contract::record(
                    "k",
                    &format!("old-{i:03}-{}", "x".repeat(200)),
                    now - 7_200_000,
                )],
            )
            .await
            .unwrap();
    }
    for i in 0..3 {
        producer
            .send("t", vec![contract::record("k", &format!("new-{i}"), now)])
            .await
            .unwrap();
    }
    let deleted = log.enforce_retention().unwrap();
    assert!(deleted > 0, "no segment was old enough to delete");
    let tp = TopicPartition::new("t", 0);
    let start = log.log_start(&tp).unwrap();
    assert!(start > 0);

    let mut c = log.consumer("g", &["t"]).unwrap();
    let got = contract::poll_n(&mut c, (23 - start) as usize).await;
    assert_eq!(
        got[0].offset, start,
        "a new group starts at the oldest kept offset"
    );
    assert!(got.iter().any(|m| m.value.starts_with(b"new-")));

    // Size-based retention keeps the newest segment whatever the limit.
    let sized = TopicSpec {
        retention_bytes: Some(1),
        ..TopicSpec::new("s", 1)
    };
    log.create_topic(&sized).await.unwrap();
    for i in 0..10 {
        producer
            .send("s", vec![contract::record("k", &"y".repeat(300), i)])
            .await
            .unwrap();
    }
    log.enforce_retention().unwrap();
    let s0 = TopicPartition::new("s", 0);
    assert!(log.log_start(&s0).unwrap() > 0);
    let mut c = log.consumer("g2", &["s"]).unwrap();
    let kept = contract::poll_n(&mut c, 1).await;
    assert!(kept[0].offset > 0);
}

#[tokio::test]
async fn a_second_process_cannot_open_the_same_folder() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    let err = EmbeddedLog::open(dir.path(), EmbeddedOptions::default()).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn urls_are_checked() {
    assert!(EmbeddedLog::from_url("kafka://x").is_err());
    assert!(EmbeddedLog::from_url("embedded://").is_err());
    let dir = tempfile::tempdir().unwrap();
    assert!(EmbeddedLog::from_url(&format!("embedded://{}", dir.path().display())).is_ok());
}

#[tokio::test]
async fn acknowledged_produces_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-log-crash-producer"))
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last_acked = -1i64;
    while last_acked < 5_000 {
        let line = lines.next().expect("child stopped early").unwrap();
        if let Some(offset) = line.strip_prefix("ACK ") {
            last_acked = offset.parse().unwrap();
        }
    }
    // SIGKILL mid-stream: the child is writing its next batch right now.
    assert!(
        Command::new("kill")
            .args(["-9", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    child.wait().unwrap();

    let log = open(dir.path());
    let mut c = log.consumer("g", &["t"]).unwrap();
    let got = contract::poll_n(&mut c, last_acked as usize + 1).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(
            m.offset, i as i64,
            "no hole before the last acknowledged offset"
        );
        let expected = format!("b{}-{}", i / 100, i % 100);
        assert_eq!(String::from_utf8_lossy(&m.value), expected);
    }
}
