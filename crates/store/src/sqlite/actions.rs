//! The executor's action schedule, dedup and ledger on SQLite: every write in one
//! `BEGIN IMMEDIATE` transaction on the one writer, so a claim needs no row locks. Intake
//! inserts row by row (prepared once, cached): action batches are small next to appends.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sluice_runtime::DeadLetter;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;
use uuid::fmt::Hyphenated;

use super::{SqliteStore, insert_dead_letters, micros};
use crate::actions::{
    ActionRow, ActionSource, ActionStatus, AttemptRecord, Current, DELIVERY_ERROR_CLASS, DueAction,
    EXECUTOR_PROCESSOR, EnqueueOutcome, LedgerRow, NewLedgerRow, NextStep, PreparedEnqueue,
    dead_letter_message, http_status, transition,
};
use crate::error::db;
use crate::model::NewDeadLetter;
use crate::prepare::{DeadRow, from_micros};
use crate::{Error, Result};

const ACTION_COLUMNS: &str = "action_id, input_event_id, rule_id, rule_version, endpoint, \
     device_id, body, destructive, requested_at, source_topic, source_partition, source_offset, \
     status, attempts, next_attempt_at, last_error, last_http_status, updated_at, delivered_at";

const LEDGER_COLUMNS: &str =
    "id, action_id, request_id, endpoint, attempt, outcome, http_status, latency_ms, error, at";

const DUE_COLUMNS: &str = "action_id, input_event_id, rule_id, rule_version, endpoint, \
     device_id, body, destructive, requested_at, attempts, next_attempt_at";

impl SqliteStore {
    pub(crate) async fn enqueue_actions(&self, p: &PreparedEnqueue<'_>) -> Result<EnqueueOutcome> {
        const OP: &str = "enqueue_actions";
        let now = micros(p.now);
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        let mut stored: HashSet<Uuid> = HashSet::new();
        let mut holder: HashMap<usize, Uuid> = HashMap::new();
        for &i in &p.fresh {
            let a = p.action(i);
            let status = a.intake.status();
            let inserted: Option<Hyphenated> = sqlx::query_scalar(
                "INSERT INTO actions (action_id, input_event_id, rule_id, rule_version, endpoint, \
                 device_id, body, destructive, requested_at, source_topic, source_partition, \
                 source_offset, status, attempts, next_attempt_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 0, ?14, ?15) \
                 ON CONFLICT DO NOTHING RETURNING action_id",
            )
            .bind(a.action_id.hyphenated())
            .bind(a.input_event_id.hyphenated())
            .bind(a.rule_id.as_str())
            .bind(a.rule_version)
            .bind(a.endpoint.as_str())
            .bind(a.device_id.as_str())
            .bind(a.body.as_str())
            .bind(a.destructive)
            .bind(micros(a.requested_at))
            .bind(a.source.topic.as_str())
            .bind(a.source.partition)
            .bind(a.source.offset)
            .bind(status.as_str())
            .bind((status == ActionStatus::Pending).then_some(now))
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db(OP))?;
            if inserted.is_some() {
                stored.insert(a.action_id);
                continue;
            }
            // The write lock is ours: whoever holds the key (else the id) is committed.
            let held_by: Option<Hyphenated> = sqlx::query_scalar(
                "SELECT action_id FROM (
                     SELECT action_id, 0 AS pref FROM actions
                     WHERE input_event_id = ?1 AND rule_id = ?2 AND rule_version = ?3
                       AND endpoint = ?4
                     UNION ALL
                     SELECT action_id, 1 AS pref FROM actions WHERE action_id = ?5
                 ) ORDER BY pref LIMIT 1",
            )
            .bind(a.input_event_id.hyphenated())
            .bind(a.rule_id.as_str())
            .bind(a.rule_version)
            .bind(a.endpoint.as_str())
            .bind(a.action_id.hyphenated())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db(OP))?;
            if let Some(h) = held_by {
                holder.insert(i, h.into_uuid());
            }
        }
        let (outcome, ledger) = p.finish(&stored, &holder)?;
        insert_ledger(&mut tx, OP, &ledger).await?;

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
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        }
        tx.commit().await.map_err(db(OP))?;
        Ok(outcome)
    }

    pub(crate) async fn claim_due_actions(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        until: DateTime<Utc>,
    ) -> Result<Vec<DueAction>> {
        const OP: &str = "claim_due_actions";
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        let rows = sqlx::query(&format!(
            "SELECT {DUE_COLUMNS} FROM actions
             WHERE status = 'pending' AND next_attempt_at <= ?1
             ORDER BY next_attempt_at, action_id
             LIMIT ?2"
        ))
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(db(OP))?;
        let due = rows
            .iter()
            .map(|row| {
                Ok(DueAction {
                    action_id: uuid(OP, row, "action_id")?,
                    input_event_id: uuid(OP, row, "input_event_id")?,
                    rule_id: row.try_get("rule_id").map_err(db(OP))?,
                    rule_version: row.try_get("rule_version").map_err(db(OP))?,
                    endpoint: row.try_get("endpoint").map_err(db(OP))?,
                    device_id: row.try_get("device_id").map_err(db(OP))?,
                    body: row.try_get("body").map_err(db(OP))?,
                    destructive: row.try_get("destructive").map_err(db(OP))?,
                    requested_at: time(OP, row, "requested_at")?,
                    attempts: count(OP, row.try_get("attempts").map_err(db(OP))?)?,
                    due_at: time(OP, row, "next_attempt_at")?,
                    lease_until: until,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if !due.is_empty() {
            let ids: Vec<String> = due.iter().map(|d| d.action_id.to_string()).collect();
            sqlx::query(
                "UPDATE actions SET next_attempt_at = ?1
                 WHERE action_id IN (SELECT value FROM json_each(?2))",
            )
            .bind(micros(until))
            .bind(serde_json::to_string(&ids).unwrap_or_else(|_| "[]".to_owned()))
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        }
        tx.commit().await.map_err(db(OP))?;
        Ok(due)
    }

    pub(crate) async fn record_attempt(
        &self,
        action_id: Uuid,
        record: &AttemptRecord,
        next: NextStep,
    ) -> Result<()> {
        const OP: &str = "record_attempt";
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        let row = sqlx::query(
            "SELECT status, attempts, endpoint, body, source_topic, source_partition,
                    source_offset
             FROM actions WHERE action_id = ?1",
        )
        .bind(action_id.hyphenated())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?
        .ok_or_else(|| Error::InvalidArgument {
            op: OP,
            reason: format!("no action {action_id}"),
        })?;
        let status: String = row.try_get("status").map_err(db(OP))?;
        let cur = Current {
            status: status.parse().map_err(|e: String| Error::corrupt(OP, e))?,
            attempts: row.try_get("attempts").map_err(db(OP))?,
            endpoint: row.try_get("endpoint").map_err(db(OP))?,
        };
        let t = transition(action_id, &cur, record, next);
        insert_ledger(&mut tx, OP, std::slice::from_ref(&t.ledger)).await?;
        if let Some(u) = &t.update {
            sqlx::query(
                "UPDATE actions SET
                     status = ?2,
                     attempts = ?3,
                     next_attempt_at = ?4,
                     last_error = CASE WHEN ?5 AND ?6 IS NOT NULL THEN ?6 ELSE last_error END,
                     last_http_status = CASE WHEN ?5 THEN ?7 ELSE last_http_status END,
                     delivered_at = coalesce(?8, delivered_at),
                     updated_at = ?9
                 WHERE action_id = ?1",
            )
            .bind(action_id.hyphenated())
            .bind(u.status.as_str())
            .bind(u.attempts)
            .bind(u.next_attempt_at.map(micros))
            .bind(u.counts)
            .bind(record.error.as_deref())
            .bind(t.ledger.http_status)
            .bind(u.delivered_at.map(micros))
            .bind(micros(u.updated_at))
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
            if u.dead_letter {
                let body: String = row.try_get("body").map_err(db(OP))?;
                let letter = NewDeadLetter::from(DeadLetter {
                    processor: EXECUTOR_PROCESSOR.to_owned(),
                    event_id: Some(action_id),
                    topic: row.try_get("source_topic").map_err(db(OP))?,
                    partition: row.try_get("source_partition").map_err(db(OP))?,
                    offset: row.try_get("source_offset").map_err(db(OP))?,
                    schema_id: None,
                    raw: body.into_bytes(),
                    key: None,
                    headers: Vec::new(),
                    error_class: DELIVERY_ERROR_CLASS,
                    error_message: dead_letter_message(record),
                    attempts: u32::try_from(u.attempts).unwrap_or(0),
                    failed_at: u.updated_at,
                });
                insert_dead_letters(&mut tx, OP, &[DeadRow::new(&letter)]).await?;
            }
        }
        tx.commit().await.map_err(db(OP))?;
        Ok(())
    }

    pub(crate) async fn action(&self, action_id: Uuid) -> Result<Option<ActionRow>> {
        let row = sqlx::query(&format!(
            "SELECT {ACTION_COLUMNS} FROM actions WHERE action_id = ?1"
        ))
        .bind(action_id.hyphenated())
        .fetch_optional(&self.reader)
        .await
        .map_err(db("action"))?;
        row.as_ref().map(action_from_row).transpose()
    }

    pub(crate) async fn action_ledger(&self, action_id: Uuid) -> Result<Vec<LedgerRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {LEDGER_COLUMNS} FROM action_ledger WHERE action_id = ?1 ORDER BY id"
        ))
        .bind(action_id.hyphenated())
        .fetch_all(&self.reader)
        .await
        .map_err(db("action_ledger"))?;
        rows.iter().map(ledger_from_row).collect()
    }

    pub(crate) async fn actions_pending(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM actions WHERE status = 'pending'")
            .fetch_one(&self.reader)
            .await
            .map_err(db("actions_pending"))?;
        Ok(n.unsigned_abs())
    }

    /// Finished actions whose last change is older than `cutoff`, with their ledger rows (and
    /// any ledger row older than `cutoff` whose action is gone), in one transaction.
    pub(crate) async fn delete_finished_actions(
        &self,
        cutoff: DateTime<Utc>,
    ) -> Result<(u64, u64)> {
        const OP: &str = "maintain";
        let cutoff = micros(cutoff);
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        let ledger = sqlx::query(
            "DELETE FROM action_ledger
             WHERE action_id IN (SELECT action_id FROM actions
                                 WHERE status <> 'pending' AND updated_at < ?1)
                OR (at < ?1 AND action_id NOT IN (SELECT action_id FROM actions))",
        )
        .bind(cutoff)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?
        .rows_affected();
        let actions =
            sqlx::query("DELETE FROM actions WHERE status <> 'pending' AND updated_at < ?1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .map_err(db(OP))?
                .rows_affected();
        tx.commit().await.map_err(db(OP))?;
        Ok((actions, ledger))
    }
}

async fn insert_ledger(
    conn: &mut SqliteConnection,
    op: &'static str,
    rows: &[NewLedgerRow],
) -> Result<()> {
    for r in rows {
        sqlx::query(
            "INSERT INTO action_ledger (action_id, request_id, endpoint, attempt, outcome, \
             http_status, latency_ms, error, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .bind(r.action_id.hyphenated())
        .bind(r.request_id.map(|u| u.hyphenated()))
        .bind(r.endpoint.as_str())
        .bind(r.attempt)
        .bind(r.outcome.as_str())
        .bind(r.http_status)
        .bind(r.latency_ms)
        .bind(r.error.as_deref())
        .bind(micros(r.at))
        .execute(&mut *conn)
        .await
        .map_err(db(op))?;
    }
    Ok(())
}

fn uuid(op: &'static str, row: &SqliteRow, column: &str) -> Result<Uuid> {
    Ok(row
        .try_get::<Hyphenated, _>(column)
        .map_err(db(op))?
        .into_uuid())
}

fn time(op: &'static str, row: &SqliteRow, column: &str) -> Result<DateTime<Utc>> {
    from_micros(op, row.try_get(column).map_err(db(op))?)
}

fn opt_time(op: &'static str, row: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>> {
    let t: Option<i64> = row.try_get(column).map_err(db(op))?;
    t.map(|t| from_micros(op, t)).transpose()
}

fn count(op: &'static str, n: i64) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::corrupt(op, format!("count out of range: {n}")))
}

fn action_from_row(row: &SqliteRow) -> Result<ActionRow> {
    const OP: &str = "read actions";
    let status: String = row.try_get("status").map_err(db(OP))?;
    Ok(ActionRow {
        action_id: uuid(OP, row, "action_id")?,
        input_event_id: uuid(OP, row, "input_event_id")?,
        rule_id: row.try_get("rule_id").map_err(db(OP))?,
        rule_version: row.try_get("rule_version").map_err(db(OP))?,
        endpoint: row.try_get("endpoint").map_err(db(OP))?,
        device_id: row.try_get("device_id").map_err(db(OP))?,
        body: row.try_get("body").map_err(db(OP))?,
        destructive: row.try_get("destructive").map_err(db(OP))?,
        requested_at: time(OP, row, "requested_at")?,
        source: ActionSource {
            topic: row.try_get("source_topic").map_err(db(OP))?,
            partition: row.try_get("source_partition").map_err(db(OP))?,
            offset: row.try_get("source_offset").map_err(db(OP))?,
        },
        status: status
            .parse::<ActionStatus>()
            .map_err(|e| Error::corrupt(OP, e))?,
        attempts: count(OP, row.try_get("attempts").map_err(db(OP))?)?,
        next_attempt_at: opt_time(OP, row, "next_attempt_at")?,
        last_error: row.try_get("last_error").map_err(db(OP))?,
        last_http_status: http_status(OP, row.try_get("last_http_status").map_err(db(OP))?)?,
        updated_at: time(OP, row, "updated_at")?,
        delivered_at: opt_time(OP, row, "delivered_at")?,
    })
}

fn ledger_from_row(row: &SqliteRow) -> Result<LedgerRow> {
    const OP: &str = "read action_ledger";
    let outcome: String = row.try_get("outcome").map_err(db(OP))?;
    let latency: Option<i64> = row.try_get("latency_ms").map_err(db(OP))?;
    Ok(LedgerRow {
        id: row.try_get("id").map_err(db(OP))?,
        action_id: uuid(OP, row, "action_id")?,
        request_id: row
            .try_get::<Option<Hyphenated>, _>("request_id")
            .map_err(db(OP))?
            .map(Hyphenated::into_uuid),
        endpoint: row.try_get("endpoint").map_err(db(OP))?,
        attempt: count(OP, row.try_get("attempt").map_err(db(OP))?)?,
        outcome: outcome.parse().map_err(|e: String| Error::corrupt(OP, e))?,
        http_status: http_status(OP, row.try_get("http_status").map_err(db(OP))?)?,
        latency: latency.map(|ms| Duration::from_millis(ms.unsigned_abs())),
        error: row.try_get("error").map_err(db(OP))?,
        at: time(OP, row, "at")?,
    })
}
