//! Exactly-once effects on PostgreSQL, as a property: several workers run the same job, each
//! writing an effect and then its outcome with a fenced write in one transaction
//! (`PgStore::job_complete_in` / `job_fail_in` / `job_snooze_in`), while leases expire and the
//! rescuer hands the job on. Whatever the interleaving, the committed effects are exactly those
//! of the fenced writes that were accepted and committed, at most one of them ends the job, and a
//! finished job's effect is the one of its final lease. `PROPTEST_CASES` overrides the case count.

use std::fmt;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use faultline_domain::{FailureKind, JobSpec, JobState, RetryPolicy};
use faultline_ports::{ClaimParams, Failure, JobStore, LeaseRef, ManualClock, StoreError};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use sqlx::{PgPool, Postgres, Transaction};

const ACTORS: usize = 3;
const LEASE_MS: i64 = 30_000;

/// How an actor's attempt ends, decided inside its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Complete,
    FailPermanently,
    /// Back to the queue, due at once: another attempt may follow and commit its own effect.
    Snooze,
}

impl Decision {
    fn name(self) -> &'static str {
        match self {
            Decision::Complete => "complete",
            Decision::FailPermanently => "fail",
            Decision::Snooze => "snooze",
        }
    }
}

/// One actor's script, run in this order; steps whose precondition is missing (no lease, no
/// transaction) do nothing.
#[derive(Debug, Clone, Copy)]
struct Script {
    decision: Decision,
    commit: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Claim,
    /// Begin a transaction and write the effect.
    Effect,
    /// The fenced write of the decision, inside the transaction.
    Write,
    /// Commit (or roll back, per the script; always roll back after a refused write).
    Finish,
}

const STEPS: [Step; 4] = [Step::Claim, Step::Effect, Step::Write, Step::Finish];

/// Who moves next: an actor (its next step), or the clock (the lease ends and the rescuer runs).
#[derive(Clone, Copy)]
enum Move {
    Actor(usize),
    Expire,
}

impl fmt::Debug for Move {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Move::Actor(i) => write!(f, "w{i}"),
            Move::Expire => f.write_str("expire"),
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    scripts: Vec<Script>,
    moves: Vec<Move>,
}

fn decision() -> impl Strategy<Value = Decision> {
    prop_oneof![
        3 => Just(Decision::Complete),
        1 => Just(Decision::FailPermanently),
        2 => Just(Decision::Snooze),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let scripts = vec(
        (decision(), prop::bool::weighted(0.8))
            .prop_map(|(decision, commit)| Script { decision, commit }),
        ACTORS,
    );
    // Every actor's steps, plus up to four expiries, in a random order.
    let moves = vec(0..ACTORS + 1, 0..4).prop_flat_map(|extra| {
        let mut moves: Vec<Move> = (0..ACTORS)
            .flat_map(|actor| std::iter::repeat_n(Move::Actor(actor), STEPS.len()))
            .collect();
        moves.extend(
            extra
                .into_iter()
                .filter(|&pick| pick == ACTORS)
                .map(|_| Move::Expire),
        );
        Just(moves).prop_shuffle()
    });
    (scripts, moves).prop_map(|(scripts, moves)| Case { scripts, moves })
}

/// An actor's progress through its script.
#[derive(Default)]
struct Actor {
    next_step: usize,
    lease: Option<LeaseRef>,
    tx: Option<Transaction<'static, Postgres>>,
    /// The fenced write was accepted (the transaction holds it until it ends).
    accepted: bool,
    /// The accepted write and the effect were committed.
    committed: bool,
}

struct World {
    store: PgStore,
    pool: PgPool,
    clock: ManualClock,
    queue: String,
    job: i64,
    actors: Vec<Actor>,
    trace: Vec<String>,
}

impl World {
    async fn step(&mut self, case: &Case, who: usize) -> Result<(), String> {
        let actor = &mut self.actors[who];
        let Some(&step) = STEPS.get(actor.next_step) else {
            return Ok(());
        };
        actor.next_step += 1;
        let script = case.scripts[who];
        let note = match step {
            Step::Claim => {
                let claimed = self
                    .store
                    .job_claim(&ClaimParams {
                        queues: vec![self.queue.clone()],
                        kinds: vec![],
                        limit: 1,
                        lease_ms: LEASE_MS,
                        worker_id: format!("w{who}"),
                        claim_id: None,
                    })
                    .await
                    .map_err(|e| format!("claim: {e}"))?;
                actor.lease = claimed.first().map(|job| LeaseRef {
                    job_id: job.id,
                    token: job.fencing_token,
                });
                format!("claim -> {:?}", actor.lease.map(|l| l.token))
            }
            Step::Effect => {
                let Some(lease) = actor.lease else {
                    return Ok(());
                };
                let mut tx = self.pool.begin().await.map_err(|e| e.to_string())?;
                // A surprise wait on a lock fails the case instead of hanging it.
                sqlx::query("set local lock_timeout = '10s'")
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query("insert into effects (job_id, token, decision) values ($1, $2, $3)")
                    .bind(lease.job_id)
                    .bind(lease.token)
                    .bind(script.decision.name())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| format!("effect: {e}"))?;
                actor.tx = Some(tx);
                "effect written".to_owned()
            }
            Step::Write => {
                let (Some(lease), Some(tx)) = (actor.lease, actor.tx.as_mut()) else {
                    return Ok(());
                };
                let written = match script.decision {
                    Decision::Complete => self.store.job_complete_in(tx, lease, None).await,
                    Decision::FailPermanently => {
                        let failure = Failure {
                            error: format!("w{who} gave up"),
                            kind: FailureKind::Error,
                            retryable: false,
                            retry_delay_ms: None,
                        };
                        self.store.job_fail_in(tx, lease, &failure).await
                    }
                    Decision::Snooze => self.store.job_snooze_in(tx, lease, 0).await,
                };
                match written {
                    Ok(job) => {
                        actor.accepted = true;
                        format!("{} -> {}", script.decision.name(), job.state)
                    }
                    Err(StoreError::StaleLease { .. }) => {
                        format!("{} -> stale", script.decision.name())
                    }
                    Err(other) => return Err(format!("fenced write: {other}")),
                }
            }
            Step::Finish => {
                let Some(tx) = actor.tx.take() else {
                    return Ok(());
                };
                if actor.accepted && script.commit {
                    tx.commit().await.map_err(|e| format!("commit: {e}"))?;
                    actor.committed = true;
                    "commit".to_owned()
                } else {
                    tx.rollback().await.map_err(|e| format!("rollback: {e}"))?;
                    "rollback".to_owned()
                }
            }
        };
        self.trace.push(format!("w{who} {note}"));
        Ok(())
    }

    async fn expire(&mut self) -> Result<(), String> {
        self.clock.advance_ms(LEASE_MS + 1);
        let rescued = self
            .store
            .job_rescue_expired(100)
            .await
            .map_err(|e| format!("rescue: {e}"))?;
        let ours = rescued.iter().filter(|job| job.id == self.job).count();
        self.trace.push(format!("expire: rescued {ours}"));
        Ok(())
    }

    /// Ends every open transaction (as a crash would: rolled back).
    async fn abandon(&mut self) {
        for actor in &mut self.actors {
            if let Some(tx) = actor.tx.take() {
                let _ = tx.rollback().await;
            }
        }
    }

    async fn check(&self, case: &Case) -> Result<(), String> {
        let committed: Vec<(i64, String)> =
            sqlx::query_as("select token, decision from effects where job_id = $1 order by token")
                .bind(self.job)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| e.to_string())?;
        let mut expected: Vec<(i64, String)> = self
            .actors
            .iter()
            .enumerate()
            .filter(|(_, actor)| actor.committed)
            .map(|(who, actor)| {
                let token = actor.lease.map_or(-1, |lease| lease.token);
                (token, case.scripts[who].decision.name().to_owned())
            })
            .collect();
        expected.sort();
        if committed != expected {
            return Err(format!(
                "committed effects {committed:?}, but the accepted and committed writes were {expected:?}"
            ));
        }
        let finals: Vec<&(i64, String)> = committed
            .iter()
            .filter(|(_, decision)| decision != "snooze")
            .collect();
        if finals.len() > 1 {
            return Err(format!("two effects ended the job: {committed:?}"));
        }
        let job = self
            .store
            .job_get(self.job)
            .await
            .map_err(|e| e.to_string())?;
        let terminal = matches!(job.state, JobState::Succeeded | JobState::Failed);
        match (terminal, finals.first()) {
            (true, Some((token, decision))) => {
                let state = if decision == "complete" {
                    JobState::Succeeded
                } else {
                    JobState::Failed
                };
                if *token != job.fencing_token || state != job.state {
                    return Err(format!(
                        "the job ended {} with token {}, its committed final effect is {decision} by token {token}",
                        job.state, job.fencing_token
                    ));
                }
            }
            (false, None) => {}
            (true, None) => {
                return Err(format!(
                    "the job ended {} without a committed effect",
                    job.state
                ));
            }
            (false, Some(effect)) => {
                return Err(format!(
                    "effect {effect:?} committed, yet the job is {}",
                    job.state
                ));
            }
        }
        Ok(())
    }
}

async fn run_case(
    db: &TestDb,
    clock: &ManualClock,
    number: u64,
    case: &Case,
) -> Result<(), String> {
    let store = PgStore::with_clock(db.pool().clone(), Arc::new(clock.clone()));
    let queue = format!("case-{number}");
    let spec = JobSpec {
        queue: queue.clone(),
        max_attempts: 100,
        retry_policy: RetryPolicy {
            base_ms: 1,
            cap_ms: 1,
            jitter: 0.0,
        },
        ..JobSpec::new("transfer", serde_json::json!({}))
    };
    let job = store
        .job_enqueue(&spec)
        .await
        .map_err(|e| e.to_string())?
        .job
        .id;
    let mut world = World {
        store,
        pool: db.pool().clone(),
        clock: clock.clone(),
        queue,
        job,
        actors: (0..ACTORS).map(|_| Actor::default()).collect(),
        trace: Vec::new(),
    };
    let mut outcome = Ok(());
    for &step in &case.moves {
        outcome = match step {
            Move::Actor(who) => world.step(case, who).await,
            Move::Expire => world.expire().await,
        };
        if outcome.is_err() {
            break;
        }
    }
    world.abandon().await;
    let outcome = match outcome {
        Ok(()) => world.check(case).await,
        Err(err) => Err(err),
    };
    outcome.map_err(|err| format!("{err}\ntrace:\n  {}", world.trace.join("\n  ")))
}

#[test]
fn two_committed_effects_never_end_one_job() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let db = runtime.block_on(async {
        let db = TestDb::fresh().await;
        sqlx::query(
            "create table effects (job_id int8 not null, token int8 not null, decision text not null)",
        )
        .execute(db.pool())
        .await
        .unwrap();
        db
    });
    // One database for the whole test, a queue per case; the clock only moves forward.
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
    let counter = std::sync::atomic::AtomicU64::new(0);
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 1_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |case| {
        let number = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        runtime
            .block_on(run_case(&db, &clock, number, &case))
            .map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, case)) => {
            panic!("minimal case: {case:#?}\n{}", reason.message())
        }
        Err(TestError::Abort(reason)) => panic!("aborted: {}", reason.message()),
    }
}
