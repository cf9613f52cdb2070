//! Claiming and running: the claim calls (step and production), the local buffer of claimed
//! jobs waiting for a slot, one task per handler, and what a finished task hands back.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use faultline_domain::{FailureKind, Job};
use faultline_ports::{
    ClaimParams, Failure, JobStore, LeaseRef, MAX_CLAIM_LIMIT, StoreResult, WriteOutcome,
};
use tokio::sync::watch;
use tokio::task::{self, JoinError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::lost::new_claim_id;
use crate::stats::Counter;
use crate::telemetry::{self, JobLabels};
use crate::worker::{
    BUFFER_HORIZON, Completions, Finished, Held, Worker, Write, job_event, panic_message,
    permanent, retryable, store_ms, timed,
};
use crate::worker::{Exchanged, StepReport};
use crate::{JobContext, Outcome};

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
                self.start(job, deadline);
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
        let held = Held {
            kind: job.kind.clone(),
            attempt: job.attempts,
            labels: JobLabels::of(&self.labels, &job),
            started: tokio::time::Instant::now(),
            run_time: None,
            lease_expires_at: job.lease_expires_at.unwrap_or(job.next_run_at),
            deadline,
            cancel: CancellationToken::new(),
            running: false,
            lost: false,
            cancel_requested: false,
            write_failed: false,
        };
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
            let Some(held) = self.held.get(&lease) else {
                continue; // lost while buffered
            };
            if held.deadline <= now {
                self.lose(lease, "the lease ended while the job waited for a slot");
                continue;
            }
            let (cancel_requested, deadline) = (held.cancel_requested, held.deadline);
            job.lease_expires_at = Some(held.lease_expires_at);
            self.start(job, deadline);
            if cancel_requested && let Some(held) = self.held.get_mut(&lease) {
                held.cancel_requested = true;
                held.cancel.cancel();
            }
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
                self.others.push_back((
                    lease,
                    Write::Snooze {
                        delay_ms: 0,
                        release: true,
                    },
                ));
            }
        }
    }

    /// The production loop's store traffic: claims (up to the room for jobs) and writes of
    /// completion batches, on two tracks that run at once (each on its own pool connection), while
    /// jobs finishing meanwhile are collected and buffered jobs start in the freed slots. A track
    /// that finishes starts its next call at once when there is work for it: another claim when the
    /// last one came back full and half the room is free again, another batch when completions are
    /// pending. Returns when both tracks are idle (no new call starts after `until`), then writes
    /// the other pending outcomes (failures, snoozes). `claim`: start with a claim; `write`: write
    /// what is pending; `wake`: while the claim track is idle and a write is on its way, a wake-up
    /// from it starts a claim at once (when `may_claim`) instead of after the write.
    pub(crate) async fn exchange(
        &mut self,
        claim: bool,
        write: bool,
        until: tokio::time::Instant,
        mut wake: Option<&mut watch::Receiver<u64>>,
        may_claim: bool,
    ) -> Exchanged {
        /// A store call in flight.
        type Call<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;
        /// Waits for the call in `slot` (only polled when there is one).
        async fn finish<T>(slot: &mut Call<T>) -> T {
            match slot.as_mut() {
                Some(call) => call.as_mut().await,
                None => std::future::pending().await,
            }
        }
        if write {
            self.drop_expired_writes();
        }
        let (store, limit) = (self.store.clone(), self.config.store_timeout);
        let mut claiming: Call<StoreResult<Vec<Job>>> = None;
        let mut writing: Call<(Completions, StoreResult<Vec<WriteOutcome>>)> = None;
        let (mut claim_more, mut write_more) = (claim && !self.draining, write);
        let mut first_claim = true;
        let mut asked = 0;
        let mut claim_sent = tokio::time::Instant::now();
        let mut claim_id = None;
        let mut claimed: Option<StoreResult<(usize, bool)>> = None;
        let mut written = true;
        loop {
            let open = tokio::time::Instant::now() < until;
            if claiming.is_none() && claim_more && (open || first_claim) {
                let room = self.claim_room();
                if room > 0 && (first_claim || room >= self.claim_capacity().div_ceil(2)) {
                    let params = self.claim_params(room);
                    let store = store.clone();
                    asked = room;
                    claim_sent = tokio::time::Instant::now();
                    claim_id = params.claim_id;
                    claiming = Some(Box::pin(async move {
                        timed(limit, "claim", store.job_claim(&params)).await
                    }));
                } else if first_claim {
                    claim_more = false;
                }
                first_claim = false;
            }
            if writing.is_none() && write_more && !self.completions.is_empty() {
                let batch = self.take_completion_batch();
                let store = store.clone();
                writing = Some(Box::pin(async move {
                    let result = timed(limit, "complete", store.job_complete_many(&batch)).await;
                    (batch, result)
                }));
            }
            if claiming.is_none() && writing.is_none() {
                break;
            }
            tokio::select! {
                result = finish(&mut claiming), if claiming.is_some() => {
                    claiming = None;
                    self.note_failure("claim", &result);
                    match result {
                        Ok(jobs) => {
                            let full = jobs.len() >= asked;
                            let n = self.apply_claim(jobs, claim_sent);
                            let total = match &claimed {
                                Some(Ok((total, _))) => *total,
                                _ => 0,
                            };
                            claimed = Some(Ok((total + n, full)));
                            claim_more = full;
                        }
                        Err(err) => {
                            self.claim_lost(claim_id, claim_sent);
                            claimed = Some(Err(err));
                            claim_more = false;
                        }
                    }
                }
                result = finish(&mut writing), if writing.is_some() => {
                    writing = None;
                    let (batch, result) = result;
                    self.note_failure("complete", &result);
                    if !self.apply_completions(batch, result) {
                        written = false;
                        write_more = false;
                    }
                }
                _ = self.next_finished(), if self.has_tasks() => {
                    self.collect_finished();
                    self.start_buffered();
                }
                open = async {
                    match wake.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                }, if may_claim && !self.draining && claiming.is_none() && !claim_more => {
                    if open {
                        (claim_more, first_claim) = (true, true);
                    } else {
                        wake = None; // closed: the event loop notices and says so
                    }
                }
            }
        }
        if write && written {
            written = self.write_others().await;
        }
        self.sync_gauges();
        Exchanged { claimed, written }
    }

    /// Starts the handler of a freshly claimed job in its own task (or queues the permanent
    /// failure of a kind without handler); `deadline` is its lease's end by the monotonic clock.
    pub(crate) fn start(&mut self, job: Job, deadline: tokio::time::Instant) {
        let lease = LeaseRef::of(&job);
        let cancel = CancellationToken::new();
        let lease_expires_at = job.lease_expires_at.unwrap_or(job.next_run_at);
        let labels = JobLabels::of(&self.labels, &job);
        telemetry::claimed(&labels, &job);
        let held = Held {
            kind: job.kind.clone(),
            attempt: job.attempts,
            labels,
            started: tokio::time::Instant::now(),
            run_time: None,
            lease_expires_at,
            deadline,
            cancel: cancel.clone(),
            running: false,
            lost: false,
            cancel_requested: false,
            write_failed: false,
        };
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
            self.others
                .push_back((lease, permanent(error, FailureKind::Worker)));
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
        self.held.insert(
            lease,
            Held {
                running: true,
                ..held
            },
        );
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
        held.running = false;
        held.run_time = Some(held.started.elapsed());
        // A recorded outcome committed with the handler's own fenced write, even when a heartbeat
        // meanwhile found the lease "lost" (it waited on that transaction's row lock and then saw
        // the job finished): count it as what it is.
        if let Ok(Ok(Outcome::Recorded(job))) = &finished {
            let attempt = held.attempt;
            self.recorded(lease, attempt, job);
            return;
        }
        if held.lost {
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
            Err(_) => {
                // Aborted: only a shutdown aborts tasks, and it gives their leases back itself.
                Err(Write::Snooze {
                    delay_ms: 0,
                    release: true,
                })
            }
        };
        match write {
            Ok(result) => self.completions.push((lease, result)),
            Err(write) => self.others.push_back((lease, write)),
        }
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
