//! Metrics wiring, once per process: installs the Prometheus recorder (`faultline_metrics`), keeps
//! the process's one `LabelGuard`, runs the recorder's upkeep and the queue-depth sampler, and
//! serves `GET /metrics` on its own port for `faultline worker`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use faultline_metrics::{Exported, LabelGuard, PrometheusHandle, QueueSampler, RenderFn};
use faultline_ports::JobStore;
use faultline_worker::MaintenanceHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::options::MetricsArgs;

/// The process's metrics: the exposition handle, the label guard every emitter shares, and the
/// token that stops the background tasks (upkeep, sampler, `/metrics` server).
pub(crate) struct Telemetry {
    pub(crate) handle: PrometheusHandle,
    pub(crate) labels: LabelGuard,
    sample_interval: Option<Duration>,
    sampling: AtomicBool,
    /// Whether the queue-depth series are the leader's current numbers (else hidden).
    exported: Exported,
    stop: CancellationToken,
}

impl Telemetry {
    /// Installs the recorder (before the worker or the API is built, so nothing recorded is lost)
    /// and starts its upkeep.
    pub(crate) fn install(args: &MetricsArgs) -> anyhow::Result<Telemetry> {
        let sample_interval = args.sample_interval()?;
        let handle = faultline_metrics::install().context("install the metrics recorder")?;
        let stop = CancellationToken::new();
        tokio::spawn(faultline_metrics::run_upkeep(
            handle.clone(),
            faultline_metrics::DEFAULT_UPKEEP_INTERVAL,
            stop.clone(),
        ));
        Ok(Telemetry {
            handle,
            labels: LabelGuard::new(args.max_label_values()),
            sample_interval,
            sampling: AtomicBool::new(false),
            exported: Exported::default(),
            stop,
        })
    }

    /// Starts the queue-depth sampler on `store`, sampling while `leader` leads the maintenance
    /// (one process per database samples), unless it is off or already running (one per
    /// process: `dev` runs a worker and the API on one recorder).
    pub(crate) fn start_sampler<S: JobStore>(&self, store: Arc<S>, leader: MaintenanceHandle) {
        let Some(every) = self.sample_interval else {
            return;
        };
        if self.sampling.swap(true, Ordering::SeqCst) {
            return;
        }
        let sampler = QueueSampler::new(store, self.labels.clone())
            .with_interval(every)
            .while_leading(Arc::new(move || leader.is_leader()))
            .with_exported(self.exported.clone());
        tokio::spawn(sampler.run(self.stop.clone()));
    }

    /// The exposition text of the process (queue depth only while it is the leader's current
    /// sample).
    pub(crate) fn render_fn(&self) -> RenderFn {
        faultline_metrics::render_fn_with(self.handle.clone(), self.exported.clone())
    }

    /// Serves `GET /metrics` on `listener` until [`Telemetry::stop`].
    pub(crate) fn serve_on(&self, listener: TcpListener) {
        let render = self.render_fn();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            if let Err(error) = faultline_metrics::serve_render_on(listener, render, stop).await {
                tracing::error!(error = %error, "the /metrics endpoint stopped");
            }
        });
    }
}

impl Drop for Telemetry {
    /// Stops the background tasks: dropped after the worker and the API have stopped, so that
    /// their final counts were recorded.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds the `/metrics` address (before anything else starts, so that a taken port fails at once).
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr} (--metrics-listen / FAULTLINE_METRICS_LISTEN)"))
}
