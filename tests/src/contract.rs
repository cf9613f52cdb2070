//! The `JobStore` contract suite: one set of cases, written once against the port, run against
//! every adapter.
//!
//! Each case is a `pub async fn(Fixture)`; [`contract_suite!`](crate::contract_suite) turns the
//! whole list into one `#[tokio::test]` per case for a given fixture factory, so nextest runs
//! every case of every adapter in its own process. Time never passes on its own: every fixture
//! drives its store with a [`ManualClock`] stopped at [`start`] and the cases advance it.
//! Expected jobs are computed with `faultline_domain::Job::apply`, the state machine every
//! adapter must follow, and compared field by field.

use std::any::Any;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use faultline_domain::{
    Event, EventKind, FailureKind, Job, JobSpec, JobState, Limits, RetryPolicy, canonical_json,
};
use faultline_memory::MemoryStore;
use faultline_ports::{
    ClaimParams, Clock, EnqueueOutcome, Failure, HeartbeatOutcome, JobStore, LeaseRef, ListParams,
    MAX_CLAIM_LIMIT, MAX_PAGE_SIZE, ManualClock, PruneParams, QueueBacklog, StoreError,
    StoreResult, WriteOutcome,
};
use faultline_postgres::PgStore;
use serde_json::{Value, json};

use crate::TestDb;

mod expiry;
mod fleet;
mod limits;
mod numbers;
pub use expiry::*;
pub use fleet::*;
pub use limits::*;
pub use numbers::*;

/// Expands to one `#[tokio::test]` per contract case, in a module named `$name`, each building
/// its store with the async `$factory` expression (which must evaluate to a future of
/// [`Fixture`]).
///
/// ```ignore
/// faultline_tests::contract_suite!(memory, faultline_tests::contract::memory());
/// ```
#[macro_export]
macro_rules! contract_suite {
    ($name:ident, $factory:expr) => {
        $crate::contract_suite!(@cases $name, $factory;
            enqueue_applies_defaults_and_round_trips_every_field,
            invalid_specs_are_rejected_and_store_nothing,
            invalid_requests_are_rejected_and_change_nothing,
            nul_characters_are_refused_in_json_and_replaced_in_errors,
            claim_respects_delay_and_run_at,
            claim_orders_by_priority_then_next_run_at_then_id,
            claim_respects_limit_queues_and_kinds,
            claim_starts_an_attempt_with_a_new_token_and_a_lease_from_the_store_clock,
            stale_lease_writes_are_rejected_after_rescue_and_reclaim,
            batch_heartbeat_and_complete_report_outcomes_in_input_order,
            complete_stores_the_result,
            retryable_fail_with_an_explicit_delay_requeues_the_job,
            retryable_fail_without_a_delay_follows_the_retry_policy,
            retry_policy_jitter_stays_within_its_bounds,
            permanent_fail_ends_the_job_failed,
            exhausted_attempts_end_the_job_failed_with_the_last_error,
            poison_pill_ends_failed_after_max_attempts_via_rescue,
            snooze_gives_the_attempt_back,
            cancel_of_a_queued_job_ends_it_cancelled,
            cancel_of_a_running_job_is_seen_by_heartbeat_and_ends_it_cancelled,
            cancel_of_a_finished_job_is_illegal,
            redrive_requeues_failed_and_cancelled_jobs,
            redrive_of_a_queued_running_or_succeeded_job_is_illegal,
            unknown_ids_are_not_found_and_their_leases_are_stale,
            idempotent_replay_returns_the_existing_job,
            idempotency_key_reuse_with_another_request_conflicts,
            enqueue_many_reports_per_item_outcomes,
            concurrent_enqueues_with_one_key_create_exactly_one_job,
            concurrent_claimers_never_receive_the_same_job,
            concurrent_rescue_and_completion_never_both_apply,
            rescue_never_touches_a_completed_or_extended_job,
            rescue_respects_its_limit,
            list_filters_and_paginates_without_gaps_or_duplicates,
            queue_stats_count_states_and_the_oldest_ready_job,
            queue_backlog_counts_unfinished_jobs_and_the_oldest_ready_job,
            prune_deletes_only_finished_jobs_past_their_retention,
            prune_respects_its_limit_and_frees_idempotency_keys,
            pause_stops_claims_of_a_queue_until_it_is_resumed,
            fail_many_reports_per_item_outcomes,
            failed_attempts_are_kept_in_a_bounded_history,
            leadership_has_one_holder_per_term,
            concurrent_candidates_elect_exactly_one_leader,
            processes_register_refresh_and_expire,
            a_lost_claim_is_given_back_by_its_claim_id,
            writes_on_an_expired_lease_apply_until_it_is_rescued,
            expire_lease_ends_a_running_lease_now_as_a_rescue_would,
            payload_and_result_numbers_are_kept_exactly,
            max_running_bounds_the_running_jobs_of_a_queue,
            claims_over_bounded_and_open_queues_keep_the_claim_order,
            concurrent_claims_never_exceed_max_running,
        );
    };
    (@cases $name:ident, $factory:expr; $($case:ident),+ $(,)?) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let fixture: $crate::contract::Fixture = ($factory).await;
                    $crate::contract::$case(fixture).await;
                }
            )+
        }
    };
}

/// Where every fixture's clock starts: a fixed instant in the future, so that a timestamp taken
/// from the database's own `now()` instead of the store's clock can never pass unnoticed.
pub const START: &str = "2030-01-01T00:00:00Z";

/// [`START`] as an instant.
pub fn start() -> DateTime<Utc> {
    START.parse().expect("START is a valid RFC 3339 instant")
}

/// A retry policy without jitter, so every delay it gives is exact: 1 s, 2 s, 4 s, 5 s, 5 s...
pub const EXACT: RetryPolicy = RetryPolicy {
    base_ms: 1_000,
    cap_ms: 5_000,
    jitter: 0.0,
};

/// The default lease of the cases, in milliseconds.
pub(crate) const LEASE_MS: i64 = 10_000;

/// A store under test, the clock that drives it, and whatever must live as long as the store
/// (the test database).
pub struct Fixture {
    /// The store under test.
    pub store: Arc<dyn JobStore>,
    /// The store's clock; advance it instead of sleeping.
    pub clock: ManualClock,
    _guard: Box<dyn Any + Send>,
}

/// A Postgres fixture: a fresh migrated database and a `PgStore` whose "now" is the manual clock.
pub async fn postgres() -> Fixture {
    let db = TestDb::fresh().await;
    let clock = ManualClock::new(start());
    let store = PgStore::with_clock(db.pool().clone(), Arc::new(clock.clone()));
    Fixture::new(Arc::new(store), clock, db)
}

/// An in-memory fixture driven by the manual clock.
pub async fn memory() -> Fixture {
    let clock = ManualClock::new(start());
    let store = MemoryStore::new(Arc::new(clock.clone()));
    Fixture::new(Arc::new(store), clock, ())
}

impl Fixture {
    /// Wraps a store; `guard` is dropped with the fixture.
    pub fn new(store: Arc<dyn JobStore>, clock: ManualClock, guard: impl Any + Send) -> Fixture {
        Fixture {
            store,
            clock,
            _guard: Box::new(guard),
        }
    }

    /// The store's now.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Moves the store's clock forward.
    pub fn advance(&self, ms: i64) {
        self.clock.advance_ms(ms);
    }

    /// Enqueues `spec`, which must create a new job.
    pub async fn enqueue(&self, spec: &JobSpec) -> Job {
        let out = self
            .store
            .job_enqueue(spec)
            .await
            .unwrap_or_else(|e| panic!("enqueue of {spec:?} failed: {e}"));
        assert!(out.created, "enqueue of {spec:?} did not create a job");
        out.job
    }

    /// Claims with `params`.
    pub async fn claim(&self, params: &ClaimParams) -> Vec<Job> {
        self.store
            .job_claim(params)
            .await
            .unwrap_or_else(|e| panic!("claim with {params:?} failed: {e}"))
    }

    /// Claims `job`, which must be the first due job of its queue, as worker `w1`.
    pub async fn claim_job(&self, job: &Job, lease_ms: i64) -> Job {
        let claimed = self.claim(&params(&[&job.queue], 1, lease_ms)).await;
        assert_eq!(
            ids(&claimed),
            [job.id],
            "claiming job {} of queue {}",
            job.id,
            job.queue
        );
        claimed.into_iter().next().expect("one job")
    }

    /// One job, which must exist.
    pub async fn get(&self, id: i64) -> Job {
        self.store
            .job_get(id)
            .await
            .unwrap_or_else(|e| panic!("get of job {id} failed: {e}"))
    }

    /// Every job of the store, id descending (following the cursor, 1000 per page).
    pub async fn all_jobs(&self) -> Vec<Job> {
        let mut jobs = Vec::new();
        let mut before_id = None;
        loop {
            let page = self
                .store
                .job_list(&ListParams {
                    limit: 1_000,
                    before_id,
                    ..ListParams::default()
                })
                .await
                .expect("list of every job");
            jobs.extend(page.jobs);
            match page.next_cursor {
                Some(cursor) => before_id = Some(cursor),
                None => return jobs,
            }
        }
    }

    /// A new job of `queue`, claimed by `w1` for [`LEASE_MS`].
    pub(crate) async fn running(&self, queue: &str) -> Job {
        let job = self.enqueue(&spec(queue)).await;
        self.claim_job(&job, LEASE_MS).await
    }

    /// A new job of `queue` that succeeded with a result.
    async fn succeeded(&self, queue: &str) -> Job {
        let job = self.running(queue).await;
        self.store
            .job_complete(LeaseRef::of(&job), Some(json!({"done": true})))
            .await
            .expect("complete")
    }

    /// A new job of `queue` that failed permanently.
    async fn failed(&self, queue: &str) -> Job {
        let job = self.running(queue).await;
        self.store
            .job_fail(LeaseRef::of(&job), &failure("fatal", false, None))
            .await
            .expect("permanent fail")
    }

    /// A new job of `queue` cancelled while queued.
    async fn cancelled(&self, queue: &str) -> Job {
        let job = self.enqueue(&spec(queue)).await;
        self.store.job_cancel(job.id).await.expect("cancel")
    }
}

/// A job of `queue` with the [`EXACT`] retry policy and a payload naming the queue.
pub(crate) fn spec(queue: &str) -> JobSpec {
    JobSpec {
        retry_policy: EXACT,
        ..JobSpec::new("work", json!({ "queue": queue })).queue(queue)
    }
}

/// Claim parameters for `queues`, any kind, worker `w1`.
pub(crate) fn params(queues: &[&str], limit: u32, lease_ms: i64) -> ClaimParams {
    ClaimParams {
        queues: queues.iter().map(|q| (*q).to_owned()).collect(),
        kinds: Vec::new(),
        limit,
        lease_ms,
        worker_id: "w1".to_owned(),
        claim_id: None,
    }
}

pub(crate) fn failure(error: &str, retryable: bool, retry_delay_ms: Option<i64>) -> Failure {
    Failure {
        error: error.to_owned(),
        kind: FailureKind::Error,
        retryable,
        retry_delay_ms,
    }
}

pub(crate) fn ids(jobs: &[Job]) -> Vec<i64> {
    jobs.iter().map(|job| job.id).collect()
}

pub(crate) fn ms(millis: i64) -> TimeDelta {
    TimeDelta::milliseconds(millis)
}

/// `job` after `event`, per the domain's state machine.
pub(crate) fn applied(job: &Job, event: Event) -> Job {
    let mut next = job.clone();
    next.apply(event.clone())
        .unwrap_or_else(|e| panic!("the domain refuses {event:?} on {job:?}: {e}"));
    next
}

pub(crate) fn claim_event(owner: &str, now: DateTime<Utc>, lease_ms: i64) -> Event {
    Event::Claim {
        owner: owner.to_owned(),
        now,
        lease_ms,
    }
}

/// The `last_error` a lease expiry leaves (defined by `Job::apply`).
pub(crate) fn expiry_error(owner: &str, token: i64) -> String {
    format!("lease expired (worker {owner}, fencing token {token})")
}

#[track_caller]
fn expect_stale<T: Debug>(result: StoreResult<T>, lease: LeaseRef) {
    match result {
        Err(StoreError::StaleLease { lease: got }) => assert_eq!(got, lease, "stale lease"),
        other => panic!("expected StaleLease for {lease:?}, got {other:?}"),
    }
}

/// Every kind of lease-holder write with `lease` is refused as stale: complete, retryable and
/// permanent fail, snooze, heartbeat (lost) and batch complete.
pub(crate) async fn expect_every_write_stale(f: &Fixture, lease: LeaseRef) {
    expect_stale(
        f.store.job_complete(lease, Some(json!("late"))).await,
        lease,
    );
    expect_stale(
        f.store.job_fail(lease, &failure("late", true, None)).await,
        lease,
    );
    expect_stale(
        f.store.job_fail(lease, &failure("late", false, None)).await,
        lease,
    );
    expect_stale(f.store.job_snooze(lease, 0).await, lease);
    assert_eq!(
        f.store
            .job_heartbeat_many(&[lease], 60_000)
            .await
            .expect("heartbeat"),
        vec![HeartbeatOutcome::Lost],
        "heartbeat of {lease:?}"
    );
    assert_eq!(
        f.store
            .job_complete_many(&[(lease, Some(json!("late")))])
            .await
            .expect("complete many"),
        vec![WriteOutcome::Stale],
        "batch complete of {lease:?}"
    );
    assert_eq!(
        f.store
            .job_fail_many(&[(lease, failure("late", true, None))])
            .await
            .expect("fail many"),
        vec![faultline_ports::FailOutcome::Stale],
        "batch fail of {lease:?}"
    );
}

#[track_caller]
pub(crate) fn expect_invalid<T: Debug>(result: StoreResult<T>, what: &str) {
    match result {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("expected Invalid for {what}, got {other:?}"),
    }
}

#[track_caller]
pub(crate) fn expect_not_found<T: Debug>(result: StoreResult<T>, id: i64) {
    match result {
        Err(StoreError::NotFound { id: got }) => assert_eq!(got, id, "not found id"),
        other => panic!("expected NotFound for job {id}, got {other:?}"),
    }
}

#[track_caller]
pub(crate) fn expect_illegal<T: Debug>(
    result: StoreResult<T>,
    id: i64,
    from: JobState,
    event: EventKind,
) {
    match result {
        Err(StoreError::IllegalTransition {
            id: got_id,
            from: got_from,
            event: got_event,
        }) => assert_eq!(
            (got_id, got_from, got_event),
            (id, from, event),
            "illegal transition"
        ),
        other => panic!("expected IllegalTransition ({event} a {from} job {id}), got {other:?}"),
    }
}

#[track_caller]
pub(crate) fn expect_conflict<T: Debug>(result: StoreResult<T>, key: &str, existing_id: i64) {
    match result {
        Err(StoreError::Conflict {
            key: got_key,
            existing_id: got_id,
        }) => assert_eq!((got_key.as_str(), got_id), (key, existing_id), "conflict"),
        other => panic!("expected Conflict on key {key:?} (job {existing_id}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Enqueue and validation
// ---------------------------------------------------------------------------------------------

/// A minimal spec gets every documented default; a spec with every field set round-trips.
pub async fn enqueue_applies_defaults_and_round_trips_every_field(f: Fixture) {
    f.advance(1_234);
    let now = f.now();
    let minimal = JobSpec::new(
        "email",
        json!({
            "to": "a@example.com",
            "n": [1, 2.5, null, {"deep": true}, -7, u64::MAX, 1.5e300, 1e-7],
            // Needs a correctly rounded JSON float parser (serde_json's `float_roundtrip`).
            "f": 123_456_789.123_456_79,
            // Beyond f64 (serde_json's `arbitrary_precision`).
            "x": serde_json::Number::from_u128(u128::MAX).expect("an exact integer"),
            "s": "ünï\u{1F600}"
        }),
    );
    let out = f.store.job_enqueue(&minimal).await.expect("enqueue");
    assert!(out.created);
    let job = out.job;
    assert_eq!(job.queue, "default");
    assert_eq!(job.kind, "email");
    // Numbers come back exact, in plain decimal notation (`1.5e300` as its 301 digits).
    assert_eq!(job.payload, canonical_json(&minimal.payload));
    assert_eq!(job.payload["n"][6].as_f64(), Some(1.5e300));
    assert_eq!(job.payload["x"].to_string(), u128::MAX.to_string());
    assert_eq!(job.priority, 0);
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(
        (job.attempts, job.max_attempts, job.fencing_token),
        (0, 25, 0)
    );
    assert!(!job.cancel_requested);
    assert_eq!(
        job.next_run_at, now,
        "due immediately, by the store's clock"
    );
    assert_eq!(job.created_at, now, "created at the store's now");
    assert_eq!(job.retry_policy, RetryPolicy::DEFAULT);
    assert_eq!(
        (
            &job.lease_owner,
            job.lease_expires_at,
            job.started_at,
            job.finished_at
        ),
        (&None, None, None, None)
    );
    assert_eq!(
        (
            job.timeout_ms,
            &job.idempotency_key,
            &job.last_error,
            &job.result
        ),
        (None, &None, &None, &None)
    );
    assert_eq!(job, Job::new(job.id, &minimal, now));
    assert_eq!(f.get(job.id).await, job);

    let full = JobSpec {
        queue: "mail".into(),
        kind: "send".into(),
        payload: json!({"list": [{"a": 1}, {"b": [true, false]}], "big": 9_007_199_254_740_993_i64}),
        priority: -7,
        run_at: Some(now + TimeDelta::hours(1)),
        delay_ms: None,
        max_attempts: 7,
        retry_policy: RetryPolicy {
            base_ms: 250,
            cap_ms: 9_000,
            jitter: 0.25,
        },
        timeout_ms: Some(30_000),
        idempotency_key: Some("order-42".into()),
    };
    let second = f.enqueue(&full).await;
    assert!(second.id > job.id, "ids increase");
    assert_eq!(second.next_run_at, now + TimeDelta::hours(1));
    assert_eq!(second, Job::new(second.id, &full, now));
    assert_eq!(f.get(second.id).await, second);

    let edge = JobSpec {
        queue: "q".repeat(Limits::MAX_NAME_CHARS),
        kind: "é".repeat(Limits::MAX_NAME_CHARS),
        payload: json!("just a string"),
        priority: i16::MIN,
        run_at: None,
        delay_ms: Some(Limits::MAX_DURATION_MS),
        max_attempts: Limits::MAX_ATTEMPTS,
        retry_policy: RetryPolicy {
            base_ms: 0,
            cap_ms: Limits::MAX_DURATION_MS,
            jitter: 1.0,
        },
        timeout_ms: Some(Limits::MAX_DURATION_MS),
        idempotency_key: Some("ключ".repeat(Limits::MAX_NAME_CHARS / 4)),
    };
    let third = f.enqueue(&edge).await;
    assert_eq!(third.next_run_at, now + ms(Limits::MAX_DURATION_MS));
    assert_eq!(third, Job::new(third.id, &edge, now));
    assert_eq!(f.get(third.id).await, third);

    let null_payload = JobSpec::new("nothing", Value::Null);
    let fourth = f.enqueue(&null_payload).await;
    assert_eq!(fourth, Job::new(fourth.id, &null_payload, now));
    assert_eq!(f.get(fourth.id).await, fourth);

    assert_eq!(
        f.all_jobs().await,
        vec![fourth, third, second, job],
        "every job is stored once"
    );
}

/// Every spec that `JobSpec::validate` refuses is `Invalid`, alone or in a batch (which then
/// creates nothing at all).
pub async fn invalid_specs_are_rejected_and_store_nothing(f: Fixture) {
    let ok = spec("q");
    let now = f.now();
    let policy = |base_ms, cap_ms, jitter| JobSpec {
        retry_policy: RetryPolicy {
            base_ms,
            cap_ms,
            jitter,
        },
        ..ok.clone()
    };
    let bad = vec![
        JobSpec {
            kind: String::new(),
            ..ok.clone()
        },
        ok.clone().queue(""),
        ok.clone().queue("a".repeat(Limits::MAX_NAME_CHARS + 1)),
        ok.clone().queue("a\nb"),
        ok.clone().idempotency_key(""),
        ok.clone().idempotency_key("k\u{7}"),
        JobSpec {
            max_attempts: 0,
            ..ok.clone()
        },
        JobSpec {
            max_attempts: Limits::MAX_ATTEMPTS + 1,
            ..ok.clone()
        },
        JobSpec {
            delay_ms: Some(-1),
            ..ok.clone()
        },
        JobSpec {
            delay_ms: Some(Limits::MAX_DURATION_MS + 1),
            ..ok.clone()
        },
        JobSpec {
            delay_ms: Some(1),
            run_at: Some(now),
            ..ok.clone()
        },
        JobSpec {
            timeout_ms: Some(0),
            ..ok.clone()
        },
        policy(10, 5, 0.0),
        policy(-1, 5, 0.0),
        policy(1, 5, 1.5),
        policy(1, 5, f64::NAN),
    ];
    for spec in &bad {
        assert!(
            spec.validate().is_err(),
            "the case {spec:?} must be invalid"
        );
        expect_invalid(f.store.job_enqueue(spec).await, &format!("{spec:?}"));
        expect_invalid(
            f.store.job_enqueue_many(&[ok.clone(), spec.clone()]).await,
            &format!("a batch holding {spec:?}"),
        );
    }
    assert_eq!(f.all_jobs().await, vec![], "nothing was stored");
    // The store still works.
    let job = f.enqueue(&ok).await;
    assert_eq!(f.all_jobs().await, vec![job]);
}

/// Malformed claim, heartbeat, complete, fail, snooze and list requests are `Invalid` and change
/// nothing (the bounds of `faultline_ports`' validation functions).
pub async fn invalid_requests_are_rejected_and_change_nothing(f: Fixture) {
    let held = f.running("held").await;
    let lease = LeaseRef::of(&held);
    let waiting = f.enqueue(&spec("waiting")).await;

    let good = params(&["waiting"], 1, 1_000);
    let claim = |edit: fn(&mut ClaimParams)| {
        let mut p = good.clone();
        edit(&mut p);
        p
    };
    let bad_claims = [
        claim(|p| p.queues.clear()),
        claim(|p| p.queues.push(String::new())),
        claim(|p| p.queues[0] = "a\u{1b}b".into()),
        claim(|p| p.kinds.push("a\tb".into())),
        claim(|p| p.kinds.push("k".repeat(Limits::MAX_NAME_CHARS + 1))),
        claim(|p| p.worker_id = String::new()),
        claim(|p| p.limit = 0),
        claim(|p| p.limit = MAX_CLAIM_LIMIT + 1),
        claim(|p| p.lease_ms = 0),
        claim(|p| p.lease_ms = -1),
        claim(|p| p.lease_ms = Limits::MAX_DURATION_MS + 1),
    ];
    for p in &bad_claims {
        expect_invalid(f.store.job_claim(p).await, &format!("{p:?}"));
    }
    for extend in [0, -1, Limits::MAX_DURATION_MS + 1] {
        expect_invalid(
            f.store.job_heartbeat_many(&[lease], extend).await,
            &format!("heartbeat extending by {extend} ms"),
        );
    }
    for delay in [-1, Limits::MAX_DURATION_MS + 1] {
        expect_invalid(
            f.store.job_snooze(lease, delay).await,
            &format!("snooze for {delay} ms"),
        );
        expect_invalid(
            f.store
                .job_fail(lease, &failure("e", true, Some(delay)))
                .await,
            &format!("retry after {delay} ms"),
        );
    }
    for result in [
        json!("a\u{0}b"),
        json!({"k\u{0}": 1}),
        json!([[{"x": "\u{0}"}]]),
    ] {
        expect_invalid(
            f.store.job_complete(lease, Some(result.clone())).await,
            &format!("a result holding NUL: {result}"),
        );
    }
    let list = |edit: fn(&mut ListParams)| {
        let mut p = ListParams {
            limit: 10,
            ..ListParams::default()
        };
        edit(&mut p);
        p
    };
    for p in [
        list(|p| p.limit = 0),
        list(|p| p.limit = MAX_PAGE_SIZE + 1),
        list(|p| p.queue = Some(String::new())),
        list(|p| p.kind = Some("a\nb".into())),
    ] {
        expect_invalid(f.store.job_list(&p).await, &format!("{p:?}"));
    }
    // The bounds themselves are accepted.
    let page = f
        .store
        .job_list(&list(|p| p.limit = MAX_PAGE_SIZE))
        .await
        .expect("largest page");
    assert_eq!(ids(&page.jobs), [waiting.id, held.id]);
    assert_eq!(f.get(held.id).await, held, "the held job is unchanged");
    assert_eq!(
        f.get(waiting.id).await,
        waiting,
        "the queued job is unchanged"
    );
    let claimed = f.claim(&claim(|p| p.limit = MAX_CLAIM_LIMIT)).await;
    assert_eq!(ids(&claimed), [waiting.id]);
}

/// NUL characters: refused in payloads (PostgreSQL cannot store them), replaced by U+FFFD in
/// error messages, which are free-form text.
pub async fn nul_characters_are_refused_in_json_and_replaced_in_errors(f: Fixture) {
    for payload in [
        json!("a\u{0}"),
        json!({"a\u{0}": 1}),
        json!({"a": ["\u{0}"]}),
    ] {
        expect_invalid(
            f.store
                .job_enqueue(&JobSpec::new("k", payload.clone()))
                .await,
            &format!("payload {payload}"),
        );
    }
    assert_eq!(f.all_jobs().await, vec![]);

    let job = f.running("q").await;
    let now = f.now();
    let failed = f
        .store
        .job_fail(LeaseRef::of(&job), &failure("bad\u{0}byte", true, Some(0)))
        .await
        .expect("fail");
    assert_eq!(failed.last_error.as_deref(), Some("bad\u{FFFD}byte"));
    assert_eq!(
        failed,
        applied(
            &job,
            Event::FailRetryable {
                token: 1,
                now,
                error: "bad\u{FFFD}byte".into(),
                kind: FailureKind::Error,
                delay_ms: 0
            }
        )
    );
    assert_eq!(f.get(job.id).await, failed);
    let job = f.claim_job(&job, LEASE_MS).await;
    let failed = f
        .store
        .job_fail(LeaseRef::of(&job), &failure("\u{0}", false, None))
        .await
        .expect("fail");
    assert_eq!(failed.last_error.as_deref(), Some("\u{FFFD}"));
    assert_eq!(f.get(job.id).await, failed);
}

// ---------------------------------------------------------------------------------------------
// Claim
// ---------------------------------------------------------------------------------------------

/// `delay_ms` and `run_at` set `next_run_at`; a job is due from that instant on, not before.
pub async fn claim_respects_delay_and_run_at(f: Fixture) {
    let now = f.now();
    let delayed = f
        .enqueue(&JobSpec {
            delay_ms: Some(5_000),
            ..spec("q")
        })
        .await;
    assert_eq!(delayed.next_run_at, now + ms(5_000));
    let scheduled = f
        .enqueue(&JobSpec {
            run_at: Some(now + ms(3_000)),
            ..spec("q")
        })
        .await;
    assert_eq!(scheduled.next_run_at, now + ms(3_000));
    let overdue = f
        .enqueue(&JobSpec {
            run_at: Some(now - TimeDelta::hours(1)),
            ..spec("q")
        })
        .await;
    assert_eq!(overdue.next_run_at, now - TimeDelta::hours(1));

    // Sub-microsecond parts of a run_at are truncated (PostgreSQL keeps microseconds).
    let precise = f
        .enqueue(&JobSpec {
            run_at: Some(now + ms(4_000) + TimeDelta::nanoseconds(999)),
            ..spec("precise")
        })
        .await;
    assert_eq!(precise.next_run_at, now + ms(4_000));
    assert_eq!(f.get(precise.id).await, precise);

    let claim = params(&["q"], 10, LEASE_MS);
    assert_eq!(ids(&f.claim(&claim).await), [overdue.id]);
    f.advance(2_999);
    assert_eq!(ids(&f.claim(&claim).await), Vec::<i64>::new(), "1 ms early");
    f.advance(1);
    assert_eq!(
        ids(&f.claim(&claim).await),
        [scheduled.id],
        "due at next_run_at"
    );
    f.advance(1_999);
    assert_eq!(ids(&f.claim(&claim).await), Vec::<i64>::new(), "1 ms early");
    f.advance(1);
    assert_eq!(
        ids(&f.claim(&claim).await),
        [delayed.id],
        "due at next_run_at"
    );
    assert_eq!(
        ids(&f.claim(&claim).await),
        Vec::<i64>::new(),
        "all claimed"
    );
    assert_eq!(
        ids(&f.claim(&params(&["precise"], 1, LEASE_MS)).await),
        [precise.id]
    );
}

/// Claims come in priority order, then oldest `next_run_at`, then lowest id; the returned jobs
/// are in that order too.
pub async fn claim_orders_by_priority_then_next_run_at_then_id(f: Fixture) {
    let now = f.now();
    let at = |priority: i16, offset_ms: i64| JobSpec {
        priority,
        run_at: Some(now + ms(offset_ms)),
        ..spec("q")
    };
    let low_but_oldest = f.enqueue(&at(1, -30_000)).await;
    let tie_first = f.enqueue(&at(0, -5_000)).await;
    let older = f.enqueue(&at(0, -20_000)).await;
    let tie_second = f.enqueue(&at(0, -5_000)).await;
    let urgent = f.enqueue(&at(-1, 0)).await;
    let not_due = f.enqueue(&at(-5, 1_000)).await;

    let claim = |limit| params(&["q"], limit, LEASE_MS);
    assert_eq!(ids(&f.claim(&claim(2)).await), [urgent.id, older.id]);
    assert_eq!(
        ids(&f.claim(&claim(2)).await),
        [tie_first.id, tie_second.id]
    );
    assert_eq!(ids(&f.claim(&claim(10)).await), [low_but_oldest.id]);
    f.advance(1_000);
    assert_eq!(ids(&f.claim(&claim(10)).await), [not_due.id]);

    // One claim returns its jobs in claim order as well.
    let a = f.enqueue(&at(3, -1_000)).await;
    let b = f.enqueue(&at(2, 0)).await;
    let c = f.enqueue(&at(2, -2_000)).await;
    assert_eq!(ids(&f.claim(&claim(10)).await), [c.id, b.id, a.id]);
}

/// A claim takes at most `limit` jobs, only from the queues asked for, only of the kinds asked
/// for (any kind when none are named).
pub async fn claim_respects_limit_queues_and_kinds(f: Fixture) {
    let job = |queue: &str, kind: &str| JobSpec {
        kind: kind.to_owned(),
        ..spec(queue)
    };
    let ax = f.enqueue(&job("a", "x")).await;
    let ay = f.enqueue(&job("a", "y")).await;
    let bx = f.enqueue(&job("b", "x")).await;
    let cx = f.enqueue(&job("c", "x")).await;
    let by = f.enqueue(&job("b", "y")).await;
    let dx = f.enqueue(&job("d", "x")).await;

    let with_kinds = |queues: &[&str], kinds: &[&str]| ClaimParams {
        kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
        ..params(queues, 10, LEASE_MS)
    };
    assert_eq!(
        ids(&f.claim(&with_kinds(&["a"], &[])).await),
        [ax.id, ay.id]
    );
    assert_eq!(
        ids(&f.claim(&with_kinds(&["b", "c"], &["x"])).await),
        [bx.id, cx.id]
    );
    assert_eq!(
        ids(&f.claim(&with_kinds(&["b", "c", "d"], &["z"])).await),
        Vec::<i64>::new()
    );
    assert_eq!(
        ids(&f.claim(&with_kinds(&["b", "c", "d"], &["y", "z"])).await),
        [by.id]
    );
    assert_eq!(
        ids(&f.claim(&with_kinds(&["nothing"], &[])).await),
        Vec::<i64>::new()
    );
    assert_eq!(
        f.get(dx.id).await.state,
        JobState::Queued,
        "queue d was never asked for"
    );

    let mut many = Vec::new();
    for _ in 0..5 {
        many.push(f.enqueue(&spec("l")).await);
    }
    let limited = |limit| params(&["l"], limit, LEASE_MS);
    assert_eq!(ids(&f.claim(&limited(3)).await), ids(&many[..3]));
    assert_eq!(ids(&f.claim(&limited(3)).await), ids(&many[3..]));
    assert_eq!(ids(&f.claim(&limited(3)).await), Vec::<i64>::new());
}

/// A claim is a new attempt under a new fencing token, leased from the store's now.
pub async fn claim_starts_an_attempt_with_a_new_token_and_a_lease_from_the_store_clock(f: Fixture) {
    let job = f.enqueue(&spec("q")).await;
    let created = f.now();
    f.advance(1_234);
    let now = f.now();
    let p = ClaimParams {
        worker_id: "worker-7".into(),
        claim_id: None,
        ..params(&["q"], 5, 30_000)
    };
    let claimed = f.claim(&p).await;
    assert_eq!(claimed.len(), 1);
    let first = claimed[0].clone();
    assert_eq!(first.state, JobState::Running);
    assert_eq!((first.attempts, first.fencing_token), (1, 1));
    assert_eq!(first.lease_owner.as_deref(), Some("worker-7"));
    assert_eq!(first.lease_expires_at, Some(now + ms(30_000)));
    assert_eq!(first.started_at, Some(now));
    assert_eq!((first.next_run_at, first.created_at), (created, created));
    assert_eq!(first.finished_at, None);
    assert_eq!(first, applied(&job, claim_event("worker-7", now, 30_000)));
    assert_eq!(f.get(job.id).await, first);
    assert_eq!(f.claim(&p).await, vec![], "a running job is not claimable");

    let requeued = f
        .store
        .job_fail(LeaseRef::of(&first), &failure("again", true, Some(0)))
        .await
        .expect("fail");
    f.advance(10);
    let now = f.now();
    let p = ClaimParams {
        worker_id: "worker-8".into(),
        claim_id: None,
        ..params(&["q"], 5, 5_000)
    };
    let second = f.claim(&p).await;
    assert_eq!(second.len(), 1);
    let second = second[0].clone();
    assert_eq!((second.attempts, second.fencing_token), (2, 2));
    assert_eq!(second.lease_owner.as_deref(), Some("worker-8"));
    assert_eq!(second.lease_expires_at, Some(now + ms(5_000)));
    assert_eq!(second.started_at, Some(now));
    assert_eq!(second.last_error.as_deref(), Some("again"));
    assert_eq!(
        second,
        applied(&requeued, claim_event("worker-8", now, 5_000))
    );
    assert_eq!(f.get(job.id).await, second);
}

// ---------------------------------------------------------------------------------------------
// Fencing
// ---------------------------------------------------------------------------------------------

/// After a rescue and a new claim, every write under the old token is refused and changes
/// nothing; the new holder's writes apply.
pub async fn stale_lease_writes_are_rejected_after_rescue_and_reclaim(f: Fixture) {
    let job = f.enqueue(&spec("q")).await;
    let first = f.claim_job(&job, 1_000).await;
    let old = LeaseRef::of(&first);
    f.advance(1_000);
    let now = f.now();
    let rescued = f.store.job_rescue_expired(10).await.expect("rescue");
    let expected = applied(
        &first,
        Event::LeaseExpired {
            now,
            delay_ms: 1_000,
        },
    );
    assert_eq!(rescued, vec![expected.clone()]);
    assert_eq!(expected.state, JobState::Queued);
    assert_eq!(expected.last_error, Some(expiry_error("w1", 1)));
    assert_eq!(
        expected.next_run_at,
        now + ms(1_000),
        "policy delay of attempt 1"
    );

    // The stale holder cannot touch the queued job either.
    expect_stale(f.store.job_complete(old, None).await, old);
    assert_eq!(f.get(job.id).await, expected);

    f.advance(1_000);
    let second = f.claim_job(&job, LEASE_MS).await;
    assert_eq!(second.fencing_token, 2);
    let new = LeaseRef::of(&second);

    expect_every_write_stale(&f, old).await;
    let future = LeaseRef {
        job_id: job.id,
        token: 3,
    };
    expect_stale(f.store.job_complete(future, None).await, future);
    assert_eq!(f.get(job.id).await, second, "stale writes changed nothing");

    let done = f
        .store
        .job_complete(new, Some(json!({"by": "new"})))
        .await
        .expect("the current holder completes");
    let now = f.now();
    assert_eq!(
        done,
        applied(
            &second,
            Event::Complete {
                token: 2,
                now,
                result: Some(json!({"by": "new"}))
            }
        )
    );
    assert_eq!(f.get(job.id).await, done);
    // A finished job refuses even its last holder.
    expect_stale(f.store.job_complete(new, None).await, new);
    expect_stale(f.store.job_snooze(new, 0).await, new);
    assert_eq!(f.get(job.id).await, done);
}

/// `job_heartbeat_many` and `job_complete_many` answer per item, in input order, with valid,
/// stale, finished and unknown leases mixed.
pub async fn batch_heartbeat_and_complete_report_outcomes_in_input_order(f: Fixture) {
    let j1 = f.running("q1").await;
    let j2 = f.running("q2").await;
    let j3 = f.running("q3").await;
    let j4 = f.running("q4").await;
    let (l1, l2, l3_old, l4) = (
        LeaseRef::of(&j1),
        LeaseRef::of(&j2),
        LeaseRef::of(&j3),
        LeaseRef::of(&j4),
    );
    f.store
        .job_fail(l3_old, &failure("retry", true, Some(0)))
        .await
        .expect("fail");
    let j3 = f.claim_job(&j3, LEASE_MS).await;
    let l3_new = LeaseRef::of(&j3);
    assert_eq!(l3_new.token, 2);
    f.store.job_complete(l4, None).await.expect("complete");
    let j2 = f.store.job_cancel(j2.id).await.expect("cancel");
    assert!(j2.cancel_requested);
    let unknown = LeaseRef {
        job_id: j4.id + 1_000,
        token: 1,
    };

    assert_eq!(
        f.store.job_heartbeat_many(&[], 1_000).await.expect("empty"),
        vec![]
    );
    f.advance(5_000);
    let now = f.now();
    let out = f
        .store
        .job_heartbeat_many(&[l1, l3_old, l2, unknown, l4, l3_new], 20_000)
        .await
        .expect("heartbeat");
    let extended = |cancel_requested| HeartbeatOutcome::Extended {
        lease_expires_at: now + ms(20_000),
        cancel_requested,
    };
    assert_eq!(
        out,
        vec![
            extended(false),
            HeartbeatOutcome::Lost,
            extended(true),
            HeartbeatOutcome::Lost,
            HeartbeatOutcome::Lost,
            extended(false),
        ]
    );
    let hb = |job: &Job| {
        applied(
            job,
            Event::Heartbeat {
                token: job.fencing_token,
                now,
                extend_ms: 20_000,
            },
        )
    };
    let (j1, j2, j3) = (hb(&j1), hb(&j2), hb(&j3));
    assert_eq!(
        f.get(j1.id).await,
        j1,
        "lease extended from the store's now"
    );
    assert_eq!(f.get(j2.id).await, j2);
    assert_eq!(f.get(j3.id).await, j3);
    let j4 = f.get(j4.id).await;
    assert_eq!(j4.state, JobState::Succeeded);

    assert_eq!(f.store.job_complete_many(&[]).await.expect("empty"), vec![]);
    f.advance(100);
    let now = f.now();
    let out = f
        .store
        .job_complete_many(&[
            (l3_old, Some(json!("old"))),
            (l1, Some(json!({"n": 1}))),
            (unknown, None),
            (l2, None),
            (l4, Some(json!("again"))),
            (l3_new, Some(json!("new"))),
        ])
        .await
        .expect("complete many");
    use WriteOutcome::{Accepted, Stale};
    assert_eq!(out, vec![Stale, Accepted, Stale, Accepted, Stale, Accepted]);
    let done = |job: &Job, result: Option<Value>| {
        applied(
            job,
            Event::Complete {
                token: job.fencing_token,
                now,
                result,
            },
        )
    };
    assert_eq!(f.get(j1.id).await, done(&j1, Some(json!({"n": 1}))));
    assert_eq!(f.get(j2.id).await, done(&j2, None));
    assert_eq!(f.get(j3.id).await, done(&j3, Some(json!("new"))));
    assert_eq!(f.get(j4.id).await, j4, "a finished job is untouched");

    // A lease repeated within a batch is accepted once, at its first occurrence.
    let j5 = f.running("q5").await;
    let l5 = LeaseRef::of(&j5);
    let now = f.now();
    let out = f
        .store
        .job_complete_many(&[(l5, Some(json!("first"))), (l5, Some(json!("second")))])
        .await
        .expect("complete many");
    assert_eq!(out, vec![Accepted, Stale]);
    let expected = applied(
        &j5,
        Event::Complete {
            token: 1,
            now,
            result: Some(json!("first")),
        },
    );
    assert_eq!(f.get(j5.id).await, expected);
}

/// Completion stores the result (or none) and finishes the job at the store's now.
pub async fn complete_stores_the_result(f: Fixture) {
    for (queue, result) in [
        ("a", Some(json!({"rows": [1, 2, 3], "ok": true}))),
        ("b", None),
        ("c", Some(Value::Null)),
        ("d", Some(json!(42))),
    ] {
        let job = f.running(queue).await;
        f.advance(250);
        let now = f.now();
        let done = f
            .store
            .job_complete(LeaseRef::of(&job), result.clone())
            .await
            .expect("complete");
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(done.result, result);
        assert_eq!(done.finished_at, Some(now));
        assert_eq!(done.lease_expires_at, None);
        assert_eq!(done.lease_owner.as_deref(), Some("w1"), "the owner is kept");
        assert_eq!(done.attempts, 1);
        assert_eq!(
            done,
            applied(
                &job,
                Event::Complete {
                    token: 1,
                    now,
                    result
                }
            )
        );
        assert_eq!(f.get(job.id).await, done);
        assert_eq!(f.claim(&params(&[queue], 1, LEASE_MS)).await, vec![]);
    }
}

// ---------------------------------------------------------------------------------------------
// Failures and retries
// ---------------------------------------------------------------------------------------------

/// A retryable failure with an explicit delay requeues the job exactly that long.
pub async fn retryable_fail_with_an_explicit_delay_requeues_the_job(f: Fixture) {
    let job = f.running("q").await;
    f.advance(700);
    let now = f.now();
    let failed = f
        .store
        .job_fail(LeaseRef::of(&job), &failure("boom", true, Some(2_500)))
        .await
        .expect("fail");
    assert_eq!(failed.state, JobState::Queued);
    assert_eq!((failed.attempts, failed.fencing_token), (1, 1));
    assert_eq!(failed.next_run_at, now + ms(2_500));
    assert_eq!(failed.lease_expires_at, None);
    assert_eq!(failed.finished_at, None);
    assert_eq!(failed.last_error.as_deref(), Some("boom"));
    assert_eq!(
        failed,
        applied(
            &job,
            Event::FailRetryable {
                token: 1,
                now,
                error: "boom".into(),
                kind: FailureKind::Error,
                delay_ms: 2_500
            }
        )
    );
    assert_eq!(f.get(job.id).await, failed);

    let claim = params(&["q"], 1, LEASE_MS);
    assert_eq!(f.claim(&claim).await, vec![]);
    f.advance(2_499);
    assert_eq!(f.claim(&claim).await, vec![], "1 ms before the retry");
    f.advance(1);
    let again = f.claim_job(&job, LEASE_MS).await;
    assert_eq!((again.attempts, again.fencing_token), (2, 2));
    assert_eq!(
        again.last_error.as_deref(),
        Some("boom"),
        "kept while retrying"
    );

    // A zero delay is due at once.
    let now = f.now();
    let failed = f
        .store
        .job_fail(LeaseRef::of(&again), &failure("boom 2", true, Some(0)))
        .await
        .expect("fail");
    assert_eq!(failed.next_run_at, now);
    f.claim_job(&job, LEASE_MS).await;
}

/// Without an explicit delay, the job's own retry policy gives the delay of the failed attempt.
pub async fn retryable_fail_without_a_delay_follows_the_retry_policy(f: Fixture) {
    let policy = RetryPolicy {
        base_ms: 1_000,
        cap_ms: 3_000,
        jitter: 0.0,
    };
    let job = f
        .enqueue(&JobSpec {
            retry_policy: policy,
            max_attempts: 10,
            ..spec("q")
        })
        .await;
    let mut delays = Vec::new();
    for attempt in 1..=4 {
        let running = f.claim_job(&job, LEASE_MS).await;
        assert_eq!(running.attempts, attempt);
        f.advance(10);
        let now = f.now();
        let failed = f
            .store
            .job_fail(LeaseRef::of(&running), &failure("e", true, None))
            .await
            .expect("fail");
        let delay = policy.delay_ms(attempt, 0.5);
        assert_eq!(
            failed,
            applied(
                &running,
                Event::FailRetryable {
                    token: running.fencing_token,
                    now,
                    error: "e".into(),
                    kind: FailureKind::Error,
                    delay_ms: delay
                }
            )
        );
        delays.push((failed.next_run_at - now).num_milliseconds());
        f.advance(delay);
    }
    assert_eq!(delays, [1_000, 2_000, 3_000, 3_000], "doubling, capped");
}

/// With jitter, policy delays stay within the policy's bounds and actually vary.
pub async fn retry_policy_jitter_stays_within_its_bounds(f: Fixture) {
    let policy = RetryPolicy {
        base_ms: 10_000,
        cap_ms: 3_600_000,
        jitter: 0.5,
    };
    let spec = JobSpec {
        retry_policy: policy,
        ..spec("j")
    };
    for _ in 0..20 {
        f.enqueue(&spec).await;
    }
    let claimed = f.claim(&params(&["j"], 20, LEASE_MS)).await;
    assert_eq!(claimed.len(), 20);
    let now = f.now();
    let mut delays = BTreeSet::new();
    for job in &claimed {
        let failed = f
            .store
            .job_fail(LeaseRef::of(job), &failure("e", true, None))
            .await
            .expect("fail");
        assert_eq!(failed.state, JobState::Queued);
        let delay = (failed.next_run_at - now).num_milliseconds();
        let (low, high) = (policy.delay_ms(1, 0.0), policy.delay_ms(1, 1.0));
        assert!(
            (low..=high).contains(&delay),
            "delay {delay} ms outside [{low}, {high}]"
        );
        delays.insert(delay);
    }
    assert!(
        delays.len() > 1,
        "20 jittered delays are not all equal: {delays:?}"
    );
}

/// A permanent failure ends the job `failed` whatever its remaining attempts.
pub async fn permanent_fail_ends_the_job_failed(f: Fixture) {
    let job = f.running("q").await;
    f.advance(300);
    let now = f.now();
    let failed = f
        .store
        .job_fail(
            LeaseRef::of(&job),
            &failure("bad input", false, Some(1_000)),
        )
        .await
        .expect("fail");
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failed.finished_at, Some(now));
    assert_eq!(failed.last_error.as_deref(), Some("bad input"));
    assert_eq!(failed.attempts, 1);
    assert_eq!(failed.lease_expires_at, None);
    assert_eq!(
        failed,
        applied(
            &job,
            Event::FailPermanently {
                token: 1,
                now,
                error: "bad input".into(),
                kind: FailureKind::Error,
            }
        )
    );
    assert_eq!(f.get(job.id).await, failed);
    f.advance(3_600_000);
    assert_eq!(f.claim(&params(&["q"], 1, LEASE_MS)).await, vec![]);
}

/// The failure of the last allowed attempt ends the job `failed`, keeping its error.
pub async fn exhausted_attempts_end_the_job_failed_with_the_last_error(f: Fixture) {
    let job = f
        .enqueue(&JobSpec {
            max_attempts: 2,
            ..spec("q")
        })
        .await;
    let first = f.claim_job(&job, LEASE_MS).await;
    let retried = f
        .store
        .job_fail(LeaseRef::of(&first), &failure("e1", true, None))
        .await
        .expect("fail 1");
    assert_eq!(retried.state, JobState::Queued);
    f.advance(1_000);
    let second = f.claim_job(&job, LEASE_MS).await;
    let now = f.now();
    let failed = f
        .store
        .job_fail(LeaseRef::of(&second), &failure("e2", true, Some(0)))
        .await
        .expect("fail 2");
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failed.attempts, 2);
    assert_eq!(failed.last_error.as_deref(), Some("e2"));
    assert_eq!(failed.finished_at, Some(now));
    assert_eq!(
        failed,
        applied(
            &second,
            Event::FailRetryable {
                token: 2,
                now,
                error: "e2".into(),
                kind: FailureKind::Error,
                delay_ms: 0
            }
        )
    );
    f.advance(3_600_000);
    assert_eq!(f.claim(&params(&["q"], 1, LEASE_MS)).await, vec![]);

    // A budget of one attempt: the first retryable failure is final.
    let single = f
        .enqueue(&JobSpec {
            max_attempts: 1,
            ..spec("one")
        })
        .await;
    let running = f.claim_job(&single, LEASE_MS).await;
    let failed = f
        .store
        .job_fail(LeaseRef::of(&running), &failure("only", true, None))
        .await
        .expect("fail");
    assert_eq!(
        (failed.state, failed.attempts, failed.last_error.as_deref()),
        (JobState::Failed, 1, Some("only"))
    );
}

/// A job whose worker always dies (its lease always expires) is retried by rescue with backoff
/// and ends `failed` after `max_attempts`; it never loops forever.
pub async fn poison_pill_ends_failed_after_max_attempts_via_rescue(f: Fixture) {
    let job = f
        .enqueue(&JobSpec {
            max_attempts: 3,
            ..spec("poison")
        })
        .await;
    let claim = params(&["poison"], 1, 2_000);
    let mut expected = job.clone();
    let mut rounds: i32 = 0;
    while rounds < 10 {
        let claimed = f.claim(&claim).await;
        if claimed.is_empty() {
            break;
        }
        rounds += 1;
        let now = f.now();
        expected = applied(&expected, claim_event("w1", now, 2_000));
        assert_eq!(claimed, vec![expected.clone()]);
        f.advance(2_000);
        let now = f.now();
        let rescued = f.store.job_rescue_expired(10).await.expect("rescue");
        let delay = EXACT.delay_ms(expected.attempts, 0.5);
        expected = applied(
            &expected,
            Event::LeaseExpired {
                now,
                delay_ms: delay,
            },
        );
        assert_eq!(rescued, vec![expected.clone()], "round {rounds}");
        assert_eq!(
            expected.last_error,
            Some(expiry_error("w1", i64::from(rounds)))
        );
        if expected.state == JobState::Queued {
            assert_eq!(expected.next_run_at, now + ms(delay));
            f.advance(delay);
        }
    }
    assert_eq!(rounds, 3, "exactly max_attempts attempts");
    let last = f.get(job.id).await;
    assert_eq!(last, expected);
    assert_eq!(last.state, JobState::Failed);
    assert_eq!(last.attempts, 3);
    assert_eq!(last.last_error, Some(expiry_error("w1", 3)));
    f.advance(3_600_000);
    assert_eq!(f.claim(&claim).await, vec![]);
    assert_eq!(
        f.store.job_rescue_expired(10).await.expect("rescue"),
        vec![]
    );
}

/// A snooze gives the attempt back and makes the job due again after the delay.
pub async fn snooze_gives_the_attempt_back(f: Fixture) {
    let job = f
        .enqueue(&JobSpec {
            max_attempts: 1,
            ..spec("q")
        })
        .await;
    let mut running = f.claim_job(&job, LEASE_MS).await;
    for round in 0..3 {
        f.advance(100);
        let now = f.now();
        let snoozed = f
            .store
            .job_snooze(LeaseRef::of(&running), 4_000)
            .await
            .expect("snooze");
        assert_eq!(snoozed.state, JobState::Queued);
        assert_eq!(snoozed.attempts, 0, "the attempt is given back");
        assert_eq!(snoozed.fencing_token, running.fencing_token);
        assert_eq!(snoozed.next_run_at, now + ms(4_000));
        assert_eq!(snoozed.lease_expires_at, None);
        assert_eq!(snoozed.last_error, None);
        assert_eq!(
            snoozed,
            applied(
                &running,
                Event::Snooze {
                    token: running.fencing_token,
                    now,
                    delay_ms: 4_000
                }
            )
        );
        assert_eq!(f.get(job.id).await, snoozed);
        assert_eq!(f.claim(&params(&["q"], 1, LEASE_MS)).await, vec![]);
        f.advance(3_999);
        assert_eq!(f.claim(&params(&["q"], 1, LEASE_MS)).await, vec![]);
        f.advance(1);
        running = f.claim_job(&job, LEASE_MS).await;
        assert_eq!((running.attempts, running.fencing_token), (1, round + 2));
    }
    // Snooze with no delay: due at once.
    let now = f.now();
    let snoozed = f
        .store
        .job_snooze(LeaseRef::of(&running), 0)
        .await
        .expect("snooze");
    assert_eq!(snoozed.next_run_at, now);
    let running = f.claim_job(&job, LEASE_MS).await;
    // The single real attempt is still available: its failure ends the job.
    let failed = f
        .store
        .job_fail(LeaseRef::of(&running), &failure("e", true, None))
        .await
        .expect("fail");
    assert_eq!((failed.state, failed.attempts), (JobState::Failed, 1));
}

// ---------------------------------------------------------------------------------------------
// Cancel and redrive
// ---------------------------------------------------------------------------------------------

/// Cancelling a queued job ends it `cancelled` at once.
pub async fn cancel_of_a_queued_job_ends_it_cancelled(f: Fixture) {
    let job = f
        .enqueue(&JobSpec {
            delay_ms: Some(60_000),
            ..spec("q")
        })
        .await;
    f.advance(100);
    let now = f.now();
    let cancelled = f.store.job_cancel(job.id).await.expect("cancel");
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.finished_at, Some(now));
    assert_eq!(cancelled.attempts, 0);
    assert!(!cancelled.cancel_requested);
    assert_eq!(cancelled, applied(&job, Event::Cancel { now }));
    assert_eq!(f.get(job.id).await, cancelled);
    f.advance(60_000);
    assert_eq!(f.claim(&params(&["q"], 1, LEASE_MS)).await, vec![]);
}

/// Cancelling a running job marks it; the holder learns it at its heartbeat; a retryable
/// failure, a snooze or a lease expiry then ends it `cancelled`; a completion still succeeds.
pub async fn cancel_of_a_running_job_is_seen_by_heartbeat_and_ends_it_cancelled(f: Fixture) {
    let [a, b, c, d, e] = [
        f.running("a").await,
        f.running("b").await,
        f.running("c").await,
        f.running("d").await,
        f.running("e").await,
    ];
    f.advance(100);
    let now = f.now();
    let mut marked = Vec::new();
    for job in [&a, &b, &c, &d, &e] {
        let out = f.store.job_cancel(job.id).await.expect("cancel");
        let expected = applied(job, Event::Cancel { now });
        assert_eq!(out, expected);
        assert_eq!(
            (out.state, out.cancel_requested, out.lease_expires_at),
            (JobState::Running, true, job.lease_expires_at),
            "still running under the same lease"
        );
        assert_eq!(f.get(job.id).await, expected);
        marked.push(expected);
    }
    let [a, b, c, d, e] = <[Job; 5]>::try_from(marked).expect("five jobs");
    // A second cancel changes nothing.
    assert_eq!(f.store.job_cancel(a.id).await.expect("cancel again"), a);

    f.advance(100);
    let now = f.now();
    let heartbeat = f
        .store
        .job_heartbeat_many(&[LeaseRef::of(&a)], LEASE_MS)
        .await
        .expect("heartbeat");
    assert_eq!(
        heartbeat,
        vec![HeartbeatOutcome::Extended {
            lease_expires_at: now + ms(LEASE_MS),
            cancel_requested: true
        }]
    );
    let a = applied(
        &a,
        Event::Heartbeat {
            token: 1,
            now,
            extend_ms: LEASE_MS,
        },
    );

    // a: a retryable failure with attempts left ends it cancelled.
    let out = f
        .store
        .job_fail(LeaseRef::of(&a), &failure("stopped", true, Some(0)))
        .await
        .expect("fail");
    assert_eq!(
        out,
        applied(
            &a,
            Event::FailRetryable {
                token: 1,
                now,
                error: "stopped".into(),
                kind: FailureKind::Error,
                delay_ms: 0
            }
        )
    );
    assert_eq!(
        (out.state, out.finished_at, out.last_error.as_deref()),
        (JobState::Cancelled, Some(now), Some("stopped"))
    );

    // c: completion still succeeds.
    let out = f
        .store
        .job_complete(LeaseRef::of(&c), Some(json!("finished anyway")))
        .await
        .expect("complete");
    assert_eq!(out.state, JobState::Succeeded);
    assert_eq!(
        out,
        applied(
            &c,
            Event::Complete {
                token: 1,
                now,
                result: Some(json!("finished anyway"))
            }
        )
    );

    // d: a snooze ends it cancelled and gives the attempt back.
    let out = f
        .store
        .job_snooze(LeaseRef::of(&d), 5_000)
        .await
        .expect("snooze");
    assert_eq!((out.state, out.attempts), (JobState::Cancelled, 0));
    assert_eq!(
        out,
        applied(
            &d,
            Event::Snooze {
                token: 1,
                now,
                delay_ms: 5_000
            }
        )
    );

    // e: a permanent failure stays a failure.
    let out = f
        .store
        .job_fail(LeaseRef::of(&e), &failure("fatal", false, None))
        .await
        .expect("fail");
    assert_eq!(
        out,
        applied(
            &e,
            Event::FailPermanently {
                token: 1,
                now,
                error: "fatal".into(),
                kind: FailureKind::Error,
            }
        )
    );

    // b: its lease expires; rescue ends it cancelled (not retried).
    let b_expiry = b.lease_expires_at.expect("leased");
    f.clock.set(b_expiry);
    let rescued = f.store.job_rescue_expired(10).await.expect("rescue");
    let b = applied(
        &b,
        Event::LeaseExpired {
            now: b_expiry,
            delay_ms: 1_000,
        },
    );
    assert_eq!(rescued, vec![b.clone()]);
    assert_eq!(
        (b.state, b.finished_at, b.last_error.clone()),
        (
            JobState::Cancelled,
            Some(b_expiry),
            Some(expiry_error("w1", 1))
        )
    );
    assert_eq!(f.get(b.id).await, b);

    // A cancel request wins over a spent budget, for a failure and for an expiry alike.
    for via_rescue in [false, true] {
        let queue = if via_rescue {
            "last-rescued"
        } else {
            "last-failed"
        };
        let job = f
            .enqueue(&JobSpec {
                max_attempts: 1,
                ..spec(queue)
            })
            .await;
        let job = f.claim_job(&job, 1_000).await;
        let job = f.store.job_cancel(job.id).await.expect("cancel");
        f.advance(1_000);
        let now = f.now();
        let (out, event) = if via_rescue {
            let rescued = f.store.job_rescue_expired(10).await.expect("rescue");
            assert_eq!(ids(&rescued), [job.id]);
            let event = Event::LeaseExpired {
                now,
                delay_ms: 1_000,
            };
            (rescued[0].clone(), event)
        } else {
            let out = f
                .store
                .job_fail(LeaseRef::of(&job), &failure("last", true, None))
                .await
                .expect("fail");
            let event = Event::FailRetryable {
                token: job.fencing_token,
                now,
                error: "last".into(),
                kind: FailureKind::Error,
                delay_ms: 1_000,
            };
            (out, event)
        };
        assert_eq!(out.state, JobState::Cancelled, "via rescue: {via_rescue}");
        assert_eq!(out, applied(&job, event));
        assert_eq!(f.get(job.id).await, out);
    }
}

/// A finished job cannot be cancelled.
pub async fn cancel_of_a_finished_job_is_illegal(f: Fixture) {
    let succeeded = f.succeeded("s").await;
    let failed = f.failed("f").await;
    let cancelled = f.cancelled("c").await;
    for job in [&succeeded, &failed, &cancelled] {
        expect_illegal(
            f.store.job_cancel(job.id).await,
            job.id,
            job.state,
            EventKind::Cancel,
        );
        assert_eq!(&f.get(job.id).await, job, "unchanged");
    }
}

/// Redriving a failed or cancelled job queues it due now with a fresh attempt budget, keeping
/// its last error.
pub async fn redrive_requeues_failed_and_cancelled_jobs(f: Fixture) {
    // Failed permanently.
    let failed = f.failed("f").await;
    f.advance(500);
    let now = f.now();
    let redriven = f.store.job_redrive(failed.id).await.expect("redrive");
    assert_eq!(redriven.state, JobState::Queued);
    assert_eq!(redriven.attempts, 0);
    assert_eq!(redriven.next_run_at, now);
    assert_eq!((redriven.finished_at, &redriven.result), (None, &None));
    assert_eq!(redriven.last_error.as_deref(), Some("fatal"), "kept");
    assert_eq!(redriven.fencing_token, 1, "the token never goes back");
    assert_eq!(redriven, applied(&failed, Event::Redrive { now }));
    assert_eq!(f.get(failed.id).await, redriven);
    let again = f.claim_job(&failed, LEASE_MS).await;
    assert_eq!((again.attempts, again.fencing_token), (1, 2));

    // Failed with its budget spent: it gets the whole budget again.
    let spent = f
        .enqueue(&JobSpec {
            max_attempts: 1,
            ..spec("spent")
        })
        .await;
    let running = f.claim_job(&spent, LEASE_MS).await;
    let spent = f
        .store
        .job_fail(LeaseRef::of(&running), &failure("e", true, None))
        .await
        .expect("fail");
    assert_eq!(spent.state, JobState::Failed);
    let now = f.now();
    let redriven = f.store.job_redrive(spent.id).await.expect("redrive");
    assert_eq!(redriven, applied(&spent, Event::Redrive { now }));
    f.claim_job(&spent, LEASE_MS).await;

    // Cancelled while queued, with a run_at far away: due now after the redrive.
    let scheduled = f
        .enqueue(&JobSpec {
            delay_ms: Some(3_600_000),
            ..spec("sched")
        })
        .await;
    let cancelled = f.store.job_cancel(scheduled.id).await.expect("cancel");
    f.advance(10);
    let now = f.now();
    let redriven = f.store.job_redrive(cancelled.id).await.expect("redrive");
    assert_eq!(redriven.next_run_at, now);
    assert_eq!(redriven, applied(&cancelled, Event::Redrive { now }));
    f.claim_job(&scheduled, LEASE_MS).await;

    // Cancelled while running: the cancel request is cleared.
    let running = f.running("cr").await;
    f.store.job_cancel(running.id).await.expect("cancel");
    let cancelled = f
        .store
        .job_fail(LeaseRef::of(&running), &failure("stopped", true, None))
        .await
        .expect("fail");
    assert_eq!(cancelled.state, JobState::Cancelled);
    let now = f.now();
    let redriven = f.store.job_redrive(cancelled.id).await.expect("redrive");
    assert!(!redriven.cancel_requested);
    assert_eq!(redriven, applied(&cancelled, Event::Redrive { now }));
    let claimed = f.claim_job(&running, LEASE_MS).await;
    assert!(!claimed.cancel_requested);
}

/// Only failed and cancelled jobs can be redriven.
pub async fn redrive_of_a_queued_running_or_succeeded_job_is_illegal(f: Fixture) {
    let queued = f.enqueue(&spec("q")).await;
    let running = f.running("r").await;
    let succeeded = f.succeeded("s").await;
    for job in [&queued, &running, &succeeded] {
        expect_illegal(
            f.store.job_redrive(job.id).await,
            job.id,
            job.state,
            EventKind::Redrive,
        );
        assert_eq!(&f.get(job.id).await, job, "unchanged");
    }
}

/// Unknown ids: `NotFound` for get, cancel and redrive; a lease on an unknown job is stale.
pub async fn unknown_ids_are_not_found_and_their_leases_are_stale(f: Fixture) {
    let existing = f.running("q").await;
    for id in [existing.id + 1, 0, -1, i64::MAX] {
        expect_not_found(f.store.job_get(id).await, id);
        expect_not_found(f.store.job_cancel(id).await, id);
        expect_not_found(f.store.job_redrive(id).await, id);
        let lease = LeaseRef {
            job_id: id,
            token: 1,
        };
        expect_every_write_stale(&f, lease).await;
    }
    assert_eq!(
        f.all_jobs().await,
        vec![existing],
        "nothing created or changed"
    );
}

// ---------------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------------

/// Same key, same request (key order and formatting of the payload aside): the existing job,
/// in its current state, with `created: false`.
pub async fn idempotent_replay_returns_the_existing_job(f: Fixture) {
    let payload: Value =
        serde_json::from_str(r#"{"b": 1, "a": {"y": 2, "x": [1, {"q": null, "p": "s"}]}}"#)
            .expect("json");
    let reordered: Value =
        serde_json::from_str(r#"{"a":{"x":[1,{"p":"s","q":null}],"y":2},"b":1}"#).expect("json");
    let first = JobSpec::new("charge", payload).idempotency_key("order-1");
    let created = f.enqueue(&first).await;
    assert_eq!(created.idempotency_key.as_deref(), Some("order-1"));

    f.advance(1_000);
    let replay = JobSpec::new("charge", reordered.clone()).idempotency_key("order-1");
    let out = f.store.job_enqueue(&replay).await.expect("replay");
    assert!(!out.created);
    assert_eq!(out.job, created, "the existing job, unchanged");

    // Fields outside the fingerprint (priority, attempts, schedule) do not matter.
    let other_options = JobSpec {
        priority: 9,
        max_attempts: 3,
        delay_ms: Some(60_000),
        ..replay.clone()
    };
    let out = f.store.job_enqueue(&other_options).await.expect("replay");
    assert_eq!((out.created, &out.job), (false, &created));

    // The replay returns the job as it is now.
    let running = f.claim_job(&created, LEASE_MS).await;
    let out = f.store.job_enqueue(&replay).await.expect("replay");
    assert_eq!((out.created, &out.job), (false, &running));
    let done = f
        .store
        .job_complete(LeaseRef::of(&running), Some(json!(1)))
        .await
        .expect("complete");
    let out = f.store.job_enqueue(&replay).await.expect("replay");
    assert_eq!((out.created, &out.job), (false, &done));

    assert_eq!(
        f.store
            .job_enqueue_many(&[replay])
            .await
            .expect("batch replay"),
        vec![EnqueueOutcome::Existing { id: created.id }]
    );
    assert_eq!(f.all_jobs().await, vec![done], "one job only");
}

/// Same key, different request (payload, kind or queue): `Conflict` naming the existing job.
pub async fn idempotency_key_reuse_with_another_request_conflicts(f: Fixture) {
    let original = JobSpec::new("charge", json!({"n": 1})).idempotency_key("k");
    let job = f.enqueue(&original).await;
    let conflicting = [
        JobSpec::new("charge", json!({"n": 2})).idempotency_key("k"),
        JobSpec::new("charge", json!({"n": 1.0})).idempotency_key("k"),
        JobSpec::new("charge", json!({"n": 1, "m": null})).idempotency_key("k"),
        JobSpec::new("refund", json!({"n": 1})).idempotency_key("k"),
        JobSpec::new("charge", json!({"n": 1}))
            .queue("other")
            .idempotency_key("k"),
    ];
    for spec in &conflicting {
        expect_conflict(f.store.job_enqueue(spec).await, "k", job.id);
    }
    // Keys are case-sensitive and distinct keys never conflict.
    let other_key = f
        .enqueue(&JobSpec::new("charge", json!({"n": 1})).idempotency_key("K"))
        .await;
    let no_key = f.enqueue(&JobSpec::new("charge", json!({"n": 1}))).await;
    let no_key_again = f.enqueue(&JobSpec::new("charge", json!({"n": 1}))).await;
    assert_eq!(
        ids(&f.all_jobs().await),
        [no_key_again.id, no_key.id, other_key.id, job.id]
    );
    assert_eq!(f.get(job.id).await, job, "the original is unchanged");
}

/// A batch answers per item in input order: created, existing (also for a key repeated within
/// the batch), conflict (against a stored job or an earlier item), and the others go through.
pub async fn enqueue_many_reports_per_item_outcomes(f: Fixture) {
    assert_eq!(
        f.store.job_enqueue_many(&[]).await.expect("empty batch"),
        vec![]
    );
    let stored = f
        .enqueue(&JobSpec::new("k", json!({"v": 1})).idempotency_key("kx"))
        .await;
    f.advance(1_000);
    let now = f.now();
    let p1a: Value = serde_json::from_str(r#"{"a": 1, "b": 2}"#).expect("json");
    let p1b: Value = serde_json::from_str(r#"{"b": 2, "a": 1}"#).expect("json");
    let batch = vec![
        JobSpec::new("k", p1a).idempotency_key("k1"),
        JobSpec::new("k", json!({"plain": true})).queue("other"),
        JobSpec::new("k", p1b).idempotency_key("k1"),
        JobSpec::new("k", json!({"v": 2})).idempotency_key("kx"),
        JobSpec::new("k", json!({"a": 9})).idempotency_key("k1"),
        JobSpec::new("k", json!({"v": 1})).idempotency_key("kx"),
        JobSpec {
            priority: 3,
            delay_ms: Some(5_000),
            ..JobSpec::new("k", json!({})).idempotency_key("k2")
        },
    ];
    let out = f.store.job_enqueue_many(&batch).await.expect("batch");
    assert_eq!(out.len(), batch.len());
    let created_id = |i: usize| match out[i] {
        EnqueueOutcome::Created { id } => id,
        other => panic!("item {i}: expected Created, got {other:?}"),
    };
    let (a, b, c) = (created_id(0), created_id(1), created_id(6));
    assert!(
        stored.id < a && a < b && b < c,
        "ids increase in input order"
    );
    assert_eq!(
        out,
        vec![
            EnqueueOutcome::Created { id: a },
            EnqueueOutcome::Created { id: b },
            EnqueueOutcome::Existing { id: a },
            EnqueueOutcome::Conflict {
                existing_id: stored.id
            },
            EnqueueOutcome::Conflict { existing_id: a },
            EnqueueOutcome::Existing { id: stored.id },
            EnqueueOutcome::Created { id: c },
        ]
    );
    assert_eq!(f.get(a).await, Job::new(a, &batch[0], now));
    assert_eq!(f.get(b).await, Job::new(b, &batch[1], now));
    assert_eq!(f.get(c).await, Job::new(c, &batch[6], now));
    assert_eq!(ids(&f.all_jobs().await), [c, b, a, stored.id]);
    assert_eq!(f.get(stored.id).await, stored);
}

/// 50 concurrent enqueues with one key create one job and all name it; concurrent batches
/// sharing keys agree as well.
pub async fn concurrent_enqueues_with_one_key_create_exactly_one_job(f: Fixture) {
    let spec = JobSpec::new("race", json!({"x": 1})).idempotency_key("race");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let store = Arc::clone(&f.store);
        let spec = spec.clone();
        tasks.spawn(async move { store.job_enqueue(&spec).await });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.expect("task").expect("enqueue"));
    }
    let jobs = f.all_jobs().await;
    assert_eq!(jobs.len(), 1, "exactly one job");
    let id = jobs[0].id;
    assert!(
        results.iter().all(|r| r.job.id == id),
        "every call names the job"
    );
    assert_eq!(
        results.iter().filter(|r| r.created).count(),
        1,
        "one creator"
    );

    let batch = vec![
        JobSpec::new("race", json!(2)).idempotency_key("race-2"),
        JobSpec::new("race", json!(3)).idempotency_key("race-3"),
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let store = Arc::clone(&f.store);
        let batch = batch.clone();
        tasks.spawn(async move { store.job_enqueue_many(&batch).await });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        outcomes.push(joined.expect("task").expect("enqueue many"));
    }
    let jobs = f.all_jobs().await;
    assert_eq!(jobs.len(), 3);
    for item in 0..2 {
        let id = jobs
            .iter()
            .find(|j| j.idempotency_key == batch[item].idempotency_key)
            .expect("stored")
            .id;
        let created = outcomes
            .iter()
            .filter(|o| o[item] == EnqueueOutcome::Created { id })
            .count();
        let existing = outcomes
            .iter()
            .filter(|o| o[item] == EnqueueOutcome::Existing { id })
            .count();
        assert_eq!((created, existing), (1, 9), "item {item}: {outcomes:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Concurrency and rescue
// ---------------------------------------------------------------------------------------------

/// 8 claimers racing over 500 jobs: every job is claimed exactly once.
pub async fn concurrent_claimers_never_receive_the_same_job(f: Fixture) {
    for chunk in 0..5 {
        let specs: Vec<JobSpec> = (0..100)
            .map(|i| JobSpec::new("work", json!({"n": chunk * 100 + i})).queue("busy"))
            .collect();
        f.store.job_enqueue_many(&specs).await.expect("enqueue");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8_u32 {
        let store = Arc::clone(&f.store);
        tasks.spawn(async move {
            let p = ClaimParams {
                worker_id: format!("w{worker}"),
                claim_id: None,
                ..params(&["busy"], worker % 4 + 1, 60_000)
            };
            let mut mine = Vec::new();
            loop {
                let claimed = store.job_claim(&p).await.expect("claim");
                if claimed.is_empty() {
                    break;
                }
                assert!(claimed.len() <= p.limit as usize);
                mine.extend(claimed.into_iter().map(|job| (job, p.worker_id.clone())));
                tokio::task::yield_now().await;
            }
            mine
        });
    }
    let mut claimed = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        claimed.extend(joined.expect("claimer"));
    }
    let distinct: BTreeSet<i64> = claimed.iter().map(|(job, _)| job.id).collect();
    assert_eq!(claimed.len(), 500, "claims in total");
    assert_eq!(distinct.len(), 500, "no job claimed twice");
    for (job, worker) in &claimed {
        assert_eq!((job.attempts, job.fencing_token), (1, 1), "job {}", job.id);
        assert_eq!(job.lease_owner.as_ref(), Some(worker));
    }
    let stored = f.all_jobs().await;
    assert_eq!(stored.len(), 500);
    assert!(
        stored
            .iter()
            .all(|j| j.state == JobState::Running && j.attempts == 1)
    );
}

/// Rescue and completion racing over the same expired leases: every job ends exactly one way,
/// either completed (and never rescued) or rescued (and its completion refused).
pub async fn concurrent_rescue_and_completion_never_both_apply(f: Fixture) {
    let specs: Vec<JobSpec> = (0..200)
        .map(|i| JobSpec {
            retry_policy: EXACT,
            ..JobSpec::new("work", json!({ "n": i })).queue("race")
        })
        .collect();
    f.store.job_enqueue_many(&specs).await.expect("enqueue");
    let claimed = f.claim(&params(&["race"], 200, 1_000)).await;
    assert_eq!(claimed.len(), 200);
    f.advance(1_000);
    let now = f.now();

    let leases: Vec<LeaseRef> = claimed.iter().map(LeaseRef::of).collect();
    let store = Arc::clone(&f.store);
    let completer = tokio::spawn(async move {
        let mut accepted = BTreeSet::new();
        for (i, chunk) in leases.chunks(5).enumerate() {
            if i % 2 == 0 {
                let items: Vec<(LeaseRef, Option<Value>)> =
                    chunk.iter().map(|l| (*l, Some(json!("done")))).collect();
                let out = store
                    .job_complete_many(&items)
                    .await
                    .expect("complete many");
                for (lease, outcome) in chunk.iter().zip(out) {
                    if outcome == WriteOutcome::Accepted {
                        accepted.insert(lease.job_id);
                    }
                }
            } else {
                for lease in chunk {
                    match store.job_complete(*lease, Some(json!("done"))).await {
                        Ok(job) => {
                            assert_eq!(job.state, JobState::Succeeded);
                            accepted.insert(lease.job_id);
                        }
                        Err(StoreError::StaleLease { lease: got }) => assert_eq!(got, *lease),
                        Err(e) => panic!("complete: {e}"),
                    }
                }
            }
            tokio::task::yield_now().await;
        }
        accepted
    });
    let store = Arc::clone(&f.store);
    let rescuer = tokio::spawn(async move {
        let mut rescued = BTreeSet::new();
        loop {
            let batch = store.job_rescue_expired(3).await.expect("rescue");
            if batch.is_empty() {
                break;
            }
            for job in batch {
                assert_eq!(job.state, JobState::Queued, "rescued {job:?}");
                assert!(rescued.insert(job.id), "job {} rescued twice", job.id);
            }
            tokio::task::yield_now().await;
        }
        rescued
    });
    let accepted = completer.await.expect("completer");
    let rescued = rescuer.await.expect("rescuer");
    assert_eq!(
        f.store.job_rescue_expired(1_000).await.expect("rescue"),
        vec![],
        "nothing left running"
    );
    assert!(
        accepted.is_disjoint(&rescued),
        "completed and rescued: {:?}",
        accepted.intersection(&rescued).collect::<Vec<_>>()
    );
    assert_eq!(
        accepted.len() + rescued.len(),
        200,
        "every job ended one way"
    );
    for job in &claimed {
        let stored = f.get(job.id).await;
        let expected = if accepted.contains(&job.id) {
            applied(
                job,
                Event::Complete {
                    token: 1,
                    now,
                    result: Some(json!("done")),
                },
            )
        } else {
            applied(
                job,
                Event::LeaseExpired {
                    now,
                    delay_ms: 1_000,
                },
            )
        };
        assert_eq!(stored, expected);
    }
}

/// A completed job is not rescued; a rescued job refuses the late completion; an extended lease
/// is not rescued before its new end, and is rescued exactly at it.
pub async fn rescue_never_touches_a_completed_or_extended_job(f: Fixture) {
    // Completion after the lease ran out but before any rescue: accepted, and rescue skips it.
    let late = f.enqueue(&spec("late")).await;
    let late = f.claim_job(&late, 1_000).await;
    f.advance(1_000);
    let done = f
        .store
        .job_complete(LeaseRef::of(&late), None)
        .await
        .expect("complete");
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(
        f.store.job_rescue_expired(10).await.expect("rescue"),
        vec![]
    );
    assert_eq!(f.get(done.id).await, done);

    // Rescue first: the holder's completion is then stale.
    let slow = f.enqueue(&spec("slow")).await;
    let slow = f.claim_job(&slow, 1_000).await;
    f.advance(999);
    assert_eq!(
        f.store.job_rescue_expired(10).await.expect("rescue"),
        vec![],
        "1 ms before the lease ends"
    );
    f.advance(1);
    let now = f.now();
    let rescued = f.store.job_rescue_expired(10).await.expect("rescue");
    let expected = applied(
        &slow,
        Event::LeaseExpired {
            now,
            delay_ms: 1_000,
        },
    );
    assert_eq!(rescued, vec![expected.clone()]);
    expect_stale(
        f.store.job_complete(LeaseRef::of(&slow), None).await,
        LeaseRef::of(&slow),
    );
    assert_eq!(
        f.store
            .job_heartbeat_many(&[LeaseRef::of(&slow)], 1_000)
            .await
            .expect("heartbeat"),
        vec![HeartbeatOutcome::Lost]
    );
    assert_eq!(f.get(slow.id).await, expected);

    // A heartbeat moves the lease end from the store's now.
    let kept = f.enqueue(&spec("kept")).await;
    let kept = f.claim_job(&kept, 5_000).await;
    f.advance(4_000);
    let beat_at = f.now();
    assert_eq!(
        f.store
            .job_heartbeat_many(&[LeaseRef::of(&kept)], 5_000)
            .await
            .expect("heartbeat"),
        vec![HeartbeatOutcome::Extended {
            lease_expires_at: beat_at + ms(5_000),
            cancel_requested: false
        }]
    );
    f.advance(1_000);
    assert_eq!(
        f.store.job_rescue_expired(10).await.expect("rescue"),
        vec![],
        "past the original end"
    );
    f.advance(3_999);
    assert_eq!(
        f.store.job_rescue_expired(10).await.expect("rescue"),
        vec![]
    );
    f.advance(1);
    let rescued = f.store.job_rescue_expired(10).await.expect("rescue");
    assert_eq!(ids(&rescued), [kept.id], "rescued exactly at the new end");
    assert_eq!(rescued[0].state, JobState::Queued);
}

/// Rescue takes at most `limit` expired leases per call, earliest lease end first (then id),
/// returns them in that order, and never takes an unexpired one.
pub async fn rescue_respects_its_limit(f: Fixture) {
    let mut leased = Vec::new();
    for lease_ms in [1_000, 3_000, 2_000, 2_000, 500] {
        let job = f.enqueue(&spec("short")).await;
        leased.push(f.claim_job(&job, lease_ms).await);
    }
    let long = f.enqueue(&spec("long")).await;
    let long = f.claim_job(&long, 60_000).await;
    f.advance(3_000);
    let now = f.now();
    match f.store.job_rescue_expired(0).await {
        Ok(jobs) => assert_eq!(jobs, vec![], "limit 0 rescues nothing"),
        Err(StoreError::Invalid(_)) => {}
        Err(e) => panic!("rescue with limit 0: {e:?}"),
    }
    let expired = |job: &Job| {
        applied(
            job,
            Event::LeaseExpired {
                now,
                delay_ms: 1_000,
            },
        )
    };
    let [a, b, c, d, e] = <[Job; 5]>::try_from(leased).expect("five jobs");
    let expected = [
        vec![expired(&e), expired(&a)],
        vec![expired(&c), expired(&d)],
        vec![expired(&b)],
        vec![],
    ];
    for batch in expected {
        assert_eq!(f.store.job_rescue_expired(2).await.expect("rescue"), batch);
        for job in &batch {
            assert_eq!(job.state, JobState::Queued);
            assert_eq!(job.next_run_at, now + ms(1_000));
            assert_eq!(job.last_error, Some(expiry_error("w1", 1)));
            assert_eq!(&f.get(job.id).await, job);
        }
    }
    assert_eq!(
        f.get(long.id).await,
        long,
        "the unexpired lease is untouched"
    );
}

// ---------------------------------------------------------------------------------------------
// Reads and maintenance
// ---------------------------------------------------------------------------------------------

/// Follows `next_cursor` from the first page, checks every page's shape and returns the jobs:
/// `next_cursor` is the last id of a full page exactly when more matching jobs follow, and `None`
/// on the last page (even when that page is exactly full).
async fn collect_pages(f: &Fixture, params: &ListParams) -> Vec<Job> {
    let mut all: Vec<Job> = Vec::new();
    let mut cursor = params.before_id;
    for page_no in 0.. {
        assert!(page_no < 1_000, "pagination does not end");
        let page = f
            .store
            .job_list(&ListParams {
                before_id: cursor,
                ..params.clone()
            })
            .await
            .expect("list");
        assert!(page.jobs.len() <= params.limit as usize, "page too long");
        assert!(
            !page.jobs.is_empty() || page_no == 0,
            "a cursor pointed at an empty page"
        );
        for job in &page.jobs {
            if let Some(prev) = all.last() {
                assert!(job.id < prev.id, "ids strictly decrease across pages");
            }
            all.push(job.clone());
        }
        match page.next_cursor {
            None => break,
            Some(next) => {
                assert_eq!(
                    page.jobs.len(),
                    params.limit as usize,
                    "only the last page is short"
                );
                assert_eq!(
                    Some(next),
                    page.jobs.last().map(|j| j.id),
                    "cursor = last id"
                );
                cursor = Some(next);
            }
        }
    }
    all
}

/// Listing filters by queue, state and kind, newest first, and keyset pagination visits every
/// matching job exactly once.
pub async fn list_filters_and_paginates_without_gaps_or_duplicates(f: Fixture) {
    let mut ids_made = Vec::new();
    for i in 0..23_i64 {
        let spec = JobSpec {
            kind: format!("k{}", i % 3),
            ..JobSpec::new("x", json!({ "i": i })).queue(if i % 2 == 0 { "q1" } else { "q2" })
        };
        ids_made.push(f.enqueue(&spec).await.id);
    }
    // Vary states: complete some, fail some.
    let running = f.claim(&params(&["q1", "q2"], 9, LEASE_MS)).await;
    for (i, job) in running.iter().enumerate() {
        if i % 3 == 0 {
            f.store
                .job_complete(LeaseRef::of(job), None)
                .await
                .expect("complete");
        } else if i % 3 == 1 {
            f.store
                .job_fail(LeaseRef::of(job), &failure("e", false, None))
                .await
                .expect("fail");
        }
    }
    let mut everything = Vec::new();
    for id in ids_made.iter().rev() {
        everything.push(f.get(*id).await);
    }

    let cases: Vec<ListParams> = vec![
        ListParams::default(),
        ListParams {
            queue: Some("q1".into()),
            ..ListParams::default()
        },
        ListParams {
            state: Some(JobState::Queued),
            ..ListParams::default()
        },
        ListParams {
            state: Some(JobState::Succeeded),
            ..ListParams::default()
        },
        ListParams {
            kind: Some("k2".into()),
            ..ListParams::default()
        },
        ListParams {
            queue: Some("q2".into()),
            state: Some(JobState::Queued),
            kind: Some("k1".into()),
            ..ListParams::default()
        },
        ListParams {
            queue: Some("nope".into()),
            ..ListParams::default()
        },
        ListParams {
            before_id: Some(ids_made[10]),
            ..ListParams::default()
        },
        ListParams {
            queue: Some("q1".into()),
            before_id: Some(ids_made[10]),
            ..ListParams::default()
        },
    ];
    for case in cases {
        let expected: Vec<Job> = everything
            .iter()
            .filter(|j| case.queue.as_ref().is_none_or(|q| &j.queue == q))
            .filter(|j| case.state.is_none_or(|s| j.state == s))
            .filter(|j| case.kind.as_ref().is_none_or(|k| &j.kind == k))
            .filter(|j| case.before_id.is_none_or(|b| j.id < b))
            .cloned()
            .collect();
        for limit in [1_u32, 3, 4, 7, 11, 100] {
            let got = collect_pages(
                &f,
                &ListParams {
                    limit,
                    ..case.clone()
                },
            )
            .await;
            assert_eq!(ids(&got), ids(&expected), "{case:?} limit {limit}");
            assert_eq!(got, expected, "{case:?} limit {limit}");
        }
    }
}

/// Per queue with any job, sorted by queue: every state counted, and the oldest due queued job.
pub async fn queue_stats_count_states_and_the_oldest_ready_job(f: Fixture) {
    assert_eq!(f.store.queue_stats().await.expect("stats"), vec![]);
    let now = f.now();
    let at = |queue: &str, offset_ms: i64| JobSpec {
        run_at: Some(now + ms(offset_ms)),
        ..spec(queue)
    };
    // Queue "b" (enqueued first, listed second): only a future job.
    let b_future = f.enqueue(&at("b", 5_000)).await;
    // Queue "B": sorted by bytes, it comes first whatever the database's collation.
    let upper = f.enqueue(&at("B", 0)).await;
    // Queue "a": running and finished jobs with older next_run_at than any queued one.
    for _ in 0..4 {
        f.enqueue(&at("a", -60_000)).await;
    }
    let claimed = f.claim(&params(&["a"], 4, LEASE_MS)).await;
    assert_eq!(claimed.len(), 4);
    f.store
        .job_complete(LeaseRef::of(&claimed[0]), None)
        .await
        .expect("complete");
    f.store
        .job_fail(LeaseRef::of(&claimed[1]), &failure("e", false, None))
        .await
        .expect("fail");
    f.store.job_cancel(claimed[2].id).await.expect("cancel");
    f.store
        .job_fail(LeaseRef::of(&claimed[2]), &failure("e", true, None))
        .await
        .expect("fail into cancelled");
    f.enqueue(&at("a", -1_000)).await;
    f.enqueue(&at("a", -2_000)).await;
    f.enqueue(&at("a", 0)).await;
    f.enqueue(&at("a", 1_000)).await;
    let cancelled_queued = f.enqueue(&at("a", -90_000)).await;
    f.store
        .job_cancel(cancelled_queued.id)
        .await
        .expect("cancel");

    let stats = f.store.queue_stats().await.expect("stats");
    assert_eq!(
        stats.iter().map(|s| s.queue.as_str()).collect::<Vec<_>>(),
        ["B", "a", "b"]
    );
    let counts = |i: usize| -> Vec<(JobState, i64)> {
        let mut c = stats[i].counts.clone();
        c.sort();
        c
    };
    use JobState::*;
    assert_eq!(
        counts(1),
        vec![
            (Queued, 4),
            (Running, 1),
            (Succeeded, 1),
            (Failed, 1),
            (Cancelled, 2)
        ]
    );
    assert_eq!(stats[1].count(Queued), 4);
    assert_eq!(stats[1].oldest_ready_at, Some(now - ms(2_000)));
    assert_eq!(
        counts(2),
        vec![
            (Queued, 1),
            (Running, 0),
            (Succeeded, 0),
            (Failed, 0),
            (Cancelled, 0)
        ]
    );
    assert_eq!(stats[2].oldest_ready_at, None, "nothing due yet");
    assert_eq!(
        counts(0),
        vec![
            (Queued, 1),
            (Running, 0),
            (Succeeded, 0),
            (Failed, 0),
            (Cancelled, 0)
        ]
    );
    assert_eq!(stats[0].oldest_ready_at, Some(upper.next_run_at));

    f.advance(5_000);
    let stats = f.store.queue_stats().await.expect("stats");
    assert_eq!(stats[2].oldest_ready_at, Some(b_future.next_run_at));
    assert_eq!(stats[1].oldest_ready_at, Some(now - ms(2_000)));
}

/// The backlog [`JobStore::queue_backlog`] must report at `now`, computed from every job.
pub fn expected_backlog<'a>(
    jobs: impl IntoIterator<Item = &'a Job>,
    now: DateTime<Utc>,
) -> Vec<QueueBacklog> {
    let mut per_queue = std::collections::BTreeMap::<String, QueueBacklog>::new();
    for job in jobs {
        if !matches!(job.state, JobState::Queued | JobState::Running) {
            continue;
        }
        let b = per_queue
            .entry(job.queue.clone())
            .or_insert_with(|| QueueBacklog {
                queue: job.queue.clone(),
                queued: 0,
                ready: 0,
                running: 0,
                oldest_ready_at: None,
            });
        if job.state == JobState::Running {
            b.running += 1;
        } else {
            b.queued += 1;
            if job.next_run_at <= now {
                b.ready += 1;
                b.oldest_ready_at = Some(
                    b.oldest_ready_at
                        .map_or(job.next_run_at, |at| at.min(job.next_run_at)),
                );
            }
        }
    }
    per_queue.into_values().collect()
}

/// Per queue with a queued or running job, sorted by queue (bytes): queued, ready and running
/// counts and the oldest due queued job; finished jobs are not backlog, and a queue with only
/// finished jobs is absent.
pub async fn queue_backlog_counts_unfinished_jobs_and_the_oldest_ready_job(f: Fixture) {
    assert_eq!(f.store.queue_backlog().await.expect("backlog"), vec![]);
    let now = f.now();
    let at = |queue: &str, offset_ms: i64, priority: i16| JobSpec {
        run_at: Some(now + ms(offset_ms)),
        priority,
        ..spec(queue)
    };
    // Queue "done": only finished jobs, so it has no backlog at all.
    let done = f.enqueue(&at("done", 0, 0)).await;
    let done = f.claim_job(&done, LEASE_MS).await;
    f.store
        .job_complete(LeaseRef::of(&done), None)
        .await
        .expect("complete");
    f.store
        .job_cancel(f.enqueue(&at("done", -1_000, 0)).await.id)
        .await
        .expect("cancel");
    // Queue "run": only running jobs, one of them with a cancel requested (still running).
    for _ in 0..2 {
        f.enqueue(&at("run", -5_000, 0)).await;
    }
    let running = f.claim(&params(&["run"], 2, LEASE_MS)).await;
    assert_eq!(running.len(), 2);
    f.store.job_cancel(running[0].id).await.expect("cancel");
    // Queue "a": running, finished, due and future queued jobs; the oldest due job has the
    // lowest claim priority, so it is not the first in claim order.
    for _ in 0..3 {
        f.enqueue(&at("a", -60_000, 0)).await;
    }
    let claimed = f.claim(&params(&["a"], 3, LEASE_MS)).await;
    assert_eq!(claimed.len(), 3);
    f.store
        .job_fail(LeaseRef::of(&claimed[0]), &failure("e", false, None))
        .await
        .expect("fail");
    f.store
        .job_fail(LeaseRef::of(&claimed[1]), &failure("e", true, Some(3_000)))
        .await
        .expect("retry");
    f.enqueue(&at("a", -1_000, 0)).await;
    f.enqueue(&at("a", -7_000, 5)).await;
    f.enqueue(&at("a", 0, 0)).await;
    f.enqueue(&at("a", 10_000, 0)).await;
    // Queue "B": sorted by bytes, it comes first whatever the database's collation; only future.
    let upper = f.enqueue(&at("B", 2_000, 0)).await;

    let backlog = f.store.queue_backlog().await.expect("backlog");
    let entry = |queue: &str, queued, ready, running, oldest| QueueBacklog {
        queue: queue.into(),
        queued,
        ready,
        running,
        oldest_ready_at: oldest,
    };
    assert_eq!(
        backlog,
        vec![
            entry("B", 1, 0, 0, None),
            // the retry (due in 3 s) + 4 enqueued, 3 of them due; 1 running (claimed[2])
            entry("a", 5, 3, 1, Some(now - ms(7_000))),
            entry("run", 0, 0, 2, None),
        ]
    );
    assert_eq!(backlog, expected_backlog(&f.all_jobs().await, now));

    // Time passes: the retry and "B" become due; a claim and a rescue move jobs around.
    f.advance(3_000);
    let later = f.now();
    let backlog = f.store.queue_backlog().await.expect("backlog");
    assert_eq!(backlog[0], entry("B", 1, 1, 0, Some(upper.next_run_at)));
    assert_eq!(backlog[1], entry("a", 5, 4, 1, Some(now - ms(7_000))));
    assert_eq!(backlog, expected_backlog(&f.all_jobs().await, later));
    assert_eq!(f.claim(&params(&["B", "a"], 2, LEASE_MS)).await.len(), 2);
    f.advance(LEASE_MS);
    f.store.job_rescue_expired(100).await.expect("rescue");
    let backlog = f.store.queue_backlog().await.expect("backlog");
    assert_eq!(backlog, expected_backlog(&f.all_jobs().await, f.now()));
    assert!(
        backlog.iter().all(|b| b.running == 0),
        "every lease expired: {backlog:?}"
    );
}

async fn remaining_ids(f: &Fixture) -> BTreeSet<i64> {
    f.all_jobs().await.iter().map(|j| j.id).collect()
}

fn retention(succeeded_ms: i64, failed_ms: i64, cancelled_ms: i64, limit: u32) -> PruneParams {
    PruneParams {
        succeeded_retention_ms: succeeded_ms,
        failed_retention_ms: failed_ms,
        cancelled_retention_ms: cancelled_ms,
        limit,
    }
}

/// Only finished jobs go, each once it has been finished strictly longer than its state's
/// retention (counted from `finished_at`, not `created_at`).
pub async fn prune_deletes_only_finished_jobs_past_their_retention(f: Fixture) {
    const HOUR: i64 = 3_600_000;
    let queued = f.enqueue(&spec("queued")).await;
    let running = f.enqueue(&spec("running")).await;
    let running = f.claim_job(&running, 100 * HOUR).await;
    let old_but_late = f.running("late").await;
    let succeeded = f.succeeded("s").await;
    let failed = f.failed("f").await;
    let cancelled = f.cancelled("c").await;
    let t1 = f.now();
    f.advance(HOUR);
    // Finished one hour after the others, though created at the same time.
    let old_but_late = f
        .store
        .job_complete(LeaseRef::of(&old_but_late), None)
        .await
        .expect("complete");
    assert_eq!(old_but_late.finished_at, Some(t1 + ms(HOUR)));

    let p = retention(HOUR, 2 * HOUR, 3 * HOUR, 100);
    let set = |jobs: &[&Job]| jobs.iter().map(|j| j.id).collect::<BTreeSet<i64>>();

    f.clock.set(t1 + ms(HOUR));
    assert_eq!(f.store.job_prune(&p).await.expect("prune"), 0);
    f.clock.set(t1 + ms(HOUR + 1));
    assert_eq!(f.store.job_prune(&p).await.expect("prune"), 1);
    expect_not_found(f.store.job_get(succeeded.id).await, succeeded.id);
    assert_eq!(
        remaining_ids(&f).await,
        set(&[&queued, &running, &old_but_late, &failed, &cancelled])
    );
    f.clock.set(t1 + ms(2 * HOUR + 1));
    assert_eq!(
        f.store.job_prune(&p).await.expect("prune"),
        2,
        "failed + late success"
    );
    assert_eq!(
        remaining_ids(&f).await,
        set(&[&queued, &running, &cancelled])
    );
    f.clock.set(t1 + ms(3 * HOUR));
    assert_eq!(f.store.job_prune(&p).await.expect("prune"), 0);
    f.clock.set(t1 + ms(3 * HOUR + 1));
    assert_eq!(f.store.job_prune(&p).await.expect("prune"), 1);
    assert_eq!(remaining_ids(&f).await, set(&[&queued, &running]));
    f.advance(1_000 * HOUR);
    assert_eq!(
        f.store.job_prune(&p).await.expect("prune"),
        0,
        "never live jobs"
    );
    assert_eq!(f.get(queued.id).await, queued);
    assert_eq!(f.get(running.id).await, running);
}

/// Pruning deletes at most `limit` jobs per call; a pruned job's idempotency key is free again.
pub async fn prune_respects_its_limit_and_frees_idempotency_keys(f: Fixture) {
    // Finished in the order 4, 3, 2, 1, 0: pruning goes oldest first.
    let mut running = Vec::new();
    for i in 0..5 {
        running.push(f.running(&format!("s{i}")).await);
    }
    let mut by_age = Vec::new();
    for job in running.iter().rev() {
        f.advance(100);
        f.store
            .job_complete(LeaseRef::of(job), None)
            .await
            .expect("complete");
        by_age.push(job.id);
    }
    let keyed_spec = JobSpec::new("once", json!({"v": 1})).idempotency_key("once");
    let keyed = f.enqueue(&keyed_spec).await;
    let keyed = f.claim_job(&keyed, LEASE_MS).await;
    f.store
        .job_complete(LeaseRef::of(&keyed), None)
        .await
        .expect("complete");
    f.advance(10_000);
    let p = retention(1_000, 1_000, 1_000, 2);
    assert_eq!(f.store.job_prune(&p).await.expect("prune"), 2);
    let mut left: BTreeSet<i64> = by_age[2..].iter().copied().collect();
    left.insert(keyed.id);
    assert_eq!(remaining_ids(&f).await, left, "the two oldest went first");
    assert_eq!(f.store.job_prune(&p).await.expect("prune"), 2);
    assert_eq!(
        remaining_ids(&f).await,
        BTreeSet::from([by_age[4], keyed.id])
    );
    assert_eq!(f.store.job_prune(&p).await.expect("prune"), 2);
    assert_eq!(f.store.job_prune(&p).await.expect("prune"), 0);
    assert_eq!(f.all_jobs().await, vec![]);

    let reused = f
        .store
        .job_enqueue(&JobSpec::new("once", json!({"v": 2})).idempotency_key("once"))
        .await
        .expect("the key is free again");
    assert!(reused.created);
    assert!(reused.job.id > keyed.id);
    assert_eq!(reused.job.payload, json!({"v": 2}));
}
