//! Signals: the first SIGTERM or SIGINT (Ctrl-C) starts a graceful shutdown by firing a
//! cancellation token; a second one ends the process at once (exit status 130), for when the
//! graceful path takes longer than the operator is willing to wait.

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token that fires on the first SIGTERM/SIGINT. Must be called inside the runtime.
pub(crate) fn on_signals() -> anyhow::Result<CancellationToken> {
    let mut terminate = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutting down gracefully (send it again to stop at once)"
        );
        fire.cancel();
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::warn!(signal = name, "second signal: exiting without waiting");
        std::process::exit(130);
    });
    Ok(token)
}
