-- Command trials (the researcher's own program, [trial] in the spec): the
-- experiment's program as a typed column written at submit, the hash of its
-- packed code, and which workers their operators let run programs. The lease
-- gives a command trial only to a worker with allow_commands.
alter table experiments
    add column command jsonb,
    add column code_hash text;

update experiments set command = spec -> 'trial' where spec ? 'trial';

alter table workers
    add column allow_commands boolean not null default false;
