//! The `faultline` processes a benchmark runs (`worker`, `api`): started with a clean
//! environment (only what the benchmark sets), their stderr lines forwarded to a channel (read by
//! a thread each, so the process never blocks on a full pipe), stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::mpsc;

/// A running `faultline` process.
#[derive(Debug)]
pub(crate) struct Faultline {
    child: Child,
    /// Its stderr (the log), line by line.
    pub(crate) lines: mpsc::UnboundedReceiver<String>,
    /// Every line read through [`Faultline::line_with`], for error messages.
    seen: Vec<String>,
}

impl Faultline {
    /// Starts `bin args` with `env` (every `FAULTLINE_*` and `DATABASE_URL` of the benchmark's
    /// own environment removed).
    pub(crate) fn start(bin: &Path, args: &[String], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut command = Command::new(bin);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("DATABASE_URL");
        for (name, _) in std::env::vars() {
            if name.starts_with("FAULTLINE_") {
                command.env_remove(name);
            }
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let (sender, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Faultline {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads log lines until one contains `text` (at most `timeout`).
    pub(crate) async fn line_with(
        &mut self,
        text: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return Ok(line);
                    }
                }
                Ok(None) => bail!(
                    "faultline exited before logging {text:?}:\n{}",
                    self.seen.join("\n")
                ),
                Err(_) => bail!(
                    "faultline did not log {text:?} within {timeout:?}:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends SIGTERM and waits (at most `timeout`, then SIGKILL) for the process to exit.
    pub(crate) async fn stop(mut self, timeout: Duration) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    eprintln!("bench: WARNING faultline exited with {status}");
                }
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("faultline did not stop within {timeout:?} after SIGTERM: killed");
            }
            // Drain the log meanwhile so the process never blocks writing it.
            while self.lines.try_recv().is_ok() {}
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Faultline {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: another process could take it in between,
/// which then fails the start loudly).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
