//! Operator changes on SQLite: the audit log, replay jobs, projection versions. Every write is
//! one `BEGIN IMMEDIATE` transaction on the writer, so checks and changes cannot interleave.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqliteRow};

use super::{SqliteStore, parse_json};
use crate::error::db;
use crate::ops::{AuditEntry, JobState, NewReplayJob, ProjectionVersion, ReplayJob, to_i64};
use crate::prepare::{from_micros, micros};
use crate::{Error, Result};

const JOB_COLUMNS: &str = "job_id, created_by, created_at, selection, target, state, total, \
     done, cursor, started_at, heartbeat_at, finished_at, error";

const SELECT_VERSIONS: &str = "SELECT projection, version, state, job_id, changed_at \
     FROM projection_versions WHERE projection = ?1 ORDER BY version";

async fn audit_in(
    conn: &mut SqliteConnection,
    at: DateTime<Utc>,
    who: &str,
    action: &str,
    target: &str,
    detail: &Value,
) -> Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO audit_log (at, who, action, target, detail)
         VALUES (?1, ?2, ?3, ?4, ?5) RETURNING audit_id",
    )
    .bind(micros(at))
    .bind(who)
    .bind(action)
    .bind(target)
    .bind(detail.to_string())
    .fetch_one(conn)
    .await
    .map_err(db("audit"))
}

impl SqliteStore {
    pub async fn audit(
        &self,
        at: DateTime<Utc>,
        who: &str,
        action: &str,
        target: &str,
        detail: &Value,
    ) -> Result<i64> {
        let mut conn = self.writer.acquire().await.map_err(db("audit"))?;
        audit_in(&mut conn, at, who, action, target, detail).await
    }

    pub async fn redrive_dead_actions(
        &self,
        ids: &[i64],
        who: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<i64>> {
        const OP: &str = "redrive_dead_actions";
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        let list = serde_json::to_string(ids).map_err(|e| Error::corrupt(OP, e.to_string()))?;
        let mut redriven: Vec<(i64, uuid::fmt::Hyphenated)> = sqlx::query_as(
            "UPDATE dlq SET status = 'replayed', status_changed_by = ?2, status_changed_at = ?3
             WHERE dlq_id IN (SELECT value FROM json_each(?1)) AND status = 'pending'
               AND processor = ?4
               AND event_id IN (SELECT action_id FROM actions WHERE status = 'dead')
             RETURNING dlq_id, event_id",
        )
        .bind(&list)
        .bind(who)
        .bind(micros(at))
        .bind(crate::EXECUTOR_PROCESSOR)
        .fetch_all(&mut *tx)
        .await
        .map_err(db(OP))?;
        redriven.sort_unstable();
        for (id, action) in &redriven {
            sqlx::query(
                "UPDATE actions SET status = 'pending', next_attempt_at = ?2, updated_at = ?2
                 WHERE action_id = ?1 AND status = 'dead'",
            )
            .bind(action)
            .bind(micros(at))
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
            let detail = serde_json::json!({ "action_id": action.into_uuid() });
            audit_in(
                &mut tx,
                at,
                who,
                "dlq.replay",
                &format!("dlq:{id}"),
                &detail,
            )
            .await?;
        }
        tx.commit().await.map_err(db(OP))?;
        Ok(redriven.into_iter().map(|r| r.0).collect())
    }

    pub async fn audit_log(&self, target: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>> {
        const OP: &str = "audit_log";
        let rows = sqlx::query(
            "SELECT * FROM (
                 SELECT audit_id, at, who, action, target, detail FROM audit_log
                 WHERE ?1 IS NULL OR target = ?1
                 ORDER BY audit_id DESC LIMIT ?2
             ) ORDER BY audit_id",
        )
        .bind(target)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db(OP))?;
        rows.iter()
            .map(|row| {
                let detail: String = row.try_get("detail").map_err(db(OP))?;
                Ok(AuditEntry {
                    audit_id: row.try_get("audit_id").map_err(db(OP))?,
                    at: from_micros(OP, row.try_get("at").map_err(db(OP))?)?,
                    who: row.try_get("who").map_err(db(OP))?,
                    action: row.try_get("action").map_err(db(OP))?,
                    target: row.try_get("target").map_err(db(OP))?,
                    detail: parse_json(OP, &detail)?,
                })
            })
            .collect()
    }

    pub async fn create_replay_job(&self, job: &NewReplayJob, now: DateTime<Utc>) -> Result<()> {
        const OP: &str = "create_replay_job";
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        sqlx::query(
            "INSERT INTO replay_jobs (job_id, created_by, created_at, selection, target, state,
                                      total, started_at, heartbeat_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6, ?3, ?3)",
        )
        .bind(&job.job_id)
        .bind(&job.created_by)
        .bind(micros(now))
        .bind(job.selection.to_string())
        .bind(&job.target)
        .bind(to_i64(job.total))
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        let detail = serde_json::json!({"selection": job.selection, "target": job.target, "total": job.total});
        audit_in(
            &mut tx,
            now,
            &job.created_by,
            "replay.start",
            &format!("replay:{}", job.job_id),
            &detail,
        )
        .await?;
        tx.commit().await.map_err(db(OP))
    }

    pub async fn replay_job(&self, job_id: &str) -> Result<Option<ReplayJob>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM replay_jobs WHERE job_id = ?1"
        ))
        .bind(job_id)
        .fetch_optional(&self.reader)
        .await
        .map_err(db("replay_job"))?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub async fn replay_jobs(&self, limit: u32) -> Result<Vec<ReplayJob>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM replay_jobs ORDER BY created_at DESC, job_id LIMIT ?1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db("replay_jobs"))?;
        rows.iter().map(job_from_row).collect()
    }

    pub async fn replay_job_progress(
        &self,
        job_id: &str,
        cursor: i64,
        done: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<JobState>> {
        const OP: &str = "replay_job_progress";
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        sqlx::query(
            "UPDATE replay_jobs SET cursor = ?2, done = ?3, heartbeat_at = ?4
             WHERE job_id = ?1 AND state IN ('running', 'cancelling')",
        )
        .bind(job_id)
        .bind(cursor)
        .bind(done)
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM replay_jobs WHERE job_id = ?1")
                .bind(job_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db(OP))?;
        tx.commit().await.map_err(db(OP))?;
        state
            .map(|s| s.parse().map_err(|e: String| Error::corrupt(OP, e)))
            .transpose()
    }

    pub async fn finish_replay_job(
        &self,
        job_id: &str,
        state: JobState,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE replay_jobs SET state = ?2, error = ?3, finished_at = ?4, heartbeat_at = ?4
             WHERE job_id = ?1",
        )
        .bind(job_id)
        .bind(state.as_str())
        .bind(error)
        .bind(micros(now))
        .execute(&self.writer)
        .await
        .map_err(db("finish_replay_job"))?;
        Ok(())
    }

    pub async fn take_replay_job(
        &self,
        job_id: &str,
        seen_heartbeat: DateTime<Utc>,
        who: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        const OP: &str = "resume_replay_job";
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        let taken = sqlx::query(
            "UPDATE replay_jobs SET state = 'running', heartbeat_at = ?3, started_at = ?3,
                                    finished_at = NULL, error = NULL
             WHERE job_id = ?1 AND heartbeat_at = ?2
               AND state IN ('running', 'cancelling', 'failed')",
        )
        .bind(job_id)
        .bind(micros(seen_heartbeat))
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?
        .rows_affected()
            == 1;
        if taken {
            audit_in(
                &mut tx,
                now,
                who,
                "replay.resume",
                &format!("replay:{job_id}"),
                &Value::Null,
            )
            .await?;
        }
        tx.commit().await.map_err(db(OP))?;
        Ok(taken)
    }

    pub async fn set_replay_job_state(
        &self,
        job_id: &str,
        from: JobState,
        to: JobState,
        who: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        const OP: &str = "cancel_replay_job";
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        sqlx::query(
            "UPDATE replay_jobs SET state = ?3,
                    finished_at = CASE WHEN ?3 = 'cancelled' THEN ?4 ELSE finished_at END
             WHERE job_id = ?1 AND state = ?2",
        )
        .bind(job_id)
        .bind(from.as_str())
        .bind(to.as_str())
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        audit_in(
            &mut tx,
            now,
            who,
            "replay.cancel",
            &format!("replay:{job_id}"),
            &serde_json::json!({"from": from.as_str(), "to": to.as_str()}),
        )
        .await?;
        tx.commit().await.map_err(db(OP))
    }

    pub async fn projection_versions(&self, projection: &str) -> Result<Vec<ProjectionVersion>> {
        let rows = sqlx::query(SELECT_VERSIONS)
            .bind(projection)
            .fetch_all(&self.reader)
            .await
            .map_err(db("projection_versions"))?;
        rows.iter().map(version_from_row).collect()
    }

    pub async fn begin_projection_version(
        &self,
        projection: &str,
        initial: i32,
        job_id: &str,
        now: DateTime<Utc>,
    ) -> Result<i32> {
        const OP: &str = "begin_projection_version";
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        let rows = sqlx::query(SELECT_VERSIONS)
            .bind(projection)
            .fetch_all(&mut *tx)
            .await
            .map_err(db(OP))?;
        let rows: Vec<ProjectionVersion> =
            rows.iter().map(version_from_row).collect::<Result<_>>()?;
        if let Some(b) = rows
            .iter()
            .find(|r| r.state == crate::VersionState::Building)
        {
            if b.job_id.as_deref() == Some(job_id) {
                return Ok(b.version);
            }
            return Err(Error::InvalidArgument {
                op: OP,
                reason: format!(
                    "version {} of {projection} is already being rebuilt by job {}",
                    b.version,
                    b.job_id.as_deref().unwrap_or("?")
                ),
            });
        }
        let live = crate::ops::targets(&rows, initial)[0];
        if !rows.iter().any(|r| r.state == crate::VersionState::Live) {
            sqlx::query(
                "INSERT INTO projection_versions (projection, version, state, changed_at)
                 VALUES (?1, ?2, 'live', ?3)",
            )
            .bind(projection)
            .bind(live)
            .bind(micros(now))
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        }
        let next = rows
            .iter()
            .map(|r| r.version)
            .max()
            .unwrap_or(live)
            .max(live)
            + 1;
        for table in crate::projections::VERSIONED_TABLES {
            sqlx::query(&format!("DELETE FROM {table} WHERE version = ?1"))
                .bind(next)
                .execute(&mut *tx)
                .await
                .map_err(db(OP))?;
        }
        sqlx::query(
            "INSERT INTO projection_versions (projection, version, state, job_id, changed_at)
             VALUES (?1, ?2, 'building', ?3, ?4)",
        )
        .bind(projection)
        .bind(next)
        .bind(job_id)
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        tx.commit().await.map_err(db(OP))?;
        Ok(next)
    }

    pub async fn switch_projection_version(
        &self,
        projection: &str,
        version: i32,
        who: &str,
        now: DateTime<Utc>,
    ) -> Result<i32> {
        const OP: &str = "switch_projection_version";
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db(OP))?;
        let live: Option<i32> = sqlx::query_scalar(
            "SELECT version FROM projection_versions WHERE projection = ?1 AND state = 'live'",
        )
        .bind(projection)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?;
        let building: Option<i32> = sqlx::query_scalar(
            "SELECT version FROM projection_versions
             WHERE projection = ?1 AND state = 'building' AND version = ?2",
        )
        .bind(projection)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(OP))?;
        let (Some(live), Some(_)) = (live, building) else {
            return Err(Error::InvalidArgument {
                op: OP,
                reason: format!("version {version} of {projection} is not being rebuilt"),
            });
        };
        sqlx::query(
            "INSERT OR IGNORE INTO anomalies (version, event_id, input_event_id, device_id, at,
                                              score, threshold, model_name, model_version,
                                              features, site, projected_at)
             SELECT ?2, event_id, input_event_id, device_id, at, score, threshold, model_name,
                    model_version, features, site, projected_at
             FROM anomalies WHERE version = ?1",
        )
        .bind(live)
        .bind(version)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        sqlx::query(
            "UPDATE projection_versions
             SET state = CASE version WHEN ?2 THEN 'retired' ELSE 'live' END, changed_at = ?4
             WHERE projection = ?1 AND version IN (?2, ?3)",
        )
        .bind(projection)
        .bind(live)
        .bind(version)
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        audit_in(
            &mut tx,
            now,
            who,
            "projection.switch",
            &format!("projection:{projection}"),
            &serde_json::json!({"from": live, "to": version}),
        )
        .await?;
        tx.commit().await.map_err(db(OP))?;
        Ok(live)
    }

    pub async fn forget_projection_version(
        &self,
        projection: &str,
        version: i32,
        state: &str,
    ) -> Result<()> {
        sqlx::query(
            "DELETE FROM projection_versions
             WHERE projection = ?1 AND version = ?2 AND state = ?3",
        )
        .bind(projection)
        .bind(version)
        .bind(state)
        .execute(&self.writer)
        .await
        .map_err(db("forget_projection_version"))?;
        Ok(())
    }
}

fn job_from_row(row: &SqliteRow) -> Result<ReplayJob> {
    const OP: &str = "read replay_jobs";
    let state: String = row.try_get("state").map_err(db(OP))?;
    let selection: String = row.try_get("selection").map_err(db(OP))?;
    let count = |c: &str| -> Result<u64> {
        Ok(u64::try_from(row.try_get::<i64, _>(c).map_err(db(OP))?).unwrap_or(0))
    };
    let time =
        |c: &str| -> Result<DateTime<Utc>> { from_micros(OP, row.try_get(c).map_err(db(OP))?) };
    let finished: Option<i64> = row.try_get("finished_at").map_err(db(OP))?;
    Ok(ReplayJob {
        job_id: row.try_get("job_id").map_err(db(OP))?,
        created_by: row.try_get("created_by").map_err(db(OP))?,
        created_at: time("created_at")?,
        selection: parse_json(OP, &selection)?,
        target: row.try_get("target").map_err(db(OP))?,
        state: state.parse().map_err(|e: String| Error::corrupt(OP, e))?,
        total: count("total")?,
        done: count("done")?,
        cursor: row.try_get("cursor").map_err(db(OP))?,
        started_at: time("started_at")?,
        heartbeat_at: time("heartbeat_at")?,
        finished_at: finished.map(|t| from_micros(OP, t)).transpose()?,
        error: row.try_get("error").map_err(db(OP))?,
    })
}

fn version_from_row(row: &SqliteRow) -> Result<ProjectionVersion> {
    const OP: &str = "read projection_versions";
    let state: String = row.try_get("state").map_err(db(OP))?;
    Ok(ProjectionVersion {
        projection: row.try_get("projection").map_err(db(OP))?,
        version: row.try_get("version").map_err(db(OP))?,
        state: state.parse().map_err(|e: String| Error::corrupt(OP, e))?,
        job_id: row.try_get("job_id").map_err(db(OP))?,
        changed_at: from_micros(OP, row.try_get("changed_at").map_err(db(OP))?)?,
    })
}
