//! `retries`: jobs whose effect fails (HTTP 500) their first N calls succeed on attempt N+1, the
//! gaps between attempts (read from the effects ledger) follow the job's backoff policy, jobs that
//! always fail end `failed` after `max_attempts` with the last error kept, and the workers' retry
//! and failure metrics equal what the database says.

use std::time::Duration;

use faultline_ports::domain::RetryPolicy;
use faultline_ports::telemetry::names;

use super::checks::{succeeded_with_effect, summary};
use super::db::effect_job;
use super::fleet::{LEASE, WorkerSpec, counter};
use super::ledger::{KIND, Sink};
use super::probe::wait_for;
use super::{Ctx, Drill, Report};

pub(crate) const DRILL: Drill = Drill {
    name: "retries",
    proves: "failing jobs retry with the backoff policy's gaps and succeed on attempt N+1; \
             always-failing ones end failed after max_attempts with their last error; metrics \
             match the database",
    run: |ctx| Box::pin(run(ctx)),
};

/// The drill's backoff: long enough gaps to measure, short enough to finish quickly.
const POLICY: RetryPolicy = RetryPolicy {
    base_ms: 300,
    cap_ms: 2_000,
    jitter: 0.2,
};

/// Planned failures before success (`ALWAYS`: more than any budget).
const PLANS: [u32; 5] = [0, 1, 2, 3, ALWAYS];
const ALWAYS: u32 = 1_000;
const MAX_ATTEMPTS: i32 = 5;
const MAX_ATTEMPTS_ALWAYS: i32 = 3;

/// A gap may exceed its policy delay by a claim poll and this much (the claim, the request).
const GAP_SLACK: Duration = Duration::from_secs(1);

async fn run(ctx: Ctx) -> anyhow::Result<Report> {
    let per_plan: usize = ctx.pick(5, 20);
    let spec = WorkerSpec::new(10, LEASE);
    let db = ctx.database().await?;
    let sink = Sink::start().await?;
    let mut fleet = ctx.fleet(db.url())?;
    let workers = [
        fleet.worker("r1", &spec, &sink)?,
        fleet.worker("r2", &spec, &sink)?,
    ];
    for id in workers {
        fleet.ready(id).await?;
    }

    let mut specs = Vec::new();
    let mut plans = Vec::new();
    for plan in PLANS {
        for _ in 0..per_plan {
            let mut job = effect_job(10, plan);
            job.retry_policy = POLICY;
            job.max_attempts = if plan == ALWAYS {
                MAX_ATTEMPTS_ALWAYS
            } else {
                MAX_ATTEMPTS
            };
            specs.push(job);
            plans.push(plan);
        }
    }
    let ids = db.enqueue(&specs).await?;
    let mut report = Report {
        jobs: ids.len(),
        ..Report::default()
    };
    ctx.progress(format!(
        "{} jobs: {per_plan} each failing 0, 1, 2, 3 times or always",
        ids.len()
    ));
    let settle = Duration::from_millis(u64::try_from(POLICY.cap_ms).unwrap_or(0) * 4)
        + Duration::from_secs(60);
    let states = db.settled(settle).await?;
    ctx.progress(format!(
        "settled: {:?}",
        states.as_ref().unwrap_or_else(|s| s)
    ));

    let rows = db.jobs().await?;
    let ledger = sink.ledger();
    let needed = |plan: u32| {
        if plan == ALWAYS {
            MAX_ATTEMPTS_ALWAYS as usize
        } else {
            plan as usize + 1
        }
    };

    // Jobs that fail N times succeed on attempt N+1, after exactly N+1 calls.
    let recovering: Vec<(i64, u32)> = ids
        .iter()
        .zip(&plans)
        .filter(|(_, plan)| **plan != ALWAYS)
        .map(|(id, plan)| (*id, *plan))
        .collect();
    let recovering_ids: Vec<i64> = recovering.iter().map(|(id, _)| *id).collect();
    report.lost = succeeded_with_effect(&mut report, &rows, &ledger, &recovering_ids);
    let mut wrong = Vec::new();
    for (id, plan) in &recovering {
        let calls = ledger.calls(*id);
        let attempts = rows.get(id).map(|r| r.attempts);
        if attempts != Some(*plan as i32 + 1) || calls.len() != needed(*plan) {
            wrong.push(format!(
                "job {id} (fails {plan}): attempts {attempts:?}, {} calls",
                calls.len()
            ));
        }
    }
    report.check(
        "a job failing N times succeeds on attempt N+1 (N+1 calls)",
        wrong.is_empty(),
        summary(recovering.len(), "did", &wrong),
    );

    // Jobs that always fail end failed after max_attempts, keeping the last call's error.
    let mut wrong = Vec::new();
    let failing: Vec<i64> = ids
        .iter()
        .zip(&plans)
        .filter(|(_, plan)| **plan == ALWAYS)
        .map(|(id, _)| *id)
        .collect();
    for id in &failing {
        let calls = ledger.calls(*id).len();
        let expected_error = format!("planned failure {MAX_ATTEMPTS_ALWAYS} of {ALWAYS}");
        match rows.get(id) {
            Some(row)
                if row.state == "failed"
                    && row.attempts == row.max_attempts
                    && calls == needed(ALWAYS)
                    && row.finished_at.is_some()
                    && row
                        .last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("HTTP 500") && e.contains(&expected_error)) => {
            }
            row => wrong.push(format!(
                "job {id}: {calls} calls, {:?}",
                row.map(|r| (&r.state, r.attempts, &r.last_error))
            )),
        }
    }
    report.lost += wrong.len();
    report.check(
        "an always-failing job ends failed after max_attempts with its last error",
        wrong.is_empty(),
        summary(failing.len(), "did", &wrong),
    );

    // Gaps between calls follow the policy: at least the jittered minimum (the retry is due
    // only then), at most the jittered maximum plus a claim poll.
    let mut gaps = 0;
    let mut wrong = Vec::new();
    let mut worst_late = Duration::ZERO;
    for id in &ids {
        let calls = ledger.calls(*id);
        for (n, pair) in calls.windows(2).enumerate() {
            let attempt = i32::try_from(n + 1).unwrap_or(i32::MAX);
            let (low, high) = window(&POLICY, attempt);
            let high = high + spec.poll_interval + GAP_SLACK;
            let gap = pair[1].at.duration_since(pair[0].at);
            gaps += 1;
            worst_late = worst_late.max(gap.saturating_sub(low));
            if gap + Duration::from_millis(5) < low || gap > high {
                wrong.push(format!(
                    "job {id} after attempt {attempt}: {gap:?} not in {low:?}..{high:?}"
                ));
            }
        }
    }
    report.check(
        "gaps between attempts follow the backoff policy",
        wrong.is_empty() && gaps > 0,
        summary(gaps, "within bounds", &wrong),
    );
    report.note(format!(
        "{gaps} gaps checked against min(cap, base*2^(n-1)) x [1-jitter, 1+jitter] (base {} ms, \
         cap {} ms, jitter {}); latest retry {worst_late:?} after its earliest time",
        POLICY.base_ms, POLICY.cap_ms, POLICY.jitter
    ));

    // The workers' metrics agree with the database.
    let retried_in_db: i64 = rows.values().map(|r| i64::from(r.attempts - 1)).sum();
    let failed_in_db = rows.values().filter(|r| r.state == "failed").count() as u64;
    let succeeded_in_db = rows.values().filter(|r| r.state == "succeeded").count() as u64;
    let expected = (
        u64::try_from(retried_in_db).unwrap_or(0),
        failed_in_db,
        succeeded_in_db,
    );
    let observed = wait_for(
        "the workers' metrics to match the database",
        Duration::from_secs(10),
        async || {
            let mut sums = (0.0, 0.0, 0.0);
            for id in workers {
                let m = fleet.scrape(id).await?;
                sums.0 += m.value(names::JOB_RETRIES_TOTAL, &[("kind", KIND)]);
                let finished = |outcome| {
                    m.value(
                        names::JOBS_FINISHED_TOTAL,
                        &[("kind", KIND), ("outcome", outcome)],
                    )
                };
                sums.1 += finished("failed");
                sums.2 += finished("succeeded");
            }
            let observed = (counter(sums.0), counter(sums.1), counter(sums.2));
            Ok(if observed == expected {
                Ok(observed)
            } else {
                Err(format!("{observed:?}"))
            })
        },
    )
    .await
    .unwrap_or_else(|e| {
        report.note(format!("{e:#}"));
        (0, 0, 0)
    });
    report.check_eq(
        "metrics (retries, failed, succeeded) equal the database's",
        expected,
        observed,
    );

    report.repeated = ledger.repeated(|job| {
        ids.iter()
            .position(|id| *id == job)
            .map_or(1, |i| needed(plans[i]))
    });
    report.check_eq("no execution beyond the planned ones", 0, report.repeated);
    report.stale_rejected = Some(fleet.stale_rejected().await?);
    Ok(report)
}

/// The delay after failed attempt `attempt` (1-based), lowest and highest over the jitter.
fn window(policy: &RetryPolicy, attempt: i32) -> (Duration, Duration) {
    let ms = |v: i64| Duration::from_millis(u64::try_from(v).unwrap_or(0));
    (
        ms(policy.delay_ms(attempt, 0.0)),
        ms(policy.delay_ms(attempt, 1.0)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_window_is_the_policy_delay_over_the_jitter_range() {
        let ms = Duration::from_millis;
        assert_eq!(window(&POLICY, 1), (ms(240), ms(360)));
        assert_eq!(window(&POLICY, 2), (ms(480), ms(720)));
        assert_eq!(window(&POLICY, 3), (ms(960), ms(1_440)));
        // Capped: 300 * 2^3 = 2400 > 2000, and the jittered maximum is capped again.
        assert_eq!(window(&POLICY, 4), (ms(1_600), ms(2_000)));
    }
}
