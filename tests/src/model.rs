//! Model-based tests of the `JobStore` port: random sequences of operations run against a real
//! store and against a model that knows only `faultline_domain::Job::apply`; after every step the
//! outcomes, every stored job (field by field), the domain invariants and the queue statistics
//! must agree.
//!
//! Lease-holder operations pick a lease among every lease ever handed out (stale ones included),
//! a token not handed out (yet), or a lease on an unknown job; cancel and redrive pick among every
//! job (most recently leased first) or an unknown id. Every duration is a multiple of 500 ms so
//! that boundaries (a lease ending exactly now, a job due exactly now) come up often. Jobs use a
//! retry policy without jitter, so the policy's delays are exact. The store's ids are taken as
//! they come (PostgreSQL may skip sequence values), checked only to increase.
//!
//! Run [`check`] with a [`Target`]; a failure panics with the shrunk sequence of operations and a
//! trace of what each step did in the store and in the model.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use faultline_domain::{
    Event, EventKind, FailureKind, Job, JobSpec, JobState, RetryPolicy, TransitionError,
    payload_fingerprint,
};
use faultline_memory::MemoryStore;
use faultline_ports::{
    ClaimParams, EnqueueOutcome, Enqueued, FailOutcome, Failure, HeartbeatOutcome, JobStore,
    LeaseRef, ListParams, ManualClock, StoreError, WriteOutcome,
};
use faultline_postgres::PgStore;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use serde_json::{Value, json};

use crate::TestDb;
use crate::contract::start;

/// The retry policy of every generated job: 1 s, 2 s, 4 s, capped at 4 s, no jitter.
pub const POLICY: RetryPolicy = RetryPolicy {
    base_ms: 1_000,
    cap_ms: 4_000,
    jitter: 0.0,
};

const QUEUES: [&str; 2] = ["q0", "q1"];
const KINDS: [&str; 2] = ["a", "b"];
const KEYS: [&str; 3] = ["key0", "key1", "key2"];
const WORKERS: [&str; 3] = ["w0", "w1", "w2"];
/// Ids at and above this are never handed out in a case: they name unknown jobs.
const UNKNOWN_ID: i64 = 1_000_000;

/// A job to enqueue, from small sets so that keys, ties and filters collide often.
#[derive(Clone, PartialEq)]
pub struct NewJob {
    /// Index into the two queues.
    pub queue: u8,
    /// Index into the two kinds.
    pub kind: u8,
    /// 0..=2.
    pub priority: i16,
    /// 1..=4.
    pub max_attempts: i32,
    /// Optional delay, a multiple of 500 ms.
    pub delay_ms: Option<i64>,
    /// Optional index into the three idempotency keys.
    pub key: Option<u8>,
    /// Selects one of two payloads.
    pub payload: u8,
}

impl NewJob {
    /// The request this describes.
    pub fn spec(&self) -> JobSpec {
        JobSpec {
            queue: QUEUES[usize::from(self.queue)].to_owned(),
            kind: KINDS[usize::from(self.kind)].to_owned(),
            payload: json!({ "p": self.payload }),
            priority: self.priority,
            run_at: None,
            delay_ms: self.delay_ms,
            max_attempts: self.max_attempts,
            retry_policy: POLICY,
            timeout_ms: None,
            idempotency_key: self.key.map(|k| KEYS[usize::from(k)].to_owned()),
        }
    }
}

impl fmt::Debug for NewJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} prio {} max {}",
            QUEUES[usize::from(self.queue)],
            KINDS[usize::from(self.kind)],
            self.priority,
            self.max_attempts
        )?;
        if let Some(ms) = self.delay_ms {
            write!(f, " delay {ms}ms")?;
        }
        if let Some(k) = self.key {
            write!(f, " key {}", KEYS[usize::from(k)])?;
        }
        write!(f, " payload {}", self.payload)
    }
}

/// Which queues a claim asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Queues {
    /// `q0` only.
    Q0,
    /// `q1` only.
    Q1,
    /// Both queues.
    Both,
}

/// Which lease a lease holder's operation presents. `job` picks among the jobs ever leased, most
/// recently leased first (past the last: an unknown job); `age` picks among that job's leases,
/// newest first (past the oldest: the token after the newest, not handed out yet).
#[derive(Clone, Copy, PartialEq)]
pub struct LeasePick {
    /// Index into the leased jobs, most recently leased first.
    pub job: u8,
    /// 0: the job's newest lease, 1: the one before...
    pub age: u8,
}

impl fmt::Debug for LeasePick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{}.{}", self.job, self.age)
    }
}

/// One step of a generated sequence. Leases are [`LeasePick`]s; a `job` picks among the jobs,
/// most recently leased first, then never leased ones newest first; past the last is an
/// unknown id.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `job_enqueue`.
    Enqueue(NewJob),
    /// `job_enqueue_many`.
    EnqueueMany(Vec<NewJob>),
    /// `job_claim`.
    Claim {
        /// Queues asked for.
        queues: Queues,
        /// A kind filter (index into the kinds), or any kind.
        kind: Option<u8>,
        /// 1..=3.
        limit: u32,
        /// A multiple of 500 ms.
        lease_ms: i64,
        /// Index into the workers.
        worker: u8,
    },
    /// `job_heartbeat_many` (distinct leases).
    Heartbeat {
        /// Lease picks.
        leases: Vec<LeasePick>,
        /// A multiple of 500 ms.
        extend_ms: i64,
    },
    /// `job_complete`.
    Complete {
        /// Lease pick.
        lease: LeasePick,
        /// With a result or without.
        with_result: bool,
    },
    /// `job_complete_many` (a repeated lease included).
    CompleteMany {
        /// Lease picks.
        leases: Vec<LeasePick>,
    },
    /// `job_fail`, retryable, with an explicit delay or the policy's.
    FailRetryable {
        /// Lease pick.
        lease: LeasePick,
        /// Explicit delay, or `None` for the job's retry policy.
        delay_ms: Option<i64>,
    },
    /// `job_fail`, permanent.
    FailPermanently {
        /// Lease pick.
        lease: LeasePick,
    },
    /// `job_snooze`.
    Snooze {
        /// Lease pick.
        lease: LeasePick,
        /// A multiple of 500 ms.
        delay_ms: i64,
    },
    /// Moves the clock forward.
    Advance {
        /// A multiple of 500 ms.
        ms: i64,
    },
    /// `job_rescue_expired`.
    Rescue {
        /// 1..=4.
        limit: u32,
    },
    /// `job_cancel`.
    Cancel {
        /// Job pick.
        job: u8,
    },
    /// `job_redrive`.
    Redrive {
        /// Job pick.
        job: u8,
    },
    /// `queue_pause`.
    Pause {
        /// Index into the two queues.
        queue: u8,
    },
    /// `queue_resume`.
    Resume {
        /// Index into the two queues.
        queue: u8,
    },
    /// `job_fail_many`, retryable with the policy's delay or permanent per item (a repeated
    /// lease included).
    FailMany {
        /// Lease picks, each with "retryable".
        items: Vec<(LeasePick, bool)>,
    },
}

fn half_seconds(range: std::ops::RangeInclusive<i64>) -> impl Strategy<Value = i64> + Clone {
    range.prop_map(|n| n * 500)
}

/// Picks of jobs: mostly among the first few, sometimes anywhere (or past the end).
fn pick() -> impl Strategy<Value = u8> + Clone {
    prop_oneof![4 => 0_u8..2, 2 => 2_u8..5, 1 => any::<u8>()]
}

/// Picks of leases: mostly the newest lease of a recently leased job, often an older one.
fn lease_pick() -> impl Strategy<Value = LeasePick> + Clone {
    (pick(), prop_oneof![3 => Just(0_u8), 2 => 1_u8..4])
        .prop_map(|(job, age)| LeasePick { job, age })
}

fn new_job() -> impl Strategy<Value = NewJob> + Clone {
    (
        0_u8..2,
        0_u8..2,
        0_i16..3,
        prop_oneof![2 => Just(1_i32), 2 => Just(2), 1 => 3_i32..=4],
        proptest::option::weighted(0.3, half_seconds(1..=6)),
        proptest::option::weighted(0.5, 0_u8..3),
        0_u8..2,
    )
        .prop_map(
            |(queue, kind, priority, max_attempts, delay_ms, key, payload)| NewJob {
                queue,
                kind,
                priority,
                max_attempts,
                delay_ms,
                key,
                payload,
            },
        )
}

/// A retry delay: the policy's, none at all, or an explicit one.
fn retry_delay() -> impl Strategy<Value = Option<i64>> + Clone {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(0)),
        1 => half_seconds(1..=6).prop_map(Some),
    ]
}

/// One random operation.
pub fn op() -> impl Strategy<Value = Op> {
    let queues = prop_oneof![
        1 => Just(Queues::Q0),
        1 => Just(Queues::Q1),
        2 => Just(Queues::Both),
    ];
    prop_oneof![
        4 => new_job().prop_map(Op::Enqueue).boxed(),
        1 => vec(new_job(), 1..4).prop_map(Op::EnqueueMany).boxed(),
        5 => (
            queues,
            proptest::option::weighted(0.15, 0_u8..2),
            1_u32..=3,
            half_seconds(2..=10),
            0_u8..3
        )
            .prop_map(|(queues, kind, limit, lease_ms, worker)| Op::Claim {
                queues,
                kind,
                limit,
                lease_ms,
                worker
            })
            .boxed(),
        3 => (vec(lease_pick(), 1..4), half_seconds(1..=10))
            .prop_map(|(leases, extend_ms)| Op::Heartbeat { leases, extend_ms })
            .boxed(),
        2 => (lease_pick(), any::<bool>())
            .prop_map(|(lease, with_result)| Op::Complete { lease, with_result })
            .boxed(),
        1 => vec(lease_pick(), 1..4)
            .prop_map(|leases| Op::CompleteMany { leases })
            .boxed(),
        4 => (lease_pick(), retry_delay())
            .prop_map(|(lease, delay_ms)| Op::FailRetryable { lease, delay_ms })
            .boxed(),
        1 => lease_pick().prop_map(|lease| Op::FailPermanently { lease }).boxed(),
        2 => (lease_pick(), half_seconds(0..=6))
            .prop_map(|(lease, delay_ms)| Op::Snooze { lease, delay_ms })
            .boxed(),
        4 => half_seconds(0..=8).prop_map(|ms| Op::Advance { ms }).boxed(),
        3 => (1_u32..=4).prop_map(|limit| Op::Rescue { limit }).boxed(),
        3 => pick().prop_map(|job| Op::Cancel { job }).boxed(),
        2 => pick().prop_map(|job| Op::Redrive { job }).boxed(),
        1 => (0_u8..2).prop_map(|queue| Op::Pause { queue }).boxed(),
        1 => (0_u8..2).prop_map(|queue| Op::Resume { queue }).boxed(),
        2 => vec((lease_pick(), any::<bool>()), 1..4)
            .prop_map(|items| Op::FailMany { items })
            .boxed(),
    ]
}

/// A sequence of 1 to 49 operations.
pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    vec(op(), 1..50)
}

/// What a store refused, in a comparable form.
#[derive(Debug, Clone, PartialEq)]
enum Refusal {
    NotFound(i64),
    Stale(LeaseRef),
    Conflict {
        key: String,
        existing_id: i64,
    },
    Illegal {
        id: i64,
        from: JobState,
        event: EventKind,
    },
    Invalid(String),
    Backend(String),
}

impl From<StoreError> for Refusal {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { id } => Refusal::NotFound(id),
            StoreError::StaleLease { lease } => Refusal::Stale(lease),
            StoreError::Conflict { key, existing_id } => Refusal::Conflict { key, existing_id },
            StoreError::IllegalTransition { id, from, event } => {
                Refusal::Illegal { id, from, event }
            }
            StoreError::Invalid(msg) => Refusal::Invalid(msg),
            other => Refusal::Backend(other.to_string()),
        }
    }
}

/// The expected store: jobs changed only through `Job::apply`.
struct Model {
    now: DateTime<Utc>,
    jobs: BTreeMap<i64, Job>,
    /// Every lease handed out, oldest first.
    leases: Vec<LeaseRef>,
    /// The queue rows: name, paused.
    queues: BTreeMap<String, bool>,
}

/// What the model says an enqueue does.
enum Decision {
    Create,
    Existing(i64),
    Conflict { key: String, existing_id: i64 },
}

impl Model {
    /// Ids of the jobs ever leased, most recently leased first.
    fn leased_jobs(&self) -> Vec<i64> {
        let mut ids = Vec::new();
        for lease in self.leases.iter().rev() {
            if !ids.contains(&lease.job_id) {
                ids.push(lease.job_id);
            }
        }
        ids
    }

    fn lease(&self, pick: LeasePick) -> LeaseRef {
        let Some(&job_id) = self.leased_jobs().get(usize::from(pick.job)) else {
            return LeaseRef {
                job_id: UNKNOWN_ID + i64::from(pick.job),
                token: 1,
            };
        };
        let tokens: Vec<i64> = self
            .leases
            .iter()
            .rev()
            .filter(|l| l.job_id == job_id)
            .map(|l| l.token)
            .collect();
        let token = match tokens.get(usize::from(pick.age)) {
            Some(token) => *token,
            None => tokens[0] + 1,
        };
        LeaseRef { job_id, token }
    }

    fn distinct_leases(&self, picks: &[LeasePick]) -> Vec<LeaseRef> {
        let mut seen = BTreeSet::new();
        picks
            .iter()
            .map(|p| self.lease(*p))
            .filter(|l| seen.insert((l.job_id, l.token)))
            .collect()
    }

    /// Jobs most recently leased first, then the never leased ones newest first; past the last,
    /// an unknown id.
    fn job_id(&self, pick: u8) -> i64 {
        let mut ids = self.leased_jobs();
        ids.extend(
            self.jobs
                .keys()
                .rev()
                .filter(|id| !ids.contains(id))
                .collect::<Vec<_>>(),
        );
        ids.get(usize::from(pick))
            .copied()
            .unwrap_or(UNKNOWN_ID + i64::from(pick))
    }

    fn max_id(&self) -> i64 {
        self.jobs.keys().next_back().copied().unwrap_or(0)
    }

    fn decide(&self, spec: &JobSpec) -> Decision {
        if let Some(key) = &spec.idempotency_key
            && let Some(job) = self
                .jobs
                .values()
                .find(|j| j.idempotency_key.as_ref() == Some(key))
        {
            if payload_fingerprint(&job.queue, &job.kind, &job.payload) == spec.fingerprint() {
                return Decision::Existing(job.id);
            }
            return Decision::Conflict {
                key: key.clone(),
                existing_id: job.id,
            };
        }
        Decision::Create
    }

    /// Applies a lease holder's event built from the job's current state; unknown jobs and
    /// refused events are stale.
    fn holder_write(
        &mut self,
        lease: LeaseRef,
        event: impl FnOnce(&Job) -> Event,
    ) -> Result<Job, Refusal> {
        let Some(job) = self.jobs.get_mut(&lease.job_id) else {
            return Err(Refusal::Stale(lease));
        };
        let event = event(job);
        match job.apply(event) {
            Ok(()) => Ok(job.clone()),
            Err(TransitionError::StaleLease { .. }) => Err(Refusal::Stale(lease)),
            Err(other) => panic!("a lease holder's write refused with {other:?}"),
        }
    }

    fn user_write(&mut self, id: i64, event: Event) -> Result<Job, Refusal> {
        let Some(job) = self.jobs.get_mut(&id) else {
            return Err(Refusal::NotFound(id));
        };
        let kind = event.kind();
        match job.apply(event) {
            Ok(()) => Ok(job.clone()),
            Err(TransitionError::IllegalTransition { from, event }) => {
                Err(Refusal::Illegal { id, from, event })
            }
            Err(other) => panic!("a {kind} refused with {other:?}"),
        }
    }
}

/// The delay the job's policy gives its current attempt (exact: no jitter).
fn policy_delay(job: &Job) -> i64 {
    job.retry_policy.delay_ms(job.attempts, 0.5)
}

fn short(job: &Job) -> String {
    format!(
        "job {} {} att {}/{} tok {}{}",
        job.id,
        job.state,
        job.attempts,
        job.max_attempts,
        job.fencing_token,
        if job.cancel_requested {
            " cancel-requested"
        } else {
            ""
        }
    )
}

fn short_result<T>(result: &Result<T, Refusal>, ok: impl Fn(&T) -> String) -> String {
    match result {
        Ok(v) => format!("Ok({})", ok(v)),
        Err(e) => format!("Err({e:?})"),
    }
}

fn short_jobs(jobs: &[Job]) -> String {
    let parts: Vec<String> = jobs.iter().map(short).collect();
    format!("[{}]", parts.join(", "))
}

/// The fields in which two jobs differ, for readable failures.
fn job_diff(store: &Job, model: &Job) -> String {
    let (Ok(Value::Object(s)), Ok(Value::Object(m))) =
        (serde_json::to_value(store), serde_json::to_value(model))
    else {
        return format!("store {store:?}\nmodel {model:?}");
    };
    let mut out = String::new();
    for (field, model_value) in &m {
        let store_value = s.get(field).unwrap_or(&Value::Null);
        if store_value != model_value {
            let _ = write!(
                out,
                "\n    {field}: store {store_value} / model {model_value}"
            );
        }
    }
    out
}

/// Compares one step's outcome.
fn same<T: PartialEq + fmt::Debug>(
    what: &str,
    store: &Result<T, Refusal>,
    model: &Result<T, Refusal>,
) -> Result<(), String> {
    if store == model {
        return Ok(());
    }
    let (mut got, mut want) = (format!("{store:?}"), format!("{model:?}"));
    if got.len() + want.len() > 200 {
        (got, want) = (format!("{store:#?}"), format!("{model:#?}"));
    }
    Err(format!(
        "{what}: the store and the model disagree\n  store: {got}\n  model: {want}"
    ))
}

type Counts = BTreeMap<JobState, i64>;
type QueueRow<'a> = (&'a str, Counts, Option<DateTime<Utc>>);

/// Compares the whole store with the model: every job, the invariants, the queue statistics.
async fn compare_all(store: &dyn JobStore, model: &Model) -> Result<(), String> {
    let page = store
        .job_list(&ListParams {
            limit: 1_000,
            ..ListParams::default()
        })
        .await
        .map_err(|e| format!("job_list failed: {e}"))?;
    let stored: BTreeMap<i64, Job> = page.jobs.into_iter().map(|j| (j.id, j)).collect();
    let stored_ids: Vec<i64> = stored.keys().copied().collect();
    let model_ids: Vec<i64> = model.jobs.keys().copied().collect();
    if stored_ids != model_ids {
        return Err(format!(
            "the store holds jobs {stored_ids:?}, the model {model_ids:?}"
        ));
    }
    let mut diffs = String::new();
    for (id, expected) in &model.jobs {
        let got = &stored[id];
        if got != expected {
            let _ = write!(diffs, "\n  job {id}:{}", job_diff(got, expected));
        }
        if let Err(broken) = got.check_invariants() {
            let _ = write!(
                diffs,
                "\n  job {id} in the store breaks an invariant: {broken}"
            );
        }
        if let Err(broken) = expected.check_invariants() {
            let _ = write!(
                diffs,
                "\n  job {id} in the model breaks an invariant: {broken}"
            );
        }
    }
    if !diffs.is_empty() {
        return Err(format!("stored jobs differ from the model:{diffs}"));
    }

    let stats = store
        .queue_stats()
        .await
        .map_err(|e| format!("queue_stats failed: {e}"))?;
    let mut expected: BTreeMap<&str, (Counts, Option<DateTime<Utc>>)> = BTreeMap::new();
    for job in model.jobs.values() {
        let entry = expected
            .entry(job.queue.as_str())
            .or_insert_with(|| (JobState::ALL.iter().map(|s| (*s, 0)).collect(), None));
        *entry.0.get_mut(&job.state).expect("every state") += 1;
        if job.state == JobState::Queued && job.next_run_at <= model.now {
            entry.1 = Some(entry.1.map_or(job.next_run_at, |t| t.min(job.next_run_at)));
        }
    }
    let got: Vec<QueueRow<'_>> = stats
        .iter()
        .map(|s| {
            (
                s.queue.as_str(),
                s.counts.iter().copied().collect(),
                s.oldest_ready_at,
            )
        })
        .collect();
    let want: Vec<QueueRow<'_>> = expected
        .into_iter()
        .map(|(q, (counts, oldest))| (q, counts, oldest))
        .collect();
    let counts_complete = stats.iter().all(|s| s.counts.len() == JobState::ALL.len());
    if got != want || !counts_complete {
        return Err(format!(
            "queue_stats differ:\n  store: {stats:?}\n  model: {want:?}"
        ));
    }

    let queues = store
        .queue_list()
        .await
        .map_err(|e| format!("queue_list failed: {e}"))?;
    let got: Vec<(&str, bool)> = queues.iter().map(|q| (q.name.as_str(), q.paused)).collect();
    let want: Vec<(&str, bool)> = model.queues.iter().map(|(q, p)| (q.as_str(), *p)).collect();
    if got != want {
        return Err(format!(
            "queue_list differs:\n  store: {got:?}\n  model: {want:?}"
        ));
    }

    let backlog = store
        .queue_backlog()
        .await
        .map_err(|e| format!("queue_backlog failed: {e}"))?;
    let want = crate::contract::expected_backlog(model.jobs.values(), model.now);
    if backlog != want {
        return Err(format!(
            "queue_backlog differs:\n  store: {backlog:?}\n  model: {want:?}"
        ));
    }
    Ok(())
}

/// Runs one sequence against `store` (fresh, driven by `clock` at [`start`]). Returns a
/// description of the first disagreement, with the trace of the steps before it.
pub async fn run_sequence(
    store: &dyn JobStore,
    clock: &ManualClock,
    ops: &[Op],
) -> Result<(), String> {
    let mut model = Model {
        now: start(),
        jobs: BTreeMap::new(),
        leases: Vec::new(),
        queues: BTreeMap::new(),
    };
    let mut trace = String::new();
    for (step, op) in ops.iter().enumerate() {
        let outcome = run_step(store, clock, &mut model, op).await;
        let (line, checked) = match outcome {
            Ok(line) => (line, compare_all(store, &model).await),
            Err((line, err)) => (line, Err(err)),
        };
        let _ = write!(trace, "\n  #{step} {line}");
        if let Err(err) = checked {
            return Err(format!(
                "step #{step} ({op:?}) at +{} ms: {err}\ntrace:{trace}",
                (model.now - start()).num_milliseconds()
            ));
        }
    }
    Ok(())
}

type StepResult = Result<String, (String, String)>;

async fn run_step(
    store: &dyn JobStore,
    clock: &ManualClock,
    model: &mut Model,
    op: &Op,
) -> StepResult {
    let now = model.now;
    match op {
        Op::Enqueue(new) => {
            let spec = new.spec();
            let got: Result<Enqueued, Refusal> =
                store.job_enqueue(&spec).await.map_err(Refusal::from);
            let line = format!(
                "enqueue {new:?} -> {}",
                short_result(&got, |e| format!("{} created {}", short(&e.job), e.created))
            );
            let expected = match model.decide(&spec) {
                Decision::Create => match &got {
                    Ok(out) if out.created && out.job.id > model.max_id() => {
                        let job = Job::new(out.job.id, &spec, now);
                        model.queues.entry(job.queue.clone()).or_insert(false);
                        model.jobs.insert(job.id, job.clone());
                        Ok(Enqueued { job, created: true })
                    }
                    _ => {
                        let msg = format!(
                            "enqueue: expected a new job with an id above {}, got {got:?}",
                            model.max_id()
                        );
                        return Err((line, msg));
                    }
                },
                Decision::Existing(id) => Ok(Enqueued {
                    job: model.jobs[&id].clone(),
                    created: false,
                }),
                Decision::Conflict { key, existing_id } => {
                    Err(Refusal::Conflict { key, existing_id })
                }
            };
            same("enqueue", &got, &expected).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::EnqueueMany(news) => {
            let specs: Vec<JobSpec> = news.iter().map(NewJob::spec).collect();
            let got: Result<Vec<EnqueueOutcome>, Refusal> =
                store.job_enqueue_many(&specs).await.map_err(Refusal::from);
            let line = format!("enqueue_many {news:?} -> {got:?}");
            let mut expected = Vec::new();
            for (i, spec) in specs.iter().enumerate() {
                let outcome = match model.decide(spec) {
                    Decision::Create => {
                        let id = match &got {
                            Ok(outs) => match outs.get(i) {
                                Some(EnqueueOutcome::Created { id }) if *id > model.max_id() => *id,
                                _ => 0,
                            },
                            Err(_) => 0,
                        };
                        if id == 0 {
                            let msg = format!(
                                "enqueue_many: expected item {i} to create a job with an id above \
                                 {}, got {got:?}",
                                model.max_id()
                            );
                            return Err((line, msg));
                        }
                        model.queues.entry(spec.queue.clone()).or_insert(false);
                        model.jobs.insert(id, Job::new(id, spec, now));
                        EnqueueOutcome::Created { id }
                    }
                    Decision::Existing(id) => EnqueueOutcome::Existing { id },
                    Decision::Conflict { existing_id, .. } => {
                        EnqueueOutcome::Conflict { existing_id }
                    }
                };
                expected.push(outcome);
            }
            same("enqueue_many", &got, &Ok(expected)).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::Claim {
            queues,
            kind,
            limit,
            lease_ms,
            worker,
        } => {
            let queues: Vec<String> = match queues {
                Queues::Q0 => vec![QUEUES[0].to_owned()],
                Queues::Q1 => vec![QUEUES[1].to_owned()],
                Queues::Both => QUEUES.iter().map(|q| (*q).to_owned()).collect(),
            };
            let kinds: Vec<String> = kind
                .iter()
                .map(|k| KINDS[usize::from(*k)].to_owned())
                .collect();
            let params = ClaimParams {
                queues: queues.clone(),
                kinds: kinds.clone(),
                limit: *limit,
                lease_ms: *lease_ms,
                worker_id: WORKERS[usize::from(*worker)].to_owned(),
                claim_id: None,
            };
            let got: Result<Vec<Job>, Refusal> =
                store.job_claim(&params).await.map_err(Refusal::from);
            let mut due: Vec<&Job> = model
                .jobs
                .values()
                .filter(|j| {
                    j.state == JobState::Queued
                        && queues.contains(&j.queue)
                        && !model.queues.get(&j.queue).copied().unwrap_or(false)
                        && (kinds.is_empty() || kinds.contains(&j.kind))
                        && j.next_run_at <= now
                })
                .collect();
            due.sort_by_key(|j| (j.priority, j.next_run_at, j.id));
            let chosen: Vec<i64> = due.iter().take(*limit as usize).map(|j| j.id).collect();
            let mut claimed = Vec::new();
            for id in chosen {
                let job = model.jobs.get_mut(&id).expect("chosen job");
                job.apply(Event::Claim {
                    owner: params.worker_id.clone(),
                    now,
                    lease_ms: *lease_ms,
                })
                .expect("a due queued job can be claimed");
                model.leases.push(LeaseRef::of(job));
                claimed.push(job.clone());
            }
            let line = format!(
                "claim {queues:?} kinds {kinds:?} limit {limit} lease {lease_ms}ms by {} -> {}",
                params.worker_id,
                short_result(&got, |jobs| short_jobs(jobs))
            );
            same("claim", &got, &Ok(claimed)).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::Heartbeat { leases, extend_ms } => {
            let leases = model.distinct_leases(leases);
            let got: Result<Vec<HeartbeatOutcome>, Refusal> = store
                .job_heartbeat_many(&leases, *extend_ms)
                .await
                .map_err(Refusal::from);
            let expected: Vec<HeartbeatOutcome> = leases
                .iter()
                .map(|lease| {
                    match model.holder_write(*lease, |_| Event::Heartbeat {
                        token: lease.token,
                        now,
                        extend_ms: *extend_ms,
                    }) {
                        Ok(job) => HeartbeatOutcome::Extended {
                            lease_expires_at: job.lease_expires_at.expect("running"),
                            cancel_requested: job.cancel_requested,
                        },
                        Err(_) => HeartbeatOutcome::Lost,
                    }
                })
                .collect();
            let line = format!("heartbeat {leases:?} +{extend_ms}ms -> {got:?}");
            same("heartbeat", &got, &Ok(expected)).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::Complete { lease, with_result } => {
            let lease = model.lease(*lease);
            let result = with_result.then(|| json!({ "done": lease.job_id }));
            let got: Result<Job, Refusal> = store
                .job_complete(lease, result.clone())
                .await
                .map_err(Refusal::from);
            let expected = model.holder_write(lease, |_| Event::Complete {
                token: lease.token,
                now,
                result,
            });
            let line = format!("complete {lease:?} -> {}", short_result(&got, short));
            same("complete", &got, &expected).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::CompleteMany { leases } => {
            // Repeats stay: a lease repeated within a batch is accepted at most once.
            let leases: Vec<LeaseRef> = leases.iter().map(|p| model.lease(*p)).collect();
            let items: Vec<(LeaseRef, Option<Value>)> = leases
                .iter()
                .enumerate()
                .map(|(i, l)| (*l, (i % 2 == 0).then(|| json!(i))))
                .collect();
            let got: Result<Vec<WriteOutcome>, Refusal> =
                store.job_complete_many(&items).await.map_err(Refusal::from);
            let expected: Vec<WriteOutcome> = items
                .iter()
                .map(|(lease, result)| {
                    match model.holder_write(*lease, |_| Event::Complete {
                        token: lease.token,
                        now,
                        result: result.clone(),
                    }) {
                        Ok(_) => WriteOutcome::Accepted,
                        Err(_) => WriteOutcome::Stale,
                    }
                })
                .collect();
            let line = format!("complete_many {leases:?} -> {got:?}");
            same("complete_many", &got, &Ok(expected)).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::FailRetryable { lease, delay_ms } => {
            let lease = model.lease(*lease);
            let failure = Failure {
                error: format!("retryable at +{}ms", (now - start()).num_milliseconds()),
                kind: FailureKind::Error,
                retryable: true,
                retry_delay_ms: *delay_ms,
            };
            let got: Result<Job, Refusal> =
                store.job_fail(lease, &failure).await.map_err(Refusal::from);
            let expected = model.holder_write(lease, |job| Event::FailRetryable {
                token: lease.token,
                now,
                error: failure.error.clone(),
                kind: FailureKind::Error,
                delay_ms: delay_ms.unwrap_or_else(|| policy_delay(job)),
            });
            let line = format!(
                "fail (retryable, delay {delay_ms:?}) {lease:?} -> {}",
                short_result(&got, short)
            );
            same("fail (retryable)", &got, &expected).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::Pause { queue } | Op::Resume { queue } => {
            let name = QUEUES[usize::from(*queue)];
            let pause = matches!(op, Op::Pause { .. });
            let got = if pause {
                store.queue_pause(name).await
            } else {
                store.queue_resume(name).await
            };
            let line = format!(
                "{} {name} -> {:?}",
                if pause { "pause" } else { "resume" },
                got.as_ref().map(|q| q.paused)
            );
            model.queues.insert(name.to_owned(), pause);
            match got {
                Ok(q) if q.name == name && q.paused == pause => Ok(line),
                other => Err((
                    line,
                    format!("expected {name} paused={pause}, got {other:?}"),
                )),
            }
        }
        Op::FailMany { items } => {
            let at = (now - start()).num_milliseconds();
            let batch: Vec<(LeaseRef, Failure)> = items
                .iter()
                .enumerate()
                .map(|(i, (pick, retryable))| {
                    let failure = Failure {
                        error: format!("batch item {i} at +{at}ms"),
                        kind: FailureKind::Worker,
                        retryable: *retryable,
                        retry_delay_ms: None,
                    };
                    (model.lease(*pick), failure)
                })
                .collect();
            let got: Result<Vec<FailOutcome>, Refusal> =
                store.job_fail_many(&batch).await.map_err(Refusal::from);
            let mut expected = Vec::new();
            for (lease, failure) in &batch {
                let applied = model.holder_write(*lease, |job| {
                    if failure.retryable {
                        Event::FailRetryable {
                            token: lease.token,
                            now,
                            error: failure.error.clone(),
                            kind: failure.kind,
                            delay_ms: policy_delay(job),
                        }
                    } else {
                        Event::FailPermanently {
                            token: lease.token,
                            now,
                            error: failure.error.clone(),
                            kind: failure.kind,
                        }
                    }
                });
                expected.push(match applied {
                    Ok(job) => FailOutcome::Applied { state: job.state },
                    Err(_) => FailOutcome::Stale,
                });
            }
            let line = format!("fail_many {items:?} -> {got:?}");
            same("fail_many", &got, &Ok(expected)).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::FailPermanently { lease } => {
            let lease = model.lease(*lease);
            let failure = Failure {
                error: format!("permanent at +{}ms", (now - start()).num_milliseconds()),
                kind: FailureKind::Error,
                retryable: false,
                retry_delay_ms: None,
            };
            let got: Result<Job, Refusal> =
                store.job_fail(lease, &failure).await.map_err(Refusal::from);
            let expected = model.holder_write(lease, |_| Event::FailPermanently {
                token: lease.token,
                now,
                error: failure.error.clone(),
                kind: FailureKind::Error,
            });
            let line = format!(
                "fail (permanent) {lease:?} -> {}",
                short_result(&got, short)
            );
            same("fail (permanent)", &got, &expected).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::Snooze { lease, delay_ms } => {
            let lease = model.lease(*lease);
            let got: Result<Job, Refusal> = store
                .job_snooze(lease, *delay_ms)
                .await
                .map_err(Refusal::from);
            let expected = model.holder_write(lease, |_| Event::Snooze {
                token: lease.token,
                now,
                delay_ms: *delay_ms,
            });
            let line = format!(
                "snooze {lease:?} {delay_ms}ms -> {}",
                short_result(&got, short)
            );
            same("snooze", &got, &expected).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::Advance { ms } => {
            clock.advance_ms(*ms);
            model.now += TimeDelta::milliseconds(*ms);
            Ok(format!(
                "advance {ms}ms (now +{} ms)",
                (model.now - start()).num_milliseconds()
            ))
        }
        Op::Rescue { limit } => {
            let got: Result<Vec<Job>, Refusal> = store
                .job_rescue_expired(*limit)
                .await
                .map_err(Refusal::from);
            // The earliest lease ends first, then the lowest id.
            let mut expired: Vec<(DateTime<Utc>, i64)> = model
                .jobs
                .values()
                .filter_map(|j| match (j.state, j.lease_expires_at) {
                    (JobState::Running, Some(end)) if end <= now => Some((end, j.id)),
                    _ => None,
                })
                .collect();
            expired.sort();
            let mut rescued = Vec::new();
            for (_, id) in expired.into_iter().take(*limit as usize) {
                let job = model.jobs.get_mut(&id).expect("expired job");
                let delay_ms = policy_delay(job);
                job.apply(Event::LeaseExpired { now, delay_ms })
                    .expect("an expired lease can be rescued");
                rescued.push(job.clone());
            }
            let line = format!(
                "rescue limit {limit} -> {}",
                short_result(&got, |jobs| short_jobs(jobs))
            );
            same("rescue", &got, &Ok(rescued)).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::Cancel { job } => {
            let id = model.job_id(*job);
            let got: Result<Job, Refusal> = store.job_cancel(id).await.map_err(Refusal::from);
            let expected = model.user_write(id, Event::Cancel { now });
            let line = format!("cancel job {id} -> {}", short_result(&got, short));
            same("cancel", &got, &expected).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
        Op::Redrive { job } => {
            let id = model.job_id(*job);
            let got: Result<Job, Refusal> = store.job_redrive(id).await.map_err(Refusal::from);
            let expected = model.user_write(id, Event::Redrive { now });
            let line = format!("redrive job {id} -> {}", short_result(&got, short));
            same("redrive", &got, &expected).map_err(|e| (line.clone(), e))?;
            Ok(line)
        }
    }
}

/// A fresh store for one case, driven by the given clock; the box keeps its resources alive.
pub type StoreFuture = Pin<Box<dyn Future<Output = (Arc<dyn JobStore>, Box<dyn Send>)>>>;

/// Which adapter a model test runs against.
pub struct Target {
    /// For messages.
    pub name: &'static str,
    /// Cases to run, unless `PROPTEST_CASES` says otherwise.
    pub cases: u32,
    /// Makes a fresh store for one case.
    pub make: fn(ManualClock) -> StoreFuture,
}

/// The Postgres adapter, a fresh database per case.
pub fn postgres(cases: u32) -> Target {
    Target {
        name: "postgres",
        cases,
        make: |clock| {
            Box::pin(async move {
                let db = TestDb::fresh().await;
                let store: Arc<dyn JobStore> =
                    Arc::new(PgStore::with_clock(db.pool().clone(), Arc::new(clock)));
                (store, Box::new(db) as Box<dyn Send>)
            })
        },
    }
}

/// The in-memory adapter.
pub fn memory(cases: u32) -> Target {
    Target {
        name: "memory",
        cases,
        make: |clock| {
            Box::pin(async move {
                let store: Arc<dyn JobStore> = Arc::new(MemoryStore::new(Arc::new(clock)));
                (store, Box::new(()) as Box<dyn Send>)
            })
        },
    }
}

fn numbered(ops: &[Op]) -> String {
    ops.iter()
        .enumerate()
        .map(|(i, op)| format!("  #{i} {op:?}\n"))
        .collect()
}

/// Runs the model test against `target`: random sequences, shrunk on failure, reported with the
/// minimal sequence and its trace.
pub fn check(target: Target) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(target.cases);
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2_000,
        // Postgres cases cost a fresh database each: bound the shrinking, not only its steps.
        max_shrink_time: 120_000,
        ..Config::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut runner = TestRunner::new(config);
    let result = runner.run(&ops(), |ops| {
        runtime.block_on(async {
            let clock = ManualClock::new(start());
            let (store, guard) = (target.make)(clock.clone()).await;
            let outcome = run_sequence(store.as_ref(), &clock, &ops).await;
            drop(store);
            drop(guard);
            outcome.map_err(TestCaseError::fail)
        })
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, ops)) => panic!(
            "the {} store disagrees with the model.\nminimal sequence ({} ops):\n{}\n{}",
            target.name,
            ops.len(),
            numbered(&ops),
            reason.message()
        ),
        Err(TestError::Abort(reason)) => {
            panic!(
                "the {} model test aborted: {}",
                target.name,
                reason.message()
            )
        }
    }
}
