//! [`Maintenance`]: the services that keep the database tidy for every process — the rescuer
//! (expired leases), the pruner (finished jobs past their retention) and the reaper (process
//! entries not seen for a while) — run by exactly one process at a time, the elected leader; and
//! the process registry entry every process keeps fresh.
//!
//! Leadership is a row lease in the database (see `docs/adr/0001-leader-row-lease.md`): a
//! candidate asks `JobStore::leader_elect` every election interval; the holder renews it. The
//! leader measures its own end of leadership on its monotonic clock from the time left *as the
//! database computed it*, counted from the moment it sent the request (an instant before the
//! database's own now), so no wall clock is ever compared with a database timestamp. It acts only
//! while more than a safety margin of that time is left, so a leader whose renewals fail stops
//! before its lease ends; a new leader takes over at the latest one election interval after the
//! lease lapses (at once when the old leader resigned at shutdown).
//!
//! Each service is safe even if two processes ran it at once (the rescue and prune statements
//! skip rows other statements hold and re-check every condition): the election bounds the work,
//! it is not what makes the work correct.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use faultline_ports::telemetry::{labels, names};
use faultline_ports::{
    ElectParams, JobStore, LabelGuard, ProcessSpec, PruneParams, StoreError, StoreResult,
};
use metrics::{counter, gauge, histogram};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, millis};
use crate::telemetry;

/// How the maintenance of one process runs. Every field has a production default
/// ([`MaintenanceConfig::new`]); the binary maps its flags onto these fields, tests shorten the
/// timers.
#[derive(Debug, Clone, PartialEq)]
pub struct MaintenanceConfig {
    /// This process: its registry entry, and its name as a leadership candidate.
    pub process: ProcessSpec,
    /// Whether this process may lead (`--maintenance off`: never; it still registers itself).
    /// Default: `true`.
    pub lead: bool,
    /// Length of a leadership lease, renewed every `election_interval`. Default: 15 s.
    pub leader_lease: Duration,
    /// How often the leader renews and the other candidates ask; twice this must fit in the
    /// lease minus the leader's safety margin (a quarter of the lease). `None`: a third of the
    /// lease. Default: `None` (5 s).
    pub election_interval: Option<Duration>,
    /// How often this process refreshes its registry entry. Default: 10 s.
    pub process_heartbeat: Duration,
    /// The leader removes registry entries not refreshed for this long. Default: 60 s.
    pub process_expiry: Duration,
    /// How often the leader rescues expired leases; `None` turns the rescuer off. Default: 15 s.
    pub rescue_interval: Option<Duration>,
    /// Leases rescued per statement; the rescuer repeats until fewer come back. Default: 1 000.
    pub rescue_batch_size: u32,
    /// How often the leader deletes finished jobs past their retention; `None` turns the pruner
    /// off. Default: 60 s.
    pub prune_interval: Option<Duration>,
    /// How long `succeeded` jobs are kept after they finished. Default: 24 h.
    pub retain_succeeded: Duration,
    /// How long `failed` jobs are kept after they finished. Default: 7 days.
    pub retain_failed: Duration,
    /// How long `cancelled` jobs are kept after they finished. Default: 7 days.
    pub retain_cancelled: Duration,
    /// Jobs deleted per statement; the pruner repeats until fewer come back. Default: 1 000.
    pub prune_batch_size: u32,
    /// A store call that takes longer than this counts as failed. Default: 10 s.
    pub store_timeout: Duration,
}

const HOUR: Duration = Duration::from_secs(3_600);

impl MaintenanceConfig {
    /// The production defaults for `process`.
    pub fn new(process: ProcessSpec) -> Self {
        Self {
            process,
            lead: true,
            leader_lease: Duration::from_secs(15),
            election_interval: None,
            process_heartbeat: Duration::from_secs(10),
            process_expiry: Duration::from_secs(60),
            rescue_interval: Some(Duration::from_secs(15)),
            rescue_batch_size: 1_000,
            prune_interval: Some(Duration::from_secs(60)),
            retain_succeeded: 24 * HOUR,
            retain_failed: 7 * 24 * HOUR,
            retain_cancelled: 7 * 24 * HOUR,
            prune_batch_size: 1_000,
            store_timeout: Duration::from_secs(10),
        }
    }

    /// The effective election interval: `election_interval`, else a third of the lease.
    pub fn election_every(&self) -> Duration {
        self.election_interval.unwrap_or(self.leader_lease / 3)
    }

    /// How much of its leadership a leader keeps in reserve: it stops acting this long before
    /// its lease ends by its own conservative reckoning (a quarter of the lease).
    pub fn leader_margin(&self) -> Duration {
        self.leader_lease / 4
    }

    /// The pruner's parameters.
    pub fn prune_params(&self) -> PruneParams {
        PruneParams {
            succeeded_retention_ms: millis(self.retain_succeeded),
            failed_retention_ms: millis(self.retain_failed),
            cancelled_retention_ms: millis(self.retain_cancelled),
            limit: self.prune_batch_size,
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: &str| {
            Err(ConfigError {
                field,
                reason: reason.to_owned(),
            })
        };
        faultline_ports::validate_process(&self.process).map_err(|err| ConfigError {
            field: "process",
            reason: err.to_string(),
        })?;
        if self.leader_lease < Duration::from_millis(4) {
            return bad("leader_lease", "must be at least 4 ms");
        }
        let every = self.election_every();
        if every.is_zero() || every * 2 > self.leader_lease - self.leader_margin() {
            return bad(
                "election_interval",
                "must be above zero and leave room for two renewals within three quarters of \
                 the leader lease",
            );
        }
        let positive = [
            ("process_heartbeat", self.process_heartbeat),
            ("process_expiry", self.process_expiry),
            ("store_timeout", self.store_timeout),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                return bad(field, "must be above zero");
            }
        }
        if self.process_expiry <= self.process_heartbeat {
            return bad("process_expiry", "must be longer than process_heartbeat");
        }
        for (field, value) in [
            ("rescue_interval", self.rescue_interval),
            ("prune_interval", self.prune_interval),
        ] {
            if value.is_some_and(|interval| interval.is_zero()) {
                return bad(field, "must be above zero (None turns it off)");
            }
        }
        let limit = faultline_ports::MAX_CLAIM_LIMIT;
        for (field, value) in [
            ("rescue_batch_size", self.rescue_batch_size),
            ("prune_batch_size", self.prune_batch_size),
        ] {
            if !(1..=limit).contains(&value) {
                return bad(field, &format!("must be between 1 and {limit}"));
            }
        }
        Ok(())
    }
}

/// The leadership as this process knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Someone else leads, or nobody (as far as this process knows).
    Follower,
    /// This process leads in `term` until `until` by its monotonic clock (conservatively early).
    Leader { term: i64, until: Instant },
}

/// The maintenance services of one process (see the module docs). Production calls
/// [`Maintenance::run`]; tests drive the step methods ([`Maintenance::elect_once`],
/// [`Maintenance::rescue_once`], ...), which never sleep.
pub struct Maintenance<S: JobStore> {
    store: Arc<S>,
    config: MaintenanceConfig,
    role: Role,
    labels: LabelGuard,
    /// Shared with [`MaintenanceHandle`]s.
    leading: Arc<AtomicBool>,
}

/// Tells from outside whether a [`Maintenance`] leads right now.
#[derive(Debug, Clone)]
pub struct MaintenanceHandle {
    leading: Arc<AtomicBool>,
}

impl MaintenanceHandle {
    /// Whether the process leads now (and acts as leader).
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }
}

impl<S: JobStore> std::fmt::Debug for Maintenance<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maintenance")
            .field("process", &self.config.process.id)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// A maintenance service, for metrics and logs.
#[derive(Debug, Clone, Copy)]
enum Service {
    Rescuer,
    Pruner,
    Reaper,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Rescuer => "rescuer",
            Service::Pruner => "pruner",
            Service::Reaper => "reaper",
        }
    }
}

impl<S: JobStore> Maintenance<S> {
    /// The maintenance of the process described by `config`, on `store`. Refuses an invalid
    /// configuration.
    pub fn new(store: Arc<S>, config: MaintenanceConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        gauge!(names::LEADER).set(0.0);
        Ok(Self {
            store,
            config,
            role: Role::Follower,
            labels: LabelGuard::default(),
            leading: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Folds the `queue` and `kind` label values of the rescuer's metrics through `labels` (share
    /// the process's one guard).
    pub fn with_metric_labels(mut self, labels: LabelGuard) -> Self {
        self.labels = labels;
        self
    }

    /// A handle that tells whether this process leads, readable while [`Maintenance::run`] runs.
    pub fn handle(&self) -> MaintenanceHandle {
        MaintenanceHandle {
            leading: self.leading.clone(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MaintenanceConfig {
        &self.config
    }

    /// Whether this process leads now: it holds the leadership and more than the safety margin
    /// of it is left by its own clock.
    pub fn is_leader(&self) -> bool {
        match self.role {
            Role::Leader { until, .. } => Instant::now() + self.config.leader_margin() < until,
            Role::Follower => false,
        }
    }

    /// The term this process leads in, while [`Maintenance::is_leader`].
    pub fn term(&self) -> Option<i64> {
        match self.role {
            Role::Leader { term, .. } if self.is_leader() => Some(term),
            _ => None,
        }
    }

    /// Runs a store call with the configured timeout (a timeout is a backend error).
    async fn call<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let result = match tokio::time::timeout(self.config.store_timeout, fut).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Backend(
                format!("{what} took longer than {:?}", self.config.store_timeout).into(),
            )),
        };
        telemetry::store_call(
            what,
            !matches!(result, Err(StoreError::Backend(_))),
            result.is_err(),
        );
        if let Err(err) = &result {
            tracing::warn!(process = %self.config.process.id, error = %err, "store call failed: {what}");
        }
        result
    }

    fn set_role(&mut self, role: Role) {
        self.role = role;
        let leading = self.is_leader();
        if self.leading.swap(leading, Ordering::SeqCst) != leading {
            gauge!(names::LEADER).set(if leading { 1.0 } else { 0.0 });
        }
    }

    /// Asks for (or renews) the leadership once; returns whether this process leads afterwards.
    /// On a failed call a leader keeps leading until its own reckoning of the lease says stop.
    pub async fn elect_once(&mut self) -> StoreResult<bool> {
        if !self.config.lead {
            return Ok(false);
        }
        let params = ElectParams {
            candidate: self.config.process.id.clone(),
            ttl_ms: millis(self.config.leader_lease),
        };
        let sent = Instant::now();
        let answer = self
            .call("leader_elect", self.store.leader_elect(&params))
            .await;
        let leadership = match answer {
            Ok(leadership) => leadership,
            Err(err) => {
                if let Role::Leader { term, .. } = self.role
                    && !self.is_leader()
                {
                    tracing::warn!(term, "leadership not renewed in time: stepping down");
                    self.set_role(Role::Follower);
                }
                return Err(err);
            }
        };
        let mine = leadership.leader_id == self.config.process.id && leadership.remaining_ms > 0;
        let previous = self.role;
        if mine {
            let left = Duration::from_millis(u64::try_from(leadership.remaining_ms).unwrap_or(0));
            let until = sent + left.min(self.config.leader_lease);
            let new_term =
                !matches!(previous, Role::Leader { term, .. } if term == leadership.term);
            self.set_role(Role::Leader {
                term: leadership.term,
                until,
            });
            if new_term {
                counter!(names::LEADER_ELECTIONS_TOTAL).increment(1);
                tracing::info!(
                    process = %self.config.process.id,
                    term = leadership.term,
                    "elected maintenance leader"
                );
            }
        } else {
            if let Role::Leader { term, .. } = previous {
                tracing::warn!(
                    term,
                    leader = %leadership.leader_id,
                    "maintenance leadership lost"
                );
            }
            self.set_role(Role::Follower);
        }
        Ok(self.is_leader())
    }

    /// Gives the leadership up (a shutdown), so that another process takes over at once.
    pub async fn resign(&mut self) -> StoreResult<bool> {
        let Role::Leader { term, .. } = self.role else {
            return Ok(false);
        };
        self.set_role(Role::Follower);
        let resigned = self
            .call(
                "leader_resign",
                self.store.leader_resign(&self.config.process.id, term),
            )
            .await?;
        tracing::info!(term, resigned, "maintenance leadership given up");
        Ok(resigned)
    }

    /// Registers this process or refreshes its entry.
    pub async fn register_once(&mut self) -> StoreResult<()> {
        self.call(
            "process_register",
            self.store.process_register(&self.config.process),
        )
        .await
        .map(|_| ())
    }

    /// Removes this process's entry (a shutdown).
    pub async fn deregister(&mut self) -> StoreResult<bool> {
        self.call(
            "process_remove",
            self.store.process_remove(&self.config.process.id),
        )
        .await
    }

    /// Records one run of a service.
    fn ran<T>(&self, service: Service, started: Instant, result: &StoreResult<T>) {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        counter!(
            names::MAINTENANCE_RUNS_TOTAL,
            labels::SERVICE => service.name(),
            labels::OUTCOME => outcome,
        )
        .increment(1);
        histogram!(names::MAINTENANCE_DURATION_SECONDS, labels::SERVICE => service.name())
            .record(started.elapsed());
    }

    /// Rescues expired leases (of any process) in batches of `rescue_batch_size` until fewer
    /// come back or the leadership ends. Returns how many were rescued. A step for tests: it
    /// does not check the leadership first ([`Maintenance::run`] does).
    pub async fn rescue_once(&mut self) -> StoreResult<u64> {
        let started = Instant::now();
        let result = self.rescue_batches().await;
        self.ran(Service::Rescuer, started, &result);
        result
    }

    async fn rescue_batches(&self) -> StoreResult<u64> {
        let limit = self.config.rescue_batch_size;
        let mut total = 0;
        loop {
            let jobs = self
                .call("rescue", self.store.job_rescue_expired(limit))
                .await?;
            for job in &jobs {
                telemetry::rescued(&self.labels, job);
                tracing::info!(
                    job_id = job.id,
                    kind = %job.kind,
                    attempt = job.attempts,
                    fencing_token = job.fencing_token,
                    state = %job.state,
                    "rescued an expired lease"
                );
            }
            total += jobs.len() as u64;
            if jobs.len() < limit as usize || !self.still_leading() {
                return Ok(total);
            }
        }
    }

    /// Inside a multi-batch run: go on only while leading (tests' step calls never led).
    fn still_leading(&self) -> bool {
        matches!(self.role, Role::Follower) || self.is_leader()
    }

    /// Deletes finished jobs past their retention in batches until fewer come back. Returns how
    /// many were deleted. A step for tests, like [`Maintenance::rescue_once`].
    pub async fn prune_once(&mut self) -> StoreResult<u64> {
        let started = Instant::now();
        let result = self.prune_batches().await;
        self.ran(Service::Pruner, started, &result);
        result
    }

    async fn prune_batches(&self) -> StoreResult<u64> {
        let params = self.config.prune_params();
        let mut total = 0;
        loop {
            let deleted = self.call("prune", self.store.job_prune(&params)).await?;
            total += deleted;
            if deleted < u64::from(params.limit) || !self.still_leading() {
                if total > 0 {
                    tracing::info!(deleted = total, "pruned finished jobs past their retention");
                }
                return Ok(total);
            }
        }
    }

    /// Removes registry entries not refreshed within `process_expiry`. Returns how many.
    pub async fn reap_once(&mut self) -> StoreResult<u64> {
        let started = Instant::now();
        let older_than = millis(self.config.process_expiry);
        let result = self
            .call("process_prune", self.store.process_prune(older_than))
            .await;
        self.ran(Service::Reaper, started, &result);
        if let Ok(n) = result
            && n > 0
        {
            tracing::info!(removed = n, "removed processes not seen for a while");
        }
        result
    }

    /// Runs until `shutdown` fires: keeps the registry entry fresh, takes part in the election
    /// and, while leading, runs the rescuer, the pruner and the reaper on their intervals (each
    /// at once on becoming leader). Store errors are logged and counted, never fatal. At the end
    /// the leadership is given up and the registry entry removed.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let config = self.config.clone();
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut next_register = Instant::now();
        let mut next_elect = Instant::now();
        let (mut next_rescue, mut next_prune, mut next_reap) = (far, far, far);
        let mut was_leader = false;
        loop {
            let now = Instant::now();
            if now >= next_register {
                let _ = self.register_once().await;
                next_register = Instant::now() + config.process_heartbeat;
            }
            if config.lead && now >= next_elect {
                let _ = self.elect_once().await;
                next_elect = Instant::now() + config.election_every();
            }
            let leading = self.is_leader();
            if leading && !was_leader {
                // A new leader catches up at once.
                let now = Instant::now();
                next_rescue = config.rescue_interval.map_or(far, |_| now);
                next_prune = config.prune_interval.map_or(far, |_| now);
                next_reap = now;
            }
            was_leader = leading;
            if leading {
                if Instant::now() >= next_rescue
                    && let Some(interval) = config.rescue_interval
                {
                    let _ = self.rescue_once().await;
                    next_rescue = Instant::now() + interval;
                }
                if self.is_leader()
                    && Instant::now() >= next_prune
                    && let Some(interval) = config.prune_interval
                {
                    let _ = self.prune_once().await;
                    next_prune = Instant::now() + interval;
                }
                if self.is_leader() && Instant::now() >= next_reap {
                    let _ = self.reap_once().await;
                    next_reap = Instant::now() + config.process_heartbeat;
                }
            }
            let mut wake_at = next_register.min(if config.lead { next_elect } else { far });
            if self.is_leader() {
                wake_at = wake_at.min(next_rescue).min(next_prune).min(next_reap);
            }
            if let Role::Leader { until, .. } = self.role {
                // Wake when the leadership would lapse by our reckoning, to step down on time.
                wake_at = wake_at.min(until - config.leader_margin());
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(wake_at) => {}
            }
            if let Role::Leader { term, .. } = self.role
                && !self.is_leader()
            {
                tracing::warn!(term, "leadership not renewed in time: stepping down");
                self.set_role(Role::Follower);
            }
        }
        let _ = self.resign().await;
        let _ = self.deregister().await;
    }
}
