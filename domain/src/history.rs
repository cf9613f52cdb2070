//! The attempt history: one entry per failed attempt, newest last, bounded to the newest
//! [`AttemptError::HISTORY`] entries, written by the same transition that fails the attempt.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The handler reported an error (retryable or permanent).
    Error,
    /// The handler ran longer than its timeout and was stopped.
    Timeout,
    /// The handler panicked (or its HTTP worker crashed while reporting).
    Panic,
    /// The worker could not run the job: no handler for its kind, a result that cannot be stored,
    /// an outcome that does not match the lease.
    Worker,
    /// The lease ended before its holder reported (worker dead, paused, cut off, or an operator
    /// expired the lease); the store ended the attempt.
    LeaseExpired,
}

impl FailureKind {
    /// Every kind.
    pub const ALL: [FailureKind; 5] = [
        FailureKind::Error,
        FailureKind::Timeout,
        FailureKind::Panic,
        FailureKind::Worker,
        FailureKind::LeaseExpired,
    ];

    /// The lowercase name used in storage and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Error => "error",
            FailureKind::Timeout => "timeout",
            FailureKind::Panic => "panic",
            FailureKind::Worker => "worker",
            FailureKind::LeaseExpired => "lease_expired",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailureKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FailureKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| format!("unknown failure kind {s:?}"))
    }
}

/// One failed attempt of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    /// The attempt number (the job's `attempts` when it failed).
    pub attempt: i32,
    /// When the attempt was ended, by the store's clock.
    pub at: DateTime<Utc>,
    /// The lease holder of the attempt.
    pub worker: Option<String>,
    /// The fencing token of the attempt's lease.
    pub fencing_token: i64,
    /// What went wrong (the same text as `last_error` at that time).
    pub error: String,
    /// Why it went wrong.
    pub kind: FailureKind,
}

impl AttemptError {
    /// How many entries a job keeps: the newest ones; older entries are dropped as new ones come.
    pub const HISTORY: usize = 20;

    /// Appends `entry` to `history`, keeping only the newest [`AttemptError::HISTORY`] entries.
    pub fn push(history: &mut Vec<AttemptError>, entry: AttemptError) {
        history.push(entry);
        if history.len() > Self::HISTORY {
            let excess = history.len() - Self::HISTORY;
            history.drain(..excess);
        }
    }
}
