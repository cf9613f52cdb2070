//! The worker's Prometheus metrics: each moves when its event happens (claims, waits, outcomes,
//! retries, terminal failures, lease expiries and recoveries, stale writes, store errors, slots
//! and in-flight handlers), labels are bounded by the guard, and the exposition of a worker
//! process passes `promtool check metrics`. Every test records into a recorder of its own
//! (`LocalMetrics`), so the numbers are exact.

use std::sync::Arc;
use std::time::Duration;

use faultline_metrics::testing::{Exposition, LocalMetrics, assert_promtool_accepts_metrics};
use faultline_metrics::{QueueSampler, names};
use faultline_ports::domain::{JobSpec, JobState};
use faultline_ports::{JobStore, LabelGuard, ManualClock, MockJobStore};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use faultline_worker::{Maintenance, Outcome, Registry, Worker, WorkerConfig};

use crate::support::{
    Gate, backend, config, done, enqueue, handler, maintenance, memory, spec, t0,
};

fn wide(worker_id: &str) -> WorkerConfig {
    WorkerConfig {
        concurrency: 10,
        ..config(worker_id)
    }
}

/// Handlers for every kind of outcome: `ok`, `flaky` (retry), `bad` (fail), `later` (snooze).
fn outcomes_registry() -> Registry {
    let mut registry = Registry::new();
    registry.register("ok", handler(|_| async { done() }));
    registry.register(
        "flaky",
        handler(|_| async {
            Outcome::Retry {
                error: "try again".into(),
                delay: None,
            }
        }),
    );
    registry.register(
        "bad",
        handler(|_| async {
            Outcome::Fail {
                error: "cannot".into(),
            }
        }),
    );
    registry.register(
        "later",
        handler(|_| async {
            Outcome::Snooze {
                delay: Duration::from_secs(5),
            }
        }),
    );
    registry
}

const Q: (&str, &str) = ("queue", "default");

fn finished(m: &Exposition, kind: &str, outcome: &str) -> f64 {
    m.value(
        names::JOBS_FINISHED_TOTAL,
        &[Q, ("kind", kind), ("outcome", outcome)],
    )
}

fn durations(m: &Exposition, outcome: &str) -> f64 {
    m.value(
        "faultline_job_duration_seconds_count",
        &[("outcome", outcome)],
    )
}

#[tokio::test]
async fn claims_waits_outcomes_retries_and_run_times_are_counted() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let (store, clock) = memory();
    for kind in ["ok", "flaky", "bad", "later"] {
        enqueue(&*store, spec(kind)).await;
    }
    // A retryable failure of the last attempt is a terminal failure.
    enqueue(
        &*store,
        JobSpec {
            max_attempts: 1,
            ..spec("flaky")
        },
    )
    .await;
    clock.advance_ms(2_000); // every job waits 2 s after it was due
    let mut worker = Worker::new(store.clone(), outcomes_registry(), wide("w1")).unwrap();

    let before = metrics.scrape();
    assert_eq!(before.value(names::JOBS_CLAIMED_TOTAL, &[]), 0.0);
    assert_eq!(before.value(names::WORKER_CONCURRENCY, &[]), 10.0);

    let report = worker.run_once().await.unwrap();
    assert_eq!(report.claimed, 5);
    let m = metrics.scrape();
    assert_eq!(m.value(names::JOBS_CLAIMED_TOTAL, &[Q]), 5.0);
    assert_eq!(m.value("faultline_job_wait_seconds_count", &[Q]), 5.0);
    assert_eq!(
        m.value("faultline_job_wait_seconds_bucket", &[Q, ("le", "1")]),
        0.0
    );
    assert_eq!(
        m.value("faultline_job_wait_seconds_bucket", &[Q, ("le", "2.5")]),
        5.0
    );
    assert_eq!(finished(&m, "ok", "succeeded"), 1.0);
    assert_eq!(finished(&m, "bad", "failed"), 1.0);
    assert_eq!(finished(&m, "flaky", "failed"), 1.0, "terminal failure");
    assert_eq!(m.value(names::JOBS_FINISHED_TOTAL, &[]), 3.0);
    assert_eq!(
        m.value(names::JOB_RETRIES_TOTAL, &[Q, ("kind", "flaky")]),
        1.0
    );
    assert_eq!(m.value(names::JOB_RETRIES_TOTAL, &[]), 1.0);
    assert_eq!(durations(&m, "succeeded"), 1.0);
    assert_eq!(durations(&m, "failed"), 2.0);
    assert_eq!(durations(&m, "retried"), 1.0);
    assert_eq!(durations(&m, "snoozed"), 1.0);
    assert_eq!(m.value(names::WORKER_JOBS_IN_FLIGHT, &[]), 0.0);
    assert_eq!(m.value(names::DB_UP, &[]), 1.0);
    assert_eq!(m.value(names::DB_ERRORS_TOTAL, &[]), 0.0);
    assert_eq!(m.value(names::STALE_WRITES_REJECTED_TOTAL, &[]), 0.0);

    // The worker's own counters agree.
    let counters = worker.stats().counters();
    assert_eq!(
        (
            counters.claimed,
            counters.completed,
            counters.failed,
            counters.retried,
            counters.snoozed
        ),
        (5, 1, 2, 1, 1)
    );

    // The retried job runs again once its backoff passed: one more claim, and its second
    // failure is another retry.
    clock.advance_ms(2_000);
    assert_eq!(worker.run_once().await.unwrap().claimed, 1);
    let m = metrics.scrape();
    assert_eq!(m.value(names::JOBS_CLAIMED_TOTAL, &[Q]), 6.0);
    assert_eq!(m.value(names::JOB_RETRIES_TOTAL, &[]), 2.0);

    drop(worker);
    assert_eq!(metrics.scrape().value(names::WORKER_CONCURRENCY, &[]), 0.0);
}

/// Two jobs whose handlers wait at `gate` (ignoring their tokens), then complete (`a`) or ask
/// for a retry (`b`, which has a single attempt).
fn gated_registry(gate: &Gate) -> Registry {
    let mut registry = Registry::new();
    for (kind, outcome) in [
        ("a", done()),
        (
            "b",
            Outcome::Retry {
                error: "late".into(),
                delay: None,
            },
        ),
    ] {
        let g = gate.clone();
        registry.register(
            kind,
            handler(move |_| {
                let (g, outcome) = (g.clone(), outcome.clone());
                async move {
                    g.wait().await;
                    outcome
                }
            }),
        );
    }
    registry
}

#[tokio::test]
async fn lease_expiries_recoveries_and_stale_writes_are_counted() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let (store, clock) = memory();
    let recovered = enqueue(&*store, spec("a")).await;
    let spent = enqueue(
        &*store,
        JobSpec {
            max_attempts: 1,
            ..spec("b")
        },
    )
    .await;
    let gate = Gate::new();
    let mut victim = Worker::new(store.clone(), gated_registry(&gate), wide("w1")).unwrap();
    assert_eq!(victim.claim_once().await.unwrap(), 2);
    assert_eq!(
        metrics.scrape().value(names::WORKER_JOBS_IN_FLIGHT, &[]),
        2.0
    );

    // The victim is cut off past its leases; another worker's rescuer ends both attempts.
    clock.advance_ms(30_001);
    let mut rescuer = Maintenance::new(store.clone(), maintenance("w2")).unwrap();
    assert_eq!(rescuer.rescue_once().await.unwrap(), 2);
    assert_eq!(
        store.job_get(recovered).await.unwrap().state,
        JobState::Queued
    );
    assert_eq!(store.job_get(spent).await.unwrap().state, JobState::Failed);
    let m = metrics.scrape();
    assert_eq!(m.value(names::LEASE_EXPIRATIONS_TOTAL, &[Q]), 2.0);
    assert_eq!(m.value(names::JOBS_RECOVERED_TOTAL, &[Q]), 1.0);
    assert_eq!(finished(&m, "b", "failed"), 1.0, "attempts spent");
    assert_eq!(m.value(names::JOBS_FINISHED_TOTAL, &[]), 1.0);
    assert_eq!(
        m.value(names::WORKER_CONCURRENCY, &[]),
        10.0,
        "the victim's slots"
    );
    assert_eq!(
        m.value(names::LEADER, &[]),
        0.0,
        "the step API does not lead"
    );
    assert_eq!(
        m.value(
            names::MAINTENANCE_RUNS_TOTAL,
            &[("service", "rescuer"), ("outcome", "ok")]
        ),
        1.0
    );

    // The victim's late outcomes are refused by the fencing.
    gate.open();
    let report = victim.settle().await;
    assert_eq!(report.counts.stale_writes_rejected, 2);
    let m = metrics.scrape();
    let stale = |operation| {
        m.value(
            names::STALE_WRITES_REJECTED_TOTAL,
            &[("operation", operation)],
        )
    };
    assert_eq!((stale("complete"), stale("fail")), (1.0, 1.0));
    assert_eq!(m.value(names::WORKER_JOBS_IN_FLIGHT, &[]), 0.0);
    assert_eq!(
        m.value(names::JOBS_FINISHED_TOTAL, &[]),
        1.0,
        "refused outcomes finish nothing"
    );
    assert_eq!(durations(&m, "succeeded"), 0.0);
}

#[tokio::test]
async fn a_heartbeat_on_a_lost_lease_counts_as_a_stale_write() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let (store, clock) = memory();
    enqueue(&*store, spec("wait")).await;
    let mut registry = Registry::new();
    registry.register(
        "wait",
        handler(|ctx| async move {
            ctx.cancel.cancelled().await;
            done()
        }),
    );
    let mut worker = Worker::new(store.clone(), registry, wide("w1")).unwrap();
    assert_eq!(worker.claim_once().await.unwrap(), 1);
    clock.advance_ms(30_001);
    assert_eq!(store.job_rescue_expired(10).await.unwrap().len(), 1);

    let heartbeat = worker.heartbeat_once().await.unwrap();
    assert_eq!(heartbeat.lost, 1);
    worker.settle().await;
    let m = metrics.scrape();
    assert_eq!(
        m.value(
            names::STALE_WRITES_REJECTED_TOTAL,
            &[("operation", "heartbeat")]
        ),
        1.0
    );
    assert_eq!(m.value(names::STALE_WRITES_REJECTED_TOTAL, &[]), 1.0);
    assert_eq!(m.value(names::WORKER_JOBS_IN_FLIGHT, &[]), 0.0);
}

#[tokio::test]
async fn store_errors_are_counted_by_operation_and_db_up_follows_the_database() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let mut store = MockJobStore::new();
    let mut calls = 0;
    store.expect_job_claim().returning(move |_| {
        calls += 1;
        if calls == 1 {
            Err(backend())
        } else {
            Ok(vec![])
        }
    });
    let _clock = ManualClock::new(t0());
    let mut registry = Registry::new();
    registry.register("k", handler(|_| async { done() }));
    let mut worker = Worker::new(Arc::new(store), registry, config("w1")).unwrap();

    assert!(worker.claim_once().await.is_err());
    let m = metrics.scrape();
    assert_eq!(
        m.value(names::DB_ERRORS_TOTAL, &[("operation", "claim")]),
        1.0
    );
    assert_eq!(m.value(names::DB_UP, &[]), 0.0);

    assert_eq!(worker.claim_once().await.unwrap(), 0);
    let m = metrics.scrape();
    assert_eq!(m.value(names::DB_ERRORS_TOTAL, &[]), 1.0);
    assert_eq!(m.value(names::DB_UP, &[]), 1.0);
    assert_eq!(worker.stats().counters().db_errors, 1);
}

#[tokio::test]
async fn queue_and_kind_labels_beyond_the_cap_fold_into_other() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let (store, _clock) = memory();
    for (queue, kind) in [("a", "k1"), ("b", "k2"), ("c", "k1")] {
        enqueue(
            &*store,
            JobSpec {
                queue: queue.into(),
                ..spec(kind)
            },
        )
        .await;
    }
    let mut registry = Registry::new();
    registry.register("k1", handler(|_| async { done() }));
    registry.register("k2", handler(|_| async { done() }));
    let mut worker = Worker::new(
        store.clone(),
        registry,
        WorkerConfig {
            queues: vec!["a".into(), "b".into(), "c".into()],
            ..wide("w1")
        },
    )
    .unwrap()
    .with_metric_labels(LabelGuard::new(1));
    assert_eq!(worker.run_once().await.unwrap().claimed, 3);
    let m = metrics.scrape();
    assert_eq!(
        m.label_values(names::JOBS_CLAIMED_TOTAL, "queue"),
        vec!["a".to_owned(), "other".to_owned()]
    );
    assert_eq!(
        m.value(names::JOBS_CLAIMED_TOTAL, &[("queue", "other")]),
        2.0
    );
    assert_eq!(
        m.label_values(names::JOBS_FINISHED_TOTAL, "kind"),
        vec!["k1".to_owned(), "other".to_owned()]
    );
}

#[tokio::test]
async fn a_worker_process_exposition_passes_promtool() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let (store, clock) = memory();
    for kind in ["ok", "flaky", "bad", "later", "unknown"] {
        enqueue(&*store, spec(kind)).await;
    }
    let mut worker = Worker::new(store.clone(), outcomes_registry(), wide("w1")).unwrap();
    worker.run_once().await.unwrap();
    // A lease that expires and is rescued.
    enqueue(&*store, spec("ok")).await;
    clock.advance_ms(10_000);
    let gate = Gate::new();
    let mut stuck = Worker::new(store.clone(), gated_registry(&gate), wide("w2")).unwrap();
    enqueue(&*store, spec("a")).await;
    stuck.claim_once().await.unwrap();
    clock.advance_ms(30_001);
    Maintenance::new(store.clone(), maintenance("w1"))
        .unwrap()
        .rescue_once()
        .await
        .unwrap();
    gate.open();
    stuck.settle().await;
    let mut sampler = QueueSampler::new(store.clone(), LabelGuard::default()).with_clock(clock);
    sampler.sample_once().await.unwrap();

    let text = metrics.render();
    let m = Exposition::parse(&text);
    for name in [
        names::JOBS_CLAIMED_TOTAL,
        names::JOBS_FINISHED_TOTAL,
        names::JOB_RETRIES_TOTAL,
        names::LEASE_EXPIRATIONS_TOTAL,
        names::JOBS_RECOVERED_TOTAL,
        names::STALE_WRITES_REJECTED_TOTAL,
        names::QUEUE_DEPTH,
        names::QUEUE_OLDEST_READY_AGE_SECONDS,
        names::WORKER_JOBS_IN_FLIGHT,
        names::WORKER_CONCURRENCY,
        names::DB_UP,
        "faultline_job_duration_seconds_bucket",
        "faultline_job_wait_seconds_bucket",
    ] {
        assert!(m.has(name, &[]), "{name} missing:\n{text}");
    }
    for family in &m.described {
        assert!(family.starts_with("faultline_"), "{family}");
    }
    assert_promtool_accepts_metrics(&text);
}

#[tokio::test]
async fn pg_outcomes_and_sampled_depth_match_the_database() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let db = TestDb::fresh().await;
    let clock = ManualClock::new(t0());
    let store = Arc::new(PgStore::with_clock(
        db.pool().clone(),
        Arc::new(clock.clone()),
    ));
    for kind in ["ok", "ok", "bad", "flaky", "later"] {
        enqueue(&*store, spec(kind)).await;
    }
    enqueue(
        &*store,
        JobSpec {
            run_at: Some(t0() + chrono::TimeDelta::hours(1)),
            ..spec("ok")
        },
    )
    .await;
    let mut worker = Worker::new(store.clone(), outcomes_registry(), wide("w1")).unwrap();
    assert_eq!(worker.run_once().await.unwrap().claimed, 5);
    clock.advance_ms(500); // the retry is due after 900 ms at the earliest
    let mut sampler =
        QueueSampler::new(store.clone(), LabelGuard::default()).with_clock(clock.clone());
    sampler.sample_once().await.unwrap();

    let m = metrics.scrape();
    assert_eq!(finished(&m, "ok", "succeeded"), 2.0);
    assert_eq!(finished(&m, "bad", "failed"), 1.0);
    assert_eq!(m.value(names::JOB_RETRIES_TOTAL, &[Q]), 1.0);
    let stats = store.queue_stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    // Depth is the backlog (queued and running); finished jobs are not depth.
    for state in [JobState::Queued, JobState::Running] {
        assert_eq!(
            m.value(names::QUEUE_DEPTH, &[Q, ("state", state.as_str())]),
            stats[0].count(state) as f64,
            "{state}"
        );
    }
    assert_eq!(stats[0].count(JobState::Succeeded), 2);
    assert!(!m.has(names::QUEUE_DEPTH, &[Q, ("state", "succeeded")]));
    // queued: the retry, the snoozed job and the scheduled one.
    assert_eq!(m.value(names::QUEUE_DEPTH, &[Q, ("state", "queued")]), 3.0);
    // Nothing queued is due yet (backoff, snooze and schedule are all ahead).
    assert_eq!(m.value(names::QUEUE_OLDEST_READY_AGE_SECONDS, &[Q]), 0.0);
}
