//! Faultline's worker runtime: runs handlers for leased jobs, keeps their leases alive, and
//! survives crashes, outages and shutdowns without losing or double-writing work.
//!
//! Generic over the ports (`JobStore`, `Clock`): the binary wires it to Postgres, tests to the
//! in-memory store, a mock or Postgres.
//!
//! * [`Handler`], [`JobContext`], [`Outcome`], [`Registry`]: what job code looks like.
//! * [`Worker`]: the runtime. [`Worker::run`] for production; step methods
//!   ([`Worker::run_once`], [`Worker::heartbeat_once`], ...) for tests.
//! * [`Completer`]: the process's one writer of outcomes, shared by its workers (one per queue)
//!   with [`Worker::with_completer`]; a worker without one writes through a completer of its own.
//! * [`WorkerConfig`]: every knob, with production defaults.
//! * [`Maintenance`] / [`MaintenanceConfig`]: the process registry entry and the services only the
//!   elected leader runs (rescuer, pruner, reaper); run one per process next to its workers or
//!   API.
//! * [`WorkerStats`]: counters and gauges for tests and embedding applications.
//!
//! Metrics: the worker records Prometheus metrics through the `metrics` facade (names in
//! `faultline_ports::telemetry`): claims, wait and run times, outcomes, retries, lease
//! expirations and recoveries (from its rescuer), stale writes, store errors, in-flight handlers
//! and slots. Nothing is recorded until the process installs a recorder (the binary installs
//! `faultline-metrics`). Queue and kind label values are bounded by a
//! [`faultline_ports::LabelGuard`] ([`Worker::with_metric_labels`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use faultline_ports::JobStore;
//! use faultline_worker::{Handler, JobContext, Outcome, Registry, Worker, WorkerConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! struct Email;
//!
//! #[async_trait::async_trait]
//! impl Handler for Email {
//!     async fn run(&self, ctx: JobContext) -> Outcome {
//!         // send ctx.payload, using format!("{}:{}", ctx.id, ctx.fencing_token) as the
//!         // provider's idempotency key
//!         Outcome::Complete(None)
//!     }
//! }
//!
//! async fn serve<S: JobStore>(store: Arc<S>, shutdown: CancellationToken) {
//!     let mut registry = Registry::new();
//!     registry.register("email", Email);
//!     let mut worker = Worker::new(store, registry, WorkerConfig::default())
//!         .expect("valid configuration");
//!     worker.run(shutdown).await;
//! }
//! ```

mod backoff;
mod claims;
mod completer;
mod config;
mod handler;
mod leases;
mod lost;
mod maintenance;
mod run;
mod stats;
mod telemetry;
mod worker;
mod writes;

pub use completer::{Completer, CompleterConfig};
pub use config::{ConfigError, WorkerConfig, host_name};
pub use handler::{Handler, JobContext, Outcome, Registry};
pub use maintenance::{Maintenance, MaintenanceConfig, MaintenanceHandle};
pub use stats::{Counters, StatsSnapshot, WorkerStats};
pub use worker::{HeartbeatReport, ShutdownReport, StepReport, Worker};
