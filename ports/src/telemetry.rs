//! The observability vocabulary every component shares: metric names, label keys and values, and
//! [`LabelGuard`], which keeps the number of distinct `queue` and `kind` label values bounded.
//!
//! Emitters (the worker runtime, the HTTP adapter) record through the `metrics` facade with these
//! names; the metrics adapter (`faultline-metrics`) describes them and exports them; the
//! dashboards and alert rules in `docs/` query them. Keeping the names here, in the one crate all
//! of them may depend on, makes a typo a compile error instead of a silently empty panel. This
//! module is plain data and `std` only: no `metrics` dependency.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

/// Metric names (Prometheus conventions: base units, `_total` counters, `_seconds` histograms).
pub mod names {
    /// Counter `{queue,kind}`: jobs created by an enqueue (idempotent replays not included).
    pub const JOBS_ENQUEUED_TOTAL: &str = "faultline_jobs_enqueued_total";
    /// Counter `{queue}`: enqueues whose idempotency key resolved to an existing job.
    pub const IDEMPOTENT_REPLAYS_TOTAL: &str = "faultline_idempotent_replays_total";
    /// Counter `{queue}`: jobs claimed (attempts started).
    pub const JOBS_CLAIMED_TOTAL: &str = "faultline_jobs_claimed_total";
    /// Counter `{queue,kind,outcome}`: jobs the store confirmed in a terminal state
    /// (`succeeded`, `failed`, `cancelled`).
    pub const JOBS_FINISHED_TOTAL: &str = "faultline_jobs_finished_total";
    /// Counter `{queue,kind}`: failed attempts queued again for a retry by their worker.
    pub const JOB_RETRIES_TOTAL: &str = "faultline_job_retries_total";
    /// Histogram `{queue,kind,outcome}`: handler run time of attempts whose outcome the store
    /// accepted.
    pub const JOB_DURATION_SECONDS: &str = "faultline_job_duration_seconds";
    /// Histogram `{queue}`: from the time a job was due to the start of its attempt.
    pub const JOB_WAIT_SECONDS: &str = "faultline_job_wait_seconds";
    /// Counter `{queue}`: expired leases ended by a rescuer.
    pub const LEASE_EXPIRATIONS_TOTAL: &str = "faultline_lease_expirations_total";
    /// Counter `{queue}`: jobs of expired leases put back in the queue for another attempt.
    pub const JOBS_RECOVERED_TOTAL: &str = "faultline_jobs_recovered_total";
    /// Counter `{operation}`: lease-holder writes refused because the lease was no longer held.
    pub const STALE_WRITES_REJECTED_TOTAL: &str = "faultline_stale_writes_rejected_total";
    /// Gauge `{queue,state}`: the backlog, jobs per queue in state `queued` or `running`, sampled
    /// from the store (`JobStore::queue_backlog`). Terminal states are history, not depth: no
    /// series.
    pub const QUEUE_DEPTH: &str = "faultline_queue_depth";
    /// Gauge `{queue}`: age of the oldest job that is due but not claimed (0 when none).
    pub const QUEUE_OLDEST_READY_AGE_SECONDS: &str = "faultline_queue_oldest_ready_age_seconds";
    /// Gauge: handlers running now in this process.
    pub const WORKER_JOBS_IN_FLIGHT: &str = "faultline_worker_jobs_in_flight";
    /// Gauge: handler slots of the workers of this process.
    pub const WORKER_CONCURRENCY: &str = "faultline_worker_concurrency";
    /// Counter `{operation}`: failed store calls (connection errors, timeouts, refusals).
    pub const DB_ERRORS_TOTAL: &str = "faultline_db_errors_total";
    /// Gauge: 1 when the latest store call reached the database, 0 when it did not.
    pub const DB_UP: &str = "faultline_db_up";
    /// Counter `{method,route,status}`: HTTP requests answered.
    pub const HTTP_REQUESTS_TOTAL: &str = "faultline_http_requests_total";
    /// Histogram `{method,route}`: time to answer an HTTP request.
    pub const HTTP_REQUEST_DURATION_SECONDS: &str = "faultline_http_request_duration_seconds";

    /// Gauge: 1 while this process is the elected maintenance leader, 0 otherwise.
    pub const LEADER: &str = "faultline_leader";
    /// Counter: times this process became the maintenance leader (a new term).
    pub const LEADER_ELECTIONS_TOTAL: &str = "faultline_leader_elections_total";
    /// Counter `{service,outcome}`: maintenance runs (`rescuer`, `pruner`, `reaper`), `ok` or
    /// `error`.
    pub const MAINTENANCE_RUNS_TOTAL: &str = "faultline_maintenance_runs_total";
    /// Histogram `{service}`: how long one maintenance run took.
    pub const MAINTENANCE_DURATION_SECONDS: &str = "faultline_maintenance_duration_seconds";

    /// Every name above.
    pub const ALL: &[&str] = &[
        JOBS_ENQUEUED_TOTAL,
        IDEMPOTENT_REPLAYS_TOTAL,
        JOBS_CLAIMED_TOTAL,
        JOBS_FINISHED_TOTAL,
        JOB_RETRIES_TOTAL,
        JOB_DURATION_SECONDS,
        JOB_WAIT_SECONDS,
        LEASE_EXPIRATIONS_TOTAL,
        JOBS_RECOVERED_TOTAL,
        STALE_WRITES_REJECTED_TOTAL,
        QUEUE_DEPTH,
        QUEUE_OLDEST_READY_AGE_SECONDS,
        WORKER_JOBS_IN_FLIGHT,
        WORKER_CONCURRENCY,
        DB_ERRORS_TOTAL,
        DB_UP,
        HTTP_REQUESTS_TOTAL,
        HTTP_REQUEST_DURATION_SECONDS,
        LEADER,
        LEADER_ELECTIONS_TOTAL,
        MAINTENANCE_RUNS_TOTAL,
        MAINTENANCE_DURATION_SECONDS,
    ];
}

/// Label keys.
pub mod labels {
    /// The job's queue (bounded by [`super::LabelGuard`]).
    pub const QUEUE: &str = "queue";
    /// The job's kind (bounded by [`super::LabelGuard`]).
    pub const KIND: &str = "kind";
    /// How an attempt or a job ended (see [`super::outcome`]).
    pub const OUTCOME: &str = "outcome";
    /// The job state of a depth gauge.
    pub const STATE: &str = "state";
    /// The store operation (`claim`, `complete`, `queue_stats`, ...).
    pub const OPERATION: &str = "operation";
    /// The HTTP method.
    pub const METHOD: &str = "method";
    /// The HTTP route template (`/v1/jobs/{id}`), never a raw path.
    pub const ROUTE: &str = "route";
    /// The HTTP status code.
    pub const STATUS: &str = "status";
    /// The maintenance service (`rescuer`, `pruner`, `reaper`).
    pub const SERVICE: &str = "service";
}

/// Values of the `outcome` label.
pub mod outcome {
    /// The job succeeded.
    pub const SUCCEEDED: &str = "succeeded";
    /// The job failed for good.
    pub const FAILED: &str = "failed";
    /// The job was cancelled.
    pub const CANCELLED: &str = "cancelled";
    /// The attempt failed and the job was queued again (durations only).
    pub const RETRIED: &str = "retried";
    /// The job was snoozed (durations only).
    pub const SNOOZED: &str = "snoozed";
}

/// Keeps the number of distinct `queue` and `kind` label values bounded: the first `cap`
/// distinct values of each are kept as they are, any further value becomes [`LabelGuard::OTHER`].
/// Queue and kind names come from clients, so without a bound a careless producer could create
/// unbounded time series.
///
/// Cheap to clone (clones share the admitted values) and thread-safe. Give one guard to every
/// component of a process so that the bound holds per process.
#[derive(Clone)]
pub struct LabelGuard {
    inner: Arc<GuardInner>,
}

struct GuardInner {
    cap: usize,
    queues: RwLock<HashSet<String>>,
    kinds: RwLock<HashSet<String>>,
}

impl LabelGuard {
    /// The label value that stands for every value beyond the cap.
    pub const OTHER: &'static str = "other";
    /// The default cap of distinct values per label.
    pub const DEFAULT_CAP: usize = 100;

    /// A guard that admits `cap` distinct queues and `cap` distinct kinds.
    pub fn new(cap: usize) -> Self {
        LabelGuard {
            inner: Arc::new(GuardInner {
                cap,
                queues: RwLock::default(),
                kinds: RwLock::default(),
            }),
        }
    }

    /// The cap of distinct values per label.
    pub fn cap(&self) -> usize {
        self.inner.cap
    }

    /// The `queue` label value for `queue`.
    pub fn queue(&self, queue: &str) -> String {
        fold(&self.inner.queues, self.inner.cap, queue)
    }

    /// The `kind` label value for `kind`.
    pub fn kind(&self, kind: &str) -> String {
        fold(&self.inner.kinds, self.inner.cap, kind)
    }
}

fn fold(admitted: &RwLock<HashSet<String>>, cap: usize, value: &str) -> String {
    if admitted
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(value)
    {
        return value.to_owned();
    }
    let mut admitted = admitted.write().unwrap_or_else(PoisonError::into_inner);
    if admitted.contains(value) {
        return value.to_owned();
    }
    if admitted.len() < cap {
        admitted.insert(value.to_owned());
        return value.to_owned();
    }
    LabelGuard::OTHER.to_owned()
}

impl Default for LabelGuard {
    /// A guard with [`LabelGuard::DEFAULT_CAP`].
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAP)
    }
}

impl fmt::Debug for LabelGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = |set: &RwLock<HashSet<String>>| {
            set.read().unwrap_or_else(PoisonError::into_inner).len()
        };
        f.debug_struct("LabelGuard")
            .field("cap", &self.inner.cap)
            .field("queues", &len(&self.inner.queues))
            .field("kinds", &len(&self.inner.kinds))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_beyond_the_cap_fold_into_other_per_label() {
        let guard = LabelGuard::new(2);
        assert_eq!(guard.queue("a"), "a");
        assert_eq!(guard.queue("b"), "b");
        assert_eq!(guard.queue("c"), LabelGuard::OTHER);
        // Admitted values stay admitted; kinds have their own budget.
        assert_eq!(guard.queue("a"), "a");
        assert_eq!(guard.kind("c"), "c");
        assert_eq!(guard.kind("d"), "d");
        assert_eq!(guard.kind("e"), LabelGuard::OTHER);
        // Clones share what was admitted.
        let clone = guard.clone();
        assert_eq!(clone.queue("b"), "b");
        assert_eq!(clone.queue("z"), LabelGuard::OTHER);
        assert_eq!(
            format!("{guard:?}"),
            "LabelGuard { cap: 2, queues: 2, kinds: 2 }"
        );
    }

    #[test]
    fn a_zero_cap_folds_everything() {
        let guard = LabelGuard::new(0);
        assert_eq!(guard.queue("default"), LabelGuard::OTHER);
        assert_eq!(guard.kind("email"), LabelGuard::OTHER);
    }

    #[test]
    fn concurrent_callers_never_admit_more_than_the_cap() {
        let guard = LabelGuard::new(10);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let guard = guard.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|i| guard.queue(&format!("q{}", (t * 50 + i) % 40)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for thread in threads {
            seen.extend(thread.join().unwrap());
        }
        seen.remove(LabelGuard::OTHER);
        assert_eq!(seen.len(), 10, "{seen:?}");
    }

    #[test]
    fn every_name_is_unique_and_prefixed() {
        let unique: HashSet<&str> = names::ALL.iter().copied().collect();
        assert_eq!(unique.len(), names::ALL.len());
        for name in names::ALL {
            assert!(name.starts_with("faultline_"), "{name}");
        }
    }
}
