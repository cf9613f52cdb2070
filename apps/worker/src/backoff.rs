//! Exponential backoff with jitter for failed store calls: how long the worker leaves the store
//! alone after consecutive failures of one kind of call.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tokio::time::Instant;

/// Tracks consecutive failures of one kind of store call and when to try again.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
    ready_at: Option<Instant>,
}

impl Backoff {
    /// No failures yet; pauses start at `min` and never exceed `max`.
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            failures: 0,
            ready_at: None,
        }
    }

    /// Records a failure at `now`; returns the pause before the next try. The pause before jitter
    /// is `min(max, min * 2^(failures - 1))`; jitter draws it from its upper half, so that workers
    /// cut off together do not all return in the same instant.
    pub(crate) fn failed(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(31);
        let ceiling = self
            .min
            .checked_mul(1 << doublings)
            .map_or(self.max, |d| d.min(self.max));
        let pause = ceiling / 2 + ceiling.mul_f64(random_unit() / 2.0);
        self.ready_at = Some(now + pause);
        pause
    }

    /// Records a success: the next failure starts from `min` again.
    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
        self.ready_at = None;
    }

    /// When the next try is allowed (`None`: at once).
    pub(crate) fn ready_at(&self) -> Option<Instant> {
        self.ready_at
    }

    /// Whether a try is allowed at `now`.
    pub(crate) fn is_ready(&self, now: Instant) -> bool {
        self.ready_at.is_none_or(|at| now >= at)
    }
}

/// A random number in `[0, 1)` from the standard library's randomly keyed hasher (no rand crate
/// needed for jitter).
fn random_unit() -> f64 {
    (random_u64() >> 11) as f64 / (1_u64 << 53) as f64
}

/// 64 random bits from the standard library's randomly keyed hasher.
pub(crate) fn random_u64() -> u64 {
    RandomState::new().build_hasher().finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_within_jitter_up_to_the_max_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(1_000);
        let mut backoff = Backoff::new(min, max);
        let now = Instant::now();
        assert!(backoff.is_ready(now));
        let ceilings = [100, 200, 400, 800, 1_000, 1_000];
        for ceiling in ceilings {
            let pause = backoff.failed(now);
            let ceiling = Duration::from_millis(ceiling);
            assert!(pause >= ceiling / 2 && pause <= ceiling, "{pause:?}");
            assert!(!backoff.is_ready(now));
            assert!(backoff.is_ready(now + pause));
            assert_eq!(backoff.ready_at(), Some(now + pause));
        }
        backoff.succeeded();
        assert!(backoff.is_ready(now));
        assert!(backoff.failed(now) <= min);
    }

    #[test]
    fn many_failures_never_overflow() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let now = Instant::now();
        for _ in 0..100 {
            assert!(backoff.failed(now) <= Duration::from_secs(60));
        }
    }
}
