//! Pacing: how many events are due at a moment for a steady rate, without building a backlog
//! when the sender falls behind.

use std::time::{Duration, Instant};

/// How often the senders wake to send what is due.
pub(crate) const TICK: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub(crate) struct Pacer {
    rate: u64,
    start: Instant,
    /// Events counted as done, including the debt forgiven when behind.
    done: u64,
    /// The most sent in one go: 50 ms worth. Beyond it the debt is dropped, so a slow target
    /// lowers the rate achieved instead of piling events up for a burst later.
    max_burst: u64,
}

impl Pacer {
    pub(crate) fn new(rate: u32, start: Instant) -> Pacer {
        Pacer {
            rate: u64::from(rate),
            start,
            done: 0,
            max_burst: u64::from(rate / 20).max(1),
        }
    }

    /// Events due now; the caller sends them and reports each with [`Pacer::sent`].
    pub(crate) fn due(&mut self, now: Instant) -> u64 {
        // Integer arithmetic: floats land one short on exact boundaries.
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        let target = (elapsed * u128::from(self.rate) / 1_000_000_000) as u64;
        let behind = target.saturating_sub(self.done);
        if behind > self.max_burst {
            self.done = target - self.max_burst;
            return self.max_burst;
        }
        behind
    }

    pub(crate) fn sent(&mut self, n: u64) {
        self.done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_the_rate_in_small_steps() {
        let start = Instant::now();
        let mut p = Pacer::new(1000, start);
        let mut total = 0;
        for tick in 1..=100 {
            let n = p.due(start + TICK * tick);
            assert_eq!(n, 10, "tick {tick}");
            p.sent(n);
            total += n;
        }
        assert_eq!(total, 1000);
    }

    #[test]
    fn a_low_rate_sends_now_and_then() {
        let start = Instant::now();
        let mut p = Pacer::new(5, start);
        assert_eq!(p.due(start + Duration::from_millis(150)), 0);
        assert_eq!(p.due(start + Duration::from_millis(210)), 1);
        p.sent(1);
        assert_eq!(p.due(start + Duration::from_millis(390)), 0);
        assert_eq!(p.due(start + Duration::from_millis(400)), 1);
    }

    #[test]
    fn falling_behind_drops_the_debt_beyond_one_burst() {
        let start = Instant::now();
        let mut p = Pacer::new(10_000, start);
        // Stalled for 2 s: 20,000 due, but only 50 ms worth is sent now.
        let n = p.due(start + Duration::from_secs(2));
        assert_eq!(n, 500);
        p.sent(n);
        assert_eq!(p.due(start + Duration::from_secs(2)), 0);
        assert_eq!(p.due(start + Duration::from_millis(2010)), 100);
    }
}
