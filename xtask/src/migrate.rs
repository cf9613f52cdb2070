//! `cargo xtask migrate`: apply pending migrations and report which ones ran.

use anyhow::Context;
use faultline_postgres::{MIGRATIONS_TABLE, MIGRATOR};
use sqlx::migrate::Migrate;
use sqlx::postgres::PgPoolOptions;

/// Applies the pending migrations to `url` and prints them.
pub(crate) fn run(url: &str) -> anyhow::Result<()> {
    let applied = crate::runtime()?.block_on(apply(url))?;
    if applied.is_empty() {
        println!(
            "database is up to date ({} migrations)",
            MIGRATOR.iter().count()
        );
    }
    for (version, description) in applied {
        println!("applied {version} {description}");
    }
    Ok(())
}

/// Applies the pending migrations; returns the (version, description) of each one applied.
pub(crate) async fn apply(url: &str) -> anyhow::Result<Vec<(i64, String)>> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .with_context(|| format!("connect to {url}"))?;
    let before = applied_versions(&pool).await?;
    faultline_postgres::migrate(&pool)
        .await
        .context("apply migrations")?;
    let after = applied_versions(&pool).await?;
    pool.close().await;
    Ok(MIGRATOR
        .iter()
        .filter(|m| after.contains(&m.version) && !before.contains(&m.version))
        .map(|m| (m.version, m.description.to_string()))
        .collect())
}

async fn applied_versions(pool: &sqlx::PgPool) -> anyhow::Result<Vec<i64>> {
    let mut conn = pool.acquire().await?;
    conn.ensure_migrations_table(MIGRATIONS_TABLE).await?;
    let applied = conn.list_applied_migrations(MIGRATIONS_TABLE).await?;
    Ok(applied.into_iter().map(|m| m.version).collect())
}
