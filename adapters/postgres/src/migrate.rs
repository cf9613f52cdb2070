//! The schema migrations (`migrations/` at the workspace root, embedded at compile time) and how to
//! apply them.
//!
//! Faultline keeps its own bookkeeping table, [`MIGRATIONS_TABLE`], so it can share a database with
//! a host application that runs its own sqlx migrations (sqlx's default `_sqlx_migrations` table
//! would make each migrator see the other's versions as unknown).
//!
//! Concurrency: sqlx's migrator takes a session-level `pg_advisory_lock` keyed on the database
//! name before it creates the bookkeeping table, so two processes migrating at once run one after
//! the other and the second finds nothing to do (a host application's sqlx migrator takes the
//! same lock, so it serializes with ours too). Each migration runs in a transaction together with
//! its bookkeeping row, so re-running is a no-op. [`migrate`] holds that same lock while it reads
//! what was applied before and after its run, so what it reports is exactly what it applied.

use std::sync::LazyLock;

use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::{PgConnection, PgPool};

/// The table recording which Faultline migrations ran (instead of sqlx's `_sqlx_migrations`).
pub const MIGRATIONS_TABLE: &str = "_faultline_migrations";

/// Faultline's migrator: the embedded migrations, recorded in [`MIGRATIONS_TABLE`].
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("../../migrations");
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
});

/// A migration that [`migrate`] applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Its version (the timestamp prefix of its file name).
    pub version: i64,
    /// Its description (the rest of its file name).
    pub description: String,
}

impl std::fmt::Display for AppliedMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.version, self.description)
    }
}

/// Applies every pending migration and returns those this call applied, oldest first (empty when
/// the schema was up to date). Idempotent, and safe when several processes call it at once: each
/// migration is applied, and reported, by exactly one of them.
pub async fn migrate(pool: &PgPool) -> Result<Vec<AppliedMigration>, MigrateError> {
    let mut conn = pool.acquire().await?;
    // sqlx releases its session-level advisory lock only when the run succeeds: on an error, or if
    // this future is dropped half-way, the connection would go back to the pool still holding it
    // and block every later migration. Closing the connection (rare, cheap) always releases it.
    conn.close_on_drop();
    // Take the migrator's advisory lock ourselves, around reading what was applied before, the run
    // and reading what is applied after, so that the difference is exactly what this call applied
    // (a concurrent migrator waits on the lock; it cannot slip in between). Advisory locks are
    // re-entrant within a session: the run takes and releases it once more inside.
    conn.lock().await?;
    conn.ensure_migrations_table(MIGRATIONS_TABLE).await?;
    let before = applied_versions(&mut conn).await?;
    // `run_direct` (public but doc-hidden in sqlx 0.9) is what `Migrator::run` calls; taking the
    // connection directly keeps this future `Send` for any lifetime (with `run`,
    // `tokio::spawn(migrate(..))` does not compile: "implementation of `Acquire` is not general
    // enough").
    MIGRATOR.run_direct(None, &mut *conn, false).await?;
    let after = applied_versions(&mut conn).await?;
    conn.unlock().await?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| after.contains(&m.version) && !before.contains(&m.version))
        .map(|m| AppliedMigration {
            version: m.version,
            description: m.description.to_string(),
        })
        .collect())
}

/// The versions recorded in [`MIGRATIONS_TABLE`].
async fn applied_versions(conn: &mut PgConnection) -> Result<Vec<i64>, MigrateError> {
    let applied = conn.list_applied_migrations(MIGRATIONS_TABLE).await?;
    Ok(applied.into_iter().map(|m| m.version).collect())
}
