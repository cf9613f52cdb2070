//! The worker runtime's tests: on the in-memory store (step API with a manual clock, the
//! production loop under paused time), with a mock store for fault injection, and on real
//! PostgreSQL for the key paths; handlers that record their outcome in their own transaction
//! (exactly-once effects); the maintenance services and their leader election; and the
//! metrics the worker records.

mod buffer;
mod completer;
mod exactly_once;
mod maintenance;
mod memory;
mod metrics;
mod mock;
mod postgres;
mod support;
