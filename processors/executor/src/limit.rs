//! Rate limits on deliveries: one global token bucket and one per endpoint (GCRA, `governor`).
//!
//! A delivery that is limited is not sent and not failed: the caller reschedules it after the
//! returned wait, so a busy endpoint delays only its own deliveries.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_second: NonZeroU32,
    /// Requests that may be sent at once after a quiet period.
    pub burst: NonZeroU32,
}

impl Rate {
    /// `per_second` with a burst of the same size.
    pub const fn per_second(per_second: NonZeroU32) -> Rate {
        Rate {
            per_second,
            burst: per_second,
        }
    }

    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// Default global rate until `ExecutorConfig` has a setting: 100 requests per second.
pub const DEFAULT_GLOBAL: Rate = Rate::per_second(NonZeroU32::new(100).unwrap());
/// Default rate per endpoint until `ExecutorConfig` has a setting: 10 requests per second.
pub const DEFAULT_PER_ENDPOINT: Rate = Rate::per_second(NonZeroU32::new(10).unwrap());

/// The global and per-endpoint limits, shared by every delivery task.
#[derive(Debug)]
pub struct Limits {
    global: DefaultDirectRateLimiter,
    per_endpoint: DefaultKeyedRateLimiter<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(DEFAULT_GLOBAL, DEFAULT_PER_ENDPOINT)
    }
}

impl Limits {
    /// The limits an executor's config sets (`rate_limit`, `endpoint_rate_limit`, per second,
    /// with a burst of one second's worth).
    pub fn from_config(config: &sluice_topology::ExecutorConfig) -> Self {
        let per_s = |n: u32| Rate::per_second(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        Limits::new(per_s(config.rate_limit), per_s(config.endpoint_rate_limit))
    }

    /// Limits of `global` over all endpoints and `per_endpoint` for each endpoint.
    pub fn new(global: Rate, per_endpoint: Rate) -> Self {
        Limits {
            global: RateLimiter::direct(global.quota()),
            per_endpoint: RateLimiter::keyed(per_endpoint.quota()),
        }
    }

    /// Takes one token for a request to `endpoint` from both buckets, or says how long to wait
    /// before trying again.
    ///
    /// The endpoint's bucket is asked first: if it refuses, no global token is spent, so an
    /// endpoint over its own limit does not eat into the others' share. (A global refusal after
    /// an endpoint token was taken costs only that endpoint one token.)
    pub fn try_acquire(&self, endpoint: &str) -> Result<(), Duration> {
        let now = DefaultClock::default().now();
        self.per_endpoint
            .check_key(&endpoint.to_owned())
            .map_err(|nu| nu.wait_time_from(now))?;
        self.global.check().map_err(|nu| nu.wait_time_from(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst: u32) -> Rate {
        Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    // Rates of one per second with small bursts: the refill during a test run is far below one
    // token in the assertions that matter, and the waits are bounded by the period.
    #[test]
    fn per_endpoint_bucket_limits_only_its_endpoint() {
        let limits = Limits::new(rate(1, 100), rate(1, 2));
        assert_eq!(limits.try_acquire("a"), Ok(()));
        assert_eq!(limits.try_acquire("a"), Ok(()));
        let wait = limits.try_acquire("a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another endpoint has its own bucket.
        assert_eq!(limits.try_acquire("b"), Ok(()));
        assert_eq!(limits.try_acquire("b"), Ok(()));
        assert!(limits.try_acquire("b").is_err());
    }

    #[test]
    fn global_bucket_limits_all_endpoints() {
        let limits = Limits::new(rate(1, 3), rate(1, 100));
        assert_eq!(limits.try_acquire("a"), Ok(()));
        assert_eq!(limits.try_acquire("b"), Ok(()));
        assert_eq!(limits.try_acquire("c"), Ok(()));
        let wait = limits.try_acquire("d").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
    }

    #[test]
    fn an_endpoint_over_its_limit_spends_no_global_token() {
        let limits = Limits::new(rate(1, 2), rate(1, 1));
        assert_eq!(limits.try_acquire("hot"), Ok(()));
        for _ in 0..10 {
            assert!(limits.try_acquire("hot").is_err());
        }
        // One global token is left for another endpoint.
        assert_eq!(limits.try_acquire("cold"), Ok(()));
    }
}
