-- Fair share: leases go round-robin across the users (the token a spec came
-- with) and, within a user, the experiments that have pending trials,
-- weighted by the user's weight (set by an admin) and the spec's priority.
alter table tokens add column weight double precision not null default 1 check (weight > 0);

-- The experiments with pending trials, found by a loose index scan, and each
-- one's next pending trials in order.
create index trials_pending_by_experiment on trials (experiment_id, ordinal) where state = 'pending';
-- Each experiment's running trials (its current share).
create index trials_running_by_experiment on trials (experiment_id) where state = 'running';
