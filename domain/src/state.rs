//! The job state machine: `queued -> running -> succeeded | failed`, plus `cancelled`, with the
//! fencing token that makes a stale lease holder's writes impossible.
//!
//! Every event is a pure function of the job and the event (which carries "now" and any delay
//! already drawn from the retry policy). An event either applies completely or leaves the job
//! untouched and says why.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{AttemptError, FailureKind, Job};

/// Where a job is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting to be claimed once `next_run_at` has passed.
    Queued,
    /// Leased to a worker until `lease_expires_at`.
    Running,
    /// Terminal: the handler completed it.
    Succeeded,
    /// Terminal until redriven: a permanent failure or an exhausted attempt budget.
    Failed,
    /// Terminal until redriven: cancelled by a user.
    Cancelled,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The lowercase name used in storage, in the API and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether the job is finished (only a redrive of `failed` or `cancelled` leaves these).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown job state {s:?}"))
    }
}

/// Something that happens to a job. Events by a lease holder carry the fencing token it was given.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A worker leases the due, queued job for `lease_ms`: a new attempt with a new fencing token.
    Claim {
        /// The claiming worker.
        owner: String,
        /// The store's clock.
        now: DateTime<Utc>,
        /// Lease length in milliseconds.
        lease_ms: i64,
    },
    /// The lease holder extends its lease to `now + extend_ms`.
    Heartbeat {
        /// The holder's fencing token.
        token: i64,
        /// The store's clock.
        now: DateTime<Utc>,
        /// New lease length from now, in milliseconds.
        extend_ms: i64,
    },
    /// The lease holder reports success.
    Complete {
        /// The holder's fencing token.
        token: i64,
        /// The store's clock.
        now: DateTime<Utc>,
        /// The handler's result.
        result: Option<Value>,
    },
    /// The lease holder reports a failure that may be retried after `delay_ms` (the caller draws it
    /// from the job's retry policy unless the handler chose one).
    FailRetryable {
        /// The holder's fencing token.
        token: i64,
        /// The store's clock.
        now: DateTime<Utc>,
        /// The error to keep.
        error: String,
        /// Why the attempt failed (recorded in the attempt history).
        kind: FailureKind,
        /// Delay before the next attempt, in milliseconds.
        delay_ms: i64,
    },
    /// The lease holder reports a failure that must not be retried.
    FailPermanently {
        /// The holder's fencing token.
        token: i64,
        /// The store's clock.
        now: DateTime<Utc>,
        /// The error to keep.
        error: String,
        /// Why the attempt failed (recorded in the attempt history).
        kind: FailureKind,
    },
    /// The store notices the lease ran out: the attempt counts as failed.
    LeaseExpired {
        /// The store's clock.
        now: DateTime<Utc>,
        /// Delay before the next attempt, in milliseconds (drawn from the retry policy).
        delay_ms: i64,
    },
    /// A user cancels the job: a queued job ends `cancelled`; a running job is marked, and ends
    /// `cancelled` when its holder gives it up (or its lease expires) instead of being retried.
    Cancel {
        /// The store's clock.
        now: DateTime<Utc>,
    },
    /// A user queues a `failed` or `cancelled` job again with a fresh attempt budget.
    Redrive {
        /// The store's clock.
        now: DateTime<Utc>,
    },
    /// The lease holder puts the job back for `delay_ms` without using up its attempt.
    Snooze {
        /// The holder's fencing token.
        token: i64,
        /// The store's clock.
        now: DateTime<Utc>,
        /// Delay before the job is due again, in milliseconds.
        delay_ms: i64,
    },
}

/// The name of an [`Event`], for errors and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// [`Event::Claim`]
    Claim,
    /// [`Event::Heartbeat`]
    Heartbeat,
    /// [`Event::Complete`]
    Complete,
    /// [`Event::FailRetryable`]
    FailRetryable,
    /// [`Event::FailPermanently`]
    FailPermanently,
    /// [`Event::LeaseExpired`]
    LeaseExpired,
    /// [`Event::Cancel`]
    Cancel,
    /// [`Event::Redrive`]
    Redrive,
    /// [`Event::Snooze`]
    Snooze,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            EventKind::Claim => "claim",
            EventKind::Heartbeat => "heartbeat",
            EventKind::Complete => "complete",
            EventKind::FailRetryable => "fail (retryable)",
            EventKind::FailPermanently => "fail (permanent)",
            EventKind::LeaseExpired => "lease expiry",
            EventKind::Cancel => "cancel",
            EventKind::Redrive => "redrive",
            EventKind::Snooze => "snooze",
        };
        f.write_str(name)
    }
}

impl Event {
    /// The event's name.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Claim { .. } => EventKind::Claim,
            Event::Heartbeat { .. } => EventKind::Heartbeat,
            Event::Complete { .. } => EventKind::Complete,
            Event::FailRetryable { .. } => EventKind::FailRetryable,
            Event::FailPermanently { .. } => EventKind::FailPermanently,
            Event::LeaseExpired { .. } => EventKind::LeaseExpired,
            Event::Cancel { .. } => EventKind::Cancel,
            Event::Redrive { .. } => EventKind::Redrive,
            Event::Snooze { .. } => EventKind::Snooze,
        }
    }

    /// The fencing token presented, for events sent by a lease holder.
    pub fn token(&self) -> Option<i64> {
        match self {
            Event::Heartbeat { token, .. }
            | Event::Complete { token, .. }
            | Event::FailRetryable { token, .. }
            | Event::FailPermanently { token, .. }
            | Event::Snooze { token, .. } => Some(*token),
            Event::Claim { .. }
            | Event::LeaseExpired { .. }
            | Event::Cancel { .. }
            | Event::Redrive { .. } => None,
        }
    }
}

/// Why an event did not apply. The job is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// A lease holder's write whose lease is gone: the job is no longer `running` under the
    /// presented token (it was rescued, re-claimed, finished or redriven since).
    #[error(
        "stale lease: token {presented} no longer holds the job (state {state}, token {current})"
    )]
    StaleLease {
        /// The token the writer presented.
        presented: i64,
        /// The job's current token.
        current: i64,
        /// The job's current state.
        state: JobState,
    },
    /// The event is not allowed in the job's state.
    #[error("illegal transition: cannot {event} a {from} job")]
    IllegalTransition {
        /// The job's state.
        from: JobState,
        /// The refused event.
        event: EventKind,
    },
    /// A claim before the job's `next_run_at`.
    #[error("the job is not due yet")]
    NotDue,
    /// A lease expiry reported while the lease still runs.
    #[error("the lease has not expired yet")]
    LeaseNotExpired,
}

fn after(now: DateTime<Utc>, ms: i64) -> DateTime<Utc> {
    now + TimeDelta::milliseconds(ms)
}

impl Job {
    /// Applies `event`; on error the job is left exactly as it was.
    pub fn apply(&mut self, event: Event) -> Result<(), TransitionError> {
        let illegal = |job: &Job| TransitionError::IllegalTransition {
            from: job.state,
            event: event.kind(),
        };
        if let Some(presented) = event.token()
            && (self.state != JobState::Running || self.fencing_token != presented)
        {
            return Err(TransitionError::StaleLease {
                presented,
                current: self.fencing_token,
                state: self.state,
            });
        }
        match event {
            Event::Claim {
                ref owner,
                now,
                lease_ms,
            } => {
                if self.state != JobState::Queued {
                    return Err(illegal(self));
                }
                if self.next_run_at > now {
                    return Err(TransitionError::NotDue);
                }
                self.state = JobState::Running;
                self.attempts += 1;
                self.fencing_token += 1;
                self.lease_owner = Some(owner.clone());
                self.lease_expires_at = Some(after(now, lease_ms));
                self.started_at = Some(now);
            }
            Event::Heartbeat { now, extend_ms, .. } => {
                self.lease_expires_at = Some(after(now, extend_ms));
            }
            Event::Complete { now, result, .. } => {
                // Numbers as every store keeps them (see `crate::canonical_json`).
                self.result = result.as_ref().map(crate::canonical_json);
                self.finish(JobState::Succeeded, now);
            }
            Event::FailRetryable {
                now,
                error,
                kind,
                delay_ms,
                ..
            } => self.fail_attempt(error, kind, now, delay_ms),
            Event::FailPermanently {
                now, error, kind, ..
            } => {
                self.record_failure(error, kind, now);
                self.finish(JobState::Failed, now);
            }
            Event::LeaseExpired { now, delay_ms } => {
                if self.state != JobState::Running {
                    return Err(illegal(self));
                }
                if self.lease_expires_at.is_some_and(|at| at > now) {
                    return Err(TransitionError::LeaseNotExpired);
                }
                let error = format!(
                    "lease expired (worker {}, fencing token {})",
                    self.lease_owner.as_deref().unwrap_or("?"),
                    self.fencing_token
                );
                self.fail_attempt(error, FailureKind::LeaseExpired, now, delay_ms);
            }
            Event::Cancel { now } => match self.state {
                JobState::Queued => self.finish(JobState::Cancelled, now),
                JobState::Running => self.cancel_requested = true,
                _ => return Err(illegal(self)),
            },
            Event::Redrive { now } => {
                if !matches!(self.state, JobState::Failed | JobState::Cancelled) {
                    return Err(illegal(self));
                }
                self.state = JobState::Queued;
                self.attempts = 0;
                self.cancel_requested = false;
                self.next_run_at = now;
                self.finished_at = None;
                self.result = None;
            }
            Event::Snooze { now, delay_ms, .. } => {
                // The claim counted an attempt; a snooze gives it back.
                self.attempts -= 1;
                if self.cancel_requested {
                    self.finish(JobState::Cancelled, now);
                } else {
                    self.requeue(after(now, delay_ms));
                }
            }
        }
        Ok(())
    }

    /// Ends the current attempt as failed: cancelled if a cancel was requested, `failed` when the
    /// attempt budget is spent, otherwise queued again after `delay_ms`.
    fn fail_attempt(
        &mut self,
        error: String,
        kind: FailureKind,
        now: DateTime<Utc>,
        delay_ms: i64,
    ) {
        self.record_failure(error, kind, now);
        if self.cancel_requested {
            self.finish(JobState::Cancelled, now);
        } else if self.attempts >= self.max_attempts {
            self.finish(JobState::Failed, now);
        } else {
            self.requeue(after(now, delay_ms));
        }
    }

    /// Keeps the failed attempt's error in `last_error` and appends it to the history.
    fn record_failure(&mut self, error: String, kind: FailureKind, now: DateTime<Utc>) {
        let entry = AttemptError {
            attempt: self.attempts,
            at: now,
            worker: self.lease_owner.clone(),
            fencing_token: self.fencing_token,
            error: error.clone(),
            kind,
        };
        AttemptError::push(&mut self.errors, entry);
        self.last_error = Some(error);
    }

    fn requeue(&mut self, next_run_at: DateTime<Utc>) {
        self.state = JobState::Queued;
        self.next_run_at = next_run_at;
        self.lease_expires_at = None;
    }

    fn finish(&mut self, state: JobState, now: DateTime<Utc>) {
        self.state = state;
        self.lease_expires_at = None;
        self.finished_at = Some(now);
    }

    /// Checks the invariants every reachable job satisfies; returns the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let fail = |what: &str| Err(format!("{what}: {self:?}"));
        if self.attempts < 0 || self.attempts > self.max_attempts {
            return fail("attempts outside 0..=max_attempts");
        }
        if self.state == JobState::Queued && self.attempts >= self.max_attempts {
            return fail("a queued job must have an attempt left");
        }
        if (self.state == JobState::Running) != self.lease_expires_at.is_some() {
            return fail("a lease end exists exactly while running");
        }
        if self.state.is_terminal() != self.finished_at.is_some() {
            return fail("finished_at is set exactly in terminal states");
        }
        if self.state == JobState::Running && self.fencing_token < 1 {
            return fail("a running job has been claimed at least once");
        }
        if self.cancel_requested && self.state == JobState::Queued {
            return fail("a queued job has no pending cancel request");
        }
        if self.result.is_some() && self.state != JobState::Succeeded {
            return fail("only succeeded jobs carry a result");
        }
        if self.errors.len() > AttemptError::HISTORY {
            return fail("the attempt history keeps at most AttemptError::HISTORY entries");
        }
        Ok(())
    }
}
