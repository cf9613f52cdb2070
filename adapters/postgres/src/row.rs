//! The one place where a `faultline_jobs` row becomes a domain [`Job`] (the domain types derive no
//! sqlx traits; the state is stored as its lowercase name).

use faultline_domain::{Job, JobState, RetryPolicy};
use sqlx::Row;
use sqlx::postgres::PgRow;

/// Reads a job from a row holding the columns of `job_columns!` (by name, so extra columns
/// such as `payload_hash` are ignored).
pub(crate) fn job_from_row(row: &PgRow) -> Result<Job, sqlx::Error> {
    Ok(Job {
        id: row.try_get("id")?,
        queue: row.try_get("queue")?,
        kind: row.try_get("kind")?,
        payload: row.try_get("payload")?,
        priority: row.try_get("priority")?,
        state: state_from_row(row, "state")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        fencing_token: row.try_get("fencing_token")?,
        cancel_requested: row.try_get("cancel_requested")?,
        next_run_at: row.try_get("next_run_at")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        idempotency_key: row.try_get("idempotency_key")?,
        retry_policy: RetryPolicy {
            base_ms: row.try_get("backoff_base_ms")?,
            cap_ms: row.try_get("backoff_cap_ms")?,
            jitter: row.try_get("backoff_jitter")?,
        },
        timeout_ms: row.try_get("timeout_ms")?,
        last_error: row.try_get("last_error")?,
        result: row.try_get("result")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// Reads a state column stored as text.
pub(crate) fn state_from_row(row: &PgRow, column: &str) -> Result<JobState, sqlx::Error> {
    let text: &str = row.try_get(column)?;
    text.parse()
        .map_err(|message: String| sqlx::Error::ColumnDecode {
            index: column.to_owned(),
            source: message.into(),
        })
}
