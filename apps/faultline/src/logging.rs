//! Log output: `tracing` events to stderr as text or JSON lines (`--log-format`), filtered by
//! `--log` (a level, optionally per target: "info,sqlx=warn"). Stdout stays free for output that
//! scripts read (what `migrate` applied, the URLs `dev` prints).

use std::io::IsTerminal;

use anyhow::Context;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::options::{LogArgs, LogFormat};

/// Installs the global subscriber.
pub(crate) fn init(args: &LogArgs) -> anyhow::Result<()> {
    let filter: Targets = args
        .log
        .parse()
        .with_context(|| format!("--log / FAULTLINE_LOG: bad filter {:?}", args.log))?;
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .try_init(),
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(true).with_current_span(false))
            .try_init(),
    }
    .context("install the logger")
}
