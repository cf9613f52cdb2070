//! A standalone `/metrics` endpoint (poem) for processes that do not run the HTTP API, such as
//! `faultline worker`.

use std::io;
use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::RenderFn;
use poem::endpoint::make_sync;
use poem::http::StatusCode;
use poem::http::header::CONTENT_TYPE;
use poem::listener::{Acceptor, TcpAcceptor};
use poem::{EndpointExt, Response, Route, Server, get};
use tokio_util::sync::CancellationToken;

/// Binds `listen` and serves `GET /metrics` (the exposition text of `handle`) until `shutdown`
/// fires. Every other path answers 404.
pub async fn serve_metrics(
    listen: SocketAddr,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    serve_metrics_on(listener, handle, shutdown).await
}

/// [`serve_metrics`] on an already bound listener (bind port 0 to learn the port).
pub async fn serve_metrics_on(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_render_on(listener, crate::render_fn(handle), shutdown).await
}

/// [`serve_metrics_on`] with the exposition text of `render` (e.g. [`crate::render_fn_with`]).
pub async fn serve_render_on(
    listener: tokio::net::TcpListener,
    render: RenderFn,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let acceptor = TcpAcceptor::from_tokio(listener)?;
    if let Some(addr) = acceptor.local_addr().into_iter().next() {
        tracing::info!(addr = %addr, "serving /metrics");
    }
    let metrics = make_sync(move |_| {
        Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, crate::CONTENT_TYPE)
            .body(render())
    });
    let app = Route::new().at("/metrics", get(metrics)).boxed();
    Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(
            app,
            shutdown.cancelled_owned(),
            Some(std::time::Duration::from_secs(5)),
        )
        .await
}
