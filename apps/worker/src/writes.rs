//! Writing outcomes: completions in batches, failures in batches (`job_fail_many`), snoozes
//! one by one; what the store answered, and which writes are dropped once their lease ended.

use faultline_domain::{FailureKind, Job, JobState};
use faultline_ports::{
    FailOutcome, Failure, JobStore, LeaseRef, StoreError, StoreResult, WriteOutcome,
};

use crate::stats::Counter;
use crate::telemetry;
use crate::worker::StepReport;
use crate::worker::{Completions, Held, Worker, Write, job_event, retryable};

impl<S: JobStore> Worker<S> {
    /// Tries every pending write once: completions in batches, failures and snoozes one by one.
    /// Stops at the first backend error, keeping that write and the rest for the next flush.
    /// A write is always tried once (the store's fencing decides whether it still applies); a
    /// write that already failed is dropped instead of retried once its lease has ended by the
    /// worker's clock (the rescuer retries those jobs).
    pub async fn flush(&mut self) -> StepReport {
        let before = self.stats.counters();
        if !self.lost_claims.is_empty() {
            self.release_lost_claims().await;
        }
        self.write_pending().await;
        self.report(0, &before)
    }

    /// [`Worker::flush`]; returns `false` when a backend error left writes pending.
    pub(crate) async fn write_pending(&mut self) -> bool {
        self.drop_expired_writes();
        let ok = self.write_completions().await && self.write_others().await;
        self.sync_gauges();
        ok
    }

    pub(crate) fn drop_expired_writes(&mut self) {
        let now = tokio::time::Instant::now();
        let expired =
            |held: Option<&Held>| held.is_none_or(|held| held.write_failed && held.deadline <= now);
        let mut dropped = Vec::new();
        self.completions.retain(|(lease, _)| {
            let keep = !expired(self.held.get(lease));
            if !keep {
                dropped.push(*lease);
            }
            keep
        });
        self.others.retain(|(lease, _)| {
            let keep = !expired(self.held.get(lease));
            if !keep {
                dropped.push(*lease);
            }
            keep
        });
        for lease in dropped {
            self.count(Counter::writes_dropped, 1);
            if let Some(held) = self.held.remove(&lease) {
                job_event!(
                    warn,
                    lease,
                    held,
                    "lease ended before the outcome could be written: dropped (the rescuer retries the job)"
                );
            }
        }
    }

    pub(crate) async fn write_completions(&mut self) -> bool {
        while !self.completions.is_empty() {
            let batch = self.take_completion_batch();
            let result = self
                .call("complete", self.store.job_complete_many(&batch))
                .await;
            if !self.apply_completions(batch, result) {
                return false;
            }
        }
        true
    }

    /// The next completions to write in one statement.
    pub(crate) fn take_completion_batch(&mut self) -> Completions {
        let n = self
            .completions
            .len()
            .min(self.config.completion_batch_size);
        self.completions.drain(..n).collect()
    }

    /// Records what the store answered to a batch of completions; `false` when it could not be
    /// reached (the batch is pending again, first in line).
    pub(crate) fn apply_completions(
        &mut self,
        batch: Completions,
        result: StoreResult<Vec<WriteOutcome>>,
    ) -> bool {
        let result = result.and_then(|outcomes| {
            if outcomes.len() == batch.len() {
                Ok(outcomes)
            } else {
                Err(StoreError::Backend(
                    format!(
                        "{} outcomes for {} completions",
                        outcomes.len(),
                        batch.len()
                    )
                    .into(),
                ))
            }
        });
        match result {
            Ok(outcomes) => {
                for ((lease, _), outcome) in batch.iter().zip(outcomes) {
                    match outcome {
                        WriteOutcome::Accepted => self.resolved(*lease, Counter::completed),
                        WriteOutcome::Stale => self.stale(*lease, "complete"),
                    }
                }
            }
            Err(StoreError::Backend(_)) => {
                for (lease, _) in &batch {
                    self.write_failed(*lease);
                }
                let rest = std::mem::replace(&mut self.completions, batch);
                self.completions.extend(rest);
                return false;
            }
            Err(_) => {
                for (lease, _) in batch {
                    self.refused(lease);
                }
            }
        }
        true
    }

    /// Writes failures and snoozes in queue order: consecutive failures in one statement
    /// (`job_fail_many`, up to `completion_batch_size`), snoozes one call each.
    pub(crate) async fn write_others(&mut self) -> bool {
        while let Some((lease, write)) = self.others.pop_front() {
            let (delay_ms, release) = match write {
                Write::Fail(failure) => {
                    if !self.write_failures(lease, failure).await {
                        return false;
                    }
                    continue;
                }
                Write::Snooze { delay_ms, release } => (delay_ms, release),
            };
            let result = self
                .call("snooze", self.store.job_snooze(lease, delay_ms))
                .await;
            match result {
                Ok(job) => {
                    let counter = match job.state {
                        JobState::Cancelled => Counter::cancelled,
                        _ if release => Counter::released,
                        _ => Counter::snoozed,
                    };
                    self.resolved(lease, counter);
                }
                Err(StoreError::StaleLease { .. }) => self.stale(lease, "snooze"),
                Err(StoreError::Backend(_)) => {
                    self.write_failed(lease);
                    self.others
                        .push_front((lease, Write::Snooze { delay_ms, release }));
                    return false;
                }
                Err(_) => self.refused(lease),
            }
        }
        true
    }

    /// Writes `first` and the failures that follow it in the queue, up to a batch, in one
    /// statement; `false` when the store could not be reached (they are pending again, first in
    /// line).
    pub(crate) async fn write_failures(&mut self, lease: LeaseRef, first: Failure) -> bool {
        let mut batch: Vec<(LeaseRef, Failure)> = vec![(lease, first)];
        while batch.len() < self.config.completion_batch_size
            && matches!(self.others.front(), Some((_, Write::Fail(_))))
        {
            if let Some((lease, Write::Fail(failure))) = self.others.pop_front() {
                batch.push((lease, failure));
            }
        }
        let result = self
            .call("fail", self.store.job_fail_many(&batch))
            .await
            .and_then(|outcomes| {
                if outcomes.len() == batch.len() {
                    Ok(outcomes)
                } else {
                    Err(StoreError::Backend(
                        format!("{} outcomes for {} failures", outcomes.len(), batch.len()).into(),
                    ))
                }
            });
        match result {
            Ok(outcomes) => {
                for ((lease, _), outcome) in batch.iter().zip(outcomes) {
                    match outcome {
                        FailOutcome::Applied { state } => {
                            let counter = match state {
                                JobState::Cancelled => Counter::cancelled,
                                JobState::Failed => Counter::failed,
                                _ => Counter::retried,
                            };
                            self.resolved(*lease, counter);
                        }
                        FailOutcome::Stale => self.stale(*lease, "fail"),
                    }
                }
            }
            Err(StoreError::Backend(_)) => {
                for (lease, failure) in batch.into_iter().rev() {
                    self.write_failed(lease);
                    self.others.push_front((lease, Write::Fail(failure)));
                }
                return false;
            }
            Err(_) => {
                for (lease, _) in batch {
                    self.refused(lease);
                }
            }
        }
        true
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
                self.others
                    .push_back((lease, retryable(error, FailureKind::Worker)));
            }
        }
    }

    pub(crate) fn write_failed(&mut self, lease: LeaseRef) {
        if let Some(held) = self.held.get_mut(&lease) {
            held.write_failed = true;
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
        self.count(Counter::writes_dropped, 1);
        if let Some(held) = self.held.remove(&lease) {
            job_event!(
                error,
                lease,
                held,
                "the store refused the outcome: dropped (the rescuer retries the job)"
            );
        }
    }
}
