//! The production loop of [`Worker`]: one task that claims when woken or when the poll interval
//! passes, collects finished jobs, writes outcomes and heartbeats, backing off from a failing
//! store instead of ever exiting on its errors. (The rescuer and the pruner are maintenance
//! services of the elected leader: see `maintenance.rs`.)
//!
//! The loop sleeps until the earliest of its deadlines (poll, heartbeat, lost-claim release) or
//! until a job finishes, the completer answers or a wake-up arrives: no busy loop when idle, and
//! no claim while every slot is busy and the buffer full. Outcomes go to the completer, which
//! writes them while the loop claims; they pile up while a round is on its way, so the busier the
//! process, the larger its batches (no timer adds latency to batch them).

use tokio::time::{Duration, Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use faultline_ports::JobStore;

use crate::backoff::Backoff;
use crate::lost::RELEASE_EVERY;
use crate::worker::{ShutdownReport, Worker};

/// When the loop ends.
#[derive(Clone, Copy)]
enum Until<'a> {
    /// Production: until the token fires (claiming all along).
    Stopped(&'a CancellationToken),
    /// Shutdown: until no handler runs or the deadline passes (claiming nothing).
    Drained(Instant),
}

/// Far enough to mean "no deadline" without overflowing `Instant` arithmetic.
const FAR: Duration = Duration::from_secs(86_400 * 365);

impl<S: JobStore> Worker<S> {
    /// Runs until `shutdown` fires, then shuts down gracefully with the configured
    /// `shutdown_grace` (see [`Worker::shutdown`]) and returns. Never returns early on a store
    /// error: failed calls are logged, counted and retried with backoff. The worker claims nothing
    /// once this returns.
    pub async fn run(&mut self, shutdown: CancellationToken) -> ShutdownReport {
        tracing::info!(
            worker_id = %self.config.worker_id,
            queues = ?self.config.queues,
            concurrency = self.config.concurrency,
            kinds = ?self.registry.kinds(),
            "worker started"
        );
        // A completer of the worker's own writes while the worker runs (a shared one is run by
        // whoever shares it).
        let writer = self.own_completer.then(|| {
            let stop = CancellationToken::new();
            let task = tokio::spawn(self.completer.clone().run(stop.clone()));
            (task, stop)
        });
        if !self.draining {
            self.event_loop(Until::Stopped(&shutdown)).await;
        }
        let grace = self.config.shutdown_grace;
        let report = self.shutdown(grace).await;
        if let Some((task, stop)) = writer {
            stop.cancel();
            let _ = task.await;
        }
        report
    }

    /// The shutdown's wait: heartbeats and writes go on, nothing is claimed.
    pub(crate) async fn drain(&mut self, deadline: Instant) {
        self.event_loop(Until::Drained(deadline)).await;
    }

    async fn event_loop(&mut self, until: Until<'_>) {
        let claiming = matches!(until, Until::Stopped(_));
        let config = self.config.clone();
        let heartbeat_every = config.heartbeat_every();
        let backoff = || Backoff::new(config.db_backoff_min, config.db_backoff_max);
        let (mut claim_backoff, mut heartbeat_backoff) = (backoff(), backoff());
        let mailbox = self.mailbox.clone();

        let start = Instant::now();
        let mut next_heartbeat = start + heartbeat_every;
        let mut next_poll = start;
        let mut next_release = start;
        // Claim at once on start, and again whenever the last claim filled every free slot (more
        // jobs are probably waiting) or a wake-up arrived.
        let mut claim_wanted = claiming;
        let mut wake = if claiming { self.wake.take() } else { None };

        loop {
            match until {
                Until::Stopped(token) if token.is_cancelled() => break,
                Until::Drained(deadline) if !self.has_tasks() || Instant::now() >= deadline => {
                    break;
                }
                _ => {}
            }
            self.collect_finished();
            self.start_buffered();
            self.take_answers();

            let now = Instant::now();
            if now >= next_heartbeat {
                if self.live_leases() == 0 {
                    next_heartbeat = now + heartbeat_every;
                } else {
                    match self.heartbeat_once().await {
                        Ok(_) => {
                            heartbeat_backoff.succeeded();
                            next_heartbeat = Instant::now() + heartbeat_every;
                        }
                        Err(_) => {
                            let pause = heartbeat_backoff.failed(now).min(heartbeat_every);
                            next_heartbeat = now + pause;
                        }
                    }
                }
            }

            // Give back what claims whose answer was lost may have leased, before claiming more.
            if !self.lost_claims.is_empty() && Instant::now() >= next_release {
                self.release_lost_claims().await;
                next_release = Instant::now() + RELEASE_EVERY;
            }

            // Claim up to the free slots plus the buffer's room (the completer writes meanwhile).
            let now = Instant::now();
            let claim = claiming
                && self.claim_room() > 0
                && (claim_wanted || now >= next_poll)
                && claim_backoff.is_ready(now);
            if claim {
                let idle = self.live_leases() == 0;
                // New claims stop when the heartbeat is due.
                match self.claim_while_full(next_heartbeat).await {
                    Some(Ok((claimed, full))) => {
                        claim_backoff.succeeded();
                        claim_wanted = full;
                        if idle && claimed > 0 {
                            next_heartbeat = Instant::now() + heartbeat_every;
                        }
                    }
                    Some(Err(_)) => {
                        claim_backoff.failed(now);
                        claim_wanted = true;
                    }
                    None => {}
                }
                next_poll = Instant::now() + config.poll_interval;
            }

            // Sleep until the earliest deadline, a finished job, a wake-up or the stop signal.
            let now = Instant::now();
            let mut wake_at = now + FAR;
            if claiming && self.claim_room() > 0 {
                let at = if claim_wanted {
                    claim_backoff.ready_at().unwrap_or(now)
                } else {
                    next_poll.max(claim_backoff.ready_at().unwrap_or(next_poll))
                };
                wake_at = wake_at.min(at);
            }
            if self.live_leases() > 0 {
                wake_at = wake_at.min(next_heartbeat);
            }
            if !self.lost_claims.is_empty() {
                wake_at = wake_at.min(next_release);
            }
            if let Until::Drained(deadline) = until {
                wake_at = wake_at.min(deadline);
            }
            self.sync_gauges();

            let listen = claiming && !claim_wanted && self.claim_room() > 0;
            let stopped = async {
                match until {
                    Until::Stopped(token) => token.cancelled().await,
                    Until::Drained(_) => std::future::pending().await,
                }
            };
            let woken = async {
                match wake.as_mut() {
                    Some(rx) if listen => rx.changed().await.is_ok(),
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = stopped => {}
                finished = self.next_finished(), if self.has_tasks() => {
                    debug_assert!(finished);
                }
                () = mailbox.posted() => {}
                open = woken => {
                    if open {
                        claim_wanted = true;
                    } else {
                        tracing::warn!(
                            worker_id = %self.config.worker_id,
                            "wake-up channel closed: relying on the poll interval"
                        );
                        wake = None;
                    }
                }
                () = sleep_until(wake_at) => {}
            }
        }
        if claiming {
            self.wake = wake;
        }
        self.sync_gauges();
    }
}
