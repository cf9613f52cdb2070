//! Sweeping test databases left behind (by failed tests, killed runs) and stale templates.
//!
//! The names and the lock key are the harness's (`faultline-tests`). Concurrent test runs against the same server are respected:
//! databases in use or younger than [`MIN_AGE_SECS`] are kept, the current template is kept, and
//! templates are dropped under the harness's advisory lock.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use faultline_tests::{DATABASE_PREFIX, TEMPLATE_LOCK_KEY, TEMPLATE_PREFIX, template_name};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// Test databases younger than this may be still between creation and first connection.
const MIN_AGE_SECS: u64 = 300;

/// What a sweep dropped.
#[derive(Debug, Default)]
pub(crate) struct Swept {
    pub(crate) databases: usize,
    pub(crate) templates: usize,
}

/// Drops leftover test databases and stale templates on the server at `url`.
pub(crate) async fn sweep(url: &str) -> anyhow::Result<Swept> {
    let mut admin = PgConnection::connect(url)
        .await
        .with_context(|| format!("connect to {url}"))?;
    let mut swept = Swept::default();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();

    let idle: Vec<String> = sqlx::query_scalar(
        "select datname from pg_database d
         where starts_with(datname, $1)
           and not exists (select 1 from pg_stat_activity a where a.datid = d.oid)",
    )
    .bind(DATABASE_PREFIX)
    .fetch_all(&mut admin)
    .await?;
    for name in idle {
        let created = name[DATABASE_PREFIX.len()..]
            .split('_')
            .next()
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|created| now.saturating_sub(created) < MIN_AGE_SECS) {
            continue;
        }
        let drop = format!("drop database if exists \"{name}\"");
        // Fails if a test connected meanwhile: then it is not a leftover.
        if sqlx::query(AssertSqlSafe(drop))
            .execute(&mut admin)
            .await
            .is_ok()
        {
            swept.databases += 1;
        }
    }

    sqlx::query("select pg_advisory_lock($1)")
        .bind(TEMPLATE_LOCK_KEY)
        .execute(&mut admin)
        .await?;
    let current = template_name();
    let templates: Vec<String> =
        sqlx::query_scalar("select datname from pg_database where starts_with(datname, $1)")
            .bind(TEMPLATE_PREFIX)
            .fetch_all(&mut admin)
            .await?;
    for name in templates.into_iter().filter(|name| *name != current) {
        // `_build` leftovers are not templates yet; holding the lock, no builder is running.
        let statements = [
            format!("alter database \"{name}\" is_template false"),
            format!("drop database if exists \"{name}\" with (force)"),
        ];
        for sql in statements {
            sqlx::query(AssertSqlSafe(sql.clone()))
                .execute(&mut admin)
                .await
                .with_context(|| format!("`{sql}`"))?;
        }
        swept.templates += 1;
    }
    sqlx::query("select pg_advisory_unlock($1)")
        .bind(TEMPLATE_LOCK_KEY)
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exists(admin: &mut PgConnection, name: &str) -> bool {
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(name)
            .fetch_one(admin)
            .await
            .expect("query pg_database")
    }

    async fn execute(admin: &mut PgConnection, sql: String) {
        sqlx::query(AssertSqlSafe(sql.clone()))
            .execute(admin)
            .await
            .unwrap_or_else(|e| panic!("`{sql}`: {e}"));
    }

    #[tokio::test]
    async fn sweeps_old_idle_databases_and_stale_templates_only() {
        let url = std::env::var("DATABASE_URL")
            .expect("DATABASE_URL is not set: run the tests with `cargo xtask test`");
        // The current template exists once any TestDb was made.
        let in_use = faultline_tests::TestDb::fresh().await;
        let mut admin = PgConnection::connect(&url).await.expect("connect");
        let pid = std::process::id();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let old = format!("{DATABASE_PREFIX}1000_{pid}_sweep");
        let young = format!("{DATABASE_PREFIX}{now}_{pid}_sweep");
        let stale = format!("{TEMPLATE_PREFIX}sweep_{pid}");
        for name in [&old, &young, &stale] {
            execute(&mut admin, format!("create database \"{name}\"")).await;
        }
        execute(
            &mut admin,
            format!("alter database \"{stale}\" is_template true"),
        )
        .await;
        // An old database that is in use must survive too.
        let old_in_use = format!("{DATABASE_PREFIX}1000_{pid}_sweep_busy");
        execute(&mut admin, format!("create database \"{old_in_use}\"")).await;
        let busy = PgConnection::connect_with(
            &url.parse::<sqlx::postgres::PgConnectOptions>()
                .expect("url")
                .database(&old_in_use),
        )
        .await
        .expect("connect to the busy database");

        let swept = sweep(&url).await.expect("sweep");

        assert!(swept.databases >= 1 && swept.templates >= 1, "{swept:?}");
        assert!(!exists(&mut admin, &old).await, "old idle database kept");
        assert!(!exists(&mut admin, &stale).await, "stale template kept");
        assert!(exists(&mut admin, &young).await, "young database dropped");
        assert!(
            exists(&mut admin, &old_in_use).await,
            "database in use dropped"
        );
        assert!(
            exists(&mut admin, in_use.name()).await,
            "live test database dropped"
        );
        assert!(
            exists(&mut admin, &template_name()).await,
            "current template dropped"
        );

        busy.close().await.expect("close");
        for name in [&young, &old_in_use] {
            execute(&mut admin, format!("drop database \"{name}\"")).await;
        }
    }
}
