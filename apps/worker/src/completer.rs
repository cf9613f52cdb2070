//! [`Completer`]: the one writer of every lease holder's outcome in a process. Producers (the
//! [`Worker`](crate::Worker)s, one per queue) hand it their outcomes (completions, failures,
//! snoozes, leases given back); it writes them in batches shared across producers
//! (`job_complete_many` and `job_fail_many` at once, snoozes one call each) and answers each
//! producer in its [`Mailbox`].
//!
//! Batching is natural: while one round of statements is on its way, outcomes pile up, and the
//! next round takes them all (up to the batch size per statement); no timer adds latency. A
//! round that cannot reach the store puts its writes back, first in line, marked as failed
//! once; a failed write is dropped (answered [`Answer::Dropped`]) once its lease has ended by
//! the worker's monotonic clock (the producer moves each pending write's deadline on with its
//! heartbeats), since the rescuer retries that job. A write is always tried at least once: the
//! store's fencing decides whether it still applies.
//!
//! In production one task runs [`Completer::run`] for the whole process. Tests, and a producer
//! flushing at shutdown, call [`Completer::write_round`] directly; the two never write one
//! entry twice (a round takes its entries out of the queue under the lock).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use faultline_domain::JobState;
use faultline_ports::{
    FailOutcome, Failure, JobStore, LeaseRef, StoreError, StoreResult, WriteOutcome,
};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::WorkerConfig;
use crate::stats::Counter;
use crate::worker::timed;

/// A lease holder's write.
#[derive(Debug)]
pub(crate) enum Write {
    Complete(Option<Value>),
    Fail(Failure),
    Snooze {
        delay_ms: i64,
        /// A lease given back at shutdown (counted as `released`, not `snoozed`).
        release: bool,
    },
}

/// What the completer tells a producer about one of its writes, or about its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The store applied the write; `counter` says what it became.
    Applied(LeaseRef, Counter),
    /// The store refused the write as stale: the lease was no longer held (`operation`).
    Stale(LeaseRef, &'static str),
    /// The store refused the write for another reason (invalid, not found).
    Refused(LeaseRef),
    /// The write failed on a backend error and its lease has ended since: dropped.
    Dropped(LeaseRef),
    /// A call carrying some of this producer's writes could not reach the store (they are
    /// pending again).
    Unreachable,
}

/// Where the completer leaves a producer's answers.
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    answers: Mutex<Vec<Answer>>,
    ready: Notify,
}

impl Mailbox {
    fn post(&self, answers: impl IntoIterator<Item = Answer>) {
        let mut posted = false;
        {
            let mut box_ = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
            for answer in answers {
                box_.push(answer);
                posted = true;
            }
        }
        if posted {
            self.ready.notify_one();
        }
    }

    /// Takes every answer posted so far.
    pub(crate) fn take(&self) -> Vec<Answer> {
        std::mem::take(&mut *self.answers.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits until answers may have been posted.
    pub(crate) async fn posted(&self) {
        self.ready.notified().await;
    }
}

/// One pending write.
#[derive(Debug)]
struct Entry {
    lease: LeaseRef,
    write: Write,
    /// The end of the lease by the worker's monotonic clock.
    deadline: Instant,
    /// A try failed on a backend error: no retry after `deadline`.
    failed: bool,
    mailbox: Arc<Mailbox>,
}

/// How the completer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompleterConfig {
    /// Most writes per statement (`job_complete_many`, `job_fail_many`). Default: 128.
    pub batch_size: usize,
    /// Limit of one store call; a call that takes longer counts as failed. Default: 10 s.
    pub store_timeout: Duration,
    /// First pause after a failed round (doubling up to `db_backoff_max`). Default: 100 ms.
    pub db_backoff_min: Duration,
    /// Longest pause between rounds while the store is unreachable. Default: 10 s.
    pub db_backoff_max: Duration,
}

impl CompleterConfig {
    /// The write settings of a worker configuration.
    pub fn of(worker: &WorkerConfig) -> Self {
        Self {
            batch_size: worker.completion_batch_size.max(1),
            store_timeout: worker.store_timeout,
            db_backoff_min: worker.db_backoff_min,
            db_backoff_max: worker.db_backoff_max,
        }
    }
}

impl Default for CompleterConfig {
    fn default() -> Self {
        Self::of(&WorkerConfig::default())
    }
}

/// The process's writer of lease holders' outcomes (see the module documentation). Cheap to
/// clone: clones share one queue.
pub struct Completer<S: JobStore> {
    shared: Arc<Shared<S>>,
}

impl<S: JobStore> Clone for Completer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S: JobStore> std::fmt::Debug for Completer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completer")
            .field("config", &self.shared.config)
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

struct Shared<S> {
    store: Arc<S>,
    config: CompleterConfig,
    queue: Mutex<VecDeque<Entry>>,
    work: Notify,
}

/// The entries one round writes, by kind of statement.
#[derive(Default)]
struct Round {
    completions: Vec<Entry>,
    failures: Vec<Entry>,
    snoozes: Vec<Entry>,
}

impl<S: JobStore> Completer<S> {
    /// A completer writing to `store`.
    pub fn new(store: Arc<S>, config: CompleterConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                config: CompleterConfig {
                    batch_size: config.batch_size.max(1),
                    ..config
                },
                queue: Mutex::new(VecDeque::new()),
                work: Notify::new(),
            }),
        }
    }

    /// Writes waiting (not counting those of a round in flight).
    pub fn pending(&self) -> usize {
        self.queue().len()
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Entry>> {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `write` of `lease` (whose lease ends at `deadline`), answered in `mailbox`.
    pub(crate) fn submit(
        &self,
        lease: LeaseRef,
        write: Write,
        deadline: Instant,
        mailbox: &Arc<Mailbox>,
    ) {
        self.queue().push_back(Entry {
            lease,
            write,
            deadline,
            failed: false,
            mailbox: mailbox.clone(),
        });
        self.shared.work.notify_one();
    }

    /// Moves the deadlines of pending writes on (their leases were extended).
    pub(crate) fn extend(&self, deadlines: &HashMap<LeaseRef, Instant>) {
        for entry in self.queue().iter_mut() {
            if let Some(deadline) = deadlines.get(&entry.lease) {
                entry.deadline = *deadline;
            }
        }
    }

    /// Takes the pending writes of `lease` back unwritten (its lease was found lost). Returns
    /// whether there was one.
    pub(crate) fn withdraw(&self, lease: LeaseRef) -> bool {
        let mut queue = self.queue();
        let before = queue.len();
        queue.retain(|entry| entry.lease != lease);
        queue.len() != before
    }

    /// Takes back every pending write answered in `mailbox` (a producer giving up at shutdown).
    /// Returns their leases.
    pub(crate) fn withdraw_all(&self, mailbox: &Arc<Mailbox>) -> Vec<LeaseRef> {
        let mut taken = Vec::new();
        self.queue().retain(|entry| {
            let mine = Arc::ptr_eq(&entry.mailbox, mailbox);
            if mine {
                taken.push(entry.lease);
            }
            !mine
        });
        taken
    }

    /// Writes every pending write once, in rounds: each round sends a batch of completions and a
    /// batch of failures at once, then its snoozes one by one. Returns `false` when a call could
    /// not reach the store (its writes are pending again; later rounds are left for the next
    /// call).
    pub async fn write_round(&self) -> bool {
        loop {
            let round = self.take_round();
            if round.is_empty() {
                return true;
            }
            if !self.write(round).await {
                return false;
            }
        }
    }

    /// Runs until `stop` fires: writes whenever writes are pending, backing off while the store
    /// cannot be reached. Stop it once every producer using it has shut down (each flushes its
    /// own writes at shutdown).
    pub async fn run(self, stop: CancellationToken) {
        let config = self.shared.config;
        let mut backoff = Backoff::new(config.db_backoff_min, config.db_backoff_max);
        loop {
            let now = Instant::now();
            if self.pending() > 0 && backoff.is_ready(now) {
                if self.write_round().await {
                    backoff.succeeded();
                } else {
                    backoff.failed(Instant::now());
                }
                continue;
            }
            let retry = async {
                match backoff.ready_at() {
                    Some(at) if self.pending() > 0 => tokio::time::sleep_until(at).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.shared.work.notified() => {}
                () = retry => {}
            }
        }
    }

    /// Takes the next round out of the queue: drops the failed writes whose lease has ended,
    /// then up to a batch of each kind, in queue order.
    fn take_round(&self) -> Round {
        let now = Instant::now();
        let batch = self.shared.config.batch_size;
        let mut round = Round::default();
        let mut dropped = Vec::new();
        let mut queue = self.queue();
        let mut kept = VecDeque::with_capacity(queue.len());
        for entry in queue.drain(..) {
            let slot = match entry.write {
                _ if entry.failed && entry.deadline <= now => {
                    dropped.push(entry);
                    continue;
                }
                Write::Complete(_) => &mut round.completions,
                Write::Fail(_) => &mut round.failures,
                Write::Snooze { .. } => &mut round.snoozes,
            };
            if slot.len() < batch {
                slot.push(entry);
            } else {
                kept.push_back(entry);
            }
        }
        *queue = kept;
        drop(queue);
        for entry in dropped {
            entry.mailbox.post([Answer::Dropped(entry.lease)]);
        }
        round
    }

    /// Writes one round; `false` when a call could not reach the store.
    async fn write(&self, round: Round) -> bool {
        let Round {
            completions,
            failures,
            snoozes,
        } = round;
        let (completed, failed) = tokio::join!(
            self.write_completions(completions),
            self.write_failures(failures)
        );
        let mut ok = completed && failed;
        let mut snoozes = snoozes.into_iter();
        while ok && let Some(entry) = snoozes.next() {
            ok = self.write_snooze(entry).await;
        }
        // Snoozes left after a failed call wait, untried, for the next round.
        self.put_back(snoozes.collect(), false);
        ok
    }

    async fn write_completions(&self, entries: Vec<Entry>) -> bool {
        if entries.is_empty() {
            return true;
        }
        let batch: Vec<(LeaseRef, Option<Value>)> = entries
            .iter()
            .map(|entry| match &entry.write {
                Write::Complete(result) => (entry.lease, result.clone()),
                _ => unreachable!("a completion batch holds completions only"),
            })
            .collect();
        let store = &self.shared.store;
        let result = self
            .call("complete", store.job_complete_many(&batch), batch.len())
            .await;
        self.answer(
            entries,
            result,
            "complete",
            |outcome, lease| match outcome {
                WriteOutcome::Accepted => Answer::Applied(lease, Counter::completed),
                WriteOutcome::Stale => Answer::Stale(lease, "complete"),
            },
        )
    }

    async fn write_failures(&self, entries: Vec<Entry>) -> bool {
        if entries.is_empty() {
            return true;
        }
        let batch: Vec<(LeaseRef, Failure)> = entries
            .iter()
            .map(|entry| match &entry.write {
                Write::Fail(failure) => (entry.lease, failure.clone()),
                _ => unreachable!("a failure batch holds failures only"),
            })
            .collect();
        let store = &self.shared.store;
        let result = self
            .call("fail", store.job_fail_many(&batch), batch.len())
            .await;
        self.answer(entries, result, "fail", |outcome, lease| match outcome {
            FailOutcome::Applied { state } => Answer::Applied(
                lease,
                match state {
                    JobState::Cancelled => Counter::cancelled,
                    JobState::Failed => Counter::failed,
                    _ => Counter::retried,
                },
            ),
            FailOutcome::Stale => Answer::Stale(lease, "fail"),
        })
    }

    async fn write_snooze(&self, entry: Entry) -> bool {
        let Write::Snooze { delay_ms, release } = entry.write else {
            unreachable!("a snooze entry holds a snooze");
        };
        let store = &self.shared.store;
        let result = self
            .call(
                "snooze",
                async {
                    store
                        .job_snooze(entry.lease, delay_ms)
                        .await
                        .map(|job| vec![job.state])
                },
                1,
            )
            .await;
        self.answer(vec![entry], result, "snooze", |state, lease| match state {
            JobState::Cancelled => Answer::Applied(lease, Counter::cancelled),
            _ if release => Answer::Applied(lease, Counter::released),
            _ => Answer::Applied(lease, Counter::snoozed),
        })
    }

    /// Runs one store call of `n` writes with the time limit; checks that it answered each.
    async fn call<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = StoreResult<Vec<T>>>,
        n: usize,
    ) -> StoreResult<Vec<T>> {
        let result = timed(self.shared.config.store_timeout, what, fut)
            .await
            .and_then(|outcomes| {
                if outcomes.len() == n {
                    Ok(outcomes)
                } else {
                    Err(StoreError::Backend(
                        format!("{} outcomes for {n} writes ({what})", outcomes.len()).into(),
                    ))
                }
            });
        if let Err(err) = &result
            && !matches!(err, StoreError::StaleLease { .. })
        {
            tracing::warn!(error = %err, "store call failed: {what}");
        }
        result
    }

    /// Posts the answers of one call over `entries`; `false` when it could not reach the store
    /// (the entries are pending again, first in line, marked failed).
    fn answer<T>(
        &self,
        entries: Vec<Entry>,
        result: StoreResult<Vec<T>>,
        what: &'static str,
        to_answer: impl Fn(T, LeaseRef) -> Answer,
    ) -> bool {
        match result {
            Ok(outcomes) => {
                for (entry, outcome) in entries.into_iter().zip(outcomes) {
                    entry.mailbox.post([to_answer(outcome, entry.lease)]);
                }
                true
            }
            Err(StoreError::Backend(_)) => {
                let mut told: Vec<&Arc<Mailbox>> = Vec::new();
                for entry in &entries {
                    if !told.iter().any(|m| Arc::ptr_eq(m, &entry.mailbox)) {
                        entry.mailbox.post([Answer::Unreachable]);
                        told.push(&entry.mailbox);
                    }
                }
                self.put_back(entries, true);
                false
            }
            // A single write refused as stale is an answer about that lease.
            Err(StoreError::StaleLease { .. }) => {
                for entry in entries {
                    entry.mailbox.post([Answer::Stale(entry.lease, what)]);
                }
                true
            }
            Err(_) => {
                for entry in entries {
                    entry.mailbox.post([Answer::Refused(entry.lease)]);
                }
                true
            }
        }
    }

    /// Puts `entries` back at the head of the queue, in their order (`failed`: a try failed).
    fn put_back(&self, entries: Vec<Entry>, failed: bool) {
        if entries.is_empty() {
            return;
        }
        let mut queue = self.queue();
        for mut entry in entries.into_iter().rev() {
            entry.failed |= failed;
            queue.push_front(entry);
        }
    }
}

impl Round {
    fn is_empty(&self) -> bool {
        self.completions.is_empty() && self.failures.is_empty() && self.snoozes.is_empty()
    }
}
