//! One module per `ablate` command.

pub mod cancel;
pub mod dashboard;
pub mod lifecycle;
pub mod logs;
pub mod report;
pub mod serve;
pub mod sql;
pub mod status;
pub mod submit;
pub mod token;
pub mod up;
pub mod watch;
pub mod workers;
