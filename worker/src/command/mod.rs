//! Command trials: a trial that runs the researcher's own program (`[trial]` in
//! the spec). `protocol` reads the events the program writes to its worker;
//! `run` starts the program and takes its events as a built-in trial's.

pub mod protocol;
pub mod run;
