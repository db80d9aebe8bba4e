-- A worker that can't start trials says so: its reason stays here until it
-- starts one again, and `ablate workers` shows it.
alter table workers add column unhealthy text;

create or replace view ablate.workers as
select id as worker_id, hostname, devices, registered_at, last_seen_at, unhealthy
from workers;
