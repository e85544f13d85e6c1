//! The executor's action schedule ("Actions fire once"): intake is idempotent on the dedup key
//! and commits with its offsets; a due action goes to exactly one claimer and respects its
//! schedule and lease; attempts move an action and fill the ledger in order; a dead action
//! lands in the DLQ with its body; retention never removes pending actions.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use sluice_store::{
    ActionRow, ActionSource, ActionStatus, AttemptRecord, Column, ColumnType, ConsumerOffset,
    DlqFilter, DlqStatus, Error, Filter, Intake, LedgerOutcome, LedgerRow, NewAction, NextStep, Op,
    Select, Store, Value,
};
use uuid::Uuid;

use super::{Harness, now};

const GROUP: &str = "executor";
const TOPIC: &str = "actions.requested";

fn request(input: Uuid, rule: &str, version: i32, endpoint: &str, intake: Intake) -> NewAction {
    NewAction {
        action_id: Uuid::new_v4(),
        input_event_id: input,
        rule_id: rule.into(),
        rule_version: version,
        endpoint: endpoint.into(),
        device_id: "pump-7".into(),
        body: format!(r#"{{"rule":"{rule}","input":"{input}","text":"Grüße ✓"}}"#),
        destructive: false,
        requested_at: now() - TimeDelta::milliseconds(5),
        intake,
        source: ActionSource {
            topic: TOPIC.into(),
            partition: 3,
            offset: 41,
        },
    }
}

fn deliver(input: Uuid) -> NewAction {
    request(input, "overheat", 1, "ops-webhook", Intake::Deliver)
}

/// The same request, as a replay would bring it: a new action id.
fn replayed(a: &NewAction) -> NewAction {
    NewAction {
        action_id: Uuid::new_v4(),
        ..a.clone()
    }
}

fn offset(partition: i32, next_offset: i64) -> ConsumerOffset {
    ConsumerOffset {
        group: GROUP.into(),
        topic: TOPIC.into(),
        partition,
        next_offset,
    }
}

fn attempt(at: DateTime<Utc>, http: Option<u16>, ms: u64, error: Option<&str>) -> AttemptRecord {
    AttemptRecord {
        at,
        http_status: http,
        latency: Some(Duration::from_millis(ms)),
        error: error.map(str::to_owned),
    }
}

/// (attempt, outcome, request id) of each ledger row, checking ids increase.
fn ledger_summary(rows: &[LedgerRow]) -> Vec<(u32, LedgerOutcome, Option<Uuid>)> {
    assert!(
        rows.windows(2).all(|w| w[0].id < w[1].id),
        "ledger in id order: {rows:?}"
    );
    rows.iter()
        .map(|r| (r.attempt, r.outcome, r.request_id))
        .collect()
}

async fn ledger(store: &Store, id: Uuid) -> Vec<(u32, LedgerOutcome, Option<Uuid>)> {
    ledger_summary(&store.action_ledger(id).await.unwrap())
}

/// Everything due at `at`, claimed for an hour.
async fn claim_all(store: &Store, at: DateTime<Utc>) -> Vec<Uuid> {
    store
        .claim_due_actions(at, 1000, Duration::from_secs(3600))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.action_id)
        .collect()
}

// ---- intake ----------------------------------------------------------------------------------

/// A replay of the same requests with new action ids enqueues nothing: each is a duplicate,
/// recorded in the ledger of the action that holds its key. Every part of the key matters;
/// suppressed and denied requests are stored with their ledger row and never claimed.
pub async fn enqueue_is_idempotent_on_the_dedup_key<H: Harness>(h: &H) {
    let store = h.open().await;
    let (e1, e2, e3, e4) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let r1 = deliver(e1);
    let mut r2 = request(
        e2,
        "shutdown",
        1,
        "plc",
        Intake::Denied {
            reason: "destructive and no rule allows it".into(),
        },
    );
    r2.destructive = true;
    let r3 = request(e3, "overheat", 1, "ops-webhook", Intake::Suppressed);
    let r4 = replayed(&r1); // same key as r1, in the same batch
    let r5 = request(e1, "overheat", 2, "ops-webhook", Intake::Deliver); // another version
    let r6 = request(e1, "overheat", 1, "pager", Intake::Deliver); // another endpoint
    let r7 = request(e1, "cooling", 1, "ops-webhook", Intake::Deliver); // another rule
    let r8 = deliver(e4); // another input event
    let batch = vec![
        r1.clone(),
        r2.clone(),
        r3.clone(),
        r4.clone(),
        r5.clone(),
        r6.clone(),
        r7.clone(),
        r8.clone(),
    ];
    let before = now();
    let out = store.enqueue_actions(&batch, &[]).await.unwrap();
    let after = now();
    let ids = |rs: &[&NewAction]| rs.iter().map(|r| r.action_id).collect::<Vec<_>>();
    assert_eq!(out.enqueued, ids(&[&r1, &r5, &r6, &r7, &r8]));
    assert_eq!(out.denied, ids(&[&r2]));
    assert_eq!(out.suppressed, ids(&[&r3]));
    assert_eq!(out.duplicates, ids(&[&r4]));
    assert_eq!(store.actions_pending().await.unwrap(), 5);

    let got = store.action(r1.action_id).await.unwrap().expect("stored");
    let ActionRow {
        next_attempt_at,
        updated_at,
        ..
    } = got.clone();
    let due = next_attempt_at.expect("pending actions have a time");
    assert!((before..=after).contains(&due), "due at intake: {due}");
    assert_eq!(updated_at, due);
    assert_eq!(
        got,
        ActionRow {
            action_id: r1.action_id,
            input_event_id: e1,
            rule_id: "overheat".into(),
            rule_version: 1,
            endpoint: "ops-webhook".into(),
            device_id: "pump-7".into(),
            body: r1.body.clone(),
            destructive: false,
            requested_at: r1.requested_at,
            source: r1.source.clone(),
            status: ActionStatus::Pending,
            attempts: 0,
            next_attempt_at,
            last_error: None,
            last_http_status: None,
            updated_at,
            delivered_at: None,
        }
    );
    let denied = store.action(r2.action_id).await.unwrap().unwrap();
    assert_eq!(
        (denied.status, denied.next_attempt_at, denied.destructive),
        (ActionStatus::Denied, None, true)
    );
    let suppressed = store.action(r3.action_id).await.unwrap().unwrap();
    assert_eq!(suppressed.status, ActionStatus::Suppressed);
    assert!(store.action(r4.action_id).await.unwrap().is_none());

    let denial = store.action_ledger(r2.action_id).await.unwrap();
    assert_eq!(denial.len(), 1);
    assert_eq!(
        (
            denial[0].attempt,
            denial[0].outcome,
            denial[0].endpoint.as_str()
        ),
        (0, LedgerOutcome::Denied, "plc")
    );
    assert_eq!(
        denial[0].error.as_deref(),
        Some("destructive and no rule allows it")
    );
    assert!((before..=after).contains(&denial[0].at));
    assert_eq!(
        ledger(&store, r3.action_id).await,
        vec![(0, LedgerOutcome::Suppressed, None)]
    );
    assert_eq!(
        ledger(&store, r1.action_id).await,
        vec![(0, LedgerOutcome::Duplicate, Some(r4.action_id))]
    );
    assert!(ledger(&store, r5.action_id).await.is_empty());

    // The replay: every request again with a new id. Nothing new, each one a duplicate.
    let replay: Vec<NewAction> = batch.iter().map(replayed).collect();
    let out = store.enqueue_actions(&replay, &[]).await.unwrap();
    assert!(out.enqueued.is_empty() && out.denied.is_empty() && out.suppressed.is_empty());
    assert_eq!(out.duplicates, ids(&replay.iter().collect::<Vec<_>>()));
    assert_eq!(h.scalar("SELECT count(*) FROM actions").await, 7);
    assert_eq!(store.actions_pending().await.unwrap(), 5);
    assert_eq!(
        ledger(&store, r1.action_id).await,
        vec![
            (0, LedgerOutcome::Duplicate, Some(r4.action_id)),
            (0, LedgerOutcome::Duplicate, Some(replay[0].action_id)),
            (0, LedgerOutcome::Duplicate, Some(replay[3].action_id)),
        ]
    );
    assert_eq!(
        ledger(&store, r2.action_id).await,
        vec![
            (0, LedgerOutcome::Denied, None),
            (0, LedgerOutcome::Duplicate, Some(replay[1].action_id)),
        ]
    );

    // A redelivery of the very same message (same id) is a duplicate too.
    let out = store
        .enqueue_actions(std::slice::from_ref(&r8), &[])
        .await
        .unwrap();
    assert_eq!(out.duplicates, vec![r8.action_id]);
    assert_eq!(
        ledger(&store, r8.action_id).await.last(),
        Some(&(0, LedgerOutcome::Duplicate, Some(r8.action_id)))
    );

    // Never claimed: suppressed and denied actions, whatever the time.
    let claimed = claim_all(&store, now() + TimeDelta::days(1)).await;
    let claimed: HashSet<Uuid> = claimed.into_iter().collect();
    assert_eq!(
        claimed,
        ids(&[&r1, &r5, &r6, &r7, &r8]).into_iter().collect()
    );

    // Two executors taking the same new request in at once: it is stored once.
    let (a, b) = (h.connect().await, h.connect().await);
    let fresh = deliver(Uuid::new_v4());
    let (twin_a, twin_b) = (replayed(&fresh), replayed(&fresh));
    let (oa, ob) = tokio::join!(
        a.enqueue_actions(std::slice::from_ref(&twin_a), &[]),
        b.enqueue_actions(std::slice::from_ref(&twin_b), &[])
    );
    let (oa, ob) = (oa.unwrap(), ob.unwrap());
    assert_eq!(oa.enqueued.len() + ob.enqueued.len(), 1, "{oa:?} {ob:?}");
    assert_eq!(
        oa.duplicates.len() + ob.duplicates.len(),
        1,
        "{oa:?} {ob:?}"
    );
    let winner = oa
        .enqueued
        .first()
        .or(ob.enqueued.first())
        .copied()
        .unwrap();
    let loser = oa
        .duplicates
        .first()
        .or(ob.duplicates.first())
        .copied()
        .unwrap();
    assert_eq!(
        ledger(&store, winner).await,
        vec![(0, LedgerOutcome::Duplicate, Some(loser))]
    );
}

/// Intake commits with its consumer offsets or not at all; a batch of duplicates still moves
/// the offsets on.
pub async fn enqueue_commits_with_its_offsets<H: Harness>(h: &H) {
    let store = h.open().await;
    let r1 = deliver(Uuid::new_v4());
    store
        .enqueue_actions(std::slice::from_ref(&r1), &[offset(0, 5)])
        .await
        .unwrap();
    assert_eq!(
        store.consumer_offsets(GROUP).await.unwrap(),
        vec![offset(0, 5)]
    );

    // The offset is checked by the database after the actions and the ledger rows were
    // written: the whole transaction must roll back.
    let r2 = deliver(Uuid::new_v4());
    let r3 = request(
        Uuid::new_v4(),
        "shutdown",
        1,
        "plc",
        Intake::Denied {
            reason: "policy".into(),
        },
    );
    let batch = vec![r2.clone(), r3.clone(), replayed(&r1)];
    let err = store
        .enqueue_actions(&batch, &[offset(0, 6), offset(1, -1)])
        .await
        .expect_err("negative offset refused");
    assert!(
        !err.is_transient(),
        "a constraint violation is fatal: {err}"
    );
    assert!(store.action(r2.action_id).await.unwrap().is_none());
    assert!(store.action(r3.action_id).await.unwrap().is_none());
    assert_eq!(h.scalar("SELECT count(*) FROM action_ledger").await, 0);
    assert_eq!(
        store.consumer_offsets(GROUP).await.unwrap(),
        vec![offset(0, 5)]
    );

    // Fixed, the same batch goes in whole.
    let out = store
        .enqueue_actions(&batch, &[offset(0, 6), offset(1, 2)])
        .await
        .unwrap();
    assert_eq!(
        (out.enqueued.len(), out.denied.len(), out.duplicates.len()),
        (1, 1, 1)
    );
    assert_eq!(
        store.consumer_offsets(GROUP).await.unwrap(),
        vec![offset(0, 6), offset(1, 2)]
    );

    // Redelivery after a crash: all duplicates, and the offsets still move on (last one wins).
    let again: Vec<NewAction> = batch.iter().map(replayed).collect();
    let out = store
        .enqueue_actions(&again, &[offset(0, 8), offset(0, 9)])
        .await
        .unwrap();
    assert_eq!(out.duplicates.len(), 3);
    assert_eq!(
        store.consumer_offsets(GROUP).await.unwrap(),
        vec![offset(0, 9), offset(1, 2)]
    );
    // Offsets alone.
    store.enqueue_actions(&[], &[offset(2, 1)]).await.unwrap();
    assert_eq!(store.consumer_offsets(GROUP).await.unwrap().len(), 3);
    assert_eq!(store.actions_pending().await.unwrap(), 2);
}

// ---- the schedule ----------------------------------------------------------------------------

/// Two executor instances claiming at the same time never get the same action: each due action
/// is claimed exactly once, whoever gets it. (On Postgres the claims run concurrently on
/// separate connections; SQLite's one writer takes them in turn.)
pub async fn claims_give_each_due_action_to_one_claimer<H: Harness>(h: &H) {
    let store = h.open().await;
    let batch: Vec<NewAction> = (0..240).map(|_| deliver(Uuid::new_v4())).collect();
    let out = store.enqueue_actions(&batch, &[]).await.unwrap();
    assert_eq!(out.enqueued.len(), 240);
    let at = now();

    // Two claims of everything, at once.
    let (a, b) = (h.connect().await, h.connect().await);
    let lease = Duration::from_secs(3600);
    let (ca, cb) = tokio::join!(
        a.claim_due_actions(at, 120, lease),
        b.claim_due_actions(at, 120, lease)
    );
    let (ca, cb) = (ca.unwrap(), cb.unwrap());
    let ids_a: HashSet<Uuid> = ca.iter().map(|d| d.action_id).collect();
    let ids_b: HashSet<Uuid> = cb.iter().map(|d| d.action_id).collect();
    assert_eq!(ids_a.len(), ca.len());
    let both: Vec<_> = ids_a.intersection(&ids_b).collect();
    assert!(
        both.is_empty(),
        "{} claimed by both, e.g. {:?}",
        both.len(),
        &both[..both.len().min(3)]
    );

    // Then four claimers in small bites until nothing is due: every action exactly once.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let s = h.connect().await;
        tasks.spawn(async move {
            let mut got = Vec::new();
            loop {
                let bite = s.claim_due_actions(at, 7, lease).await.unwrap();
                if bite.is_empty() {
                    return got;
                }
                got.extend(bite.into_iter().map(|d| d.action_id));
            }
        });
    }
    let mut seen: BTreeMap<Uuid, u32> = BTreeMap::new();
    for id in ids_a.iter().chain(&ids_b) {
        *seen.entry(*id).or_default() += 1;
    }
    while let Some(got) = tasks.join_next().await {
        for id in got.unwrap() {
            *seen.entry(id).or_default() += 1;
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} claimed more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(3)]
    );
    let all: HashSet<Uuid> = batch.iter().map(|r| r.action_id).collect();
    assert_eq!(seen.keys().copied().collect::<HashSet<_>>(), all);
    assert!(claim_all(&store, at).await.is_empty(), "all leased");
    assert_eq!(
        store.actions_pending().await.unwrap(),
        240,
        "claimed, still pending"
    );
}

/// A claim takes only what is due, oldest first, and holds it for the lease; when the lease
/// ends without a recorded attempt (the claimer died) the action is due again.
pub async fn claims_respect_the_schedule_and_the_lease<H: Harness>(h: &H) {
    let store = h.open().await;
    let before = now();
    let mut batch: Vec<NewAction> = (0..3).map(|_| deliver(Uuid::new_v4())).collect();
    batch.sort_by_key(|r| r.action_id);
    store.enqueue_actions(&batch, &[]).await.unwrap();
    let after = now();

    assert!(
        claim_all(&store, before - TimeDelta::milliseconds(1))
            .await
            .is_empty(),
        "nothing due before intake"
    );
    let lease = Duration::from_secs(60);
    let first = store.claim_due_actions(after, 2, lease).await.unwrap();
    assert_eq!(
        first.iter().map(|d| d.action_id).collect::<Vec<_>>(),
        vec![batch[0].action_id, batch[1].action_id],
        "due at the same time: by id"
    );
    let lease_end = after + TimeDelta::seconds(60);
    for d in &first {
        assert_eq!(d.lease_until, lease_end);
        assert!((before..=after).contains(&d.due_at));
        assert_eq!(d.attempts, 0);
        let row = store.action(d.action_id).await.unwrap().unwrap();
        assert_eq!(
            row.next_attempt_at,
            Some(lease_end),
            "pushed to the lease's end"
        );
        assert_eq!(row.status, ActionStatus::Pending);
    }
    let d = &first[0];
    assert_eq!(
        (
            d.input_event_id,
            d.rule_id.as_str(),
            d.rule_version,
            d.endpoint.as_str(),
            d.device_id.as_str(),
            d.body.as_str(),
            d.destructive,
            d.requested_at,
        ),
        (
            batch[0].input_event_id,
            "overheat",
            1,
            "ops-webhook",
            "pump-7",
            batch[0].body.as_str(),
            false,
            batch[0].requested_at,
        )
    );
    assert_eq!(
        claim_all(&store, after).await,
        vec![batch[2].action_id],
        "the rest"
    );
    assert!(claim_all(&store, after).await.is_empty(), "all leased");
    assert!(
        claim_all(&store, lease_end - TimeDelta::microseconds(1))
            .await
            .is_empty(),
        "leased until the end"
    );
    // The claimer died: at the lease's end the first two are due again, due since then.
    let again = store.claim_due_actions(lease_end, 10, lease).await.unwrap();
    assert_eq!(
        again.iter().map(|d| d.action_id).collect::<Vec<_>>(),
        vec![batch[0].action_id, batch[1].action_id]
    );
    assert!(
        again
            .iter()
            .all(|d| d.due_at == lease_end && d.attempts == 0)
    );

    // A retry scheduled at a time is due then and not before; oldest due first.
    let t = after + TimeDelta::hours(2);
    let rec = attempt(lease_end, Some(502), 30, Some("HTTP 502"));
    store
        .record_attempt(batch[1].action_id, &rec, NextStep::RetryAt(t))
        .await
        .unwrap();
    store
        .record_attempt(
            batch[0].action_id,
            &rec,
            NextStep::RetryAt(t + TimeDelta::seconds(1)),
        )
        .await
        .unwrap();
    assert!(
        claim_all(&store, t - TimeDelta::microseconds(1))
            .await
            .iter()
            .all(|id| *id == batch[2].action_id),
        "not before their time"
    );
    let due = store
        .claim_due_actions(t + TimeDelta::seconds(1), 10, lease)
        .await
        .unwrap();
    let order: Vec<Uuid> = due
        .iter()
        .map(|d| d.action_id)
        .filter(|id| *id != batch[2].action_id)
        .collect();
    assert_eq!(order, vec![batch[1].action_id, batch[0].action_id]);
    assert!(
        due.iter()
            .all(|d| d.action_id == batch[2].action_id || d.attempts == 1)
    );

    let err = store
        .claim_due_actions(after, 1, Duration::MAX)
        .await
        .expect_err("a lease past the end of time");
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

// ---- attempts --------------------------------------------------------------------------------

/// Every transition of an attempt, with its ledger row: a retry (pending at the new time,
/// attempts + 1), a short-circuit (rescheduled, no attempt counted), a delivery, a last failure
/// (dead, and a dead letter with the body's bytes); an attempt recorded on an action that has
/// already finished is audited and changes nothing; an unknown action writes nothing.
pub async fn attempts_move_actions_and_fill_the_ledger<H: Harness>(h: &H) {
    let store = h.open().await;
    let a = deliver(Uuid::new_v4());
    let b = deliver(Uuid::new_v4());
    store
        .enqueue_actions(&[a.clone(), b.clone()], &[])
        .await
        .unwrap();
    let t1 = now();
    assert_eq!(claim_all(&store, t1).await.len(), 2);

    // a: 503, retry in a second.
    let retry_at = t1 + TimeDelta::seconds(1);
    store
        .record_attempt(
            a.action_id,
            &attempt(t1, Some(503), 120, Some("HTTP 503 Service Unavailable")),
            NextStep::RetryAt(retry_at),
        )
        .await
        .unwrap();
    let row = store.action(a.action_id).await.unwrap().unwrap();
    assert_eq!(
        (
            row.status,
            row.attempts,
            row.next_attempt_at,
            row.last_http_status,
            row.last_error.as_deref(),
            row.updated_at,
        ),
        (
            ActionStatus::Pending,
            1,
            Some(retry_at),
            Some(503),
            Some("HTTP 503 Service Unavailable"),
            t1,
        )
    );
    assert!(
        claim_all(&store, retry_at - TimeDelta::microseconds(1))
            .await
            .is_empty()
    );
    let due = store
        .claim_due_actions(retry_at, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].action_id, due[0].attempts), (a.action_id, 1));

    // a: the circuit is open; not attempted, due again in 10 s, nothing counted.
    let reopen = t1 + TimeDelta::seconds(10);
    store
        .record_attempt(
            a.action_id,
            &AttemptRecord {
                at: retry_at,
                http_status: None,
                latency: None,
                error: Some("circuit open".into()),
            },
            NextStep::ShortCircuited { until: reopen },
        )
        .await
        .unwrap();
    let row = store.action(a.action_id).await.unwrap().unwrap();
    assert_eq!(
        (
            row.status,
            row.attempts,
            row.next_attempt_at,
            row.last_http_status,
            row.last_error.as_deref()
        ),
        (
            ActionStatus::Pending,
            1,
            Some(reopen),
            Some(503),
            Some("HTTP 503 Service Unavailable")
        ),
        "a short-circuit counts no attempt and keeps the last attempt's answer"
    );

    // a: delivered.
    assert_eq!(claim_all(&store, reopen).await, vec![a.action_id]);
    store
        .record_attempt(
            a.action_id,
            &attempt(reopen, Some(200), 80, None),
            NextStep::Delivered,
        )
        .await
        .unwrap();
    let row = store.action(a.action_id).await.unwrap().unwrap();
    assert_eq!(
        (
            row.status,
            row.attempts,
            row.next_attempt_at,
            row.delivered_at,
            row.last_http_status
        ),
        (ActionStatus::Delivered, 2, None, Some(reopen), Some(200))
    );
    assert!(
        !claim_all(&store, now() + TimeDelta::days(30))
            .await
            .contains(&a.action_id),
        "a delivered action is never due again"
    );
    let rows = store.action_ledger(a.action_id).await.unwrap();
    assert_eq!(
        ledger_summary(&rows),
        vec![
            (1, LedgerOutcome::Retrying, None),
            (2, LedgerOutcome::ShortCircuited, None),
            (2, LedgerOutcome::Delivered, None),
        ]
    );
    let detail: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.endpoint.as_str(),
                r.http_status,
                r.latency,
                r.error.as_deref(),
                r.at,
            )
        })
        .collect();
    assert_eq!(
        detail,
        vec![
            (
                "ops-webhook",
                Some(503),
                Some(Duration::from_millis(120)),
                Some("HTTP 503 Service Unavailable"),
                t1
            ),
            ("ops-webhook", None, None, Some("circuit open"), retry_at),
            (
                "ops-webhook",
                Some(200),
                Some(Duration::from_millis(80)),
                None,
                reopen
            ),
        ]
    );

    // b: a timeout, then a last 500: dead, and in the DLQ with its body.
    store
        .record_attempt(
            b.action_id,
            &attempt(t1, None, 30_000, Some("timed out after 30s")),
            NextStep::RetryAt(t1 + TimeDelta::seconds(2)),
        )
        .await
        .unwrap();
    let failed_at = t1 + TimeDelta::seconds(2);
    store
        .record_attempt(
            b.action_id,
            &attempt(failed_at, Some(500), 15, None),
            NextStep::Dead,
        )
        .await
        .unwrap();
    let row = store.action(b.action_id).await.unwrap().unwrap();
    assert_eq!(
        (
            row.status,
            row.attempts,
            row.next_attempt_at,
            row.last_http_status,
            row.last_error.as_deref()
        ),
        (
            ActionStatus::Dead,
            2,
            None,
            Some(500),
            Some("timed out after 30s")
        )
    );
    assert_eq!(
        ledger(&store, b.action_id).await,
        vec![
            (1, LedgerOutcome::Retrying, None),
            (2, LedgerOutcome::Dead, None),
        ]
    );
    let letters = store
        .dlq_list(&DlqFilter {
            processor: Some("executor".into()),
            ..DlqFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert_eq!(l.raw, b.body.as_bytes(), "the body's bytes, exactly");
    assert_eq!(
        l.decoded,
        Some(serde_json::from_str::<serde_json::Value>(&b.body).unwrap())
    );
    assert_eq!(
        (
            l.event_id,
            l.topic.as_str(),
            l.partition,
            l.offset,
            l.schema_id,
            l.error_class.as_str(),
            l.error_message.as_str(),
            l.attempts,
            l.failed_at,
            l.status,
        ),
        (
            Some(b.action_id),
            TOPIC,
            3,
            41,
            None,
            "delivery",
            "HTTP 500",
            2,
            failed_at,
            DlqStatus::Pending,
        )
    );

    // A claimer whose lease ran out records late: audited, nothing changes, no second letter.
    let late = now();
    store
        .record_attempt(
            a.action_id,
            &attempt(late, Some(502), 10, Some("HTTP 502")),
            NextStep::RetryAt(late),
        )
        .await
        .unwrap();
    store
        .record_attempt(
            b.action_id,
            &attempt(late, Some(502), 10, Some("HTTP 502")),
            NextStep::Dead,
        )
        .await
        .unwrap();
    let row = store.action(a.action_id).await.unwrap().unwrap();
    assert_eq!(
        (
            row.status,
            row.attempts,
            row.last_http_status,
            row.updated_at
        ),
        (ActionStatus::Delivered, 2, Some(200), reopen)
    );
    assert_eq!(
        ledger(&store, a.action_id).await.last(),
        Some(&(3, LedgerOutcome::Failed, None))
    );
    assert_eq!(
        ledger(&store, b.action_id).await.last(),
        Some(&(3, LedgerOutcome::Failed, None))
    );
    assert_eq!(
        store.action(b.action_id).await.unwrap().unwrap().status,
        ActionStatus::Dead
    );
    assert_eq!(h.scalar("SELECT count(*) FROM dlq").await, 1);

    // An unknown action: refused, nothing written.
    let rows_before = h.scalar("SELECT count(*) FROM action_ledger").await;
    let err = store
        .record_attempt(
            Uuid::new_v4(),
            &attempt(late, None, 1, None),
            NextStep::Dead,
        )
        .await
        .expect_err("no such action");
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert_eq!(
        h.scalar("SELECT count(*) FROM action_ledger").await,
        rows_before
    );
    assert_eq!(h.scalar("SELECT count(*) FROM dlq").await, 1);
    assert_eq!(store.actions_pending().await.unwrap(), 0);
}

/// An operator re-drives a dead action through its dead letter: the letter is `replayed`
/// (audited) and the action pending and due again with its attempts so far, so the executor
/// claims it once more under its own id; a second re-drive, or one of a letter that is not a
/// dead action's, changes nothing.
pub async fn a_dead_action_is_redriven_once_through_its_letter<H: Harness>(h: &H) {
    let store = h.open().await;
    let a = deliver(Uuid::new_v4());
    store
        .enqueue_actions(std::slice::from_ref(&a), &[])
        .await
        .unwrap();
    let t1 = now();
    assert_eq!(claim_all(&store, t1).await, vec![a.action_id]);
    store
        .record_attempt(
            a.action_id,
            &attempt(t1, Some(500), 15, None),
            NextStep::Dead,
        )
        .await
        .unwrap();
    let letters = store.dlq_list(&DlqFilter::default()).await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = letters[0].dlq_id;
    assert_eq!(store.actions_pending().await.unwrap(), 0);

    let redriven = store
        .redrive_dead_actions(&[letter, letter + 1000], "local:ops")
        .await
        .unwrap();
    assert_eq!(redriven, vec![letter], "only the dead action's letter");
    let row = store.action(a.action_id).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (ActionStatus::Pending, 1));
    assert!(row.next_attempt_at.is_some_and(|t| t <= now()));
    assert_eq!(claim_all(&store, now()).await, vec![a.action_id]);
    let entry = store.dlq_get(letter).await.unwrap().unwrap();
    assert_eq!(
        (entry.status, entry.status_changed_by.as_deref()),
        (DlqStatus::Replayed, Some("local:ops"))
    );
    let audit = store
        .audit_log(Some(&format!("dlq:{letter}")), 10)
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].action.as_str(), &audit[0].detail["action_id"]),
        ("dlq.replay", &serde_json::json!(a.action_id))
    );

    // Delivered this time; re-driving the letter again changes nothing.
    store
        .record_attempt(
            a.action_id,
            &attempt(now(), Some(200), 10, None),
            NextStep::Delivered,
        )
        .await
        .unwrap();
    assert!(
        store
            .redrive_dead_actions(&[letter], "local:ops")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.action(a.action_id).await.unwrap().unwrap().status,
        ActionStatus::Delivered
    );
    assert_eq!(
        ledger(&store, a.action_id).await,
        vec![
            (1, LedgerOutcome::Dead, None),
            (2, LedgerOutcome::Delivered, None),
        ]
    );
    assert_eq!(h.scalar("SELECT count(*) FROM audit_log").await, 1);
}

// ---- retention -------------------------------------------------------------------------------

/// `maintain` deletes finished actions (delivered, dead, denied, suppressed) whose last change
/// is older than retention, with their ledger rows, and never a pending one, however old.
/// Once an action is gone its key is new again.
pub async fn actions_retention_keeps_pending_ones<H: Harness>(h: &H) {
    let store = h.open().await;
    let t = now();
    let old = t - TimeDelta::days(10);
    let [pending, delivered_old, delivered_new, dead_old] =
        std::array::from_fn(|_| deliver(Uuid::new_v4()));
    let denied = request(
        Uuid::new_v4(),
        "shutdown",
        1,
        "plc",
        Intake::Denied {
            reason: "policy".into(),
        },
    );
    let suppressed = request(Uuid::new_v4(), "overheat", 1, "ops", Intake::Suppressed);
    let all = [
        &pending,
        &delivered_old,
        &delivered_new,
        &dead_old,
        &denied,
        &suppressed,
    ];
    store
        .enqueue_actions(&all.map(Clone::clone), &[])
        .await
        .unwrap();
    // A duplicate on the old delivered one: its ledger row goes with it.
    store
        .enqueue_actions(&[replayed(&delivered_old)], &[])
        .await
        .unwrap();
    let fail = attempt(old, Some(503), 5, Some("HTTP 503"));
    store
        .record_attempt(
            pending.action_id,
            &fail,
            NextStep::RetryAt(old + TimeDelta::seconds(1)),
        )
        .await
        .unwrap();
    store
        .record_attempt(
            delivered_old.action_id,
            &attempt(old, Some(200), 5, None),
            NextStep::Delivered,
        )
        .await
        .unwrap();
    store
        .record_attempt(dead_old.action_id, &fail, NextStep::Dead)
        .await
        .unwrap();
    store
        .record_attempt(
            delivered_new.action_id,
            &attempt(t, Some(204), 5, None),
            NextStep::Delivered,
        )
        .await
        .unwrap();
    assert_eq!(h.scalar("SELECT count(*) FROM action_ledger").await, 7);

    let report = store.maintain(t).await.unwrap();
    assert_eq!(
        (report.actions_deleted, report.action_ledger_deleted),
        (2, 3),
        "{report:?}"
    );
    for gone in [&delivered_old, &dead_old] {
        assert!(store.action(gone.action_id).await.unwrap().is_none());
        assert!(
            store
                .action_ledger(gone.action_id)
                .await
                .unwrap()
                .is_empty()
        );
    }
    for kept in [&pending, &delivered_new, &denied, &suppressed] {
        assert!(store.action(kept.action_id).await.unwrap().is_some());
        assert_eq!(store.action_ledger(kept.action_id).await.unwrap().len(), 1);
    }
    assert_eq!(
        h.scalar("SELECT count(*) FROM dlq").await,
        1,
        "the DLQ keeps its own"
    );

    // Past retention, the key is forgotten: the same request is new again.
    let out = store
        .enqueue_actions(&[replayed(&delivered_old)], &[])
        .await
        .unwrap();
    assert_eq!(out.enqueued.len(), 1);

    // Much later, everything finished is gone; pending actions stay, however old.
    let report = store.maintain(t + TimeDelta::days(8)).await.unwrap();
    assert_eq!(
        (report.actions_deleted, report.action_ledger_deleted),
        (3, 3),
        "{report:?}"
    );
    let row = store.action(pending.action_id).await.unwrap().unwrap();
    assert_eq!((row.status, row.updated_at), (ActionStatus::Pending, old));
    assert_eq!(
        store.action_ledger(pending.action_id).await.unwrap().len(),
        1
    );
    assert_eq!(store.actions_pending().await.unwrap(), 2);
    assert_eq!(h.scalar("SELECT count(*) FROM actions").await, 2);
    assert_eq!(h.scalar("SELECT count(*) FROM action_ledger").await, 1);
}

// ---- the action ledger view ------------------------------------------------------------------

/// `Store::select` reads `actions` and `action_ledger` on both backends (the SQL endpoint's
/// action ledger view): UUIDs as text, times as microseconds, NULLs, filters on a UUID.
pub async fn select_reads_the_action_ledger<H: Harness>(h: &H) {
    let store = h.open().await;
    let a = deliver(Uuid::new_v4());
    let other = deliver(Uuid::new_v4());
    store
        .enqueue_actions(&[a.clone(), other.clone()], &[])
        .await
        .unwrap();
    let t = now();
    store
        .record_attempt(
            a.action_id,
            &attempt(t, Some(503), 42, Some("HTTP 503")),
            NextStep::RetryAt(t + TimeDelta::seconds(1)),
        )
        .await
        .unwrap();
    store
        .record_attempt(
            a.action_id,
            &attempt(t + TimeDelta::seconds(1), Some(200), 7, None),
            NextStep::Delivered,
        )
        .await
        .unwrap();
    let by_action = |table: &str, columns: &[(&str, ColumnType)]| Select {
        table: table.into(),
        columns: columns.iter().map(|(c, t)| ((*c).to_owned(), *t)).collect(),
        filters: vec![Filter {
            column: "action_id".into(),
            op: Op::Eq,
            value: Value::Text(a.action_id.to_string()),
        }],
        limit: None,
    };

    let got = store
        .select(&by_action(
            "actions",
            &[
                ("action_id", ColumnType::Uuid),
                ("input_event_id", ColumnType::Uuid),
                ("rule_version", ColumnType::Int),
                ("status", ColumnType::Text),
                ("attempts", ColumnType::Int),
                ("next_attempt_at", ColumnType::Timestamp),
                ("last_http_status", ColumnType::Int),
                ("delivered_at", ColumnType::Timestamp),
                ("body", ColumnType::Text),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![
            Column::Text(vec![Some(a.action_id.to_string())]),
            Column::Text(vec![Some(a.input_event_id.to_string())]),
            Column::Int(vec![Some(1)]),
            Column::Text(vec![Some("delivered".into())]),
            Column::Int(vec![Some(2)]),
            Column::Timestamp(vec![None]),
            Column::Int(vec![Some(200)]),
            Column::Timestamp(vec![Some((t + TimeDelta::seconds(1)).timestamp_micros())]),
            Column::Text(vec![Some(a.body.clone())]),
        ]
    );

    let got = store
        .select(&by_action(
            "action_ledger",
            &[
                ("attempt", ColumnType::Int),
                ("outcome", ColumnType::Text),
                ("http_status", ColumnType::Int),
                ("latency_ms", ColumnType::Int),
                ("error", ColumnType::Text),
                ("at", ColumnType::Timestamp),
                ("request_id", ColumnType::Uuid),
                // A UUID filter is compared as text only on a column selected as a UUID.
                ("action_id", ColumnType::Uuid),
            ],
        ))
        .await
        .unwrap();
    let mut rows: Vec<(Option<i64>, Option<String>)> = match (&got[0], &got[1]) {
        (Column::Int(n), Column::Text(o)) => n.iter().copied().zip(o.iter().cloned()).collect(),
        _ => panic!("{got:?}"),
    };
    rows.sort();
    assert_eq!(
        rows,
        vec![
            (Some(1), Some("retrying".into())),
            (Some(2), Some("delivered".into())),
        ]
    );
    assert_eq!(got[6], Column::Text(vec![None, None]));
    let all = store
        .select(&Select {
            table: "action_ledger".into(),
            columns: vec![("id".into(), ColumnType::Int)],
            filters: vec![],
            limit: None,
        })
        .await
        .unwrap();
    assert_eq!(all[0].len(), 2);
}
