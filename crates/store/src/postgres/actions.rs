//! The executor's action schedule, dedup and ledger on PostgreSQL: one statement per table per
//! batch at intake, claims by `FOR UPDATE SKIP LOCKED`, one locked row per recorded attempt.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sluice_runtime::DeadLetter;
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgRow};
use uuid::Uuid;

use super::{PgStore, UPSERT_OFFSETS, insert_dead_letters};
use crate::actions::{
    ActionRow, ActionSource, ActionStatus, AttemptRecord, Current, DELIVERY_ERROR_CLASS, DueAction,
    EXECUTOR_PROCESSOR, EnqueueOutcome, LedgerRow, NewLedgerRow, NextStep, PreparedEnqueue,
    dead_letter_message, http_status, transition,
};
use crate::error::db;
use crate::model::NewDeadLetter;
use crate::prepare::DeadRow;
use crate::{Error, Result};

const ACTION_COLUMNS: &str = "action_id, input_event_id, rule_id, rule_version, endpoint, \
     device_id, body, destructive, requested_at, source_topic, source_partition, source_offset, \
     status, attempts, next_attempt_at, last_error, last_http_status, updated_at, delivered_at";

const LEDGER_COLUMNS: &str =
    "id, action_id, request_id, endpoint, attempt, outcome, http_status, latency_ms, error, at";

/// New actions, inserted in dedup-key order (concurrent batches sharing keys lock them in the
/// same order); a key or id already stored is skipped. Only the ids returned are new.
const INSERT_ACTIONS: &str = "
INSERT INTO actions (action_id, input_event_id, rule_id, rule_version, endpoint, device_id, body,
                     destructive, requested_at, source_topic, source_partition, source_offset,
                     status, attempts, next_attempt_at, updated_at)
SELECT u.action_id, u.input_event_id, u.rule_id, u.rule_version, u.endpoint, u.device_id,
       u.body, u.destructive, u.requested_at, u.topic, u.part, u.off, u.status, 0,
       CASE WHEN u.status = 'pending' THEN $14 END, $14
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[], $7::text[],
            $8::bool[], $9::timestamptz[], $10::text[], $11::int4[], $12::int8[], $13::text[])
     AS u(action_id, input_event_id, rule_id, rule_version, endpoint, device_id, body,
          destructive, requested_at, topic, part, off, status)
ORDER BY u.input_event_id, u.rule_id, u.rule_version, u.endpoint
ON CONFLICT DO NOTHING
RETURNING action_id";

/// For each request that was not stored, the action holding its key, else its id.
const HOLDERS: &str = "
SELECT u.ord, h.action_id
FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::uuid[])
     WITH ORDINALITY AS u(input_event_id, rule_id, rule_version, endpoint, action_id, ord)
JOIN LATERAL (
    SELECT action_id FROM (
        SELECT a.action_id, 0 AS pref FROM actions a
        WHERE a.input_event_id = u.input_event_id AND a.rule_id = u.rule_id
          AND a.rule_version = u.rule_version AND a.endpoint = u.endpoint
        UNION ALL
        SELECT a.action_id, 1 AS pref FROM actions a WHERE a.action_id = u.action_id
    ) c
    ORDER BY pref
    LIMIT 1
) h ON true";

const INSERT_LEDGER: &str = "
INSERT INTO action_ledger (action_id, request_id, endpoint, attempt, outcome, http_status,
                           latency_ms, error, at)
SELECT u.action_id, u.request_id, u.endpoint, u.attempt, u.outcome, u.http_status,
       u.latency_ms, u.error, u.at
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[], $6::int4[], $7::int8[],
            $8::text[], $9::timestamptz[])
     WITH ORDINALITY AS u(action_id, request_id, endpoint, attempt, outcome, http_status,
                          latency_ms, error, at, ord)
ORDER BY u.ord";

/// Due pending actions, oldest first, each pushed to the lease's end in the same statement.
/// Rows another claimer holds are skipped; one it has just pushed is re-checked against
/// `next_attempt_at <= $1` after its lock is released (and so skipped too).
const CLAIM: &str = "
WITH due AS (
    SELECT action_id, next_attempt_at AS due_at
    FROM actions
    WHERE status = 'pending' AND next_attempt_at <= $1
    ORDER BY next_attempt_at, action_id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE actions a SET next_attempt_at = $3
FROM due
WHERE a.action_id = due.action_id
RETURNING a.action_id, a.input_event_id, a.rule_id, a.rule_version, a.endpoint, a.device_id,
          a.body, a.destructive, a.requested_at, a.attempts, due.due_at";

const UPDATE_AFTER_ATTEMPT: &str = "
UPDATE actions SET
    status = $2,
    attempts = $3,
    next_attempt_at = $4,
    last_error = CASE WHEN $5 AND $6::text IS NOT NULL THEN $6 ELSE last_error END,
    last_http_status = CASE WHEN $5 THEN $7 ELSE last_http_status END,
    delivered_at = coalesce($8, delivered_at),
    updated_at = $9
WHERE action_id = $1";

/// Finished actions past retention, with their ledger rows (and any ledger row past retention
/// whose action is gone), in one statement.
const DELETE_FINISHED: &str = "
WITH gone AS (
    DELETE FROM actions WHERE status <> 'pending' AND updated_at < $1
    RETURNING action_id
), ledger AS (
    DELETE FROM action_ledger l
    WHERE l.action_id IN (SELECT action_id FROM gone)
       OR (l.at < $1 AND NOT EXISTS (SELECT 1 FROM actions a WHERE a.action_id = l.action_id))
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM ledger)";

impl PgStore {
    pub(crate) async fn enqueue_actions(&self, p: &PreparedEnqueue<'_>) -> Result<EnqueueOutcome> {
        const OP: &str = "enqueue_actions";
        let mut tx = self.pool.begin().await.map_err(db(OP))?;

        let fresh: Vec<_> = p.fresh_actions().collect();
        let mut stored: HashSet<Uuid> = HashSet::new();
        let mut holder: HashMap<usize, Uuid> = HashMap::new();
        if !fresh.is_empty() {
            let ids: Vec<Uuid> = fresh.iter().map(|a| a.action_id).collect();
            let inputs: Vec<Uuid> = fresh.iter().map(|a| a.input_event_id).collect();
            let rules: Vec<&str> = fresh.iter().map(|a| a.rule_id.as_str()).collect();
            let versions: Vec<i32> = fresh.iter().map(|a| a.rule_version).collect();
            let endpoints: Vec<&str> = fresh.iter().map(|a| a.endpoint.as_str()).collect();
            let inserted: Vec<Uuid> = sqlx::query_scalar(INSERT_ACTIONS)
                .bind(&ids)
                .bind(&inputs)
                .bind(&rules)
                .bind(&versions)
                .bind(&endpoints)
                .bind(
                    fresh
                        .iter()
                        .map(|a| a.device_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(fresh.iter().map(|a| a.body.as_str()).collect::<Vec<_>>())
                .bind(fresh.iter().map(|a| a.destructive).collect::<Vec<_>>())
                .bind(
                    fresh
                        .iter()
                        .map(|a| crate::prepare::trunc(a.requested_at))
                        .collect::<Vec<_>>(),
                )
                .bind(
                    fresh
                        .iter()
                        .map(|a| a.source.topic.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(fresh.iter().map(|a| a.source.partition).collect::<Vec<_>>())
                .bind(fresh.iter().map(|a| a.source.offset).collect::<Vec<_>>())
                .bind(
                    fresh
                        .iter()
                        .map(|a| a.intake.status().as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(p.now)
                .fetch_all(&mut *tx)
                .await
                .map_err(db(OP))?;
            stored.extend(inserted);

            if stored.len() < fresh.len() {
                // Read after the insert: a conflicting transaction has committed by now (the
                // insert waited for it), and each statement sees what committed before it.
                let missing: Vec<usize> = (0..fresh.len())
                    .filter(|&k| !stored.contains(&ids[k]))
                    .collect();
                let rows: Vec<(i64, Uuid)> = sqlx::query_as(HOLDERS)
                    .bind(missing.iter().map(|&k| inputs[k]).collect::<Vec<_>>())
                    .bind(missing.iter().map(|&k| rules[k]).collect::<Vec<_>>())
                    .bind(missing.iter().map(|&k| versions[k]).collect::<Vec<_>>())
                    .bind(missing.iter().map(|&k| endpoints[k]).collect::<Vec<_>>())
                    .bind(missing.iter().map(|&k| ids[k]).collect::<Vec<_>>())
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db(OP))?;
                for (ord, action_id) in rows {
                    let k = usize::try_from(ord - 1)
                        .ok()
                        .and_then(|m| missing.get(m))
                        .ok_or_else(|| Error::corrupt(OP, "holder lookup out of range"))?;
                    holder.insert(p.fresh[*k], action_id);
                }
            }
        }
        let (outcome, ledger) = p.finish(&stored, &holder)?;
        insert_ledger(&mut tx, OP, &ledger).await?;

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
        let rows = sqlx::query(CLAIM)
            .bind(now)
            .bind(i64::from(limit))
            .bind(until)
            .fetch_all(&self.pool)
            .await
            .map_err(db(OP))?;
        let mut due = rows
            .iter()
            .map(|row| {
                Ok(DueAction {
                    action_id: row.try_get("action_id").map_err(db(OP))?,
                    input_event_id: row.try_get("input_event_id").map_err(db(OP))?,
                    rule_id: row.try_get("rule_id").map_err(db(OP))?,
                    rule_version: row.try_get("rule_version").map_err(db(OP))?,
                    endpoint: row.try_get("endpoint").map_err(db(OP))?,
                    device_id: row.try_get("device_id").map_err(db(OP))?,
                    body: row.try_get("body").map_err(db(OP))?,
                    destructive: row.try_get("destructive").map_err(db(OP))?,
                    requested_at: row.try_get("requested_at").map_err(db(OP))?,
                    attempts: count(OP, row.try_get("attempts").map_err(db(OP))?)?,
                    due_at: row.try_get("due_at").map_err(db(OP))?,
                    lease_until: until,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // RETURNING has no order.
        due.sort_by_key(|d| (d.due_at, d.action_id));
        Ok(due)
    }

    pub(crate) async fn record_attempt(
        &self,
        action_id: Uuid,
        record: &AttemptRecord,
        next: NextStep,
    ) -> Result<()> {
        const OP: &str = "record_attempt";
        let mut tx = self.pool.begin().await.map_err(db(OP))?;
        let row = sqlx::query(
            "SELECT status, attempts, endpoint, body, source_topic, source_partition,
                    source_offset
             FROM actions WHERE action_id = $1 FOR UPDATE",
        )
        .bind(action_id)
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
            sqlx::query(UPDATE_AFTER_ATTEMPT)
                .bind(action_id)
                .bind(u.status.as_str())
                .bind(u.attempts)
                .bind(u.next_attempt_at)
                .bind(u.counts)
                .bind(record.error.as_deref())
                .bind(t.ledger.http_status)
                .bind(u.delivered_at)
                .bind(u.updated_at)
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
            "SELECT {ACTION_COLUMNS} FROM actions WHERE action_id = $1"
        ))
        .bind(action_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("action"))?;
        row.as_ref().map(action_from_row).transpose()
    }

    pub(crate) async fn action_ledger(&self, action_id: Uuid) -> Result<Vec<LedgerRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {LEDGER_COLUMNS} FROM action_ledger WHERE action_id = $1 ORDER BY id"
        ))
        .bind(action_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("action_ledger"))?;
        rows.iter().map(ledger_from_row).collect()
    }

    pub(crate) async fn actions_pending(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM actions WHERE status = 'pending'")
            .fetch_one(&self.pool)
            .await
            .map_err(db("actions_pending"))?;
        Ok(n.unsigned_abs())
    }

    /// Retention of finished actions and their ledger rows (see [`DELETE_FINISHED`]).
    pub(crate) async fn delete_finished_actions(
        &self,
        cutoff: DateTime<Utc>,
    ) -> Result<(u64, u64)> {
        let (actions, ledger): (i64, i64) = sqlx::query_as(DELETE_FINISHED)
            .bind(cutoff)
            .fetch_one(&self.pool)
            .await
            .map_err(db("maintain"))?;
        Ok((actions.unsigned_abs(), ledger.unsigned_abs()))
    }
}

async fn insert_ledger(
    conn: &mut PgConnection,
    op: &'static str,
    rows: &[NewLedgerRow],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(INSERT_LEDGER)
        .bind(rows.iter().map(|r| r.action_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.request_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.endpoint.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.attempt).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.outcome.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.http_status).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.latency_ms).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await
        .map_err(db(op))?;
    Ok(())
}

fn count(op: &'static str, n: i32) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::corrupt(op, format!("negative count {n}")))
}

fn action_from_row(row: &PgRow) -> Result<ActionRow> {
    const OP: &str = "read actions";
    let status: String = row.try_get("status").map_err(db(OP))?;
    let last_http: Option<i32> = row.try_get("last_http_status").map_err(db(OP))?;
    Ok(ActionRow {
        action_id: row.try_get("action_id").map_err(db(OP))?,
        input_event_id: row.try_get("input_event_id").map_err(db(OP))?,
        rule_id: row.try_get("rule_id").map_err(db(OP))?,
        rule_version: row.try_get("rule_version").map_err(db(OP))?,
        endpoint: row.try_get("endpoint").map_err(db(OP))?,
        device_id: row.try_get("device_id").map_err(db(OP))?,
        body: row.try_get("body").map_err(db(OP))?,
        destructive: row.try_get("destructive").map_err(db(OP))?,
        requested_at: row.try_get("requested_at").map_err(db(OP))?,
        source: ActionSource {
            topic: row.try_get("source_topic").map_err(db(OP))?,
            partition: row.try_get("source_partition").map_err(db(OP))?,
            offset: row.try_get("source_offset").map_err(db(OP))?,
        },
        status: status
            .parse::<ActionStatus>()
            .map_err(|e| Error::corrupt(OP, e))?,
        attempts: count(OP, row.try_get("attempts").map_err(db(OP))?)?,
        next_attempt_at: row.try_get("next_attempt_at").map_err(db(OP))?,
        last_error: row.try_get("last_error").map_err(db(OP))?,
        last_http_status: http_status(OP, last_http.map(i64::from))?,
        updated_at: row.try_get("updated_at").map_err(db(OP))?,
        delivered_at: row.try_get("delivered_at").map_err(db(OP))?,
    })
}

fn ledger_from_row(row: &PgRow) -> Result<LedgerRow> {
    const OP: &str = "read action_ledger";
    let outcome: String = row.try_get("outcome").map_err(db(OP))?;
    let http: Option<i32> = row.try_get("http_status").map_err(db(OP))?;
    let latency: Option<i64> = row.try_get("latency_ms").map_err(db(OP))?;
    Ok(LedgerRow {
        id: row.try_get("id").map_err(db(OP))?,
        action_id: row.try_get("action_id").map_err(db(OP))?,
        request_id: row.try_get("request_id").map_err(db(OP))?,
        endpoint: row.try_get("endpoint").map_err(db(OP))?,
        attempt: count(OP, row.try_get("attempt").map_err(db(OP))?)?,
        outcome: outcome.parse().map_err(|e: String| Error::corrupt(OP, e))?,
        http_status: http_status(OP, http.map(i64::from))?,
        latency: latency.map(|ms| Duration::from_millis(ms.unsigned_abs())),
        error: row.try_get("error").map_err(db(OP))?,
        at: row.try_get("at").map_err(db(OP))?,
    })
}
