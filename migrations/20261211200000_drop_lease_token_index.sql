-- Every lookup by lease token also names the trial (`id = $1 and lease_token =
-- $2`), which the primary key finds; the index only cost each lease and
-- completion one more entry to write.
drop index if exists trials_lease_token;
