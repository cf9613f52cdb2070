//! `worker-crash`: three workers run a backlog of short jobs while a random one is SIGKILLed
//! about every second and restarted. Every job must end `succeeded` with the effect of its last
//! lease; executions repeat at most once per job that was in flight at a kill; the leases the last
//! kill orphaned are rescued within the lease plus a rescuer's round.

use std::time::{Duration, Instant};

use super::checks::{Death, death, succeeded_with_effect};
use super::db::effect_job;
use super::fleet::{LEASE, ProcId, WorkerSpec};
use super::ledger::Sink;
use super::probe::{Rng, wait_for};
use super::{Ctx, Drill, Report, SLACK};

pub(crate) const DRILL: Drill = Drill {
    name: "worker-crash",
    proves: "SIGKILLed workers lose no job: all succeed, repeats bounded by the jobs in flight at \
             the kills, orphaned leases rescued within the lease",
    run: |ctx| Box::pin(run(ctx)),
};

const WORKERS: usize = 3;

async fn run(ctx: Ctx) -> anyhow::Result<Report> {
    let jobs: usize = ctx.pick(1_000, 2_000);
    let rounds: usize = 10;
    let every = Duration::from_millis(ctx.pick(700, 1_000));
    let (min_ms, max_ms) = (50, 400);
    let spec = WorkerSpec::new(8, LEASE);
    let mut rng = Rng::for_drill();
    let mut report = Report {
        jobs,
        ..Report::default()
    };
    report.note(format!(
        "seed {}; {WORKERS} workers x {} slots, lease {:?}; {jobs} jobs of {min_ms}-{max_ms} ms; \
         {rounds} kills about every {every:?}",
        rng.seed(),
        spec.concurrency,
        spec.lease
    ));

    let db = ctx.database().await?;
    let sink = Sink::start().await?;
    let mut fleet = ctx.fleet(db.url())?;
    let mut slots: Vec<(ProcId, u32)> = Vec::new();
    for slot in 0..WORKERS {
        let id = fleet.worker(&format!("w{}.1", slot + 1), &spec, &sink)?;
        slots.push((id, 1));
    }
    for (id, _) in &slots {
        fleet.ready(*id).await?;
    }
    let specs: Vec<_> = (0..jobs)
        .map(|_| effect_job(rng.between(min_ms, max_ms), 0))
        .collect();
    let ids = db.enqueue(&specs).await?;
    ctx.progress(format!("{jobs} jobs enqueued; {WORKERS} workers running"));

    let mut deaths: Vec<Death> = Vec::new();
    for round in 1..=rounds {
        // The fault schedule itself: about every `every`.
        let pause = every.mul_f64(0.8 + 0.4 * (rng.between(0, 1_000) as f64 / 1_000.0));
        tokio::time::sleep(pause).await;
        let slot = rng.index(WORKERS);
        let (id, incarnation) = slots[slot];
        let status = fleet.kill(id).await?;
        let dead = death(&fleet, &db, id, status).await?;
        let next = format!("w{}.{}", slot + 1, incarnation + 1);
        slots[slot] = (fleet.worker(&next, &spec, &sink)?, incarnation + 1);
        ctx.progress(format!(
            "round {round}/{rounds}: {} {} with {} jobs in flight; restarted as {next}",
            dead.exit,
            dead.worker,
            dead.in_flight.len()
        ));
        deaths.push(dead);
    }

    // Recovery: the leases the last kill orphaned are rescued (the jobs are back in play).
    let last = deaths.last().expect("at least one round");
    let rescue_bound = spec.lease + spec.rescue_wait() + SLACK;
    let last_worker = last.worker.clone();
    let last_at = last.at;
    wait_for(
        "the last kill's orphaned leases rescued",
        rescue_bound + Duration::from_secs(30),
        async || {
            let left = db.running_under(&last_worker).await?;
            Ok(if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{} still leased to {last_worker}", left.len()))
            })
        },
    )
    .await?;
    report.recovery(
        &format!(
            "{} leases orphaned by the last kill rescued",
            last.in_flight.len()
        ),
        last_at.elapsed(),
        rescue_bound,
    );

    let slots_total = WORKERS * spec.concurrency;
    let drain = Duration::from_millis(jobs as u64 * max_ms / slots_total as u64);
    let settle = Instant::now();
    let states = db.settled(drain * 3 + Duration::from_secs(60)).await?;
    ctx.progress(format!(
        "settled in {:.1}s after the rounds: {:?}",
        settle.elapsed().as_secs_f64(),
        states.as_ref().unwrap_or_else(|s| s)
    ));

    let rows = db.jobs().await?;
    let ledger = sink.ledger();
    report.lost = succeeded_with_effect(&mut report, &rows, &ledger, &ids);
    report.repeated = ledger.repeated(|_| 1);
    let in_flight: usize = deaths.iter().map(|d| d.in_flight.len()).sum();
    report.check(
        "the kills hit jobs in flight",
        in_flight > 0,
        format!("{in_flight} jobs in flight over {rounds} kills"),
    );
    report.check(
        "repeated executions at most the jobs in flight at the kills",
        report.repeated <= in_flight,
        format!("{} repeated, {in_flight} in flight", report.repeated),
    );
    report.stale_rejected = Some(fleet.stale_rejected().await?);
    Ok(report)
}
