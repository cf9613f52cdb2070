//! The operator commands: `faultline queue list | pause NAME | resume NAME | limit NAME`,
//! `faultline worker list` and `faultline job expire-lease ID`. Each connects to the database at `--database-url` / `DATABASE_URL`
//! (and refuses an unmigrated one), asks the store, and prints a table or the queue's new state.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::error::ErrorKind;
use clap::{ArgMatches, Args, Subcommand};
use faultline_ports::domain::{Job, JobState};
use faultline_ports::{
    JobStore, Leadership, ProcessInfo, QueueInfo, QueueLimits, QueueStats, StoreError,
};
use faultline_postgres::PgStore;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::database::{self, Unready};
use crate::options::DatabaseArgs;

/// `application_name` of the operator commands' connections.
const ADMIN_APPLICATION_NAME: &str = "faultline-admin";

/// How long connecting (or waiting for a connection) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `faultline queue`.
#[derive(Debug, Args)]
pub(crate) struct QueueCommand {
    #[command(subcommand)]
    pub(crate) action: QueueAction,
}

/// What `faultline queue` does.
#[derive(Debug, Subcommand)]
pub(crate) enum QueueAction {
    /// List every queue that has a job or a row: paused or not, jobs per state, and the age of
    /// the oldest job that is due but not yet claimed.
    List(DatabaseOnly),
    /// Pause a queue: from now on no worker and no HTTP lease request claims its jobs (running
    /// jobs finish); enqueues still succeed. Pausing a paused queue changes nothing.
    Pause(QueueName),
    /// Resume a queue: its due jobs are claimed again at once. Resuming an active queue changes
    /// nothing.
    Resume(QueueName),
    /// Set a queue's flow-control limits (the whole set: a limit not given is removed).
    Limit(QueueLimitArgs),
}

/// `faultline queue limit NAME --max-running N|none`.
#[derive(Debug, Args)]
pub(crate) struct QueueLimitArgs {
    /// The queue (created, as a row, if it has none yet).
    #[arg(value_name = "NAME")]
    pub(crate) name: String,

    /// The most jobs of the queue that may run at once across every worker and HTTP lease
    /// holder (1 to 1000000), or `none` for no bound. Counted by the database inside each claim;
    /// held-back jobs stay queued without spending an attempt. Effective for every claim that
    /// starts after the command returns; a lower bound stops no running job.
    #[arg(long, value_name = "N|none", value_parser = parse_max_running, allow_negative_numbers = true)]
    pub(crate) max_running: Bound,

    #[command(flatten)]
    pub(crate) database: DatabaseArgs,
}

/// A bound or none, as `--max-running` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bound(pub(crate) Option<i32>);

fn parse_max_running(text: &str) -> Result<Bound, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(Bound(None));
    }
    match text.parse::<i32>() {
        Ok(n) if (1..=QueueLimits::MAX_RUNNING).contains(&n) => Ok(Bound(Some(n))),
        _ => Err(format!(
            "expected a whole number from 1 to {} or `none`",
            QueueLimits::MAX_RUNNING
        )),
    }
}

/// Only the database.
#[derive(Debug, Args)]
pub(crate) struct DatabaseOnly {
    #[command(flatten)]
    pub(crate) database: DatabaseArgs,
}

/// A queue's name and the database.
#[derive(Debug, Args)]
pub(crate) struct QueueName {
    /// The queue (created, as a row, if it has none yet).
    #[arg(value_name = "NAME")]
    pub(crate) name: String,

    #[command(flatten)]
    pub(crate) database: DatabaseArgs,
}

/// `faultline job`.
#[derive(Debug, Args)]
pub(crate) struct JobCommand {
    #[command(subcommand)]
    pub(crate) action: JobAction,
}

/// What `faultline job` does.
#[derive(Debug, Subcommand)]
pub(crate) enum JobAction {
    /// End a running job's lease now, as if it had expired (for a lease whose holder vanished):
    /// the attempt counts as failed (kind `lease_expired`); the job is retried after its backoff,
    /// fails when its attempts are spent, or ends cancelled when a cancel was requested. The
    /// holder's writes are refused from then on.
    ExpireLease(JobId),
}

/// A job's id and the database.
#[derive(Debug, Args)]
pub(crate) struct JobId {
    /// The job.
    #[arg(value_name = "ID")]
    pub(crate) id: i64,

    #[command(flatten)]
    pub(crate) database: DatabaseArgs,
}

/// What `faultline worker` does instead of running a worker.
#[derive(Debug, Subcommand)]
pub(crate) enum WorkerAction {
    /// List the registered processes (workers, API servers, dev) and mark the maintenance
    /// leader.
    List(WorkerList),
}

/// `faultline worker list` options.
#[derive(Debug, Args)]
pub(crate) struct WorkerList {
    /// PostgreSQL connection URL, e.g. postgres://user@localhost:5432/faultline.
    // Global: a value given after `list` also reaches `worker`'s own (required) --database-url,
    // which `faultline worker list` uses; a global argument cannot itself be required.
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "URL",
        hide_env_values = true,
        global = true
    )]
    pub(crate) database_url: Option<String>,
}

/// The error for `faultline worker list` without `--database-url` or `DATABASE_URL` (clap cannot
/// require that option itself: it is global), if that is what `matches` holds.
pub(crate) fn missing_database_url(
    command: &mut clap::Command,
    matches: &ArgMatches,
) -> Option<clap::Error> {
    let ("worker", worker) = matches.subcommand()? else {
        return None;
    };
    let ("list", list) = worker.subcommand()? else {
        return None;
    };
    if list.contains_id("database_url") {
        return None;
    }
    let list = command
        .find_subcommand_mut("worker")?
        .find_subcommand_mut("list")?;
    Some(list.error(
        ErrorKind::MissingRequiredArgument,
        "the following required arguments were not provided:\n  --database-url <URL> (or the \
         environment variable DATABASE_URL)",
    ))
}

/// Runs `faultline queue ...`.
pub(crate) async fn queue(command: QueueCommand) -> anyhow::Result<()> {
    match command.action {
        QueueAction::List(args) => {
            let (store, pool) = connect(&args.database.database_url).await?;
            let listed = tokio::try_join!(store.queue_stats(), store.queue_list());
            pool.close().await;
            let (stats, rows) = listed.context("read the queues")?;
            print!("{}", queue_table(stats, rows, Utc::now()));
        }
        QueueAction::Pause(args) => set_paused(args, true).await?,
        QueueAction::Resume(args) => set_paused(args, false).await?,
        QueueAction::Limit(args) => {
            faultline_ports::validate_queue_name(&args.name)?;
            let limits = QueueLimits {
                max_running: args.max_running.0,
            };
            let (store, pool) = connect(&args.database.database_url).await?;
            let changed = store.queue_set_limits(&args.name, &limits).await;
            pool.close().await;
            let queue =
                changed.with_context(|| format!("set the limits of queue {:?}", args.name))?;
            println!("{}", limits_line(&queue));
        }
    }
    Ok(())
}

/// One line: the queue's limits after `queue limit`.
fn limits_line(queue: &QueueInfo) -> String {
    match queue.max_running {
        Some(n) => format!("queue {}: at most {n} running at once", queue.name),
        None => format!("queue {}: no bound on running jobs", queue.name),
    }
}

/// `faultline queue pause|resume NAME`.
async fn set_paused(args: QueueName, paused: bool) -> anyhow::Result<()> {
    faultline_ports::validate_queue_name(&args.name)?;
    let (store, pool) = connect(&args.database.database_url).await?;
    let changed = if paused {
        store.queue_pause(&args.name).await
    } else {
        store.queue_resume(&args.name).await
    };
    pool.close().await;
    let queue = changed.with_context(|| {
        let action = if paused { "pause" } else { "resume" };
        format!("{action} queue {:?}", args.name)
    })?;
    println!("{}", queue_state(&queue));
    Ok(())
}

/// Runs `faultline job ...`.
pub(crate) async fn job(command: JobCommand) -> anyhow::Result<()> {
    match command.action {
        JobAction::ExpireLease(args) => {
            let (store, pool) = connect(&args.database.database_url).await?;
            let expired = store.job_expire_lease(args.id).await;
            pool.close().await;
            let job = match expired {
                Ok(job) => job,
                Err(StoreError::NotFound { id }) => anyhow::bail!("job {id} not found"),
                Err(StoreError::IllegalTransition { id, from, .. }) => {
                    anyhow::bail!("job {id} is {from}, not running: it holds no lease to expire")
                }
                Err(error) => {
                    return Err(anyhow::Error::new(error))
                        .with_context(|| format!("expire the lease of job {}", args.id));
                }
            };
            println!("{}", expired_line(&job));
        }
    }
    Ok(())
}

/// One line: the job after its lease was expired.
fn expired_line(job: &Job) -> String {
    let attempt = format!(
        "job {}: lease expired, attempt {} of {} counted as failed",
        job.id, job.attempts, job.max_attempts
    );
    match job.state {
        JobState::Queued => format!("{attempt}; queued again, due {}", instant(job.next_run_at)),
        JobState::Failed => format!("{attempt}; failed (no attempts left)"),
        JobState::Cancelled => format!("{attempt}; cancelled (a cancel was requested)"),
        other => format!("{attempt}; now {other}"),
    }
}

/// Runs `faultline worker list`, on the database of `database_url`.
pub(crate) async fn worker_list(database_url: &str) -> anyhow::Result<()> {
    let (store, pool) = connect(database_url).await?;
    let listed = tokio::try_join!(store.process_list(), store.leader_get());
    pool.close().await;
    let (processes, leader) = listed.context("read the processes")?;
    print!("{}", worker_table(&processes, leader.as_ref(), Utc::now()));
    Ok(())
}

/// A store on a small pool for `url`, after checking that the schema is migrated.
async fn connect(url: &str) -> anyhow::Result<(PgStore, PgPool)> {
    let options = database::connect_options(url, ADMIN_APPLICATION_NAME)?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .context("connect to the database (--database-url / DATABASE_URL)")?;
    let missing = match pool.acquire().await {
        Ok(mut conn) => database::missing_migrations(&mut conn).await,
        Err(error) => Err(Unready::Transient(anyhow::Error::new(error))),
    };
    let missing = match missing {
        Ok(missing) => missing,
        Err(Unready::Transient(error) | Unready::Fatal(error)) => {
            pool.close().await;
            return Err(error.context("read the database's schema version"));
        }
    };
    if !missing.is_empty() {
        pool.close().await;
        anyhow::bail!(
            "the database schema is not migrated (missing: {}); run `faultline migrate` with the \
             same DATABASE_URL first",
            missing.join(", ")
        );
    }
    Ok((PgStore::new(pool.clone()), pool))
}

/// One line: the queue's state after a pause or resume.
fn queue_state(queue: &QueueInfo) -> String {
    match (queue.paused, queue.paused_at) {
        (true, Some(at)) => format!("queue {} is paused (since {})", queue.name, instant(at)),
        (true, None) => format!("queue {} is paused", queue.name),
        (false, _) => format!("queue {} is active (not paused)", queue.name),
    }
}

/// The `queue list` table: every queue with a job or a row, sorted by name (byte order).
fn queue_table(stats: Vec<QueueStats>, rows: Vec<QueueInfo>, now: DateTime<Utc>) -> String {
    let mut queues: BTreeMap<String, (Option<QueueStats>, Option<QueueInfo>)> = BTreeMap::new();
    for s in stats {
        let entry = queues.entry(s.queue.clone()).or_default();
        entry.0 = Some(s);
    }
    for row in rows {
        let entry = queues.entry(row.name.clone()).or_default();
        entry.1 = Some(row);
    }
    if queues.is_empty() {
        return "no queues (a queue appears with its first job, or when it is paused)\n".to_owned();
    }
    let mut table = Table::new([
        "QUEUE",
        "PAUSED",
        "QUEUED",
        "RUNNING",
        "SUCCEEDED",
        "FAILED",
        "CANCELLED",
        "MAX RUNNING",
        "OLDEST READY",
    ]);
    for (name, (stats, row)) in queues {
        let count = |state| stats.as_ref().map_or(0, |s| s.count(state)).to_string();
        let paused = match row {
            Some(QueueInfo {
                paused: true,
                paused_at: Some(at),
                ..
            }) => format!("yes, since {}", instant(at)),
            Some(QueueInfo { paused: true, .. }) => "yes".to_owned(),
            _ => "no".to_owned(),
        };
        let max_running = row
            .as_ref()
            .and_then(|r| r.max_running)
            .map_or_else(|| "-".to_owned(), |n| n.to_string());
        let oldest = stats
            .as_ref()
            .and_then(|s| s.oldest_ready_at)
            .map_or_else(|| "-".to_owned(), |at| age(now - at));
        table.row([
            name,
            paused,
            count(JobState::Queued),
            count(JobState::Running),
            count(JobState::Succeeded),
            count(JobState::Failed),
            count(JobState::Cancelled),
            max_running,
            oldest,
        ]);
    }
    table.render()
}

/// The `worker list` table, then a line about the leadership.
fn worker_table(
    processes: &[ProcessInfo],
    leader: Option<&Leadership>,
    now: DateTime<Utc>,
) -> String {
    let leads = |id: &str| leader.is_some_and(|l| l.remaining_ms > 0 && l.leader_id == id);
    let mut out = if processes.is_empty() {
        "no registered processes\n".to_owned()
    } else {
        let mut table = Table::new([
            "ID",
            "ROLE",
            "HOST",
            "PID",
            "VERSION",
            "QUEUES",
            "STARTED",
            "LAST SEEN",
            "LEADER",
        ]);
        for process in processes {
            let spec = &process.spec;
            let queues: Vec<String> = spec
                .queues
                .iter()
                .map(|q| format!("{}={}", q.queue, q.slots))
                .collect();
            table.row([
                spec.id.clone(),
                spec.role.clone(),
                spec.host.clone(),
                spec.pid.to_string(),
                spec.version.clone(),
                if queues.is_empty() {
                    "-".to_owned()
                } else {
                    queues.join(",")
                },
                instant(process.started_at),
                format!("{} ago", age(now - process.last_seen_at)),
                if leads(&spec.id) { "yes" } else { "-" }.to_owned(),
            ]);
        }
        table.render()
    };
    let line = match leader {
        Some(l) if l.remaining_ms > 0 => format!(
            "leader: {} (term {}, elected {}, lease until {})",
            l.leader_id,
            l.term,
            instant(l.elected_at),
            instant(l.expires_at)
        ),
        Some(l) => format!(
            "leader: none (the leadership of {} lapsed at {}; the next candidate takes over)",
            l.leader_id,
            instant(l.expires_at)
        ),
        None => "leader: none (no process has led yet)".to_owned(),
    };
    out.push_str(&line);
    out.push('\n');
    out
}

/// An instant as RFC 3339 in UTC, to the second.
fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A duration for people: `850ms`, `42s`, `5m 3s`, `2h 10m`, `3d 4h` (never negative: a clock
/// behind the database's shows `0s`).
fn age(elapsed: chrono::TimeDelta) -> String {
    let ms = elapsed.num_milliseconds().max(0);
    let s = ms / 1000;
    match s {
        0 if ms > 0 => format!("{ms}ms"),
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m {}s", s / 60, s % 60),
        3_600..86_400 => format!("{}h {}m", s / 3_600, s % 3_600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3_600),
    }
}

/// A plain text table: columns separated by two spaces, numbers aligned right.
struct Table<const N: usize> {
    headers: [&'static str; N],
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    fn new(headers: [&'static str; N]) -> Self {
        Table {
            headers,
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: [String; N]) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let mut widths = self.headers.map(|h| h.chars().count());
        let mut numeric = [true; N];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
                numeric[i] &= cell.parse::<i64>().is_ok();
            }
        }
        let mut out = String::new();
        let headers = self.headers.map(str::to_owned);
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(widths[i] - cell.chars().count());
                if numeric[i] {
                    line.push_str(&pad);
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&pad);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use clap::Parser;
    use faultline_ports::{ProcessSpec, QueueSlots};

    use super::*;
    use crate::{Cli, Command};

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn row(name: &str, paused: bool) -> QueueInfo {
        QueueInfo {
            name: name.into(),
            paused,
            paused_at: paused.then(|| at(0)),
            max_running: (!paused).then_some(5),
            created_at: at(-60),
            updated_at: at(0),
        }
    }

    fn stats(queue: &str, queued: i64, oldest_ready_at: Option<DateTime<Utc>>) -> QueueStats {
        QueueStats {
            queue: queue.into(),
            counts: vec![(JobState::Queued, queued), (JobState::Succeeded, 1234)],
            oldest_ready_at,
        }
    }

    #[test]
    fn the_queue_table_is_the_union_of_statistics_and_rows_sorted_by_name() {
        let table = queue_table(
            vec![stats("b-busy", 7, Some(at(-65))), stats("a-old", 0, None)],
            vec![row("c-idle", true), row("b-busy", false)],
            at(0),
        );
        assert_eq!(
            table,
            "\
QUEUE   PAUSED                           QUEUED  RUNNING  SUCCEEDED  FAILED  CANCELLED  MAX RUNNING  OLDEST READY
a-old   no                                    0        0       1234       0          0  -            -
b-busy  no                                    7        0       1234       0          0  5            1m 5s
c-idle  yes, since 2027-01-15T08:00:00Z       0        0          0       0          0  -            -
"
        );
        assert!(queue_table(Vec::new(), Vec::new(), at(0)).starts_with("no queues"));
    }

    fn process(id: &str, queues: &[(&str, u32)]) -> ProcessInfo {
        ProcessInfo {
            spec: ProcessSpec {
                id: id.into(),
                role: "worker".into(),
                host: "node-1".into(),
                pid: 42,
                version: "0.1.0".into(),
                queues: queues
                    .iter()
                    .map(|(queue, slots)| QueueSlots {
                        queue: (*queue).into(),
                        slots: *slots,
                    })
                    .collect(),
            },
            started_at: at(-3_700),
            last_seen_at: at(-2),
        }
    }

    fn leadership(id: &str, remaining_ms: i64) -> Leadership {
        Leadership {
            leader_id: id.into(),
            term: 3,
            elected_at: at(-100),
            expires_at: at(remaining_ms / 1000),
            remaining_ms,
        }
    }

    #[test]
    fn the_worker_table_marks_only_an_unexpired_leader() {
        let processes = [
            process("w-1", &[("email", 10), ("default", 32)]),
            process("w-2", &[]),
        ];
        let table = worker_table(&processes, Some(&leadership("w-2", 15_000)), at(0));
        assert_eq!(
            table,
            "\
ID   ROLE    HOST    PID  VERSION  QUEUES               STARTED               LAST SEEN  LEADER
w-1  worker  node-1   42  0.1.0    email=10,default=32  2027-01-15T06:58:20Z  2s ago     -
w-2  worker  node-1   42  0.1.0    -                    2027-01-15T06:58:20Z  2s ago     yes
leader: w-2 (term 3, elected 2027-01-15T07:58:20Z, lease until 2027-01-15T08:00:15Z)
"
        );
        let lapsed = worker_table(&processes, Some(&leadership("w-2", -1)), at(0));
        assert!(!lapsed.contains("yes"), "{lapsed}");
        assert!(
            lapsed.ends_with("leader: none (the leadership of w-2 lapsed at 2027-01-15T08:00:00Z; the next candidate takes over)\n"),
            "{lapsed}"
        );
        let nobody = worker_table(&[], None, at(0));
        assert_eq!(
            nobody,
            "no registered processes\nleader: none (no process has led yet)\n"
        );
    }

    #[test]
    fn ages_read_like_people_say_them() {
        let cases = [
            (-5_000, "0s"),
            (0, "0s"),
            (850, "850ms"),
            (42_000, "42s"),
            (303_000, "5m 3s"),
            (7_800_000, "2h 10m"),
            (273_600_000, "3d 4h"),
        ];
        for (ms, text) in cases {
            assert_eq!(age(TimeDelta::milliseconds(ms)), text, "{ms}");
        }
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("faultline").chain(args.iter().copied()))
    }

    #[test]
    fn queue_commands_parse() {
        let cli = parse(&[
            "queue",
            "pause",
            "mail",
            "--database-url",
            "postgres://x/db",
        ])
        .unwrap();
        let Command::Queue(QueueCommand {
            action: QueueAction::Pause(args),
        }) = cli.command
        else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(args.name, "mail");
        assert_eq!(args.database.database_url, "postgres://x/db");
        assert!(parse(&["queue", "pause", "--database-url", "postgres://x/db"]).is_err());
        assert!(parse(&["queue", "list", "--database-url", "postgres://x/db"]).is_ok());
        assert!(parse(&["queue", "--database-url", "postgres://x/db"]).is_err());
    }

    #[test]
    fn worker_list_takes_the_database_url_before_or_after_list() {
        for args in [
            &["worker", "list", "--database-url", "postgres://x/db"][..],
            &["worker", "--database-url", "postgres://x/db", "list"],
        ] {
            let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let Command::Worker(worker) = cli.command else {
                panic!("{:?}", cli.command);
            };
            assert!(
                matches!(worker.command, Some(WorkerAction::List(_))),
                "{args:?}"
            );
            assert_eq!(worker.database.database_url, "postgres://x/db", "{args:?}");
        }
        let cli = parse(&["worker", "--database-url", "postgres://x/db"]).unwrap();
        let Command::Worker(worker) = cli.command else {
            panic!("{:?}", cli.command);
        };
        assert!(worker.command.is_none(), "plain `worker` runs a worker");
    }
}
