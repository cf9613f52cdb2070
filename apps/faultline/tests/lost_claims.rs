//! A claim whose answer is lost costs no attempt: `faultline worker` runs with a 1 s store
//! timeout while another session holds `LOCK TABLE faultline_jobs IN ACCESS EXCLUSIVE MODE` for
//! 4 s. The jobs (one attempt each) wait in a paused queue that is resumed once the lock is
//! held, so the worker's next claims (woken by the resume) block behind the lock and time out;
//! once the lock is gone they commit anyway, leasing jobs to a worker that never got the answer.
//! (The worker, on a pool of one connection, first runs a few hundred jobs so that its
//! connection has the claim statement prepared: a claim on a connection that still has to
//! prepare it waits for the statement's description before sending it, so when that times out
//! nothing was sent. Even so, not every round loses a claim; the fault is repeated until one
//! did, and the test fails if none did.) The worker gives those jobs back by claim id (attempt
//! returned) instead of leaving them to expire and be rescued as failed attempts: every job must
//! succeed on its first and only attempt.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faultline_ports::domain::{JobSpec, JobState};
use faultline_ports::{JobStore, ListParams};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

const JOBS: usize = 60;
const WARM_UP: usize = 300;
/// A claim blocked behind the lock is lost only when its statement was already sent (most
/// rounds); the fault is repeated until one was.
const ROUNDS: usize = 5;

/// Polls until the store holds `n` jobs, all finished; returns them.
async fn wait_until_finished(store: &PgStore, n: usize) -> Vec<faultline_ports::domain::Job> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = store
            .job_list(&ListParams {
                limit: 1_000,
                ..ListParams::default()
            })
            .await
            .expect("list");
        if page.jobs.len() == n && page.jobs.iter().all(|job| job.state.is_terminal()) {
            return page.jobs;
        }
        assert!(Instant::now() < deadline, "jobs unfinished after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_that_time_out_behind_a_table_lock_cost_no_attempt() {
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());
    let specs = |n: usize, tag: &str| -> Vec<JobSpec> {
        (0..n)
            .map(|i| JobSpec {
                max_attempts: 1,
                ..JobSpec::new("noop", json!({ tag: i }))
            })
            .collect()
    };
    store
        .job_enqueue_many(&specs(WARM_UP, "warm-up"))
        .await
        .expect("enqueue");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args([
            "worker",
            "--demo-handlers",
            "--concurrency",
            "4",
            "--lease",
            "10s",
            "--store-timeout",
            "1s",
            "--poll-interval",
            "100ms",
            "--db-backoff-max",
            "500ms",
            "--metrics-listen",
            "off",
            "--leader-lease",
            "3s",
            "--rescue-interval",
            "500ms",
            "--pool-size",
            "1",
        ])
        .env("DATABASE_URL", db.url())
        .env("FAULTLINE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn faultline worker");

    let log = Arc::new(Mutex::new(String::new()));
    let stderr = worker.stderr.take().expect("stderr");
    let lines = log.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let mut log = lines.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let given_back = || {
        log.lock()
            .unwrap()
            .contains("gave back the jobs of a claim whose answer was lost")
    };

    // The warm-up: every job done, so the connection has prepared the claim.
    wait_until_finished(&store, WARM_UP).await;
    let mut total = WARM_UP;
    // The fault, up to ROUNDS times until a claim's answer was lost: a table lock held for 4 s
    // (four store timeouts). The queue opens while it is held (the queue rows are another
    // table), so the claims blocked behind the lock are the ones that lease the jobs.
    for _ in 0..ROUNDS {
        store.queue_pause("default").await.expect("pause");
        store
            .job_enqueue_many(&specs(JOBS, &format!("round-{total}")))
            .await
            .expect("enqueue");
        total += JOBS;
        let mut tx = db.pool().begin().await.expect("begin");
        sqlx::query("lock table faultline_jobs in access exclusive mode")
            .execute(&mut *tx)
            .await
            .expect("lock");
        store.queue_resume("default").await.expect("resume");
        tokio::time::sleep(Duration::from_secs(4)).await;
        tx.commit().await.expect("commit");
        wait_until_finished(&store, total).await;
        if given_back() {
            break;
        }
    }

    let jobs = wait_until_finished(&store, total).await;
    let _ = worker.start_kill();
    let _ = worker.wait().await;
    let log = log.lock().unwrap().clone();
    let failed: Vec<_> = jobs
        .iter()
        .filter(|job| job.state != JobState::Succeeded || !job.errors.is_empty())
        .map(|job| (job.id, job.state, job.last_error.clone()))
        .collect();
    assert!(
        failed.is_empty(),
        "lost claims cost attempts: {failed:?}\nworker log:\n{log}"
    );
    assert!(jobs.iter().all(|job| job.attempts == 1));
    assert!(
        log.contains("store call failed: claim")
            && log.contains("gave back the jobs of a claim whose answer was lost"),
        "in {ROUNDS} rounds the fault never lost a claim's answer (nothing was proven):\n{log}"
    );
}
