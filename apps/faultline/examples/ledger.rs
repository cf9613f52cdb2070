//! Exactly-once database effects: a money-transfer ledger where each job applies one transfer.
//!
//! The handler writes its effects (a ledger row, two balance updates) and completes the job in
//! ONE transaction, with the completion fenced by the attempt's lease
//! (`PgStore::job_complete_in`). A worker that lost its lease (killed, paused, partitioned) has
//! its completion refused, rolls back, and none of its writes survive; its worker writes nothing
//! more for the job (`Outcome::LeaseLost`). `ledger_transfers.job_id` is also unique, a second
//! line of defence that the fence makes unnecessary (the drill checks the fence alone would do).
//!
//! ```sh
//! export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
//! cargo run -p faultline --example ledger -- setup 1000     # tables, 10 accounts, 1000 transfer jobs
//! cargo run -p faultline --example ledger -- worker --id w1 # run a worker until Ctrl-C / SIGTERM
//! cargo run -p faultline --example ledger -- check          # one ledger row per job? exit 1 if not
//! ```
//!
//! `setup` flag: `--work-ms MIN-MAX` (5-45), how long each transfer's handler works before its
//! transaction. `worker` flags: `--id ID`, `--concurrency N` (8), `--lease-ms MS` (30000), `--poll-ms MS` (1000),
//! `--rescue-ms MS` (15000), `--leader-lease-ms MS` (15000): each worker also takes part in the
//! maintenance election, and the leader rescues expired leases. `cargo xtask drill exactly-once` runs several workers under SIGKILL and
//! SIGSTOP and then `check`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use faultline_ports::domain::JobSpec;
use faultline_ports::{ProcessSpec, QueueSlots, StoreError};
use faultline_postgres::PgStore;
use faultline_postgres::listen::{ListenOptions, spawn_listener};
use faultline_worker::{
    Handler, JobContext, Maintenance, MaintenanceConfig, Outcome, Registry, Worker, WorkerConfig,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

/// The job kind of a transfer.
const KIND: &str = "transfer";
/// Accounts 1..=ACCOUNTS, each opened with OPENING_CENTS.
const ACCOUNTS: i64 = 10;
const OPENING_CENTS: i64 = 1_000_000;

/// Applies one transfer: `{"from": 3, "to": 7, "amount_cents": 125, "work_ms": 20}`.
struct Transfer {
    store: PgStore,
    worker_id: String,
}

/// A transfer as its payload describes it.
struct Order {
    from: i64,
    to: i64,
    amount_cents: i64,
    work_ms: u64,
}

fn order_of(payload: &Value) -> Option<Order> {
    let order = Order {
        from: payload["from"].as_i64()?,
        to: payload["to"].as_i64()?,
        amount_cents: payload["amount_cents"].as_i64()?,
        work_ms: payload["work_ms"].as_u64().unwrap_or(0),
    };
    (order.from != order.to && order.amount_cents > 0).then_some(order)
}

impl Transfer {
    /// The attempt: work (outside any transaction), then effects + fenced completion in one
    /// transaction.
    async fn apply(&self, ctx: &JobContext, order: &Order) -> Result<Outcome, sqlx::Error> {
        // The slow part of a real handler (computing, calling out) happens before the
        // transaction opens, so that row locks are held for milliseconds only.
        tokio::time::sleep(Duration::from_millis(order.work_ms)).await;

        let mut tx = self.store.pool().begin().await?;
        let inserted = sqlx::query(
            "insert into ledger_transfers (job_id, from_account, to_account, amount_cents,
                 fencing_token, worker)
             values ($1, $2, $3, $4, $5, $6)
             on conflict (job_id) do nothing",
        )
        .bind(ctx.id)
        .bind(order.from)
        .bind(order.to)
        .bind(order.amount_cents)
        .bind(ctx.fencing_token)
        .bind(&self.worker_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            // A row for this job committed: only a fenced completion commits one, so the job is
            // done under a newer lease and ours is stale.
            tx.rollback().await?;
            println!(
                "ledger: job {} (token {}, attempt {}) already applied: attempt rolled back",
                ctx.id, ctx.fencing_token, ctx.attempt
            );
            return Ok(Outcome::LeaseLost);
        }
        // Both balances in one statement, in id order, so concurrent transfers cannot deadlock.
        sqlx::query(
            "update ledger_accounts
             set balance_cents = balance_cents
                 + case when id = $2 then $3 else -$3 end
             where id in ($1, $2)",
        )
        .bind(order.from)
        .bind(order.to)
        .bind(order.amount_cents)
        .execute(&mut *tx)
        .await?;

        let result = json!({ "applied_by": self.worker_id, "fencing_token": ctx.fencing_token });
        match self
            .store
            .job_complete_in(&mut tx, ctx.lease(), Some(result))
            .await
        {
            Ok(job) => {
                tx.commit().await?;
                Ok(Outcome::recorded(job))
            }
            Err(StoreError::StaleLease { .. }) => {
                tx.rollback().await?;
                println!(
                    "ledger: job {} token {} lost its lease: attempt rolled back",
                    ctx.id, ctx.fencing_token
                );
                Ok(Outcome::LeaseLost)
            }
            // Nothing committed: the runtime records a retryable failure through the lease.
            Err(other) => Ok(Outcome::Retry {
                error: other.to_string(),
                delay: None,
            }),
        }
    }
}

#[async_trait::async_trait]
impl Handler for Transfer {
    async fn run(&self, ctx: JobContext) -> Outcome {
        let Some(order) = order_of(&ctx.payload) else {
            return Outcome::Fail {
                error: "the payload is not a transfer between two accounts".into(),
            };
        };
        // A database error (connection lost, the session ended by
        // idle_in_transaction_session_timeout, a failed commit) leaves nothing committed, or a
        // commit whose fenced completion makes the runtime's own write stale: retrying is safe.
        self.apply(&ctx, &order)
            .await
            .unwrap_or_else(|err| Outcome::Retry {
                error: format!("database: {err}"),
                delay: None,
            })
    }
}

/// The application's pool. `idle_in_transaction_session_timeout` ends the session of a worker
/// frozen inside its transaction (SIGSTOP, a debugger, a VM pause), so its row locks cannot stall
/// the other workers; its transaction rolls back and its lease expires as usual.
async fn pool(size: u32) -> anyhow::Result<(PgPool, PgConnectOptions)> {
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let connect: PgConnectOptions = url.parse().context("DATABASE_URL")?;
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .connect_with(connect.clone().options([
            ("plan_cache_mode", "force_generic_plan"),
            ("idle_in_transaction_session_timeout", "5s"),
        ]))
        .await?;
    Ok((pool, connect))
}

/// Creates the tables (anew), opens the accounts and enqueues `transfers` jobs, each working for
/// `work_ms.0..=work_ms.1` milliseconds.
async fn setup(transfers: usize, work_ms: (u64, u64)) -> anyhow::Result<()> {
    let (pool, _) = pool(2).await?;
    faultline_postgres::migrate(&pool).await?;
    for statement in [
        "drop table if exists ledger_transfers, ledger_accounts",
        "create table ledger_accounts (id int8 primary key, balance_cents int8 not null)",
        "create table ledger_transfers (
             job_id int8 primary key,
             from_account int8 not null references ledger_accounts,
             to_account int8 not null references ledger_accounts,
             amount_cents int8 not null check (amount_cents > 0),
             fencing_token int8 not null,
             worker text not null,
             applied_at timestamptz not null default clock_timestamp())",
    ] {
        sqlx::query(statement).execute(&pool).await?;
    }
    sqlx::query(
        "insert into ledger_accounts (id, balance_cents) select g, $2 from generate_series(1, $1) g",
    )
    .bind(ACCOUNTS)
    .bind(OPENING_CENTS)
    .execute(&pool)
    .await?;

    let store = PgStore::new(pool.clone());
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |bound: u64| {
        // xorshift64: reproducible transfers without a dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    let specs: Vec<JobSpec> = (0..transfers)
        .map(|n| {
            let from = 1 + next(ACCOUNTS as u64) as i64;
            let offset = 1 + next(ACCOUNTS as u64 - 1) as i64; // 1..ACCOUNTS: never `from`
            let to = 1 + (from - 1 + offset) % ACCOUNTS;
            let payload = json!({
                "from": from,
                "to": to,
                "amount_cents": 1 + next(10_000),
                "work_ms": work_ms.0 + next(work_ms.1 - work_ms.0 + 1),
            });
            JobSpec::new(KIND, payload).idempotency_key(format!("transfer-{n}"))
        })
        .collect();
    for batch in specs.chunks(1_000) {
        let mut tx = pool.begin().await?;
        store.job_enqueue_many_in(&mut tx, batch).await?;
        tx.commit().await?;
    }
    println!("ledger: {ACCOUNTS} accounts, {transfers} transfer jobs enqueued");
    Ok(())
}

/// The value after `flag` in `args`, parsed.
fn flag<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> anyhow::Result<T> {
    match args.iter().position(|arg| arg == flag) {
        None => Ok(default),
        Some(at) => {
            let Some(text) = args.get(at + 1) else {
                bail!("{flag} needs a value");
            };
            text.parse()
                .map_err(|_| anyhow::anyhow!("{flag}: {text:?} is not valid"))
        }
    }
}

/// Runs a worker for transfers until SIGTERM or SIGINT (graceful shutdown).
async fn worker(args: &[String]) -> anyhow::Result<()> {
    let worker_id: String = flag(args, "--id", format!("ledger-{}", std::process::id()))?;
    let concurrency: usize = flag(args, "--concurrency", 8)?;
    let lease = Duration::from_millis(flag(args, "--lease-ms", 30_000)?);
    let poll = Duration::from_millis(flag(args, "--poll-ms", 1_000)?);
    let rescue = Duration::from_millis(flag(args, "--rescue-ms", 15_000)?);
    let leader_lease = Duration::from_millis(flag(args, "--leader-lease-ms", 15_000)?);
    let (pool, connect) = pool(concurrency as u32 + 4).await?;
    let store = PgStore::new(pool);

    let mut registry = Registry::new();
    registry.register(
        KIND,
        Transfer {
            store: store.clone(),
            worker_id: worker_id.clone(),
        },
    );
    let config = WorkerConfig {
        worker_id: worker_id.clone(),
        concurrency,
        lease,
        heartbeat_interval: None, // a third of the lease
        poll_interval: poll,
        shutdown_grace: Duration::from_secs(5),
        ..WorkerConfig::default()
    };
    let upkeep = MaintenanceConfig {
        leader_lease,
        rescue_interval: Some(rescue),
        ..MaintenanceConfig::new(ProcessSpec {
            id: worker_id.clone(),
            role: "worker".into(),
            host: "localhost".into(),
            pid: i32::try_from(std::process::id()).unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").into(),
            queues: vec![QueueSlots {
                queue: JobSpec::DEFAULT_QUEUE.into(),
                slots: u32::try_from(concurrency).unwrap_or(u32::MAX),
            }],
        })
    };
    let shutdown = CancellationToken::new();
    let wakeups = spawn_listener(connect, ListenOptions::default(), shutdown.child_token());
    let store = Arc::new(store);
    let maintenance = Maintenance::new(store.clone(), upkeep)?;
    let stop_maintenance = CancellationToken::new();
    let upkeeping = tokio::spawn(maintenance.run(stop_maintenance.clone()));
    let mut worker = Worker::new(store, registry, config)?.with_wakeup(wakeups);
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { worker.run(shutdown).await }
    });
    println!("ledger: worker {worker_id} running");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
    let report = running.await?;
    stop_maintenance.cancel();
    upkeeping.await?;
    println!(
        "ledger: worker {worker_id} stopped ({} job(s) interrupted)",
        report.interrupted
    );
    Ok(())
}

/// What `check` found.
#[derive(Debug, Default)]
struct Findings {
    jobs: i64,
    succeeded: i64,
    ledger_rows: i64,
    /// Succeeded transfer jobs without a ledger row.
    missing: i64,
    /// Ledger rows whose job is not a succeeded transfer.
    unexpected: i64,
    /// Ledger rows written under another lease than the one that completed the job.
    token_mismatch: i64,
    /// Accounts whose balance differs from opening balance + ledger.
    balance_mismatch: i64,
    /// Jobs whose lease was handed on at least once (fencing token > 1): faults that hit them.
    handed_on: i64,
}

async fn check(args: &[String]) -> anyhow::Result<bool> {
    let (pool, _) = pool(2).await?;
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };
    let findings = Findings {
        jobs: count("select count(*) from faultline_jobs where kind = 'transfer'").await?,
        succeeded: count(
            "select count(*) from faultline_jobs where kind = 'transfer' and state = 'succeeded'",
        )
        .await?,
        ledger_rows: count("select count(*) from ledger_transfers").await?,
        missing: count(
            "select count(*) from faultline_jobs j
             where j.kind = 'transfer' and j.state = 'succeeded'
               and not exists (select 1 from ledger_transfers t where t.job_id = j.id)",
        )
        .await?,
        unexpected: count(
            "select count(*) from ledger_transfers t
             where not exists (select 1 from faultline_jobs j
                               where j.id = t.job_id and j.kind = 'transfer'
                                 and j.state = 'succeeded')",
        )
        .await?,
        token_mismatch: count(
            "select count(*) from ledger_transfers t join faultline_jobs j on j.id = t.job_id
             where t.fencing_token <> j.fencing_token",
        )
        .await?,
        balance_mismatch: sqlx::query_scalar(
            "select count(*) from ledger_accounts a
             where a.balance_cents <> $1
                 + coalesce((select sum(amount_cents) from ledger_transfers where to_account = a.id), 0)
                 - coalesce((select sum(amount_cents) from ledger_transfers where from_account = a.id), 0)",
        )
        .bind(OPENING_CENTS)
        .fetch_one(&pool)
        .await?,
        handed_on: count(
            "select count(*) from faultline_jobs where kind = 'transfer' and fencing_token > 1",
        )
        .await?,
    };
    let all_done = args.iter().any(|arg| arg == "--all-succeeded");
    let ok = findings.missing == 0
        && findings.unexpected == 0
        && findings.token_mismatch == 0
        && findings.balance_mismatch == 0
        && (!all_done || findings.succeeded == findings.jobs);
    println!(
        "{}",
        json!({
            "jobs": findings.jobs,
            "succeeded": findings.succeeded,
            "ledger_rows": findings.ledger_rows,
            "missing": findings.missing,
            "unexpected": findings.unexpected,
            "token_mismatch": findings.token_mismatch,
            "balance_mismatch": findings.balance_mismatch,
            "handed_on": findings.handed_on,
            "ok": ok,
        })
    );
    Ok(ok)
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("setup") => {
            let transfers = match rest.first() {
                Some(n) if !n.starts_with("--") => n.parse().context("setup N: N transfers")?,
                _ => 1_000,
            };
            let range: String = flag(rest, "--work-ms", "5-45".to_owned())?;
            let work_ms = range
                .split_once('-')
                .and_then(|(low, high)| Some((low.parse().ok()?, high.parse().ok()?)))
                .filter(|(low, high): &(u64, u64)| low <= high)
                .with_context(|| format!("--work-ms {range:?}: expected MIN-MAX"))?;
            setup(transfers, work_ms).await?;
        }
        Some("worker") => worker(rest).await?,
        Some("check") => {
            if !check(rest).await? {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        _ => bail!(
            "usage: ledger setup [N] [--work-ms MIN-MAX] | worker [--id ID ...] | check [--all-succeeded]"
        ),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
