//! `cargo xtask drill [--short] [NAME ...]`: failure drills. Each drill runs real `faultline`
//! processes against a real PostgreSQL (a database of its own), injects a real fault (SIGKILL,
//! SIGSTOP, a poison pill, a database outage, a SIGTERM, a burst of duplicate submissions, the
//! maintenance leader SIGKILLed, a queue paused, wall clocks 90 s off), waits for the system to
//! settle, and checks invariants straight from the database, the effects ledger and the workers'
//! metrics. The summary goes to stdout and `target/drills/summary.json`; the exit status is
//! non-zero when any drill fails.
//!
//! Adding a drill: a module with a `pub(crate) const DRILL: Drill` and one line in [`DRILLS`].

mod checks;
mod db;
mod fleet;
mod ledger;
mod probe;
mod report;

mod clock_skew;
mod db_outage;
mod duplicates;
mod exactly_once;
mod graceful_shutdown;
mod leader_failover;
mod lease_expiry;
mod pause;
mod poison_pill;
mod retries;
mod worker_crash;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub(crate) use report::Report;
use report::Row;

/// Every drill, in the order they run.
const DRILLS: &[Drill] = &[
    worker_crash::DRILL,
    retries::DRILL,
    lease_expiry::DRILL,
    poison_pill::DRILL,
    db_outage::DRILL,
    duplicates::DRILL,
    graceful_shutdown::DRILL,
    exactly_once::DRILL,
    leader_failover::DRILL,
    pause::DRILL,
    clock_skew::DRILL,
];

/// Scheduling slack allowed on top of every time bound derived from the configuration: process
/// start, connection set-up and the polls of a loaded 2-core machine.
pub(crate) const SLACK: Duration = Duration::from_secs(3);

/// A drill's future. Not `Send`: drills run on a `LocalSet` (their polling closures borrow
/// locals across awaits, which the compiler cannot prove `Send` for every lifetime).
pub(crate) type DrillFuture = Pin<Box<dyn Future<Output = anyhow::Result<Report>>>>;

/// One drill.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drill {
    /// Its name on the command line.
    pub(crate) name: &'static str,
    /// What it proves, in one sentence.
    pub(crate) proves: &'static str,
    /// Runs it.
    pub(crate) run: fn(Ctx) -> DrillFuture,
}

/// What a drill gets to run with.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// The drill's name.
    pub(crate) name: &'static str,
    /// CI mode: fewer jobs and rounds.
    pub(crate) short: bool,
    /// The `faultline` binary.
    pub(crate) faultline: PathBuf,
    /// The shared PostgreSQL server (each drill creates its own database there).
    pub(crate) server: String,
    /// Where the drill's process logs go.
    pub(crate) log_dir: PathBuf,
    /// When the drill started.
    pub(crate) started: Instant,
}

impl Ctx {
    /// Prints a progress line.
    pub(crate) fn progress(&self, message: impl std::fmt::Display) {
        eprintln!(
            "drill {} [{:>5.1}s] {message}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }

    /// `full` normally, `short` in CI mode.
    pub(crate) fn pick<T>(&self, short: T, full: T) -> T {
        if self.short { short } else { full }
    }

    /// A fresh database of the drill's own on the shared server.
    pub(crate) async fn database(&self) -> anyhow::Result<db::DrillDb> {
        db::DrillDb::create(&self.server, self.name).await
    }

    /// A fleet of processes on `database_url`.
    pub(crate) fn fleet(&self, database_url: &str) -> anyhow::Result<fleet::Fleet> {
        fleet::Fleet::new(self.faultline.clone(), database_url, self.log_dir.clone())
    }
}

/// Lists the drills.
pub(crate) fn list() {
    for drill in DRILLS {
        println!("{:<18} {}", drill.name, drill.proves);
    }
}

/// Runs the named drills (all when none is named); returns failure when any fails.
pub(crate) fn run(names: &[String], short: bool) -> anyhow::Result<ExitCode> {
    let selected = select(names)?;
    let root = workspace_root()?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let out_dir = target.join("drills");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    eprintln!("xtask drill: building the faultline binary");
    let faultline = cargo_build(&["-p", "faultline", "--bin", "faultline"], "faultline")?;
    let server = crate::server::Server::resolve()?;
    let url = server.url();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mode = if short { "short" } else { "full" };
    let local = tokio::task::LocalSet::new();
    let rows = runtime.block_on(local.run_until(async {
        match db::sweep_leftovers(&url).await {
            Ok(0) => {}
            Ok(n) => eprintln!("xtask drill: dropped {n} drill database(s) of killed runs"),
            Err(error) => eprintln!("xtask drill: could not sweep old drill databases: {error:#}"),
        }
        let mut rows = Vec::new();
        for drill in &selected {
            let ctx = Ctx {
                name: drill.name,
                short,
                faultline: faultline.clone(),
                server: url.clone(),
                log_dir: out_dir.join(drill.name),
                started: Instant::now(),
            };
            ctx.progress(format!("starting ({mode}): {}", drill.proves));
            // Its own task: a panic ends this drill only, and its processes die with its fleet.
            let outcome = tokio::select! {
                joined = tokio::task::spawn_local((drill.run)(ctx.clone())) => match joined {
                    Ok(Ok(report)) => Ok(report),
                    Ok(Err(error)) => Err(format!("{error:#}")),
                    Err(panic) => Err(format!("the drill panicked: {panic}")),
                },
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("xtask drill: interrupted");
                    return None;
                }
            };
            let row = Row {
                name: drill.name.to_owned(),
                proves: drill.proves.to_owned(),
                outcome,
                took: ctx.started.elapsed(),
            };
            let verdict = if row.passed() { "PASS" } else { "FAIL" };
            ctx.progress(format!("{verdict} (logs in {})", ctx.log_dir.display()));
            rows.push(row);
        }
        Some(rows)
    }));
    // Processes, databases and private clusters are gone once the runtime is.
    drop(local);
    drop(runtime);
    drop(server);
    let Some(rows) = rows else {
        return Ok(ExitCode::from(130));
    };

    print!("{}", report::render_table(&rows));
    let summary = out_dir.join("summary.json");
    let json = serde_json::to_string_pretty(&report::summary_json(&rows, mode))?;
    std::fs::write(&summary, json + "\n")
        .with_context(|| format!("write {}", summary.display()))?;
    eprintln!("xtask drill: summary in {}", summary.display());
    Ok(if rows.iter().all(Row::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The drills named (all when none), in the registry's order; an unknown name is an error.
fn select(names: &[String]) -> anyhow::Result<Vec<Drill>> {
    for name in names {
        if !DRILLS.iter().any(|d| d.name == name) {
            let known: Vec<&str> = DRILLS.iter().map(|d| d.name).collect();
            bail!(
                "no drill named {name:?}; the drills are: {}",
                known.join(", ")
            );
        }
    }
    Ok(DRILLS
        .iter()
        .filter(|d| names.is_empty() || names.iter().any(|n| n == d.name))
        .copied()
        .collect())
}

/// Runs `cargo build ARGS` (debug profile) in the workspace and returns the path of the
/// executable target `name` as cargo reports it (e.g. `-p faultline --example X`, `X`).
pub(crate) fn cargo_build(args: &[&str], name: &str) -> anyhow::Result<PathBuf> {
    let root = workspace_root()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .arg("build")
        .args(args)
        .args(["--message-format", "json-render-diagnostics"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run cargo build {}", args.join(" ")))?;
    if !output.status.success() {
        bail!("cargo build {} failed ({})", args.join(" "), output.status);
    }
    executable_in(&String::from_utf8_lossy(&output.stdout), name).with_context(|| {
        format!(
            "cargo build {} reported no {name} executable",
            args.join(" ")
        )
    })
}

/// The workspace's root directory (xtask's parent).
fn workspace_root() -> anyhow::Result<&'static Path> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")
}

/// The executable of target `name` in cargo's JSON messages.
fn executable_in(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drills_are_selected_by_name_in_registry_order() {
        let all: Vec<&str> = select(&[]).unwrap().iter().map(|d| d.name).collect();
        assert_eq!(all.len(), DRILLS.len());
        let some = select(&["retries".into(), "worker-crash".into()]).unwrap();
        let some: Vec<&str> = some.iter().map(|d| d.name).collect();
        assert_eq!(some, ["worker-crash", "retries"]);
        let error = select(&["nope".into()]).unwrap_err().to_string();
        assert!(
            error.contains("nope") && error.contains("db-outage"),
            "{error}"
        );
        let mut names: Vec<&str> = DRILLS.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DRILLS.len(), "drill names are unique");
    }

    #[test]
    fn the_executable_comes_from_cargos_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"faultline_ports"},"executable":null}
{"reason":"compiler-artifact","target":{"name":"faultline"},"executable":"/t/debug/faultline"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_in(messages, "faultline"),
            Some(PathBuf::from("/t/debug/faultline"))
        );
        assert_eq!(executable_in(messages, "library"), None);
        assert_eq!(executable_in("not json\n", "faultline"), None);
    }
}
