//! Command-line and environment options shared by `faultline worker`, `faultline api` and
//! `faultline dev`, and their mapping onto the worker's and the HTTP API's typed configurations.
//! Configuration is read here only.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use faultline_http::ApiConfig;
use faultline_metrics::LabelGuard;
use faultline_worker::WorkerConfig;

/// Where the database is, for the subcommands that require one.
#[derive(Debug, Args)]
pub(crate) struct DatabaseArgs {
    /// PostgreSQL connection URL, e.g. postgres://user@localhost:5432/faultline.
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub(crate) database_url: String,
}

/// How the worker runs: one flag per field of `WorkerConfig`. Defaults are `WorkerConfig`'s (a
/// test keeps them equal).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Worker")]
pub(crate) struct WorkerArgs {
    /// Recorded as the lease owner of every job this worker claims [default: <hostname>-<pid>].
    #[arg(long, env = "FAULTLINE_WORKER_ID", value_name = "ID")]
    pub(crate) worker_id: Option<String>,

    /// Queues to claim jobs from, comma-separated, each with its own slots (`email=10`); a bare
    /// name gets --concurrency slots. Every queue has a producer of its own: a backlog in one
    /// never holds up another.
    #[arg(
        long,
        env = "FAULTLINE_QUEUES",
        value_name = "QUEUE[=N],..",
        value_delimiter = ',',
        default_value = "default",
        value_parser = parse_queue
    )]
    pub(crate) queues: Vec<QueueArg>,

    /// Slots of each queue named without its own: at most this many of its jobs run at once.
    #[arg(
        long,
        env = "FAULTLINE_CONCURRENCY",
        value_name = "N",
        default_value_t = 10
    )]
    pub(crate) concurrency: usize,

    /// Lease length of a claim and of every heartbeat extension.
    #[arg(long, env = "FAULTLINE_LEASE", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub(crate) lease: Duration,

    /// How often the leases of running jobs are extended [default: a third of the lease].
    #[arg(long, env = "FAULTLINE_HEARTBEAT_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) heartbeat_interval: Option<Duration>,

    /// With free slots, claim at least this often even without a wake-up (scheduled jobs, retries).
    #[arg(long, env = "FAULTLINE_POLL_INTERVAL", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub(crate) poll_interval: Duration,

    /// On SIGTERM/SIGINT, how long running jobs may finish before their leases are given back.
    #[arg(long, env = "FAULTLINE_SHUTDOWN_GRACE", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub(crate) shutdown_grace: Duration,

    /// At most this many completions are written in one statement; also the most claimed short
    /// jobs that wait for a free slot in the worker's local buffer.
    #[arg(
        long,
        env = "FAULTLINE_COMPLETION_BATCH_SIZE",
        value_name = "N",
        default_value_t = 1_000
    )]
    pub(crate) completion_batch_size: usize,

    /// First pause after a failed database call; doubles per failure up to --db-backoff-max.
    #[arg(long, env = "FAULTLINE_DB_BACKOFF_MIN", value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub(crate) db_backoff_min: Duration,

    /// Longest pause between retries of failed database calls (and of the startup connection).
    #[arg(long, env = "FAULTLINE_DB_BACKOFF_MAX", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) db_backoff_max: Duration,

    /// A database call that takes longer than this counts as failed.
    #[arg(long, env = "FAULTLINE_STORE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) store_timeout: Duration,

    /// Database connections of the worker's pool (the wake-up listener has one more of its own)
    /// [default: all slots / 4 + 4, at most 32, at least two per queue plus two].
    #[arg(long, env = "FAULTLINE_POOL_SIZE", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) pool_size: Option<u32>,
}

/// One `--queues` entry: a queue and, optionally, its own slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueArg {
    pub(crate) name: String,
    pub(crate) slots: Option<usize>,
}

/// Parses `NAME` or `NAME=N` (N from 1 to 10 000).
pub(crate) fn parse_queue(text: &str) -> anyhow::Result<QueueArg> {
    let (name, slots) = match text.rsplit_once('=') {
        Some((name, n)) => {
            let n: usize = n
                .trim()
                .parse()
                .with_context(|| format!("{text:?}: the slots after '=' must be a number"))?;
            if !(1..=faultline_ports::MAX_CLAIM_LIMIT as usize).contains(&n) {
                bail!(
                    "{text:?}: slots must be between 1 and {}",
                    faultline_ports::MAX_CLAIM_LIMIT
                );
            }
            (name.trim(), Some(n))
        }
        None => (text.trim(), None),
    };
    faultline_ports::domain::Limits::check_name("queue", name)
        .map_err(|err| anyhow::anyhow!("{text:?}: {err}"))?;
    Ok(QueueArg {
        name: name.to_owned(),
        slots,
    })
}

impl WorkerArgs {
    /// The configuration shared by the process's producers: every queue, and the default slots
    /// (checked by the worker when it is built). See [`WorkerArgs::producers`].
    pub(crate) fn config(&self) -> WorkerConfig {
        let defaults = WorkerConfig::default();
        WorkerConfig {
            worker_id: self.worker_id.clone().unwrap_or(defaults.worker_id),
            queues: self.queues.iter().map(|q| q.name.clone()).collect(),
            concurrency: self.concurrency,
            lease: self.lease,
            heartbeat_interval: self.heartbeat_interval,
            poll_interval: self.poll_interval,
            shutdown_grace: self.shutdown_grace,
            completion_batch_size: self.completion_batch_size,
            db_backoff_min: self.db_backoff_min,
            db_backoff_max: self.db_backoff_max,
            store_timeout: self.store_timeout,
        }
    }

    /// One configuration per queue, in order (a queue named twice once, with its last slots):
    /// each runs as a producer of its own, with the queue's slots.
    pub(crate) fn producers(&self) -> Vec<WorkerConfig> {
        let shared = self.config();
        let mut queues: Vec<&QueueArg> = Vec::new();
        for queue in &self.queues {
            match queues.iter_mut().find(|q| q.name == queue.name) {
                Some(seen) => *seen = queue,
                None => queues.push(queue),
            }
        }
        queues
            .into_iter()
            .map(|queue| WorkerConfig {
                queues: vec![queue.name.clone()],
                concurrency: queue.slots.unwrap_or(self.concurrency),
                ..shared.clone()
            })
            .collect()
    }

    /// The pool size: the flag, else enough for claims, heartbeats, writes and maintenance (the
    /// process's maintenance shares the pool): a quarter of all slots plus 4, at most 32, and at
    /// least two per producer plus two.
    pub(crate) fn pool_size(&self) -> u32 {
        self.pool_size.unwrap_or_else(|| {
            let producers = self.producers();
            let slots: usize = producers.iter().map(|p| p.concurrency).sum();
            let derived = (slots / 4 + 4).min(32).max(2 * producers.len() + 2);
            u32::try_from(derived).unwrap_or(u32::MAX)
        })
    }
}

/// The built-in `http` handler's configuration.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "HTTP handler")]
pub(crate) struct HttpArgs {
    /// Run jobs of KIND by POSTing their payload as JSON to URL (repeatable; in the environment,
    /// comma-separated). Only this configuration chooses URLs, never a job's payload.
    #[arg(
        long = "http-endpoint",
        env = "FAULTLINE_HTTP_ENDPOINTS",
        value_name = "KIND=URL",
        value_delimiter = ',',
        value_parser = parse_endpoint
    )]
    pub(crate) endpoints: Vec<Endpoint>,

    /// Time limit of one HTTP request, from connecting to reading the response.
    #[arg(long, env = "FAULTLINE_HTTP_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub(crate) http_timeout: Duration,
}

/// The HTTP API: one flag per field of `ApiConfig`, plus its pool. Defaults are `ApiConfig`'s (a
/// test keeps them equal). Options whose names would be ambiguous next to the worker's in `dev`
/// carry an `api-` prefix.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "HTTP API")]
pub(crate) struct ApiArgs {
    /// Address (IP:PORT) the HTTP API listens on; port 0 picks a free port.
    #[arg(
        long,
        env = "FAULTLINE_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:8000"
    )]
    pub(crate) listen: SocketAddr,

    /// Bearer tokens accepted on /v1, comma-separated; without any, /v1 is open to anyone who
    /// can reach the address. Prefer the environment variable: flags show up in `ps`.
    #[arg(
        long,
        env = "FAULTLINE_API_TOKENS",
        value_name = "TOKEN,..",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub(crate) api_tokens: Vec<ApiToken>,

    /// Largest request body in bytes (413 beyond it).
    #[arg(long, env = "FAULTLINE_MAX_BODY_BYTES", value_name = "N", default_value_t = ApiConfig::DEFAULT_MAX_BODY_BYTES as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_body_bytes: u64,

    /// Largest job payload (and handler result) in bytes of compact JSON (413 beyond it).
    #[arg(long, env = "FAULTLINE_MAX_PAYLOAD_BYTES", value_name = "N", default_value_t = ApiConfig::DEFAULT_MAX_PAYLOAD_BYTES as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_payload_bytes: u64,

    /// Longest wait of one request for the database (and for its body); then 503 with
    /// Retry-After. Long-polling lease requests get their wait_seconds on top.
    #[arg(long, env = "FAULTLINE_REQUEST_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) request_timeout: Duration,

    /// The Retry-After sent with 503 responses (rounded up to whole seconds).
    #[arg(long, env = "FAULTLINE_RETRY_AFTER", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub(crate) retry_after: Duration,

    /// While a lease request long-polls, how often it looks for jobs that became due by the clock
    /// (scheduled, retried, snoozed), besides the wake-ups of new jobs.
    #[arg(long, env = "FAULTLINE_LEASE_POLL_INTERVAL", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub(crate) lease_poll_interval: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests may take before connections are dropped.
    #[arg(long, env = "FAULTLINE_API_SHUTDOWN_GRACE", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) api_shutdown_grace: Duration,

    /// How long a client may take to send a request head (request line and headers); slower
    /// clients (slow loris) are disconnected.
    #[arg(long, env = "FAULTLINE_HEADER_READ_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) header_read_timeout: Duration,

    /// How long a kept-alive connection may wait for its next request before it is closed (a
    /// request in flight is never cut).
    #[arg(long, env = "FAULTLINE_IDLE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub(crate) idle_timeout: Duration,

    /// Most connections served at once; beyond it new connections wait in the listen backlog
    /// until one closes. Keep it below the open-file limit.
    #[arg(long, env = "FAULTLINE_MAX_CONNECTIONS", value_name = "N", default_value_t = ApiConfig::DEFAULT_MAX_CONNECTIONS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_connections: u64,

    /// Database connections of the API's pool (the wake-up listener has one more of its own).
    #[arg(long, env = "FAULTLINE_API_POOL_SIZE", value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) api_pool_size: u32,
}

impl ApiArgs {
    /// The API's configuration; refuses settings the API cannot work with.
    pub(crate) fn config(&self) -> anyhow::Result<ApiConfig> {
        if let [only] = self.api_tokens.as_slice()
            && only.0.trim().is_empty()
        {
            bail!(
                "--api-tokens / FAULTLINE_API_TOKENS is empty: unset it to serve /v1 without \
                 tokens, or give at least one token"
            );
        }
        let mut tokens = Vec::with_capacity(self.api_tokens.len());
        for (index, token) in self.api_tokens.iter().enumerate() {
            // Never show the value: it is a secret (and an operator's typo of one).
            let which = index + 1;
            let token = token.0.trim();
            if token.is_empty() {
                bail!(
                    "--api-tokens / FAULTLINE_API_TOKENS: token {which} is empty (an extra comma?)"
                );
            }
            if token.chars().any(char::is_control) {
                bail!(
                    "--api-tokens / FAULTLINE_API_TOKENS: token {which} contains a control character"
                );
            }
            tokens.push(token.to_owned());
        }
        for (value, name) in [
            (self.request_timeout, "--request-timeout"),
            (self.retry_after, "--retry-after"),
            (self.lease_poll_interval, "--lease-poll-interval"),
            (self.header_read_timeout, "--header-read-timeout"),
            (self.idle_timeout, "--idle-timeout"),
        ] {
            if value.is_zero() {
                bail!("{name} must be longer than 0");
            }
        }
        let bytes = |n: u64, name: &str| {
            usize::try_from(n).with_context(|| format!("{name} {n} is too large"))
        };
        Ok(ApiConfig {
            listen: self.listen,
            max_body_bytes: bytes(self.max_body_bytes, "--max-body-bytes")?,
            max_payload_bytes: bytes(self.max_payload_bytes, "--max-payload-bytes")?,
            api_tokens: tokens,
            request_timeout: self.request_timeout,
            retry_after: self.retry_after,
            lease_poll_interval: self.lease_poll_interval,
            shutdown_grace: self.api_shutdown_grace,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: bytes(self.max_connections, "--max-connections")?,
            // Wiring rather than settings (e.g. what serves `/metrics`): the adapter's defaults.
            ..ApiConfig::default()
        })
    }
}

/// Metrics settings shared by `worker`, `api` and `dev` (one recorder, label guard and sampler
/// per process).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Metrics")]
pub(crate) struct MetricsArgs {
    /// How often queue depth and the oldest ready job's age are sampled from the database; "off"
    /// disables the sampler.
    #[arg(long, env = "FAULTLINE_METRICS_SAMPLE_INTERVAL", value_name = "DURATION|off", default_value = "15s", value_parser = parse_interval)]
    pub(crate) metrics_sample_interval: Interval,

    /// Distinct queues (and, separately, kinds) reported by name in metric labels; later ones are
    /// reported as "other".
    #[arg(long, env = "FAULTLINE_METRICS_MAX_LABEL_VALUES", value_name = "N", default_value_t = LabelGuard::DEFAULT_CAP as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) metrics_max_label_values: u32,
}

impl MetricsArgs {
    /// The sampling interval (`None`: off); refuses zero.
    pub(crate) fn sample_interval(&self) -> anyhow::Result<Option<Duration>> {
        match self.metrics_sample_interval.0 {
            Some(every) if every.is_zero() => {
                bail!("--metrics-sample-interval must be longer than 0 (or \"off\")")
            }
            every => Ok(every),
        }
    }

    /// The label guard's cap.
    pub(crate) fn max_label_values(&self) -> usize {
        usize::try_from(self.metrics_max_label_values).unwrap_or(usize::MAX)
    }
}

/// Where a process serves `GET /metrics` on its own port (`None`: off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MetricsListen(pub(crate) Option<SocketAddr>);

/// Parses `IP:PORT` or `off`.
pub(crate) fn parse_metrics_listen(text: &str) -> anyhow::Result<MetricsListen> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(MetricsListen(None));
    }
    let addr = text
        .parse()
        .with_context(|| format!("{text:?} is not IP:PORT or \"off\""))?;
    Ok(MetricsListen(Some(addr)))
}

/// One API token as given: a secret, so its `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ApiToken(pub(crate) String);

impl FromStr for ApiToken {
    type Err = Infallible;

    /// Accepts anything: checked by [`ApiArgs::config`], whose errors do not repeat the value
    /// (clap's own parse errors would).
    fn from_str(text: &str) -> Result<Self, Infallible> {
        Ok(ApiToken(text.to_owned()))
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// Logging, for every subcommand.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Logging")]
pub(crate) struct LogArgs {
    /// Log line format: human-readable text or one JSON object per line.
    #[arg(long, env = "FAULTLINE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub(crate) log_format: LogFormat,

    /// Which log lines to print: a level (error, warn, info, debug, trace), optionally with
    /// per-target levels, e.g. "info,sqlx=warn".
    #[arg(
        long,
        env = "FAULTLINE_LOG",
        value_name = "FILTER",
        default_value = "info,sqlx=warn",
        global = true
    )]
    pub(crate) log: String,
}

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// One `--http-endpoint`: jobs of `kind` are POSTed to `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) kind: String,
    pub(crate) url: reqwest::Url,
}

/// An interval that can be turned off (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Interval(pub(crate) Option<Duration>);

/// Parses `KIND=URL`, with an http or https URL.
pub(crate) fn parse_endpoint(text: &str) -> anyhow::Result<Endpoint> {
    let Some((kind, url)) = text.split_once('=') else {
        bail!("expected KIND=URL, e.g. send-email=http://mailer.internal/send");
    };
    let kind = kind.trim();
    if kind.is_empty() {
        bail!("the kind before '=' is empty");
    }
    let url = reqwest::Url::parse(url.trim()).with_context(|| format!("bad URL {url:?}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("the URL must be http or https, not {}", url.scheme());
    }
    Ok(Endpoint {
        kind: kind.to_owned(),
        url,
    })
}

/// Parses a duration with a unit: `250ms`, `30s`, `5m`, `24h`, `7d` (whole numbers).
pub(crate) fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .with_context(|| format!("{text:?} has no unit (use ms, s, m, h or d, e.g. 30s)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .with_context(|| format!("{text:?} does not start with a whole number"))?;
    let ms_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => bail!("unknown unit {other:?} in {text:?} (use ms, s, m, h or d)"),
    };
    let ms = n
        .checked_mul(ms_per_unit)
        .with_context(|| format!("{text:?} is too long"))?;
    Ok(Duration::from_millis(ms))
}

/// Parses a duration or `off`.
pub(crate) fn parse_interval(text: &str) -> anyhow::Result<Interval> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(Interval(None));
    }
    parse_duration(text).map(|d| Interval(Some(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        let ok = [
            ("250ms", 250),
            ("30s", 30_000),
            ("5m", 300_000),
            ("5min", 300_000),
            ("24h", 86_400_000),
            ("7d", 604_800_000),
            (" 0s ", 0),
        ];
        for (text, ms) in ok {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_millis(ms),
                "{text}"
            );
        }
        for bad in ["30", "s", "1.5s", "-1s", "3w", "", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(parse_interval("off").unwrap(), Interval(None));
        assert_eq!(
            parse_interval("2s").unwrap(),
            Interval(Some(Duration::from_secs(2)))
        );
    }

    #[test]
    fn endpoints_are_kind_equals_http_url() {
        let endpoint = parse_endpoint("send-email=https://mailer.internal/send?x=1").unwrap();
        assert_eq!(endpoint.kind, "send-email");
        assert_eq!(
            endpoint.url.as_str(),
            "https://mailer.internal/send?x=1",
            "only the first '=' separates"
        );
        for bad in [
            "no-equals",
            "=http://x/",
            "k=not a url",
            "k=ftp://x/",
            "k=file:///etc/passwd",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
