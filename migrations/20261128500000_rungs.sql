-- ASHA and Hyperband: a trial stops at each rung of its bracket with a
-- checkpoint there (an attempt that ends `paused`); the coordinator keeps its
-- objective at that rung and promotes the best 1/reduction_factor of each rung
-- (state pending again, resuming from the checkpoint). A paused trial not
-- promoted stays `pruned`; a later promotion may still take it on.
alter table trials
    add column bracket integer,
    -- The rung this attempt stops at; null: the end of the run.
    add column pause_at bigint,
    -- Attempts that ended paused at a rung: they don't count against max_attempts,
    -- and trials further up the ladder are leased first.
    add column pauses integer not null default 0;

alter table trial_attempts drop constraint trial_attempts_outcome_check;
alter table trial_attempts add constraint trial_attempts_outcome_check
    check (outcome in ('succeeded', 'failed', 'crashed', 'lease_expired', 'paused'));

-- Pending trials in lease order: promoted ones (more pauses) first, then by ordinal.
drop index trials_pending_by_experiment;
create index trials_pending_by_experiment on trials (experiment_id, pauses desc, ordinal) where state = 'pending';

create table rungs (
    trial_id      uuid not null references trials (id),
    experiment_id uuid not null references experiments (id),
    bracket       integer not null,
    step          bigint not null,
    -- The objective at the rung (its newest value at or before the step); null when the trial logged none.
    value         double precision,
    recorded_at   timestamptz not null default now(),
    promoted_at   timestamptz,
    primary key (trial_id, step)
);
create index rungs_by_rung on rungs (experiment_id, bracket, step);

create view ablate.rungs as
select r.experiment_id, r.trial_id, t.ordinal, t.params, r.bracket, r.step, r.value,
       r.promoted_at is not null as promoted, r.recorded_at, r.promoted_at
from rungs r
join trials t on t.id = r.trial_id;

grant select on ablate.rungs to ablate_reader;
