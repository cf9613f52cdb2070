//! The `faultline` processes of a drill (workers, an API): started with a clean environment and
//! their output in `target/drills/<drill>/<name>.log`, signalled (SIGKILL, SIGSTOP, SIGCONT,
//! SIGTERM), scraped on `/metrics`, and always killed when the fleet is dropped, stopped ones
//! included, whichever way the drill ends.

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use faultline_metrics::testing::Exposition;
use faultline_ports::telemetry::names;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::ledger::{KIND, Sink};
use super::probe::{free_port, http_client, scrape, wait_for};

/// The drills' lease: short, so that recovery is quick, yet with heartbeats a second apart, so
/// that a loaded machine's scheduling stalls do not end the leases of live workers.
pub(crate) const LEASE: Duration = Duration::from_secs(3);

/// How a drill's workers run. Every interval is short so that recovery is quick; the drills'
/// time bounds are derived from these values.
#[derive(Debug, Clone)]
pub(crate) struct WorkerSpec {
    /// `--concurrency`.
    pub(crate) concurrency: usize,
    /// `--lease` (heartbeats every third of it).
    pub(crate) lease: Duration,
    /// `--shutdown-grace`.
    pub(crate) shutdown_grace: Duration,
    /// `--poll-interval`: the longest a due job waits for a worker with free slots.
    pub(crate) poll_interval: Duration,
    /// `--rescue-interval`: the longest an expired lease waits for the leader's rescuer.
    pub(crate) rescue_interval: Duration,
    /// `--leader-lease` (elections every third of it): when the maintenance leader is killed,
    /// another worker leads within this plus an election interval.
    pub(crate) leader_lease: Duration,
    /// `--prune-interval` (`None`: off, the drills' default, so that finished jobs stay for the
    /// checks).
    pub(crate) prune_interval: Option<Duration>,
    /// `--retain-cancelled` (`None`: the binary's default).
    pub(crate) retain_cancelled: Option<Duration>,
    /// `--db-backoff-max`: the longest pause between retries while the database is down.
    pub(crate) db_backoff_max: Duration,
    /// `--store-timeout`.
    pub(crate) store_timeout: Duration,
    /// `--demo-handlers` (for the `crash` kind).
    pub(crate) demo_handlers: bool,
    /// `--queues`.
    pub(crate) queues: String,
    /// Extra environment of the process (e.g. libfaketime's `LD_PRELOAD` and `FAKETIME`).
    pub(crate) env: Vec<(String, String)>,
}

impl WorkerSpec {
    /// A worker with `concurrency` slots and `lease`, every other interval short.
    pub(crate) fn new(concurrency: usize, lease: Duration) -> Self {
        WorkerSpec {
            concurrency,
            lease,
            shutdown_grace: Duration::from_secs(5),
            poll_interval: Duration::from_millis(200),
            rescue_interval: Duration::from_millis(250),
            leader_lease: Duration::from_millis(900),
            prune_interval: None,
            retain_cancelled: None,
            db_backoff_max: Duration::from_secs(1),
            store_timeout: Duration::from_secs(2),
            demo_handlers: false,
            queues: "default".into(),
            env: Vec::new(),
        }
    }

    /// `--election-interval`: the binary's default, a third of the leader lease.
    pub(crate) fn election_interval(&self) -> Duration {
        self.leader_lease / 3
    }

    /// The longest the maintenance has no leader after the leader dies: its lease (renewed an
    /// instant before the death at the latest) plus an election interval.
    pub(crate) fn failover_wait(&self) -> Duration {
        self.leader_lease + self.election_interval()
    }

    /// The longest an expired lease waits for a rescuer: a leader failover (the leader may be
    /// among the killed workers), then a rescuer's round.
    pub(crate) fn rescue_wait(&self) -> Duration {
        self.failover_wait() + self.rescue_interval
    }

    /// The longest an expired lease's job waits before running again on a live worker with free
    /// slots: the rescue wait, the job's backoff (capped), a claim poll.
    pub(crate) fn requeue_bound(&self) -> Duration {
        let backoff = Duration::from_millis(u64::try_from(super::db::BACKOFF.cap_ms).unwrap_or(0));
        self.rescue_wait() + backoff + self.poll_interval
    }

    fn args(&self, name: &str, sink: &Sink, metrics_port: u16) -> Vec<String> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut args: Vec<String> = [
            "worker",
            "--worker-id",
            name,
            "--queues",
            &self.queues,
            "--concurrency",
            &self.concurrency.to_string(),
            "--lease",
            &ms(self.lease),
            "--poll-interval",
            &ms(self.poll_interval),
            "--rescue-interval",
            &ms(self.rescue_interval),
            "--leader-lease",
            &ms(self.leader_lease),
            "--process-heartbeat",
            "500ms",
            "--shutdown-grace",
            &ms(self.shutdown_grace),
            "--db-backoff-min",
            "50ms",
            "--db-backoff-max",
            &ms(self.db_backoff_max),
            "--store-timeout",
            &ms(self.store_timeout),
            "--prune-interval",
            &self.prune_interval.map_or_else(|| "off".to_owned(), ms),
            "--http-endpoint",
            &format!("{KIND}={}", sink.url_for(name)),
            // Longer than any drill's stop: a SIGSTOPped worker's request must not time out.
            "--http-timeout",
            "120s",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--metrics-sample-interval",
            "off",
        ]
        .map(str::to_owned)
        .into();
        if let Some(retain) = self.retain_cancelled {
            args.extend(["--retain-cancelled".to_owned(), ms(retain)]);
        }
        if self.demo_handlers {
            args.push("--demo-handlers".into());
        }
        args
    }
}

/// One started process.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    pid: Pid,
    /// Its `/metrics` URL (workers).
    metrics: Option<String>,
    /// Its exit status, once seen.
    exit: Option<ExitStatus>,
}

/// Index of a process in its fleet.
pub(crate) type ProcId = usize;

/// The processes of one drill; every one still running is killed on drop.
#[derive(Debug)]
pub(crate) struct Fleet {
    bin: PathBuf,
    database_url: String,
    log_dir: PathBuf,
    client: reqwest::Client,
    procs: Vec<Proc>,
}

impl Fleet {
    /// A fleet running `bin` against `database_url`, logging into `log_dir`.
    pub(crate) fn new(bin: PathBuf, database_url: &str, log_dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("create {}", log_dir.display()))?;
        Ok(Fleet {
            bin,
            database_url: database_url.to_owned(),
            log_dir,
            client: http_client(Duration::from_secs(10))?,
            procs: Vec::new(),
        })
    }

    /// Starts `faultline worker` named `name` (its worker id, and its path on the sink).
    pub(crate) fn worker(
        &mut self,
        name: &str,
        spec: &WorkerSpec,
        sink: &Sink,
    ) -> anyhow::Result<ProcId> {
        let port = free_port()?;
        let metrics = format!("http://127.0.0.1:{port}/metrics");
        let bin = self.bin.clone();
        let args = spec.args(name, sink, port);
        self.start_with_env(name, &bin, &args, &spec.env, Some(metrics))
    }

    /// Starts `faultline api` on a free port with `args`; returns it and its base URL once
    /// `/health` answers (whatever it says).
    pub(crate) async fn api(
        &mut self,
        name: &str,
        args: &[&str],
    ) -> anyhow::Result<(ProcId, String)> {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let mut all: Vec<String> = [
            "api",
            "--listen",
            &listen,
            "--metrics-sample-interval",
            "off",
        ]
        .map(str::to_owned)
        .into();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let bin = self.bin.clone();
        let id = self.start(name, &bin, &all, None)?;
        let base = format!("http://{listen}");
        let health = format!("{base}/health");
        wait_for(
            &format!("{name} answers"),
            Duration::from_secs(30),
            async || match self.client.get(&health).send().await {
                Ok(_) => Ok(Ok(())),
                Err(e) => Ok(Err(e.to_string())),
            },
        )
        .await?;
        Ok((id, base))
    }

    /// Starts `program args` (the `faultline` binary, or another program such as an example)
    /// named `name`, with the drill's `DATABASE_URL` and no other Faultline setting from the
    /// environment; `metrics` is its `/metrics` URL, if it serves one.
    pub(crate) fn start(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        metrics: Option<String>,
    ) -> anyhow::Result<ProcId> {
        self.start_with_env(name, program, args, &[], metrics)
    }

    /// [`Fleet::start`] with `env` added to the process's environment.
    pub(crate) fn start_with_env(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        metrics: Option<String>,
    ) -> anyhow::Result<ProcId> {
        let log_path = self.log_dir.join(format!("{name}.log"));
        let log =
            File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .env("DATABASE_URL", &self.database_url)
            .env("FAULTLINE_LOG_FORMAT", "text");
        for (var, _) in std::env::vars() {
            if var.starts_with("FAULTLINE_") && var != "FAULTLINE_LOG_FORMAT" {
                command.env_remove(var);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let child = command
            .spawn()
            .with_context(|| format!("start {} {}", program.display(), args.join(" ")))?;
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .context("the new process's pid")?;
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            pid: Pid::from_raw(pid),
            metrics,
            exit: None,
        });
        Ok(self.procs.len() - 1)
    }

    /// The process's name.
    pub(crate) fn name(&self, id: ProcId) -> &str {
        &self.procs[id].name
    }

    /// The process's `/metrics` URL, if it serves one.
    pub(crate) fn metrics_url(&self, id: ProcId) -> Option<&str> {
        self.procs[id].metrics.as_deref()
    }

    /// Sends `signal` to a running process.
    pub(crate) fn signal(&self, id: ProcId, signal: Signal) -> anyhow::Result<()> {
        let proc = &self.procs[id];
        if proc.exit.is_some() {
            bail!("{} has exited already", proc.name);
        }
        kill(proc.pid, signal).with_context(|| format!("kill -{signal} {}", proc.name))
    }

    /// SIGKILLs the process (resumed first, should it be stopped) and reaps it.
    pub(crate) async fn kill(&mut self, id: ProcId) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.procs[id].exit {
            return Ok(status);
        }
        let _ = self.signal(id, Signal::SIGCONT);
        self.signal(id, Signal::SIGKILL)?;
        self.wait_exit(id, Duration::from_secs(30)).await
    }

    /// Waits at most `timeout` for the process to exit.
    pub(crate) async fn wait_exit(
        &mut self,
        id: ProcId,
        timeout: Duration,
    ) -> anyhow::Result<ExitStatus> {
        let proc = &mut self.procs[id];
        if let Some(status) = proc.exit {
            return Ok(status);
        }
        let status = tokio::time::timeout(timeout, proc.child.wait())
            .await
            .with_context(|| {
                format!(
                    "{} still runs after {:.1}s",
                    proc.name,
                    timeout.as_secs_f64()
                )
            })?
            .with_context(|| format!("wait for {}", proc.name))?;
        proc.exit = Some(status);
        Ok(status)
    }

    /// The exit status if the process has exited.
    pub(crate) fn try_exit(&mut self, id: ProcId) -> anyhow::Result<Option<ExitStatus>> {
        let proc = &mut self.procs[id];
        if proc.exit.is_none() {
            proc.exit = proc
                .child
                .try_wait()
                .with_context(|| format!("poll {}", proc.name))?;
        }
        Ok(proc.exit)
    }

    /// Scrapes the worker's `/metrics`.
    pub(crate) async fn scrape(&self, id: ProcId) -> anyhow::Result<Exposition> {
        let proc = &self.procs[id];
        let url = proc
            .metrics
            .as_deref()
            .with_context(|| format!("{} serves no metrics", proc.name))?;
        scrape(&self.client, url)
            .await
            .with_context(|| format!("metrics of {}", proc.name))
    }

    /// Waits until the worker runs (its `/metrics` reports its handler slots).
    pub(crate) async fn ready(&mut self, id: ProcId) -> anyhow::Result<()> {
        let what = format!("{} ready", self.procs[id].name);
        wait_for(&what, Duration::from_secs(30), async || {
            if let Some(status) = self.try_exit(id)? {
                bail!("{} exited: {status}", self.procs[id].name);
            }
            Ok(match self.scrape(id).await {
                Ok(m) if m.value(names::WORKER_CONCURRENCY, &[]) > 0.0 => Ok(()),
                Ok(_) => Err("no handler slots yet".into()),
                Err(e) => Err(format!("{e:#}")),
            })
        })
        .await
    }

    /// `faultline_stale_writes_rejected_total` summed over the live workers (the counters of
    /// killed workers die with them).
    pub(crate) async fn stale_rejected(&mut self) -> anyhow::Result<u64> {
        let mut total = 0.0;
        for id in 0..self.procs.len() {
            if self.procs[id].metrics.is_some() && self.try_exit(id)?.is_none() {
                total += self
                    .scrape(id)
                    .await?
                    .value(names::STALE_WRITES_REJECTED_TOTAL, &[]);
            }
        }
        Ok(counter(total))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for proc in &mut self.procs {
            if proc.exit.is_none() && matches!(proc.child.try_wait(), Ok(None)) {
                // A stopped process dies of SIGKILL too; SIGCONT first all the same.
                let _ = kill(proc.pid, Signal::SIGCONT);
                let _ = kill(proc.pid, Signal::SIGKILL);
            }
        }
    }
}

/// A counter's value as a whole number.
pub(crate) fn counter(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        value.round() as u64
    } else {
        0
    }
}

/// `exit 0`, `SIGABRT`, ...: how a process ended.
pub(crate) fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => Signal::try_from(signal)
            .map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_owned()),
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_by_code_or_signal() {
        assert_eq!(describe_exit(ExitStatus::from_raw(0)), "exit 0");
        assert_eq!(describe_exit(ExitStatus::from_raw(1 << 8)), "exit 1");
        assert_eq!(describe_exit(ExitStatus::from_raw(6)), "SIGABRT");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "SIGKILL");
        assert_eq!(counter(3.0), 3);
        assert_eq!(counter(f64::NAN), 0);
    }
}
