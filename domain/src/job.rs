//! The job record shared by every crate (the leaf type everything speaks), and the validated
//! request to create one.

use chrono::{DateTime, Datelike, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{AttemptError, JobState, RetryPolicy};

/// One job as the store holds it. Adapters persist exactly these fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Store-assigned, increasing identifier; also the last tie-breaker of the claim order.
    pub id: i64,
    /// Workers subscribe to queues; the claim only looks at the queues it is asked for.
    pub queue: String,
    /// Selects the handler that runs the job.
    pub kind: String,
    /// Arbitrary JSON handed to the handler.
    pub payload: Value,
    /// Lower runs first among due jobs of the claimed queues.
    pub priority: i16,
    /// Where the job is in its lifecycle.
    pub state: JobState,
    /// Claims so far (every claim is an attempt; a snooze gives its attempt back). Reset by a redrive.
    pub attempts: i32,
    /// The attempt budget: a job that fails its `max_attempts`-th attempt ends `failed`.
    pub max_attempts: i32,
    /// Bumped on every claim; every write by a lease holder must present the current value.
    pub fencing_token: i64,
    /// Set by a cancel of a running job: its worker learns it at the next heartbeat, and the job
    /// ends `cancelled` instead of being retried. Kept as a record once the job finishes; never
    /// set on a queued job (a redrive clears it).
    pub cancel_requested: bool,
    /// Earliest time the job may be claimed (scheduling, backoff, snooze).
    pub next_run_at: DateTime<Utc>,
    /// The worker that holds (or last held) the lease; kept after the lease ends for diagnosis.
    pub lease_owner: Option<String>,
    /// End of the current lease; `Some` exactly while the job is `running`.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Unique across the store while the job exists; replays of the same request return this job.
    pub idempotency_key: Option<String>,
    /// Backoff used when a retryable failure or an expired lease gives no explicit delay.
    pub retry_policy: RetryPolicy,
    /// Per-job execution timeout for workers, in milliseconds (`None`: the kind's default).
    pub timeout_ms: Option<i64>,
    /// The error of the latest failed attempt (kept through retries and redrives).
    pub last_error: Option<String>,
    /// Every failed attempt, oldest first, bounded to the newest [`AttemptError::HISTORY`]
    /// (kept through retries and redrives, like `last_error`).
    pub errors: Vec<AttemptError>,
    /// What the handler returned on success.
    pub result: Option<Value>,
    /// When the job was enqueued.
    pub created_at: DateTime<Utc>,
    /// When the latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the job reached a terminal state; `Some` exactly in terminal states.
    pub finished_at: Option<DateTime<Utc>>,
}

impl Job {
    /// A new queued job for `spec`, created at `now`, with the store-assigned `id`.
    pub fn new(id: i64, spec: &JobSpec, now: DateTime<Utc>) -> Job {
        Job {
            id,
            queue: spec.queue.clone(),
            kind: spec.kind.clone(),
            payload: crate::canonical_json(&spec.payload),
            priority: spec.priority,
            state: JobState::Queued,
            attempts: 0,
            max_attempts: spec.max_attempts,
            fencing_token: 0,
            cancel_requested: false,
            next_run_at: spec.first_run_at(now),
            lease_owner: None,
            lease_expires_at: None,
            idempotency_key: spec.idempotency_key.clone(),
            retry_policy: spec.retry_policy,
            timeout_ms: spec.timeout_ms,
            last_error: None,
            errors: Vec::new(),
            result: None,
            created_at: now,
            started_at: None,
            finished_at: None,
        }
    }
}

/// Bounds on what a job request may contain.
#[derive(Debug, Clone, Copy)]
pub struct Limits;

impl Limits {
    /// Longest queue name, kind, idempotency key or worker id, in characters.
    pub const MAX_NAME_CHARS: usize = 128;
    /// Largest attempt budget.
    pub const MAX_ATTEMPTS: i32 = 1_000;
    /// Longest delay, backoff, lease or timeout: 365 days in milliseconds.
    pub const MAX_DURATION_MS: i64 = 365 * 24 * 3_600_000;

    /// Checks a name (queue, kind, key, worker id): 1 to [`Limits::MAX_NAME_CHARS`] characters,
    /// no control characters.
    pub fn check_name(field: &'static str, value: &str) -> Result<(), SpecError> {
        check_name(field, value)
    }

    /// Checks a duration in milliseconds: between `min` and [`Limits::MAX_DURATION_MS`].
    pub fn check_ms(field: &'static str, value: i64, min: i64) -> Result<(), SpecError> {
        check_ms(field, Some(value), min)
    }

    /// Checks that JSON can be stored exactly: PostgreSQL's `jsonb` refuses the NUL character
    /// (`\u0000`) in strings and keys, so no store accepts it; and every number must fit
    /// PostgreSQL's `numeric` (see [`crate::check_number`]), so that no store rounds one.
    pub fn check_json(field: &'static str, value: &Value) -> Result<(), SpecError> {
        fn has_nul(value: &Value) -> bool {
            match value {
                Value::String(s) => s.contains('\0'),
                Value::Array(items) => items.iter().any(has_nul),
                Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
                _ => false,
            }
        }
        if has_nul(value) {
            return Err(SpecError::NulCharacter { field });
        }
        match crate::number::first_unstorable(value) {
            Some(detail) => Err(SpecError::OutOfRange { field, detail }),
            None => Ok(()),
        }
    }

    /// `text` with every NUL character (which PostgreSQL `text` refuses) replaced by U+FFFD, for
    /// free-form text such as error messages.
    pub fn storable_text(text: &str) -> String {
        text.replace('\0', "\u{FFFD}")
    }
}

/// A request to enqueue one job. Validate it with [`JobSpec::validate`] before handing it to a store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// See [`Job::queue`].
    pub queue: String,
    /// See [`Job::kind`].
    pub kind: String,
    /// See [`Job::payload`].
    pub payload: Value,
    /// See [`Job::priority`].
    pub priority: i16,
    /// Run no earlier than this instant (exclusive with `delay_ms`).
    pub run_at: Option<DateTime<Utc>>,
    /// Run no earlier than this many milliseconds after the store's "now" (exclusive with `run_at`).
    pub delay_ms: Option<i64>,
    /// See [`Job::max_attempts`].
    pub max_attempts: i32,
    /// See [`Job::retry_policy`].
    pub retry_policy: RetryPolicy,
    /// See [`Job::timeout_ms`].
    pub timeout_ms: Option<i64>,
    /// See [`Job::idempotency_key`].
    pub idempotency_key: Option<String>,
}

impl JobSpec {
    /// Default queue of a job that names none.
    pub const DEFAULT_QUEUE: &'static str = "default";
    /// Default attempt budget.
    pub const DEFAULT_MAX_ATTEMPTS: i32 = 25;

    /// A job of `kind` with `payload` on the default queue, with every other field at its default.
    pub fn new(kind: impl Into<String>, payload: Value) -> JobSpec {
        JobSpec {
            queue: Self::DEFAULT_QUEUE.to_owned(),
            kind: kind.into(),
            payload,
            priority: 0,
            run_at: None,
            delay_ms: None,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            retry_policy: RetryPolicy::DEFAULT,
            timeout_ms: None,
            idempotency_key: None,
        }
    }

    /// Sets the queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The first instant the job may run, given the store's `now`.
    pub fn first_run_at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match (self.run_at, self.delay_ms) {
            (Some(at), _) => at,
            (None, Some(ms)) => now + TimeDelta::milliseconds(ms),
            (None, None) => now,
        }
    }

    /// The canonical fingerprint of this request (see [`crate::payload_fingerprint`]).
    pub fn fingerprint(&self) -> Vec<u8> {
        crate::payload_fingerprint(&self.queue, &self.kind, &self.payload)
    }

    /// Checks every field against [`Limits`]; the first problem found is returned.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name("queue", &self.queue)?;
        check_name("kind", &self.kind)?;
        Limits::check_json("payload", &self.payload)?;
        if let Some(key) = &self.idempotency_key {
            check_name("idempotency_key", key)?;
        }
        if !(1..=Limits::MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(SpecError::OutOfRange {
                field: "max_attempts",
                detail: format!("must be between 1 and {}", Limits::MAX_ATTEMPTS),
            });
        }
        if let Some(at) = self.run_at
            && !(1970..=9999).contains(&at.year())
        {
            return Err(SpecError::OutOfRange {
                field: "run_at",
                detail: "must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z"
                    .into(),
            });
        }
        if self.run_at.is_some() && self.delay_ms.is_some() {
            return Err(SpecError::Exclusive {
                fields: "run_at and delay",
            });
        }
        check_ms("delay", self.delay_ms, 0)?;
        check_ms("timeout", self.timeout_ms, 1)?;
        check_ms("backoff base", Some(self.retry_policy.base_ms), 0)?;
        check_ms("backoff cap", Some(self.retry_policy.cap_ms), 0)?;
        if self.retry_policy.cap_ms < self.retry_policy.base_ms {
            return Err(SpecError::OutOfRange {
                field: "backoff cap",
                detail: "must not be below the backoff base".into(),
            });
        }
        if !(0.0..=1.0).contains(&self.retry_policy.jitter) {
            return Err(SpecError::OutOfRange {
                field: "jitter",
                detail: "must be between 0 and 1".into(),
            });
        }
        Ok(())
    }
}

fn check_name(field: &'static str, value: &str) -> Result<(), SpecError> {
    let chars = value.chars().count();
    if chars == 0 || chars > Limits::MAX_NAME_CHARS {
        return Err(SpecError::OutOfRange {
            field,
            detail: format!("must be 1 to {} characters long", Limits::MAX_NAME_CHARS),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(SpecError::ControlCharacter { field });
    }
    Ok(())
}

fn check_ms(field: &'static str, value: Option<i64>, min: i64) -> Result<(), SpecError> {
    match value {
        Some(ms) if !(min..=Limits::MAX_DURATION_MS).contains(&ms) => Err(SpecError::OutOfRange {
            field,
            detail: format!(
                "must be between {min} and {} milliseconds",
                Limits::MAX_DURATION_MS
            ),
        }),
        _ => Ok(()),
    }
}

/// Why a [`JobSpec`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A number or a length outside its allowed range.
    #[error("{field} {detail}")]
    OutOfRange {
        /// The offending field.
        field: &'static str,
        /// The allowed range, in words.
        detail: String,
    },
    /// A name containing control characters.
    #[error("{field} must not contain control characters")]
    ControlCharacter {
        /// The offending field.
        field: &'static str,
    },
    /// JSON with a NUL character, which PostgreSQL cannot store.
    #[error("{field} must not contain the NUL character (\\u0000)")]
    NulCharacter {
        /// The offending field.
        field: &'static str,
    },
    /// Two fields that may not both be set.
    #[error("{fields} are mutually exclusive")]
    Exclusive {
        /// The two fields, in words.
        fields: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validation_names_the_offending_field() {
        let ok = JobSpec::new("email", json!({}));
        assert_eq!(ok.validate(), Ok(()));
        let cases: Vec<(JobSpec, &str)> = vec![
            (JobSpec::new("", json!({})), "kind must be 1 to 128"),
            (ok.clone().queue("a".repeat(129)), "queue must be 1 to 128"),
            (ok.clone().queue("a\nb"), "queue must not contain control"),
            (
                ok.clone().idempotency_key("k\u{7}"),
                "idempotency_key must not",
            ),
            (
                JobSpec {
                    max_attempts: 0,
                    ..ok.clone()
                },
                "max_attempts must be between",
            ),
            (
                JobSpec::new("k", json!({"a": ["x\u{0}"]})),
                "payload must not contain the NUL",
            ),
            (
                JobSpec::new("k", json!({"a\u{0}": 1})),
                "payload must not contain the NUL",
            ),
            (
                JobSpec::new("k", serde_json::from_str("[1e-16384]").unwrap()),
                "payload number 1e-16384 has more than 16383 digits after",
            ),
            (
                JobSpec {
                    delay_ms: Some(-1),
                    ..ok.clone()
                },
                "delay must be between",
            ),
            (
                JobSpec {
                    timeout_ms: Some(0),
                    ..ok.clone()
                },
                "timeout must be between",
            ),
            (
                JobSpec {
                    delay_ms: Some(1),
                    run_at: Some(Utc::now()),
                    ..ok.clone()
                },
                "run_at and delay are mutually exclusive",
            ),
            (
                JobSpec {
                    retry_policy: RetryPolicy::new(10, 5),
                    ..ok.clone()
                },
                "backoff cap must not be below",
            ),
        ];
        for (spec, expected) in cases {
            let err = spec.validate().expect_err(expected).to_string();
            assert!(
                err.starts_with(expected),
                "{err:?} should start with {expected:?}"
            );
        }
    }
    #[test]
    fn run_at_is_bounded_to_1970_through_9999() {
        let at = |s: &str| JobSpec {
            run_at: Some(s.parse().expect("a valid instant")),
            ..JobSpec::new("k", json!({}))
        };
        for fine in [
            "1970-01-01T00:00:00Z",
            "2026-06-01T12:00:00Z",
            "9999-12-31T23:59:59.999999Z",
        ] {
            assert_eq!(at(fine).validate(), Ok(()), "{fine}");
        }
        // Year 1 would be storable, but it is no sane schedule (and it made the wait metrics
        // report about 6.4e10 s); year 10000 and later cannot be written as RFC 3339.
        for refused in [
            "0001-01-01T00:00:00Z",
            "1969-12-31T23:59:59.999Z",
            "+10000-01-01T00:00:00Z",
        ] {
            let err = at(refused).validate().expect_err(refused).to_string();
            assert!(err.starts_with("run_at must be between 1970"), "{err}");
        }
        let min = DateTime::<Utc>::MIN_UTC;
        let err = JobSpec {
            run_at: Some(min),
            ..JobSpec::new("k", json!({}))
        }
        .validate()
        .expect_err("the earliest instant chrono knows");
        assert!(err.to_string().starts_with("run_at must be between"));
    }
}
