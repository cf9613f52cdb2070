//! The storage port: one wide trait, methods named entity-first, parameters as structs.
//!
//! Semantics every adapter must honour (the contract suite in `tests/` checks each):
//! * Writes by a lease holder take a [`LeaseRef`] (job id + fencing token) and succeed only while
//!   the job is `running` under that token; otherwise they change nothing and report
//!   [`StoreError::StaleLease`] (or [`WriteOutcome::Stale`] / [`HeartbeatOutcome::Lost`] in
//!   batches). A lease on a job that does not exist (any more) is stale too.
//! * Inputs are checked with the `validate` functions of this crate before anything changes;
//!   free-form text (errors) is stored with NUL characters replaced
//!   (`faultline_domain::Limits::storable_text`).
//! * Lease times and due times are computed from the store's own clock, never the caller's.
//! * Every transition follows `faultline_domain::Job::apply`.

use chrono::{DateTime, Utc};
use faultline_domain::{EventKind, FailureKind, Job, JobSpec, JobState, SpecError};

use crate::{ElectParams, Leadership, ProcessInfo, ProcessSpec, QueueInfo, QueueLimits};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Identifies one lease: the job and the fencing token its claim returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseRef {
    /// The leased job.
    pub job_id: i64,
    /// The fencing token of the claim that created the lease.
    pub token: i64,
}

impl LeaseRef {
    /// The lease a claimed job carries.
    pub fn of(job: &Job) -> LeaseRef {
        LeaseRef {
            job_id: job.id,
            token: job.fencing_token,
        }
    }
}

/// The result of a single enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct Enqueued {
    /// The new job, or the existing job an idempotent replay resolved to.
    pub job: Job,
    /// `false` when the idempotency key matched an existing job with the same request.
    pub created: bool,
}

/// The result of one item of a batch enqueue, in input order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum EnqueueOutcome {
    /// A new job was created.
    Created {
        /// The new job's id.
        id: i64,
    },
    /// The idempotency key named an existing job with the same request.
    Existing {
        /// The existing job's id.
        id: i64,
    },
    /// The idempotency key names an existing job with a different request; nothing was created.
    Conflict {
        /// The existing job's id.
        existing_id: i64,
    },
}

/// What a batch claim asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimParams {
    /// Claim only from these queues (at least one).
    pub queues: Vec<String>,
    /// Claim only these kinds; empty means any kind.
    pub kinds: Vec<String>,
    /// At most this many jobs.
    pub limit: u32,
    /// Lease length in milliseconds, from the store's now.
    pub lease_ms: i64,
    /// The claiming worker, recorded as `lease_owner`.
    pub worker_id: String,
    /// A random id of this claim call, kept with each job it leases: when the call times out or
    /// its connection breaks (its answer is lost, it may or may not have committed), the caller
    /// gives back whatever it leased with [`JobStore::job_release_claim`]. `None`: no such id.
    pub claim_id: Option<i64>,
}

/// The result of extending one lease, in input order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// The lease is still held and now ends at `lease_expires_at`.
    Extended {
        /// The new end of the lease.
        lease_expires_at: DateTime<Utc>,
        /// A user asked to cancel the job: the handler should stop.
        cancel_requested: bool,
    },
    /// The lease is no longer held: the handler must stop and its result will be refused.
    Lost,
}

/// The result of one fenced write in a batch, in input order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The write applied.
    Accepted,
    /// The lease was no longer held; nothing changed.
    Stale,
}

/// The result of one item of [`JobStore::job_fail_many`], in input order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// The failure applied; the job is now in `state` (`queued` for a retry, `failed`, or
    /// `cancelled` when a cancel was requested).
    Applied {
        /// The job's state after the failure.
        state: JobState,
    },
    /// The lease was no longer held; nothing changed.
    Stale,
}

/// A failed attempt, as reported by its lease holder.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The error to keep in `last_error` and in the attempt history.
    pub error: String,
    /// Why the attempt failed, for the attempt history.
    pub kind: FailureKind,
    /// `false` fails the job permanently; `true` retries it while attempts remain.
    pub retryable: bool,
    /// Delay before the retry in milliseconds; `None` draws it from the job's retry policy.
    pub retry_delay_ms: Option<i64>,
}

/// Filters and keyset cursor for [`JobStore::job_list`]. Jobs come newest first (id descending).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListParams {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this state.
    pub state: Option<JobState>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Page size (at least 1).
    pub limit: u32,
    /// Only jobs with an id below this one: the `next_cursor` of the previous page.
    pub before_id: Option<i64>,
}

/// One page of [`JobStore::job_list`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobPage {
    /// The jobs, id descending.
    pub jobs: Vec<Job>,
    /// Pass as `before_id` to get the next page; `None` on the last page.
    pub next_cursor: Option<i64>,
}

/// Counts for one queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Jobs per state; every state is present, zero included.
    pub counts: Vec<(JobState, i64)>,
    /// `next_run_at` of the oldest queued job that is due, if any.
    pub oldest_ready_at: Option<DateTime<Utc>>,
}

impl QueueStats {
    /// The count for `state`.
    pub fn count(&self, state: JobState) -> i64 {
        self.counts
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n)
    }
}

/// The unfinished backlog of one queue: what [`JobStore::queue_backlog`] reports.
///
/// Only `queued` and `running` jobs count; finished jobs (`succeeded`, `failed`, `cancelled`)
/// are history, not backlog, and are never read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueBacklog {
    /// The queue.
    pub queue: String,
    /// Jobs in state `queued`, due or scheduled.
    pub queued: i64,
    /// Of the `queued` jobs, those due now (`next_run_at <= now`): ready to be claimed.
    pub ready: i64,
    /// Jobs in state `running` (leased).
    pub running: i64,
    /// `next_run_at` of the oldest queued job that is due, if any.
    pub oldest_ready_at: Option<DateTime<Utc>>,
}

/// How long finished jobs are kept before [`JobStore::job_prune`] deletes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneParams {
    /// Keep `succeeded` jobs this many milliseconds after they finished.
    pub succeeded_retention_ms: i64,
    /// Keep `failed` jobs this many milliseconds after they finished.
    pub failed_retention_ms: i64,
    /// Keep `cancelled` jobs this many milliseconds after they finished.
    pub cancelled_retention_ms: i64,
    /// Delete at most this many jobs in one call (keeps each call short).
    pub limit: u32,
}

/// Everything a store operation can report besides success.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No job with this id.
    #[error("job {id} not found")]
    NotFound {
        /// The id asked for.
        id: i64,
    },
    /// The lease holder's write came too late: the job is no longer running under its token.
    #[error("stale lease: job {} is no longer held under fencing token {}", lease.job_id, lease.token)]
    StaleLease {
        /// The lease presented.
        lease: LeaseRef,
    },
    /// The idempotency key is already used by a job with a different request.
    #[error(
        "idempotency key {key:?} is already used by job {existing_id} with a different request"
    )]
    Conflict {
        /// The key.
        key: String,
        /// The job that owns the key.
        existing_id: i64,
    },
    /// The event is not allowed in the job's current state.
    #[error("job {id}: cannot {event} a {from} job")]
    IllegalTransition {
        /// The job.
        id: i64,
        /// Its current state.
        from: JobState,
        /// The refused event.
        event: EventKind,
    },
    /// The request is malformed (the store checks what it is given).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The backend failed (connection lost, timeout, ...). Opaque on purpose.
    #[error("storage backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<SpecError> for StoreError {
    fn from(err: SpecError) -> Self {
        StoreError::Invalid(err.to_string())
    }
}

/// Shorthand for store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// The storage port. See the module docs for the semantics every implementation shares.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait::async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Enqueues one job. With an idempotency key: same key and same request (queue, kind,
    /// canonical payload) returns the existing job with `created: false`; same key with another
    /// request is [`StoreError::Conflict`]. Race-safe: concurrent enqueues with one key create
    /// exactly one job.
    async fn job_enqueue(&self, spec: &JobSpec) -> StoreResult<Enqueued>;

    /// Enqueues many jobs atomically with an outcome per item, in input order. Idempotency as in
    /// [`JobStore::job_enqueue`], per item; a conflict on one item does not stop the others.
    /// A key repeated within the batch resolves to the first item that carries it.
    async fn job_enqueue_many(&self, specs: &[JobSpec]) -> StoreResult<Vec<EnqueueOutcome>>;

    /// Leases up to `limit` due queued jobs of the given queues (and kinds), ordered by priority,
    /// then `next_run_at`, then id, skipping jobs other claimers hold. Each claim bumps the
    /// attempt count and the fencing token. Concurrent claimers never receive the same job.
    async fn job_claim(&self, params: &ClaimParams) -> StoreResult<Vec<Job>>;

    /// Gives back every job still leased by the claim call `claim_id` (see
    /// [`ClaimParams::claim_id`]) as a snooze of 0 ms would: queued and due now with its attempt
    /// returned (`cancelled` when a cancel was requested). For a claimant that never received the
    /// answer of that claim. Returns how many jobs it gave back. Idempotent.
    async fn job_release_claim(&self, claim_id: i64) -> StoreResult<u64>;

    /// Extends the given leases to now + `extend_ms`, with an outcome per lease in input order.
    async fn job_heartbeat_many(
        &self,
        leases: &[LeaseRef],
        extend_ms: i64,
    ) -> StoreResult<Vec<HeartbeatOutcome>>;

    /// Completes a leased job with an optional result.
    async fn job_complete(&self, lease: LeaseRef, result: Option<Value>) -> StoreResult<Job>;

    /// Completes many leased jobs in one round trip, with an outcome per item in input order. A
    /// lease repeated within the batch is accepted at most once (its first occurrence).
    async fn job_complete_many(
        &self,
        completions: &[(LeaseRef, Option<Value>)],
    ) -> StoreResult<Vec<WriteOutcome>>;

    /// Records a failed attempt: retried after a delay while attempts remain (and the failure is
    /// retryable), `failed` otherwise, `cancelled` when a cancel was requested.
    async fn job_fail(&self, lease: LeaseRef, failure: &Failure) -> StoreResult<Job>;

    /// Records many failed attempts in one round trip (each as [`JobStore::job_fail`], each
    /// fenced by its own lease), with an outcome per item in input order. A lease repeated
    /// within the batch is applied at most once (its first occurrence).
    async fn job_fail_many(
        &self,
        failures: &[(LeaseRef, Failure)],
    ) -> StoreResult<Vec<FailOutcome>>;

    /// Puts a leased job back for `delay_ms` without using up its attempt.
    async fn job_snooze(&self, lease: LeaseRef, delay_ms: i64) -> StoreResult<Job>;

    /// Cancels a job: a queued job ends `cancelled`; a running job gets `cancel_requested` (its
    /// worker learns it at the next heartbeat); a finished job is an illegal transition.
    async fn job_cancel(&self, id: i64) -> StoreResult<Job>;

    /// Queues a `failed` or `cancelled` job again, due now, with its attempt count reset to 0.
    async fn job_redrive(&self, id: i64) -> StoreResult<Job>;

    /// Ends up to `limit` expired leases as failed attempts: back to `queued` with backoff,
    /// `failed` when the attempts are spent, `cancelled` when a cancel was requested. Never
    /// touches a job whose lease was extended or that finished in the meantime. Returns the
    /// rescued jobs in their new state, ordered by (old lease end, id); the earliest expired
    /// leases are rescued first.
    async fn job_rescue_expired(&self, limit: u32) -> StoreResult<Vec<Job>>;

    /// An operator's "expire lease now": ends the running job's lease at once, exactly as the
    /// rescue of an expired lease would (`Job::apply` with `LeaseExpired` at now, the lease
    /// first ending now): the attempt counts as failed with kind `lease_expired` in the attempt
    /// history, and the job is queued again with backoff, `failed` when its attempts are spent,
    /// `cancelled` when a cancel was requested. The holder's token is fenced off from then on
    /// (its heartbeat reports the lease lost, its writes are stale). [`StoreError::NotFound`]
    /// for an unknown id, [`StoreError::IllegalTransition`] (event `LeaseExpired`) for a job
    /// that is not running. Returns the job in its new state.
    async fn job_expire_lease(&self, id: i64) -> StoreResult<Job>;

    /// One job by id.
    async fn job_get(&self, id: i64) -> StoreResult<Job>;

    /// A page of jobs matching the filters, newest first.
    async fn job_list(&self, params: &ListParams) -> StoreResult<JobPage>;

    /// Counts by state and the oldest due job, per queue that has any job, sorted by queue.
    async fn queue_stats(&self) -> StoreResult<Vec<QueueStats>>;

    /// The backlog per queue that has any `queued` or `running` job, sorted by queue (byte
    /// order): queued, ready (due now) and running counts and the oldest due job. Cheap enough
    /// to sample periodically: it reads only unfinished jobs, never the finished history (the
    /// Postgres adapter answers from its partial claim and rescue indexes), unlike
    /// [`JobStore::queue_stats`], which counts every job.
    async fn queue_backlog(&self) -> StoreResult<Vec<QueueBacklog>>;

    /// Every queue row, sorted by name (byte order).
    async fn queue_list(&self) -> StoreResult<Vec<QueueInfo>>;

    /// Pauses a queue (creating its row if it has none): from the moment this commits, no claim
    /// returns its jobs. Pausing a paused queue changes nothing. Enqueues still succeed.
    async fn queue_pause(&self, name: &str) -> StoreResult<QueueInfo>;

    /// Resumes a queue (creating its row if it has none); resuming a running queue changes nothing.
    async fn queue_resume(&self, name: &str) -> StoreResult<QueueInfo>;

    /// Sets the flow-control limits of a queue (creating its row if it has none), replacing the
    /// previous ones: see [`QueueLimits`] for what they guarantee. Raising or removing a bound
    /// wakes waiting claimants. [`StoreError::Invalid`] for a bound out of range.
    async fn queue_set_limits(&self, name: &str, limits: &QueueLimits) -> StoreResult<QueueInfo>;

    /// Takes or renews the maintenance leadership for `candidate`: granted when nobody holds
    /// it, when the holder's leadership has lapsed (a new term), or when `candidate` holds it
    /// already (renewed to now + `ttl_ms`, same term). Returns the leadership as it stands after
    /// the call, whoever holds it. Race-safe: concurrent candidates never both win.
    async fn leader_elect(&self, params: &ElectParams) -> StoreResult<Leadership>;

    /// Gives up the leadership if `leader_id` still holds it in `term` (a shutdown): the next
    /// candidate takes over at once instead of waiting for the lapse. Returns whether it did.
    async fn leader_resign(&self, leader_id: &str, term: i64) -> StoreResult<bool>;

    /// The leadership as it stands, lapsed or not; `None` when nobody ever led.
    async fn leader_get(&self) -> StoreResult<Option<Leadership>>;

    /// Registers a process or refreshes its entry (`last_seen_at` = now; `started_at` kept).
    async fn process_register(&self, spec: &ProcessSpec) -> StoreResult<ProcessInfo>;

    /// Removes a process's entry (its shutdown); returns whether there was one.
    async fn process_remove(&self, id: &str) -> StoreResult<bool>;

    /// Every registered process, sorted by id.
    async fn process_list(&self) -> StoreResult<Vec<ProcessInfo>>;

    /// Removes entries not refreshed for more than `older_than_ms`; returns how many.
    async fn process_prune(&self, older_than_ms: i64) -> StoreResult<u64>;

    /// Deletes up to `limit` finished jobs whose `finished_at` is strictly older than now minus
    /// their state's retention, oldest first; returns how many. Their idempotency keys are free
    /// again.
    async fn job_prune(&self, params: &PruneParams) -> StoreResult<u64>;
}
