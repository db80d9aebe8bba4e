-- What each trial attempt ran on and with, as its worker reported it: the
-- ablate version and the commit it was built from, the libtorch and CUDA
-- versions, the device and its name, the host. Queryable beside the results.
alter table trial_attempts add column provenance jsonb;

create or replace view ablate.trial_attempts as
select t.experiment_id, a.trial_id, t.ordinal, a.attempt, a.worker_id, a.outcome, a.error, a.stderr_tail, a.finished_at,
       a.provenance->>'ablate_version' as ablate_version,
       a.provenance->>'git_commit' as git_commit,
       a.provenance->>'libtorch_version' as libtorch_version,
       a.provenance->>'cuda_version' as cuda_version,
       a.provenance->>'device' as device,
       a.provenance->>'device_name' as device_name,
       a.provenance->>'host' as host
from trial_attempts a
join trials t on t.id = a.trial_id;
