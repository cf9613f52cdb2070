//! Faultline's pure core: the job record, its state machine with fencing, the retry policy and the
//! canonical payload fingerprint used for idempotency.
//!
//! *Architecture invariant*: this crate does no IO, no async, reads no clock and draws no random
//! numbers. "Now" and every random sample are arguments, so every function here is deterministic and
//! the same rules can be checked by property tests, replayed by the in-memory adapter and mirrored in
//! SQL by the Postgres adapter.

mod fingerprint;
mod history;
mod job;
mod number;
mod retry;
mod state;

pub use fingerprint::payload_fingerprint;
pub use history::{AttemptError, FailureKind};
pub use job::{Job, JobSpec, Limits, SpecError};
pub use number::{
    MAX_EXPONENT, MAX_FRACTION_DIGITS, MAX_INTEGER_DIGITS, canonical_json, canonical_number,
    check_number,
};
pub use retry::RetryPolicy;
pub use state::{Event, EventKind, JobState, TransitionError};
