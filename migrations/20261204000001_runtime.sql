-- The runtime's rows next to the jobs: queues (pause/resume), the maintenance leader, the
-- registered processes, and each job's bounded attempt history.

-- One row per queue. A row appears on a queue's first enqueue (the enqueue statements insert it)
-- or when an operator pauses or resumes the queue by name. The claim statements skip paused
-- queues by primary-key lookups on this table, in the same statement.
create table faultline_queues (
    name        text primary key,
    paused      boolean not null default false,
    paused_at   timestamptz,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);

insert into faultline_queues (name)
select distinct queue from faultline_jobs
on conflict do nothing;

-- The maintenance leadership: at most one row (name = 'maintenance'). A process leads while
-- `expires_at` is ahead of the database's now(); it renews before then, and a candidate takes a
-- lapsed leadership with a new term. A row lease rather than an advisory lock: see
-- docs/adr/0001-leader-row-lease.md.
create table faultline_leader (
    name        text primary key,
    leader_id   text not null,
    term        bigint not null,
    elected_at  timestamptz not null,
    expires_at  timestamptz not null
);

-- Every worker and API process, refreshed with its heartbeat; the leader removes entries not seen
-- for a while.
create table faultline_processes (
    id            text primary key,
    role          text not null,
    host          text not null,
    pid           integer not null,
    version       text not null,
    -- [{"queue": name, "slots": n}, ...]
    queues        jsonb not null default '[]',
    started_at    timestamptz not null,
    last_seen_at  timestamptz not null
);

-- The attempt history: [{attempt, at, worker, fencing_token, error, kind}, ...], oldest first,
-- the newest `keep` kept. Written by the statement that fails the attempt (fail, rescue).
alter table faultline_jobs add column errors jsonb not null default '[]';

-- Appends one entry to a history and keeps its newest `keep` entries.
create function faultline_push_error(history jsonb, entry jsonb, keep integer)
returns jsonb
language sql immutable parallel safe
as $$
    select case
        when jsonb_array_length(history) < keep then history || jsonb_build_array(entry)
        else coalesce((
            select jsonb_agg(e order by o)
            from jsonb_array_elements(history || jsonb_build_array(entry)) with ordinality as t(e, o)
            where o > jsonb_array_length(history) + 1 - keep
        ), '[]'::jsonb)
    end
$$;

-- The claim that leased a job (a random id chosen by the claimant): a claimant whose claim timed
-- out or whose connection broke gives back whatever that claim leased, attempt included, without
-- waiting for the leases to expire (`job_release_claim`).
alter table faultline_jobs add column claim_id bigint;
