-- ablate's first schema. Tables in `public` are private to the coordinator;
-- the views in schema `ablate` are the public, stable query interface.

create table experiments (
    id            uuid primary key,
    name          text not null,
    family        text not null,
    spec          jsonb not null,
    spec_text     text not null,
    spec_hash     text not null,
    objective_metric text,
    goal          text check (goal in ('minimize', 'maximize')),
    max_attempts  integer not null check (max_attempts >= 1),
    created_at    timestamptz not null default now(),
    cancelled_at  timestamptz
);

create table trials (
    id               uuid primary key,
    experiment_id    uuid not null references experiments (id),
    ordinal          integer not null,
    params           jsonb not null,
    total_steps      bigint not null default 0,
    state            text not null default 'pending'
                     check (state in ('pending', 'running', 'succeeded', 'failed', 'pruned', 'cancelled')),
    attempt          integer not null default 0,
    lease_token      uuid,
    lease_owner      uuid,
    lease_expires_at timestamptz,
    created_at       timestamptz not null default now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    error            text,
    stderr_tail      text,
    unique (experiment_id, ordinal)
);

-- The lease queue scans only pending trials, oldest first.
create index trials_pending on trials (created_at, ordinal) where state = 'pending';
-- The reaper scans only running trials.
create index trials_running_expiry on trials (lease_expires_at) where state = 'running';
create index trials_lease_token on trials (lease_token);
create index trials_experiment on trials (experiment_id, state);

create table metric_names (
    id   serial primary key,
    name text not null unique
);

-- No foreign keys here: a per-row check would cost more than the insert itself.
-- Every batch is written by one statement that joins the trial (the lease fence),
-- and names come from metric_names, so both ends exist.
create table metrics (
    trial_id    uuid not null,
    name_id     integer not null,
    step        bigint not null,
    value       double precision not null,
    recorded_at timestamptz not null default now(),
    primary key (trial_id, name_id, step)
);

create table checkpoints (
    trial_id   uuid not null references trials (id),
    step       bigint not null,
    path       text not null,
    bytes      bigint not null,
    attempt    integer not null,
    created_at timestamptz not null default now(),
    primary key (trial_id, step)
);

create table workers (
    id            uuid primary key,
    hostname      text not null,
    devices       text[] not null,
    registered_at timestamptz not null default now(),
    last_seen_at  timestamptz not null default now()
);

-- The public views. They run with their owner's rights, so a role granted
-- only these views can read results without touching the tables.
create schema ablate;

create view ablate.trial_results as
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
       t.finished_at
from trials t
join experiments e on e.id = t.experiment_id
left join lateral (
    select jsonb_object_agg(last.name, last.value) as final
    from (
        select distinct on (mm.name_id) n.name, mm.value
        from metrics mm
        join metric_names n on n.id = mm.name_id
        where mm.trial_id = t.id
        order by mm.name_id, mm.step desc
    ) last
) m on true;

create view ablate.experiments as
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
       e.cancelled_at
from experiments e
cross join lateral (
    select count(*) as total,
           count(*) filter (where t.state = 'pending') as pending,
           count(*) filter (where t.state = 'running') as running,
           count(*) filter (where t.state = 'succeeded') as succeeded,
           count(*) filter (where t.state = 'failed') as failed,
           count(*) filter (where t.state = 'pruned') as pruned,
           count(*) filter (where t.state = 'cancelled') as cancelled
    from trials t
    where t.experiment_id = e.id
) c;

create view ablate.metric_series as
select m.trial_id,
       t.experiment_id,
       n.name,
       m.step,
       m.value,
       m.recorded_at
from metrics m
join metric_names n on n.id = m.name_id
join trials t on t.id = m.trial_id;

create view ablate.checkpoints as
select c.trial_id,
       t.experiment_id,
       c.step,
       c.path,
       c.bytes,
       c.attempt,
       c.created_at
from checkpoints c
join trials t on t.id = c.trial_id;

create view ablate.workers as
select id as worker_id, hostname, devices, registered_at, last_seen_at
from workers;

-- The read-only role `ablate sql` runs queries as; psql and pandas users may log in with it.
do $$
begin
    create role ablate_reader nologin;
exception
    when duplicate_object or unique_violation then null;
end
$$;

grant usage on schema ablate to ablate_reader;
grant select on all tables in schema ablate to ablate_reader;

do $$
begin
    execute format('grant ablate_reader to %I', current_user);
exception
    when others then null;
end
$$;
