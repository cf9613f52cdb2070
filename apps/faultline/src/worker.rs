//! `faultline worker`: connects (waiting for the database while it is unreachable), checks the
//! schema, starts the `LISTEN` wake-ups and runs the worker runtime with the built-in handlers
//! until SIGTERM/SIGINT, then shuts down gracefully and exits 0. Serves its metrics at
//! `GET /metrics` on `--metrics-listen` and samples queue depth.

use std::sync::Arc;

use clap::Args;
use faultline_postgres::PgStore;
use faultline_postgres::listen::{ListenOptions, spawn_listener};
use faultline_worker::{
    Completer, CompleterConfig, MaintenanceConfig, Registry, Worker, WorkerConfig,
};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use crate::maintenance::{self, MaintenanceArgs};
use crate::options::{DatabaseArgs, HttpArgs, MetricsArgs, MetricsListen, WorkerArgs};
use crate::telemetry::{self, Telemetry};
use crate::{api, database, handlers, shutdown};

/// `faultline worker` options.
#[derive(Debug, Args)]
#[command(subcommand_negates_reqs = true)]
pub(crate) struct WorkerCommand {
    /// `faultline worker list`: list the registered processes instead of running a worker.
    #[command(subcommand)]
    pub(crate) command: Option<crate::admin::WorkerAction>,

    #[command(flatten)]
    pub(crate) database: DatabaseArgs,

    #[command(flatten)]
    pub(crate) worker: WorkerArgs,

    #[command(flatten)]
    pub(crate) maintenance: MaintenanceArgs,

    #[command(flatten)]
    pub(crate) http: HttpArgs,

    /// Also run the demo kinds: noop, sleep ({"ms": N}), fail ({"times": N}) and crash (aborts
    /// the worker process: for failure drills only).
    #[arg(long, env = "FAULTLINE_DEMO_HANDLERS", help_heading = "Handlers")]
    pub(crate) demo_handlers: bool,

    #[command(flatten)]
    pub(crate) metrics: MetricsArgs,

    /// Address (IP:PORT) where `GET /metrics` is served; port 0 picks a free port; "off" serves
    /// no metrics endpoint.
    #[arg(long, env = "FAULTLINE_METRICS_LISTEN", value_name = "ADDR|off", default_value = "0.0.0.0:9464", value_parser = crate::options::parse_metrics_listen, help_heading = "Metrics")]
    pub(crate) metrics_listen: MetricsListen,

    /// Print the configuration as resolved from flags, environment and defaults, and exit
    /// without connecting.
    #[arg(long)]
    pub(crate) print_config: bool,
}

/// Runs `faultline worker`.
pub(crate) async fn run(args: WorkerCommand) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals()?;
    let registry = handlers::registry(&args.http, args.demo_handlers)?;
    let config = args.worker.config();
    config.validate()?;
    let producers = args.worker.producers();
    for producer in &producers {
        producer.validate()?;
    }
    let process = maintenance::process(config.worker_id.clone(), "worker", &producers);
    let upkeep = args.maintenance.config(process, config.store_timeout);
    upkeep.validate()?;
    args.metrics.sample_interval()?;
    if args.print_config {
        print_config(&args, &config, &producers, &upkeep);
        return Ok(());
    }
    // First, so that a taken port fails before anything is started.
    let metrics_listener = match args.metrics_listen.0 {
        Some(addr) => Some(telemetry::bind(addr).await?),
        None => None,
    };
    let telemetry = Telemetry::install(&args.metrics)?;
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr()?;
        tracing::info!(url = %format!("{}/metrics", api::local_url(addr)), "metrics endpoint listening");
        telemetry.serve_on(listener);
    }
    let connect = database::connect_options(
        &args.database.database_url,
        database::WORKER_APPLICATION_NAME,
    )?;
    let backoff = (config.db_backoff_min, config.db_backoff_max);
    let Some(pool) =
        database::connect(&connect, args.worker.pool_size(), backoff, &shutdown).await?
    else {
        tracing::info!("stopped before the database was reachable");
        return Ok(());
    };
    let parts = Parts {
        registry,
        producers,
        maintenance: Some(upkeep),
    };
    serve(pool, connect, parts, &telemetry, shutdown).await
}

/// `--print-config`: one `name = value` line per setting.
fn print_config(
    args: &WorkerCommand,
    config: &WorkerConfig,
    producers: &[WorkerConfig],
    upkeep: &MaintenanceConfig,
) {
    let off = |interval: Option<std::time::Duration>| {
        interval.map_or_else(|| "off".to_owned(), |d| format!("{d:?}"))
    };
    let endpoints: Vec<String> = args
        .http
        .endpoints
        .iter()
        .map(|e| format!("{}={}", e.kind, handlers::http::redacted(&e.url)))
        .collect();
    let lines = [
        ("worker_id", config.worker_id.clone()),
        ("queues", queue_slots(producers)),
        ("concurrency", config.concurrency.to_string()),
        ("lease", format!("{:?}", config.lease)),
        (
            "heartbeat_interval",
            format!("{:?}", config.heartbeat_every()),
        ),
        ("poll_interval", format!("{:?}", config.poll_interval)),
        ("shutdown_grace", format!("{:?}", config.shutdown_grace)),
        (
            "completion_batch_size",
            config.completion_batch_size.to_string(),
        ),
        ("db_backoff_min", format!("{:?}", config.db_backoff_min)),
        ("db_backoff_max", format!("{:?}", config.db_backoff_max)),
        ("store_timeout", format!("{:?}", config.store_timeout)),
        ("pool_size", args.worker.pool_size().to_string()),
        ("demo_handlers", args.demo_handlers.to_string()),
        ("http_endpoints", endpoints.join(",")),
        ("http_timeout", format!("{:?}", args.http.http_timeout)),
        (
            "metrics_listen",
            args.metrics_listen
                .0
                .map_or_else(|| "off".to_owned(), |a| a.to_string()),
        ),
        (
            "metrics_sample_interval",
            off(args.metrics.metrics_sample_interval.0),
        ),
        (
            "metrics_max_label_values",
            args.metrics.metrics_max_label_values.to_string(),
        ),
    ];
    let upkeep = MaintenanceArgs::describe(upkeep);
    for (name, value) in lines.into_iter().chain(upkeep) {
        println!("{name} = {value}");
    }
}

/// `name=slots` of each producer, comma-separated.
pub(crate) fn queue_slots(producers: &[WorkerConfig]) -> String {
    producers
        .iter()
        .map(|p| format!("{}={}", p.queues.join("+"), p.concurrency))
        .collect::<Vec<_>>()
        .join(",")
}

/// What a worker process runs: the handlers, one worker configuration per queue (each runs as a
/// producer of its own), and the process's maintenance (`None` when the caller runs it).
pub(crate) struct Parts {
    pub(crate) registry: Registry,
    pub(crate) producers: Vec<WorkerConfig>,
    pub(crate) maintenance: Option<MaintenanceConfig>,
}

/// Runs one worker per producer configuration on `pool` until `shutdown` fires, each claiming
/// its own queue with its own slots and woken by its own `LISTEN` connection (made from
/// `connect`, filtered to its queue), recording metrics with `telemetry`'s labels (and sampling
/// queue depth, unless the process already does), next to the process's maintenance if `parts`
/// has one; then shuts every worker down gracefully (the maintenance last: it resigns and
/// deregisters once the workers have given their leases back) and closes the pool.
pub(crate) async fn serve(
    pool: PgPool,
    connect: PgConnectOptions,
    parts: Parts,
    telemetry: &Telemetry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Parts {
        registry,
        producers,
        maintenance: upkeep,
    } = parts;
    let store = Arc::new(PgStore::new(pool.clone()));
    // One writer of every producer's outcomes (the producers share its write settings).
    let completer = Completer::new(
        store.clone(),
        producers
            .first()
            .map(CompleterConfig::of)
            .unwrap_or_default(),
    );
    let mut workers = Vec::with_capacity(producers.len());
    for config in producers {
        workers.push(
            Worker::new(store.clone(), registry.clone(), config)?
                .with_metric_labels(telemetry.labels.clone())
                .with_completer(completer.clone()),
        );
    }
    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(completer.run(stop_writing.clone()));
    let stop_upkeep = CancellationToken::new();
    let upkeep = match upkeep {
        Some(config) => Some(maintenance::spawn(
            store.clone(),
            config,
            telemetry,
            stop_upkeep.clone(),
        )?),
        None => None,
    };
    // The listeners outlive the workers' loops (the shutdown's grace period claims nothing).
    let stop_listening = CancellationToken::new();
    let mut running = tokio::task::JoinSet::new();
    for worker in workers {
        let listen = ListenOptions::default().queues(worker.config().queues.clone());
        let wakeups = spawn_listener(connect.clone(), listen, stop_listening.clone());
        let mut worker = worker.with_wakeup(wakeups);
        let shutdown = shutdown.clone();
        running.spawn(async move {
            let queue = worker.config().queues.join(",");
            (queue, worker.run(shutdown).await)
        });
    }
    while let Some(done) = running.join_next().await {
        match done {
            Ok((queue, report)) => tracing::info!(
                queue,
                interrupted = report.interrupted,
                released = report.counts.released,
                "worker stopped"
            ),
            Err(err) => tracing::error!(error = %err, "a worker task failed"),
        }
    }
    // Each worker flushed its own writes at its shutdown.
    stop_writing.cancel();
    let _ = writer.await;
    stop_listening.cancel();
    stop_upkeep.cancel();
    if let Some(task) = upkeep {
        let _ = task.await;
    }
    pool.close().await;
    Ok(())
}
