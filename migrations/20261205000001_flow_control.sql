-- Flow control on the queue row: `max_running` bounds the running jobs of a queue across every
-- worker and HTTP lease holder (null: no bound). A claim that touches a bounded queue locks its
-- row first (`for update`, in the claim's own transaction), then counts the queue's running jobs
-- with a snapshot taken after the lock was granted: two claims of one bounded queue run one after
-- the other, and the second sees every job the first leased.
--
-- The count reads the running jobs through the rescue index (its cost grows with the jobs running
-- in the whole database, not with the backlog). A second partial index on running jobs by queue
-- was tried and dropped: with stale statistics the planner took it for the rescue and sorted every
-- running job (the trap of PERF-NOTES), which the plan test catches.
alter table faultline_queues add column max_running integer
    check (max_running is null or max_running between 1 and 1000000);
