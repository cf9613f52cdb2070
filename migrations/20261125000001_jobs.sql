-- Faultline's jobs table: the single source of truth for every job.
-- Column meanings mirror faultline_domain::Job; the checks below are the domain invariants that a
-- single row can express, so even a buggy adapter cannot store an impossible job.

create table faultline_jobs (
    id                bigint generated always as identity primary key,
    queue             text not null,
    kind              text not null,
    payload           jsonb not null,
    priority          smallint not null default 0,
    state             text not null default 'queued',
    attempts          integer not null default 0,
    max_attempts      integer not null default 25,
    -- bumped on every claim; every write by a lease holder must present the current value
    fencing_token     bigint not null default 0,
    cancel_requested  boolean not null default false,
    next_run_at       timestamptz not null default now(),
    lease_owner       text,
    lease_expires_at  timestamptz,
    idempotency_key   text,
    -- sha-256 of queue, kind and canonical payload: tells a replay from a conflicting reuse of a key
    payload_hash      bytea,
    backoff_base_ms   bigint not null default 1000,
    backoff_cap_ms    bigint not null default 3600000,
    backoff_jitter    double precision not null default 0.1,
    timeout_ms        bigint,
    last_error        text,
    result            jsonb,
    created_at        timestamptz not null default now(),
    started_at        timestamptz,
    finished_at       timestamptz,

    constraint faultline_jobs_state_valid
        check (state in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    constraint faultline_jobs_attempts_within_budget
        check (max_attempts >= 1 and attempts >= 0 and attempts <= max_attempts),
    constraint faultline_jobs_queued_has_attempt_left
        check (state <> 'queued' or attempts < max_attempts),
    constraint faultline_jobs_lease_only_while_running
        check ((state = 'running') = (lease_expires_at is not null)),
    constraint faultline_jobs_finished_only_when_terminal
        check ((state in ('succeeded', 'failed', 'cancelled')) = (finished_at is not null)),
    constraint faultline_jobs_key_has_hash
        check (idempotency_key is null or payload_hash is not null)
);

-- Claim: due queued jobs of a queue in claim order. Partial, so finished history is never scanned.
create index faultline_jobs_claim_idx
    on faultline_jobs (queue, priority, next_run_at, id)
    where state = 'queued';

-- Rescue: running jobs by lease end, then id (the rescue order, so a limited rescue reads only
-- the leases it ends instead of sorting every expired one).
create index faultline_jobs_rescue_idx
    on faultline_jobs (lease_expires_at, id)
    where state = 'running';

-- Idempotency keys are unique while their job exists (enforced by the database, race-safe).
create unique index faultline_jobs_idempotency_key_idx
    on faultline_jobs (idempotency_key)
    where idempotency_key is not null;

-- Retention pruning: finished jobs by finish time, then id (the pruning order, so a limited prune
-- stops after `limit` jobs instead of sorting the whole history).
create index faultline_jobs_finished_idx
    on faultline_jobs (finished_at, id)
    where finished_at is not null;

-- The retry policy of faultline_domain::RetryPolicy::delay_ms, in SQL, so that rescue and retry
-- compute backoff inside their single statement. Must stay identical to the Rust function
-- (a property test compares them).
create function faultline_backoff_ms(
    attempt integer,
    base_ms bigint,
    cap_ms bigint,
    jitter double precision,
    sample double precision
) returns bigint
language sql immutable parallel safe
as $$
    select least(
        greatest(cap_ms, 0),
        greatest(0, floor(
            least(greatest(cap_ms, 0)::float8,
                  greatest(base_ms, 0)::float8 * power(2::float8, least(greatest(attempt, 1) - 1, 62)))
            * (1 - least(greatest(jitter, 0), 1)
               + 2 * least(greatest(jitter, 0), 1) * least(greatest(sample, 0), 1))
        )::bigint)
    )
$$;
