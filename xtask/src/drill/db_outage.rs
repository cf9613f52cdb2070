//! `db-outage`: under steady submission through the API and steady processing, the drill's own
//! private PostgreSQL is stopped for about ten seconds and started again. The API answers 503 in
//! time (no crash, no hang), `/health` reports down then up, the workers reconnect by themselves,
//! and every job the API acknowledged (201/200) completes.

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use faultline_ports::telemetry::names;
use faultline_postgres::cluster::{PrivateCluster, find_bin_dir};
use serde_json::{Value, json};

use super::checks::{succeeded_with_effect, summary};
use super::db::{BACKOFF, DrillDb};
use super::fleet::{LEASE, WorkerSpec};
use super::ledger::{KIND, Sink, payload};
use super::probe::{Background, http_client, wait_for};
use super::{Ctx, Drill, Report, SLACK};

pub(crate) const DRILL: Drill = Drill {
    name: "db-outage",
    proves: "with PostgreSQL stopped and started again, the API answers 503 in time and its \
             health goes down then up, workers reconnect by themselves, and every acknowledged \
             job completes",
    run: |ctx| Box::pin(run(ctx)),
};

/// The API's `--request-timeout`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The API's documented wait for a pool connection (`faultline api`): the other bound of a 503.
const POOL_WAIT: Duration = Duration::from_secs(3);
/// Pause between two submissions (the steady load).
const SUBMIT_EVERY: Duration = Duration::from_millis(50);
/// Pause between two health probes.
const HEALTH_EVERY: Duration = Duration::from_millis(100);
/// Shortest and longest job (long enough that the outage catches jobs in flight).
const JOB_MS: (u64, u64) = (200, 800);

/// One answer of the API (or the lack of one).
#[derive(Debug, Clone)]
struct Answer {
    at: Instant,
    /// The HTTP status; `None` when the request failed (no connection, timeout).
    status: Option<u16>,
    latency: Duration,
    error: Option<String>,
}

/// What the submitter saw.
#[derive(Debug, Default)]
struct Submissions {
    answers: Vec<Answer>,
    /// Acknowledged jobs: (id, when).
    acked: Vec<(i64, Instant)>,
}

async fn run(ctx: Ctx) -> anyhow::Result<Report> {
    let warm = Duration::from_secs(ctx.pick(2, 3));
    let outage = Duration::from_secs(10);
    let after = Duration::from_secs(ctx.pick(3, 5));
    let spec = WorkerSpec::new(8, LEASE);

    let cluster = tokio::task::spawn_blocking(PrivateCluster::start)
        .await?
        .context("start the drill's private PostgreSQL")?;
    let cluster = ClusterGuard(Some(cluster));
    let db = DrillDb::create(&cluster.get().url(), ctx.name).await?;
    let sink = Sink::start().await?;
    let mut fleet = ctx.fleet(db.url())?;
    let (api, base) = fleet
        .api(
            "api",
            &[
                "--request-timeout",
                "2s",
                "--retry-after",
                "1s",
                "--api-pool-size",
                "4",
            ],
        )
        .await?;
    let workers = [
        fleet.worker("o1", &spec, &sink)?,
        fleet.worker("o2", &spec, &sink)?,
    ];
    for id in workers {
        fleet.ready(id).await?;
    }
    // A request that takes longer than this is a hang.
    let latency_bound = REQUEST_TIMEOUT.max(POOL_WAIT) + SLACK;
    let client = http_client(latency_bound + Duration::from_secs(10))?;
    let health_url = format!("{base}/health");
    wait_for("the API is healthy", Duration::from_secs(30), async || {
        let status = client.get(&health_url).send().await?.status().as_u16();
        Ok(if status == 200 {
            Ok(())
        } else {
            Err(format!("{status}"))
        })
    })
    .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let submissions = Arc::new(Mutex::new(Submissions::default()));
    let health = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let submitter = Background::spawn(submit(
        client.clone(),
        format!("{base}/v1/jobs"),
        stop.clone(),
        submissions.clone(),
    ));
    let prober = Background::spawn(probe_health(
        client.clone(),
        health_url,
        stop.clone(),
        health.clone(),
    ));

    tokio::time::sleep(warm).await; // the scenario: steady load before the outage
    let stopped_at = Instant::now();
    let running: i64 = db.states().await?.get("running").copied().unwrap_or(0);
    pg_ctl(cluster.get(), "stop").await?;
    ctx.progress(format!(
        "PostgreSQL stopped ({running} jobs running); keeping it down for {outage:?}"
    ));
    tokio::time::sleep(outage.saturating_sub(stopped_at.elapsed())).await;
    pg_ctl(cluster.get(), "start").await?;
    let restarted_at = Instant::now();
    ctx.progress(format!(
        "PostgreSQL started again after {:.1}s",
        restarted_at.duration_since(stopped_at).as_secs_f64()
    ));

    // Recovery: every job acknowledged before the restart has completed.
    let acked_before: Vec<i64> = lock(&submissions)
        .acked
        .iter()
        .filter(|(_, at)| *at < restarted_at)
        .map(|(id, _)| *id)
        .collect();
    let bound = spec.db_backoff_max
        + spec.lease
        + spec.requeue_bound()
        + Duration::from_millis(JOB_MS.1)
        + SLACK;
    let settled = wait_for(
        "the jobs acknowledged before the restart complete",
        bound + Duration::from_secs(60),
        async || {
            let left: i64 = sqlx::query_scalar(
                "select count(*) from faultline_jobs where id = any($1) and state <> 'succeeded'",
            )
            .bind(&acked_before)
            .fetch_one(db.pool())
            .await?;
            Ok(if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} not done"))
            })
        },
    )
    .await;
    let mut report = Report::default();
    match settled {
        Ok(()) => report.recovery(
            &format!(
                "{} jobs acknowledged before the restart done",
                acked_before.len()
            ),
            restarted_at.elapsed(),
            bound,
        ),
        Err(error) => report.check(
            "the jobs acknowledged before the restart complete",
            false,
            format!("{error:#}"),
        ),
    }

    tokio::time::sleep(after.saturating_sub(restarted_at.elapsed())).await; // steady load after
    stop.store(true, Ordering::Relaxed);
    submitter.join().await?;
    prober.join().await?;
    let states = db.settled(Duration::from_secs(60)).await?;
    ctx.progress(format!(
        "settled: {:?}",
        states.as_ref().unwrap_or_else(|s| s)
    ));

    let submissions = std::mem::take(&mut *lock(&submissions));
    let health = std::mem::take(&mut *lock(&health));
    let during = |a: &Answer| a.at >= stopped_at && a.at < restarted_at;

    // The API: 503 during the outage, never another error, never a hang, never a crash.
    let refused = submissions
        .answers
        .iter()
        .filter(|a| during(a) && a.status == Some(503))
        .count();
    report.check(
        "the API answered 503 during the outage",
        refused > 0,
        format!("{refused} submissions refused with 503 during the outage"),
    );
    let odd: Vec<String> = submissions
        .answers
        .iter()
        .chain(&health)
        .filter(|a| !matches!(a.status, Some(200 | 201 | 503)))
        .map(|a| format!("{:?} {:?}", a.status, a.error))
        .collect();
    report.check(
        "every answer was 200, 201 or 503 (no other error, no dropped connection)",
        odd.is_empty(),
        summary(submissions.answers.len() + health.len(), "were", &odd),
    );
    let slowest = submissions
        .answers
        .iter()
        .chain(&health)
        .map(|a| a.latency)
        .max()
        .unwrap_or_default();
    report.check(
        "no request hung past the API's timeouts",
        slowest <= latency_bound,
        format!("slowest answer {slowest:?}, bound {latency_bound:?}"),
    );
    report.check(
        "the API process is still running",
        fleet.try_exit(api)?.is_none(),
        "no crash",
    );
    let statuses = |from: Instant, to: Instant| -> Vec<u16> {
        health
            .iter()
            .filter(|a| a.at >= from && a.at < to)
            .filter_map(|a| a.status)
            .collect()
    };
    let (before, down, up) = (
        statuses(stopped_at - warm, stopped_at),
        statuses(stopped_at, restarted_at),
        statuses(restarted_at, Instant::now()),
    );
    report.check(
        "/health said up, then down during the outage, then up again",
        before.contains(&200) && down.contains(&503) && up.last() == Some(&200),
        format!(
            "before: {} x 200; during: {} x 503 of {}; after: last {:?}",
            before.iter().filter(|s| **s == 200).count(),
            down.iter().filter(|s| **s == 503).count(),
            down.len(),
            up.last()
        ),
    );

    // The workers: alive, saw the outage, reconnected.
    let mut reconnected = Vec::new();
    for id in workers {
        let alive = fleet.try_exit(id)?.is_none();
        let m = fleet.scrape(id).await?;
        let (up, errors) = (
            m.value(names::DB_UP, &[]),
            m.value(names::DB_ERRORS_TOTAL, &[]),
        );
        if !(alive && up == 1.0 && errors > 0.0) {
            reconnected.push(format!(
                "{}: alive {alive}, db_up {up}, db errors {errors}",
                fleet.name(id)
            ));
        }
    }
    report.check(
        "the workers saw the outage (database errors) and reconnected by themselves (db_up 1)",
        reconnected.is_empty(),
        summary(workers.len(), "did", &reconnected),
    );

    // The jobs: every acknowledged one completed; nothing exists that was not acknowledged.
    let ids: Vec<i64> = submissions.acked.iter().map(|(id, _)| *id).collect();
    let rows = db.jobs().await?;
    let ledger = sink.ledger();
    report.jobs = ids.len();
    report.lost = succeeded_with_effect(&mut report, &rows, &ledger, &ids);
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    report.check(
        "one job per acknowledged key, and no job that was not acknowledged",
        unique.len() == ids.len() && rows.len() == ids.len(),
        format!(
            "{} acknowledgements, {} distinct jobs, {} jobs in the database",
            ids.len(),
            unique.len(),
            rows.len()
        ),
    );
    let replays = submissions
        .answers
        .iter()
        .filter(|a| a.status == Some(200))
        .count();
    report.note(format!(
        "{} submissions, {refused} refused with 503 during the outage, {replays} answered 200 \
         (a retried key whose job existed); {running} jobs were running at the stop",
        submissions.answers.len()
    ));
    report.repeated = ledger.repeated(|_| 1);
    report.stale_rejected = Some(fleet.stale_rejected().await?);
    drop(fleet);
    drop(db);
    drop(cluster);
    Ok(report)
}

/// Submits a job every [`SUBMIT_EVERY`] until `stop`, retrying a refused submission with its
/// idempotency key until it is acknowledged (and after `stop`, until the last one is).
async fn submit(
    client: reqwest::Client,
    url: String,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Submissions>>,
) {
    let give_up = || Instant::now() + Duration::from_secs(60);
    let mut deadline = None;
    let mut next = 0_u64;
    let mut pending: Option<(String, Value)> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            let at = *deadline.get_or_insert_with(give_up);
            if pending.is_none() || Instant::now() >= at {
                return;
            }
        }
        let (key, body) = pending.take().unwrap_or_else(|| {
            next += 1;
            let key = format!("outage-{next}");
            let body = json!({
                "kind": KIND,
                "payload": payload(JOB_MS.0 + next * 37 % (JOB_MS.1 - JOB_MS.0 + 1), 0),
                "idempotency_key": key,
                "backoff": {
                    "base_seconds": BACKOFF.base_ms as f64 / 1_000.0,
                    "cap_seconds": BACKOFF.cap_ms as f64 / 1_000.0,
                    "jitter": BACKOFF.jitter,
                },
            });
            (key, body)
        });
        let at = Instant::now();
        let sent = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        let (status, error, id) = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                let id = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["id"].as_i64());
                (Some(status), None, id)
            }
            Err(e) => (None, Some(e.to_string()), None),
        };
        let answer = Answer {
            at,
            status,
            latency: at.elapsed(),
            error,
        };
        {
            let mut log = lock(&log);
            log.answers.push(answer);
            match (status, id) {
                (Some(200 | 201), Some(id)) => log.acked.push((id, Instant::now())),
                _ => pending = Some((key, body)),
            }
        }
        tokio::time::sleep(SUBMIT_EVERY).await;
    }
}

/// Asks `/health` every [`HEALTH_EVERY`] until `stop`.
async fn probe_health(
    client: reqwest::Client,
    url: String,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Answer>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let at = Instant::now();
        let (status, error) = match client.get(&url).send().await {
            Ok(response) => (Some(response.status().as_u16()), None),
            Err(e) => (None, Some(e.to_string())),
        };
        lock(&log).push(Answer {
            at,
            status,
            latency: at.elapsed(),
            error,
        });
        tokio::time::sleep(HEALTH_EVERY).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The private cluster, dropped (stopped and removed) off the async threads.
struct ClusterGuard(Option<PrivateCluster>);

impl ClusterGuard {
    fn get(&self) -> &PrivateCluster {
        self.0.as_ref().expect("present until drop")
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        if let Some(cluster) = self.0.take() {
            // `pg_ctl stop` blocks: not on a runtime thread that others may need meanwhile.
            let _ = std::thread::spawn(move || drop(cluster)).join();
        }
    }
}

/// `pg_ctl stop -m fast` or `pg_ctl start` on the drill's cluster, on its port, as the
/// `postgres` OS user when running as root (like the cluster's own start and stop). The cluster's
/// drop stops it in any case.
async fn pg_ctl(cluster: &PrivateCluster, action: &'static str) -> anyhow::Result<()> {
    let pg_ctl = find_bin_dir()?.join("pg_ctl");
    let (data, log, port) = (
        cluster.data_dir().to_path_buf(),
        cluster.log_file(),
        cluster.port(),
    );
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let mut command = if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(&pg_ctl);
        command
    } else {
        Command::new(&pg_ctl)
    };
    command.arg(action).arg("-D").arg(&data);
    match action {
        "start" => command
            .arg("-l")
            .arg(&log)
            .args(["-o", &format!("-p {port}")]),
        _ => command.args(["-m", "fast"]),
    };
    command
        .args(["-w", "-t", "60"])
        .current_dir(&data)
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await?
        .with_context(|| format!("run pg_ctl {action}"))?;
    if !output.status.success() {
        bail!(
            "pg_ctl {action} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
