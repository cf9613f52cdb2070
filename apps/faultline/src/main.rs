//! `faultline`: the command line of the Faultline job system: `migrate`, `worker`, `api`, `dev`,
//! and the operator commands `queue`, `worker list` and `job expire-lease`. Configuration (flags,
//! environment) and telemetry (logging, the metrics exporter) are read and set up here only.

mod admin;
mod api;
mod database;
mod dev;
mod handlers;
mod logging;
mod maintenance;
mod options;
mod shutdown;
mod telemetry;
mod worker;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use faultline_postgres::{AppliedMigration, MIGRATOR};
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
    /// Run jobs: claim them from the database and run their handlers until SIGTERM/SIGINT
    /// (`worker list`: list the registered processes and the maintenance leader).
    Worker(worker::WorkerCommand),
    /// Serve the HTTP API (jobs, queues, the worker protocol, /health, /openapi.json and Swagger
    /// UI at /docs) until SIGTERM/SIGINT.
    Api(api::ApiCommand),
    /// The quick start: a database (DATABASE_URL, else a private PostgreSQL), its schema, a
    /// worker with the demo handlers and the HTTP API, in one process. Ctrl-C stops everything.
    Dev(dev::DevCommand),
    /// List queues (paused or not, jobs per state), or pause or resume one.
    Queue(admin::QueueCommand),
    /// Operator actions on one job (`job expire-lease ID`: end a vanished holder's lease now).
    Job(admin::JobCommand),
}

#[derive(Debug, Args)]
struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseArgs,
}

fn main() -> ExitCode {
    let cli = parse_cli();
    if let Err(error) = logging::init(&cli.log) {
        eprintln!("faultline: error: {error:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Migrate(args) => run_async(migrate(args)),
        Command::Worker(worker::WorkerCommand {
            command: Some(admin::WorkerAction::List(list)),
            database,
            ..
        }) => {
            let url = list.database_url.unwrap_or(database.database_url);
            run_async(admin::worker_list(&url))
        }
        Command::Worker(args) => run_async(worker::run(args)),
        Command::Api(args) => run_async(api::run(args)),
        Command::Dev(args) => run_async(dev::run(args)),
        Command::Queue(args) => run_async(admin::queue(args)),
        Command::Job(args) => run_async(admin::job(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("faultline: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line, as `Cli::parse` reads it, except that `worker list` without a database gets
/// clap's usual message for a missing option (see `admin::WorkerList`).
fn parse_cli() -> Cli {
    let mut command = Cli::command();
    let matches = command.get_matches_mut();
    if let Some(error) = admin::missing_database_url(&mut command, &matches) {
        error.exit();
    }
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.format(&mut command).exit())
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
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.database.database_url)
        .await
        .context("connect to the database (--database-url / DATABASE_URL)")?;
    let applied = faultline_postgres::migrate(&pool)
        .await
        .context("apply migrations");
    pool.close().await;
    report_migrations(&applied?);
    Ok(())
}

/// Prints what `migrate` applied (for `migrate` and `dev`).
fn report_migrations(applied: &[AppliedMigration]) {
    for migration in applied {
        println!("applied {migration}");
    }
    if applied.is_empty() {
        println!(
            "database is up to date ({} migrations)",
            MIGRATOR.iter().count()
        );
    }
}

#[cfg(test)]
mod tests;
