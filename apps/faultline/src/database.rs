//! Database connections of the worker and the API: connect options (generic plans, an
//! application name), pools, the worker's startup that waits for the database instead of exiting
//! while it is unreachable, and the check that the schema is migrated (workers and the API never
//! migrate; `faultline migrate` and `dev` do).

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use faultline_postgres::{MIGRATIONS_TABLE, MIGRATOR};
use sqlx::migrate::{Migrate, MigrateError};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// `application_name` of the worker's pool connections, as seen in `pg_stat_activity`.
pub(crate) const WORKER_APPLICATION_NAME: &str = "faultline-worker";

/// `application_name` of the HTTP API's pool connections.
pub(crate) const API_APPLICATION_NAME: &str = "faultline-api";

/// Connect options for `url`: `application_name`, and `plan_cache_mode = force_generic_plan`,
/// because the few hot statements (claim with `limit $n`, small completions) are otherwise
/// re-planned on every call (17-30 % slower in our measurements).
pub(crate) fn connect_options(
    url: &str,
    application_name: &str,
) -> anyhow::Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(url)
        .context("--database-url / DATABASE_URL is not a valid PostgreSQL URL")?;
    Ok(options
        .application_name(application_name)
        .options([("plan_cache_mode", "force_generic_plan")]))
}

/// A pool of at most `size` connections that connects lazily (so creating it never waits for the
/// database), where getting a connection waits at most `acquire_timeout`.
pub(crate) fn lazy_pool(
    options: &PgConnectOptions,
    size: u32,
    acquire_timeout: Duration,
) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(acquire_timeout)
        .connect_lazy_with(options.clone())
}

/// Why the database cannot be used yet.
#[derive(Debug)]
pub(crate) enum Unready {
    /// Worth retrying: the server is down, restarting, unreachable, ...
    Transient(anyhow::Error),
    /// Retrying will not help (the schema is missing): stop with this error.
    Fatal(anyhow::Error),
}

/// Connects a pool of `size` connections and checks the schema, retrying with backoff from
/// `backoff_min` to `backoff_max` while the database is unreachable (each failure is logged).
/// `Ok(None)`: `shutdown` fired before the database could be reached.
pub(crate) async fn connect(
    options: &PgConnectOptions,
    size: u32,
    (backoff_min, backoff_max): (Duration, Duration),
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<PgPool>> {
    let mut delay = backoff_min;
    let mut failures = 0_u32;
    loop {
        let attempt = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(None),
            attempt = try_connect(options, size) => attempt,
        };
        match attempt {
            Ok(pool) => {
                if failures > 0 {
                    tracing::info!(failures, "database reachable again");
                }
                return Ok(Some(pool));
            }
            Err(Unready::Fatal(error)) => return Err(error),
            Err(Unready::Transient(error)) => {
                failures += 1;
                tracing::warn!(
                    error = format!("{error:#}"),
                    failures,
                    retry_in_ms = delay.as_millis(),
                    "database unreachable; retrying"
                );
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return Ok(None),
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(backoff_max);
            }
        }
    }
}

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One attempt: a single connection checks reachability and the schema (failing fast, where a
/// pool would retry a refused connection internally until its acquire timeout); the pool itself
/// connects lazily.
async fn try_connect(options: &PgConnectOptions, size: u32) -> Result<PgPool, Unready> {
    let transient = |e: anyhow::Error| Unready::Transient(e.context("connect"));
    let mut conn =
        match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(transient(e.into())),
            Err(_) => {
                return Err(transient(anyhow::anyhow!(
                    "timed out after {CONNECT_TIMEOUT:?}"
                )));
            }
        };
    let checked = check_schema(&mut conn).await;
    let _ = conn.close().await;
    checked?;
    Ok(lazy_pool(options, size, CONNECT_TIMEOUT))
}

/// Checks that every migration this binary knows has been applied.
async fn check_schema(conn: &mut PgConnection) -> Result<(), Unready> {
    let missing = missing_migrations(conn).await?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(Unready::Fatal(anyhow::anyhow!(
        "the database schema is not migrated (missing: {}); run `faultline migrate` with the same \
         DATABASE_URL first (workers never change the schema)",
        missing.join(", ")
    )))
}

/// The migrations this binary knows that the database lacks, as "version description" (empty:
/// the schema is up to date).
pub(crate) async fn missing_migrations(conn: &mut PgConnection) -> Result<Vec<String>, Unready> {
    let transient = |e: sqlx::Error| Unready::Transient(anyhow::Error::new(e).context("connect"));
    let applied = match conn.list_applied_migrations(MIGRATIONS_TABLE).await {
        Ok(applied) => applied,
        // The bookkeeping table does not exist (undefined_table): never migrated.
        Err(MigrateError::Execute(e))
            if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P01") =>
        {
            Vec::new()
        }
        Err(MigrateError::Execute(e)) => return Err(transient(e)),
        Err(e) => {
            return Err(Unready::Fatal(
                anyhow::Error::new(e).context("read the applied migrations"),
            ));
        }
    };
    Ok(MIGRATOR
        .iter()
        .filter(|m| !applied.iter().any(|a| a.version == m.version))
        .map(|m| format!("{} {}", m.version, m.description))
        .collect())
}
