//! The store's state behind its one lock: jobs by id, the idempotency-key index, the claim, rescue
//! and prune indexes, the id sequence and the jitter PRNG. Everything here is synchronous; "now"
//! is an argument, read from the store's clock by the caller.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use chrono::{DateTime, SubsecRound, Utc};
use faultline_ports::domain::{Event, EventKind, Job, JobSpec, JobState, Limits, TransitionError};

use faultline_ports::{
    ClaimParams, EnqueueOutcome, FailOutcome, Failure, HeartbeatOutcome, JobPage, LeaseRef,
    ListParams, PruneParams, QueueBacklog, QueueStats, StoreError, StoreResult, WriteOutcome,
};
use serde_json::Value;

use crate::fleet::Fleet;
use crate::rng::SplitMix64;

/// Claim order of a queued job within its queue: priority, then due time, then id.
type ReadyKey = (i16, DateTime<Utc>, i64);

/// A job and the fingerprint of the request that created it (only kept when it has a key).
#[derive(Debug)]
struct Stored {
    job: Job,
    fingerprint: Option<Vec<u8>>,
    /// The claim call that leased the job last (`ClaimParams::claim_id`).
    claim_id: Option<i64>,
}

/// Secondary indexes, kept in step with every job change (the Postgres adapter's partial indexes).
#[derive(Debug, Default)]
struct Indexes {
    /// Queued jobs per queue, in claim order.
    ready: HashMap<String, BTreeSet<ReadyKey>>,
    /// Running jobs by lease end, then id.
    leases: BTreeSet<(DateTime<Utc>, i64)>,
    /// Terminal jobs by finish time, then id.
    finished: BTreeSet<(DateTime<Utc>, i64)>,
}

impl Indexes {
    fn insert(&mut self, job: &Job) {
        match job.state {
            JobState::Queued => {
                let key = (job.priority, job.next_run_at, job.id);
                if let Some(set) = self.ready.get_mut(&job.queue) {
                    set.insert(key);
                } else {
                    self.ready.insert(job.queue.clone(), BTreeSet::from([key]));
                }
            }
            JobState::Running => {
                if let Some(at) = job.lease_expires_at {
                    self.leases.insert((at, job.id));
                }
            }
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => {
                if let Some(at) = job.finished_at {
                    self.finished.insert((at, job.id));
                }
            }
        }
    }

    fn remove(&mut self, job: &Job) {
        match job.state {
            JobState::Queued => {
                if let Some(set) = self.ready.get_mut(&job.queue) {
                    set.remove(&(job.priority, job.next_run_at, job.id));
                    if set.is_empty() {
                        self.ready.remove(&job.queue);
                    }
                }
            }
            JobState::Running => {
                if let Some(at) = job.lease_expires_at {
                    self.leases.remove(&(at, job.id));
                }
            }
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => {
                if let Some(at) = job.finished_at {
                    self.finished.remove(&(at, job.id));
                }
            }
        }
    }
}

/// What one enqueue resolved to.
enum Resolved {
    Created { id: i64, due: bool },
    Existing { id: i64 },
    Conflict { existing_id: i64 },
}

/// Everything the store holds.
#[derive(Debug)]
pub(crate) struct State {
    jobs: BTreeMap<i64, Stored>,
    keys: HashMap<String, i64>,
    index: Indexes,
    last_id: i64,
    rng: SplitMix64,
    /// Queues, leadership and processes.
    pub(crate) fleet: Fleet,
    /// A job of a bounded queue stopped running since the store last looked (see
    /// [`State::take_freed_slot`]).
    freed_slot: bool,
}

/// An outcome the selection logic rules out; reported, never panicked on.
fn internal(id: i64, what: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("in-memory store bug: job {id}: {what}").into())
}

/// The store's translation of a refused transition of job `id`. `lease` is what a lease holder
/// presented, if the event came from one.
fn translate(id: i64, lease: Option<LeaseRef>, err: TransitionError) -> StoreError {
    match (err, lease) {
        (TransitionError::StaleLease { .. }, Some(lease)) => StoreError::StaleLease { lease },
        (TransitionError::IllegalTransition { from, event }, _) => {
            StoreError::IllegalTransition { id, from, event }
        }
        (err, _) => internal(id, err),
    }
}

impl State {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            jobs: BTreeMap::new(),
            keys: HashMap::new(),
            index: Indexes::default(),
            last_id: 0,
            rng: SplitMix64::new(seed),
            fleet: Fleet::default(),
            freed_slot: false,
        }
    }

    /// Number of jobs held.
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Applies `event` to job `id` through the domain state machine, keeping the indexes in step.
    /// `None` when there is no such job.
    fn apply(&mut self, id: i64, event: Event) -> Option<Result<&Job, TransitionError>> {
        let stored = self.jobs.get_mut(&id)?;
        self.index.remove(&stored.job);
        let was_running = stored.job.state == JobState::Running;
        let result = stored.job.apply(event);
        self.index.insert(&stored.job);
        if was_running
            && stored.job.state != JobState::Running
            && self.fleet.max_running(&stored.job.queue).is_some()
        {
            self.freed_slot = true;
        }
        Some(result.map(|()| &stored.job))
    }

    /// A lease holder's write: a missing job is a lost lease like any other.
    fn apply_fenced(&mut self, lease: LeaseRef, event: Event) -> StoreResult<&Job> {
        match self.apply(lease.job_id, event) {
            None => Err(StoreError::StaleLease { lease }),
            Some(result) => result.map_err(|err| translate(lease.job_id, Some(lease), err)),
        }
    }

    /// A user's command on job `id`.
    fn apply_command(&mut self, id: i64, event: Event) -> StoreResult<Job> {
        match self.apply(id, event) {
            None => Err(StoreError::NotFound { id }),
            Some(result) => result.cloned().map_err(|err| translate(id, None, err)),
        }
    }

    /// The job's retry policy delay after its current attempt, with a fresh jitter sample.
    /// `lease`, when given, must still hold the job: a stale write draws no sample.
    fn policy_delay_ms(&mut self, id: i64, lease: Option<LeaseRef>) -> Option<i64> {
        let job = &self.jobs.get(&id)?.job;
        if let Some(lease) = lease
            && (job.state != JobState::Running || job.fencing_token != lease.token)
        {
            return None;
        }
        let (policy, attempts) = (job.retry_policy, job.attempts);
        Some(policy.delay_ms(attempts, self.rng.next_f64()))
    }

    fn enqueue_one(&mut self, spec: &JobSpec, now: DateTime<Utc>) -> Resolved {
        let fingerprint = spec.idempotency_key.as_ref().map(|_| spec.fingerprint());
        if let Some(key) = &spec.idempotency_key
            && let Some(&id) = self.keys.get(key)
        {
            let same = self
                .jobs
                .get(&id)
                .is_some_and(|stored| stored.fingerprint == fingerprint);
            return if same {
                Resolved::Existing { id }
            } else {
                Resolved::Conflict { existing_id: id }
            };
        }
        self.last_id += 1;
        let id = self.last_id;
        let mut job = Job::new(id, spec, now);
        // Postgres keeps microseconds; a caller's `run_at` may carry nanoseconds.
        job.next_run_at = job.next_run_at.trunc_subsecs(6);
        let due = job.next_run_at <= now;
        if let Some(key) = &spec.idempotency_key {
            self.keys.insert(key.clone(), id);
        }
        self.index.insert(&job);
        self.fleet.touch_queue(&job.queue, now);
        self.jobs.insert(
            id,
            Stored {
                job,
                fingerprint,
                claim_id: None,
            },
        );
        Resolved::Created { id, due }
    }

    /// Enqueues one job; returns it, whether it was created, and whether a new due job appeared.
    pub(crate) fn enqueue(
        &mut self,
        spec: &JobSpec,
        now: DateTime<Utc>,
    ) -> StoreResult<(Job, bool, bool)> {
        spec.validate()?;
        let (id, created, due) = match self.enqueue_one(spec, now) {
            Resolved::Created { id, due } => (id, true, due),
            Resolved::Existing { id } => (id, false, false),
            Resolved::Conflict { existing_id } => {
                return Err(StoreError::Conflict {
                    key: spec.idempotency_key.clone().unwrap_or_default(),
                    existing_id,
                });
            }
        };
        let job = self.jobs[&id].job.clone();
        Ok((job, created, due))
    }

    /// Enqueues a batch atomically: all specs are validated before anything is created. Also
    /// says whether a new due job appeared.
    pub(crate) fn enqueue_many(
        &mut self,
        specs: &[JobSpec],
        now: DateTime<Utc>,
    ) -> StoreResult<(Vec<EnqueueOutcome>, bool)> {
        faultline_ports::validate_specs(specs)?;
        let mut any_due = false;
        let outcomes = specs
            .iter()
            .map(|spec| match self.enqueue_one(spec, now) {
                Resolved::Created { id, due } => {
                    any_due |= due;
                    EnqueueOutcome::Created { id }
                }
                Resolved::Existing { id } => EnqueueOutcome::Existing { id },
                Resolved::Conflict { existing_id } => EnqueueOutcome::Conflict { existing_id },
            })
            .collect();
        Ok((outcomes, any_due))
    }

    /// Up to `limit` due jobs of `queue` in claim order whose kind is accepted.
    fn due_in_queue(
        &self,
        queue: &str,
        kinds: &BTreeSet<&str>,
        now: DateTime<Utc>,
        limit: usize,
        out: &mut Vec<ReadyKey>,
    ) {
        let Some(set) = self.index.ready.get(queue) else {
            return;
        };
        let mut from = Bound::Unbounded;
        let mut found = 0;
        while found < limit {
            let Some(&key) = set.range((from, Bound::Unbounded)).next() else {
                break;
            };
            let (priority, next_run_at, id) = key;
            if next_run_at > now {
                // The rest of this priority is not due either: skip to the next priority.
                match priority.checked_add(1) {
                    Some(next) => {
                        from = Bound::Included((next, DateTime::<Utc>::MIN_UTC, i64::MIN));
                        continue;
                    }
                    None => break,
                }
            }
            from = Bound::Excluded(key);
            let kind_ok = kinds.is_empty()
                || self
                    .jobs
                    .get(&id)
                    .is_some_and(|stored| kinds.contains(stored.job.kind.as_str()));
            if kind_ok {
                out.push(key);
                found += 1;
            }
        }
    }

    /// Leases up to `limit` due jobs, in claim order.
    pub(crate) fn claim(
        &mut self,
        params: &ClaimParams,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Job>> {
        params.validate()?;
        let limit = params.limit as usize;
        let queues: BTreeSet<&str> = params.queues.iter().map(String::as_str).collect();
        let kinds: BTreeSet<&str> = params.kinds.iter().map(String::as_str).collect();
        let mut candidates = Vec::new();
        for queue in queues {
            if self.fleet.is_paused(queue) {
                continue;
            }
            // A bounded queue yields at most its free slots (as Postgres' capped claim).
            let cap = match self.fleet.max_running(queue) {
                Some(max) => {
                    let free = usize::try_from(max)
                        .unwrap_or(0)
                        .saturating_sub(self.running_in(queue));
                    free.min(limit)
                }
                None => limit,
            };
            self.due_in_queue(queue, &kinds, now, cap, &mut candidates);
        }
        candidates.sort_unstable();
        candidates.truncate(limit);
        let mut claimed = Vec::with_capacity(candidates.len());
        for (_, _, id) in candidates {
            let event = Event::Claim {
                owner: params.worker_id.clone(),
                now,
                lease_ms: params.lease_ms,
            };
            match self.apply(id, event) {
                Some(Ok(job)) => claimed.push(job.clone()),
                Some(Err(err)) => return Err(internal(id, err)),
                None => return Err(internal(id, "indexed but missing")),
            }
            if let Some(stored) = self.jobs.get_mut(&id) {
                stored.claim_id = params.claim_id;
            }
        }
        Ok(claimed)
    }

    /// The running jobs of `queue`.
    fn running_in(&self, queue: &str) -> usize {
        self.index
            .leases
            .iter()
            .filter_map(|&(_, id)| self.jobs.get(&id))
            .filter(|stored| stored.job.queue == queue)
            .count()
    }

    /// Whether a job of a bounded queue stopped running since the last call (its claimants are
    /// to be woken), clearing the mark.
    pub(crate) fn take_freed_slot(&mut self) -> bool {
        std::mem::take(&mut self.freed_slot)
    }

    /// Gives back the running jobs that claim call `claim_id` leased (a snooze of 0 ms each);
    /// returns how many, and whether one of them is due now.
    pub(crate) fn release_claim(&mut self, claim_id: i64, now: DateTime<Utc>) -> (u64, bool) {
        let leases: Vec<LeaseRef> = self
            .index
            .leases
            .iter()
            .filter_map(|&(_, id)| self.jobs.get(&id))
            .filter(|stored| stored.claim_id == Some(claim_id))
            .map(|stored| LeaseRef::of(&stored.job))
            .collect();
        let mut released = 0;
        let mut due = false;
        for lease in leases {
            if let Ok(job) = self.snooze(lease, 0, now) {
                released += 1;
                due |= job.state == JobState::Queued;
            }
        }
        (released, due)
    }

    pub(crate) fn heartbeat_many(
        &mut self,
        leases: &[LeaseRef],
        extend_ms: i64,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<HeartbeatOutcome>> {
        faultline_ports::validate_extend_ms(extend_ms)?;
        let outcomes = leases
            .iter()
            .map(|lease| {
                let event = Event::Heartbeat {
                    token: lease.token,
                    now,
                    extend_ms,
                };
                match self.apply(lease.job_id, event) {
                    Some(Ok(Job {
                        lease_expires_at: Some(lease_expires_at),
                        cancel_requested,
                        ..
                    })) => HeartbeatOutcome::Extended {
                        lease_expires_at: *lease_expires_at,
                        cancel_requested: *cancel_requested,
                    },
                    _ => HeartbeatOutcome::Lost,
                }
            })
            .collect();
        Ok(outcomes)
    }

    pub(crate) fn complete(
        &mut self,
        lease: LeaseRef,
        result: Option<Value>,
        now: DateTime<Utc>,
    ) -> StoreResult<Job> {
        faultline_ports::validate_result(result.as_ref())?;
        let event = Event::Complete {
            token: lease.token,
            now,
            result,
        };
        self.apply_fenced(lease, event).cloned()
    }

    pub(crate) fn complete_many(
        &mut self,
        completions: &[(LeaseRef, Option<Value>)],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<WriteOutcome>> {
        for (_, result) in completions {
            faultline_ports::validate_result(result.as_ref())?;
        }
        let outcomes = completions
            .iter()
            .map(|(lease, result)| {
                let event = Event::Complete {
                    token: lease.token,
                    now,
                    result: result.clone(),
                };
                match self.apply_fenced(*lease, event) {
                    Ok(_) => WriteOutcome::Accepted,
                    Err(_) => WriteOutcome::Stale,
                }
            })
            .collect();
        Ok(outcomes)
    }

    pub(crate) fn fail(
        &mut self,
        lease: LeaseRef,
        failure: &Failure,
        now: DateTime<Utc>,
    ) -> StoreResult<Job> {
        failure.validate()?;
        let error = Limits::storable_text(&failure.error);
        let event = if failure.retryable {
            let delay_ms = match failure.retry_delay_ms {
                Some(ms) => ms,
                None => match self.policy_delay_ms(lease.job_id, Some(lease)) {
                    Some(ms) => ms,
                    None => return Err(StoreError::StaleLease { lease }),
                },
            };
            Event::FailRetryable {
                token: lease.token,
                now,
                error,
                kind: failure.kind,
                delay_ms,
            }
        } else {
            Event::FailPermanently {
                token: lease.token,
                now,
                error,
                kind: failure.kind,
            }
        };
        self.apply_fenced(lease, event).cloned()
    }

    /// Fails many leases in input order (all validated first); a repeated lease finds its job
    /// no longer running under its token, so only its first entry applies.
    pub(crate) fn fail_many(
        &mut self,
        failures: &[(LeaseRef, Failure)],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<FailOutcome>> {
        for (_, failure) in failures {
            failure.validate()?;
        }
        let mut outcomes = Vec::with_capacity(failures.len());
        for (lease, failure) in failures {
            outcomes.push(match self.fail(*lease, failure, now) {
                Ok(job) => FailOutcome::Applied { state: job.state },
                Err(StoreError::StaleLease { .. }) => FailOutcome::Stale,
                Err(err) => return Err(err),
            });
        }
        Ok(outcomes)
    }

    pub(crate) fn snooze(
        &mut self,
        lease: LeaseRef,
        delay_ms: i64,
        now: DateTime<Utc>,
    ) -> StoreResult<Job> {
        faultline_ports::validate_snooze_ms(delay_ms)?;
        let event = Event::Snooze {
            token: lease.token,
            now,
            delay_ms,
        };
        self.apply_fenced(lease, event).cloned()
    }

    pub(crate) fn cancel(&mut self, id: i64, now: DateTime<Utc>) -> StoreResult<Job> {
        self.apply_command(id, Event::Cancel { now })
    }

    pub(crate) fn redrive(&mut self, id: i64, now: DateTime<Utc>) -> StoreResult<Job> {
        self.apply_command(id, Event::Redrive { now })
    }

    /// Ends up to `limit` expired leases, earliest lease end first.
    pub(crate) fn rescue_expired(
        &mut self,
        limit: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Job>> {
        let expired: Vec<i64> = self
            .index
            .leases
            .range(..=(now, i64::MAX))
            .take(limit as usize)
            .map(|&(_, id)| id)
            .collect();
        let mut rescued = Vec::with_capacity(expired.len());
        for id in expired {
            let delay_ms = self
                .policy_delay_ms(id, None)
                .ok_or_else(|| internal(id, "indexed but missing"))?;
            match self.apply(id, Event::LeaseExpired { now, delay_ms }) {
                Some(Ok(job)) => rescued.push(job.clone()),
                Some(Err(err)) => return Err(internal(id, err)),
                None => return Err(internal(id, "indexed but missing")),
            }
        }
        Ok(rescued)
    }

    /// An operator ends the running job's lease now, as its rescue would: the lease ends at
    /// `now`, then `LeaseExpired` applies at `now`. Nothing changes when it is refused.
    pub(crate) fn expire_lease(&mut self, id: i64, now: DateTime<Utc>) -> StoreResult<Job> {
        let Some(stored) = self.jobs.get(&id) else {
            return Err(StoreError::NotFound { id });
        };
        if stored.job.state != JobState::Running {
            return Err(StoreError::IllegalTransition {
                id,
                from: stored.job.state,
                event: EventKind::LeaseExpired,
            });
        }
        let delay_ms = self
            .policy_delay_ms(id, None)
            .ok_or_else(|| internal(id, "vanished under the lock"))?;
        let stored = self
            .jobs
            .get_mut(&id)
            .ok_or_else(|| internal(id, "vanished under the lock"))?;
        self.index.remove(&stored.job);
        let mut next = stored.job.clone();
        next.lease_expires_at = next.lease_expires_at.map(|end| end.min(now));
        let result = next.apply(Event::LeaseExpired { now, delay_ms });
        if result.is_ok() {
            stored.job = next;
        }
        self.index.insert(&stored.job);
        result
            .map(|()| stored.job.clone())
            .map_err(|err| translate(id, None, err))
    }

    pub(crate) fn get(&self, id: i64) -> StoreResult<Job> {
        self.jobs
            .get(&id)
            .map(|stored| stored.job.clone())
            .ok_or(StoreError::NotFound { id })
    }

    pub(crate) fn list(&self, params: &ListParams) -> StoreResult<JobPage> {
        params.validate()?;
        let limit = params.limit as usize;
        let upper = params.before_id.map_or(Bound::Unbounded, Bound::Excluded);
        let mut matching = self
            .jobs
            .range((Bound::Unbounded, upper))
            .rev()
            .map(|(_, stored)| &stored.job)
            .filter(|job| {
                params.queue.as_ref().is_none_or(|q| *q == job.queue)
                    && params.state.is_none_or(|s| s == job.state)
                    && params.kind.as_ref().is_none_or(|k| *k == job.kind)
            });
        let jobs: Vec<Job> = matching.by_ref().take(limit).cloned().collect();
        let more = jobs.len() == limit && matching.next().is_some();
        let next_cursor = if more {
            jobs.last().map(|job| job.id)
        } else {
            None
        };
        Ok(JobPage { jobs, next_cursor })
    }

    pub(crate) fn queue_stats(&self, now: DateTime<Utc>) -> Vec<QueueStats> {
        let mut per_queue: BTreeMap<&str, ([i64; JobState::ALL.len()], Option<DateTime<Utc>>)> =
            BTreeMap::new();
        for stored in self.jobs.values() {
            let job = &stored.job;
            let (counts, oldest) = per_queue.entry(job.queue.as_str()).or_default();
            let slot = JobState::ALL
                .iter()
                .position(|s| *s == job.state)
                .unwrap_or_default();
            counts[slot] += 1;
            if job.state == JobState::Queued && job.next_run_at <= now {
                *oldest = Some(oldest.map_or(job.next_run_at, |at| at.min(job.next_run_at)));
            }
        }
        per_queue
            .into_iter()
            .map(|(queue, (counts, oldest_ready_at))| QueueStats {
                queue: queue.to_owned(),
                counts: JobState::ALL.into_iter().zip(counts).collect(),
                oldest_ready_at,
            })
            .collect()
    }

    /// The backlog per queue, from the claim and lease indexes only (as the Postgres adapter reads
    /// only its partial indexes): finished jobs are never visited.
    pub(crate) fn queue_backlog(&self, now: DateTime<Utc>) -> StoreResult<Vec<QueueBacklog>> {
        fn slot<'a>(
            per_queue: &'a mut BTreeMap<String, QueueBacklog>,
            queue: &str,
        ) -> &'a mut QueueBacklog {
            per_queue
                .entry(queue.to_owned())
                .or_insert_with(|| QueueBacklog {
                    queue: queue.to_owned(),
                    queued: 0,
                    ready: 0,
                    running: 0,
                    oldest_ready_at: None,
                })
        }
        let mut per_queue = BTreeMap::new();
        for (queue, set) in &self.index.ready {
            let backlog = slot(&mut per_queue, queue);
            backlog.queued += set.len() as i64;
            for &(_, next_run_at, _) in set.iter().filter(|(_, at, _)| *at <= now) {
                backlog.ready += 1;
                backlog.oldest_ready_at = Some(
                    backlog
                        .oldest_ready_at
                        .map_or(next_run_at, |at| at.min(next_run_at)),
                );
            }
        }
        for &(_, id) in &self.index.leases {
            let stored = self
                .jobs
                .get(&id)
                .ok_or_else(|| internal(id, "indexed but missing"))?;
            slot(&mut per_queue, &stored.job.queue).running += 1;
        }
        Ok(per_queue.into_values().collect())
    }

    /// Deletes up to `limit` finished jobs past their state's retention, oldest finish first.
    pub(crate) fn prune(&mut self, params: &PruneParams, now: DateTime<Utc>) -> u64 {
        let retention_ms = |state: JobState| match state {
            JobState::Succeeded => params.succeeded_retention_ms,
            JobState::Failed => params.failed_retention_ms,
            _ => params.cancelled_retention_ms,
        };
        // "Older than the retention": finished_at < now - retention, compared in microseconds.
        let expired = |finished_at: DateTime<Utc>, retention_ms: i64| {
            let age_us = (now - finished_at).num_microseconds().unwrap_or(i64::MAX);
            i128::from(age_us) > i128::from(retention_ms) * 1_000
        };
        let shortest = [
            params.succeeded_retention_ms,
            params.failed_retention_ms,
            params.cancelled_retention_ms,
        ]
        .into_iter()
        .min()
        .unwrap_or_default();
        let mut doomed = Vec::new();
        for &(finished_at, id) in &self.index.finished {
            if doomed.len() >= params.limit as usize || !expired(finished_at, shortest) {
                // Finish times only grow from here: nothing later can be past any retention.
                break;
            }
            if let Some(stored) = self.jobs.get(&id)
                && expired(finished_at, retention_ms(stored.job.state))
            {
                doomed.push(id);
            }
        }
        for &id in &doomed {
            if let Some(stored) = self.jobs.remove(&id) {
                self.index.remove(&stored.job);
                if let Some(key) = &stored.job.idempotency_key
                    && self.keys.get(key) == Some(&id)
                {
                    self.keys.remove(key);
                }
            }
        }
        doomed.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeDelta, TimeZone};
    use faultline_ports::domain::FailureKind;
    use serde_json::json;

    impl State {
        /// Rebuilds the indexes from the jobs and compares; checks every job's invariants.
        fn check_consistency(&self) {
            let mut rebuilt = Indexes::default();
            for (id, stored) in &self.jobs {
                assert_eq!(*id, stored.job.id);
                stored.job.check_invariants().unwrap();
                rebuilt.insert(&stored.job);
                if let Some(key) = &stored.job.idempotency_key {
                    assert_eq!(self.keys.get(key), Some(id), "key index of job {id}");
                    assert!(stored.fingerprint.is_some());
                }
            }
            assert_eq!(
                self.keys.len(),
                self.jobs
                    .values()
                    .filter(|s| s.job.idempotency_key.is_some())
                    .count()
            );
            assert_eq!(rebuilt.ready, self.index.ready);
            assert_eq!(rebuilt.leases, self.index.leases);
            assert_eq!(rebuilt.finished, self.index.finished);
        }
    }

    /// Random operations keep the indexes exactly in step with the jobs.
    #[test]
    fn indexes_follow_every_transition() {
        let mut rng = SplitMix64::new(99);
        let mut state = State::new(1);
        let mut now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let pick = |rng: &mut SplitMix64, n: u64| (rng.next_u64() % n) as i64;
        let mut leases: Vec<LeaseRef> = Vec::new();
        for _ in 0..5_000 {
            match pick(&mut rng, 10) {
                0 | 1 => {
                    let spec = JobSpec {
                        priority: pick(&mut rng, 3) as i16,
                        delay_ms: Some(pick(&mut rng, 3) * 1_000),
                        max_attempts: 1 + pick(&mut rng, 3) as i32,
                        idempotency_key: (pick(&mut rng, 2) == 0)
                            .then(|| format!("k{}", pick(&mut rng, 20))),
                        ..JobSpec::new("kind", json!(pick(&mut rng, 2)))
                            .queue(format!("q{}", pick(&mut rng, 3)))
                    };
                    let _ = state.enqueue(&spec, now);
                }
                2 => {
                    let params = ClaimParams {
                        queues: vec!["q0".into(), "q1".into(), "q2".into()],
                        kinds: vec![],
                        limit: 1 + pick(&mut rng, 3) as u32,
                        lease_ms: 1_000 + pick(&mut rng, 2_000),
                        worker_id: "w".into(),
                        claim_id: None,
                    };
                    let claimed = state.claim(&params, now).unwrap();
                    for pair in claimed.windows(2) {
                        let key = |j: &Job| (j.priority, j.next_run_at, j.id);
                        assert!(key(&pair[0]) < key(&pair[1]));
                    }
                    leases.extend(claimed.iter().map(LeaseRef::of));
                }
                3 if !leases.is_empty() => {
                    let lease = leases.swap_remove(pick(&mut rng, leases.len() as u64) as usize);
                    let failure = Failure {
                        error: "e".into(),
                        kind: FailureKind::Error,
                        retryable: pick(&mut rng, 4) != 0,
                        retry_delay_ms: None,
                    };
                    let _ = match pick(&mut rng, 3) {
                        0 => state.complete(lease, None, now),
                        1 => state.fail(lease, &failure, now),
                        _ => state.snooze(lease, pick(&mut rng, 2_000), now),
                    };
                }
                4 if !leases.is_empty() => {
                    let _ = state.heartbeat_many(&leases, 1_500, now).unwrap();
                }
                5 => {
                    let id = 1 + pick(&mut rng, state.last_id.max(1) as u64);
                    let _ = if pick(&mut rng, 2) == 0 {
                        state.cancel(id, now)
                    } else {
                        state.redrive(id, now)
                    };
                }
                6 => {
                    for job in state.rescue_expired(2, now).unwrap() {
                        assert_ne!(job.state, JobState::Running);
                    }
                }
                7 => {
                    let params = PruneParams {
                        succeeded_retention_ms: 2_000,
                        failed_retention_ms: 4_000,
                        cancelled_retention_ms: 0,
                        limit: 3,
                    };
                    state.prune(&params, now);
                }
                _ => now += TimeDelta::milliseconds(pick(&mut rng, 700)),
            }
            state.check_consistency();
        }
        assert!(
            state.last_id > 500,
            "the run should have enqueued plenty of jobs"
        );
    }
}
