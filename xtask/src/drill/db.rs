//! Each drill's own database (`faultline_drill_<name>_<pid>`, migrated, dropped afterwards),
//! the queries its checks read straight from `faultline_jobs`, and a steady load of enqueues.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use faultline_ports::domain::{JobSpec, RetryPolicy};
use faultline_ports::{EnqueueOutcome, JobStore};
use faultline_postgres::PgStore;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio::time::MissedTickBehavior;

use super::probe::{Background, Rng};

/// Prefix of every drill database (followed by the drill's name and the xtask pid).
const PREFIX: &str = "faultline_drill_";

/// The retry policy of the drills' jobs: rescued and retried jobs come back quickly.
pub(crate) const BACKOFF: RetryPolicy = RetryPolicy {
    base_ms: 100,
    cap_ms: 1_000,
    jitter: 0.1,
};

/// A job row, as the checks read it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct JobRow {
    pub(crate) id: i64,
    pub(crate) state: String,
    pub(crate) attempts: i32,
    pub(crate) max_attempts: i32,
    pub(crate) fencing_token: i64,
    pub(crate) last_error: Option<String>,
    pub(crate) result: Option<Value>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
}

/// A fresh, migrated database of its own for one drill; dropped (connections and all) on drop.
#[derive(Debug)]
pub(crate) struct DrillDb {
    server: String,
    name: String,
    url: String,
    pool: PgPool,
}

impl DrillDb {
    /// Creates and migrates `faultline_drill_<drill>_<pid>` on the server at `server`.
    pub(crate) async fn create(server: &str, drill: &str) -> anyhow::Result<DrillDb> {
        let name = format!("{PREFIX}{}_{}", drill.replace('-', "_"), std::process::id());
        let mut admin = PgConnection::connect(server)
            .await
            .with_context(|| format!("connect to {server}"))?;
        crate::admin::recreate_database(&mut admin, &name).await?;
        admin.close().await?;
        let options: PgConnectOptions = server.parse().context("the server URL")?;
        let options = options.database(&name);
        let url = crate::admin::database_url(server, &name)?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await
            .with_context(|| format!("connect to {name}"))?;
        let db = DrillDb {
            server: server.to_owned(),
            name,
            url,
            pool,
        };
        faultline_postgres::migrate(&db.pool)
            .await
            .context("migrate the drill database")?;
        Ok(db)
    }

    /// The database's URL, for the `faultline` processes.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// A pool on the database, for the drill's own reads and enqueues.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Enqueues `specs` in one statement; returns their ids in order.
    pub(crate) async fn enqueue(&self, specs: &[JobSpec]) -> anyhow::Result<Vec<i64>> {
        let store = PgStore::new(self.pool.clone());
        let mut ids = Vec::with_capacity(specs.len());
        for chunk in specs.chunks(1_000) {
            let outcomes = store
                .job_enqueue_many(chunk)
                .await
                .context("enqueue the drill's jobs")?;
            for outcome in outcomes {
                match outcome {
                    EnqueueOutcome::Created { id } | EnqueueOutcome::Existing { id } => {
                        ids.push(id)
                    }
                    EnqueueOutcome::Conflict { existing_id } => {
                        anyhow::bail!("enqueue: idempotency conflict with job {existing_id}")
                    }
                }
            }
        }
        Ok(ids)
    }

    /// Every job, by id.
    pub(crate) async fn jobs(&self) -> anyhow::Result<BTreeMap<i64, JobRow>> {
        let rows: Vec<JobRow> = sqlx::query_as(
            "select id, state, attempts, max_attempts, fencing_token, last_error, result,
                    finished_at
             from faultline_jobs order by id",
        )
        .fetch_all(&self.pool)
        .await
        .context("read faultline_jobs")?;
        Ok(rows.into_iter().map(|row| (row.id, row)).collect())
    }

    /// Jobs per state.
    pub(crate) async fn states(&self) -> anyhow::Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("select state, count(*) from faultline_jobs group by state")
                .fetch_all(&self.pool)
                .await
                .context("count jobs per state")?;
        Ok(rows.into_iter().collect())
    }

    /// The jobs running under `worker`'s leases (after its death: those it had in flight).
    pub(crate) async fn running_under(&self, worker: &str) -> anyhow::Result<Vec<i64>> {
        sqlx::query_scalar(
            "select id from faultline_jobs where state = 'running' and lease_owner = $1
             order by id",
        )
        .bind(worker)
        .fetch_all(&self.pool)
        .await
        .context("read the jobs in flight")
    }

    /// Waits until no job is `queued` or `running` (or `timeout` passes); returns the states.
    pub(crate) async fn settled(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<Result<BTreeMap<String, i64>, BTreeMap<String, i64>>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let states = self.states().await;
            if let Ok(states) = &states
                && !states.contains_key("queued")
                && !states.contains_key("running")
            {
                return Ok(Ok(states.clone()));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(Err(states?));
            }
            tokio::time::sleep(super::probe::POLL).await;
        }
    }
}

impl Drop for DrillDb {
    fn drop(&mut self) {
        let server = self.server.clone();
        let sql = format!("drop database if exists \"{}\" with (force)", self.name);
        let pool = self.pool.clone();
        // Drop runs inside the drills' runtime: the drop gets a thread and a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                pool.close().await;
                let mut admin = PgConnection::connect(&server).await?;
                sqlx::query(AssertSqlSafe(sql)).execute(&mut admin).await?;
                admin.close().await?;
                anyhow::Ok(())
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("xtask drill: could not drop {}: {error:#}", self.name);
        }
    }
}

/// Drops the drill databases of xtask processes that are gone (killed runs).
pub(crate) async fn sweep_leftovers(server: &str) -> anyhow::Result<usize> {
    let mut admin = PgConnection::connect(server)
        .await
        .with_context(|| format!("connect to {server}"))?;
    let names: Vec<String> =
        sqlx::query_scalar("select datname from pg_database where starts_with(datname, $1)")
            .bind(PREFIX)
            .fetch_all(&mut admin)
            .await?;
    let mut dropped = 0;
    for name in names {
        let owner_alive = name
            .rsplit('_')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_none_or(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if owner_alive {
            continue;
        }
        let sql = format!("drop database if exists \"{name}\" with (force)");
        if sqlx::query(AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .is_ok()
        {
            dropped += 1;
        }
    }
    admin.close().await?;
    Ok(dropped)
}

/// An `effect` job of the drills (sleep `ms`, fail the first `fail` calls).
pub(crate) fn effect_job(ms: u64, fail: u32) -> JobSpec {
    let mut spec = JobSpec::new(super::ledger::KIND, super::ledger::payload(ms, fail));
    spec.retry_policy = BACKOFF;
    spec
}

/// Enqueues about `rate` jobs a second (in batches every 50 ms), each made by `job`, until
/// `stop`; returns their ids.
pub(crate) fn steady_load(
    store: &PgStore,
    rate: u64,
    mut rng: Rng,
    stop: Arc<AtomicBool>,
    mut job: impl FnMut(&mut Rng) -> JobSpec + Send + 'static,
) -> Background<anyhow::Result<Vec<i64>>> {
    let store = store.clone();
    Background::spawn(async move {
        let tick_every = Duration::from_millis(50);
        let per_tick = usize::try_from(rate.div_ceil(20)).unwrap_or(1).max(1);
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ids = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let specs: Vec<JobSpec> = (0..per_tick).map(|_| job(&mut rng)).collect();
            for outcome in store.job_enqueue_many(&specs).await? {
                match outcome {
                    EnqueueOutcome::Created { id } => ids.push(id),
                    other => anyhow::bail!("enqueue of the load: {other:?}"),
                }
            }
        }
        Ok(ids)
    })
}
