-- Worker pools: a daemon joins with a pool and labels; a spec's
-- [resources] pool and labels say which workers may lease its trials.
alter table workers add column pool text, add column labels jsonb not null default '{}'::jsonb;

create or replace view ablate.workers as
select id as worker_id, hostname, devices, registered_at, last_seen_at, unhealthy, draining_since, pool, labels
from workers;
