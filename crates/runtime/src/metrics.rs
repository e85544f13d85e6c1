//! Hooks the runtime calls as it works; the observability issue turns them into Prometheus
//! metrics. Labels are fixed reason codes, never error text.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What the runtime reports.
pub trait Metrics: Send + Sync {
    /// An input was processed (its outputs are ready), taking `latency`.
    fn processed(&self, processor: &str, latency: Duration);
    /// An input was rejected by the processor or failed to decode.
    fn rejected(&self, processor: &str, reason: &'static str);
    /// A transient failure is being retried.
    fn retried(&self, processor: &str);
    /// An input went to the DLQ.
    fn dead_lettered(&self, processor: &str, class: &'static str);
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMetrics;

impl Metrics for NoMetrics {
    fn processed(&self, _: &str, _: Duration) {}
    fn rejected(&self, _: &str, _: &'static str) {}
    fn retried(&self, _: &str) {}
    fn dead_lettered(&self, _: &str, _: &'static str) {}
}

/// Counts, for tests and `sluice bench`.
#[derive(Debug, Default)]
pub struct CountingMetrics {
    /// Inputs processed.
    pub processed: AtomicU64,
    /// Inputs rejected.
    pub rejected: AtomicU64,
    /// Retries of transient failures.
    pub retried: AtomicU64,
    /// Inputs dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Reason codes seen, in order.
    pub reasons: Mutex<Vec<&'static str>>,
}

impl Metrics for CountingMetrics {
    fn processed(&self, _: &str, _: Duration) {
        self.processed.fetch_add(1, Ordering::Relaxed);
    }
    fn rejected(&self, _: &str, reason: &'static str) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(reason);
    }
    fn retried(&self, _: &str) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
    fn dead_lettered(&self, _: &str, _: &'static str) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
}
