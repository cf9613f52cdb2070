//! Contract cases for the runtime's rows: queues (pause/resume), batch failures and the attempt
//! history, the maintenance leadership and the process registry.

use faultline_domain::{AttemptError, Event, FailureKind, JobSpec, JobState};
use faultline_ports::{
    ClaimParams, ElectParams, FailOutcome, Failure, LeaseRef, ProcessSpec, QueueSlots,
};
use serde_json::json;

use super::{
    EXACT, Fixture, LEASE_MS, applied, claim_event, expect_invalid, expiry_error, failure, ids,
    params, spec,
};

// ---------------------------------------------------------------------------------------------
// Queues
// ---------------------------------------------------------------------------------------------

/// A paused queue yields nothing to any claim (alone or with other queues) until resumed; its
/// enqueues still succeed and its running jobs still report; queue rows appear on first enqueue
/// or when paused by name, and pause/resume are idempotent.
pub async fn pause_stops_claims_of_a_queue_until_it_is_resumed(f: Fixture) {
    assert!(f.store.queue_list().await.expect("list").is_empty());
    let a1 = f.enqueue(&spec("a")).await;
    let running = f.claim_job(&a1, LEASE_MS).await;
    let a2 = f.enqueue(&spec("a")).await;
    let b1 = f.enqueue(&spec("b")).await;
    let queues = f.store.queue_list().await.expect("list");
    let names: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "rows appear on first enqueue, sorted");
    assert!(queues.iter().all(|q| !q.paused && q.paused_at.is_none()));
    assert!(queues.iter().all(|q| q.created_at == f.now()));

    f.advance(1_000);
    let paused = f.store.queue_pause("a").await.expect("pause");
    assert!(paused.paused);
    assert_eq!(paused.paused_at, Some(f.now()));
    assert_eq!(paused.updated_at, f.now());
    assert!(f.claim(&params(&["a"], 10, LEASE_MS)).await.is_empty());
    assert_eq!(
        ids(&f.claim(&params(&["a", "b"], 10, LEASE_MS)).await),
        [b1.id],
        "a claim over several queues skips the paused one"
    );
    // Enqueueing into a paused queue succeeds; the job waits.
    let a3 = f.enqueue(&spec("a")).await;
    assert_eq!(a3.state, JobState::Queued);
    // The running job of the paused queue still heartbeats and completes.
    let lease = LeaseRef::of(&running);
    let beats = f.store.job_heartbeat_many(&[lease], LEASE_MS).await;
    assert!(matches!(
        beats.as_deref(),
        Ok([faultline_ports::HeartbeatOutcome::Extended { .. }])
    ));
    f.store.job_complete(lease, None).await.expect("complete");

    // Pausing again changes nothing.
    f.advance(1_000);
    let again = f.store.queue_pause("a").await.expect("pause again");
    assert_eq!(again, paused);

    f.advance(1_000);
    let resumed = f.store.queue_resume("a").await.expect("resume");
    assert!(!resumed.paused);
    assert_eq!(resumed.paused_at, paused.paused_at, "kept for diagnosis");
    assert_eq!(resumed.updated_at, f.now());
    assert_eq!(
        ids(&f.claim(&params(&["a"], 10, LEASE_MS)).await),
        [a2.id, a3.id]
    );
    assert_eq!(
        f.store.queue_resume("a").await.expect("resume again"),
        resumed
    );

    // A queue can be paused before it has any job; names are checked.
    let early = f.store.queue_pause("later").await.expect("pause unknown");
    assert!(early.paused);
    let later = f.enqueue(&spec("later")).await;
    assert!(f.claim(&params(&["later"], 10, LEASE_MS)).await.is_empty());
    f.store.queue_resume("later").await.expect("resume");
    assert_eq!(
        ids(&f.claim(&params(&["later"], 10, LEASE_MS)).await),
        [later.id]
    );
    expect_invalid(f.store.queue_pause("").await, "an empty queue name");
    expect_invalid(
        f.store.queue_resume("a\nb").await,
        "a queue name with a newline",
    );
    let names: Vec<String> = f
        .store
        .queue_list()
        .await
        .expect("list")
        .into_iter()
        .map(|q| q.name)
        .collect();
    assert_eq!(names, ["a", "b", "later"]);
}

// ---------------------------------------------------------------------------------------------
// Batch failures and the attempt history
// ---------------------------------------------------------------------------------------------

/// `job_fail_many` applies each item as `job_fail` would, fenced by its own lease, with an
/// outcome per item in input order; a repeated lease applies once; an invalid item changes
/// nothing.
pub async fn fail_many_reports_per_item_outcomes(f: Fixture) {
    let a = f.running("q").await;
    let b = f.running("q").await;
    let c = f.running("q").await;
    let stale = LeaseRef {
        job_id: c.id,
        token: c.fencing_token + 7,
    };
    let retry = Failure {
        retry_delay_ms: Some(5_000),
        ..failure("try again", true, None)
    };
    let fatal = Failure {
        kind: FailureKind::Timeout,
        ..failure("too slow", false, None)
    };
    let bad = Failure {
        retry_delay_ms: Some(-1),
        ..failure("bad", true, None)
    };
    expect_invalid(
        f.store
            .job_fail_many(&[(LeaseRef::of(&a), retry.clone()), (LeaseRef::of(&b), bad)])
            .await,
        "a negative retry delay in a batch",
    );
    assert_eq!(f.get(a.id).await, a, "an invalid batch changes nothing");

    f.advance(10);
    let outcomes = f
        .store
        .job_fail_many(&[
            (LeaseRef::of(&b), fatal.clone()),
            (stale, retry.clone()),
            (LeaseRef::of(&a), retry.clone()),
            (LeaseRef::of(&a), fatal.clone()),
        ])
        .await
        .expect("fail many");
    assert_eq!(
        outcomes,
        [
            FailOutcome::Applied {
                state: JobState::Failed
            },
            FailOutcome::Stale,
            FailOutcome::Applied {
                state: JobState::Queued
            },
            FailOutcome::Stale
        ]
    );
    let now = f.now();
    let expected_a = applied(
        &a,
        Event::FailRetryable {
            token: a.fencing_token,
            now,
            error: "try again".into(),
            kind: FailureKind::Error,
            delay_ms: 5_000,
        },
    );
    let expected_b = applied(
        &b,
        Event::FailPermanently {
            token: b.fencing_token,
            now,
            error: "too slow".into(),
            kind: FailureKind::Timeout,
        },
    );
    assert_eq!(f.get(a.id).await, expected_a);
    assert_eq!(f.get(b.id).await, expected_b);
    assert_eq!(f.get(c.id).await, c, "the stale item changed nothing");
    assert_eq!(f.store.job_fail_many(&[]).await.expect("empty"), []);
}

/// Every failed attempt (handler error, timeout, panic, worker error, lease expiry) appends an
/// entry with the attempt, the store's time, the lease holder, the token, the error and its
/// kind; only the newest `AttemptError::HISTORY` are kept; a success appends nothing; a redrive
/// keeps the history.
pub async fn failed_attempts_are_kept_in_a_bounded_history(f: Fixture) {
    let job = f
        .enqueue(&JobSpec {
            max_attempts: 40,
            retry_policy: EXACT,
            ..JobSpec::new("work", json!(null)).queue("h")
        })
        .await;
    assert!(job.errors.is_empty());
    let mut expected = job.clone();
    let kinds = [
        FailureKind::Error,
        FailureKind::Timeout,
        FailureKind::Panic,
        FailureKind::Worker,
    ];
    let rounds = AttemptError::HISTORY + 5;
    for round in 0..rounds {
        // Past any backoff of the EXACT policy (at most 5 s).
        f.advance(6_000);
        let claimed = f.claim_job(&expected, LEASE_MS).await;
        expected = applied(&expected, claim_event("w1", f.now(), LEASE_MS));
        assert_eq!(claimed, expected, "claim {round}");
        f.advance(3);
        if round % 5 == 4 {
            // Every fifth attempt is lost: its lease runs out and the rescuer ends it.
            f.advance(LEASE_MS);
            let rescued = f.store.job_rescue_expired(10).await.expect("rescue");
            assert_eq!(ids(&rescued), [job.id]);
            let delay_ms = rescued[0].next_run_at - f.now();
            expected = applied(
                &expected,
                Event::LeaseExpired {
                    now: f.now(),
                    delay_ms: delay_ms.num_milliseconds(),
                },
            );
            assert_eq!(rescued[0], expected, "rescue {round}");
            let entry = expected.errors.last().expect("an entry");
            assert_eq!(entry.kind, FailureKind::LeaseExpired);
            assert_eq!(entry.error, expiry_error("w1", claimed.fencing_token));
        } else {
            let kind = kinds[round % kinds.len()];
            let failure = Failure {
                kind,
                retry_delay_ms: Some(0),
                ..failure(&format!("attempt {round}"), true, None)
            };
            let failed = f
                .store
                .job_fail(LeaseRef::of(&claimed), &failure)
                .await
                .expect("fail");
            expected = applied(
                &expected,
                Event::FailRetryable {
                    token: claimed.fencing_token,
                    now: f.now(),
                    error: format!("attempt {round}"),
                    kind,
                    delay_ms: 0,
                },
            );
            assert_eq!(failed, expected, "fail {round}");
        }
        let last = expected.errors.last().expect("an entry");
        assert_eq!(
            (
                last.attempt,
                last.fencing_token,
                last.at,
                last.worker.as_deref()
            ),
            (claimed.attempts, claimed.fencing_token, f.now(), Some("w1")),
            "entry of round {round}"
        );
    }
    assert_eq!(expected.errors.len(), AttemptError::HISTORY);
    assert_eq!(
        expected.errors[0].attempt,
        (rounds - AttemptError::HISTORY + 1) as i32,
        "the oldest entries went first"
    );
    assert_eq!(f.get(job.id).await, expected);

    // A success appends nothing; the history stays with the finished job.
    f.advance(6_000);
    let claimed = f.claim_job(&expected, LEASE_MS).await;
    let done = f
        .store
        .job_complete(LeaseRef::of(&claimed), None)
        .await
        .expect("complete");
    assert_eq!(done.errors, expected.errors);
}

// ---------------------------------------------------------------------------------------------
// Leadership
// ---------------------------------------------------------------------------------------------

fn elect(candidate: &str, ttl_ms: i64) -> ElectParams {
    ElectParams {
        candidate: candidate.to_owned(),
        ttl_ms,
    }
}

/// One leader at a time: the first candidate wins, others see it; a renewal keeps the term; a
/// lapsed leadership goes to the next candidate with a new term; a resignation ends it at once
/// (only by the holder of that term); the time left is the store's own.
pub async fn leadership_has_one_holder_per_term(f: Fixture) {
    assert_eq!(f.store.leader_get().await.expect("get"), None);
    let t0 = f.now();
    let a = f.store.leader_elect(&elect("a", 10_000)).await.expect("a");
    assert_eq!((a.leader_id.as_str(), a.term), ("a", 1));
    assert_eq!((a.elected_at, a.remaining_ms), (t0, 10_000));
    assert_eq!(a.expires_at, t0 + super::ms(10_000));

    f.advance(4_000);
    let seen_by_b = f.store.leader_elect(&elect("b", 10_000)).await.expect("b");
    assert_eq!((seen_by_b.leader_id.as_str(), seen_by_b.term), ("a", 1));
    assert_eq!(
        seen_by_b.remaining_ms, 6_000,
        "b is told how long a still leads"
    );

    let renewed = f
        .store
        .leader_elect(&elect("a", 10_000))
        .await
        .expect("renew");
    assert_eq!((renewed.leader_id.as_str(), renewed.term), ("a", 1));
    assert_eq!((renewed.elected_at, renewed.remaining_ms), (t0, 10_000));

    // a stops renewing: at the end of its lease b takes over with a new term.
    f.advance(9_999);
    let early = f
        .store
        .leader_elect(&elect("b", 10_000))
        .await
        .expect("b early");
    assert_eq!((early.leader_id.as_str(), early.remaining_ms), ("a", 1));
    f.advance(1);
    let b = f
        .store
        .leader_elect(&elect("b", 5_000))
        .await
        .expect("b wins");
    assert_eq!((b.leader_id.as_str(), b.term), ("b", 2));
    assert_eq!((b.elected_at, b.remaining_ms), (f.now(), 5_000));
    let late = f
        .store
        .leader_elect(&elect("a", 10_000))
        .await
        .expect("a late");
    assert_eq!(
        (late.leader_id.as_str(), late.term),
        ("b", 2),
        "a cannot renew a lost term"
    );

    // Only the holder of the term can resign it.
    assert!(!f.store.leader_resign("a", 1).await.expect("a resigns"));
    assert!(!f.store.leader_resign("b", 1).await.expect("wrong term"));
    assert!(f.store.leader_resign("b", 2).await.expect("b resigns"));
    assert!(!f.store.leader_resign("b", 2).await.expect("twice"));
    let lapsed = f.store.leader_get().await.expect("get").expect("a row");
    assert_eq!((lapsed.leader_id.as_str(), lapsed.remaining_ms), ("b", 0));
    let c = f.store.leader_elect(&elect("c", 10_000)).await.expect("c");
    assert_eq!((c.leader_id.as_str(), c.term), ("c", 3));
    // A leader whose own lease lapsed takes it again only with a new term.
    f.advance(10_000);
    let again = f
        .store
        .leader_elect(&elect("c", 10_000))
        .await
        .expect("c again");
    assert_eq!((again.leader_id.as_str(), again.term), ("c", 4));

    expect_invalid(
        f.store.leader_elect(&elect("", 1_000)).await,
        "an empty candidate",
    );
    expect_invalid(f.store.leader_elect(&elect("d", 0)).await, "a zero lease");
}

/// Concurrent candidates never both win: every answer names the same leader and term.
pub async fn concurrent_candidates_elect_exactly_one_leader(f: Fixture) {
    for round in 0..5 {
        let mut elections = tokio::task::JoinSet::new();
        for i in 0..8 {
            let store = f.store.clone();
            elections.spawn(async move {
                store
                    .leader_elect(&elect(&format!("candidate-{i}"), 10_000))
                    .await
                    .expect("elect")
            });
        }
        let answers = elections.join_all().await;
        let first = &answers[0];
        for answer in &answers {
            assert_eq!(
                (&answer.leader_id, answer.term),
                (&first.leader_id, first.term),
                "round {round}: {answers:?}"
            );
        }
        assert_eq!(first.term, round + 1);
        f.advance(10_000);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

fn process(id: &str, pid: i32) -> ProcessSpec {
    ProcessSpec {
        id: id.to_owned(),
        role: "worker".to_owned(),
        host: "host-1".to_owned(),
        pid,
        version: "0.1.0".to_owned(),
        queues: vec![QueueSlots {
            queue: "default".to_owned(),
            slots: 10,
        }],
    }
}

/// Registration is an upsert that refreshes `last_seen_at` and keeps `started_at` while the entry
/// is the same process; entries list by id; pruning removes only stale entries; removal reports
/// whether there was an entry.
pub async fn processes_register_refresh_and_expire(f: Fixture) {
    let t0 = f.now();
    let p1 = f
        .store
        .process_register(&process("p1", 10))
        .await
        .expect("p1");
    assert_eq!((p1.started_at, p1.last_seen_at), (t0, t0));
    assert_eq!(p1.spec, process("p1", 10));
    f.advance(2_000);
    let api = ProcessSpec {
        role: "api".to_owned(),
        queues: vec![],
        ..process("p0-api", 11)
    };
    f.store.process_register(&api).await.expect("api");
    f.advance(2_000);
    let refreshed = f
        .store
        .process_register(&process("p1", 10))
        .await
        .expect("refresh");
    assert_eq!(
        (refreshed.started_at, refreshed.last_seen_at),
        (t0, f.now())
    );
    let listed = f.store.process_list().await.expect("list");
    let names: Vec<&str> = listed.iter().map(|p| p.spec.id.as_str()).collect();
    assert_eq!(names, ["p0-api", "p1"]);
    assert_eq!(listed[0].spec, api);

    // Same id, another pid: a new process.
    f.advance(1_000);
    let restarted = f
        .store
        .process_register(&process("p1", 99))
        .await
        .expect("restart");
    assert_eq!(restarted.started_at, f.now());

    // p0-api was last seen 3 s ago, p1 just now.
    assert_eq!(f.store.process_prune(3_000).await.expect("prune"), 0);
    assert_eq!(f.store.process_prune(2_999).await.expect("prune"), 1);
    let names: Vec<String> = f
        .store
        .process_list()
        .await
        .expect("list")
        .into_iter()
        .map(|p| p.spec.id)
        .collect();
    assert_eq!(names, ["p1"]);
    assert!(f.store.process_remove("p1").await.expect("remove"));
    assert!(!f.store.process_remove("p1").await.expect("remove again"));
    assert!(f.store.process_list().await.expect("list").is_empty());

    expect_invalid(
        f.store.process_register(&process("", 1)).await,
        "an empty id",
    );
    let negative = process("p2", -1);
    expect_invalid(f.store.process_register(&negative).await, "a negative pid");
}

// ---------------------------------------------------------------------------------------------
// Lost claims
// ---------------------------------------------------------------------------------------------

/// A claim whose answer was lost is given back by its claim id: every job it leased and that is
/// still running under that lease returns queued, due now, its attempt returned (as a snooze of
/// 0 ms), or `cancelled` when a cancel was requested; other claims' jobs are untouched; the old
/// leases are stale; releasing again changes nothing.
pub async fn a_lost_claim_is_given_back_by_its_claim_id(f: Fixture) {
    for _ in 0..4 {
        f.enqueue(&spec("lost")).await;
    }
    let lost = f
        .claim(&ClaimParams {
            claim_id: Some(42),
            ..params(&["lost"], 3, LEASE_MS)
        })
        .await;
    let kept = f
        .claim(&ClaimParams {
            claim_id: Some(7),
            ..params(&["lost"], 1, LEASE_MS)
        })
        .await;
    assert_eq!((lost.len(), kept.len()), (3, 1));
    // One of the lost claim's jobs is cancelled meanwhile, one already completed.
    f.store.job_cancel(lost[1].id).await.expect("cancel");
    let lost_1 = f.get(lost[1].id).await;
    f.store
        .job_complete(LeaseRef::of(&lost[2]), None)
        .await
        .expect("complete");
    let done = f.get(lost[2].id).await;
    f.advance(500);
    assert_eq!(f.store.job_release_claim(42).await.expect("release"), 2);
    let snooze = |job: &faultline_domain::Job| {
        applied(
            job,
            Event::Snooze {
                token: job.fencing_token,
                now: f.now(),
                delay_ms: 0,
            },
        )
    };
    assert_eq!(f.get(lost[0].id).await, snooze(&lost[0]));
    assert_eq!(
        f.get(lost[0].id).await.attempts,
        0,
        "the attempt is given back"
    );
    assert_eq!(f.get(lost[1].id).await, snooze(&lost_1));
    assert_eq!(f.get(lost[1].id).await.state, JobState::Cancelled);
    assert_eq!(
        f.get(lost[2].id).await,
        done,
        "a finished job is not touched"
    );
    assert_eq!(
        f.get(kept[0].id).await,
        kept[0],
        "another claim's job is not touched"
    );
    super::expect_every_write_stale(&f, LeaseRef::of(&lost[0])).await;
    assert_eq!(f.store.job_release_claim(42).await.expect("again"), 0);
    assert_eq!(f.store.job_release_claim(99).await.expect("unknown"), 0);
    // The given-back job is claimable at once.
    assert_eq!(
        ids(&f.claim(&params(&["lost"], 10, LEASE_MS)).await),
        [lost[0].id]
    );
}
