//! The executor's durable action schedule, its deduplication and the action ledger: what goes
//! in ([`NewAction`], [`AttemptRecord`], [`NextStep`]), what comes out ([`DueAction`],
//! [`ActionRow`], [`LedgerRow`]), and the backend-independent part of
//! [`Store::enqueue_actions`](crate::Store::enqueue_actions) and
//! [`Store::record_attempt`](crate::Store::record_attempt): duplicates within a batch, and
//! what an attempt does to an action.
//!
//! Deliveries are deduplicated on the [`DedupKey`] (input event id, rule id, rule version,
//! endpoint): one action per key is ever stored (within retention), so a restart or a replay
//! never delivers twice.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::ConsumerOffset;
use crate::prepare::trunc;
use crate::{Error, Result};

/// The processor name of the dead letters written when delivery gives up.
pub const EXECUTOR_PROCESSOR: &str = "executor";

/// The error class of the dead letters written when delivery gives up.
pub const DELIVERY_ERROR_CLASS: &str = "delivery";

/// What the executor decided at intake, before any delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// Deliver: stored `pending`, due at once.
    Deliver,
    /// Never deliver: the request says it is suppressed (a replay). Stored `suppressed`, with a
    /// `suppressed` ledger row.
    Suppressed,
    /// Never deliver: policy refused it (a destructive action no rule allows). Stored `denied`,
    /// with a `denied` ledger row carrying the reason.
    Denied {
        /// Why, for the ledger.
        reason: String,
    },
}

/// Where a request was consumed: the provenance of its dead letter if delivery gives up.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActionSource {
    /// Topic (`actions.requested`).
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset of the request message.
    pub offset: i64,
}

/// The key deliveries are deduplicated on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DedupKey {
    /// The event that matched the rule.
    pub input_event_id: Uuid,
    /// The rule.
    pub rule_id: String,
    /// The rule's version.
    pub rule_version: i32,
    /// The executor endpoint's name.
    pub endpoint: String,
}

/// One `action.requested` event to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAction {
    /// The request event's id (its envelope `event_id`): the action's id.
    pub action_id: Uuid,
    /// The event that matched the rule (payload `input_event_id`).
    pub input_event_id: Uuid,
    /// The rule (payload `rule_id`).
    pub rule_id: String,
    /// The rule's version (payload `rule_version`).
    pub rule_version: i32,
    /// The executor endpoint's name (payload `endpoint`).
    pub endpoint: String,
    /// The device (the request's `aggregate_id`).
    pub device_id: String,
    /// The rendered JSON body to deliver (payload `body`), stored as given.
    pub body: String,
    /// Whether the action is destructive (payload `destructive`).
    pub destructive: bool,
    /// When the action was requested (the request event's `ingested_at`); microseconds kept.
    pub requested_at: DateTime<Utc>,
    /// The executor's intake decision.
    pub intake: Intake,
    /// Where the request was consumed.
    pub source: ActionSource,
}

impl NewAction {
    /// Its dedup key.
    pub fn dedup_key(&self) -> DedupKey {
        DedupKey {
            input_event_id: self.input_event_id,
            rule_id: self.rule_id.clone(),
            rule_version: self.rule_version,
            endpoint: self.endpoint.clone(),
        }
    }
}

/// What [`enqueue_actions`](crate::Store::enqueue_actions) did. Each request is in exactly one
/// list, in batch order, by its own action id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnqueueOutcome {
    /// Stored `pending`, due now.
    pub enqueued: Vec<Uuid>,
    /// Not stored: their dedup key (or action id) is already stored, or appears earlier in the
    /// batch. Each got a `duplicate` ledger row on the action that holds the key.
    pub duplicates: Vec<Uuid>,
    /// Stored `denied`.
    pub denied: Vec<Uuid>,
    /// Stored `suppressed`.
    pub suppressed: Vec<Uuid>,
}

/// Where an action stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActionStatus {
    /// Waiting for its next attempt (`next_attempt_at`).
    Pending,
    /// Delivered (a 2xx answer).
    Delivered,
    /// Given up on after the last retry; a dead letter holds it.
    Dead,
    /// Refused by policy at intake; never attempted.
    Denied,
    /// Suppressed at intake (a replay); never attempted.
    Suppressed,
}

impl ActionStatus {
    /// The status as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionStatus::Pending => "pending",
            ActionStatus::Delivered => "delivered",
            ActionStatus::Dead => "dead",
            ActionStatus::Denied => "denied",
            ActionStatus::Suppressed => "suppressed",
        }
    }
}

impl fmt::Display for ActionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ActionStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pending" => ActionStatus::Pending,
            "delivered" => ActionStatus::Delivered,
            "dead" => ActionStatus::Dead,
            "denied" => ActionStatus::Denied,
            "suppressed" => ActionStatus::Suppressed,
            _ => return Err(format!("unknown action status {s:?}")),
        })
    }
}

/// What one ledger row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LedgerOutcome {
    /// An attempt that delivered.
    Delivered,
    /// A failed attempt recorded after the action had already left `pending` (a claim whose
    /// lease ran out while another executor finished it): audited, changes nothing.
    Failed,
    /// A failed attempt; another is scheduled.
    Retrying,
    /// Refused by policy at intake.
    Denied,
    /// Not attempted: the endpoint's circuit breaker is open; rescheduled, not counted.
    ShortCircuited,
    /// Suppressed at intake.
    Suppressed,
    /// A request absorbed because its dedup key (or id) was already stored.
    Duplicate,
    /// The last failed attempt: the action went to the DLQ.
    Dead,
}

impl LedgerOutcome {
    /// The outcome as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerOutcome::Delivered => "delivered",
            LedgerOutcome::Failed => "failed",
            LedgerOutcome::Retrying => "retrying",
            LedgerOutcome::Denied => "denied",
            LedgerOutcome::ShortCircuited => "short_circuited",
            LedgerOutcome::Suppressed => "suppressed",
            LedgerOutcome::Duplicate => "duplicate",
            LedgerOutcome::Dead => "dead",
        }
    }
}

impl fmt::Display for LedgerOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LedgerOutcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "delivered" => LedgerOutcome::Delivered,
            "failed" => LedgerOutcome::Failed,
            "retrying" => LedgerOutcome::Retrying,
            "denied" => LedgerOutcome::Denied,
            "short_circuited" => LedgerOutcome::ShortCircuited,
            "suppressed" => LedgerOutcome::Suppressed,
            "duplicate" => LedgerOutcome::Duplicate,
            "dead" => LedgerOutcome::Dead,
            _ => return Err(format!("unknown ledger outcome {s:?}")),
        })
    }
}

/// A pending action handed to one claimer by [`claim_due_actions`](crate::Store::claim_due_actions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueAction {
    /// The action.
    pub action_id: Uuid,
    /// The event that matched the rule.
    pub input_event_id: Uuid,
    /// The rule.
    pub rule_id: String,
    /// The rule's version.
    pub rule_version: i32,
    /// The endpoint's name.
    pub endpoint: String,
    /// The device.
    pub device_id: String,
    /// The JSON body to deliver.
    pub body: String,
    /// Whether it is destructive.
    pub destructive: bool,
    /// When it was requested.
    pub requested_at: DateTime<Utc>,
    /// Attempts counted so far; this one is number `attempts + 1`.
    pub attempts: u32,
    /// When it was due.
    pub due_at: DateTime<Utc>,
    /// Until when this claimer holds it: after that it is due again (the claimer is presumed
    /// dead), unless an attempt was recorded.
    pub lease_until: DateTime<Utc>,
}

/// A stored action, as [`Store::action`](crate::Store::action) reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRow {
    /// The action's id (the request event's id).
    pub action_id: Uuid,
    /// The event that matched the rule.
    pub input_event_id: Uuid,
    /// The rule.
    pub rule_id: String,
    /// The rule's version.
    pub rule_version: i32,
    /// The endpoint's name.
    pub endpoint: String,
    /// The device.
    pub device_id: String,
    /// The JSON body to deliver.
    pub body: String,
    /// Whether it is destructive.
    pub destructive: bool,
    /// When it was requested.
    pub requested_at: DateTime<Utc>,
    /// Where the request was consumed.
    pub source: ActionSource,
    /// Where it stands.
    pub status: ActionStatus,
    /// Attempts counted (short-circuits are not).
    pub attempts: u32,
    /// When it is next due (or, while claimed, when the lease ends); `None` unless pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
    /// The last attempt's HTTP status, when there was an answer.
    pub last_http_status: Option<u16>,
    /// When the status, attempts or schedule last changed (by the store's clock at intake, by
    /// the attempt's time after). Not moved by claims. Retention goes by it.
    pub updated_at: DateTime<Utc>,
    /// When it was delivered.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// One row of the action ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    /// Ledger id: rows of one action are in id order.
    pub id: i64,
    /// The action.
    pub action_id: Uuid,
    /// For `duplicate` rows, the id of the request that was absorbed; otherwise `None`.
    pub request_id: Option<Uuid>,
    /// The endpoint's name.
    pub endpoint: String,
    /// The attempt's number (1 for the first); for a short-circuit, the number of the attempt
    /// that was skipped; 0 for intake rows (`denied`, `suppressed`, `duplicate`).
    pub attempt: u32,
    /// What happened.
    pub outcome: LedgerOutcome,
    /// The HTTP status, when there was an answer.
    pub http_status: Option<u16>,
    /// How long the request took, in whole milliseconds.
    pub latency: Option<Duration>,
    /// The error, or the reason of a denial.
    pub error: Option<String>,
    /// When it happened.
    pub at: DateTime<Utc>,
}

/// What one delivery attempt gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// When the attempt was made; also the action's new `updated_at` (and `delivered_at`, and
    /// the dead letter's `failed_at`).
    pub at: DateTime<Utc>,
    /// The HTTP status, when there was an answer.
    pub http_status: Option<u16>,
    /// How long the request took (stored in whole milliseconds).
    pub latency: Option<Duration>,
    /// The error (a non-2xx answer, a timeout, a refused connection, an open circuit).
    pub error: Option<String>,
}

/// What becomes of an action after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// It was delivered: status `delivered`, attempts + 1.
    Delivered,
    /// It failed; try again at this time: stays `pending`, attempts + 1.
    RetryAt(DateTime<Utc>),
    /// It failed for the last time: status `dead`, attempts + 1, and a dead letter.
    Dead,
    /// Not attempted (the endpoint's circuit breaker is open): stays `pending`, due again
    /// `until`; no attempt counted.
    ShortCircuited {
        /// When it is due again.
        until: DateTime<Utc>,
    },
}

/// One row of the ledger to write.
#[derive(Debug, Clone)]
pub(crate) struct NewLedgerRow {
    pub action_id: Uuid,
    pub request_id: Option<Uuid>,
    pub endpoint: String,
    pub attempt: i32,
    pub outcome: LedgerOutcome,
    pub http_status: Option<i32>,
    pub latency_ms: Option<i64>,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
}

/// An enqueue batch ready to bind: the first request of each key and id, in batch order.
#[derive(Debug)]
pub(crate) struct PreparedEnqueue<'a> {
    actions: &'a [NewAction],
    /// Indexes of the first occurrences, in batch order.
    pub fresh: Vec<usize>,
    /// For each later occurrence (by index), the index of the first.
    repeats: Vec<(usize, usize)>,
    pub offsets: Vec<(&'a str, &'a str, i32, i64)>,
    /// The store's clock at intake (µs): `next_attempt_at` of new pending actions, `updated_at`
    /// of new rows, `at` of intake ledger rows.
    pub now: DateTime<Utc>,
}

impl<'a> PreparedEnqueue<'a> {
    pub fn new(
        actions: &'a [NewAction],
        offsets: &'a [ConsumerOffset],
        now: DateTime<Utc>,
    ) -> Result<Self> {
        let mut by_key: HashMap<DedupKey, usize> = HashMap::with_capacity(actions.len());
        let mut by_id: HashMap<Uuid, usize> = HashMap::with_capacity(actions.len());
        let (mut fresh, mut repeats) = (Vec::new(), Vec::new());
        for (i, a) in actions.iter().enumerate() {
            if a.endpoint.is_empty() || a.rule_id.is_empty() {
                return Err(Error::InvalidArgument {
                    op: "enqueue_actions",
                    reason: format!("action {}: empty rule id or endpoint", a.action_id),
                });
            }
            let first = by_key
                .get(&a.dedup_key())
                .or_else(|| by_id.get(&a.action_id));
            match first {
                Some(&f) => repeats.push((i, f)),
                None => {
                    by_key.insert(a.dedup_key(), i);
                    by_id.insert(a.action_id, i);
                    fresh.push(i);
                }
            }
        }
        Ok(Self {
            actions,
            fresh,
            repeats,
            offsets: crate::prepare::offset_rows(offsets),
            now: trunc(now),
        })
    }

    /// The request at `i`.
    pub fn action(&self, i: usize) -> &'a NewAction {
        &self.actions[i]
    }

    /// The first occurrences, in batch order.
    pub fn fresh_actions(&self) -> impl Iterator<Item = &'a NewAction> + '_ {
        self.fresh.iter().map(|&i| &self.actions[i])
    }

    /// The outcome and the intake ledger rows, given which first occurrences the database
    /// stored and, for those it did not, the id of the action holding their key (or id).
    ///
    /// `holder` answers for every first occurrence not in `stored`; a `duplicate` ledger row is
    /// written against that action, with `request_id` = the absorbed request's id.
    pub fn finish(
        &self,
        stored: &HashSet<Uuid>,
        holder: &HashMap<usize, Uuid>,
    ) -> Result<(EnqueueOutcome, Vec<NewLedgerRow>)> {
        let mut out = EnqueueOutcome::default();
        let mut ledger = Vec::new();
        // The action each request ends up with, by request index.
        let mut owner: HashMap<usize, Uuid> = HashMap::with_capacity(self.actions.len());
        for &i in &self.fresh {
            let a = &self.actions[i];
            if stored.contains(&a.action_id) {
                owner.insert(i, a.action_id);
                match &a.intake {
                    Intake::Deliver => out.enqueued.push(a.action_id),
                    Intake::Suppressed => {
                        out.suppressed.push(a.action_id);
                        ledger.push(self.intake_row(a, LedgerOutcome::Suppressed, None));
                    }
                    Intake::Denied { reason } => {
                        out.denied.push(a.action_id);
                        ledger.push(self.intake_row(
                            a,
                            LedgerOutcome::Denied,
                            Some(reason.clone()),
                        ));
                    }
                }
            } else {
                let held_by = *holder.get(&i).ok_or_else(|| Error::Transient {
                    op: "enqueue_actions",
                    source: format!(
                        "the action holding the key of {} was not found (removed meanwhile?)",
                        a.action_id
                    )
                    .into(),
                })?;
                owner.insert(i, held_by);
            }
        }
        for &(i, f) in &self.repeats {
            if let Some(&held_by) = owner.get(&f) {
                owner.insert(i, held_by);
            }
        }
        let mut is_new = vec![false; self.actions.len()];
        for &i in &self.fresh {
            is_new[i] = stored.contains(&self.actions[i].action_id);
        }
        for (i, a) in self.actions.iter().enumerate() {
            if is_new[i] {
                continue;
            }
            out.duplicates.push(a.action_id);
            ledger.push(NewLedgerRow {
                action_id: owner[&i],
                request_id: Some(a.action_id),
                ..self.intake_row(a, LedgerOutcome::Duplicate, None)
            });
        }
        Ok((out, ledger))
    }

    fn intake_row(
        &self,
        a: &NewAction,
        outcome: LedgerOutcome,
        error: Option<String>,
    ) -> NewLedgerRow {
        NewLedgerRow {
            action_id: a.action_id,
            request_id: None,
            endpoint: a.endpoint.clone(),
            attempt: 0,
            outcome,
            http_status: None,
            latency_ms: None,
            error,
            at: self.now,
        }
    }
}

impl Intake {
    /// The status a new action with this intake is stored with.
    pub(crate) fn status(&self) -> ActionStatus {
        match self {
            Intake::Deliver => ActionStatus::Pending,
            Intake::Suppressed => ActionStatus::Suppressed,
            Intake::Denied { .. } => ActionStatus::Denied,
        }
    }
}

/// An action's state as [`Store::record_attempt`](crate::Store::record_attempt) found it
/// (locked).
#[derive(Debug)]
pub(crate) struct Current {
    pub status: ActionStatus,
    pub attempts: i32,
    pub endpoint: String,
}

/// What an attempt does: the ledger row, and the action's new state when it was pending.
#[derive(Debug)]
pub(crate) struct Transition {
    pub ledger: NewLedgerRow,
    /// `None` when the action had already left `pending`: the attempt is only audited.
    pub update: Option<Update>,
}

/// The action's new state.
#[derive(Debug)]
pub(crate) struct Update {
    pub status: ActionStatus,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Whether `last_error` and `last_http_status` take this attempt's values.
    pub counts: bool,
    pub delivered_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Whether a dead letter is written.
    pub dead_letter: bool,
}

/// What `record` does to an action in state `cur`.
pub(crate) fn transition(
    action_id: Uuid,
    cur: &Current,
    record: &AttemptRecord,
    next: NextStep,
) -> Transition {
    let at = trunc(record.at);
    let pending = cur.status == ActionStatus::Pending;
    let outcome = match (next, pending) {
        (NextStep::Delivered, _) => LedgerOutcome::Delivered,
        (NextStep::RetryAt(_), true) => LedgerOutcome::Retrying,
        (NextStep::Dead, true) => LedgerOutcome::Dead,
        (NextStep::RetryAt(_) | NextStep::Dead, false) => LedgerOutcome::Failed,
        (NextStep::ShortCircuited { .. }, _) => LedgerOutcome::ShortCircuited,
    };
    let ledger = NewLedgerRow {
        action_id,
        request_id: None,
        endpoint: cur.endpoint.clone(),
        attempt: cur.attempts.saturating_add(1),
        outcome,
        http_status: record.http_status.map(i32::from),
        latency_ms: record
            .latency
            .map(|l| i64::try_from(l.as_millis()).unwrap_or(i64::MAX)),
        error: record.error.clone(),
        at,
    };
    let update = pending.then(|| {
        let counted = cur.attempts.saturating_add(1);
        match next {
            NextStep::Delivered => Update {
                status: ActionStatus::Delivered,
                attempts: counted,
                next_attempt_at: None,
                counts: true,
                delivered_at: Some(at),
                updated_at: at,
                dead_letter: false,
            },
            NextStep::RetryAt(t) => Update {
                status: ActionStatus::Pending,
                attempts: counted,
                next_attempt_at: Some(trunc(t)),
                counts: true,
                delivered_at: None,
                updated_at: at,
                dead_letter: false,
            },
            NextStep::Dead => Update {
                status: ActionStatus::Dead,
                attempts: counted,
                next_attempt_at: None,
                counts: true,
                delivered_at: None,
                updated_at: at,
                dead_letter: true,
            },
            NextStep::ShortCircuited { until } => Update {
                status: ActionStatus::Pending,
                attempts: cur.attempts,
                next_attempt_at: Some(trunc(until)),
                counts: false,
                delivered_at: None,
                updated_at: at,
                dead_letter: false,
            },
        }
    });
    Transition { ledger, update }
}

/// The dead letter's message: the attempt's error, else its HTTP status.
pub(crate) fn dead_letter_message(record: &AttemptRecord) -> String {
    match (&record.error, record.http_status) {
        (Some(e), _) => e.clone(),
        (None, Some(s)) => format!("HTTP {s}"),
        (None, None) => "delivery failed".to_owned(),
    }
}

/// The lease end of a claim made at `now`.
pub(crate) fn lease_end(
    op: &'static str,
    now: DateTime<Utc>,
    lease: Duration,
) -> Result<DateTime<Utc>> {
    chrono::TimeDelta::from_std(lease)
        .ok()
        .and_then(|d| trunc(now).checked_add_signed(d))
        .ok_or_else(|| Error::InvalidArgument {
            op,
            reason: format!("lease {lease:?} from {now} is out of range"),
        })
}

/// An HTTP status read back from the database.
pub(crate) fn http_status(op: &'static str, v: Option<i64>) -> Result<Option<u16>> {
    v.map(|s| u16::try_from(s).map_err(|_| Error::corrupt(op, format!("HTTP status {s}"))))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: (u128, &str), id: u128, intake: Intake) -> NewAction {
        NewAction {
            action_id: Uuid::from_u128(id),
            input_event_id: Uuid::from_u128(key.0),
            rule_id: "overheat".into(),
            rule_version: 1,
            endpoint: key.1.into(),
            device_id: "dev-1".into(),
            body: "{}".into(),
            destructive: false,
            requested_at: Utc::now(),
            intake,
            source: ActionSource {
                topic: "actions.requested".into(),
                partition: 0,
                offset: 0,
            },
        }
    }

    /// Repeats within a batch, by key or by id, are duplicates of the first occurrence; the
    /// first occurrences that the database already held are duplicates of the holder.
    #[test]
    fn repeats_point_at_the_action_that_holds_the_key() {
        let batch = [
            req((1, "ops"), 10, Intake::Deliver),
            req((1, "ops"), 11, Intake::Deliver), // same key as 10
            req((2, "ops"), 10, Intake::Deliver), // same id as 10
            req((3, "ops"), 30, Intake::Suppressed),
            req((4, "ops"), 40, Intake::Deliver), // held by 99 in the database
            req((4, "ops"), 41, Intake::Deliver), // repeat of 40
        ];
        let p = PreparedEnqueue::new(&batch, &[], Utc::now()).unwrap();
        assert_eq!(p.fresh, vec![0, 3, 4]);
        let stored = [10, 30].map(Uuid::from_u128).into_iter().collect();
        let holder = HashMap::from([(4, Uuid::from_u128(99))]);
        let (out, ledger) = p.finish(&stored, &holder).unwrap();
        assert_eq!(out.enqueued, vec![Uuid::from_u128(10)]);
        assert_eq!(out.suppressed, vec![Uuid::from_u128(30)]);
        assert_eq!(
            out.duplicates,
            [11, 10, 40, 41].map(Uuid::from_u128).to_vec()
        );
        let rows: Vec<(u128, Option<u128>, LedgerOutcome)> = ledger
            .iter()
            .map(|r| {
                (
                    r.action_id.as_u128(),
                    r.request_id.map(|u| u.as_u128()),
                    r.outcome,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                (30, None, LedgerOutcome::Suppressed),
                (10, Some(11), LedgerOutcome::Duplicate),
                (10, Some(10), LedgerOutcome::Duplicate),
                (99, Some(40), LedgerOutcome::Duplicate),
                (99, Some(41), LedgerOutcome::Duplicate),
            ]
        );
    }

    #[test]
    fn attempts_count_except_short_circuits_and_finished_actions_only_audit() {
        let pending = Current {
            status: ActionStatus::Pending,
            attempts: 2,
            endpoint: "ops".into(),
        };
        let rec = AttemptRecord {
            at: Utc::now(),
            http_status: Some(503),
            latency: Some(Duration::from_micros(12_345_678)),
            error: Some("HTTP 503".into()),
        };
        let id = Uuid::from_u128(1);
        let t = transition(id, &pending, &rec, NextStep::RetryAt(Utc::now()));
        assert_eq!(
            (t.ledger.attempt, t.ledger.outcome),
            (3, LedgerOutcome::Retrying)
        );
        assert_eq!(t.ledger.latency_ms, Some(12_345));
        assert_eq!(t.update.unwrap().attempts, 3);
        let until = Utc::now();
        let t = transition(id, &pending, &rec, NextStep::ShortCircuited { until });
        let u = t.update.unwrap();
        assert_eq!(
            (u.attempts, u.counts, u.status),
            (2, false, ActionStatus::Pending)
        );
        assert!(
            transition(id, &pending, &rec, NextStep::Dead)
                .update
                .unwrap()
                .dead_letter
        );

        let delivered = Current {
            status: ActionStatus::Delivered,
            ..pending
        };
        let t = transition(id, &delivered, &rec, NextStep::Dead);
        assert_eq!(t.ledger.outcome, LedgerOutcome::Failed);
        assert!(t.update.is_none());
    }

    #[test]
    fn statuses_and_outcomes_round_trip_as_text() {
        for s in [
            ActionStatus::Pending,
            ActionStatus::Delivered,
            ActionStatus::Dead,
            ActionStatus::Denied,
            ActionStatus::Suppressed,
        ] {
            assert_eq!(s.as_str().parse::<ActionStatus>().unwrap(), s);
        }
        for o in [
            LedgerOutcome::Delivered,
            LedgerOutcome::Failed,
            LedgerOutcome::Retrying,
            LedgerOutcome::Denied,
            LedgerOutcome::ShortCircuited,
            LedgerOutcome::Suppressed,
            LedgerOutcome::Duplicate,
            LedgerOutcome::Dead,
        ] {
            assert_eq!(o.as_str().parse::<LedgerOutcome>().unwrap(), o);
        }
        assert!("gone".parse::<ActionStatus>().is_err());
    }
}
