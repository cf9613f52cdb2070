//! Typed settings of the HTTP API. The adapter never reads the environment: the binary builds an
//! [`ApiConfig`] from its flags and environment variables and hands it over.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use faultline_ports::LabelGuard;

/// Renders the process's metrics in the Prometheus text format (what `GET /metrics` serves).
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// Everything the HTTP API can be tuned with. [`ApiConfig::default`] gives the documented defaults.
#[derive(Clone)]
pub struct ApiConfig {
    /// Address to listen on (default `0.0.0.0:8000`).
    pub listen: SocketAddr,
    /// Largest request body in bytes; a larger one is refused with 413 before it is read to the
    /// end (default 4 MiB; a batch of many jobs is one body).
    pub max_body_bytes: usize,
    /// Largest job `payload` (and handler `result`) in bytes of compact JSON; a larger one is
    /// refused with 413 (default 1 MiB).
    pub max_payload_bytes: usize,
    /// Bearer tokens accepted on `/v1`. Empty: `/v1` is open (and [`crate::serve`] logs a warning
    /// at startup).
    pub api_tokens: Vec<String>,
    /// Longest time one request may wait for the store (and for its body to arrive). A request
    /// whose store call does not answer in time gets 503 with `Retry-After`; a long-polling lease
    /// request gets its `wait_seconds` on top (default 10 s).
    pub request_timeout: Duration,
    /// The `Retry-After` sent with 503 responses, rounded up to whole seconds (default 5 s).
    pub retry_after: Duration,
    /// While a lease request long-polls, how often it claims again even without a wake-up, to find
    /// jobs that became due by the clock (scheduled, retried, snoozed) rather than by an
    /// enqueue (default 1 s).
    pub lease_poll_interval: Duration,
    /// On shutdown, how long in-flight requests may take to finish before connections are
    /// dropped (default 10 s). Long-polling lease requests return at once on shutdown.
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request head (request line and headers), counted
    /// from when the connection is accepted and, on a kept-alive connection, from the first byte
    /// of each further request; a client that does not finish in time is disconnected (slow-loris
    /// protection; default 10 s).
    pub header_read_timeout: Duration,
    /// How long a connection may stay without any traffic (a kept-alive connection waiting for
    /// its next request) before it is closed. A request in flight is never cut: the connection
    /// is closed after its response (default 60 s).
    pub idle_timeout: Duration,
    /// Most connections served at once. At the cap the server stops accepting: new connections
    /// wait in the kernel's listen backlog (holding no file of this process) until a served one
    /// closes. Keep it below the open-file limit, minus the database pool (default 1,000).
    pub max_connections: usize,
    /// Serves `GET /metrics` (no token needed) with what this function renders (the binary
    /// passes its Prometheus recorder's). `None` (the default): `/metrics` answers 404.
    pub metrics: Option<MetricsRender>,
    /// Bounds the `queue` and `kind` label values of the API's metrics (share one guard with
    /// every component of the process). Default: a guard of its own with
    /// [`LabelGuard::DEFAULT_CAP`].
    pub metric_labels: LabelGuard,
}

impl ApiConfig {
    /// Default listen address: all interfaces, port 8000.
    pub const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8000);
    /// Default [`ApiConfig::max_body_bytes`].
    pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
    /// Default [`ApiConfig::max_payload_bytes`].
    pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
    /// Default [`ApiConfig::request_timeout`].
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default [`ApiConfig::header_read_timeout`].
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default [`ApiConfig::idle_timeout`].
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default [`ApiConfig::max_connections`].
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;

    /// Whether `/v1` requires a bearer token.
    pub fn auth_enabled(&self) -> bool {
        !self.api_tokens.is_empty()
    }

    /// `Retry-After` in whole seconds (at least 1).
    pub(crate) fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        secs.max(1)
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: Self::DEFAULT_LISTEN,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_payload_bytes: Self::DEFAULT_MAX_PAYLOAD_BYTES,
            api_tokens: Vec::new(),
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            retry_after: Duration::from_secs(5),
            lease_poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            metrics: None,
            metric_labels: LabelGuard::default(),
        }
    }
}

impl fmt::Debug for ApiConfig {
    /// Tokens are secrets: only their number is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field(
                "api_tokens",
                &format_args!("<{} redacted>", self.api_tokens.len()),
            )
            .field("request_timeout", &self.request_timeout)
            .field("retry_after", &self.retry_after)
            .field("lease_poll_interval", &self.lease_poll_interval)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_connections", &self.max_connections)
            .field(
                "metrics",
                &format_args!(
                    "{}",
                    if self.metrics.is_some() {
                        "served"
                    } else {
                        "off"
                    }
                ),
            )
            .field("metric_labels", &self.metric_labels)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_tokens() {
        let config = ApiConfig {
            api_tokens: vec!["s3cret-token".into(), "other".into()],
            ..ApiConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<2 redacted>"), "{shown}");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let with = |retry_after| ApiConfig {
            retry_after,
            ..ApiConfig::default()
        };
        assert_eq!(with(Duration::from_millis(1500)).retry_after_secs(), 2);
        assert_eq!(with(Duration::from_secs(5)).retry_after_secs(), 5);
        assert_eq!(with(Duration::ZERO).retry_after_secs(), 1);
    }
}
