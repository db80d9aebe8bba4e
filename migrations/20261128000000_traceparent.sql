-- The W3C traceparent of the submit that stored an experiment, when traces
-- were on: each lease of its trials continues that trace, so a trial's spans
-- (CLI, coordinator, worker, trial process) share one trace id.
alter table experiments add column traceparent text;
