//! The `faultline` binary as a real process against real PostgreSQL: `worker` runs jobs woken by
//! `LISTEN`, gives leases back on SIGTERM and exits 0, waits for an unreachable database, refuses
//! an unmigrated one, dies by a `crash` job; `worker --print-config` and `api --print-config`
//! honour the environment; `api` serves jobs that a worker (or an HTTP client speaking the worker
//! protocol) completes, answers while its database is down or unmigrated and recovers when it is
//! back; `migrate` reports exactly what it applied, also when run concurrently; `dev` migrates,
//! runs demo jobs and serves the API on `DATABASE_URL` or on a private PostgreSQL it removes on
//! Ctrl-C. `worker` and `api` (and `dev`, on the API's port) serve `/metrics` with the counts of
//! what they did, in an exposition `promtool` accepts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use faultline_metrics::testing::{Exposition, assert_promtool_accepts_metrics};
use faultline_ports::JobStore;
use faultline_ports::domain::{JobSpec, JobState};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
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
        // Workers run side by side in these tests: no fixed metrics port (`env` may set one).
        command.env("FAULTLINE_METRICS_LISTEN", "127.0.0.1:0");
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

/// Where a started `faultline api` listens: its base URL, from its "HTTP API listening" log line.
async fn api_base(api: &mut Process) -> String {
    let line = api.line_with("HTTP API listening").await;
    let addr = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("addr=socket://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let addr: SocketAddr = addr.parse().expect("a socket address");
    format!("http://{addr}")
}

/// Where a started `faultline worker` serves `/metrics`, from its "metrics endpoint listening"
/// log line.
async fn metrics_url(worker: &mut Process) -> String {
    let line = worker.line_with("metrics endpoint listening").await;
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("url="))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned()
}

/// Polls `GET url` (a `/metrics` endpoint) until the sum of `name` over the series with `labels`
/// is at least `at_least`; returns that exposition text.
async fn wait_for_metric(
    client: &reqwest::Client,
    url: &str,
    name: &str,
    labels: &[(&str, &str)],
    at_least: f64,
) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = call(client, "GET", url, None, None).await;
        assert_eq!(reply.status, 200, "{url}: {reply:?}");
        let value = Exposition::parse(&reply.body).value(name, labels);
        if value >= at_least {
            return reply.body;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {value}, not {at_least}, at the deadline:\n{}",
            reply.body
        );
        tokio::time::sleep(POLL).await;
    }
}

/// An HTTP client for the API (plain http; the TLS provider is installed because reqwest is built
/// with rustls but without a default provider).
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .expect("HTTP client")
}

/// One HTTP response, read completely.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `method url` with an optional bearer token and JSON body.
async fn call(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = client.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.expect("body"),
    }
}

/// Polls `GET url` until it answers `status`; returns that reply.
async fn wait_for_status(client: &reqwest::Client, url: &str, status: u16) -> Reply {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = call(client, "GET", url, None, None).await;
        if reply.status == status {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "{url} answers {reply:?}, not {status}, at the deadline"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `GET /v1/jobs/{id}` until the job is in `state`; returns it.
async fn wait_for_api_state(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    id: i64,
    state: &str,
) -> Value {
    let url = format!("{base}/v1/jobs/{id}");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = call(client, "GET", &url, token, None).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let job = reply.json();
        if job["state"] == state {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} is not {state} at the deadline: {job}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A local port with nothing listening on it (free a moment ago).
fn closed_port() -> u16 {
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = free.local_addr().expect("addr").port();
    drop(free);
    port
}

/// `url` with its port replaced.
fn with_port(url: &str, port: u16) -> String {
    let mut url = reqwest::Url::parse(url).expect("a database URL");
    url.set_port(Some(port)).expect("set the port");
    url.to_string()
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
    let port = closed_port();
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
        ("FAULTLINE_QUEUES", "a,b=5"),
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
        ("FAULTLINE_MAINTENANCE", "off"),
        ("FAULTLINE_LEADER_LEASE", "9s"),
        ("FAULTLINE_ELECTION_INTERVAL", "2s"),
        ("FAULTLINE_PROCESS_HEARTBEAT", "4s"),
        ("FAULTLINE_PROCESS_EXPIRY", "40s"),
        ("FAULTLINE_POOL_SIZE", "7"),
        (
            "FAULTLINE_HTTP_ENDPOINTS",
            "mail=http://u:secret@127.0.0.1:9/send?k=1,hook=https://example.invalid/h",
        ),
        ("FAULTLINE_HTTP_TIMEOUT", "8s"),
        ("FAULTLINE_DEMO_HANDLERS", "true"),
        ("FAULTLINE_METRICS_LISTEN", "127.0.0.1:9999"),
        ("FAULTLINE_METRICS_SAMPLE_INTERVAL", "3s"),
        ("FAULTLINE_METRICS_MAX_LABEL_VALUES", "12"),
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
        ("queues", "a=3,b=5"),
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
        ("maintenance", "off"),
        ("leader_lease", "9s"),
        ("election_interval", "2s"),
        ("process_heartbeat", "4s"),
        ("process_expiry", "40s"),
        ("pool_size", "7"),
        ("demo_handlers", "true"),
        (
            "http_endpoints",
            "mail=http://127.0.0.1:9/send,hook=https://example.invalid/h",
        ),
        ("http_timeout", "8s"),
        ("metrics_listen", "127.0.0.1:9999"),
        ("metrics_sample_interval", "3s"),
        ("metrics_max_label_values", "12"),
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
async fn dev_migrates_the_database_url_runs_demo_jobs_and_serves_the_api() {
    let db = TestDb::fresh_unmigrated().await;
    let mut dev = Process::start(
        &["dev", "--listen", "127.0.0.1:0"],
        &[("DATABASE_URL", db.url())],
    );
    dev.line_with("faultline dev is running").await;
    let mut urls = BTreeMap::new();
    for name in ["api", "docs", "openapi", "health", "metrics"] {
        let line = dev.line_with(&format!("  {name:<8}  http://")).await;
        let url = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .to_owned();
        urls.insert(name, url);
    }
    let client = client();
    let health = call(&client, "GET", &urls["health"], None, None).await;
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.json()["database"], "up");
    let docs = call(&client, "GET", &urls["docs"], None, None).await;
    assert_eq!(docs.status, 200, "{docs:?}");
    assert!(
        docs.header("content-type")
            .is_some_and(|t| t.starts_with("text/html"))
    );
    assert!(docs.body.contains("swagger"), "{}", docs.body);
    let spec = call(&client, "GET", &urls["openapi"], None, None).await;
    assert_eq!(spec.json()["info"]["title"], "Faultline");

    // A job submitted over the API is run by the worker.
    let submitted = call(
        &client,
        "POST",
        &format!("{}/jobs", urls["api"]),
        None,
        Some(json!({"kind": "fail", "payload": {"times": 1, "delay_ms": 0}})),
    )
    .await;
    assert_eq!(submitted.status, 201, "{submitted:?}");
    let id = submitted.json()["id"].as_i64().expect("an id");
    let job = wait_for_state(db.pool(), id, JobState::Succeeded).await;
    assert_eq!(job.attempts, 2);
    // The API's /metrics shows the worker's metrics too (one recorder per process).
    let queue = [("queue", "default")];
    let text = wait_for_metric(
        &client,
        &urls["metrics"],
        "faultline_jobs_finished_total",
        &[
            ("queue", "default"),
            ("kind", "fail"),
            ("outcome", "succeeded"),
        ],
        1.0,
    )
    .await;
    let scrape = Exposition::parse(&text);
    assert_eq!(
        scrape.value("faultline_jobs_enqueued_total", &queue),
        1.0,
        "{text}"
    );
    assert_eq!(
        scrape.value("faultline_job_retries_total", &queue),
        1.0,
        "{text}"
    );

    dev.signal("INT");
    let (status, output) = dev.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("HTTP API stopped"), "{output}");
    assert!(output.contains("worker stopped"), "{output}");
}

#[tokio::test]
async fn dev_without_a_database_url_runs_a_private_postgres_and_removes_it() {
    let mut dev = Process::start(&["dev", "--listen", "127.0.0.1:0"], &[]);
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
    // The API and the worker stop before the database they use.
    let at = |text: &str| {
        output
            .find(text)
            .unwrap_or_else(|| panic!("no {text:?} in:\n{output}"))
    };
    assert!(
        at("HTTP API stopped") < at("private PostgreSQL stopped"),
        "{output}"
    );
    assert!(
        at("worker stopped") < at("private PostgreSQL stopped"),
        "{output}"
    );
    assert!(
        PgConnection::connect(&url).await.is_err(),
        "the private PostgreSQL still runs after dev stopped:\n{output}"
    );
}

#[tokio::test]
async fn api_serves_jobs_that_a_worker_completes_and_exits_0_on_sigterm() {
    let db = TestDb::fresh().await;
    let tokens = "tok-first-a1b2,tok-second-c3d4";
    let token = Some("tok-second-c3d4");
    let mut api = Process::start(
        &["api", "--listen", "127.0.0.1:0"],
        &[("DATABASE_URL", db.url()), ("FAULTLINE_API_TOKENS", tokens)],
    );
    let base = api_base(&mut api).await;
    let client = client();
    let health = wait_for_status(&client, &format!("{base}/health"), 200).await;
    assert_eq!(health.json(), json!({"status": "ok", "database": "up"}));

    // /v1 needs one of the tokens.
    let job = json!({"kind": "noop", "payload": {"to": "someone"}});
    let refused = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs"),
        None,
        Some(job.clone()),
    )
    .await;
    assert_eq!(refused.status, 401, "{refused:?}");
    assert!(refused.header("www-authenticate").is_some(), "{refused:?}");
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    let wrong = Some("tok-first");
    let refused = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs"),
        wrong,
        Some(job.clone()),
    )
    .await;
    assert_eq!(refused.status, 401, "{refused:?}");

    let created = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs"),
        token,
        Some(job),
    )
    .await;
    assert_eq!(created.status, 201, "{created:?}");
    let id = created.json()["id"].as_i64().expect("an id");
    assert_eq!(
        created.header("location"),
        Some(format!("/v1/jobs/{id}").as_str())
    );

    let worker = Process::start(
        &["worker", "--demo-handlers"],
        &[("DATABASE_URL", db.url())],
    );
    let done = wait_for_api_state(&client, &base, token, id, "succeeded").await;
    assert_eq!(done["attempts"], 1, "{done}");

    worker.signal("TERM");
    api.signal("TERM");
    let (status, output) = worker.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    let (status, output) = api.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("HTTP API stopped"), "{output}");
    assert!(!output.contains("tok-"), "a token was logged:\n{output}");
}

#[tokio::test]
async fn api_speaks_the_worker_protocol_with_wakeups_from_listen() {
    let db = TestDb::fresh().await;
    // Lease long-polls look for due jobs only every hour: only a LISTEN wake-up can end the
    // long-poll below in time.
    let mut api = Process::start(
        &[
            "api",
            "--listen",
            "127.0.0.1:0",
            "--lease-poll-interval",
            "1h",
        ],
        &[("DATABASE_URL", db.url())],
    );
    let base = api_base(&mut api).await;
    wait_for_listener(db.pool()).await;
    let client = client();

    let lease = {
        let client = client.clone();
        let url = format!("{base}/v1/leases");
        tokio::spawn(async move {
            let request = json!({
                "worker_id": "py-1",
                "queues": ["protocol"],
                "lease_seconds": 30,
                "wait_seconds": 30,
            });
            call(&client, "POST", &url, None, Some(request)).await
        })
    };
    let id = PgStore::new(db.pool().clone())
        .job_enqueue(&JobSpec::new("resize", json!({"w": 64})).queue("protocol"))
        .await
        .expect("enqueue")
        .job
        .id;
    let started = Instant::now();
    let leased = lease.await.expect("the lease request");
    assert_eq!(leased.status, 200, "{leased:?}");
    let jobs = leased.json()["jobs"].clone();
    assert_eq!(jobs[0]["id"], id, "{jobs}");
    assert!(started.elapsed() < Duration::from_secs(25), "no wake-up");
    let token = jobs[0]["lease_token"].as_i64().expect("a lease token");

    let url = |action: &str| format!("{base}/v1/jobs/{id}/{action}");
    let beat = call(
        &client,
        "POST",
        &url("heartbeat"),
        None,
        Some(json!({"lease_token": token, "extend_seconds": 60})),
    )
    .await;
    assert_eq!(beat.status, 200, "{beat:?}");
    assert_eq!(beat.json()["cancel_requested"], false);
    let done = call(
        &client,
        "POST",
        &url("complete"),
        None,
        Some(json!({"lease_token": token, "result": {"ok": true}})),
    )
    .await;
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(done.json()["state"], "succeeded");
    // A second completion with the same token is stale: nothing changes.
    let again = call(
        &client,
        "POST",
        &url("complete"),
        None,
        Some(json!({"lease_token": token})),
    )
    .await;
    assert_eq!(again.status, 409, "{again:?}");
    assert!(
        again.json()["type"]
            .as_str()
            .unwrap()
            .ends_with("/stale-lease")
    );

    api.signal("TERM");
    let (status, output) = api.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
}

/// Forwards every connection accepted on `listener` to `target` (a database that "comes back").
async fn forward(listener: TcpListener, target: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test]
async fn api_answers_while_its_database_is_down_and_recovers_when_it_is_back() {
    let db = TestDb::fresh().await;
    let port = closed_port();
    let url = with_port(db.url(), port);
    let mut api = Process::start(
        &["api", "--listen", "127.0.0.1:0", "--retry-after", "7s"],
        &[("DATABASE_URL", &url)],
    );
    let base = api_base(&mut api).await;
    api.line_with("database unreachable").await;
    let client = client();

    let started = Instant::now();
    let health = call(&client, "GET", &format!("{base}/health"), None, None).await;
    assert_eq!(health.status, 503, "{health:?}");
    assert_eq!(health.header("retry-after"), Some("7"));
    let body = health.json();
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["database"], "down", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("database"),
        "{body}"
    );

    let job = json!({"kind": "noop", "payload": {}});
    let refused = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs"),
        None,
        Some(job.clone()),
    )
    .await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("7"));
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    assert!(
        refused.json()["type"]
            .as_str()
            .unwrap()
            .ends_with("/storage-unavailable")
    );
    // Both answers came within the connection wait (3 s each), not after a hang.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    // The database comes back on that port.
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("rebind");
    let target = reqwest::Url::parse(db.url()).expect("URL");
    let target: SocketAddr = tokio::net::lookup_host((
        target.host_str().expect("host"),
        target.port().unwrap_or(5432),
    ))
    .await
    .expect("resolve")
    .next()
    .expect("an address");
    let proxy = tokio::spawn(forward(listener, target));

    wait_for_status(&client, &format!("{base}/health"), 200).await;
    let created = call(&client, "POST", &format!("{base}/v1/jobs"), None, Some(job)).await;
    assert_eq!(created.status, 201, "{created:?}");
    api.line_with("database ready").await;

    api.signal("TERM");
    let (status, output) = api.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    proxy.abort();
}

#[tokio::test]
async fn api_on_an_unmigrated_database_says_so_until_faultline_migrate_runs() {
    let db = TestDb::fresh_unmigrated().await;
    let mut api = Process::start(
        &["api", "--listen", "127.0.0.1:0"],
        &[("DATABASE_URL", db.url())],
    );
    let base = api_base(&mut api).await;
    api.line_with("run `faultline migrate`").await;
    let client = client();
    let health = call(&client, "GET", &format!("{base}/health"), None, None).await;
    assert_eq!(health.status, 503, "{health:?}");
    let detail = health.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains("not migrated") && detail.contains("faultline migrate"),
        "{detail}"
    );
    let job = json!({"kind": "noop", "payload": {}});
    let refused = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs"),
        None,
        Some(job.clone()),
    )
    .await;
    assert_eq!(refused.status, 503, "{refused:?}");
    // The API never migrates.
    assert!(!has_jobs_table(db.pool()).await);

    let migrate = Process::start(&["migrate"], &[("DATABASE_URL", db.url())]);
    let (status, output) = migrate.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    wait_for_status(&client, &format!("{base}/health"), 200).await;
    let created = call(&client, "POST", &format!("{base}/v1/jobs"), None, Some(job)).await;
    assert_eq!(created.status, 201, "{created:?}");

    api.signal("TERM");
    let (status, output) = api.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
}

async fn has_jobs_table(pool: &PgPool) -> bool {
    sqlx::query_scalar::<_, bool>("select to_regclass('faultline_jobs') is not null")
        .fetch_one(pool)
        .await
        .expect("to_regclass")
}

/// The migrations a `faultline migrate` output says it applied.
fn applied_in(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.strip_prefix("stdout: applied "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn migrate_reports_exactly_what_it_applied_even_when_run_concurrently() {
    let known: Vec<String> = faultline_postgres::MIGRATOR
        .iter()
        .map(|m| format!("{} {}", m.version, m.description))
        .collect();
    let db = TestDb::fresh_unmigrated().await;
    let runs: Vec<Process> = (0..4)
        .map(|_| Process::start(&["migrate"], &[("DATABASE_URL", db.url())]))
        .collect();
    let mut applied = Vec::new();
    let mut up_to_date = 0;
    for run in runs {
        let (status, output) = run.exit().await;
        assert_eq!(status.code(), Some(0), "{output}");
        applied.extend(applied_in(&output));
        up_to_date += usize::from(output.contains("stdout: database is up to date"));
    }
    // Each migration was applied, and reported, by exactly one of them.
    applied.sort();
    assert_eq!(applied, known);
    assert!(up_to_date >= 3, "{up_to_date}");
    assert!(has_jobs_table(db.pool()).await);

    let again = Process::start(&["migrate"], &[("DATABASE_URL", db.url())]);
    let (status, output) = again.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(applied_in(&output).is_empty(), "{output}");
    assert!(
        output.contains(&format!(
            "database is up to date ({} migrations)",
            known.len()
        )),
        "{output}"
    );
}

#[tokio::test]
async fn api_print_config_shows_what_the_environment_set() {
    let env = [
        ("DATABASE_URL", "postgres://x@127.0.0.1:1/x"),
        ("FAULTLINE_LISTEN", "127.0.0.1:9090"),
        (
            "FAULTLINE_API_TOKENS",
            "very-secret-1,very-secret-2,very-secret-3",
        ),
        ("FAULTLINE_MAX_BODY_BYTES", "2000"),
        ("FAULTLINE_MAX_PAYLOAD_BYTES", "1000"),
        ("FAULTLINE_REQUEST_TIMEOUT", "4s"),
        ("FAULTLINE_RETRY_AFTER", "2s"),
        ("FAULTLINE_LEASE_POLL_INTERVAL", "500ms"),
        ("FAULTLINE_API_SHUTDOWN_GRACE", "3s"),
        ("FAULTLINE_HEADER_READ_TIMEOUT", "7s"),
        ("FAULTLINE_IDLE_TIMEOUT", "45s"),
        ("FAULTLINE_MAX_CONNECTIONS", "900"),
        ("FAULTLINE_API_POOL_SIZE", "5"),
        ("FAULTLINE_LEADER_LEASE", "30s"),
        ("FAULTLINE_RESCUE_INTERVAL", "2s"),
        ("FAULTLINE_METRICS_SAMPLE_INTERVAL", "off"),
        ("FAULTLINE_METRICS_MAX_LABEL_VALUES", "9"),
    ];
    let process = Process::start(&["api", "--print-config"], &env);
    let (status, output) = process.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(!output.contains("very-secret"), "{output}");
    let printed: BTreeMap<&str, &str> = output
        .lines()
        .filter_map(|line| line.strip_prefix("stdout: "))
        .filter_map(|line| line.split_once(" = "))
        .collect();
    let expected: BTreeMap<&str, &str> = [
        ("listen", "127.0.0.1:9090"),
        ("api_tokens", "3 configured"),
        ("max_body_bytes", "2000"),
        ("max_payload_bytes", "1000"),
        ("request_timeout", "4s"),
        ("retry_after", "2s"),
        ("lease_poll_interval", "500ms"),
        ("api_shutdown_grace", "3s"),
        ("header_read_timeout", "7s"),
        ("idle_timeout", "45s"),
        ("max_connections", "900"),
        ("api_pool_size", "5"),
        ("metrics_sample_interval", "off"),
        ("metrics_max_label_values", "9"),
        ("maintenance", "on"),
        ("leader_lease", "30s"),
        ("election_interval", "10s"),
        ("process_heartbeat", "10s"),
        ("process_expiry", "60s"),
        ("rescue_interval", "2s"),
        ("rescue_batch_size", "1000"),
        ("prune_interval", "60s"),
        ("retain_succeeded", "86400s"),
        ("retain_failed", "604800s"),
        ("retain_cancelled", "604800s"),
        ("prune_batch_size", "1000"),
    ]
    .into_iter()
    .collect();
    assert_eq!(printed, expected, "{output}");
}

#[tokio::test]
async fn api_refuses_a_taken_address_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let api = Process::start(
        &["api", "--listen", &addr],
        &[("DATABASE_URL", "postgres://x@127.0.0.1:1/x")],
    );
    let (status, output) = api.exit().await;
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains(&format!("listen on {addr}")), "{output}");
    drop(taken);
}

#[tokio::test]
async fn worker_and_api_serve_metrics_that_promtool_accepts() {
    let db = TestDb::fresh().await;
    let mut api = Process::start(
        &["api", "--listen", "127.0.0.1:0"],
        &[
            ("DATABASE_URL", db.url()),
            ("FAULTLINE_METRICS_SAMPLE_INTERVAL", "100ms"),
        ],
    );
    let base = api_base(&mut api).await;
    let mut worker = Process::start(
        &["worker", "--demo-handlers", "--queues", "mail"],
        &[
            ("DATABASE_URL", db.url()),
            ("FAULTLINE_METRICS_SAMPLE_INTERVAL", "100ms"),
        ],
    );
    let worker_metrics = metrics_url(&mut worker).await;
    let client = client();
    wait_for_status(&client, &format!("{base}/health"), 200).await;

    let created = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs"),
        None,
        Some(json!({"kind": "noop", "payload": {}, "queue": "mail"})),
    )
    .await;
    assert_eq!(created.status, 201, "{created:?}");
    let id = created.json()["id"].as_i64().expect("an id");
    wait_for_state(db.pool(), id, JobState::Succeeded).await;

    let worker_text = wait_for_metric(
        &client,
        &worker_metrics,
        "faultline_jobs_finished_total",
        &[
            ("queue", "mail"),
            ("kind", "noop"),
            ("outcome", "succeeded"),
        ],
        1.0,
    )
    .await;
    let scrape = Exposition::parse(&worker_text);
    assert_eq!(
        scrape.value("faultline_jobs_claimed_total", &[("queue", "mail")]),
        1.0,
        "{worker_text}"
    );
    assert_eq!(
        scrape.value("faultline_jobs_enqueued_total", &[]),
        0.0,
        "the worker enqueued nothing:\n{worker_text}"
    );
    let api_text = wait_for_metric(
        &client,
        &format!("{base}/metrics"),
        "faultline_jobs_enqueued_total",
        &[("queue", "mail"), ("kind", "noop")],
        1.0,
    )
    .await;
    let scrape = Exposition::parse(&api_text);
    assert!(
        scrape.has(
            "faultline_http_requests_total",
            &[("method", "POST"), ("route", "/v1/jobs"), ("status", "201")]
        ),
        "{api_text}"
    );
    // The maintenance leader (one of the two) samples queue depth from the database, the other
    // shows none: a job in a queue no worker serves.
    let parked = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs"),
        None,
        Some(json!({"kind": "noop", "payload": {}, "queue": "parked"})),
    )
    .await;
    assert_eq!(parked.status, 201, "{parked:?}");
    let queued = [("queue", "parked"), ("state", "queued")];
    let urls = [worker_metrics.clone(), format!("{base}/metrics")];
    let deadline = Instant::now() + DEADLINE;
    let (leader, other) = loop {
        let mut scrapes = Vec::new();
        for url in &urls {
            let reply = call(&client, "GET", url, None, None).await;
            assert_eq!(reply.status, 200, "{url}: {reply:?}");
            scrapes.push(reply.body);
        }
        let sampled =
            |text: &str| Exposition::parse(text).value("faultline_queue_depth", &queued) >= 1.0;
        match (sampled(&scrapes[0]), sampled(&scrapes[1])) {
            (true, false) => break (scrapes.remove(0), scrapes.remove(0)),
            (false, true) => break (scrapes.remove(1), scrapes.remove(0)),
            (both, _) => assert!(
                !both && Instant::now() < deadline,
                "exactly one process (the leader) shows the queue depth:\n{}\n---\n{}",
                scrapes[0],
                scrapes[1]
            ),
        }
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(
        Exposition::parse(&leader).value("faultline_leader", &[]),
        1.0,
        "the process showing queue depth leads:\n{leader}"
    );
    assert!(
        !other.contains("faultline_queue_depth"),
        "a process that does not lead shows no queue depth:\n{other}"
    );

    assert_promtool_accepts_metrics(&worker_text);
    assert_promtool_accepts_metrics(&api_text);

    worker.signal("TERM");
    api.signal("TERM");
    let (status, output) = worker.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    let (status, output) = api.exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
}

#[tokio::test]
async fn worker_refuses_a_taken_metrics_address_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let worker = Process::start(
        &["worker", "--demo-handlers", "--metrics-listen", &addr],
        &[("DATABASE_URL", "postgres://x@127.0.0.1:1/x")],
    );
    let (status, output) = worker.exit().await;
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains(&format!("listen on {addr} (--metrics-listen")),
        "{output}"
    );
    drop(taken);
}
