//! `faultline dev`: the quick start in one process. Uses `DATABASE_URL` when set; otherwise
//! starts a private PostgreSQL cluster from the locally installed server binaries (a fresh,
//! temporary one per run: its data is deleted when `dev` stops). Migrates, runs a worker with the
//! demo handlers, prints where everything is, and on Ctrl-C stops the worker, then the cluster.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use faultline_postgres::cluster::{ClusterError, PrivateCluster, reap_orphans};
use tokio_util::sync::CancellationToken;

use crate::options::{HttpArgs, WorkerArgs};
use crate::{apply_migrations, database, handlers, report_migrations, shutdown, worker};

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
    http: HttpArgs,
}

/// Runs `faultline dev`.
pub(crate) async fn run(args: DevCommand) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals()?;
    let registry = handlers::registry(&args.http, true)?;
    let config = args.worker.config();
    config.validate()?;

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
    let result = serve(&url, cluster.is_some(), &args, registry, config, shutdown).await;
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

async fn serve(
    url: &str,
    private: bool,
    args: &DevCommand,
    registry: faultline_worker::Registry,
    config: faultline_worker::WorkerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let connect = database::connect_options(url)?;
    let migrate_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .context("connect to the database")?;
    let applied = apply_migrations(&migrate_pool).await?;
    migrate_pool.close().await;
    report_migrations(&applied);

    let backoff = (config.db_backoff_min, config.db_backoff_max);
    let Some(pool) =
        database::connect(&connect, args.worker.pool_size(), backoff, &shutdown).await?
    else {
        return Ok(());
    };

    // The HTTP API (and its Swagger UI and metrics) joins here with its issue: start it on this
    // pool and print its URLs below.
    let kinds = registry.kinds().join(", ");
    let where_from = if private {
        "private, temporary: deleted when dev stops"
    } else {
        "from DATABASE_URL"
    };
    println!("faultline dev is running");
    println!("  database  {}  ({where_from})", shown(url));
    println!("  api       not available yet (arrives with the HTTP API)");
    println!(
        "  worker    queues {}, kinds {kinds}",
        config.queues.join(", ")
    );
    println!("Press Ctrl-C to stop.");

    worker::serve(pool, connect, registry, config, shutdown).await
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
