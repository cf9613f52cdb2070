//! The PostgreSQL adapter: [`PgStore`] implements the `JobStore` port with sqlx, [`migrate`]
//! applies the schema, and [`cluster`] starts a private PostgreSQL cluster.
//!
//! *API Boundary*: besides the port, the adapter offers what only PostgreSQL can do: enqueueing
//! inside the caller's transaction ([`PgStore::job_enqueue_in`]) and wake-ups by `LISTEN` on
//! [`NOTIFY_CHANNEL`]. All SQL of the workspace lives in this crate.

pub mod cluster;
pub mod listen;
mod migrate;
mod row;
#[doc(hidden)]
pub mod sql; // not API: public so that tests can EXPLAIN the real statements
mod store;

pub use migrate::{AppliedMigration, MIGRATIONS_TABLE, MIGRATOR, migrate};
pub use store::{NOTIFY_CHANNEL, PgStore};
