//! One producer per queue: `faultline worker --queues big=2,small=1` runs each queue with its
//! own slots, and a backlog in one queue does not hold up another: the small queue's jobs,
//! enqueued behind the big queue's backlog, finish while that backlog is still being worked.
//! Slots bound the handlers running at once; a job whose handler has returned stays `running` in
//! the database until its outcome is written, so the leases of a queue (sampled from the
//! database) stay within twice its slots, and reach its slots.

use std::process::Stdio;
use std::time::Duration;

use faultline_ports::JobStore;
use faultline_ports::domain::{JobSpec, JobState};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use serde_json::json;
use tokio::process::Command;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_queue_runs_with_its_own_slots_and_no_backlog_holds_up_another() {
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());
    let sleep = |queue: &str, ms: u64| JobSpec::new("sleep", json!({ "ms": ms })).queue(queue);
    let big: Vec<JobSpec> = (0..40).map(|_| sleep("big", 200)).collect();
    store.job_enqueue_many(&big).await.expect("enqueue big");
    let small: Vec<JobSpec> = (0..5).map(|_| sleep("small", 50)).collect();
    store.job_enqueue_many(&small).await.expect("enqueue small");

    let mut worker = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args([
            "worker",
            "--demo-handlers",
            "--queues",
            "big=2,small=1",
            "--poll-interval",
            "100ms",
            "--metrics-listen",
            "off",
        ])
        .env("DATABASE_URL", db.url())
        .env("FAULTLINE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn faultline worker");

    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut most_big, mut most_small) = (0, 0);
    let mut small_done_with_big_left = None;
    loop {
        let backlog = store.queue_backlog().await.expect("backlog");
        let running = |queue: &str| {
            backlog
                .iter()
                .find(|b| b.queue == queue)
                .map_or(0, |b| b.running)
        };
        most_big = most_big.max(running("big"));
        most_small = most_small.max(running("small"));
        let stats = store.queue_stats().await.expect("stats");
        let done = |queue: &str| {
            stats
                .iter()
                .find(|s| s.queue == queue)
                .map_or(0, |s| s.count(JobState::Succeeded))
        };
        if done("small") == 5 && small_done_with_big_left.is_none() {
            small_done_with_big_left = Some(40 - done("big"));
        }
        if done("big") == 40 && done("small") == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "jobs unfinished after 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = worker.start_kill();
    let _ = worker.wait().await;
    assert!(
        most_big <= 4 && most_small <= 2,
        "leases beyond twice a queue's slots: big {most_big} (2 slots), small {most_small} (1)"
    );
    assert!(most_big >= 2, "the big queue never used both its slots");
    let left = small_done_with_big_left.expect("small finished");
    assert!(
        left >= 20,
        "the small queue waited for the big queue's backlog: only {left} big jobs were left"
    );
}
