//! The `faultline` binary as a real process against real PostgreSQL: `worker` runs jobs woken by
//! `LISTEN`, gives leases back on SIGTERM and exits 0, waits for an unreachable database, refuses
//! an unmigrated one, dies by a `crash` job; `worker --print-config` honours the environment;
//! `dev` migrates and runs demo jobs on `DATABASE_URL` or on a private PostgreSQL it removes on
//! Ctrl-C.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use faultline_ports::JobStore;
use faultline_ports::domain::{JobSpec, JobState};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Longest wait for anything that must happen.
const DEADLINE: Duration = Duration::from_secs(60);

/// Pause between two looks at the database while polling for a state.
const POLL: Duration = Duration::from_millis(25);

/// A running `faultline` process with its output lines.
struct Process {
    child: Child,
    lines: mpsc::UnboundedReceiver<(&'static str, String)>,
    /// Every line read so far, for failure messages.
    seen: Vec<String>,
}

impl Process {
    /// Starts `faultline args` with only `env` from the Faultline settings (the test's own
    /// `DATABASE_URL` and `FAULTLINE_*` variables are removed).
    fn start(args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut command = Command::new(env!("CARGO_BIN_EXE_faultline"));
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env_remove("DATABASE_URL")
            .env("FAULTLINE_LOG_FORMAT", "text");
        for (name, _) in std::env::vars() {
            if name.starts_with("FAULTLINE_") && name != "FAULTLINE_LOG_FORMAT" {
                command.env_remove(name);
            }
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("spawn faultline");
        let (sender, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let out = sender.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = out.send(("stdout", line));
            }
        });
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = sender.send(("stderr", line));
            }
        });
        Process {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one contains `text`; returns it.
    async fn line_with(&mut self, text: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((stream, line))) => {
                    self.seen.push(format!("{stream}: {line}"));
                    if line.contains(text) {
                        return line;
                    }
                }
                Ok(None) => panic!("output ended without {text:?}:\n{}", self.seen.join("\n")),
                Err(_) => panic!("no {text:?} before the deadline:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Waits for the process to end; returns its status and all its output.
    async fn exit(mut self) -> (ExitStatus, String) {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running:\n{}", self.seen.join("\n")))
            .expect("wait");
        while let Some((stream, line)) = self.lines.recv().await {
            self.seen.push(format!("{stream}: {line}"));
        }
        (status, self.seen.join("\n"))
    }
}

async fn enqueue(pool: &PgPool, kind: &str, payload: Value) -> i64 {
    PgStore::new(pool.clone())
        .job_enqueue(&JobSpec::new(kind, payload))
        .await
        .expect("enqueue")
        .job
        .id
}

/// Polls the job until it is in `state`; returns it.
async fn wait_for_state(pool: &PgPool, id: i64, state: JobState) -> faultline_ports::domain::Job {
    let store = PgStore::new(pool.clone());
    let deadline = Instant::now() + DEADLINE;
    loop {
        let job = store.job_get(id).await.expect("job_get");
        if job.state == state {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} is {:?}, not {state:?}, at the deadline: {job:?}",
            job.state
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls until the worker's `LISTEN` connection is up on this database.
async fn wait_for_listener(pool: &PgPool) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let listening: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where application_name = $1 and datname = current_database()",
        )
        .bind(faultline_postgres::listen::APPLICATION_NAME)
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity");
        if listening > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no listener at the deadline");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn worker_runs_jobs_woken_by_notify_and_exits_0_on_sigterm() {
    let db = TestDb::fresh().await;
    // A poll interval of an hour: only the LISTEN wake-ups can start these jobs in time.
    let mut worker = Process::start(
        &["worker", "--demo-handlers", "--poll-interval", "1h"],
        &[("DATABASE_URL", db.url())],
    );
    worker.line_with("worker started").await;
    wait_for_listener(db.pool()).await;

    let noop = enqueue(db.pool(), "noop", json!({})).await;
    let sleep = enqueue(db.pool(), "sleep", json!({"ms": 10})).await;
    wait_for_state(db.pool(), noop, JobState::Succeeded).await;
    let slept = wait_for_state(db.pool(), sleep, JobState::Succeeded).await;
    assert_eq!(slept.result, Some(json!({"slept_ms": 10})));

    worker.signal("TERM");
    let (status, output) = worker.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("worker stopped"), "{output}");
}

#[tokio::test]
async fn sigterm_gives_the_leases_of_unfinished_jobs_back() {
    let db = TestDb::fresh().await;
    let mut worker = Process::start(
        &["worker", "--demo-handlers", "--shutdown-grace", "100ms"],
        &[("DATABASE_URL", db.url())],
    );
    worker.line_with("worker started").await;
    let id = enqueue(db.pool(), "sleep", json!({"ms": 3_600_000})).await;
    let running = wait_for_state(db.pool(), id, JobState::Running).await;
    assert_eq!(running.attempts, 1);

    worker.signal("TERM");
    let (status, output) = worker.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    // Given back at once (not left to expire), without using up the attempt.
    let job = PgStore::new(db.pool().clone()).job_get(id).await.unwrap();
    assert_eq!(job.state, JobState::Queued, "{job:?}\n{output}");
    assert_eq!(job.attempts, 0);
    assert_eq!(job.lease_expires_at, None);
}

#[tokio::test]
async fn worker_waits_for_an_unreachable_database_and_still_stops_cleanly() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = free.local_addr().expect("addr").port();
    drop(free);
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let mut worker = Process::start(
        &[
            "worker",
            "--demo-handlers",
            "--db-backoff-min",
            "20ms",
            "--db-backoff-max",
            "50ms",
        ],
        &[("DATABASE_URL", &url)],
    );
    // It keeps trying instead of exiting.
    for _ in 0..3 {
        worker.line_with("database unreachable; retrying").await;
    }
    worker.signal("TERM");
    let (status, output) = worker.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
}

#[tokio::test]
async fn worker_refuses_an_unmigrated_database() {
    let db = TestDb::fresh_unmigrated().await;
    let worker = Process::start(
        &["worker", "--demo-handlers"],
        &[("DATABASE_URL", db.url())],
    );
    let (status, output) = worker.exit().await;
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("run `faultline migrate`"), "{output}");
}

#[tokio::test]
async fn worker_without_handlers_says_how_to_get_some() {
    let worker = Process::start(
        &["worker"],
        &[("DATABASE_URL", "postgres://x@127.0.0.1:1/x")],
    );
    let (status, output) = worker.exit().await;
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("--http-endpoint"), "{output}");
}

#[tokio::test]
async fn a_crash_job_aborts_the_worker_process() {
    let db = TestDb::fresh().await;
    let id = enqueue(db.pool(), "crash", json!({})).await;
    let worker = Process::start(
        &["worker", "--demo-handlers"],
        &[("DATABASE_URL", db.url())],
    );
    let (status, output) = worker.exit().await;
    assert_eq!(
        status.signal(),
        Some(6),
        "SIGABRT expected: {status:?}\n{output}"
    );
    // The job is left running under the dead worker's lease, for the rescuer.
    let job = PgStore::new(db.pool().clone()).job_get(id).await.unwrap();
    assert_eq!(job.state, JobState::Running);
}

#[tokio::test]
async fn print_config_shows_what_the_environment_set() {
    let env = [
        ("DATABASE_URL", "postgres://x@127.0.0.1:1/x"),
        ("FAULTLINE_WORKER_ID", "w-env"),
        ("FAULTLINE_QUEUES", "a,b"),
        ("FAULTLINE_CONCURRENCY", "3"),
        ("FAULTLINE_LEASE", "1m"),
        ("FAULTLINE_HEARTBEAT_INTERVAL", "5s"),
        ("FAULTLINE_POLL_INTERVAL", "2s"),
        ("FAULTLINE_SHUTDOWN_GRACE", "9s"),
        ("FAULTLINE_COMPLETION_BATCH_SIZE", "4"),
        ("FAULTLINE_DB_BACKOFF_MIN", "10ms"),
        ("FAULTLINE_DB_BACKOFF_MAX", "2s"),
        ("FAULTLINE_STORE_TIMEOUT", "4s"),
        ("FAULTLINE_RESCUE_INTERVAL", "off"),
        ("FAULTLINE_RESCUE_BATCH_SIZE", "5"),
        ("FAULTLINE_PRUNE_INTERVAL", "10m"),
        ("FAULTLINE_RETAIN_SUCCEEDED", "1h"),
        ("FAULTLINE_RETAIN_FAILED", "2d"),
        ("FAULTLINE_RETAIN_CANCELLED", "3d"),
        ("FAULTLINE_PRUNE_BATCH_SIZE", "6"),
        ("FAULTLINE_POOL_SIZE", "7"),
        (
            "FAULTLINE_HTTP_ENDPOINTS",
            "mail=http://u:secret@127.0.0.1:9/send?k=1,hook=https://example.invalid/h",
        ),
        ("FAULTLINE_HTTP_TIMEOUT", "8s"),
        ("FAULTLINE_DEMO_HANDLERS", "true"),
    ];
    let process = Process::start(&["worker", "--print-config"], &env);
    let (status, output) = process.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    let printed: BTreeMap<&str, &str> = output
        .lines()
        .filter_map(|line| line.strip_prefix("stdout: "))
        .filter_map(|line| line.split_once(" = "))
        .collect();
    let expected: BTreeMap<&str, &str> = [
        ("worker_id", "w-env"),
        ("queues", "a,b"),
        ("concurrency", "3"),
        ("lease", "60s"),
        ("heartbeat_interval", "5s"),
        ("poll_interval", "2s"),
        ("shutdown_grace", "9s"),
        ("completion_batch_size", "4"),
        ("db_backoff_min", "10ms"),
        ("db_backoff_max", "2s"),
        ("store_timeout", "4s"),
        ("rescue_interval", "off"),
        ("rescue_batch_size", "5"),
        ("prune_interval", "600s"),
        ("retain_succeeded", "3600s"),
        ("retain_failed", "172800s"),
        ("retain_cancelled", "259200s"),
        ("prune_batch_size", "6"),
        ("pool_size", "7"),
        ("demo_handlers", "true"),
        (
            "http_endpoints",
            "mail=http://127.0.0.1:9/send,hook=https://example.invalid/h",
        ),
        ("http_timeout", "8s"),
    ]
    .into_iter()
    .collect();
    assert_eq!(printed, expected, "{output}");
}

#[tokio::test]
async fn the_log_format_comes_from_the_environment() {
    let env = [
        ("DATABASE_URL", "postgres://x@127.0.0.1:1/x"),
        ("FAULTLINE_LOG_FORMAT", "json"),
        ("FAULTLINE_DB_BACKOFF_MIN", "20ms"),
        ("FAULTLINE_DB_BACKOFF_MAX", "20ms"),
    ];
    let mut worker = Process::start(&["worker", "--demo-handlers"], &env);
    let line = worker.line_with("database unreachable").await;
    let event: Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(event["level"], "WARN", "{event}");
    assert_eq!(
        event["message"], "database unreachable; retrying",
        "{event}"
    );
    worker.signal("INT");
    let (status, output) = worker.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
}

#[tokio::test]
async fn dev_migrates_the_database_url_and_runs_demo_jobs() {
    let db = TestDb::fresh_unmigrated().await;
    let mut dev = Process::start(&["dev"], &[("DATABASE_URL", db.url())]);
    dev.line_with("faultline dev is running").await;

    let id = enqueue(db.pool(), "fail", json!({"times": 1, "delay_ms": 0})).await;
    let job = wait_for_state(db.pool(), id, JobState::Succeeded).await;
    assert_eq!(job.attempts, 2);

    dev.signal("INT");
    let (status, output) = dev.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
}

#[tokio::test]
async fn dev_without_a_database_url_runs_a_private_postgres_and_removes_it() {
    let mut dev = Process::start(&["dev"], &[]);
    dev.line_with("faultline dev is running").await;
    let line = dev.line_with("  database  ").await;
    let url = line
        .split_whitespace()
        .find(|word| word.starts_with("postgres://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    assert!(line.contains("private"), "{line}");

    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("connect to the private PostgreSQL");
    let id = enqueue(&pool, "noop", json!({})).await;
    wait_for_state(&pool, id, JobState::Succeeded).await;
    pool.close().await;

    dev.signal("INT");
    let (status, output) = dev.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(
        PgConnection::connect(&url).await.is_err(),
        "the private PostgreSQL still runs after dev stopped:\n{output}"
    );
}
