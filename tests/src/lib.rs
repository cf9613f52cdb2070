//! Faultline's cross-crate test harness: a fresh PostgreSQL database per test ([`TestDb`]), the
//! `JobStore` contract suite that every adapter must pass ([`contract`]), and model-based tests
//! ([`model`]).
//!
//! Tests that touch storage need a server: run them with `cargo xtask test`, which finds or starts
//! one and exports `DATABASE_URL`, or set `DATABASE_URL` yourself.

pub mod contract;
mod db;
pub mod model;

pub use db::{
    DATABASE_PREFIX, KEEP_FAILED_ENV, TEMPLATE_LOCK_KEY, TEMPLATE_PREFIX, TestDb, template_name,
};
