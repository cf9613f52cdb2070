//! Handlers that write their effects and their outcome in one transaction
//! (`PgStore::job_complete_in` / `job_fail_in` / `job_snooze_in` + `Outcome::Recorded`): the
//! runtime writes nothing more, and a handler whose lease was lost rolls its effects back.

use std::sync::Arc;
use std::time::Duration;

use faultline_ports::domain::{FailureKind, JobSpec, JobState};
use faultline_ports::{Failure, JobStore, ManualClock, StoreError};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use faultline_worker::{Handler, JobContext, Outcome, Registry, Worker};
use serde_json::json;
use sqlx::PgPool;

use crate::support::{Gate, config, enqueue, eventually, spec, t0};

/// What the transactional handler decides inside its transaction.
#[derive(Debug, Clone, Copy)]
enum Decision {
    Complete,
    FailPermanently,
    Snooze,
}

/// Inserts an effect row (job, token, worker), optionally waits at a gate with the effect
/// written but not committed, then records `decision` fenced in the same transaction and commits.
struct Transactional {
    store: Arc<PgStore>,
    worker: &'static str,
    decision: Decision,
    /// Waited at after the effect is written (before the fenced write).
    before_write: Option<Gate>,
    /// Waited at after the fenced write, before the commit (the job's row stays locked).
    before_commit: Option<Gate>,
}

impl Transactional {
    fn new(store: &Arc<PgStore>, worker: &'static str, decision: Decision) -> Self {
        Self {
            store: store.clone(),
            worker,
            decision,
            before_write: None,
            before_commit: None,
        }
    }

    async fn attempt(&self, ctx: &JobContext) -> Result<Outcome, sqlx::Error> {
        let mut tx = self.store.pool().begin().await?;
        sqlx::query("insert into effects (job_id, token, worker) values ($1, $2, $3)")
            .bind(ctx.id)
            .bind(ctx.fencing_token)
            .bind(self.worker)
            .execute(&mut *tx)
            .await?;
        if let Some(gate) = &self.before_write {
            gate.wait().await;
        }
        let lease = ctx.lease();
        let written = match self.decision {
            Decision::Complete => {
                let result = Some(json!({ "by": self.worker }));
                self.store.job_complete_in(&mut tx, lease, result).await
            }
            Decision::FailPermanently => {
                let failure = Failure {
                    error: format!("refused by {}", self.worker),
                    kind: FailureKind::Error,
                    retryable: false,
                    retry_delay_ms: None,
                };
                self.store.job_fail_in(&mut tx, lease, &failure).await
            }
            Decision::Snooze => self.store.job_snooze_in(&mut tx, lease, 60_000).await,
        };
        match written {
            Ok(job) => {
                if let Some(gate) = &self.before_commit {
                    gate.wait().await;
                }
                tx.commit().await?;
                Ok(Outcome::recorded(job))
            }
            Err(StoreError::StaleLease { .. }) => {
                tx.rollback().await?;
                Ok(Outcome::LeaseLost)
            }
            Err(other) => Ok(Outcome::Retry {
                error: other.to_string(),
                delay: None,
            }),
        }
    }
}

#[async_trait::async_trait]
impl Handler for Transactional {
    async fn run(&self, ctx: JobContext) -> Outcome {
        self.attempt(&ctx)
            .await
            .unwrap_or_else(|err| Outcome::Retry {
                error: err.to_string(),
                delay: None,
            })
    }
}

/// A fresh database with an `effects` table (deliberately without a unique constraint: only
/// the fenced write inside the transaction keeps a stale attempt's effect out), and a store on a
/// manual clock.
async fn pg_with_effects() -> (TestDb, Arc<PgStore>, ManualClock) {
    let db = TestDb::fresh().await;
    sqlx::query(
        "create table effects (job_id int8 not null, token int8 not null, worker text not null)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let clock = ManualClock::new(t0());
    let store = PgStore::with_clock(db.pool().clone(), Arc::new(clock.clone()));
    (db, Arc::new(store), clock)
}

/// The committed effects of `id`: (token, worker), in token order.
async fn effects(pool: &PgPool, id: i64) -> Vec<(i64, String)> {
    sqlx::query_as("select token, worker from effects where job_id = $1 order by token")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A worker named `id` whose only kind, `tx`, runs `handler`.
fn tx_worker(store: &Arc<PgStore>, id: &str, handler: Transactional) -> Worker<PgStore> {
    let mut registry = Registry::new();
    registry.register("tx", handler);
    Worker::new(store.clone(), registry, config(id)).unwrap()
}

#[tokio::test]
async fn a_recorded_outcome_commits_with_its_effects_and_nothing_more_is_written() {
    for (decision, state) in [
        (Decision::Complete, JobState::Succeeded),
        (Decision::FailPermanently, JobState::Failed),
        (Decision::Snooze, JobState::Queued),
    ] {
        let (db, store, _clock) = pg_with_effects().await;
        let id = enqueue(&*store, spec("tx")).await;
        let handler = Transactional::new(&store, "w1", decision);
        let mut worker = tx_worker(&store, "w1", handler);
        let report = worker.run_once().await.unwrap();
        let counts = report.counts;
        assert_eq!(report.claimed, 1, "{decision:?}");
        assert_eq!(
            (
                counts.completed,
                counts.failed,
                counts.snoozed,
                counts.retried
            ),
            match decision {
                Decision::Complete => (1, 0, 0, 0),
                Decision::FailPermanently => (0, 1, 0, 0),
                Decision::Snooze => (0, 0, 1, 0),
            },
            "{decision:?}: counted as what the handler recorded"
        );
        assert_eq!(
            counts.stale_writes_rejected, 0,
            "{decision:?}: no second write"
        );
        assert_eq!(counts.writes_dropped, 0, "{decision:?}");

        let job = store.job_get(id).await.unwrap();
        assert_eq!(job.state, state, "{decision:?}");
        assert_eq!(job.lease_expires_at, None, "{decision:?}");
        match decision {
            Decision::Complete => assert_eq!(job.result, Some(json!({ "by": "w1" }))),
            Decision::FailPermanently => {
                assert_eq!(job.last_error.as_deref(), Some("refused by w1"));
            }
            Decision::Snooze => {
                assert_eq!(job.attempts, 0, "a snooze gives the attempt back");
                assert_eq!(job.next_run_at, t0() + chrono::TimeDelta::seconds(60));
            }
        }
        assert_eq!(effects(db.pool(), id).await, [(1, "w1".to_owned())]);
    }
}

#[tokio::test]
async fn a_handler_paused_past_its_lease_rolls_back_its_effects() {
    for decision in [
        Decision::Complete,
        Decision::FailPermanently,
        Decision::Snooze,
    ] {
        let (db, store, clock) = pg_with_effects().await;
        let id = enqueue(&*store, spec("tx")).await;

        // The first worker's handler writes its effect, then stalls (a GC pause, SIGSTOP, a
        // slow network) before its fenced write.
        let pause = Gate::new();
        let mut stalled = Transactional::new(&store, "w1", decision);
        stalled.before_write = Some(pause.clone());
        let mut first = tx_worker(&store, "w1", stalled);
        assert_eq!(first.claim_once().await.unwrap(), 1);

        // Its lease runs out; the job is recovered and a second worker runs it to the end.
        clock.advance_ms(30_001);
        assert_eq!(store.job_rescue_expired(10).await.unwrap().len(), 1);
        clock.advance_ms(2_000); // past the retry backoff (1 s +- 10 %)
        let second_handler = Transactional::new(&store, "w2", Decision::Complete);
        let mut second = tx_worker(&store, "w2", second_handler);
        let report = second.run_once().await.unwrap();
        assert_eq!((report.claimed, report.counts.completed), (1, 1));

        // The first handler wakes up: its fenced write is refused, its effect rolled back, and
        // its worker writes nothing.
        pause.open();
        let report = first.settle().await;
        assert_eq!(report.counts.stale_writes_rejected, 1, "{decision:?}");
        assert_eq!(
            (
                report.counts.completed,
                report.counts.failed,
                report.counts.snoozed,
                report.counts.retried
            ),
            (0, 0, 0, 0),
            "{decision:?}"
        );

        let job = store.job_get(id).await.unwrap();
        assert_eq!(
            (job.state, job.fencing_token, job.result),
            (JobState::Succeeded, 2, Some(json!({ "by": "w2" }))),
            "{decision:?}"
        );
        assert_eq!(
            effects(db.pool(), id).await,
            [(2, "w2".to_owned())],
            "{decision:?}: only the lease holder's effect exists"
        );
    }
}

#[tokio::test]
async fn a_heartbeat_waiting_on_the_handlers_transaction_does_not_hide_its_outcome() {
    let (db, store, _clock) = pg_with_effects().await;
    let id = enqueue(&*store, spec("tx")).await;
    let commit = Gate::new();
    let mut handler = Transactional::new(&store, "w1", Decision::Complete);
    handler.before_commit = Some(commit.clone());
    let mut worker = tx_worker(&store, "w1", handler);
    assert_eq!(worker.claim_once().await.unwrap(), 1);

    // The handler's fenced write holds the job's row; wait until it has happened.
    eventually(
        "the fenced write inside the transaction",
        Duration::from_secs(10),
        || {
            let pool = db.pool().clone();
            async move {
                let locked: bool = sqlx::query_scalar(
                    "select exists (select 1 from pg_stat_activity
                 where datname = current_database() and state = 'idle in transaction'
                   and query like '%faultline_jobs%')",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                locked
            }
        },
    )
    .await;

    // A heartbeat now waits on that row lock; once the handler commits it finds the job
    // finished, yet the handler's recorded outcome still counts as the completion it is.
    let opener = {
        let pool = db.pool().clone();
        tokio::spawn(async move {
            eventually(
                "the heartbeat waiting on the row lock",
                Duration::from_secs(10),
                || {
                    let pool = pool.clone();
                    async move {
                        sqlx::query_scalar::<_, bool>(
                            "select exists (select 1 from pg_stat_activity
                         where datname = current_database() and wait_event_type = 'Lock')",
                        )
                        .fetch_one(&pool)
                        .await
                        .unwrap()
                    }
                },
            )
            .await;
            commit.open();
        })
    };
    let heartbeat = worker.heartbeat_once().await.unwrap();
    opener.await.unwrap();
    assert_eq!(heartbeat.lost, 1, "the heartbeat ran after the commit");
    let report = worker.settle().await;
    assert_eq!(report.counts.completed, 1);
    let job = store.job_get(id).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(effects(db.pool(), id).await, [(1, "w1".to_owned())]);
}

#[tokio::test]
async fn a_recorded_outcome_for_another_lease_is_a_handler_bug_and_the_attempt_is_retried() {
    let (_db, store, _clock) = pg_with_effects().await;
    let id = enqueue(&*store, spec("confused")).await;
    let other = enqueue(&*store, JobSpec::new("idle", json!({}))).await;
    let bogus = store.job_get(other).await.unwrap();
    let mut registry = Registry::new();
    registry.register(
        "confused",
        crate::support::handler(move |_| {
            let bogus = bogus.clone();
            async move { Outcome::recorded(bogus) }
        }),
    );
    let mut worker = Worker::new(store.clone(), registry, config("w1")).unwrap();
    // Claims both; the `idle` kind has no handler and fails permanently.
    let report = worker.run_once().await.unwrap();
    assert_eq!(report.claimed, 2);
    let job = store.job_get(id).await.unwrap();
    assert_eq!(job.state, JobState::Queued, "retried, not left running");
    assert!(
        job.last_error
            .as_deref()
            .is_some_and(|error| error.contains("not for its own lease")),
        "{:?}",
        job.last_error
    );
}
