//! The worker's configuration: a plain struct with production defaults, checked once when the
//! worker is built.

use std::time::Duration;

use faultline_domain::{JobSpec, Limits};
use faultline_ports::MAX_CLAIM_LIMIT;

/// How a [`crate::Worker`] runs. Every field has a production default ([`Default`]); the binary
/// maps its flags and environment onto these fields, tests shorten the timers.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    /// Recorded as `lease_owner` on every job this worker claims (1 to 128 characters, no control
    /// characters). Default: `<hostname>-<pid>`.
    pub worker_id: String,
    /// The queues this worker claims from (at least one). Default: `["default"]`.
    pub queues: Vec<String>,
    /// Slots: at most this many handlers run at once (1 to 10 000). A claim asks for the free
    /// slots; [`crate::Worker::run`] adds room for a small local buffer when jobs are short (see
    /// `completion_batch_size`). Default: 10.
    pub concurrency: usize,
    /// Lease length of a claim, and of every extension by a heartbeat. A job whose lease runs out
    /// (worker dead, paused or cut off) is rescued and retried elsewhere. Default: 30 s.
    pub lease: Duration,
    /// How often one statement extends the leases of all the worker's jobs; must be shorter than
    /// `lease`. `None`: a third of the lease. Default: `None` (10 s).
    pub heartbeat_interval: Option<Duration>,
    /// The fallback poll: with free slots, the worker claims at least this often even without a
    /// wake-up (scheduled jobs, retries, missed notifications). Default: 1 s.
    pub poll_interval: Duration,
    /// On shutdown, how long in-flight handlers may run on before they are cancelled and their
    /// leases given back. Default: 30 s.
    pub shutdown_grace: Duration,
    /// At most this many completions are written in one statement. Also bounds the local buffer
    /// of [`crate::Worker::run`]: when handlers are short, it claims ahead of its free slots
    /// about what the slots finish in 25 ms, at most this many jobs, which wait for a slot with
    /// their leases held and heartbeated (and given back at once on shutdown). Handlers that run
    /// longer than 25 ms per slot get no buffer, so slow jobs are not hoarded. Larger values mean
    /// larger claim and completion statements: more throughput for short jobs. Default: 1 000.
    pub completion_batch_size: usize,
    /// First pause after a failed store call (claim, heartbeat, write). Doubles per consecutive
    /// failure, with jitter, up to `db_backoff_max`. Default: 100 ms.
    pub db_backoff_min: Duration,
    /// Longest pause between retries of failed store calls. Default: 10 s.
    pub db_backoff_max: Duration,
    /// A store call that takes longer than this counts as failed (a hung connection must not
    /// stall heartbeats or shutdown forever). Default: 10 s.
    pub store_timeout: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: default_worker_id(),
            queues: vec![JobSpec::DEFAULT_QUEUE.to_owned()],
            concurrency: 10,
            lease: Duration::from_secs(30),
            heartbeat_interval: None,
            poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            completion_batch_size: 1_000,
            db_backoff_min: Duration::from_millis(100),
            db_backoff_max: Duration::from_secs(10),
            store_timeout: Duration::from_secs(10),
        }
    }
}

/// A configuration the worker refuses to run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid worker configuration: {field} {reason}")]
pub struct ConfigError {
    /// The offending field of [`WorkerConfig`] (or `registry`).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError {
        field,
        reason: reason.into(),
    })
}

impl WorkerConfig {
    /// The effective heartbeat interval: `heartbeat_interval`, else a third of the lease.
    pub fn heartbeat_every(&self) -> Duration {
        self.heartbeat_interval.unwrap_or(self.lease / 3)
    }

    /// The lease length in milliseconds, as the store takes it.
    pub fn lease_ms(&self) -> i64 {
        millis(self.lease)
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = |field, value: &str| {
            Limits::check_name(field, value).map_err(|err| ConfigError {
                field,
                reason: err.to_string(),
            })
        };
        name("worker_id", &self.worker_id)?;
        if self.queues.is_empty() {
            return invalid("queues", "must name at least one queue");
        }
        for queue in &self.queues {
            name("queues", queue)?;
        }
        if !(1..=MAX_CLAIM_LIMIT as usize).contains(&self.concurrency) {
            return invalid(
                "concurrency",
                format!("must be between 1 and {MAX_CLAIM_LIMIT}"),
            );
        }
        let lease_ms = self.lease_ms();
        if !(1..=Limits::MAX_DURATION_MS).contains(&lease_ms) {
            return invalid(
                "lease",
                format!(
                    "must be between 1 and {} milliseconds",
                    Limits::MAX_DURATION_MS
                ),
            );
        }
        let heartbeat = self.heartbeat_every();
        if heartbeat.is_zero() || heartbeat >= self.lease {
            return invalid(
                "heartbeat_interval",
                "must be above zero and shorter than the lease",
            );
        }
        let positive = [
            ("poll_interval", self.poll_interval),
            ("db_backoff_min", self.db_backoff_min),
            ("store_timeout", self.store_timeout),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                return invalid(field, "must be above zero");
            }
        }
        if self.db_backoff_max < self.db_backoff_min {
            return invalid("db_backoff_max", "must not be below db_backoff_min");
        }
        if self.completion_batch_size == 0 {
            return invalid("completion_batch_size", "must be at least 1");
        }
        Ok(())
    }
}

/// `duration` in whole milliseconds, saturating at `i64::MAX`.
pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// This machine's name (`HOSTNAME`, else `/etc/hostname`), when it has a usable one (not
/// empty, no control characters).
pub fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty() && !name.chars().any(char::is_control))
}

/// `<hostname>-<pid>`, or `worker-<pid>` when the host name is unknown; at most 128 characters.
fn default_worker_id() -> String {
    let host = host_name().unwrap_or_else(|| "worker".to_owned());
    let pid = std::process::id().to_string();
    let room = Limits::MAX_NAME_CHARS - pid.len() - 1;
    let host: String = host.chars().take(room).collect();
    format!("{host}-{pid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let config = WorkerConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.heartbeat_every(), Duration::from_secs(10));
        assert_eq!(config.lease_ms(), 30_000);
        assert!(
            config
                .worker_id
                .ends_with(&format!("-{}", std::process::id()))
        );
    }

    #[test]
    fn validation_names_the_offending_field() {
        let ok = WorkerConfig::default();
        let cases: Vec<(WorkerConfig, &str)> = vec![
            (
                WorkerConfig {
                    worker_id: String::new(),
                    ..ok.clone()
                },
                "worker_id",
            ),
            (
                WorkerConfig {
                    queues: vec![],
                    ..ok.clone()
                },
                "queues",
            ),
            (
                WorkerConfig {
                    concurrency: 0,
                    ..ok.clone()
                },
                "concurrency",
            ),
            (
                WorkerConfig {
                    lease: Duration::ZERO,
                    ..ok.clone()
                },
                "lease",
            ),
            (
                WorkerConfig {
                    heartbeat_interval: Some(Duration::from_secs(30)),
                    ..ok.clone()
                },
                "heartbeat_interval",
            ),
            (
                WorkerConfig {
                    poll_interval: Duration::ZERO,
                    ..ok.clone()
                },
                "poll_interval",
            ),
            (
                WorkerConfig {
                    db_backoff_max: Duration::from_millis(1),
                    ..ok.clone()
                },
                "db_backoff_max",
            ),
            (
                WorkerConfig {
                    completion_batch_size: 0,
                    ..ok.clone()
                },
                "completion_batch_size",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }
}
