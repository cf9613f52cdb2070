//! `clock-skew`: three workers whose wall clocks disagree with the database's, one 90 s ahead and
//! one 90 s behind (libfaketime; only the wall clock is wrong, monotonic clocks are untouched, as
//! with a broken NTP) and one exact, run a steady load of short jobs (through the local buffer) and
//! of jobs longer than their lease (kept by heartbeats), each with 3 attempts, while workers are
//! SIGKILLed and restarted: `behind` while `ahead` leads the maintenance, then `exact` and the
//! leader `ahead` so that `behind` leads, then random ones (the leader among them).
//!
//! From the database and the effects ledger only: every job succeeds with the effect of its last
//! lease; a job ran at most once plus once per kill that caught it holding a lease, and every
//! superseded execution ran under a lease a kill orphaned; the attempt history holds nothing but
//! the `lease_expired` entries of those leases (none from a live worker, whatever its clock), each
//! rescued after its lease's end and within a rescuer's wait of it; the leadership changed hands
//! only when its leader was killed, and leaders of both skews rescued; long jobs outlived their
//! lease on every clock. Without libfaketime the drill fails, saying what to install.
//!
//! A kill never spends a job's last attempt: the drill kills a worker only when it holds no lease
//! on a last attempt (checked again while the worker is frozen by SIGSTOP, an instant before the
//! SIGKILL), so that "every job succeeded" is a property of the system, not of luck. Nor does it
//! kill the leader while earlier kills' leases wait for their rescue, so that each kill's leases
//! are rescued by the leader of its time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, TimeDelta, Utc};
use faultline_ports::domain::{AttemptError, FailureKind};
use faultline_ports::telemetry::names;
use faultline_postgres::PgStore;
use nix::sys::signal::Signal;
use sqlx::PgPool;
use sqlx::types::Json;
use tokio::time::MissedTickBehavior;

use super::checks::{succeeded_with_effect, summary};
use super::db::{DrillDb, JobRow, effect_job, steady_load};
use super::fleet::{Fleet, LEASE, ProcId, WorkerSpec, counter};
use super::ledger::{Ledger, Sink, result_origin};
use super::probe::{Background, Rng, wait_for};
use super::report::seconds;
use super::{Ctx, Drill, Report, SLACK};

pub(crate) const DRILL: Drill = Drill {
    name: "clock-skew",
    proves: "workers whose wall clocks are 90 s ahead and behind, killed under load, lose \
             nothing: every job succeeds, runs no more often than the kills explain, and no lease \
             of a live worker ends, leader or not",
    run: |ctx| Box::pin(run(ctx)),
};

/// How far the skewed wall clocks are off.
const SKEW: Duration = Duration::from_secs(90);
/// Every job's attempt budget: few, so that lost attempts would show as failed jobs.
const MAX_ATTEMPTS: i32 = 3;
/// Short jobs take 0 ms half of the time, else up to this.
const SHORT_MAX_MS: u64 = 30;
/// Where distributions put libfaketime (Debian's `faketime` package: the multiarch paths).
const LIBFAKETIME: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/lib64/faketime/libfaketime.so.1",
];
/// The leader sampler's cadence.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// A worker's wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Skew {
    /// [`SKEW`] ahead of the database's.
    Ahead,
    /// [`SKEW`] behind.
    Behind,
    /// Right.
    Exact,
}

impl Skew {
    const ALL: [Skew; 3] = [Skew::Ahead, Skew::Behind, Skew::Exact];

    /// The workers' name prefix (`ahead.1`, `ahead.2`, ... for its incarnations).
    fn name(self) -> &'static str {
        match self {
            Skew::Ahead => "ahead",
            Skew::Behind => "behind",
            Skew::Exact => "exact",
        }
    }

    /// The worker's wall clock minus the true time, in whole seconds.
    fn offset(self) -> i64 {
        let skew = i64::try_from(SKEW.as_secs()).unwrap_or(i64::MAX);
        match self {
            Skew::Ahead => skew,
            Skew::Behind => -skew,
            Skew::Exact => 0,
        }
    }

    /// Its index in [`Skew::ALL`] (the worker slot).
    fn slot(self) -> usize {
        self as usize
    }

    /// The clock of worker `name` (by its prefix).
    fn of(name: &str) -> Option<Skew> {
        let prefix = name.split('.').next()?;
        Skew::ALL.into_iter().find(|s| s.name() == prefix)
    }

    /// The environment that sets the clock: libfaketime moving the wall clock only.
    fn env(self, libfaketime: &Path) -> Vec<(String, String)> {
        match self.offset() {
            0 => Vec::new(),
            offset => vec![
                ("LD_PRELOAD".into(), libfaketime.display().to_string()),
                ("FAKETIME".into(), format!("{offset:+}s")),
                // Only the wall clock is wrong: monotonic clocks have no epoch to be wrong about.
                ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ],
        }
    }

    fn describe(self) -> String {
        format!("{} ({:+} s)", self.name(), self.offset())
    }
}

/// libfaketime, or an error saying what to install.
fn libfaketime() -> anyhow::Result<PathBuf> {
    LIBFAKETIME
        .iter()
        .map(Path::new)
        .find(|path| path.exists())
        .map(Path::to_path_buf)
        .with_context(|| {
            format!(
                "libfaketime is missing (none of {}): install Debian's `faketime` package \
                 (`apt-get install faketime`; `.ci/run` installs it). The clock-skew drill did \
                 NOT run",
                LIBFAKETIME.join(", ")
            )
        })
}

/// Checks that libfaketime moves a program's wall clock by `skew`, as the workers will get it.
async fn faketime_works(libfaketime: &Path, skew: Skew) -> anyhow::Result<()> {
    let before = Utc::now().timestamp();
    let output = tokio::process::Command::new("date")
        .arg("+%s")
        .envs(skew.env(libfaketime))
        .output()
        .await
        .context("run `date` under libfaketime")?;
    let after = Utc::now().timestamp();
    let seen: i64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .with_context(|| format!("`date +%s` under libfaketime printed {output:?}"))?;
    let slack = i64::try_from(SLACK.as_secs()).unwrap_or(3);
    if seen < before + skew.offset() - slack || seen > after + skew.offset() + slack {
        bail!(
            "libfaketime ({}) does not move the clock by {:+} s: `date` said {seen}, the time is \
             {after}",
            libfaketime.display(),
            skew.offset()
        );
    }
    Ok(())
}

/// The sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Kills.
    rounds: usize,
    /// About this long between them.
    every: Duration,
    /// Jobs enqueued per second during the kills.
    rate: u64,
    /// One job in this many is long.
    long_one_in: u64,
}

/// One started worker process.
#[derive(Debug, Clone)]
struct Incarnation {
    skew: Skew,
    name: String,
    id: ProcId,
    /// The true time when it was started.
    spawned: DateTime<Utc>,
}

/// A lease as the checks read it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct Lease {
    id: i64,
    fencing_token: i64,
    attempts: i32,
    max_attempts: i32,
    lease_expires_at: DateTime<Utc>,
}

impl Lease {
    fn last_attempt(&self) -> bool {
        self.attempts >= self.max_attempts
    }
}

/// One SIGKILL and the leases it orphaned.
#[derive(Debug, Clone)]
struct Kill {
    round: usize,
    victim: String,
    skew: Skew,
    /// The victim held the leader row when it was killed.
    leader: bool,
    /// The database's time when the victim was frozen (SIGSTOP), an instant before the SIGKILL.
    frozen_at: DateTime<Utc>,
    /// (job, token) of every lease it held, frozen or dead, with the lease's end.
    orphans: BTreeMap<(i64, i64), DateTime<Utc>>,
    /// Orphaned leases on their job's last attempt (a claim that landed between the check and
    /// the kill): those jobs fail by the drill's doing.
    last_attempts: Vec<i64>,
}

/// Whom a round kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aim {
    /// The worker with this clock.
    Worker(Skew),
    /// Every worker but the one with this clock (the leader last), so that it leads next.
    HandOver(Skew),
    /// A random worker.
    Any,
}

/// Round 1 kills `behind` while `ahead` leads (started first, it is the first leader), so that
/// the clock ahead rescues; round 2 kills `exact` and then the leader `ahead`, so that the clock
/// behind takes over and rescues; later rounds kill random workers (the leader among them).
fn aim(round: usize) -> Aim {
    match round {
        1 => Aim::Worker(Skew::Behind),
        2 => Aim::HandOver(Skew::Behind),
        _ => Aim::Any,
    }
}

async fn run(ctx: Ctx) -> anyhow::Result<Report> {
    // Before anything else: without libfaketime there is nothing to prove, and that must show.
    let lib = libfaketime()?;
    for skew in [Skew::Ahead, Skew::Behind] {
        faketime_works(&lib, skew).await?;
    }
    let plan = Plan {
        rounds: ctx.pick(5, 10),
        every: Duration::from_millis(ctx.pick(2_000, 2_500)),
        rate: ctx.pick(150, 200),
        long_one_in: 60,
    };
    let spec = WorkerSpec::new(10, LEASE);
    let long_ms = (
        u64::try_from((spec.lease + Duration::from_secs(1)).as_millis())?,
        u64::try_from((spec.lease * 2).as_millis())?,
    );
    let mut rng = Rng::for_drill();
    let mut report = Report::default();
    report.note(format!(
        "seed {}; workers {} x {} slots, lease {:?} (heartbeat every {:?}), leader lease {:?}, \
         rescue every {:?}; about {} jobs/s of 0-{SHORT_MAX_MS} ms (half 0 ms), one in {} of \
         {}-{} ms; max_attempts {MAX_ATTEMPTS}; {} kills about every {:?}",
        rng.seed(),
        Skew::ALL.map(Skew::describe).join(", "),
        spec.concurrency,
        spec.lease,
        spec.lease / 3,
        spec.leader_lease,
        spec.rescue_interval,
        plan.rate,
        plan.long_one_in,
        long_ms.0,
        long_ms.1,
        plan.rounds,
        plan.every,
    ));

    let db = ctx.database().await?;
    let sink = Sink::start().await?;
    let store = PgStore::new(db.pool().clone());
    let fleet = ctx.fleet(db.url())?;
    let mut world = World {
        db: &db,
        fleet,
        sink: &sink,
        spec: &spec,
        lib,
        slots: Vec::new(),
        started: Vec::new(),
        kills: Vec::new(),
        stale: 0,
        longest_job: Duration::from_millis(long_ms.1),
    };
    // `ahead` first, alone until it leads; then the others.
    let ahead = world.spawn(Skew::Ahead)?;
    world.slots.push(ahead.clone());
    world.fleet.ready(ahead.id).await?;
    world.wait_leader(&ahead.name).await?;
    for skew in [Skew::Behind, Skew::Exact] {
        let started = world.spawn(skew)?;
        world.slots.push(started);
    }
    for slot in 0..world.slots.len() {
        let id = world.slots[slot].id;
        world.fleet.ready(id).await?;
    }
    let sampler = LeaderSampler::start(db.url()).await?;
    let stop_load = Arc::new(AtomicBool::new(false));
    let mut n = 0_u64;
    let load = steady_load(
        &store,
        plan.rate,
        rng.clone(),
        stop_load.clone(),
        move |rng| {
            n += 1;
            let ms = if n.is_multiple_of(plan.long_one_in) {
                rng.between(long_ms.0, long_ms.1)
            } else if rng.index(2) == 0 {
                0
            } else {
                rng.between(1, SHORT_MAX_MS)
            };
            let mut job = effect_job(ms, 0);
            job.max_attempts = MAX_ATTEMPTS;
            job
        },
    );
    ctx.progress(format!(
        "3 workers running ({} leads), load of {} jobs/s",
        ahead.name, plan.rate
    ));

    for round in 1..=plan.rounds {
        // The fault schedule itself: about every `every`.
        let pause = plan
            .every
            .mul_f64(0.8 + 0.4 * (rng.between(0, 1_000) as f64 / 1_000.0));
        tokio::time::sleep(pause).await;
        for kill in world.round(round, aim(round), &mut rng).await? {
            ctx.progress(format!(
                "round {round}/{}: SIGKILL {}{} holding {} leases; restarted as {}",
                plan.rounds,
                kill.victim,
                if kill.leader { " (the leader)" } else { "" },
                kill.orphans.len(),
                world.slots[kill.skew.slot()].name,
            ));
            world.kills.push(kill);
        }
    }
    // The load goes on until every live worker has kept a long job past its lease.
    let long_min = i64::try_from(long_ms.0)?;
    let live: Vec<String> = world.slots.iter().map(|i| i.name.clone()).collect();
    let kept = wait_for(
        "every live worker completes a long job it held past its lease",
        world.longest_job * 3 + spec.requeue_bound() + SLACK,
        async || {
            let done = kept_past_lease(db.pool(), long_min, spec.lease, &live).await?;
            Ok(if done.len() == live.len() {
                Ok(())
            } else {
                Err(format!("only {done:?}"))
            })
        },
    )
    .await;
    if let Err(error) = kept {
        ctx.progress(format!("{error:#}"));
    }
    stop_load.store(true, Ordering::SeqCst);
    let ids = load.join().await??;
    report.jobs = ids.len();

    let settle_bound = world.longest_job + spec.lease + spec.requeue_bound() + SLACK;
    let states = db.settled(settle_bound + Duration::from_secs(60)).await?;
    ctx.progress(format!(
        "settled: {:?}",
        states.as_ref().unwrap_or_else(|s| s)
    ));
    let samples = sampler.stop().await?;

    let rows = db.jobs().await?;
    let runs = runs(db.pool(), &ids).await?;
    let ledger = sink.ledger();
    let seen = Seen {
        kills: &world.kills,
        rows: &rows,
        runs: &runs,
        ledger: &ledger,
        samples: &samples,
        spec: &spec,
    };
    check_skew_in_effect(&mut report, &ctx.log_dir, &world.started);
    report.lost = succeeded_with_effect(&mut report, &rows, &ledger, &ids);
    let explained = seen.check_history(&mut report);
    seen.check_executions(&mut report, &explained);
    seen.check_rescues(&mut report, &explained);
    seen.check_leadership(&mut report, &explained);
    seen.check_work(&mut report, long_ms.0);
    check_kills(&mut report, &world.kills);
    report.repeated = ledger.repeated(|_| 1);
    report.stale_rejected = Some(world.stale + world.fleet.stale_rejected().await?);
    report.note(
        "stale writes rejected: the workers' own counters (scraped before each kill and at the \
         end), shown for information; the checks count stale executions from the ledger",
    );
    Ok(report)
}

/// What the rounds act on.
struct World<'a> {
    db: &'a DrillDb,
    fleet: Fleet,
    sink: &'a Sink,
    spec: &'a WorkerSpec,
    lib: PathBuf,
    /// The live incarnation of each clock (by [`Skew::slot`]).
    slots: Vec<Incarnation>,
    /// Every incarnation ever started.
    started: Vec<Incarnation>,
    kills: Vec<Kill>,
    /// The stale-write counters of the killed workers, scraped just before their kill.
    stale: u64,
    longest_job: Duration,
}

impl World<'_> {
    /// Starts the next incarnation of the worker with clock `skew`.
    fn spawn(&mut self, skew: Skew) -> anyhow::Result<Incarnation> {
        let n = self.started.iter().filter(|i| i.skew == skew).count() + 1;
        let name = format!("{}.{n}", skew.name());
        let mut spec = self.spec.clone();
        spec.env = skew.env(&self.lib);
        let spawned = Utc::now();
        let id = self.fleet.worker(&name, &spec, self.sink)?;
        let started = Incarnation {
            skew,
            name,
            id,
            spawned,
        };
        self.started.push(started.clone());
        Ok(started)
    }

    /// Waits until `name` holds the live leader row.
    async fn wait_leader(&self, name: &str) -> anyhow::Result<()> {
        let pool = self.db.pool();
        let bound = self.spec.failover_wait() + SLACK + Duration::from_secs(30);
        wait_for(&format!("{name} leads"), bound, async || {
            Ok(match leader_now(pool).await? {
                Some((leader, _)) if leader == name => Ok(()),
                other => Err(format!("leader {other:?}")),
            })
        })
        .await
    }

    /// Kills the workers `aim` names (each once it can be killed: see [`World::try_kill`]),
    /// then restarts them.
    async fn round(&mut self, round: usize, aim: Aim, rng: &mut Rng) -> anyhow::Result<Vec<Kill>> {
        let kills = match aim {
            Aim::Worker(skew) => vec![self.kill_one(round, &[skew.slot()], true, None).await?],
            Aim::Any => {
                let all: Vec<usize> = (0..self.slots.len()).collect();
                vec![self.kill_one(round, &all, true, Some(rng)).await?]
            }
            Aim::HandOver(heir) => {
                let leader = leader_now(self.db.pool()).await?.map(|(name, _)| name);
                let mut others: Vec<usize> = (0..self.slots.len())
                    .filter(|slot| *slot != heir.slot())
                    .collect();
                others.sort_by_key(|slot| leader.as_deref() == Some(&self.slots[*slot].name));
                let mut kills = Vec::new();
                for slot in others {
                    kills.push(self.kill_one(round, &[slot], false, None).await?);
                }
                // Restarted only once the heir leads: a new process could win the election.
                let heir = self.slots[heir.slot()].name.clone();
                self.wait_leader(&heir).await?;
                kills
            }
        };
        for kill in &kills {
            let restarted = self.spawn(kill.skew)?;
            self.slots[kill.skew.slot()] = restarted.clone();
            self.fleet.ready(restarted.id).await?;
        }
        Ok(kills)
    }

    /// Kills one of the workers in `slots` (in a random order when `shuffle` is given), polling
    /// until one can be killed (see [`World::try_kill`]).
    async fn kill_one(
        &mut self,
        round: usize,
        slots: &[usize],
        need_leases: bool,
        mut shuffle: Option<&mut Rng>,
    ) -> anyhow::Result<Kill> {
        let bound = self.longest_job + self.spec.lease + self.spec.rescue_wait() + SLACK;
        let names: Vec<&str> = slots.iter().map(|s| self.slots[*s].skew.name()).collect();
        let what = format!("round {round}: one of {names:?} can be killed");
        wait_for(&what, bound + Duration::from_secs(30), async || {
            let mut order = slots.to_vec();
            if let Some(rng) = shuffle.as_deref_mut() {
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.index(i + 1));
                }
            }
            for slot in order {
                if let Some(kill) = self.try_kill(round, slot, need_leases).await? {
                    return Ok(Ok(kill));
                }
            }
            Ok(Err(
                "each holds a job on its last attempt, leads while earlier kills' \
                    leases wait for their rescue, or holds no lease"
                    .into(),
            ))
        })
        .await
    }

    /// SIGKILLs the worker of `slot` unless it holds a lease on a job's last attempt (a kill
    /// would fail that job by the drill's doing), or it leads while the leases of earlier kills
    /// still wait for their rescue (so that every kill's leases are rescued by the leader of its
    /// time), or it holds no lease when `need_leases` (a kill that catches nothing proves
    /// nothing). The leases are looked at while it runs and again while it is frozen (SIGSTOP),
    /// once they stopped changing (statements it sent before the freeze have landed).
    async fn try_kill(
        &mut self,
        round: usize,
        slot: usize,
        need_leases: bool,
    ) -> anyhow::Result<Option<Kill>> {
        let victim = self.slots[slot].clone();
        let pool = self.db.pool();
        let held = leases_of(pool, &victim.name).await?;
        if (need_leases && held.is_empty()) || held.iter().any(Lease::last_attempt) {
            return Ok(None);
        }
        let leader = leader_now(pool)
            .await?
            .is_some_and(|(name, _)| name == victim.name);
        if leader {
            let dead: Vec<String> = self.kills.iter().map(|k| k.victim.clone()).collect();
            let waiting: i64 = sqlx::query_scalar(
                "select count(*) from faultline_jobs
                 where state = 'running' and lease_owner = any($1)",
            )
            .bind(&dead)
            .fetch_one(pool)
            .await?;
            if waiting > 0 {
                return Ok(None);
            }
        }
        let stale = match self.fleet.scrape(victim.id).await {
            Ok(m) => counter(m.value(names::STALE_WRITES_REJECTED_TOTAL, &[])),
            Err(_) => 0,
        };
        self.fleet.signal(victim.id, Signal::SIGSTOP)?;
        let frozen_at: DateTime<Utc> = sqlx::query_scalar("select now()").fetch_one(pool).await?;
        let mut last = leases_of(pool, &victim.name).await?;
        let frozen = wait_for(
            "the frozen worker's leases stop changing",
            SLACK,
            async || {
                let now = leases_of(pool, &victim.name).await?;
                Ok(if now == last {
                    Ok(now)
                } else {
                    last = now;
                    Err("still changing".into())
                })
            },
        )
        .await?;
        if frozen.iter().any(Lease::last_attempt) {
            self.fleet.signal(victim.id, Signal::SIGCONT)?;
            return Ok(None);
        }
        self.fleet.kill(victim.id).await?;
        let dead = leases_of(pool, &victim.name).await?;
        let mut orphans = BTreeMap::new();
        for lease in frozen.iter().chain(&dead) {
            let end = orphans
                .entry((lease.id, lease.fencing_token))
                .or_insert(lease.lease_expires_at);
            *end = (*end).max(lease.lease_expires_at);
        }
        let last_attempts: BTreeSet<i64> = frozen
            .iter()
            .chain(&dead)
            .filter(|l| l.last_attempt())
            .map(|l| l.id)
            .collect();
        self.stale += stale;
        Ok(Some(Kill {
            round,
            victim: victim.name,
            skew: victim.skew,
            leader,
            frozen_at,
            orphans,
            last_attempts: last_attempts.into_iter().collect(),
        }))
    }
}

/// The leases `worker` holds.
async fn leases_of(pool: &PgPool, worker: &str) -> anyhow::Result<Vec<Lease>> {
    sqlx::query_as(
        "select id, fencing_token, attempts, max_attempts, lease_expires_at from faultline_jobs
         where state = 'running' and lease_owner = $1 order by id",
    )
    .bind(worker)
    .fetch_all(pool)
    .await
    .context("read a worker's leases")
}

/// Which of `workers` completed, in one attempt, a job of at least `long_ms` that it held
/// (claim to completion, by the database's clock) longer than `lease`.
async fn kept_past_lease(
    pool: &PgPool,
    long_ms: i64,
    lease: Duration,
    workers: &[String],
) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar(
        "select distinct result->>'worker' from faultline_jobs
         where state = 'succeeded' and attempts = 1 and (payload->>'ms')::int8 >= $1
           and finished_at - started_at > make_interval(secs => $2)
           and result->>'worker' = any($3)",
    )
    .bind(long_ms)
    .bind(lease.as_secs_f64())
    .bind(workers)
    .fetch_all(pool)
    .await
    .context("read the long jobs kept past their lease")
}

/// The live leader row: (leader, term).
async fn leader_now(pool: &PgPool) -> anyhow::Result<Option<(String, i64)>> {
    sqlx::query_as(
        "select leader_id, term from faultline_leader
         where name = 'maintenance' and expires_at > now()",
    )
    .fetch_optional(pool)
    .await
    .context("read the leader row")
}

/// The leader row as sampled, with the database's time.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct LeaderSample {
    now: DateTime<Utc>,
    leader_id: String,
    term: i64,
    live: bool,
}

/// Reads the leader row about every [`SAMPLE_EVERY`] on a connection of its own.
struct LeaderSampler {
    samples: Arc<Mutex<Vec<LeaderSample>>>,
    stop: Arc<AtomicBool>,
    task: Background<anyhow::Result<()>>,
}

impl LeaderSampler {
    async fn start(url: &str) -> anyhow::Result<LeaderSampler> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .context("connect the leader sampler")?;
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (into, stopped) = (samples.clone(), stop.clone());
        let task = Background::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            while !stopped.load(Ordering::SeqCst) {
                tick.tick().await;
                let sample: Option<LeaderSample> = sqlx::query_as(
                    "select now() as now, leader_id, term, expires_at > now() as live
                     from faultline_leader where name = 'maintenance'",
                )
                .fetch_optional(&pool)
                .await
                .context("sample the leader row")?;
                if let Some(sample) = sample {
                    into.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(sample);
                }
            }
            pool.close().await;
            Ok(())
        });
        Ok(LeaderSampler {
            samples,
            stop,
            task,
        })
    }

    async fn stop(self) -> anyhow::Result<Vec<LeaderSample>> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.join().await??;
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ok(samples)
    }
}

/// A job's attempts as the checks read them.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Run {
    id: i64,
    /// The payload's duration.
    ms: i64,
    attempts: i32,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    errors: Json<Vec<AttemptError>>,
}

async fn runs(pool: &PgPool, ids: &[i64]) -> anyhow::Result<BTreeMap<i64, Run>> {
    let rows: Vec<Run> = sqlx::query_as(
        "select id, coalesce((payload->>'ms')::int8, 0) as ms, attempts, started_at,
                finished_at, errors
         from faultline_jobs where id = any($1) order by id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .context("read the jobs' attempt history")?;
    Ok(rows.into_iter().map(|run| (run.id, run)).collect())
}

/// Why an attempt-history entry is in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// A lease the kill (index) found its victim holding.
    Orphan(usize),
    /// A lease of the kill's victim that was not there when it was frozen: a claim it sent
    /// before the freeze that landed after the look (its answer died with the worker).
    LateClaim(usize),
}

/// The attempt-history entries the kills explain, by (job, token), with their time.
type Explained = BTreeMap<(i64, i64), (Cause, DateTime<Utc>)>;

/// Everything the checks look at.
struct Seen<'a> {
    kills: &'a [Kill],
    rows: &'a BTreeMap<i64, JobRow>,
    runs: &'a BTreeMap<i64, Run>,
    ledger: &'a Ledger,
    samples: &'a [LeaderSample],
    spec: &'a WorkerSpec,
}

/// Explains one attempt-history entry of `job` by the kills, or says why it cannot be.
fn explain(kills: &[Kill], job: i64, entry: &AttemptError) -> Result<Cause, String> {
    let what = format!(
        "job {job} attempt {} (token {}, {:?} by {:?} at {})",
        entry.attempt, entry.fencing_token, entry.kind, entry.worker, entry.at
    );
    if entry.kind != FailureKind::LeaseExpired {
        return Err(format!("{what}: not a lease expiry"));
    }
    let Some(worker) = entry.worker.as_deref() else {
        return Err(format!("{what}: no lease holder"));
    };
    let Some((index, kill)) = kills.iter().enumerate().find(|(_, k)| k.victim == worker) else {
        return Err(format!(
            "{what}: {worker} was never killed (a live worker lost a lease)"
        ));
    };
    if entry.at < kill.frozen_at {
        return Err(format!(
            "{what}: rescued before {worker} was killed (at {})",
            kill.frozen_at
        ));
    }
    match kill.orphans.get(&(job, entry.fencing_token)) {
        Some(end) if *end < kill.frozen_at => Err(format!(
            "{what}: the lease had ended ({end}) before {worker} was killed"
        )),
        Some(_) => Ok(Cause::Orphan(index)),
        None => Ok(Cause::LateClaim(index)),
    }
}

/// `ahead.2 -> 3, behind.1 -> 1`.
fn counts<K: std::fmt::Display>(counts: &BTreeMap<K, usize>) -> String {
    let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

impl Seen<'_> {
    /// The attempt history: only the kills' lease expiries, each orphaned lease rescued, one
    /// attempt more than the history per job. Returns the explained entries.
    fn check_history(&self, report: &mut Report) -> Explained {
        let mut explained = Explained::new();
        let mut unexplained = Vec::new();
        let mut entries = 0;
        for run in self.runs.values() {
            for entry in &run.errors.0 {
                entries += 1;
                match explain(self.kills, run.id, entry) {
                    Ok(cause) => {
                        explained.insert((run.id, entry.fencing_token), (cause, entry.at));
                    }
                    Err(problem) => unexplained.push(problem),
                }
            }
        }
        let late = explained
            .values()
            .filter(|(c, _)| matches!(c, Cause::LateClaim(_)))
            .count();
        report.check(
            "no attempt-history entry but the lease expiries of the leases the kills orphaned \
             (none from a live worker, skewed or not; none before its kill)",
            unexplained.is_empty(),
            format!(
                "{}; {late} of them claims that landed after their worker froze",
                summary(entries, "explained", &unexplained)
            ),
        );
        let mut unrescued = Vec::new();
        let orphans: usize = self.kills.iter().map(|k| k.orphans.len()).sum();
        for kill in self.kills {
            for (job, token) in kill.orphans.keys() {
                let rescued = explained.contains_key(&(*job, *token));
                // Or its completion had landed before the worker froze (after the look).
                let completed = self.rows.get(job).is_some_and(|row| {
                    row.fencing_token == *token
                        && result_origin(row.result.as_ref())
                            .is_some_and(|(worker, _)| worker == kill.victim)
                });
                if !rescued && !completed {
                    unrescued.push(format!("job {job} token {token} of {}", kill.victim));
                }
            }
        }
        report.check(
            "every lease the kills orphaned was rescued (a lease_expired entry in its attempt)",
            unrescued.is_empty(),
            summary(orphans, "rescued", &unrescued),
        );
        let wrong: Vec<String> = self
            .runs
            .values()
            .filter(|run| usize::try_from(run.attempts).ok() != Some(run.errors.0.len() + 1))
            .map(|run| {
                format!(
                    "job {}: {} attempts, {} entries",
                    run.id,
                    run.attempts,
                    run.errors.0.len()
                )
            })
            .collect();
        report.check(
            "every job used one attempt more than its history (the last one succeeded)",
            wrong.is_empty(),
            summary(self.runs.len(), "did", &wrong),
        );
        explained
    }

    /// Executions: at most one per job plus one per kill that caught it; every superseded
    /// execution ran under an orphaned lease of its executor; no lease ran twice.
    fn check_executions(&self, report: &mut Report, explained: &Explained) {
        let mut hits: BTreeMap<i64, usize> = BTreeMap::new();
        for (job, _) in explained.keys() {
            *hits.entry(*job).or_default() += 1;
        }
        let mut over = Vec::new();
        let mut stale = Vec::new();
        let mut twice = Vec::new();
        let mut superseded = 0;
        for (job, calls) in self.ledger.by_job() {
            let hit = hits.get(&job).copied().unwrap_or(0);
            if calls.len() > 1 + hit {
                over.push(format!(
                    "job {job}: {} executions, {hit} kills caught it",
                    calls.len()
                ));
            }
            let mut tokens = BTreeSet::new();
            for call in &calls {
                if !tokens.insert(call.token) {
                    twice.push(format!("job {job} token {}", call.token));
                }
                let last = self.rows.get(&job).map(|r| r.fencing_token);
                if last == Some(call.token) {
                    continue;
                }
                superseded += 1;
                let orphaned = self
                    .kills
                    .iter()
                    .any(|k| k.victim == call.worker && k.orphans.contains_key(&(job, call.token)));
                if !orphaned {
                    stale.push(format!(
                        "job {job}: {} ran token {} and was superseded without being killed",
                        call.worker, call.token
                    ));
                }
            }
        }
        let jobs = self.runs.len();
        report.check(
            "no job ran more often than once plus once per kill that caught it holding a lease",
            over.is_empty(),
            summary(jobs, "within the bound", &over),
        );
        report.check(
            "every superseded execution ran under a lease its (killed) worker held at the kill: \
             no stale write but the faults'",
            stale.is_empty(),
            summary(superseded, "orphaned by a kill", &stale),
        );
        report.check(
            "no lease executed twice",
            twice.is_empty(),
            summary(self.ledger.effects().len(), "once", &twice),
        );
    }

    /// Rescues: each after its lease's end and within a rescuer's wait of it (the database's
    /// clock on both sides); the recovery of each kill within the lease plus that.
    fn check_rescues(&self, report: &mut Report, explained: &Explained) {
        let bound = self.spec.rescue_wait() + SLACK;
        let mut problems = Vec::new();
        let mut slowest_delay = TimeDelta::zero();
        let mut slowest_kill = TimeDelta::zero();
        let mut rescued = 0;
        for kill in self.kills {
            for (lease, end) in &kill.orphans {
                let Some((_, at)) = explained.get(lease) else {
                    continue;
                };
                rescued += 1;
                let delay = *at - *end;
                slowest_delay = slowest_delay.max(delay);
                slowest_kill = slowest_kill.max(*at - kill.frozen_at);
                if delay < TimeDelta::zero()
                    || delay > TimeDelta::from_std(bound).unwrap_or(TimeDelta::MAX)
                {
                    problems.push(format!(
                        "job {} token {}: rescued {} ms after its lease's end",
                        lease.0,
                        lease.1,
                        delay.num_milliseconds()
                    ));
                }
            }
        }
        report.check(
            format!(
                "every orphaned lease was rescued after its end and within {} of it (leader \
                 failover + election + a rescuer round + slack; database clock)",
                seconds(bound)
            ),
            problems.is_empty() && rescued > 0,
            format!(
                "{}; slowest {} ms",
                summary(rescued, "in time", &problems),
                slowest_delay.num_milliseconds()
            ),
        );
        report.recovery(
            "the leases each kill orphaned rescued, slowest kill",
            slowest_kill.to_std().unwrap_or_default(),
            self.spec.lease + bound,
        );
    }

    /// Leadership: it changed hands only at a kill of its leader; skewed leaders rescued.
    fn check_leadership(&self, report: &mut Report, explained: &Explained) {
        let changes = leadership_changes(self.samples, self.kills);
        report.check(
            "the leader row changed hands (or lapsed) only when its leader had been killed",
            changes.is_ok() && !self.samples.is_empty(),
            match &changes {
                Ok(terms) => format!(
                    "{} samples, {terms} terms, every change after its leader's kill",
                    self.samples.len()
                ),
                Err(problems) => summary(self.samples.len(), "in order", problems),
            },
        );
        let mut led: BTreeMap<String, usize> = BTreeMap::new();
        for sample in self.samples.iter().filter(|s| s.live) {
            *led.entry(sample.leader_id.clone()).or_default() += 1;
        }
        let mut by_leader: BTreeMap<String, usize> = BTreeMap::new();
        for (_, at) in explained.values() {
            let leader = self
                .samples
                .iter()
                .rev()
                .find(|s| s.live && s.now <= *at)
                .map_or_else(|| "?".to_owned(), |s| s.leader_id.clone());
            *by_leader.entry(leader).or_default() += 1;
        }
        report.note(format!(
            "leader samples ({:?} apart) per leader: {}; rescues per leader (the last live \
             leader sampled before the rescue): {}",
            SAMPLE_EVERY,
            counts(&led),
            counts(&by_leader)
        ));
        let rescued_by = |skew: Skew| -> usize {
            by_leader
                .iter()
                .filter(|(leader, _)| Skew::of(leader) == Some(skew))
                .map(|(_, n)| n)
                .sum()
        };
        let (ahead, behind) = (rescued_by(Skew::Ahead), rescued_by(Skew::Behind));
        report.check(
            "leaders with either skewed clock rescued orphaned leases",
            ahead > 0 && behind > 0,
            format!("{ahead} rescues under an `ahead` leader, {behind} under a `behind` one"),
        );
    }

    /// Every clock did its share: long jobs outlived their lease in one attempt (heartbeats),
    /// short ones went through.
    fn check_work(&self, report: &mut Report, long_min_ms: u64) {
        let lease = TimeDelta::from_std(self.spec.lease).unwrap_or(TimeDelta::MAX);
        let long_min = i64::try_from(long_min_ms).unwrap_or(i64::MAX);
        let mut long: BTreeMap<Skew, usize> = BTreeMap::new();
        let mut short: BTreeMap<Skew, usize> = BTreeMap::new();
        let (mut long_total, mut short_total) = (0, 0);
        for run in self.runs.values() {
            let Some(row) = self.rows.get(&run.id) else {
                continue;
            };
            let Some(skew) = result_origin(row.result.as_ref()).and_then(|(w, _)| Skew::of(&w))
            else {
                continue;
            };
            if run.ms >= long_min {
                long_total += 1;
                let held = match (run.started_at, run.finished_at) {
                    (Some(start), Some(end)) => end - start,
                    _ => TimeDelta::zero(),
                };
                if run.attempts == 1 && held > lease {
                    *long.entry(skew).or_default() += 1;
                }
            } else {
                short_total += 1;
                *short.entry(skew).or_default() += 1;
            }
        }
        let missing: Vec<String> = Skew::ALL
            .iter()
            .filter(|s| long.get(s).copied().unwrap_or(0) == 0)
            .map(|s| s.describe())
            .collect();
        let named =
            |m: &BTreeMap<Skew, usize>| counts(&m.iter().map(|(s, n)| (s.name(), *n)).collect());
        report.check(
            "on every clock, long jobs held one lease longer than the lease length (claim to \
             completion, database clock): heartbeats kept them",
            missing.is_empty(),
            format!(
                "{long_total} long jobs; single-attempt ones held past {} by clock: {}{}",
                seconds(self.spec.lease),
                named(&long),
                if missing.is_empty() {
                    String::new()
                } else {
                    format!("; none on {}", missing.join(", "))
                }
            ),
        );
        let share = short_total / (Skew::ALL.len() * 10);
        let idle: Vec<String> = Skew::ALL
            .iter()
            .filter(|s| short.get(s).copied().unwrap_or(0) <= share)
            .map(|s| s.describe())
            .collect();
        report.check(
            "every clock completed short jobs (more than a tenth of its share)",
            idle.is_empty() && short_total > 0,
            format!(
                "{short_total} short jobs by clock: {}{}",
                named(&short),
                if idle.is_empty() {
                    String::new()
                } else {
                    format!("; too few on {}", idle.join(", "))
                }
            ),
        );
    }
}

/// Walks the leader samples: every change of (leader, term), and every lapse, must come after
/// the kill of the leader it replaced. Returns the number of terms seen, or the problems.
fn leadership_changes(samples: &[LeaderSample], kills: &[Kill]) -> Result<usize, Vec<String>> {
    let killed_by = |leader: &str, at: DateTime<Utc>| {
        kills
            .iter()
            .any(|k| k.victim == leader && k.frozen_at <= at)
    };
    let mut problems = Vec::new();
    let mut current: Option<(&str, i64)> = None;
    let mut terms = 0;
    for sample in samples {
        let this = (sample.leader_id.as_str(), sample.term);
        if !sample.live {
            if !killed_by(&sample.leader_id, sample.now) {
                problems.push(format!(
                    "{}: the row of {} (term {}) lapsed while it lived",
                    sample.now, sample.leader_id, sample.term
                ));
            }
            continue;
        }
        if current != Some(this) {
            terms += 1;
            if let Some((previous, term)) = current
                && !killed_by(previous, sample.now)
            {
                problems.push(format!(
                    "{}: {} (term {}) replaced {previous} (term {term}), which lived",
                    sample.now, sample.leader_id, sample.term
                ));
            }
            current = Some(this);
        }
    }
    if problems.is_empty() {
        Ok(terms)
    } else {
        Err(problems)
    }
}

/// Checks that the skew was in effect: each worker's log timestamps (its wall clock) were off
/// by its skew when it started.
fn check_skew_in_effect(report: &mut Report, log_dir: &Path, started: &[Incarnation]) {
    let slack = SLACK.as_secs_f64();
    let mut problems = Vec::new();
    let mut seen = Vec::new();
    for worker in started {
        let path = log_dir.join(format!("{}.log", worker.name));
        let first = std::fs::read_to_string(&path)
            .ok()
            .and_then(|log| log_time(&log));
        let Some(first) = first else {
            problems.push(format!(
                "{}: no timestamped line in {}",
                worker.name,
                path.display()
            ));
            continue;
        };
        let off = (first - worker.spawned).as_seconds_f64();
        seen.push(format!("{} {off:+.1} s", worker.name));
        if (off - worker.skew.offset() as f64).abs() > slack {
            problems.push(format!(
                "{}: its clock read {off:+.1} s from the true time, not {:+} s",
                worker.name,
                worker.skew.offset()
            ));
        }
    }
    report.check(
        format!(
            "the skew was in effect: every worker's wall clock (its first log line) was off by \
             its skew ± {}",
            seconds(SLACK)
        ),
        problems.is_empty() && !started.is_empty(),
        if problems.is_empty() {
            seen.join(", ")
        } else {
            summary(started.len(), "skewed as planned", &problems)
        },
    );
}

/// The timestamp that starts the first line of a worker's log.
fn log_time(log: &str) -> Option<DateTime<Utc>> {
    log.lines().find_map(|line| {
        let stamp = line.split_whitespace().next()?;
        DateTime::parse_from_rfc3339(stamp)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    })
}

/// The kills hit what they were meant to: both skewed workers, the leader, jobs holding leases,
/// and never a job's last attempt.
fn check_kills(report: &mut Report, kills: &[Kill]) {
    let victims: BTreeSet<Skew> = kills.iter().map(|k| k.skew).collect();
    let leaders = kills.iter().filter(|k| k.leader).count();
    let orphans: usize = kills.iter().map(|k| k.orphans.len()).sum();
    report.note(format!(
        "kills: {}",
        kills
            .iter()
            .map(|k| format!(
                "{}: {}{} ({} leases)",
                k.round,
                k.victim,
                if k.leader { " leader" } else { "" },
                k.orphans.len()
            ))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    report.check(
        "the kills hit both skewed workers and the leader, holding leases",
        victims.contains(&Skew::Ahead)
            && victims.contains(&Skew::Behind)
            && leaders > 0
            && orphans > 0,
        format!(
            "victims' clocks {:?}, {leaders} leader kills, {orphans} leases orphaned",
            victims.iter().map(|s| s.name()).collect::<Vec<_>>()
        ),
    );
    let spent: Vec<String> = kills
        .iter()
        .flat_map(|k| {
            k.last_attempts
                .iter()
                .map(move |job| format!("job {job} by round {}", k.round))
        })
        .collect();
    report.check(
        "no kill caught a job on its last attempt (the drill's own schedule; such a job would \
         fail by the drill's doing)",
        spent.is_empty(),
        summary(kills.len(), "spared last attempts", &spent),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn kill(victim: &str, frozen: i64, orphans: &[((i64, i64), i64)]) -> Kill {
        Kill {
            round: 1,
            victim: victim.into(),
            skew: Skew::of(victim).unwrap(),
            leader: false,
            frozen_at: at(frozen),
            orphans: orphans.iter().map(|(l, end)| (*l, at(*end))).collect(),
            last_attempts: Vec::new(),
        }
    }

    fn entry(worker: &str, token: i64, when: i64, kind: FailureKind) -> AttemptError {
        AttemptError {
            attempt: 1,
            at: at(when),
            worker: Some(worker.into()),
            fencing_token: token,
            error: "lease expired".into(),
            kind,
        }
    }

    #[test]
    fn clocks_are_named_offset_and_preloaded() {
        assert_eq!(Skew::of("ahead.3"), Some(Skew::Ahead));
        assert_eq!(Skew::of("behind.1"), Some(Skew::Behind));
        assert_eq!(Skew::of("ghost"), None);
        let lib = Path::new("/lib/libfaketime.so.1");
        let env = Skew::Behind.env(lib);
        assert!(env.contains(&("FAKETIME".into(), "-90s".into())), "{env:?}");
        assert!(env.contains(&("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into())));
        assert!(
            Skew::Ahead
                .env(lib)
                .contains(&("FAKETIME".into(), "+90s".into()))
        );
        assert!(Skew::Exact.env(lib).is_empty());
        assert_eq!(Skew::ALL.map(Skew::slot), [0, 1, 2]);
    }

    #[test]
    fn rounds_aim_at_each_skewed_clock_in_turn_then_at_random() {
        assert_eq!(aim(1), Aim::Worker(Skew::Behind));
        assert_eq!(aim(2), Aim::HandOver(Skew::Behind));
        assert_eq!(aim(3), Aim::Any);
        assert_eq!(aim(9), Aim::Any);
    }

    #[test]
    fn only_the_lease_expiries_of_killed_leases_are_explained() {
        let kills = [
            kill("behind.1", 10, &[((7, 1), 12)]),
            kill("ahead.1", 20, &[((8, 2), 19)]),
        ];
        let expired = FailureKind::LeaseExpired;
        assert_eq!(
            explain(&kills, 7, &entry("behind.1", 1, 13, expired)),
            Ok(Cause::Orphan(0))
        );
        assert_eq!(
            explain(&kills, 9, &entry("behind.1", 4, 14, expired)),
            Ok(Cause::LateClaim(0)),
            "a lease the frozen worker did not show yet"
        );
        let live = explain(&kills, 7, &entry("exact.1", 1, 13, expired)).unwrap_err();
        assert!(live.contains("never killed"), "{live}");
        let early = explain(&kills, 7, &entry("ahead.1", 3, 15, expired)).unwrap_err();
        assert!(early.contains("before ahead.1 was killed"), "{early}");
        let ended = explain(&kills, 8, &entry("ahead.1", 2, 21, expired)).unwrap_err();
        assert!(ended.contains("had ended"), "{ended}");
        let error = explain(&kills, 7, &entry("behind.1", 1, 13, FailureKind::Error)).unwrap_err();
        assert!(error.contains("not a lease expiry"), "{error}");
    }

    #[test]
    fn the_leadership_may_change_only_after_its_leader_was_killed() {
        let sample = |s: i64, leader: &str, term: i64, live: bool| LeaderSample {
            now: at(s),
            leader_id: leader.into(),
            term,
            live,
        };
        let kills = [kill("ahead.1", 10, &[])];
        let good = [
            sample(1, "ahead.1", 1, true),
            sample(9, "ahead.1", 1, true),
            sample(11, "ahead.1", 1, false),
            sample(12, "exact.1", 2, true),
        ];
        assert_eq!(leadership_changes(&good, &kills), Ok(2));
        let lapsed = [
            sample(1, "exact.1", 1, true),
            sample(2, "exact.1", 1, false),
        ];
        assert!(leadership_changes(&lapsed, &kills).unwrap_err()[0].contains("lapsed"));
        let renewed_late = [
            sample(1, "behind.1", 1, true),
            sample(2, "behind.1", 2, true),
        ];
        assert!(leadership_changes(&renewed_late, &kills).unwrap_err()[0].contains("which lived"));
        let before_kill = [sample(1, "ahead.1", 1, true), sample(5, "exact.1", 2, true)];
        assert!(leadership_changes(&before_kill, &kills).is_err());
    }

    #[test]
    fn a_log_line_starts_with_the_process_clock() {
        let log = "\u{1b}[2mgarbage\n2026-12-04T02:51:43.675127Z  INFO faultline::worker: x\n";
        assert_eq!(
            log_time(log),
            Some(
                DateTime::parse_from_rfc3339("2026-12-04T02:51:43.675127Z")
                    .unwrap()
                    .into()
            )
        );
        assert_eq!(log_time("no time here\n"), None);
    }
}
