-- The searchers' one-decision-at-a-time lock per experiment (rung promotions,
-- PBT generations, TPE proposals) is a row of this table, locked to the end of
-- the deciding transaction. It replaces an advisory lock, which any session
-- (the read-only role included) could take on the same key and so stall
-- another user's sweep. Only the coordinator's role may lock these rows.
create table searcher_locks (
    experiment_id uuid primary key references experiments (id) on delete cascade
);
revoke all on searcher_locks from public;
