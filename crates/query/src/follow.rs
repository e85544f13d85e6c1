//! Loading the hot tables and keeping them current.
//!
//! The load reads the store's read models and the projector's input offsets in one snapshot;
//! the offsets say exactly which events the snapshot reflects. The follower then reads the
//! events topics from those offsets on (a consumer group of its own that never commits), and
//! applies what the projector would: messages below the offsets are already in the snapshot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sluice_log::{Consumer, Log, SeekTo, TopicPartition};
use sluice_projector::{Projected, project};
use sluice_schemas::{EventCodec, SchemaSource};
use sluice_store::{Column, ColumnType, Filter, Op, Select, Store, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::hot::{Hot, HotReading, Latest, METRICS};

/// What the follower did, and which projection version is served.
#[derive(Debug, Default)]
pub struct FollowStats {
    /// The projection version served.
    pub version: AtomicI32,
    /// Checks of the live projection version done while serving, failed ones included.
    pub version_checks: AtomicU64,
    /// Readings loaded from the store for the version served, at start or at its switch.
    pub loaded: AtomicU64,
    /// Messages applied from the stream.
    pub applied: AtomicU64,
    /// Messages below the snapshot's offsets, skipped.
    pub skipped: AtomicU64,
    /// Messages that could not be decoded or projected (the projector dead-letters them).
    pub unreadable: AtomicU64,
}

/// Next offset per partition that the snapshot does not reflect yet.
pub type Floors = HashMap<TopicPartition, i64>;

fn select(table: &str, cols: &[(&str, ColumnType)], filters: Vec<Filter>) -> Select {
    Select {
        table: table.into(),
        columns: cols.iter().map(|(c, t)| ((*c).to_owned(), *t)).collect(),
        filters,
        limit: None,
    }
}

fn version_filter(version: i32) -> Filter {
    Filter {
        column: "version".into(),
        op: Op::Eq,
        value: Value::Int(i64::from(version)),
    }
}

fn texts(c: Column) -> Vec<Option<String>> {
    match c {
        Column::Text(v) => v,
        _ => Vec::new(),
    }
}

fn ints(c: Column) -> Vec<Option<i64>> {
    match c {
        Column::Int(v) | Column::Timestamp(v) => v,
        _ => Vec::new(),
    }
}

fn floats(c: Column) -> Vec<Option<f64>> {
    match c {
        Column::Float(v) => v,
        _ => Vec::new(),
    }
}

/// Loads `hot` from one snapshot of projection `version` and returns the offsets of
/// `projector_group` that the snapshot reflects.
pub async fn load(
    hot: &Hot,
    store: &Store,
    version: i32,
    projector_group: &str,
    now: DateTime<Utc>,
) -> sluice_store::Result<Floors> {
    let since = DateTime::from_timestamp_micros(hot.cutoff(now)).unwrap_or(now);
    let mut reading_cols = vec![
        ("event_id", ColumnType::Uuid),
        ("device_id", ColumnType::Text),
        ("at", ColumnType::Timestamp),
        ("ingested_at", ColumnType::Timestamp),
        ("seq", ColumnType::Int),
    ];
    reading_cols.extend(METRICS.iter().map(|m| (*m, ColumnType::Float)));
    let snapshot = store
        .select_snapshot(&[
            select(
                "consumer_offsets",
                &[
                    ("topic", ColumnType::Text),
                    ("partition", ColumnType::Int),
                    ("next_offset", ColumnType::Int),
                ],
                vec![Filter {
                    column: "group_id".into(),
                    op: Op::Eq,
                    value: Value::Text(projector_group.into()),
                }],
            ),
            select(
                "device_latest",
                &[
                    ("device_id", ColumnType::Text),
                    ("last_seen", ColumnType::Timestamp),
                    ("reading_at", ColumnType::Timestamp),
                    ("reading_event_id", ColumnType::Uuid),
                    ("reading", ColumnType::Json),
                    ("status", ColumnType::Text),
                    ("status_reason", ColumnType::Text),
                    ("status_at", ColumnType::Timestamp),
                    ("status_event_id", ColumnType::Uuid),
                    ("late_readings", ColumnType::Int),
                ],
                vec![version_filter(version)],
            ),
            select(
                "readings",
                &reading_cols,
                vec![
                    version_filter(version),
                    Filter {
                        column: "at".into(),
                        op: Op::GtEq,
                        value: Value::Timestamp(since),
                    },
                ],
            ),
        ])
        .await?;
    let mut it = snapshot.into_iter();
    let mut next = || it.next().unwrap_or_default();

    let mut offsets = next().into_iter();
    let (topics, partitions, nexts) = (
        texts(offsets.next().unwrap_or(Column::Text(vec![]))),
        ints(offsets.next().unwrap_or(Column::Int(vec![]))),
        ints(offsets.next().unwrap_or(Column::Int(vec![]))),
    );
    let mut floors = Floors::new();
    for ((t, p), n) in topics.into_iter().zip(partitions).zip(nexts) {
        if let (Some(t), Some(p), Some(n)) = (t, p, n) {
            floors.insert(TopicPartition::new(&t, p as i32), n);
        }
    }

    let mut c = next().into_iter();
    let mut col = || c.next().unwrap_or(Column::Text(vec![]));
    let (
        devices,
        last_seen,
        reading_at,
        reading_id,
        reading,
        status,
        reason,
        status_at,
        status_id,
        late,
    ) = (
        texts(col()),
        ints(col()),
        ints(col()),
        texts(col()),
        texts(col()),
        texts(col()),
        texts(col()),
        ints(col()),
        texts(col()),
        ints(col()),
    );
    let mut latest = Vec::with_capacity(devices.len());
    for i in 0..devices.len() {
        let Some(device) = devices[i].clone() else {
            continue;
        };
        let uuid = |s: &Option<String>| s.as_deref().and_then(|s| Uuid::parse_str(s).ok());
        let values: [Option<f64>; 5] = match reading[i]
            .as_deref()
            .map(serde_json::from_str::<serde_json::Value>)
        {
            Some(Ok(v)) => METRICS.map(|m| v.get(m).and_then(serde_json::Value::as_f64)),
            _ => [None; 5],
        };
        latest.push((
            device,
            Latest {
                last_seen: last_seen[i].unwrap_or(i64::MIN),
                reading: reading_at[i]
                    .zip(uuid(&reading_id[i]))
                    .map(|(at, id)| (at, id, values)),
                status: match (status_at[i], uuid(&status_id[i]), status[i].clone()) {
                    (Some(at), Some(id), Some(s)) => Some((at, id, s, reason[i].clone())),
                    _ => None,
                },
                late_readings: late[i].unwrap_or(0),
            },
        ));
    }

    let mut c = next().into_iter();
    let mut col = || c.next().unwrap_or(Column::Text(vec![]));
    let (ids, devs, at, ingested, seq) = (
        texts(col()),
        texts(col()),
        ints(col()),
        ints(col()),
        ints(col()),
    );
    let metrics: Vec<Vec<Option<f64>>> = (0..METRICS.len()).map(|_| floats(col())).collect();
    let mut readings = Vec::with_capacity(ids.len());
    for i in 0..ids.len() {
        let (Some(id), Some(device), Some(at)) = (
            ids[i].as_deref().and_then(|s| Uuid::parse_str(s).ok()),
            devs[i].clone(),
            at[i],
        ) else {
            continue;
        };
        readings.push(HotReading {
            event_id: id,
            device_id: device,
            at,
            ingested_at: ingested[i].unwrap_or(at),
            seq: seq[i],
            metrics: std::array::from_fn(|m| metrics[m].get(i).copied().flatten()),
        });
    }
    hot.load(latest, readings, now);
    Ok(floors)
}

/// Follows `inputs` into `hot` until `shutdown`, starting at `floors`. Outages are waited
/// out; a message that cannot be read is skipped (the projector dead-letters it).
pub async fn follow<L: Log, S: SchemaSource>(
    log: &L,
    inputs: &[String],
    codec: &EventCodec<S>,
    hot: &Hot,
    floors: &Floors,
    stats: &FollowStats,
    shutdown: CancellationToken,
) -> Result<(), sluice_log::Error> {
    // A group of its own that never commits: every instance reads every partition.
    let group = format!("sluice-query-{}", Uuid::new_v4().simple());
    let topics: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let mut consumer = log.consumer(&group, &topics)?;
    let mut sought: Vec<TopicPartition> = Vec::new();
    while !shutdown.is_cancelled() {
        let polled = tokio::select! {
            polled = consumer.poll(2000, Duration::from_millis(200)) => polled,
            () = shutdown.cancelled() => break,
        };
        let batch = match polled {
            Ok(b) => b,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "query follower: poll failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => break,
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        for tp in consumer.assignment() {
            if !sought.contains(&tp) {
                if let Some(&floor) = floors.get(&tp)
                    && let Err(e) = consumer.seek(&tp, SeekTo::Offset(floor)).await
                {
                    // Not fatal: messages below the floor are skipped anyway.
                    tracing::debug!(partition = %tp, error = %e, "query follower: seek failed");
                }
                sought.push(tp);
            }
        }
        let mut readings = Vec::new();
        let mut statuses = Vec::new();
        for msg in batch {
            let tp = msg.topic_partition();
            if msg.offset < floors.get(&tp).copied().unwrap_or(0) {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let event = loop {
                match codec.decode(&msg.value).await {
                    Err(sluice_schemas::Error::Remote(e)) => {
                        tracing::warn!(error = %e, "query follower: schema registry unreachable; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = shutdown.cancelled() => return Ok(()),
                        }
                    }
                    other => break other,
                }
            };
            match event.map_err(|e| e.to_string()).and_then(|e| project(&e)) {
                Ok(Projected::Reading(r)) => readings.push(*r),
                Ok(Projected::Status(s)) => statuses.push(s),
                // Anomalies are served from the store, not kept hot.
                Ok(Projected::Other | Projected::Anomaly(_) | Projected::NormalScore) => {}
                Err(_) => {
                    stats.unreadable.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            stats.applied.fetch_add(1, Ordering::Relaxed);
        }
        if !readings.is_empty() || !statuses.is_empty() {
            hot.apply(&readings, &statuses, Utc::now());
        } else {
            hot.evict(Utc::now());
        }
    }
    if let Err(e) = consumer.close().await {
        tracing::debug!(error = %e, "query follower: close");
    }
    Ok(())
}
