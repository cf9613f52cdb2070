//! The five workloads, each measured on a fresh database, as the peers' harness measures them
//! (`shared/bench-peers/lib/common.mjs`): the same payloads, the same start and stop points of
//! the clock, `CHECKPOINT` and the quiet gate right before each timed window, CPU accounting
//! during it. Every function returns one [`Sample`] (one repetition).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use faultline_ports::JobStore;
use faultline_ports::domain::JobSpec;
use faultline_postgres::PgStore;
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::Settings;
use super::db::{self, BenchDb, KIND};
use super::machine::{self, Cores, Scope, Snapshot};
use super::procs::{self, Faultline};
use super::stats::percentile;

/// One repetition of one measurement.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// The measured values, by metric (one for throughputs, four for W3).
    pub(crate) values: Vec<(&'static str, f64)>,
    /// Cores used during the timed window.
    pub(crate) cores: Cores,
    /// How long the quiet gate waited, and whether the machine was quiet then.
    pub(crate) quiet_wait_s: f64,
    pub(crate) quiet: bool,
    /// Load average (1, 5, 15 min) when the window opened.
    pub(crate) load: [f64; 3],
    /// Context (startup time, the database's own view of the window, ...).
    pub(crate) extra: Map<String, Value>,
}

/// How long a `faultline` process gets to start or to stop.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a workload needs.
pub(crate) struct Bench<'a> {
    pub(crate) settings: &'a Settings,
    pub(crate) bin: PathBuf,
}

/// An open timed window: what the machine looked like when it opened.
struct Window {
    scope: Scope,
    start: Snapshot,
    quiet_wait_s: f64,
    quiet: bool,
    load: [f64; 3],
}

impl Window {
    /// `CHECKPOINT`, then the quiet gate, then the CPU snapshot: call right before the clock
    /// starts.
    async fn open(
        bench: &Bench<'_>,
        pool: &PgPool,
        db: &BenchDb,
        what: &str,
    ) -> anyhow::Result<Self> {
        db::execute(pool, "checkpoint").await?;
        let s = bench.settings;
        let (quiet_wait_s, quiet) =
            machine::wait_quiet(what, s.quiet_cores, Duration::from_secs(s.quiet_max_s)).await;
        let scope = Scope {
            database: db.name.clone(),
            children: Vec::new(),
        };
        Ok(Window {
            start: scope.snapshot(),
            scope,
            quiet_wait_s,
            quiet,
            load: machine::load_average(),
        })
    }

    /// Cores used since the window opened, counting `children` as the benchmark's.
    fn close(
        mut self,
        children: &[u32],
        values: Vec<(&'static str, f64)>,
        extra: Map<String, Value>,
    ) -> Sample {
        self.scope.children = children.to_vec();
        let cores = machine::cores_between(&self.start, &self.scope.snapshot());
        Sample {
            values,
            cores,
            quiet_wait_s: self.quiet_wait_s,
            quiet: self.quiet,
            load: self.load,
            extra,
        }
    }
}

fn db_name(tag: &str, rep: usize) -> String {
    format!("{}{tag}_{rep}_{}", db::PREFIX, std::process::id())
}

/// Runs `body` on a fresh database named after `tag` and `rep`, dropping it afterwards.
async fn with_fresh_db<F, Fut>(
    bench: &Bench<'_>,
    tag: &str,
    rep: usize,
    body: F,
) -> anyhow::Result<Sample>
where
    F: FnOnce(BenchDb) -> Fut,
    Fut: Future<Output = (BenchDb, anyhow::Result<Sample>)>,
{
    let db = BenchDb::fresh(&bench.settings.database_url, &db_name(tag, rep)).await?;
    let (db, result) = body(db).await;
    if let Err(error) = db.drop_now().await {
        eprintln!("bench: WARNING could not drop the benchmark database: {error:#}");
    }
    result
}

async fn queued(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("select count(*) from faultline_jobs where state = 'queued'")
            .fetch_one(pool)
            .await?,
    )
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

// ----- W1 --------------------------------------------------------------------------------------

/// A W1 measurement on a fresh database: `n` jobs enqueued by `enqueue` (timed), all of them
/// queued afterwards.
async fn insert(
    bench: &Bench<'_>,
    rep: usize,
    (metric, tag): (&'static str, &str),
    n: usize,
    enqueue: impl AsyncFn(&PgStore) -> anyhow::Result<()>,
) -> anyhow::Result<Sample> {
    with_fresh_db(bench, tag, rep, |db| async move {
        let result = async {
            let pool = db.pool(1).await?;
            let store = PgStore::new(pool.clone());
            let window = Window::open(bench, &pool, &db, metric).await?;
            let started = Instant::now();
            enqueue(&store).await?;
            let elapsed = started.elapsed();
            let sample = window.close(&[], vec![(metric, rate(n, elapsed))], Map::new());
            ensure!(
                queued(&pool).await? == n as i64,
                "{metric}: not every job is queued"
            );
            pool.close().await;
            Ok(sample)
        }
        .await;
        (db, result)
    })
    .await
}

/// W1 `insert_batch`: `jobs` no-op jobs in sequential batch enqueues of `batch`.
pub(crate) async fn insert_batch(bench: &Bench<'_>, rep: usize) -> anyhow::Result<Sample> {
    let s = bench.settings;
    insert(bench, rep, ("insert_batch", "ib"), s.jobs, async |store| {
        db::preload(store, s.jobs, s.batch).await
    })
    .await
}

/// W1 `insert_single`: `single_jobs` jobs, one enqueue call each, each awaited before the next.
pub(crate) async fn insert_single(bench: &Bench<'_>, rep: usize) -> anyhow::Result<Sample> {
    let s = bench.settings;
    insert(
        bench,
        rep,
        ("insert_single", "is"),
        s.single_jobs,
        async |store| {
            for n in 0..s.single_jobs {
                store.job_enqueue(&db::spec(n)).await.context("enqueue")?;
            }
            Ok(())
        },
    )
    .await
}

// ----- W2 and W4 -------------------------------------------------------------------------------

/// The `faultline worker` command line of the benchmark.
fn worker_args(bench: &Bench<'_>, db: &BenchDb) -> Vec<String> {
    let s = bench.settings;
    let mut args: Vec<String> = [
        "worker",
        "--database-url",
        &db.url,
        "--demo-handlers",
        "--concurrency",
        &s.concurrency.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    args.extend(s.worker_args.iter().cloned());
    args
}

/// Polls [`db::unfinished`] until it is zero: every 5 ms near the end (as the peers do once
/// their handler count is reached), every 20 ms while more than 100 are queued.
async fn wait_until_finished(pool: &PgPool, timeout: Duration) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = db::unfinished(&mut conn).await?;
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{left} jobs still unfinished after {timeout:?}");
        }
        let pause = if left > 100 { 20 } else { 5 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// W2 `drain` (`history == 0`) and W4 `history_drain`: `jobs` queued no-op jobs (preloaded by
/// batch enqueue, then `VACUUM ANALYZE`; W4 first inserts `history` succeeded jobs), one
/// `faultline worker` process with the configured concurrency. The clock runs from spawning the
/// process until the database reports no job queued or running.
pub(crate) async fn drain(bench: &Bench<'_>, rep: usize, history: usize) -> anyhow::Result<Sample> {
    let (tag, metric) = if history == 0 {
        ("dr", "drain")
    } else {
        ("hd", "history_drain")
    };
    with_fresh_db(bench, tag, rep, |db| async move {
        let result = async {
            let s = bench.settings;
            let pool = db.pool(2).await?;
            let store = PgStore::new(pool.clone());
            if history > 0 {
                db::insert_history(&pool, history).await?;
            }
            db::preload(&store, s.jobs, s.batch).await?;
            db::execute(&pool, "vacuum analyze").await?;
            let window = Window::open(bench, &pool, &db, metric).await?;
            let db_start: DateTime<Utc> = sqlx::query_scalar("select clock_timestamp()")
                .fetch_one(&pool)
                .await?;
            let started = Instant::now();
            let worker = Faultline::start(
                &bench.bin,
                &worker_args(bench, &db),
                &[("FAULTLINE_LOG", "warn")],
            )?;
            let finished = wait_until_finished(&pool, Duration::from_secs(s.timeout_s)).await;
            let elapsed = started.elapsed();
            let pid = worker.pid();
            let values = vec![(metric, rate(s.jobs, elapsed))];
            let mut sample = window.close(&[pid], values, Map::new());
            worker.stop(PROCESS_TIMEOUT).await?;
            finished?;
            let (succeeded, retried, db_window) = db::drain_facts(&pool).await?;
            ensure!(
                succeeded == s.jobs as i64,
                "{metric}: {succeeded} of {} jobs succeeded",
                s.jobs
            );
            let first_claim: Option<DateTime<Utc>> = sqlx::query_scalar(
                "select min(started_at) from faultline_jobs where lease_owner <> 'history'",
            )
            .fetch_one(&pool)
            .await?;
            let startup_ms = first_claim
                .map(|t| (t - db_start).num_microseconds().unwrap_or(0) as f64 / 1000.0)
                .unwrap_or(f64::NAN);
            // Start-up (spawn to first claim) and the database's own view of the drain.
            let extra = &mut sample.extra;
            extra.insert("startup_ms".into(), json!(round(startup_ms, 1)));
            extra.insert(
                "first_claim_to_last_finish_rate".into(),
                json!(round(s.jobs as f64 / db_window, 1)),
            );
            extra.insert("jobs_retried".into(), json!(retried));
            pool.close().await;
            Ok(sample)
        }
        .await;
        (db, result)
    })
    .await
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let scale = 10_f64.powi(digits);
    (x * scale).round() / scale
}

// ----- W3 --------------------------------------------------------------------------------------

/// The wall-clock time and job id of a worker's "job started" JSON log line.
pub(crate) fn job_started(line: &str) -> Option<(i64, DateTime<Utc>)> {
    let value: Value = serde_json::from_str(line).ok()?;
    if value.get("message")?.as_str()? != "job started" {
        return None;
    }
    let id = value.get("job_id")?.as_i64()?;
    let at = DateTime::parse_from_rfc3339(value.get("timestamp")?.as_str()?).ok()?;
    Some((id, at.with_timezone(&Utc)))
}

/// W3 `latency`: an idle worker; `lat_jobs` jobs enqueued one call at a time on a fixed schedule
/// of `lat_rate` per second. Per job: from the enqueue call's return (wall clock, this process) to
/// the handler's start (the wall-clock timestamp of the worker's "job started" log line, written
/// when the job's task is spawned; both processes read the same system clock).
pub(crate) async fn latency(bench: &Bench<'_>, rep: usize) -> anyhow::Result<Sample> {
    with_fresh_db(bench, "lat", rep, |db| async move {
        let result = async {
            let s = bench.settings;
            let pool = db.pool(1).await?;
            let store = PgStore::new(pool.clone());
            let mut worker = Faultline::start(
                &bench.bin,
                &worker_args(bench, &db),
                &[
                    // "job started" comes from `claims` (from `worker` before the runtime
                    // became services: kept so that older builds can be measured too).
                    (
                        "FAULTLINE_LOG",
                        "warn,faultline_worker::claims=debug,faultline_worker::worker=debug",
                    ),
                    ("FAULTLINE_LOG_FORMAT", "json"),
                ],
            )?;
            // The worker says nothing at warn level until it runs jobs: give it the idle time,
            // as the peers do, then make sure it is alive.
            tokio::time::sleep(Duration::from_millis(s.lat_idle_ms)).await;
            let window = Window::open(bench, &pool, &db, "latency").await?;
            let interval = Duration::from_secs_f64(1.0 / s.lat_rate as f64);
            let mut returned: HashMap<i64, (usize, DateTime<Utc>)> =
                HashMap::with_capacity(s.lat_jobs);
            let mut started_at: HashMap<i64, DateTime<Utc>> = HashMap::with_capacity(s.lat_jobs);
            let t0 = tokio::time::Instant::now();
            for n in 0..s.lat_jobs {
                tokio::time::sleep_until(t0 + interval * n as u32).await;
                let spec = JobSpec::new(KIND, json!({"n": n, "t": Utc::now().timestamp_millis()}));
                let job = store.job_enqueue(&spec).await.context("enqueue")?.job;
                returned.insert(job.id, (n, Utc::now()));
                while let Ok(line) = worker.lines.try_recv() {
                    if let Some((id, at)) = job_started(&line) {
                        started_at.insert(id, at);
                    }
                }
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(s.timeout_s);
            while started_at.len() < s.lat_jobs {
                match tokio::time::timeout_at(deadline, worker.lines.recv()).await {
                    Ok(Some(line)) => {
                        if let Some((id, at)) = job_started(&line) {
                            started_at.insert(id, at);
                        }
                    }
                    Ok(None) => bail!("the worker exited during the latency run"),
                    Err(_) => bail!(
                        "only {} of {} jobs started in time",
                        started_at.len(),
                        s.lat_jobs
                    ),
                }
            }
            let pid = worker.pid();
            let mut latencies = Vec::with_capacity(s.lat_jobs);
            for (id, (_, back)) in &returned {
                let start = started_at
                    .get(id)
                    .with_context(|| format!("job {id} never started"))?;
                latencies
                    .push((*start - *back).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0);
            }
            let values = vec![
                ("latency_p50", percentile(&latencies, 50.0)),
                ("latency_p95", percentile(&latencies, 95.0)),
                ("latency_p99", percentile(&latencies, 99.0)),
                ("latency_max", percentile(&latencies, 100.0)),
            ];
            let mut extra = Map::new();
            extra.insert(
                "latency_min".into(),
                json!(round(percentile(&latencies, 0.0), 3)),
            );
            let sample = window.close(&[pid], values, extra);
            wait_until_finished(&pool, Duration::from_secs(s.timeout_s)).await?;
            worker.stop(PROCESS_TIMEOUT).await?;
            pool.close().await;
            Ok(sample)
        }
        .await;
        (db, result)
    })
    .await
}

// ----- W5 --------------------------------------------------------------------------------------

/// A running `faultline api` and a client for it.
struct Api {
    process: Faultline,
    base: String,
    client: reqwest::Client,
}

impl Api {
    async fn start(bench: &Bench<'_>, db: &BenchDb) -> anyhow::Result<Api> {
        let port = procs::free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let args: Vec<String> = ["api", "--database-url", &db.url, "--listen", &listen]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        let mut process =
            Faultline::start(&bench.bin, &args, &[("FAULTLINE_LOG", "info,sqlx=warn")])?;
        process.line_with("database ready", PROCESS_TIMEOUT).await?;
        // Building a client needs a TLS provider even for plain HTTP (see CONTEXT gotchas).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder().build()?;
        let base = format!("http://{listen}");
        let health = client.get(format!("{base}/health")).send().await?;
        ensure!(
            health.status().is_success(),
            "/health answered {}",
            health.status()
        );
        Ok(Api {
            process,
            base,
            client,
        })
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        post(&self.client, &format!("{}{path}", self.base), body).await
    }
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body)?)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let bytes = response.bytes().await?;
    ensure!(
        status.is_success(),
        "POST {url}: {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(serde_json::from_slice(&bytes)?)
}

fn new_job(n: usize) -> Value {
    json!({"kind": KIND, "payload": {"n": n}})
}

/// Which W5 measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Http {
    /// `jobs` jobs in `POST /v1/jobs/batch` calls of `batch`, one after the other.
    InsertBatch,
    /// `single_jobs` `POST /v1/jobs`, `clients` at a time (1: each awaited before the next).
    InsertSingle { clients: usize },
    /// `jobs` preloaded jobs drained by a client of the worker protocol with `concurrency` slots.
    Drain,
}

/// W5: the HTTP API (`faultline api`, started untimed on the fresh database).
pub(crate) async fn http(bench: &Bench<'_>, rep: usize, which: Http) -> anyhow::Result<Sample> {
    let tag = match which {
        Http::InsertBatch => "hib",
        Http::InsertSingle { .. } => "his",
        Http::Drain => "hdr",
    };
    with_fresh_db(bench, tag, rep, |db| async move {
        let result = async {
            let s = bench.settings;
            let pool = db.pool(2).await?;
            if which == Http::Drain {
                db::preload(&PgStore::new(pool.clone()), s.jobs, s.batch).await?;
                db::execute(&pool, "vacuum analyze").await?;
            }
            let api = Api::start(bench, &db).await?;
            let window = Window::open(bench, &pool, &db, tag).await?;
            let started = Instant::now();
            let (metric, n) = match which {
                Http::InsertBatch => {
                    let mut next = 0;
                    while next < s.jobs {
                        let end = (next + s.batch).min(s.jobs);
                        let jobs: Vec<Value> = (next..end).map(new_job).collect();
                        api.post("/v1/jobs/batch", &json!({ "jobs": jobs })).await?;
                        next = end;
                    }
                    ("http_insert_batch", s.jobs)
                }
                Http::InsertSingle { clients } => {
                    let next = Arc::new(AtomicUsize::new(0));
                    let mut tasks = JoinSet::new();
                    for _ in 0..clients {
                        let (client, url, next) = (
                            api.client.clone(),
                            format!("{}/v1/jobs", api.base),
                            next.clone(),
                        );
                        let total = s.single_jobs;
                        tasks.spawn(async move {
                            loop {
                                let n = next.fetch_add(1, Ordering::Relaxed);
                                if n >= total {
                                    return anyhow::Ok(());
                                }
                                post(&client, &url, &new_job(n)).await?;
                            }
                        });
                    }
                    while let Some(done) = tasks.join_next().await {
                        done??;
                    }
                    let metric = if clients == 1 {
                        "http_insert_single"
                    } else {
                        "http_insert_single_concurrent"
                    };
                    (metric, s.single_jobs)
                }
                Http::Drain => {
                    http_drain(&api, s.jobs, s.concurrency).await?;
                    wait_until_finished(&pool, Duration::from_secs(s.timeout_s)).await?;
                    ("http_drain", s.jobs)
                }
            };
            let elapsed = started.elapsed();
            let sample = window.close(
                &[api.process.pid()],
                vec![(metric, rate(n, elapsed))],
                Map::new(),
            );
            match which {
                Http::Drain => {
                    let (succeeded, _, _) = db::drain_facts(&pool).await?;
                    ensure!(
                        succeeded == n as i64,
                        "http_drain: {succeeded} of {n} succeeded"
                    );
                }
                _ => ensure!(
                    queued(&pool).await? == n as i64,
                    "{metric}: not every job is queued"
                ),
            }
            api.process.stop(PROCESS_TIMEOUT).await?;
            pool.close().await;
            Ok(sample)
        }
        .await;
        (db, result)
    })
    .await
}

/// Drains `n` jobs through the worker protocol with `slots` jobs in flight: one loop leases up
/// to the free slots (`POST /v1/leases`), each leased job is completed by its own request
/// (`POST /v1/jobs/{id}/complete` with its lease token), which frees its slot.
async fn http_drain(api: &Api, n: usize, slots: usize) -> anyhow::Result<()> {
    let free = Arc::new(Semaphore::new(slots));
    let mut completions = JoinSet::new();
    let mut leased = 0;
    while leased < n {
        let permit = free.clone().acquire_many_owned(1).await?;
        let limit = 1 + free.available_permits();
        let mut permit = permit;
        if let Ok(more) = free
            .clone()
            .try_acquire_many_owned(u32::try_from(limit - 1)?)
        {
            permit.merge(more);
        }
        let limit = permit.num_permits();
        let grant = api
            .post(
                "/v1/leases",
                &json!({"worker_id": "bench-http", "queues": ["default"], "limit": limit}),
            )
            .await?;
        let jobs = grant["jobs"]
            .as_array()
            .context("lease grant without jobs")?;
        if jobs.is_empty() {
            drop(permit);
            // Everything is leased and in flight (or the queue is empty): wait for a completion.
            match completions.join_next().await {
                Some(done) => done??,
                None => bail!("the queue is empty after {leased} of {n} jobs"),
            }
            continue;
        }
        for job in jobs {
            let id = job["id"].as_i64().context("job id")?;
            let token = job["lease_token"].as_i64().context("lease token")?;
            let slot = permit.split(1).context("a permit per leased job")?;
            let client = api.client.clone();
            let url = format!("{}/v1/jobs/{id}/complete", api.base);
            completions.spawn(async move {
                post(&client, &url, &json!({"lease_token": token})).await?;
                drop(slot);
                anyhow::Ok(())
            });
        }
        leased += jobs.len();
        while let Some(done) = completions.try_join_next() {
            done??;
        }
    }
    while let Some(done) = completions.join_next().await {
        done??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_started_lines_give_the_job_and_the_time() {
        let line = r#"{"timestamp":"2026-11-25T16:30:00.123456Z","level":"DEBUG","job_id":42,"kind":"noop","attempt":1,"fencing_token":1,"message":"job started","target":"faultline_worker::worker"}"#;
        let (id, at) = job_started(line).expect("parsed");
        assert_eq!(id, 42);
        assert_eq!(at.timestamp_subsec_micros(), 123_456);
        assert_eq!(
            job_started(&line.replace("job started", "outcome written")),
            None
        );
        assert_eq!(job_started("not json"), None);
    }
}
