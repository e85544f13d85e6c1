//! The store contract on SQLite, plus what only SQLite has (one file, one writer at a time).
//! Each test gets its own temporary folder.

mod contract;

use std::time::Duration;

use sluice_store::{Error, Store, StoreOptions};
use sqlx::{Connection, Executor, SqliteConnection};

struct Lite {
    dir: tempfile::TempDir,
}

impl Lite {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// In a folder that does not exist yet: the store creates it.
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("data").join("sluice.db")
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.path().display())
    }

    async fn raw(&self) -> SqliteConnection {
        SqliteConnection::connect(&format!("sqlite://{}", self.path().display()))
            .await
            .unwrap()
    }
}

impl contract::Harness for Lite {
    async fn connect(&self) -> Store {
        Store::connect(&self.url(), StoreOptions::default())
            .await
            .expect("open the test database")
    }

    async fn exec(&self, sql: &str) -> Result<u64, String> {
        let mut conn = self.raw().await;
        let r = conn.execute(sql).await.map_err(|e| e.to_string());
        let _ = conn.close().await;
        r.map(|done| done.rows_affected())
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let mut conn = self.raw().await;
        let n = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
        let _ = conn.close().await;
        n
    }

    async fn blob(&self, sql: &str) -> Vec<u8> {
        let mut conn = self.raw().await;
        let b = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
        let _ = conn.close().await;
        b
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let lite = Lite::new();
            tokio::time::timeout(Duration::from_secs(120), contract::$name(&lite))
                .await
                .expect("test did not finish within 120 s");
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

/// Another process holding the write lock longer than busy_timeout: "database is locked" is
/// an outage (retried), and nothing of the append is stored; once the lock goes, it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_is_a_transient_error() {
    use contract::Harness;
    let lite = Lite::new();
    lite.open().await;
    let opts = StoreOptions {
        busy_timeout: Duration::from_millis(200),
        ..StoreOptions::default()
    };
    let store = Store::connect(&lite.url(), opts).await.unwrap();

    let mut other = lite.raw().await;
    other.execute("BEGIN IMMEDIATE").await.unwrap();
    let b = contract::batch([contract::reading("dev-1", 1, contract::now())]);
    let err = store.append(&b).await.expect_err("the file is locked");
    assert!(err.is_transient(), "{err}");
    assert!(matches!(err, Error::Transient { .. }));
    other.execute("ROLLBACK").await.unwrap();

    assert_eq!(store.event_count().await.unwrap(), 0);
    assert_eq!(store.append(&b).await.unwrap().appended.len(), 1);
}

/// The in-process wake-up reaches every listener, not only one.
#[tokio::test]
async fn every_listener_is_woken() {
    use contract::Harness;
    let lite = Lite::new();
    let store = lite.open().await;
    let mut a = store.outbox_listener().await.unwrap();
    let mut b = store.outbox_listener().await.unwrap();
    store
        .append(&contract::batch([contract::reading(
            "dev-1",
            1,
            contract::now(),
        )]))
        .await
        .unwrap();
    assert!(a.wait(Duration::from_secs(1)).await.unwrap());
    assert!(b.wait(Duration::from_secs(1)).await.unwrap());
}
