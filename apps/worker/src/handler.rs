//! What a job's code looks like to the runtime: the `Handler` trait, its context and its outcome,
//! and the registry that maps kinds to handlers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use faultline_domain::Job;
use faultline_ports::LeaseRef;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Everything a handler knows about the job it runs.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job's id.
    pub id: i64,
    /// The queue it was claimed from.
    pub queue: String,
    /// Its kind (which selected this handler).
    pub kind: String,
    /// Its payload.
    pub payload: Value,
    /// This attempt's number, from 1.
    pub attempt: i32,
    /// The job's attempt budget.
    pub max_attempts: i32,
    /// The fencing token of this attempt's lease: present it to external systems as part of an
    /// idempotency key (`{id}:{fencing_token}`) to make their effects at-most-once per attempt.
    pub fencing_token: i64,
    /// When the lease ends unless heartbeats extend it (the runtime heartbeats for you).
    pub lease_expires_at: DateTime<Utc>,
    /// Fires when the handler must stop: the lease was lost, the job was cancelled, its timeout
    /// passed, or the worker is shutting down past its grace period. A result returned after it
    /// fired for a lost lease is never written.
    pub cancel: CancellationToken,
}

impl JobContext {
    /// This attempt's lease: what a fenced write of the outcome presents, e.g. inside the
    /// handler's own transaction (see [`Outcome::Recorded`]).
    pub fn lease(&self) -> LeaseRef {
        LeaseRef {
            job_id: self.id,
            token: self.fencing_token,
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Success, with an optional result to store.
    Complete(Option<Value>),
    /// A failure worth retrying (while attempts remain), after `delay` or the job's retry policy.
    Retry {
        /// What went wrong.
        error: String,
        /// Wait this long before the next attempt; `None` uses the job's backoff.
        delay: Option<Duration>,
    },
    /// A failure that retrying cannot fix: the job ends `failed`.
    Fail {
        /// What went wrong.
        error: String,
    },
    /// Not now: run again after `delay`, without using up an attempt.
    Snooze {
        /// How long to wait.
        delay: Duration,
    },
    /// The handler already recorded this attempt's outcome itself, with a fenced write inside its
    /// own database transaction (`faultline_postgres::PgStore::job_complete_in`, `job_fail_in`,
    /// `job_snooze_in` with [`JobContext::lease`]), and that transaction committed: its effects
    /// and the job's new state are one atomic change. Carries the job as that write returned
    /// it (boxed: build it with [`Outcome::recorded`]). The runtime writes nothing more for this
    /// attempt.
    Recorded(Box<Job>),
    /// The handler's own fenced write was refused with `StoreError::StaleLease`: the lease is no
    /// longer held (another worker may own the job now), and the handler rolled its transaction
    /// back, so none of its writes exist. The runtime writes nothing for this attempt.
    LeaseLost,
}

impl Outcome {
    /// [`Outcome::Recorded`] with the job the handler's own fenced write returned.
    pub fn recorded(job: Job) -> Self {
        Outcome::Recorded(Box::new(job))
    }
}

/// The code that runs jobs of one kind.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt. A panic fails only this attempt (retryable, panic message kept).
    async fn run(&self, ctx: JobContext) -> Outcome;

    /// Default execution timeout for this kind when the job sets none; `None`: no timeout.
    fn timeout(&self) -> Option<Duration> {
        None
    }
}

/// Maps kinds to handlers. A job whose kind has no handler fails permanently with a clear error.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kinds: Vec<&String> = self.handlers.keys().collect();
        kinds.sort();
        f.debug_struct("Registry").field("kinds", &kinds).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `kind`, replacing any earlier one.
    pub fn register(&mut self, kind: impl Into<String>, handler: impl Handler) -> &mut Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    /// The handler for `kind`.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind).cloned()
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.handlers.keys().cloned().collect();
        kinds.sort();
        kinds
    }
}
