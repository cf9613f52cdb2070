//! The maintenance options every long-running subcommand shares (`worker`, `api`, `dev`), how
//! they become a `MaintenanceConfig`, and the task that runs the process's maintenance: its
//! registry entry and, when elected, the rescuer, the pruner and the reaper.

use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::Telemetry;
use clap::{Args, ValueEnum};
use faultline_ports::{JobStore, ProcessSpec, QueueSlots};
use faultline_worker::{Maintenance, MaintenanceConfig, WorkerConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::options::{Interval, parse_duration, parse_interval};

/// Whether a process may be elected to run the maintenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Switch {
    /// Take part in the election.
    On,
    /// Never lead (the process still registers itself).
    Off,
}

/// How the maintenance runs: one flag per field of `MaintenanceConfig` (defaults are its own; a
/// test keeps them equal).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Maintenance")]
pub(crate) struct MaintenanceArgs {
    /// Whether this process may be elected maintenance leader (the one process per database that
    /// rescues expired leases, prunes finished jobs and removes vanished processes).
    #[arg(
        long,
        env = "FAULTLINE_MAINTENANCE",
        value_name = "on|off",
        default_value = "on"
    )]
    pub(crate) maintenance: Switch,

    /// Length of the maintenance leadership; a new leader takes over within this plus one
    /// election interval after the leader dies.
    #[arg(long, env = "FAULTLINE_LEADER_LEASE", value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub(crate) leader_lease: Duration,

    /// How often the leader renews its leadership and the others ask for it [default: a third of
    /// the leader lease].
    #[arg(long, env = "FAULTLINE_ELECTION_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) election_interval: Option<Duration>,

    /// How often this process refreshes its entry in the process registry.
    #[arg(long, env = "FAULTLINE_PROCESS_HEARTBEAT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) process_heartbeat: Duration,

    /// The leader removes registry entries not refreshed for this long.
    #[arg(long, env = "FAULTLINE_PROCESS_EXPIRY", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub(crate) process_expiry: Duration,

    /// How often the leader rescues expired leases (of any process); "off" disables the rescuer.
    #[arg(long, env = "FAULTLINE_RESCUE_INTERVAL", value_name = "DURATION|off", default_value = "15s", value_parser = parse_interval)]
    pub(crate) rescue_interval: Interval,

    /// Expired leases rescued per statement.
    #[arg(
        long,
        env = "FAULTLINE_RESCUE_BATCH_SIZE",
        value_name = "N",
        default_value_t = 1_000
    )]
    pub(crate) rescue_batch_size: u32,

    /// How often the leader deletes finished jobs past their retention; "off" disables the
    /// pruner.
    #[arg(long, env = "FAULTLINE_PRUNE_INTERVAL", value_name = "DURATION|off", default_value = "60s", value_parser = parse_interval)]
    pub(crate) prune_interval: Interval,

    /// How long succeeded jobs are kept.
    #[arg(long, env = "FAULTLINE_RETAIN_SUCCEEDED", value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub(crate) retain_succeeded: Duration,

    /// How long failed jobs are kept.
    #[arg(long, env = "FAULTLINE_RETAIN_FAILED", value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
    pub(crate) retain_failed: Duration,

    /// How long cancelled jobs are kept.
    #[arg(long, env = "FAULTLINE_RETAIN_CANCELLED", value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
    pub(crate) retain_cancelled: Duration,

    /// Finished jobs deleted per statement.
    #[arg(
        long,
        env = "FAULTLINE_PRUNE_BATCH_SIZE",
        value_name = "N",
        default_value_t = 1_000
    )]
    pub(crate) prune_batch_size: u32,
}

impl MaintenanceArgs {
    /// The maintenance configuration of `process` (checked when the service is built).
    pub(crate) fn config(
        &self,
        process: ProcessSpec,
        store_timeout: Duration,
    ) -> MaintenanceConfig {
        MaintenanceConfig {
            lead: self.maintenance == Switch::On,
            leader_lease: self.leader_lease,
            election_interval: self.election_interval,
            process_heartbeat: self.process_heartbeat,
            process_expiry: self.process_expiry,
            rescue_interval: self.rescue_interval.0,
            rescue_batch_size: self.rescue_batch_size,
            prune_interval: self.prune_interval.0,
            retain_succeeded: self.retain_succeeded,
            retain_failed: self.retain_failed,
            retain_cancelled: self.retain_cancelled,
            prune_batch_size: self.prune_batch_size,
            store_timeout,
            ..MaintenanceConfig::new(process)
        }
    }

    /// `name = value` lines for `--print-config`.
    pub(crate) fn describe(config: &MaintenanceConfig) -> Vec<(&'static str, String)> {
        let off = |interval: Option<Duration>| {
            interval.map_or_else(|| "off".to_owned(), |d| format!("{d:?}"))
        };
        vec![
            (
                "maintenance",
                if config.lead { "on" } else { "off" }.to_owned(),
            ),
            ("leader_lease", format!("{:?}", config.leader_lease)),
            (
                "election_interval",
                format!("{:?}", config.election_every()),
            ),
            (
                "process_heartbeat",
                format!("{:?}", config.process_heartbeat),
            ),
            ("process_expiry", format!("{:?}", config.process_expiry)),
            ("rescue_interval", off(config.rescue_interval)),
            ("rescue_batch_size", config.rescue_batch_size.to_string()),
            ("prune_interval", off(config.prune_interval)),
            ("retain_succeeded", format!("{:?}", config.retain_succeeded)),
            ("retain_failed", format!("{:?}", config.retain_failed)),
            ("retain_cancelled", format!("{:?}", config.retain_cancelled)),
            ("prune_batch_size", config.prune_batch_size.to_string()),
        ]
    }
}

/// This process's registry entry: `id`, `role` (`worker`, `api`, `dev`), the host name, the pid,
/// the version, and the queues its producers claim, with their slots.
pub(crate) fn process(id: String, role: &str, producers: &[WorkerConfig]) -> ProcessSpec {
    ProcessSpec {
        id,
        role: role.to_owned(),
        host: host_name(),
        pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        queues: producers
            .iter()
            .flat_map(|producer| {
                producer.queues.iter().map(|queue| QueueSlots {
                    queue: queue.clone(),
                    slots: u32::try_from(producer.concurrency).unwrap_or(u32::MAX),
                })
            })
            .collect(),
    }
}

/// `<hostname>-<pid>`: the id of a process that has no worker id.
pub(crate) fn process_id() -> String {
    WorkerConfig::default().worker_id
}

/// The host name as the registry shows it (names are at most 128 characters).
fn host_name() -> String {
    faultline_worker::host_name()
        .map(|name| name.chars().take(128).collect())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Starts the process's maintenance on `store` until `stop` fires (then it resigns and
/// deregisters before the task ends).
pub(crate) fn spawn<S: JobStore>(
    store: Arc<S>,
    config: MaintenanceConfig,
    telemetry: &Telemetry,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let service =
        Maintenance::new(store.clone(), config)?.with_metric_labels(telemetry.labels.clone());
    // Queue depth is sampled by the leader only.
    telemetry.start_sampler(store, service.handle());
    Ok(tokio::spawn(service.run(stop)))
}
