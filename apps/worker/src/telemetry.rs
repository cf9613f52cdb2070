//! The worker's Prometheus metrics, recorded through the `metrics` facade (whatever recorder the
//! process installed; none: nothing is recorded). Names and labels come from
//! `faultline_ports::telemetry`; queue and kind label values pass through the worker's
//! [`LabelGuard`]. The [`crate::WorkerStats`] counters are kept beside these.

use std::time::Duration;

use faultline_domain::{Job, JobState};
use faultline_ports::LabelGuard;
use faultline_ports::telemetry::{labels, names, outcome};
use metrics::{counter, gauge, histogram};

use crate::stats::Counter;

/// The folded `queue` and `kind` label values of one job.
#[derive(Debug, Clone)]
pub(crate) struct JobLabels {
    pub(crate) queue: String,
    pub(crate) kind: String,
}

impl JobLabels {
    pub(crate) fn of(guard: &LabelGuard, job: &Job) -> Self {
        JobLabels {
            queue: guard.queue(&job.queue),
            kind: guard.kind(&job.kind),
        }
    }
}

/// A job was claimed: counts it and records how long it waited after it was due.
pub(crate) fn claimed(labels: &JobLabels, job: &Job) {
    counter!(names::JOBS_CLAIMED_TOTAL, labels::QUEUE => labels.queue.clone()).increment(1);
    if let Some(started_at) = job.started_at {
        let waited = (started_at - job.next_run_at)
            .to_std()
            .unwrap_or(Duration::ZERO);
        histogram!(names::JOB_WAIT_SECONDS, labels::QUEUE => labels.queue.clone()).record(waited);
    }
}

/// The store accepted a lease holder's write (`counter` says what it made of it); `run_time` is
/// how long the handler ran (none for a job that had no handler).
pub(crate) fn accepted(labels: &JobLabels, counter: Counter, run_time: Option<Duration>) {
    let outcome = match counter {
        Counter::completed => outcome::SUCCEEDED,
        Counter::failed => outcome::FAILED,
        Counter::cancelled => outcome::CANCELLED,
        Counter::retried => outcome::RETRIED,
        Counter::snoozed => outcome::SNOOZED,
        // A lease given back at shutdown: the handler was interrupted, nothing to report.
        _ => return,
    };
    match counter {
        Counter::completed | Counter::failed | Counter::cancelled => finished(labels, outcome),
        Counter::retried => counter!(
            names::JOB_RETRIES_TOTAL,
            labels::QUEUE => labels.queue.clone(),
            labels::KIND => labels.kind.clone(),
        )
        .increment(1),
        _ => {}
    }
    if let Some(run_time) = run_time {
        histogram!(
            names::JOB_DURATION_SECONDS,
            labels::QUEUE => labels.queue.clone(),
            labels::KIND => labels.kind.clone(),
            labels::OUTCOME => outcome,
        )
        .record(run_time);
    }
}

fn finished(labels: &JobLabels, outcome: &'static str) {
    counter!(
        names::JOBS_FINISHED_TOTAL,
        labels::QUEUE => labels.queue.clone(),
        labels::KIND => labels.kind.clone(),
        labels::OUTCOME => outcome,
    )
    .increment(1);
}

/// The store refused a lease holder's `operation` (`complete`, `fail`, `snooze`, `heartbeat`)
/// because the lease was no longer held.
pub(crate) fn stale(operation: &'static str) {
    counter!(names::STALE_WRITES_REJECTED_TOTAL, labels::OPERATION => operation).increment(1);
}

/// A rescuer ended an expired lease; `job` is in its new state.
pub(crate) fn rescued(guard: &LabelGuard, job: &Job) {
    let labels = JobLabels::of(guard, job);
    counter!(names::LEASE_EXPIRATIONS_TOTAL, labels::QUEUE => labels.queue.clone()).increment(1);
    match job.state {
        JobState::Queued => {
            counter!(names::JOBS_RECOVERED_TOTAL, labels::QUEUE => labels.queue.clone())
                .increment(1);
        }
        JobState::Failed => finished(&labels, outcome::FAILED),
        JobState::Cancelled => finished(&labels, outcome::CANCELLED),
        JobState::Running | JobState::Succeeded => {}
    }
}

/// A store call of `operation` ended: `reached` says whether the database answered (any answer,
/// business refusals included), `failed` whether it counts as a failed call.
pub(crate) fn store_call(operation: &str, reached: bool, failed: bool) {
    gauge!(names::DB_UP).set(if reached { 1.0 } else { 0.0 });
    if failed {
        counter!(names::DB_ERRORS_TOTAL, labels::OPERATION => operation.to_owned()).increment(1);
    }
}

/// Handlers started (positive) or ended (negative) in this process.
pub(crate) fn in_flight(delta: f64) {
    gauge!(names::WORKER_JOBS_IN_FLIGHT).increment(delta);
}

/// Slots of a worker built (positive) or dropped (negative) in this process.
pub(crate) fn concurrency(delta: f64) {
    gauge!(names::WORKER_CONCURRENCY).increment(delta);
}
