//! Faultline's metrics adapter: installs the Prometheus recorder behind the `metrics` facade,
//! describes every Faultline metric, samples queue depth from the store, and serves `/metrics`
//! on its own port for processes without the HTTP API.
//!
//! The worker runtime and the HTTP adapter only record through the `metrics` facade with the
//! names of `faultline_ports::telemetry` (re-exported here as [`names`]); this crate decides where
//! the numbers go. The binary wires it once per process:
//!
//! ```no_run
//! # async fn wire(store: std::sync::Arc<impl faultline_ports::JobStore>) -> std::io::Result<()> {
//! use std::time::Duration;
//! use faultline_metrics::{LabelGuard, QueueSampler};
//! use tokio_util::sync::CancellationToken;
//!
//! let shutdown = CancellationToken::new();
//! let handle = faultline_metrics::install().expect("no other metrics recorder");
//! let labels = LabelGuard::new(LabelGuard::DEFAULT_CAP);
//! tokio::spawn(faultline_metrics::run_upkeep(handle.clone(), Duration::from_secs(5), shutdown.clone()));
//! tokio::spawn(QueueSampler::new(store, labels.clone()).run(shutdown.clone()));
//! faultline_metrics::serve_metrics(faultline_metrics::DEFAULT_LISTEN, handle, shutdown).await
//! # }
//! ```

mod describe;
mod sampler;
mod serve;
pub mod testing;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio_util::sync::CancellationToken;

pub use describe::describe;
pub use faultline_ports::LabelGuard;
pub use faultline_ports::telemetry::{labels, names, outcome};
pub use metrics_exporter_prometheus::{PrometheusHandle, PrometheusRecorder};
pub use sampler::{Exported, Leading, QueueSampler, SAMPLED_FAMILIES};
pub use serve::{serve_metrics, serve_metrics_on, serve_render_on};

/// Where `faultline worker` serves `/metrics` by default (`FAULTLINE_METRICS_LISTEN`).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9464);

/// The content type of the exposition text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the buckets of every `_seconds` histogram: half a millisecond to
/// ten minutes, roughly 1-2.5-5 per decade.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0,
];

/// How often [`run_upkeep`] should run: histogram samples are folded into their buckets at
/// every render and every upkeep, so memory stays bounded even when nobody scrapes.
pub const DEFAULT_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A function that renders the current exposition text (what the HTTP API's `/metrics` serves).
pub type RenderFn = Arc<dyn Fn() -> String + Send + Sync>;

/// Why the recorder could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Another `metrics` recorder is already installed in this process.
    #[error("another metrics recorder is already installed in this process")]
    OtherRecorder,
}

/// The recorder's configuration: Faultline's histogram buckets, names as given (they already
/// carry their unit and `_total` suffixes).
pub fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets(DURATION_BUCKETS)
        .expect("the bucket list is not empty")
}

/// A recorder that is not installed anywhere: tests set it as the thread's local recorder
/// (see [`testing::LocalMetrics`]).
pub fn recorder() -> PrometheusRecorder {
    builder().build_recorder()
}

static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the Prometheus recorder as this process's global `metrics` recorder, describes every
/// Faultline metric, and returns the handle that renders the exposition text. Idempotent: later
/// calls return the same handle. Call it before building the worker or the API, so that nothing
/// they record is lost. Run [`run_upkeep`] beside it.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let mut installed = INSTALLED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let recorder = recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::OtherRecorder)?;
    describe();
    *installed = Some(handle.clone());
    Ok(handle)
}

/// A [`RenderFn`] over `handle`, for `faultline_http::ApiConfig::metrics`.
pub fn render_fn(handle: PrometheusHandle) -> RenderFn {
    Arc::new(move || handle.render())
}

/// [`render_fn`], hiding the queue sampler's families ([`SAMPLED_FAMILIES`]) while `exported`
/// says they are not current (the process does not lead, so another process samples).
pub fn render_fn_with(handle: PrometheusHandle, exported: Exported) -> RenderFn {
    Arc::new(move || {
        let text = handle.render();
        if exported.is_exported() {
            text
        } else {
            without_families(&text, &SAMPLED_FAMILIES)
        }
    })
}

/// The exposition `text` without the samples and the `# HELP` / `# TYPE` lines of `families`.
pub fn without_families(text: &str, families: &[&str]) -> String {
    let of_family = |line: &str| {
        let name = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
            .unwrap_or(line);
        families.iter().any(|family| {
            name.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines().filter(|line| !of_family(line)) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Folds recorded histogram samples into their buckets every `every` until `shutdown` fires
/// (without it, an unscraped process would keep every sample).
pub async fn run_upkeep(handle: PrometheusHandle, every: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => handle.run_upkeep(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_rise_from_half_a_millisecond_to_ten_minutes() {
        assert_eq!(DURATION_BUCKETS.first(), Some(&0.0005));
        assert_eq!(DURATION_BUCKETS.last(), Some(&600.0));
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn upkeep_runs_until_shutdown() {
        let recorder = recorder();
        let handle = recorder.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_upkeep(handle, Duration::from_secs(5), shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!task.is_finished());
        shutdown.cancel();
        task.await.expect("upkeep stops on shutdown");
    }

    #[test]
    fn install_is_idempotent_and_describes_every_metric() {
        let first = install().expect("installed");
        let second = install().expect("installed again");
        metrics::counter!(names::DB_ERRORS_TOTAL, labels::OPERATION => "claim").increment(2);
        metrics::histogram!(names::JOB_WAIT_SECONDS, labels::QUEUE => "q").record(0.003);
        let text = second.render();
        assert_eq!(first.render(), text);
        assert!(text.contains("# HELP faultline_db_errors_total "), "{text}");
        assert!(
            text.contains("faultline_db_errors_total{operation=\"claim\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("faultline_job_wait_seconds_bucket{queue=\"q\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("faultline_job_wait_seconds_bucket{queue=\"q\",le=\"0.0025\"} 0"),
            "{text}"
        );
    }
}
