//! Claiming and running: the claim calls (step and production), the local buffer of claimed
//! jobs waiting for a slot, one task per handler, and what a finished task hands back.

use std::time::Duration;

use faultline_domain::{FailureKind, Job};
use faultline_ports::{ClaimParams, Failure, JobStore, LeaseRef, MAX_CLAIM_LIMIT, StoreResult};
use tokio::task::{self, JoinError};
use tracing::Instrument;

use crate::lost::new_claim_id;
use crate::stats::Counter;
use crate::telemetry::{self, JobLabels};
use crate::worker::{
    BUFFER_HORIZON, Finished, Held, LeaseState, Worker, Write, job_event, panic_message, permanent,
    retryable, store_ms, timed,
};
use crate::worker::{Claimed, StepReport};
use crate::{JobContext, Outcome};

/// Gives a lease back: queued, due now, attempt returned (shutdown).
pub(crate) const GIVE_BACK: Write = Write::Snooze {
    delay_ms: 0,
    release: true,
};

impl<S: JobStore> Worker<S> {
    /// Claims up to the free slots (nothing, without a store call, when every slot is busy or the
    /// worker is shutting down) and starts a task per job. Returns how many jobs were claimed.
    pub async fn claim_once(&mut self) -> StoreResult<usize> {
        let free = self.free_slots();
        if self.draining || free == 0 {
            return Ok(0);
        }
        let params = self.claim_params(free);
        let sent = tokio::time::Instant::now();
        let jobs = self
            .call("claim", self.store.job_claim(&params))
            .await
            .inspect_err(|_| self.claim_lost(params.claim_id, sent))?;
        Ok(self.apply_claim(jobs, sent))
    }

    pub(crate) fn claim_params(&self, limit: usize) -> ClaimParams {
        ClaimParams {
            queues: self.config.queues.clone(),
            kinds: Vec::new(),
            limit: u32::try_from(limit.min(MAX_CLAIM_LIMIT as usize)).unwrap_or(MAX_CLAIM_LIMIT),
            lease_ms: self.config.lease_ms(),
            worker_id: self.config.worker_id.clone(),
            claim_id: Some(new_claim_id()),
        }
    }

    /// Takes freshly claimed jobs (the claim was sent at `sent`): starts them in the free slots
    /// (after the jobs already waiting), buffers the rest. Returns how many there were.
    pub(crate) fn apply_claim(&mut self, jobs: Vec<Job>, sent: tokio::time::Instant) -> usize {
        let claimed = jobs.len();
        self.count(Counter::claimed, claimed);
        self.start_buffered();
        let deadline = sent + self.config.lease;
        for job in jobs {
            if self.free_slots() > 0 {
                let held = Held::claimed(&job, JobLabels::of(&self.labels, &job), deadline);
                self.start(job, held);
            } else {
                self.buffer(job, deadline);
            }
        }
        self.sync_gauges();
        claimed
    }

    /// How many jobs the production loop claims now: the free slots, plus room in the buffer.
    /// The buffer holds about what the slots finish within [`BUFFER_HORIZON`] at the handlers'
    /// average run time (nothing for jobs that run longer than the horizon, so slow jobs are not
    /// hoarded away from other workers), and at most one completion batch.
    pub(crate) fn claim_room(&self) -> usize {
        (self.claim_capacity() - self.tasks.len().min(self.config.concurrency))
            .saturating_sub(self.buffered.len())
            .min(MAX_CLAIM_LIMIT as usize)
    }

    /// Slots plus the buffer's current size (see [`Worker::claim_room`]).
    pub(crate) fn claim_capacity(&self) -> usize {
        let buffer = self.run_time_avg.map_or(0, |avg| {
            let ahead =
                self.config.concurrency as f64 * BUFFER_HORIZON.as_secs_f64() / avg.max(1e-6);
            (ahead as usize).min(self.config.completion_batch_size)
        });
        self.config.concurrency + buffer
    }

    /// Holds a claimed job until a slot frees (its lease is heartbeated meanwhile).
    pub(crate) fn buffer(&mut self, job: Job, deadline: tokio::time::Instant) {
        let lease = LeaseRef::of(&job);
        let held = Held::claimed(&job, JobLabels::of(&self.labels, &job), deadline);
        self.held.insert(lease, held);
        self.buffered.push_back(job);
    }

    /// Starts buffered jobs in the free slots, oldest first. A job whose lease was found lost
    /// meanwhile is skipped; one whose lease ended (by the worker's monotonic reckoning) is
    /// dropped as lost.
    pub(crate) fn start_buffered(&mut self) {
        let now = tokio::time::Instant::now();
        while self.free_slots() > 0
            && let Some(mut job) = self.buffered.pop_front()
        {
            let lease = LeaseRef::of(&job);
            let Some(held) = self.held.remove(&lease) else {
                continue; // lost while buffered
            };
            if held.deadline <= now {
                self.held.insert(lease, held);
                self.lose(lease, "the lease ended while the job waited for a slot");
                continue;
            }
            job.lease_expires_at = Some(held.lease_expires_at);
            self.start(job, held);
        }
    }

    /// Jobs claimed and waiting for a slot.
    pub fn buffered(&self) -> usize {
        self.buffered.len()
    }

    /// At shutdown: gives back the leases of buffered jobs (they never started).
    pub(crate) fn release_buffered(&mut self) {
        for job in std::mem::take(&mut self.buffered) {
            let lease = LeaseRef::of(&job);
            if let Some(held) = self.held.get(&lease) {
                job_event!(
                    debug,
                    lease,
                    held,
                    "shutting down: giving back a job that never started"
                );
                self.submit(lease, GIVE_BACK);
            }
        }
    }

    /// The production loop's claims: claims up to the room for jobs, and claims again at once
    /// while the last claim came back full and half the room is free again (no new claim starts
    /// after `until`); jobs finishing meanwhile are collected, and buffered jobs start in the
    /// freed slots. The completer writes outcomes meanwhile, on its own.
    pub(crate) async fn claim_while_full(&mut self, until: tokio::time::Instant) -> Claimed {
        let mut claimed: Claimed = None;
        let mut total = 0;
        loop {
            let room = self.claim_room();
            let first = claimed.is_none();
            let worth = room > 0 && (first || room >= self.claim_capacity().div_ceil(2));
            if self.draining || !worth || (!first && tokio::time::Instant::now() >= until) {
                return claimed;
            }
            match self.claim_collecting(room).await {
                Ok((n, full)) => {
                    total += n;
                    claimed = Some(Ok((total, full)));
                    if !full {
                        return claimed;
                    }
                }
                Err(err) => return Some(Err(err)),
            }
        }
    }

    /// One claim of up to `room` jobs, collecting finished jobs (and the completer's answers)
    /// while it is on its way. Returns how many came and whether the claim came back full.
    async fn claim_collecting(&mut self, room: usize) -> StoreResult<(usize, bool)> {
        let params = self.claim_params(room);
        let (store, limit) = (self.store.clone(), self.config.store_timeout);
        let mailbox = self.mailbox.clone();
        let sent = tokio::time::Instant::now();
        let call = timed(limit, "claim", store.job_claim(&params));
        tokio::pin!(call);
        let result = loop {
            tokio::select! {
                result = &mut call => break result,
                _ = self.next_finished(), if self.has_tasks() => self.start_buffered(),
                () = mailbox.posted() => self.take_answers(),
            }
        };
        self.note_failure("claim", &result);
        match result {
            Ok(jobs) => {
                let full = jobs.len() >= room;
                Ok((self.apply_claim(jobs, sent), full))
            }
            Err(err) => {
                self.claim_lost(params.claim_id, sent);
                Err(err)
            }
        }
    }

    /// Starts the handler of a freshly claimed job in its own task (or queues the permanent
    /// failure of a kind without handler); `held` is its lease, as claimed or buffered.
    pub(crate) fn start(&mut self, job: Job, mut held: Held) {
        let lease = LeaseRef::of(&job);
        let lease_expires_at = held.lease_expires_at;
        telemetry::claimed(&held.labels, &job);
        held.started = tokio::time::Instant::now();
        let cancel = held.cancel.clone();
        if held.cancel_requested {
            cancel.cancel();
        }
        let Some(handler) = self.registry.get(&job.kind) else {
            job_event!(
                warn,
                lease,
                held,
                "no handler registered for this kind: failing the job permanently"
            );
            self.count(Counter::unknown_kind, 1);
            let error = format!("no handler registered for kind {:?}", job.kind);
            self.held.insert(lease, held);
            self.submit(lease, permanent(error, FailureKind::Worker));
            return;
        };
        let timeout = job
            .timeout_ms
            .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
            .or_else(|| handler.timeout());
        let span = tracing::info_span!(
            "job",
            job_id = job.id,
            kind = %job.kind,
            attempt = job.attempts,
            fencing_token = job.fencing_token,
        );
        let ctx = JobContext {
            id: job.id,
            queue: job.queue,
            kind: job.kind,
            payload: job.payload,
            attempt: job.attempts,
            max_attempts: job.max_attempts,
            fencing_token: job.fencing_token,
            lease_expires_at,
            cancel: cancel.clone(),
        };
        let task = async move {
            match timeout {
                None => Ok(handler.run(ctx).await),
                Some(limit) => match tokio::time::timeout(limit, handler.run(ctx)).await {
                    Ok(outcome) => Ok(outcome),
                    Err(_) => {
                        cancel.cancel();
                        Err(limit)
                    }
                },
            }
        };
        let abort = self.tasks.spawn(task.instrument(span));
        self.task_leases.insert(abort.id(), lease);
        job_event!(debug, lease, held, "job started");
        held.state = LeaseState::Running;
        self.held.insert(lease, held);
    }

    /// Records the end of a job task: its outcome becomes a pending write (unless the lease was
    /// lost, in which case the outcome is discarded).
    pub(crate) fn on_task_done(&mut self, joined: Result<(task::Id, Finished), JoinError>) {
        let (id, finished) = match joined {
            Ok((id, finished)) => (id, Ok(finished)),
            Err(err) => (err.id(), Err(err)),
        };
        let Some(lease) = self.task_leases.remove(&id) else {
            return;
        };
        let Some(held) = self.held.get_mut(&lease) else {
            return;
        };
        let lost = held.state == LeaseState::Lost;
        held.run_time = Some(held.started.elapsed());
        // A recorded outcome committed with the handler's own fenced write, even when a heartbeat
        // meanwhile found the lease "lost" (it waited on that transaction's row lock and then saw
        // the job finished): count it as what it is.
        if let Ok(Ok(Outcome::Recorded(job))) = &finished {
            let attempt = held.attempt;
            self.recorded(lease, attempt, job);
            return;
        }
        if lost {
            job_event!(
                info,
                lease,
                held,
                "handler returned after its lease was lost: outcome discarded"
            );
            self.held.remove(&lease);
            return;
        }
        let write = match finished {
            Ok(Ok(Outcome::Recorded(_))) => return, // handled above
            Ok(Ok(Outcome::LeaseLost)) => {
                self.stale(lease, "transaction");
                return;
            }
            Ok(Ok(Outcome::Complete(result))) => {
                match faultline_ports::validate_result(result.as_ref()) {
                    Ok(()) => Ok(result),
                    Err(err) => Err(permanent(
                        format!("the handler's result cannot be stored: {err}"),
                        FailureKind::Worker,
                    )),
                }
            }
            Ok(Ok(Outcome::Retry { error, delay })) => Err(Write::Fail(Failure {
                error,
                kind: FailureKind::Error,
                retryable: true,
                retry_delay_ms: delay.map(store_ms),
            })),
            Ok(Ok(Outcome::Fail { error })) => Err(permanent(error, FailureKind::Error)),
            Ok(Ok(Outcome::Snooze { delay })) => Err(Write::Snooze {
                delay_ms: store_ms(delay),
                release: false,
            }),
            Ok(Err(limit)) => {
                job_event!(warn, lease, held, timeout = ?limit, "handler timed out");
                self.stats.add(Counter::timed_out, 1);
                Err(retryable(
                    format!("timed out after {limit:?}"),
                    FailureKind::Timeout,
                ))
            }
            Err(err) if err.is_panic() => {
                let message = panic_message(err.into_panic());
                job_event!(error, lease, held, panic = %message, "handler panicked");
                self.stats.add(Counter::panicked, 1);
                Err(retryable(
                    format!("handler panicked: {message}"),
                    FailureKind::Panic,
                ))
            }
            // Aborted: only a shutdown aborts tasks, and it gives their leases back itself.
            Err(_) => Err(GIVE_BACK),
        };
        self.submit(lease, write.map_or_else(|write| write, Write::Complete));
    }

    /// Collects every job task that has already finished, without waiting.
    pub(crate) fn collect_finished(&mut self) {
        while let Some(joined) = self.tasks.try_join_next_with_id() {
            self.on_task_done(joined);
        }
    }

    /// Waits for the next job task to finish and records it (`false`: none is running).
    pub(crate) async fn next_finished(&mut self) -> bool {
        match self.tasks.join_next_with_id().await {
            Some(joined) => {
                self.on_task_done(joined);
                true
            }
            None => false,
        }
    }

    /// Waits until every running handler has returned (or timed out), then writes the outcomes
    /// once (see [`Worker::flush`]). A handler that never returns (no timeout, token ignored)
    /// keeps this waiting.
    pub async fn settle(&mut self) -> StepReport {
        let before = self.stats.counters();
        while self.next_finished().await {}
        self.write_pending().await;
        self.report(0, &before)
    }

    /// One full step: claims up to the free slots, waits for every running handler (as
    /// [`Worker::settle`]), writes the outcomes. Fails only when the claim fails (nothing else
    /// happened then).
    pub async fn run_once(&mut self) -> StoreResult<StepReport> {
        let before = self.stats.counters();
        let claimed = self.claim_once().await?;
        while self.next_finished().await {}
        self.write_pending().await;
        Ok(self.report(claimed, &before))
    }
}
