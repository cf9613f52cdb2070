//! The worker's counters and gauges: cheap atomics the worker bumps as it goes, readable at any
//! time through a cloneable [`WorkerStats`] handle (the metrics exporter reads these).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Monotonic counts of what a worker did since it was built. [`Counters::since`] turns two
        /// readings into the difference (what one step did).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Counters {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        #[derive(Debug, Default)]
        struct AtomicCounters {
            $($name: AtomicU64,)*
        }

        impl AtomicCounters {
            fn load(&self) -> Counters {
                Counters { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl Counters {
            /// What happened between `earlier` and `self` (field by field, never negative).
            pub fn since(&self, earlier: &Counters) -> Counters {
                Counters { $($name: self.$name.saturating_sub(earlier.$name),)* }
            }
        }

        /// Names one counter, for [`WorkerStats::add`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub(crate) enum Counter {
            $($name,)*
        }

        impl AtomicCounters {
            fn get(&self, counter: Counter) -> &AtomicU64 {
                match counter {
                    $(Counter::$name => &self.$name,)*
                }
            }
        }
    };
}

counters! {
    /// Jobs claimed (attempts started).
    claimed,
    /// Completions the store accepted (jobs now `succeeded`).
    completed,
    /// Failed attempts the store accepted that left the job queued for a retry.
    retried,
    /// Failed attempts the store accepted that ended the job `failed` (permanent failure or
    /// attempt budget spent).
    failed,
    /// Writes the store accepted that ended the job `cancelled` (a cancel was requested).
    cancelled,
    /// Snoozes the store accepted (job queued again without using up an attempt).
    snoozed,
    /// Leases given back at shutdown (job queued again, due at once, attempt returned).
    released,
    /// Handlers that panicked (their attempt failed, retryable).
    panicked,
    /// Handlers stopped by their timeout (their attempt failed, retryable).
    timed_out,
    /// Jobs of a kind with no registered handler (failed permanently).
    unknown_kind,
    /// Cancel requests learnt from heartbeats (the handler's token fired).
    cancel_requests,
    /// Writes the store refused because the lease was no longer held (fencing at work).
    stale_writes_rejected,
    /// Leases found lost (by a heartbeat, or past their end while the store was unreachable):
    /// the handler's token fired and its result is never written.
    leases_lost,
    /// Outcomes given up on: the lease ended before the store could be reached again (or the
    /// store refused the write as invalid). The rescuer retries those jobs.
    writes_dropped,
    /// Failed store calls (connection errors, timeouts, unexpected refusals).
    db_errors,
    /// Jobs leased by claim calls whose answer was lost, given back with their attempt.
    claims_given_back,
}

/// A reading of a worker's counters and gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Counts since the worker was built.
    pub counters: Counters,
    /// Handlers running now (slots in use).
    pub in_flight: u64,
    /// Leases held now: running handlers plus outcomes not yet written.
    pub leases_held: u64,
    /// Outcomes waiting to be written (the store was unreachable).
    pub pending_writes: u64,
}

#[derive(Debug, Default)]
struct Inner {
    counters: AtomicCounters,
    in_flight: AtomicU64,
    leases_held: AtomicU64,
    pending_writes: AtomicU64,
}

/// A handle on a worker's statistics. Clones share them; reading never blocks the worker.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    inner: Arc<Inner>,
}

impl WorkerStats {
    /// The counters and gauges now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let inner = &self.inner;
        StatsSnapshot {
            counters: inner.counters.load(),
            in_flight: inner.in_flight.load(Ordering::Relaxed),
            leases_held: inner.leases_held.load(Ordering::Relaxed),
            pending_writes: inner.pending_writes.load(Ordering::Relaxed),
        }
    }

    /// The counters now.
    pub fn counters(&self) -> Counters {
        self.inner.counters.load()
    }

    pub(crate) fn add(&self, counter: Counter, n: u64) {
        self.inner
            .counters
            .get(counter)
            .fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn set_gauges(&self, in_flight: usize, leases_held: usize, pending_writes: usize) {
        let inner = &self.inner;
        inner.in_flight.store(in_flight as u64, Ordering::Relaxed);
        inner
            .leases_held
            .store(leases_held as u64, Ordering::Relaxed);
        inner
            .pending_writes
            .store(pending_writes as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_counters_and_since_subtracts() {
        let stats = WorkerStats::default();
        let before = stats.counters();
        let other = stats.clone();
        other.add(Counter::claimed, 3);
        other.add(Counter::db_errors, 1);
        other.set_gauges(2, 3, 1);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.counters.claimed, 3);
        assert_eq!(
            (
                snapshot.in_flight,
                snapshot.leases_held,
                snapshot.pending_writes
            ),
            (2, 3, 1)
        );
        let delta = snapshot.counters.since(&before);
        assert_eq!(
            delta,
            Counters {
                claimed: 3,
                db_errors: 1,
                ..Counters::default()
            }
        );
    }
}
