//! The store contract on PostgreSQL, plus what only Postgres has (a server to lose).
//!
//! Each test creates its own database `sluice_test_<uuid>` and drops it at the end, so tests
//! run in parallel. The server comes from `SLUICE_TEST_POSTGRES` (a URL to any database on it),
//! else `postgres://postgres@127.0.0.1:5432/postgres`. Without a server the tests fail; they
//! never skip.

mod contract;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use sluice_store::testing::{TestDatabase, admin, with_database};
use sluice_store::{Store, StoreOptions};
use sqlx::{Connection, Executor, PgConnection};

/// Upper bound for a whole test: a hang is a failure, not a stuck CI job.
const TEST_DEADLINE: Duration = Duration::from_secs(120);

struct Pg {
    url: String,
}

impl contract::Harness for Pg {
    async fn connect(&self) -> Store {
        Store::connect(&self.url, StoreOptions::default())
            .await
            .expect("connect to the test database")
    }

    async fn exec(&self, sql: &str) -> Result<u64, String> {
        let mut conn = PgConnection::connect(&self.url)
            .await
            .map_err(|e| e.to_string())?;
        let r = conn.execute(sql).await.map_err(|e| e.to_string());
        let _ = conn.close().await;
        r.map(|done| done.rows_affected())
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let mut conn = PgConnection::connect(&self.url).await.unwrap();
        let n = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
        let _ = conn.close().await;
        n
    }

    async fn blob(&self, sql: &str) -> Vec<u8> {
        let mut conn = PgConnection::connect(&self.url).await.unwrap();
        let b = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
        let _ = conn.close().await;
        b
    }
}

/// Runs `body` on a fresh database, then drops it whether the body passed or not.
async fn on_fresh_database<F, Fut>(body: F)
where
    F: FnOnce(Pg) -> Fut,
    Fut: Future<Output = ()>,
{
    let db = TestDatabase::create().await;
    let pg = Pg {
        url: db.url.clone(),
    };
    let result = AssertUnwindSafe(tokio::time::timeout(TEST_DEADLINE, body(pg)))
        .catch_unwind()
        .await;
    db.drop_now().await;
    match result {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(Err(_)) => panic!("test did not finish within {TEST_DEADLINE:?}"),
        Ok(Ok(())) => {}
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            on_fresh_database(|pg| async move { contract::$name(&pg).await }).await;
        }
    )*};
}

contract!(
    migrations_are_idempotent_and_safe_concurrently,
    append_round_trips_events,
    duplicates_are_skipped_and_reported,
    concurrent_appends_of_the_same_ids_store_each_once,
    events_are_append_only,
    a_failed_append_stores_nothing,
    offsets_commit_with_the_batch,
    outbox_fetch_delete_and_failures,
    listener_wakes_on_append,
    concurrent_writers_drain_exactly_once_in_order,
    dead_letters_round_trip,
    retention_drops_old_events_and_keeps_recent_ones,
    appends_outside_ready_partitions_still_work,
    api_keys_verify_with_their_role,
    wrong_and_malformed_api_keys_verify_as_nothing,
    revoked_api_keys_verify_as_nothing,
    api_keys_are_listed_without_secrets,
    api_keys_are_hashed_with_a_salt,
    incremental_rollups_equal_rollups_from_scratch,
    device_latest_keeps_the_newest,
    projection_offsets_commit_atomically,
    projection_versions_are_independent,
    projection_versions_rebuild_and_switch,
    replay_jobs_progress_resume_and_cancel,
    readings_retention_keeps_recent_readings_and_rollups,
    anomalies_are_stored_once_per_event_id,
    anomalies_commit_with_the_offsets,
    anomalies_retention_keeps_recent_ones,
    select_reads_anomalies,
    enqueue_is_idempotent_on_the_dedup_key,
    enqueue_commits_with_its_offsets,
    claims_give_each_due_action_to_one_claimer,
    claims_respect_the_schedule_and_the_lease,
    attempts_move_actions_and_fill_the_ledger,
    a_dead_action_is_redriven_once_through_its_letter,
    actions_retention_keeps_pending_ones,
    select_reads_the_action_ledger,
);

#[test]
fn database_names_are_replaced_in_urls() {
    assert_eq!(
        with_database("postgres://u@h:5432/postgres", "x"),
        "postgres://u@h:5432/x"
    );
    assert_eq!(
        with_database("postgresql://u:p@h/db?sslmode=disable", "x"),
        "postgresql://u:p@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}

/// A server that is not there is an outage (retried), and the message says where we looked.
#[tokio::test]
async fn an_unreachable_server_is_a_transient_error() {
    let opts = StoreOptions {
        acquire_timeout: Duration::from_secs(2),
        ..StoreOptions::default()
    };
    // Port 1 on loopback: nothing listens there.
    let err = Store::connect("postgres://postgres@127.0.0.1:1/postgres", opts)
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
}

/// Connections killed under the store (a failover, a restart): an operation either succeeds on
/// a fresh connection or fails as transient, and the next one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_transient_and_recovered() {
    on_fresh_database(|pg| async move {
        use contract::Harness;
        let store = pg.open().await;
        store
            .append(&contract::batch([contract::reading(
                "dev-1",
                1,
                contract::now(),
            )]))
            .await
            .unwrap();
        let db = pg.url.rsplit('/').next().unwrap().to_owned();
        let mut conn = admin().await;
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&db)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert!(!killed.is_empty(), "the store had connections to kill");
        match store.event_count().await {
            Ok(n) => assert_eq!(n, 1),
            Err(e) => assert!(e.is_transient(), "a lost connection is transient: {e}"),
        }
        assert_eq!(store.event_count().await.unwrap(), 1);
        let out = store
            .append(&contract::batch([contract::reading(
                "dev-1",
                2,
                contract::now(),
            )]))
            .await
            .unwrap();
        assert_eq!(out.appended.len(), 1);
    })
    .await;
}
