//! Input checks every store applies identically before touching its data, so that both adapters
//! refuse the same requests with the same `StoreError::Invalid` message.

use faultline_domain::{JobSpec, Limits, SpecError};
use serde_json::Value;

use crate::{
    ClaimParams, ElectParams, Failure, ListParams, ProcessSpec, QueueLimits, StoreError,
    StoreResult,
};

/// Largest claim batch.
pub const MAX_CLAIM_LIMIT: u32 = 10_000;
/// Largest page of [`crate::JobStore::job_list`].
pub const MAX_PAGE_SIZE: u32 = 1_000;

fn invalid(err: SpecError) -> StoreError {
    StoreError::Invalid(err.to_string())
}

/// Checks every spec of a batch; the error names the first bad item by its index.
pub fn validate_specs(specs: &[JobSpec]) -> StoreResult<()> {
    for (index, spec) in specs.iter().enumerate() {
        spec.validate()
            .map_err(|err| StoreError::Invalid(format!("item {index}: {err}")))?;
    }
    Ok(())
}

impl ClaimParams {
    /// At least one queue, valid names, a limit in `1..=MAX_CLAIM_LIMIT`, a lease in
    /// `1..=Limits::MAX_DURATION_MS`.
    pub fn validate(&self) -> StoreResult<()> {
        if self.queues.is_empty() {
            return Err(StoreError::Invalid(
                "a claim needs at least one queue".into(),
            ));
        }
        for queue in &self.queues {
            Limits::check_name("queue", queue).map_err(invalid)?;
        }
        for kind in &self.kinds {
            Limits::check_name("kind", kind).map_err(invalid)?;
        }
        Limits::check_name("worker_id", &self.worker_id).map_err(invalid)?;
        if !(1..=MAX_CLAIM_LIMIT).contains(&self.limit) {
            return Err(StoreError::Invalid(format!(
                "claim limit must be between 1 and {MAX_CLAIM_LIMIT}"
            )));
        }
        Limits::check_ms("lease", self.lease_ms, 1).map_err(invalid)
    }
}

impl ListParams {
    /// A page size in `1..=MAX_PAGE_SIZE` and valid filter names.
    pub fn validate(&self) -> StoreResult<()> {
        if !(1..=MAX_PAGE_SIZE).contains(&self.limit) {
            return Err(StoreError::Invalid(format!(
                "page size must be between 1 and {MAX_PAGE_SIZE}"
            )));
        }
        for (field, name) in [("queue", &self.queue), ("kind", &self.kind)] {
            if let Some(name) = name {
                Limits::check_name(field, name).map_err(invalid)?;
            }
        }
        Ok(())
    }
}

impl Failure {
    /// An explicit retry delay, if any, in `0..=Limits::MAX_DURATION_MS`.
    pub fn validate(&self) -> StoreResult<()> {
        match self.retry_delay_ms {
            Some(ms) => Limits::check_ms("retry delay", ms, 0).map_err(invalid),
            None => Ok(()),
        }
    }
}

/// A queue name as every name: 1 to [`Limits::MAX_NAME_CHARS`] characters, no control characters.
pub fn validate_queue_name(name: &str) -> StoreResult<()> {
    Limits::check_name("queue", name).map_err(invalid)
}

impl QueueLimits {
    /// Each bound, when set, in `1..=QueueLimits::MAX_RUNNING`.
    pub fn validate(&self) -> StoreResult<()> {
        match self.max_running {
            Some(n) if !(1..=QueueLimits::MAX_RUNNING).contains(&n) => {
                Err(StoreError::Invalid(format!(
                    "max_running must be between 1 and {} (or absent for no bound), got {n}",
                    QueueLimits::MAX_RUNNING
                )))
            }
            _ => Ok(()),
        }
    }
}

impl ElectParams {
    /// A valid candidate name and a lease in `1..=Limits::MAX_DURATION_MS`.
    pub fn validate(&self) -> StoreResult<()> {
        Limits::check_name("candidate", &self.candidate).map_err(invalid)?;
        Limits::check_ms("leadership lease", self.ttl_ms, 1).map_err(invalid)
    }
}

/// Most queues one process may register.
const MAX_PROCESS_QUEUES: usize = 1_000;

/// A process entry: valid names (id, role, host, version, queues), a positive pid, at most
/// 1 000 queues.
pub fn validate_process(spec: &ProcessSpec) -> StoreResult<()> {
    Limits::check_name("process id", &spec.id).map_err(invalid)?;
    Limits::check_name("role", &spec.role).map_err(invalid)?;
    Limits::check_name("host", &spec.host).map_err(invalid)?;
    Limits::check_name("version", &spec.version).map_err(invalid)?;
    if spec.pid < 0 {
        return Err(StoreError::Invalid("pid must not be negative".into()));
    }
    if spec.queues.len() > MAX_PROCESS_QUEUES {
        return Err(StoreError::Invalid(format!(
            "a process registers at most {MAX_PROCESS_QUEUES} queues"
        )));
    }
    for queue in &spec.queues {
        Limits::check_name("queue", &queue.queue).map_err(invalid)?;
    }
    Ok(())
}

/// A lease extension in `1..=Limits::MAX_DURATION_MS`.
pub fn validate_extend_ms(extend_ms: i64) -> StoreResult<()> {
    Limits::check_ms("lease extension", extend_ms, 1).map_err(invalid)
}

/// A snooze delay in `0..=Limits::MAX_DURATION_MS`.
pub fn validate_snooze_ms(delay_ms: i64) -> StoreResult<()> {
    Limits::check_ms("snooze delay", delay_ms, 0).map_err(invalid)
}

/// A handler result that PostgreSQL can store.
pub fn validate_result(result: Option<&Value>) -> StoreResult<()> {
    match result {
        Some(value) => Limits::check_json("result", value).map_err(invalid),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline_domain::FailureKind;
    use serde_json::json;

    fn claim() -> ClaimParams {
        ClaimParams {
            queues: vec!["default".into()],
            kinds: vec![],
            limit: 10,
            lease_ms: 30_000,
            worker_id: "w1".into(),
            claim_id: None,
        }
    }

    #[test]
    fn claim_params_are_checked_field_by_field() {
        assert!(claim().validate().is_ok());
        let bad = [
            (
                ClaimParams {
                    queues: vec![],
                    ..claim()
                },
                "a claim needs at least one queue",
            ),
            (
                ClaimParams {
                    queues: vec!["".into()],
                    ..claim()
                },
                "queue must be 1 to",
            ),
            (
                ClaimParams {
                    kinds: vec!["a\tb".into()],
                    ..claim()
                },
                "kind must not contain",
            ),
            (
                ClaimParams {
                    worker_id: "".into(),
                    claim_id: None,
                    ..claim()
                },
                "worker_id must be 1 to",
            ),
            (
                ClaimParams {
                    limit: 0,
                    ..claim()
                },
                "claim limit must be between",
            ),
            (
                ClaimParams {
                    limit: MAX_CLAIM_LIMIT + 1,
                    ..claim()
                },
                "claim limit must be between",
            ),
            (
                ClaimParams {
                    lease_ms: 0,
                    ..claim()
                },
                "lease must be between",
            ),
        ];
        for (params, expected) in bad {
            match params.validate() {
                Err(StoreError::Invalid(msg)) => assert!(msg.starts_with(expected), "{msg}"),
                other => panic!("{params:?}: expected Invalid({expected}), got {other:?}"),
            }
        }
    }

    #[test]
    fn batch_errors_name_the_item() {
        let specs = [JobSpec::new("ok", json!(1)), JobSpec::new("", json!(1))];
        match validate_specs(&specs) {
            Err(StoreError::Invalid(msg)) => {
                assert_eq!(msg, "item 1: kind must be 1 to 128 characters long")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn results_and_delays_are_bounded() {
        assert!(validate_result(Some(&json!({"x": "a\u{0}"}))).is_err());
        assert!(validate_result(Some(&json!({"x": "a"}))).is_ok());
        assert!(validate_extend_ms(0).is_err());
        assert!(validate_snooze_ms(-1).is_err());
        assert!(validate_snooze_ms(0).is_ok());
        let failure = Failure {
            error: "e".into(),
            kind: FailureKind::Error,
            retryable: true,
            retry_delay_ms: Some(-5),
        };
        assert!(failure.validate().is_err());
    }
}
