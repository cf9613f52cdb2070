//! A worker whose wall clock is wrong loses nothing: `faultline worker` runs under libfaketime
//! (Debian's `faketime` package) one hour ahead and one hour behind the database, with short
//! leases, short jobs (so that claimed jobs wait in the local buffer) and one attempt per job:
//! every job must succeed on its first attempt. Lease deadlines in the worker come from the
//! database's answer measured on the monotonic clock, never from comparing a database timestamp
//! with the worker's wall clock.
//!
//! The test fails, saying so, when libfaketime is not installed (`apt-get install faketime`; CI
//! installs it): a skipped proof must not look like a passed one.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use faultline_ports::JobStore;
use faultline_ports::domain::{JobSpec, JobState};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use serde_json::json;
use tokio::process::Command;
use tokio::time::Instant;

/// Where Debian's `faketime` package puts the preload library.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

const JOBS: usize = 300;

fn libfaketime() -> &'static str {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "libfaketime is missing ({LIBFAKETIME}): install Debian's `faketime` package \
         (apt-get install faketime) to run the clock-skew tests; they did NOT run"
    );
    LIBFAKETIME
}

/// Runs one worker whose wall clock is `offset` (libfaketime syntax: `+1h`, `-1h`) away from
/// the database's, until every job finished; checks each succeeded on its first attempt.
async fn a_skewed_worker_loses_nothing(offset: &str) {
    let preload = libfaketime();
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());
    let specs: Vec<JobSpec> = (0..JOBS)
        .map(|i| JobSpec {
            max_attempts: 1,
            ..JobSpec::new("noop", json!({ "i": i }))
        })
        .collect();
    store.job_enqueue_many(&specs).await.expect("enqueue");

    let mut worker = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args([
            "worker",
            "--demo-handlers",
            "--concurrency",
            "4",
            "--lease",
            "3s",
            "--poll-interval",
            "100ms",
            "--metrics-listen",
            "off",
            "--leader-lease",
            "3s",
            "--rescue-interval",
            "500ms",
        ])
        .env("DATABASE_URL", db.url())
        .env("LD_PRELOAD", preload)
        .env("FAKETIME", offset)
        // Only the wall clock is wrong (as with a broken NTP); monotonic clocks have no epoch.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("FAULTLINE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn faultline worker");

    let deadline = Instant::now() + Duration::from_secs(120);
    let finished = loop {
        let stats = store.queue_stats().await.expect("stats");
        let counts = stats.first().map(|q| {
            (
                q.count(JobState::Succeeded),
                q.count(JobState::Failed),
                q.count(JobState::Queued) + q.count(JobState::Running),
            )
        });
        if let Some((succeeded, failed, 0)) = counts {
            break (succeeded, failed);
        }
        assert!(
            Instant::now() < deadline,
            "jobs still unfinished after 120 s with the worker's clock at {offset}: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = worker.start_kill();
    let output = worker.wait_with_output().await.expect("worker output");
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        finished,
        (JOBS as i64, 0),
        "with the worker's clock at {offset}, every job must succeed on its only attempt; \
         worker log:\n{log}"
    );
    let page = store
        .job_list(&faultline_ports::ListParams {
            limit: 1_000,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(
        page.jobs
            .iter()
            .all(|job| job.attempts == 1 && job.errors.is_empty()),
        "a job ran more than once or failed an attempt with the clock at {offset}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_one_hour_ahead_loses_nothing() {
    a_skewed_worker_loses_nothing("+1h").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_one_hour_behind_loses_nothing() {
    a_skewed_worker_loses_nothing("-1h").await;
}
