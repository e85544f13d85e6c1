//! What operators change, kept in the store: the audit log, replay jobs, and the versions of a
//! projection (which one readers see, which one a rebuild is writing).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::{Error, Result, Store, prepare};

/// One change an operator made.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Id, in the order written.
    pub audit_id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who: an API key (`key:<id>`) or a local user (`local:<name>`).
    pub who: String,
    /// What, e.g. `dlq.replay`, `dlq.discard`, `replay.start`, `projection.switch`.
    pub action: String,
    /// To what, e.g. `dlq:42`, `replay:<job id>`, `projection:projector`.
    pub target: String,
    /// The details (reason, selection, versions).
    pub detail: Value,
}

/// Where a replay job's events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Working (or crashed: see [`ReplayJob::heartbeat_at`]).
    Running,
    /// Asked to stop; the worker stops at its next page.
    Cancelling,
    /// Finished.
    Done,
    /// Stopped by an error; can be resumed.
    Failed,
    /// Stopped by an operator.
    Cancelled,
}

impl JobState {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Cancelling => "cancelling",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether the job will never run again.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Done | JobState::Cancelled)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "running" => JobState::Running,
            "cancelling" => JobState::Cancelling,
            "done" => JobState::Done,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return Err(format!("unknown job state {s:?}")),
        })
    }
}

/// A replay from the event store, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayJob {
    /// Id (short, for the command line).
    pub job_id: String,
    /// Who started it.
    pub created_by: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// What it selects and how it runs (time range, types, aggregates, rate, actions), as the
    /// command line gave it.
    pub selection: Value,
    /// `topic:<name>` or `rebuild:<projection>`.
    pub target: String,
    /// State.
    pub state: JobState,
    /// Events selected when it started.
    pub total: u64,
    /// Events done.
    pub done: u64,
    /// The last event-store position done; a resumed job continues after it.
    pub cursor: i64,
    /// When it (last) started running.
    pub started_at: DateTime<Utc>,
    /// Last sign of life of its worker.
    pub heartbeat_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it failed.
    pub error: Option<String>,
}

impl ReplayJob {
    /// Whether its worker has been silent for `after` at `now` (a running job that is stale
    /// has crashed).
    pub fn is_stale(&self, now: DateTime<Utc>, after: Duration) -> bool {
        now - self.heartbeat_at
            >= chrono::TimeDelta::from_std(after).unwrap_or(chrono::TimeDelta::MAX)
    }
}

/// A new replay job.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReplayJob {
    /// Id.
    pub job_id: String,
    /// Who starts it.
    pub created_by: String,
    /// See [`ReplayJob::selection`].
    pub selection: Value,
    /// See [`ReplayJob::target`].
    pub target: String,
    /// Events selected.
    pub total: u64,
}

/// The state of one version of a projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// What readers see; writers write it.
    Live,
    /// Being rebuilt beside the live one; writers write it too.
    Building,
    /// Replaced; its rows are being or have been dropped.
    Retired,
}

impl VersionState {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Live => "live",
            VersionState::Building => "building",
            VersionState::Retired => "retired",
        }
    }
}

impl FromStr for VersionState {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "live" => VersionState::Live,
            "building" => VersionState::Building,
            "retired" => VersionState::Retired,
            _ => return Err(format!("unknown projection version state {s:?}")),
        })
    }
}

/// One version of a projection.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionVersion {
    /// The projection (the projector's name in the topology).
    pub projection: String,
    /// The version.
    pub version: i32,
    /// Its state.
    pub state: VersionState,
    /// The rebuild job that made it.
    pub job_id: Option<String>,
    /// When its state last changed.
    pub changed_at: DateTime<Utc>,
}

/// The versions a writer writes and a reader reads, from the rows of one projection.
/// `initial` is the version used while none is recorded.
pub(crate) fn targets(rows: &[ProjectionVersion], initial: i32) -> Vec<i32> {
    let live = rows
        .iter()
        .find(|r| r.state == VersionState::Live)
        .map_or(initial, |r| r.version);
    let mut out = vec![live];
    out.extend(
        rows.iter()
            .filter(|r| r.state == VersionState::Building)
            .map(|r| r.version),
    );
    out
}

/// Operator changes: audited, in the store (docs/operations.md).
impl Store {
    /// Records one operator change; returns its id.
    pub async fn audit(
        &self,
        who: &str,
        action: &str,
        target: &str,
        detail: &Value,
    ) -> Result<i64> {
        let at = prepare::trunc(Utc::now());
        match &self.inner {
            crate::Inner::Postgres(s) => s.audit(at, who, action, target, detail).await,
            crate::Inner::Sqlite(s) => s.audit(at, who, action, target, detail).await,
        }
    }

    /// Re-drives dead actions through their dead letters, in one transaction: of the letters
    /// `ids`, those pending, of the executor, whose action is dead, are marked `replayed` by
    /// `who` (audited), and their actions are pending again, due now, with their attempts so
    /// far (so one more failure makes them dead again, with a new letter). The executor then
    /// delivers them with their own ids: a receiver that saw one before dedups it. Returns the
    /// letters re-driven, ascending.
    pub async fn redrive_dead_actions(&self, ids: &[i64], who: &str) -> Result<Vec<i64>> {
        let at = prepare::trunc(Utc::now());
        crate::dispatch!(self.redrive_dead_actions(ids, who, at))
    }

    /// The audit log, oldest first: of one target, or all; at most `limit` rows (the newest).
    pub async fn audit_log(&self, target: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>> {
        crate::dispatch!(self.audit_log(target, limit))
    }

    /// Creates a replay job, `running`, with an audit row, in one transaction.
    pub async fn create_replay_job(&self, job: &NewReplayJob) -> Result<ReplayJob> {
        let now = prepare::trunc(Utc::now());
        crate::dispatch!(self.create_replay_job(job, now))?;
        self.replay_job(&job.job_id)
            .await?
            .ok_or_else(|| Error::corrupt("create_replay_job", "the job vanished"))
    }

    /// One replay job.
    pub async fn replay_job(&self, job_id: &str) -> Result<Option<ReplayJob>> {
        crate::dispatch!(self.replay_job(job_id))
    }

    /// The newest `limit` replay jobs, newest first.
    pub async fn replay_jobs(&self, limit: u32) -> Result<Vec<ReplayJob>> {
        crate::dispatch!(self.replay_jobs(limit))
    }

    /// Records a running job's progress and heartbeat; returns its state as stored, so the
    /// worker sees a cancel. Progress of a job that is no longer running or cancelling is not
    /// written.
    pub async fn replay_job_progress(
        &self,
        job_id: &str,
        cursor: i64,
        done: u64,
    ) -> Result<JobState> {
        let now = prepare::trunc(Utc::now());
        crate::dispatch!(self.replay_job_progress(job_id, cursor, to_i64(done), now))?
            .ok_or_else(|| unknown_job(job_id))
    }

    /// Ends a job: `done`, `failed` (with `error`) or `cancelled`.
    pub async fn finish_replay_job(
        &self,
        job_id: &str,
        state: JobState,
        error: Option<&str>,
    ) -> Result<()> {
        if !matches!(
            state,
            JobState::Done | JobState::Failed | JobState::Cancelled
        ) {
            return Err(Error::InvalidArgument {
                op: "finish_replay_job",
                reason: format!("a job finishes as done, failed or cancelled, not {state}"),
            });
        }
        let now = prepare::trunc(Utc::now());
        crate::dispatch!(self.finish_replay_job(job_id, state, error, now))
    }

    /// Takes a job over to resume it: a `failed` job, or a `running` one whose worker has
    /// not been heard of for `stale_after` (it crashed). Sets it `running` with a fresh
    /// heartbeat, audited, in one transaction. A job running elsewhere, or finished, is an
    /// [`Error::InvalidArgument`] that says which.
    pub async fn resume_replay_job(
        &self,
        job_id: &str,
        who: &str,
        stale_after: Duration,
    ) -> Result<ReplayJob> {
        let now = prepare::trunc(Utc::now());
        let Some(job) = self.replay_job(job_id).await? else {
            return Err(unknown_job(job_id));
        };
        let stale = job.is_stale(now, stale_after);
        let ok = match job.state {
            JobState::Failed => true,
            JobState::Running | JobState::Cancelling => stale,
            JobState::Done | JobState::Cancelled => false,
        };
        if !ok {
            let reason = if job.state.is_final() {
                format!("job {job_id} is {}; nothing to resume", job.state)
            } else {
                format!(
                    "job {job_id} is {} and its worker was heard of {}s ago; resume takes over \
                     after {}s of silence",
                    job.state,
                    (now - job.heartbeat_at).num_seconds(),
                    stale_after.as_secs()
                )
            };
            return Err(Error::InvalidArgument {
                op: "resume_replay_job",
                reason,
            });
        }
        let taken: bool =
            crate::dispatch!(self.take_replay_job(job_id, job.heartbeat_at, who, now))?;
        if !taken {
            return Err(Error::InvalidArgument {
                op: "resume_replay_job",
                reason: format!("job {job_id} was taken over by another worker just now"),
            });
        }
        self.replay_job(job_id)
            .await?
            .ok_or_else(|| unknown_job(job_id))
    }

    /// Asks a job to stop, audited. A running job moves to `cancelling` (its worker stops at
    /// its next page and marks it `cancelled`); a failed one, or a running one whose worker is
    /// silent for `stale_after`, is `cancelled` at once. Returns the state it is left in.
    pub async fn cancel_replay_job(
        &self,
        job_id: &str,
        who: &str,
        stale_after: Duration,
    ) -> Result<JobState> {
        let now = prepare::trunc(Utc::now());
        let Some(job) = self.replay_job(job_id).await? else {
            return Err(unknown_job(job_id));
        };
        let stale = job.is_stale(now, stale_after);
        let to = match job.state {
            JobState::Done | JobState::Cancelled => {
                return Err(Error::InvalidArgument {
                    op: "cancel_replay_job",
                    reason: format!("job {job_id} is {}; nothing to cancel", job.state),
                });
            }
            JobState::Failed => JobState::Cancelled,
            JobState::Running | JobState::Cancelling if stale => JobState::Cancelled,
            JobState::Running | JobState::Cancelling => JobState::Cancelling,
        };
        crate::dispatch!(self.set_replay_job_state(job_id, job.state, to, who, now))?;
        Ok(to)
    }

    /// The versions of `projection`, by version.
    pub async fn projection_versions(&self, projection: &str) -> Result<Vec<ProjectionVersion>> {
        crate::dispatch!(self.projection_versions(projection))
    }

    /// The versions a writer of `projection` writes, live first, then the one being rebuilt
    /// if any; `[initial]` while none is recorded. A writer asks once per batch, after
    /// reading the batch: see "Rebuilds" in docs/operations.md for why that is enough.
    pub async fn projection_targets(&self, projection: &str, initial: i32) -> Result<Vec<i32>> {
        Ok(targets(
            &self.projection_versions(projection).await?,
            initial,
        ))
    }

    /// The version readers of `projection` read; `initial` while none is recorded.
    pub async fn live_version(&self, projection: &str, initial: i32) -> Result<i32> {
        Ok(self.projection_targets(projection, initial).await?[0])
    }

    /// Starts building a new version of `projection` for `job_id`, in one transaction: records
    /// the live version (`initial` when none is recorded), then a `building` one above every
    /// version ever recorded, and deletes any rows already under that number. If `job_id`
    /// already has a building version (a resumed job), returns it unchanged. Another job's
    /// building version is an [`Error::InvalidArgument`].
    pub async fn begin_projection_version(
        &self,
        projection: &str,
        initial: i32,
        job_id: &str,
    ) -> Result<i32> {
        let now = prepare::trunc(Utc::now());
        crate::dispatch!(self.begin_projection_version(projection, initial, job_id, now))
    }

    /// Makes the building version `version` of `projection` live, in one transaction: copies
    /// the anomalies of the live version into it (they come from the inferencer, not the event
    /// store), retires the live version, and writes an audit row. Returns the retired version.
    pub async fn switch_projection_version(
        &self,
        projection: &str,
        version: i32,
        who: &str,
    ) -> Result<i32> {
        let now = prepare::trunc(Utc::now());
        crate::dispatch!(self.switch_projection_version(projection, version, who, now))
    }

    /// Forgets the building version `version` of `projection` (a cancelled rebuild) and
    /// deletes its rows.
    pub async fn abandon_projection_version(&self, projection: &str, version: i32) -> Result<u64> {
        crate::dispatch!(self.forget_projection_version(projection, version, "building"))?;
        self.drop_projection_version(version).await
    }

    /// Deletes the rows of the retired version `version` of `projection` and forgets it.
    pub async fn drop_retired_version(&self, projection: &str, version: i32) -> Result<u64> {
        let rows = self.drop_projection_version(version).await?;
        crate::dispatch!(self.forget_projection_version(projection, version, "retired"))?;
        Ok(rows)
    }
}

fn unknown_job(job_id: &str) -> Error {
    Error::InvalidArgument {
        op: "replay job",
        reason: format!("no replay job {job_id}"),
    }
}

/// The audit verb of a DLQ status change.
pub(crate) fn dlq_verb(status: crate::DlqStatus) -> &'static str {
    match status {
        crate::DlqStatus::Pending => "reopen",
        crate::DlqStatus::Replayed => "replay",
        crate::DlqStatus::Discarded => "discard",
    }
}

pub(crate) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: i32, state: VersionState) -> ProjectionVersion {
        ProjectionVersion {
            projection: "projector".into(),
            version,
            state,
            job_id: None,
            changed_at: Utc::now(),
        }
    }

    #[test]
    fn writers_write_live_then_building() {
        assert_eq!(targets(&[], 1), vec![1]);
        assert_eq!(
            targets(
                &[row(1, VersionState::Retired), row(2, VersionState::Live)],
                1
            ),
            vec![2]
        );
        assert_eq!(
            targets(
                &[row(2, VersionState::Live), row(3, VersionState::Building)],
                1
            ),
            vec![2, 3]
        );
    }

    #[test]
    fn job_states_round_trip() {
        for s in [
            JobState::Running,
            JobState::Cancelling,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
        }
        assert!("paused".parse::<JobState>().is_err());
    }
}
