-- Every attempt of a trial and how it ended: succeeded, failed (the trial's
-- own error), crashed (its process died: a signal, a panic; retried from the
-- newest checkpoint while attempts remain) or lease_expired.
create table trial_attempts (
    trial_id    uuid not null references trials (id),
    attempt     integer not null,
    worker_id   uuid,
    outcome     text not null check (outcome in ('succeeded', 'failed', 'crashed', 'lease_expired')),
    error       text,
    stderr_tail text,
    finished_at timestamptz not null default now(),
    primary key (trial_id, attempt)
);

create view ablate.trial_attempts as
select t.experiment_id, a.trial_id, t.ordinal, a.attempt, a.worker_id, a.outcome, a.error, a.stderr_tail, a.finished_at
from trial_attempts a
join trials t on t.id = a.trial_id;

grant select on ablate.trial_attempts to ablate_reader;
