-- Fused trials (`fuse` in a spec): trials of one experiment with equal keys
-- may be leased together and trained as one stacked model in one process.
-- The key is the trial's parameters less what members may differ in (seed,
-- learning rate, optimizer settings); null for a trial that runs alone.
alter table trials add column fuse_key text;
create index trials_pending_fusable on trials (experiment_id, fuse_key, ordinal)
    where state = 'pending' and fuse_key is not null;
