//! The store of Sluice: the append-only event store, the transactional outbox, consumer offsets
//! committed with the writes they produced, the dead-letter table, the projector's read
//! models (latest state, readings, 1-minute and 1-hour rollups, anomalies), and the executor's
//! action schedule with its dedup and ledger, on PostgreSQL
//! (`postgres://...`) or SQLite (`sqlite://PATH`) through `sqlx`. Both pass one contract suite
//! (`tests/contract`), and processors never see which one they run on.
//!
//! This crate must never acknowledge an append before it is durable (committed; on SQLite with
//! `synchronous=FULL`), never store an event twice or an outbox entry without its event, never
//! let the outbox skip an entry, and never update or delete an event except by retention.
//! Schema changes go through the migrations in `sql/postgres` and `sql/sqlite`, never through
//! ad-hoc DDL (the time partitions of the Postgres event store are the one exception, made by
//! [`Store::maintain`] and on demand).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sluice_runtime::{BoxError as RuntimeBoxError, DeadLetter, DlqSink};
use uuid::Uuid;

mod actions;
pub mod bench;
mod error;
mod keys;
mod model;
mod postgres;
mod prepare;
mod projections;
mod select;
mod sqlite;
pub mod testing;

pub use actions::{
    ActionRow, ActionSource, ActionStatus, AttemptRecord, DELIVERY_ERROR_CLASS, DedupKey,
    DueAction, EXECUTOR_PROCESSOR, EnqueueOutcome, Intake, LedgerOutcome, LedgerRow, NewAction,
    NextStep,
};
pub use error::{BoxError, Error, Result};
pub use keys::{ApiKey, Role};
pub use model::{
    AppendBatch, AppendEvent, AppendOutcome, Appended, ConsumerOffset, DlqCount, DlqEntry,
    DlqFilter, DlqStatus, EventQuery, MaintainReport, NewDeadLetter, OutboxEntry, PartitionInfo,
    StoredEvent,
};
pub use projections::{
    Anomaly, DeviceLatest, ProjectionBatch, ProjectionOutcome, Reading, RebuildOutcome,
    RebuildStep, Resolution, Rollup, StatusChange,
};

pub use select::{Column, ColumnType, Columns, Filter, Op, READABLE_TABLES, Select, Value};

use keys::StoredKey;
use postgres::PgStore;
use sqlite::SqliteStore;

/// The channel the Postgres store notifies once per append transaction that wrote outbox rows.
pub const OUTBOX_CHANNEL: &str = "sluice_outbox";

/// How the store behaves. Loaded like every Sluice config: defaults, then file, then
/// `SLUICE__` environment variables.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreOptions {
    /// How long events are kept (by `ingested_at`); older ones are removed by
    /// [`Store::maintain`]. Also how long a duplicate event id is recognised.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Most connections held open (Postgres; on SQLite, the readers beside the one writer).
    pub pool_size: u32,
    /// Width of one time partition of the Postgres event store; whole seconds, at least a
    /// minute. Partitions are aligned to multiples of it since the Unix epoch.
    #[serde(with = "humantime_serde")]
    pub partition_interval: Duration,
    /// Partitions created ahead of the current one (Postgres).
    pub partitions_ahead: u32,
    /// Apply migrations when connecting (`sluice dev`); otherwise `sluice migrate` does.
    pub migrate_on_connect: bool,
    /// Longest wait for a pooled connection before the operation fails as transient.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Longest wait for SQLite's write lock before the operation fails as transient.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(7 * 24 * 3600),
            pool_size: 10,
            partition_interval: Duration::from_secs(24 * 3600),
            partitions_ahead: 3,
            migrate_on_connect: false,
            acquire_timeout: Duration::from_secs(10),
            busy_timeout: Duration::from_secs(5),
        }
    }
}

impl StoreOptions {
    /// Every problem with these options, or none.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.retention.is_zero() {
            problems.push("retention must be positive".to_owned());
        }
        if self.pool_size == 0 {
            problems.push("pool_size must be at least 1".to_owned());
        }
        if self.partition_interval < Duration::from_secs(60)
            || self.partition_interval.subsec_nanos() != 0
        {
            problems.push("partition_interval must be whole seconds, at least 1m".to_owned());
        }
        if self.acquire_timeout.is_zero() {
            problems.push("acquire_timeout must be positive".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidOptions(problems))
        }
    }
}

/// Which database a [`Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

/// The store: one handle, cheap to clone, shared by every task of a process.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Inner,
}

#[derive(Debug, Clone)]
enum Inner {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

/// Calls the same method on whichever backend this is.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match &$self.inner {
            $crate::Inner::Postgres(s) => s.$method($($arg),*).await,
            $crate::Inner::Sqlite(s) => s.$method($($arg),*).await,
        }
    };
}
pub(crate) use dispatch;

mod ops;
pub use ops::{AuditEntry, JobState, NewReplayJob, ProjectionVersion, ReplayJob, VersionState};

impl Store {
    /// Opens the store at `url`: `postgres://...` / `postgresql://...`, or `sqlite://PATH`
    /// (the file and its folder are created when missing). Checks that the database answers;
    /// migrates first when `opts.migrate_on_connect`.
    pub async fn connect(url: &str, opts: StoreOptions) -> Result<Store> {
        opts.validate()?;
        let inner = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Inner::Postgres(PgStore::connect(url, opts.clone()).await?)
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(Error::InvalidUrl {
                    url: url.to_owned(),
                    reason: "no file path after sqlite://".to_owned(),
                });
            }
            Inner::Sqlite(SqliteStore::connect(PathBuf::from(path), opts.clone()).await?)
        } else {
            return Err(Error::InvalidUrl {
                url: url.to_owned(),
                reason: "unknown scheme".to_owned(),
            });
        };
        let store = Store { inner };
        if opts.migrate_on_connect {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Postgres(_) => Backend::Postgres,
            Inner::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Applies the migrations not yet applied. Idempotent, and safe when several processes run
    /// it at once (Postgres: an advisory lock; SQLite: one `BEGIN IMMEDIATE` transaction). On
    /// Postgres it also makes sure the current and the next partitions exist.
    pub async fn migrate(&self) -> Result<()> {
        dispatch!(self.migrate())
    }

    /// Closes every connection; clones of this store stop working.
    pub async fn close(&self) {
        dispatch!(self.close())
    }

    /// Appends a batch in one transaction: the events not already stored, one outbox entry per
    /// newly stored event, the dead letters, and the consumer offsets. Nothing of it is stored
    /// if anything fails. Duplicate event ids are skipped and reported, not errors.
    pub async fn append(&self, batch: &AppendBatch) -> Result<AppendOutcome> {
        dispatch!(self.append(batch, None))
    }

    /// [`append`](Self::append), sleeping `hold` inside the transaction before committing, so
    /// tests can make concurrent transactions commit out of id order.
    #[doc(hidden)]
    pub async fn append_with_delay(
        &self,
        batch: &AppendBatch,
        hold: Duration,
    ) -> Result<AppendOutcome> {
        dispatch!(self.append(batch, Some(hold)))
    }

    /// The offsets committed for `group`, ordered by topic and partition.
    pub async fn consumer_offsets(&self, group: &str) -> Result<Vec<ConsumerOffset>> {
        dispatch!(self.consumer_offsets(group))
    }

    /// Up to `limit` outbox entries, oldest id first. Entries stay until deleted, so this reads
    /// whatever is still waiting, including entries committed after later ids were published.
    pub async fn outbox_fetch(&self, limit: u32) -> Result<Vec<OutboxEntry>> {
        dispatch!(self.outbox_fetch(limit))
    }

    /// Deletes published entries (one statement); returns how many were deleted.
    pub async fn outbox_delete(&self, ids: &[i64]) -> Result<u64> {
        dispatch!(self.outbox_delete(ids))
    }

    /// Records a failed publish: the entries stay, their attempts go up by one and `error` is
    /// kept as the last error. Returns how many entries were updated.
    pub async fn outbox_record_failure(&self, ids: &[i64], error: &str) -> Result<u64> {
        dispatch!(self.outbox_record_failure(ids, error))
    }

    /// Entries waiting in the outbox.
    pub async fn outbox_depth(&self) -> Result<u64> {
        dispatch!(self.outbox_depth())
    }

    /// A waiter woken by appends that wrote outbox entries. Postgres: LISTEN on
    /// [`OUTBOX_CHANNEL`] (any process's appends). SQLite: appends through this store or its
    /// clones. Either way a relay also polls on timeout; a missed wake-up only costs latency.
    pub async fn outbox_listener(&self) -> Result<OutboxListener> {
        dispatch!(self.outbox_listener())
    }

    /// Stores one dead letter on its own; returns its id.
    pub async fn dlq_put(&self, letter: impl Into<NewDeadLetter>) -> Result<i64> {
        let batch = AppendBatch {
            dead_letters: vec![letter.into()],
            ..AppendBatch::default()
        };
        let outcome = self.append(&batch).await?;
        outcome
            .dead_letter_ids
            .first()
            .copied()
            .ok_or_else(|| Error::corrupt("dlq_put", "the insert returned no id"))
    }

    /// Dead letters matching `filter`, by id.
    pub async fn dlq_list(&self, filter: &DlqFilter) -> Result<Vec<DlqEntry>> {
        dispatch!(self.dlq_list(filter))
    }

    /// One dead letter.
    pub async fn dlq_get(&self, id: i64) -> Result<Option<DlqEntry>> {
        dispatch!(self.dlq_get(id))
    }

    /// Moves pending dead letters to `status` (replayed or discarded), recording who, when
    /// and `reason`, with one audit row per entry changed, in one transaction. Entries not
    /// pending are left alone. Returns the ids changed, ascending.
    pub async fn dlq_set_status(
        &self,
        ids: &[i64],
        status: DlqStatus,
        who: &str,
        reason: Option<&str>,
    ) -> Result<Vec<i64>> {
        if status == DlqStatus::Pending {
            return Err(Error::InvalidArgument {
                op: "dlq_set_status",
                reason: "a dead letter can only move from pending to replayed or discarded"
                    .to_owned(),
            });
        }
        dispatch!(self.dlq_set_status(ids, status, who, reason, prepare::trunc(Utc::now())))
    }

    /// Dead letters by processor, error class and status.
    pub async fn dlq_counts(&self) -> Result<Vec<DlqCount>> {
        dispatch!(self.dlq_counts())
    }

    /// Events stored.
    pub async fn event_count(&self) -> Result<u64> {
        dispatch!(self.event_count())
    }

    /// One event by id.
    pub async fn event_by_id(&self, id: Uuid) -> Result<Option<StoredEvent>> {
        dispatch!(self.event_by_id(id))
    }

    /// Up to `limit` events with a position greater than `position`, in position order.
    pub async fn events_after(&self, position: i64, limit: u32) -> Result<Vec<StoredEvent>> {
        let q = EventQuery {
            after_position: position,
            limit,
            ..EventQuery::default()
        };
        self.events_in_range(&q).await
    }

    /// How many events match `query` (its position bound included, its limit ignored).
    pub async fn count_events(&self, query: &EventQuery) -> Result<u64> {
        dispatch!(self.count_events(query))
    }

    /// Events matching `query`, in position order.
    pub async fn events_in_range(&self, query: &EventQuery) -> Result<Vec<StoredEvent>> {
        dispatch!(self.events_in_range(query))
    }

    /// Retention and partitions as of `now`: creates the current partition and
    /// `partitions_ahead` more, drops partitions entirely older than `now - retention`, and
    /// deletes older events that are not in such a partition (all of them on SQLite). Also
    /// deletes the finished actions (every status but `pending`) whose `updated_at` is older
    /// than `now - retention`, with their ledger rows; pending actions are never removed.
    pub async fn maintain(&self, now: DateTime<Utc>) -> Result<MaintainReport> {
        dispatch!(self.maintain(now))
    }

    /// The projector's retention of `readings` and `anomalies` as of `now`: on Postgres
    /// creates the current time partition of `readings` (by device time) and
    /// `partitions_ahead` more, drops partitions entirely older than `now - retention` and
    /// deletes older rows of the default partition; on SQLite deletes older readings. On both,
    /// deletes the anomalies whose device time is older than `now - retention`. Rollups and
    /// latest state are kept.
    pub async fn maintain_readings(
        &self,
        now: DateTime<Utc>,
        retention: Duration,
    ) -> Result<MaintainReport> {
        dispatch!(self.maintain_readings(now, retention))
    }

    /// The time partitions of the event store (Postgres; empty on SQLite).
    pub async fn partitions(&self) -> Result<Vec<PartitionInfo>> {
        dispatch!(self.partitions())
    }

    /// Creates a key with `role`; returns it with its token, `sk_<id>_<secret>`. The token is
    /// the only copy of the secret (only a salted hash is stored): show it once.
    pub async fn create_api_key(&self, role: Role, name: Option<&str>) -> Result<(ApiKey, String)> {
        let (stored, token) = StoredKey::generate(role, name, prepare::trunc(Utc::now()));
        dispatch!(self.insert_api_key(&stored))?;
        Ok((stored.key, token))
    }

    /// Every key, revoked ones included, by creation time then id. Never their secrets.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        dispatch!(self.list_api_keys())
    }

    /// Revokes a key: from now on it verifies as nothing. `false` when there is no such key or
    /// it was already revoked.
    pub async fn revoke_api_key(&self, id: &str) -> Result<bool> {
        dispatch!(self.revoke_api_key(id, prepare::trunc(Utc::now())))
    }

    /// The key a token belongs to, or `None` when the token is malformed, names no key, has
    /// the wrong secret, or its key is revoked. One read by primary key, no write.
    pub async fn verify_api_key(&self, token: &str) -> Result<Option<ApiKey>> {
        let Some((id, secret)) = keys::parse_token(token) else {
            return Ok(None);
        };
        let stored: Option<StoredKey> = dispatch!(self.api_key(id))?;
        Ok(stored.filter(|s| s.accepts(&secret)).map(|s| s.key))
    }
}

impl Store {
    /// Projects a batch into read model `batch.version`, in one transaction with its offsets:
    /// the readings not stored yet (by event id), their 1-minute and 1-hour rollups updated
    /// incrementally, each device's latest state, the anomalies not stored yet (by event id),
    /// and the offsets. Nothing of it is stored if anything fails. Repeats and out-of-order events are harmless: only new readings count
    /// in rollups, and latest state only moves forward in (device time, event id).
    ///
    /// Assumes one writer per device at a time (the partition owner), as for appends: late-ness
    /// is judged against the state read at the start of the transaction.
    pub async fn project(&self, batch: &ProjectionBatch) -> Result<ProjectionOutcome> {
        dispatch!(self.project(batch))
    }

    /// One step of a set-based rebuild of `step.version` from the event store, in one
    /// transaction: the step's readings are inserted by one `INSERT … SELECT` from `events`
    /// (those already stored in the version are skipped, as the projector skips repeats), and
    /// only the new ones are folded into the rollups and latest state, as
    /// [`project`](Self::project) would. Status events move latest state forward likewise.
    /// A step done twice changes nothing the second time, so a rebuild resumes from its last
    /// finished step; lanes of the same positions run at once without touching the same rows.
    ///
    /// PostgreSQL only: on SQLite a rebuild goes through [`project`](Self::project).
    pub async fn rebuild_step(&self, step: &RebuildStep) -> Result<RebuildOutcome> {
        match &self.inner {
            Inner::Postgres(s) => s.rebuild_step(step).await,
            Inner::Sqlite(_) => Err(Error::InvalidArgument {
                op: "rebuild_step",
                reason: "set-based rebuilds are for PostgreSQL; on SQLite project batches"
                    .to_owned(),
            }),
        }
    }

    /// The greatest position in the event store (0 when it is empty).
    pub async fn last_position(&self) -> Result<i64> {
        dispatch!(self.last_position())
    }

    /// One device's latest state in projection `version`.
    pub async fn device_latest(
        &self,
        version: i32,
        device_id: &str,
    ) -> Result<Option<DeviceLatest>> {
        dispatch!(self.device_latest(version, device_id))
    }

    /// The stored rollups of `version`, of one device or all, by device, bucket and metric.
    pub async fn rollups(
        &self,
        version: i32,
        resolution: Resolution,
        device_id: Option<&str>,
    ) -> Result<Vec<Rollup>> {
        dispatch!(self.rollups(version, resolution, device_id))
    }

    /// The rollups of `version` computed from the stored readings by one `GROUP BY`, ordered
    /// like [`rollups`](Self::rollups): what the incremental ones must equal (sums up to
    /// rounding). A full scan; for checks and rebuilds, not for serving.
    pub async fn rollups_from_scratch(
        &self,
        version: i32,
        resolution: Resolution,
    ) -> Result<Vec<Rollup>> {
        dispatch!(self.rollups_from_scratch(version, resolution))
    }

    /// Readings stored in `version`.
    pub async fn readings_count(&self, version: i32) -> Result<u64> {
        dispatch!(self.readings_count(version))
    }

    /// The anomalies stored in `version`, of one device or all, by device (byte order),
    /// device time and event id.
    pub async fn anomalies(&self, version: i32, device_id: Option<&str>) -> Result<Vec<Anomaly>> {
        dispatch!(self.anomalies(version, device_id))
    }

    /// Deletes every row of projection `version` (readings, rollups, latest state, anomalies)
    /// in one transaction; returns how many rows were deleted.
    pub async fn drop_projection_version(&self, version: i32) -> Result<u64> {
        dispatch!(self.drop_projection_version(version))
    }
}

/// The executor's action schedule, dedup and ledger ("Actions fire once", docs/store.md).
impl Store {
    /// Takes a batch of `action.requested` events in, in one transaction with the consumer
    /// `offsets` (as [`append`](Self::append) does: upserted, the last one per group, topic
    /// and partition wins): nothing of it is stored if anything fails.
    ///
    /// Each request whose [`DedupKey`] and action id are not stored yet (nor earlier in the
    /// batch) is stored: `pending` and due now (the store's clock) for [`Intake::Deliver`],
    /// else `suppressed` or `denied` with a ledger row saying so. Every other request is a
    /// duplicate: nothing is stored for it but a `duplicate` ledger row, written against the
    /// **existing** action that holds the key (so an action's ledger shows every replay that
    /// hit it), with the absorbed request's own id in `request_id`.
    ///
    /// Dedup holds as long as the holding action is kept: pending ones always, finished ones
    /// for the store's retention after their last change (see [`maintain`](Self::maintain)).
    pub async fn enqueue_actions(
        &self,
        actions: &[NewAction],
        offsets: &[ConsumerOffset],
    ) -> Result<EnqueueOutcome> {
        let p = actions::PreparedEnqueue::new(actions, offsets, Utc::now())?;
        dispatch!(self.enqueue_actions(&p))
    }

    /// Up to `limit` pending actions due at `now` (`next_attempt_at <= now`), oldest due
    /// first, each claimed for `lease`: its `next_attempt_at` moves to `now + lease` in the same
    /// statement (Postgres: `FOR UPDATE SKIP LOCKED`; SQLite: one write transaction), so two
    /// claimers, in one process or several, never get the same action at once. A claimer
    /// records the attempt with [`record_attempt`](Self::record_attempt) before the lease
    /// ends; if it dies, the action is due again when the lease ends. `now` is the caller's
    /// clock. Claims do not change `updated_at`.
    pub async fn claim_due_actions(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<DueAction>> {
        let until = actions::lease_end("claim_due_actions", now, lease)?;
        dispatch!(self.claim_due_actions(prepare::trunc(now), limit, until))
    }

    /// Records one attempt (or short-circuit) of a claimed action, in one transaction: a
    /// ledger row, and the action's new state. For a pending action:
    ///
    /// - [`NextStep::Delivered`]: `delivered`, attempts + 1, `delivered_at` = `attempt.at`;
    ///   ledger `delivered`.
    /// - [`NextStep::RetryAt`]: stays `pending`, due at that time, attempts + 1; ledger
    ///   `retrying`.
    /// - [`NextStep::Dead`]: `dead`, attempts + 1, and a dead letter (processor `executor`,
    ///   error class `delivery`, the body's bytes as raw, the request's topic, partition and
    ///   offset, the action id as event id, the attempt's error as message); ledger `dead`.
    /// - [`NextStep::ShortCircuited`]: stays `pending`, due at `until`, attempts unchanged;
    ///   ledger `short_circuited`.
    ///
    /// Counted attempts set `last_http_status` and, when they carry one, `last_error`. The
    /// ledger's attempt number is attempts + 1 as found. An action that already left `pending`
    /// (a claim whose lease ran out while another claimer finished it) keeps its state; the
    /// attempt is still written to the ledger (`delivered`, `short_circuited`, or `failed`).
    /// An unknown action id is an [`Error::InvalidArgument`] and writes nothing.
    pub async fn record_attempt(
        &self,
        action_id: Uuid,
        attempt: &AttemptRecord,
        next: NextStep,
    ) -> Result<()> {
        dispatch!(self.record_attempt(action_id, attempt, next))
    }

    /// One action.
    pub async fn action(&self, action_id: Uuid) -> Result<Option<ActionRow>> {
        dispatch!(self.action(action_id))
    }

    /// The ledger rows of one action, in the order they were written.
    pub async fn action_ledger(&self, action_id: Uuid) -> Result<Vec<LedgerRow>> {
        dispatch!(self.action_ledger(action_id))
    }

    /// Actions waiting for an attempt (status `pending`, claimed or not): the executor's
    /// backlog gauge.
    pub async fn actions_pending(&self) -> Result<u64> {
        dispatch!(self.actions_pending())
    }
}

impl DlqSink for Store {
    async fn put(&self, letter: DeadLetter) -> Result<(), RuntimeBoxError> {
        self.dlq_put(letter).await?;
        Ok(())
    }
}

/// Wakes a relay when appends wrote outbox entries. See [`Store::outbox_listener`].
pub struct OutboxListener {
    inner: ListenerInner,
}

enum ListenerInner {
    Postgres(Box<sqlx::postgres::PgListener>),
    Sqlite(tokio::sync::watch::Receiver<u64>),
}

impl fmt::Debug for OutboxListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            ListenerInner::Postgres(_) => "postgres",
            ListenerInner::Sqlite(_) => "sqlite",
        };
        f.debug_struct("OutboxListener")
            .field("backend", &kind)
            .finish()
    }
}

impl OutboxListener {
    /// Waits up to `timeout` for a wake-up. `true` when one came (several are merged into one),
    /// or when the connection was lost and some may have been missed; `false` on timeout.
    pub async fn wait(&mut self, timeout: Duration) -> Result<bool> {
        match &mut self.inner {
            ListenerInner::Postgres(l) => {
                match tokio::time::timeout(timeout, l.try_recv()).await {
                    Err(_) => Ok(false),
                    Ok(Ok(Some(_))) => {
                        while l.next_buffered().is_some() {}
                        Ok(true)
                    }
                    // Reconnecting: anything sent meanwhile is lost, so say "look now".
                    Ok(Ok(None)) => Ok(true),
                    Ok(Err(e)) => Err(Error::db("outbox_listener", e)),
                }
            }
            ListenerInner::Sqlite(rx) => match tokio::time::timeout(timeout, rx.changed()).await {
                Err(_) => Ok(false),
                Ok(Ok(())) => {
                    rx.borrow_and_update();
                    Ok(true)
                }
                // The store is gone; nothing will ever wake us again.
                Ok(Err(_)) => Err(Error::Fatal {
                    op: "outbox_listener",
                    source: "the store was dropped".into(),
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send<T: Send>(_: &T) {}
    fn is_shared<T: Clone + Send + Sync + fmt::Debug + 'static>() {}

    /// Spawnable: every operation's future is `Send`, and the store is shareable.
    #[allow(dead_code)]
    fn futures_are_send(s: &Store, b: &AppendBatch, l: &mut OutboxListener) {
        is_shared::<Store>();
        is_send(&s.migrate());
        is_send(&s.append(b));
        is_send(&s.maintain(Utc::now()));
        is_send(&s.maintain_readings(Utc::now(), Duration::ZERO));
        is_send(&s.outbox_fetch(1));
        is_send(&s.outbox_listener());
        is_send(&l.wait(Duration::ZERO));
        is_send(&s.dlq_list(&DlqFilter::default()));
        is_send(&s.events_in_range(&EventQuery::default()));
        is_send(&s.verify_api_key("sk_"));
        is_send(&s.create_api_key(Role::Device, None));
        is_send(&s.enqueue_actions(&[], &[]));
        is_send(&s.claim_due_actions(Utc::now(), 1, Duration::ZERO));
        let rec = AttemptRecord {
            at: Utc::now(),
            http_status: None,
            latency: None,
            error: None,
        };
        is_send(&s.record_attempt(Uuid::nil(), &rec, NextStep::Dead));
        is_send(&s.action_ledger(Uuid::nil()));
    }

    #[tokio::test]
    async fn bad_urls_name_the_accepted_forms() {
        for url in ["mysql://localhost/db", "sqlite://", "localhost:5432", ""] {
            let err = Store::connect(url, StoreOptions::default())
                .await
                .unwrap_err();
            assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err}");
            let text = err.to_string();
            assert!(
                text.contains("postgres://") && text.contains("sqlite://PATH"),
                "{text}"
            );
        }
        let err = Store::connect(
            "postgres://u:secret@host:notaport/db",
            StoreOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
        assert!(
            !err.to_string().contains("secret"),
            "no password in messages: {err}"
        );
    }

    #[test]
    fn options_report_every_problem() {
        let bad = StoreOptions {
            retention: Duration::ZERO,
            pool_size: 0,
            partition_interval: Duration::from_millis(90_500),
            ..StoreOptions::default()
        };
        let Err(Error::InvalidOptions(problems)) = bad.validate() else {
            panic!("accepted");
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(StoreOptions::default().validate().is_ok());
    }

    #[test]
    fn options_load_from_config_with_human_durations() {
        let opts: StoreOptions =
            serde_json::from_str(r#"{"retention": "3days", "partition_interval": "6h"}"#).unwrap();
        assert_eq!(opts.retention, Duration::from_secs(3 * 86_400));
        assert_eq!(opts.partition_interval, Duration::from_secs(6 * 3600));
        assert_eq!(opts.partitions_ahead, 3);
        assert!(serde_json::from_str::<StoreOptions>(r#"{"retension": "1d"}"#).is_err());
    }
}
