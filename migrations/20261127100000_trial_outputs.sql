-- What a trial produced beyond metrics: named JSON values (for a data
-- selection, the manifest of the selected set in object storage).
alter table trials add column outputs jsonb not null default '{}'::jsonb;

create view ablate.outputs as
select t.id as trial_id,
       t.experiment_id,
       e.name as experiment,
       t.ordinal,
       o.key as name,
       o.value
from trials t
join experiments e on e.id = t.experiment_id
cross join lateral jsonb_each(t.outputs) o;

grant select on ablate.outputs to ablate_reader;
