//! [`PgStore`]: the `JobStore` port on PostgreSQL. One statement per operation wherever the
//! semantics allow it; all state transitions mirror `faultline_domain::Job::apply`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use faultline_domain::{AttemptError, EventKind, Job, JobSpec, JobState, Limits};
use faultline_ports::{
    ClaimParams, Clock, ElectParams, EnqueueOutcome, Enqueued, FailOutcome, Failure,
    HeartbeatOutcome, JobPage, JobStore, Leadership, LeaseRef, ListParams, ProcessInfo,
    ProcessSpec, PruneParams, QueueBacklog, QueueInfo, QueueLimits, QueueStats, StoreError,
    StoreResult, WriteOutcome,
};
use faultline_ports::{
    validate_extend_ms, validate_process, validate_queue_name, validate_result, validate_snooze_ms,
    validate_specs,
};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};

use crate::row::{
    job_from_row, leadership_from_row, process_from_row, queue_from_row, state_from_row,
};
use crate::sql;

/// A statement with its arguments bound.
type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// The channel every enqueue of a due job notifies, with the queue name as payload (once per
/// queue per statement, delivered at commit). Workers `LISTEN` on it to claim without polling.
pub const NOTIFY_CHANNEL: &str = "faultline_jobs";

/// The attempt history's length, as the statements take it.
const HISTORY: i32 = AttemptError::HISTORY as i32;

/// How many times an enqueue retries when the job holding its idempotency key disappears
/// (pruned) between the insert that saw it and the read that looks for it.
const MAX_KEY_ROUNDS: usize = 8;

/// How many times cancel and redrive retry when the job changed between their conditional update
/// and the read that explains why it matched nothing.
const MAX_TRANSITION_ROUNDS: usize = 4;

/// Longest retention honoured by the pruner (1000 years); longer ones mean "forever" anyway and
/// would overflow PostgreSQL's interval arithmetic.
const MAX_RETENTION_MS: i64 = 1_000 * 365 * 24 * 3_600_000;

/// A retention the SQL can compute with. Negative ones are not refused (as in every store, they
/// reach into the future: everything finished by then is past them).
fn clamp_retention(ms: i64) -> i64 {
    ms.clamp(-MAX_RETENTION_MS, MAX_RETENTION_MS)
}

/// The PostgreSQL job store. Cheap to clone (a pool handle and an optional clock).
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// `None` in production: the database's `now()` is the clock. Tests pin "now" with a
    /// `ManualClock`; every statement then uses its value instead.
    clock: Option<Arc<dyn Clock>>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool)
            .field("clock_override", &self.clock.is_some())
            .finish()
    }
}

fn backend(err: sqlx::Error) -> StoreError {
    StoreError::Backend(Box::new(err))
}

fn invalid(message: impl Into<String>) -> StoreError {
    StoreError::Invalid(message.into())
}

/// An outcome the statements rule out; reported as a backend failure, never panicked on.
fn internal(message: impl Into<String>) -> StoreError {
    StoreError::Backend(message.into().into())
}

/// The fingerprint stored with a job, and compared on an idempotent replay (only keyed jobs).
fn hash_of(spec: &JobSpec) -> Option<Vec<u8>> {
    spec.idempotency_key.as_ref().map(|_| spec.fingerprint())
}

impl PgStore {
    /// A store on `pool` whose clock is the database's `now()`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool, clock: None }
    }

    /// A store on `pool` that reads "now" from `clock` instead of the database (tests).
    pub fn with_clock(pool: PgPool, clock: Arc<dyn Clock>) -> Self {
        Self {
            pool,
            clock: Some(clock),
        }
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The clock override bound to every statement (NULL: the database's `now()`).
    fn now(&self) -> Option<DateTime<Utc>> {
        self.clock.as_ref().map(|clock| clock.now())
    }

    /// Enqueues one job on the caller's connection, typically inside the caller's transaction, so
    /// the job exists exactly when the caller's own writes commit (a rollback leaves no job, and
    /// the notification is only delivered at commit). Semantics as [`JobStore::job_enqueue`].
    ///
    /// Relies on READ COMMITTED (the default): after an insert skipped because of a concurrent
    /// enqueue with the same key, the next statement must see that job.
    pub async fn job_enqueue_in(
        &self,
        conn: &mut PgConnection,
        spec: &JobSpec,
    ) -> StoreResult<Enqueued> {
        spec.validate()?;
        let hash = hash_of(spec);
        let now = self.now();
        for _ in 0..MAX_KEY_ROUNDS {
            let row = sqlx::query(sql::ENQUEUE_ONE)
                .bind(&spec.queue)
                .bind(&spec.kind)
                .bind(&spec.payload)
                .bind(spec.priority)
                .bind(spec.run_at)
                .bind(spec.delay_ms)
                .bind(spec.max_attempts)
                .bind(spec.retry_policy.base_ms)
                .bind(spec.retry_policy.cap_ms)
                .bind(spec.retry_policy.jitter)
                .bind(spec.timeout_ms)
                .bind(spec.idempotency_key.as_deref())
                .bind(hash.as_deref())
                .bind(now)
                .fetch_optional(&mut *conn)
                .await
                .map_err(backend)?;
            if let Some(row) = row {
                return Ok(Enqueued {
                    job: job_from_row(&row).map_err(backend)?,
                    created: true,
                });
            }
            // Only a taken idempotency key skips the insert.
            let Some(key) = spec.idempotency_key.as_deref() else {
                return Err(internal(
                    "the enqueue inserted nothing for a job without a key",
                ));
            };
            let existing = sqlx::query(sql::JOB_BY_KEY)
                .bind(key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(backend)?;
            let Some(row) = existing else {
                continue; // pruned in between: insert again
            };
            let job = job_from_row(&row).map_err(backend)?;
            let stored: Vec<u8> = row.try_get("payload_hash").map_err(backend)?;
            if Some(stored) == hash {
                return Ok(Enqueued {
                    job,
                    created: false,
                });
            }
            return Err(StoreError::Conflict {
                key: key.to_owned(),
                existing_id: job.id,
            });
        }
        Err(key_kept_vanishing())
    }

    /// Enqueues a batch on the caller's connection (see [`PgStore::job_enqueue_in`]); atomic when
    /// the caller runs it inside a transaction. Semantics as [`JobStore::job_enqueue_many`].
    pub async fn job_enqueue_many_in(
        &self,
        conn: &mut PgConnection,
        specs: &[JobSpec],
    ) -> StoreResult<Vec<EnqueueOutcome>> {
        validate_specs(specs)?;
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now();
        let hashes: Vec<Option<Vec<u8>>> = specs.iter().map(hash_of).collect();
        let mut outcomes: Vec<Option<EnqueueOutcome>> = vec![None; specs.len()];

        // A key repeated within the batch is sent once, by its first item; the repeats resolve
        // against whatever job ends up holding the key.
        let mut first_with_key: HashSet<&str> = HashSet::new();
        let mut pending: Vec<usize> = Vec::with_capacity(specs.len());
        let mut repeats: Vec<usize> = Vec::new();
        for (index, spec) in specs.iter().enumerate() {
            match spec.idempotency_key.as_deref() {
                Some(key) if !first_with_key.insert(key) => repeats.push(index),
                _ => pending.push(index),
            }
        }

        // Who holds each key of the batch: (job id, its payload hash).
        let mut holders: HashMap<&str, (i64, Vec<u8>)> = HashMap::new();
        for _ in 0..MAX_KEY_ROUNDS {
            if pending.is_empty() {
                break;
            }
            for (index, id) in self
                .insert_batch(conn, specs, &hashes, &pending, now)
                .await?
            {
                outcomes[index] = Some(EnqueueOutcome::Created { id });
                if let (Some(key), Some(hash)) =
                    (specs[index].idempotency_key.as_deref(), &hashes[index])
                {
                    holders.insert(key, (id, hash.clone()));
                }
            }
            // Whatever was not inserted has a key that another job holds.
            let skipped: Vec<usize> = pending
                .iter()
                .copied()
                .filter(|&index| outcomes[index].is_none())
                .collect();
            if skipped.is_empty() {
                pending.clear();
                break;
            }
            let keys: Vec<&str> = skipped
                .iter()
                .filter_map(|&index| specs[index].idempotency_key.as_deref())
                .collect();
            if keys.len() != skipped.len() {
                return Err(internal(
                    "the enqueue inserted nothing for a job without a key",
                ));
            }
            let rows = sqlx::query(sql::IDS_BY_KEYS)
                .bind(&keys)
                .fetch_all(&mut *conn)
                .await
                .map_err(backend)?;
            let mut found: HashMap<String, (i64, Vec<u8>)> = HashMap::with_capacity(rows.len());
            for row in rows {
                let key: String = row.try_get(0).map_err(backend)?;
                let id: i64 = row.try_get(1).map_err(backend)?;
                let hash: Vec<u8> = row.try_get(2).map_err(backend)?;
                found.insert(key, (id, hash));
            }
            pending.clear();
            for (index, key) in skipped.into_iter().zip(keys) {
                match found.remove(key) {
                    Some((id, hash)) => {
                        outcomes[index] = Some(replay_outcome(id, &hash, hashes[index].as_deref()));
                        holders.insert(key, (id, hash));
                    }
                    None => pending.push(index), // pruned in between: insert again
                }
            }
        }
        if !pending.is_empty() {
            return Err(key_kept_vanishing());
        }
        for index in repeats {
            let key = specs[index].idempotency_key.as_deref().unwrap_or_default();
            let Some((id, hash)) = holders.get(key) else {
                return Err(internal(format!(
                    "item {index}: its key was never resolved"
                )));
            };
            outcomes[index] = Some(replay_outcome(*id, hash, hashes[index].as_deref()));
        }
        outcomes
            .into_iter()
            .enumerate()
            .map(|(index, outcome)| {
                outcome.ok_or_else(|| internal(format!("item {index} was not resolved")))
            })
            .collect()
    }

    /// One `insert ... select from unnest(...)` of the items `indices` of `specs` (at most one
    /// item per idempotency key); returns `(index, id)` of the jobs created (items whose key is
    /// taken are skipped).
    async fn insert_batch(
        &self,
        conn: &mut PgConnection,
        specs: &[JobSpec],
        hashes: &[Option<Vec<u8>>],
        indices: &[usize],
        now: Option<DateTime<Utc>>,
    ) -> StoreResult<Vec<(usize, i64)>> {
        let n = indices.len();
        let mut queue = Vec::with_capacity(n);
        let mut kind = Vec::with_capacity(n);
        let mut payload = Vec::with_capacity(n);
        let mut priority = Vec::with_capacity(n);
        let mut run_at = Vec::with_capacity(n);
        let mut delay_ms = Vec::with_capacity(n);
        let mut max_attempts = Vec::with_capacity(n);
        let mut base_ms = Vec::with_capacity(n);
        let mut cap_ms = Vec::with_capacity(n);
        let mut jitter = Vec::with_capacity(n);
        let mut timeout_ms = Vec::with_capacity(n);
        let mut key = Vec::with_capacity(n);
        let mut hash = Vec::with_capacity(n);
        // Items without a key, in input order; items with one, by key.
        let mut plain: Vec<usize> = Vec::with_capacity(n);
        let mut keyed: HashMap<&str, usize> = HashMap::new();
        for &index in indices {
            let spec = &specs[index];
            queue.push(spec.queue.as_str());
            kind.push(spec.kind.as_str());
            payload.push(&spec.payload);
            priority.push(spec.priority);
            run_at.push(spec.run_at);
            delay_ms.push(spec.delay_ms);
            max_attempts.push(spec.max_attempts);
            base_ms.push(spec.retry_policy.base_ms);
            cap_ms.push(spec.retry_policy.cap_ms);
            jitter.push(spec.retry_policy.jitter);
            timeout_ms.push(spec.timeout_ms);
            key.push(spec.idempotency_key.as_deref());
            hash.push(hashes[index].as_deref());
            match spec.idempotency_key.as_deref() {
                Some(k) => {
                    keyed.insert(k, index);
                }
                None => plain.push(index),
            }
        }
        let statement = if keyed.is_empty() {
            sql::ENQUEUE_MANY_PLAIN
        } else {
            sql::ENQUEUE_MANY_KEYED
        };
        let rows = sqlx::query(statement)
            .bind(queue)
            .bind(kind)
            .bind(payload)
            .bind(priority)
            .bind(run_at)
            .bind(delay_ms)
            .bind(max_attempts)
            .bind(base_ms)
            .bind(cap_ms)
            .bind(jitter)
            .bind(timeout_ms)
            .bind(key)
            .bind(hash)
            .bind(now)
            .fetch_all(&mut *conn)
            .await
            .map_err(backend)?;
        let mut created = Vec::with_capacity(rows.len());
        let mut plain_ids = Vec::with_capacity(plain.len());
        for row in &rows {
            let id: i64 = row.try_get(0).map_err(backend)?;
            let key: Option<&str> = row.try_get(1).map_err(backend)?;
            match key {
                Some(key) => match keyed.get(key) {
                    Some(&index) => created.push((index, id)),
                    None => return Err(mapping_error("a key that was not sent")),
                },
                None => plain_ids.push(id),
            }
        }
        // The rows were inserted in input order, so the sequence gave the jobs without a key
        // increasing ids in input order (and they never conflict: all of them are there).
        if plain_ids.len() != plain.len() {
            return Err(mapping_error("a job without a key is missing"));
        }
        plain_ids.sort_unstable();
        created.extend(plain.into_iter().zip(plain_ids));
        Ok(created)
    }

    /// Completes the leased job on the caller's connection, inside the caller's transaction,
    /// so the completion commits or rolls back together with the caller's own writes: the
    /// building block of exactly-once effects. Fenced like [`JobStore::job_complete`]: when the
    /// lease is no longer held (expired and recovered, the job cancelled and finished, a newer
    /// claim), it returns [`StoreError::StaleLease`] and changes nothing; the caller must then
    /// roll back, so none of its writes survive, and report the loss to the worker
    /// (`Outcome::LeaseLost` in `faultline-worker`).
    ///
    /// The statement locks the job's row until the transaction ends: make it the last statement
    /// and commit right after (the worker's heartbeat for the job waits on that lock). Under
    /// READ COMMITTED (the default) a concurrent change of the job is seen and reported as
    /// `StaleLease`; under REPEATABLE READ or SERIALIZABLE it surfaces as a serialization
    /// failure ([`StoreError::Backend`]), which must also be rolled back.
    pub async fn job_complete_in(
        &self,
        conn: &mut PgConnection,
        lease: LeaseRef,
        result: Option<Value>,
    ) -> StoreResult<Job> {
        Self::fenced(conn, lease, self.complete_query(lease, result)?).await
    }

    /// Records a failed attempt (retryable or permanent, as [`JobStore::job_fail`]) on the
    /// caller's connection, inside the caller's transaction; fenced and transactional as
    /// [`PgStore::job_complete_in`].
    pub async fn job_fail_in(
        &self,
        conn: &mut PgConnection,
        lease: LeaseRef,
        failure: &Failure,
    ) -> StoreResult<Job> {
        Self::fenced(conn, lease, self.fail_query(lease, failure)?).await
    }

    /// Puts the leased job back for `delay_ms` without using up its attempt (as
    /// [`JobStore::job_snooze`]) on the caller's connection, inside the caller's transaction;
    /// fenced and transactional as [`PgStore::job_complete_in`].
    pub async fn job_snooze_in(
        &self,
        conn: &mut PgConnection,
        lease: LeaseRef,
        delay_ms: i64,
    ) -> StoreResult<Job> {
        Self::fenced(conn, lease, self.snooze_query(lease, delay_ms)?).await
    }

    /// Runs a fenced single-job write on `executor` (the pool, or the caller's connection); no
    /// row means the lease is stale.
    async fn fenced<'c, E>(executor: E, lease: LeaseRef, query: PgQuery<'_>) -> StoreResult<Job>
    where
        E: sqlx::Executor<'c, Database = sqlx::Postgres>,
    {
        let row = query.fetch_optional(executor).await.map_err(backend)?;
        match row {
            Some(row) => job_from_row(&row).map_err(backend),
            None => Err(StoreError::StaleLease { lease }),
        }
    }

    /// The fenced completion statement (validated).
    fn complete_query(
        &self,
        lease: LeaseRef,
        result: Option<Value>,
    ) -> StoreResult<PgQuery<'static>> {
        validate_result(result.as_ref())?;
        Ok(sqlx::query(sql::COMPLETE_ONE)
            .bind(lease.job_id)
            .bind(lease.token)
            .bind(result)
            .bind(self.now()))
    }

    /// The fenced failure statement for one lease (validated).
    fn fail_query(&self, lease: LeaseRef, failure: &Failure) -> StoreResult<PgQuery<'static>> {
        self.fail_many_query(&[(lease, failure)])
    }

    /// The fenced failure statement for leases listed once each (validated).
    fn fail_many_query(&self, failures: &[(LeaseRef, &Failure)]) -> StoreResult<PgQuery<'static>> {
        let n = failures.len();
        let (mut ids, mut tokens, mut errors) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut retryable, mut delays, mut kinds) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (lease, failure) in failures {
            failure.validate()?;
            ids.push(lease.job_id);
            tokens.push(lease.token);
            errors.push(Limits::storable_text(&failure.error));
            retryable.push(failure.retryable);
            delays.push(failure.retry_delay_ms);
            kinds.push(failure.kind.as_str());
        }
        Ok(sqlx::query(sql::FAIL_MANY)
            .bind(ids)
            .bind(tokens)
            .bind(errors)
            .bind(retryable)
            .bind(delays)
            .bind(kinds)
            .bind(HISTORY)
            .bind(self.now()))
    }

    /// The fenced snooze statement (validated).
    fn snooze_query(&self, lease: LeaseRef, delay_ms: i64) -> StoreResult<PgQuery<'static>> {
        validate_snooze_ms(delay_ms)?;
        Ok(sqlx::query(sql::SNOOZE)
            .bind(lease.job_id)
            .bind(lease.token)
            .bind(delay_ms)
            .bind(self.now()))
    }

    /// Runs a conditional admin transition (`statement` binds the id and the clock, and the
    /// attempt history's length when `history`). When it matches nothing, reads the job to report
    /// `NotFound` or `IllegalTransition`; if the job is meanwhile in a state `allowed_from`, tries
    /// again.
    async fn transition(
        &self,
        id: i64,
        statement: &'static str,
        history: bool,
        event: EventKind,
        allowed_from: &[JobState],
    ) -> StoreResult<Job> {
        for _ in 0..MAX_TRANSITION_ROUNDS {
            let mut query = sqlx::query(statement).bind(id).bind(self.now());
            if history {
                query = query.bind(HISTORY);
            }
            let row = query.fetch_optional(&self.pool).await.map_err(backend)?;
            if let Some(row) = row {
                return job_from_row(&row).map_err(backend);
            }
            let state = sqlx::query(sql::STATE_OF)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
            let Some(state) = state else {
                return Err(StoreError::NotFound { id });
            };
            let from = state_from_row(&state, "state").map_err(backend)?;
            if !allowed_from.contains(&from) {
                return Err(StoreError::IllegalTransition { id, from, event });
            }
        }
        Err(internal(format!(
            "job {id} kept changing state during a {event}"
        )))
    }
}

fn replay_outcome(id: i64, stored: &[u8], presented: Option<&[u8]>) -> EnqueueOutcome {
    if presented == Some(stored) {
        EnqueueOutcome::Existing { id }
    } else {
        EnqueueOutcome::Conflict { existing_id: id }
    }
}

fn mapping_error(what: &str) -> StoreError {
    internal(format!("the batch enqueue returned {what}"))
}

fn key_kept_vanishing() -> StoreError {
    internal("the job holding the idempotency key kept disappearing (pruned) during the enqueue")
}

/// Whether `err` is a unique violation. The enqueue statements use `on conflict do nothing`, so
/// none should ever happen; should one still, the trait methods retry instead of reporting it.
fn is_unique_violation(err: &StoreError) -> bool {
    match err {
        StoreError::Backend(source) => source
            .downcast_ref::<sqlx::Error>()
            .and_then(|err| err.as_database_error())
            .is_some_and(|err| err.is_unique_violation()),
        _ => false,
    }
}

#[async_trait]
impl JobStore for PgStore {
    async fn job_enqueue(&self, spec: &JobSpec) -> StoreResult<Enqueued> {
        // A single statement is atomic on its own: no transaction needed (the notification is
        // delivered when the statement commits).
        let mut last = None;
        for _ in 0..MAX_KEY_ROUNDS {
            let mut conn = self.pool.acquire().await.map_err(backend)?;
            match self.job_enqueue_in(&mut conn, spec).await {
                Err(err) if is_unique_violation(&err) => last = Some(err),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(key_kept_vanishing))
    }

    async fn job_enqueue_many(&self, specs: &[JobSpec]) -> StoreResult<Vec<EnqueueOutcome>> {
        if specs.iter().all(|spec| spec.idempotency_key.is_none()) {
            // One statement, atomic on its own, and nothing to look up afterwards.
            let mut conn = self.pool.acquire().await.map_err(backend)?;
            return self.job_enqueue_many_in(&mut conn, specs).await;
        }
        let mut last = None;
        for _ in 0..MAX_KEY_ROUNDS {
            let mut tx = self.pool.begin().await.map_err(backend)?;
            match self.job_enqueue_many_in(&mut tx, specs).await {
                Ok(outcomes) => {
                    tx.commit().await.map_err(backend)?;
                    return Ok(outcomes);
                }
                Err(err) if is_unique_violation(&err) => last = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last.unwrap_or_else(key_kept_vanishing))
    }

    async fn job_claim(&self, params: &ClaimParams) -> StoreResult<Vec<Job>> {
        params.validate()?;
        let query = match params.queues.as_slice() {
            [queue] => sqlx::query(sql::CLAIM_ONE_QUEUE).bind(queue),
            queues => sqlx::query(sql::CLAIM_MANY_QUEUES).bind(queues),
        };
        let rows = self
            .bind_claim(query, params)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        let limited = match rows.first() {
            Some(row) => row.try_get::<bool, _>("limited").map_err(backend)?,
            None => false,
        };
        let mut jobs = if limited {
            // One of the queues has a `max_running` bound: the statement claimed nothing.
            self.claim_capped(params).await?
        } else {
            let mut jobs = Vec::with_capacity(rows.len());
            for row in &rows {
                if row
                    .try_get::<Option<i64>, _>("id")
                    .map_err(backend)?
                    .is_some()
                {
                    jobs.push(job_from_row(row).map_err(backend)?);
                }
            }
            jobs
        };
        jobs.sort_by_key(|job| (job.priority, job.next_run_at, job.id));
        Ok(jobs)
    }

    async fn job_release_claim(&self, claim_id: i64) -> StoreResult<u64> {
        let released: i64 = sqlx::query_scalar(sql::RELEASE_CLAIM)
            .bind(claim_id)
            .bind(self.now())
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        Ok(u64::try_from(released).unwrap_or(0))
    }

    async fn job_heartbeat_many(
        &self,
        leases: &[LeaseRef],
        extend_ms: i64,
    ) -> StoreResult<Vec<HeartbeatOutcome>> {
        validate_extend_ms(extend_ms)?;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        // Each lease once, by id: concurrent batches lock their rows in one order.
        let mut unique: Vec<(i64, i64)> = leases.iter().map(|l| (l.job_id, l.token)).collect();
        unique.sort_unstable();
        unique.dedup();
        let (ids, tokens): (Vec<i64>, Vec<i64>) = unique.into_iter().unzip();
        let rows = sqlx::query(sql::HEARTBEAT_MANY)
            .bind(ids)
            .bind(tokens)
            .bind(extend_ms)
            .bind(self.now())
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        let mut extended: HashMap<LeaseRef, HeartbeatOutcome> = HashMap::with_capacity(rows.len());
        for row in rows {
            let lease = LeaseRef {
                job_id: row.try_get(0).map_err(backend)?,
                token: row.try_get(1).map_err(backend)?,
            };
            let outcome = HeartbeatOutcome::Extended {
                lease_expires_at: row.try_get(2).map_err(backend)?,
                cancel_requested: row.try_get(3).map_err(backend)?,
            };
            extended.insert(lease, outcome);
        }
        Ok(leases
            .iter()
            .map(|lease| {
                extended
                    .get(lease)
                    .copied()
                    .unwrap_or(HeartbeatOutcome::Lost)
            })
            .collect())
    }

    async fn job_complete(&self, lease: LeaseRef, result: Option<Value>) -> StoreResult<Job> {
        Self::fenced(&self.pool, lease, self.complete_query(lease, result)?).await
    }

    async fn job_complete_many(
        &self,
        completions: &[(LeaseRef, Option<Value>)],
    ) -> StoreResult<Vec<WriteOutcome>> {
        for (_, result) in completions {
            validate_result(result.as_ref())?;
        }
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        // A lease listed twice completes once (by its first entry); the repeat is stale, as it
        // would be if sent afterwards.
        let mut seen: HashSet<LeaseRef> = HashSet::with_capacity(completions.len());
        let mut first = Vec::with_capacity(completions.len());
        let mut sent = Vec::with_capacity(completions.len());
        for (lease, result) in completions {
            let is_first = seen.insert(*lease);
            first.push(is_first);
            if is_first {
                sent.push((lease.job_id, lease.token, result.as_ref()));
            }
        }
        // By id: concurrent batches lock their rows in one order.
        sent.sort_unstable_by_key(|&(id, token, _)| (id, token));
        let mut ids = Vec::with_capacity(sent.len());
        let mut tokens = Vec::with_capacity(sent.len());
        let mut results = Vec::with_capacity(sent.len());
        for (id, token, result) in sent {
            ids.push(id);
            tokens.push(token);
            results.push(result);
        }
        let rows = sqlx::query(sql::COMPLETE_MANY)
            .bind(ids)
            .bind(tokens)
            .bind(results)
            .bind(self.now())
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        let mut accepted: HashSet<LeaseRef> = HashSet::with_capacity(rows.len());
        for row in rows {
            accepted.insert(LeaseRef {
                job_id: row.try_get(0).map_err(backend)?,
                token: row.try_get(1).map_err(backend)?,
            });
        }
        Ok(completions
            .iter()
            .zip(first)
            .map(|((lease, _), is_first)| {
                if is_first && accepted.contains(lease) {
                    WriteOutcome::Accepted
                } else {
                    WriteOutcome::Stale
                }
            })
            .collect())
    }

    async fn job_fail(&self, lease: LeaseRef, failure: &Failure) -> StoreResult<Job> {
        Self::fenced(&self.pool, lease, self.fail_query(lease, failure)?).await
    }

    async fn job_fail_many(
        &self,
        failures: &[(LeaseRef, Failure)],
    ) -> StoreResult<Vec<FailOutcome>> {
        for (_, failure) in failures {
            failure.validate()?;
        }
        if failures.is_empty() {
            return Ok(Vec::new());
        }
        // As in job_complete_many: a repeated lease applies once (first entry), rows by id.
        let mut seen: HashSet<LeaseRef> = HashSet::with_capacity(failures.len());
        let mut first = Vec::with_capacity(failures.len());
        let mut sent = Vec::with_capacity(failures.len());
        for (lease, failure) in failures {
            let is_first = seen.insert(*lease);
            first.push(is_first);
            if is_first {
                sent.push((*lease, failure));
            }
        }
        sent.sort_unstable_by_key(|(lease, _)| (lease.job_id, lease.token));
        let rows = self
            .fail_many_query(&sent)?
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        let mut applied: HashMap<LeaseRef, JobState> = HashMap::with_capacity(rows.len());
        for row in rows {
            let lease = LeaseRef {
                job_id: row.try_get("id").map_err(backend)?,
                token: row.try_get("fencing_token").map_err(backend)?,
            };
            applied.insert(lease, state_from_row(&row, "state").map_err(backend)?);
        }
        Ok(failures
            .iter()
            .zip(first)
            .map(|((lease, _), is_first)| match applied.get(lease) {
                Some(&state) if is_first => FailOutcome::Applied { state },
                _ => FailOutcome::Stale,
            })
            .collect())
    }

    async fn job_snooze(&self, lease: LeaseRef, delay_ms: i64) -> StoreResult<Job> {
        Self::fenced(&self.pool, lease, self.snooze_query(lease, delay_ms)?).await
    }

    async fn job_cancel(&self, id: i64) -> StoreResult<Job> {
        self.transition(
            id,
            sql::CANCEL,
            false,
            EventKind::Cancel,
            &[JobState::Queued, JobState::Running],
        )
        .await
    }

    async fn job_redrive(&self, id: i64) -> StoreResult<Job> {
        self.transition(
            id,
            sql::REDRIVE,
            false,
            EventKind::Redrive,
            &[JobState::Failed, JobState::Cancelled],
        )
        .await
    }

    async fn job_rescue_expired(&self, limit: u32) -> StoreResult<Vec<Job>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(sql::RESCUE_EXPIRED)
            .bind(i64::from(limit))
            .bind(self.now())
            .bind(HISTORY)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        let mut rescued = rows
            .iter()
            .map(|row| {
                let lease_end: DateTime<Utc> = row.try_get("rescued_lease_end")?;
                Ok((lease_end, job_from_row(row)?))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(backend)?;
        rescued.sort_by_key(|(lease_end, job)| (*lease_end, job.id));
        Ok(rescued.into_iter().map(|(_, job)| job).collect())
    }

    async fn job_expire_lease(&self, id: i64) -> StoreResult<Job> {
        self.transition(
            id,
            sql::EXPIRE_LEASE,
            true,
            EventKind::LeaseExpired,
            &[JobState::Running],
        )
        .await
    }

    async fn job_get(&self, id: i64) -> StoreResult<Job> {
        let row = sqlx::query(sql::GET)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        match row {
            Some(row) => job_from_row(&row).map_err(backend),
            None => Err(StoreError::NotFound { id }),
        }
    }

    async fn job_list(&self, params: &ListParams) -> StoreResult<JobPage> {
        params.validate()?;
        let limit = usize::try_from(params.limit).map_err(|_| invalid("page size too large"))?;
        // One row more than the page tells whether there is a next page.
        let rows = sqlx::query(sql::LIST)
            .bind(params.queue.as_deref())
            .bind(params.state.map(JobState::as_str))
            .bind(params.kind.as_deref())
            .bind(params.before_id)
            .bind(i64::from(params.limit) + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        let mut jobs = rows
            .iter()
            .take(limit)
            .map(job_from_row)
            .collect::<Result<Vec<Job>, _>>()
            .map_err(backend)?;
        let next_cursor = if rows.len() > limit {
            jobs.last().map(|job| job.id)
        } else {
            None
        };
        jobs.shrink_to_fit();
        Ok(JobPage { jobs, next_cursor })
    }

    async fn queue_stats(&self) -> StoreResult<Vec<QueueStats>> {
        let rows = sqlx::query(sql::QUEUE_STATS)
            .bind(self.now())
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        // Sorted by queue name in Rust (byte order), independent of the database collation.
        let mut queues: BTreeMap<String, QueueStats> = BTreeMap::new();
        for row in &rows {
            let queue: String = row.try_get(0).map_err(backend)?;
            let state = state_from_row(row, "state").map_err(backend)?;
            let count: i64 = row.try_get(2).map_err(backend)?;
            let oldest: Option<DateTime<Utc>> = row.try_get(3).map_err(backend)?;
            let stats = queues.entry(queue.clone()).or_insert_with(|| QueueStats {
                queue,
                counts: JobState::ALL.iter().map(|&state| (state, 0)).collect(),
                oldest_ready_at: None,
            });
            if let Some(slot) = stats.counts.iter_mut().find(|(s, _)| *s == state) {
                slot.1 = count;
            }
            stats.oldest_ready_at = stats.oldest_ready_at.or(oldest);
        }
        Ok(queues.into_values().collect())
    }

    async fn queue_backlog(&self) -> StoreResult<Vec<QueueBacklog>> {
        let rows = sqlx::query(sql::QUEUE_BACKLOG)
            .bind(self.now())
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        // Sorted by queue name in Rust (byte order), independent of the database collation.
        let mut queues: BTreeMap<String, QueueBacklog> = BTreeMap::new();
        for row in &rows {
            let queue: String = row.try_get(0).map_err(backend)?;
            let queued: i64 = row.try_get(1).map_err(backend)?;
            let ready: i64 = row.try_get(2).map_err(backend)?;
            let running: i64 = row.try_get(3).map_err(backend)?;
            let oldest: Option<DateTime<Utc>> = row.try_get(4).map_err(backend)?;
            let backlog = queues.entry(queue.clone()).or_insert_with(|| QueueBacklog {
                queue,
                queued: 0,
                ready: 0,
                running: 0,
                oldest_ready_at: None,
            });
            backlog.queued += queued;
            backlog.ready += ready;
            backlog.running += running;
            backlog.oldest_ready_at = backlog.oldest_ready_at.or(oldest);
        }
        Ok(queues.into_values().collect())
    }

    async fn job_prune(&self, params: &PruneParams) -> StoreResult<u64> {
        if params.limit == 0 {
            return Ok(0);
        }
        let done = sqlx::query(sql::PRUNE)
            .bind(clamp_retention(params.succeeded_retention_ms))
            .bind(clamp_retention(params.failed_retention_ms))
            .bind(clamp_retention(params.cancelled_retention_ms))
            .bind(i64::from(params.limit))
            .bind(self.now())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }

    async fn queue_list(&self) -> StoreResult<Vec<QueueInfo>> {
        let rows = sqlx::query(sql::QUEUE_LIST)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(queue_from_row)
            .collect::<Result<_, _>>()
            .map_err(backend)
    }

    async fn queue_pause(&self, name: &str) -> StoreResult<QueueInfo> {
        self.set_paused(name, true).await
    }

    async fn queue_resume(&self, name: &str) -> StoreResult<QueueInfo> {
        self.set_paused(name, false).await
    }

    async fn queue_set_limits(&self, name: &str, limits: &QueueLimits) -> StoreResult<QueueInfo> {
        validate_queue_name(name)?;
        limits.validate()?;
        let row = sqlx::query(sql::QUEUE_SET_LIMITS)
            .bind(name)
            .bind(limits.max_running)
            .bind(self.now())
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        queue_from_row(&row).map_err(backend)
    }

    async fn leader_elect(&self, params: &ElectParams) -> StoreResult<Leadership> {
        params.validate()?;
        let row = sqlx::query(sql::LEADER_ELECT)
            .bind(&params.candidate)
            .bind(params.ttl_ms)
            .bind(self.now())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        let seen = row
            .as_ref()
            .map(leadership_from_row)
            .transpose()
            .map_err(backend)?;
        match seen {
            Some(leadership) if leadership.remaining_ms > 0 => Ok(leadership),
            // No row, or a lapsed one that this statement did not take: another candidate's
            // insert or takeover committed after this statement's snapshot (the upsert waited
            // for it, then found it current). Read the row again with a fresh snapshot.
            _ => self
                .leader_get()
                .await?
                .ok_or_else(|| internal("the leader row vanished during an election")),
        }
    }

    async fn leader_resign(&self, leader_id: &str, term: i64) -> StoreResult<bool> {
        let row = sqlx::query(sql::LEADER_RESIGN)
            .bind(leader_id)
            .bind(term)
            .bind(self.now())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        Ok(row.is_some())
    }

    async fn leader_get(&self) -> StoreResult<Option<Leadership>> {
        let row = sqlx::query(sql::LEADER_GET)
            .bind(self.now())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.as_ref()
            .map(leadership_from_row)
            .transpose()
            .map_err(backend)
    }

    async fn process_register(&self, spec: &ProcessSpec) -> StoreResult<ProcessInfo> {
        validate_process(spec)?;
        let row = sqlx::query(sql::PROCESS_REGISTER)
            .bind(&spec.id)
            .bind(&spec.role)
            .bind(&spec.host)
            .bind(spec.pid)
            .bind(&spec.version)
            .bind(sqlx::types::Json(&spec.queues))
            .bind(self.now())
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        process_from_row(&row).map_err(backend)
    }

    async fn process_remove(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query(sql::PROCESS_REMOVE)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() > 0)
    }

    async fn process_list(&self) -> StoreResult<Vec<ProcessInfo>> {
        let rows = sqlx::query(sql::PROCESS_LIST)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(process_from_row)
            .collect::<Result<_, _>>()
            .map_err(backend)
    }

    async fn process_prune(&self, older_than_ms: i64) -> StoreResult<u64> {
        let done = sqlx::query(sql::PROCESS_PRUNE)
            .bind(clamp_retention(older_than_ms))
            .bind(self.now())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }
}

impl PgStore {
    /// Binds the parameters after the queue(s) of every claim statement: kinds, limit, worker,
    /// lease, clock and claim id.
    fn bind_claim<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        params: &'q ClaimParams,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&params.kinds)
            .bind(i64::from(params.limit))
            .bind(&params.worker_id)
            .bind(params.lease_ms)
            .bind(self.now())
            .bind(params.claim_id)
    }

    /// A claim that touches bounded queues, in one transaction: their rows locked first, then the
    /// capped claim under a snapshot that sees every claim that held those locks before (see
    /// `sql::CLAIM_CAPPED`).
    async fn claim_capped(&self, params: &ClaimParams) -> StoreResult<Vec<Job>> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        sqlx::query(sql::LOCK_BOUNDED_QUEUES)
            .bind(&params.queues)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        let query = sqlx::query(sql::CLAIM_CAPPED).bind(&params.queues);
        let rows = self
            .bind_claim(query, params)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        rows.iter()
            .map(job_from_row)
            .collect::<Result<Vec<Job>, _>>()
            .map_err(backend)
    }

    async fn set_paused(&self, name: &str, paused: bool) -> StoreResult<QueueInfo> {
        validate_queue_name(name)?;
        let row = sqlx::query(sql::QUEUE_SET_PAUSED)
            .bind(name)
            .bind(paused)
            .bind(self.now())
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        queue_from_row(&row).map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_is_existing_only_with_the_same_fingerprint() {
        assert_eq!(
            replay_outcome(7, b"abc", Some(b"abc")),
            EnqueueOutcome::Existing { id: 7 }
        );
        assert_eq!(
            replay_outcome(7, b"abc", Some(b"abd")),
            EnqueueOutcome::Conflict { existing_id: 7 }
        );
        assert_eq!(
            replay_outcome(7, b"abc", None),
            EnqueueOutcome::Conflict { existing_id: 7 }
        );
    }

    #[test]
    fn a_missing_row_is_not_a_unique_violation() {
        assert!(!is_unique_violation(&backend(sqlx::Error::RowNotFound)));
        assert!(!is_unique_violation(&StoreError::NotFound { id: 1 }));
    }
}
