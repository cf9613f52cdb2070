//! `poison-pill`: a `crash` job (a demo kind that aborts its worker process) among ordinary jobs.
//! Every worker that takes it dies; a supervisor restarts them. The pill ends `failed` after its
//! `max_attempts`, having killed exactly that many workers, and every other job succeeds.

use std::time::{Duration, Instant};

use faultline_ports::domain::JobSpec;
use serde_json::json;

use super::checks::{Death, death, succeeded_with_effect};
use super::db::{BACKOFF, effect_job};
use super::fleet::{LEASE, ProcId, WorkerSpec};
use super::ledger::Sink;
use super::probe::{POLL, Rng};
use super::{Ctx, Drill, Report, SLACK};

pub(crate) const DRILL: Drill = Drill {
    name: "poison-pill",
    proves: "a job that kills every worker taking it ends failed after max_attempts (one death \
             per attempt) while all other jobs finish",
    run: |ctx| Box::pin(run(ctx)),
};

const WORKERS: usize = 2;
const PILL_ATTEMPTS: i32 = 3;

async fn run(ctx: Ctx) -> anyhow::Result<Report> {
    let ordinary: usize = ctx.pick(60, 300);
    let (min_ms, max_ms) = (20, 200);
    let mut spec = WorkerSpec::new(4, LEASE);
    spec.demo_handlers = true;
    let mut rng = Rng::for_drill();
    let db = ctx.database().await?;
    let sink = Sink::start().await?;
    let mut fleet = ctx.fleet(db.url())?;
    let mut slots: Vec<(ProcId, u32)> = Vec::new();
    for slot in 0..WORKERS {
        slots.push((fleet.worker(&format!("p{}.1", slot + 1), &spec, &sink)?, 1));
    }
    for (id, _) in &slots {
        fleet.ready(*id).await?;
    }

    let mut specs: Vec<JobSpec> = (0..ordinary)
        .map(|_| effect_job(rng.between(min_ms, max_ms), 0))
        .collect();
    let mut pill = JobSpec::new("crash", json!({}));
    pill.max_attempts = PILL_ATTEMPTS;
    pill.retry_policy = BACKOFF;
    let at = ordinary / 4;
    specs.insert(at, pill);
    let mut ids = db.enqueue(&specs).await?;
    let pill_id = ids.remove(at);
    let mut report = Report {
        jobs: specs.len(),
        ..Report::default()
    };
    report.note(format!(
        "seed {}; {ordinary} ordinary jobs and one crash job (max_attempts {PILL_ATTEMPTS})",
        rng.seed()
    ));
    ctx.progress(format!(
        "{ordinary} jobs and a crash job (id {pill_id}) enqueued"
    ));

    // Supervise: restart every worker that dies, until the pill is failed and the rest done.
    let per_attempt = spec.lease + spec.requeue_bound() + SLACK;
    let drain =
        Duration::from_millis(ordinary as u64 * max_ms / (WORKERS * spec.concurrency) as u64);
    let deadline =
        Instant::now() + per_attempt * PILL_ATTEMPTS as u32 + drain * 3 + Duration::from_secs(60);
    let mut deaths: Vec<Death> = Vec::new();
    let mut pill_failed_at = None;
    loop {
        for (slot, (id, incarnation)) in slots.iter_mut().enumerate() {
            if let Some(status) = fleet.try_exit(*id)? {
                let dead = death(&fleet, &db, *id, status).await?;
                *incarnation += 1;
                let next = format!("p{}.{incarnation}", slot + 1);
                *id = fleet.worker(&next, &spec, &sink)?;
                ctx.progress(format!(
                    "{} died ({}) with {} jobs in flight; restarted as {next}",
                    dead.worker,
                    dead.exit,
                    dead.in_flight.len()
                ));
                deaths.push(dead);
            }
        }
        let states = db.states().await?;
        let pill_state: String =
            sqlx::query_scalar("select state from faultline_jobs where id = $1")
                .bind(pill_id)
                .fetch_one(db.pool())
                .await?;
        if pill_state == "failed" && pill_failed_at.is_none() {
            pill_failed_at = Some(Instant::now());
            ctx.progress("the crash job is failed");
        }
        let busy = states.contains_key("queued") || states.contains_key("running");
        if (pill_failed_at.is_some() && !busy) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }

    let rows = db.jobs().await?;
    let ledger = sink.ledger();
    let pill_row = rows.get(&pill_id);
    report.check(
        "the crash job ended failed after max_attempts, with the lease expiry as its error",
        pill_row.is_some_and(|r| {
            r.state == "failed"
                && r.attempts == PILL_ATTEMPTS
                && r.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("lease expired"))
        }),
        format!(
            "{:?}",
            pill_row.map(|r| (&r.state, r.attempts, &r.last_error))
        ),
    );
    let aborted: Vec<String> = deaths
        .iter()
        .map(|d| format!("{} {}", d.worker, d.exit))
        .collect();
    report.check(
        "each attempt of the crash job killed the worker that took it (SIGABRT), and only those",
        deaths.len() == PILL_ATTEMPTS as usize && deaths.iter().all(|d| d.exit == "SIGABRT"),
        format!("{} deaths: {}", deaths.len(), aborted.join(", ")),
    );
    let not_pill = |d: &Death| d.in_flight.iter().filter(|id| **id != pill_id).count();
    let in_flight: usize = deaths.iter().map(not_pill).sum();
    report.lost = succeeded_with_effect(&mut report, &rows, &ledger, &ids);
    report.repeated = ledger.repeated(|_| 1);
    report.check(
        "repeated executions at most the other jobs in flight at the deaths",
        report.repeated <= in_flight,
        format!("{} repeated, {in_flight} in flight", report.repeated),
    );
    if let (Some(last), Some(failed_at)) = (deaths.last(), pill_failed_at) {
        report.recovery(
            "crash job failed after the last death",
            failed_at.saturating_duration_since(last.at),
            spec.lease + spec.rescue_wait() + SLACK,
        );
    }
    report.stale_rejected = Some(fleet.stale_rejected().await?);
    Ok(report)
}
