//! [`Worker`]: claims jobs, runs each in its own task, keeps the leases alive and writes the
//! outcomes. This file holds the state, the reports and the accessors; `claims.rs` claiming,
//! buffering and running handlers, `writes.rs` writing outcomes, `leases.rs` heartbeats and the
//! shutdown, `lost.rs` lost claims, `run.rs` the production loop.
//!
//! Every lease the worker holds is one entry of `held`, keyed by (job id, fencing token), from the
//! claim until its outcome is written, dropped, or the lease is found lost. The production loop may
//! claim a few more jobs than it has free slots: those wait in `buffered` (their leases held and
//! heartbeated like the others) until a slot frees, and are given back at once on shutdown. Each
//! entry's [`LeaseState`] says where the lease stands (buffered, running, writing, lost). Outcomes
//! go to the process's [`Completer`], which writes them (batched with the other producers') and
//! answers in the worker's mailbox.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use faultline_domain::{FailureKind, Job, Limits};
use faultline_ports::{Failure, JobStore, LabelGuard, LeaseRef, StoreError, StoreResult};
use tokio::sync::watch;
use tokio::task::{self, JoinSet};
use tokio_util::sync::CancellationToken;

pub(crate) use crate::completer::Write;
use crate::completer::{Completer, CompleterConfig, Mailbox};
use crate::config::{ConfigError, WorkerConfig, millis};
use crate::lost::LostClaim;
use crate::stats::{Counter, Counters, WorkerStats};
use crate::telemetry::{self, JobLabels};
use crate::{Outcome, Registry};

/// What a finished job task hands back: the handler's outcome, or the timeout that stopped it.
pub(crate) type Finished = Result<Outcome, Duration>;

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

/// What the production loop's claims did: `None`, nothing was claimed; `Some(Ok((jobs, full)))`,
/// the claims went through and the last one came back full (more jobs are probably waiting);
/// `Some(Err(_))`, a claim failed.
pub(crate) type Claimed = Option<StoreResult<(usize, bool)>>;

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

/// Where a lease the worker holds stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseState {
    /// Claimed, waiting in the buffer for a free slot.
    Buffered,
    /// Its handler runs (its task occupies a slot).
    Running,
    /// The handler returned (or the lease is being given back): the write is with the
    /// completer.
    Writing,
    /// Found lost while its handler still runs: the token fired, and whatever the handler
    /// returns is discarded (the entry goes when it returns).
    Lost,
}

/// One lease the worker holds.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) state: LeaseState,
    pub(crate) kind: String,
    pub(crate) attempt: i32,
    /// The job's metric labels.
    pub(crate) labels: JobLabels,
    /// When the handler started (by tokio's clock).
    pub(crate) started: tokio::time::Instant,
    /// How long the handler ran, once it returned (or timed out, or panicked).
    pub(crate) run_time: Option<Duration>,
    /// The latest end of the lease the store reported (claim or heartbeat), by the store's clock:
    /// for the handler's information only, never compared with this machine's clock.
    pub(crate) lease_expires_at: DateTime<Utc>,
    /// The end of the lease by this worker's monotonic clock, conservatively early: when the
    /// claim or the latest heartbeat was sent, plus the lease length it asked for.
    pub(crate) deadline: tokio::time::Instant,
    /// The handler's token.
    pub(crate) cancel: CancellationToken,
    /// A heartbeat reported a cancel request (and the token fired, or fires when the buffered
    /// job starts).
    pub(crate) cancel_requested: bool,
}

impl Held {
    /// A lease just claimed (its handler not started yet), ending at `deadline` by the monotonic
    /// clock.
    pub(crate) fn claimed(job: &Job, labels: JobLabels, deadline: tokio::time::Instant) -> Self {
        Self {
            state: LeaseState::Buffered,
            kind: job.kind.clone(),
            attempt: job.attempts,
            labels,
            started: tokio::time::Instant::now(),
            run_time: None,
            lease_expires_at: job.lease_expires_at.unwrap_or(job.next_run_at),
            deadline,
            cancel: CancellationToken::new(),
            cancel_requested: false,
        }
    }
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
pub(crate) use job_event;

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
    pub(crate) held: HashMap<LeaseRef, Held>,
    pub(crate) tasks: JoinSet<Finished>,
    pub(crate) task_leases: HashMap<task::Id, LeaseRef>,
    /// Writes every outcome (shared with the other producers of the process, or this worker's
    /// own).
    pub(crate) completer: Completer<S>,
    /// This worker runs its completer's writer itself in [`Worker::run`] (it is not shared).
    pub(crate) own_completer: bool,
    /// Where the completer answers this worker's writes.
    pub(crate) mailbox: Arc<Mailbox>,
    /// Claimed jobs waiting for a free slot, oldest first (each also has its entry in `held`).
    pub(crate) buffered: VecDeque<Job>,
    /// Claim calls whose answer was lost: their jobs are given back (see `lost.rs`).
    pub(crate) lost_claims: Vec<LostClaim>,
    /// Moving average of handler run times in seconds: sizes the buffer (see
    /// [`Worker::claim_room`]).
    pub(crate) run_time_avg: Option<f64>,
    /// Set by a shutdown: the worker claims nothing more.
    pub(crate) draining: bool,
    /// Bounds the `queue` and `kind` label values of the worker's metrics.
    pub(crate) labels: LabelGuard,
    /// The handlers this worker last added to the process's in-flight gauge.
    pub(crate) reported_in_flight: usize,
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
        let completer = Completer::new(store.clone(), CompleterConfig::of(&config));
        Ok(Self {
            store,
            registry,
            config,
            wake: None,
            stats: WorkerStats::default(),
            held: HashMap::new(),
            tasks: JoinSet::new(),
            task_leases: HashMap::new(),
            completer,
            own_completer: true,
            mailbox: Arc::default(),
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

    /// Hands every outcome to `completer`, shared with the process's other producers (default: a
    /// completer of the worker's own, whose writer [`Worker::run`] runs). Whoever shares one runs
    /// [`Completer::run`] while the workers run, and stops it once they have shut down.
    pub fn with_completer(mut self, completer: Completer<S>) -> Self {
        self.completer = completer;
        self.own_completer = false;
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
        self.held
            .values()
            .filter(|held| held.state == LeaseState::Writing)
            .count()
    }

    /// Free slots: how many more handlers may start now.
    pub fn free_slots(&self) -> usize {
        self.config.concurrency.saturating_sub(self.tasks.len())
    }

    /// Leases a heartbeat would extend (held and not known to be lost).
    pub(crate) fn live_leases(&self) -> usize {
        self.held
            .values()
            .filter(|held| held.state != LeaseState::Lost)
            .count()
    }

    pub(crate) fn has_tasks(&self) -> bool {
        !self.tasks.is_empty()
    }

    pub(crate) fn count(&self, counter: Counter, n: usize) {
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

    pub(crate) fn report(&mut self, claimed: usize, before: &Counters) -> StepReport {
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
    pub(crate) fn note_failure<T>(&self, what: &str, result: &StoreResult<T>) {
        if let Err(err) = result
            && !matches!(err, StoreError::StaleLease { .. })
        {
            self.count(Counter::db_errors, 1);
            tracing::warn!(worker_id = %self.config.worker_id, error = %err, "store call failed: {what}");
        }
    }
}

/// How far ahead the production loop's buffer looks (see [`Worker::claim_room`]).
pub(crate) const BUFFER_HORIZON: Duration = Duration::from_millis(25);

/// Runs a store call with a time limit (a timeout is a backend error) and records it in the
/// store-call metrics.
pub(crate) async fn timed<T>(
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

pub(crate) fn permanent(error: String, kind: FailureKind) -> Write {
    Write::Fail(Failure {
        error,
        kind,
        retryable: false,
        retry_delay_ms: None,
    })
}

pub(crate) fn retryable(error: String, kind: FailureKind) -> Write {
    Write::Fail(Failure {
        error,
        kind,
        retryable: true,
        retry_delay_ms: None,
    })
}

/// A delay the store accepts: whole milliseconds, at most [`Limits::MAX_DURATION_MS`].
pub(crate) fn store_ms(delay: Duration) -> i64 {
    millis(delay).min(Limits::MAX_DURATION_MS)
}

pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(message) => (*message).to_owned(),
            Err(_) => "a panic without a message".to_owned(),
        },
    }
}
