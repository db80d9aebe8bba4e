-- Several objectives: `[objective] also` lists more metrics beside `metric`, each
-- with its goal. ablate.pareto holds, per such experiment, the succeeded and
-- feasible trials that no other dominates (no worse in every objective and
-- better in one), with their objectives' values.

-- Whether `a` dominates `b`, both to minimize.
create function pareto_dominates(a float8[], b float8[]) returns boolean
language sql immutable as $$
    select bool_and(x <= y) and bool_or(x < y) from unnest(a, b) as u(x, y)
$$;

create view ablate.pareto as
with objectives as (
    select e.id as experiment_id,
           array_agg(o.metric order by o.i) as metrics,
           array_agg(o.sign order by o.i) as signs
    from experiments e
    cross join lateral (
        select 0::bigint as i, e.spec -> 'objective' ->> 'metric' as metric,
               case when e.spec -> 'objective' ->> 'goal' = 'maximize' then -1.0 else 1.0 end::float8 as sign
        union all
        select a.i, a.x ->> 'metric',
               case when a.x ->> 'goal' = 'maximize' then -1.0 else 1.0 end::float8
        from jsonb_array_elements(e.spec -> 'objective' -> 'also') with ordinality as a(x, i)
    ) o
    where jsonb_array_length(coalesce(e.spec -> 'objective' -> 'also', '[]'::jsonb)) > 0
    group by e.id
),
points as (
    select r.trial_id, r.experiment_id, r.ordinal, r.params, r.metrics, ob.metrics as names,
           array(select case when jsonb_typeof(r.metrics -> u.m) = 'number' then (r.metrics ->> u.m)::float8 * u.s end
                 from unnest(ob.metrics, ob.signs) with ordinality as u(m, s, k) order by u.k) as v
    from ablate.trial_results r
    join objectives ob on ob.experiment_id = r.experiment_id
    where r.state = 'succeeded' and r.feasible
)
select p.experiment_id, p.trial_id, p.ordinal, p.params,
       (select jsonb_object_agg(n, p.metrics -> n) from unnest(p.names) as n) as objectives
from points p
where array_position(p.v, null) is null
  and not exists (
      select 1 from points q
      where q.experiment_id = p.experiment_id and q.trial_id <> p.trial_id
        and array_position(q.v, null) is null and pareto_dominates(q.v, p.v)
  );

grant select on all tables in schema ablate to ablate_reader;
