//! `exactly-once`: the ledger example (`apps/faultline/examples/ledger.rs`), whose handler writes
//! a transfer (a ledger row, two balances) and completes its job in one transaction with a fenced
//! completion, runs on three worker processes while a random one is SIGKILLed (and restarted) or
//! SIGSTOPped past its lease (and resumed) about every second. Every job must succeed with exactly
//! one ledger row, written under the lease that completed it, and the balances must add up: the
//! attempts cut short or overtaken left nothing behind.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use serde_json::Value;
use sqlx::PgPool;

use super::fleet::ProcId;
use super::probe::{Rng, wait_for};
use super::{Ctx, Drill, Report, SLACK};

pub(crate) const DRILL: Drill = Drill {
    name: "exactly-once",
    proves: "effects written with a fenced completion in the job's own transaction commit exactly \
             once under SIGKILL and SIGSTOP: one ledger row per job, balances add up",
    run: |ctx| Box::pin(run(ctx)),
};

const WORKERS: usize = 3;
/// What a ledger worker prints when its attempt was overtaken and rolled back.
const ROLLED_BACK: &str = "attempt rolled back";

/// How the ledger workers run (flags of the example's `worker` command).
struct LedgerSpec {
    concurrency: usize,
    lease: Duration,
    poll: Duration,
    rescue: Duration,
    /// The maintenance leadership (the leader rescues; it may be the worker killed).
    leader_lease: Duration,
}

impl LedgerSpec {
    fn args(&self, name: &str) -> Vec<String> {
        let ms = |d: Duration| d.as_millis().to_string();
        [
            "worker",
            "--id",
            name,
            "--concurrency",
            &self.concurrency.to_string(),
            "--lease-ms",
            &ms(self.lease),
            "--poll-ms",
            &ms(self.poll),
            "--rescue-ms",
            &ms(self.rescue),
            "--leader-lease-ms",
            &ms(self.leader_lease),
        ]
        .map(str::to_owned)
        .into()
    }
}

/// Runs `ledger <args>` to completion; its stdout.
async fn ledger(bin: &Path, url: &str, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let output = tokio::process::Command::new(bin)
        .args(args)
        .env("DATABASE_URL", url)
        .output()
        .await
        .with_context(|| format!("run ledger {}", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() && output.status.code() != Some(1) {
        bail!(
            "ledger {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((output.status.success(), stdout))
}

async fn run(ctx: Ctx) -> anyhow::Result<Report> {
    let transfers: usize = ctx.pick(1_000, 3_000);
    let rounds: usize = ctx.pick(6, 12);
    let every = Duration::from_millis(ctx.pick(700, 1_000));
    let spec = LedgerSpec {
        concurrency: 8,
        lease: Duration::from_secs(2),
        poll: Duration::from_millis(200),
        rescue: Duration::from_millis(250),
        leader_lease: Duration::from_millis(900),
    };
    let pause = spec.lease + Duration::from_secs(1);
    let mut rng = Rng::for_drill();
    let mut report = Report {
        jobs: transfers,
        ..Report::default()
    };
    report.note(format!(
        "seed {}; {WORKERS} ledger workers x {} slots, lease {:?}; {transfers} transfers of 50-350 ms; \
         {rounds} faults (SIGKILL + restart, or SIGSTOP for {pause:?} + SIGCONT) about every {every:?}",
        rng.seed(),
        spec.concurrency,
        spec.lease
    ));

    let bin = super::cargo_build(&["-p", "faultline", "--example", "ledger"], "ledger")?;
    let db = ctx.database().await?;
    // Work long enough that the faults land on transfers in flight.
    let work = "50-350";
    let (ok, out) = ledger(
        &bin,
        db.url(),
        &["setup", &transfers.to_string(), "--work-ms", work],
    )
    .await?;
    if !ok {
        bail!("ledger setup failed: {out}");
    }
    let mut fleet = ctx.fleet(db.url())?;
    let mut slots: Vec<(ProcId, u32)> = Vec::new();
    for slot in 0..WORKERS {
        let name = format!("w{}.1", slot + 1);
        slots.push((fleet.start(&name, &bin, &spec.args(&name), None)?, 1));
    }
    ctx.progress(format!(
        "{transfers} transfers enqueued; {WORKERS} ledger workers started"
    ));

    let (mut kills, mut stops) = (0, 0);
    // Every fault that caught leases gets a watcher: how long until none of those leases is
    // held any more (rescued and handed on, or finished), measured while the schedule goes on.
    // A leader failover (lease + election interval) may come before the rescue.
    let recovery_bound =
        spec.lease + spec.leader_lease + spec.leader_lease / 3 + spec.rescue + SLACK;
    let mut watchers = Vec::new();
    for round in 1..=rounds {
        let wait = every.mul_f64(0.8 + 0.4 * (rng.between(0, 1_000) as f64 / 1_000.0));
        tokio::time::sleep(wait).await; // the fault schedule itself
        let slot = rng.index(WORKERS);
        let (id, incarnation) = slots[slot];
        let name = fleet.name(id).to_owned();
        let held = leases_of(db.pool(), &name).await?;
        let at = Instant::now();
        if !held.is_empty() {
            watchers.push(tokio::task::spawn_local(leases_ended(
                db.pool().clone(),
                held.clone(),
                at,
            )));
        }
        if round % 2 == 1 {
            let status = fleet.kill(id).await?;
            let next = format!("w{}.{}", slot + 1, incarnation + 1);
            slots[slot] = (
                fleet.start(&next, &bin, &spec.args(&next), None)?,
                incarnation + 1,
            );
            kills += 1;
            ctx.progress(format!(
                "round {round}/{rounds}: SIGKILL {name} ({status}) holding {} leases; restarted as {next}",
                held.len()
            ));
        } else {
            fleet.signal(id, Signal::SIGSTOP)?;
            tokio::time::sleep(pause).await; // the fault: frozen past its lease
            fleet.signal(id, Signal::SIGCONT)?;
            stops += 1;
            ctx.progress(format!(
                "round {round}/{rounds}: SIGSTOP {name} for {pause:?} holding {} leases, then SIGCONT",
                held.len()
            ));
        }
    }
    let mut slowest = Duration::ZERO;
    for watcher in watchers {
        let took = watcher.await.context("a recovery watcher")??;
        slowest = slowest.max(took);
    }
    report.recovery(
        "leases held at each fault ended (slowest)",
        slowest,
        recovery_bound,
    );

    let states = db.settled(Duration::from_secs(120)).await?;
    ctx.progress(format!(
        "settled: {:?}",
        states.as_ref().unwrap_or_else(|s| s)
    ));

    let (ok, out) = ledger(&bin, db.url(), &["check", "--all-succeeded"]).await?;
    let found: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("ledger check printed {out:?}"))?;
    let number = |key: &str| found[key].as_i64().unwrap_or(-1);
    let succeeded = number("succeeded");
    let rows = number("ledger_rows");
    report.lost = transfers.saturating_sub(usize::try_from(succeeded).unwrap_or(0));
    report.repeated = usize::try_from(rows - succeeded).unwrap_or(0);
    report.check_eq("every transfer job succeeded", transfers as i64, succeeded);
    report.check_eq("exactly one ledger row per job", transfers as i64, rows);
    report.check_eq(
        "no succeeded job without its ledger row",
        0,
        number("missing"),
    );
    report.check_eq(
        "no ledger row without its succeeded job",
        0,
        number("unexpected"),
    );
    report.check_eq(
        "every ledger row written under the lease that completed its job",
        0,
        number("token_mismatch"),
    );
    report.check_eq(
        "every balance = opening balance + ledger",
        0,
        number("balance_mismatch"),
    );
    report.check("ledger check passed", ok, out.trim().to_owned());
    let handed_on = number("handed_on");
    report.check(
        "the faults hit jobs (leases handed on to another attempt)",
        handed_on > 0,
        format!("{handed_on} jobs ran under more than one lease; {kills} kills, {stops} stops"),
    );
    drop(fleet); // every worker's output is complete
    let rolled_back = lines_containing(&ctx.log_dir, ROLLED_BACK)?;
    report.stale_rejected = Some(rolled_back as u64);
    report.note(format!(
        "{rolled_back} overtaken attempts rolled back (from the workers' logs); {handed_on} jobs handed on"
    ));
    Ok(report)
}

/// The (job, fencing token) of every lease `worker` holds.
async fn leases_of(pool: &PgPool, worker: &str) -> anyhow::Result<Vec<(i64, i64)>> {
    Ok(sqlx::query_as(
        "select id, fencing_token from faultline_jobs where state = 'running' and lease_owner = $1",
    )
    .bind(worker)
    .fetch_all(pool)
    .await?)
}

/// Waits until none of `leases` is held any more; how long that took from `since`.
async fn leases_ended(
    pool: PgPool,
    leases: Vec<(i64, i64)>,
    since: Instant,
) -> anyhow::Result<Duration> {
    let (ids, tokens): (Vec<i64>, Vec<i64>) = leases.into_iter().unzip();
    wait_for(
        "the leases held at a fault ended",
        Duration::from_secs(60),
        async || {
            let held: i64 = sqlx::query_scalar(
                "select count(*) from faultline_jobs j
                 join unnest($1::int8[], $2::int8[]) as t(id, token) on j.id = t.id
                 where j.state = 'running' and j.fencing_token = t.token",
            )
            .bind(&ids)
            .bind(&tokens)
            .fetch_one(&pool)
            .await?;
            Ok(if held == 0 {
                Ok(())
            } else {
                Err(format!("{held} still held"))
            })
        },
    )
    .await?;
    Ok(since.elapsed())
}

/// How many lines of the `*.log` files in `dir` contain `text`.
fn lines_containing(dir: &Path, text: &str) -> anyhow::Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "log") {
            let log = std::fs::read_to_string(&path)
                .with_context(|| format!("read {}", path.display()))?;
            count += log.lines().filter(|line| line.contains(text)).count();
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolled_back_attempts_are_counted_over_every_log() {
        let dir = std::env::temp_dir().join(format!("xtask-eo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("w1.1.log"),
            format!("ledger: worker w1.1 running\nledger: job 3 ...: {ROLLED_BACK}\n"),
        )
        .unwrap();
        std::fs::write(
            dir.join("w2.1.log"),
            format!("x {ROLLED_BACK}\ny {ROLLED_BACK}\n"),
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), format!("{ROLLED_BACK}\n")).unwrap();
        assert_eq!(lines_containing(&dir, ROLLED_BACK).unwrap(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
