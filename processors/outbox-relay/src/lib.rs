//! The outbox-relay: publishes the outbox's entries to their topics (the wire-format values
//! the validator wrote, keyed by aggregate id) and deletes them only after the log
//! acknowledged them. It wakes on the store's notification and polls as a fallback.
//!
//! It reads whatever entries remain, lowest id first, never "after the last id seen": Postgres
//! ids are not commit-ordered, so a transaction that commits late can hold a lower id than
//! entries already published, and a relay that remembered a position would skip it. Entries of
//! one topic are published in id order in one send, so each aggregate's events keep their
//! order on its partition; a failed send leaves all its entries for the next pass (a retried
//! entry may appear twice on its topic, never zero times).
//!
//! Run one relay per store: two would publish the same entries twice and could interleave an
//! aggregate's events. This crate must never delete an entry the log did not acknowledge.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_log::{Log, Producer, Record};
use sluice_runtime::{DEFAULT_BACKOFF, backoff_delay, retry_transient};
use sluice_store::{OutboxEntry, OutboxListener, Store};
use tokio_util::sync::CancellationToken;

pub use sluice_topology::OutboxRelayConfig;

/// The processor's name in topologies and metrics.
pub const NAME: &str = "outbox-relay";

/// Errors that stop the relay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log refused something that retrying will not fix.
    #[error("outbox-relay {name}: log: {source}")]
    Log {
        /// The instance.
        name: String,
        /// The cause.
        source: sluice_log::Error,
    },
    /// The store refused something that retrying will not fix.
    #[error("outbox-relay {name}: store: {source}")]
    Store {
        /// The instance.
        name: String,
        /// The cause.
        source: sluice_store::Error,
    },
    /// Stopped at a crash point (tests only).
    #[error("outbox-relay {0}: crashed on purpose after publishing")]
    Crashed(String),
}

/// How the relay runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The instance name, for logs.
    pub name: String,
    /// Batch size and fallback poll interval.
    pub config: OutboxRelayConfig,
    /// Longest wait between retries during an outage.
    pub max_backoff: Duration,
    /// Stop right after the next publish, before deleting its entries (crash tests).
    #[doc(hidden)]
    pub crash_after_publish: bool,
}

impl Settings {
    /// Settings for an instance called `name`, with defaults elsewhere.
    pub fn new(name: &str) -> Settings {
        Settings {
            name: name.to_owned(),
            config: OutboxRelayConfig::default(),
            max_backoff: Duration::from_secs(30),
            crash_after_publish: false,
        }
    }

    /// 1 s, 2 s, then doubling up to `max_backoff`, after `failures` failed passes in a row.
    fn delay(&self, failures: u32) -> Duration {
        backoff_delay(&DEFAULT_BACKOFF, self.max_backoff, failures + 1)
    }
}

/// Counters for tests, the bench and the metrics endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    /// Entries published and deleted.
    pub published: AtomicU64,
    /// Entries whose publish failed (each failure counted; they stay in the outbox).
    pub failed: AtomicU64,
    /// Passes that found entries.
    pub passes: AtomicU64,
}

/// Runs the relay until `shutdown` is cancelled or a fatal error.
pub async fn run<L: Log>(
    settings: &Settings,
    log: &L,
    store: &Store,
    stats: &Stats,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let producer = log.producer().map_err(|source| Error::Log {
        name: settings.name.clone(),
        source,
    })?;
    let relay = Relay {
        settings,
        store,
        stats,
        shutdown: &shutdown,
    };
    relay.run(&producer).await
}

struct Relay<'a> {
    settings: &'a Settings,
    store: &'a Store,
    stats: &'a Stats,
    shutdown: &'a CancellationToken,
}

impl Relay<'_> {
    async fn run<P: Producer>(&self, producer: &P) -> Result<(), Error> {
        let Some(mut listener) = self
            .retrying("listen", || self.store.outbox_listener())
            .await?
        else {
            return Ok(());
        };
        let limit = u32::try_from(self.settings.config.batch_size).unwrap_or(u32::MAX);
        let mut failures = 0u32;
        while !self.shutdown.is_cancelled() {
            let Some(entries) = self
                .retrying("read the outbox", || self.store.outbox_fetch(limit))
                .await?
            else {
                break;
            };
            if entries.is_empty() {
                if !self.wait(&mut listener).await? {
                    break;
                }
                continue;
            }
            self.stats.passes.fetch_add(1, Ordering::Relaxed);
            let full = entries.len() == limit as usize;
            let (published, failed) = self.publish(producer, entries).await?;
            if self.settings.crash_after_publish && !published.is_empty() {
                return Err(Error::Crashed(self.settings.name.clone()));
            }
            if !published.is_empty() {
                let deleted = self
                    .retrying("delete published entries", || {
                        self.store.outbox_delete(&published)
                    })
                    .await?;
                if deleted.is_none() {
                    break;
                }
                self.stats
                    .published
                    .fetch_add(published.len() as u64, Ordering::Relaxed);
            }
            if failed {
                failures += 1;
                if !self.pause(self.settings.delay(failures)).await {
                    break;
                }
            } else {
                failures = 0;
                // A short batch means the outbox is drained for now; wait for the next append
                // rather than reading an empty table in a loop.
                if !full && !self.wait(&mut listener).await? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Publishes one pass, a send per topic in id order. Returns the ids acknowledged and
    /// whether any send failed.
    async fn publish<P: Producer>(
        &self,
        producer: &P,
        entries: Vec<OutboxEntry>,
    ) -> Result<(Vec<i64>, bool), Error> {
        let mut by_topic: BTreeMap<String, Vec<OutboxEntry>> = BTreeMap::new();
        for entry in entries {
            by_topic.entry(entry.topic.clone()).or_default().push(entry);
        }
        let mut published = Vec::new();
        let mut failed = false;
        for (topic, entries) in by_topic {
            let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
            let records = entries
                .into_iter()
                .map(|e| Record {
                    key: Some(e.key),
                    value: e.value,
                    ..Record::default()
                })
                .collect();
            match producer.send(&topic, records).await {
                Ok(_) => published.extend(ids),
                Err(e) => {
                    failed = true;
                    self.stats
                        .failed
                        .fetch_add(ids.len() as u64, Ordering::Relaxed);
                    tracing::warn!(relay = %self.settings.name, %topic, entries = ids.len(), error = %e, "publish failed; the entries stay in the outbox");
                    let message = e.to_string();
                    self.retrying("record a failed publish", || {
                        self.store.outbox_record_failure(&ids, &message)
                    })
                    .await?;
                }
            }
        }
        Ok((published, failed))
    }

    /// Waits for an append notification or the poll interval. False if shut down.
    async fn wait(&self, listener: &mut OutboxListener) -> Result<bool, Error> {
        let interval = self.settings.config.poll_interval;
        tokio::select! {
            woke = listener.wait(interval) => {
                if let Err(e) = woke {
                    if !e.is_transient() {
                        return Err(self.store_err(e));
                    }
                    // The fallback poll covers missed wake-ups; just do not spin.
                    tracing::warn!(relay = %self.settings.name, error = %e, "outbox listener failed");
                    return Ok(self.pause(interval).await);
                }
                Ok(true)
            }
            () = self.shutdown.cancelled() => Ok(false),
        }
    }

    /// Runs `op` until it succeeds, backing off on outages. `None` if shut down first.
    async fn retrying<T, F, Fut>(&self, what: &str, op: F) -> Result<Option<T>, Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = sluice_store::Result<T>>,
    {
        retry_transient(
            op,
            sluice_store::Error::is_transient,
            self.settings.max_backoff,
            self.shutdown,
            |e, delay| {
                tracing::warn!(relay = %self.settings.name, error = %e, retry_in = ?delay, "cannot {what}; retrying");
            },
        )
        .await
        .map_err(|e| self.store_err(e))
    }

    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = self.shutdown.cancelled() => false,
        }
    }

    fn store_err(&self, source: sluice_store::Error) -> Error {
        Error::Store {
            name: self.settings.name.clone(),
            source,
        }
    }
}
