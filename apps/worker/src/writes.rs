//! Outcomes, the producer's side: handing each to the completer (see `completer.rs`), taking its
//! answers, and the bookkeeping of what the store did with them.

use faultline_domain::{FailureKind, Job, JobState};
use faultline_ports::{JobStore, LeaseRef};

use crate::completer::Answer;
use crate::stats::Counter;
use crate::telemetry;
use crate::worker::StepReport;
use crate::worker::{LeaseState, Worker, Write, job_event, retryable};

impl<S: JobStore> Worker<S> {
    /// Writes every pending outcome once (with the completer's batching: completions and
    /// failures in batches, snoozes one by one) and takes the answers. Stops at the first call
    /// that cannot reach the store, keeping its writes and the rest for the next flush. A write
    /// is always tried once (the store's fencing decides whether it still applies); a write that
    /// already failed is dropped instead of retried once its lease has ended by the worker's
    /// clock (the rescuer retries those jobs).
    pub async fn flush(&mut self) -> StepReport {
        let before = self.stats.counters();
        if !self.lost_claims.is_empty() {
            self.release_lost_claims().await;
        }
        self.write_pending().await;
        self.report(0, &before)
    }

    /// [`Worker::flush`] without the lost claims; `false` when a call could not reach the store
    /// (writes are pending).
    pub(crate) async fn write_pending(&mut self) -> bool {
        let ok = self.completer.write_round().await;
        self.take_answers();
        ok
    }

    /// Hands the write of `lease` to the completer.
    pub(crate) fn submit(&mut self, lease: LeaseRef, write: Write) {
        let Some(held) = self.held.get_mut(&lease) else {
            return;
        };
        held.state = LeaseState::Writing;
        let deadline = held.deadline;
        self.completer.submit(lease, write, deadline, &self.mailbox);
    }

    /// Records every answer the completer has posted so far.
    pub(crate) fn take_answers(&mut self) {
        for answer in self.mailbox.take() {
            match answer {
                Answer::Applied(lease, counter) => self.resolved(lease, counter),
                Answer::Stale(lease, operation) => self.stale(lease, operation),
                Answer::Refused(lease) => self.refused(lease),
                Answer::Dropped(lease) => self.dropped(
                    lease,
                    "lease ended before the outcome could be written: dropped (the rescuer retries the job)",
                ),
                Answer::Unreachable => self.count(Counter::db_errors, 1),
            }
        }
        self.sync_gauges();
    }

    /// The handler wrote its outcome itself (fenced, in its own committed transaction): only
    /// the bookkeeping is left. A job that does not match the lease is a handler bug: the
    /// attempt is failed (retryable) through the lease instead, so the job is never left running.
    pub(crate) fn recorded(&mut self, lease: LeaseRef, attempt: i32, job: &Job) {
        let counter = match job.state {
            _ if job.id != lease.job_id || job.fencing_token != lease.token => None,
            JobState::Succeeded => Some(Counter::completed),
            JobState::Failed => Some(Counter::failed),
            JobState::Cancelled => Some(Counter::cancelled),
            // A snooze gives the attempt back; a retryable failure keeps it.
            JobState::Queued if job.attempts < attempt => Some(Counter::snoozed),
            JobState::Queued => Some(Counter::retried),
            JobState::Running => None,
        };
        match counter {
            Some(counter) => self.resolved(lease, counter),
            None => {
                let error = format!(
                    "the handler reported an outcome recorded for job {} (token {}, {}), not for \
                     its own lease (job {}, token {})",
                    job.id, job.fencing_token, job.state, lease.job_id, lease.token
                );
                if let Some(held) = self.held.get(&lease) {
                    job_event!(error, lease, held, %error, "handler bug: outcome not recorded");
                }
                self.submit(lease, retryable(error, FailureKind::Worker));
            }
        }
    }

    pub(crate) fn resolved(&mut self, lease: LeaseRef, counter: Counter) {
        self.count(counter, 1);
        if let Some(held) = self.held.remove(&lease) {
            if let Some(run_time) = held.run_time {
                let t = run_time.as_secs_f64();
                self.run_time_avg = Some(self.run_time_avg.map_or(t, |avg| avg + 0.2 * (t - avg)));
            }
            telemetry::accepted(&held.labels, counter, held.run_time);
            job_event!(debug, lease, held, outcome = ?counter, "outcome written");
        }
    }

    /// The store refused the lease holder's `operation`: the lease was no longer held.
    pub(crate) fn stale(&mut self, lease: LeaseRef, operation: &'static str) {
        self.count(Counter::stale_writes_rejected, 1);
        telemetry::stale(operation);
        if let Some(held) = self.held.remove(&lease) {
            job_event!(
                warn,
                lease,
                held,
                "stale write rejected: the lease was no longer held"
            );
        }
    }

    pub(crate) fn refused(&mut self, lease: LeaseRef) {
        self.dropped(
            lease,
            "the store refused the outcome: dropped (the rescuer retries the job)",
        );
    }

    /// An outcome that will not be written (`why`).
    pub(crate) fn dropped(&mut self, lease: LeaseRef, why: &'static str) {
        self.count(Counter::writes_dropped, 1);
        if let Some(held) = self.held.remove(&lease) {
            job_event!(warn, lease, held, "{why}");
        }
    }
}
