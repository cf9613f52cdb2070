//! [`Worker`]: claims jobs, runs each in its own task, keeps the leases alive and writes the
//! outcomes. This file holds the state and the step API; `run.rs` holds the production loop.
//!
//! Every lease the worker holds is one entry of `held`, keyed by (job id, fencing token), from the
//! claim until its outcome is written, dropped, or the lease is found lost. The production loop may
//! claim a few more jobs than it has free slots: those wait in `buffered` (their leases held and
//! heartbeated like the others) until a slot frees, and are given back at once on shutdown. Writes wait in
//! `completions` (batched) and `others` (failures and snoozes, one call each) until the store
//! accepts or refuses them; a write whose lease ended (by the worker's clock) is dropped.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use faultline_domain::{FailureKind, Job, JobState, Limits};
use faultline_ports::{
    ClaimParams, FailOutcome, Failure, HeartbeatOutcome, JobStore, LabelGuard, LeaseRef,
    MAX_CLAIM_LIMIT, StoreError, StoreResult, WriteOutcome,
};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::{self, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{ConfigError, WorkerConfig, millis};
use crate::lost::{LostClaim, new_claim_id};
use crate::stats::{Counter, Counters, WorkerStats};
use crate::telemetry::{self, JobLabels};
use crate::{JobContext, Outcome, Registry};

/// What a finished job task hands back: the handler's outcome, or the timeout that stopped it.
type Finished = Result<Outcome, Duration>;

/// Completions to write: each lease with the handler's result.
type Completions = Vec<(LeaseRef, Option<Value>)>;

/// A step's account of what it did (see the step methods of [`Worker`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Jobs claimed by this step.
    pub claimed: usize,
    /// What the step changed in the worker's counters.
    pub counts: Counters,
    /// Handlers still running after the step.
    pub in_flight: usize,
    /// Outcomes still waiting to be written after the step (the store was unreachable); a later
    /// step retries them while their leases last.
    pub pending_writes: usize,
}

/// What one [`Worker::exchange`] did.
#[derive(Debug)]
pub(crate) struct Exchanged {
    /// `None`: nothing was claimed; `Some(Ok((jobs, full)))`: the claims went through, and the
    /// last one came back full (more jobs are probably waiting); `Some(Err(_))`: a claim failed.
    pub(crate) claimed: Option<StoreResult<(usize, bool)>>,
    /// Every write went through (`false`: the store could not be reached; they are pending).
    pub(crate) written: bool,
}

/// What one [`Worker::heartbeat_once`] learnt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeartbeatReport {
    /// Leases extended.
    pub extended: usize,
    /// Leases found lost: their handlers were cancelled and their results will not be written.
    pub lost: usize,
    /// Newly learnt cancel requests: those handlers' tokens fired.
    pub cancel_requested: usize,
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Handlers still running when the grace period ended: cancelled, their leases given back.
    pub interrupted: usize,
    /// What the shutdown changed in the counters (outcomes written during the grace period,
    /// leases released, writes dropped, ...).
    pub counts: Counters,
}

/// One lease the worker holds.
#[derive(Debug)]
struct Held {
    kind: String,
    attempt: i32,
    /// The job's metric labels.
    labels: JobLabels,
    /// When the handler started (by tokio's clock).
    started: tokio::time::Instant,
    /// How long the handler ran, once it returned (or timed out, or panicked).
    run_time: Option<Duration>,
    /// The latest end of the lease the store reported (claim or heartbeat), by the store's clock:
    /// for the handler's information only, never compared with this machine's clock.
    lease_expires_at: DateTime<Utc>,
    /// The end of the lease by this worker's monotonic clock, conservatively early: when the
    /// claim or the latest heartbeat was sent, plus the lease length it asked for.
    deadline: tokio::time::Instant,
    /// The handler's token.
    cancel: CancellationToken,
    /// The handler is still running (its task occupies a slot).
    running: bool,
    /// The lease is gone: the token fired, the outcome will not be written.
    lost: bool,
    /// A heartbeat reported a cancel request (and the token fired).
    cancel_requested: bool,
    /// A write of the outcome failed on a backend error: further tries are made only while the
    /// lease lasts.
    write_failed: bool,
}

/// A write other than a completion: one store call each.
#[derive(Debug)]
enum Write {
    Fail(Failure),
    Snooze {
        delay_ms: i64,
        /// A lease given back at shutdown (counted as `released`, not `snoozed`).
        release: bool,
    },
}

/// Emits a tracing event about one lease with the fields every job log line carries.
macro_rules! job_event {
    ($level:ident, $lease:expr, $held:expr, $($rest:tt)+) => {
        tracing::$level!(
            job_id = $lease.job_id,
            kind = %$held.kind,
            attempt = $held.attempt,
            fencing_token = $lease.token,
            $($rest)+
        )
    };
}

/// Faultline's worker: runs the handlers of a [`Registry`] for jobs claimed from a [`JobStore`].
///
/// Production calls [`Worker::run`]. Tests drive the same machinery step by step:
/// [`Worker::claim_once`], [`Worker::settle`], [`Worker::run_once`], [`Worker::flush`],
/// [`Worker::heartbeat_once`] and [`Worker::shutdown`]; none of them sleeps except on the timers under test (per-job timeouts,
/// the shutdown grace), so `tokio::time::pause` makes them instantaneous.
///
/// Lease and due times are computed by the store. Where the worker itself must judge a lease
/// (is a buffered job's lease still good, is an unwritten outcome still worth retrying, has an
/// unconfirmed lease ended while the store is unreachable), it uses a deadline on its monotonic
/// clock: the instant it sent the claim or heartbeat plus the lease length the store granted
/// from its own later now. That deadline is never later than the real end, and no wall clock is
/// ever compared with a database timestamp, so a worker whose clock is off by any amount in
/// either direction loses nothing.
pub struct Worker<S: JobStore> {
    pub(crate) store: Arc<S>,
    pub(crate) registry: Registry,
    pub(crate) config: WorkerConfig,
    pub(crate) wake: Option<watch::Receiver<u64>>,
    pub(crate) stats: WorkerStats,
    held: HashMap<LeaseRef, Held>,
    tasks: JoinSet<Finished>,
    task_leases: HashMap<task::Id, LeaseRef>,
    completions: Vec<(LeaseRef, Option<Value>)>,
    others: VecDeque<(LeaseRef, Write)>,
    /// Claimed jobs waiting for a free slot, oldest first (each also has its entry in `held`).
    buffered: VecDeque<Job>,
    /// Claim calls whose answer was lost: their jobs are given back (see `lost.rs`).
    pub(crate) lost_claims: Vec<LostClaim>,
    /// Moving average of handler run times in seconds: sizes the buffer (see
    /// [`Worker::claim_room`]).
    run_time_avg: Option<f64>,
    /// Set by a shutdown: the worker claims nothing more.
    pub(crate) draining: bool,
    /// Bounds the `queue` and `kind` label values of the worker's metrics.
    labels: LabelGuard,
    /// The handlers this worker last added to the process's in-flight gauge.
    reported_in_flight: usize,
}

impl<S: JobStore> std::fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.config.worker_id)
            .field("registry", &self.registry)
            .field("in_flight", &self.tasks.len())
            .field("leases_held", &self.held.len())
            .field("pending_writes", &self.pending_writes())
            .finish_non_exhaustive()
    }
}

impl<S: JobStore> Drop for Worker<S> {
    /// Takes this worker's slots and running handlers out of the process's gauges.
    fn drop(&mut self) {
        telemetry::concurrency(-(self.config.concurrency as f64));
        if self.reported_in_flight > 0 {
            telemetry::in_flight(-(self.reported_in_flight as f64));
        }
    }
}

impl<S: JobStore> Worker<S> {
    /// A worker for `store`, running the handlers of
    /// `registry`. Refuses an invalid `config` and an empty registry (which would fail every job
    /// it claims).
    pub fn new(
        store: Arc<S>,
        registry: Registry,
        config: WorkerConfig,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        if registry.kinds().is_empty() {
            return Err(ConfigError {
                field: "registry",
                reason: "has no handler: every job claimed would fail".into(),
            });
        }
        Ok(Self {
            store,
            registry,
            config,
            wake: None,
            stats: WorkerStats::default(),
            held: HashMap::new(),
            tasks: JoinSet::new(),
            task_leases: HashMap::new(),
            completions: Vec::new(),
            others: VecDeque::new(),
            buffered: VecDeque::new(),
            lost_claims: Vec::new(),
            run_time_avg: None,
            draining: false,
            labels: LabelGuard::default(),
            reported_in_flight: 0,
        })
        .inspect(|worker| telemetry::concurrency(worker.config.concurrency as f64))
    }

    /// Folds the `queue` and `kind` label values of the worker's metrics through `labels` (share
    /// one guard between every component of a process; default: a guard of its own with
    /// [`LabelGuard::DEFAULT_CAP`]).
    pub fn with_metric_labels(mut self, labels: LabelGuard) -> Self {
        self.labels = labels;
        self
    }

    /// Wakes [`Worker::run`] whenever `wake` changes (a counter bumped when jobs may have become
    /// ready: Postgres `LISTEN`, `MemoryStore::on_enqueue`), on top of the fallback poll.
    pub fn with_wakeup(mut self, wake: watch::Receiver<u64>) -> Self {
        self.wake = Some(wake);
        self
    }

    /// A handle on this worker's counters and gauges, readable while it runs.
    pub fn stats(&self) -> WorkerStats {
        self.stats.clone()
    }

    /// The configuration the worker runs with.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// The store the worker runs on.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Handlers running now.
    pub fn in_flight(&self) -> usize {
        self.tasks.len()
    }

    /// Leases held now (running handlers and outcomes not yet written).
    pub fn leases_held(&self) -> usize {
        self.held.len()
    }

    /// Outcomes waiting to be written.
    pub fn pending_writes(&self) -> usize {
        self.completions.len() + self.others.len()
    }

    /// Free slots: how many more handlers may start now.
    pub fn free_slots(&self) -> usize {
        self.config.concurrency.saturating_sub(self.tasks.len())
    }

    /// Leases a heartbeat would extend (held and not known to be lost).
    pub(crate) fn live_leases(&self) -> usize {
        self.held.values().filter(|held| !held.lost).count()
    }

    pub(crate) fn has_tasks(&self) -> bool {
        !self.tasks.is_empty()
    }

    fn count(&self, counter: Counter, n: usize) {
        self.stats.add(counter, n as u64);
    }

    pub(crate) fn sync_gauges(&mut self) {
        self.stats
            .set_gauges(self.tasks.len(), self.held.len(), self.pending_writes());
        let in_flight = self.tasks.len();
        if in_flight != self.reported_in_flight {
            telemetry::in_flight(in_flight as f64 - self.reported_in_flight as f64);
            self.reported_in_flight = in_flight;
        }
    }

    fn report(&mut self, claimed: usize, before: &Counters) -> StepReport {
        self.sync_gauges();
        StepReport {
            claimed,
            counts: self.stats.counters().since(before),
            in_flight: self.tasks.len(),
            pending_writes: self.pending_writes(),
        }
    }

    /// Runs a store call with the configured timeout; a timeout is a backend error.
    pub(crate) async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let result = timed(self.config.store_timeout, what, fut).await;
        self.note_failure(what, &result);
        result
    }

    /// Counts and logs a failed store call (a stale lease is an answer, not a failure).
    fn note_failure<T>(&self, what: &str, result: &StoreResult<T>) {
        if let Err(err) = result
            && !matches!(err, StoreError::StaleLease { .. })
        {
            self.count(Counter::db_errors, 1);
            tracing::warn!(worker_id = %self.config.worker_id, error = %err, "store call failed: {what}");
        }
    }

    // ----- claiming and running -------------------------------------------------------------

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

    fn claim_params(&self, limit: usize) -> ClaimParams {
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
    fn apply_claim(&mut self, jobs: Vec<Job>, sent: tokio::time::Instant) -> usize {
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
    fn claim_capacity(&self) -> usize {
        let buffer = self.run_time_avg.map_or(0, |avg| {
            let ahead =
                self.config.concurrency as f64 * BUFFER_HORIZON.as_secs_f64() / avg.max(1e-6);
            (ahead as usize).min(self.config.completion_batch_size)
        });
        self.config.concurrency + buffer
    }

    /// Holds a claimed job until a slot frees (its lease is heartbeated meanwhile).
    fn buffer(&mut self, job: Job, deadline: tokio::time::Instant) {
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
    fn release_buffered(&mut self) {
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
    fn start(&mut self, job: Job, deadline: tokio::time::Instant) {
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

    // ----- writing outcomes -----------------------------------------------------------------

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

    fn drop_expired_writes(&mut self) {
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

    async fn write_completions(&mut self) -> bool {
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
    fn take_completion_batch(&mut self) -> Completions {
        let n = self
            .completions
            .len()
            .min(self.config.completion_batch_size);
        self.completions.drain(..n).collect()
    }

    /// Records what the store answered to a batch of completions; `false` when it could not be
    /// reached (the batch is pending again, first in line).
    fn apply_completions(
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
    async fn write_others(&mut self) -> bool {
        while let Some((_, front)) = self.others.front() {
            if matches!(front, Write::Fail(_)) {
                if !self.write_failures().await {
                    return false;
                }
                continue;
            }
            let Some((lease, write)) = self.others.pop_front() else {
                break;
            };
            let result = match &write {
                Write::Fail(failure) => {
                    self.call("fail", self.store.job_fail(lease, failure)).await
                }
                Write::Snooze { delay_ms, .. } => {
                    self.call("snooze", self.store.job_snooze(lease, *delay_ms))
                        .await
                }
            };
            match result {
                Ok(job) => {
                    let counter = match (job.state, &write) {
                        (JobState::Cancelled, _) => Counter::cancelled,
                        (JobState::Failed, _) => Counter::failed,
                        (_, Write::Fail(_)) => Counter::retried,
                        (_, Write::Snooze { release: true, .. }) => Counter::released,
                        (_, Write::Snooze { release: false, .. }) => Counter::snoozed,
                    };
                    self.resolved(lease, counter);
                }
                Err(StoreError::StaleLease { .. }) => {
                    let operation = match write {
                        Write::Fail(_) => "fail",
                        Write::Snooze { .. } => "snooze",
                    };
                    self.stale(lease, operation);
                }
                Err(StoreError::Backend(_)) => {
                    self.write_failed(lease);
                    self.others.push_front((lease, write));
                    return false;
                }
                Err(_) => self.refused(lease),
            }
        }
        true
    }

    /// Writes the failures at the front of the queue, up to a batch, in one statement; `false`
    /// when the store could not be reached (they are pending again, first in line).
    async fn write_failures(&mut self) -> bool {
        let mut batch: Vec<(LeaseRef, Failure)> = Vec::new();
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
    fn recorded(&mut self, lease: LeaseRef, attempt: i32, job: &Job) {
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

    fn write_failed(&mut self, lease: LeaseRef) {
        if let Some(held) = self.held.get_mut(&lease) {
            held.write_failed = true;
        }
    }

    fn resolved(&mut self, lease: LeaseRef, counter: Counter) {
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
    fn stale(&mut self, lease: LeaseRef, operation: &'static str) {
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

    fn refused(&mut self, lease: LeaseRef) {
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

    // ----- heartbeats -----------------------------------------------------------------------

    /// Extends every live lease with one store call. A lost lease fires its handler's token and
    /// its outcome is never written; a cancel request fires the token (the handler's outcome is
    /// still written; the store turns a failure into `cancelled`). When the store cannot be
    /// reached, leases whose end has passed by the worker's clock are treated as lost.
    pub async fn heartbeat_once(&mut self) -> StoreResult<HeartbeatReport> {
        let leases: Vec<LeaseRef> = self
            .held
            .iter()
            .filter(|(_, held)| !held.lost)
            .map(|(lease, _)| *lease)
            .collect();
        let mut report = HeartbeatReport::default();
        if leases.is_empty() {
            return Ok(report);
        }
        let extend_ms = self.config.lease_ms();
        let sent = tokio::time::Instant::now();
        let result = self
            .call(
                "heartbeat",
                self.store.job_heartbeat_many(&leases, extend_ms),
            )
            .await;
        let outcomes = match result {
            Ok(outcomes) if outcomes.len() == leases.len() => outcomes,
            Ok(outcomes) => {
                self.expire_unconfirmed_leases();
                return Err(StoreError::Backend(
                    format!(
                        "{} heartbeat outcomes for {} leases",
                        outcomes.len(),
                        leases.len()
                    )
                    .into(),
                ));
            }
            Err(err) => {
                self.expire_unconfirmed_leases();
                return Err(err);
            }
        };
        for (lease, outcome) in leases.into_iter().zip(outcomes) {
            match outcome {
                HeartbeatOutcome::Extended {
                    lease_expires_at,
                    cancel_requested,
                } => {
                    report.extended += 1;
                    let Some(held) = self.held.get_mut(&lease) else {
                        continue;
                    };
                    held.lease_expires_at = lease_expires_at;
                    held.deadline = sent + self.config.lease;
                    if cancel_requested && !held.cancel_requested {
                        held.cancel_requested = true;
                        held.cancel.cancel();
                        report.cancel_requested += 1;
                        job_event!(info, lease, held, "cancel requested: handler token fired");
                        self.count(Counter::cancel_requests, 1);
                    }
                }
                HeartbeatOutcome::Lost => {
                    report.lost += 1;
                    telemetry::stale("heartbeat");
                    self.lose(lease, "a heartbeat found the lease lost");
                }
            }
        }
        self.sync_gauges();
        Ok(report)
    }

    /// After a failed heartbeat: leases whose end has passed by the worker's monotonic reckoning
    /// may already be rescued and running elsewhere, so their handlers are stopped.
    fn expire_unconfirmed_leases(&mut self) {
        let now = tokio::time::Instant::now();
        let ended: Vec<LeaseRef> = self
            .held
            .iter()
            .filter(|(_, held)| held.running && !held.lost && held.deadline <= now)
            .map(|(lease, _)| *lease)
            .collect();
        for lease in ended {
            self.lose(lease, "the lease ended while the store was unreachable");
        }
        self.sync_gauges();
    }

    /// Marks a lease lost: fires the handler's token and makes sure its outcome is never written.
    fn lose(&mut self, lease: LeaseRef, why: &str) {
        let Some(held) = self.held.get_mut(&lease) else {
            return;
        };
        held.lost = true;
        held.cancel.cancel();
        job_event!(
            warn,
            lease,
            held,
            reason = why,
            "lease lost: handler cancelled, its outcome will not be written"
        );
        let running = held.running;
        self.count(Counter::leases_lost, 1);
        if !running {
            self.held.remove(&lease);
            self.completions.retain(|(pending, _)| *pending != lease);
            self.others.retain(|(pending, _)| *pending != lease);
        }
    }

    // ----- shutdown -------------------------------------------------------------------------

    /// Graceful shutdown: claims nothing more; lets running handlers finish for up to `grace`
    /// (heartbeating and writing outcomes meanwhile); then cancels the rest and gives their
    /// leases back at once (`job_snooze(lease, 0)`: queued, due now, attempt returned, so another
    /// worker takes them without waiting for the lease to expire); finally writes what is
    /// pending, retrying for at most `db_backoff_max` while the store is unreachable.
    ///
    /// A handler that ignores its token and never reaches an `.await` cannot be stopped; it is
    /// detached, and its lease given back all the same.
    pub async fn shutdown(&mut self, grace: Duration) -> ShutdownReport {
        let before = self.stats.counters();
        self.draining = true;
        self.release_buffered();
        tracing::info!(
            worker_id = %self.config.worker_id,
            in_flight = self.tasks.len(),
            ?grace,
            "shutting down: waiting for running jobs"
        );
        self.drain(tokio::time::Instant::now() + grace).await;
        let interrupted = self.interrupt_running();
        self.final_flush().await;
        tracing::info!(
            worker_id = %self.config.worker_id,
            interrupted,
            "worker stopped"
        );
        ShutdownReport {
            interrupted,
            counts: self.stats.counters().since(&before),
        }
    }

    /// Cancels the handlers still running, aborts their tasks and queues their release.
    fn interrupt_running(&mut self) -> usize {
        self.collect_finished();
        let tasks = std::mem::take(&mut self.tasks);
        drop(tasks); // aborts every task still running
        self.task_leases.clear();
        let running: Vec<LeaseRef> = self
            .held
            .iter()
            .filter(|(_, held)| held.running)
            .map(|(lease, _)| *lease)
            .collect();
        for lease in &running {
            let Some(held) = self.held.get_mut(lease) else {
                continue;
            };
            held.cancel.cancel();
            held.running = false;
            if held.lost {
                self.held.remove(lease);
                continue;
            }
            job_event!(
                info,
                lease,
                held,
                "grace period over: handler cancelled, giving the lease back"
            );
            self.others.push_back((
                *lease,
                Write::Snooze {
                    delay_ms: 0,
                    release: true,
                },
            ));
        }
        self.sync_gauges();
        running.len()
    }

    /// Writes what is pending, retrying with backoff for at most `db_backoff_max`; drops the rest.
    /// Gives back the jobs of lost claims once more.
    async fn final_flush(&mut self) {
        if !self.lost_claims.is_empty() {
            self.release_lost_claims().await;
        }
        let give_up_at = tokio::time::Instant::now() + self.config.db_backoff_max;
        let mut backoff =
            crate::backoff::Backoff::new(self.config.db_backoff_min, self.config.db_backoff_max);
        while !self.write_pending().await {
            let now = tokio::time::Instant::now();
            let pause = backoff.failed(now);
            if now + pause > give_up_at {
                break;
            }
            tokio::time::sleep(pause).await;
        }
        let leftover: Vec<LeaseRef> = self
            .completions
            .drain(..)
            .map(|(lease, _)| lease)
            .chain(self.others.drain(..).map(|(lease, _)| lease))
            .collect();
        for lease in leftover {
            self.count(Counter::writes_dropped, 1);
            if let Some(held) = self.held.remove(&lease) {
                job_event!(
                    warn,
                    lease,
                    held,
                    "store unreachable at shutdown: outcome dropped (the rescuer retries the job)"
                );
            }
        }
        self.sync_gauges();
    }
}

/// How far ahead the production loop's buffer looks (see [`Worker::claim_room`]).
const BUFFER_HORIZON: Duration = Duration::from_millis(25);

/// Runs a store call with a time limit (a timeout is a backend error) and records it in the
/// store-call metrics.
async fn timed<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    let result = match tokio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Backend(
            format!("{what} took longer than {limit:?}").into(),
        )),
    };
    let failed = result
        .as_ref()
        .is_err_and(|err| !matches!(err, StoreError::StaleLease { .. }));
    let reached = !matches!(result, Err(StoreError::Backend(_)));
    telemetry::store_call(what, reached, failed);
    result
}

fn permanent(error: String, kind: FailureKind) -> Write {
    Write::Fail(Failure {
        error,
        kind,
        retryable: false,
        retry_delay_ms: None,
    })
}

fn retryable(error: String, kind: FailureKind) -> Write {
    Write::Fail(Failure {
        error,
        kind,
        retryable: true,
        retry_delay_ms: None,
    })
}

/// A delay the store accepts: whole milliseconds, at most [`Limits::MAX_DURATION_MS`].
fn store_ms(delay: Duration) -> i64 {
    millis(delay).min(Limits::MAX_DURATION_MS)
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(message) => (*message).to_owned(),
            Err(_) => "a panic without a message".to_owned(),
        },
    }
}
