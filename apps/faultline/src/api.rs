//! `faultline api`: serves the HTTP API (`faultline_http`) on a Postgres pool, with `LISTEN`
//! wake-ups for long-polling lease requests and a health check that asks the database, until
//! SIGTERM/SIGINT. Startup never waits for the database: while it is down or unmigrated the API
//! answers (`/health` says what is wrong, `/v1` gives 503) and recovers when it is back. The API
//! never migrates. Serves its metrics (and those of a worker in the same process) at
//! `GET /metrics` on its own port, and samples queue depth.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use faultline_http::{ApiConfig, HealthCheck};
use faultline_postgres::PgStore;
use faultline_postgres::listen::{ListenOptions, spawn_listener};
use faultline_worker::MaintenanceConfig;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::database::{self, Unready};
use crate::maintenance::{self, MaintenanceArgs};
use crate::options::{ApiArgs, DatabaseArgs, MetricsArgs};
use crate::shutdown;
use crate::telemetry::Telemetry;

/// `faultline api` options.
#[derive(Debug, Args)]
pub(crate) struct ApiCommand {
    #[command(flatten)]
    pub(crate) database: DatabaseArgs,

    #[command(flatten)]
    pub(crate) api: ApiArgs,

    #[command(flatten)]
    pub(crate) maintenance: MaintenanceArgs,

    #[command(flatten)]
    pub(crate) metrics: MetricsArgs,

    /// Print the configuration as resolved from flags, environment and defaults (API tokens only
    /// as their number), and exit without connecting.
    #[arg(long)]
    pub(crate) print_config: bool,
}

/// Longest time a request waits for a pool connection: a database that refuses connections is
/// retried within it, so it bounds how long a request takes to get its 503 while the database is
/// down (and how long requests queue for a connection under load).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest time the health check waits for the database.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Pauses between the startup checks of the database (doubling from the first to the second).
const WATCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// Runs `faultline api`.
pub(crate) async fn run(args: ApiCommand) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals()?;
    let config = args.api.config()?;
    let process = maintenance::process(maintenance::process_id(), "api", &[]);
    let upkeep = args.maintenance.config(process, config.request_timeout);
    upkeep.validate()?;
    args.metrics.sample_interval()?;
    if args.print_config {
        print_config(&config, args.api.api_pool_size, &args.metrics, &upkeep);
        return Ok(());
    }
    let connect =
        database::connect_options(&args.database.database_url, database::API_APPLICATION_NAME)?;
    let listener = bind(config.listen).await?;
    let telemetry = Telemetry::install(&args.metrics)?;
    serve(
        listener,
        connect,
        args.api.api_pool_size,
        config,
        Some(upkeep),
        &telemetry,
        shutdown,
    )
    .await
}

/// `--print-config`: one `name = value` line per setting; tokens only as their number.
fn print_config(
    config: &ApiConfig,
    pool_size: u32,
    metrics: &MetricsArgs,
    upkeep: &MaintenanceConfig,
) {
    let lines = [
        ("listen", config.listen.to_string()),
        (
            "api_tokens",
            format!("{} configured", config.api_tokens.len()),
        ),
        ("max_body_bytes", config.max_body_bytes.to_string()),
        ("max_payload_bytes", config.max_payload_bytes.to_string()),
        ("request_timeout", format!("{:?}", config.request_timeout)),
        ("retry_after", format!("{:?}", config.retry_after)),
        (
            "lease_poll_interval",
            format!("{:?}", config.lease_poll_interval),
        ),
        ("api_shutdown_grace", format!("{:?}", config.shutdown_grace)),
        (
            "header_read_timeout",
            format!("{:?}", config.header_read_timeout),
        ),
        ("idle_timeout", format!("{:?}", config.idle_timeout)),
        ("max_connections", config.max_connections.to_string()),
        ("api_pool_size", pool_size.to_string()),
        (
            "metrics_sample_interval",
            metrics
                .metrics_sample_interval
                .0
                .map_or_else(|| "off".to_owned(), |d| format!("{d:?}")),
        ),
        (
            "metrics_max_label_values",
            metrics.metrics_max_label_values.to_string(),
        ),
    ];
    let upkeep = MaintenanceArgs::describe(upkeep);
    for (name, value) in lines.into_iter().chain(upkeep) {
        println!("{name} = {value}");
    }
}

/// Binds the API's address (before anything else starts, so that a taken port fails at once).
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr} (--listen / FAULTLINE_LISTEN)"))
}

/// The base URL a local client reaches `addr` at: an unspecified address (0.0.0.0, ::) becomes
/// the loopback address.
pub(crate) fn local_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Serves the API on `listener` until `shutdown` fires, with a lazily connecting pool of
/// `pool_size` connections made from `connect`, `LISTEN` wake-ups and a database health check,
/// serving `telemetry`'s exposition at `/metrics` (and sampling queue depth, unless the process
/// already does), next to the process's maintenance when `upkeep` is given (an API-only
/// deployment rescues expired HTTP leases, prunes and reaps like a worker); then lets in-flight
/// requests finish (for up to the configured grace), stops the maintenance and closes the pool.
pub(crate) async fn serve(
    listener: TcpListener,
    connect: PgConnectOptions,
    pool_size: u32,
    config: ApiConfig,
    upkeep: Option<MaintenanceConfig>,
    telemetry: &Telemetry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = ApiConfig {
        metrics: Some(telemetry.render_fn()),
        metric_labels: telemetry.labels.clone(),
        ..config
    };
    let pool = database::lazy_pool(
        &connect,
        pool_size,
        ACQUIRE_TIMEOUT.min(config.request_timeout),
    );
    let health = DatabaseHealth::new(pool.clone());
    // Background tasks live until the server has finished its last request.
    let stop_background = CancellationToken::new();
    let wake = spawn_listener(connect, ListenOptions::default(), stop_background.clone());
    tokio::spawn(watch_database(health.clone(), stop_background.clone()));

    let store = Arc::new(PgStore::new(pool.clone()));
    let stop_upkeep = CancellationToken::new();
    let upkeep = match upkeep {
        Some(upkeep) => Some(maintenance::spawn(
            store.clone(),
            upkeep,
            telemetry,
            stop_upkeep.clone(),
        )?),
        None => None,
    };
    let served =
        faultline_http::serve_on(listener, store, wake, health, config, shutdown.clone()).await;
    stop_background.cancel();
    stop_upkeep.cancel();
    if let Some(task) = upkeep {
        let _ = task.await;
    }
    pool.close().await;
    served.context("serve the HTTP API")?;
    tracing::info!("HTTP API stopped");
    Ok(())
}

/// Why the database cannot serve the API.
#[derive(Debug)]
enum Down {
    /// It does not answer (the cause is for the log only).
    Unreachable(String),
    /// It answers, but lacks these migrations.
    Unmigrated(Vec<String>),
}

/// The health check behind `GET /health`: gets a connection from the API's own pool and, until
/// the schema has been seen migrated, checks the schema (a query that also proves the database
/// answers); afterwards a ping (one round trip) is enough. Bounded by [`HEALTH_TIMEOUT`].
#[derive(Clone)]
struct DatabaseHealth {
    pool: PgPool,
    /// Set once the schema was seen migrated; cleared when the database stops answering.
    migrated: Arc<AtomicBool>,
}

impl DatabaseHealth {
    fn new(pool: PgPool) -> Self {
        DatabaseHealth {
            pool,
            migrated: Arc::new(AtomicBool::new(false)),
        }
    }

    async fn check(&self) -> Result<(), Down> {
        match tokio::time::timeout(HEALTH_TIMEOUT, self.try_check()).await {
            Ok(checked) => checked,
            Err(_) => Err(Down::Unreachable(format!(
                "no answer within {HEALTH_TIMEOUT:?}"
            ))),
        }
    }

    async fn try_check(&self) -> Result<(), Down> {
        let unreachable = |e: sqlx::Error| Down::Unreachable(e.to_string());
        let mut conn = match self.pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                self.migrated.store(false, Ordering::Relaxed);
                return Err(unreachable(e));
            }
        };
        if self.migrated.load(Ordering::Relaxed) {
            let pinged = conn.ping().await.map_err(unreachable);
            if pinged.is_err() {
                // After an outage, look at the schema again (the database may have been replaced).
                self.migrated.store(false, Ordering::Relaxed);
            }
            return pinged;
        }
        match database::missing_migrations(&mut conn).await {
            Ok(missing) if missing.is_empty() => {
                self.migrated.store(true, Ordering::Relaxed);
                Ok(())
            }
            Ok(missing) => Err(Down::Unmigrated(missing)),
            Err(Unready::Transient(e) | Unready::Fatal(e)) => {
                Err(Down::Unreachable(format!("{e:#}")))
            }
        }
    }
}

#[async_trait::async_trait]
impl HealthCheck for DatabaseHealth {
    async fn ping(&self) -> Result<(), String> {
        // The answer is public (`/health` needs no token): the cause goes to the log only.
        match self.check().await {
            Ok(()) => Ok(()),
            Err(Down::Unreachable(cause)) => {
                tracing::debug!(%cause, "health check: the database does not answer");
                Err("the database does not answer".to_owned())
            }
            Err(Down::Unmigrated(missing)) => Err(format!(
                "the database schema is not migrated (missing: {}); run `faultline migrate`",
                missing.join(", ")
            )),
        }
    }
}

/// Startup report: checks the database until it answers with the schema migrated, logging what
/// is wrong meanwhile (unreachable: a warning per attempt; unmigrated: one error, then quietly
/// again until it is migrated). The API serves all along; this only makes the log say why `/v1`
/// answers 503.
async fn watch_database(health: DatabaseHealth, stop: CancellationToken) {
    let (mut delay, max_delay) = WATCH_BACKOFF;
    let mut failures = 0_u32;
    let mut told_unmigrated = false;
    loop {
        let checked = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            checked = health.check() => checked,
        };
        match checked {
            Ok(()) => {
                if failures > 0 || told_unmigrated {
                    tracing::info!(failures, "database ready: the API serves /v1 now");
                } else {
                    tracing::info!("database ready");
                }
                return;
            }
            Err(Down::Unreachable(cause)) => {
                failures += 1;
                tracing::warn!(
                    error = %cause,
                    failures,
                    retry_in_ms = delay.as_millis(),
                    "database unreachable; /v1 answers 503 and /health reports it until it is back"
                );
            }
            Err(Down::Unmigrated(missing)) => {
                if !told_unmigrated {
                    told_unmigrated = true;
                    tracing::error!(
                        missing = missing.join(", "),
                        "the database schema is not migrated: run `faultline migrate` with the \
                         same DATABASE_URL (the API never changes the schema); until then /v1 \
                         answers 503 and /health reports it"
                    );
                }
            }
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(max_delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_urls_use_loopback_for_unspecified_addresses() {
        let url = |addr: &str| local_url(addr.parse().unwrap());
        assert_eq!(url("0.0.0.0:8000"), "http://127.0.0.1:8000");
        assert_eq!(url("[::]:8000"), "http://[::1]:8000");
        assert_eq!(url("10.1.2.3:80"), "http://10.1.2.3:80");
        assert_eq!(url("[fe80::1]:9"), "http://[fe80::1]:9");
    }
}
