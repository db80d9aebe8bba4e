-- Sweeps that live on: tags and a note per experiment, trials retried with a
-- fresh allowance of attempts, trials that take a finished trial's results
-- instead of running (reuse), and checkpoint retention.

alter table experiments
    add column tags text[] not null default '{}',
    add column note text,
    -- 'all', 'last', 'best' or 'newest:N' (the spec's [checkpoints] keep).
    add column keep_checkpoints text not null default 'all',
    add column extended_at timestamptz;

create index experiments_tags on experiments using gin (tags);

alter table trials
    -- The succeeded trial whose metrics, checkpoints and outputs this one takes
    -- instead of running; always the trial that holds them (never a reuse itself).
    add column reused_from uuid references trials (id),
    -- Attempts used before the last `ablate retry`: a retried trial gets the
    -- experiment's max_attempts again, its attempt numbers going on.
    add column attempt_base integer not null default 0,
    -- When retention last looked at this finished trial's checkpoints.
    add column retained_at timestamptz;

create index trials_reused_from on trials (reused_from) where reused_from is not null;
-- Retention's work list: finished trials not yet looked at.
create index trials_to_retain on trials (experiment_id)
    where retained_at is null and state in ('succeeded', 'pruned');

-- The views read a reused trial's data where it lives.

create or replace view ablate.experiments as
select e.id as experiment_id,
       e.name,
       e.family,
       case
           when e.cancelled_at is not null then 'cancelled'
           when c.pending + c.running > 0 then 'running'
           when c.failed > 0 then 'failed'
           else 'succeeded'
       end as state,
       c.total as trials,
       c.pending, c.running, c.succeeded, c.failed, c.pruned, c.cancelled,
       e.objective_metric,
       e.goal,
       e.spec,
       e.spec_hash,
       e.created_at,
       e.cancelled_at,
       e.submitted_by,
       e.tags,
       e.note,
       c.reused,
       e.keep_checkpoints,
       e.extended_at
from experiments e
cross join lateral (
    select count(*) as total,
           count(*) filter (where t.state = 'pending') as pending,
           count(*) filter (where t.state = 'running') as running,
           count(*) filter (where t.state = 'succeeded') as succeeded,
           count(*) filter (where t.state = 'failed') as failed,
           count(*) filter (where t.state = 'pruned') as pruned,
           count(*) filter (where t.state = 'cancelled') as cancelled,
           count(*) filter (where t.reused_from is not null) as reused
    from trials t
    where t.experiment_id = e.id
) c;

create or replace view ablate.trial_results as
select t.id as trial_id,
       t.experiment_id,
       e.name as experiment,
       t.ordinal,
       t.state,
       t.params,
       coalesce(m.final, '{}'::jsonb) as metrics,
       (m.final ->> e.objective_metric)::double precision as objective,
       t.attempt,
       t.error,
       t.started_at,
       t.finished_at,
       t.reused_from
from trials t
join experiments e on e.id = t.experiment_id
left join lateral (
    with recursive names (name_id) as (
        select min(mm.name_id) from metrics mm where mm.trial_id = coalesce(t.reused_from, t.id)
        union all
        select (select min(mm.name_id) from metrics mm
                where mm.trial_id = coalesce(t.reused_from, t.id) and mm.name_id > names.name_id)
        from names where names.name_id is not null
    )
    select jsonb_object_agg(n.name, (select mm.value from metrics mm
                                      where mm.trial_id = coalesce(t.reused_from, t.id) and mm.name_id = names.name_id
                                      order by mm.step desc limit 1)) as final
    from names join metric_names n on n.id = names.name_id
) m on true;

create or replace view ablate.metric_series as
select t.id as trial_id,
       t.experiment_id,
       n.name,
       m.step,
       m.value,
       m.recorded_at
from trials t
join metrics m on m.trial_id = coalesce(t.reused_from, t.id)
join metric_names n on n.id = m.name_id;

create or replace view ablate.checkpoints as
select t.id as trial_id,
       t.experiment_id,
       c.step,
       c.path,
       c.bytes,
       c.attempt,
       c.created_at,
       c.trial_id as stored_by
from trials t
join checkpoints c on c.trial_id = coalesce(t.reused_from, t.id);

grant select on all tables in schema ablate to ablate_reader;
