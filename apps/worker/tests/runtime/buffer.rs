//! The production loop's local buffer (under paused tokio time, on the in-memory store): short
//! jobs are claimed beyond the free slots and wait for one with their leases held and
//! heartbeated; a shutdown gives their leases back at once without running them; jobs that run
//! longer than the buffer's horizon are claimed only for free slots.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use faultline_memory::MemoryStore;
use faultline_ports::domain::{JobSpec, JobState};
use faultline_ports::{Clock, JobStore, ListParams};
use faultline_worker::{Registry, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::support::{Gate, TokioClock, config, done, enqueue, eventually, handler, spec};

/// The jobs of the store in `state`.
async fn in_state(store: &impl JobStore, state: JobState) -> Vec<faultline_ports::domain::Job> {
    let params = ListParams {
        queue: None,
        state: Some(state),
        kind: None,
        limit: 1_000,
        before_id: None,
    };
    store.job_list(&params).await.unwrap().jobs
}

/// An in-memory store whose clock follows tokio's paused clock.
fn paused_store() -> (Arc<MemoryStore>, TokioClock) {
    let clock = TokioClock::new();
    (Arc::new(MemoryStore::new(Arc::new(clock.clone()))), clock)
}

#[tokio::test(start_paused = true)]
async fn run_buffers_short_jobs_beyond_its_slots_heartbeats_them_and_gives_them_back() {
    let (store, clock) = paused_store();
    // Quick jobs first (they teach the worker that jobs are short), then jobs that block.
    for _ in 0..3 {
        enqueue(&*store, spec("quick")).await;
    }
    let mut blocked = Vec::new();
    for _ in 0..10 {
        blocked.push(enqueue(&*store, JobSpec::new("blocked", serde_json::json!({}))).await);
    }
    let gate = Gate::new();
    let started = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    registry.register("quick", handler(|_| async { done() }));
    let (g, s) = (gate.clone(), started.clone());
    registry.register(
        "blocked",
        handler(move |_| {
            let g = g.clone();
            s.fetch_add(1, Ordering::SeqCst);
            async move {
                g.wait().await;
                done()
            }
        }),
    );
    let cfg = WorkerConfig {
        concurrency: 2,
        completion_batch_size: 5,
        shutdown_grace: Duration::from_secs(1),
        ..config("w1")
    };
    let mut worker = Worker::new(store.clone(), registry, cfg).unwrap();
    assert_eq!(worker.buffered(), 0);
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move { worker.run(token).await });

    // 2 slots busy and a buffer of one completion batch (5): 7 leases on blocked jobs.
    eventually("the buffer filled", Duration::from_secs(60), || {
        let stats = stats.clone();
        async move { stats.counters().claimed == 3 + 7 }
    })
    .await;
    assert_eq!(in_state(&*store, JobState::Running).await.len(), 7);
    assert_eq!(
        started.load(Ordering::SeqCst),
        2,
        "buffered jobs do not run"
    );

    // Three leases' worth of time: heartbeats keep every buffered lease alive, nothing more is
    // claimed, and the buffered jobs still wait.
    tokio::time::sleep(Duration::from_secs(100)).await;
    let held = in_state(&*store, JobState::Running).await;
    assert_eq!(held.len(), 7);
    for job in &held {
        assert_eq!((job.attempts, job.lease_owner.as_deref()), (1, Some("w1")));
        assert!(
            job.lease_expires_at.unwrap() > clock.now(),
            "lease {job:?} ran out"
        );
    }
    assert_eq!(stats.counters().claimed, 10);
    assert_eq!(started.load(Ordering::SeqCst), 2);

    // Shutdown: the 2 running handlers are interrupted, all 7 leases given back at once.
    stop.cancel();
    let report = running.await.unwrap();
    assert_eq!(report.interrupted, 2);
    assert_eq!(report.counts.released, 7);
    assert_eq!(stats.counters().completed, 3);
    for id in blocked {
        let job = store.job_get(id).await.unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Queued, 0), "{job:?}");
        assert!(job.next_run_at <= clock.now(), "due at once");
    }
    assert_eq!(started.load(Ordering::SeqCst), 2, "no buffered job ran");
}

#[tokio::test(start_paused = true)]
async fn run_claims_only_for_free_slots_when_jobs_outlast_the_buffer_horizon() {
    let (store, _clock) = paused_store();
    for _ in 0..10 {
        enqueue(&*store, spec("slow")).await;
    }
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let mut registry = Registry::new();
    registry.register(
        "slow",
        handler(move |_| {
            s.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                done()
            }
        }),
    );
    let cfg = WorkerConfig {
        concurrency: 2,
        ..config("w1")
    };
    let mut worker = Worker::new(store.clone(), registry, cfg).unwrap();
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move { worker.run(token).await });

    // Once two jobs have finished (the worker has seen that jobs take 1 s) and the next two
    // run: only those two are leased, the rest stays queued for other workers.
    eventually("a second pair running", Duration::from_secs(60), || {
        let (stats, started) = (stats.clone(), started.clone());
        async move { stats.counters().completed >= 2 && started.load(Ordering::SeqCst) >= 4 }
    })
    .await;
    assert_eq!(in_state(&*store, JobState::Running).await.len(), 2);
    assert_eq!(in_state(&*store, JobState::Queued).await.len(), 10 - 4);
    eventually("all done", Duration::from_secs(60), || {
        let stats = stats.clone();
        async move { stats.counters().completed == 10 }
    })
    .await;
    stop.cancel();
    let report = running.await.unwrap();
    assert_eq!(report.counts.released, 0);
    assert_eq!(stats.counters().claimed, 10);
}
