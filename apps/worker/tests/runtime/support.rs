//! Shared helpers of the runtime tests: handlers from closures, gates, clocks, stores, configs
//! and a deadline-bounded `eventually`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, TimeDelta, TimeZone, Utc};
use faultline_memory::MemoryStore;
use faultline_ports::domain::{Job, JobSpec, JobState};
use faultline_ports::{Clock, JobStore, ManualClock, ProcessSpec, QueueSlots, StoreError};
use faultline_worker::{Handler, JobContext, MaintenanceConfig, Outcome, WorkerConfig};
use serde_json::json;
use tokio::sync::watch;

/// Where every manual clock starts.
pub(crate) fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

/// A handler made of a closure, with an optional default timeout.
pub(crate) struct FnHandler<F> {
    f: F,
    timeout: Option<Duration>,
}

/// A handler that runs `f`.
pub(crate) fn handler<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    FnHandler { f, timeout: None }
}

impl<F> FnHandler<F> {
    /// Sets the kind's default timeout.
    pub(crate) fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

#[async_trait::async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    async fn run(&self, ctx: JobContext) -> Outcome {
        (self.f)(ctx).await
    }

    fn timeout(&self) -> Option<Duration> {
        self.timeout
    }
}

/// A success without result.
pub(crate) fn done() -> Outcome {
    Outcome::Complete(None)
}

/// A gate handlers wait at until the test opens it.
#[derive(Clone)]
pub(crate) struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    /// A closed gate.
    pub(crate) fn new() -> Self {
        Gate(Arc::new(watch::channel(false).0))
    }

    /// Opens it for every waiter, present and future.
    pub(crate) fn open(&self) {
        self.0.send_replace(true);
    }

    /// Waits until it is open.
    pub(crate) async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// A clock that follows tokio's (pausable) clock: with `tokio::time::pause`, the store's leases
/// and due times move with the timers of the worker loop.
#[derive(Debug, Clone)]
pub(crate) struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// Starts at [`t0`] now.
    pub(crate) fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = TimeDelta::from_std(self.origin.elapsed()).unwrap();
        (t0() + elapsed).trunc_subsecs(6)
    }
}

/// An in-memory store on a manual clock at [`t0`].
pub(crate) fn memory() -> (Arc<MemoryStore>, ManualClock) {
    let clock = ManualClock::new(t0());
    let store = MemoryStore::new(Arc::new(clock.clone()));
    (Arc::new(store), clock)
}

/// A test configuration: short timers.
pub(crate) fn config(worker_id: &str) -> WorkerConfig {
    WorkerConfig {
        worker_id: worker_id.to_owned(),
        concurrency: 4,
        db_backoff_min: Duration::from_millis(100),
        db_backoff_max: Duration::from_secs(1),
        ..WorkerConfig::default()
    }
}

/// A maintenance configuration for process `id` (a worker on `default`, 4 slots), with the
/// production defaults otherwise.
pub(crate) fn maintenance(id: &str) -> MaintenanceConfig {
    MaintenanceConfig::new(ProcessSpec {
        id: id.to_owned(),
        role: "worker".to_owned(),
        host: "test-host".to_owned(),
        pid: 1,
        version: "test".to_owned(),
        queues: vec![QueueSlots {
            queue: "default".to_owned(),
            slots: 4,
        }],
    })
}

/// A job of `kind` with an empty payload.
pub(crate) fn spec(kind: &str) -> JobSpec {
    JobSpec::new(kind, json!({}))
}

/// Enqueues `spec`; returns the job id.
pub(crate) async fn enqueue(store: &impl JobStore, spec: JobSpec) -> i64 {
    store.job_enqueue(&spec).await.unwrap().job.id
}

/// The job's current state.
pub(crate) async fn state_of(store: &impl JobStore, id: i64) -> JobState {
    store.job_get(id).await.unwrap().state
}

/// A claimed (running) job as a store would return it, for the mock.
pub(crate) fn running_job(id: i64, kind: &str, now: DateTime<Utc>) -> Job {
    let mut job = Job::new(id, &spec(kind), now);
    job.state = JobState::Running;
    job.attempts = 1;
    job.fencing_token = 1;
    job.lease_owner = Some("w1".into());
    job.lease_expires_at = Some(now + TimeDelta::seconds(30));
    job.started_at = Some(now);
    job
}

/// The error a store reports when the database is unreachable.
pub(crate) fn backend() -> StoreError {
    StoreError::Backend("connection refused".into())
}

/// Polls `check` every 10 ms until it holds; fails the test after `within`.
pub(crate) async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
