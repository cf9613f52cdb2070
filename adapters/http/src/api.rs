//! The operations: jobs, queues, the worker protocol and health, as poem-openapi handlers over the
//! `JobStore` port.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use faultline_ports::domain::{FailureKind, Limits};
use faultline_ports::{
    ClaimParams, EnqueueOutcome, Failure, JobStore, LeaseRef, ListParams, QueueLimits, StoreError,
    StoreResult, validate_extend_ms, validate_queue_name, validate_result, validate_snooze_ms,
};
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ApiConfig;
use crate::auth::BearerAuth;
use crate::conn;
use crate::dto::{
    BatchItemResult, BatchResult, CompleteRequest, ComponentStatus, FailRequest, Health,
    HealthStatus, HeartbeatRequest, HeartbeatResult, JobPage, JobStateDto, JobView, LeaseGrant,
    LeaseRequest, LeasedJob, MAX_ERROR_CHARS, MAX_WAIT_SECONDS, NewJob, NewJobBatch, SnoozeRequest,
    Text, check_json_size, seconds_to_ms,
};
use crate::fleet::{QueueLimitsBody, QueueList, QueueSummary, QueueView, WorkerList};
use crate::health::HealthCheck;
use crate::lost;
use crate::problem::{
    ActionError, BatchError, ClaimError, EnqueueError, LeaseError, ListError, Problem,
    ProcessListError, QueueActionError, QueueLimitsError, ReadError, StatsError,
};
use crate::telemetry;

/// What every handler shares.
pub(crate) struct Ctx {
    pub(crate) store: Arc<dyn JobStore>,
    pub(crate) wake: watch::Receiver<u64>,
    pub(crate) health: Arc<dyn HealthCheck>,
    pub(crate) config: ApiConfig,
    pub(crate) shutdown: CancellationToken,
}

impl Ctx {
    /// Runs one store call (`operation`, for the metrics), bounded by the request timeout: no
    /// answer in time is a 503.
    async fn call<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = StoreResult<T>>,
    ) -> Result<T, Problem> {
        match tokio::time::timeout(self.config.request_timeout, call).await {
            Ok(result) => {
                telemetry::store_call(operation, result.as_ref().err());
                result.map_err(Problem::from)
            }
            Err(_) => {
                tracing::warn!(
                    timeout_s = self.config.request_timeout.as_secs_f64(),
                    operation,
                    "store call timed out"
                );
                telemetry::store_call(operation, Some(&StoreError::Backend("timed out".into())));
                Err(Problem::unavailable(format!(
                    "the database did not answer within {} s; retry later",
                    self.config.request_timeout.as_secs_f64()
                )))
            }
        }
    }
}

impl Ctx {
    /// One claim call of a lease request, under a fresh claim id. When its answer is lost, it
    /// may have committed all the same, so whatever it leased is given back in the background
    /// (see [`crate::lost`]): when it timed out or failed in the backend (503), and when the
    /// request itself was dropped while the claim was in flight (the client closed its
    /// connection, so the server dropped the request).
    ///
    /// When `gone` was cancelled while the claim ran (the client closed its connection), the
    /// claim's jobs are given back the same way and the answer is an empty list.
    async fn claim(
        &self,
        params: &mut ClaimParams,
        gone: &CancellationToken,
    ) -> Result<Vec<faultline_ports::domain::Job>, Problem> {
        let claim_id = lost::new_claim_id();
        params.claim_id = Some(claim_id);
        let mut in_flight = lost::InFlight::new(
            self.store.clone(),
            claim_id,
            Duration::from_millis(u64::try_from(params.lease_ms).unwrap_or(0)),
            self.config.request_timeout,
            params.worker_id.clone(),
        );
        let claimed = self.call("claim", self.store.job_claim(params)).await;
        match &claimed {
            // The answer is lost: `in_flight` gives back what the claim leased when dropped.
            Err(problem) if problem.status == 503 => {}
            Ok(jobs) if gone.is_cancelled() => {
                tracing::debug!(
                    jobs = jobs.len(),
                    worker_id = %params.worker_id,
                    "the client of a lease request left during its claim; giving the jobs back"
                );
                return Ok(Vec::new());
            }
            _ => in_flight.answered(),
        }
        claimed
    }
}

/// Groups of operations in the document.
#[derive(Tags)]
pub(crate) enum ApiTags {
    /// Submit, inspect, cancel and retry jobs.
    Jobs,
    /// Queues: statistics, pause and resume.
    Queues,
    /// The worker protocol: lease jobs, then heartbeat, complete, fail or snooze them with the
    /// lease token. Every write is fenced: a stale token changes nothing and gets 409 with the
    /// problem type `.../stale-lease`.
    Workers,
    /// The registered processes (workers and API servers) and the maintenance leader.
    Processes,
    /// Health of the service.
    Operations,
}

/// Success of `POST /v1/jobs`.
#[derive(ApiResponse)]
pub(crate) enum EnqueueResponse {
    /// A new job was created.
    #[oai(status = 201)]
    Created(
        Json<JobView>,
        /// The new job's URL.
        #[oai(header = "Location")]
        String,
    ),
    /// The idempotency key matched an existing job with the same request: this is that job, and
    /// nothing new was created.
    #[oai(status = 200)]
    Existing(Json<JobView>),
}

/// A job.
#[derive(ApiResponse)]
pub(crate) enum JobResponse {
    /// The job (after the action, for actions).
    #[oai(status = 200)]
    Ok(Json<JobView>),
}

/// Outcome of a batch enqueue.
#[derive(ApiResponse)]
pub(crate) enum BatchResponse {
    /// The batch was applied in one transaction: one result per item, in input order.
    #[oai(status = 200)]
    Ok(Json<BatchResult>),
}

/// A page of jobs.
#[derive(ApiResponse)]
pub(crate) enum PageResponse {
    /// The page, newest first.
    #[oai(status = 200)]
    Ok(Json<JobPage>),
}

/// Queue statistics.
#[derive(ApiResponse)]
pub(crate) enum QueuesResponse {
    /// Every queue that has a job or a row.
    #[oai(status = 200)]
    Ok(Json<QueueList>),
}

/// A queue's row.
#[derive(ApiResponse)]
pub(crate) enum QueueResponse {
    /// The queue after the action.
    #[oai(status = 200)]
    Ok(Json<QueueView>),
}

/// The registered processes.
#[derive(ApiResponse)]
pub(crate) enum WorkersResponse {
    /// Every registered process and the maintenance leader.
    #[oai(status = 200)]
    Ok(Json<WorkerList>),
}

/// Leased jobs.
#[derive(ApiResponse)]
pub(crate) enum LeaseResponse {
    /// The jobs now leased to the caller (possibly none).
    #[oai(status = 200)]
    Ok(Json<LeaseGrant>),
}

/// An extended lease.
#[derive(ApiResponse)]
pub(crate) enum HeartbeatResponse {
    /// The lease was extended.
    #[oai(status = 200)]
    Ok(Json<HeartbeatResult>),
}

/// Health.
#[derive(ApiResponse)]
pub(crate) enum HealthResponse {
    /// The database answers.
    #[oai(status = 200)]
    Ok(Json<Health>),
    /// The database does not answer; the body says what is down. The process stays up.
    #[oai(status = 503, header(name = "Retry-After", ty = "u64"))]
    Unavailable(Json<Health>),
}

fn page_size_default() -> u32 {
    100
}

/// Jobs: submit, read, list, cancel, retry.
pub(crate) struct JobsApi(pub(crate) Arc<Ctx>);

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Jobs")]
impl JobsApi {
    /// Enqueue a job
    ///
    /// Creates a job (201). With an idempotency key (body field `idempotency_key` or header
    /// `Idempotency-Key`), a repeat of the same request (same queue, kind and payload, compared
    /// as canonical JSON) returns the existing job (200) and a different request gets 409; any
    /// number of concurrent requests with one key create exactly one job. After a 503, retry with
    /// the same key: the job may already exist.
    #[oai(path = "/jobs", method = "post", operation_id = "enqueue_job")]
    async fn enqueue_job(
        &self,
        _auth: BearerAuth,
        /// Idempotency key; same meaning as the body field `idempotency_key` (set either, or
        /// both to the same value). Visible ASCII only, sent once: any other value is refused
        /// with 400 (use the body field for other characters).
        #[oai(name = "Idempotency-Key", validator(min_length = 1, max_length = 128))]
        idempotency_key: Header<Option<String>>,
        body: Json<NewJob>,
    ) -> Result<EnqueueResponse, EnqueueError> {
        let ctx = &self.0;
        let mut job = body.0;
        match (idempotency_key.0, &job.idempotency_key) {
            (Some(header), Some(field)) if header != field.0 => {
                return Err(Problem::invalid(
                    "the Idempotency-Key header and the idempotency_key field differ",
                )
                .into());
            }
            (Some(header), _) => job.idempotency_key = Some(Text(header)),
            (None, _) => {}
        }
        let spec = job.into_spec(ctx.config.max_payload_bytes)?;
        let enqueued = ctx.call("enqueue", ctx.store.job_enqueue(&spec)).await?;
        let job = enqueued.job;
        let labels = &ctx.config.metric_labels;
        if enqueued.created {
            telemetry::enqueued(labels, &job.queue, &job.kind);
        } else {
            telemetry::replayed(labels, &job.queue);
        }
        tracing::debug!(
            job_id = job.id,
            kind = %job.kind,
            attempt = job.attempts,
            fencing_token = job.fencing_token,
            created = enqueued.created,
            "enqueued over HTTP"
        );
        Ok(if enqueued.created {
            let location = format!("/v1/jobs/{}", job.id);
            EnqueueResponse::Created(Json(job.into()), location)
        } else {
            EnqueueResponse::Existing(Json(job.into()))
        })
    }

    /// Enqueue many jobs
    ///
    /// Enqueues up to 1000 jobs in one transaction, with a result per item in input order.
    /// Every item is validated first: if one is invalid, the whole batch is refused (422, or 413
    /// for an oversize payload; the detail names the item as `item <index>`) and nothing is
    /// created. Idempotency works per item as for a single enqueue, except that a conflicting
    /// key does not fail the request: that item's outcome is `conflict` and the others are
    /// applied. A key repeated within the batch resolves to its first item.
    #[oai(path = "/jobs/batch", method = "post", operation_id = "enqueue_jobs")]
    async fn enqueue_jobs(
        &self,
        _auth: BearerAuth,
        body: Json<NewJobBatch>,
    ) -> Result<BatchResponse, BatchError> {
        let ctx = &self.0;
        let mut specs = Vec::with_capacity(body.0.jobs.len());
        for (index, job) in body.0.jobs.into_iter().enumerate() {
            let spec = job
                .into_spec(ctx.config.max_payload_bytes)
                .map_err(|mut problem| {
                    problem.detail = format!("item {index}: {}", problem.detail);
                    problem
                })?;
            specs.push(spec);
        }
        let outcomes = ctx
            .call("enqueue_many", ctx.store.job_enqueue_many(&specs))
            .await?;
        let labels = &ctx.config.metric_labels;
        for (spec, outcome) in specs.iter().zip(&outcomes) {
            match outcome {
                EnqueueOutcome::Created { .. } => {
                    telemetry::enqueued(labels, &spec.queue, &spec.kind);
                }
                EnqueueOutcome::Existing { .. } => telemetry::replayed(labels, &spec.queue),
                EnqueueOutcome::Conflict { .. } => {}
            }
        }
        Ok(BatchResponse::Ok(Json(BatchResult {
            results: outcomes.into_iter().map(BatchItemResult::from).collect(),
        })))
    }

    /// List jobs
    ///
    /// Newest first, with keyset pagination: pass the response's `next_cursor` as `cursor` to get
    /// the next page (absent on the last page). Filters combine.
    #[oai(path = "/jobs", method = "get", operation_id = "list_jobs")]
    async fn list_jobs(
        &self,
        _auth: BearerAuth,
        /// Only this queue.
        #[oai(validator(min_length = 1, max_length = 128))]
        queue: Query<Option<String>>,
        /// Only this state.
        state: Query<Option<JobStateDto>>,
        /// Only this kind.
        #[oai(validator(min_length = 1, max_length = 128))]
        kind: Query<Option<String>>,
        /// Page size.
        #[oai(
            default = "page_size_default",
            validator(minimum(value = "1"), maximum(value = "1000"))
        )]
        limit: Query<u32>,
        /// Only jobs older than this one: the `next_cursor` of the previous page.
        cursor: Query<Option<i64>>,
    ) -> Result<PageResponse, ListError> {
        let ctx = &self.0;
        let params = ListParams {
            queue: queue.0,
            state: state.0.map(Into::into),
            kind: kind.0,
            limit: limit.0,
            before_id: cursor.0,
        };
        params.validate().map_err(Problem::from)?;
        let page = ctx.call("list", ctx.store.job_list(&params)).await?;
        Ok(PageResponse::Ok(Json(JobPage {
            jobs: page.jobs.into_iter().map(Into::into).collect(),
            next_cursor: page.next_cursor,
        })))
    }

    /// Get a job
    #[oai(path = "/jobs/:id", method = "get", operation_id = "get_job")]
    async fn get_job(
        &self,
        _auth: BearerAuth,
        /// The job's id.
        id: Path<i64>,
    ) -> Result<JobResponse, ReadError> {
        let ctx = &self.0;
        let job = ctx.call("get", ctx.store.job_get(id.0)).await?;
        Ok(JobResponse::Ok(Json(job.into())))
    }

    /// Cancel a job
    ///
    /// A queued job ends `cancelled` at once. A running job is marked (`cancel_requested`): its
    /// worker learns it at its next heartbeat, and the job ends `cancelled` instead of being
    /// retried (a completion that arrives first still counts). A finished job: 409
    /// (`.../illegal-transition`). Cancelling a running job twice is harmless.
    #[oai(
        path = "/jobs/:id/cancel",
        method = "post",
        operation_id = "cancel_job"
    )]
    async fn cancel_job(
        &self,
        _auth: BearerAuth,
        /// The job's id.
        id: Path<i64>,
    ) -> Result<JobResponse, ActionError> {
        let ctx = &self.0;
        let job = ctx.call("cancel", ctx.store.job_cancel(id.0)).await?;
        telemetry::changed(&ctx.config.metric_labels, &job, false);
        tracing::info!(
            job_id = job.id,
            kind = %job.kind,
            attempt = job.attempts,
            fencing_token = job.fencing_token,
            state = %job.state,
            "job cancelled over HTTP"
        );
        Ok(JobResponse::Ok(Json(job.into())))
    }

    /// Retry a job
    ///
    /// Queues a `failed` or `cancelled` job again, due now, with a fresh attempt budget:
    /// `attempts` restarts at 0 (the next lease is attempt 1 of `max_attempts`), `last_error` is
    /// kept, and the fencing token keeps counting, so leases from before stay stale. Any other
    /// state: 409 (`.../illegal-transition`).
    #[oai(path = "/jobs/:id/retry", method = "post", operation_id = "retry_job")]
    async fn retry_job(
        &self,
        _auth: BearerAuth,
        /// The job's id.
        id: Path<i64>,
    ) -> Result<JobResponse, ActionError> {
        let ctx = &self.0;
        let job = ctx.call("redrive", ctx.store.job_redrive(id.0)).await?;
        tracing::info!(
            job_id = job.id,
            kind = %job.kind,
            attempt = job.attempts,
            fencing_token = job.fencing_token,
            "job retried over HTTP"
        );
        Ok(JobResponse::Ok(Json(job.into())))
    }

    /// Expire a job's lease now
    ///
    /// An operator action for a lease whose holder vanished (e.g. a client that leased for a
    /// long time and died): ends the running job's lease at once, exactly as the rescue of an
    /// expired lease does. The attempt counts as failed (an `errors` entry of kind
    /// `lease_expired`); the job is queued again after its backoff, ends `failed` when its
    /// attempts are spent, or `cancelled` when a cancel was requested. The holder's lease token
    /// is stale from then on: its heartbeat and writes get 409 (`.../stale-lease`). A job that is
    /// not `running`: 409 (`.../illegal-transition`).
    #[oai(
        path = "/jobs/:id/expire-lease",
        method = "post",
        operation_id = "expire_job_lease"
    )]
    async fn expire_job_lease(
        &self,
        _auth: BearerAuth,
        /// The job's id.
        id: Path<i64>,
    ) -> Result<JobResponse, ActionError> {
        let ctx = &self.0;
        let job = ctx
            .call("expire_lease", ctx.store.job_expire_lease(id.0))
            .await?;
        telemetry::changed(&ctx.config.metric_labels, &job, true);
        tracing::info!(
            job_id = job.id,
            kind = %job.kind,
            attempt = job.attempts,
            fencing_token = job.fencing_token,
            state = %job.state,
            "lease expired by an operator over HTTP"
        );
        Ok(JobResponse::Ok(Json(job.into())))
    }
}

/// Queues: statistics, pause and resume.
pub(crate) struct QueuesApi(pub(crate) Arc<Ctx>);

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Queues")]
impl QueuesApi {
    /// List queues
    ///
    /// Per queue that has a job or a row (a queue gets its row with its first job, or when it is
    /// paused, resumed or given limits): the number of jobs in each state, the age of the oldest
    /// job that is due but not yet leased, whether the queue is paused, and its `max_running`
    /// bound with the slots free under it. Sorted by name.
    #[oai(path = "/queues", method = "get", operation_id = "list_queues")]
    async fn list_queues(&self, _auth: BearerAuth) -> Result<QueuesResponse, StatsError> {
        let ctx = &self.0;
        let (stats, rows) = tokio::try_join!(
            ctx.call("queue_stats", ctx.store.queue_stats()),
            ctx.call("queue_list", ctx.store.queue_list()),
        )?;
        Ok(QueuesResponse::Ok(Json(QueueList {
            queues: QueueSummary::merge(stats, rows, Utc::now()),
        })))
    }

    /// Pause a queue
    ///
    /// From the moment this answers, no worker and no lease request claims the queue's jobs
    /// (leases granted before run to their end); enqueues still succeed and the jobs wait.
    /// Pausing a paused queue changes nothing; a queue that has no row yet (no job ever) gets
    /// one, paused.
    #[oai(
        path = "/queues/:name/pause",
        method = "post",
        operation_id = "pause_queue"
    )]
    async fn pause_queue(
        &self,
        _auth: BearerAuth,
        /// The queue's name (percent-encoded in the path).
        #[oai(validator(min_length = 1, max_length = 128))]
        name: Path<String>,
    ) -> Result<QueueResponse, QueueActionError> {
        set_paused(&self.0, &name.0, true).await
    }

    /// Resume a queue
    ///
    /// Its due jobs are claimable again at once (waiting lease requests are woken). Resuming a
    /// queue that is not paused changes nothing; a queue that has no row yet gets one.
    #[oai(
        path = "/queues/:name/resume",
        method = "post",
        operation_id = "resume_queue"
    )]
    async fn resume_queue(
        &self,
        _auth: BearerAuth,
        /// The queue's name (percent-encoded in the path).
        #[oai(validator(min_length = 1, max_length = 128))]
        name: Path<String>,
    ) -> Result<QueueResponse, QueueActionError> {
        set_paused(&self.0, &name.0, false).await
    }

    /// Set a queue's limits
    ///
    /// Replaces the queue's flow-control limits with the ones given (an absent or null limit is
    /// removed). `max_running` bounds the queue's running jobs across every worker and lease
    /// request: the database counts them inside each claim, under a lock on the queue's row, so
    /// concurrent claims never exceed it. It applies to every claim that starts after this
    /// answers; jobs already running are never stopped by a lower bound. A job held back stays
    /// `queued`, spends no attempt, and is leased as soon as a running job of the queue ends
    /// (waiting workers and lease requests are woken then). A queue that has no row yet gets one.
    #[oai(
        path = "/queues/:name/limits",
        method = "put",
        operation_id = "set_queue_limits"
    )]
    async fn set_queue_limits(
        &self,
        _auth: BearerAuth,
        /// The queue's name (percent-encoded in the path).
        #[oai(validator(min_length = 1, max_length = 128))]
        name: Path<String>,
        body: Json<QueueLimitsBody>,
    ) -> Result<QueueResponse, QueueLimitsError> {
        let ctx = &self.0;
        validate_queue_name(&name.0).map_err(Problem::from)?;
        let limits = QueueLimits {
            max_running: body.0.max_running,
        };
        let queue = ctx
            .call(
                "queue_set_limits",
                ctx.store.queue_set_limits(&name.0, &limits),
            )
            .await?;
        tracing::info!(queue = %queue.name, max_running = ?queue.max_running, "queue limits set over HTTP");
        Ok(QueueResponse::Ok(Json(queue.into())))
    }
}

/// Pauses or resumes the queue `name` (checked first) for the two queue actions.
async fn set_paused(
    ctx: &Ctx,
    name: &str,
    paused: bool,
) -> Result<QueueResponse, QueueActionError> {
    validate_queue_name(name).map_err(Problem::from)?;
    let queue = if paused {
        ctx.call("queue_pause", ctx.store.queue_pause(name)).await?
    } else {
        ctx.call("queue_resume", ctx.store.queue_resume(name))
            .await?
    };
    let action = if paused { "paused" } else { "resumed" };
    tracing::info!(queue = %queue.name, action, "queue {action} over HTTP");
    Ok(QueueResponse::Ok(Json(queue.into())))
}

/// The registered processes.
pub(crate) struct ProcessesApi(pub(crate) Arc<Ctx>);

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Processes")]
impl ProcessesApi {
    /// List workers
    ///
    /// Every registered process (workers, API servers, `dev`), sorted by id, with the queues and
    /// slots it claims and when it was last seen, and the maintenance leadership: the process
    /// that holds it unexpired has `leader: true`.
    #[oai(path = "/workers", method = "get", operation_id = "list_workers")]
    async fn list_workers(&self, _auth: BearerAuth) -> Result<WorkersResponse, ProcessListError> {
        let ctx = &self.0;
        let (processes, leader) = tokio::try_join!(
            ctx.call("process_list", ctx.store.process_list()),
            ctx.call("leader_get", ctx.store.leader_get()),
        )?;
        Ok(WorkersResponse::Ok(Json(WorkerList::new(
            processes, leader,
        ))))
    }
}

/// The worker protocol.
pub(crate) struct WorkersApi(pub(crate) Arc<Ctx>);

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Workers")]
impl WorkersApi {
    /// Lease jobs
    ///
    /// Leases up to `limit` due jobs of the given queues (and kinds), by priority, then due time,
    /// then id. Each lease is a new attempt with a new `lease_token` (fencing token) and ends at
    /// `lease_expires_at` unless extended by a heartbeat; a lease that runs out counts as a
    /// failed attempt and the job is retried with backoff. With `wait_seconds`, the request
    /// waits (at most 30 s) until a job is due, woken by new jobs, and otherwise answers with an
    /// empty list. A 503 costs no attempt: jobs its claim leased anyway (committed after the
    /// timeout, or before a broken connection) are given back, attempt returned. A client that
    /// closes its connection (or its sending side) during the wait ends it: nothing more is
    /// leased for it, and jobs a claim leased at that moment are given back the same way.
    #[oai(path = "/leases", method = "post", operation_id = "lease_jobs")]
    async fn lease_jobs(
        &self,
        _auth: BearerAuth,
        http: &poem::Request,
        body: Json<LeaseRequest>,
    ) -> Result<LeaseResponse, ClaimError> {
        let ctx = &self.0;
        let request = body.0;
        // Never cancelled for a request that did not come over a served connection.
        let gone = conn::client_gone(http.local_addr(), http.remote_addr()).unwrap_or_default();
        let mut params = ClaimParams {
            queues: request.queues.into_iter().map(String::from).collect(),
            kinds: request.kinds.into_iter().map(String::from).collect(),
            limit: request.limit,
            lease_ms: seconds_to_ms("lease_seconds", request.lease_seconds)?,
            worker_id: request.worker_id.0,
            claim_id: None,
        };
        params.validate().map_err(Problem::from)?;
        let wait = Duration::from_secs_f64(request.wait_seconds.clamp(0.0, MAX_WAIT_SECONDS));
        let deadline = Instant::now() + wait;
        let mut wake = ctx.wake.clone();
        let mut wake_open = true;
        loop {
            // Mark the current wake-up as seen before claiming, so that a job enqueued between
            // the claim and the wait still wakes us.
            wake.borrow_and_update();
            let jobs = if gone.is_cancelled() {
                Vec::new()
            } else {
                ctx.claim(&mut params, &gone).await?
            };
            if !jobs.is_empty()
                || gone.is_cancelled()
                || Instant::now() >= deadline
                || ctx.shutdown.is_cancelled()
            {
                for job in &jobs {
                    telemetry::claimed(&ctx.config.metric_labels, job);
                    tracing::debug!(
                        job_id = job.id,
                        kind = %job.kind,
                        attempt = job.attempts,
                        fencing_token = job.fencing_token,
                        worker_id = %params.worker_id,
                        "leased over HTTP"
                    );
                }
                return Ok(LeaseResponse::Ok(Json(LeaseGrant {
                    jobs: jobs.into_iter().map(LeasedJob::new).collect(),
                })));
            }
            // Jobs that become due by the clock (scheduled, retried, snoozed) send no wake-up:
            // claim again at least every poll interval.
            let next_poll = deadline.min(Instant::now() + ctx.config.lease_poll_interval);
            tokio::select! {
                () = ctx.shutdown.cancelled() => {
                    return Ok(LeaseResponse::Ok(Json(LeaseGrant { jobs: Vec::new() })));
                }
                () = gone.cancelled() => {
                    tracing::debug!(
                        worker_id = %params.worker_id,
                        "the client of a long poll closed its connection; ending the wait"
                    );
                    return Ok(LeaseResponse::Ok(Json(LeaseGrant { jobs: Vec::new() })));
                }
                () = tokio::time::sleep_until(next_poll) => {}
                changed = wake.changed(), if wake_open => {
                    // The wake-up source is gone: keep polling.
                    wake_open = changed.is_ok();
                }
            }
        }
    }

    /// Heartbeat
    ///
    /// Extends the lease to `extend_seconds` from now (database clock) and says whether someone
    /// asked to cancel the job. A lease past its end that no rescue has ended yet still holds and
    /// is extended again (as complete, fail and snooze still apply to it). A stale token (the
    /// lease was rescued, expired by an operator or taken over, or the job finished or does not
    /// exist): 409 `.../stale-lease`; stop working on the job.
    #[oai(
        path = "/jobs/:id/heartbeat",
        method = "post",
        operation_id = "heartbeat_job"
    )]
    async fn heartbeat_job(
        &self,
        _auth: BearerAuth,
        /// The job's id.
        id: Path<i64>,
        body: Json<HeartbeatRequest>,
    ) -> Result<HeartbeatResponse, LeaseError> {
        let ctx = &self.0;
        let lease = LeaseRef {
            job_id: id.0,
            token: body.0.lease_token,
        };
        let extend_ms = seconds_to_ms("extend_seconds", body.0.extend_seconds)?;
        validate_extend_ms(extend_ms).map_err(Problem::from)?;
        let outcomes = ctx
            .call(
                "heartbeat",
                ctx.store.job_heartbeat_many(&[lease], extend_ms),
            )
            .await?;
        match outcomes.into_iter().next().and_then(HeartbeatResult::new) {
            Some(result) => Ok(HeartbeatResponse::Ok(Json(result))),
            None => {
                telemetry::stale("heartbeat");
                Err(StoreError::StaleLease { lease }.into())
            }
        }
    }

    /// Complete
    ///
    /// Records success with an optional `result` (kept on the job). A stale token: 409
    /// `.../stale-lease` and nothing changes (another attempt owns the job now).
    #[oai(
        path = "/jobs/:id/complete",
        method = "post",
        operation_id = "complete_job"
    )]
    async fn complete_job(
        &self,
        _auth: BearerAuth,
        /// The job's id.
        id: Path<i64>,
        body: Json<CompleteRequest>,
    ) -> Result<JobResponse, LeaseError> {
        let ctx = &self.0;
        let request = body.0;
        let lease = LeaseRef {
            job_id: id.0,
            token: request.lease_token,
        };
        if let Some(result) = &request.result {
            check_json_size("result", result, ctx.config.max_payload_bytes)?;
        }
        validate_result(request.result.as_ref()).map_err(Problem::from)?;
        let job = ctx
            .call("complete", ctx.store.job_complete(lease, request.result))
            .await?;
        telemetry::changed(&ctx.config.metric_labels, &job, false);
        tracing::debug!(
            job_id = job.id,
            kind = %job.kind,
            attempt = job.attempts,
            fencing_token = job.fencing_token,
            "completed over HTTP"
        );
        Ok(JobResponse::Ok(Json(job.into())))
    }

    /// Fail
    ///
    /// Records a failed attempt. Retryable (the default): the job is queued again after
    /// `retry_after_seconds` (or its backoff) while attempts remain, else it ends `failed`; a
    /// job whose cancel was requested ends `cancelled`. Not retryable: it ends `failed` now. A
    /// stale token: 409 `.../stale-lease`.
    #[oai(path = "/jobs/:id/fail", method = "post", operation_id = "fail_job")]
    async fn fail_job(
        &self,
        _auth: BearerAuth,
        /// The job's id.
        id: Path<i64>,
        body: Json<FailRequest>,
    ) -> Result<JobResponse, LeaseError> {
        let ctx = &self.0;
        let request = body.0;
        let lease = LeaseRef {
            job_id: id.0,
            token: request.lease_token,
        };
        let failure = Failure {
            error: Limits::storable_text(&truncate_chars(&request.error.0, MAX_ERROR_CHARS)),
            kind: FailureKind::Error,
            retryable: request.retryable,
            retry_delay_ms: request
                .retry_after_seconds
                .map(|s| seconds_to_ms("retry_after_seconds", s))
                .transpose()?,
        };
        failure.validate().map_err(Problem::from)?;
        let job = ctx
            .call("fail", ctx.store.job_fail(lease, &failure))
            .await?;
        telemetry::changed(&ctx.config.metric_labels, &job, true);
        tracing::debug!(
            job_id = job.id,
            kind = %job.kind,
            attempt = job.attempts,
            fencing_token = job.fencing_token,
            state = %job.state,
            "failure reported over HTTP"
        );
        Ok(JobResponse::Ok(Json(job.into())))
    }

    /// Snooze
    ///
    /// Puts the job back, due after `delay_seconds`, without using up its attempt (`attempts` is
    /// decremented). A job whose cancel was requested ends `cancelled` instead. A stale token:
    /// 409 `.../stale-lease`.
    #[oai(
        path = "/jobs/:id/snooze",
        method = "post",
        operation_id = "snooze_job"
    )]
    async fn snooze_job(
        &self,
        _auth: BearerAuth,
        /// The job's id.
        id: Path<i64>,
        body: Json<SnoozeRequest>,
    ) -> Result<JobResponse, LeaseError> {
        let ctx = &self.0;
        let lease = LeaseRef {
            job_id: id.0,
            token: body.0.lease_token,
        };
        let delay_ms = seconds_to_ms("delay_seconds", body.0.delay_seconds)?;
        validate_snooze_ms(delay_ms).map_err(Problem::from)?;
        let job = ctx
            .call("snooze", ctx.store.job_snooze(lease, delay_ms))
            .await?;
        telemetry::changed(&ctx.config.metric_labels, &job, false);
        Ok(JobResponse::Ok(Json(job.into())))
    }
}

/// `text` cut to at most `max` characters.
fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => text[..end].to_owned(),
        None => text.to_owned(),
    }
}

/// Health.
pub(crate) struct HealthApi(pub(crate) Arc<Ctx>);

#[OpenApi(tag = "ApiTags::Operations")]
impl HealthApi {
    /// Health
    ///
    /// 200 when the database answers, 503 (with what is down) when it does not or does not
    /// answer within the request timeout. Needs no token.
    #[oai(path = "/health", method = "get", operation_id = "health")]
    async fn health(&self) -> HealthResponse {
        let ctx = &self.0;
        let outcome = tokio::time::timeout(ctx.config.request_timeout, ctx.health.ping()).await;
        let detail = match outcome {
            Ok(Ok(())) => {
                return HealthResponse::Ok(Json(Health {
                    status: HealthStatus::Ok,
                    database: ComponentStatus::Up,
                    detail: None,
                }));
            }
            Ok(Err(detail)) => detail,
            Err(_) => format!(
                "the database did not answer within {} s",
                ctx.config.request_timeout.as_secs_f64()
            ),
        };
        HealthResponse::Unavailable(Json(Health {
            status: HealthStatus::Unavailable,
            database: ComponentStatus::Down,
            detail: Some(detail),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(truncate_chars("héllo", 2), "hé");
        assert_eq!(truncate_chars("héllo", 5), "héllo");
        assert_eq!(truncate_chars("héllo", 50), "héllo");
        assert_eq!(truncate_chars("", 0), "");
    }
}
