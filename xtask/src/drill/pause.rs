//! `pause`: a queue with a backlog is paused while three workers run it and a second queue,
//! then resumed. No job of the paused queue may start after the pause committed (its
//! `started_at`, the claim's database time, against the database's clock read right after the
//! pause returned); the other queue keeps being claimed meanwhile; enqueues into the paused queue
//! succeed; after the resume the paused queue drains fully within a poll plus its drain time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, TimeDelta, Utc};
use faultline_ports::JobStore;
use faultline_ports::domain::JobSpec;
use faultline_postgres::PgStore;
use sqlx::PgPool;
use tokio::time::MissedTickBehavior;

use super::checks::{succeeded_with_effect, summary};
use super::db::{DrillDb, effect_job};
use super::fleet::{LEASE, WorkerSpec};
use super::ledger::Sink;
use super::probe::{Background, Rng, wait_for};
use super::report::seconds;
use super::{Ctx, Drill, Report, SLACK};

pub(crate) const DRILL: Drill = Drill {
    name: "pause",
    proves: "pausing a queue under load: no job of it starts after the pause commits (started_at \
             against the database's clock), the other queue keeps flowing, enqueues still \
             succeed, and the resume drains it",
    run: |ctx| Box::pin(run(ctx)),
};

const PAUSED: &str = "paused-q";
const FLOWING: &str = "flowing";
const WORKERS: usize = 3;
const MIN_MS: u64 = 20;
const MAX_MS: u64 = 100;

/// The database's clock now (`clock_timestamp()`, not the transaction's `now()`).
async fn db_clock(pool: &PgPool) -> anyhow::Result<DateTime<Utc>> {
    sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(pool)
        .await
        .context("read the database's clock")
}

/// The pause as it happened, by the database's clock.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Read just before the pause was sent.
    asked: DateTime<Utc>,
    /// Read just after the pause's commit returned.
    paused: DateTime<Utc>,
    /// Read just before the resume was sent.
    resume_asked: DateTime<Utc>,
    /// Read just after the resume returned.
    resumed: DateTime<Utc>,
}

async fn run(ctx: Ctx) -> anyhow::Result<Report> {
    let backlog: usize = ctx.pick(1_500, 4_000);
    let during: usize = ctx.pick(50, 200);
    let hold = Duration::from_secs(ctx.pick(2, 5));
    let spec = WorkerSpec::new(8, LEASE);
    let rng = Rng::for_drill();
    let mut report = Report::default();
    report.note(format!(
        "seed {}; {WORKERS} workers x {} slots (w1 claims {PAUSED} only, w2 and w3 {PAUSED} and \
         {FLOWING}); {backlog} {PAUSED} jobs of {MIN_MS}-{MAX_MS} ms, {FLOWING} jobs enqueued \
         every 50 ms; paused for {hold:?}, {during} jobs enqueued into it meanwhile",
        rng.seed(),
        spec.concurrency,
    ));

    let db = ctx.database().await?;
    let sink = Sink::start().await?;
    let store = PgStore::new(db.pool().clone());
    let mut fleet = ctx.fleet(db.url())?;
    let mut workers = Vec::new();
    for n in 1..=WORKERS {
        let mut spec = spec.clone();
        spec.queues = if n == 1 {
            PAUSED.to_owned()
        } else {
            format!("{PAUSED},{FLOWING}")
        };
        workers.push(fleet.worker(&format!("w{n}"), &spec, &sink)?);
    }
    for id in &workers {
        fleet.ready(*id).await?;
    }
    let mut rng_jobs = rng.clone();
    let specs: Vec<JobSpec> = (0..backlog)
        .map(|_| effect_job(rng_jobs.between(MIN_MS, MAX_MS), 0).queue(PAUSED))
        .collect();
    let mut ids = db.enqueue(&specs).await?;
    let stop_flow = Arc::new(AtomicBool::new(false));
    let flow = flowing_load(&store, rng.clone(), stop_flow.clone());

    // Under load: the paused queue is being worked when the pause comes (the flowing one may
    // wait behind its backlog in a shared claim; it must flow once the other is paused).
    wait_started(&db, (backlog / 10).min(200)).await?;
    let (asked, paused) = pause(&ctx, &mut report, &db, &store).await?;
    // Enqueues into the paused queue succeed (and wait for the resume).
    let more: Vec<JobSpec> = (0..during)
        .map(|_| effect_job(rng_jobs.between(MIN_MS, MAX_MS), 0).queue(PAUSED))
        .collect();
    let added = db.enqueue(&more).await;
    report.check(
        "enqueues into the paused queue succeed",
        added.as_ref().is_ok_and(|ids| ids.len() == during),
        match &added {
            Ok(ids) => format!("{} of {during} created", ids.len()),
            Err(error) => format!("{error:#}"),
        },
    );
    ids.extend(added.unwrap_or_default());
    tokio::time::sleep(hold).await; // the scenario: the queue stays paused this long

    let (window, held) = resume(&ctx, &mut report, &db, &store, asked, paused).await?;
    let resumed_at = Instant::now();
    // Drain: every job of the paused queue done within a poll, slack and its drain time.
    let slots = WORKERS * spec.concurrency;
    let drain = Duration::from_millis(u64::try_from(held)? * MAX_MS / u64::try_from(slots)?);
    let bound = spec.poll_interval + SLACK + drain;
    wait_drained(&db, bound + Duration::from_secs(60)).await?;
    let drained = resumed_at.elapsed();
    ctx.progress(format!("{PAUSED} drained in {}", seconds(drained)));
    stop_flow.store(true, Ordering::SeqCst);
    ids.extend(flow.join().await??);
    let states = db.settled(Duration::from_secs(60)).await?;
    ctx.progress(format!(
        "settled: {:?}",
        states.as_ref().unwrap_or_else(|s| s)
    ));

    check_paused(&mut report, db.pool(), &window, held).await?;
    check_flowing(&mut report, db.pool(), &window, &spec).await?;
    check_pickup(&mut report, db.pool(), &window, &spec).await?;
    report.recovery(
        &format!("{PAUSED}'s {held} held-back jobs drained after the resume"),
        drained,
        bound,
    );
    report.jobs = ids.len();
    let rows = db.jobs().await?;
    let ledger = sink.ledger();
    report.lost = succeeded_with_effect(&mut report, &rows, &ledger, &ids);
    report.repeated = ledger.repeated(|_| 1);
    report.check_eq(
        "no job ran twice (a pause gives up no lease)",
        0,
        report.repeated,
    );
    report.stale_rejected = Some(fleet.stale_rejected().await?);
    Ok(report)
}

/// Waits until at least `n` jobs of the paused queue have started.
async fn wait_started(db: &DrillDb, n: usize) -> anyhow::Result<()> {
    wait_for(
        &format!("{PAUSED} under way"),
        Duration::from_secs(60),
        async || {
            let started = started(db.pool(), PAUSED).await?;
            Ok(if started >= n {
                Ok(())
            } else {
                Err(format!("{started} {PAUSED} jobs started"))
            })
        },
    )
    .await
}

/// Pauses the queue; returns the database's clock just before the request and just after its
/// commit returned.
async fn pause(
    ctx: &Ctx,
    report: &mut Report,
    db: &DrillDb,
    store: &PgStore,
) -> anyhow::Result<(DateTime<Utc>, DateTime<Utc>)> {
    let asked = db_clock(db.pool()).await?;
    let info = store.queue_pause(PAUSED).await.context("pause")?;
    let paused = db_clock(db.pool()).await?;
    ctx.progress(format!(
        "{PAUSED} paused at {}",
        paused.format("%H:%M:%S%.3f")
    ));
    report.check(
        "the pause returned the queue paused, paused_at between the request and its return",
        info.paused && info.paused_at.is_some_and(|at| asked <= at && at <= paused),
        format!(
            "paused {}, paused_at {:?}, asked {asked}, returned {paused}",
            info.paused, info.paused_at
        ),
    );
    Ok((asked, paused))
}

/// Resumes the queue; returns the whole window and how many jobs the pause held back.
async fn resume(
    ctx: &Ctx,
    report: &mut Report,
    db: &DrillDb,
    store: &PgStore,
    asked: DateTime<Utc>,
    paused: DateTime<Utc>,
) -> anyhow::Result<(Window, usize)> {
    let resume_asked = db_clock(db.pool()).await?;
    let held = backlog_of(db.pool(), PAUSED).await?;
    let info = store.queue_resume(PAUSED).await.context("resume")?;
    let resumed = db_clock(db.pool()).await?;
    ctx.progress(format!("{PAUSED} resumed with {held} jobs held back"));
    report.check(
        "the resume returned the queue running",
        !info.paused,
        format!("paused {}", info.paused),
    );
    let window = Window {
        asked,
        paused,
        resume_asked,
        resumed,
    };
    Ok((window, held))
}

/// Waits until the paused queue has no queued or running job.
async fn wait_drained(db: &DrillDb, timeout: Duration) -> anyhow::Result<()> {
    wait_for(
        &format!("{PAUSED} drained after the resume"),
        timeout,
        async || {
            let left = backlog_of(db.pool(), PAUSED).await?;
            Ok(if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} queued or running"))
            })
        },
    )
    .await
}

/// Enqueues one `flowing` job every 50 ms until `stop`; returns their ids.
fn flowing_load(
    store: &PgStore,
    mut rng: Rng,
    stop: Arc<AtomicBool>,
) -> Background<anyhow::Result<Vec<i64>>> {
    let store = store.clone();
    Background::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ids = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let job = effect_job(rng.between(MIN_MS, MAX_MS), 0).queue(FLOWING);
            ids.push(store.job_enqueue(&job).await?.job.id);
        }
        anyhow::Ok(ids)
    })
}

/// Jobs of `queue` that have started (at least once).
async fn started(pool: &PgPool, queue: &str) -> anyhow::Result<usize> {
    let n: i64 = sqlx::query_scalar(
        "select count(*) from faultline_jobs where queue = $1 and started_at is not null",
    )
    .bind(queue)
    .fetch_one(pool)
    .await?;
    Ok(usize::try_from(n)?)
}

/// Jobs of `queue` still queued or running.
async fn backlog_of(pool: &PgPool, queue: &str) -> anyhow::Result<usize> {
    let n: i64 = sqlx::query_scalar(
        "select count(*) from faultline_jobs
         where queue = $1 and state in ('queued', 'running')",
    )
    .bind(queue)
    .fetch_one(pool)
    .await?;
    Ok(usize::try_from(n)?)
}

/// `(id, started_at, attempts)` of the jobs of `queue` that have started, by start.
async fn starts(pool: &PgPool, queue: &str) -> anyhow::Result<Vec<(i64, DateTime<Utc>, i32)>> {
    sqlx::query_as(
        "select id, started_at, attempts from faultline_jobs
         where queue = $1 and started_at is not null order by started_at, id",
    )
    .bind(queue)
    .fetch_all(pool)
    .await
    .context("read the jobs' start times")
}

/// Checks that no job of the paused queue started while it was paused.
async fn check_paused(
    report: &mut Report,
    pool: &PgPool,
    window: &Window,
    held: usize,
) -> anyhow::Result<()> {
    let rows = starts(pool, PAUSED).await?;
    let retried: Vec<String> = rows
        .iter()
        .filter(|(_, _, attempts)| *attempts != 1)
        .map(|(id, _, attempts)| format!("job {id}: {attempts} attempts"))
        .collect();
    report.check(
        format!("every {PAUSED} job ran in one attempt (its started_at is its only claim)"),
        retried.is_empty(),
        summary(rows.len(), "did", &retried),
    );
    let late: Vec<String> = rows
        .iter()
        .filter(|(_, at, _)| *at > window.paused && *at <= window.resume_asked)
        .map(|(id, at, _)| {
            format!(
                "job {id} started {} ms after the pause committed",
                (*at - window.paused).num_milliseconds()
            )
        })
        .collect();
    report.check(
        format!("no {PAUSED} job started after the pause committed and before the resume"),
        late.is_empty(),
        summary(rows.len(), "started outside the pause", &late),
    );
    // Claims whose statement began before the commit (so their snapshot saw the queue open)
    // carry that earlier time: allowed.
    let racing = rows
        .iter()
        .filter(|(_, at, _)| *at > window.asked && *at <= window.paused)
        .count();
    report.note(format!(
        "{racing} {PAUSED} claims began between the pause request and its commit's return \
         (started_at at most the commit: their statements' snapshots predate it, allowed); \
         pause round trip {} ms",
        (window.paused - window.asked).num_milliseconds()
    ));
    report.check(
        "the pause held jobs back (the drill paused a queue with a backlog)",
        held > 0,
        format!("{held} jobs queued at the resume"),
    );
    Ok(())
}

/// Checks that the other queue kept being claimed while the paused one was held.
async fn check_flowing(
    report: &mut Report,
    pool: &PgPool,
    window: &Window,
    spec: &WorkerSpec,
) -> anyhow::Result<()> {
    let during: Vec<DateTime<Utc>> = starts(pool, FLOWING)
        .await?
        .into_iter()
        .map(|(_, at, _)| at)
        .filter(|at| *at > window.paused && *at <= window.resume_asked)
        .collect();
    let mut edges = vec![window.paused];
    edges.extend(during.iter().copied());
    edges.push(window.resume_asked);
    let gap = edges
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default();
    let bound = spec.poll_interval + SLACK;
    report.check(
        format!(
            "{FLOWING} kept being claimed during the pause (longest gap between its claims ≤ \
             poll + slack, {})",
            seconds(bound)
        ),
        !during.is_empty() && gap <= TimeDelta::from_std(bound)?,
        format!(
            "{} {FLOWING} claims in the {} ms pause, longest gap {} ms",
            during.len(),
            (window.resume_asked - window.paused).num_milliseconds(),
            gap.num_milliseconds()
        ),
    );
    Ok(())
}

/// Checks that the paused queue's jobs were claimed again at once after the resume.
async fn check_pickup(
    report: &mut Report,
    pool: &PgPool,
    window: &Window,
    spec: &WorkerSpec,
) -> anyhow::Result<()> {
    let first = starts(pool, PAUSED)
        .await?
        .into_iter()
        .map(|(_, at, _)| at)
        .find(|at| *at > window.resume_asked);
    let Some(first) = first else {
        bail!("no {PAUSED} job started after the resume");
    };
    let raw = first - window.resumed;
    let delay = raw.max(TimeDelta::zero());
    let bound = spec.poll_interval + SLACK;
    report.check(
        format!(
            "{PAUSED} claimed again within a poll + slack ({}) of the resume",
            seconds(bound)
        ),
        delay <= TimeDelta::from_std(bound)?,
        format!(
            "first claim {} ms after the resume returned (negative: between its commit and its \
             return)",
            raw.num_milliseconds()
        ),
    );
    Ok(())
}
