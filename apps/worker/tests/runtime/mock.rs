//! Fault injection with `MockJobStore`: database errors on every kind of call. The worker must
//! keep running, back off, retry writes while their leases last, and never busy-loop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faultline_ports::{HeartbeatOutcome, MockJobStore, WriteOutcome};
use faultline_worker::{Outcome, Registry, Worker, WorkerConfig};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::{Gate, backend, config, done, eventually, handler, running_job, t0};

fn registry_done() -> Registry {
    let mut registry = Registry::new();
    registry.register("k", handler(|_| async { done() }));
    registry
}

/// Accepts every completion of the batch.
fn accept_all(
    batch: &[(faultline_ports::LeaseRef, Option<serde_json::Value>)],
) -> Vec<WriteOutcome> {
    vec![WriteOutcome::Accepted; batch.len()]
}

#[tokio::test(start_paused = true)]
async fn the_worker_survives_a_database_outage_backs_off_and_recovers() {
    let mut store = MockJobStore::new();
    let claims = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let seen = claims.clone();
    let lost_ids = Arc::new(Mutex::new(Vec::<i64>::new()));
    let lost = lost_ids.clone();
    store.expect_job_claim().returning(move |params| {
        let mut seen = seen.lock().unwrap();
        seen.push(Instant::now());
        match seen.len() {
            1..=3 => {
                lost.lock()
                    .unwrap()
                    .push(params.claim_id.expect("a claim id"));
                Err(backend())
            }
            4 => Ok(vec![running_job(1, "k", t0())]),
            _ => Ok(vec![]),
        }
    });
    // The failed claims' jobs, if they committed after all, are given back by claim id.
    let released_ids = Arc::new(Mutex::new(Vec::<i64>::new()));
    let released = released_ids.clone();
    store.expect_job_release_claim().returning(move |claim_id| {
        released.lock().unwrap().push(claim_id);
        Ok(0)
    });
    let writes = Arc::new(AtomicUsize::new(0));
    let w = writes.clone();
    store.expect_job_complete_many().returning(move |batch| {
        if w.fetch_add(1, Ordering::SeqCst) < 2 {
            Err(backend())
        } else {
            Ok(accept_all(batch))
        }
    });
    store.expect_job_heartbeat_many().returning(|leases, _| {
        Ok(vec![
            HeartbeatOutcome::Extended {
                lease_expires_at: t0() + chrono::TimeDelta::seconds(30),
                cancel_requested: false,
            };
            leases.len()
        ])
    });
    let cfg = WorkerConfig {
        db_backoff_min: Duration::from_millis(100),
        db_backoff_max: Duration::from_secs(1),
        ..config("w1")
    };
    let mut worker = Worker::new(Arc::new(store), registry_done(), cfg).unwrap();
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move { worker.run(token).await });

    eventually(
        "the completion to be written",
        Duration::from_secs(60),
        || {
            let stats = stats.clone();
            async move { stats.counters().completed == 1 }
        },
    )
    .await;
    assert!(
        !running.is_finished(),
        "the worker never exits on store errors"
    );
    let counters = stats.counters();
    assert_eq!(counters.db_errors, 5, "3 claims and 2 writes failed");
    assert_eq!(writes.load(Ordering::SeqCst), 3);
    assert_eq!(counters.writes_dropped, 0);
    let lost = lost_ids.lock().unwrap().clone();
    let released = released_ids.lock().unwrap().clone();
    assert_eq!(lost.len(), 3);
    assert!(
        lost.iter().all(|id| released.contains(id)),
        "every failed claim is given back: lost {lost:?}, released {released:?}"
    );

    // The claims backed off exponentially (with jitter in the upper half of each step).
    let claims = claims.lock().unwrap().clone();
    let gaps: Vec<Duration> = claims.windows(2).take(3).map(|w| w[1] - w[0]).collect();
    for (gap, ceiling_ms) in gaps.iter().zip([100, 200, 400]) {
        let ceiling = Duration::from_millis(ceiling_ms);
        assert!(
            *gap >= ceiling / 2 && *gap <= ceiling,
            "{gap:?} not in backoff step {ceiling:?}: {gaps:?}"
        );
    }
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_completion_is_retried_while_its_heartbeated_lease_lasts_then_dropped() {
    let mut store = MockJobStore::new();
    store
        .expect_job_claim()
        .times(1)
        .returning(|_| Ok(vec![running_job(1, "k", t0())])); // lease until t0 + 30 s
    let writes = Arc::new(AtomicUsize::new(0));
    let w = writes.clone();
    store.expect_job_complete_many().returning(move |_| {
        w.fetch_add(1, Ordering::SeqCst);
        Err(backend())
    });
    // The heartbeat still reaches the store and extends the lease to t0 + 50 s.
    store
        .expect_job_heartbeat_many()
        .times(1)
        .withf(|leases, extend_ms| leases.len() == 1 && *extend_ms == 30_000)
        .returning(|_, _| {
            Ok(vec![HeartbeatOutcome::Extended {
                lease_expires_at: t0() + chrono::TimeDelta::seconds(50),
                cancel_requested: false,
            }])
        });
    let mut worker = Worker::new(Arc::new(store), registry_done(), config("w1")).unwrap();

    let report = worker.run_once().await.unwrap();
    assert_eq!((report.claimed, report.pending_writes), (1, 1));
    assert_eq!(report.counts.db_errors, 1);
    tokio::time::advance(Duration::from_millis(20_000)).await;
    let heartbeat = worker.heartbeat_once().await.unwrap();
    assert_eq!(
        heartbeat.extended, 1,
        "a lease with an unwritten outcome is kept alive"
    );

    tokio::time::advance(Duration::from_millis(15_000)).await; // past the first lease end, within the extended one
    let report = worker.flush().await;
    assert_eq!((report.pending_writes, report.counts.db_errors), (1, 1));
    assert_eq!(writes.load(Ordering::SeqCst), 2);

    // The extended lease has ended by the worker's monotonic clock.
    tokio::time::advance(Duration::from_millis(15_000)).await;
    let report = worker.flush().await;
    assert_eq!(report.pending_writes, 0);
    assert_eq!(report.counts.writes_dropped, 1);
    assert_eq!(
        writes.load(Ordering::SeqCst),
        2,
        "no write is retried for an ended lease"
    );
    assert_eq!(worker.leases_held(), 0);
}

/// A heartbeat that races the completion's write: the write committed (the job is finished, so
/// the heartbeat finds no live lease) but its answer was lost, so the completer retries it. The
/// heartbeat's "lost" is not a lost lease: the write's own answer ends it.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_finding_a_lease_gone_while_its_outcome_is_written_loses_nothing() {
    let mut store = MockJobStore::new();
    store
        .expect_job_claim()
        .times(1)
        .returning(|_| Ok(vec![running_job(1, "k", t0())]));
    let writes = Arc::new(AtomicUsize::new(0));
    let w = writes.clone();
    store.expect_job_complete_many().returning(move |batch| {
        if w.fetch_add(1, Ordering::SeqCst) == 0 {
            Err(backend())
        } else {
            Ok(vec![WriteOutcome::Accepted; batch.len()])
        }
    });
    store
        .expect_job_heartbeat_many()
        .times(1)
        .returning(|leases, _| Ok(vec![HeartbeatOutcome::Lost; leases.len()]));
    let mut worker = Worker::new(Arc::new(store), registry_done(), config("w1")).unwrap();

    let report = worker.run_once().await.unwrap();
    assert_eq!((report.claimed, report.pending_writes), (1, 1));
    let heartbeat = worker.heartbeat_once().await.unwrap();
    assert_eq!(
        (heartbeat.extended, heartbeat.lost),
        (0, 0),
        "{heartbeat:?}"
    );
    assert_eq!(
        worker.leases_held(),
        1,
        "the outcome is still being written"
    );

    let report = worker.flush().await;
    assert_eq!((report.counts.completed, report.pending_writes), (1, 0));
    let counters = worker.stats().counters();
    assert_eq!(
        (counters.leases_lost, counters.stale_writes_rejected),
        (0, 0),
        "{counters:?}"
    );
    assert_eq!(worker.leases_held(), 0);
}

#[tokio::test(start_paused = true)]
async fn failed_heartbeats_past_the_lease_end_cancel_the_handler() {
    let mut store = MockJobStore::new();
    store
        .expect_job_claim()
        .times(1)
        .returning(|_| Ok(vec![running_job(1, "k", t0())]));
    store
        .expect_job_heartbeat_many()
        .times(2)
        .returning(|_, _| Err(backend()));
    store.expect_job_complete_many().never();
    let mut registry = Registry::new();
    registry.register(
        "k",
        handler(|ctx| async move {
            ctx.cancel.cancelled().await;
            done()
        }),
    );
    let mut worker = Worker::new(Arc::new(store), registry, config("w1")).unwrap();
    assert_eq!(worker.claim_once().await.unwrap(), 1);

    tokio::time::advance(Duration::from_millis(10_000)).await;
    assert!(worker.heartbeat_once().await.is_err());
    assert_eq!(
        worker.stats().counters().leases_lost,
        0,
        "the lease still runs"
    );
    assert_eq!(worker.in_flight(), 1);

    tokio::time::advance(Duration::from_millis(20_000)).await;
    assert!(worker.heartbeat_once().await.is_err());
    assert_eq!(worker.stats().counters().leases_lost, 1);
    let report = worker.settle().await; // the handler saw its token; nothing is written
    assert_eq!(report.counts.completed, 0);
    assert_eq!((report.in_flight, report.pending_writes), (0, 0));
    assert_eq!(worker.stats().counters().db_errors, 2);
}

#[tokio::test(start_paused = true)]
async fn an_idle_worker_polls_at_its_interval_and_does_not_spin() {
    let mut store = MockJobStore::new();
    let claims = Arc::new(AtomicUsize::new(0));
    let c = claims.clone();
    store.expect_job_claim().returning(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
        Ok(vec![])
    });
    let mut worker = Worker::new(Arc::new(store), registry_done(), config("w1")).unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move { worker.run(token).await });
    tokio::time::sleep(Duration::from_secs(60)).await;
    stop.cancel();
    running.await.unwrap();
    let claims = claims.load(Ordering::SeqCst);
    assert!(
        (59..=62).contains(&claims),
        "one claim per 1 s poll over 60 s, got {claims}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_busy_worker_claims_nothing_until_a_slot_frees() {
    let mut store = MockJobStore::new();
    let limits = Arc::new(Mutex::new(Vec::new()));
    let seen = limits.clone();
    store.expect_job_claim().returning(move |params| {
        let mut seen = seen.lock().unwrap();
        seen.push(params.limit);
        if seen.len() == 1 {
            Ok(vec![running_job(1, "k", t0()), running_job(2, "k", t0())])
        } else {
            Ok(vec![])
        }
    });
    let heartbeats = Arc::new(AtomicUsize::new(0));
    let h = heartbeats.clone();
    store
        .expect_job_heartbeat_many()
        .returning(move |leases, _| {
            h.fetch_add(1, Ordering::SeqCst);
            Ok(vec![
                HeartbeatOutcome::Extended {
                    lease_expires_at: t0() + chrono::TimeDelta::seconds(30),
                    cancel_requested: false,
                };
                leases.len()
            ])
        });
    store
        .expect_job_complete_many()
        .returning(|batch| Ok(accept_all(batch)));
    let gate = Gate::new();
    let g = gate.clone();
    let mut registry = Registry::new();
    registry.register(
        "k",
        handler(move |_| {
            let g = g.clone();
            async move {
                g.wait().await;
                Outcome::Complete(None)
            }
        }),
    );
    let cfg = WorkerConfig {
        concurrency: 2,
        ..config("w1")
    };
    let mut worker = Worker::new(Arc::new(store), registry, cfg).unwrap();
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move { worker.run(token).await });

    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        *limits.lock().unwrap(),
        vec![2],
        "no claim while every slot is busy"
    );
    assert_eq!(stats.snapshot().in_flight, 2);
    let beats = heartbeats.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&beats),
        "one heartbeat per 10 s, got {beats}"
    );

    gate.open();
    eventually("both completions", Duration::from_secs(10), || {
        let stats = stats.clone();
        async move { stats.counters().completed == 2 }
    })
    .await;
    eventually(
        "a claim for the freed slots",
        Duration::from_secs(10),
        || {
            let limits = limits.clone();
            async move { limits.lock().unwrap().len() >= 2 }
        },
    )
    .await;
    assert_eq!(limits.lock().unwrap()[1], 2);
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn failures_of_one_step_are_written_in_one_statement() {
    let mut store = MockJobStore::new();
    store.expect_job_claim().times(1).returning(|_| {
        Ok((1..=3)
            .map(|id| running_job(id, "boom", t0()))
            .collect::<Vec<_>>())
    });
    store
        .expect_job_fail_many()
        .times(1)
        .withf(|batch| {
            batch.len() == 3 && batch.iter().all(|(_, f)| f.retryable && f.error == "no")
        })
        .returning(|batch| {
            Ok(batch
                .iter()
                .map(|(lease, _)| match lease.job_id {
                    1 => faultline_ports::FailOutcome::Applied {
                        state: faultline_ports::domain::JobState::Queued,
                    },
                    2 => faultline_ports::FailOutcome::Applied {
                        state: faultline_ports::domain::JobState::Failed,
                    },
                    _ => faultline_ports::FailOutcome::Stale,
                })
                .collect())
        });
    store.expect_job_fail().never();
    let mut registry = Registry::new();
    registry.register(
        "boom",
        handler(|_| async {
            Outcome::Retry {
                error: "no".into(),
                delay: None,
            }
        }),
    );
    let mut worker = Worker::new(Arc::new(store), registry, config("w1")).unwrap();
    let report = worker.run_once().await.unwrap();
    assert_eq!(report.claimed, 3);
    let counts = report.counts;
    assert_eq!(
        (counts.retried, counts.failed, counts.stale_writes_rejected),
        (1, 1, 1)
    );
    assert_eq!((report.pending_writes, worker.leases_held()), (0, 0));
}
