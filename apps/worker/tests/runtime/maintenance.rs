//! The maintenance services: one leader among several processes (on the in-memory store under
//! paused time, and on PostgreSQL in real time), a new leader after the old one dies or resigns,
//! a leader that cannot renew steps down before its lease ends, the rescuer and pruner in
//! batches, and a rescue by the leader while a worker keeps its own long job alive.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use faultline_memory::MemoryStore;
use faultline_ports::domain::{JobSpec, JobState};
use faultline_ports::{ClaimParams, JobStore, Leadership, MockJobStore};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use faultline_worker::{Maintenance, MaintenanceConfig, MaintenanceHandle, Registry, Worker};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::{
    TokioClock, backend, config, done, enqueue, eventually, handler, maintenance, memory, spec, t0,
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

/// Short timers: a 3 s leadership renewed every second, registry entries refreshed every second
/// and reaped after 5 s.
fn quick(id: &str) -> MaintenanceConfig {
    MaintenanceConfig {
        leader_lease: Duration::from_secs(3),
        election_interval: Some(Duration::from_secs(1)),
        process_heartbeat: Duration::from_secs(1),
        process_expiry: Duration::from_secs(5),
        rescue_interval: Some(Duration::from_secs(1)),
        ..maintenance(id)
    }
}

/// A running maintenance: its handle, its stop token and its task.
struct Running {
    handle: MaintenanceHandle,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn start<S: JobStore>(store: Arc<S>, config: MaintenanceConfig) -> Running {
    let service = Maintenance::new(store, config).expect("valid configuration");
    let handle = service.handle();
    let stop = CancellationToken::new();
    let task = tokio::spawn(service.run(stop.clone()));
    Running { handle, stop, task }
}

fn leaders(fleet: &[Running]) -> Vec<usize> {
    (0..fleet.len())
        .filter(|&i| fleet[i].handle.is_leader())
        .collect()
}

/// Waits until exactly one process leads (checking every 50 ms that never two do); returns it
/// and how long it took.
async fn one_leader(fleet: &[Running], within: Duration) -> (usize, Duration) {
    let started = Instant::now();
    loop {
        let now = leaders(fleet);
        assert!(now.len() <= 1, "two leaders at once: {now:?}");
        if let [one] = now[..] {
            return (one, started.elapsed());
        }
        assert!(started.elapsed() < within, "no leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn exactly_one_leader_and_a_new_one_after_a_kill_or_a_resignation() {
    let store = Arc::new(MemoryStore::new(Arc::new(TokioClock::new())));
    let fleet: Vec<Running> = ["p1", "p2", "p3"]
        .into_iter()
        .map(|id| start(store.clone(), quick(id)))
        .collect();
    let (first, _) = one_leader(&fleet, Duration::from_secs(5)).await;
    // It stays the only leader while it renews.
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(leaders(&fleet), [first]);
    }
    let term = store.leader_get().await.unwrap().unwrap().term;
    eventually("three registered processes", Duration::from_secs(5), || {
        let store = store.clone();
        async move { store.process_list().await.unwrap().len() == 3 }
    })
    .await;

    // kill -9: the task is gone without resigning; another takes over within lease + interval.
    fleet[first].task.abort();
    let killed_at = Instant::now();
    let mut rest: Vec<Running> = Vec::new();
    let mut fleet = fleet;
    let dead = fleet.remove(first);
    rest.append(&mut fleet);
    let (second, _) = one_leader(&rest, Duration::from_secs(10)).await;
    let took = killed_at.elapsed();
    assert!(
        took <= Duration::from_secs(3) + Duration::from_secs(1) + Duration::from_millis(100),
        "failover took {took:?}"
    );
    let now = store.leader_get().await.unwrap().unwrap();
    assert_eq!(now.term, term + 1);
    // The dead process's registry entry is reaped by the new leader after 5 s.
    eventually("the dead process reaped", Duration::from_secs(10), || {
        let store = store.clone();
        async move { store.process_list().await.unwrap().len() == 2 }
    })
    .await;
    drop(dead);

    // A graceful stop resigns: the last one takes over within one election interval.
    rest[second].stop.cancel();
    let stopped_at = Instant::now();
    let leaving = rest.remove(second);
    leaving.task.await.unwrap();
    let (_, _) = one_leader(&rest, Duration::from_secs(5)).await;
    assert!(
        stopped_at.elapsed() <= Duration::from_secs(1) + Duration::from_millis(100),
        "takeover after a resignation took {:?}",
        stopped_at.elapsed()
    );
    assert_eq!(store.process_list().await.unwrap().len(), 1, "deregistered");
    for running in rest {
        running.stop.cancel();
        running.task.await.unwrap();
    }
    assert!(store.process_list().await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_steps_down_before_its_lease_ends() {
    let mut store = MockJobStore::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    store.expect_leader_elect().returning(move |params| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            Ok(Leadership {
                leader_id: params.candidate.clone(),
                term: 7,
                elected_at: t0(),
                expires_at: t0() + chrono::TimeDelta::milliseconds(params.ttl_ms),
                remaining_ms: params.ttl_ms,
            })
        } else {
            Err(backend())
        }
    });
    let mut service = Maintenance::new(Arc::new(store), quick("p1")).unwrap();
    let elected_at = Instant::now();
    assert!(service.elect_once().await.unwrap());
    assert_eq!(service.term(), Some(7));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(service.elect_once().await.is_err());
    assert!(service.is_leader(), "2 s of the 3 s lease are left");
    // It stops a quarter of the lease (750 ms) before the lease ends by its own clock.
    tokio::time::advance(Duration::from_millis(1_200)).await;
    assert!(service.is_leader());
    tokio::time::advance(Duration::from_millis(100)).await;
    assert!(
        !service.is_leader(),
        "stepped down 700 ms before the lease ends"
    );
    assert!(service.elect_once().await.is_err());
    assert_eq!(service.term(), None);
    assert!(elected_at.elapsed() < Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn a_process_with_maintenance_off_registers_but_never_leads() {
    let store = Arc::new(MemoryStore::new(Arc::new(TokioClock::new())));
    let off = start(
        store.clone(),
        MaintenanceConfig {
            lead: false,
            ..quick("api-1")
        },
    );
    eventually("registered", Duration::from_secs(5), || {
        let store = store.clone();
        async move { store.process_list().await.unwrap().len() == 1 }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!off.handle.is_leader());
    assert_eq!(store.leader_get().await.unwrap(), None);
    off.stop.cancel();
    off.task.await.unwrap();
    assert!(store.process_list().await.unwrap().is_empty());
}

#[tokio::test]
async fn rescue_and_prune_steps_work_in_batches() {
    let (store, clock) = memory();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(enqueue(&*store, spec("any")).await);
    }
    assert_eq!(store.job_claim(&claim_as("ghost")).await.unwrap().len(), 5);
    let cfg = MaintenanceConfig {
        rescue_batch_size: 2,
        prune_batch_size: 2,
        ..maintenance("m1")
    };
    let mut service = Maintenance::new(store.clone(), cfg).unwrap();
    assert_eq!(
        service.rescue_once().await.unwrap(),
        0,
        "leases still running"
    );
    clock.advance_ms(30_001);
    assert_eq!(service.rescue_once().await.unwrap(), 5);

    // Finish them all (succeeded), then prune after the 24 h retention.
    clock.advance_ms(60_000);
    let mut registry = Registry::new();
    registry.register("any", handler(|_| async { done() }));
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    assert_eq!(worker.run_once().await.unwrap().counts.completed, 4);
    assert_eq!(worker.run_once().await.unwrap().counts.completed, 1);
    clock.advance_ms(24 * 3_600_000);
    assert_eq!(
        service.prune_once().await.unwrap(),
        0,
        "retention is exclusive"
    );
    clock.advance_ms(1);
    assert_eq!(service.prune_once().await.unwrap(), 5);
    assert!(store.job_get(ids[0]).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn the_leader_rescues_a_dead_workers_job_while_a_worker_keeps_its_long_job_alive() {
    let clock = TokioClock::new();
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    // A "dead" worker claims a job and never heartbeats.
    let orphan = enqueue(&*store, spec("long")).await;
    assert_eq!(store.job_claim(&claim_as("ghost")).await.unwrap().len(), 1);
    let long = enqueue(&*store, spec("long")).await;
    let mut registry = Registry::new();
    registry.register(
        "long",
        handler(|_| async {
            tokio::time::sleep(Duration::from_secs(100)).await;
            done()
        }),
    );
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move { worker.run(token).await });
    let leader = start(
        store.clone(),
        MaintenanceConfig {
            rescue_interval: Some(Duration::from_secs(5)),
            ..maintenance("w1")
        },
    );
    eventually("both jobs done", Duration::from_secs(600), || {
        let stats = stats.clone();
        async move { stats.counters().completed == 2 }
    })
    .await;
    stop.cancel();
    running.await.unwrap();
    leader.stop.cancel();
    leader.task.await.unwrap();

    let job = store.job_get(long).await.unwrap();
    assert_eq!(
        (job.state, job.attempts),
        (JobState::Succeeded, 1),
        "100 s job under a 30 s lease, kept alive by heartbeats"
    );
    let job = store.job_get(orphan).await.unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Succeeded, 2));
    assert!(
        job.last_error
            .unwrap()
            .starts_with("lease expired (worker ghost")
    );
    assert_eq!(stats.counters().leases_lost, 0);
}

#[tokio::test]
async fn on_postgres_one_process_leads_and_another_takes_over_when_it_stops() {
    let db = TestDb::fresh().await;
    let store = Arc::new(PgStore::new(db.pool().clone()));
    let short = |id: &str| MaintenanceConfig {
        leader_lease: Duration::from_millis(900),
        election_interval: Some(Duration::from_millis(200)),
        process_heartbeat: Duration::from_millis(200),
        ..maintenance(id)
    };
    let mut fleet: Vec<Running> = ["a", "b"]
        .into_iter()
        .map(|id| start(store.clone(), short(id)))
        .collect();
    let (first, _) = one_leader(&fleet, Duration::from_secs(10)).await;
    let row = store.leader_get().await.unwrap().unwrap();
    assert_eq!(row.leader_id, ["a", "b"][first]);
    let leaving = fleet.remove(first);
    leaving.stop.cancel();
    leaving.task.await.unwrap();
    let (_, took) = one_leader(&fleet, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(5), "takeover took {took:?}");
    let next = store.leader_get().await.unwrap().unwrap();
    assert_eq!(next.term, row.term + 1);
    for running in fleet {
        running.stop.cancel();
        running.task.await.unwrap();
    }
}
