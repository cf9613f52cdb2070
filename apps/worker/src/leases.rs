//! Keeping leases and giving them back: the batched heartbeat (lost leases, cancel requests,
//! leases that ended while the store was unreachable) and the graceful shutdown.

use std::collections::HashMap;
use std::time::Duration;

use faultline_ports::{HeartbeatOutcome, JobStore, LeaseRef, StoreError, StoreResult};

use crate::claims::GIVE_BACK;
use crate::stats::Counter;
use crate::telemetry;
use crate::worker::{HeartbeatReport, ShutdownReport};
use crate::worker::{LeaseState, Worker, job_event};

impl<S: JobStore> Worker<S> {
    /// Extends every live lease with one store call. A lost lease fires its handler's token and
    /// its outcome is never written; a cancel request fires the token (the handler's outcome is
    /// still written; the store turns a failure into `cancelled`). When the store cannot be
    /// reached, leases whose end has passed by the worker's clock are treated as lost.
    pub async fn heartbeat_once(&mut self) -> StoreResult<HeartbeatReport> {
        let leases: Vec<LeaseRef> = self
            .held
            .iter()
            .filter(|(_, held)| held.state != LeaseState::Lost)
            .map(|(lease, _)| *lease)
            .collect();
        let mut report = HeartbeatReport::default();
        if leases.is_empty() {
            return Ok(report);
        }
        let extend_ms = self.config.lease_ms();
        let sent = tokio::time::Instant::now();
        let result = self
            .call(
                "heartbeat",
                self.store.job_heartbeat_many(&leases, extend_ms),
            )
            .await;
        let outcomes = match result {
            Ok(outcomes) if outcomes.len() == leases.len() => outcomes,
            Ok(outcomes) => {
                self.expire_unconfirmed_leases();
                return Err(StoreError::Backend(
                    format!(
                        "{} heartbeat outcomes for {} leases",
                        outcomes.len(),
                        leases.len()
                    )
                    .into(),
                ));
            }
            Err(err) => {
                self.expire_unconfirmed_leases();
                return Err(err);
            }
        };
        let mut writing = HashMap::new();
        for (lease, outcome) in leases.into_iter().zip(outcomes) {
            match outcome {
                HeartbeatOutcome::Extended {
                    lease_expires_at,
                    cancel_requested,
                } => {
                    report.extended += 1;
                    let Some(held) = self.held.get_mut(&lease) else {
                        continue;
                    };
                    held.lease_expires_at = lease_expires_at;
                    held.deadline = sent + self.config.lease;
                    if held.state == LeaseState::Writing {
                        writing.insert(lease, held.deadline);
                    }
                    if cancel_requested && !held.cancel_requested {
                        held.cancel_requested = true;
                        held.cancel.cancel();
                        report.cancel_requested += 1;
                        job_event!(info, lease, held, "cancel requested: handler token fired");
                        self.count(Counter::cancel_requests, 1);
                    }
                }
                HeartbeatOutcome::Lost => {
                    // An outcome in the completer's hands resolves itself: its write either
                    // committed before this heartbeat read the row (the job is finished, which is
                    // why the lease is gone) or is answered stale. Either answer ends the lease.
                    if self
                        .held
                        .get(&lease)
                        .is_some_and(|held| held.state == LeaseState::Writing)
                    {
                        continue;
                    }
                    report.lost += 1;
                    telemetry::stale("heartbeat");
                    self.lose(lease, "a heartbeat found the lease lost");
                }
            }
        }
        if !writing.is_empty() {
            self.completer.extend(&writing);
        }
        self.sync_gauges();
        Ok(report)
    }

    /// After a failed heartbeat: leases whose end has passed by the worker's monotonic reckoning
    /// may already be rescued and running elsewhere, so their handlers are stopped.
    pub(crate) fn expire_unconfirmed_leases(&mut self) {
        let now = tokio::time::Instant::now();
        let ended: Vec<LeaseRef> = self
            .held
            .iter()
            .filter(|(_, held)| held.state == LeaseState::Running && held.deadline <= now)
            .map(|(lease, _)| *lease)
            .collect();
        for lease in ended {
            self.lose(lease, "the lease ended while the store was unreachable");
        }
        self.sync_gauges();
    }

    /// Marks a lease lost: fires the handler's token and makes sure its outcome is never written.
    pub(crate) fn lose(&mut self, lease: LeaseRef, why: &str) {
        let Some(held) = self.held.get_mut(&lease) else {
            return;
        };
        if held.state == LeaseState::Lost {
            return;
        }
        held.cancel.cancel();
        job_event!(
            warn,
            lease,
            held,
            reason = why,
            "lease lost: handler cancelled, its outcome will not be written"
        );
        let was = std::mem::replace(&mut held.state, LeaseState::Lost);
        self.count(Counter::leases_lost, 1);
        match was {
            // Kept until the handler returns (its outcome is discarded then).
            LeaseState::Running | LeaseState::Lost => {}
            LeaseState::Buffered => {
                self.held.remove(&lease);
            }
            LeaseState::Writing => {
                self.held.remove(&lease);
                self.completer.withdraw(lease);
            }
        }
    }

    /// Graceful shutdown: claims nothing more; lets running handlers finish for up to `grace`
    /// (heartbeating and writing outcomes meanwhile); then cancels the rest and gives their
    /// leases back at once (`job_snooze(lease, 0)`: queued, due now, attempt returned, so another
    /// worker takes them without waiting for the lease to expire); finally writes what is
    /// pending, retrying for at most `db_backoff_max` while the store is unreachable.
    ///
    /// A handler that ignores its token and never reaches an `.await` cannot be stopped; it is
    /// detached, and its lease given back all the same.
    pub async fn shutdown(&mut self, grace: Duration) -> ShutdownReport {
        let before = self.stats.counters();
        self.draining = true;
        self.release_buffered();
        tracing::info!(
            worker_id = %self.config.worker_id,
            in_flight = self.tasks.len(),
            ?grace,
            "shutting down: waiting for running jobs"
        );
        self.drain(tokio::time::Instant::now() + grace).await;
        let interrupted = self.interrupt_running();
        self.final_flush().await;
        tracing::info!(
            worker_id = %self.config.worker_id,
            interrupted,
            "worker stopped"
        );
        ShutdownReport {
            interrupted,
            counts: self.stats.counters().since(&before),
        }
    }

    /// Cancels the handlers still running, aborts their tasks and queues their release.
    pub(crate) fn interrupt_running(&mut self) -> usize {
        self.collect_finished();
        let tasks = std::mem::take(&mut self.tasks);
        drop(tasks); // aborts every task still running
        self.task_leases.clear();
        let running: Vec<LeaseRef> = self
            .held
            .iter()
            .filter(|(_, held)| matches!(held.state, LeaseState::Running | LeaseState::Lost))
            .map(|(lease, _)| *lease)
            .collect();
        for lease in &running {
            let Some(held) = self.held.get_mut(lease) else {
                continue;
            };
            held.cancel.cancel();
            if held.state == LeaseState::Lost {
                self.held.remove(lease);
                continue;
            }
            job_event!(
                info,
                lease,
                held,
                "grace period over: handler cancelled, giving the lease back"
            );
            self.submit(*lease, GIVE_BACK);
        }
        self.sync_gauges();
        running.len()
    }

    /// Writes what is pending, retrying with backoff for at most `db_backoff_max`; drops the rest.
    /// Gives back the jobs of lost claims once more. (With a shared completer whose writer is
    /// running, this worker's writes may be on their way in its round: their answers are awaited
    /// within the same limit.)
    pub(crate) async fn final_flush(&mut self) {
        if !self.lost_claims.is_empty() {
            self.release_lost_claims().await;
        }
        let give_up_at = tokio::time::Instant::now() + self.config.db_backoff_max;
        let mut backoff =
            crate::backoff::Backoff::new(self.config.db_backoff_min, self.config.db_backoff_max);
        let mailbox = self.mailbox.clone();
        loop {
            let written = self.write_pending().await;
            if self.pending_writes() == 0 {
                break;
            }
            let now = tokio::time::Instant::now();
            let next = if written {
                give_up_at
            } else {
                now + backoff.failed(now)
            };
            if next > give_up_at || now >= give_up_at {
                break;
            }
            tokio::select! {
                () = mailbox.posted() => {}
                () = tokio::time::sleep_until(next) => {}
            }
        }
        self.completer.withdraw_all(&self.mailbox);
        self.take_answers();
        let leftover: Vec<LeaseRef> = self
            .held
            .iter()
            .filter(|(_, held)| held.state == LeaseState::Writing)
            .map(|(lease, _)| *lease)
            .collect();
        for lease in leftover {
            self.dropped(
                lease,
                "store unreachable at shutdown: outcome dropped (the rescuer retries the job)",
            );
        }
        self.sync_gauges();
    }
}
