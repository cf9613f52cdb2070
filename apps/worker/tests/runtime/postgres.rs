//! The key paths against real PostgreSQL (a fresh database per test): backoff schedule, lost
//! leases, heartbeats, graceful shutdown, panics, timeouts, unknown kinds, maintenance and the
//! production loop. Time is the store's override clock (`ManualClock`), except in the loop test.

use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use faultline_ports::domain::{JobSpec, JobState, RetryPolicy};
use faultline_ports::{ClaimParams, Clock, JobStore, ManualClock};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use faultline_worker::{Maintenance, MaintenanceConfig, Outcome, Registry, Worker, WorkerConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::{
    Gate, config, done, enqueue, eventually, handler, maintenance, spec, state_of, t0,
};

/// A fresh database, and a store on it whose clock is a manual clock at [`t0`].
async fn pg() -> (TestDb, Arc<PgStore>, ManualClock) {
    let db = TestDb::fresh().await;
    let clock = ManualClock::new(t0());
    let store = PgStore::with_clock(db.pool().clone(), Arc::new(clock.clone()));
    (db, Arc::new(store), clock)
}

fn gated(gate: &Gate, outcome: Outcome) -> Registry {
    let g = gate.clone();
    let mut registry = Registry::new();
    registry.register(
        "gated",
        handler(move |_| {
            let (g, outcome) = (g.clone(), outcome.clone());
            async move {
                g.wait().await;
                outcome
            }
        }),
    );
    registry
}

#[tokio::test]
async fn pg_retries_to_terminal_failure_following_the_backoff_schedule() {
    let (_db, store, clock) = pg().await;
    let policy = RetryPolicy {
        base_ms: 1_000,
        cap_ms: 3_000,
        jitter: 0.0,
    };
    let id = enqueue(
        &*store,
        JobSpec {
            max_attempts: 4,
            retry_policy: policy,
            ..spec("flaky")
        },
    )
    .await;
    let mut registry = Registry::new();
    registry.register(
        "flaky",
        handler(|ctx| async move {
            Outcome::Retry {
                error: format!("attempt {} failed", ctx.attempt),
                delay: None,
            }
        }),
    );
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    let mut gaps = Vec::new();
    for attempt in 1..=4 {
        assert_eq!(worker.run_once().await.unwrap().claimed, 1);
        let job = store.job_get(id).await.unwrap();
        assert_eq!(job.attempts, attempt);
        assert_eq!(job.last_error, Some(format!("attempt {attempt} failed")));
        if attempt == 4 {
            assert_eq!(job.state, JobState::Failed);
            break;
        }
        assert_eq!(job.state, JobState::Queued);
        let gap = (job.next_run_at - clock.now()).num_milliseconds();
        gaps.push(gap);
        clock.advance_ms(gap - 1);
        assert_eq!(worker.run_once().await.unwrap().claimed, 0, "not due yet");
        clock.advance_ms(1);
    }
    assert_eq!(gaps, [1_000, 2_000, 3_000], "base * 2^(n-1), capped");
    let counters = worker.stats().counters();
    assert_eq!((counters.retried, counters.failed), (3, 1));
}

#[tokio::test]
async fn pg_a_lost_lease_is_never_written_and_is_counted() {
    let (_db, store, clock) = pg().await;
    let lost = enqueue(&*store, spec("wait")).await;
    let mut registry = Registry::new();
    registry.register(
        "wait",
        handler(|ctx| async move {
            ctx.cancel.cancelled().await;
            Outcome::Complete(Some(json!("too late")))
        }),
    );
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    assert_eq!(worker.claim_once().await.unwrap(), 1);
    clock.advance_ms(30_001);
    assert_eq!(store.job_rescue_expired(10).await.unwrap().len(), 1);

    let heartbeat = worker.heartbeat_once().await.unwrap();
    assert_eq!(heartbeat.lost, 1);
    let report = worker.settle().await;
    assert_eq!(
        (report.counts.completed, report.counts.stale_writes_rejected),
        (0, 0)
    );
    let job = store.job_get(lost).await.unwrap();
    assert_eq!((job.state, job.result), (JobState::Queued, None));
    assert_eq!(worker.stats().counters().leases_lost, 1);
}

#[tokio::test]
async fn pg_a_late_write_is_rejected_as_stale_and_counted() {
    let (_db, store, clock) = pg().await;
    let id = enqueue(&*store, spec("gated")).await;
    let gate = Gate::new();
    let registry = gated(&gate, Outcome::Complete(Some(json!("late"))));
    let mut worker = Worker::new(store.clone(), registry.clone(), config("w1")).unwrap();
    assert_eq!(worker.claim_once().await.unwrap(), 1);
    clock.advance_ms(30_001);
    assert_eq!(store.job_rescue_expired(10).await.unwrap().len(), 1);
    clock.advance_ms(2_000); // past the retry backoff (1 s +- 10 %)
    let claim = ClaimParams {
        queues: vec![JobSpec::DEFAULT_QUEUE.into()],
        kinds: vec![],
        limit: 1,
        lease_ms: 30_000,
        worker_id: "w2".into(),
        claim_id: None,
    };
    assert_eq!(store.job_claim(&claim).await.unwrap().len(), 1);

    gate.open();
    let report = worker.settle().await;
    assert_eq!(report.counts.stale_writes_rejected, 1);
    let job = store.job_get(id).await.unwrap();
    assert_eq!((job.state, job.fencing_token), (JobState::Running, 2));
    assert_eq!(job.lease_owner.as_deref(), Some("w2"));
    assert_eq!(job.result, None);
}

#[tokio::test]
async fn pg_heartbeats_keep_a_job_alive_past_its_initial_lease() {
    let (_db, store, clock) = pg().await;
    let id = enqueue(&*store, spec("gated")).await;
    let gate = Gate::new();
    let registry = gated(&gate, Outcome::Complete(Some(json!("kept alive"))));
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    assert_eq!(worker.claim_once().await.unwrap(), 1);
    for _ in 0..3 {
        clock.advance_ms(20_000);
        assert_eq!(worker.heartbeat_once().await.unwrap().extended, 1);
    }
    clock.advance_ms(20_000); // 80 s after the claim, 20 s after the last heartbeat
    assert!(store.job_rescue_expired(10).await.unwrap().is_empty());
    assert_eq!(
        store.job_get(id).await.unwrap().lease_expires_at,
        Some(t0() + TimeDelta::seconds(90))
    );
    gate.open();
    assert_eq!(worker.settle().await.counts.completed, 1);
    let job = store.job_get(id).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Succeeded, 1));
    assert_eq!(job.result, Some(json!("kept alive")));
}

#[tokio::test]
async fn pg_graceful_shutdown_gives_leases_back_for_another_worker_at_once() {
    let (_db, store, clock) = pg().await;
    let a = enqueue(&*store, spec("gated")).await;
    let b = enqueue(&*store, spec("gated")).await;
    let gate = Gate::new(); // never opened: the handlers outlive the grace period
    let registry = gated(&gate, done());
    let mut first = Worker::new(store.clone(), registry.clone(), config("w1")).unwrap();
    assert_eq!(first.claim_once().await.unwrap(), 2);

    let report = first.shutdown(Duration::from_millis(100)).await;
    assert_eq!(report.interrupted, 2);
    assert_eq!(report.counts.released, 2);
    for id in [a, b] {
        let job = store.job_get(id).await.unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Queued, 0));
        assert_eq!(job.next_run_at, clock.now(), "due at once");
        assert_eq!(job.lease_expires_at, None);
    }
    // Another worker takes them without the clock moving.
    let mut second = Worker::new(store.clone(), registry, config("w2")).unwrap();
    assert_eq!(second.claim_once().await.unwrap(), 2);
    let job = store.job_get(a).await.unwrap();
    assert_eq!(
        (job.state, job.attempts, job.lease_owner.as_deref()),
        (JobState::Running, 1, Some("w2"))
    );
    gate.open();
    assert_eq!(second.settle().await.counts.completed, 2);
}

#[tokio::test]
async fn pg_panic_timeout_and_unknown_kind_fail_only_their_jobs() {
    let (_db, store, _clock) = pg().await;
    let panics = enqueue(&*store, spec("panic")).await;
    let slow = enqueue(
        &*store,
        JobSpec {
            timeout_ms: Some(50),
            ..spec("slow")
        },
    )
    .await;
    let unknown = enqueue(&*store, spec("nobody")).await;
    let fine = enqueue(&*store, spec("fine")).await;
    let mut registry = Registry::new();
    registry.register("panic", handler(|_| async { panic!("kaboom") }));
    registry.register(
        "slow",
        handler(|_| async {
            std::future::pending::<()>().await;
            done()
        }),
    );
    registry.register("fine", handler(|_| async { done() }));
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    let report = worker.run_once().await.unwrap();
    assert_eq!(report.claimed, 4);
    let c = report.counts;
    assert_eq!((c.panicked, c.timed_out, c.unknown_kind), (1, 1, 1));
    assert_eq!((c.retried, c.failed, c.completed), (2, 1, 1));

    let job = store.job_get(panics).await.unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.last_error.as_deref(), Some("handler panicked: kaboom"));
    let job = store.job_get(slow).await.unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.last_error.as_deref(), Some("timed out after 50ms"));
    let job = store.job_get(unknown).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(
        job.last_error.as_deref(),
        Some(r#"no handler registered for kind "nobody""#)
    );
    assert_eq!(state_of(&*store, fine).await, JobState::Succeeded);
}

#[tokio::test]
async fn pg_rescuer_and_pruner_steps() {
    let (_db, store, clock) = pg().await;
    let orphan = enqueue(&*store, spec("fine")).await;
    let claim = ClaimParams {
        queues: vec![JobSpec::DEFAULT_QUEUE.into()],
        kinds: vec![],
        limit: 1,
        lease_ms: 30_000,
        worker_id: "ghost".into(),
        claim_id: None,
    };
    store.job_claim(&claim).await.unwrap();
    let mut registry = Registry::new();
    registry.register("fine", handler(|_| async { done() }));
    let cfg = MaintenanceConfig {
        retain_succeeded: Duration::from_secs(3_600),
        ..maintenance("w1")
    };
    let mut service = Maintenance::new(store.clone(), cfg).unwrap();
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    clock.advance_ms(30_001);
    assert_eq!(service.rescue_once().await.unwrap(), 1);
    clock.advance_ms(10_000); // past the retry backoff
    assert_eq!(worker.run_once().await.unwrap().counts.completed, 1);
    let job = store.job_get(orphan).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Succeeded, 2));
    clock.advance_ms(3_600_001);
    assert_eq!(service.prune_once().await.unwrap(), 1);
    assert!(store.job_get(orphan).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_run_processes_jobs_end_to_end_and_stops_cleanly() {
    let db = TestDb::fresh().await;
    let store = Arc::new(PgStore::new(db.pool().clone())); // the database's now()
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(enqueue(&*store, JobSpec::new("echo", json!({ "n": n }))).await);
    }
    let mut registry = Registry::new();
    registry.register(
        "echo",
        handler(|ctx| async move { Outcome::Complete(Some(ctx.payload)) }),
    );
    let cfg = WorkerConfig {
        poll_interval: Duration::from_millis(50),
        ..config("w1")
    };
    let mut worker = Worker::new(store.clone(), registry, cfg).unwrap();
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move { worker.run(token).await });
    eventually("20 completions", Duration::from_secs(30), || {
        let stats = stats.clone();
        async move { stats.counters().completed == 20 }
    })
    .await;
    stop.cancel();
    let report = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("run returns after the stop signal")
        .unwrap();
    assert_eq!(report.interrupted, 0);
    for (n, id) in ids.into_iter().enumerate() {
        let job = store.job_get(id).await.unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Succeeded, 1));
        assert_eq!(job.result, Some(json!({ "n": n })));
    }
    let counters = stats.counters();
    assert_eq!((counters.claimed, counters.db_errors), (20, 0));
}
