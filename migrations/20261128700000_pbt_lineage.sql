-- Population-based training: each member's decision at every generation
-- (continue, or exploit: it took the donor's checkpoint and its
-- hyperparameters perturbed), with the objective it had there and the
-- parameters it went on with. The member's objective at each generation is
-- also in `rungs`.
create table pbt_lineage (
    experiment_id  uuid not null references experiments (id),
    trial_id       uuid not null references trials (id),
    step           bigint not null,
    value          double precision,
    action         text not null check (action in ('continue', 'exploit')),
    donor_trial_id uuid references trials (id),
    params         jsonb not null,
    decided_at     timestamptz not null default now(),
    primary key (trial_id, step)
);

create view ablate.pbt_lineage as
select l.experiment_id, l.trial_id, t.ordinal, l.step, l.value, l.action,
       l.donor_trial_id, d.ordinal as donor_ordinal, l.params, l.decided_at
from pbt_lineage l
join trials t on t.id = l.trial_id
left join trials d on d.id = l.donor_trial_id;

grant select on ablate.pbt_lineage to ablate_reader;
