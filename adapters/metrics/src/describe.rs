//! Help texts and units of every Faultline metric, registered with the current recorder.

use faultline_ports::telemetry::names;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Type {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric: name, type, unit, help text.
pub(crate) const METRICS: &[(&str, Type, Unit, &str)] = &[
    (
        names::JOBS_ENQUEUED_TOTAL,
        Type::Counter,
        Unit::Count,
        "Jobs created by an enqueue (idempotent replays not included).",
    ),
    (
        names::IDEMPOTENT_REPLAYS_TOTAL,
        Type::Counter,
        Unit::Count,
        "Enqueues whose idempotency key resolved to an existing job with the same request.",
    ),
    (
        names::JOBS_CLAIMED_TOTAL,
        Type::Counter,
        Unit::Count,
        "Jobs claimed by a worker (attempts started).",
    ),
    (
        names::JOBS_FINISHED_TOTAL,
        Type::Counter,
        Unit::Count,
        "Jobs the store confirmed in a terminal state, by outcome (succeeded, failed, cancelled).",
    ),
    (
        names::JOB_RETRIES_TOTAL,
        Type::Counter,
        Unit::Count,
        "Failed attempts queued again for a retry by their worker.",
    ),
    (
        names::JOB_DURATION_SECONDS,
        Type::Histogram,
        Unit::Seconds,
        "Handler run time of attempts whose outcome the store accepted, by outcome.",
    ),
    (
        names::JOB_WAIT_SECONDS,
        Type::Histogram,
        Unit::Seconds,
        "Time from a job being due to the start of its attempt.",
    ),
    (
        names::LEASE_EXPIRATIONS_TOTAL,
        Type::Counter,
        Unit::Count,
        "Expired leases ended by a rescuer (the attempt counts as failed).",
    ),
    (
        names::JOBS_RECOVERED_TOTAL,
        Type::Counter,
        Unit::Count,
        "Jobs of expired leases queued again for another attempt.",
    ),
    (
        names::STALE_WRITES_REJECTED_TOTAL,
        Type::Counter,
        Unit::Count,
        "Lease-holder writes refused because the lease was no longer held (fencing).",
    ),
    (
        names::QUEUE_DEPTH,
        Type::Gauge,
        Unit::Count,
        "Unfinished jobs per queue and state (queued, running), sampled from the database.",
    ),
    (
        names::QUEUE_OLDEST_READY_AGE_SECONDS,
        Type::Gauge,
        Unit::Seconds,
        "Age of the oldest job that is due but not claimed (0 when none), sampled from the database.",
    ),
    (
        names::WORKER_JOBS_IN_FLIGHT,
        Type::Gauge,
        Unit::Count,
        "Handlers running now in this process.",
    ),
    (
        names::WORKER_CONCURRENCY,
        Type::Gauge,
        Unit::Count,
        "Handler slots of the workers of this process.",
    ),
    (
        names::DB_ERRORS_TOTAL,
        Type::Counter,
        Unit::Count,
        "Failed store calls (connection errors, timeouts, refusals), by operation.",
    ),
    (
        names::DB_UP,
        Type::Gauge,
        Unit::Count,
        "1 when the latest store call of this process reached the database, else 0.",
    ),
    (
        names::HTTP_REQUESTS_TOTAL,
        Type::Counter,
        Unit::Count,
        "HTTP requests answered, by method, route template and status.",
    ),
    (
        names::HTTP_REQUEST_DURATION_SECONDS,
        Type::Histogram,
        Unit::Seconds,
        "Time to answer an HTTP request, by method and route template.",
    ),
    (
        names::LEADER,
        Type::Gauge,
        Unit::Count,
        "1 while this process is the elected maintenance leader (it runs the rescuer, the pruner \
         and the process reaper), else 0.",
    ),
    (
        names::LEADER_ELECTIONS_TOTAL,
        Type::Counter,
        Unit::Count,
        "Times this process became the maintenance leader.",
    ),
    (
        names::MAINTENANCE_RUNS_TOTAL,
        Type::Counter,
        Unit::Count,
        "Maintenance runs by the leader, by service and outcome (ok, error).",
    ),
    (
        names::MAINTENANCE_DURATION_SECONDS,
        Type::Histogram,
        Unit::Seconds,
        "Time one maintenance run took, by service.",
    ),
];

/// Describes every Faultline metric (help text and unit) to the current recorder: the global one,
/// or the thread's local one in tests. [`crate::install`] calls it.
pub fn describe() {
    for &(name, kind, unit, help) in METRICS {
        match kind {
            Type::Counter => describe_counter!(name, unit, help),
            Type::Gauge => describe_gauge!(name, unit, help),
            Type::Histogram => describe_histogram!(name, unit, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_described_once_with_a_fitting_suffix() {
        assert_eq!(METRICS.len(), names::ALL.len());
        for name in names::ALL {
            let (_, kind, unit, _) = METRICS
                .iter()
                .find(|(n, ..)| n == name)
                .unwrap_or_else(|| panic!("{name} is not described"));
            match kind {
                Type::Counter => assert!(name.ends_with("_total"), "{name}"),
                Type::Histogram => assert!(name.ends_with("_seconds"), "{name}"),
                Type::Gauge => assert!(!name.ends_with("_total"), "{name}"),
            }
            if *unit == Unit::Seconds {
                assert!(name.ends_with("_seconds"), "{name}");
            }
        }
    }
}
