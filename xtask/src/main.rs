//! `cargo xtask`: Faultline's project automation (`test`, `migrate`, `openapi`, `tidy`, `drill`,
//! `bench`).

mod admin;
mod bench;
mod drill;
mod migrate;
mod openapi;
mod server;
mod sweep;
mod test;
mod tidy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Faultline's project automation.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole test suite against a PostgreSQL server: DATABASE_URL if set, else a private
    /// cluster from the local PostgreSQL binaries, else a postgres:15 Docker container.
    ///
    /// Sweeps leftover test databases first, then runs `cargo nextest run --workspace` (or
    /// `cargo test --workspace` without nextest) with DATABASE_URL exported.
    Test {
        /// Extra arguments for nextest (or cargo test), e.g. `-- -p faultline-domain` or a filter.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Apply pending database migrations and print what was applied.
    Migrate {
        /// The database to migrate.
        #[arg(long, env = "DATABASE_URL", value_name = "URL")]
        database_url: String,
    },
    /// Write the OpenAPI document the HTTP API serves to docs/openapi.json.
    Openapi {
        /// Write nothing; exit with status 1 when docs/openapi.json is out of date.
        #[arg(long)]
        check: bool,
    },
    /// Check dependency directions between the crates and that every .rs file starts with `//!`.
    Tidy,
    /// Run the failure drills: real `faultline` processes on a real PostgreSQL, real faults
    /// (SIGKILL, SIGSTOP, a poison pill, a database outage, duplicates, SIGTERM), invariants
    /// checked from the database; exits non-zero when any drill fails.
    ///
    /// Uses DATABASE_URL when set, else a private cluster (`db-outage` always starts its own).
    /// Writes a table to stdout and target/drills/summary.json; process logs go to
    /// target/drills/<drill>/. DRILL_SEED=N replays a run's random choices (seed in the summary).
    Drill {
        /// Fewer jobs and rounds (CI: all drills in about 2–3 minutes).
        #[arg(long)]
        short: bool,
        /// List the drills and what each proves, and exit.
        #[arg(long)]
        list: bool,
        /// Drills to run (all when none is named).
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
    /// Benchmark the workloads of issue 7 (W1 insert, W2 drain, W3 latency, W4 history, W5 HTTP)
    /// on release builds; table on stdout, JSON lines in target/bench/ (see docs/performance.md).
    Bench(Box<bench::Settings>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Test { args } => test::run(&args),
        Command::Migrate { database_url } => {
            migrate::run(&database_url).map(|()| ExitCode::SUCCESS)
        }
        Command::Openapi { check } => openapi::run(check),
        Command::Tidy => tidy::run().map(|()| ExitCode::SUCCESS),
        Command::Drill { list: true, .. } => {
            drill::list();
            Ok(ExitCode::SUCCESS)
        }
        Command::Drill { short, names, .. } => drill::run(&names, short),
        Command::Bench(settings) => bench::run(*settings),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A tokio runtime for the few async (sqlx) steps.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
