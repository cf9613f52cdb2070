//! The clock port: where "now" comes from.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current instant, truncated to microseconds (PostgreSQL's precision).
    fn now(&self) -> DateTime<Utc>;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now().trunc_subsecs(6)
    }
}

/// A clock that only moves when told to: tests advance it past leases and backoffs instead of
/// sleeping. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock stopped at `start` (truncated to microseconds).
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new(start.trunc_subsecs(6))),
        }
    }

    /// Moves the clock forward by `millis` milliseconds.
    pub fn advance_ms(&self, millis: i64) {
        let mut now = self.now.lock().unwrap_or_else(|poison| poison.into_inner());
        *now += TimeDelta::milliseconds(millis);
    }

    /// Sets the clock to `at` (truncated to microseconds).
    pub fn set(&self, at: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(|poison| poison.into_inner()) = at.trunc_subsecs(6);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let clock = ManualClock::new(DateTime::UNIX_EPOCH);
        let other = clock.clone();
        assert_eq!(clock.now(), DateTime::UNIX_EPOCH);
        other.advance_ms(1_500);
        assert_eq!(
            clock.now(),
            DateTime::UNIX_EPOCH + TimeDelta::milliseconds(1_500)
        );
    }
}
