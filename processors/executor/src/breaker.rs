//! A per-endpoint circuit breaker.
//!
//! Closed: calls go through and consecutive failures are counted. After `failures` of them it
//! opens: calls are short-circuited (no request is sent) until `cooldown` has passed. Then one
//! half-open probe is admitted while other calls stay short-circuited; its success closes the
//! breaker and its failure opens it again for a fresh cooldown. Time is passed in, so tests
//! need no clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive failures that open a breaker, by default.
pub const DEFAULT_FAILURES: u32 = 5;
/// How long an open breaker waits before a probe, by default.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(5 * 60);

/// What [`Breaker::admit`] decided for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Closed: make the call.
    Call,
    /// Half-open: make the call as the one probe; its outcome decides the state.
    Probe,
    /// Open: do not call before `until`.
    ShortCircuit {
        /// When a probe may be admitted at the earliest.
        until: Instant,
    },
}

/// The breaker's state, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go through; `failures` consecutive failures so far.
    Closed {
        /// Consecutive failures counted.
        failures: u32,
    },
    /// Calls are short-circuited until `until`.
    Open {
        /// End of the cooldown.
        until: Instant,
    },
    /// A probe was admitted at `since` and has not reported yet.
    HalfOpen {
        /// When the probe was admitted.
        since: Instant,
    },
}

impl State {
    /// A short fixed label for metrics: `closed`, `open` or `half_open`.
    pub fn label(&self) -> &'static str {
        match self {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        }
    }
}

/// A thread-safe circuit breaker for one endpoint.
#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::new(DEFAULT_FAILURES, DEFAULT_COOLDOWN)
    }
}

impl Breaker {
    /// A closed breaker that opens after `failures` consecutive failures (`0` never opens) and
    /// probes after `cooldown`.
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        Breaker {
            failures,
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value always left consistent, so a panic elsewhere while the
        // lock was held does not make it unusable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.lock()
    }

    /// Decides whether a call may be made at `now`.
    pub fn admit(&self, now: Instant) -> Admit {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Admit::Call,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen { since: now };
                Admit::Probe
            }
            State::Open { until } => Admit::ShortCircuit { until },
            // A probe whose outcome never came back (its task was dropped) must not keep the
            // breaker half-open for ever: after another cooldown a new probe is admitted.
            State::HalfOpen { since } if now >= since + self.cooldown => {
                *state = State::HalfOpen { since: now };
                Admit::Probe
            }
            State::HalfOpen { since } => Admit::ShortCircuit {
                until: since + self.cooldown,
            },
        }
    }

    /// Records the outcome of an admitted call that finished at `now`.
    ///
    /// Outcomes are not tied to the admission that allowed them: a call admitted while closed
    /// that finishes during a probe counts like the probe. Outcomes that arrive while open are
    /// ignored: they are of calls made before it opened and say nothing about the cooldown.
    pub fn record(&self, now: Instant, ok: bool) {
        let mut state = self.lock();
        *state = match (*state, ok) {
            (State::Open { .. }, _) => return,
            (_, true) => State::Closed { failures: 0 },
            (State::HalfOpen { .. }, false) => State::Open {
                until: now + self.cooldown,
            },
            (State::Closed { failures }, false) => {
                let failures = failures.saturating_add(1);
                if self.failures != 0 && failures >= self.failures {
                    State::Open {
                        until: now + self.cooldown,
                    }
                } else {
                    State::Closed { failures }
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const COOLDOWN: Duration = Duration::from_secs(300);

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = Breaker::new(5, COOLDOWN);
        let t = Instant::now();
        for _ in 0..4 {
            assert_eq!(b.admit(t), Admit::Call);
            b.record(t, false);
        }
        // A success resets the count.
        b.record(t, true);
        assert_eq!(b.state(), State::Closed { failures: 0 });
        for i in 1..=4 {
            b.record(t, false);
            assert_eq!(b.state(), State::Closed { failures: i });
        }
        b.record(t, false);
        assert_eq!(
            b.state(),
            State::Open {
                until: t + COOLDOWN
            }
        );
        assert_eq!(b.state().label(), "open");
        assert_eq!(
            b.admit(t),
            Admit::ShortCircuit {
                until: t + COOLDOWN
            }
        );
        assert_eq!(
            b.admit(t + COOLDOWN - Duration::from_millis(1)),
            Admit::ShortCircuit {
                until: t + COOLDOWN
            }
        );
    }

    fn opened(t: Instant) -> Breaker {
        let b = Breaker::new(2, COOLDOWN);
        b.record(t, false);
        b.record(t, false);
        assert!(matches!(b.state(), State::Open { .. }));
        b
    }

    #[test]
    fn one_probe_after_cooldown_and_success_closes() {
        let t = Instant::now();
        let b = opened(t);
        let later = t + COOLDOWN;
        assert_eq!(b.admit(later), Admit::Probe);
        assert_eq!(b.state(), State::HalfOpen { since: later });
        // Only one probe: the others are still short-circuited.
        assert_eq!(
            b.admit(later + Duration::from_secs(1)),
            Admit::ShortCircuit {
                until: later + COOLDOWN
            }
        );
        b.record(later + Duration::from_secs(2), true);
        assert_eq!(b.state(), State::Closed { failures: 0 });
        assert_eq!(b.admit(later + Duration::from_secs(3)), Admit::Call);
    }

    #[test]
    fn failed_probe_reopens_with_a_fresh_cooldown() {
        let t = Instant::now();
        let b = opened(t);
        let probe_at = t + COOLDOWN + Duration::from_secs(10);
        assert_eq!(b.admit(probe_at), Admit::Probe);
        let failed_at = probe_at + Duration::from_secs(30);
        b.record(failed_at, false);
        assert_eq!(
            b.state(),
            State::Open {
                until: failed_at + COOLDOWN
            }
        );
        assert_eq!(
            b.admit(failed_at + COOLDOWN - Duration::from_secs(1)),
            Admit::ShortCircuit {
                until: failed_at + COOLDOWN
            }
        );
        assert_eq!(b.admit(failed_at + COOLDOWN), Admit::Probe);
    }

    #[test]
    fn a_lost_probe_does_not_wedge_the_breaker() {
        let t = Instant::now();
        let b = opened(t);
        let probe_at = t + COOLDOWN;
        assert_eq!(b.admit(probe_at), Admit::Probe);
        // No outcome is ever recorded for it.
        assert!(matches!(
            b.admit(probe_at + COOLDOWN / 2),
            Admit::ShortCircuit { .. }
        ));
        assert_eq!(b.admit(probe_at + COOLDOWN), Admit::Probe);
    }

    #[test]
    fn late_outcomes_while_open_are_ignored() {
        let t = Instant::now();
        let b = opened(t);
        b.record(t + Duration::from_secs(1), true);
        b.record(t + Duration::from_secs(2), false);
        assert_eq!(
            b.state(),
            State::Open {
                until: t + COOLDOWN
            }
        );
    }

    #[test]
    fn zero_failures_never_opens() {
        let b = Breaker::new(0, COOLDOWN);
        let t = Instant::now();
        for _ in 0..100 {
            b.record(t, false);
        }
        assert_eq!(b.admit(t), Admit::Call);
    }

    #[test]
    fn exactly_one_probe_among_concurrent_callers() {
        let t = Instant::now();
        let b = Arc::new(opened(t));
        let probes: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let b = &b;
                    s.spawn(move || {
                        (0..100)
                            .filter(|_| b.admit(t + COOLDOWN) == Admit::Probe)
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(probes, 1);
    }
}
