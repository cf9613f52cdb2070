//! The queue-depth sampler: gauges equal the store's backlog (queued and running; terminal states
//! are not depth), folded queues add up, vanished queues drop to zero, ages follow the clock, and
//! failures show as `faultline_db_up` 0 and a counted error.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use faultline_memory::MemoryStore;
use faultline_metrics::testing::{Exposition, LocalMetrics};
use faultline_metrics::{LabelGuard, QueueSampler, names, render_fn_with, without_families};
use faultline_ports::domain::{FailureKind, JobSpec, JobState};
use faultline_ports::{
    ClaimParams, Failure, JobStore, LeaseRef, ListParams, ManualClock, MockJobStore, StoreError,
};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

fn spec(queue: &str) -> JobSpec {
    JobSpec {
        queue: queue.into(),
        ..JobSpec::new("k", json!({}))
    }
}

fn claim(queue: &str, limit: u32) -> ClaimParams {
    ClaimParams {
        queues: vec![queue.into()],
        kinds: vec![],
        limit,
        lease_ms: 60_000,
        worker_id: "w".into(),
        claim_id: None,
    }
}

fn depth(m: &Exposition, queue: &str, state: JobState) -> f64 {
    m.value(
        names::QUEUE_DEPTH,
        &[("queue", queue), ("state", state.as_str())],
    )
}

fn age(m: &Exposition, queue: &str) -> f64 {
    m.value(names::QUEUE_OLDEST_READY_AGE_SECONDS, &[("queue", queue)])
}

/// Puts jobs of `queue` in every state: 1 succeeded, 1 failed, 1 cancelled, `running` running,
/// and 2 queued (one due since `t0`, one scheduled in an hour).
async fn populate(store: &impl JobStore, queue: &str, running: u32) {
    for _ in 0..3 + running {
        store.job_enqueue(&spec(queue)).await.unwrap();
    }
    let mut jobs = store.job_claim(&claim(queue, 3 + running)).await.unwrap();
    let fail = Failure {
        error: "e".into(),
        kind: FailureKind::Error,
        retryable: false,
        retry_delay_ms: None,
    };
    store
        .job_complete(LeaseRef::of(&jobs.remove(0)), None)
        .await
        .unwrap();
    store
        .job_fail(LeaseRef::of(&jobs.remove(0)), &fail)
        .await
        .unwrap();
    let cancelled = store.job_cancel(jobs[0].id).await.unwrap();
    assert!(cancelled.cancel_requested);
    let retry = Failure {
        retryable: true,
        ..fail.clone()
    };
    let ended = store
        .job_fail(LeaseRef::of(&jobs.remove(0)), &retry)
        .await
        .unwrap();
    assert_eq!(ended.state, JobState::Cancelled);
    store.job_enqueue(&spec(queue)).await.unwrap();
    store
        .job_enqueue(&JobSpec {
            run_at: Some(t0() + chrono::TimeDelta::hours(1)),
            ..spec(queue)
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn depth_and_age_follow_the_store_and_folded_queues_add_up() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let clock = ManualClock::new(t0());
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    populate(&*store, "a", 2).await;
    populate(&*store, "b", 1).await;
    populate(&*store, "c", 0).await;
    clock.advance_ms(90_000);
    let mut sampler =
        QueueSampler::new(store.clone(), LabelGuard::new(1)).with_clock(clock.clone());
    sampler.sample_once().await.unwrap();

    let m = metrics.scrape();
    assert_eq!(m.value(names::DB_UP, &[]), 1.0);
    assert_eq!(
        m.label_values(names::QUEUE_DEPTH, "queue"),
        vec!["a", "other"]
    );
    let expected = [(JobState::Queued, 2.0, 4.0), (JobState::Running, 2.0, 1.0)];
    for (state, a, other) in expected {
        assert_eq!(depth(&m, "a", state), a, "a {state}");
        assert_eq!(depth(&m, "other", state), other, "other {state}");
    }
    // Finished jobs are history, not depth: no gauge for terminal states.
    assert_eq!(
        m.label_values(names::QUEUE_DEPTH, "state"),
        vec!["queued", "running"]
    );
    // The due job of each queue has waited 90 s; the scheduled one is not ready.
    assert_eq!(age(&m, "a"), 90.0);
    assert_eq!(age(&m, "other"), 90.0);

    // Claiming the due jobs ends their wait.
    store.job_claim(&claim("a", 10)).await.unwrap();
    sampler.sample_once().await.unwrap();
    let m = metrics.scrape();
    assert_eq!(age(&m, "a"), 0.0);
    assert_eq!(depth(&m, "a", JobState::Running), 3.0);
    assert_eq!(depth(&m, "a", JobState::Queued), 1.0, "the scheduled job");
}

#[tokio::test]
async fn a_queue_that_disappears_drops_to_zero() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let clock = ManualClock::new(t0());
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    store.job_enqueue(&spec("gone")).await.unwrap();
    store.job_enqueue(&spec("stays")).await.unwrap();
    let job = store.job_claim(&claim("gone", 1)).await.unwrap().remove(0);
    let mut sampler =
        QueueSampler::new(store.clone(), LabelGuard::default()).with_clock(clock.clone());
    sampler.sample_once().await.unwrap();
    assert_eq!(depth(&metrics.scrape(), "gone", JobState::Running), 1.0);

    // Its last job finishes: the queue has no backlog any more, though its job still exists.
    clock.advance_ms(10);
    store.job_complete(LeaseRef::of(&job), None).await.unwrap();
    assert_eq!(store.queue_stats().await.unwrap().len(), 2);
    sampler.sample_once().await.unwrap();
    let m = metrics.scrape();
    for state in JobState::ALL {
        assert_eq!(depth(&m, "gone", state), 0.0, "{state}");
    }
    assert_eq!(age(&m, "gone"), 0.0);
    assert_eq!(depth(&m, "stays", JobState::Queued), 1.0);
    assert_eq!(age(&m, "stays"), 0.01);
}

#[tokio::test]
async fn a_failing_store_sets_db_up_to_zero_and_counts_the_error() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let mut store = MockJobStore::new();
    let mut calls = 0;
    store.expect_queue_backlog().returning(move || {
        calls += 1;
        match calls {
            1 => Ok(vec![]),
            2 => Err(StoreError::Backend("connection refused".into())),
            _ => Ok(vec![]),
        }
    });
    let mut lists = 0;
    store.expect_queue_list().returning(move || {
        lists += 1;
        match lists {
            3 => Err(StoreError::Backend("connection reset".into())),
            _ => Ok(vec![]),
        }
    });
    let mut sampler = QueueSampler::new(Arc::new(store), LabelGuard::default());
    sampler.sample_once().await.unwrap();
    assert_eq!(metrics.scrape().value(names::DB_UP, &[]), 1.0);

    assert!(sampler.sample_once().await.is_err());
    let m = metrics.scrape();
    assert_eq!(m.value(names::DB_UP, &[]), 0.0);
    assert_eq!(
        m.value(names::DB_ERRORS_TOTAL, &[("operation", "queue_backlog")]),
        1.0
    );

    sampler.sample_once().await.unwrap();
    let m = metrics.scrape();
    assert_eq!(m.value(names::DB_UP, &[]), 1.0);
    assert_eq!(m.value(names::DB_ERRORS_TOTAL, &[]), 1.0);

    // The queue list fails on its third call (the backlog's fourth).
    assert!(sampler.sample_once().await.is_err());
    let m = metrics.scrape();
    assert_eq!(m.value(names::DB_UP, &[]), 0.0);
    assert_eq!(
        m.value(names::DB_ERRORS_TOTAL, &[("operation", "queue_list")]),
        1.0
    );
}

/// A queue whose jobs all finished before the first sample has no backlog, but its row exists:
/// it reports 0, not no series at all.
async fn check_drained_queue_reports_zero(store: Arc<impl JobStore>, clock: ManualClock) {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    store.job_enqueue(&spec("drained")).await.unwrap();
    store.job_enqueue(&spec("busy")).await.unwrap();
    let job = store
        .job_claim(&claim("drained", 1))
        .await
        .unwrap()
        .remove(0);
    store.job_complete(LeaseRef::of(&job), None).await.unwrap();
    let mut sampler = QueueSampler::new(store, LabelGuard::default()).with_clock(clock);
    sampler.sample_once().await.unwrap();
    let m = metrics.scrape();
    assert_eq!(
        m.label_values(names::QUEUE_DEPTH, "queue"),
        vec!["busy", "drained"]
    );
    for state in [JobState::Queued, JobState::Running] {
        assert!(m.has(
            names::QUEUE_DEPTH,
            &[("queue", "drained"), ("state", state.as_str())]
        ));
        assert_eq!(depth(&m, "drained", state), 0.0, "{state}");
    }
    assert_eq!(age(&m, "drained"), 0.0);
    assert_eq!(depth(&m, "busy", JobState::Queued), 1.0);
}

#[tokio::test]
async fn a_queue_that_drained_before_the_first_sample_reports_zero() {
    let clock = ManualClock::new(t0());
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    check_drained_queue_reports_zero(store, clock).await;
}

#[tokio::test]
async fn pg_a_queue_that_drained_before_the_first_sample_reports_zero() {
    let db = TestDb::fresh().await;
    let clock = ManualClock::new(t0());
    let store = Arc::new(PgStore::with_clock(
        db.pool().clone(),
        Arc::new(clock.clone()),
    ));
    check_drained_queue_reports_zero(store, clock).await;
}

#[tokio::test]
async fn run_samples_at_once_and_stops_on_shutdown() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let clock = ManualClock::new(t0());
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    store.job_enqueue(&spec("r")).await.unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        QueueSampler::new(store, LabelGuard::default())
            .with_clock(clock)
            .with_interval(Duration::from_secs(3_600))
            .run(shutdown.clone()),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while depth(&metrics.scrape(), "r", JobState::Queued) != 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sample within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the sampler stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn pg_depth_gauges_match_the_database() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let db = TestDb::fresh().await;
    let clock = ManualClock::new(t0());
    let store = Arc::new(PgStore::with_clock(
        db.pool().clone(),
        Arc::new(clock.clone()),
    ));
    populate(&*store, "alpha", 2).await;
    populate(&*store, "beta", 0).await;
    clock.advance_ms(30_000);
    let mut sampler =
        QueueSampler::new(store.clone(), LabelGuard::default()).with_clock(clock.clone());
    sampler.sample_once().await.unwrap();

    let m = metrics.scrape();
    // Count every state of every queue independently of the sampler's query, through the job
    // list: queued and running are published, terminal states are not depth and stay absent.
    for queue in ["alpha", "beta"] {
        for state in JobState::ALL {
            let page = store
                .job_list(&ListParams {
                    queue: Some(queue.into()),
                    state: Some(state),
                    limit: 1_000,
                    ..ListParams::default()
                })
                .await
                .unwrap();
            let published = m.has(
                names::QUEUE_DEPTH,
                &[("queue", queue), ("state", state.as_str())],
            );
            if matches!(state, JobState::Queued | JobState::Running) {
                assert!(published, "{queue} {state}");
                assert_eq!(
                    depth(&m, queue, state),
                    page.jobs.len() as f64,
                    "{queue} {state}"
                );
            } else {
                assert!(!page.jobs.is_empty(), "{queue} {state}: the test has some");
                assert!(!published, "{queue} {state} is not depth");
            }
        }
        assert_eq!(age(&m, queue), 30.0, "{queue}");
    }
    assert_eq!(depth(&m, "alpha", JobState::Running), 2.0);
    assert_eq!(m.value(names::DB_UP, &[]), 1.0);
}

/// Polls `done` on paused time, at most `within` (of the runtime's clock).
async fn within(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_sampler_gated_by_leadership_samples_only_while_the_process_leads() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let clock = ManualClock::new(t0());
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    store.job_enqueue(&spec("a")).await.unwrap();
    let leads = Arc::new(AtomicBool::new(false));
    let flag = leads.clone();
    let sampler = QueueSampler::new(store.clone(), LabelGuard::default())
        .with_clock(clock.clone())
        .with_interval(Duration::from_secs(30))
        .while_leading(Arc::new(move || flag.load(Ordering::SeqCst)));
    let exported = sampler.exported();
    let render = render_fn_with(metrics.handle(), exported.clone());
    let stop = CancellationToken::new();
    let running = tokio::spawn(sampler.run(stop.clone()));

    // Not leading: nothing sampled, nothing exported.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!exported.is_exported());
    assert!(
        !metrics.scrape().has(names::QUEUE_DEPTH, &[]),
        "{}",
        metrics.render()
    );

    // Leading: the first sample comes within one leadership check, not one interval.
    leads.store(true, Ordering::SeqCst);
    within(Duration::from_secs(1), "sampled on becoming leader", || {
        exported.is_exported()
    })
    .await;
    let m = Exposition::parse(&render());
    assert_eq!(depth(&m, "a", JobState::Queued), 1.0);

    // Another job, but the next sample is one interval after the first.
    store.job_enqueue(&spec("a")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        depth(&Exposition::parse(&render()), "a", JobState::Queued),
        1.0
    );
    within(
        Duration::from_secs(30),
        "sampled again after an interval",
        || depth(&Exposition::parse(&render()), "a", JobState::Queued) == 2.0,
    )
    .await;

    // Stepped down: the series are hidden at once (they would go stale), the rest stays.
    leads.store(false, Ordering::SeqCst);
    within(Duration::from_secs(1), "hidden on stepping down", || {
        !exported.is_exported()
    })
    .await;
    let text = render();
    assert!(!text.contains(names::QUEUE_DEPTH), "{text}");
    assert!(
        !text.contains(names::QUEUE_OLDEST_READY_AGE_SECONDS),
        "{text}"
    );
    assert_eq!(
        Exposition::parse(&text).value(names::DB_UP, &[]),
        1.0,
        "{text}"
    );
    stop.cancel();
    running.await.unwrap();
}

#[test]
fn without_families_drops_exactly_the_named_families() {
    let text = "# HELP faultline_queue_depth Jobs.\n\
                # TYPE faultline_queue_depth gauge\n\
                faultline_queue_depth{queue=\"a\",state=\"queued\"} 1\n\
                # HELP faultline_queue_depth_other Not the same family.\n\
                faultline_queue_depth_other 2\n\
                faultline_db_up 1\n";
    assert_eq!(
        without_families(text, &[names::QUEUE_DEPTH]),
        "# HELP faultline_queue_depth_other Not the same family.\n\
         faultline_queue_depth_other 2\n\
         faultline_db_up 1\n"
    );
}
