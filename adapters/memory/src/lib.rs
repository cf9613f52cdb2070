//! The in-memory adapter of Faultline's [`JobStore`] port, for unit tests and demos.
//!
//! [`MemoryStore`] has exactly the semantics of the Postgres adapter (the same contract suite runs
//! against both): every transition goes through [`faultline_domain::Job::apply`], times come from
//! the store's [`Clock`], and jitter samples come from a small seeded PRNG, so a store built with
//! [`MemoryStore::with_seed`] and a [`faultline_ports::ManualClock`] is fully deterministic.
//!
//! *Architecture invariant*: all state sits behind one `std::sync::Mutex` that is never held
//! across an `.await` (no method awaits anything), so every operation is atomic, and concurrent
//! claimers never receive the same job.

mod fleet;
mod rng;
mod state;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use faultline_ports::domain::{Job, JobSpec};
use faultline_ports::{
    ClaimParams, Clock, ElectParams, EnqueueOutcome, Enqueued, FailOutcome, Failure,
    HeartbeatOutcome, JobPage, JobStore, Leadership, LeaseRef, ListParams, ProcessInfo,
    ProcessSpec, PruneParams, QueueBacklog, QueueInfo, QueueLimits, QueueStats, StoreResult,
    SystemClock, WriteOutcome,
};
use serde_json::Value;
use tokio::sync::watch;

use crate::state::State;

/// An in-memory [`JobStore`]. Clones share the same jobs, clock and PRNG.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    /// Bumped whenever an enqueue or a redrive makes a new job due right away.
    enqueued: watch::Sender<u64>,
}

impl MemoryStore {
    /// The seed of [`MemoryStore::new`] and [`Default`].
    pub const DEFAULT_SEED: u64 = 0x5EED_FA17_11E0_0001;

    /// An empty store reading "now" from `clock`, with jitter seeded by [`Self::DEFAULT_SEED`].
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self::with_seed(clock, Self::DEFAULT_SEED)
    }

    /// An empty store reading "now" from `clock`, drawing retry-jitter samples from a PRNG seeded
    /// with `seed` (same seed, same calls: same delays).
    pub fn with_seed(clock: Arc<dyn Clock>, seed: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                clock,
                state: Mutex::new(State::new(seed)),
                enqueued: watch::channel(0).0,
            }),
        }
    }

    /// A receiver that changes whenever a job becomes due because of an enqueue (or a redrive):
    /// the in-memory stand-in for Postgres' LISTEN/NOTIFY. Workers wait on
    /// [`watch::Receiver::changed`] next to their poll timer; the value is the number of such
    /// notifications so far and carries no other meaning. Jobs scheduled for later, retries and
    /// snoozes do not notify (workers find them by polling, as with Postgres).
    pub fn on_enqueue(&self) -> watch::Receiver<u64> {
        self.inner.enqueued.subscribe()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied transition behind
        // (`Job::apply` is all-or-nothing), so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.inner.clock.now()
    }

    fn notify_enqueue(&self) {
        self.inner.enqueued.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A write of lease holders or of the maintenance: runs `write` on the state, then wakes
    /// claimants when a job of a bounded queue stopped running (a slot freed), as Postgres
    /// notifies then.
    fn freeing<T>(&self, write: impl FnOnce(&mut State) -> T) -> T {
        let (out, freed) = {
            let mut state = self.state();
            let out = write(&mut state);
            (out, state.take_freed_slot())
        };
        if freed {
            self.notify_enqueue();
        }
        out
    }
}

impl Default for MemoryStore {
    /// An empty store on the system clock with the default seed.
    fn default() -> Self {
        Self::new(Arc::new(SystemClock))
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("jobs", &self.state().len())
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl JobStore for MemoryStore {
    async fn job_enqueue(&self, spec: &JobSpec) -> StoreResult<Enqueued> {
        let now = self.now();
        let (job, created, due) = self.state().enqueue(spec, now)?;
        if due {
            self.notify_enqueue();
        }
        Ok(Enqueued { job, created })
    }

    async fn job_enqueue_many(&self, specs: &[JobSpec]) -> StoreResult<Vec<EnqueueOutcome>> {
        let now = self.now();
        let (outcomes, due) = self.state().enqueue_many(specs, now)?;
        if due {
            self.notify_enqueue();
        }
        Ok(outcomes)
    }

    async fn job_claim(&self, params: &ClaimParams) -> StoreResult<Vec<Job>> {
        let now = self.now();
        self.state().claim(params, now)
    }

    async fn job_release_claim(&self, claim_id: i64) -> StoreResult<u64> {
        let now = self.now();
        let (released, due) = self.state().release_claim(claim_id, now);
        if due {
            self.notify_enqueue();
        }
        Ok(released)
    }

    async fn job_heartbeat_many(
        &self,
        leases: &[LeaseRef],
        extend_ms: i64,
    ) -> StoreResult<Vec<HeartbeatOutcome>> {
        let now = self.now();
        self.state().heartbeat_many(leases, extend_ms, now)
    }

    async fn job_complete(&self, lease: LeaseRef, result: Option<Value>) -> StoreResult<Job> {
        let now = self.now();
        self.freeing(|state| state.complete(lease, result, now))
    }

    async fn job_complete_many(
        &self,
        completions: &[(LeaseRef, Option<Value>)],
    ) -> StoreResult<Vec<WriteOutcome>> {
        let now = self.now();
        self.freeing(|state| state.complete_many(completions, now))
    }

    async fn job_fail(&self, lease: LeaseRef, failure: &Failure) -> StoreResult<Job> {
        let now = self.now();
        self.freeing(|state| state.fail(lease, failure, now))
    }

    async fn job_fail_many(
        &self,
        failures: &[(LeaseRef, Failure)],
    ) -> StoreResult<Vec<FailOutcome>> {
        let now = self.now();
        self.freeing(|state| state.fail_many(failures, now))
    }

    async fn job_snooze(&self, lease: LeaseRef, delay_ms: i64) -> StoreResult<Job> {
        let now = self.now();
        self.freeing(|state| state.snooze(lease, delay_ms, now))
    }

    async fn job_cancel(&self, id: i64) -> StoreResult<Job> {
        let now = self.now();
        self.state().cancel(id, now)
    }

    async fn job_redrive(&self, id: i64) -> StoreResult<Job> {
        let now = self.now();
        let job = self.state().redrive(id, now)?;
        self.notify_enqueue();
        Ok(job)
    }

    async fn job_rescue_expired(&self, limit: u32) -> StoreResult<Vec<Job>> {
        let now = self.now();
        self.freeing(|state| state.rescue_expired(limit, now))
    }

    async fn job_expire_lease(&self, id: i64) -> StoreResult<Job> {
        let now = self.now();
        self.freeing(|state| state.expire_lease(id, now))
    }

    async fn job_get(&self, id: i64) -> StoreResult<Job> {
        self.state().get(id)
    }

    async fn job_list(&self, params: &ListParams) -> StoreResult<JobPage> {
        self.state().list(params)
    }

    async fn queue_stats(&self) -> StoreResult<Vec<QueueStats>> {
        let now = self.now();
        Ok(self.state().queue_stats(now))
    }

    async fn queue_backlog(&self) -> StoreResult<Vec<QueueBacklog>> {
        let now = self.now();
        self.state().queue_backlog(now)
    }

    async fn job_prune(&self, params: &PruneParams) -> StoreResult<u64> {
        let now = self.now();
        Ok(self.state().prune(params, now))
    }

    async fn queue_list(&self) -> StoreResult<Vec<QueueInfo>> {
        Ok(self.state().fleet.queue_list())
    }

    async fn queue_pause(&self, name: &str) -> StoreResult<QueueInfo> {
        let now = self.now();
        self.state().fleet.set_paused(name, true, now)
    }

    async fn queue_resume(&self, name: &str) -> StoreResult<QueueInfo> {
        let now = self.now();
        let queue = self.state().fleet.set_paused(name, false, now)?;
        // As Postgres notifies on a resume: its due jobs are claimable again.
        self.notify_enqueue();
        Ok(queue)
    }

    async fn queue_set_limits(&self, name: &str, limits: &QueueLimits) -> StoreResult<QueueInfo> {
        let now = self.now();
        let (queue, raised) = self.state().fleet.set_limits(name, limits, now)?;
        if raised {
            self.notify_enqueue();
        }
        Ok(queue)
    }

    async fn leader_elect(&self, params: &ElectParams) -> StoreResult<Leadership> {
        let now = self.now();
        self.state().fleet.leader_elect(params, now)
    }

    async fn leader_resign(&self, leader_id: &str, term: i64) -> StoreResult<bool> {
        let now = self.now();
        Ok(self.state().fleet.leader_resign(leader_id, term, now))
    }

    async fn leader_get(&self) -> StoreResult<Option<Leadership>> {
        let now = self.now();
        Ok(self.state().fleet.leader_get(now))
    }

    async fn process_register(&self, spec: &ProcessSpec) -> StoreResult<ProcessInfo> {
        let now = self.now();
        self.state().fleet.process_register(spec, now)
    }

    async fn process_remove(&self, id: &str) -> StoreResult<bool> {
        Ok(self.state().fleet.process_remove(id))
    }

    async fn process_list(&self) -> StoreResult<Vec<ProcessInfo>> {
        Ok(self.state().fleet.process_list())
    }

    async fn process_prune(&self, older_than_ms: i64) -> StoreResult<u64> {
        let now = self.now();
        Ok(self.state().fleet.process_prune(older_than_ms, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, TimeZone, Utc};
    use faultline_ports::ManualClock;
    use faultline_ports::domain::{FailureKind, JobState};
    use serde_json::json;

    fn start() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    fn store(seed: u64) -> (MemoryStore, ManualClock) {
        let clock = ManualClock::new(start());
        (MemoryStore::with_seed(Arc::new(clock.clone()), seed), clock)
    }

    fn claim_params(limit: u32) -> ClaimParams {
        ClaimParams {
            queues: vec![JobSpec::DEFAULT_QUEUE.to_owned()],
            kinds: vec![],
            limit,
            lease_ms: 30_000,
            worker_id: "w1".to_owned(),
            claim_id: None,
        }
    }

    #[tokio::test]
    async fn enqueue_claim_complete_end_to_end() {
        let (store, clock) = store(1);
        let enqueued = store
            .job_enqueue(&JobSpec::new("email", json!({"to": "a@b.c"})))
            .await
            .unwrap();
        assert!(enqueued.created);
        assert_eq!(enqueued.job.id, 1);
        assert_eq!(enqueued.job.state, JobState::Queued);
        assert_eq!(enqueued.job.created_at, start());

        clock.advance_ms(5);
        let claimed = store.job_claim(&claim_params(10)).await.unwrap();
        assert_eq!(claimed.len(), 1);
        let job = &claimed[0];
        assert_eq!(
            (job.state, job.attempts, job.fencing_token),
            (JobState::Running, 1, 1)
        );
        assert_eq!(job.lease_owner.as_deref(), Some("w1"));
        assert_eq!(
            job.lease_expires_at,
            Some(start() + chrono::TimeDelta::milliseconds(30_005))
        );
        assert!(store.job_claim(&claim_params(10)).await.unwrap().is_empty());

        let done = store
            .job_complete(LeaseRef::of(job), Some(json!({"sent": true})))
            .await
            .unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(done.result, Some(json!({"sent": true})));
        assert_eq!(store.job_get(1).await.unwrap(), done);
        let again = store.job_complete(LeaseRef::of(job), None).await;
        assert!(
            matches!(again, Err(faultline_ports::StoreError::StaleLease { .. })),
            "{again:?}"
        );
    }

    #[tokio::test]
    async fn clones_share_state() {
        let (store, _clock) = store(1);
        let other = store.clone();
        let id = other
            .job_enqueue(&JobSpec::new("k", json!(null)))
            .await
            .unwrap()
            .job
            .id;
        assert_eq!(store.job_get(id).await.unwrap().kind, "k");
        let claimed = store.job_claim(&claim_params(1)).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(other.job_get(id).await.unwrap().state, JobState::Running);
        // A fresh store does not share anything.
        let (fresh, _) = self::store(1);
        assert!(fresh.job_get(id).await.is_err());
    }

    /// Fails one claimed job (retryable, policy delay) and returns how long its backoff is.
    async fn first_backoff_ms(seed: u64) -> i64 {
        let (store, clock) = store(seed);
        let spec = JobSpec {
            retry_policy: faultline_ports::domain::RetryPolicy {
                base_ms: 1_000_000,
                cap_ms: 10_000_000,
                jitter: 1.0,
            },
            ..JobSpec::new("k", json!(null))
        };
        store.job_enqueue(&spec).await.unwrap();
        let job = store.job_claim(&claim_params(1)).await.unwrap().remove(0);
        let failure = Failure {
            error: "boom".into(),
            kind: FailureKind::Error,
            retryable: true,
            retry_delay_ms: None,
        };
        let failed = store.job_fail(LeaseRef::of(&job), &failure).await.unwrap();
        assert_eq!(failed.state, JobState::Queued);
        (failed.next_run_at - clock.now()).num_milliseconds()
    }

    #[tokio::test]
    async fn jitter_is_drawn_from_the_seeded_prng() {
        let a = first_backoff_ms(7).await;
        assert_eq!(a, first_backoff_ms(7).await, "same seed, same delay");
        // jitter 1.0 spreads the first delay over [0, 2 * base].
        assert!((0..=2_000_000).contains(&a), "{a}");
        let others: Vec<i64> = backoffs(&[8, 9, 10]).await;
        assert!(
            others.iter().any(|d| *d != a),
            "different seeds should differ: {a} {others:?}"
        );
    }

    async fn backoffs(seeds: &[u64]) -> Vec<i64> {
        let mut out = Vec::new();
        for &seed in seeds {
            out.push(first_backoff_ms(seed).await);
        }
        out
    }

    #[tokio::test]
    async fn on_enqueue_wakes_for_due_jobs_only() {
        let (store, _clock) = store(1);
        let mut rx = store.on_enqueue();
        assert!(!rx.has_changed().unwrap());
        let later = JobSpec {
            delay_ms: Some(60_000),
            ..JobSpec::new("k", json!(null))
        };
        store.job_enqueue(&later).await.unwrap();
        assert!(!rx.has_changed().unwrap(), "a scheduled job is not due");
        store
            .job_enqueue_many(&[later.clone(), JobSpec::new("k", json!(1))])
            .await
            .unwrap();
        assert!(rx.has_changed().unwrap());
        rx.changed().await.unwrap();
        assert!(!rx.has_changed().unwrap());
    }
}
