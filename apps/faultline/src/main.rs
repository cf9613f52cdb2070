//! `faultline`: the command line of the Faultline job system: `migrate`, `worker` and `dev` (the
//! HTTP API's `api` arrives with its issue).

mod database;
mod dev;
mod handlers;
mod logging;
mod options;
mod shutdown;
mod worker;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use faultline_postgres::{MIGRATIONS_TABLE, MIGRATOR};
use sqlx::migrate::Migrate;
use sqlx::postgres::PgPoolOptions;

use crate::options::{DatabaseArgs, LogArgs};

/// Faultline: durable background jobs on PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "faultline", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    #[command(flatten)]
    log: LogArgs,
}

/// One variant per subcommand; each has its own `Args` struct and `run` function.
#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending schema migrations to the database and print what was applied.
    Migrate(MigrateArgs),
    /// Run jobs: claim them from the database and run their handlers until SIGTERM/SIGINT.
    Worker(worker::WorkerCommand),
    /// The quick start: a database (DATABASE_URL, else a private PostgreSQL), its schema, and a
    /// worker with the demo handlers, in one process. Ctrl-C stops everything.
    Dev(dev::DevCommand),
}

#[derive(Debug, Args)]
struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = logging::init(&cli.log) {
        eprintln!("faultline: error: {error:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Migrate(args) => run_async(migrate(args)),
        Command::Worker(args) => run_async(worker::run(args)),
        Command::Dev(args) => run_async(dev::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("faultline: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one subcommand's future on a multi-threaded runtime.
fn run_async(future: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(future)
}

/// `faultline migrate`.
async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let url = &args.database.database_url;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .context("connect to the database (--database-url / DATABASE_URL)")?;
    let applied = apply_migrations(&pool).await?;
    pool.close().await;
    report_migrations(&applied);
    Ok(())
}

/// Applies pending migrations; returns those applied now, as (version, description).
async fn apply_migrations(pool: &sqlx::PgPool) -> anyhow::Result<Vec<(i64, String)>> {
    let before = applied_versions(pool).await?;
    faultline_postgres::migrate(pool)
        .await
        .context("apply migrations")?;
    let after = applied_versions(pool).await?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| after.contains(&m.version) && !before.contains(&m.version))
        .map(|m| (m.version, m.description.to_string()))
        .collect())
}

fn report_migrations(applied: &[(i64, String)]) {
    for (version, description) in applied {
        println!("applied {version} {description}");
    }
    if applied.is_empty() {
        println!(
            "database is up to date ({} migrations)",
            MIGRATOR.iter().count()
        );
    }
}

async fn applied_versions(pool: &sqlx::PgPool) -> anyhow::Result<Vec<i64>> {
    let mut conn = pool.acquire().await?;
    conn.ensure_migrations_table(MIGRATIONS_TABLE).await?;
    let applied = conn.list_applied_migrations(MIGRATIONS_TABLE).await?;
    Ok(applied.into_iter().map(|m| m.version).collect())
}

#[cfg(test)]
mod tests;
