//! The rows the runtime keeps next to the jobs: queues (paused or not), the maintenance leader,
//! and the registered processes (workers and API servers).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One queue row. A queue appears on its first enqueue (or when it is paused or resumed by
/// name) and stays until deleted by an operator; its jobs come and go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// No worker and no HTTP lease request claims jobs of a paused queue; enqueues still succeed.
    pub paused: bool,
    /// When the queue was last paused (kept after a resume, for diagnosis).
    pub paused_at: Option<DateTime<Utc>>,
    /// The most jobs of this queue that may be running at once, across every worker and HTTP
    /// lease holder (`None`: no bound). See [`QueueLimits`].
    pub max_running: Option<i32>,
    /// When the row appeared.
    pub created_at: DateTime<Utc>,
    /// When `paused` or a limit last changed (or the row appeared).
    pub updated_at: DateTime<Utc>,
}

/// The flow-control settings of a queue, as [`crate::JobStore::queue_set_limits`] sets them.
///
/// `max_running` bounds the queue's running jobs, counted by the store inside the claim: no
/// claim that starts after the setting committed leases a job of the queue while
/// `max_running` of its jobs are running. A job held back by the bound stays `queued`, spends no
/// attempt, and is claimable as soon as one of the running jobs ends (the store wakes waiting
/// claimants then). Lowering the bound stops nothing that runs; claims already in flight when
/// it changes finish under the bound they read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueLimits {
    /// `1..=`[`QueueLimits::MAX_RUNNING`], or `None` for no bound.
    pub max_running: Option<i32>,
}

impl QueueLimits {
    /// The largest `max_running` a queue may have.
    pub const MAX_RUNNING: i32 = 1_000_000;
}

/// What [`crate::JobStore::leader_elect`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectParams {
    /// The candidate: the process that wants to lead (or to renew its leadership).
    pub candidate: String,
    /// Length of the leadership lease from the store's now, in milliseconds.
    pub ttl_ms: i64,
}

/// The current holder of the maintenance leadership, as the store saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leadership {
    /// The leading process.
    pub leader_id: String,
    /// Bumped on every change of leader (and whenever a lapsed leadership is taken again); a
    /// renewal keeps it.
    pub term: i64,
    /// When this term started.
    pub elected_at: DateTime<Utc>,
    /// When the leadership lapses unless renewed, by the store's clock.
    pub expires_at: DateTime<Utc>,
    /// `expires_at - now` as the store computed it, in milliseconds (negative once lapsed).
    /// Callers measure the leadership's end on their own monotonic clock from this, never by
    /// comparing `expires_at` with their wall clock.
    pub remaining_ms: i64,
}

/// What a process tells the registry about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// Unique per process (a worker's `worker_id`, by default `<host>-<pid>`).
    pub id: String,
    /// What the process runs: `worker`, `api` or `dev`.
    pub role: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id on that host.
    pub pid: i32,
    /// The Faultline version it runs.
    pub version: String,
    /// The queues it claims from, with the slots of each (empty for an API server).
    pub queues: Vec<QueueSlots>,
}

/// One queue a worker process claims from, with its concurrency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSlots {
    /// The queue.
    pub queue: String,
    /// Handlers that may run at once for it.
    pub slots: u32,
}

/// One registered process, as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// What the process registered.
    #[serde(flatten)]
    pub spec: ProcessSpec,
    /// When it first registered (kept across refreshes).
    pub started_at: DateTime<Utc>,
    /// When it last refreshed its entry, by the store's clock.
    pub last_seen_at: DateTime<Utc>,
}
