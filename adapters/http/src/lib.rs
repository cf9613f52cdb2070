//! Faultline's HTTP API adapter: jobs, queues and a worker protocol over HTTP (poem +
//! poem-openapi), with its OpenAPI document at `/openapi.json` and Swagger UI at `/docs`.
//!
//! The adapter depends on the ports only. The caller (the `faultline` binary) hands it a store,
//! a wake-up receiver (bumped when jobs may have become ready; long-polling lease requests wait
//! on it), a [`HealthCheck`] for `GET /health`, a typed [`ApiConfig`] and a shutdown token:
//!
//! ```ignore
//! let store = Arc::new(PgStore::new(pool));
//! let health = faultline_http::StoreHealth::new(store.clone());
//! faultline_http::serve(store, wake, health, config, shutdown).await?;
//! ```
//!
//! Routes: `GET /health`, `GET /openapi.json`, `GET /docs` (Swagger UI), `GET /metrics` (when
//! [`ApiConfig::metrics`] is set; else 404; never needs a token), and under `/v1` the jobs,
//! queues (statistics, pause and resume), worker protocol and process list operations (see
//! `docs/openapi.json`).
//!
//! Metrics (through the `metrics` facade; names in `faultline_ports::telemetry`): every request
//! by method, route template (`/v1/jobs/{id}`, `unmatched` for unknown paths) and status, with
//! its duration; enqueues, idempotent replays, the claims, retries and terminal outcomes of the
//! HTTP worker protocol, stale lease writes, and store errors.
//!
//! Every error is an RFC 9457 problem (`application/problem+json`); the problem type URIs are in
//! [`problem_types`]. Store errors map as: `Invalid` -> 422, `NotFound` -> 404, `Conflict` ->
//! 409 `idempotency-conflict`, `StaleLease` -> 409 `stale-lease`, `IllegalTransition` -> 409
//! `illegal-transition`, `Backend` (or no answer within [`ApiConfig::request_timeout`]) -> 503
//! with `Retry-After`.

mod api;
mod auth;
mod config;
mod conn;
mod dto;
mod fleet;
mod front;
mod headers;
mod health;
mod lost;
mod problem;
mod spec_only;
mod telemetry;

use std::io;
use std::sync::Arc;

use faultline_ports::JobStore;
use poem::endpoint::make_sync;
use poem::http::StatusCode;
use poem::http::header::CONTENT_TYPE;
use poem::listener::{Acceptor, TcpAcceptor};
use poem::{Endpoint, EndpointExt, Response, Route, Server, get};
use poem_openapi::OpenApiService;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::{ApiConfig, MetricsRender};
pub use health::{HealthCheck, StoreHealth};
pub use problem::PROBLEM_CONTENT_TYPE;
pub use problem::types as problem_types;

use crate::api::{Ctx, HealthApi, JobsApi, ProcessesApi, QueuesApi, WorkersApi};
use crate::front::{Front, FrontConfig};
use crate::telemetry::RouteTable;

/// The content type of `GET /metrics` (the Prometheus text format).
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The OpenAPI document's title.
pub const API_TITLE: &str = "Faultline";
/// The OpenAPI document's version: the crate's.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

type Apis = (HealthApi, JobsApi, QueuesApi, WorkersApi, ProcessesApi);

fn service(ctx: Arc<Ctx>) -> OpenApiService<Apis, ()> {
    let apis = (
        HealthApi(ctx.clone()),
        JobsApi(ctx.clone()),
        QueuesApi(ctx.clone()),
        WorkersApi(ctx.clone()),
        ProcessesApi(ctx),
    );
    OpenApiService::new(apis, API_TITLE, API_VERSION).description(include_str!("description.md"))
}

/// The OpenAPI document the server serves at `/openapi.json`, pretty-printed (what
/// `docs/openapi.json` holds). Needs no store.
pub fn openapi_json() -> String {
    let ctx = Ctx {
        store: Arc::new(spec_only::SpecOnlyStore),
        wake: watch::channel(0).1,
        health: Arc::new(StoreHealth::new(Arc::new(spec_only::SpecOnlyStore))),
        config: ApiConfig::default(),
        shutdown: CancellationToken::new(),
    };
    service(Arc::new(ctx)).spec()
}

/// The whole application as a poem endpoint (for tests with `poem::test::TestClient`, or to
/// mount elsewhere). `config.listen` and `config.shutdown_grace` are not used here.
///
/// `wake` should change whenever jobs may have become ready (e.g. the Postgres LISTEN task's
/// receiver, or `MemoryStore::on_enqueue`); a receiver that never changes is fine, lease
/// long-polls then rely on polling every [`ApiConfig::lease_poll_interval`]. When `shutdown` is
/// cancelled, waiting lease requests answer at once with what they have (nothing).
pub fn app<S: JobStore>(
    store: Arc<S>,
    wake: watch::Receiver<u64>,
    health: impl HealthCheck,
    config: ApiConfig,
    shutdown: CancellationToken,
) -> impl Endpoint<Output = Response> {
    let metrics = config.metrics.clone();
    let mut front = FrontConfig {
        tokens: auth::Tokens::new(&config.api_tokens),
        max_body_bytes: config.max_body_bytes,
        body_timeout: config.request_timeout,
        retry_after_secs: config.retry_after_secs(),
        routes: RouteTable::default(),
    };
    let ctx = Arc::new(Ctx {
        store,
        wake,
        health: Arc::new(health),
        config,
        shutdown,
    });
    let service = service(ctx);
    front.routes = route_table(&service.spec(), metrics.is_some());
    let mut routes = Route::new()
        .at("/openapi.json", service.spec_endpoint())
        .nest("/docs", service.swagger_ui());
    if let Some(render) = metrics {
        routes = routes.at(
            "/metrics",
            get(make_sync(move |_| {
                Response::builder()
                    .status(StatusCode::OK)
                    .header(CONTENT_TYPE, METRICS_CONTENT_TYPE)
                    .body(render())
            })),
        );
    }
    let routes = routes.nest("/", service);
    Front {
        inner: routes.boxed(),
        config: Arc::new(front),
    }
}

/// The route templates of the document (`paths`), plus the routes outside it.
fn route_table(spec: &str, metrics: bool) -> RouteTable {
    let doc: serde_json::Value = serde_json::from_str(spec).unwrap_or_default();
    let mut templates: Vec<&str> = doc["paths"]
        .as_object()
        .map(|paths| paths.keys().map(String::as_str).collect())
        .unwrap_or_default();
    templates.push("/openapi.json");
    if metrics {
        templates.push("/metrics");
    }
    RouteTable::new(templates, ["/docs"])
}

/// Binds `config.listen` and serves the API until `shutdown` is cancelled (see [`serve_on`]).
pub async fn serve<S: JobStore>(
    store: Arc<S>,
    wake: watch::Receiver<u64>,
    health: impl HealthCheck,
    config: ApiConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    serve_on(listener, store, wake, health, config, shutdown).await
}

/// Serves the API on an already bound listener (so a caller can bind port 0 and learn the port)
/// until `shutdown` is cancelled; then stops accepting, lets in-flight requests finish for up to
/// `config.shutdown_grace`, and returns. Logs a warning when no API tokens are configured.
///
/// Connections are kept in check by [`ApiConfig::header_read_timeout`],
/// [`ApiConfig::idle_timeout`] and [`ApiConfig::max_connections`] (at the cap, new connections
/// wait in the listen backlog until a served one closes).
pub async fn serve_on<S: JobStore>(
    listener: tokio::net::TcpListener,
    store: Arc<S>,
    wake: watch::Receiver<u64>,
    health: impl HealthCheck,
    config: ApiConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let acceptor = TcpAcceptor::from_tokio(listener)?;
    let addr = acceptor
        .local_addr()
        .into_iter()
        .next()
        .map(|addr| addr.to_string())
        .unwrap_or_default();
    if config.auth_enabled() {
        tracing::info!(%addr, tokens = config.api_tokens.len(), "HTTP API listening; /v1 needs a bearer token");
    } else {
        tracing::warn!(
            %addr,
            "HTTP API listening WITHOUT authentication: no API tokens are configured, so anyone \
             who can reach this address can submit, cancel and lease jobs"
        );
    }
    let grace = config.shutdown_grace;
    let acceptor = conn::Guarded::new(acceptor, config.max_connections, config.header_read_timeout);
    let idle_timeout = config.idle_timeout;
    let endpoint = app(store, wake, health, config, shutdown.clone());
    Server::new_with_acceptor(acceptor)
        .idle_timeout(idle_timeout)
        .run_with_graceful_shutdown(endpoint, shutdown.cancelled_owned(), Some(grace))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_path_is_its_own_route_template() {
        let spec = openapi_json();
        let table = route_table(&spec, true);
        let doc: serde_json::Value = serde_json::from_str(&spec).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 10, "{}", paths.len());
        for template in paths.keys() {
            let concrete = template.replace("{id}", "7").replace("{name}", "emails");
            assert!(!concrete.contains('{'), "{template}");
            assert_eq!(table.template(&concrete), template);
        }
        assert_eq!(table.template("/metrics"), "/metrics");
        assert_eq!(table.template("/openapi.json"), "/openapi.json");
        assert_eq!(table.template("/docs/swagger-ui.css"), "/docs");
        assert_eq!(route_table(&spec, false).template("/metrics"), "unmatched");
    }
}
