//! [`QueueSampler`]: reads `JobStore::queue_backlog` and `JobStore::queue_list` on an interval and
//! publishes queue depth (a series for every known queue, 0 when empty), the age of the oldest
//! ready job, and whether the database answers.
//!
//! It samples the backlog, never the finished history: `queue_backlog` reads only `queued` and
//! `running` jobs (in Postgres, only the partial claim and rescue indexes), so a sample costs what
//! the backlog costs however many finished jobs the table keeps; `queue_list` reads the small
//! queue table (a row per queue, from its first job). For counts of every state, ask
//! `JobStore::queue_stats` on demand (the HTTP API's `GET /v1/queues`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use faultline_ports::domain::JobState;
use faultline_ports::telemetry::{labels, names};
use faultline_ports::{
    Clock, JobStore, LabelGuard, QueueBacklog, QueueInfo, StoreError, StoreResult, SystemClock,
};
use metrics::{counter, gauge};
use tokio_util::sync::CancellationToken;

/// The store operation names of the sampler's calls (the `operation` label of their errors).
const OPERATION: &str = "queue_backlog";
const LIST_OPERATION: &str = "queue_list";

/// The states whose depth is published: the backlog. Terminal states (`succeeded`, `failed`,
/// `cancelled`) are history, not depth, and get no gauge (counting them would read every finished
/// job; their rates are `faultline_jobs_finished_total`).
const DEPTH_STATES: [JobState; 2] = [JobState::Queued, JobState::Running];

/// Samples queue depth from the store ([`JobStore::queue_backlog`], plus [`JobStore::queue_list`]
/// for the queues with no backlog). Publishes, per known queue (label folded by the
/// [`LabelGuard`]): `faultline_queue_depth{queue,state}` for the states `queued`
/// and `running` only, and `faultline_queue_oldest_ready_age_seconds{queue}` (0 when no job is
/// waiting), plus `faultline_db_up` and, on failure,
/// `faultline_db_errors_total{operation="queue_backlog"}`.
///
/// Every queue with a row (from its first job on) has a series, 0 when it has no backlog, also
/// when it drained before the first sample. Queues folded into one label value are summed (depth)
/// or take the oldest (age). A published queue that disappears from both answers is set to 0
/// instead of keeping its last value.
///
/// A process samples only while it leads the maintenance when given its leadership
/// ([`QueueSampler::while_leading`]): one process per database reads the backlog, and its
/// [`Exported`] flag tells the exposition to hide the depth series whenever they are not the
/// leader's fresh numbers (see [`crate::render_fn_with`]).
pub struct QueueSampler {
    store: Arc<dyn JobStore>,
    clock: Arc<dyn Clock>,
    labels: LabelGuard,
    interval: Duration,
    timeout: Duration,
    /// Queue label values published by the previous sample.
    published: BTreeSet<String>,
    /// Sample only while this says the process leads (`None`: always).
    leading: Option<Leading>,
    exported: Exported,
}

/// Tells whether the process leads its maintenance now.
pub type Leading = Arc<dyn Fn() -> bool + Send + Sync>;

/// Whether a [`QueueSampler`]'s series are current: set after a sample succeeds while the
/// process may sample, cleared as soon as it may not (it stopped leading). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Exported(Arc<AtomicBool>);

impl Exported {
    /// Whether the depth series are current and may be exposed.
    pub fn is_exported(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn set(&self, exported: bool) {
        self.0.store(exported, Ordering::SeqCst);
    }
}

/// The metric families [`QueueSampler`] publishes, hidden while they are not current.
pub const SAMPLED_FAMILIES: [&str; 2] = [names::QUEUE_DEPTH, names::QUEUE_OLDEST_READY_AGE_SECONDS];

/// How often a sampler gated by leadership checks whether the process leads (it samples at once
/// when it starts leading).
const LEADERSHIP_CHECK: Duration = Duration::from_millis(500);

impl std::fmt::Debug for QueueSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSampler")
            .field("labels", &self.labels)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("published", &self.published.len())
            .finish_non_exhaustive()
    }
}

impl QueueSampler {
    /// Default interval between samples.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
    /// Default limit of one `queue_backlog` call; a call that takes longer counts as failed.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A sampler of `store`, with the system clock, [`Self::DEFAULT_INTERVAL`] and
    /// [`Self::DEFAULT_TIMEOUT`].
    pub fn new<S: JobStore>(store: Arc<S>, labels: LabelGuard) -> Self {
        QueueSampler {
            store,
            clock: Arc::new(SystemClock),
            labels,
            interval: Self::DEFAULT_INTERVAL,
            timeout: Self::DEFAULT_TIMEOUT,
            published: BTreeSet::new(),
            leading: None,
            exported: Exported::default(),
        }
    }

    /// Samples only while `leading` says the process leads its maintenance (checked every
    /// 500 ms; the first sample comes at once when the process starts leading).
    pub fn while_leading(mut self, leading: Leading) -> Self {
        self.leading = Some(leading);
        self
    }

    /// The flag that says whether this sampler's series are current (share it with the
    /// exposition: [`crate::render_fn_with`]).
    pub fn exported(&self) -> Exported {
        self.exported.clone()
    }

    /// Reports whether its series are current through `exported` (made before the sampler).
    pub fn with_exported(mut self, exported: Exported) -> Self {
        self.exported = exported;
        self
    }

    /// Whether the process may sample now.
    fn may_sample(&self) -> bool {
        self.leading.as_ref().is_none_or(|leading| leading())
    }

    /// Measures ages against `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Samples every `interval` (must be above zero).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Gives up on a sample (its `queue_backlog` and `queue_list` calls) after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Samples once, at once, and publishes the gauges. On failure sets `faultline_db_up` to 0,
    /// counts the error and returns it; the depth gauges keep their last values.
    pub async fn sample_once(&mut self) -> StoreResult<()> {
        let calls = async {
            let backlog = self
                .store
                .queue_backlog()
                .await
                .map_err(|err| (OPERATION, err))?;
            let queues = self
                .store
                .queue_list()
                .await
                .map_err(|err| (LIST_OPERATION, err))?;
            Ok((backlog, queues))
        };
        let result = match tokio::time::timeout(self.timeout, calls).await {
            Ok(result) => result,
            Err(_) => Err((
                OPERATION,
                StoreError::Backend(
                    format!("sampling queue depth took longer than {:?}", self.timeout).into(),
                ),
            )),
        };
        match result {
            Ok((backlog, queues)) => {
                gauge!(names::DB_UP).set(1.0);
                self.publish(&backlog, &queues, self.clock.now());
                self.exported.set(self.may_sample());
                Ok(())
            }
            Err((operation, err)) => {
                gauge!(names::DB_UP).set(0.0);
                counter!(names::DB_ERRORS_TOTAL, labels::OPERATION => operation).increment(1);
                tracing::warn!(error = %err, "sampling queue depth failed");
                Err(err)
            }
        }
    }

    fn publish(&mut self, backlog: &[QueueBacklog], queues: &[QueueInfo], now: DateTime<Utc>) {
        #[derive(Default)]
        struct Folded {
            /// In the order of [`DEPTH_STATES`].
            counts: [i64; DEPTH_STATES.len()],
            oldest: Option<DateTime<Utc>>,
        }
        let mut folded: BTreeMap<String, Folded> = BTreeMap::new();
        for queue in backlog {
            let entry = folded.entry(self.labels.queue(&queue.queue)).or_default();
            entry.counts[0] += queue.queued;
            entry.counts[1] += queue.running;
            entry.oldest = match (entry.oldest, queue.oldest_ready_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        // After the backlog, so that the label guard admits queues with work first.
        for queue in queues {
            folded.entry(self.labels.queue(&queue.name)).or_default();
        }
        for (queue, entry) in &folded {
            for (count, state) in entry.counts.iter().zip(DEPTH_STATES) {
                gauge!(names::QUEUE_DEPTH, labels::QUEUE => queue.clone(), labels::STATE => state.as_str())
                    .set(*count as f64);
            }
            let age = entry
                .oldest
                .map_or(0.0, |oldest| seconds(now - oldest).max(0.0));
            gauge!(names::QUEUE_OLDEST_READY_AGE_SECONDS, labels::QUEUE => queue.clone()).set(age);
        }
        for gone in self.published.difference(&folded.keys().cloned().collect()) {
            for state in DEPTH_STATES {
                gauge!(names::QUEUE_DEPTH, labels::QUEUE => gone.clone(), labels::STATE => state.as_str())
                    .set(0.0);
            }
            gauge!(names::QUEUE_OLDEST_READY_AGE_SECONDS, labels::QUEUE => gone.clone()).set(0.0);
        }
        self.published = folded.into_keys().collect();
    }

    /// Samples at once and then every interval until `shutdown` fires. Failures are logged and
    /// counted; sampling goes on. Gated by leadership, it samples at once when the process
    /// starts leading, then every interval while it leads, and clears [`Exported`] as soon as
    /// it stops.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let check = match self.leading {
            Some(_) => self.interval.min(LEADERSHIP_CHECK),
            None => self.interval,
        };
        let mut ticks = tokio::time::interval(check);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The next sample, while the process may sample (`None`: it may not).
        let mut next_sample: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let now = tokio::time::Instant::now();
            if !self.may_sample() {
                self.exported.set(false);
                next_sample = None;
                continue;
            }
            if next_sample.is_none_or(|at| now >= at) {
                let _ = self.sample_once().await;
                next_sample = Some(now + self.interval);
            }
        }
    }
}

fn seconds(delta: chrono::TimeDelta) -> f64 {
    delta
        .num_microseconds()
        .map_or(delta.num_seconds() as f64, |us| us as f64 / 1e6)
}
