//! `graceful-shutdown`: a worker holding long jobs, under a steady load of short ones, gets
//! SIGTERM. It exits 0 within its grace period; the short jobs it runs finish; the long ones are
//! given back and another worker starts them at once, far sooner than their (long) lease would
//! have expired; no job is lost or stuck, and no attempt is used up by the shutdown.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use faultline_ports::JobStore;
use faultline_postgres::PgStore;
use nix::sys::signal::Signal;

use super::checks::{succeeded_with_effect, summary};
use super::db::effect_job;
use super::fleet::{WorkerSpec, describe_exit};
use super::ledger::{Sink, result_origin};
use super::probe::{Background, Rng};
use super::{Ctx, Drill, Report, SLACK};

pub(crate) const DRILL: Drill = Drill {
    name: "graceful-shutdown",
    proves: "SIGTERM under load: the worker exits 0 within its grace period, its unfinished jobs \
             are picked up at once by another worker (not after the lease), none lost or stuck",
    run: |ctx| Box::pin(run(ctx)),
};

async fn run(ctx: Ctx) -> anyhow::Result<Report> {
    let long_jobs: usize = ctx.pick(3, 5);
    let load_for = Duration::from_secs(ctx.pick(3, 6));
    let lease = Duration::from_secs(60);
    let mut spec = WorkerSpec::new(6, lease);
    spec.shutdown_grace = Duration::from_secs(1);
    // Long jobs outlast the grace period by far: they must be given back.
    let long_ms = u64::try_from((spec.shutdown_grace + Duration::from_secs(3)).as_millis())?;
    let other = WorkerSpec::new(16, lease);
    let rng = Rng::for_drill();
    let db = ctx.database().await?;
    let sink = Sink::start().await?;
    let mut fleet = ctx.fleet(db.url())?;
    let leaving = fleet.worker("leaving", &spec, &sink)?;
    fleet.ready(leaving).await?;
    let specs: Vec<_> = (0..long_jobs).map(|_| effect_job(long_ms, 0)).collect();
    let mut ids = db.enqueue(&specs).await?;
    let long: BTreeSet<i64> = ids.iter().copied().collect();
    sink.wait_for_calls("leaving", long_jobs).await?;
    let staying = fleet.worker("staying", &other, &sink)?;
    fleet.ready(staying).await?;

    // Steady load of short jobs on both workers, then SIGTERM in the middle of it.
    let store = PgStore::new(db.pool().clone());
    let load = {
        let store = store.clone();
        let mut rng = rng.clone();
        Background::spawn(async move {
            let until = Instant::now() + load_for;
            let mut ids = Vec::new();
            while Instant::now() < until {
                let job = effect_job(rng.between(50, 200), 0);
                ids.push(store.job_enqueue(&job).await?.job.id);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(ids)
        })
    };
    tokio::time::sleep(load_for / 3).await; // the scenario: SIGTERM under load
    fleet.signal(leaving, Signal::SIGTERM)?;
    let term_at = Instant::now();
    ctx.progress(format!(
        "SIGTERM to the worker holding {long_jobs} long jobs (grace {:?}, lease {lease:?})",
        spec.shutdown_grace
    ));
    let exit_bound = spec.shutdown_grace + SLACK;
    let status = fleet
        .wait_exit(leaving, exit_bound + Duration::from_secs(30))
        .await?;
    let exit_took = term_at.elapsed();
    ctx.progress(format!(
        "it ended ({}) after {:.1}s",
        describe_exit(status),
        exit_took.as_secs_f64()
    ));
    ids.extend(load.join().await??);
    let mut report = Report {
        jobs: ids.len(),
        ..Report::default()
    };
    report.note(format!("seed {}", rng.seed()));
    report.check_eq(
        "the worker exited 0",
        "exit 0".to_owned(),
        describe_exit(status),
    );
    report.check(
        "it exited within its grace period",
        exit_took <= exit_bound,
        format!(
            "took {exit_took:?}, grace {:?} (+{SLACK:?} slack)",
            spec.shutdown_grace
        ),
    );
    let states = db
        .settled(Duration::from_millis(long_ms) + Duration::from_secs(60))
        .await?;
    ctx.progress(format!(
        "settled: {:?}",
        states.as_ref().unwrap_or_else(|s| s)
    ));

    let rows = db.jobs().await?;
    let ledger = sink.ledger();
    report.lost = succeeded_with_effect(&mut report, &rows, &ledger, &ids);

    // Its unfinished jobs: those it ran whose accepted completion is another worker's.
    let interrupted: BTreeSet<i64> = ledger
        .by_worker("leaving")
        .map(|e| e.job)
        .filter(|job| {
            rows.get(job)
                .and_then(|r| result_origin(r.result.as_ref()))
                .is_some_and(|(worker, _)| worker != "leaving")
        })
        .collect();
    report.check(
        "the jobs it gave back are exactly the long ones (the short ones finished in the grace)",
        interrupted == long,
        format!("given back {interrupted:?}, long {long:?}"),
    );
    let pickup_bound = spec.shutdown_grace + other.poll_interval + SLACK;
    let mut late = Vec::new();
    let mut slowest = Duration::ZERO;
    for job in &interrupted {
        let pickup = ledger
            .calls(*job)
            .into_iter()
            .find(|e| e.worker != "leaving" && e.at >= term_at)
            .map(|e| e.at.duration_since(term_at));
        match pickup {
            Some(delay) => slowest = slowest.max(delay),
            None => late.push(format!("job {job} never picked up")),
        }
    }
    report.check(
        "another worker picked them all up",
        late.is_empty() && !interrupted.is_empty(),
        summary(interrupted.len(), "picked up", &late),
    );
    report.check(
        "the pick-up bound is far below the lease (at once, not after expiry)",
        pickup_bound * 4 < lease,
        format!("bound {pickup_bound:?}, lease {lease:?}"),
    );
    report.recovery(
        "given-back jobs started by another worker after the SIGTERM",
        slowest,
        pickup_bound,
    );
    let used: Vec<String> = interrupted
        .iter()
        .filter_map(|job| rows.get(job))
        .filter(|r| (r.attempts, r.fencing_token) != (1, 2))
        .map(|r| {
            format!(
                "job {}: attempts {}, token {}",
                r.id, r.attempts, r.fencing_token
            )
        })
        .collect();
    report.check(
        "giving a job back used up no attempt (attempts 1, fencing token 2)",
        used.is_empty(),
        summary(interrupted.len(), "did not", &used),
    );
    report.repeated = ledger.repeated(|_| 1);
    report.check_eq(
        "only the given-back jobs ran twice",
        interrupted.len(),
        report.repeated,
    );
    report.stale_rejected = Some(fleet.stale_rejected().await?);
    Ok(report)
}
