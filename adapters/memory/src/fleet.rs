//! The runtime's rows next to the jobs, in memory: queues (paused or not), the maintenance
//! leadership and the registered processes. Same semantics as the Postgres tables; "now" is an
//! argument, read from the store's clock by the caller.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use faultline_ports::{
    ElectParams, Leadership, ProcessInfo, ProcessSpec, QueueInfo, QueueLimits, StoreResult,
    validate_process, validate_queue_name,
};

/// The leadership row: who leads, in which term, until when.
#[derive(Debug, Clone)]
struct Leader {
    leader_id: String,
    term: i64,
    elected_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

impl Leader {
    fn view(&self, now: DateTime<Utc>) -> Leadership {
        Leadership {
            leader_id: self.leader_id.clone(),
            term: self.term,
            elected_at: self.elected_at,
            expires_at: self.expires_at,
            remaining_ms: (self.expires_at - now).num_milliseconds(),
        }
    }
}

/// Queues, leadership and processes (byte-ordered maps: the adapters' shared sort order).
#[derive(Debug, Default)]
pub(crate) struct Fleet {
    queues: BTreeMap<String, QueueInfo>,
    leader: Option<Leader>,
    processes: BTreeMap<String, ProcessInfo>,
}

impl Fleet {
    /// Gives `queue` its row if it has none (an enqueue).
    pub(crate) fn touch_queue(&mut self, queue: &str, now: DateTime<Utc>) {
        if !self.queues.contains_key(queue) {
            self.queues.insert(queue.to_owned(), new_queue(queue, now));
        }
    }

    /// Whether no claim may take jobs of `queue`.
    pub(crate) fn is_paused(&self, queue: &str) -> bool {
        self.queues.get(queue).is_some_and(|q| q.paused)
    }

    /// The `max_running` bound of `queue`, if it has one.
    pub(crate) fn max_running(&self, queue: &str) -> Option<i32> {
        self.queues.get(queue).and_then(|q| q.max_running)
    }

    /// Sets the limits of `name` (creating its row). Returns the row and whether a bound was
    /// raised or removed (slots may have freed).
    pub(crate) fn set_limits(
        &mut self,
        name: &str,
        limits: &QueueLimits,
        now: DateTime<Utc>,
    ) -> StoreResult<(QueueInfo, bool)> {
        validate_queue_name(name)?;
        limits.validate()?;
        let queue = self
            .queues
            .entry(name.to_owned())
            .or_insert_with(|| new_queue(name, now));
        let raised = match (queue.max_running, limits.max_running) {
            (_, None) => true,
            (None, Some(_)) => true,
            (Some(old), Some(new)) => new > old,
        };
        if queue.max_running != limits.max_running {
            queue.max_running = limits.max_running;
            queue.updated_at = now;
        }
        Ok((queue.clone(), raised))
    }

    pub(crate) fn queue_list(&self) -> Vec<QueueInfo> {
        self.queues.values().cloned().collect()
    }

    /// Pauses or resumes `name` (creating its row). Returns the row and whether it was resumed
    /// (its due jobs became claimable again).
    pub(crate) fn set_paused(
        &mut self,
        name: &str,
        paused: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<QueueInfo> {
        validate_queue_name(name)?;
        let queue = self
            .queues
            .entry(name.to_owned())
            .or_insert_with(|| new_queue(name, now));
        if queue.paused != paused {
            queue.paused = paused;
            queue.updated_at = now;
            if paused {
                queue.paused_at = Some(now);
            }
        }
        Ok(queue.clone())
    }

    pub(crate) fn leader_elect(
        &mut self,
        params: &ElectParams,
        now: DateTime<Utc>,
    ) -> StoreResult<Leadership> {
        params.validate()?;
        let expires_at = now + TimeDelta::milliseconds(params.ttl_ms);
        let leader = match self.leader.take() {
            None => Leader {
                leader_id: params.candidate.clone(),
                term: 1,
                elected_at: now,
                expires_at,
            },
            Some(held) if held.leader_id == params.candidate && held.expires_at > now => {
                Leader { expires_at, ..held }
            }
            Some(held) if held.expires_at <= now => Leader {
                leader_id: params.candidate.clone(),
                term: held.term + 1,
                elected_at: now,
                expires_at,
            },
            Some(held) => held,
        };
        let view = leader.view(now);
        self.leader = Some(leader);
        Ok(view)
    }

    pub(crate) fn leader_resign(&mut self, leader_id: &str, term: i64, now: DateTime<Utc>) -> bool {
        match &mut self.leader {
            Some(held)
                if held.leader_id == leader_id && held.term == term && held.expires_at > now =>
            {
                held.expires_at = now;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn leader_get(&self, now: DateTime<Utc>) -> Option<Leadership> {
        self.leader.as_ref().map(|held| held.view(now))
    }

    pub(crate) fn process_register(
        &mut self,
        spec: &ProcessSpec,
        now: DateTime<Utc>,
    ) -> StoreResult<ProcessInfo> {
        validate_process(spec)?;
        let started_at = match self.processes.get(&spec.id) {
            Some(old) if old.spec.host == spec.host && old.spec.pid == spec.pid => old.started_at,
            _ => now,
        };
        let info = ProcessInfo {
            spec: spec.clone(),
            started_at,
            last_seen_at: now,
        };
        self.processes.insert(spec.id.clone(), info.clone());
        Ok(info)
    }

    pub(crate) fn process_remove(&mut self, id: &str) -> bool {
        self.processes.remove(id).is_some()
    }

    pub(crate) fn process_list(&self) -> Vec<ProcessInfo> {
        self.processes.values().cloned().collect()
    }

    pub(crate) fn process_prune(&mut self, older_than_ms: i64, now: DateTime<Utc>) -> u64 {
        let cutoff = TimeDelta::try_milliseconds(older_than_ms)
            .and_then(|age| now.checked_sub_signed(age))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let before = self.processes.len();
        self.processes.retain(|_, p| p.last_seen_at >= cutoff);
        (before - self.processes.len()) as u64
    }
}

fn new_queue(name: &str, now: DateTime<Utc>) -> QueueInfo {
    QueueInfo {
        name: name.to_owned(),
        paused: false,
        paused_at: None,
        max_running: None,
        created_at: now,
        updated_at: now,
    }
}
