//! `cargo xtask bench`: Faultline's benchmark (issue 7), the workloads the peer queues were
//! measured with (`shared/bench-peers`): W1 insert, W2 drain, W3 pickup latency, W4 drain with a
//! finished history, W5 the HTTP API. Every repetition runs on a fresh database; each timed
//! window is preceded by `CHECKPOINT` and a quiet gate and accounted for CPU; results are the
//! median, min and max of the repetitions, as a table on stdout and JSON lines in
//! `target/bench/`. See docs/performance.md.
//!
//! Measuring a debug build would be meaningless: run from a debug `xtask` (as `cargo xtask`
//! does), the command builds the release `xtask` and `faultline` and runs the release `xtask`.

mod db;
mod machine;
mod procs;
mod report;
mod stats;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use self::report::Line;
use self::workloads::{Bench, Http, Sample};

/// A workload of the issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(crate) enum Workload {
    /// Insert: batch enqueue (`--jobs` in batches of `--batch`) and single enqueues.
    #[value(name = "W1", alias = "w1", alias = "insert")]
    W1,
    /// Drain `--jobs` queued jobs with one worker process of `--concurrency`.
    #[value(name = "W2", alias = "w2", alias = "drain")]
    W2,
    /// Pickup latency of an idle worker.
    #[value(name = "W3", alias = "w3", alias = "latency")]
    W3,
    /// W2 with `--history` finished jobs in the table.
    #[value(name = "W4", alias = "w4", alias = "history")]
    W4,
    /// The HTTP API: single and batch enqueue, a drain through the worker protocol.
    #[value(name = "W5", alias = "w5", alias = "http")]
    W5,
}

/// `cargo xtask bench` options. The sizes also read the peers' `BENCH_*` variables.
#[derive(Debug, Clone, Args)]
pub(crate) struct Settings {
    /// Workloads to run (default: all): W1 insert, W2 drain, W3 latency, W4 history, W5 http.
    #[arg(value_enum, value_name = "WORKLOAD")]
    pub(crate) workloads: Vec<Workload>,
    /// Jobs of the W1 batch insert and of the drains (W2, W4, W5).
    #[arg(long, env = "BENCH_JOBS", default_value_t = 20_000)]
    pub(crate) jobs: usize,
    /// Batch size of the W1 batch insert and of every preload.
    #[arg(long, env = "BENCH_BATCH", default_value_t = 1_000)]
    pub(crate) batch: usize,
    /// Jobs of the single inserts (W1, W5).
    #[arg(long, env = "BENCH_SINGLE_JOBS", default_value_t = 2_000)]
    pub(crate) single_jobs: usize,
    /// Worker concurrency (W2, W3, W4) and jobs in flight of the W5 drain.
    #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = 32)]
    pub(crate) concurrency: usize,
    /// Jobs of W3.
    #[arg(long, env = "BENCH_LAT_JOBS", default_value_t = 500)]
    pub(crate) lat_jobs: usize,
    /// W3 enqueue rate, jobs per second.
    #[arg(long, env = "BENCH_LAT_RATE", default_value_t = 100)]
    pub(crate) lat_rate: usize,
    /// W3: how long the worker idles before the first enqueue, in ms.
    #[arg(long, env = "BENCH_LAT_IDLE_MS", default_value_t = 1_000)]
    pub(crate) lat_idle_ms: u64,
    /// W4: finished (succeeded) jobs in the table before the drain.
    #[arg(long, env = "BENCH_HISTORY", default_value_t = 1_000_000)]
    pub(crate) history: usize,
    /// W5: concurrent clients of the concurrent single-insert measurement.
    #[arg(long, env = "BENCH_HTTP_CLIENTS", default_value_t = 16)]
    pub(crate) http_clients: usize,
    /// Repetitions of each measurement.
    #[arg(long, env = "BENCH_REPS", default_value_t = 3)]
    pub(crate) reps: usize,
    /// Give-up time of one measurement, in seconds.
    #[arg(long, env = "BENCH_TIMEOUT_S", default_value_t = 300)]
    pub(crate) timeout_s: u64,
    /// Quiet gate: before each window, wait until the machine uses fewer cores than this...
    #[arg(long, env = "BENCH_QUIET_CORES", default_value_t = 0.3)]
    pub(crate) quiet_cores: f64,
    /// ... for at most this many seconds (then measure anyway, flagged).
    #[arg(long, env = "BENCH_QUIET_MAX_S", default_value_t = 300)]
    pub(crate) quiet_max_s: u64,
    /// A repetition during which other processes used more cores than this is run again...
    #[arg(long, env = "BENCH_NOISE_CORES", default_value_t = 0.25)]
    pub(crate) noise_cores: f64,
    /// ... at most this many times (then kept, flagged ⚠).
    #[arg(long, env = "BENCH_NOISE_RETRIES", default_value_t = 2)]
    pub(crate) noise_retries: usize,
    /// The PostgreSQL server; a database `fbench_*` is created (and dropped) on it per
    /// measurement.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub(crate) database_url: String,
    /// The `faultline` binary to measure (default: the release build next to this program).
    #[arg(long, value_name = "PATH")]
    pub(crate) faultline_bin: Option<PathBuf>,
    /// An extra argument for `faultline worker` (repeatable), e.g.
    /// `--worker-arg=--completion-batch-size=500`.
    #[arg(long = "worker-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) worker_args: Vec<String>,
    /// Peer results (JSON lines, e.g. shared/bench-peers' results-latest.jsonl) to print a
    /// comparison table with.
    #[arg(long, value_name = "FILE")]
    pub(crate) compare: Option<PathBuf>,
}

impl Settings {
    fn to_json(&self) -> Value {
        json!({
            "jobs": self.jobs, "batch": self.batch, "single_jobs": self.single_jobs,
            "concurrency": self.concurrency, "lat_jobs": self.lat_jobs, "lat_rate": self.lat_rate,
            "lat_idle_ms": self.lat_idle_ms, "history": self.history,
            "http_clients": self.http_clients, "reps": self.reps,
            "quiet_cores": self.quiet_cores, "quiet_max_s": self.quiet_max_s,
            "noise_cores": self.noise_cores, "noise_retries": self.noise_retries,
            "worker_args": self.worker_args,
        })
    }

    fn selected(&self) -> Vec<Workload> {
        let mut selected = if self.workloads.is_empty() {
            Workload::value_variants().to_vec()
        } else {
            self.workloads.clone()
        };
        selected.sort();
        selected.dedup();
        selected
    }
}

/// One kind of timed window.
#[derive(Debug, Clone, Copy)]
enum Measurement {
    InsertBatch,
    InsertSingle,
    Drain,
    Latency,
    HistoryDrain,
    Http(Http),
}

impl Measurement {
    fn of(workload: Workload, s: &Settings) -> Vec<Measurement> {
        match workload {
            Workload::W1 => vec![Self::InsertBatch, Self::InsertSingle],
            Workload::W2 => vec![Self::Drain],
            Workload::W3 => vec![Self::Latency],
            Workload::W4 => vec![Self::HistoryDrain],
            Workload::W5 => vec![
                Self::Http(Http::InsertBatch),
                Self::Http(Http::InsertSingle { clients: 1 }),
                Self::Http(Http::InsertSingle {
                    clients: s.http_clients,
                }),
                Self::Http(Http::Drain),
            ],
        }
    }

    fn metrics(self) -> &'static [&'static str] {
        match self {
            Self::InsertBatch => &["insert_batch"],
            Self::InsertSingle => &["insert_single"],
            Self::Drain => &["drain"],
            Self::Latency => &["latency_p50", "latency_p95", "latency_p99", "latency_max"],
            Self::HistoryDrain => &["history_drain"],
            Self::Http(Http::InsertBatch) => &["http_insert_batch"],
            Self::Http(Http::InsertSingle { clients: 1 }) => &["http_insert_single"],
            Self::Http(Http::InsertSingle { .. }) => &["http_insert_single_concurrent"],
            Self::Http(Http::Drain) => &["http_drain"],
        }
    }

    /// (jobs, concurrency) as the peers report them (1 for a sequential producer).
    fn size(self, s: &Settings) -> (usize, usize) {
        match self {
            Self::InsertBatch | Self::Http(Http::InsertBatch) => (s.jobs, 1),
            Self::InsertSingle => (s.single_jobs, 1),
            Self::Http(Http::InsertSingle { clients }) => (s.single_jobs, clients),
            Self::Drain | Self::HistoryDrain | Self::Http(Http::Drain) => (s.jobs, s.concurrency),
            Self::Latency => (s.lat_jobs, s.concurrency),
        }
    }

    async fn run(self, bench: &Bench<'_>, rep: usize) -> anyhow::Result<Sample> {
        match self {
            Self::InsertBatch => workloads::insert_batch(bench, rep).await,
            Self::InsertSingle => workloads::insert_single(bench, rep).await,
            Self::Drain => workloads::drain(bench, rep, 0).await,
            Self::Latency => workloads::latency(bench, rep).await,
            Self::HistoryDrain => workloads::drain(bench, rep, bench.settings.history).await,
            Self::Http(which) => workloads::http(bench, rep, which).await,
        }
    }
}

/// The workspace root.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Runs `cargo xtask bench`.
pub(crate) fn run(settings: Settings) -> anyhow::Result<ExitCode> {
    if cfg!(debug_assertions) {
        return run_release();
    }
    let bin = match &settings.faultline_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the program's directory")?
            .join("faultline"),
    };
    if !bin.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p faultline` or pass \
             --faultline-bin",
            bin.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(&settings, bin))?;
    Ok(ExitCode::SUCCESS)
}

/// From a debug build: builds the release `xtask` and `faultline`, then runs the release `xtask`
/// with the same arguments.
fn run_release() -> anyhow::Result<ExitCode> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!("bench: building the release faultline and xtask (cargo build --release)");
    let status = Command::new(&cargo)
        .args(["build", "--release", "-p", "faultline", "-p", "xtask"])
        .current_dir(workspace())
        .status()
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                workspace().join(dir)
            }
        })
        .unwrap_or_else(|| workspace().join("target"));
    let xtask = target.join("release").join("xtask");
    let status = Command::new(&xtask)
        .args(std::env::args_os().skip(1))
        .status()
        .with_context(|| format!("run {}", xtask.display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// `git describe`-like identification of what is measured (read-only git).
fn version() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let rev = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    format!(
        "{} ({rev}{})",
        env!("CARGO_PKG_VERSION"),
        if dirty { "+changes" } else { "" }
    )
}

async fn bench(settings: &Settings, bin: PathBuf) -> anyhow::Result<()> {
    let bench = Bench {
        settings,
        bin: bin.clone(),
    };
    let swept = db::sweep(&settings.database_url).await?;
    if swept > 0 {
        eprintln!("bench: dropped {swept} benchmark database(s) left by an earlier run");
    }
    let version = version();
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    eprintln!(
        "bench: faultline {version} ({}), workloads {:?}, settings {}",
        bin.display(),
        settings.selected(),
        settings.to_json()
    );
    eprintln!(
        "bench: {} cores, load {:?}",
        std::thread::available_parallelism().map_or(0, usize::from),
        machine::load_average()
    );
    let settings_json = settings.to_json();
    let mut lines: Vec<Line> = Vec::new();
    for workload in settings.selected() {
        for measurement in Measurement::of(workload, settings) {
            let (jobs, concurrency) = measurement.size(settings);
            let mut samples = Vec::new();
            let mut discarded = 0;
            for rep in 1..=settings.reps {
                let (sample, dropped) =
                    measure(&bench, measurement, rep).await.with_context(|| {
                        format!("{workload:?} {:?} repetition {rep}", measurement.metrics())
                    })?;
                discarded += dropped;
                samples.push(sample);
            }
            for metric in measurement.metrics() {
                if let Some(line) = Line::aggregate(
                    metric,
                    jobs,
                    concurrency,
                    &samples,
                    discarded,
                    settings.noise_cores,
                ) {
                    lines.push(line);
                }
            }
        }
    }
    let ts = chrono::Utc::now().to_rfc3339();
    let json: Vec<Value> = lines
        .iter()
        .map(|line| line.to_json(&version, &settings.worker_args, &settings_json, &ts))
        .collect();
    let out = workspace().join("target").join("bench");
    std::fs::create_dir_all(&out)?;
    let text: String = json.iter().map(|j| format!("{j}\n")).collect();
    let file = out.join(format!("results-{stamp}.jsonl"));
    std::fs::write(&file, &text)?;
    std::fs::write(out.join("latest.jsonl"), &text)?;
    let mut table = report::table(&lines);
    if let Some(peers) = &settings.compare {
        let peers =
            std::fs::read_to_string(peers).with_context(|| format!("read {}", peers.display()))?;
        table.push('\n');
        table.push_str(&report::peer_table(&json, &peers));
    }
    std::fs::write(out.join(format!("table-{stamp}.md")), &table)?;
    println!("{table}");
    eprintln!(
        "bench: results in {} (and latest.jsonl); load now {:?}",
        file.display(),
        machine::load_average()
    );
    Ok(())
}

/// One repetition, run again (at most `noise_retries` times) while other processes used more
/// than `noise_cores` during its window. Returns the sample and how many were thrown away.
async fn measure(
    bench: &Bench<'_>,
    measurement: Measurement,
    rep: usize,
) -> anyhow::Result<(Sample, usize)> {
    let s = bench.settings;
    let mut attempt = 0;
    loop {
        let sample = measurement.run(bench, rep).await?;
        let values: Vec<String> = sample
            .values
            .iter()
            .map(|(m, v)| format!("{m} {} {}", report::fmt_number(*v), report::unit(m)))
            .collect();
        eprintln!(
            "bench: {} rep {rep}/{}: {}; cores bench {:.2} postgres {:.2} other {:.2}; load {:.2}; \
             quiet gate {:.1} s",
            measurement.metrics()[0],
            s.reps,
            values.join(", "),
            sample.cores.bench,
            sample.cores.postgres,
            sample.cores.other,
            sample.load[0],
            sample.quiet_wait_s,
        );
        if sample.cores.other <= s.noise_cores || attempt >= s.noise_retries {
            if sample.cores.other > s.noise_cores {
                eprintln!("bench: WARNING noisy repetition kept after {attempt} retries");
            }
            return Ok((sample, attempt));
        }
        attempt += 1;
        eprintln!(
            "bench:   other processes used {:.2} cores: discarding and repeating",
            sample.cores.other
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    #[test]
    fn workloads_parse_by_number_or_name_and_default_to_all() {
        let cli = Cli::try_parse_from(["bench", "w3", "W2", "drain", "--jobs", "500"]).unwrap();
        assert_eq!(cli.settings.selected(), vec![Workload::W2, Workload::W3]);
        assert_eq!(cli.settings.jobs, 500);
        let cli = Cli::try_parse_from(["bench"]).unwrap();
        assert_eq!(cli.settings.selected().len(), 5);
        assert_eq!(cli.settings.batch, 1_000);
        assert_eq!(cli.settings.concurrency, 32);
        assert!(Cli::try_parse_from(["bench", "W6"]).is_err());
        let cli =
            Cli::try_parse_from(["bench", "--worker-arg=--completion-batch-size=500"]).unwrap();
        assert_eq!(
            cli.settings.worker_args,
            vec!["--completion-batch-size=500"]
        );
    }

    #[test]
    fn every_measurement_names_its_metrics_and_size() {
        let cli = Cli::try_parse_from(["bench"]).unwrap();
        let s = &cli.settings;
        let all: Vec<&str> = s
            .selected()
            .into_iter()
            .flat_map(|w| Measurement::of(w, s))
            .flat_map(|m| m.metrics().iter().copied())
            .collect();
        assert_eq!(all.len(), 12, "{all:?}");
        assert_eq!(Measurement::InsertSingle.size(s), (2_000, 1));
        assert_eq!(Measurement::Drain.size(s), (20_000, 32));
        assert_eq!(
            Measurement::Http(Http::InsertSingle { clients: 16 }).metrics(),
            &["http_insert_single_concurrent"]
        );
    }
}
