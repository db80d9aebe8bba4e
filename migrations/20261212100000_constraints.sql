-- `[objective] constraints`: bounds a trial must meet to count, each "name op
-- bound" over a final metric or an output. A trial that misses one, or lacks
-- the value (or its value is not a number), is infeasible: `feasible` is false
-- in ablate.trial_results, and no read that picks the best takes it.

-- Whether final metrics `final` and outputs `outputs` meet every constraint of
-- `constraints` (the spec's list of texts, checked at submit); true without any.
create function trial_feasible(final jsonb, outputs jsonb, constraints jsonb)
returns boolean language sql immutable as $$
    select coalesce(bool_and(coalesce(
               case c.m[2]
                   when '<=' then v.value <= c.m[3]::float8
                   when '<' then v.value < c.m[3]::float8
                   when '>=' then v.value >= c.m[3]::float8
                   when '>' then v.value > c.m[3]::float8
               end, false)), true)
    from jsonb_array_elements_text(constraints) as t(text)
    cross join lateral (select regexp_match(t.text, '^\s*([^<>=\s]+)\s*(<=|>=|<|>)\s*(\S+)\s*$') as m) c
    cross join lateral (
        select case
                   when jsonb_typeof(final -> c.m[1]) = 'number' then (final ->> c.m[1])::float8
                   when jsonb_typeof(outputs -> c.m[1]) = 'number' then (outputs ->> c.m[1])::float8
               end as value
    ) v
$$;

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
       t.reused_from,
       case when e.spec -> 'objective' -> 'constraints' is null then true
            else trial_feasible(m.final, t.outputs, e.spec -> 'objective' -> 'constraints')
       end as feasible
from trials t
join experiments e on e.id = t.experiment_id
left join lateral (
    select coalesce(t.final_metrics, trial_final_metrics(coalesce(t.reused_from, t.id))) as final
    offset 0
) m on true;

grant select on all tables in schema ablate to ablate_reader;
