//! `cargo xtask migrate`: apply pending migrations and report which ones ran.

use anyhow::Context;
use faultline_postgres::MIGRATOR;
use sqlx::postgres::PgPoolOptions;

/// Applies the pending migrations to `url` and prints them.
pub(crate) fn run(url: &str) -> anyhow::Result<()> {
    let applied = crate::runtime()?.block_on(async {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .context("connect to the database (--database-url / DATABASE_URL)")?;
        let applied = faultline_postgres::migrate(&pool)
            .await
            .context("apply migrations");
        pool.close().await;
        applied
    })?;
    for migration in &applied {
        println!("applied {migration}");
    }
    if applied.is_empty() {
        println!(
            "database is up to date ({} migrations)",
            MIGRATOR.iter().count()
        );
    }
    Ok(())
}
