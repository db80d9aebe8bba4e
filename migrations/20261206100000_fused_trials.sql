-- Fused trials (`fuse` in a spec): trials of one experiment with equal keys
-- may be leased together and trained as one stacked model in one process.
-- The key is the trial's parameters less what members may differ in (seed,
-- learning rate, optimizer settings); null for a trial that runs alone.
alter table trials add column fuse_key text;
create index trials_pending_fusable on trials (experiment_id, fuse_key, ordinal)
    where state = 'pending' and fuse_key is not null;

-- Each attempt of a fused trial names its group (the group's first trial) and
-- the group's size, from what the worker reported with it.
create or replace view ablate.trial_attempts as
select t.experiment_id, a.trial_id, t.ordinal, a.attempt, a.worker_id, a.outcome, a.error, a.stderr_tail, a.finished_at,
       a.provenance->>'ablate_version' as ablate_version,
       a.provenance->>'git_commit' as git_commit,
       a.provenance->>'libtorch_version' as libtorch_version,
       a.provenance->>'cuda_version' as cuda_version,
       a.provenance->>'device' as device,
       a.provenance->>'device_name' as device_name,
       a.provenance->>'host' as host,
       (a.provenance->>'fused_group')::uuid as fused_group,
       (a.provenance->>'fused_members')::int as fused_members
from trial_attempts a
join trials t on t.id = a.trial_id;
