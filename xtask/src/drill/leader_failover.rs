//! `leader-failover`: three workers run a steady load while the elected maintenance leader is
//! SIGKILLed every few seconds and restarted (three processes at all times). A sampler reads the
//! leader row and every live process's `faultline_leader` gauge about every 100 ms: no two
//! processes may report leading in one sample, and a process that reports leading must hold the
//! row. After each kill a new term starts within the leader lease plus an election interval;
//! leases a "ghost" claimer let expire are still rescued in time, and finished jobs seeded past
//! a short retention are still pruned; every job of the load succeeds.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, TimeDelta, Utc};
use faultline_ports::domain::{AttemptError, FailureKind, JobSpec};
use faultline_ports::telemetry::names;
use faultline_ports::{ClaimParams, JobStore, ManualClock};
use faultline_postgres::PgStore;

use super::checks::{Death, death, succeeded_with_effect, summary};
use super::db::{DrillDb, effect_job, steady_load};
use super::fleet::{Fleet, LEASE, ProcId, WorkerSpec};
use super::ledger::Sink;
use super::probe::{Rng, wait_for};
use super::report::seconds;
use super::{Ctx, Drill, Report, SLACK};

mod sampler;
use sampler::{SAMPLE_EVERY, Sample, Sampler, Targets};

pub(crate) const DRILL: Drill = Drill {
    name: "leader-failover",
    proves: "SIGKILLing the maintenance leader under load: never two leaders (leader row and every \
             process's faultline_leader sampled), a new term within the leader lease, expired \
             leases still rescued and finished jobs still pruned in time, no job lost",
    run: |ctx| Box::pin(run(ctx)),
};

const WORKERS: usize = 3;
/// The queue of the seeded finished jobs (no worker claims it; only the pruner touches them).
const SEED_QUEUE: &str = "prune-seed";
/// The lease owner of the jobs nobody runs: their leases expire for the rescuer.
const GHOST: &str = "ghost";
/// The sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Leader kills.
    rounds: usize,
    /// About this long between them.
    every: Duration,
    /// Jobs enqueued per second meanwhile.
    rate: u64,
    /// Leases the ghost lets expire at each kill.
    ghosts: usize,
    /// Finished jobs seeded for the pruner at each kill.
    seeds: usize,
}

impl Plan {
    fn describe(&self, spec: &WorkerSpec, seed: u64) -> String {
        format!(
            "seed {seed}; {WORKERS} workers x {} slots, leader lease {:?} (elections every {:?}), \
             rescue every {:?}, prune every {:?}; about {} jobs/s of 20-200 ms; {} leader kills \
             about every {:?}, each with {} ghost leases expiring just after it and {} cancelled \
             jobs past a {:?} retention",
            spec.concurrency,
            spec.leader_lease,
            spec.election_interval(),
            spec.rescue_interval,
            spec.prune_interval.unwrap_or_default(),
            self.rate,
            self.rounds,
            self.every,
            self.ghosts,
            self.seeds,
            spec.retain_cancelled.unwrap_or_default(),
        )
    }
}

async fn run(ctx: Ctx) -> anyhow::Result<Report> {
    let plan = Plan {
        rounds: ctx.pick(4, 8),
        every: Duration::from_millis(ctx.pick(2_000, 3_000)),
        rate: ctx.pick(100, 150),
        ghosts: ctx.pick(10, 25),
        seeds: ctx.pick(10, 25),
    };
    let mut spec = WorkerSpec::new(8, LEASE);
    spec.prune_interval = Some(Duration::from_millis(500));
    spec.retain_cancelled = Some(Duration::from_millis(500));
    let mut rng = Rng::for_drill();
    let mut report = Report::default();
    report.note(plan.describe(&spec, rng.seed()));

    let db = ctx.database().await?;
    let sink = Sink::start().await?;
    let store = PgStore::new(db.pool().clone());
    let mut fleet = ctx.fleet(db.url())?;
    let targets = Targets::default();
    let mut slots: Vec<(ProcId, u32)> = Vec::new();
    for slot in 0..WORKERS {
        let id = fleet.worker(&format!("w{}.1", slot + 1), &spec, &sink)?;
        targets.add(&fleet, id);
        slots.push((id, 1));
    }
    for (id, _) in &slots {
        fleet.ready(*id).await?;
    }
    let sampler = Sampler::start(db.url(), targets.clone()).await?;
    let stop_load = Arc::new(AtomicBool::new(false));
    let load = steady_load(&store, plan.rate, rng.clone(), stop_load.clone(), |rng| {
        effect_job(rng.between(20, 200), 0)
    });
    ctx.progress(format!(
        "{WORKERS} workers running, load of {} jobs/s",
        plan.rate
    ));

    let mut world = World {
        db: &db,
        store: &store,
        fleet: &mut fleet,
        sink: &sink,
        spec: &spec,
        targets: &targets,
        slots: &mut slots,
    };
    let mut rounds = Vec::new();
    for round in 1..=plan.rounds {
        let done = world.round(round, &plan, &mut rng).await?;
        ctx.progress(format!(
            "round {round}/{}: {}",
            plan.rounds,
            done.describe()
        ));
        rounds.push(done);
    }
    stop_load.store(true, Ordering::SeqCst);
    let mut ids = load.join().await??;
    let ghosts: Vec<Ghost> = rounds.iter().flat_map(|r| r.ghosts.clone()).collect();
    ids.extend(ghosts.iter().map(|g| g.id));
    report.jobs = ids.len();

    catch_up(&ctx, &db, &spec).await;
    let settle = Instant::now();
    let states = db.settled(Duration::from_secs(90)).await?;
    ctx.progress(format!(
        "settled in {:.1}s after the rounds: {:?}",
        settle.elapsed().as_secs_f64(),
        states.as_ref().unwrap_or_else(|s| s)
    ));
    let samples = sampler.stop().await?;

    check_leadership(&mut report, &spec, &rounds, &samples);
    check_rescues(&mut report, &db, &spec, &ghosts).await?;
    check_prunes(&mut report, &spec, &rounds, &samples);
    let rows = db.jobs().await?;
    let ledger = sink.ledger();
    report.lost = succeeded_with_effect(&mut report, &rows, &ledger, &ids);
    report.repeated = ledger.repeated(|_| 1);
    let in_flight: usize = rounds.iter().map(|r| r.death.in_flight.len()).sum();
    report.check(
        "repeated executions at most the jobs in flight at the kills",
        report.repeated <= in_flight,
        format!("{} repeated, {in_flight} in flight", report.repeated),
    );
    report.stale_rejected = Some(fleet.stale_rejected().await?);
    Ok(report)
}

/// Waits until the maintenance has caught up: the ghost's leases rescued, the seeded jobs
/// pruned. A wait that times out is reported; the checks then say what is missing.
async fn catch_up(ctx: &Ctx, db: &DrillDb, spec: &WorkerSpec) {
    let deadline = spec.rescue_wait() + spec.prune_interval.unwrap_or_default() + SLACK;
    let rescued = wait_for(
        "the ghost's expired leases rescued",
        deadline + Duration::from_secs(30),
        async || {
            let left = db.running_under(GHOST).await?;
            Ok(if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{} still leased to the ghost", left.len()))
            })
        },
    )
    .await;
    let pruned = wait_for(
        "the seeded finished jobs pruned",
        deadline + Duration::from_secs(30),
        async || {
            let left: i64 =
                sqlx::query_scalar("select count(*) from faultline_jobs where queue = $1")
                    .bind(SEED_QUEUE)
                    .fetch_one(db.pool())
                    .await?;
            Ok(if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} seeded jobs left"))
            })
        },
    )
    .await;
    for outcome in [rescued, pruned] {
        if let Err(error) = outcome {
            ctx.progress(format!("{error:#}"));
        }
    }
}

/// What the rounds act on.
struct World<'a> {
    db: &'a DrillDb,
    store: &'a PgStore,
    fleet: &'a mut Fleet,
    sink: &'a Sink,
    spec: &'a WorkerSpec,
    targets: &'a Targets,
    slots: &'a mut Vec<(ProcId, u32)>,
}

/// One kill of the leader and what followed.
#[derive(Debug)]
struct Round {
    /// The leader's term when it was killed.
    term: i64,
    /// When the SIGKILL was sent.
    killed_at: Instant,
    /// The killed leader and its jobs in flight.
    death: Death,
    /// From the kill to the first sight of a new term in the leader row.
    failover: Duration,
    /// When the new term was first seen.
    successor_at: Instant,
    successor: String,
    new_term: i64,
    /// The leases the ghost took just before the kill.
    ghosts: Vec<Ghost>,
    /// The finished jobs seeded just before the kill.
    seeded: Seeded,
}

/// A lease nobody renews.
#[derive(Debug, Clone)]
struct Ghost {
    id: i64,
    token: i64,
    expires: DateTime<Utc>,
}

/// Cancelled jobs seeded for the pruner.
#[derive(Debug, Clone)]
struct Seeded {
    ids: BTreeSet<i64>,
    /// When the pruner may delete the last of them (finish + retention), by the database's clock.
    eligible: DateTime<Utc>,
}

impl Round {
    fn describe(&self) -> String {
        format!(
            "killed leader {} (term {}, {} jobs in flight); {} leads in term {} after {}",
            self.death.worker,
            self.term,
            self.death.in_flight.len(),
            self.successor,
            self.new_term,
            seconds(self.failover)
        )
    }
}

impl World<'_> {
    /// Waits for a leader, lets it lead for about `every`, hands the maintenance work (ghost
    /// leases, finished jobs), kills the leader, restarts it under a new name and waits for the
    /// next term.
    async fn round(&mut self, round: usize, plan: &Plan, rng: &mut Rng) -> anyhow::Result<Round> {
        let (slot, term) = self.leader().await?;
        // The fault schedule itself: about every `every`.
        let pause = plan
            .every
            .mul_f64(0.8 + 0.4 * (rng.between(0, 1_000) as f64 / 1_000.0));
        // The ghost's leases end an election interval after the kill: while nobody leads.
        let ghost = GhostPlan {
            count: plan.ghosts,
            ahead: pause,
            lease: self.spec.election_interval(),
            priority: -i16::try_from(round)?,
        };
        let ghosts = ghost_leases(self.db, self.store, &ghost, rng).await?;
        tokio::time::sleep(pause).await;
        let seeded = seed_finished(self.store, plan.seeds, self.spec).await?;
        let (id, incarnation) = self.slots[slot];
        self.targets.killed(self.fleet.name(id));
        let killed_at = Instant::now();
        let status = self.fleet.kill(id).await?;
        // Reaped: its port may be reused by a new process, so it is sampled no more.
        self.targets.remove(self.fleet.name(id));
        let death = death(self.fleet, self.db, id, status).await?;
        let next = format!("w{}.{}", slot + 1, incarnation + 1);
        let restarted = self.fleet.worker(&next, self.spec, self.sink)?;
        self.targets.add(self.fleet, restarted);
        self.slots[slot] = (restarted, incarnation + 1);
        let store = self.store;
        let bound = self.spec.failover_wait() + SLACK;
        let (successor, new_term) = wait_for(
            "a new leader after the kill",
            bound + Duration::from_secs(30),
            async || {
                Ok(match store.leader_get().await? {
                    Some(l) if l.term > term && l.remaining_ms > 0 => Ok((l.leader_id, l.term)),
                    other => Err(format!("leadership {other:?}")),
                })
            },
        )
        .await?;
        let successor_at = Instant::now();
        // Three processes again before the next round.
        self.fleet.ready(restarted).await?;
        Ok(Round {
            term,
            killed_at,
            death,
            failover: successor_at.duration_since(killed_at),
            successor_at,
            successor,
            new_term,
            ghosts,
            seeded,
        })
    }

    /// The slot of the current leader and its term: the leader row is live and names one of
    /// the running workers, and that worker's `/metrics` says it leads.
    async fn leader(&mut self) -> anyhow::Result<(usize, i64)> {
        let bound = self.spec.failover_wait() + SLACK + Duration::from_secs(30);
        let (store, fleet, slots) = (self.store, &*self.fleet, &*self.slots);
        wait_for("a leader among the workers", bound, async || {
            let Some(l) = store.leader_get().await? else {
                return Ok(Err("nobody leads yet".into()));
            };
            let Some(slot) = slots
                .iter()
                .position(|(id, _)| fleet.name(*id) == l.leader_id)
            else {
                return Ok(Err(format!("the row names {}", l.leader_id)));
            };
            let gauge = fleet.scrape(slots[slot].0).await?.value(names::LEADER, &[]);
            Ok(if l.remaining_ms > 0 && gauge == 1.0 {
                Ok((slot, l.term))
            } else {
                Err(format!("{} term {}, gauge {gauge}", l.leader_id, l.term))
            })
        })
        .await
    }
}

/// Seeds `count` cancelled jobs (in a queue no worker claims) for the pruner.
async fn seed_finished(store: &PgStore, count: usize, spec: &WorkerSpec) -> anyhow::Result<Seeded> {
    let specs: Vec<JobSpec> = (0..count)
        .map(|_| JobSpec::new("seed", serde_json::json!({})).queue(SEED_QUEUE))
        .collect();
    let mut ids = BTreeSet::new();
    let mut finished = None;
    for outcome in store.job_enqueue_many(&specs).await? {
        let faultline_ports::EnqueueOutcome::Created { id } = outcome else {
            bail!("seed enqueue: {outcome:?}");
        };
        let job = store.job_cancel(id).await.context("cancel a seeded job")?;
        finished = finished.max(job.finished_at);
        ids.insert(id);
    }
    let retain = spec
        .retain_cancelled
        .context("the drill sets a retention")?;
    Ok(Seeded {
        ids,
        eligible: finished.context("seeded jobs are finished")? + TimeDelta::from_std(retain)?,
    })
}

/// What the ghost claims in one round.
#[derive(Debug, Clone, Copy)]
struct GhostPlan {
    /// How many leases.
    count: usize,
    /// Its jobs are due this long after their enqueue.
    ahead: Duration,
    /// Its lease, from its (ahead) clock.
    lease: Duration,
    /// Its jobs' priority: below every earlier round's (whose jobs, rescued, may still wait
    /// their turn), so that its claim takes exactly this round's.
    priority: i16,
}

/// Enqueues `plan.count` jobs due in `plan.ahead` and claims them at once as the ghost, with a
/// clock that far ahead (the jobs are not due yet for the workers, so no worker races the ghost
/// for them), with a lease of `plan.lease`: the leases end about `ahead + lease` from now (in
/// real time) and are never renewed.
async fn ghost_leases(
    db: &DrillDb,
    store: &PgStore,
    plan: &GhostPlan,
    rng: &mut Rng,
) -> anyhow::Result<Vec<Ghost>> {
    let count = plan.count;
    let specs: Vec<JobSpec> = (0..count)
        .map(|_| {
            let mut job = effect_job(rng.between(20, 200), 0);
            job.delay_ms = Some(i64::try_from(plan.ahead.as_millis())?);
            job.priority = plan.priority;
            Ok(job)
        })
        .collect::<anyhow::Result<_>>()?;
    let ids = db.enqueue(&specs).await?;
    let due: DateTime<Utc> =
        sqlx::query_scalar("select max(next_run_at) from faultline_jobs where id = any($1)")
            .bind(&ids)
            .fetch_one(db.pool())
            .await
            .context("the ghost jobs' due time")?;
    let ghost = PgStore::with_clock(store.pool().clone(), Arc::new(ManualClock::new(due)));
    let claimed = ghost
        .job_claim(&ClaimParams {
            queues: vec![JobSpec::DEFAULT_QUEUE.to_owned()],
            kinds: Vec::new(),
            limit: u32::try_from(count)?,
            lease_ms: i64::try_from(plan.lease.as_millis())?,
            worker_id: GHOST.to_owned(),
            claim_id: None,
        })
        .await
        .context("the ghost's claim")?;
    let mine: BTreeSet<i64> = ids.iter().copied().collect();
    if claimed.len() != count || claimed.iter().any(|job| !mine.contains(&job.id)) {
        let got: Vec<i64> = claimed.iter().map(|job| job.id).collect();
        bail!("the ghost claimed {got:?}, not its jobs {ids:?}");
    }
    claimed
        .into_iter()
        .map(|job| {
            Ok(Ghost {
                id: job.id,
                token: job.fencing_token,
                expires: job.lease_expires_at.context("a claimed job has a lease")?,
            })
        })
        .collect()
}

/// Checks the leadership from the samples and the rounds.
fn check_leadership(report: &mut Report, spec: &WorkerSpec, rounds: &[Round], samples: &[Sample]) {
    let complete = samples.iter().filter(|s| s.unscraped.is_empty()).count();
    let mut gap = Duration::ZERO;
    for pair in samples.windows(2) {
        gap = gap.max(pair[1].at.duration_since(pair[0].at));
    }
    report.note(format!(
        "{} samples ({complete} with every live process scraped), longest gap between samples \
         {}, {} database reads failed",
        samples.len(),
        seconds(gap),
        samples.iter().filter(|s| s.db_failed).count()
    ));
    let sampled = samples.len() >= rounds.len() * 5 && complete * 10 >= samples.len() * 9;
    report.check(
        "the sampler saw the whole drill (≥ 90% of samples scraped every live process)",
        sampled,
        format!("{complete} of {} complete", samples.len()),
    );
    let two: Vec<String> = samples
        .iter()
        .filter(|s| s.leading.len() >= 2)
        .map(Sample::describe)
        .collect();
    report.check(
        "never two leaders: no sample had two processes reporting faultline_leader 1",
        two.is_empty() && !samples.is_empty(),
        summary(samples.len(), "had at most one", &two),
    );
    let usurpers: Vec<String> = samples
        .iter()
        .filter(|s| !s.db_failed && s.leading.iter().any(|p| !s.holds(p)))
        .map(Sample::describe)
        .collect();
    report.check(
        "a process reporting leader holds the leader row (live, its id) in that sample",
        usurpers.is_empty(),
        summary(samples.len(), "agreed", &usurpers),
    );
    let steady: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.unscraped.is_empty() && !s.db_failed && !in_failover(rounds, s.at))
        .skip_while(|s| s.leading.is_empty())
        .collect();
    // Outside a failover the leader row is held, live, by a running process (a killed leader's
    // row stays live only until its lease ends, which lies inside the failover window).
    let unheld: Vec<String> = steady
        .iter()
        .filter(|s| !s.row_live())
        .map(|s| s.describe())
        .collect();
    report.check(
        "exactly one leader in every sample outside the failovers (kill to new term): the row \
         is held, live",
        unheld.is_empty() && !steady.is_empty(),
        summary(steady.len(), "had a live holder", &unheld),
    );
    // The holder itself may report not leading for a moment: a renewal answered later than its
    // safety margin allows makes it stand down until the next one. That is the conservative
    // side; it must not last longer than a failover.
    let stretch = longest_unconfirmed(&steady);
    let confirm = spec.failover_wait() + SLACK;
    report.check(
        "the row's holder reports faultline_leader 1 again within the failover bound (lease + \
         election interval) whenever it stands down",
        stretch <= confirm,
        format!(
            "{} of {} samples had no process reporting; longest stretch {} (≤ {})",
            steady.iter().filter(|s| s.leading.is_empty()).count(),
            steady.len(),
            seconds(stretch),
            seconds(confirm)
        ),
    );
    let bound = spec.failover_wait() + SLACK;
    let kills: Vec<String> = rounds.iter().map(Round::describe).collect();
    report.note(format!("rounds: {}", kills.join("; ")));
    let slowest = rounds.iter().map(|r| r.failover).max().unwrap_or_default();
    report.check_eq(
        "every kill was followed by a new term with another leader",
        rounds.len(),
        rounds
            .iter()
            .filter(|r| r.new_term > r.term && r.successor != r.death.worker)
            .count(),
    );
    report.recovery(
        "a new leader after each kill, slowest of the rounds",
        slowest,
        bound,
    );
}

/// The longest run of consecutive samples in which no process reported leading (from the first
/// such sample to the next that had a leader, or to the last sample).
fn longest_unconfirmed(samples: &[&Sample]) -> Duration {
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    for sample in samples {
        match (sample.leading.is_empty(), since) {
            (true, None) => since = Some(sample.at),
            (false, Some(start)) => {
                longest = longest.max(sample.at.duration_since(start));
                since = None;
            }
            _ => {}
        }
    }
    if let (Some(start), Some(last)) = (since, samples.last()) {
        longest = longest.max(last.at.duration_since(start));
    }
    longest
}

/// Whether `at` lies between a kill and the first sight of its successor's term.
fn in_failover(rounds: &[Round], at: Instant) -> bool {
    rounds
        .iter()
        .any(|r| at >= r.killed_at && at <= r.successor_at + SAMPLE_EVERY)
}

/// Checks that every ghost lease was rescued within the rescue wait of its expiry, by the
/// attempt history the rescue wrote (its time is the database's).
async fn check_rescues(
    report: &mut Report,
    db: &DrillDb,
    spec: &WorkerSpec,
    ghosts: &[Ghost],
) -> anyhow::Result<()> {
    let ids: Vec<i64> = ghosts.iter().map(|g| g.id).collect();
    let rows: Vec<(i64, sqlx::types::Json<Vec<AttemptError>>)> =
        sqlx::query_as("select id, errors from faultline_jobs where id = any($1)")
            .bind(&ids)
            .fetch_all(db.pool())
            .await
            .context("read the ghost jobs' attempt history")?;
    let bound = spec.rescue_wait() + SLACK;
    let mut problems = Vec::new();
    let mut slowest = TimeDelta::zero();
    for ghost in ghosts {
        let entry =
            rows.iter()
                .find(|(id, _)| *id == ghost.id)
                .and_then(|(_, errors)| {
                    errors.0.iter().find(|e| {
                        e.fencing_token == ghost.token && e.kind == FailureKind::LeaseExpired
                    })
                });
        let Some(entry) = entry else {
            problems.push(format!("job {}: no rescue of the ghost's lease", ghost.id));
            continue;
        };
        let delay = entry.at - ghost.expires;
        slowest = slowest.max(delay);
        if delay > TimeDelta::from_std(bound)? || delay < TimeDelta::zero() {
            problems.push(format!(
                "job {}: rescued {} ms after its expiry",
                ghost.id,
                delay.num_milliseconds()
            ));
        }
    }
    report.check(
        format!(
            "the ghost's expired leases were rescued within {} of their expiry (leader failover \
             + election + a rescuer round + slack)",
            seconds(bound)
        ),
        problems.is_empty() && !ghosts.is_empty(),
        format!(
            "{}; slowest {} ms",
            summary(ghosts.len(), "rescued in time", &problems),
            slowest.num_milliseconds()
        ),
    );
    Ok(())
}

/// Checks that each round's seeded finished jobs were deleted within a prune round (after a
/// failover) of becoming eligible, by the database's clock of the first sample without them.
fn check_prunes(report: &mut Report, spec: &WorkerSpec, rounds: &[Round], samples: &[Sample]) {
    let interval = spec.prune_interval.unwrap_or_default();
    let bound = spec.failover_wait() + interval + SLACK;
    let mut problems = Vec::new();
    let mut slowest = TimeDelta::zero();
    for (n, round) in rounds.iter().enumerate() {
        let seeded = &round.seeded;
        let gone = samples.iter().filter(|s| !s.db_failed).find(|s| {
            s.now >= seeded.eligible && !s.seeded.iter().any(|id| seeded.ids.contains(id))
        });
        let Some(gone) = gone else {
            problems.push(format!(
                "round {}: its seeded jobs were never seen gone",
                n + 1
            ));
            continue;
        };
        let delay = gone.now - seeded.eligible;
        slowest = slowest.max(delay);
        if delay > TimeDelta::from_std(bound).unwrap_or(TimeDelta::MAX) {
            problems.push(format!(
                "round {}: pruned {} ms after they were due",
                n + 1,
                delay.num_milliseconds()
            ));
        }
    }
    report.check(
        format!(
            "each round's finished jobs past retention were pruned within {} (leader failover + \
             election + a prune round + slack)",
            seconds(bound)
        ),
        problems.is_empty() && !rounds.is_empty(),
        format!(
            "{}; slowest {} ms",
            summary(rounds.len(), "pruned in time", &problems),
            slowest.num_milliseconds()
        ),
    );
}
