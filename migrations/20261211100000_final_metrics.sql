-- A finished trial's final metrics (each metric's value at its last step),
-- kept by the compactor once its points are merged, so the trial table,
-- `ablate status` and reports read one value a trial instead of probing every
-- metric's newest point. Null: not kept (running, or not yet compacted); the
-- readers then work it out from the points.
alter table trials add column final_metrics jsonb;

-- The final metrics of the trial that holds the points `holder`: per metric the
-- value at its newest step, rows and chunks alike (null when it has none). It
-- runs as its owner, so the reader role reads it through ablate.trial_results
-- as it reads the views.
create function trial_final_metrics(holder uuid)
returns jsonb language sql stable security definer set search_path from current as $$
    with recursive names (name_id) as (
        select min(mm.name_id) from metrics mm where mm.trial_id = holder
        union all
        select (select min(mm.name_id) from metrics mm where mm.trial_id = holder and mm.name_id > names.name_id)
        from names where names.name_id is not null
    ),
    candidates (name_id, step, value) as (
        select names.name_id, last.step, last.value
        from names cross join lateral (
            select mm.step, mm.value from metrics mm
            where mm.trial_id = holder and mm.name_id = names.name_id
            order by mm.step desc limit 1) last
        where names.name_id is not null
        union all
        (select distinct on (c.name_id) c.name_id, c.step_hi, c.v_last
         from metric_chunks c
         where c.trial_id = holder
         order by c.name_id, c.step_lo desc)
    ),
    finals as (
        select distinct on (name_id) name_id, value from candidates order by name_id, step desc
    )
    select jsonb_object_agg(n.name, finals.value)
    from finals join metric_names n on n.id = finals.name_id
$$;

-- A trial that changes state has final metrics to work out again (a retried or
-- promoted trial logs more; the compactor keeps them once it stops).
create function trials_final_metrics_stale() returns trigger language plpgsql as $$
begin
    new.final_metrics := null;
    return new;
end $$;

create trigger trials_final_metrics_stale before update of state on trials
for each row
when (old.state is distinct from new.state and old.final_metrics is not null)
execute function trials_final_metrics_stale();

-- Trials that finished before this migration.
update trials set final_metrics = trial_final_metrics(id)
where state in ('succeeded', 'failed', 'pruned', 'cancelled') and reused_from is null and not metrics_due;

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
    select coalesce(t.final_metrics, trial_final_metrics(coalesce(t.reused_from, t.id))) as final
    offset 0
) m on true;

grant select on all tables in schema ablate to ablate_reader;
