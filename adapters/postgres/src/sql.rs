//! Every SQL statement of the adapter, as static strings (sqlx caches each as a prepared statement).
//!
//! Conventions: `$clock` parameters are the test clock override or NULL, used as
//! `coalesce($n::timestamptz, now())` in a one-row `clock` CTE so a statement reads "now" once.
//! Durations arrive in milliseconds and become intervals with `* interval '1 millisecond'`
//! (exact to the microsecond). Lease-holder writes match on id, `state = 'running'` and the
//! fencing token, so a stale holder changes nothing.

/// `$p` prefixed to each column name, comma-separated.
macro_rules! prefixed {
    ($p:literal; $first:ident $(, $rest:ident)*) => {
        concat!($p, stringify!($first) $(, ", ", $p, stringify!($rest))*)
    };
}

/// The columns [`crate::row::job_from_row`] reads, each prefixed with `$p` (`""` or `"j."`).
macro_rules! job_columns {
    ($p:literal) => {
        prefixed!($p; id, queue, kind, payload, priority, state, attempts, max_attempts,
            fencing_token, cancel_requested, next_run_at, lease_owner, lease_expires_at,
            idempotency_key, backoff_base_ms, backoff_cap_ms, backoff_jitter, timeout_ms,
            last_error, errors, result, created_at, started_at, finished_at)
    };
}

/// Enqueues one job. Returns the new job, or no row when its idempotency key is taken.
/// Notifies the queue when the job is due now, and gives the queue its row in `faultline_queues`
/// when this is its first job (a primary-key lookup otherwise). Parameters: 1 queue, 2 kind, 3 payload,
/// 4 priority, 5 run_at, 6 delay_ms, 7 max_attempts, 8 backoff base, 9 backoff cap,
/// 10 jitter, 11 timeout_ms, 12 idempotency key, 13 payload hash, 14 clock.
pub const ENQUEUE_ONE: &str = concat!(
    "with clock as materialized (select coalesce($14::timestamptz, now()) as now),
inserted as (
    insert into faultline_jobs (queue, kind, payload, priority, next_run_at, max_attempts,
        backoff_base_ms, backoff_cap_ms, backoff_jitter, timeout_ms, idempotency_key,
        payload_hash, created_at)
    select $1::text, $2::text, $3::jsonb, $4::int2,
        coalesce($5::timestamptz, c.now + $6::int8 * interval '1 millisecond', c.now),
        $7::int4, $8::int8, $9::int8, $10::float8, $11::int8, $12::text, $13::bytea, c.now
    from clock c
    on conflict (idempotency_key) where idempotency_key is not null do nothing
    returning ",
    job_columns!(""),
    "
),
queue_row as (
    insert into faultline_queues (name, created_at, updated_at)
    select ins.queue, c.now, c.now from inserted ins, clock c
    where not exists (select 1 from faultline_queues q where q.name = ins.queue)
    on conflict do nothing
),
notified as (
    select count(pg_notify('faultline_jobs', ins.queue)) as n
    from inserted ins, clock c
    where ins.next_run_at <= c.now
)
select ",
    job_columns!("ins."),
    " from inserted ins cross join notified"
);

/// The unnest of a batch's parallel arrays, with the item order: 1 queue, 2 kind, 3 payload,
/// 4 priority, 5 run_at, 6 delay_ms, 7 max_attempts, 8 backoff base, 9 backoff cap, 10 jitter,
/// 11 timeout_ms, 12 idempotency key, 13 payload hash.
macro_rules! batch_input {
    () => {
        "unnest($1::text[], $2::text[], $3::jsonb[], $4::int2[], $5::timestamptz[], $6::int8[],
                $7::int4[], $8::int8[], $9::int8[], $10::float8[], $11::int8[], $12::text[],
                $13::bytea[])
        with ordinality
        as t(queue, kind, payload, priority, run_at, delay_ms, max_attempts, base_ms, cap_ms,
             jitter, timeout_ms, idempotency_key, payload_hash, ord)"
    };
}

/// The tail of both batch statements: give every queue that got its first job its row (in name order, so
/// concurrent batches wait for each other in one order), notify each queue that got a due job
/// once, and return `(id, idempotency_key)` of each created job. 14 is the clock.
macro_rules! batch_notify_and_return {
    () => {
        "queue_rows as (
    insert into faultline_queues (name, created_at, updated_at)
    select d.q, coalesce($14::timestamptz, now()), coalesce($14::timestamptz, now())
    from (select distinct i.queue as q from inserted i) d
    where not exists (select 1 from faultline_queues fq where fq.name = d.q)
    order by d.q collate \"C\"
    on conflict do nothing
),
notified as (
    select count(pg_notify('faultline_jobs', d.queue)) as n
    from (
        select distinct queue from inserted
        where next_run_at <= coalesce($14::timestamptz, now())
    ) d
)
select i.id, i.idempotency_key from inserted i cross join notified"
    };
}

/// Enqueues a batch without idempotency keys in one `insert ... select from unnest(...)`
/// (parameters: see `batch_input!`; 14 is the clock). The rows are inserted in input order, so
/// ids increase in input order. No `on conflict` (nothing can conflict), which spares every row
/// the speculative-insertion protocol.
pub const ENQUEUE_MANY_PLAIN: &str = concat!(
    "with inserted as (
    insert into faultline_jobs (queue, kind, payload, priority, next_run_at, max_attempts,
        backoff_base_ms, backoff_cap_ms, backoff_jitter, timeout_ms, created_at)
    select t.queue, t.kind, t.payload, t.priority,
        coalesce(t.run_at,
                 coalesce($14::timestamptz, now()) + t.delay_ms * interval '1 millisecond',
                 coalesce($14::timestamptz, now())),
        t.max_attempts, t.base_ms, t.cap_ms, t.jitter, t.timeout_ms,
        coalesce($14::timestamptz, now())
    from ",
    batch_input!(),
    "
    order by t.ord
    returning id, idempotency_key, queue, next_run_at
),
",
    batch_notify_and_return!()
);

/// Enqueues a batch with idempotency keys (at most one item per key) in one statement
/// (parameters: see `batch_input!`; 14 is the clock). Items whose key is taken return no row.
/// Ids are drawn in input order first, then the rows are inserted in key order: concurrent
/// batches sharing keys then wait for each other's keys in one global order and cannot deadlock.
pub const ENQUEUE_MANY_KEYED: &str = concat!(
    "with seq as materialized (
    select pg_get_serial_sequence('faultline_jobs', 'id')::regclass as seq
),
input as materialized (
    select t.*, nextval((select seq from seq)) as id
    from ",
    batch_input!(),
    "
    order by t.ord
),
inserted as (
    insert into faultline_jobs (id, queue, kind, payload, priority, next_run_at, max_attempts,
        backoff_base_ms, backoff_cap_ms, backoff_jitter, timeout_ms, idempotency_key,
        payload_hash, created_at)
    overriding system value
    select t.id, t.queue, t.kind, t.payload, t.priority,
        coalesce(t.run_at,
                 coalesce($14::timestamptz, now()) + t.delay_ms * interval '1 millisecond',
                 coalesce($14::timestamptz, now())),
        t.max_attempts, t.base_ms, t.cap_ms, t.jitter, t.timeout_ms, t.idempotency_key,
        t.payload_hash, coalesce($14::timestamptz, now())
    from input t
    order by t.idempotency_key collate \"C\"
    on conflict (idempotency_key) where idempotency_key is not null do nothing
    returning id, idempotency_key, queue, next_run_at
),
",
    batch_notify_and_return!()
);

/// The job holding an idempotency key, with its payload hash (appended after the job columns).
pub const JOB_BY_KEY: &str = concat!(
    "select ",
    job_columns!(""),
    ", payload_hash from faultline_jobs where idempotency_key = $1"
);

/// Id and payload hash of the jobs holding any of the given idempotency keys.
pub const IDS_BY_KEYS: &str = "select idempotency_key, id, payload_hash
from faultline_jobs
where idempotency_key = any($1::text[])";

/// The update half of both claims: leases the `picked` jobs (1 queue(s), 2 kinds, 3 limit,
/// 4 worker, 5 lease_ms, 6 clock, 7 claim id). The picked ids arrive as an array (`id = any(array(...))`), so
/// the update looks each one up by primary key: joining the `picked` CTE instead lets the generic
/// plan (with `limit $3` unknown, and `plan_cache_mode = force_generic_plan`, as the binary sets
/// it) hash-join it against a sequential scan of the whole table, history included, on every
/// claim (3.7 ms instead of 0.4 ms for 32 jobs out of 20 000, measured with EXPLAIN ANALYZE).
macro_rules! claim_update {
    () => {
        "
update faultline_jobs j
set state = 'running',
    attempts = j.attempts + 1,
    fencing_token = j.fencing_token + 1,
    lease_owner = $4::text,
    lease_expires_at = c.now + $5::int8 * interval '1 millisecond',
    started_at = c.now,
    claim_id = $7::int8
from clock c
where j.id = any(array(select id from picked))
returning "
    };
}

/// Claim from one queue: 1 queue, 2 kinds (empty: any), 3 limit, 4 worker, 5 lease_ms, 6 clock,
/// 7 claim id. The equality on the queue lets the partial claim index deliver the claim order
/// directly: no sort, and the scan stops after `limit` unlocked jobs. A paused queue, or one with
/// a `max_running` bound (one primary-key lookup in `faultline_queues`, evaluated once), yields
/// no job: the index is not even read. The result always has a row: `limited` says the queue is
/// bounded (and not paused), so the caller claims through [`CLAIM_CAPPED`]; a row whose `id` is
/// null carries no job.
pub const CLAIM_ONE_QUEUE: &str = concat!(
    "with clock as materialized (select coalesce($6::timestamptz, now()) as now),
gate as materialized (
    select coalesce(bool_or(q.paused), false) as paused,
        coalesce(bool_or(q.max_running is not null and not q.paused), false) as limited
    from faultline_queues q where q.name = $1::text
),
picked as (
    select id from faultline_jobs
    where not (select paused or limited from gate) and state = 'queued' and queue = $1::text
      and (cardinality($2::text[]) = 0 or kind = any($2::text[]))
      and next_run_at <= (select now from clock)
    order by priority, next_run_at, id
    limit $3
    for update skip locked
),
claimed as (",
    claim_update!(),
    job_columns!("j."),
    "
)
select g.limited, k.* from gate g left join claimed k on true"
);

/// Claim from several queues: 1 queues, then as [`CLAIM_ONE_QUEUE`]. Each queue yields (and
/// locks) up to `limit` jobs through the claim index, the best `limit` of them are leased: the
/// cost is bounded by `queues x limit` whatever the backlog, where one `queue = any(...)` scan
/// would sort every due job of every queue. The other locked candidates are released when the
/// statement commits. Paused queues are left out before any job is read (a primary-key lookup
/// per queue: a scalar subquery, which the planner cannot turn into a scan-and-hash anti-join).
/// When one of the queues has a `max_running` bound (and is not paused), nothing is claimed and
/// `limited` says so: the caller claims through [`CLAIM_CAPPED`], so that the claim order holds
/// across bounded and unbounded queues.
pub const CLAIM_MANY_QUEUES: &str = concat!(
    "with clock as materialized (select coalesce($6::timestamptz, now()) as now),
gate as materialized (
    select coalesce(bool_or((
        select fq.max_running is not null and not fq.paused
        from faultline_queues fq where fq.name = u.q
    )), false) as limited
    from unnest($1::text[]) as u(q)
),
picked as (
    select c.id
    from (
        select distinct u.q from unnest($1::text[]) as u(q)
        where not (select limited from gate) and not coalesce(
            (select fq.paused from faultline_queues fq where fq.name = u.q), false
        )
    ) as queues
    cross join lateral (
        select id, priority, next_run_at from faultline_jobs
        where state = 'queued' and queue = queues.q
          and (cardinality($2::text[]) = 0 or kind = any($2::text[]))
          and next_run_at <= (select now from clock)
        order by priority, next_run_at, id
        limit $3
        for update skip locked
    ) as c
    order by c.priority, c.next_run_at, c.id
    limit $3
),
claimed as (",
    claim_update!(),
    job_columns!("j."),
    "
)
select g.limited, k.* from gate g left join claimed k on true"
);

/// The first statement of a claim that touches bounded queues: locks the rows of the given
/// queues that have a `max_running` bound, in name order (so two such claims never deadlock), for
/// the rest of the claim's transaction. 1 queues.
pub const LOCK_BOUNDED_QUEUES: &str = "select name from faultline_queues
where name = any($1::text[]) and max_running is not null
order by name collate \"C\"
for update";

/// The second statement of that claim, parameters as [`CLAIM_MANY_QUEUES`]: as that claim, but
/// each bounded queue yields at most `max_running` minus its running jobs. Its snapshot is taken
/// after [`LOCK_BOUNDED_QUEUES`] got the locks, so the count includes every job that any other
/// claim of these queues leased (that claim held the lock until it committed): two claims can
/// never both take a queue's last slot. The count reads the running jobs through the rescue index.
pub const CLAIM_CAPPED: &str = concat!(
    "with clock as materialized (select coalesce($6::timestamptz, now()) as now),
rows as materialized (
    select t.q,
        (select fq.max_running from faultline_queues fq where fq.name = t.q) as max_running,
        coalesce((select fq.paused from faultline_queues fq where fq.name = t.q), false) as paused
    from (select distinct u.q from unnest($1::text[]) as u(q)) as t
),
queues as materialized (
    select rows.q,
        case when rows.max_running is null then $3::int8
        else greatest(0, least($3::int8, rows.max_running - (
            select count(*) from faultline_jobs r where r.state = 'running' and r.queue = rows.q
        ))) end as cap
    from rows
    where not rows.paused
),
picked as (
    select c.id
    from queues
    cross join lateral (
        select id, priority, next_run_at from faultline_jobs
        where state = 'queued' and queue = queues.q
          and (cardinality($2::text[]) = 0 or kind = any($2::text[]))
          and next_run_at <= (select now from clock)
        order by priority, next_run_at, id
        limit queues.cap
        for update skip locked
    ) as c
    order by c.priority, c.next_run_at, c.id
    limit $3
)",
    claim_update!(),
    job_columns!("j.")
);

/// Gives back the jobs a claim call leased (as a snooze of 0 ms: attempt returned, due now, or
/// cancelled when a cancel was requested) and notifies their queues: 1 claim id, 2 clock. Reads
/// the running jobs through the rescue index.
pub const RELEASE_CLAIM: &str = "with clock as materialized (
    select coalesce($2::timestamptz, now()) as now
),
held as materialized (
    select id, fencing_token, 'running'::text as st from faultline_jobs
    where state = 'running' and claim_id = $1::int8
),
released as (
    update faultline_jobs j
    set attempts = j.attempts - 1,
        state = case when j.cancel_requested then 'cancelled' else 'queued' end,
        finished_at = case when j.cancel_requested then c.now end,
        next_run_at = case when j.cancel_requested then j.next_run_at else c.now end,
        lease_expires_at = null
    from held h, clock c
    where j.id = h.id and j.state = h.st and j.fencing_token = h.fencing_token
    returning j.queue, j.state
),
notified as (
    select count(pg_notify('faultline_jobs', d.queue)) as n
    from (select distinct queue from released where state = 'queued') d
)
select count(*) as released from released cross join notified";

/// The tail of a statement whose CTE `$done` ends running jobs (its rows carry `queue`): wakes the
/// claimants of the bounded queues among them (a job of a queue with `max_running` that stops
/// running frees a slot there; unbounded queues are not notified), and selects `$cols` of
/// `$done`.
macro_rules! freeing_slots {
    ($done:literal, $cols:literal) => {
        concat!(
            "
freed as (
    select count(pg_notify('faultline_jobs', d.queue)) as n
    from (select distinct queue from ",
            $done,
            ") d
    where exists (
        select 1 from faultline_queues q where q.name = d.queue and q.max_running is not null
    )
)
select ",
            $cols,
            " from ",
            $done,
            " cross join freed"
        )
    };
}

/// Extends leases: 1 ids, 2 tokens, 3 extend_ms, 4 clock. The expected state travels with the
/// array in a materialized CTE so the plan stays a primary-key lookup per item (PERF-NOTES trap 1).
pub const HEARTBEAT_MANY: &str = "with input as materialized (
    select t.id, t.token, 'running'::text as st
    from unnest($1::int8[], $2::int8[]) as t(id, token)
),
clock as materialized (select coalesce($4::timestamptz, now()) as now)
update faultline_jobs j
set lease_expires_at = c.now + $3::int8 * interval '1 millisecond'
from input i, clock c
where j.id = i.id and j.fencing_token = i.token and j.state = i.st
returning j.id, j.fencing_token, j.lease_expires_at, j.cancel_requested";

/// Completes leased jobs: 1 ids, 2 tokens, 3 results, 4 clock. Same plan shape as the heartbeat;
/// wakes the claimants of bounded queues.
pub const COMPLETE_MANY: &str = concat!(
    "with input as materialized (
    select t.id, t.token, t.result, 'running'::text as st
    from unnest($1::int8[], $2::int8[], $3::jsonb[]) as t(id, token, result)
),
clock as materialized (select coalesce($4::timestamptz, now()) as now),
done as (
    update faultline_jobs j
    set state = 'succeeded', result = i.result, finished_at = c.now, lease_expires_at = null
    from input i, clock c
    where j.id = i.id and j.fencing_token = i.token and j.state = i.st
    returning j.id, j.fencing_token, j.queue
),",
    freeing_slots!("done", "done.id, done.fencing_token")
);

/// Completes one leased job: 1 id, 2 token, 3 result, 4 clock.
pub const COMPLETE_ONE: &str = concat!(
    "with clock as materialized (select coalesce($4::timestamptz, now()) as now),
done as (
    update faultline_jobs j
    set state = 'succeeded', result = $3::jsonb, finished_at = c.now, lease_expires_at = null
    from clock c
    where j.id = $1 and j.fencing_token = $2 and j.state = 'running'
    returning ",
    job_columns!("j."),
    "
),",
    freeing_slots!("done", "done.*")
);

/// Records failed attempts (`Job::apply` with `FailRetryable` / `FailPermanently`), each fenced by
/// its own lease, and appends each to its job's attempt history: 1 ids, 2 tokens, 3 errors,
/// 4 retryable, 5 explicit delay_ms (NULL: the job's retry policy), 6 failure kinds, 7 history
/// length kept, 8 clock. Each id at most once (the caller dedups); one item is a single failure.
/// Same plan shape as the heartbeat.
pub const FAIL_MANY: &str = concat!(
    "with input as materialized (
    select t.*, 'running'::text as st
    from unnest($1::int8[], $2::int8[], $3::text[], $4::bool[], $5::int8[], $6::text[])
        as t(id, token, error, retryable, delay_ms, kind)
),
clock as materialized (select coalesce($8::timestamptz, now()) as now),
done as (
update faultline_jobs j
set last_error = i.error,
    errors = faultline_push_error(j.errors, jsonb_build_object(
        'attempt', j.attempts, 'at', c.now, 'worker', j.lease_owner,
        'fencing_token', j.fencing_token, 'error', i.error, 'kind', i.kind), $7::int4),
    state = case
        when not i.retryable then 'failed'
        when j.cancel_requested then 'cancelled'
        when j.attempts >= j.max_attempts then 'failed'
        else 'queued' end,
    finished_at = case
        when not i.retryable or j.cancel_requested or j.attempts >= j.max_attempts then c.now end,
    next_run_at = case
        when not i.retryable or j.cancel_requested or j.attempts >= j.max_attempts
            then j.next_run_at
        else c.now + coalesce(i.delay_ms, faultline_backoff_ms(j.attempts, j.backoff_base_ms,
            j.backoff_cap_ms, j.backoff_jitter, random())) * interval '1 millisecond' end,
    lease_expires_at = null
from input i, clock c
where j.id = i.id and j.fencing_token = i.token and j.state = i.st
returning ",
    job_columns!("j."),
    "
),",
    freeing_slots!("done", "done.*")
);

/// Puts a leased job back without using up its attempt (`Job::apply` with `Snooze`):
/// 1 id, 2 token, 3 delay_ms, 4 clock.
pub const SNOOZE: &str = concat!(
    "with clock as materialized (select coalesce($4::timestamptz, now()) as now),
done as (
update faultline_jobs j
set attempts = j.attempts - 1,
    state = case when j.cancel_requested then 'cancelled' else 'queued' end,
    finished_at = case when j.cancel_requested then c.now end,
    next_run_at = case when j.cancel_requested then j.next_run_at
        else c.now + $3::int8 * interval '1 millisecond' end,
    lease_expires_at = null
from clock c
where j.id = $1 and j.fencing_token = $2 and j.state = 'running'
returning ",
    job_columns!("j."),
    "
),",
    freeing_slots!("done", "done.*")
);

/// Cancels a queued job or marks a running one: 1 id, 2 clock. No row: missing or finished.
pub const CANCEL: &str = concat!(
    "with clock as materialized (select coalesce($2::timestamptz, now()) as now)
update faultline_jobs j
set state = case when j.state = 'queued' then 'cancelled' else j.state end,
    finished_at = case when j.state = 'queued' then c.now else j.finished_at end,
    cancel_requested = j.state = 'running'
from clock c
where j.id = $1 and j.state in ('queued', 'running')
returning ",
    job_columns!("j.")
);

/// Queues a failed or cancelled job again, due now, and notifies its queue: 1 id, 2 clock.
/// No row: missing or not redrivable.
pub const REDRIVE: &str = concat!(
    "with clock as materialized (select coalesce($2::timestamptz, now()) as now),
updated as (
    update faultline_jobs j
    set state = 'queued', attempts = 0, cancel_requested = false, next_run_at = c.now,
        finished_at = null, result = null
    from clock c
    where j.id = $1 and j.state in ('failed', 'cancelled')
    returning ",
    job_columns!("j."),
    "
),
notified as (select count(pg_notify('faultline_jobs', u.queue)) as n from updated u)
select ",
    job_columns!("u."),
    " from updated u cross join notified"
);

/// The state of one job (to explain why a conditional update matched nothing).
pub const STATE_OF: &str = "select state from faultline_jobs where id = $1";

/// The `set` clause of a lease expiry (`Job::apply` with `LeaseExpired`, appended to the attempt
/// history), shared by the rescue and the operator's "expire lease now": reads the expiry's "now"
/// as `e.now` and the history length kept from `$3`.
macro_rules! lease_expiry_set {
    () => {
        "set last_error = 'lease expired (worker ' || coalesce(j.lease_owner, '?')
        || ', fencing token ' || j.fencing_token || ')',
    errors = faultline_push_error(j.errors, jsonb_build_object(
        'attempt', j.attempts, 'at', e.now, 'worker', j.lease_owner,
        'fencing_token', j.fencing_token,
        'error', 'lease expired (worker ' || coalesce(j.lease_owner, '?')
            || ', fencing token ' || j.fencing_token || ')',
        'kind', 'lease_expired'), $3::int4),
    state = case
        when j.cancel_requested then 'cancelled'
        when j.attempts >= j.max_attempts then 'failed'
        else 'queued' end,
    finished_at = case when j.cancel_requested or j.attempts >= j.max_attempts then e.now end,
    next_run_at = case when j.cancel_requested or j.attempts >= j.max_attempts then j.next_run_at
        else e.now + faultline_backoff_ms(j.attempts, j.backoff_base_ms, j.backoff_cap_ms,
            j.backoff_jitter, random()) * interval '1 millisecond' end,
    lease_expires_at = null
"
    };
}

/// Ends expired leases as failed attempts (`Job::apply` with `LeaseExpired`, appended to the
/// attempt history), earliest lease end first (the rescue index order): 1 limit, 2 clock,
/// 3 history length kept. The update re-checks state, token and expiry,
/// so a job completed or extended in between is never touched; the expected state and "now" come
/// from the CTE so the update looks jobs up by primary key (PERF-NOTES trap 1). Also returns each
/// job's old lease end (`rescued_lease_end`) to order the result.
pub const RESCUE_EXPIRED: &str = concat!(
    "with clock as materialized (select coalesce($2::timestamptz, now()) as now),
expired as materialized (
    select id, fencing_token, lease_expires_at, 'running'::text as st,
        (select now from clock) as now
    from faultline_jobs
    where state = 'running' and lease_expires_at <= (select now from clock)
    order by lease_expires_at, id
    limit $1
    for update skip locked
),
done as (
update faultline_jobs j
",
    lease_expiry_set!(),
    "from expired e
where j.id = e.id and j.state = e.st and j.fencing_token = e.fencing_token
  and j.lease_expires_at <= e.now
returning e.lease_expires_at as rescued_lease_end, ",
    job_columns!("j."),
    "
),",
    freeing_slots!("done", "done.*")
);

/// An operator's "expire lease now" (`Job::apply` with `LeaseExpired` at now, the lease ending
/// now): the rescue's lease expiry applied to one running job whatever its lease end: 1 id,
/// 2 clock, 3 history length kept. No row: missing or not running.
pub const EXPIRE_LEASE: &str = concat!(
    "with clock as materialized (select coalesce($2::timestamptz, now()) as now),
done as (
update faultline_jobs j
",
    lease_expiry_set!(),
    "from clock e
where j.id = $1 and j.state = 'running'
returning ",
    job_columns!("j."),
    "
),",
    freeing_slots!("done", "done.*")
);

/// One job by id.
pub const GET: &str = concat!(
    "select ",
    job_columns!(""),
    " from faultline_jobs where id = $1"
);

/// A page of jobs, newest first: 1 queue, 2 state, 3 kind, 4 before_id (each NULL for any),
/// 5 limit.
pub const LIST: &str = concat!(
    "select ",
    job_columns!(""),
    " from faultline_jobs
where ($1::text is null or queue = $1::text)
  and ($2::text is null or state = $2::text)
  and ($3::text is null or kind = $3::text)
  and ($4::int8 is null or id < $4::int8)
order by id desc
limit $5"
);

/// Counts per queue and state, with each queue's oldest due queued job, in one pass over the
/// table (the counts need every row anyway): 1 clock.
pub const QUEUE_STATS: &str = "select queue, state, count(*) as n,
    min(next_run_at) filter (
        where state = 'queued' and next_run_at <= coalesce($1::timestamptz, now())
    ) as oldest
from faultline_jobs
group by queue, state";

/// The unfinished backlog per queue: 1 clock. Rows are (queue, queued, ready, running, oldest);
/// a queue with both queued and running jobs has one row of each kind. Each half reads only its
/// partial index (claim: `state = 'queued'`, rescue: `state = 'running'`), never the finished
/// history, so sampling it periodically costs what the backlog costs.
pub const QUEUE_BACKLOG: &str = "with clock as materialized (
    select coalesce($1::timestamptz, now()) as now
)
select queue, count(*) as queued,
    count(*) filter (where next_run_at <= (select now from clock)) as ready,
    0::int8 as running,
    min(next_run_at) filter (where next_run_at <= (select now from clock)) as oldest
from faultline_jobs
where state = 'queued'
group by queue
union all
select queue, 0::int8, 0::int8, count(*), null::timestamptz
from faultline_jobs
where state = 'running'
group by queue";

/// Deletes up to `limit` finished jobs past their state's retention, oldest first, through the
/// `finished_at` index: 1 succeeded, 2 failed, 3 cancelled retention (ms), 4 limit, 5 clock.
pub const PRUNE: &str = "with clock as materialized (
    select coalesce($5::timestamptz, now()) as now
),
doomed as (
    select j.id from faultline_jobs j
    where j.finished_at is not null
      and j.finished_at < (select now from clock)
          - least($1::int8, $2::int8, $3::int8) * interval '1 millisecond'
      and j.finished_at < (select now from clock) - (case j.state
              when 'succeeded' then $1::int8
              when 'failed' then $2::int8
              else $3::int8 end) * interval '1 millisecond'
    order by j.finished_at, j.id
    limit $4
    for update skip locked
)
delete from faultline_jobs j using doomed d where j.id = d.id";

/// The columns of a queue row.
macro_rules! queue_columns {
    () => {
        "name, paused, paused_at, max_running, created_at, updated_at"
    };
}

/// Every queue row, by name.
pub const QUEUE_LIST: &str = concat!(
    "select ",
    queue_columns!(),
    " from faultline_queues order by name collate \"C\""
);

/// Pauses or resumes a queue, creating its row if needed: 1 name, 2 paused, 3 clock. A resume
/// notifies the queue (its due jobs are claimable again).
pub const QUEUE_SET_PAUSED: &str = concat!(
    "with clock as materialized (select coalesce($3::timestamptz, now()) as now),
upserted as (
    insert into faultline_queues as q (name, paused, paused_at, created_at, updated_at)
    select $1::text, $2::bool, case when $2::bool then c.now end, c.now, c.now from clock c
    on conflict (name) do update
    set paused = excluded.paused,
        paused_at = case when excluded.paused and not q.paused then excluded.updated_at
            else q.paused_at end,
        updated_at = case when excluded.paused <> q.paused then excluded.updated_at
            else q.updated_at end
    returning ",
    queue_columns!(),
    "
),
notified as (
    select count(pg_notify('faultline_jobs', u.name)) as n from upserted u where not u.paused
)
select ",
    queue_columns!(),
    " from upserted cross join notified"
);

/// Sets a queue's limits, creating its row if needed: 1 name, 2 max_running (NULL: no bound),
/// 3 clock. Notifies the queue when the bound was raised or removed (slots may have freed).
pub const QUEUE_SET_LIMITS: &str = concat!(
    "with clock as materialized (select coalesce($3::timestamptz, now()) as now),
before as materialized (
    select max_running from faultline_queues where name = $1::text
),
upserted as (
    insert into faultline_queues as q (name, max_running, created_at, updated_at)
    select $1::text, $2::int4, c.now, c.now from clock c
    on conflict (name) do update
    set max_running = excluded.max_running,
        updated_at = case when excluded.max_running is distinct from q.max_running
            then excluded.updated_at else q.updated_at end
    returning ",
    queue_columns!(),
    "
),
notified as (
    select count(pg_notify('faultline_jobs', u.name)) as n from upserted u
    where u.max_running is null or u.max_running > coalesce((select max_running from before), 0)
)
select ",
    queue_columns!(),
    " from upserted cross join notified"
);

/// The leadership columns, with the time left as the database computes it (`c` is the clock).
macro_rules! leader_columns {
    ($p:literal) => {
        concat!(
            $p,
            "leader_id, ",
            $p,
            "term, ",
            $p,
            "elected_at, ",
            $p,
            "expires_at, ",
            "(floor(extract(epoch from (",
            $p,
            "expires_at - c.now)) * 1000))::int8 as remaining_ms"
        )
    };
}

/// Takes or renews the maintenance leadership: 1 candidate, 2 ttl_ms, 3 clock. Granted when no
/// row exists, when the row's leadership has lapsed (a new term), or when the candidate holds it
/// (renewed, same term). Returns the leadership after the statement; no row only when another
/// candidate's first insert committed after this statement's snapshot (ask again).
pub const LEADER_ELECT: &str = concat!(
    "with clock as materialized (select coalesce($3::timestamptz, now()) as now),
taken as (
    insert into faultline_leader as l (name, leader_id, term, elected_at, expires_at)
    select 'maintenance', $1::text, 1, c.now, c.now + $2::int8 * interval '1 millisecond'
    from clock c
    on conflict (name) do update
    set leader_id = excluded.leader_id,
        term = case when l.leader_id = excluded.leader_id and l.expires_at > excluded.elected_at
            then l.term else l.term + 1 end,
        elected_at = case when l.leader_id = excluded.leader_id
                and l.expires_at > excluded.elected_at
            then l.elected_at else excluded.elected_at end,
        expires_at = excluded.expires_at
    where l.leader_id = excluded.leader_id or l.expires_at <= excluded.elected_at
    returning leader_id, term, elected_at, expires_at
)
select ",
    leader_columns!("t."),
    " from taken t cross join clock c
union all
select ",
    leader_columns!("l."),
    " from faultline_leader l cross join clock c
where l.name = 'maintenance' and not exists (select 1 from taken)"
);

/// Ends the leadership now if 1 leader_id still holds it in 2 term: 3 clock.
pub const LEADER_RESIGN: &str = "with clock as materialized (
    select coalesce($3::timestamptz, now()) as now
)
update faultline_leader l
set expires_at = c.now
from clock c
where l.name = 'maintenance' and l.leader_id = $1::text and l.term = $2::int8
  and l.expires_at > c.now
returning l.term";

/// The leadership as it stands: 1 clock.
pub const LEADER_GET: &str = concat!(
    "with clock as materialized (select coalesce($1::timestamptz, now()) as now)
select ",
    leader_columns!("l."),
    " from faultline_leader l cross join clock c where l.name = 'maintenance'"
);

/// The columns of a process row.
macro_rules! process_columns {
    () => {
        "id, role, host, pid, version, queues, started_at, last_seen_at"
    };
}

/// Registers or refreshes a process: 1 id, 2 role, 3 host, 4 pid, 5 version, 6 queues, 7 clock.
/// `started_at` is kept while the entry stays the same process (host and pid).
pub const PROCESS_REGISTER: &str = concat!(
    "with clock as materialized (select coalesce($7::timestamptz, now()) as now)
insert into faultline_processes as p (",
    process_columns!(),
    ")
select $1::text, $2::text, $3::text, $4::int4, $5::text, $6::jsonb, c.now, c.now from clock c
on conflict (id) do update
set role = excluded.role, host = excluded.host, pid = excluded.pid,
    version = excluded.version, queues = excluded.queues,
    started_at = case when p.host = excluded.host and p.pid = excluded.pid then p.started_at
        else excluded.started_at end,
    last_seen_at = excluded.last_seen_at
returning ",
    process_columns!()
);

/// Removes one process entry: 1 id.
pub const PROCESS_REMOVE: &str = "delete from faultline_processes where id = $1::text";

/// Every process entry, by id.
pub const PROCESS_LIST: &str = concat!(
    "select ",
    process_columns!(),
    " from faultline_processes order by id collate \"C\""
);

/// Removes entries not refreshed for more than 1 ms: 2 clock.
pub const PROCESS_PRUNE: &str = "delete from faultline_processes
where last_seen_at < coalesce($2::timestamptz, now()) - $1::int8 * interval '1 millisecond'";

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [&str; 35] = [
        ENQUEUE_ONE,
        ENQUEUE_MANY_PLAIN,
        ENQUEUE_MANY_KEYED,
        JOB_BY_KEY,
        IDS_BY_KEYS,
        CLAIM_ONE_QUEUE,
        CLAIM_MANY_QUEUES,
        HEARTBEAT_MANY,
        RELEASE_CLAIM,
        COMPLETE_MANY,
        COMPLETE_ONE,
        FAIL_MANY,
        SNOOZE,
        CANCEL,
        REDRIVE,
        STATE_OF,
        RESCUE_EXPIRED,
        EXPIRE_LEASE,
        GET,
        LIST,
        QUEUE_STATS,
        QUEUE_BACKLOG,
        PRUNE,
        QUEUE_LIST,
        QUEUE_SET_PAUSED,
        QUEUE_SET_LIMITS,
        LOCK_BOUNDED_QUEUES,
        CLAIM_CAPPED,
        LEADER_ELECT,
        LEADER_RESIGN,
        LEADER_GET,
        PROCESS_REGISTER,
        PROCESS_REMOVE,
        PROCESS_LIST,
        PROCESS_PRUNE,
    ];

    #[test]
    fn statements_are_lowercase_and_notify_the_documented_channel() {
        for statement in ALL {
            // The one quoted identifier: the "C" collation.
            let text = statement.replace("collate \"C\"", "");
            assert_eq!(text, text.to_lowercase(), "{statement}");
            if statement.contains("pg_notify") {
                assert!(
                    statement.contains("pg_notify('faultline_jobs',"),
                    "{statement}"
                );
                assert_eq!(crate::NOTIFY_CHANNEL, "faultline_jobs");
            }
        }
    }

    #[test]
    fn job_columns_are_prefixed_one_by_one() {
        let columns: Vec<&str> = job_columns!("j.").split(", ").collect();
        assert_eq!(columns.len(), 24);
        assert!(
            columns
                .iter()
                .all(|c| c.starts_with("j.") && !c[2..].contains('.'))
        );
        assert_eq!(columns[0], "j.id");
        assert_eq!(columns[23], "j.finished_at");
    }
}
