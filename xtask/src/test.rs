//! `cargo xtask test`: the project's test command (see the README).

use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::Context;

use crate::server::Server;

/// Resolves a server, sweeps leftovers, runs nextest (or cargo test) with `DATABASE_URL`
/// exported, and returns the runner's exit code. The server is torn down before returning.
pub(crate) fn run(extra: &[String]) -> anyhow::Result<ExitCode> {
    let server = Server::resolve()?;
    let url = server.url();

    let swept = crate::runtime()?
        .block_on(crate::sweep::sweep(&url))
        .context("sweep leftover test databases")?;
    if swept.databases + swept.templates > 0 {
        eprintln!(
            "xtask: dropped {} leftover test database(s) and {} stale template(s)",
            swept.databases, swept.templates
        );
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    if has_nextest(&cargo) {
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../.cargo/nextest.toml");
        command.args(["nextest", "run", "--config-file", config]);
    } else {
        eprintln!(
            "xtask: cargo-nextest is not installed (`cargo install cargo-nextest`); \
             falling back to `cargo test`"
        );
        command.arg("test");
    }
    // `-p`/`--package` narrows the run; otherwise run the whole workspace.
    if !extra
        .iter()
        .any(|a| a.starts_with("-p") || a.starts_with("--package"))
    {
        command.arg("--workspace");
    }
    command.args(extra).env("DATABASE_URL", &url);

    let started = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("run {command:?}"))?;
    eprintln!(
        "xtask: tests finished in {:.1}s ({status})",
        started.elapsed().as_secs_f64()
    );
    drop(server);
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

fn has_nextest(cargo: &str) -> bool {
    Command::new(cargo)
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|output| output.status.success())
}
