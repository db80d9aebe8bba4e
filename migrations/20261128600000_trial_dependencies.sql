-- Trial dependencies: a trial names the trials of its experiment it waits
-- for; it is not leased until they all succeeded, and fails, with the reason,
-- when one of them fails for good (and so on down the chain).
alter table trials add column depends_on uuid[] not null default '{}';
create index trials_depends_on on trials using gin (depends_on) where depends_on <> '{}';

create function fail_dependents() returns trigger language plpgsql as $$
begin
    update trials d
    set state = 'failed',
        error = format('it waits for trial %s (ordinal %s), which failed: %s', new.id, new.ordinal,
                       coalesce(new.error, 'no error recorded')),
        finished_at = now(),
        lease_token = null, lease_owner = null, lease_expires_at = null
    where d.depends_on @> array[new.id] and d.depends_on <> '{}' and d.state = 'pending';
    return null;
end
$$;

create trigger trials_fail_dependents
    after update of state on trials
    for each row
    when (new.state = 'failed' and old.state is distinct from 'failed')
    execute function fail_dependents();

-- What each trial waits for, by ordinal, beside the trial.
create view ablate.trial_dependencies as
select t.experiment_id, t.id as trial_id, t.ordinal, d.id as depends_on_trial_id, d.ordinal as depends_on_ordinal,
       d.state as depends_on_state
from trials t
cross join lateral unnest(t.depends_on) as u(id)
join trials d on d.id = u.id;

grant select on ablate.trial_dependencies to ablate_reader;
