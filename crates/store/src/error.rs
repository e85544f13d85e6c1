//! The store's error type and the line between an outage (retry) and everything else (stop).

use std::io;

use sqlx::migrate::MigrateError;

/// Any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of the store.
///
/// The runtime retries [`Error::Transient`] with backoff and stops on anything else, so the
/// line matters: an outage must never dead-letter a message, and a bug must never spin forever.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A store URL that cannot be used.
    #[error(
        "invalid store URL {url:?}: {reason} (expected postgres://USER@HOST:PORT/DB, \
         postgresql://..., or sqlite://PATH)"
    )]
    InvalidUrl {
        /// The URL, as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Options that cannot work; every problem found, not only the first.
    #[error("invalid store options: {}", .0.join("; "))]
    InvalidOptions(Vec<String>),
    /// An argument the store refuses (a bug in the caller).
    #[error("invalid argument to {op}: {reason}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An outage: the database is unreachable, restarting, locked, out of connections, or
    /// aborted the transaction to resolve a conflict. Retrying later may succeed.
    #[error("store unavailable during {op}: {source}")]
    Transient {
        /// The operation that failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// Everything else: schema mismatch, an unexpected constraint violation, a corrupt row.
    /// Retrying will not help.
    #[error("store failure during {op}: {source}")]
    Fatal {
        /// The operation that failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Whether retrying the same operation later may succeed (an outage, not a bug).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Transient { .. })
    }

    /// Wraps a database error from `op`, deciding whether it is transient.
    pub(crate) fn db(op: &'static str, err: sqlx::Error) -> Self {
        if is_transient_sqlx(&err) {
            Error::Transient {
                op,
                source: Box::new(err),
            }
        } else {
            Error::Fatal {
                op,
                source: Box::new(err),
            }
        }
    }

    /// Wraps a migration error, transient when its cause is.
    pub(crate) fn migrate(err: MigrateError) -> Self {
        let transient = match &err {
            MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => is_transient_sqlx(e),
            _ => false,
        };
        let source = Box::new(err);
        if transient {
            Error::Transient {
                op: "migrate",
                source,
            }
        } else {
            Error::Fatal {
                op: "migrate",
                source,
            }
        }
    }

    /// A row the store cannot make sense of (corrupt, or written by another schema).
    pub(crate) fn corrupt(op: &'static str, what: impl Into<String>) -> Self {
        Error::Fatal {
            op,
            source: what.into().into(),
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Helper for `map_err`: `.map_err(db("append"))`.
pub(crate) fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::db(op, e)
}

fn is_transient_sqlx(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(e) => is_transient_io(e),
        sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(e) => match e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
            Some(pg) => is_transient_sqlstate(pg.code()),
            None => match e.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                Some(_) => e
                    .code()
                    .and_then(|c| c.parse::<i32>().ok())
                    .is_some_and(is_transient_sqlite_code),
                None => false,
            },
        },
        sqlx::Error::Migrate(m) => match m.as_ref() {
            MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => is_transient_sqlx(e),
            _ => false,
        },
        _ => false,
    }
}

fn is_transient_io(e: &io::Error) -> bool {
    // Permission and not-found errors are configuration, not an outage.
    !matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied
            | io::ErrorKind::NotFound
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::InvalidData
            | io::ErrorKind::Unsupported
    )
}

/// SQLSTATEs that describe an outage or a conflict resolved by aborting, after the Postgres
/// error-code appendix.
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (disk full, too many connections)
        || code.starts_with("58") // system error (I/O)
        || matches!(
            code,
            "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | "55P03" // lock_not_available
                | "57014" // query_canceled (statement timeout)
                | "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now
        )
}

/// SQLite primary result codes that describe contention or the disk, not the data.
fn is_transient_sqlite_code(extended: i32) -> bool {
    matches!(
        extended & 0xff,
        5 // SQLITE_BUSY ("database is locked")
            | 6 // SQLITE_LOCKED
            | 10 // SQLITE_IOERR
            | 13 // SQLITE_FULL
            | 15 // SQLITE_PROTOCOL
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_transient_and_bugs_are_not() {
        let refused = sqlx::Error::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(Error::db("x", refused).is_transient());
        assert!(Error::db("x", sqlx::Error::PoolTimedOut).is_transient());
        assert!(!Error::db("x", sqlx::Error::RowNotFound).is_transient());
        assert!(!Error::db("x", sqlx::Error::PoolClosed).is_transient());
        let denied = sqlx::Error::Io(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!Error::db("x", denied).is_transient());
        assert!(!Error::migrate(MigrateError::VersionMismatch(1)).is_transient());
    }

    #[test]
    fn sqlstates_and_sqlite_codes() {
        for code in ["08006", "40001", "40P01", "57P01", "53300"] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "23514", "42P01", "22P02"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
        assert!(is_transient_sqlite_code(5)); // BUSY
        assert!(is_transient_sqlite_code(517)); // BUSY_SNAPSHOT
        assert!(is_transient_sqlite_code(266)); // IOERR_READ
        assert!(!is_transient_sqlite_code(2067)); // CONSTRAINT_UNIQUE
        assert!(!is_transient_sqlite_code(275)); // CONSTRAINT_CHECK
    }
}
