-- What the queue decides by, as typed columns of the experiment written at
-- submit (from the checked spec), so that the lease statement and the pool and
-- label checks read no spec JSON. The spec itself stays as it was submitted.
alter table experiments
    add column priority float8 not null default 1,
    add column max_concurrent int,
    add column gpus_per_trial int not null default 1,
    add column pool text,
    add column labels jsonb,
    add column fuse jsonb,
    add column fresh_process boolean not null default false,
    add column searcher text not null default 'grid';

update experiments set
    priority = coalesce((spec ->> 'priority')::float8, 1),
    max_concurrent = (spec #>> '{resources,max_concurrent}')::int,
    gpus_per_trial = coalesce((spec #>> '{resources,gpus_per_trial}')::int, 1),
    pool = spec #>> '{resources,pool}',
    labels = nullif(spec #> '{resources,labels}', '{}'::jsonb),
    fuse = spec -> 'fuse',
    fresh_process = coalesce((spec #>> '{resources,fresh_process}')::boolean, false),
    searcher = coalesce(spec #>> '{sweep,searcher}', 'grid');
