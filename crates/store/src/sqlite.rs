//! The store on SQLite: one writer connection (SQLite has one writer anyway; queueing in the
//! pool is cheaper than spinning on the file lock), readers beside it in WAL mode, and
//! multi-row inserts inside one `BEGIN IMMEDIATE` transaction per batch.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sluice_core::{EventType, Metadata};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::watch;
use uuid::Uuid;
use uuid::fmt::Hyphenated;

use crate::error::db;
use crate::keys::{ApiKey, StoredKey};
use crate::model::{
    AppendBatch, AppendOutcome, ConsumerOffset, DlqCount, DlqEntry, DlqFilter, DlqStatus,
    EventQuery, MaintainReport, OutboxEntry, PartitionInfo, StoredEvent,
};
use crate::prepare::{
    DeadRow, EventRow, Prepared, chunk_sizes, from_micros, headers_from_json, micros,
};
use crate::{Error, ListenerInner, OutboxListener, Result, StoreOptions};

mod actions;
mod ops;
mod projections;

static MIGRATOR: Migrator = sqlx::migrate!("../../sql/sqlite");

/// Rows per multi-row insert: 256 × 9 columns stays far below SQLite's 32,766 parameters.
const MAX_ROWS_PER_INSERT: usize = 256;

const EVENT_COLUMNS: &str =
    "position, event_id, event_type, aggregate_id, occurred_at, ingested_at, payload, metadata";

const DLQ_COLUMNS: &str = "dlq_id, processor, event_id, source_topic, source_partition, \
     source_offset, schema_id, raw, decoded, error_class, error_message, failed_at, attempts, \
     status, status_changed_by, status_changed_at, raw_key, headers, reason";

const KEY_COLUMNS: &str = "id, name, role, salt, hash, created_at, revoked_at";

#[derive(Debug, Clone)]
pub(crate) struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    opts: StoreOptions,
    /// Bumped after every commit that wrote outbox rows; listeners watch it.
    notify: Arc<watch::Sender<u64>>,
}

impl SqliteStore {
    /// The readers' pool, for reads built elsewhere in the crate.
    pub(crate) fn reader_pool(&self) -> &SqlitePool {
        &self.reader
    }

    pub async fn connect(path: PathBuf, opts: StoreOptions) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::Fatal {
                op: "connect",
                source: format!("cannot create {}: {e}", parent.display()).into(),
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before append returns, even if the machine loses power.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(opts.busy_timeout);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(opts.acquire_timeout)
            // The event-id index is written at random: keep it in memory (64 MiB). Checkpoint
            // every ~40 MB of WAL rather than 4 MB, so a page written by many batches is
            // copied back once (a third more throughput at 1,000-event batches).
            .connect_with(
                options
                    .clone()
                    .pragma("cache_size", "-65536")
                    .pragma("wal_autocheckpoint", "10000"),
            )
            .await
            .map_err(|e| opening(&path, e))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(opts.pool_size)
            .acquire_timeout(opts.acquire_timeout)
            .connect_lazy_with(options);
        Ok(Self {
            writer,
            reader,
            opts,
            notify: Arc::new(watch::channel(0).0),
        })
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    pub async fn migrate(&self) -> Result<()> {
        // sqlx has no migration lock for SQLite; one immediate transaction around the whole
        // run makes a second process wait, then find everything applied.
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db("migrate"))?;
        // `run_direct`: see the Postgres store.
        MIGRATOR
            .run_direct(&mut *tx)
            .await
            .map_err(Error::migrate)?;
        tx.commit().await.map_err(db("migrate"))
    }

    pub async fn maintain(&self, now: DateTime<Utc>) -> Result<MaintainReport> {
        let retention = i64::try_from(self.opts.retention.as_micros()).unwrap_or(i64::MAX);
        let cutoff = micros(now).saturating_sub(retention);
        let deleted = sqlx::query("DELETE FROM events WHERE ingested_at < ?1")
            .bind(cutoff)
            .execute(&self.writer)
            .await
            .map_err(db("maintain"))?
            .rows_affected();
        let (actions_deleted, action_ledger_deleted) = self
            .delete_finished_actions(from_micros("maintain", cutoff)?)
            .await?;
        Ok(MaintainReport {
            events_deleted: deleted,
            actions_deleted,
            action_ledger_deleted,
            ..MaintainReport::default()
        })
    }

    pub async fn maintain_readings(
        &self,
        now: DateTime<Utc>,
        retention: Duration,
    ) -> Result<MaintainReport> {
        let retention = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
        let cutoff = micros(now).saturating_sub(retention);
        // Per version, so that the (version, at) index serves the range.
        let deleted = sqlx::query(
            "DELETE FROM readings
             WHERE version IN (SELECT DISTINCT version FROM readings) AND at < ?1",
        )
        .bind(cutoff)
        .execute(&self.writer)
        .await
        .map_err(db("maintain_readings"))?
        .rows_affected();
        let anomalies_deleted = sqlx::query(
            "DELETE FROM anomalies
             WHERE version IN (SELECT DISTINCT version FROM anomalies) AND at < ?1",
        )
        .bind(cutoff)
        .execute(&self.writer)
        .await
        .map_err(db("maintain_readings"))?
        .rows_affected();
        Ok(MaintainReport {
            readings_deleted: deleted,
            anomalies_deleted,
            ..MaintainReport::default()
        })
    }

    pub async fn partitions(&self) -> Result<Vec<PartitionInfo>> {
        Ok(Vec::new())
    }

    // ---- append ----------------------------------------------------------------------------

    pub async fn append(
        &self,
        batch: &AppendBatch,
        hold: Option<Duration>,
    ) -> Result<AppendOutcome> {
        const OP: &str = "append";
        let p = Prepared::new(batch)?;
        // IMMEDIATE: take the write lock now (waiting up to busy_timeout for another process)
        // rather than fail mid-transaction when a read lock cannot be upgraded.
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;

        // Which ids are already stored: one query, usually answering nothing. Holding the
        // write lock, nobody can store one of them before we do.
        let mut known: HashSet<Uuid> = HashSet::new();
        if !p.events.is_empty() {
            let ids: Vec<String> = p
                .events
                .iter()
                .map(|r| r.src.event.event_id.hyphenated().to_string())
                .collect();
            let ids = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".to_owned());
            let rows: Vec<Hyphenated> = sqlx::query_scalar(
                "SELECT event_id FROM events WHERE event_id IN (SELECT value FROM json_each(?1))",
            )
            .bind(ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(db(OP))?;
            known.extend(rows.into_iter().map(Hyphenated::into_uuid));
        }
        // Positions are given here, in batch order, after the highest ever given (AUTOINCREMENT
        // keeps it in sqlite_sequence even when retention deleted the newest rows).
        let last: i64 = sqlx::query_scalar(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0), \
                        coalesce((SELECT max(position) FROM events), 0))",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(db(OP))?;
        let mut stored: HashMap<Uuid, i64> = HashMap::with_capacity(p.events.len());
        let fresh: Vec<(&EventRow<'_>, i64)> = p
            .events
            .iter()
            .filter(|r| !known.contains(&r.src.event.event_id))
            .zip(last + 1..)
            .collect();
        let mut start = 0;
        for size in chunk_sizes(fresh.len(), MAX_ROWS_PER_INSERT) {
            let rows = &fresh[start..start + size];
            start += size;
            let sql = multi_row(
                "INSERT INTO events (position, event_id, event_type, aggregate_id, occurred_at, \
                 ingested_at, payload, metadata, schema_version) VALUES ",
                9,
                size,
                "",
            );
            let mut q = sqlx::query(&sql);
            for (r, position) in rows {
                let e = &r.src.event;
                q = q
                    .bind(*position)
                    .bind(e.event_id.hyphenated())
                    .bind(e.event_type.as_str())
                    .bind(e.aggregate_id.as_str())
                    .bind(micros(r.occurred_at))
                    .bind(micros(r.ingested_at))
                    .bind(r.payload.as_str())
                    .bind(r.metadata.as_str())
                    .bind(r.schema_version);
            }
            q.execute(&mut *tx).await.map_err(db(OP))?;
        }
        stored.extend(fresh.iter().map(|(r, pos)| (r.src.event.event_id, *pos)));

        let new: Vec<_> = p
            .events
            .iter()
            .filter(|r| stored.contains_key(&r.src.event.event_id))
            .collect();
        let created_at = micros(Utc::now());
        let mut start = 0;
        for size in chunk_sizes(new.len(), MAX_ROWS_PER_INSERT) {
            let rows = &new[start..start + size];
            start += size;
            let sql = multi_row(
                "INSERT INTO outbox (event_id, aggregate_id, topic, key, value, created_at) VALUES ",
                6,
                size,
                "",
            );
            let mut q = sqlx::query(&sql);
            for r in rows {
                q = q
                    .bind(r.src.event.event_id.hyphenated())
                    .bind(r.src.event.aggregate_id.as_str())
                    .bind(r.src.topic.as_str())
                    .bind(r.src.key.as_slice())
                    .bind(r.src.value.as_slice())
                    .bind(created_at);
            }
            q.execute(&mut *tx).await.map_err(db(OP))?;
        }

        let dead_letter_ids = insert_dead_letters(&mut tx, OP, &p.dead).await?;

        for &(group, topic, partition, next_offset) in &p.offsets {
            sqlx::query(
                "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (group_id, topic, partition) \
                 DO UPDATE SET next_offset = excluded.next_offset, updated_at = excluded.updated_at",
            )
            .bind(group)
            .bind(topic)
            .bind(partition)
            .bind(next_offset)
            .bind(created_at)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        }

        if let Some(hold) = hold {
            tokio::time::sleep(hold).await;
        }
        tx.commit().await.map_err(db(OP))?;
        if !new.is_empty() {
            self.notify.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(p.outcome(&stored, dead_letter_ids))
    }

    // ---- offsets and outbox ------------------------------------------------------------------

    pub async fn consumer_offsets(&self, group: &str) -> Result<Vec<ConsumerOffset>> {
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT topic, partition, next_offset FROM consumer_offsets
             WHERE group_id = ?1 ORDER BY topic, partition",
        )
        .bind(group)
        .fetch_all(&self.reader)
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
             FROM outbox ORDER BY id LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db(OP))?;
        rows.iter()
            .map(|row| {
                Ok(OutboxEntry {
                    id: row.try_get("id").map_err(db(OP))?,
                    event_id: row
                        .try_get::<Hyphenated, _>("event_id")
                        .map_err(db(OP))?
                        .into_uuid(),
                    aggregate_id: row.try_get("aggregate_id").map_err(db(OP))?,
                    topic: row.try_get("topic").map_err(db(OP))?,
                    key: row.try_get("key").map_err(db(OP))?,
                    value: row.try_get("value").map_err(db(OP))?,
                    attempts: u32::try_from(row.try_get::<i64, _>("attempts").map_err(db(OP))?)
                        .unwrap_or(0),
                    last_error: row.try_get("last_error").map_err(db(OP))?,
                })
            })
            .collect()
    }

    pub async fn outbox_delete(&self, ids: &[i64]) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?1))")
                .bind(id_list(ids))
                .execute(&self.writer)
                .await
                .map_err(db("outbox_delete"))?
                .rows_affected(),
        )
    }

    pub async fn outbox_record_failure(&self, ids: &[i64], error: &str) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(id_list(ids))
        .bind(error)
        .execute(&self.writer)
        .await
        .map_err(db("outbox_record_failure"))?
        .rows_affected())
    }

    pub async fn outbox_depth(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.reader)
            .await
            .map_err(db("outbox_depth"))?;
        Ok(n.unsigned_abs())
    }

    pub async fn outbox_listener(&self) -> Result<OutboxListener> {
        Ok(OutboxListener {
            inner: ListenerInner::Sqlite(self.notify.subscribe()),
        })
    }

    // ---- DLQ ---------------------------------------------------------------------------------

    pub async fn dlq_list(&self, f: &DlqFilter) -> Result<Vec<DlqEntry>> {
        let mut qb: QueryBuilder<'_, Sqlite> =
            QueryBuilder::new(format!("SELECT {DLQ_COLUMNS} FROM dlq WHERE dlq_id > "));
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
            qb.push(" AND failed_at >= ").push_bind(micros(t));
        }
        if let Some(t) = f.until {
            qb.push(" AND failed_at < ").push_bind(micros(t));
        }
        qb.push(" ORDER BY dlq_id LIMIT ")
            .push_bind(i64::from(f.limit));
        let rows = qb
            .build()
            .fetch_all(&self.reader)
            .await
            .map_err(db("dlq_list"))?;
        rows.iter().map(dlq_from_row).collect()
    }

    pub async fn dlq_get(&self, id: i64) -> Result<Option<DlqEntry>> {
        let row = sqlx::query(&format!("SELECT {DLQ_COLUMNS} FROM dlq WHERE dlq_id = ?1"))
            .bind(id)
            .fetch_optional(&self.reader)
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
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        let mut changed: Vec<i64> = sqlx::query_scalar(
            "UPDATE dlq SET status = ?1, status_changed_by = ?2, status_changed_at = ?3,
                            reason = coalesce(?5, reason)
             WHERE dlq_id IN (SELECT value FROM json_each(?4)) AND status = 'pending'
             RETURNING dlq_id",
        )
        .bind(status.as_str())
        .bind(who)
        .bind(micros(at))
        .bind(id_list(ids))
        .bind(reason)
        .fetch_all(&mut *tx)
        .await
        .map_err(db(OP))?;
        changed.sort_unstable();
        let action = format!("dlq.{}", crate::ops::dlq_verb(status));
        let detail = serde_json::json!({ "reason": reason }).to_string();
        sqlx::query(
            "INSERT INTO audit_log (at, who, action, target, detail)
             SELECT ?1, ?2, ?3, 'dlq:' || value, ?5 FROM json_each(?4)",
        )
        .bind(micros(at))
        .bind(who)
        .bind(&action)
        .bind(id_list(&changed))
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
        .fetch_all(&self.reader)
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&k.key.id)
        .bind(k.key.name.as_deref())
        .bind(k.key.role.as_str())
        .bind(&k.salt)
        .bind(&k.hash)
        .bind(micros(k.key.created_at))
        .execute(&self.writer)
        .await
        .map_err(db("create_api_key"))?;
        Ok(())
    }

    pub async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
        ))
        .fetch_all(&self.reader)
        .await
        .map_err(db("list_api_keys"))?;
        rows.iter()
            .map(|row| key_from_row(row).map(|k| k.key))
            .collect()
    }

    pub async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool> {
        let n =
            sqlx::query("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL")
                .bind(id)
                .bind(micros(at))
                .execute(&self.writer)
                .await
                .map_err(db("revoke_api_key"))?
                .rows_affected();
        Ok(n > 0)
    }

    pub async fn api_key(&self, id: &str) -> Result<Option<StoredKey>> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await
            .map_err(db("verify_api_key"))?;
        row.as_ref().map(key_from_row).transpose()
    }

    // ---- reads -------------------------------------------------------------------------------

    pub async fn event_count(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.reader)
            .await
            .map_err(db("event_count"))?;
        Ok(n.unsigned_abs())
    }

    pub async fn event_by_id(&self, id: Uuid) -> Result<Option<StoredEvent>> {
        let row = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE event_id = ?1"
        ))
        .bind(id.hyphenated())
        .fetch_optional(&self.reader)
        .await
        .map_err(db("event_by_id"))?;
        row.as_ref().map(event_from_row).transpose()
    }

    pub async fn events_in_range(&self, q: &EventQuery) -> Result<Vec<StoredEvent>> {
        let mut qb: QueryBuilder<'_, Sqlite> =
            QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM events"));
        event_filters(&mut qb, q);
        qb.push(" ORDER BY position LIMIT ")
            .push_bind(i64::from(q.limit));
        let rows = qb
            .build()
            .fetch_all(&self.reader)
            .await
            .map_err(db("events_in_range"))?;
        rows.iter().map(event_from_row).collect()
    }
}

impl SqliteStore {
    pub async fn last_position(&self) -> Result<i64> {
        let n: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events")
            .fetch_one(&self.reader)
            .await
            .map_err(db("last_position"))?;
        Ok(n.unwrap_or(0))
    }

    pub async fn count_events(&self, q: &EventQuery) -> Result<u64> {
        let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new("SELECT count(*) FROM events");
        event_filters(&mut qb, q);
        let n: i64 = qb
            .build_query_scalar()
            .fetch_one(&self.reader)
            .await
            .map_err(db("count_events"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// ` WHERE ...` of an event query, without its order and limit.
fn event_filters(qb: &mut QueryBuilder<'_, Sqlite>, q: &EventQuery) {
    qb.push(" WHERE position > ").push_bind(q.after_position);
    if let Some(t) = q.from {
        qb.push(" AND ingested_at >= ").push_bind(micros(t));
    }
    if let Some(t) = q.to {
        qb.push(" AND ingested_at < ").push_bind(micros(t));
    }
    if !q.event_types.is_empty() {
        let types: Vec<&str> = q.event_types.iter().map(|t| t.as_str()).collect();
        qb.push(" AND event_type IN (SELECT value FROM json_each(")
            .push_bind(serde_json::to_string(&types).unwrap_or_else(|_| "[]".into()))
            .push("))");
    }
    if !q.aggregate_ids.is_empty() {
        qb.push(" AND aggregate_id IN (SELECT value FROM json_each(")
            .push_bind(serde_json::to_string(&q.aggregate_ids).unwrap_or_else(|_| "[]".into()))
            .push("))");
    }
}

/// Inserts dead letters in order; returns their ids.
async fn insert_dead_letters(
    conn: &mut SqliteConnection,
    op: &'static str,
    dead: &[DeadRow<'_>],
) -> Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(dead.len());
    for d in dead {
        let l = d.letter;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO dlq (processor, event_id, source_topic, source_partition, \
             source_offset, schema_id, raw, decoded, error_class, error_message, failed_at, \
             attempts, raw_key, headers) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
             RETURNING dlq_id",
        )
        .bind(l.processor.as_str())
        .bind(l.event_id.map(|u| u.hyphenated()))
        .bind(l.topic.as_str())
        .bind(l.partition)
        .bind(l.offset)
        .bind(d.schema_id)
        .bind(l.raw.as_slice())
        .bind(d.decoded.as_deref())
        .bind(l.error_class)
        .bind(l.error_message.as_str())
        .bind(micros(d.failed_at))
        .bind(d.attempts)
        .bind(l.key.as_deref())
        .bind(d.headers.as_str())
        .fetch_one(&mut *conn)
        .await
        .map_err(db(op))?;
        ids.push(id);
    }
    Ok(ids)
}

fn opening(path: &Path, e: sqlx::Error) -> Error {
    let what = format!("cannot open SQLite database {}: {e}", path.display());
    match Error::db("connect", e) {
        Error::Transient { .. } => Error::Transient {
            op: "connect",
            source: what.into(),
        },
        _ => Error::Fatal {
            op: "connect",
            source: what.into(),
        },
    }
}

/// `INSERT ... VALUES (?, ...), (?, ...) ...` for `rows` rows of `cols` columns.
fn multi_row(head: &str, cols: usize, rows: usize, tail: &str) -> String {
    let tuple = format!("({})", vec!["?"; cols].join(", "));
    let mut sql = String::with_capacity(head.len() + rows * (tuple.len() + 2) + tail.len());
    sql.push_str(head);
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&tuple);
    }
    sql.push_str(tail);
    sql
}

/// Ids as a JSON array, for `json_each`: one statement for any number of ids.
fn id_list(ids: &[i64]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_owned())
}

fn parse_json<T: serde::de::DeserializeOwned>(op: &'static str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::corrupt(op, format!("bad JSON in a row: {e}")))
}

fn event_from_row(row: &SqliteRow) -> Result<StoredEvent> {
    const OP: &str = "read events";
    let event_type: String = row.try_get("event_type").map_err(db(OP))?;
    let payload: String = row.try_get("payload").map_err(db(OP))?;
    let metadata: String = row.try_get("metadata").map_err(db(OP))?;
    Ok(StoredEvent {
        position: row.try_get("position").map_err(db(OP))?,
        event: sluice_core::Event {
            event_id: row
                .try_get::<Hyphenated, _>("event_id")
                .map_err(db(OP))?
                .into_uuid(),
            event_type: EventType::new(event_type)
                .map_err(|e| Error::corrupt(OP, e.to_string()))?,
            aggregate_id: row.try_get("aggregate_id").map_err(db(OP))?,
            occurred_at: from_micros(OP, row.try_get("occurred_at").map_err(db(OP))?)?,
            ingested_at: from_micros(OP, row.try_get("ingested_at").map_err(db(OP))?)?,
            payload: parse_json(OP, &payload)?,
            metadata: parse_json::<Metadata>(OP, &metadata)?,
        },
    })
}

fn dlq_from_row(row: &SqliteRow) -> Result<DlqEntry> {
    const OP: &str = "read dlq";
    let schema_id: Option<i64> = row.try_get("schema_id").map_err(db(OP))?;
    let decoded: Option<String> = row.try_get("decoded").map_err(db(OP))?;
    let status: String = row.try_get("status").map_err(db(OP))?;
    let changed_at: Option<i64> = row.try_get("status_changed_at").map_err(db(OP))?;
    Ok(DlqEntry {
        dlq_id: row.try_get("dlq_id").map_err(db(OP))?,
        processor: row.try_get("processor").map_err(db(OP))?,
        event_id: row
            .try_get::<Option<Hyphenated>, _>("event_id")
            .map_err(db(OP))?
            .map(Hyphenated::into_uuid),
        topic: row.try_get("source_topic").map_err(db(OP))?,
        partition: row.try_get("source_partition").map_err(db(OP))?,
        offset: row.try_get("source_offset").map_err(db(OP))?,
        schema_id: schema_id
            .map(u32::try_from)
            .transpose()
            .map_err(|e| Error::corrupt(OP, e.to_string()))?,
        raw: row.try_get("raw").map_err(db(OP))?,
        decoded: decoded.map(|d| parse_json(OP, &d)).transpose()?,
        error_class: row.try_get("error_class").map_err(db(OP))?,
        error_message: row.try_get("error_message").map_err(db(OP))?,
        failed_at: from_micros(OP, row.try_get("failed_at").map_err(db(OP))?)?,
        attempts: u32::try_from(row.try_get::<i64, _>("attempts").map_err(db(OP))?).unwrap_or(0),
        status: status.parse().map_err(|e: String| Error::corrupt(OP, e))?,
        status_changed_by: row.try_get("status_changed_by").map_err(db(OP))?,
        status_changed_at: changed_at.map(|t| from_micros(OP, t)).transpose()?,
        key: row.try_get("raw_key").map_err(db(OP))?,
        headers: headers_from_json(OP, &row.try_get::<String, _>("headers").map_err(db(OP))?)?,
        reason: row.try_get("reason").map_err(db(OP))?,
    })
}

fn key_from_row(row: &SqliteRow) -> Result<StoredKey> {
    const OP: &str = "read api_keys";
    let role: String = row.try_get("role").map_err(db(OP))?;
    let revoked_at: Option<i64> = row.try_get("revoked_at").map_err(db(OP))?;
    Ok(StoredKey {
        key: ApiKey {
            id: row.try_get("id").map_err(db(OP))?,
            name: row.try_get("name").map_err(db(OP))?,
            role: role.parse().map_err(|e: String| Error::corrupt(OP, e))?,
            created_at: from_micros(OP, row.try_get("created_at").map_err(db(OP))?)?,
            revoked_at: revoked_at.map(|t| from_micros(OP, t)).transpose()?,
        },
        salt: row.try_get("salt").map_err(db(OP))?,
        hash: row.try_get("hash").map_err(db(OP))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_statements() {
        assert_eq!(
            multi_row("INSERT INTO t (a, b) VALUES ", 2, 2, " RETURNING a"),
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?) RETURNING a"
        );
    }

    /// Durability and concurrency settings hold on every connection, writer and readers.
    #[tokio::test]
    async fn connections_use_wal_and_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(dir.path().join("a/b/s.db"), StoreOptions::default())
            .await
            .unwrap();
        for pool in [&store.writer, &store.reader] {
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(pool)
                .await
                .unwrap();
            let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(pool)
                .await
                .unwrap();
            let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(mode, "wal");
            assert_eq!(sync, 2, "synchronous=FULL");
            assert_eq!(busy, 5000);
        }
    }
}
