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
//! its bookkeeping row, so re-running is a no-op.

use std::sync::LazyLock;

use sqlx::PgPool;
use sqlx::migrate::{MigrateError, Migrator};

/// The table recording which Faultline migrations ran (instead of sqlx's `_sqlx_migrations`).
pub const MIGRATIONS_TABLE: &str = "_faultline_migrations";

/// Faultline's migrator: the embedded migrations, recorded in [`MIGRATIONS_TABLE`].
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("../../migrations");
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
});

/// Applies every pending migration. Idempotent, and safe when several processes call it at once.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    let mut conn = pool.acquire().await?;
    // sqlx releases its session-level advisory lock only when the run succeeds: on an error, or if
    // this future is dropped half-way, the connection would go back to the pool still holding it
    // and block every later migration. Closing the connection (rare, cheap) always releases it.
    conn.close_on_drop();
    // `run_direct` (public but doc-hidden in sqlx 0.9) is what `Migrator::run` calls; taking the
    // connection directly keeps this future `Send` for any lifetime (with `run`,
    // `tokio::spawn(migrate(..))` does not compile: "implementation of `Acquire` is not general
    // enough").
    MIGRATOR.run_direct(None, &mut *conn, false).await
}
