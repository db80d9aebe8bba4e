-- `ablate workers drain ID`: a draining worker is leased nothing and exits
-- once its running trials have ended.
alter table workers add column draining_since timestamptz;

create or replace view ablate.workers as
select id as worker_id, hostname, devices, registered_at, last_seen_at, unhealthy, draining_since
from workers;
