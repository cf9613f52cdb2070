//! The benchmark's databases: a fresh, migrated database per measurement on the server given by
//! `--database-url`, connections configured as the `faultline` binary configures its own
//! (generic plans), the untimed preloads (a batch-enqueued backlog, a finished history), and the
//! cheap "how many jobs are left" probe.

use std::str::FromStr;

use anyhow::Context;
use faultline_ports::JobStore;
use faultline_ports::domain::JobSpec;
use faultline_postgres::PgStore;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

/// Names of the benchmark's databases start with this (swept when left behind).
pub(crate) const PREFIX: &str = "fbench_";

/// The kind every benchmark job has: the `noop` demo handler.
pub(crate) const KIND: &str = "noop";

/// One fresh database, dropped by [`BenchDb::drop_now`].
#[derive(Debug)]
pub(crate) struct BenchDb {
    pub(crate) name: String,
    pub(crate) url: String,
    admin: PgConnectOptions,
    options: PgConnectOptions,
}

/// Connect options for the server at `url` as the `faultline` binary sets them.
pub(crate) fn connect_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)
        .with_context(|| format!("bad --database-url {url:?}"))?
        .application_name("faultline-bench")
        .options([("plan_cache_mode", "force_generic_plan")]))
}

impl BenchDb {
    /// Drops `name` if it exists, creates it and applies the migrations (not timed).
    pub(crate) async fn fresh(server_url: &str, name: &str) -> anyhow::Result<BenchDb> {
        let admin = connect_options(server_url)?;
        let mut conn = PgConnection::connect_with(&admin)
            .await
            .with_context(|| format!("connect to {server_url}"))?;
        crate::admin::recreate_database(&mut conn, name).await?;
        conn.close().await?;
        let options = admin.clone().database(name);
        let db = BenchDb {
            name: name.to_owned(),
            url: crate::admin::database_url(server_url, name)?,
            admin,
            options,
        };
        let pool = db.pool(1).await?;
        faultline_postgres::migrate(&pool)
            .await
            .context("migrate the benchmark database")?;
        pool.close().await;
        Ok(db)
    }

    /// A pool of `size` connections to this database.
    pub(crate) async fn pool(&self, size: u32) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(size)
            .min_connections(size)
            .connect_with(self.options.clone())
            .await
            .with_context(|| format!("connect to {}", self.name))
    }

    /// Drops the database.
    pub(crate) async fn drop_now(self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect_with(&self.admin).await?;
        sqlx::query(AssertSqlSafe(format!(
            "drop database if exists \"{}\" with (force)",
            self.name
        )))
        .execute(&mut conn)
        .await?;
        conn.close().await?;
        Ok(())
    }
}

/// Drops the benchmark databases a killed run left on the server (those nobody is connected to).
pub(crate) async fn sweep(server_url: &str) -> anyhow::Result<usize> {
    let mut conn = PgConnection::connect_with(&connect_options(server_url)?).await?;
    let names: Vec<String> = sqlx::query_scalar(
        "select datname from pg_database d
         where starts_with(datname, $1)
           and not exists (select 1 from pg_stat_activity a where a.datid = d.oid)",
    )
    .bind(PREFIX)
    .fetch_all(&mut conn)
    .await?;
    for name in &names {
        sqlx::query(AssertSqlSafe(format!("drop database if exists \"{name}\"")))
            .execute(&mut conn)
            .await?;
    }
    conn.close().await?;
    Ok(names.len())
}

/// The benchmark job number `n`: a no-op with payload `{"n": n}`, as the peers use.
pub(crate) fn spec(n: usize) -> JobSpec {
    JobSpec::new(KIND, json!({ "n": n }))
}

/// Enqueues jobs `0..n` in batches of `batch` through the batch enqueue API.
pub(crate) async fn preload(store: &PgStore, n: usize, batch: usize) -> anyhow::Result<()> {
    let mut next = 0;
    while next < n {
        let end = (next + batch).min(n);
        let specs: Vec<JobSpec> = (next..end).map(spec).collect();
        store
            .job_enqueue_many(&specs)
            .await
            .context("batch enqueue")?;
        next = end;
    }
    Ok(())
}

/// Inserts `n` succeeded jobs finished during the last hour (a history not yet pruned: the
/// default retention of succeeded jobs is 24 h), in one statement.
pub(crate) async fn insert_history(pool: &PgPool, n: usize) -> anyhow::Result<()> {
    sqlx::query(
        "insert into faultline_jobs (queue, kind, payload, state, attempts, fencing_token,
             lease_owner, created_at, started_at, finished_at, next_run_at)
         select 'default', 'noop', jsonb_build_object('n', g), 'succeeded', 1, 1, 'history',
             now() - interval '1 hour', now() - interval '1 hour',
             now() - interval '1 hour' + g * (interval '3500 seconds' / $1),
             now() - interval '1 hour'
         from generate_series(1, $1::int8) as g",
    )
    .bind(i64::try_from(n)?)
    .execute(pool)
    .await
    .context("insert the finished history")?;
    Ok(())
}

/// Runs `statement` (maintenance: `vacuum analyze`, `checkpoint`).
pub(crate) async fn execute(pool: &PgPool, statement: &'static str) -> anyhow::Result<()> {
    sqlx::query(statement)
        .execute(pool)
        .await
        .with_context(|| statement)?;
    Ok(())
}

/// Jobs not finished yet: queued (counted up to 100, so the probe stays cheap while the backlog
/// is large) plus running. Reads only the two partial indexes, never the history.
pub(crate) async fn unfinished(conn: &mut PgConnection) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "select (select count(*) from (
                    select 1 from faultline_jobs where state = 'queued' limit 100) q)
              + (select count(*) from faultline_jobs where state = 'running')",
    )
    .fetch_one(conn)
    .await?)
}

/// What the finished jobs of a drain say: `(succeeded, jobs that took more than one attempt,
/// first claim to last finish in seconds)`, history excluded.
pub(crate) async fn drain_facts(pool: &PgPool) -> anyhow::Result<(i64, i64, f64)> {
    let row: (i64, i64, Option<f64>) = sqlx::query_as(
        "select count(*) filter (where state = 'succeeded'),
                count(*) filter (where attempts > 1),
                extract(epoch from max(finished_at) - min(started_at))::float8
         from faultline_jobs where lease_owner is distinct from 'history'",
    )
    .fetch_one(pool)
    .await?;
    Ok((row.0, row.1, row.2.unwrap_or(f64::NAN)))
}
