//! `faultline dev`: the quick start in one process. Uses `DATABASE_URL` when set; otherwise
//! starts a private PostgreSQL cluster from the locally installed server binaries (a fresh,
//! temporary one per run: its data is deleted when `dev` stops). Migrates, runs a worker with the
//! demo handlers and the HTTP API, prints where everything is, and on Ctrl-C stops the worker and
//! the API, then the cluster. One metrics recorder for both: the API's `GET /metrics` serves the
//! worker's metrics too (dev has no separate metrics port).

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use faultline_postgres::cluster::{ClusterError, PrivateCluster, reap_orphans};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::maintenance::{self, MaintenanceArgs};
use crate::options::{ApiArgs, HttpArgs, MetricsArgs, WorkerArgs};
use crate::telemetry::Telemetry;
use crate::{api, database, handlers, report_migrations, shutdown, worker};

/// `faultline dev` options.
#[derive(Debug, Args)]
pub(crate) struct DevCommand {
    /// PostgreSQL connection URL; when unset, a private temporary PostgreSQL server is started
    /// from the local server binaries (initdb, pg_ctl).
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    database_url: Option<String>,

    #[command(flatten)]
    worker: WorkerArgs,

    #[command(flatten)]
    maintenance: MaintenanceArgs,

    #[command(flatten)]
    http: HttpArgs,

    #[command(flatten)]
    api: ApiArgs,

    #[command(flatten)]
    metrics: MetricsArgs,
}

/// Runs `faultline dev`.
pub(crate) async fn run(args: DevCommand) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals()?;
    let registry = handlers::registry(&args.http, true)?;
    let config = args.worker.config();
    config.validate()?;
    let producers = args.worker.producers();
    for producer in &producers {
        producer.validate()?;
    }
    let process = maintenance::process(config.worker_id.clone(), "dev", &producers);
    let upkeep = args.maintenance.config(process, config.store_timeout);
    upkeep.validate()?;
    let api_config = args.api.config()?;
    args.metrics.sample_interval()?;
    // First, so that a taken port fails before anything is started.
    let listener = api::bind(api_config.listen).await?;

    let (url, cluster) = match args.database_url.as_deref() {
        Some(url) if !url.trim().is_empty() => (url.to_owned(), None),
        _ => {
            eprintln!("faultline dev: DATABASE_URL is not set: starting a private PostgreSQL...");
            let cluster = tokio::task::spawn_blocking(start_cluster)
                .await
                .context("start the private PostgreSQL")??;
            (cluster.url(), Some(cluster))
        }
    };
    // From here on, the cluster must be stopped whatever happens.
    let telemetry = Telemetry::install(&args.metrics);
    let parts = Parts {
        worker: worker::Parts {
            registry,
            producers,
            maintenance: Some(upkeep),
        },
        config,
        api_config,
        listener,
    };
    let result = match telemetry {
        Ok(telemetry) => serve(&url, cluster.is_some(), &args, parts, &telemetry, shutdown).await,
        Err(error) => Err(error),
    };
    if let Some(mut cluster) = cluster {
        let stopped = tokio::task::spawn_blocking(move || cluster.stop()).await;
        match stopped {
            Ok(Ok(())) => tracing::info!("private PostgreSQL stopped and removed"),
            Ok(Err(e)) => tracing::error!(error = %e, "could not stop the private PostgreSQL"),
            Err(e) => tracing::error!(error = %e, "could not stop the private PostgreSQL"),
        }
    }
    result
}

/// What `serve` runs: the worker (with the process's maintenance) and the API.
struct Parts {
    worker: worker::Parts,
    /// The settings the producers share (backoff, queues), for the start-up banner.
    config: faultline_worker::WorkerConfig,
    api_config: faultline_http::ApiConfig,
    listener: TcpListener,
}

async fn serve(
    url: &str,
    private: bool,
    args: &DevCommand,
    parts: Parts,
    telemetry: &Telemetry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Parts {
        worker: worker_parts,
        config,
        api_config,
        listener,
    } = parts;
    let connect = database::connect_options(url, database::WORKER_APPLICATION_NAME)?;
    let api_connect = database::connect_options(url, database::API_APPLICATION_NAME)?;
    let migrate_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .context("connect to the database")?;
    let applied = faultline_postgres::migrate(&migrate_pool)
        .await
        .context("apply migrations");
    migrate_pool.close().await;
    report_migrations(&applied?);

    let backoff = (config.db_backoff_min, config.db_backoff_max);
    let Some(pool) =
        database::connect(&connect, args.worker.pool_size(), backoff, &shutdown).await?
    else {
        return Ok(());
    };

    let addr = listener.local_addr().context("the API's address")?;
    let base = api::local_url(addr);
    let kinds = worker_parts.registry.kinds().join(", ");
    let where_from = if private {
        "private, temporary: deleted when dev stops"
    } else {
        "from DATABASE_URL"
    };
    let (auth, auth_header) = if api_config.auth_enabled() {
        (
            "bearer token required",
            " -H 'authorization: Bearer <token>'",
        )
    } else {
        ("no API tokens: open to anyone who can reach it", "")
    };
    println!("faultline dev is running");
    println!("  database  {}  ({where_from})", shown(url));
    println!("  api       {base}/v1  ({auth}, listening on {addr})");
    println!("  docs      {base}/docs  (Swagger UI)");
    println!("  openapi   {base}/openapi.json");
    println!("  health    {base}/health");
    println!("  metrics   {base}/metrics  (Prometheus: the worker's and the API's)");
    println!(
        "  worker    queues {}, kinds {kinds}",
        worker::queue_slots(&worker_parts.producers)
    );
    println!(
        "Try: curl -s -X POST {base}/v1/jobs{auth_header} -H 'content-type: application/json' \\\n  \
         -d '{{\"kind\": \"sleep\", \"payload\": {{\"ms\": 500}}}}'"
    );
    println!("Press Ctrl-C to stop.");

    // Both run until the shutdown; if one fails early, it stops the other.
    let api = stop_all_on_error(
        api::serve(
            listener,
            api_connect,
            args.api.api_pool_size,
            api_config,
            None, // the worker part runs the process's maintenance
            telemetry,
            shutdown.clone(),
        ),
        &shutdown,
    );
    let worker = stop_all_on_error(
        worker::serve(pool, connect, worker_parts, telemetry, shutdown.clone()),
        &shutdown,
    );
    let (api, worker) = tokio::join!(api, worker);
    api.and(worker)
}

/// Runs `part`; when it fails, fires `shutdown` so that the other parts stop too.
async fn stop_all_on_error(
    part: impl Future<Output = anyhow::Result<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let result = part.await;
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "stopping everything");
        shutdown.cancel();
    }
    result
}

/// Starts the private cluster (blocking: initdb and pg_ctl), after removing those of `dev` runs
/// that were killed before they could stop theirs.
fn start_cluster() -> anyhow::Result<PrivateCluster> {
    let reaped = reap_orphans();
    if reaped > 0 {
        tracing::info!(
            reaped,
            "removed private PostgreSQL clusters left by killed runs"
        );
    }
    PrivateCluster::start().map_err(|e| match e {
        ClusterError::BinariesNotFound { .. } => anyhow::anyhow!(
            "no PostgreSQL to use: DATABASE_URL is not set, and {e}.\n\
             Either install the PostgreSQL server (15 or newer; Debian/Ubuntu: `apt-get install \
             postgresql`, macOS: `brew install postgresql@15`), or set \
             DATABASE_URL=postgres://USER@HOST:PORT/DB to a server you have"
        ),
        other => anyhow::Error::new(other).context("start a private PostgreSQL"),
    })
}

/// `url` without its password.
fn shown(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
