//! The shared completer: the producers of a process (one worker per queue) hand it their
//! outcomes, it writes them in statements shared across producers and answers each producer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use faultline_ports::domain::{JobSpec, JobState};
use faultline_ports::{JobStore, MockJobStore, WriteOutcome};
use faultline_worker::{Completer, CompleterConfig, Outcome, Registry, Worker, WorkerConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::{
    backend, config, done, enqueue, eventually, handler, memory, running_job, t0,
};

fn producer(queue: &str, worker_id: &str) -> WorkerConfig {
    WorkerConfig {
        queues: vec![queue.to_owned()],
        ..config(worker_id)
    }
}

#[tokio::test(start_paused = true)]
async fn two_producers_writes_go_in_one_statement_and_each_hears_its_own_answers() {
    let mut store = MockJobStore::new();
    store.expect_job_claim().returning(|params| {
        let id = if params.queues == ["a"] { 1 } else { 2 };
        Ok(vec![running_job(id, "k", t0())])
    });
    let batches = Arc::new(Mutex::new(Vec::<Vec<i64>>::new()));
    let seen = batches.clone();
    store.expect_job_complete_many().returning(move |batch| {
        let mut seen = seen.lock().unwrap();
        seen.push(batch.iter().map(|(lease, _)| lease.job_id).collect());
        if seen.len() == 1 {
            Err(backend())
        } else {
            Ok(vec![WriteOutcome::Accepted; batch.len()])
        }
    });
    let store = Arc::new(store);
    let completer = Completer::new(store.clone(), CompleterConfig::of(&config("w")));
    let mut registry = Registry::new();
    registry.register("k", handler(|_| async { done() }));
    let mut a = Worker::new(store.clone(), registry.clone(), producer("a", "w-a"))
        .unwrap()
        .with_completer(completer.clone());
    let mut b = Worker::new(store.clone(), registry, producer("b", "w-b"))
        .unwrap()
        .with_completer(completer.clone());

    // A's completion cannot be written: it waits in the shared completer.
    let report = a.run_once().await.unwrap();
    assert_eq!((report.claimed, report.pending_writes), (1, 1));
    assert_eq!(report.counts.db_errors, 1);
    assert_eq!(completer.pending(), 1);

    // B's step writes both, in one statement, and hears only its own answer.
    let report = b.run_once().await.unwrap();
    assert_eq!(
        *batches.lock().unwrap(),
        vec![vec![1], vec![1, 2]],
        "the retry of A's write and B's write share one statement"
    );
    assert_eq!((report.counts.completed, report.pending_writes), (1, 0));
    assert_eq!(b.stats().counters().db_errors, 0, "B's writes never failed");

    // A takes its answer at its next step.
    let report = a.flush().await;
    assert_eq!((report.counts.completed, report.pending_writes), (1, 0));
    assert_eq!((a.leases_held(), b.leases_held()), (0, 0));
    assert_eq!(completer.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn producers_sharing_a_running_completer_finish_every_job_of_their_queues() {
    let (store, _clock) = memory();
    let mut ids = Vec::new();
    for n in 0..40 {
        let queue = if n % 2 == 0 { "a" } else { "b" };
        let spec = JobSpec {
            queue: queue.to_owned(),
            ..JobSpec::new("echo", json!({ "n": n }))
        };
        ids.push(enqueue(&*store, spec).await);
    }
    let mut registry = Registry::new();
    registry.register(
        "echo",
        handler(|ctx| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Outcome::Complete(Some(ctx.payload))
        }),
    );
    let completer = Completer::new(store.clone(), CompleterConfig::of(&config("w")));
    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(completer.clone().run(stop_writing.clone()));
    let stop = CancellationToken::new();
    let mut running = Vec::new();
    for queue in ["a", "b"] {
        let mut worker = Worker::new(
            store.clone(),
            registry.clone(),
            producer(queue, &format!("w-{queue}")),
        )
        .unwrap()
        .with_completer(completer.clone());
        let token = stop.clone();
        running.push(tokio::spawn(async move {
            let report = worker.run(token).await;
            (worker.stats().counters(), report)
        }));
    }
    let check = store.clone();
    let all = ids.clone();
    eventually("every job succeeded", Duration::from_secs(60), || {
        let (store, ids) = (check.clone(), all.clone());
        async move {
            for id in ids {
                if store.job_get(id).await.unwrap().state != JobState::Succeeded {
                    return false;
                }
            }
            true
        }
    })
    .await;
    stop.cancel();
    for task in running {
        let (counters, report) = task.await.unwrap();
        assert_eq!(counters.completed, 20, "each producer heard of its 20 jobs");
        assert_eq!((counters.writes_dropped, report.interrupted), (0, 0));
    }
    stop_writing.cancel();
    writer.await.unwrap();
    for (n, id) in ids.into_iter().enumerate() {
        let job = store.job_get(id).await.unwrap();
        assert_eq!(job.result, Some(json!({ "n": n })));
        let owner = if n % 2 == 0 { "w-a" } else { "w-b" };
        assert_eq!(job.lease_owner.as_deref(), Some(owner));
    }
}
