//! `lease-expiry`: a worker is SIGSTOPped in the middle of its jobs and stays stopped past its
//! lease; another worker rescues and completes them. After SIGCONT the stale worker's writes are
//! refused by the fence (`faultline_stale_writes_rejected_total`: by its completion, or by its
//! heartbeat when that comes first, and the drill says which), nothing in the database changes,
//! and every job has exactly one accepted completion: the new lease holder's.

use std::time::{Duration, Instant};

use faultline_ports::telemetry::names;
use nix::sys::signal::Signal;

use super::checks::{succeeded_with_effect, summary};
use super::db::effect_job;
use super::fleet::{WorkerSpec, counter};
use super::ledger::{KIND, Sink};
use super::probe::wait_for;
use super::{Ctx, Drill, Report, SLACK};

pub(crate) const DRILL: Drill = Drill {
    name: "lease-expiry",
    proves: "a worker stopped past its lease is fenced off: another worker completes its jobs, \
             its late writes are rejected and change nothing, one accepted completion per job",
    run: |ctx| Box::pin(run(ctx)),
};

/// The writes a lease holder makes (the `operation` label of the stale-write counter).
const OPERATIONS: [&str; 4] = ["complete", "fail", "snooze", "heartbeat"];

async fn run(ctx: Ctx) -> anyhow::Result<Report> {
    let jobs: usize = ctx.pick(5, 10);
    let job_ms = 1_000;
    let spec = WorkerSpec::new(jobs, Duration::from_secs(2));
    let db = ctx.database().await?;
    let sink = Sink::start().await?;
    let mut fleet = ctx.fleet(db.url())?;
    let stale = fleet.worker("stale", &spec, &sink)?;
    fleet.ready(stale).await?;
    let specs: Vec<_> = (0..jobs).map(|_| effect_job(job_ms, 0)).collect();
    let ids = db.enqueue(&specs).await?;
    let mut report = Report {
        jobs,
        ..Report::default()
    };

    // Every job is in the middle of its effect on the first worker: stop it there.
    sink.wait_for_calls("stale", jobs).await?;
    fleet.signal(stale, Signal::SIGSTOP)?;
    let stopped_at = Instant::now();
    ctx.progress(format!(
        "SIGSTOPped the worker 'stale' in the middle of {jobs} jobs (lease {:?})",
        spec.lease
    ));

    let rescuer = fleet.worker("rescuer", &spec, &sink)?;
    let bound = spec.lease + spec.requeue_bound() + Duration::from_millis(job_ms) + SLACK;
    wait_for(
        "another worker completes the stopped worker's jobs",
        bound + Duration::from_secs(30),
        async || {
            let states = db.states().await?;
            Ok(match states.get("succeeded") {
                Some(n) if *n == jobs as i64 => Ok(()),
                _ => Err(format!("{states:?}")),
            })
        },
    )
    .await?;
    report.recovery(
        "the stopped worker's jobs completed by another worker",
        stopped_at.elapsed(),
        bound,
    );
    let before = db.jobs().await?;

    // Keep it stopped past its lease for sure, then let it go on.
    let stopped_for = stopped_at.elapsed();
    report.check(
        "the worker was stopped longer than its lease",
        stopped_for > spec.lease,
        format!("stopped {stopped_for:?}, lease {:?}", spec.lease),
    );
    fleet.signal(stale, Signal::SIGCONT)?;
    ctx.progress(format!(
        "SIGCONT after {:.1}s; waiting for its writes to be rejected",
        stopped_for.as_secs_f64()
    ));
    let rejected = wait_for(
        "the stale worker's writes rejected",
        spec.lease + SLACK + Duration::from_secs(20),
        async || {
            let m = fleet.scrape(stale).await?;
            let total = counter(m.value(names::STALE_WRITES_REJECTED_TOTAL, &[]));
            Ok(if total >= jobs as u64 {
                Ok(m)
            } else {
                Err(format!("{total} rejected"))
            })
        },
    )
    .await?;
    let by_operation: Vec<(&str, u64)> = OPERATIONS
        .iter()
        .map(|op| {
            let value = rejected.value(names::STALE_WRITES_REJECTED_TOTAL, &[("operation", op)]);
            (*op, counter(value))
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let total: u64 = by_operation.iter().map(|(_, n)| n).sum();
    report.stale_rejected = Some(total);
    report.check_eq(
        "every stale execution was rejected once by the fence",
        jobs as u64,
        total,
    );
    report.note(format!(
        "the stale worker learned of its lost leases by: {}",
        by_operation
            .iter()
            .map(|(op, n)| format!("{op} rejected x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // Nothing changed, and the only accepted completion is the rescuer's.
    let after = db.jobs().await?;
    let mut changed = Vec::new();
    for id in &ids {
        let (b, a) = (before.get(id), after.get(id));
        let same = match (b, a) {
            (Some(b), Some(a)) => {
                (
                    &b.state,
                    b.fencing_token,
                    &b.result,
                    b.finished_at,
                    b.attempts,
                ) == (
                    &a.state,
                    a.fencing_token,
                    &a.result,
                    a.finished_at,
                    a.attempts,
                )
            }
            _ => false,
        };
        if !same {
            changed.push(format!("job {id}: {b:?} -> {a:?}"));
        }
    }
    report.check(
        "the stale worker's late writes changed nothing",
        changed.is_empty(),
        summary(ids.len(), "unchanged", &changed),
    );
    let ledger = sink.ledger();
    report.lost = succeeded_with_effect(&mut report, &after, &ledger, &ids);
    let mut wrong = Vec::new();
    for id in &ids {
        let calls: Vec<(&str, i64)> = ledger
            .calls(*id)
            .iter()
            .map(|e| (e.worker.as_str(), e.token))
            .collect();
        let origin = after
            .get(id)
            .and_then(|r| super::ledger::result_origin(r.result.as_ref()));
        if calls != [("stale", 1), ("rescuer", 2)] || origin != Some(("rescuer".into(), 2)) {
            wrong.push(format!("job {id}: calls {calls:?}, result from {origin:?}"));
        }
    }
    report.check(
        "each job ran under lease 1 (stopped) and lease 2 (rescuer); the rescuer's completion is \
         the accepted one",
        wrong.is_empty(),
        summary(ids.len(), "did", &wrong),
    );
    let finished = |m: &faultline_metrics::testing::Exposition| {
        counter(m.value(names::JOBS_FINISHED_TOTAL, &[("kind", KIND)]))
    };
    let accepted = (
        finished(&fleet.scrape(stale).await?),
        finished(&fleet.scrape(rescuer).await?),
    );
    report.check_eq(
        "accepted completions (stopped worker, rescuer): one per job, all the rescuer's",
        (0, jobs as u64),
        accepted,
    );
    report.repeated = ledger.repeated(|_| 1);
    report.check_eq(
        "each job executed exactly twice (the stale run and the rescue)",
        jobs,
        report.repeated,
    );
    report.check(
        "the stale worker is still running",
        fleet.try_exit(stale)?.is_none(),
        "no crash after SIGCONT",
    );
    Ok(report)
}
