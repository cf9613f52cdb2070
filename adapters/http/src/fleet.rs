//! The bodies of the queue and process operations (OpenAPI schemas): the queue list (statistics
//! merged with the queue rows), a queue row (pause and resume), and the registered processes with
//! the maintenance leader (`GET /v1/workers`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use faultline_ports::domain::JobState;
use faultline_ports::{Leadership, ProcessInfo, QueueInfo, QueueSlots, QueueStats};
use poem_openapi::Object;

use crate::dto::ms_to_seconds;

/// Jobs per state.
#[derive(Debug, Clone, Object)]
#[oai(rename = "StateCounts")]
pub(crate) struct StateCounts {
    /// Jobs waiting (due or not).
    pub(crate) queued: i64,
    /// Jobs leased to a worker.
    pub(crate) running: i64,
    /// Jobs completed (until pruned).
    pub(crate) succeeded: i64,
    /// Jobs failed for good (until retried or pruned).
    pub(crate) failed: i64,
    /// Jobs cancelled (until retried or pruned).
    pub(crate) cancelled: i64,
}

/// One queue's counts and whether it is paused.
#[derive(Debug, Clone, Object)]
#[oai(rename = "QueueSummary", skip_serializing_if_is_none)]
pub(crate) struct QueueSummary {
    /// The queue.
    pub(crate) queue: String,
    /// Jobs per state.
    pub(crate) counts: StateCounts,
    /// `next_run_at` of the oldest due queued job; absent when none is due.
    pub(crate) oldest_ready_at: Option<DateTime<Utc>>,
    /// How long, in seconds, the oldest due job has been waiting (now minus `oldest_ready_at`,
    /// now being the API server's clock; never negative); absent when none is due.
    pub(crate) oldest_ready_age_seconds: Option<f64>,
    /// No worker and no lease request claims its jobs (`POST /v1/queues/{name}/resume` ends
    /// it); enqueues still succeed.
    pub(crate) paused: bool,
    /// When it was last paused (kept after a resume); absent when it never was.
    pub(crate) paused_at: Option<DateTime<Utc>>,
    /// The most jobs of the queue that may run at once across every worker and lease holder;
    /// absent when there is no bound (`PUT /v1/queues/{name}/limits` sets it).
    pub(crate) max_running: Option<i32>,
    /// Slots left under `max_running` (never negative: 0 when a lowered bound is below the
    /// jobs still running); absent when there is no bound.
    pub(crate) free_slots: Option<i64>,
}

impl QueueSummary {
    /// The summary of one queue: its statistics (none: it has no job) and its row (none: it
    /// has none, so it is not paused).
    pub(crate) fn new(
        queue: String,
        stats: Option<QueueStats>,
        row: Option<QueueInfo>,
        now: DateTime<Utc>,
    ) -> Self {
        let count = |state| stats.as_ref().map_or(0, |s| s.count(state));
        let oldest_ready_at = stats.as_ref().and_then(|s| s.oldest_ready_at);
        let age = oldest_ready_at.map(|at| {
            let ms = (now - at).num_milliseconds().max(0);
            ms_to_seconds(ms)
        });
        let running = count(JobState::Running);
        let max_running = row.as_ref().and_then(|r| r.max_running);
        let free_slots = max_running.map(|max| (i64::from(max) - running).max(0));
        QueueSummary {
            counts: StateCounts {
                queued: count(JobState::Queued),
                running,
                succeeded: count(JobState::Succeeded),
                failed: count(JobState::Failed),
                cancelled: count(JobState::Cancelled),
            },
            queue,
            oldest_ready_at,
            oldest_ready_age_seconds: age,
            paused: row.as_ref().is_some_and(|r| r.paused),
            paused_at: row.and_then(|r| r.paused_at),
            max_running,
            free_slots,
        }
    }

    /// One summary per queue that has a job or a row, sorted by name (byte order).
    pub(crate) fn merge(
        stats: Vec<QueueStats>,
        rows: Vec<QueueInfo>,
        now: DateTime<Utc>,
    ) -> Vec<QueueSummary> {
        let mut queues: BTreeMap<String, (Option<QueueStats>, Option<QueueInfo>)> = BTreeMap::new();
        for s in stats {
            let entry = queues.entry(s.queue.clone()).or_default();
            entry.0 = Some(s);
        }
        for row in rows {
            let entry = queues.entry(row.name.clone()).or_default();
            entry.1 = Some(row);
        }
        queues
            .into_iter()
            .map(|(queue, (stats, row))| QueueSummary::new(queue, stats, row, now))
            .collect()
    }
}

/// Every known queue, sorted by name.
#[derive(Debug, Clone, Object)]
#[oai(rename = "QueueList")]
pub(crate) struct QueueList {
    /// The queues: every queue that has a job or a row (a queue gets its row with its first job,
    /// or when it is paused or resumed), with zero counts when it has no job.
    pub(crate) queues: Vec<QueueSummary>,
}

/// A queue's row: whether it is paused, and its limits.
#[derive(Debug, Clone, Object)]
#[oai(rename = "Queue", skip_serializing_if_is_none)]
pub(crate) struct QueueView {
    /// The queue.
    pub(crate) name: String,
    /// No worker and no lease request claims its jobs while it is paused; enqueues still
    /// succeed, and its jobs wait.
    pub(crate) paused: bool,
    /// When it was last paused (kept after a resume); absent when it never was.
    pub(crate) paused_at: Option<DateTime<Utc>>,
    /// The most jobs of the queue that may run at once across every worker and lease holder;
    /// absent when there is no bound.
    pub(crate) max_running: Option<i32>,
    /// When the row appeared (with the queue's first job, or its first pause, resume or limit).
    pub(crate) created_at: DateTime<Utc>,
    /// When `paused` or a limit last changed (or the row appeared).
    pub(crate) updated_at: DateTime<Utc>,
}

/// The flow-control limits of a queue (`PUT /v1/queues/{name}/limits`): the whole set, each
/// limit absent (or null) for none.
#[derive(Debug, Clone, Object)]
#[oai(rename = "QueueLimits", deny_unknown_fields)]
pub(crate) struct QueueLimitsBody {
    /// The most jobs of the queue that may run at once across every worker and HTTP lease
    /// holder, counted by the database inside each claim (1 to 1000000); absent or null: no
    /// bound. A job held back stays queued without spending an attempt and starts as soon as a
    /// running one ends.
    #[oai(validator(minimum(value = "1"), maximum(value = "1000000")))]
    pub(crate) max_running: Option<i32>,
}

impl From<QueueInfo> for QueueView {
    fn from(queue: QueueInfo) -> Self {
        QueueView {
            name: queue.name,
            paused: queue.paused,
            paused_at: queue.paused_at,
            max_running: queue.max_running,
            created_at: queue.created_at,
            updated_at: queue.updated_at,
        }
    }
}

/// One queue a worker process claims from.
#[derive(Debug, Clone, Object)]
#[oai(rename = "QueueSlots")]
pub(crate) struct QueueSlotsView {
    /// The queue.
    pub(crate) queue: String,
    /// How many of its jobs the process runs at once.
    pub(crate) slots: u32,
}

impl From<QueueSlots> for QueueSlotsView {
    fn from(slots: QueueSlots) -> Self {
        QueueSlotsView {
            queue: slots.queue,
            slots: slots.slots,
        }
    }
}

/// A registered process: a worker, an API server, or both (`dev`).
#[derive(Debug, Clone, Object)]
#[oai(rename = "Process")]
pub(crate) struct ProcessView {
    /// Unique per process (a worker's `worker_id`, by default `<host>-<pid>`).
    pub(crate) id: String,
    /// What it runs: `worker`, `api` or `dev`.
    pub(crate) role: String,
    /// The host it runs on.
    pub(crate) host: String,
    /// Its process id on that host.
    pub(crate) pid: i32,
    /// The Faultline version it runs.
    pub(crate) version: String,
    /// The queues it claims from, with the slots of each (empty for an API server).
    pub(crate) queues: Vec<QueueSlotsView>,
    /// When it registered.
    pub(crate) started_at: DateTime<Utc>,
    /// When it last refreshed its entry, by the database's clock. Entries not refreshed for a
    /// while are removed by the leader.
    pub(crate) last_seen_at: DateTime<Utc>,
    /// It holds the maintenance leadership now (rescuer, pruner, queue-depth sampler).
    pub(crate) leader: bool,
}

impl ProcessView {
    /// The view of `process`, marked as the leader when it holds `leader` and that has not
    /// lapsed.
    pub(crate) fn new(process: ProcessInfo, leader: Option<&Leadership>) -> Self {
        let spec = process.spec;
        let leads = leader.is_some_and(|l| l.remaining_ms > 0 && l.leader_id == spec.id);
        ProcessView {
            leader: leads,
            id: spec.id,
            role: spec.role,
            host: spec.host,
            pid: spec.pid,
            version: spec.version,
            queues: spec.queues.into_iter().map(Into::into).collect(),
            started_at: process.started_at,
            last_seen_at: process.last_seen_at,
        }
    }
}

/// The maintenance leadership as the database holds it.
#[derive(Debug, Clone, Object)]
#[oai(rename = "Leader")]
pub(crate) struct LeaderView {
    /// The process that holds (or last held) it.
    pub(crate) leader_id: String,
    /// Bumped on every change of leader; a renewal keeps it.
    pub(crate) term: i64,
    /// When this term started.
    pub(crate) elected_at: DateTime<Utc>,
    /// When the leadership lapses unless renewed, by the database's clock.
    pub(crate) expires_at: DateTime<Utc>,
    /// `false` once `expires_at` has passed: the leader stopped renewing (it died, or lost
    /// the database) and the next candidate takes over.
    pub(crate) active: bool,
}

impl From<Leadership> for LeaderView {
    fn from(leadership: Leadership) -> Self {
        LeaderView {
            active: leadership.remaining_ms > 0,
            leader_id: leadership.leader_id,
            term: leadership.term,
            elected_at: leadership.elected_at,
            expires_at: leadership.expires_at,
        }
    }
}

/// The registered processes and the maintenance leader.
#[derive(Debug, Clone, Object)]
#[oai(rename = "WorkerList", skip_serializing_if_is_none)]
pub(crate) struct WorkerList {
    /// Every registered process, sorted by id.
    pub(crate) workers: Vec<ProcessView>,
    /// The maintenance leadership; absent when no process ever led.
    pub(crate) leader: Option<LeaderView>,
}

impl WorkerList {
    /// The list of `processes`, marking the holder of `leader`.
    pub(crate) fn new(processes: Vec<ProcessInfo>, leader: Option<Leadership>) -> Self {
        WorkerList {
            workers: processes
                .into_iter()
                .map(|p| ProcessView::new(p, leader.as_ref()))
                .collect(),
            leader: leader.map(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use faultline_ports::ProcessSpec;

    fn process(id: &str) -> ProcessInfo {
        let now = Utc::now();
        ProcessInfo {
            spec: ProcessSpec {
                id: id.into(),
                role: "worker".into(),
                host: "h".into(),
                pid: 7,
                version: "0.1.0".into(),
                queues: vec![QueueSlots {
                    queue: "q".into(),
                    slots: 3,
                }],
            },
            started_at: now,
            last_seen_at: now,
        }
    }

    fn leadership(id: &str, remaining_ms: i64) -> Leadership {
        let now = Utc::now();
        Leadership {
            leader_id: id.into(),
            term: 4,
            elected_at: now,
            expires_at: now + TimeDelta::milliseconds(remaining_ms),
            remaining_ms,
        }
    }

    #[test]
    fn only_the_holder_of_an_unexpired_leadership_is_the_leader() {
        let list = WorkerList::new(vec![process("a"), process("b")], Some(leadership("b", 1)));
        let leaders: Vec<(&str, bool)> = list
            .workers
            .iter()
            .map(|w| (w.id.as_str(), w.leader))
            .collect();
        assert_eq!(leaders, [("a", false), ("b", true)]);
        assert!(list.leader.as_ref().is_some_and(|l| l.active));

        for remaining_ms in [0, -1] {
            let list = WorkerList::new(vec![process("b")], Some(leadership("b", remaining_ms)));
            assert!(!list.workers[0].leader, "{remaining_ms}");
            let leader = list.leader.expect("the row is shown");
            assert_eq!((leader.leader_id.as_str(), leader.active), ("b", false));
        }

        let list = WorkerList::new(vec![process("a")], None);
        assert!(!list.workers[0].leader);
        assert!(list.leader.is_none());
    }
}
