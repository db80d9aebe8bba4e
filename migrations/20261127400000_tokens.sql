-- Access tokens: only a SHA-256 of each secret is kept. A token is valid
-- until it expires or is revoked.
create table tokens (
    name       text primary key,
    role       text not null check (role in ('researcher', 'worker', 'admin')),
    hash       text not null unique,
    created_at timestamptz not null default now(),
    expires_at timestamptz,
    revoked_at timestamptz
);

-- Who submitted an experiment: the name of the token it came with (none without auth).
alter table experiments add column submitted_by text;

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
       e.submitted_by
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

