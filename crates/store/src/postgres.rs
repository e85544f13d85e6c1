//! The store on PostgreSQL: one statement per table per batch (`unnest` of array binds), the
//! event store range-partitioned by `ingested_at` (event-id uniqueness in `event_ids`), the
//! projector's `readings` range-partitioned by device time `at`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sluice_core::{EventType, Metadata};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Connection, QueryBuilder, Row};
use uuid::Uuid;

use crate::error::db;
use crate::keys::{ApiKey, StoredKey};
use crate::model::{
    AppendBatch, AppendOutcome, ConsumerOffset, DlqCount, DlqEntry, DlqFilter, DlqStatus,
    EventQuery, MaintainReport, OutboxEntry, PartitionInfo, StoredEvent,
};
use crate::prepare::{DeadRow, EventRow, Prepared, from_micros, micros};
use crate::{Error, ListenerInner, OUTBOX_CHANNEL, OutboxListener, Result, StoreOptions};

mod actions;
mod ops;
mod projections;

static MIGRATOR: Migrator = sqlx::migrate!("../../sql/postgres");

/// Serialises partition changes between processes ("sluice" in ASCII, then 1).
const PARTITION_LOCK: i64 = 0x736c_7569_6365_0001;

/// How long partition changes wait for the table lock before giving up (and leaving appends
/// to the default partition): a long-running reader must not stall every append behind us.
const PARTITION_LOCK_TIMEOUT: &str = "5s";

const EVENT_COLUMNS: &str =
    "position, event_id, event_type, aggregate_id, occurred_at, ingested_at, payload, metadata";

const DLQ_COLUMNS: &str = "dlq_id, processor, event_id, source_topic, source_partition, \
     source_offset, schema_id, raw, decoded, error_class, error_message, failed_at, attempts, \
     status, status_changed_by, status_changed_at, raw_key, headers, reason";

const KEY_COLUMNS: &str = "id, name, role, salt, hash, created_at, revoked_at";

/// Claims the ids not yet stored and gives each a position, in batch order. Rows are inserted
/// in id order so that concurrent batches sharing ids lock them in the same order (no
/// deadlock); positions were drawn before that sort, in the order of the batch.
const INSERT_IDS: &str = "
INSERT INTO event_ids (event_id, ingested_at, position)
SELECT s.event_id, s.ingested_at, s.position
FROM (
    SELECT u.event_id, u.ingested_at, nextval('events_position_seq') AS position
    FROM unnest($1::uuid[], $2::timestamptz[]) WITH ORDINALITY AS u(event_id, ingested_at, ord)
    ORDER BY u.ord
) AS s
ORDER BY s.event_id
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id, position";

const INSERT_EVENTS: &str = "
INSERT INTO events (position, event_id, event_type, aggregate_id, occurred_at, ingested_at,
                    payload, metadata, schema_version)
SELECT u.position, u.event_id, u.event_type, u.aggregate_id, u.occurred_at, u.ingested_at,
       u.payload::jsonb, u.metadata::jsonb, u.schema_version
FROM unnest($1::int8[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[],
            $6::timestamptz[], $7::text[], $8::text[], $9::int8[])
     AS u(position, event_id, event_type, aggregate_id, occurred_at, ingested_at, payload,
          metadata, schema_version)";

/// Outbox ids are drawn in batch order (the relay publishes in id order).
const INSERT_OUTBOX: &str = "
INSERT INTO outbox (event_id, aggregate_id, topic, key, value)
SELECT u.event_id, u.aggregate_id, u.topic, u.key, u.value
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::bytea[])
     WITH ORDINALITY AS u(event_id, aggregate_id, topic, key, value, ord)
ORDER BY u.ord";

const INSERT_DLQ: &str = "
INSERT INTO dlq (processor, event_id, source_topic, source_partition, source_offset, schema_id,
                 raw, decoded, error_class, error_message, failed_at, attempts, raw_key, headers)
SELECT u.processor, u.event_id, u.topic, u.partition, u.off, u.schema_id, u.raw,
       u.decoded::jsonb, u.error_class, u.error_message, u.failed_at, u.attempts, u.raw_key,
       u.headers::jsonb
FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int4[], $5::int8[], $6::int8[],
            $7::bytea[], $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::int4[],
            $13::bytea[], $14::text[])
     WITH ORDINALITY AS u(processor, event_id, topic, partition, off, schema_id, raw, decoded,
                          error_class, error_message, failed_at, attempts, raw_key, headers,
                          ord)
ORDER BY u.ord
RETURNING dlq_id";

const UPSERT_OFFSETS: &str = "
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, updated_at)
SELECT u.group_id, u.topic, u.partition, u.next_offset, now()
FROM unnest($1::text[], $2::text[], $3::int4[], $4::int8[])
     AS u(group_id, topic, partition, next_offset)
ON CONFLICT (group_id, topic, partition)
DO UPDATE SET next_offset = excluded.next_offset, updated_at = excluded.updated_at";

/// The range partitions of a table (`$1`) with their bounds, read from the catalog (the catalog
/// is the only record, so nothing can drift).
const LIST_PARTITIONS: &str = r"
SELECT c.relname::text AS name, b[1]::timestamptz AS lo, b[2]::timestamptz AS hi
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
LEFT JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                               'FROM \(''([^'']*)''\) TO \(''([^'']*)''\)') AS b ON true
WHERE i.inhparent = $1::regclass
ORDER BY lo NULLS FIRST, name";

/// The anomalies older than `$1` (device time). Per version, so that the (version, at) index
/// serves the range: the versions are found by a loose index scan of the primary key (one
/// probe per version; Postgres 15 has no skip scan), not by reading the table.
const DELETE_OLD_ANOMALIES: &str = "
WITH RECURSIVE versions(version) AS (
    (SELECT version FROM anomalies ORDER BY version LIMIT 1)
    UNION ALL
    SELECT (SELECT a.version FROM anomalies a WHERE a.version > v.version
            ORDER BY a.version LIMIT 1)
    FROM versions v
    WHERE v.version IS NOT NULL
)
DELETE FROM anomalies
WHERE version IN (SELECT version FROM versions WHERE version IS NOT NULL) AND at < $1";

/// A time-partitioned table. Its partitions are aligned intervals of `partition_interval`;
/// a default partition catches rows no range partition covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Partitioned {
    /// The event store, by `ingested_at`.
    Events,
    /// The projector's readings, by device time `at`.
    Readings,
}

impl Partitioned {
    /// The table (fixed names: safe to format into SQL).
    fn table(self) -> &'static str {
        match self {
            Partitioned::Events => "events",
            Partitioned::Readings => "readings",
        }
    }

    /// The partition key column.
    fn column(self) -> &'static str {
        match self {
            Partitioned::Events => "ingested_at",
            Partitioned::Readings => "at",
        }
    }

    fn default_partition(self) -> &'static str {
        match self {
            Partitioned::Events => "events_default",
            Partitioned::Readings => "readings_default",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A range partition, bounds in microseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    name: String,
    from: i64,
    to: i64,
}

#[derive(Debug, Clone)]
pub(crate) struct PgStore {
    pool: PgPool,
    opts: StoreOptions,
    /// Per [`Partitioned`] table, the range partitions this process knows of, sorted; only a
    /// hint for when to create partitions on demand (a row outside them still lands in the
    /// default partition).
    ranges: Arc<Mutex<[Vec<Range>; 2]>>,
}

impl PgStore {
    /// The pool, for reads built elsewhere in the crate.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn connect(url: &str, opts: StoreOptions) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::InvalidUrl {
                url: redact(url),
                reason: e.to_string(),
            })?
            .application_name("sluice");
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("(default database)")
        );
        // One direct connection first: the pool would retry a refused connection until its
        // timeout and then report only "timed out"; this says what is wrong.
        let probe =
            tokio::time::timeout(opts.acquire_timeout, PgConnection::connect_with(&options))
                .await
                .map_err(|_| Error::Transient {
                    op: "connect",
                    source: format!(
                        "PostgreSQL at {target} did not answer within {:?}",
                        opts.acquire_timeout
                    )
                    .into(),
                })?
                .map_err(|e| {
                    let transient = Error::db("connect", e);
                    let source = match &transient {
                        Error::Transient { source, .. } | Error::Fatal { source, .. } => {
                            format!("cannot connect to PostgreSQL at {target}: {source}")
                        }
                        other => other.to_string(),
                    };
                    if transient.is_transient() {
                        Error::Transient {
                            op: "connect",
                            source: source.into(),
                        }
                    } else {
                        Error::Fatal {
                            op: "connect",
                            source: source.into(),
                        }
                    }
                })?;
        let _ = probe.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(opts.pool_size)
            .acquire_timeout(opts.acquire_timeout)
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            opts,
            ranges: Arc::default(),
        })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(db("migrate"))?;
        // `run_direct` rather than `run`: `run`'s `Acquire` bound makes the future not
        // provably `Send` (sqlx's own comment on `run_direct` says so).
        MIGRATOR
            .run_direct(&mut *conn)
            .await
            .map_err(Error::migrate)?;
        drop(conn);
        for table in [Partitioned::Events, Partitioned::Readings] {
            self.partition_tx(table, self.wanted(Utc::now()), None)
                .await?;
        }
        Ok(())
    }

    // ---- partitions -----------------------------------------------------------------------

    fn interval_us(&self) -> i64 {
        i64::try_from(self.opts.partition_interval.as_micros()).unwrap_or(i64::MAX)
    }

    fn retention_us(&self) -> i64 {
        i64::try_from(self.opts.retention.as_micros()).unwrap_or(i64::MAX)
    }

    /// The aligned interval holding `us`.
    fn interval_of(&self, us: i64) -> (i64, i64) {
        let iv = self.interval_us();
        let from = us.div_euclid(iv) * iv;
        (from, from.saturating_add(iv))
    }

    /// A time in each partition interval from `lo` to `hi`, for [`Self::ensure_partitions`].
    pub(crate) fn intervals_between(
        &self,
        lo: DateTime<Utc>,
        hi: DateTime<Utc>,
    ) -> impl Iterator<Item = DateTime<Utc>> + use<> {
        let iv = self.interval_us();
        let (lo, hi) = (micros(lo), micros(hi));
        let first = lo.div_euclid(iv) * iv;
        (0..)
            .map(move |i: i64| first.saturating_add(i.saturating_mul(iv)))
            .take_while(move |t| *t <= hi)
            .map(move |t| DateTime::from_timestamp_micros(t.max(lo)).unwrap_or_default())
    }

    /// The current interval and `partitions_ahead` more.
    fn wanted(&self, now: DateTime<Utc>) -> Vec<(i64, i64)> {
        let (mut from, _) = self.interval_of(micros(now));
        let iv = self.interval_us();
        (0..=self.opts.partitions_ahead)
            .map(|_| {
                let r = (from, from.saturating_add(iv));
                from = r.1;
                r
            })
            .collect()
    }

    /// Intervals that the batch needs and no known partition covers. Only times within
    /// retention of now on either side get a partition on demand; anything else goes to the
    /// default partition rather than littering the table with partitions.
    fn uncovered(
        &self,
        table: Partitioned,
        times: impl Iterator<Item = DateTime<Utc>>,
    ) -> Vec<(i64, i64)> {
        let now = micros(Utc::now());
        let (lo, hi) = (
            now.saturating_sub(self.retention_us()),
            now.saturating_add(self.retention_us()),
        );
        let all = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        let ranges = &all[table.index()];
        let mut out: Vec<(i64, i64)> = Vec::new();
        for t in times {
            let ts = micros(t);
            if ts < lo || ts > hi {
                continue;
            }
            let i = ranges.partition_point(|r| r.from <= ts);
            let covered = i > 0 && ranges[i - 1].to > ts;
            if !covered {
                let iv = self.interval_of(ts);
                if !out.contains(&iv) {
                    out.push(iv);
                }
            }
        }
        out
    }

    /// Creates the partitions in `want` that do not exist yet (moving any rows the default
    /// partition holds for them), and with `cutoff` also applies retention. One transaction,
    /// serialised between processes by an advisory lock.
    async fn partition_tx(
        &self,
        table: Partitioned,
        want: Vec<(i64, i64)>,
        cutoff: Option<i64>,
    ) -> Result<MaintainReport> {
        const OP: &str = "maintain";
        let mut report = MaintainReport::default();
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PARTITION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        let mut ranges = list_ranges(&mut tx, table).await?;

        let mut to_create = Vec::new();
        for (a, b) in want {
            for gap in gaps(a, b, &ranges) {
                if !to_create.contains(&gap) {
                    to_create.push(gap);
                }
            }
        }
        let to_drop: Vec<Range> = match cutoff {
            Some(c) => ranges.iter().filter(|r| r.to <= c).cloned().collect(),
            None => Vec::new(),
        };

        if !to_create.is_empty() || !to_drop.is_empty() {
            // CREATE TABLE .. PARTITION OF and DROP TABLE take this lock anyway; taking it
            // first, with a timeout, orders us before any child lock (no deadlock with
            // appends) and keeps a long reader from stalling appends queued behind us.
            sqlx::query(&format!(
                "SET LOCAL lock_timeout = '{PARTITION_LOCK_TIMEOUT}'"
            ))
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
            sqlx::query(&format!(
                "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                table.table()
            ))
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
            for (from, to) in to_create {
                let name = create_partition(&mut tx, table, from, to).await?;
                ranges.push(Range {
                    name: name.clone(),
                    from,
                    to,
                });
                report.partitions_created.push(name);
            }
            for r in &to_drop {
                sqlx::query(&format!("DROP TABLE {}", quote_ident(&r.name)))
                    .execute(&mut *tx)
                    .await
                    .map_err(db(OP))?;
                report.partitions_dropped.push(r.name.clone());
            }
            ranges.retain(|r| !to_drop.contains(r));
            ranges.sort_by_key(|r| r.from);
        }

        if let Some(cutoff) = cutoff {
            let deleted = sqlx::query(&format!(
                "DELETE FROM {} WHERE {} < $1",
                table.default_partition(),
                table.column()
            ))
            .bind(from_micros(OP, cutoff)?)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?
            .rows_affected();
            if table == Partitioned::Readings {
                report.readings_deleted = deleted;
                tx.commit().await.map_err(db(OP))?;
                self.ranges.lock().unwrap_or_else(|e| e.into_inner())[table.index()] = ranges;
                return Ok(report);
            }
            report.events_deleted = deleted;
            // Every event still stored must keep its id claimed: events at or after the
            // cutoff, and everything in the partitions kept (one may straddle the cutoff).
            let keep_from = ranges.iter().map(|r| r.from).fold(cutoff, i64::min);
            report.event_ids_pruned = sqlx::query("DELETE FROM event_ids WHERE ingested_at < $1")
                .bind(from_micros(OP, keep_from)?)
                .execute(&mut *tx)
                .await
                .map_err(db(OP))?
                .rows_affected();
        }
        tx.commit().await.map_err(db(OP))?;
        self.ranges.lock().unwrap_or_else(|e| e.into_inner())[table.index()] = ranges;
        Ok(report)
    }

    pub async fn maintain(&self, now: DateTime<Utc>) -> Result<MaintainReport> {
        let cutoff = micros(now).saturating_sub(self.retention_us());
        let mut report = self
            .partition_tx(Partitioned::Events, self.wanted(now), Some(cutoff))
            .await?;
        // Apart from the partition transaction, which may hold `events` exclusively.
        (report.actions_deleted, report.action_ledger_deleted) = self
            .delete_finished_actions(from_micros("maintain", cutoff)?)
            .await?;
        Ok(report)
    }

    pub async fn maintain_readings(
        &self,
        now: DateTime<Utc>,
        retention: Duration,
    ) -> Result<MaintainReport> {
        let retention = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
        let cutoff = micros(now).saturating_sub(retention);
        let mut report = self
            .partition_tx(Partitioned::Readings, self.wanted(now), Some(cutoff))
            .await?;
        // Apart from the partition transaction: it may hold `readings` exclusively, and
        // deleting anomalies has nothing to do with that lock.
        report.anomalies_deleted = sqlx::query(DELETE_OLD_ANOMALIES)
            .bind(from_micros("maintain_readings", cutoff)?)
            .execute(&self.pool)
            .await
            .map_err(db("maintain_readings"))?
            .rows_affected();
        Ok(report)
    }

    /// Creates, best effort, the partitions of `table` that rows at `times` need and no known
    /// partition covers. Without them the rows land in the default partition, and the next
    /// maintenance moves them: a write must not fail for want of a partition.
    pub(crate) async fn ensure_partitions(
        &self,
        table: Partitioned,
        times: impl Iterator<Item = DateTime<Utc>>,
    ) {
        let missing = self.uncovered(table, times);
        if !missing.is_empty()
            && let Err(e) = self.partition_tx(table, missing, None).await
        {
            tracing::warn!(error = %e, table = table.table(), "could not create partitions on demand");
        }
    }

    pub async fn partitions(&self) -> Result<Vec<PartitionInfo>> {
        let rows = sqlx::query(LIST_PARTITIONS)
            .bind(Partitioned::Events.table())
            .fetch_all(&self.pool)
            .await
            .map_err(db("partitions"))?;
        rows.iter()
            .map(|row| {
                let name: String = row.try_get("name").map_err(db("partitions"))?;
                let lo: Option<DateTime<Utc>> = row.try_get("lo").map_err(db("partitions"))?;
                let hi: Option<DateTime<Utc>> = row.try_get("hi").map_err(db("partitions"))?;
                Ok(PartitionInfo {
                    name,
                    range: lo.zip(hi),
                })
            })
            .collect()
    }

    // ---- append ----------------------------------------------------------------------------

    pub async fn append(
        &self,
        batch: &AppendBatch,
        hold: Option<Duration>,
    ) -> Result<AppendOutcome> {
        const OP: &str = "append";
        let p = Prepared::new(batch)?;
        self.ensure_partitions(Partitioned::Events, p.events.iter().map(|e| e.ingested_at))
            .await;

        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        let mut stored: HashMap<Uuid, i64> = HashMap::new();
        let mut outbox_rows = 0;
        if !p.events.is_empty() {
            let ids: Vec<Uuid> = p.events.iter().map(|r| r.src.event.event_id).collect();
            let ingested: Vec<DateTime<Utc>> = p.events.iter().map(|r| r.ingested_at).collect();
            let claimed: Vec<(Uuid, i64)> = sqlx::query_as(INSERT_IDS)
                .bind(&ids)
                .bind(&ingested)
                .fetch_all(&mut *tx)
                .await
                .map_err(db(OP))?;
            stored = claimed.into_iter().collect();

            let new: Vec<(&EventRow<'_>, i64)> = p
                .events
                .iter()
                .filter_map(|r| stored.get(&r.src.event.event_id).map(|&pos| (r, pos)))
                .collect();
            if !new.is_empty() {
                let ids: Vec<Uuid> = new.iter().map(|(r, _)| r.src.event.event_id).collect();
                let aggregates: Vec<&str> = new
                    .iter()
                    .map(|(r, _)| r.src.event.aggregate_id.as_str())
                    .collect();
                sqlx::query(INSERT_EVENTS)
                    .bind(new.iter().map(|(_, pos)| *pos).collect::<Vec<i64>>())
                    .bind(&ids)
                    .bind(
                        new.iter()
                            .map(|(r, _)| r.src.event.event_type.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(&aggregates)
                    .bind(new.iter().map(|(r, _)| r.occurred_at).collect::<Vec<_>>())
                    .bind(new.iter().map(|(r, _)| r.ingested_at).collect::<Vec<_>>())
                    .bind(
                        new.iter()
                            .map(|(r, _)| r.payload.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        new.iter()
                            .map(|(r, _)| r.metadata.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        new.iter()
                            .map(|(r, _)| r.schema_version)
                            .collect::<Vec<_>>(),
                    )
                    .execute(&mut *tx)
                    .await
                    .map_err(db(OP))?;
                sqlx::query(INSERT_OUTBOX)
                    .bind(&ids)
                    .bind(&aggregates)
                    .bind(
                        new.iter()
                            .map(|(r, _)| r.src.topic.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        new.iter()
                            .map(|(r, _)| r.src.key.as_slice())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        new.iter()
                            .map(|(r, _)| r.src.value.as_slice())
                            .collect::<Vec<_>>(),
                    )
                    .execute(&mut *tx)
                    .await
                    .map_err(db(OP))?;
                outbox_rows = new.len();
            }
        }

        let dead_letter_ids = insert_dead_letters(&mut tx, OP, &p.dead).await?;

        if !p.offsets.is_empty() {
            let o = &p.offsets;
            sqlx::query(UPSERT_OFFSETS)
                .bind(o.iter().map(|x| x.0).collect::<Vec<_>>())
                .bind(o.iter().map(|x| x.1).collect::<Vec<_>>())
                .bind(o.iter().map(|x| x.2).collect::<Vec<_>>())
                .bind(o.iter().map(|x| x.3).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await
                .map_err(db(OP))?;
        }

        if outbox_rows > 0 {
            // Delivered at commit, once per transaction however many rows it wrote.
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(OUTBOX_CHANNEL)
                .execute(&mut *tx)
                .await
                .map_err(db(OP))?;
        }
        if let Some(hold) = hold {
            tokio::time::sleep(hold).await;
        }
        tx.commit().await.map_err(db(OP))?;
        Ok(p.outcome(&stored, dead_letter_ids))
    }

    // ---- offsets and outbox ------------------------------------------------------------------

    pub async fn consumer_offsets(&self, group: &str) -> Result<Vec<ConsumerOffset>> {
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT topic, partition, next_offset FROM consumer_offsets
             WHERE group_id = $1 ORDER BY topic, partition",
        )
        .bind(group)
        .fetch_all(&self.pool)
        .await
        .map_err(db("consumer_offsets"))?;
        Ok(rows
            .into_iter()
            .map(|(topic, partition, next_offset)| ConsumerOffset {
                group: group.to_owned(),
                topic,
                partition,
                next_offset,
            })
            .collect())
    }

    pub async fn outbox_fetch(&self, limit: u32) -> Result<Vec<OutboxEntry>> {
        const OP: &str = "outbox_fetch";
        let rows = sqlx::query(
            "SELECT id, event_id, aggregate_id, topic, key, value, attempts, last_error
             FROM outbox ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?;
        rows.iter()
            .map(|row| {
                Ok(OutboxEntry {
                    id: row.try_get("id").map_err(db(OP))?,
                    event_id: row.try_get("event_id").map_err(db(OP))?,
                    aggregate_id: row.try_get("aggregate_id").map_err(db(OP))?,
                    topic: row.try_get("topic").map_err(db(OP))?,
                    key: row.try_get("key").map_err(db(OP))?,
                    value: row.try_get("value").map_err(db(OP))?,
                    attempts: u32::try_from(row.try_get::<i32, _>("attempts").map_err(db(OP))?)
                        .unwrap_or(0),
                    last_error: row.try_get("last_error").map_err(db(OP))?,
                })
            })
            .collect()
    }

    pub async fn outbox_delete(&self, ids: &[i64]) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(db("outbox_delete"))?
            .rows_affected())
    }

    pub async fn outbox_record_failure(&self, ids: &[i64], error: &str) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1)",
        )
        .bind(ids)
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(db("outbox_record_failure"))?
        .rows_affected())
    }

    pub async fn outbox_depth(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await
            .map_err(db("outbox_depth"))?;
        Ok(n.unsigned_abs())
    }

    pub async fn outbox_listener(&self) -> Result<OutboxListener> {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(db("outbox_listener"))?;
        listener
            .listen(OUTBOX_CHANNEL)
            .await
            .map_err(db("outbox_listener"))?;
        Ok(OutboxListener {
            inner: ListenerInner::Postgres(Box::new(listener)),
        })
    }

    // ---- DLQ ---------------------------------------------------------------------------------

    pub async fn dlq_list(&self, f: &DlqFilter) -> Result<Vec<DlqEntry>> {
        let mut qb = QueryBuilder::new(format!("SELECT {DLQ_COLUMNS} FROM dlq WHERE dlq_id > "));
        qb.push_bind(f.after_id);
        if let Some(p) = &f.processor {
            qb.push(" AND processor = ").push_bind(p);
        }
        if let Some(c) = &f.error_class {
            qb.push(" AND error_class = ").push_bind(c);
        }
        if let Some(s) = f.status {
            qb.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(t) = f.since {
            qb.push(" AND failed_at >= ").push_bind(t);
        }
        if let Some(t) = f.until {
            qb.push(" AND failed_at < ").push_bind(t);
        }
        qb.push(" ORDER BY dlq_id LIMIT ")
            .push_bind(i64::from(f.limit));
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("dlq_list"))?;
        rows.iter().map(dlq_from_row).collect()
    }

    pub async fn dlq_get(&self, id: i64) -> Result<Option<DlqEntry>> {
        let row = sqlx::query(&format!("SELECT {DLQ_COLUMNS} FROM dlq WHERE dlq_id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("dlq_get"))?;
        row.as_ref().map(dlq_from_row).transpose()
    }

    pub async fn dlq_set_status(
        &self,
        ids: &[i64],
        status: DlqStatus,
        who: &str,
        reason: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<Vec<i64>> {
        const OP: &str = "dlq_set_status";
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        let mut changed: Vec<i64> = sqlx::query_scalar(
            "UPDATE dlq SET status = $1, status_changed_by = $2, status_changed_at = $3,
                            reason = coalesce($5, reason)
             WHERE dlq_id = ANY($4) AND status = 'pending'
             RETURNING dlq_id",
        )
        .bind(status.as_str())
        .bind(who)
        .bind(at)
        .bind(ids)
        .bind(reason)
        .fetch_all(&mut *tx)
        .await
        .map_err(db(OP))?;
        changed.sort_unstable();
        let action = format!("dlq.{}", crate::ops::dlq_verb(status));
        let detail = serde_json::json!({ "reason": reason }).to_string();
        sqlx::query(
            "INSERT INTO audit_log (at, who, action, target, detail)
             SELECT $1, $2, $3, 'dlq:' || u.id, $5::jsonb FROM unnest($4::int8[]) AS u(id)",
        )
        .bind(at)
        .bind(who)
        .bind(&action)
        .bind(&changed)
        .bind(&detail)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        tx.commit().await.map_err(db(OP))?;
        Ok(changed)
    }

    pub async fn dlq_counts(&self) -> Result<Vec<DlqCount>> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT processor, error_class, status, count(*) FROM dlq
             GROUP BY processor, error_class, status ORDER BY processor, error_class, status",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("dlq_counts"))?;
        rows.into_iter()
            .map(|(processor, error_class, status, count)| {
                Ok(DlqCount {
                    processor,
                    error_class,
                    status: status
                        .parse()
                        .map_err(|e: String| Error::corrupt("dlq_counts", e))?,
                    count: count.unsigned_abs(),
                })
            })
            .collect()
    }

    // ---- API keys ----------------------------------------------------------------------------

    pub async fn insert_api_key(&self, k: &StoredKey) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, role, salt, hash, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&k.key.id)
        .bind(k.key.name.as_deref())
        .bind(k.key.role.as_str())
        .bind(&k.salt)
        .bind(&k.hash)
        .bind(k.key.created_at)
        .execute(&self.pool)
        .await
        .map_err(db("create_api_key"))?;
        Ok(())
    }

    pub async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db("list_api_keys"))?;
        rows.iter()
            .map(|row| key_from_row(row).map(|k| k.key))
            .collect()
    }

    pub async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool> {
        let n =
            sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .bind(at)
                .execute(&self.pool)
                .await
                .map_err(db("revoke_api_key"))?
                .rows_affected();
        Ok(n > 0)
    }

    pub async fn api_key(&self, id: &str) -> Result<Option<StoredKey>> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("verify_api_key"))?;
        row.as_ref().map(key_from_row).transpose()
    }

    // ---- reads -------------------------------------------------------------------------------

    pub async fn event_count(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .map_err(db("event_count"))?;
        Ok(n.unsigned_abs())
    }

    pub async fn event_by_id(&self, id: Uuid) -> Result<Option<StoredEvent>> {
        // `event_ids` gives the partition key and the position, so this reads one partition
        // through its position index instead of every partition.
        let row = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE position = (SELECT position FROM event_ids WHERE event_id = $1)
               AND ingested_at = (SELECT ingested_at FROM event_ids WHERE event_id = $1)
               AND event_id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("event_by_id"))?;
        row.as_ref().map(event_from_row).transpose()
    }

    pub async fn events_in_range(&self, q: &EventQuery) -> Result<Vec<StoredEvent>> {
        let mut qb = QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM events"));
        event_filters(&mut qb, q);
        qb.push(" ORDER BY position LIMIT ")
            .push_bind(i64::from(q.limit));
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("events_in_range"))?;
        rows.iter().map(event_from_row).collect()
    }
}

impl PgStore {
    pub async fn last_position(&self) -> Result<i64> {
        let n: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events")
            .fetch_one(&self.pool)
            .await
            .map_err(db("last_position"))?;
        Ok(n.unwrap_or(0))
    }

    pub async fn count_events(&self, q: &EventQuery) -> Result<u64> {
        let mut qb = QueryBuilder::new("SELECT count(*) FROM events");
        event_filters(&mut qb, q);
        let n: i64 = qb
            .build_query_scalar()
            .fetch_one(&self.pool)
            .await
            .map_err(db("count_events"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// ` WHERE ...` of an event query, without its order and limit.
fn event_filters(qb: &mut QueryBuilder<'_, sqlx::Postgres>, q: &EventQuery) {
    qb.push(" WHERE position > ").push_bind(q.after_position);
    if let Some(t) = q.from {
        qb.push(" AND ingested_at >= ").push_bind(t);
    }
    if let Some(t) = q.to {
        qb.push(" AND ingested_at < ").push_bind(t);
    }
    if !q.event_types.is_empty() {
        let types: Vec<String> = q
            .event_types
            .iter()
            .map(|t| t.as_str().to_owned())
            .collect();
        qb.push(" AND event_type = ANY(").push_bind(types).push(")");
    }
    if !q.aggregate_ids.is_empty() {
        qb.push(" AND aggregate_id = ANY(")
            .push_bind(q.aggregate_ids.clone())
            .push(")");
    }
}

/// Inserts dead letters in order (one statement); returns their ids.
async fn insert_dead_letters(
    conn: &mut PgConnection,
    op: &'static str,
    d: &[DeadRow<'_>],
) -> Result<Vec<i64>> {
    if d.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(INSERT_DLQ)
        .bind(
            d.iter()
                .map(|r| r.letter.processor.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(d.iter().map(|r| r.letter.event_id).collect::<Vec<_>>())
        .bind(
            d.iter()
                .map(|r| r.letter.topic.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(d.iter().map(|r| r.letter.partition).collect::<Vec<_>>())
        .bind(d.iter().map(|r| r.letter.offset).collect::<Vec<_>>())
        .bind(d.iter().map(|r| r.schema_id).collect::<Vec<_>>())
        .bind(
            d.iter()
                .map(|r| r.letter.raw.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(d.iter().map(|r| r.decoded.as_deref()).collect::<Vec<_>>())
        .bind(d.iter().map(|r| r.letter.error_class).collect::<Vec<_>>())
        .bind(
            d.iter()
                .map(|r| r.letter.error_message.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(d.iter().map(|r| r.failed_at).collect::<Vec<_>>())
        .bind(d.iter().map(|r| r.attempts).collect::<Vec<_>>())
        .bind(
            d.iter()
                .map(|r| r.letter.key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(d.iter().map(|r| r.headers.as_str()).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await
        .map_err(db(op))
}

async fn list_ranges(conn: &mut PgConnection, table: Partitioned) -> Result<Vec<Range>> {
    const OP: &str = "maintain";
    let rows = sqlx::query(LIST_PARTITIONS)
        .bind(table.table())
        .fetch_all(&mut *conn)
        .await
        .map_err(db(OP))?;
    let mut out = Vec::new();
    for row in rows {
        let lo: Option<DateTime<Utc>> = row.try_get("lo").map_err(db(OP))?;
        let hi: Option<DateTime<Utc>> = row.try_get("hi").map_err(db(OP))?;
        if let (Some(lo), Some(hi)) = (lo, hi) {
            out.push(Range {
                name: row.try_get("name").map_err(db(OP))?,
                from: micros(lo),
                to: micros(hi),
            });
        }
    }
    out.sort_by_key(|r| r.from);
    Ok(out)
}

/// The parts of `[a, b)` that no range covers.
fn gaps(a: i64, b: i64, ranges: &[Range]) -> Vec<(i64, i64)> {
    let mut sorted: Vec<&Range> = ranges.iter().collect();
    sorted.sort_by_key(|r| r.from);
    let mut out = Vec::new();
    let mut cursor = a;
    for r in sorted {
        if r.to <= cursor {
            continue;
        }
        if r.from >= b {
            break;
        }
        if r.from > cursor {
            out.push((cursor, r.from));
        }
        cursor = cursor.max(r.to);
        if cursor >= b {
            break;
        }
    }
    if cursor < b {
        out.push((cursor, b));
    }
    out
}

/// Creates the partition `[from, to)` of `table`; rows the default partition holds for that
/// range move into it (Postgres refuses to create a partition the default partition has rows
/// for). The caller holds the table lock, so no write can slip a row in meanwhile.
async fn create_partition(
    conn: &mut PgConnection,
    table: Partitioned,
    from: i64,
    to: i64,
) -> Result<String> {
    const OP: &str = "maintain";
    let (lo, hi) = (from_micros(OP, from)?, from_micros(OP, to)?);
    let (t, col, default) = (table.table(), table.column(), table.default_partition());
    let name = format!("{t}_p{}", lo.format("%Y%m%d_%H%M%S"));
    let moving: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {default} WHERE {col} >= $1 AND {col} < $2)"
    ))
    .bind(lo)
    .bind(hi)
    .fetch_one(&mut *conn)
    .await
    .map_err(db(OP))?;
    if moving {
        sqlx::query(&format!(
            "CREATE TEMP TABLE sluice_moving (LIKE {t}) ON COMMIT DROP"
        ))
        .execute(&mut *conn)
        .await
        .map_err(db(OP))?;
        sqlx::query(&format!(
            "WITH moved AS (DELETE FROM {default} WHERE {col} >= $1 AND {col} < $2 RETURNING *)
             INSERT INTO sluice_moving SELECT * FROM moved"
        ))
        .bind(lo)
        .bind(hi)
        .execute(&mut *conn)
        .await
        .map_err(db(OP))?;
    }
    // Bounds are literals (DDL takes no parameters); they are formatted from integers here.
    let ddl = format!(
        "CREATE TABLE {} PARTITION OF {t} FOR VALUES FROM ('{}') TO ('{}')",
        quote_ident(&name),
        lo.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        hi.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    );
    sqlx::query(&ddl)
        .execute(&mut *conn)
        .await
        .map_err(db(OP))?;
    if moving {
        for sql in [
            format!("INSERT INTO {t} SELECT * FROM sluice_moving"),
            "DROP TABLE sluice_moving".to_owned(),
        ] {
            sqlx::query(&sql)
                .execute(&mut *conn)
                .await
                .map_err(db(OP))?;
        }
    }
    Ok(name)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        _ => url.to_owned(),
    }
}

fn event_from_row(row: &PgRow) -> Result<StoredEvent> {
    const OP: &str = "read events";
    let event_type: String = row.try_get("event_type").map_err(db(OP))?;
    let Json(payload): Json<serde_json::Value> = row.try_get("payload").map_err(db(OP))?;
    let Json(metadata): Json<Metadata> = row.try_get("metadata").map_err(db(OP))?;
    Ok(StoredEvent {
        position: row.try_get("position").map_err(db(OP))?,
        event: sluice_core::Event {
            event_id: row.try_get("event_id").map_err(db(OP))?,
            event_type: EventType::new(event_type)
                .map_err(|e| Error::corrupt(OP, e.to_string()))?,
            aggregate_id: row.try_get("aggregate_id").map_err(db(OP))?,
            occurred_at: row.try_get("occurred_at").map_err(db(OP))?,
            ingested_at: row.try_get("ingested_at").map_err(db(OP))?,
            payload,
            metadata,
        },
    })
}

fn dlq_from_row(row: &PgRow) -> Result<DlqEntry> {
    const OP: &str = "read dlq";
    let schema_id: Option<i64> = row.try_get("schema_id").map_err(db(OP))?;
    let decoded: Option<Json<serde_json::Value>> = row.try_get("decoded").map_err(db(OP))?;
    let status: String = row.try_get("status").map_err(db(OP))?;
    Ok(DlqEntry {
        dlq_id: row.try_get("dlq_id").map_err(db(OP))?,
        processor: row.try_get("processor").map_err(db(OP))?,
        event_id: row.try_get("event_id").map_err(db(OP))?,
        topic: row.try_get("source_topic").map_err(db(OP))?,
        partition: row.try_get("source_partition").map_err(db(OP))?,
        offset: row.try_get("source_offset").map_err(db(OP))?,
        schema_id: schema_id
            .map(u32::try_from)
            .transpose()
            .map_err(|e| Error::corrupt(OP, e.to_string()))?,
        raw: row.try_get("raw").map_err(db(OP))?,
        decoded: decoded.map(|Json(v)| v),
        error_class: row.try_get("error_class").map_err(db(OP))?,
        error_message: row.try_get("error_message").map_err(db(OP))?,
        failed_at: row.try_get("failed_at").map_err(db(OP))?,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts").map_err(db(OP))?).unwrap_or(0),
        status: status.parse().map_err(|e: String| Error::corrupt(OP, e))?,
        status_changed_by: row.try_get("status_changed_by").map_err(db(OP))?,
        status_changed_at: row.try_get("status_changed_at").map_err(db(OP))?,
        key: row.try_get("raw_key").map_err(db(OP))?,
        headers: {
            let Json(pairs): Json<Vec<(String, String)>> =
                row.try_get("headers").map_err(db(OP))?;
            pairs
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect()
        },
        reason: row.try_get("reason").map_err(db(OP))?,
    })
}

fn key_from_row(row: &PgRow) -> Result<StoredKey> {
    const OP: &str = "read api_keys";
    let role: String = row.try_get("role").map_err(db(OP))?;
    Ok(StoredKey {
        key: ApiKey {
            id: row.try_get("id").map_err(db(OP))?,
            name: row.try_get("name").map_err(db(OP))?,
            role: role.parse().map_err(|e: String| Error::corrupt(OP, e))?,
            created_at: row.try_get("created_at").map_err(db(OP))?,
            revoked_at: row.try_get("revoked_at").map_err(db(OP))?,
        },
        salt: row.try_get("salt").map_err(db(OP))?,
        hash: row.try_get("hash").map_err(db(OP))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(from: i64, to: i64) -> Range {
        Range {
            name: format!("p{from}"),
            from,
            to,
        }
    }

    #[test]
    fn gaps_subtract_existing_ranges() {
        assert_eq!(gaps(0, 10, &[]), vec![(0, 10)]);
        assert_eq!(gaps(0, 10, &[r(0, 10)]), vec![]);
        assert_eq!(
            gaps(0, 10, &[r(2, 4), r(6, 8)]),
            vec![(0, 2), (4, 6), (8, 10)]
        );
        assert_eq!(gaps(0, 10, &[r(-5, 3), r(9, 20)]), vec![(3, 9)]);
        assert_eq!(gaps(0, 10, &[r(20, 30)]), vec![(0, 10)]);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
