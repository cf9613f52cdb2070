//! The one place where a `faultline_jobs` row becomes a domain [`Job`] (the domain types derive no
//! sqlx traits; the state is stored as its lowercase name).

use chrono::{DateTime, Utc};
use faultline_domain::{AttemptError, Job, JobState, RetryPolicy};
use faultline_ports::{Leadership, ProcessInfo, ProcessSpec, QueueInfo, QueueSlots};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;

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
        errors: row.try_get::<Json<Vec<AttemptError>>, _>("errors")?.0,
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

/// Reads a `faultline_queues` row.
pub(crate) fn queue_from_row(row: &PgRow) -> Result<QueueInfo, sqlx::Error> {
    Ok(QueueInfo {
        name: row.try_get("name")?,
        paused: row.try_get("paused")?,
        paused_at: row.try_get("paused_at")?,
        max_running: row.try_get("max_running")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Reads the leadership columns of `leader_columns!`.
pub(crate) fn leadership_from_row(row: &PgRow) -> Result<Leadership, sqlx::Error> {
    Ok(Leadership {
        leader_id: row.try_get("leader_id")?,
        term: row.try_get("term")?,
        elected_at: row.try_get("elected_at")?,
        expires_at: row.try_get("expires_at")?,
        remaining_ms: row.try_get("remaining_ms")?,
    })
}

/// Reads a `faultline_processes` row.
pub(crate) fn process_from_row(row: &PgRow) -> Result<ProcessInfo, sqlx::Error> {
    let started_at: DateTime<Utc> = row.try_get("started_at")?;
    Ok(ProcessInfo {
        spec: ProcessSpec {
            id: row.try_get("id")?,
            role: row.try_get("role")?,
            host: row.try_get("host")?,
            pid: row.try_get("pid")?,
            version: row.try_get("version")?,
            queues: row.try_get::<Json<Vec<QueueSlots>>, _>("queues")?.0,
        },
        started_at,
        last_seen_at: row.try_get("last_seen_at")?,
    })
}
