//! Runtime tests on the in-memory store: the step API with a manual clock, and the production
//! loop under paused tokio time (with a store clock that follows it).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::TimeDelta;
use faultline_memory::MemoryStore;
use faultline_ports::domain::{JobSpec, JobState, RetryPolicy};
use faultline_ports::{ClaimParams, Clock, JobStore, LeaseRef};
use faultline_worker::{Outcome, Registry, Worker, WorkerConfig};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::{
    Gate, TokioClock, config, done, enqueue, eventually, handler, memory, spec, state_of, t0,
};

fn claim_as(worker_id: &str) -> ClaimParams {
    ClaimParams {
        queues: vec![JobSpec::DEFAULT_QUEUE.into()],
        kinds: vec![],
        limit: 10,
        lease_ms: 30_000,
        worker_id: worker_id.into(),
        claim_id: None,
    }
}

#[tokio::test]
async fn completes_jobs_and_writes_their_results_in_batches() {
    let (store, _clock) = memory();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(enqueue(&*store, JobSpec::new("echo", json!({ "n": n }))).await);
    }
    let mut registry = Registry::new();
    registry.register(
        "echo",
        handler(|ctx| async move { Outcome::Complete(Some(ctx.payload)) }),
    );
    let cfg = WorkerConfig {
        concurrency: 5,
        completion_batch_size: 2,
        ..config("w1")
    };
    let mut worker = Worker::new(store.clone(), registry, cfg).unwrap();

    let report = worker.run_once().await.unwrap();
    assert_eq!(report.claimed, 5);
    assert_eq!(report.counts.completed, 5);
    assert_eq!((report.in_flight, report.pending_writes), (0, 0));
    for (n, id) in ids.into_iter().enumerate() {
        let job = store.job_get(id).await.unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(job.result, Some(json!({ "n": n })));
        assert_eq!(job.lease_owner.as_deref(), Some("w1"));
    }
    let stats = worker.stats().snapshot();
    assert_eq!((stats.counters.claimed, stats.counters.completed), (5, 5));
    assert_eq!(
        (stats.in_flight, stats.leases_held, stats.pending_writes),
        (0, 0, 0)
    );
    assert_eq!(worker.run_once().await.unwrap().claimed, 0);
}

#[tokio::test]
async fn retries_to_terminal_failure_following_the_backoff_schedule() {
    let (store, clock) = memory();
    let policy = RetryPolicy {
        base_ms: 1_000,
        cap_ms: 4_000,
        jitter: 0.1,
    };
    let job_spec = JobSpec {
        max_attempts: 5,
        retry_policy: policy,
        ..spec("flaky")
    };
    let id = enqueue(&*store, job_spec).await;
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

    for attempt in 1..=5 {
        let report = worker.run_once().await.unwrap();
        assert_eq!(report.claimed, 1, "attempt {attempt}");
        let job = store.job_get(id).await.unwrap();
        assert_eq!(job.attempts, attempt);
        assert_eq!(job.last_error, Some(format!("attempt {attempt} failed")));
        if attempt == 5 {
            assert_eq!(job.state, JobState::Failed);
            assert_eq!(job.finished_at, Some(clock.now()));
            assert_eq!(report.counts.failed, 1);
            break;
        }
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(report.counts.retried, 1);
        let gap = (job.next_run_at - clock.now()).num_milliseconds();
        let raw = policy.delay_without_jitter_ms(attempt);
        let (low, high) = (
            policy.apply_jitter_ms(raw, 0.0),
            policy.apply_jitter_ms(raw, 1.0),
        );
        assert!(
            (low..=high).contains(&gap),
            "attempt {attempt}: gap {gap} ms outside [{low}, {high}]"
        );
        // Not claimable a millisecond early, claimable on time.
        clock.advance_ms(gap - 1);
        assert_eq!(worker.run_once().await.unwrap().claimed, 0);
        clock.advance_ms(1);
    }
    let counters = worker.stats().counters();
    assert_eq!(
        (counters.claimed, counters.retried, counters.failed),
        (5, 4, 1)
    );
}

#[tokio::test]
async fn explicit_retry_delays_and_snoozes_are_honoured() {
    let (store, _clock) = memory();
    let retry = enqueue(&*store, spec("retry")).await;
    let snooze = enqueue(&*store, spec("snooze")).await;
    let mut registry = Registry::new();
    registry.register(
        "retry",
        handler(|_| async {
            Outcome::Retry {
                error: "try later".into(),
                delay: Some(Duration::from_secs(7)),
            }
        }),
    );
    registry.register(
        "snooze",
        handler(|_| async {
            Outcome::Snooze {
                delay: Duration::from_secs(3),
            }
        }),
    );
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    let report = worker.run_once().await.unwrap();
    assert_eq!((report.counts.retried, report.counts.snoozed), (1, 1));

    let retried = store.job_get(retry).await.unwrap();
    assert_eq!((retried.state, retried.attempts), (JobState::Queued, 1));
    assert_eq!(retried.next_run_at, t0() + TimeDelta::seconds(7));
    let snoozed = store.job_get(snooze).await.unwrap();
    assert_eq!(
        (snoozed.state, snoozed.attempts),
        (JobState::Queued, 0),
        "a snooze gives the attempt back"
    );
    assert_eq!(snoozed.next_run_at, t0() + TimeDelta::seconds(3));
}

#[tokio::test]
async fn a_lost_lease_cancels_the_handler_and_its_result_is_never_written() {
    let (store, clock) = memory();
    let id = enqueue(&*store, spec("wait")).await;
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let seen = tokens.clone();
    let mut registry = Registry::new();
    registry.register(
        "wait",
        handler(move |ctx| {
            seen.lock().unwrap().push(ctx.cancel.clone());
            async move {
                ctx.cancel.cancelled().await;
                Outcome::Complete(Some(json!("too late")))
            }
        }),
    );
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    assert_eq!(worker.claim_once().await.unwrap(), 1);

    // The worker is cut off past its lease: another worker's rescuer ends the attempt and
    // another worker claims the job.
    clock.advance_ms(30_001);
    assert_eq!(store.job_rescue_expired(10).await.unwrap().len(), 1);
    clock.advance_ms(2_000); // past the retry backoff (1 s +- 10 %)
    let other = store.job_claim(&claim_as("w2")).await.unwrap();
    assert_eq!(other.len(), 1);

    let heartbeat = worker.heartbeat_once().await.unwrap();
    assert_eq!((heartbeat.lost, heartbeat.extended), (1, 0));
    // The handler only returns once its token fired.
    let report = worker.settle().await;
    assert!(tokens.lock().unwrap()[0].is_cancelled());
    assert_eq!(report.counts.completed, 0);
    assert_eq!(
        report.counts.stale_writes_rejected, 0,
        "nothing was written"
    );
    assert_eq!((report.in_flight, report.pending_writes), (0, 0));

    let job = store.job_get(id).await.unwrap();
    assert_eq!(job.state, JobState::Running);
    assert_eq!(
        (job.fencing_token, job.lease_owner.as_deref()),
        (2, Some("w2"))
    );
    assert_eq!(job.result, None);
    let counters = worker.stats().counters();
    assert_eq!((counters.leases_lost, counters.completed), (1, 0));
    assert_eq!(worker.leases_held(), 0);
}

#[tokio::test]
async fn a_late_result_after_the_lease_moved_on_is_rejected_as_stale() {
    let (store, clock) = memory();
    let id = enqueue(&*store, spec("gated")).await;
    let gate = Gate::new();
    let mut registry = Registry::new();
    let g = gate.clone();
    registry.register(
        "gated",
        handler(move |_| {
            let g = g.clone();
            async move {
                g.wait().await; // ignores its cancellation token
                Outcome::Complete(Some(json!("late")))
            }
        }),
    );
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    assert_eq!(worker.claim_once().await.unwrap(), 1);
    clock.advance_ms(30_001);
    assert_eq!(store.job_rescue_expired(10).await.unwrap().len(), 1);
    clock.advance_ms(2_000); // past the retry backoff (1 s +- 10 %)
    let newer = store.job_claim(&claim_as("w2")).await.unwrap().remove(0);

    gate.open();
    let report = worker.settle().await;
    assert_eq!(report.counts.stale_writes_rejected, 1);
    assert_eq!(report.counts.completed, 0);
    let job = store.job_get(id).await.unwrap();
    assert_eq!((job.state, job.fencing_token), (JobState::Running, 2));
    assert_eq!(job.result, None, "the newer owner is undisturbed");
    // ... and can still finish its own attempt.
    let finished = store
        .job_complete(LeaseRef::of(&newer), Some(json!("w2")))
        .await
        .unwrap();
    assert_eq!(finished.result, Some(json!("w2")));
}

#[tokio::test]
async fn heartbeats_keep_a_job_alive_past_its_initial_lease() {
    let (store, clock) = memory();
    let id = enqueue(&*store, spec("gated")).await;
    let gate = Gate::new();
    let g = gate.clone();
    let mut registry = Registry::new();
    registry.register(
        "gated",
        handler(move |_| {
            let g = g.clone();
            async move {
                g.wait().await;
                Outcome::Complete(Some(json!("finished")))
            }
        }),
    );
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    assert_eq!(worker.claim_once().await.unwrap(), 1);

    clock.advance_ms(20_000);
    let heartbeat = worker.heartbeat_once().await.unwrap();
    assert_eq!((heartbeat.extended, heartbeat.lost), (1, 0));
    clock.advance_ms(20_000); // 40 s after the claim: past the initial 30 s lease
    assert!(store.job_rescue_expired(10).await.unwrap().is_empty());
    let job = store.job_get(id).await.unwrap();
    assert_eq!(
        job.lease_expires_at,
        Some(t0() + TimeDelta::seconds(50)),
        "extended to heartbeat time + lease"
    );

    gate.open();
    let report = worker.settle().await;
    assert_eq!(report.counts.completed, 1);
    let job = store.job_get(id).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Succeeded, 1));
    assert_eq!(job.result, Some(json!("finished")));
}

#[tokio::test]
async fn a_cancel_request_fires_the_token_and_the_failure_ends_cancelled() {
    let (store, _clock) = memory();
    let id = enqueue(&*store, spec("stoppable")).await;
    let mut registry = Registry::new();
    registry.register(
        "stoppable",
        handler(|ctx| async move {
            ctx.cancel.cancelled().await;
            Outcome::Retry {
                error: "stopped on request".into(),
                delay: None,
            }
        }),
    );
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    assert_eq!(worker.claim_once().await.unwrap(), 1);
    let marked = store.job_cancel(id).await.unwrap();
    assert!(marked.cancel_requested && marked.state == JobState::Running);

    let heartbeat = worker.heartbeat_once().await.unwrap();
    assert_eq!((heartbeat.extended, heartbeat.cancel_requested), (1, 1));
    let report = worker.settle().await;
    assert_eq!(report.counts.cancelled, 1);
    let job = store.job_get(id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.last_error.as_deref(), Some("stopped on request"));
    assert_eq!(worker.stats().counters().cancel_requests, 1);
}

#[tokio::test]
async fn a_panicking_handler_fails_only_its_own_job() {
    let (store, _clock) = memory();
    let boom = enqueue(&*store, spec("boom")).await;
    let fine = enqueue(&*store, spec("fine")).await;
    let mut registry = Registry::new();
    registry.register(
        "boom",
        handler(|ctx| async move { panic!("boom in job {}", ctx.id) }),
    );
    registry.register("fine", handler(|_| async { done() }));
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();

    let report = worker.run_once().await.unwrap();
    assert_eq!(report.claimed, 2);
    assert_eq!(
        (
            report.counts.panicked,
            report.counts.retried,
            report.counts.completed
        ),
        (1, 1, 1)
    );
    let job = store.job_get(boom).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Queued, 1));
    assert_eq!(
        job.last_error,
        Some(format!("handler panicked: boom in job {boom}"))
    );
    assert_eq!(state_of(&*store, fine).await, JobState::Succeeded);

    // The worker keeps working.
    let after = enqueue(&*store, spec("fine")).await;
    assert_eq!(worker.run_once().await.unwrap().counts.completed, 1);
    assert_eq!(state_of(&*store, after).await, JobState::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_handler_is_cancelled_and_its_attempt_retried() {
    let (store, _clock) = memory();
    let own_timeout = enqueue(
        &*store,
        JobSpec {
            timeout_ms: Some(5_000),
            ..spec("slow")
        },
    )
    .await;
    let kind_default = enqueue(&*store, spec("slow")).await;
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let seen = tokens.clone();
    let mut registry = Registry::new();
    registry.register(
        "slow",
        handler(move |ctx| {
            seen.lock().unwrap().push(ctx.cancel.clone());
            async move {
                tokio::time::sleep(Duration::from_secs(3_600)).await;
                done()
            }
        })
        .with_timeout(Duration::from_secs(2)),
    );
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    let started = Instant::now();
    let report = worker.run_once().await.unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
    assert_eq!((report.counts.timed_out, report.counts.retried), (2, 2));
    let job = store.job_get(own_timeout).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Queued, 1));
    assert_eq!(
        job.last_error.as_deref(),
        Some("timed out after 5s"),
        "the job's timeout wins"
    );
    let job = store.job_get(kind_default).await.unwrap();
    assert_eq!(job.last_error.as_deref(), Some("timed out after 2s"));
    let tokens = tokens.lock().unwrap();
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().all(CancellationToken::is_cancelled));
}

#[tokio::test]
async fn an_unknown_kind_fails_permanently_with_a_clear_error() {
    let (store, _clock) = memory();
    let id = enqueue(&*store, spec("mystery")).await;
    let mut registry = Registry::new();
    registry.register("known", handler(|_| async { done() }));
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    let report = worker.run_once().await.unwrap();
    assert_eq!(report.claimed, 1);
    assert_eq!((report.counts.unknown_kind, report.counts.failed), (1, 1));
    let job = store.job_get(id).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Failed, 1));
    assert_eq!(
        job.last_error.as_deref(),
        Some(r#"no handler registered for kind "mystery""#)
    );
}

#[tokio::test]
async fn a_result_the_store_cannot_keep_fails_the_job_permanently() {
    let (store, _clock) = memory();
    let id = enqueue(&*store, spec("nul")).await;
    let mut registry = Registry::new();
    registry.register(
        "nul",
        handler(|_| async { Outcome::Complete(Some(json!({ "text": "a\u{0}b" }))) }),
    );
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    assert_eq!(worker.run_once().await.unwrap().counts.failed, 1);
    let job = store.job_get(id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("the handler's result cannot be stored")),
        "{:?}",
        job.last_error
    );
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_waits_then_gives_the_remaining_leases_back() {
    let (store, _clock) = memory();
    let quick = enqueue(&*store, spec("quick")).await;
    let stuck_a = enqueue(&*store, spec("stuck")).await;
    let stuck_b = enqueue(&*store, spec("stuck")).await;
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let seen = tokens.clone();
    let mut registry = Registry::new();
    registry.register(
        "quick",
        handler(|_| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Outcome::Complete(Some(json!("done in time")))
        }),
    );
    registry.register(
        "stuck",
        handler(move |ctx| {
            seen.lock().unwrap().push(ctx.cancel.clone());
            async {
                tokio::time::sleep(Duration::from_secs(3_600)).await;
                done()
            }
        }),
    );
    let mut worker = Worker::new(store.clone(), registry.clone(), config("w1")).unwrap();
    assert_eq!(worker.claim_once().await.unwrap(), 3);

    let started = Instant::now();
    let report = worker.shutdown(Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
    assert_eq!(report.interrupted, 2);
    assert_eq!((report.counts.completed, report.counts.released), (1, 2));
    assert_eq!(state_of(&*store, quick).await, JobState::Succeeded);
    assert!(tokens.lock().unwrap().iter().all(|t| t.is_cancelled()));
    for id in [stuck_a, stuck_b] {
        let job = store.job_get(id).await.unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Queued, 0));
        assert_eq!(job.next_run_at, t0(), "due at once, not after the lease");
    }
    assert_eq!(worker.leases_held(), 0);
    assert_eq!(
        worker.claim_once().await.unwrap(),
        0,
        "a stopped worker claims nothing"
    );

    // Another worker takes them immediately (the store's clock has not moved).
    let mut other = Worker::new(store.clone(), registry, config("w2")).unwrap();
    assert_eq!(other.claim_once().await.unwrap(), 2);
    let job = store.job_get(stuck_a).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Running, 1));
    assert_eq!(job.lease_owner.as_deref(), Some("w2"));
}

// ----- the production loop, under paused time -----------------------------------------------

/// A store and its clock following tokio's paused clock.
fn tokio_memory() -> (Arc<MemoryStore>, TokioClock) {
    let clock = TokioClock::new();
    (Arc::new(MemoryStore::new(Arc::new(clock.clone()))), clock)
}

#[tokio::test(start_paused = true)]
async fn run_wakes_on_the_watch_channel_without_waiting_for_the_poll() {
    let (store, _clock) = tokio_memory();
    let (ran_tx, mut ran_rx) = mpsc::unbounded_channel();
    let mut registry = Registry::new();
    registry.register(
        "ping",
        handler(move |_| {
            let _ = ran_tx.send(Instant::now());
            async { done() }
        }),
    );
    let cfg = WorkerConfig {
        poll_interval: Duration::from_secs(3_600),
        ..config("w1")
    };
    let mut worker = Worker::new(store.clone(), registry, cfg)
        .unwrap()
        .with_wakeup(store.on_enqueue());
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move { worker.run(token).await });

    // Let the worker make its first (empty) claim and go idle; the next poll is an hour away.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let enqueued_at = Instant::now();
    enqueue(&*store, spec("ping")).await;
    let ran_at = tokio::time::timeout(Duration::from_secs(600), ran_rx.recv())
        .await
        .expect("the wake-up should start the job")
        .unwrap();
    assert!(
        ran_at - enqueued_at < Duration::from_secs(1),
        "{:?}",
        ran_at - enqueued_at
    );
    stop.cancel();
    let report = running.await.unwrap();
    assert_eq!(report.interrupted, 0);
}

#[tokio::test(start_paused = true)]
async fn run_polls_for_scheduled_jobs_and_missed_notifications() {
    let (store, _clock) = tokio_memory();
    let (ran_tx, mut ran_rx) = mpsc::unbounded_channel();
    let mut registry = Registry::new();
    registry.register(
        "tick",
        handler(move |ctx| {
            let _ = ran_tx.send((ctx.id, Instant::now()));
            async { done() }
        }),
    );
    // No wake-up channel at all: only the poll finds work.
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move { worker.run(token).await });

    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let start = Instant::now();
    let due_now = enqueue(&*store, spec("tick")).await;
    let scheduled = enqueue(
        &*store,
        JobSpec {
            delay_ms: Some(5_000),
            ..spec("tick")
        },
    )
    .await;
    let within = Duration::from_secs(60);
    let first = tokio::time::timeout(within, ran_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(within, ran_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.0, second.0), (due_now, scheduled));
    assert!(
        first.1 - start <= Duration::from_secs(1),
        "{:?}",
        first.1 - start
    );
    let late = second.1 - start;
    assert!(
        late >= Duration::from_secs(5) && late <= Duration::from_secs(6),
        "{late:?}"
    );
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn run_never_exceeds_the_concurrency_limit() {
    let (store, _clock) = tokio_memory();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(enqueue(&*store, spec("work")).await);
    }
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (c, p) = (current.clone(), peak.clone());
    let mut registry = Registry::new();
    registry.register(
        "work",
        handler(move |_| {
            let (c, p) = (c.clone(), p.clone());
            async move {
                let now = c.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                c.fetch_sub(1, Ordering::SeqCst);
                done()
            }
        }),
    );
    let cfg = WorkerConfig {
        concurrency: 3,
        ..config("w1")
    };
    let mut worker = Worker::new(store.clone(), registry, cfg).unwrap();
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let started = Instant::now();
    let running = tokio::spawn(async move { worker.run(token).await });
    eventually("all ten jobs done", Duration::from_secs(60), || {
        let stats = stats.clone();
        async move { stats.counters().completed == 10 }
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "3 slots, 10 jobs of 1 s"
    );
    assert_eq!(peak.load(Ordering::SeqCst), 3);
    for id in ids {
        let job = store.job_get(id).await.unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Succeeded, 1));
    }
    stop.cancel();
    running.await.unwrap();
    assert_eq!(stats.counters().claimed, 10);
}

#[tokio::test(start_paused = true)]
async fn run_returns_after_a_graceful_shutdown_on_its_token() {
    let (store, _clock) = tokio_memory();
    let id = enqueue(&*store, spec("stuck")).await;
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let mut registry = Registry::new();
    registry.register(
        "stuck",
        handler(move |_| {
            let _ = started_tx.send(());
            async {
                std::future::pending::<()>().await;
                done()
            }
        }),
    );
    let cfg = WorkerConfig {
        shutdown_grace: Duration::from_secs(2),
        ..config("w1")
    };
    let mut worker = Worker::new(store.clone(), registry, cfg).unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move { worker.run(token).await });
    tokio::time::timeout(Duration::from_secs(60), started_rx.recv())
        .await
        .unwrap()
        .unwrap();
    stop.cancel();
    let report = running.await.unwrap();
    assert_eq!(report.interrupted, 1);
    assert_eq!(report.counts.released, 1);
    let job = store.job_get(id).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Queued, 0));
}
