//! Wake-ups for workers: a task that `LISTEN`s on [`NOTIFY_CHANNEL`] and bumps a
//! `tokio::sync::watch` counter whenever jobs may have become ready.
//!
//! The counter is bumped on every notification (optionally only for some queues) and after every
//! (re)connect, because notifications sent while no connection listened are lost: a bump after a
//! reconnect tells the worker to look for work it may have missed. The task never gives up: when
//! the database is unreachable it retries with exponential backoff, and a liveness probe on the
//! idle connection catches half-open connections that would otherwise wait forever. It ends only
//! when its shutdown token fires, which drops the sender (`changed()` then returns an error).
//!
//! The worker still polls at a fallback interval (scheduled jobs and retries become due without
//! any notification), so a wake-up is an optimisation of latency, never a condition of progress.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::NOTIFY_CHANNEL;

/// The `application_name` of the listener's connection, to find it in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "faultline-listen";

/// How the listener reconnects and checks its connection. `Default` suits production.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenOptions {
    /// Only notifications for these queues bump the counter; empty means every queue.
    pub queues: Vec<String>,
    /// First wait after a failed connect (or a connection lost within `backoff_max` of being
    /// made); doubled after each further failure.
    pub backoff_min: Duration,
    /// Longest wait between connect attempts.
    pub backoff_max: Duration,
    /// How long one connect attempt may take.
    pub connect_timeout: Duration,
    /// When the connection was quiet this long, a `select 1` checks that it is still alive.
    pub probe_interval: Duration,
    /// How long that probe may take before the connection is given up and replaced.
    pub probe_timeout: Duration,
}

impl Default for ListenOptions {
    fn default() -> Self {
        Self {
            queues: Vec::new(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            probe_interval: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(10),
        }
    }
}

impl ListenOptions {
    /// Bumps only for notifications of these queues.
    pub fn queues(mut self, queues: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the reconnect backoff range.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// Sets how long one connect attempt may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the liveness probe's period and timeout.
    pub fn probe(mut self, interval: Duration, timeout: Duration) -> Self {
        self.probe_interval = interval;
        self.probe_timeout = timeout;
        self
    }
}

/// Spawns the listener task on the current tokio runtime and returns its wake-up counter (it
/// starts at 0; the first bump comes once the first connection listens).
///
/// The task holds one connection of its own (made from `connect`, renamed
/// [`APPLICATION_NAME`]), outside any pool the caller has. It stops when `shutdown` fires.
///
/// # Panics
/// When called outside a tokio runtime.
pub fn spawn_listener(
    connect: PgConnectOptions,
    options: ListenOptions,
    shutdown: CancellationToken,
) -> watch::Receiver<u64> {
    let (sender, receiver) = watch::channel(0_u64);
    let connect = connect.application_name(APPLICATION_NAME);
    tokio::spawn(run(connect, options, sender, shutdown));
    receiver
}

fn bump(sender: &watch::Sender<u64>) {
    sender.send_modify(|n| *n = n.wrapping_add(1));
}

async fn run(
    connect: PgConnectOptions,
    options: ListenOptions,
    sender: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    let mut backoff = options.backoff_min;
    let mut failures: u32 = 0;
    loop {
        let attempt = tokio::time::timeout(
            options.connect_timeout,
            connect_and_listen(&connect, options.connect_timeout),
        );
        let connected = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            connected = attempt => match connected {
                Ok(result) => result.map_err(|error| error.to_string()),
                Err(_elapsed) => Err(format!("timed out after {:?}", options.connect_timeout)),
            },
        };
        let mut listener = match connected {
            Ok(listener) => listener,
            Err(error) => {
                failures += 1;
                tracing::warn!(
                    %error,
                    failures,
                    retry_in_ms = backoff.as_millis(),
                    "listen: cannot connect; retrying"
                );
                if back_off(&mut backoff, options.backoff_max, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        if failures > 0 {
            tracing::info!(failures, "listen: connected again");
        } else {
            tracing::debug!("listen: connected");
        }
        failures = 0;
        // Whatever was notified while nobody listened is lost: look for work now.
        bump(&sender);

        let connected_at = Instant::now();
        if listen_until_lost(&mut listener, &options, &sender, &shutdown).await {
            return;
        }
        // Dropping the listener closes its connection (and its one-connection pool).
        drop(listener);
        if connected_at.elapsed() >= options.backoff_max {
            // A connection that served a while: reconnect at once.
            backoff = options.backoff_min;
        } else {
            // Lost soon after connecting (a server that keeps dropping connections): back off,
            // so that reconnects and their bumps do not spin.
            if back_off(&mut backoff, options.backoff_max, &shutdown).await {
                return;
            }
        }
    }
}

/// Connects and subscribes. The listener's own reconnection is off: this task reconnects, so
/// that every reconnect is seen (and bumps the counter).
async fn connect_and_listen(
    connect: &PgConnectOptions,
    timeout: Duration,
) -> Result<PgListener, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(timeout)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(connect.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    listener.listen(NOTIFY_CHANNEL).await?;
    Ok(listener)
}

/// Receives notifications until the connection is lost (returns `false`) or `shutdown` fires
/// (returns `true`).
async fn listen_until_lost(
    listener: &mut PgListener,
    options: &ListenOptions,
    sender: &watch::Sender<u64>,
    shutdown: &CancellationToken,
) -> bool {
    let mut probe_at = Instant::now() + options.probe_interval;
    loop {
        // `try_recv` is cancel-safe: a message is only consumed once it was read completely.
        let received = tokio::select! {
            biased;
            () = shutdown.cancelled() => return true,
            received = listener.try_recv() => received,
            () = tokio::time::sleep_until(probe_at) => {
                let probe = sqlx::query("select 1").execute(&mut *listener);
                match tokio::time::timeout(options.probe_timeout, probe).await {
                    Ok(Ok(_)) => {
                        probe_at = Instant::now() + options.probe_interval;
                        continue;
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "listen: liveness probe failed; reconnecting");
                    }
                    Err(_elapsed) => {
                        tracing::warn!("listen: liveness probe timed out; reconnecting");
                    }
                }
                return false;
            }
        };
        match received {
            Ok(Some(notification)) => {
                probe_at = Instant::now() + options.probe_interval;
                if serves(&options.queues, notification.payload()) {
                    bump(sender);
                }
            }
            Ok(None) => {
                tracing::warn!("listen: connection lost; reconnecting");
                return false;
            }
            Err(error) => {
                tracing::warn!(%error, "listen: connection failed; reconnecting");
                return false;
            }
        }
    }
}

/// Whether a notification for `queue` concerns a listener for `queues` (empty: every queue).
fn serves(queues: &[String], queue: &str) -> bool {
    queues.is_empty() || queues.iter().any(|q| q == queue)
}

/// Waits `*delay` unless `shutdown` fires first (returns `true` then), and doubles it up to `max`
/// for the next time.
async fn back_off(delay: &mut Duration, max: Duration, shutdown: &CancellationToken) -> bool {
    let stopped = tokio::select! {
        biased;
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(*delay) => false,
    };
    *delay = delay.saturating_mul(2).min(max);
    stopped
}

#[cfg(test)]
mod tests {
    use super::serves;

    #[test]
    fn an_empty_queue_list_serves_every_queue() {
        assert!(serves(&[], "default"));
        assert!(serves(&[], ""));
    }

    #[test]
    fn a_queue_list_serves_exactly_its_queues() {
        let queues = ["a".to_owned(), "b".to_owned()];
        assert!(serves(&queues, "a"));
        assert!(serves(&queues, "b"));
        assert!(!serves(&queues, "c"));
        assert!(!serves(&queues, "A"));
        assert!(!serves(&queues, ""));
    }
}
