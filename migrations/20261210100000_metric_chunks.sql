-- The compact metric store. A metric batch is written as one chunk per
-- metric: a row holding the batch's values as a float8 array, the steps as a
-- stride when they are regular, the time recorded as microsecond offsets
-- (zero within a batch, so they compress) and a summary. Values are written
-- once: the coordinator's compactor rewrites only chunks too small to be worth
-- their row (fewer than 256 points on average, as a trial that logs each step
-- on its own makes) and rows of `metrics` (where points lived before), and
-- keeps for each finished trial's long curve a downsampled copy (each
-- bucket's first, lowest, highest and last point) that curves read instead.
--
-- Chunks of one trial and metric never overlap in steps, so a point is in one
-- place. A batch whose steps overlap a chunk (a replay, or a new attempt
-- logging again from its checkpoint) is merged with it, the batch's points
-- replacing those at the same steps, under the trial row locked FOR UPDATE,
-- as the compactor's rewrites are; a batch that overlaps nothing is written
-- under the row locked FOR KEY SHARE, so it never interleaves with a rewrite.
create table metric_chunks (
    trial_id    uuid not null,
    name_id     integer not null,
    step_lo     bigint not null,
    step_hi     bigint not null,
    n           integer not null check (n > 0),
    -- null when the steps are step_lo, step_lo + stride, ..., step_hi
    steps       bigint[],
    stride      bigint not null,
    vals        double precision[] not null,
    recorded_lo timestamptz not null,
    recorded_us bigint[] not null,
    -- NaN-free summary: null when every value is NaN
    v_min       double precision,
    v_max       double precision,
    v_last      double precision not null,
    primary key (trial_id, name_id, step_lo)
);

-- A finished trial's curve of more than 1,024 points, downsampled: 256 buckets'
-- first, lowest, highest and last point, in step order, and how many points it
-- stands for (a copy whose count no longer matches is not read).
create table metric_curves (
    trial_id    uuid not null,
    name_id     integer not null,
    points      bigint not null,
    steps       bigint[] not null,
    vals        double precision[] not null,
    primary key (trial_id, name_id)
);

-- lz4 where the server has it (it compresses faster than pglz and gives up
-- sooner on values that do not compress).
do $$
begin
    alter table metric_chunks alter column steps set compression lz4;
    alter table metric_chunks alter column recorded_us set compression lz4;
    alter table metric_chunks alter column vals set compression lz4;
    alter table metric_curves alter column steps set compression lz4;
    alter table metric_curves alter column vals set compression lz4;
exception when others then
    null;
end $$;

-- Set when a trial with points stops running; the compactor clears it once
-- they are merged.
alter table trials add column metrics_due boolean not null default false;
create index trials_metrics_due on trials (id) where metrics_due;

-- Every point of every trial, rows and chunks alike, keyed by the trial that
-- holds the data (a reusing trial reads its source's).
create view metric_points as
select m.trial_id, m.name_id, m.step, m.value, m.recorded_at
from metrics m
union all
select c.trial_id, c.name_id,
       coalesce(u.step, c.step_lo + (u.i - 1) * c.stride) as step,
       u.value,
       c.recorded_lo + u.us * interval '1 microsecond' as recorded_at
from metric_chunks c
cross join lateral unnest(c.vals, c.steps, c.recorded_us) with ordinality as u(value, step, us, i);

-- The newest point of one trial's metric at or before `at` (any step when null):
-- the newest row's and the one chunk's that holds it, whichever is later.
create function metric_value_at(p_trial uuid, p_name integer, p_at bigint)
returns double precision language sql stable as $$
    select v.value from (
        (select m.step, m.value from metrics m
         where m.trial_id = p_trial and m.name_id = p_name and (p_at is null or m.step <= p_at)
         order by m.step desc limit 1)
        union all
        (select case when p_at is null or p_at >= c.step_hi then c.step_hi
                     else (select coalesce(u.step, c.step_lo + (u.i - 1) * c.stride)
                           from unnest(c.vals, c.steps) with ordinality as u(value, step, i)
                           where coalesce(u.step, c.step_lo + (u.i - 1) * c.stride) <= p_at
                           order by u.i desc limit 1)
                end,
                case when p_at is null or p_at >= c.step_hi then c.v_last
                     else (select u.value
                           from unnest(c.vals, c.steps) with ordinality as u(value, step, i)
                           where coalesce(u.step, c.step_lo + (u.i - 1) * c.stride) <= p_at
                           order by u.i desc limit 1)
                end
         from metric_chunks c
         where c.trial_id = p_trial and c.name_id = p_name and (p_at is null or c.step_lo <= p_at)
         order by c.step_lo desc limit 1)
    ) v
    order by v.step desc nulls last limit 1
$$;

-- The newest step a trial logged, of any metric.
create function metric_last_step(p_trial uuid)
returns bigint language sql stable as $$
    select greatest((select max(m.step) from metrics m where m.trial_id = p_trial),
                    (select max(c.step_hi) from metric_chunks c where c.trial_id = p_trial))
$$;

-- The metrics a trial logged: a loose index scan of its rows (a few probes per
-- name however long the curves are) and its chunks' names.
create function metric_name_ids(p_trial uuid)
returns setof integer language sql stable as $$
    with recursive names (name_id) as (
        select min(mm.name_id) from metrics mm where mm.trial_id = p_trial
        union all
        select (select min(mm.name_id) from metrics mm where mm.trial_id = p_trial and mm.name_id > names.name_id)
        from names where names.name_id is not null
    )
    select name_id from names where name_id is not null
    union
    select distinct c.name_id from metric_chunks c where c.trial_id = p_trial
$$;

-- One curve for drawing: its points when there are no more than `p_full`, else
-- its downsampled copy when one stands for all of them.
create function metric_curve(p_trial uuid, p_name integer, p_full integer)
returns table (step bigint, value double precision) language sql stable as $$
    with total as (
        select coalesce((select sum(c.n) from metric_chunks c where c.trial_id = p_trial and c.name_id = p_name), 0)
               + (select count(*) from metrics m where m.trial_id = p_trial and m.name_id = p_name) as points
    ),
    copy as (
        select d.* from metric_curves d, total
        where d.trial_id = p_trial and d.name_id = p_name and d.points = total.points and total.points > p_full
    )
    select u.step, u.value from copy cross join lateral unnest(copy.steps, copy.vals) as u(step, value)
    union all
    select coalesce(u.step, c.step_lo + (u.i - 1) * c.stride), u.value
    from metric_chunks c
    cross join lateral unnest(c.vals, c.steps) with ordinality as u(value, step, i)
    where c.trial_id = p_trial and c.name_id = p_name and not exists (select 1 from copy)
    union all
    select m.step, m.value from metrics m
    where m.trial_id = p_trial and m.name_id = p_name and not exists (select 1 from copy)
$$;

-- A trial with points that stops running is due for the compactor.
create function trials_metrics_due() returns trigger language plpgsql as $$
begin
    new.metrics_due := exists (select 1 from metric_chunks c where c.trial_id = new.id)
                       or exists (select 1 from metrics m where m.trial_id = new.id);
    return new;
end $$;

create trigger trials_metrics_due before update of state on trials
for each row
when (old.state is distinct from new.state and new.state in ('succeeded', 'failed', 'pruned', 'cancelled'))
execute function trials_metrics_due();

create or replace view ablate.metric_series as
select t.id as trial_id,
       t.experiment_id,
       n.name,
       m.step,
       m.value,
       m.recorded_at
from trials t
join metric_points m on m.trial_id = coalesce(t.reused_from, t.id)
join metric_names n on n.id = m.name_id;

-- Per trial and metric: how many points, the first and last step, the lowest
-- and highest value (NaN left out) and the last, read from the chunks'
-- summaries and the rows not yet moved, without reading every point.
create view ablate.metric_summary as
select t.id as trial_id,
       t.experiment_id,
       n.name,
       s.points,
       s.first_step,
       s.last_step,
       s.min_value,
       s.max_value,
       s.last_value
from trials t
cross join lateral (
    select p.name_id,
           sum(p.points)::bigint as points,
           min(p.first_step) as first_step,
           max(p.last_step) as last_step,
           min(p.min_value) as min_value,
           max(p.max_value) as max_value,
           (array_agg(p.last_value order by p.last_step desc))[1] as last_value
    from (
        select c.name_id, c.n::bigint as points, c.step_lo as first_step, c.step_hi as last_step,
               c.v_min as min_value, c.v_max as max_value, c.v_last as last_value
        from metric_chunks c where c.trial_id = coalesce(t.reused_from, t.id)
        union all
        select m.name_id, count(*), min(m.step), max(m.step),
               min(nullif(m.value, 'NaN')), max(nullif(m.value, 'NaN')),
               (array_agg(m.value order by m.step desc))[1]
        from metrics m where m.trial_id = coalesce(t.reused_from, t.id)
        group by m.name_id
    ) p
    group by p.name_id
) s
join metric_names n on n.id = s.name_id;

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
    ),
    candidates (name_id, step, value) as (
        select names.name_id, last.step, last.value
        from names cross join lateral (
            select mm.step, mm.value from metrics mm
            where mm.trial_id = coalesce(t.reused_from, t.id) and mm.name_id = names.name_id
            order by mm.step desc limit 1) last
        where names.name_id is not null
        union all
        (select distinct on (c.name_id) c.name_id, c.step_hi, c.v_last
         from metric_chunks c
         where c.trial_id = coalesce(t.reused_from, t.id)
         order by c.name_id, c.step_lo desc)
    ),
    finals as (
        select distinct on (name_id) name_id, value from candidates order by name_id, step desc
    )
    select jsonb_object_agg(n.name, finals.value) as final
    from finals join metric_names n on n.id = finals.name_id
) m on true;

grant select on all tables in schema ablate to ablate_reader;
