//! Command trials: a trial that runs the researcher's own program. `protocol` reads
//! the events the program writes to its worker.

pub mod protocol;
