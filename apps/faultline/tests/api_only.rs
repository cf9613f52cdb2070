//! HTTP-only deployments recover: with only `faultline api` running (no `faultline worker`), or
//! only `faultline dev` (whose own worker serves other queues), a job leased over HTTP whose
//! client vanished is rescued by the process's maintenance (back to `queued`, the attempt
//! counted, an `errors` entry of kind `lease_expired`) and can be leased again; a finished job is
//! pruned after its retention; and an operator can end a lease at once with
//! `POST /v1/jobs/{id}/expire-lease`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use faultline_tests::TestDb;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Longest wait for anything that must happen.
const DEADLINE: Duration = Duration::from_secs(60);

/// Pause between two looks while polling for a state.
const POLL: Duration = Duration::from_millis(25);

/// The queue the HTTP client leases from (`dev`'s own worker serves `default` only).
const QUEUE: &str = "http-only";

/// Maintenance as fast as the tests need it: a short leadership, a rescue and a prune every
/// 200 ms, succeeded jobs kept for 1 ms.
const MAINTENANCE: [&str; 8] = [
    "--leader-lease",
    "2s",
    "--rescue-interval",
    "200ms",
    "--prune-interval",
    "200ms",
    "--retain-succeeded",
    "1ms",
];

/// A running `faultline` process with its output lines.
struct Process {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Process {
    /// Starts `faultline args` on the database `url` (the test's own `FAULTLINE_*` variables
    /// are removed).
    fn start(args: &[&str], url: &str) -> Process {
        let mut command = Command::new(env!("CARGO_BIN_EXE_faultline"));
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, _) in std::env::vars() {
            if name.starts_with("FAULTLINE_") {
                command.env_remove(name);
            }
        }
        command
            .env("DATABASE_URL", url)
            .env("FAULTLINE_LOG_FORMAT", "text")
            .env("FAULTLINE_METRICS_LISTEN", "127.0.0.1:0");
        let mut child = command.spawn().expect("spawn faultline");
        let (sender, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let out = sender.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = out.send(line);
            }
        });
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = sender.send(line);
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
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Ok(None) => panic!("output ended without {text:?}:\n{}", self.seen.join("\n")),
                Err(_) => panic!("no {text:?} before the deadline:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// SIGTERM, then waits for the exit; asserts exit code 0.
    async fn stop(mut self) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("exits before the deadline")
            .expect("wait");
        while let Some(line) = self.lines.recv().await {
            self.seen.push(line);
        }
        assert_eq!(status.code(), Some(0), "{}", self.seen.join("\n"));
    }
}

/// `faultline api`'s base URL, from its "HTTP API listening" log line.
async fn api_base(api: &mut Process) -> String {
    let line = api.line_with("HTTP API listening").await;
    let addr = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("addr=socket://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let addr: SocketAddr = addr.parse().expect("a socket address");
    format!("http://{addr}")
}

/// `faultline dev`'s base URL, from its "  api  http://.../v1" line.
async fn dev_base(dev: &mut Process) -> String {
    dev.line_with("faultline dev is running").await;
    let line = dev.line_with(&format!("  {:<8}  http://", "api")).await;
    let url = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no URL in {line:?}"));
    url.strip_suffix("/v1")
        .unwrap_or_else(|| panic!("not an /v1 URL: {url}"))
        .to_owned()
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .expect("HTTP client")
}

/// `method base+path` with an optional JSON body; returns the status and the body as JSON
/// (`Null` when it is not JSON).
async fn call(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Polls `GET /v1/jobs/{id}` until `done` holds for it (or it is gone, when `done` accepts
/// `None`); returns the last answer.
async fn wait_for_job(
    client: &reqwest::Client,
    base: &str,
    id: i64,
    what: &str,
    done: impl Fn(Option<&Value>) -> bool,
) -> Option<Value> {
    let url = format!("{base}/v1/jobs/{id}");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, job) = call(client, "GET", &url, None).await;
        let job = match status {
            200 => Some(job),
            404 => None,
            other => panic!("GET {url}: {other} {job}"),
        };
        if done(job.as_ref()) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} is not {what} at the deadline: {job:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Leases up to one job of [`QUEUE`] for `lease_seconds` as `worker_id`, waiting up to 10 s.
async fn lease(client: &reqwest::Client, base: &str, worker_id: &str, lease_seconds: f64) -> Value {
    let (status, grant) = call(
        client,
        "POST",
        &format!("{base}/v1/leases"),
        Some(
            json!({"worker_id": worker_id, "queues": [QUEUE], "limit": 1,
            "lease_seconds": lease_seconds, "wait_seconds": 10}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{grant}");
    let jobs = grant["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "{grant}");
    jobs[0].clone()
}

/// The scenario, on a process serving the API at `base`: a vanished client's lease is rescued,
/// the job is leased again and completed, then pruned; an operator expires a long lease at once.
async fn http_only_deployment_recovers(base: &str, role: &str) {
    let client = client();
    let (status, job) = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs"),
        Some(
            json!({"kind": "resize", "queue": QUEUE, "payload": {"w": 64}, "max_attempts": 3,
            "backoff": {"base_seconds": 0.01, "cap_seconds": 0.01, "jitter": 0.0}}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_i64().expect("an id");

    // A client leases the job for 1 s and vanishes.
    let leased = lease(&client, base, "vanishing-client", 1.0).await;
    assert_eq!(
        (leased["id"].as_i64(), leased["attempt"].as_i64()),
        (Some(id), Some(1))
    );

    // The process's maintenance rescues it: queued again, the attempt counted.
    let rescued = wait_for_job(&client, base, id, "rescued", |job| {
        job.is_some_and(|job| job["state"] == "queued")
    })
    .await
    .expect("the job");
    assert_eq!(rescued["attempts"], 1, "{rescued}");
    let errors = rescued["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{rescued}");
    assert_eq!(errors[0]["kind"], "lease_expired", "{rescued}");
    assert_eq!(errors[0]["worker"], "vanishing-client", "{rescued}");
    assert_eq!(errors[0]["attempt"], 1, "{rescued}");
    assert_eq!(
        errors[0]["fencing_token"], leased["lease_token"],
        "{rescued}"
    );

    // This process leads the maintenance.
    let (status, workers) = call(&client, "GET", &format!("{base}/v1/workers"), None).await;
    assert_eq!(status, 200, "{workers}");
    let leader = workers["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["leader"] == true)
        .unwrap_or_else(|| panic!("no leader: {workers}"));
    assert_eq!(leader["role"], role, "{workers}");

    // The stale holder is refused; a new client leases the job (attempt 2) and completes it.
    let (status, refused) = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs/{id}/complete"),
        Some(json!({"lease_token": leased["lease_token"]})),
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(
        refused["type"],
        "https://faultline.dev/problems/stale-lease"
    );
    let again = lease(&client, base, "second-client", 30.0).await;
    assert_eq!(
        (again["id"].as_i64(), again["attempt"].as_i64()),
        (Some(id), Some(2))
    );
    let (status, done) = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs/{id}/complete"),
        Some(json!({"lease_token": again["lease_token"]})),
    )
    .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "succeeded", "{done}");
    // Retained for 1 ms: the pruner deletes it.
    wait_for_job(&client, base, id, "pruned", |job| job.is_none()).await;

    // A lease of a year held by a vanished client: the operator ends it now.
    let (status, job) = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs"),
        Some(json!({"kind": "resize", "queue": QUEUE, "payload": {"w": 32}, "max_attempts": 1})),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_i64().expect("an id");
    let long = lease(&client, base, "gone-for-a-year", 365.0 * 86_400.0).await;
    assert_eq!(long["id"].as_i64(), Some(id));
    let (status, expired) = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs/{id}/expire-lease"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{expired}");
    assert_eq!(
        expired["state"], "failed",
        "its only attempt is spent: {expired}"
    );
    assert_eq!(expired["errors"][0]["kind"], "lease_expired", "{expired}");
    assert_eq!(
        expired["errors"][0]["worker"], "gone-for-a-year",
        "{expired}"
    );
    let (status, refused) = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs/{id}/heartbeat"),
        Some(json!({"lease_token": long["lease_token"], "extend_seconds": 30})),
    )
    .await;
    assert_eq!(status, 409, "the holder's lease is gone: {refused}");
    let (status, again) = call(
        &client,
        "POST",
        &format!("{base}/v1/jobs/{id}/expire-lease"),
        None,
    )
    .await;
    assert_eq!(status, 409, "not running any more: {again}");
    assert_eq!(
        again["type"],
        "https://faultline.dev/problems/illegal-transition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_only_deployment_rescues_prunes_and_expires_leases() {
    let db = TestDb::fresh().await;
    let mut args = vec!["api", "--listen", "127.0.0.1:0"];
    args.extend(MAINTENANCE);
    let mut api = Process::start(&args, db.url());
    let base = api_base(&mut api).await;
    http_only_deployment_recovers(&base, "api").await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_only_deployment_rescues_prunes_and_expires_leases() {
    let db = TestDb::fresh().await;
    let mut args = vec!["dev", "--listen", "127.0.0.1:0"];
    args.extend(MAINTENANCE);
    let mut dev = Process::start(&args, db.url());
    let base = dev_base(&mut dev).await;
    http_only_deployment_recovers(&base, "dev").await;
    dev.stop().await;
}
