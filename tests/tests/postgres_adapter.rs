//! Tests of what only the PostgreSQL adapter has: the SQL backoff function, enqueue inside the
//! caller's transaction, NOTIFY on enqueue, the plans of the fenced batch updates, lock ordering
//! of keyed batches, and the migrator. (Behaviour shared with the in-memory adapter is the
//! contract suite's job.)

use std::time::Duration;

use faultline_ports::domain::{JobSpec, Limits, RetryPolicy};
use faultline_ports::{
    ClaimParams, EnqueueOutcome, Failure, JobStore, LeaseRef, QueueLimits, StoreError,
};
use faultline_postgres::{MIGRATIONS_TABLE, MIGRATOR, NOTIFY_CHANNEL, PgStore};
use faultline_tests::TestDb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};
use sqlx::postgres::{PgListener, PgNotification};
use sqlx::{AssertSqlSafe, PgPool};

/// Longest wait for a notification that must arrive.
const DEADLINE: Duration = Duration::from_secs(10);

fn spec(queue: &str) -> JobSpec {
    JobSpec::new("test", json!({"n": 1})).queue(queue)
}

async fn next_notification(listener: &mut PgListener) -> PgNotification {
    tokio::time::timeout(DEADLINE, listener.recv())
        .await
        .expect("no notification before the deadline")
        .expect("listener failed")
}

/// Receives notifications until one for `sentinel` arrives; returns the queues notified before it.
async fn notified_until(listener: &mut PgListener, sentinel: &str) -> Vec<String> {
    let mut queues = Vec::new();
    loop {
        let note = next_notification(listener).await;
        assert_eq!(note.channel(), NOTIFY_CHANNEL);
        if note.payload() == sentinel {
            return queues;
        }
        queues.push(note.payload().to_owned());
    }
}

/// A policy, an attempt number and a jitter sample, over the whole valid range plus the edges.
fn backoff_case() -> impl Strategy<Value = (RetryPolicy, i32, f64)> {
    let ms = prop_oneof![
        Just(0_i64),
        Just(1_i64),
        0_i64..=10_000,
        0_i64..=Limits::MAX_DURATION_MS,
        Just(Limits::MAX_DURATION_MS),
    ];
    let jitter = prop_oneof![Just(0.0), Just(1.0), Just(0.1), 0.0_f64..=1.0];
    let sample = prop_oneof![Just(0.0), Just(0.5), 0.0_f64..1.0];
    let attempt = prop_oneof![Just(1), -3_i32..=70, 0_i32..=i32::MAX];
    (ms.clone(), ms, jitter, attempt, sample).prop_map(|(a, b, jitter, attempt, sample)| {
        let policy = RetryPolicy {
            base_ms: a.min(b),
            cap_ms: a.max(b),
            jitter,
        };
        (policy, attempt, sample)
    })
}

#[test]
fn sql_backoff_equals_the_retry_policy() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let db = runtime.block_on(TestDb::fresh());
    let pool = db.pool().clone();
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    // 200 inputs per query, 64 queries.
    let batch = prop::collection::vec(backoff_case(), 200);
    runner
        .run(&batch, |cases| {
            let expected: Vec<i64> = cases
                .iter()
                .map(|(policy, attempt, sample)| policy.delay_ms(*attempt, *sample))
                .collect();
            let actual = runtime.block_on(sql_backoff(&pool, &cases));
            for (i, (want, got)) in expected.iter().zip(&actual).enumerate() {
                prop_assert_eq!(want, got, "case {:?}", cases[i]);
            }
            prop_assert_eq!(expected.len(), actual.len());
            Ok::<(), TestCaseError>(())
        })
        .unwrap();
}

async fn sql_backoff(pool: &PgPool, cases: &[(RetryPolicy, i32, f64)]) -> Vec<i64> {
    let attempts: Vec<i32> = cases.iter().map(|c| c.1).collect();
    let base: Vec<i64> = cases.iter().map(|c| c.0.base_ms).collect();
    let cap: Vec<i64> = cases.iter().map(|c| c.0.cap_ms).collect();
    let jitter: Vec<f64> = cases.iter().map(|c| c.0.jitter).collect();
    let sample: Vec<f64> = cases.iter().map(|c| c.2).collect();
    sqlx::query_scalar(
        "select faultline_backoff_ms(a, b, c, j, s)
         from unnest($1::int4[], $2::int8[], $3::int8[], $4::float8[], $5::float8[])
              with ordinality as t(a, b, c, j, s, ord)
         order by ord",
    )
    .bind(attempts)
    .bind(base)
    .bind(cap)
    .bind(jitter)
    .bind(sample)
    .fetch_all(pool)
    .await
    .expect("faultline_backoff_ms")
}

#[tokio::test]
async fn enqueue_in_a_rolled_back_transaction_leaves_no_job() {
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());

    let mut tx = db.pool().begin().await.unwrap();
    let one = store.job_enqueue_in(&mut tx, &spec("rb")).await.unwrap();
    let many = store
        .job_enqueue_many_in(&mut tx, &[spec("rb"), spec("rb").idempotency_key("k")])
        .await
        .unwrap();
    assert!(one.created);
    assert_eq!(many.len(), 2);
    // Visible inside the transaction...
    let inside: i64 = sqlx::query_scalar("select count(*) from faultline_jobs")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(inside, 3);
    tx.rollback().await.unwrap();

    // ...and gone with it: the job, and the idempotency key.
    assert!(matches!(
        store.job_get(one.job.id).await,
        Err(StoreError::NotFound { .. })
    ));
    let after: i64 = sqlx::query_scalar("select count(*) from faultline_jobs")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(after, 0);
    let again = store
        .job_enqueue_many(&[spec("rb").idempotency_key("k")])
        .await
        .unwrap();
    assert!(
        matches!(again[0], EnqueueOutcome::Created { .. }),
        "{again:?}"
    );
}

#[tokio::test]
async fn enqueue_in_a_committed_transaction_keeps_the_job_with_the_callers_writes() {
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());
    sqlx::query("create table app_orders (id int primary key)")
        .execute(db.pool())
        .await
        .unwrap();

    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("insert into app_orders values (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let enqueued = store.job_enqueue_in(&mut tx, &spec("c")).await.unwrap();
    let outcomes = store
        .job_enqueue_many_in(&mut tx, &[spec("c")])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let job = store.job_get(enqueued.job.id).await.unwrap();
    assert_eq!(job, enqueued.job);
    let EnqueueOutcome::Created { id } = outcomes[0] else {
        panic!("{outcomes:?}");
    };
    store.job_get(id).await.unwrap();
    let orders: i64 = sqlx::query_scalar("select count(*) from app_orders")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(orders, 1);
}

/// A job of a bounded queue that stops running (completed, failed, snoozed, rescued, expired by
/// an operator) wakes the queue's claimants: a slot freed. Open queues are not notified then, and
/// raising a bound notifies too.
#[tokio::test]
async fn a_freed_slot_of_a_bounded_queue_notifies_it() {
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());
    let bounded = QueueLimits {
        max_running: Some(10),
    };
    store.queue_set_limits("bounded", &bounded).await.unwrap();
    let claim = |queue: &str| ClaimParams {
        queues: vec![queue.to_owned()],
        kinds: vec![],
        limit: 10,
        lease_ms: 60_000,
        worker_id: "w".into(),
        claim_id: None,
    };
    for queue in ["bounded", "open"] {
        store.job_enqueue_many(&vec![spec(queue); 5]).await.unwrap();
    }
    let held = store.job_claim(&claim("bounded")).await.unwrap();
    let open = store.job_claim(&claim("open")).await.unwrap();
    assert_eq!((held.len(), open.len()), (5, 5));
    let mut listener = PgListener::connect(db.url()).await.unwrap();
    listener.listen(NOTIFY_CHANNEL).await.unwrap();

    // Open queue: its jobs end without a word.
    store
        .job_complete_many(&[(LeaseRef::of(&open[0]), None)])
        .await
        .unwrap();
    store
        .job_fail(
            LeaseRef::of(&open[1]),
            &Failure {
                error: "x".into(),
                kind: faultline_ports::domain::FailureKind::Error,
                retryable: false,
                retry_delay_ms: None,
            },
        )
        .await
        .unwrap();
    store.job_enqueue(&spec("sentinel-1")).await.unwrap();
    assert_eq!(
        notified_until(&mut listener, "sentinel-1").await,
        Vec::<String>::new()
    );

    // Bounded queue: each way out of `running` notifies it.
    store
        .job_complete_many(&[(LeaseRef::of(&held[0]), None)])
        .await
        .unwrap();
    store
        .job_complete(LeaseRef::of(&held[1]), None)
        .await
        .unwrap();
    store
        .job_fail_many(&[(
            LeaseRef::of(&held[2]),
            Failure {
                error: "x".into(),
                kind: faultline_ports::domain::FailureKind::Error,
                retryable: true,
                retry_delay_ms: Some(60_000),
            },
        )])
        .await
        .unwrap();
    store
        .job_snooze(LeaseRef::of(&held[3]), 60_000)
        .await
        .unwrap();
    store.job_expire_lease(held[4].id).await.unwrap();
    store.job_enqueue(&spec("sentinel-2")).await.unwrap();
    assert_eq!(
        notified_until(&mut listener, "sentinel-2").await,
        ["bounded"; 5]
    );

    // Raising a bound notifies; lowering it does not.
    store
        .queue_set_limits(
            "bounded",
            &QueueLimits {
                max_running: Some(3),
            },
        )
        .await
        .unwrap();
    store
        .queue_set_limits("bounded", &QueueLimits { max_running: None })
        .await
        .unwrap();
    store.job_enqueue(&spec("sentinel-3")).await.unwrap();
    assert_eq!(
        notified_until(&mut listener, "sentinel-3").await,
        ["bounded"]
    );
}

#[tokio::test]
async fn enqueue_notifies_each_queue_with_due_jobs_once_at_commit() {
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());
    let mut listener = PgListener::connect(db.url()).await.unwrap();
    listener.listen(NOTIFY_CHANNEL).await.unwrap();

    // A single due job.
    store.job_enqueue(&spec("solo")).await.unwrap();
    assert_eq!(next_notification(&mut listener).await.payload(), "solo");

    // A job in the future is not announced (notifications arrive in commit order, so the
    // sentinel would come second if it were).
    let later = JobSpec {
        delay_ms: Some(60_000),
        ..spec("later")
    };
    store.job_enqueue(&later).await.unwrap();
    store
        .job_enqueue_many(&[later.clone(), later.clone()])
        .await
        .unwrap();
    store.job_enqueue(&spec("sentinel-1")).await.unwrap();
    assert_eq!(
        notified_until(&mut listener, "sentinel-1").await,
        Vec::<String>::new()
    );

    // A batch notifies each queue with a due job once; its future job's queue not at all.
    let batch = vec![
        spec("a"),
        spec("b"),
        spec("a"),
        spec("a"),
        spec("b"),
        JobSpec {
            delay_ms: Some(60_000),
            ..spec("c")
        },
    ];
    store.job_enqueue_many(&batch).await.unwrap();
    store.job_enqueue(&spec("sentinel-2")).await.unwrap();
    let mut queues = notified_until(&mut listener, "sentinel-2").await;
    queues.sort();
    assert_eq!(queues, ["a", "b"]);

    // An idempotent replay creates nothing and announces nothing.
    store
        .job_enqueue(&spec("key").idempotency_key("k"))
        .await
        .unwrap();
    assert_eq!(next_notification(&mut listener).await.payload(), "key");
    let replay = store
        .job_enqueue(&spec("key").idempotency_key("k"))
        .await
        .unwrap();
    assert!(!replay.created);
    store.job_enqueue(&spec("sentinel-3")).await.unwrap();
    assert_eq!(
        notified_until(&mut listener, "sentinel-3").await,
        Vec::<String>::new()
    );

    // Inside a transaction, the notification waits for the commit.
    let mut tx = db.pool().begin().await.unwrap();
    store.job_enqueue_in(&mut tx, &spec("tx")).await.unwrap();
    store.job_enqueue(&spec("sentinel-4")).await.unwrap();
    assert_eq!(
        notified_until(&mut listener, "sentinel-4").await,
        Vec::<String>::new()
    );
    tx.commit().await.unwrap();
    assert_eq!(next_notification(&mut listener).await.payload(), "tx");
}

/// The node types of a JSON plan, with the index each scan uses (`Index Scan on <index>`).
fn plan_nodes(plan: &Value, out: &mut Vec<String>) {
    if let Some(node) = plan.get("Node Type").and_then(Value::as_str) {
        match plan.get("Index Name").and_then(Value::as_str) {
            Some(index) => out.push(format!("{node} on {index}")),
            None => out.push(node.to_owned()),
        }
    }
    match plan {
        Value::Object(map) => map.values().for_each(|v| plan_nodes(v, out)),
        Value::Array(items) => items.iter().for_each(|v| plan_nodes(v, out)),
        _ => {}
    }
}

type Explain<'q> = sqlx::query::QueryScalar<'q, sqlx::Postgres, Value, sqlx::postgres::PgArguments>;

/// `explain (format json)` of one of the adapter's statements, binds to be added by the caller.
fn explain(sql: &str) -> Explain<'static> {
    sqlx::query_scalar(AssertSqlSafe(format!("explain (format json) {sql}")))
}

/// The plan's nodes, e.g. `["ModifyTable", "Index Scan on faultline_jobs_pkey", ...]`.
async fn plan(pool: &PgPool, query: Explain<'_>) -> Vec<String> {
    let plan = query.fetch_one(pool).await.expect("explain");
    let mut nodes = Vec::new();
    plan_nodes(&plan, &mut nodes);
    nodes
}

/// The fenced batch update (the part after the CTEs) looks each job up by primary key.
fn assert_primary_key_lookups(nodes: &[String], what: &str) {
    assert!(
        nodes
            .iter()
            .any(|n| n == "Index Scan on faultline_jobs_pkey"),
        "{what}: no primary-key lookup in {nodes:?}"
    );
    assert!(
        !nodes.iter().any(|n| n.starts_with("Seq Scan")
            || n.starts_with("Bitmap")
            || n.starts_with("Hash Join")),
        "{what}: the plan scans running jobs instead of looking them up: {nodes:?}"
    );
}

/// Claims up to `limit` jobs of the queue `plan` for a minute.
async fn claim_plan_jobs(store: &PgStore, limit: u32) -> Vec<faultline_ports::domain::Job> {
    store
        .job_claim(&ClaimParams {
            queues: vec!["plan".into()],
            kinds: vec![],
            limit,
            lease_ms: 60_000,
            worker_id: "w".into(),
            claim_id: None,
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn fenced_batch_updates_look_jobs_up_by_primary_key_under_many_running_jobs() {
    let db = TestDb::fresh().await;
    let pool = db.pool();
    let store = PgStore::new(pool.clone());
    // Statistics taken while nothing runs, then thousands of running jobs: the situation in
    // which the planner may drive the update from the rescue index (PERF-NOTES, trap 1).
    sqlx::query("alter table faultline_jobs set (autovacuum_enabled = false)")
        .execute(pool)
        .await
        .unwrap();
    // A history of finished jobs, so that scanning the table is never the cheap way.
    sqlx::query(
        "insert into faultline_jobs (queue, kind, payload, state, attempts, finished_at)
         select 'plan', 'test', '{}', 'succeeded', 1, now() from generate_series(1, 100000)",
    )
    .execute(pool)
    .await
    .unwrap();
    let specs: Vec<JobSpec> = (0..5_000).map(|_| spec("plan")).collect();
    store.job_enqueue_many(&specs).await.unwrap();
    sqlx::query("analyze faultline_jobs")
        .execute(pool)
        .await
        .unwrap();
    let claimed = claim_plan_jobs(&store, 5_000).await;
    assert_eq!(claimed.len(), 5_000);
    let leases: Vec<LeaseRef> = claimed.iter().take(1_000).map(LeaseRef::of).collect();
    let ids: Vec<i64> = leases.iter().map(|l| l.job_id).collect();
    let tokens: Vec<i64> = leases.iter().map(|l| l.token).collect();
    let no_clock = None::<chrono::DateTime<chrono::Utc>>;

    let complete = explain(faultline_postgres::sql::COMPLETE_MANY)
        .bind(&ids)
        .bind(&tokens)
        .bind(vec![None::<Value>; ids.len()])
        .bind(no_clock);
    assert_primary_key_lookups(&plan(pool, complete).await, "complete_many");
    let heartbeat = explain(faultline_postgres::sql::HEARTBEAT_MANY)
        .bind(&ids)
        .bind(&tokens)
        .bind(60_000_i64)
        .bind(no_clock);
    assert_primary_key_lookups(&plan(pool, heartbeat).await, "heartbeat_many");
    let fail = explain(faultline_postgres::sql::FAIL_MANY)
        .bind(&ids)
        .bind(&tokens)
        .bind(vec!["boom"; ids.len()])
        .bind(vec![true; ids.len()])
        .bind(vec![None::<i64>; ids.len()])
        .bind(vec!["error"; ids.len()])
        .bind(20_i32)
        .bind(no_clock);
    assert_primary_key_lookups(&plan(pool, fail).await, "fail_many");
    // Rescue finds the expired leases through the rescue index, then updates by primary key.
    let later = chrono::Utc::now() + chrono::TimeDelta::minutes(5);
    let rescue = explain(faultline_postgres::sql::RESCUE_EXPIRED)
        .bind(1_000_i64)
        .bind(Some(later))
        .bind(20_i32);
    let nodes = plan(pool, rescue).await;
    assert_primary_key_lookups(&nodes, "rescue");
    assert!(
        nodes
            .iter()
            .any(|n| n == "Index Scan on faultline_jobs_rescue_idx"),
        "rescue: {nodes:?}"
    );
    assert!(
        !nodes.iter().any(|n| n == "Sort"),
        "rescue must not sort every expired lease: {nodes:?}"
    );

    // And the statements do what they say under these conditions.
    let completions: Vec<_> = leases.iter().map(|l| (*l, None)).collect();
    let outcomes = store.job_complete_many(&completions).await.unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| *o == faultline_ports::WriteOutcome::Accepted)
    );
    let rescuer = PgStore::with_clock(
        pool.clone(),
        std::sync::Arc::new(faultline_ports::ManualClock::new(later)),
    );
    assert_eq!(
        rescuer.job_rescue_expired(10_000).await.unwrap().len(),
        4_000
    );
}

/// The plan `conn` would cache for `statement` (prepared as `name` with parameter `types`), shown
/// by executing it with `values` under EXPLAIN. Unlike EXPLAIN with bound values, this honours the
/// connection's `plan_cache_mode`.
async fn cached_plan(
    conn: &mut sqlx::PgConnection,
    name: &str,
    types: &str,
    statement: &str,
    values: &str,
) -> Vec<String> {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "prepare {name}({types}) as {statement}"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Value = sqlx::query_scalar(AssertSqlSafe(format!(
        "explain (format json) execute {name}({values})"
    )))
    .fetch_one(&mut *conn)
    .await
    .expect("explain");
    let mut nodes = Vec::new();
    plan_nodes(&plan, &mut nodes);
    nodes
}

#[tokio::test]
async fn hot_statements_look_jobs_up_by_primary_key_under_forced_generic_plans() {
    // `plan_cache_mode = force_generic_plan` (what the binary sets, PERF-NOTES trap 2) plans
    // without the bound values: the claim's `limit $3` is unknown, and a join of the picked jobs
    // with the table can become a hash join over a sequential scan of the whole history on every
    // claim (measured 4 ms per claim at 20 000 jobs, and it grows with the history). It happens
    // when the statistics were taken during a large backlog: many queued jobs per claim expected.
    let db = TestDb::fresh().await;
    let pool = db.pool();
    let store = PgStore::new(pool.clone());
    let specs: Vec<JobSpec> = (0..20_000).map(|_| spec("plan")).collect();
    for batch in specs.chunks(5_000) {
        store.job_enqueue_many(batch).await.unwrap();
    }
    sqlx::query("analyze faultline_jobs")
        .execute(pool)
        .await
        .unwrap();

    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("set plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .unwrap();
    // EXPLAIN with bound values plans for those values; only EXECUTE of a prepared statement
    // shows the plan a pooled connection really caches.
    let claims = [
        (
            "claim (one queue)",
            faultline_postgres::sql::CLAIM_ONE_QUEUE,
            "text",
            "'plan'",
        ),
        (
            "claim (several queues)",
            faultline_postgres::sql::CLAIM_MANY_QUEUES,
            "text[]",
            "'{plan,other}'",
        ),
        (
            "claim (bounded queues)",
            faultline_postgres::sql::CLAIM_CAPPED,
            "text[]",
            "'{plan,other}'",
        ),
    ];
    for (n, (what, statement, queue_type, queues)) in claims.into_iter().enumerate() {
        let nodes = cached_plan(
            &mut conn,
            &format!("claim_{n}"),
            &format!("{queue_type}, text[], int8, text, int8, timestamptz, int8"),
            statement,
            &format!("{queues}, '{{}}', 32, 'w', 30000, null, 123"),
        )
        .await;
        assert_primary_key_lookups(&nodes, what);
        assert!(
            nodes
                .iter()
                .any(|n| n == "Index Scan on faultline_jobs_claim_idx"),
            "{what}: candidates come from the claim index: {nodes:?}"
        );
    }

    // The fenced batch writes, with thousands of jobs running (PERF-NOTES trap 1 as well).
    let claimed = claim_plan_jobs(&store, 5_000).await;
    let ids: Vec<String> = claimed
        .iter()
        .take(1_000)
        .map(|j| j.id.to_string())
        .collect();
    let tokens = vec!["1"; ids.len()];
    let (ids, tokens) = (ids.join(","), tokens.join(","));
    let batches = [
        (
            "complete_many",
            faultline_postgres::sql::COMPLETE_MANY,
            "int8[], int8[], jsonb[], timestamptz",
            format!("'{{{ids}}}', '{{{tokens}}}', null, null"),
        ),
        (
            "heartbeat_many",
            faultline_postgres::sql::HEARTBEAT_MANY,
            "int8[], int8[], int8, timestamptz",
            format!("'{{{ids}}}', '{{{tokens}}}', 60000, null"),
        ),
        (
            "fail_many",
            faultline_postgres::sql::FAIL_MANY,
            "int8[], int8[], text[], bool[], int8[], text[], int4, timestamptz",
            format!(
                "'{{{ids}}}', '{{{tokens}}}', array_fill('boom'::text, array[{n}]), \
                 array_fill(true, array[{n}]), array_fill(null::int8, array[{n}]), \
                 array_fill('error'::text, array[{n}]), 20, null",
                n = claimed.len().min(1_000)
            ),
        ),
    ];
    for (what, statement, types, values) in batches {
        let nodes = cached_plan(&mut conn, what, types, statement, &values).await;
        assert_primary_key_lookups(&nodes, what);
    }
}

/// The backlog sample reads only the partial claim and rescue indexes, never the finished
/// history, however much of it the table holds; and it still counts right.
#[tokio::test]
async fn queue_backlog_reads_only_the_claim_and_rescue_indexes_under_a_large_history() {
    let db = TestDb::fresh().await;
    let pool = db.pool();
    let store = PgStore::new(pool.clone());
    // A large history of finished jobs in every terminal state: a seq scan would read them all.
    sqlx::query(
        "insert into faultline_jobs (queue, kind, payload, state, attempts, finished_at)
         select 'q' || (i % 7), 'test', '{}',
             (array['succeeded', 'failed', 'cancelled'])[1 + i % 3], 1, now()
         from generate_series(1, 50000) as i",
    )
    .execute(pool)
    .await
    .unwrap();
    // A small backlog: 300 queued (half of them due), 40 of them then claimed.
    for queue in ["q1", "q2", "q3"] {
        let specs: Vec<JobSpec> = (0..100)
            .map(|i| JobSpec {
                run_at: (i % 2 == 0).then(|| chrono::Utc::now() + chrono::TimeDelta::hours(1)),
                ..spec(queue)
            })
            .collect();
        store.job_enqueue_many(&specs).await.unwrap();
    }
    for (queue, n) in [("q1", 30), ("q2", 10)] {
        let claimed = store
            .job_claim(&ClaimParams {
                queues: vec![queue.into()],
                kinds: vec![],
                limit: n,
                lease_ms: 60_000,
                worker_id: "w".into(),
                claim_id: None,
            })
            .await
            .unwrap();
        assert_eq!(claimed.len(), n as usize);
    }
    sqlx::query("vacuum analyze faultline_jobs")
        .execute(pool)
        .await
        .unwrap();

    let no_clock = None::<chrono::DateTime<chrono::Utc>>;
    let nodes = plan(
        pool,
        explain(faultline_postgres::sql::QUEUE_BACKLOG).bind(no_clock),
    )
    .await;
    assert!(
        !nodes.iter().any(|n| n.starts_with("Seq Scan")),
        "the backlog sample scans the whole table: {nodes:?}"
    );
    // Every index the plan reads is one of the two partial indexes, and both are read.
    let indexes: Vec<&str> = nodes
        .iter()
        .filter_map(|n| n.split_once(" on ").map(|(_, index)| index))
        .collect();
    assert!(
        indexes.contains(&"faultline_jobs_claim_idx"),
        "queued: {nodes:?}"
    );
    assert!(
        indexes.contains(&"faultline_jobs_rescue_idx"),
        "running: {nodes:?}"
    );
    assert!(
        indexes
            .iter()
            .all(|i| *i == "faultline_jobs_claim_idx" || *i == "faultline_jobs_rescue_idx"),
        "only the partial claim and rescue indexes: {nodes:?}"
    );

    let backlog = store.queue_backlog().await.unwrap();
    let got: Vec<(&str, i64, i64, i64)> = backlog
        .iter()
        .map(|b| (b.queue.as_str(), b.queued, b.ready, b.running))
        .collect();
    assert_eq!(
        got,
        [("q1", 70, 20, 30), ("q2", 90, 40, 10), ("q3", 100, 50, 0)]
    );
    assert!(backlog.iter().all(|b| b.oldest_ready_at.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_with_shared_keys_in_opposite_orders_do_not_deadlock() {
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());
    let forward: Vec<JobSpec> = (0..1_000)
        .map(|i| JobSpec::new("k", json!(i)).idempotency_key(format!("key-{i:04}")))
        .collect();
    let backward: Vec<JobSpec> = forward.iter().rev().cloned().collect();
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..8 {
        let store = store.clone();
        let batch = if round % 2 == 0 {
            forward.clone()
        } else {
            backward.clone()
        };
        tasks.spawn(async move { store.job_enqueue_many(&batch).await });
    }
    let mut created = 0;
    while let Some(joined) = tasks.join_next().await {
        let outcomes = joined.expect("task").expect("no batch may fail (deadlock)");
        for outcome in outcomes {
            match outcome {
                EnqueueOutcome::Created { .. } => created += 1,
                EnqueueOutcome::Existing { .. } => {}
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(created, 1_000, "each key created exactly once");
    let jobs: i64 = sqlx::query_scalar("select count(*) from faultline_jobs")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(jobs, 1_000);
}

async fn applied_versions(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "select version from {MIGRATIONS_TABLE} order by version"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

fn known_versions() -> Vec<i64> {
    MIGRATOR.iter().map(|m| m.version).collect()
}

#[tokio::test]
async fn migrating_again_is_a_no_op_in_faultlines_own_bookkeeping_table() {
    let db = TestDb::fresh().await;
    let before = applied_versions(db.pool()).await;
    assert_eq!(before, known_versions());
    let installed_on = |pool: PgPool| async move {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(AssertSqlSafe(format!(
            "select max(installed_on) from {MIGRATIONS_TABLE}"
        )))
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let first = installed_on(db.pool().clone()).await;

    faultline_postgres::migrate(db.pool()).await.unwrap();
    faultline_postgres::migrate(db.pool()).await.unwrap();

    assert_eq!(applied_versions(db.pool()).await, before);
    assert_eq!(installed_on(db.pool().clone()).await, first);
    let sqlx_table: Option<String> =
        sqlx::query_scalar("select to_regclass('_sqlx_migrations')::text")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(
        sqlx_table, None,
        "sqlx's default table must stay free for the host app"
    );
}

#[tokio::test]
async fn concurrent_migrations_apply_each_migration_once() {
    let db = TestDb::fresh_unmigrated().await;
    let runs = (0..4).map(|_| {
        let pool = db.pool().clone();
        async move { faultline_postgres::migrate(&pool).await }
    });
    for result in futures_join_all(runs).await {
        result.expect("a concurrent migration failed");
    }
    assert_eq!(applied_versions(db.pool()).await, known_versions());
    let store = PgStore::new(db.pool().clone());
    let job = store.job_enqueue(&spec("m")).await.unwrap();
    assert!(job.created);
}

#[tokio::test]
async fn a_host_applications_own_sqlx_migrations_and_ours_do_not_interfere() {
    use sqlx::SqlSafeStr;
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let db = TestDb::fresh_unmigrated().await;
    // The host application's migrator, with sqlx's default bookkeeping table.
    let host = Migrator::with_migrations(vec![Migration::new(
        1,
        "host app".into(),
        MigrationType::Simple,
        "create table host_things (id int primary key)".into_sql_str(),
        false,
    )]);
    host.run(db.pool()).await.expect("host migrations");
    faultline_postgres::migrate(db.pool())
        .await
        .expect("ours next to the host's");
    host.run(db.pool())
        .await
        .expect("the host's again, next to ours");
    assert_eq!(applied_versions(db.pool()).await, known_versions());
    let host_versions: Vec<i64> =
        sqlx::query_scalar("select version from _sqlx_migrations order by version")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(host_versions, [1]);
}

/// Runs the futures concurrently on the test's runtime and collects their outputs in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.expect("task panicked"));
    }
    outputs
}
