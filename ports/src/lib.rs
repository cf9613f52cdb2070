//! Faultline's ports: the traits the engine needs from the outside world, and nothing else.
//!
//! * [`JobStore`]: one wide storage trait. Every adapter (Postgres, in-memory) implements all of
//!   it with the same semantics, proven by one contract suite run against each.
//! * [`Clock`]: "now", so tests can pin time. Production Postgres ignores it and uses the
//!   database's `now()`.
//! * [`telemetry`]: the metric names and label vocabulary shared by every component that emits
//!   or exports metrics, and [`LabelGuard`], which bounds label cardinality.
//!
//! *Architecture invariant*: ports depend on `faultline-domain` only; no adapter types (no sqlx,
//! no HTTP) appear in any signature here.

mod clock;
mod fleet;
mod store;
pub mod telemetry;
mod validate;

pub use clock::{Clock, ManualClock, SystemClock};
pub use fleet::{
    ElectParams, Leadership, ProcessInfo, ProcessSpec, QueueInfo, QueueLimits, QueueSlots,
};
#[cfg(feature = "mock")]
pub use store::MockJobStore;
pub use store::{
    ClaimParams, EnqueueOutcome, Enqueued, FailOutcome, Failure, HeartbeatOutcome, JobPage,
    JobStore, LeaseRef, ListParams, PruneParams, QueueBacklog, QueueStats, StoreError, StoreResult,
    WriteOutcome,
};

pub use telemetry::LabelGuard;
pub use validate::{
    MAX_CLAIM_LIMIT, MAX_PAGE_SIZE, validate_extend_ms, validate_process, validate_queue_name,
    validate_result, validate_snooze_ms, validate_specs,
};

/// The domain crate, re-exported so adapters and apps name one path.
pub use faultline_domain as domain;
