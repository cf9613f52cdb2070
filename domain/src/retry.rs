//! The retry policy: exponential backoff with a cap and a bounded jitter.
//!
//! Delays are whole milliseconds so the Postgres adapter can mirror the formula in SQL exactly
//! (`faultline_backoff_ms` in the migrations); the random sample is an argument, never drawn here.

use serde::{Deserialize, Serialize};

/// Exponential backoff: attempt `n` (1-based) waits `base * 2^(n-1)`, never more than `cap`,
/// then scaled by a jitter factor drawn uniformly from `[1 - jitter, 1 + jitter]` and capped again.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt, in milliseconds.
    pub base_ms: i64,
    /// Upper bound of every delay, jitter included, in milliseconds.
    pub cap_ms: i64,
    /// Relative jitter in `[0, 1]`: 0.1 spreads a 10 s delay over 9 s..11 s, so that jobs that
    /// failed together do not all come back in the same instant.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl RetryPolicy {
    /// The policy of a job that does not override it: 1 s, doubling, capped at one hour, ±10 %.
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        base_ms: 1_000,
        cap_ms: 3_600_000,
        jitter: 0.1,
    };

    /// A policy with the default jitter and the given base and cap.
    pub fn new(base_ms: i64, cap_ms: i64) -> Self {
        Self {
            base_ms,
            cap_ms,
            jitter: Self::DEFAULT.jitter,
        }
    }

    /// The delay after failed attempt `attempt` (1-based) before jitter: `min(cap, base * 2^(attempt-1))`.
    /// Attempts below 1 are treated as 1. Never overflows.
    pub fn delay_without_jitter_ms(&self, attempt: i32) -> i64 {
        let base = self.base_ms.max(0);
        let cap = self.cap_ms.max(0);
        let doublings = (attempt.max(1) - 1).min(62) as u32;
        base.checked_mul(1_i64 << doublings)
            .map_or(cap, |d| d.min(cap))
    }

    /// Applies jitter to `delay_ms` with `sample` in `[0, 1)` (clamped): the result lies in
    /// `[floor(delay * (1 - jitter)), min(cap, delay * (1 + jitter))]`.
    pub fn apply_jitter_ms(&self, delay_ms: i64, sample: f64) -> i64 {
        let sample = if sample.is_finite() {
            sample.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - jitter + 2.0 * jitter * sample;
        let jittered = (delay_ms as f64 * factor).floor();
        (jittered as i64).clamp(0, self.cap_ms.max(0))
    }

    /// The delay after failed attempt `attempt` with jitter sample `sample`.
    pub fn delay_ms(&self, attempt: i32, sample: f64) -> i64 {
        self.apply_jitter_ms(self.delay_without_jitter_ms(attempt), sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doubles_from_the_base_until_the_cap() {
        let p = RetryPolicy::new(1_000, 10_000);
        let delays: Vec<i64> = (1..=6).map(|a| p.delay_without_jitter_ms(a)).collect();
        assert_eq!(delays, [1_000, 2_000, 4_000, 8_000, 10_000, 10_000]);
    }

    #[test]
    fn jitter_extremes_hit_the_documented_bounds() {
        let p = RetryPolicy::new(1_000, 100_000);
        assert_eq!(p.apply_jitter_ms(10_000, 0.0), 9_000);
        assert_eq!(p.apply_jitter_ms(10_000, 0.5), 10_000);
        assert_eq!(p.apply_jitter_ms(10_000, 1.0), 11_000);
        // jitter never pushes a capped delay past the cap
        assert_eq!(p.apply_jitter_ms(100_000, 1.0), 100_000);
    }

    #[test]
    fn huge_attempt_numbers_saturate_at_the_cap() {
        let p = RetryPolicy::new(i64::MAX / 2, i64::MAX);
        assert_eq!(p.delay_without_jitter_ms(i32::MAX), i64::MAX);
        assert_eq!(
            RetryPolicy::DEFAULT.delay_without_jitter_ms(i32::MAX),
            3_600_000
        );
    }

    fn policy() -> impl Strategy<Value = RetryPolicy> {
        (0_i64..=86_400_000, 0_i64..=604_800_000, 0.0_f64..=1.0).prop_map(|(base, cap, jitter)| {
            RetryPolicy {
                base_ms: base,
                cap_ms: cap,
                jitter,
            }
        })
    }

    proptest! {
        #[test]
        fn backoff_never_decreases_and_never_passes_the_cap(p in policy(), attempt in 1_i32..200) {
            let now = p.delay_without_jitter_ms(attempt);
            let next = p.delay_without_jitter_ms(attempt + 1);
            prop_assert!(next >= now);
            prop_assert!(next <= p.cap_ms);
            if now < p.cap_ms && p.base_ms > 0 {
                // strictly doubling until the cap
                prop_assert!(next == (now * 2).min(p.cap_ms));
            }
        }

        #[test]
        fn jitter_stays_within_its_bounds(p in policy(), attempt in 1_i32..100, sample in 0.0_f64..1.0) {
            let raw = p.delay_without_jitter_ms(attempt);
            let d = p.delay_ms(attempt, sample);
            let low = (raw as f64 * (1.0 - p.jitter)).floor() as i64;
            let high = ((raw as f64 * (1.0 + p.jitter)).ceil() as i64).min(p.cap_ms);
            prop_assert!(d >= low.max(0), "{d} < {low}");
            prop_assert!(d <= high, "{d} > {high}");
        }

        #[test]
        fn jitter_is_monotonic_in_the_sample(p in policy(), attempt in 1_i32..100, a in 0.0_f64..1.0, b in 0.0_f64..1.0) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(p.delay_ms(attempt, lo) <= p.delay_ms(attempt, hi));
        }
    }
}
