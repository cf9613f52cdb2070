//! Server administration shared by the drills and the benchmark: a database URL for another
//! database on the same server, and (re)creating a database.

use anyhow::Context;
use sqlx::{AssertSqlSafe, PgConnection};

/// `server` with its database replaced by `name` (user, host, port and parameters kept).
pub(crate) fn database_url(server: &str, name: &str) -> anyhow::Result<String> {
    let mut url = reqwest::Url::parse(server).context("the server URL")?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

/// Drops `name` if it exists (disconnecting its sessions) and creates it empty.
pub(crate) async fn recreate_database(admin: &mut PgConnection, name: &str) -> anyhow::Result<()> {
    for statement in [
        format!("drop database if exists \"{name}\" with (force)"),
        format!("create database \"{name}\""),
    ] {
        sqlx::query(AssertSqlSafe(statement.clone()))
            .execute(&mut *admin)
            .await
            .with_context(|| format!("`{statement}`"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_url_keeps_everything_but_the_database() {
        assert_eq!(
            database_url(
                "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
                "d1"
            )
            .unwrap(),
            "postgres://postgres@127.0.0.1:5432/d1?sslmode=disable"
        );
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/postgres", "fbench_x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/fbench_x"
        );
        assert_eq!(
            database_url("postgres://u@h:1/db?sslmode=disable", "b").unwrap(),
            "postgres://u@h:1/b?sslmode=disable"
        );
        assert_eq!(
            database_url("postgres://u@h:1", "b").unwrap(),
            "postgres://u@h:1/b"
        );
        assert_eq!(
            database_url("postgres://u:p@h:1", "d2").unwrap(),
            "postgres://u:p@h:1/d2"
        );
    }
}
