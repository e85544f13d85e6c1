//! `sluice bench log`: produce N messages while a consumer group reads them back with commits,
//! on any [`Log`]; report produce and consume throughput and produce-to-consume latency, beside
//! a baseline measured in the same run: the disk's own rate for the same bytes written and
//! fsynced in the same batches.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::fsutil::io;
use crate::{Consumer, Error, Log, Producer, Record, Result, TopicSpec};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Messages to produce and consume.
    pub messages: u64,
    /// Bytes per message value (at least 8: the send time travels in the value).
    pub size: usize,
    /// Records per produce call.
    pub batch: usize,
    /// Partitions of the bench topic.
    pub partitions: u32,
    /// Produce at this many messages per second; as fast as possible when absent.
    pub rate: Option<u64>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            messages: 200_000,
            size: 200,
            batch: 1_000,
            partitions: 6,
            rate: None,
        }
    }
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Messages produced and consumed.
    pub messages: u64,
    /// Value size in bytes.
    pub size: usize,
    /// Records per produce call.
    pub batch: usize,
    /// The requested produce rate, if paced.
    pub rate: Option<u64>,
    /// Acknowledged messages per second while producing.
    pub produce_msgs_per_s: f64,
    /// Consumed-and-committed messages per second, from the first produce to the last commit.
    pub consume_msgs_per_s: f64,
    /// Produce-to-consume latency percentiles in milliseconds.
    pub latency_ms: Latency,
    /// The same bytes written to a plain file and fsynced per batch, messages per second; None
    /// when no folder was given for it.
    pub baseline_fsync_msgs_per_s: Option<f64>,
    /// `produce_msgs_per_s / baseline_fsync_msgs_per_s`, for unpaced runs only.
    pub produce_vs_baseline: Option<f64>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Worst.
    pub max: f64,
}

/// Runs the bench on `log`, creating its topic through the log. `baseline_dir`, if given, is
/// where the raw fsync baseline writes its scratch file (the same disk as the log, for a fair
/// ratio). `progress` is called with the number of messages consumed so far, about every tenth
/// of the run.
pub async fn run<L: Log>(
    log: &L,
    opts: &BenchOptions,
    baseline_dir: Option<&Path>,
    progress: impl Fn(u64) + Send,
) -> Result<BenchReport> {
    check(opts)?;
    let topic = bench_topic();
    log.create_topic(&TopicSpec::new(&topic, opts.partitions))
        .await?;
    run_prepared(log, &topic, opts, baseline_dir, progress).await
}

/// As [`run`], with the topic created by `create(name, partitions)` (for brokers whose admin
/// API the log cannot use, like librdkafka's mock cluster).
pub async fn run_on_topic<L: Log>(
    log: &L,
    opts: &BenchOptions,
    baseline_dir: Option<&Path>,
    progress: impl Fn(u64) + Send,
    create: impl FnOnce(&str, u32) -> Result<()>,
) -> Result<BenchReport> {
    check(opts)?;
    let topic = bench_topic();
    create(&topic, opts.partitions)?;
    run_prepared(log, &topic, opts, baseline_dir, progress).await
}

fn check(opts: &BenchOptions) -> Result<()> {
    if opts.size < 8 || opts.messages == 0 || opts.batch == 0 {
        return Err(Error::Fatal(
            "the bench needs --size >= 8, --messages >= 1 and --batch >= 1".into(),
        ));
    }
    Ok(())
}

fn bench_topic() -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("bench-{stamp}")
}

async fn run_prepared<L: Log>(
    log: &L,
    topic: &str,
    opts: &BenchOptions,
    baseline_dir: Option<&Path>,
    progress: impl Fn(u64) + Send,
) -> Result<BenchReport> {
    let mut consumer = log.consumer(&format!("{topic}-group"), &[topic])?;
    let producer = log.producer()?;
    warm_up(&mut consumer, &producer, topic, opts.partitions).await?;
    let start = Instant::now();

    let produce = {
        let topic = topic.to_owned();
        let opts = opts.clone();
        // Borrowed, not moved: dropping a Kafka producer blocks while librdkafka shuts down,
        // which would stall the consumer sharing this task.
        let producer = &producer;
        async move {
            let mut sent = 0u64;
            while sent < opts.messages {
                if let Some(rate) = opts.rate {
                    // Pace by schedule, not by sleeping a fixed gap, so slow batches catch up.
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(start + due)).await;
                }
                let n = (opts.messages - sent).min(opts.batch as u64);
                let sent_at = start.elapsed().as_nanos() as u64;
                let records = (0..n)
                    .map(|i| {
                        let mut value = vec![b'x'; opts.size];
                        value[..8].copy_from_slice(&sent_at.to_le_bytes());
                        Record {
                            key: Some(format!("dev-{}", (sent + i) % 1000).into_bytes()),
                            value,
                            ..Record::default()
                        }
                    })
                    .collect();
                producer.send(&topic, records).await?;
                sent += n;
            }
            Ok::<Duration, Error>(start.elapsed())
        }
    };

    let consume = async {
        let mut latencies = Vec::with_capacity(opts.messages as usize);
        let mut next_report = opts.messages / 10;
        // A paced producer may leave long gaps; anything beyond a minute plus two batch
        // intervals means messages are not coming (e.g. the mock cluster dropped them).
        let patience = Duration::from_secs(60)
            + opts.rate.map_or(Duration::ZERO, |r| {
                Duration::from_secs_f64(2.0 * opts.batch as f64 / r.max(1) as f64)
            });
        let mut last_message = Instant::now();
        while (latencies.len() as u64) < opts.messages {
            let batch = consumer.poll(5_000, Duration::from_secs(10)).await?;
            if batch.is_empty() {
                if last_message.elapsed() > patience {
                    return Err(Error::Fatal(format!(
                        "the bench stalled: {} of {} messages consumed, none in the last {:.0} s",
                        latencies.len(),
                        opts.messages,
                        patience.as_secs_f64()
                    )));
                }
                continue;
            }
            last_message = Instant::now();
            let now = start.elapsed().as_nanos() as u64;
            for m in &batch {
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&m.value[..8]);
                latencies.push(now.saturating_sub(u64::from_le_bytes(sent)));
                consumer.store(&m.topic_partition(), m.offset + 1)?;
            }
            consumer.commit().await?;
            if latencies.len() as u64 >= next_report {
                progress(latencies.len() as u64);
                next_report += opts.messages / 10;
            }
        }
        Ok::<(Vec<u64>, Duration), Error>((latencies, start.elapsed()))
    };

    let (produced, consumed) = tokio::join!(produce, consume);
    let produce_elapsed = produced?;
    let (mut latencies, consume_elapsed) = consumed?;
    consumer.close().await?;
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1e6
    };
    let produce_msgs_per_s = opts.messages as f64 / produce_elapsed.as_secs_f64();
    let baseline = match baseline_dir {
        Some(dir) => Some(fsync_baseline(dir, opts)?),
        None => None,
    };
    Ok(BenchReport {
        messages: opts.messages,
        size: opts.size,
        batch: opts.batch,
        rate: opts.rate,
        produce_msgs_per_s,
        consume_msgs_per_s: opts.messages as f64 / consume_elapsed.as_secs_f64(),
        latency_ms: Latency {
            p50: pct(0.50),
            p99: pct(0.99),
            max: pct(1.0),
        },
        baseline_fsync_msgs_per_s: baseline,
        produce_vs_baseline: baseline
            .filter(|_| opts.rate.is_none())
            .map(|b| produce_msgs_per_s / b),
    })
}

/// Waits until the consumer owns every partition of the (still empty) bench topic, then
/// sends one record through, so the figures measure the pipeline rather than the group join
/// and the producer's first connection (seconds on Kafka).
async fn warm_up<C: Consumer, P: Producer>(
    consumer: &mut C,
    producer: &P,
    topic: &str,
    partitions: u32,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let stuck = |what: &str| Error::Fatal(format!("the bench warm-up timed out: {what}"));
    while consumer.assignment().len() < partitions as usize {
        if Instant::now() > deadline {
            return Err(stuck(
                "the consumer did not get its partitions within a minute",
            ));
        }
        if !consumer
            .poll(1, Duration::from_millis(100))
            .await?
            .is_empty()
        {
            return Err(Error::Fatal(format!("bench topic {topic:?} is not empty")));
        }
    }
    // One record per partition: the producer's first write to a partition is slow too.
    let mut keys = BTreeMap::new();
    for i in 0.. {
        let key = format!("warm-up-{i}").into_bytes();
        keys.entry(crate::partition_for(&key, partitions))
            .or_insert(key);
        if keys.len() == partitions as usize {
            break;
        }
    }
    let records = keys
        .into_values()
        .map(|key| Record {
            key: Some(key),
            value: vec![0; 8],
            ..Record::default()
        })
        .collect();
    producer.send(topic, records).await?;
    let mut received = 0;
    while received < partitions {
        if Instant::now() > deadline {
            return Err(stuck(
                "the warm-up records did not come back within a minute",
            ));
        }
        for m in consumer
            .poll(partitions as usize, Duration::from_millis(100))
            .await?
        {
            consumer.store(&m.topic_partition(), m.offset + 1)?;
            received += 1;
        }
    }
    consumer.commit().await
}

/// The disk's rate for the bench's bytes: one file, one write and one fdatasync per batch.
fn fsync_baseline(dir: &Path, opts: &BenchOptions) -> Result<f64> {
    let path = dir.join(format!("bench-baseline-{}.bin", std::process::id()));
    let mut file = File::create(&path).map_err(io(&path))?;
    let chunk = vec![b'x'; opts.size * opts.batch];
    let start = Instant::now();
    let mut written = 0u64;
    while written < opts.messages {
        let n = (opts.messages - written).min(opts.batch as u64) as usize;
        file.write_all(&chunk[..n * opts.size]).map_err(io(&path))?;
        file.sync_data().map_err(io(&path))?;
        written += n as u64;
    }
    let rate = opts.messages as f64 / start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path).map_err(io(&path))?;
    Ok(rate)
}
