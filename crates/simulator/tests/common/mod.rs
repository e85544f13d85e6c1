//! What the component tests share: fleets with faults, and waiting on conditions.

#![allow(dead_code)] // each test binary uses a part

use std::time::{Duration, Instant};

use sluice_simulator::FleetConfig;

/// Polls `condition` until it holds; panics naming `what` after `timeout`.
pub fn wait_until_blocking(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `condition` until it holds; panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A small fleet with every fault turned up so a short run shows each of them.
pub fn faulty_fleet(rate: u32) -> FleetConfig {
    FleetConfig {
        devices: 20,
        rate,
        anomaly_rate: 0.05,
        malformed_rate: 0.02,
        duplicate_rate: 0.02,
        seed: 42,
        status_rate: 0.05,
        late_rate: 0.0,
    }
}
