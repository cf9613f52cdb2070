//! `faultline`: the command line of the Faultline job system (`migrate`; `worker`, `api` and `dev`
//! arrive with their issues).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use faultline_postgres::{MIGRATIONS_TABLE, MIGRATOR};
use sqlx::migrate::Migrate;
use sqlx::postgres::PgPoolOptions;

/// Faultline: durable background jobs on PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "faultline", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// One variant per subcommand; each has its own `Args` struct and `run` function.
#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending schema migrations to the database and print what was applied.
    Migrate(MigrateArgs),
}

/// Where the database is; shared by every subcommand that needs one.
#[derive(Debug, Args)]
struct DatabaseArgs {
    /// PostgreSQL connection URL, e.g. postgres://user@localhost:5432/faultline.
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    database_url: String,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Migrate(args) => run_async(migrate(args)),
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
    let before = applied_versions(&pool).await?;
    faultline_postgres::migrate(&pool)
        .await
        .context("apply migrations")?;
    let after = applied_versions(&pool).await?;
    pool.close().await;

    let mut applied = 0;
    for migration in MIGRATOR.iter() {
        if after.contains(&migration.version) && !before.contains(&migration.version) {
            println!("applied {} {}", migration.version, migration.description);
            applied += 1;
        }
    }
    if applied == 0 {
        println!(
            "database is up to date ({} migrations)",
            MIGRATOR.iter().count()
        );
    }
    Ok(())
}

async fn applied_versions(pool: &sqlx::PgPool) -> anyhow::Result<Vec<i64>> {
    let mut conn = pool.acquire().await?;
    conn.ensure_migrations_table(MIGRATIONS_TABLE).await?;
    let applied = conn.list_applied_migrations(MIGRATIONS_TABLE).await?;
    Ok(applied.into_iter().map(|m| m.version).collect())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
