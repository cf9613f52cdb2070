//! Shared helpers of the HTTP tests: an app over the in-memory store driven by poem's test client,
//! a store wrapper that fails or hangs on demand, and problem assertions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use chrono::{DateTime, TimeDelta, Utc};
use faultline_http::{ApiConfig, HealthCheck, PROBLEM_CONTENT_TYPE, StoreHealth};
use faultline_memory::MemoryStore;
use faultline_ports::domain::{Job, JobSpec};
use faultline_ports::{
    ClaimParams, ElectParams, EnqueueOutcome, Enqueued, FailOutcome, Failure, HeartbeatOutcome,
    JobPage, JobStore, Leadership, LeaseRef, ListParams, ManualClock, ProcessInfo, ProcessSpec,
    PruneParams, QueueBacklog, QueueInfo, QueueLimits, QueueStats, StoreError, StoreResult,
    WriteOutcome,
};
use poem::endpoint::BoxEndpoint;
use poem::http::{HeaderMap, Method, StatusCode};
use poem::test::{TestClient, TestRequestBuilder};
use poem::{EndpointExt, Response};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What a request got back.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) text: String,
    /// The body as JSON (`Null` when it is not JSON).
    pub(crate) json: Value,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an RFC 9457 problem with this status and type; returns its detail.
    #[track_caller]
    pub(crate) fn assert_problem(&self, status: u16, problem_type: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with(PROBLEM_CONTENT_TYPE),
            "content type {content_type:?}: {self:?}"
        );
        assert_eq!(self.json["status"], status, "{self:?}");
        assert_eq!(self.json["type"], problem_type, "{self:?}");
        assert!(
            self.json["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{self:?}"
        );
        let detail = self.json["detail"].as_str().expect("a detail");
        assert!(!detail.is_empty(), "{self:?}");
        detail.to_owned()
    }

    #[track_caller]
    pub(crate) fn assert_status(&self, status: u16) -> &Value {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        &self.json
    }
}

/// How a [`FaultyStore`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Mode {
    /// Pass every call to the inner store.
    Pass = 0,
    /// Answer every call with a backend error.
    Fail = 1,
    /// Never answer.
    Hang = 2,
    /// Claims apply in the inner store but never answer (a claim that commits after its caller
    /// timed out); every other call passes.
    LoseClaimAnswers = 3,
    /// Claims apply in the inner store, then answer a backend error (the connection broke after
    /// the commit); every other call passes.
    FailAfterClaims = 4,
    /// Claims never answer, and apply in the inner store only once
    /// [`FaultyStore::commit_late_claims`] is called, whether or not their caller still waits (a
    /// claim stuck behind a lock that commits after its caller gave up); every other call passes.
    LateClaims = 5,
}

/// A store that passes calls to an in-memory store, or fails or hangs on demand, and counts claims.
pub(crate) struct FaultyStore {
    pub(crate) inner: MemoryStore,
    mode: AtomicU8,
    claims: watch::Sender<u64>,
    releases: watch::Sender<u64>,
    late_claims: Arc<tokio::sync::Semaphore>,
}

/// The backend error message, which must never reach a client.
pub(crate) const SECRET_BACKEND_MESSAGE: &str = "connection to db.internal:5432 refused";

impl FaultyStore {
    pub(crate) fn new(inner: MemoryStore) -> Self {
        FaultyStore {
            inner,
            mode: AtomicU8::new(Mode::Pass as u8),
            claims: watch::channel(0).0,
            releases: watch::channel(0).0,
            late_claims: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }

    pub(crate) fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Changes after every claim call (the value counts them).
    pub(crate) fn claims(&self) -> watch::Receiver<u64> {
        self.claims.subscribe()
    }

    /// Changes after every `job_release_claim` call (the value counts them).
    pub(crate) fn releases(&self) -> watch::Receiver<u64> {
        self.releases.subscribe()
    }

    /// Lets the claims held back by [`Mode::LateClaims`] apply.
    pub(crate) fn commit_late_claims(&self) {
        self.late_claims.add_permits(1_000);
    }

    async fn gate(&self) -> StoreResult<()> {
        match self.mode.load(Ordering::SeqCst) {
            0 | 3..=5 => Ok(()),
            1 => Err(StoreError::Backend(SECRET_BACKEND_MESSAGE.into())),
            _ => std::future::pending().await,
        }
    }
}

#[async_trait::async_trait]
impl JobStore for FaultyStore {
    async fn job_enqueue(&self, spec: &JobSpec) -> StoreResult<Enqueued> {
        self.gate().await?;
        self.inner.job_enqueue(spec).await
    }
    async fn job_enqueue_many(&self, specs: &[JobSpec]) -> StoreResult<Vec<EnqueueOutcome>> {
        self.gate().await?;
        self.inner.job_enqueue_many(specs).await
    }
    async fn job_claim(&self, params: &ClaimParams) -> StoreResult<Vec<Job>> {
        self.gate().await?;
        if self.mode.load(Ordering::SeqCst) == Mode::LateClaims as u8 {
            let (inner, params, gate) =
                (self.inner.clone(), params.clone(), self.late_claims.clone());
            tokio::spawn(async move {
                let _permit = gate.acquire().await;
                let _ = inner.job_claim(&params).await;
            });
            return std::future::pending().await;
        }
        let jobs = self.inner.job_claim(params).await;
        self.claims.send_modify(|n| *n += 1);
        match self.mode.load(Ordering::SeqCst) {
            3 => std::future::pending().await,
            4 => Err(StoreError::Backend(SECRET_BACKEND_MESSAGE.into())),
            _ => jobs,
        }
    }
    async fn job_release_claim(&self, claim_id: i64) -> StoreResult<u64> {
        self.gate().await?;
        let released = self.inner.job_release_claim(claim_id).await;
        self.releases.send_modify(|n| *n += 1);
        released
    }
    async fn job_heartbeat_many(
        &self,
        leases: &[LeaseRef],
        extend_ms: i64,
    ) -> StoreResult<Vec<HeartbeatOutcome>> {
        self.gate().await?;
        self.inner.job_heartbeat_many(leases, extend_ms).await
    }
    async fn job_complete(&self, lease: LeaseRef, result: Option<Value>) -> StoreResult<Job> {
        self.gate().await?;
        self.inner.job_complete(lease, result).await
    }
    async fn job_complete_many(
        &self,
        completions: &[(LeaseRef, Option<Value>)],
    ) -> StoreResult<Vec<WriteOutcome>> {
        self.gate().await?;
        self.inner.job_complete_many(completions).await
    }
    async fn job_fail(&self, lease: LeaseRef, failure: &Failure) -> StoreResult<Job> {
        self.gate().await?;
        self.inner.job_fail(lease, failure).await
    }
    async fn job_snooze(&self, lease: LeaseRef, delay_ms: i64) -> StoreResult<Job> {
        self.gate().await?;
        self.inner.job_snooze(lease, delay_ms).await
    }
    async fn job_cancel(&self, id: i64) -> StoreResult<Job> {
        self.gate().await?;
        self.inner.job_cancel(id).await
    }
    async fn job_redrive(&self, id: i64) -> StoreResult<Job> {
        self.gate().await?;
        self.inner.job_redrive(id).await
    }
    async fn job_rescue_expired(&self, limit: u32) -> StoreResult<Vec<Job>> {
        self.gate().await?;
        self.inner.job_rescue_expired(limit).await
    }
    async fn job_expire_lease(&self, id: i64) -> StoreResult<Job> {
        self.gate().await?;
        self.inner.job_expire_lease(id).await
    }
    async fn job_get(&self, id: i64) -> StoreResult<Job> {
        self.gate().await?;
        self.inner.job_get(id).await
    }
    async fn job_list(&self, params: &ListParams) -> StoreResult<JobPage> {
        self.gate().await?;
        self.inner.job_list(params).await
    }
    async fn queue_stats(&self) -> StoreResult<Vec<QueueStats>> {
        self.gate().await?;
        self.inner.queue_stats().await
    }
    async fn queue_backlog(&self) -> StoreResult<Vec<QueueBacklog>> {
        self.gate().await?;
        self.inner.queue_backlog().await
    }
    async fn job_prune(&self, params: &PruneParams) -> StoreResult<u64> {
        self.gate().await?;
        self.inner.job_prune(params).await
    }
    async fn job_fail_many(
        &self,
        failures: &[(LeaseRef, Failure)],
    ) -> StoreResult<Vec<FailOutcome>> {
        self.gate().await?;
        self.inner.job_fail_many(failures).await
    }
    async fn queue_list(&self) -> StoreResult<Vec<QueueInfo>> {
        self.gate().await?;
        self.inner.queue_list().await
    }
    async fn queue_pause(&self, name: &str) -> StoreResult<QueueInfo> {
        self.gate().await?;
        self.inner.queue_pause(name).await
    }
    async fn queue_resume(&self, name: &str) -> StoreResult<QueueInfo> {
        self.gate().await?;
        self.inner.queue_resume(name).await
    }
    async fn queue_set_limits(&self, name: &str, limits: &QueueLimits) -> StoreResult<QueueInfo> {
        self.gate().await?;
        self.inner.queue_set_limits(name, limits).await
    }
    async fn leader_elect(&self, params: &ElectParams) -> StoreResult<Leadership> {
        self.gate().await?;
        self.inner.leader_elect(params).await
    }
    async fn leader_resign(&self, leader_id: &str, term: i64) -> StoreResult<bool> {
        self.gate().await?;
        self.inner.leader_resign(leader_id, term).await
    }
    async fn leader_get(&self) -> StoreResult<Option<Leadership>> {
        self.gate().await?;
        self.inner.leader_get().await
    }
    async fn process_register(&self, spec: &ProcessSpec) -> StoreResult<ProcessInfo> {
        self.gate().await?;
        self.inner.process_register(spec).await
    }
    async fn process_remove(&self, id: &str) -> StoreResult<bool> {
        self.gate().await?;
        self.inner.process_remove(id).await
    }
    async fn process_list(&self) -> StoreResult<Vec<ProcessInfo>> {
        self.gate().await?;
        self.inner.process_list().await
    }
    async fn process_prune(&self, older_than_ms: i64) -> StoreResult<u64> {
        self.gate().await?;
        self.inner.process_prune(older_than_ms).await
    }
}

/// A health check that answers what it is told.
pub(crate) struct FixedHealth(pub(crate) Result<(), String>);

#[async_trait::async_trait]
impl HealthCheck for FixedHealth {
    async fn ping(&self) -> Result<(), String> {
        self.0.clone()
    }
}

/// The app over a [`FaultyStore`] on an in-memory store with a manual clock, driven by poem's
/// test client.
pub(crate) struct Harness {
    pub(crate) store: Arc<FaultyStore>,
    pub(crate) clock: ManualClock,
    pub(crate) shutdown: CancellationToken,
    /// Bump to wake long-polling lease requests.
    pub(crate) wake: watch::Sender<u64>,
    client: TestClient<BoxEndpoint<'static, Response>>,
    token: Option<String>,
}

/// The manual clock's start: a fixed instant close to the real now (queue ages are measured
/// against the API server's clock).
fn start() -> DateTime<Utc> {
    Utc::now() - TimeDelta::seconds(60)
}

impl Harness {
    pub(crate) fn new() -> Harness {
        Harness::with_config(ApiConfig::default())
    }

    pub(crate) fn with_config(config: ApiConfig) -> Harness {
        let clock = ManualClock::new(start());
        let store = Arc::new(FaultyStore::new(MemoryStore::new(Arc::new(clock.clone()))));
        Harness::over(store, clock, config, StoreHealthOf::Store)
    }

    pub(crate) fn with_health(config: ApiConfig, health: FixedHealth) -> Harness {
        let clock = ManualClock::new(start());
        let store = Arc::new(FaultyStore::new(MemoryStore::new(Arc::new(clock.clone()))));
        Harness::over(store, clock, config, StoreHealthOf::Fixed(health))
    }

    fn over(
        store: Arc<FaultyStore>,
        clock: ManualClock,
        config: ApiConfig,
        health: StoreHealthOf,
    ) -> Harness {
        let shutdown = CancellationToken::new();
        let (wake, wake_rx) = watch::channel(0);
        let token = config.api_tokens.first().cloned();
        let app = match health {
            StoreHealthOf::Store => faultline_http::app(
                store.clone(),
                wake_rx,
                StoreHealth::new(store.clone()),
                config,
                shutdown.clone(),
            )
            .boxed(),
            StoreHealthOf::Fixed(health) => {
                faultline_http::app(store.clone(), wake_rx, health, config, shutdown.clone())
                    .boxed()
            }
        };
        Harness {
            store,
            clock,
            shutdown,
            wake,
            client: TestClient::new(app),
            token,
        }
    }

    /// A request with the harness's token (if any).
    pub(crate) fn request(
        &self,
        method: Method,
        path: &str,
    ) -> TestRequestBuilder<'_, BoxEndpoint<'static, Response>> {
        let builder = match method {
            Method::GET => self.client.get(path),
            Method::POST => self.client.post(path),
            Method::PUT => self.client.put(path),
            Method::DELETE => self.client.delete(path),
            Method::PATCH => self.client.patch(path),
            other => panic!("unsupported method {other}"),
        };
        match &self.token {
            Some(token) => builder.header("authorization", format!("Bearer {token}")),
            None => builder,
        }
    }

    /// A request without any token.
    pub(crate) fn anonymous(
        &self,
        method: Method,
        path: &str,
    ) -> TestRequestBuilder<'_, BoxEndpoint<'static, Response>> {
        match method {
            Method::GET => self.client.get(path),
            Method::POST => self.client.post(path),
            other => panic!("unsupported method {other}"),
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Reply {
        send(self.request(Method::GET, path)).await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Reply {
        send(self.request(Method::POST, path).body_json(&body)).await
    }

    pub(crate) async fn post_empty(&self, path: &str) -> Reply {
        send(self.request(Method::POST, path)).await
    }

    /// Enqueues through the API; returns the job.
    pub(crate) async fn enqueue(&self, body: Value) -> Value {
        let reply = self.post("/v1/jobs", body).await;
        reply.assert_status(201).clone()
    }

    /// Leases exactly one job of `queue` through the API; returns the leased job.
    pub(crate) async fn lease_one(&self, queue: &str) -> Value {
        let reply = self
            .post(
                "/v1/leases",
                serde_json::json!({"worker_id": "w1", "queues": [queue], "lease_seconds": 30}),
            )
            .await;
        let jobs = reply.assert_status(200)["jobs"]
            .as_array()
            .expect("jobs")
            .clone();
        assert_eq!(jobs.len(), 1, "{reply:?}");
        jobs[0].clone()
    }
}

enum StoreHealthOf {
    Store,
    Fixed(FixedHealth),
}

/// Sends a request and reads the whole reply.
pub(crate) async fn send(builder: TestRequestBuilder<'_, BoxEndpoint<'static, Response>>) -> Reply {
    let mut response = builder.send().await.0;
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .take_body()
        .into_bytes()
        .await
        .expect("a readable body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        text,
        json,
    }
}

/// Parses an RFC 3339 instant from a JSON string.
#[track_caller]
pub(crate) fn instant(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().expect("an RFC 3339 string"))
        .expect("an RFC 3339 string")
        .with_timezone(&Utc)
}

/// How many jobs the store holds, in any state.
pub(crate) async fn job_count(store: &MemoryStore) -> i64 {
    let stats = store.queue_stats().await.expect("stats");
    stats
        .iter()
        .flat_map(|q| q.counts.iter().map(|(_, n)| *n))
        .sum()
}
