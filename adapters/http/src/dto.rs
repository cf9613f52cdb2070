//! The API's request and response bodies (OpenAPI schemas) and their conversions to and from the
//! domain. Durations are seconds as JSON numbers (fractions allowed, rounded to the nearest
//! millisecond, which is the store's unit); instants are RFC 3339 strings.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use faultline_ports::domain::{
    AttemptError, FailureKind, Job, JobSpec, JobState, Limits, RetryPolicy,
};
use faultline_ports::{EnqueueOutcome, HeartbeatOutcome};
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use poem_openapi::{Enum, Object};
use serde_json::Value;

use crate::problem::Problem;

/// Longest duration in seconds ([`Limits::MAX_DURATION_MS`]); the literal `31536000` in the
/// validators below must equal it (checked at compile time).
pub(crate) const MAX_SECONDS: i64 = Limits::MAX_DURATION_MS / 1000;
/// Longest `wait_seconds` of a lease request (the literal `30` in [`LeaseRequest`]).
pub(crate) const MAX_WAIT_SECONDS: f64 = 30.0;
/// Longest stored error text of a failure report, in characters; longer text is truncated.
pub(crate) const MAX_ERROR_CHARS: usize = 65_536;

// The validator literals in this file are these limits: a change in the domain or the ports
// fails the build here, so the OpenAPI document cannot drift from what the store accepts.
const _: () = {
    assert!(MAX_SECONDS == 31_536_000);
    assert!(MAX_WAIT_SECONDS == 30.0);
    assert!(Limits::MAX_NAME_CHARS == 128);
    assert!(Limits::MAX_ATTEMPTS == 1000);
    assert!(faultline_ports::MAX_CLAIM_LIMIT >= 1000);
    assert!(faultline_ports::MAX_PAGE_SIZE == 1000);
    assert!(AttemptError::HISTORY == 20);
};

/// Seconds (as given in the API) to whole milliseconds, rounded to the nearest one.
pub(crate) fn seconds_to_ms(field: &str, seconds: f64) -> Result<i64, Problem> {
    let ms = (seconds * 1000.0).round();
    if !ms.is_finite() || ms < 0.0 || ms > Limits::MAX_DURATION_MS as f64 {
        return Err(Problem::invalid(format!(
            "{field} must be between 0 and {MAX_SECONDS} seconds"
        )));
    }
    Ok(ms as i64)
}

/// Milliseconds (the store's unit) to seconds.
pub(crate) fn ms_to_seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// Any JSON value, required (JSON `null` included). `serde_json::Value` alone would silently read
/// a missing field as `null`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AnyJson(pub(crate) Value);

impl Type for AnyJson {
    const IS_REQUIRED: bool = true;
    type RawValueType = Value;
    type RawElementValueType = Value;

    fn name() -> Cow<'static, str> {
        "any".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema::ANY))
    }

    fn as_raw_value(&self) -> Option<&Value> {
        Some(&self.0)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Value> + 'a> {
        Box::new(std::iter::once(&self.0))
    }
}

impl ParseFromJSON for AnyJson {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            Some(value) => Ok(AnyJson(value)),
            None => Err(ParseError::expected_input()),
        }
    }
}

impl ToJSON for AnyJson {
    fn to_json(&self) -> Option<Value> {
        Some(self.0.clone())
    }
}

/// A JSON string, strictly: poem-openapi's `String` also accepts numbers and booleans (turning
/// `5` into `"5"`), which would let a wrong type through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Text(pub(crate) String);

impl Type for Text {
    const IS_REQUIRED: bool = true;
    type RawValueType = String;
    type RawElementValueType = String;

    fn name() -> Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema::new("string")))
    }

    fn as_raw_value(&self) -> Option<&String> {
        Some(&self.0)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a String> + 'a> {
        Box::new(std::iter::once(&self.0))
    }
}

impl ParseFromJSON for Text {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::String(text) => Ok(Text(text)),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for Text {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

impl From<Text> for String {
    fn from(text: Text) -> String {
        text.0
    }
}

/// A job's `run_at` (the only instant the API reads): an RFC 3339 date-time, read strictly: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` and nothing
/// else. chrono's own parser (what poem-openapi uses for `DateTime`) also takes surrounding
/// spaces, a space or lowercase `t` as the separator, signed and longer years (`+002024`) and
/// the leap second `:60`; none of these is refused by a typical client library, so accepting them
/// would only hide a client's bug. Errors name the field (poem's parse errors do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunAt(pub(crate) DateTime<Utc>);

impl RunAt {
    /// Parses `text` strictly (see [`RunAt`]); the error says what is wrong, in words.
    pub(crate) fn parse_strict(text: &str) -> Result<RunAt, String> {
        const SHAPE: &str = "run_at must be an RFC 3339 date-time such as 2026-01-31T09:30:00Z \
                             (4-digit year, `T` separator, `Z` or a ±HH:MM offset, no spaces)";
        let b = text.as_bytes();
        let digits = |range: std::ops::Range<usize>| {
            b.get(range.clone())
                .is_some_and(|d| d.len() == range.len() && d.iter().all(u8::is_ascii_digit))
        };
        let shape_ok = b.len() >= 20
            && digits(0..4)
            && b[4] == b'-'
            && digits(5..7)
            && b[7] == b'-'
            && digits(8..10)
            && b[10] == b'T'
            && digits(11..13)
            && b[13] == b':'
            && digits(14..16)
            && b[16] == b':'
            && digits(17..19);
        if !shape_ok {
            return Err(SHAPE.into());
        }
        let mut rest = 19;
        if b.get(rest) == Some(&b'.') {
            let end = b[rest + 1..]
                .iter()
                .position(|c| !c.is_ascii_digit())
                .map_or(b.len(), |n| rest + 1 + n);
            if end == rest + 1 || end - rest - 1 > 9 {
                return Err(SHAPE.into());
            }
            rest = end;
        }
        let offset_ok = match &b[rest..] {
            [b'Z'] => true,
            [b'+' | b'-', ..] => {
                b.len() == rest + 6
                    && digits(rest + 1..rest + 3)
                    && b[rest + 3] == b':'
                    && digits(rest + 4..rest + 6)
            }
            _ => false,
        };
        if !offset_ok {
            return Err(SHAPE.into());
        }
        if &b[17..19] == b"60" {
            return Err("run_at must not be a leap second (:60)".into());
        }
        DateTime::parse_from_rfc3339(text)
            .map(|at| RunAt(at.with_timezone(&Utc)))
            .map_err(|err| format!("run_at is not a valid date-time: {err}"))
    }
}

impl Type for RunAt {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "string_date-time".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema::new_with_format("string", "date-time")))
    }

    fn as_raw_value(&self) -> Option<&Self> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
        Box::new(std::iter::once(self))
    }
}

impl ParseFromJSON for RunAt {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::String(text) => RunAt::parse_strict(&text).map_err(ParseError::custom),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for RunAt {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.to_rfc3339()))
    }
}

/// Where a job is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "JobState", rename_all = "lowercase")]
pub(crate) enum JobStateDto {
    /// Waiting to be leased once `next_run_at` has passed.
    Queued,
    /// Leased to a worker until `lease_expires_at`.
    Running,
    /// Finished: the handler completed it.
    Succeeded,
    /// Finished until retried: a permanent failure or an exhausted attempt budget.
    Failed,
    /// Finished until retried: cancelled.
    Cancelled,
}

impl From<JobState> for JobStateDto {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Queued => JobStateDto::Queued,
            JobState::Running => JobStateDto::Running,
            JobState::Succeeded => JobStateDto::Succeeded,
            JobState::Failed => JobStateDto::Failed,
            JobState::Cancelled => JobStateDto::Cancelled,
        }
    }
}

impl From<JobStateDto> for JobState {
    fn from(state: JobStateDto) -> Self {
        match state {
            JobStateDto::Queued => JobState::Queued,
            JobStateDto::Running => JobState::Running,
            JobStateDto::Succeeded => JobState::Succeeded,
            JobStateDto::Failed => JobState::Failed,
            JobStateDto::Cancelled => JobState::Cancelled,
        }
    }
}

fn default_queue() -> Text {
    Text(JobSpec::DEFAULT_QUEUE.to_owned())
}

fn default_max_attempts() -> i32 {
    JobSpec::DEFAULT_MAX_ATTEMPTS
}

fn default_base_seconds() -> f64 {
    ms_to_seconds(RetryPolicy::DEFAULT.base_ms)
}

fn default_cap_seconds() -> f64 {
    ms_to_seconds(RetryPolicy::DEFAULT.cap_ms)
}

fn default_jitter() -> f64 {
    RetryPolicy::DEFAULT.jitter
}

/// Exponential backoff between attempts: attempt `n` waits `min(cap, base * 2^(n-1))`, scaled by
/// a random factor in `[1 - jitter, 1 + jitter]` and capped again.
#[derive(Debug, Clone, PartialEq, Object)]
#[oai(rename = "Backoff", deny_unknown_fields)]
pub(crate) struct BackoffDto {
    /// Delay after the first failed attempt, in seconds.
    #[oai(
        default = "default_base_seconds",
        validator(minimum(value = "0"), maximum(value = "31536000"))
    )]
    pub(crate) base_seconds: f64,
    /// Upper bound of every delay, in seconds (not below `base_seconds`).
    #[oai(
        default = "default_cap_seconds",
        validator(minimum(value = "0"), maximum(value = "31536000"))
    )]
    pub(crate) cap_seconds: f64,
    /// Relative jitter between 0 and 1.
    #[oai(
        default = "default_jitter",
        validator(minimum(value = "0"), maximum(value = "1"))
    )]
    pub(crate) jitter: f64,
}

impl From<RetryPolicy> for BackoffDto {
    fn from(policy: RetryPolicy) -> Self {
        BackoffDto {
            base_seconds: ms_to_seconds(policy.base_ms),
            cap_seconds: ms_to_seconds(policy.cap_ms),
            jitter: policy.jitter,
        }
    }
}

/// A job to enqueue.
#[derive(Debug, Clone, Object)]
#[oai(rename = "NewJob", deny_unknown_fields)]
pub(crate) struct NewJob {
    /// Selects the handler that runs the job (1 to 128 characters, no control characters).
    #[oai(validator(min_length = 1, max_length = 128))]
    pub(crate) kind: Text,
    /// Any JSON, handed to the handler as is (at most the server's payload limit, 1 MiB by
    /// default, as compact JSON; no `\u0000` in strings).
    pub(crate) payload: AnyJson,
    /// The queue; workers lease from the queues they name.
    #[oai(default = "default_queue", validator(min_length = 1, max_length = 128))]
    pub(crate) queue: Text,
    /// Lower runs first among due jobs.
    #[oai(default)]
    pub(crate) priority: i16,
    /// Run no earlier than this instant: an RFC 3339 date-time, read strictly
    /// (`YYYY-MM-DDTHH:MM:SS[.fraction]` then `Z` or `±HH:MM`; no spaces, no other year form, no
    /// leap second), between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z (a past instant
    /// means due now). Not together with `delay_seconds`.
    pub(crate) run_at: Option<RunAt>,
    /// Run no earlier than this many seconds from now. Not together with `run_at`.
    #[oai(validator(minimum(value = "0"), maximum(value = "31536000")))]
    pub(crate) delay_seconds: Option<f64>,
    /// The attempt budget: the job fails for good after this many failed attempts.
    #[oai(
        default = "default_max_attempts",
        validator(minimum(value = "1"), maximum(value = "1000"))
    )]
    pub(crate) max_attempts: i32,
    /// Execution timeout for workers, in seconds (absent: the worker's default for the kind).
    #[oai(validator(minimum(value = "0.001"), maximum(value = "31536000")))]
    pub(crate) timeout_seconds: Option<f64>,
    /// Backoff between attempts (absent: 1 s base, 1 h cap, 0.1 jitter).
    pub(crate) backoff: Option<BackoffDto>,
    /// Makes the enqueue idempotent: while a job with this key exists, enqueueing the same
    /// request (queue, kind, payload compared as canonical JSON) returns that job, and a different
    /// request is refused with 409. May also be sent as the `Idempotency-Key` header (not both
    /// with different values).
    #[oai(validator(min_length = 1, max_length = 128))]
    pub(crate) idempotency_key: Option<Text>,
}

impl NewJob {
    /// The domain request, checked by [`JobSpec::validate`] and against the payload limit.
    pub(crate) fn into_spec(self, max_payload_bytes: usize) -> Result<JobSpec, Problem> {
        check_json_size("payload", &self.payload.0, max_payload_bytes)?;
        let retry_policy = match self.backoff {
            Some(backoff) => RetryPolicy {
                base_ms: seconds_to_ms("backoff.base_seconds", backoff.base_seconds)?,
                cap_ms: seconds_to_ms("backoff.cap_seconds", backoff.cap_seconds)?,
                jitter: backoff.jitter,
            },
            None => RetryPolicy::DEFAULT,
        };
        let spec = JobSpec {
            queue: self.queue.0,
            kind: self.kind.0,
            payload: self.payload.0,
            priority: self.priority,
            run_at: self.run_at.map(|at| at.0),
            delay_ms: self
                .delay_seconds
                .map(|s| seconds_to_ms("delay_seconds", s))
                .transpose()?,
            max_attempts: self.max_attempts,
            retry_policy,
            timeout_ms: self
                .timeout_seconds
                .map(|s| seconds_to_ms("timeout_seconds", s))
                .transpose()?,
            idempotency_key: self.idempotency_key.map(String::from),
        };
        spec.validate()
            .map_err(|err| Problem::invalid(err.to_string()))?;
        Ok(spec)
    }
}

/// Refuses JSON whose compact encoding exceeds `limit` bytes.
pub(crate) fn check_json_size(field: &str, value: &Value, limit: usize) -> Result<(), Problem> {
    // Counting bytes through a writer avoids building the string.
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value)
        .map_err(|err| Problem::invalid(format!("{field}: {err}")))?;
    if counter.0 > limit {
        return Err(Problem::payload_too_large(field, counter.0, limit));
    }
    Ok(())
}

/// Many jobs to enqueue in one transaction.
#[derive(Debug, Clone, Object)]
#[oai(rename = "NewJobBatch", deny_unknown_fields)]
pub(crate) struct NewJobBatch {
    /// The jobs, 1 to 1000. If any item is invalid the whole batch is refused (422 naming the
    /// item's index) and nothing is created.
    #[oai(validator(min_items = 1, max_items = 1000))]
    pub(crate) jobs: Vec<NewJob>,
}

/// What happened to one item of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "BatchOutcome", rename_all = "snake_case")]
pub(crate) enum BatchOutcomeDto {
    /// A new job was created.
    Created,
    /// The idempotency key named an existing job with the same request (or an earlier item of
    /// this batch with the same key); nothing new was created.
    Existing,
    /// The idempotency key belongs to a job with a different request; this item created nothing
    /// (the other items are unaffected).
    Conflict,
}

/// The result of one batch item, in input order.
#[derive(Debug, Clone, Object)]
#[oai(rename = "BatchItemResult")]
pub(crate) struct BatchItemResult {
    /// What happened.
    pub(crate) outcome: BatchOutcomeDto,
    /// The created or existing job; for a conflict, the job that owns the key.
    pub(crate) job_id: i64,
}

impl From<EnqueueOutcome> for BatchItemResult {
    fn from(outcome: EnqueueOutcome) -> Self {
        let (outcome, job_id) = match outcome {
            EnqueueOutcome::Created { id } => (BatchOutcomeDto::Created, id),
            EnqueueOutcome::Existing { id } => (BatchOutcomeDto::Existing, id),
            EnqueueOutcome::Conflict { existing_id } => (BatchOutcomeDto::Conflict, existing_id),
        };
        BatchItemResult { outcome, job_id }
    }
}

/// The result of a batch enqueue: one entry per submitted job, in input order.
#[derive(Debug, Clone, Object)]
#[oai(rename = "BatchResult")]
pub(crate) struct BatchResult {
    /// One result per item, in input order.
    pub(crate) results: Vec<BatchItemResult>,
}

/// A job as stored.
#[derive(Debug, Clone, Object)]
#[oai(rename = "Job", skip_serializing_if_is_none)]
pub(crate) struct JobView {
    /// The job's id (increasing).
    pub(crate) id: i64,
    /// Its queue.
    pub(crate) queue: String,
    /// Its kind (selects the handler).
    pub(crate) kind: String,
    /// Its payload.
    pub(crate) payload: AnyJson,
    /// Lower runs first.
    pub(crate) priority: i16,
    /// Where it is in its lifecycle.
    pub(crate) state: JobStateDto,
    /// Attempts so far: every lease is an attempt (a snooze gives it back); a retry of a failed or
    /// cancelled job resets it to 0.
    pub(crate) attempts: i32,
    /// The attempt budget.
    pub(crate) max_attempts: i32,
    /// The fencing token of the latest lease (0 before the first); lease-holder writes must
    /// present the current one as `lease_token`.
    pub(crate) fencing_token: i64,
    /// A cancel arrived while the job was running; its worker learns it at the next heartbeat.
    pub(crate) cancel_requested: bool,
    /// Earliest time it may be leased.
    pub(crate) next_run_at: DateTime<Utc>,
    /// The worker holding (or that last held) the lease.
    pub(crate) lease_owner: Option<String>,
    /// End of the current lease; present exactly while `running`.
    pub(crate) lease_expires_at: Option<DateTime<Utc>>,
    /// Its idempotency key.
    pub(crate) idempotency_key: Option<String>,
    /// Its backoff between attempts.
    pub(crate) backoff: BackoffDto,
    /// Its execution timeout in seconds.
    pub(crate) timeout_seconds: Option<f64>,
    /// The error of the latest failed attempt (kept through retries). The same text as the last
    /// entry of `errors`; kept for compatibility.
    pub(crate) last_error: Option<String>,
    /// The failed attempts, oldest first: the newest 20 are kept (through retries too).
    pub(crate) errors: Vec<AttemptErrorView>,
    /// What the handler returned (only on `succeeded` jobs).
    pub(crate) result: Option<Value>,
    /// When it was enqueued.
    pub(crate) created_at: DateTime<Utc>,
    /// When the latest attempt started.
    pub(crate) started_at: Option<DateTime<Utc>>,
    /// When it finished; present exactly in `succeeded`, `failed` and `cancelled`.
    pub(crate) finished_at: Option<DateTime<Utc>>,
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        JobView {
            id: job.id,
            queue: job.queue,
            kind: job.kind,
            payload: AnyJson(job.payload),
            priority: job.priority,
            state: job.state.into(),
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            fencing_token: job.fencing_token,
            cancel_requested: job.cancel_requested,
            next_run_at: job.next_run_at,
            lease_owner: job.lease_owner,
            lease_expires_at: job.lease_expires_at,
            idempotency_key: job.idempotency_key,
            backoff: job.retry_policy.into(),
            timeout_seconds: job.timeout_ms.map(ms_to_seconds),
            last_error: job.last_error,
            errors: job.errors.into_iter().map(AttemptErrorView::from).collect(),
            result: job.result,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
        }
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "FailureKind", rename_all = "snake_case")]
pub(crate) enum FailureKindDto {
    /// The handler reported an error (over HTTP: `POST /v1/jobs/{id}/fail`).
    Error,
    /// The handler ran longer than its timeout and was stopped.
    Timeout,
    /// The handler panicked.
    Panic,
    /// The worker could not run the job (no handler for its kind, a result it could not store,
    /// ...).
    Worker,
    /// The lease ended before its holder reported (worker dead, paused or cut off); the store
    /// ended the attempt.
    LeaseExpired,
}

impl From<FailureKind> for FailureKindDto {
    fn from(kind: FailureKind) -> Self {
        match kind {
            FailureKind::Error => FailureKindDto::Error,
            FailureKind::Timeout => FailureKindDto::Timeout,
            FailureKind::Panic => FailureKindDto::Panic,
            FailureKind::Worker => FailureKindDto::Worker,
            FailureKind::LeaseExpired => FailureKindDto::LeaseExpired,
        }
    }
}

/// One failed attempt of a job.
#[derive(Debug, Clone, Object)]
#[oai(rename = "AttemptError", skip_serializing_if_is_none)]
pub(crate) struct AttemptErrorView {
    /// Which attempt it was (1 for the first; counting restarts after a retry of the job).
    pub(crate) attempt: i32,
    /// When the attempt ended, by the database's clock.
    pub(crate) at: DateTime<Utc>,
    /// The worker that held the attempt's lease.
    pub(crate) worker: Option<String>,
    /// The fencing token of the attempt's lease.
    pub(crate) fencing_token: i64,
    /// What went wrong.
    pub(crate) error: String,
    /// Why it went wrong.
    pub(crate) kind: FailureKindDto,
}

impl From<AttemptError> for AttemptErrorView {
    fn from(entry: AttemptError) -> Self {
        AttemptErrorView {
            attempt: entry.attempt,
            at: entry.at,
            worker: entry.worker,
            fencing_token: entry.fencing_token,
            error: entry.error,
            kind: entry.kind.into(),
        }
    }
}

/// One page of jobs, newest first.
#[derive(Debug, Clone, Object)]
#[oai(rename = "JobPage", skip_serializing_if_is_none)]
pub(crate) struct JobPage {
    /// The jobs, id descending.
    pub(crate) jobs: Vec<JobView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub(crate) next_cursor: Option<i64>,
}

fn default_limit() -> u32 {
    1
}

fn default_lease_seconds() -> f64 {
    30.0
}

/// A worker asks for jobs.
#[derive(Debug, Clone, Object)]
#[oai(rename = "LeaseRequest", deny_unknown_fields)]
pub(crate) struct LeaseRequest {
    /// Identifies the worker (recorded as the job's `lease_owner`).
    #[oai(validator(min_length = 1, max_length = 128))]
    pub(crate) worker_id: Text,
    /// Lease only from these queues.
    #[oai(validator(min_items = 1, max_items = 100, min_length = 1, max_length = 128))]
    pub(crate) queues: Vec<Text>,
    /// Lease only these kinds; empty or absent: any kind.
    #[oai(default, validator(max_items = 100, min_length = 1, max_length = 128))]
    pub(crate) kinds: Vec<Text>,
    /// At most this many jobs.
    #[oai(
        default = "default_limit",
        validator(minimum(value = "1"), maximum(value = "1000"))
    )]
    pub(crate) limit: u32,
    /// Lease length in seconds, from the database's clock. Heartbeat before it ends.
    #[oai(
        default = "default_lease_seconds",
        validator(minimum(value = "0.001"), maximum(value = "31536000"))
    )]
    pub(crate) lease_seconds: f64,
    /// Long-poll: when no job is due, wait up to this many seconds for one (woken by new jobs)
    /// before answering with an empty list. 0 answers at once.
    #[oai(default, validator(minimum(value = "0"), maximum(value = "30")))]
    pub(crate) wait_seconds: f64,
}

/// A job leased to the caller.
#[derive(Debug, Clone, Object)]
#[oai(rename = "LeasedJob", skip_serializing_if_is_none)]
pub(crate) struct LeasedJob {
    /// The job's id.
    pub(crate) id: i64,
    /// Its queue.
    pub(crate) queue: String,
    /// Its kind: run the matching handler.
    pub(crate) kind: String,
    /// Its payload.
    pub(crate) payload: AnyJson,
    /// Which attempt this is (1 for the first).
    pub(crate) attempt: i32,
    /// The attempt budget.
    pub(crate) max_attempts: i32,
    /// The fencing token of this lease: present it on every heartbeat, complete, fail and snooze.
    pub(crate) lease_token: i64,
    /// When the lease ends unless extended by a heartbeat.
    pub(crate) lease_expires_at: DateTime<Utc>,
    /// The job's execution timeout in seconds, if it has one.
    pub(crate) timeout_seconds: Option<f64>,
    /// When it was enqueued.
    pub(crate) created_at: DateTime<Utc>,
}

impl LeasedJob {
    pub(crate) fn new(job: Job) -> Self {
        LeasedJob {
            id: job.id,
            queue: job.queue,
            kind: job.kind,
            payload: AnyJson(job.payload),
            attempt: job.attempts,
            max_attempts: job.max_attempts,
            lease_token: job.fencing_token,
            // Set on every running job; a claim returns running jobs only.
            lease_expires_at: job.lease_expires_at.unwrap_or(job.next_run_at),
            timeout_seconds: job.timeout_ms.map(ms_to_seconds),
            created_at: job.created_at,
        }
    }
}

/// The jobs leased by one request.
#[derive(Debug, Clone, Object)]
#[oai(rename = "LeaseGrant")]
pub(crate) struct LeaseGrant {
    /// The leased jobs (empty when none was due before the wait ended).
    pub(crate) jobs: Vec<LeasedJob>,
}

fn default_extend_seconds() -> f64 {
    30.0
}

/// Extend a lease.
#[derive(Debug, Clone, Object)]
#[oai(rename = "HeartbeatRequest", deny_unknown_fields)]
pub(crate) struct HeartbeatRequest {
    /// The lease's token (`lease_token` of the lease).
    pub(crate) lease_token: i64,
    /// The lease then ends this many seconds from now (database clock).
    #[oai(
        default = "default_extend_seconds",
        validator(minimum(value = "0.001"), maximum(value = "31536000"))
    )]
    pub(crate) extend_seconds: f64,
}

/// The extended lease.
#[derive(Debug, Clone, Object)]
#[oai(rename = "HeartbeatResult")]
pub(crate) struct HeartbeatResult {
    /// The new end of the lease.
    pub(crate) lease_expires_at: DateTime<Utc>,
    /// Someone cancelled the job: stop the handler and report a failure (the job then ends
    /// `cancelled`), or complete it if it is already done.
    pub(crate) cancel_requested: bool,
}

impl HeartbeatResult {
    pub(crate) fn new(outcome: HeartbeatOutcome) -> Option<Self> {
        match outcome {
            HeartbeatOutcome::Extended {
                lease_expires_at,
                cancel_requested,
            } => Some(HeartbeatResult {
                lease_expires_at,
                cancel_requested,
            }),
            HeartbeatOutcome::Lost => None,
        }
    }
}

/// Complete a leased job.
#[derive(Debug, Clone, Object)]
#[oai(rename = "CompleteRequest", deny_unknown_fields)]
pub(crate) struct CompleteRequest {
    /// The lease's token.
    pub(crate) lease_token: i64,
    /// What the handler returned, kept on the job (at most the payload limit).
    pub(crate) result: Option<Value>,
}

fn default_retryable() -> bool {
    true
}

/// Report a failed attempt.
#[derive(Debug, Clone, Object)]
#[oai(rename = "FailRequest", deny_unknown_fields)]
pub(crate) struct FailRequest {
    /// The lease's token.
    pub(crate) lease_token: i64,
    /// What went wrong (kept as `last_error`; text beyond 65536 characters is cut).
    pub(crate) error: Text,
    /// `true`: retry while attempts remain; `false`: fail the job for good now.
    #[oai(default = "default_retryable")]
    pub(crate) retryable: bool,
    /// Wait this many seconds before the retry (absent: the job's backoff).
    #[oai(validator(minimum(value = "0"), maximum(value = "31536000")))]
    pub(crate) retry_after_seconds: Option<f64>,
}

/// Put a leased job back without using up its attempt.
#[derive(Debug, Clone, Object)]
#[oai(rename = "SnoozeRequest", deny_unknown_fields)]
pub(crate) struct SnoozeRequest {
    /// The lease's token.
    pub(crate) lease_token: i64,
    /// The job is due again after this many seconds.
    #[oai(validator(minimum(value = "0"), maximum(value = "31536000")))]
    pub(crate) delay_seconds: f64,
}

/// Whether the API can serve requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "HealthStatus", rename_all = "lowercase")]
pub(crate) enum HealthStatus {
    /// Everything answers.
    Ok,
    /// A dependency is down (see `database`).
    Unavailable,
}

/// The state of one dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "ComponentStatus", rename_all = "lowercase")]
pub(crate) enum ComponentStatus {
    /// It answers.
    Up,
    /// It does not answer (or fails).
    Down,
}

/// The health of the API and what it depends on.
#[derive(Debug, Clone, Object)]
#[oai(rename = "Health")]
pub(crate) struct Health {
    /// Overall status.
    pub(crate) status: HealthStatus,
    /// The database.
    pub(crate) database: ComponentStatus,
    /// What is wrong, when something is.
    #[oai(skip_serializing_if_is_none)]
    pub(crate) detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seconds_round_to_the_nearest_millisecond() {
        assert_eq!(seconds_to_ms("d", 0.0), Ok(0));
        assert_eq!(seconds_to_ms("d", 1.5), Ok(1500));
        assert_eq!(seconds_to_ms("d", 0.0004), Ok(0));
        assert_eq!(seconds_to_ms("d", 0.0005), Ok(1));
        assert_eq!(
            seconds_to_ms("d", MAX_SECONDS as f64),
            Ok(Limits::MAX_DURATION_MS)
        );
        assert!(seconds_to_ms("d", MAX_SECONDS as f64 + 1.0).is_err());
        assert!(seconds_to_ms("d", -1.0).is_err());
        assert!(seconds_to_ms("d", f64::NAN).is_err());
        assert!(seconds_to_ms("d", f64::INFINITY).is_err());
        assert_eq!(ms_to_seconds(1500), 1.5);
    }

    #[test]
    fn json_size_counts_compact_bytes() {
        let value = json!({"a": "xyz"});
        assert_eq!(value.to_string().len(), 11);
        assert!(check_json_size("payload", &value, 11).is_ok());
        let problem = check_json_size("payload", &value, 10).unwrap_err();
        assert_eq!(problem.status, 413);
        assert_eq!(
            problem.detail,
            "payload is 11 bytes of JSON; the limit is 10 bytes"
        );
    }
}
