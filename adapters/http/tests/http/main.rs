//! The HTTP adapter's integration tests: connection hygiene over real sockets, every endpoint (jobs, queues with pause and resume, the
//! worker protocol, the process list) and error path through poem's test client over the
//! in-memory store (with a store wrapper for faults), the OpenAPI document against
//! `docs/openapi.json`, the metrics, and PostgreSQL-backed tests over real HTTP.

mod auth;
mod common;
mod connections;
mod errors;
mod faults;
mod headers;
mod jobs;
mod metrics;
mod openapi;
mod postgres;
mod processes;
mod queues;
mod workers;
