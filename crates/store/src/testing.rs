//! Throwaway PostgreSQL databases for the tests of this crate and of the processors built on
//! it. The server comes from `SLUICE_TEST_POSTGRES` (a URL to any database on it), else
//! `postgres://postgres@127.0.0.1:5432/postgres`; without one, tests fail with a message
//! saying so, never skip.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use sqlx::{Connection, PgConnection};

use crate::bench::ScratchDatabase;

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The test server's URL.
pub fn server_url() -> String {
    std::env::var("SLUICE_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_SERVER.to_owned())
}

pub use crate::bench::with_database;

/// A connection to the test server's own database, for CREATE and DROP DATABASE.
pub async fn admin() -> PgConnection {
    let url = server_url();
    PgConnection::connect(&url).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach PostgreSQL at {url}: {e}\n\
             These tests need a server: start one, or point them at one with \
             SLUICE_TEST_POSTGRES=postgres://USER@HOST:PORT/DB"
        )
    })
}

/// A database of its own for one test; call [`TestDatabase::drop_now`] at the end.
#[derive(Debug)]
pub struct TestDatabase {
    scratch: ScratchDatabase,
    /// Its URL.
    pub url: String,
}

impl TestDatabase {
    /// Creates `sluice_test_<random>` on the test server.
    pub async fn create() -> TestDatabase {
        let url = server_url();
        let scratch = ScratchDatabase::create(&url, "sluice_test")
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot create a test database on {url}: {e}\n\
                     These tests need a server: start one, or point them at one with \
                     SLUICE_TEST_POSTGRES=postgres://USER@HOST:PORT/DB"
                )
            });
        TestDatabase {
            url: scratch.url.clone(),
            scratch,
        }
    }

    /// Drops it, closing whatever still connects to it.
    pub async fn drop_now(self) {
        self.scratch
            .drop_now()
            .await
            .expect("drop the test database");
    }
}

/// Runs `body` with the URL of a fresh Postgres database, dropped afterwards also when the
/// body fails (for tests of what only Postgres has).
pub async fn on_postgres<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let db = TestDatabase::create().await;
    let result = AssertUnwindSafe(body(db.url.clone())).catch_unwind().await;
    db.drop_now().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `body` with a store URL on each backend: a SQLite file in a temporary folder, then a
/// fresh Postgres database, dropped afterwards.
pub async fn on_each_backend<F, Fut>(body: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("a temporary folder");
    body(format!(
        "sqlite://{}",
        dir.path().join("sluice.db").display()
    ))
    .await;
    // The database is dropped even when the body fails, which then fails as it did.
    on_postgres(body).await;
}

/// Waits until `check` holds, looking every 20 ms, and fails the test after `deadline`: for
/// conditions nothing announces (counters, rows, offsets).
pub async fn until(what: &str, deadline: std::time::Duration, check: impl AsyncFn() -> bool) {
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
