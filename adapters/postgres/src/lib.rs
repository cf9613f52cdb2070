//! The PostgreSQL adapter: `PgStore` implements the `JobStore` port with sqlx.
//! (Being written; see ARCHITECTURE.md.)

pub mod cluster;
