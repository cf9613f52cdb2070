//! The leader sampler of `leader-failover`: about every 100 ms, on a connection of its own, it
//! reads the leader row (with the database's clock and the seeded jobs left), scrapes every
//! process's `faultline_leader` gauge, and reads the row again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use faultline_ports::telemetry::names;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::time::MissedTickBehavior;

use super::SEED_QUEUE;
use crate::drill::fleet::{Fleet, ProcId};
use crate::drill::probe::{Background, http_client, scrape};

/// The sampler's cadence.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Where a sampled process stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Started, not scraped yet (its `/metrics` may not listen yet).
    Starting,
    /// Scraped at least once.
    Live,
    /// SIGKILLed by the drill (it cannot answer any more).
    Killed,
}

/// A process the sampler scrapes.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    url: String,
    stage: Stage,
}

/// The processes to sample, shared by the drill (which starts and kills them) and the sampler.
#[derive(Debug, Clone, Default)]
pub(super) struct Targets(Arc<Mutex<Vec<Target>>>);

impl Targets {
    fn with<T>(&self, f: impl FnOnce(&mut Vec<Target>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Adds a started worker.
    pub(super) fn add(&self, fleet: &Fleet, id: ProcId) {
        let Some(url) = fleet.metrics_url(id) else {
            return;
        };
        let target = Target {
            name: fleet.name(id).to_owned(),
            url: url.to_owned(),
            stage: Stage::Starting,
        };
        self.with(|targets| targets.push(target));
    }

    /// Marks `name` killed (before the signal, so its silence is expected; while it is not
    /// reaped yet it is still scraped, and counted should it answer).
    pub(super) fn killed(&self, name: &str) {
        self.set(name, Stage::Killed);
    }

    /// Forgets `name` (reaped).
    pub(super) fn remove(&self, name: &str) {
        self.with(|targets| targets.retain(|t| t.name != name));
    }

    fn set(&self, name: &str, stage: Stage) {
        self.with(|targets| {
            for target in targets.iter_mut().filter(|t| t.name == name) {
                if target.stage != Stage::Killed {
                    target.stage = stage;
                }
            }
        });
    }

    fn stage(&self, name: &str) -> Option<Stage> {
        self.with(|targets| targets.iter().find(|t| t.name == name).map(|t| t.stage))
    }
}

/// The leader row as one read saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    leader: String,
    term: i64,
    /// `expires_at` was still ahead of the database's clock.
    live: bool,
}

/// One look at the leadership: the row, every process's gauge, the row again.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    pub(super) at: Instant,
    /// The database's clock at the first read.
    pub(super) now: DateTime<Utc>,
    before: Option<Holder>,
    after: Option<Holder>,
    /// The processes whose `faultline_leader` was 1.
    pub(super) leading: Vec<String>,
    /// Live processes that could not be scraped (killed and starting ones are expected silent).
    pub(super) unscraped: Vec<String>,
    /// The seeded jobs still present at the first read.
    pub(super) seeded: Vec<i64>,
    pub(super) db_failed: bool,
}

impl Sample {
    /// Whether `process` held a live leadership in the row before or after the scrapes.
    pub(super) fn holds(&self, process: &str) -> bool {
        [&self.before, &self.after]
            .into_iter()
            .flatten()
            .any(|h| h.live && h.leader == process)
    }

    /// Whether the row had a live holder both before and after the scrapes.
    pub(super) fn row_live(&self) -> bool {
        [&self.before, &self.after]
            .into_iter()
            .all(|h| h.as_ref().is_some_and(|h| h.live))
    }

    pub(super) fn describe(&self) -> String {
        let row = |h: &Option<Holder>| {
            h.as_ref().map_or_else(
                || "none".to_owned(),
                |h| {
                    format!(
                        "{} term {}{}",
                        h.leader,
                        h.term,
                        if h.live { "" } else { " (lapsed)" }
                    )
                },
            )
        };
        format!(
            "at {}: leading {:?}, row {} then {}",
            self.now.format("%H:%M:%S%.3f"),
            self.leading,
            row(&self.before),
            row(&self.after)
        )
    }
}

/// The sampler: a task of its own, on a pool of its own, every `SAMPLE_EVERY`.
pub(super) struct Sampler {
    stop: Arc<AtomicBool>,
    task: Background<Vec<Sample>>,
}

impl Sampler {
    pub(super) async fn start(url: &str, targets: Targets) -> anyhow::Result<Sampler> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect(url)
            .await
            .context("the sampler's connection")?;
        // A scrape that takes longer than a sampling round counts as not scraped.
        let client = http_client(Duration::from_secs(1))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = Background::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut samples = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                tick.tick().await;
                samples.push(sample_once(&pool, &client, &targets).await);
            }
            pool.close().await;
            samples
        });
        Ok(Sampler { stop, task })
    }

    pub(super) async fn stop(self) -> anyhow::Result<Vec<Sample>> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.join().await
    }
}

/// The leader row, the database's clock and the seeded jobs left, in one statement.
async fn read_row(pool: &PgPool) -> anyhow::Result<(DateTime<Utc>, Option<Holder>, Vec<i64>)> {
    let (now, leader, term, live, seeded): (
        DateTime<Utc>,
        Option<String>,
        Option<i64>,
        bool,
        Vec<i64>,
    ) = sqlx::query_as(
        "select clock_timestamp(), l.leader_id, l.term,
                    coalesce(l.expires_at > clock_timestamp(), false),
                    array(select id from faultline_jobs where queue = $1 order by id)
             from (select 1) as one
             left join faultline_leader l on l.name = 'maintenance'",
    )
    .bind(SEED_QUEUE)
    .fetch_one(pool)
    .await?;
    let holder = leader
        .zip(term)
        .map(|(leader, term)| Holder { leader, term, live });
    Ok((now, holder, seeded))
}

async fn sample_once(pool: &PgPool, client: &reqwest::Client, targets: &Targets) -> Sample {
    let at = Instant::now();
    let first = read_row(pool).await;
    let snapshot = targets.with(|t| t.clone());
    let mut scrapes = tokio::task::JoinSet::new();
    for target in snapshot {
        let client = client.clone();
        scrapes.spawn(async move {
            let gauge = scrape(&client, &target.url)
                .await
                .map(|m| m.value(names::LEADER, &[]));
            (target.name, gauge)
        });
    }
    let mut leading = Vec::new();
    let mut unscraped = Vec::new();
    while let Some(joined) = scrapes.join_next().await {
        let Ok((name, gauge)) = joined else {
            continue;
        };
        match gauge {
            Ok(gauge) => {
                targets.set(&name, Stage::Live);
                if gauge == 1.0 {
                    leading.push(name);
                }
            }
            // Killed (or reaped) meanwhile, or not listening yet: expected silence.
            Err(_) if targets.stage(&name) != Some(Stage::Live) => {}
            Err(_) => unscraped.push(name),
        }
    }
    leading.sort();
    let second = read_row(pool).await;
    let db_failed = first.is_err() || second.is_err();
    let (now, before, seeded) =
        first.unwrap_or_else(|_| (DateTime::<Utc>::MIN_UTC, None, Vec::new()));
    Sample {
        at,
        now,
        before,
        after: second.ok().and_then(|(_, holder, _)| holder),
        leading,
        unscraped,
        seeded,
        db_failed,
    }
}
