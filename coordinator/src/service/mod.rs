//! The gRPC edge: converts between `ablate.v1` messages and domain calls.
//! Nothing but conversions and request plumbing lives here: `experiments` serves
//! the CLI's service, `workers` the daemons'; what they decide is in `platform`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ablate_schema::proto::{experiments_server, workers_server};
use futures::Stream;
use sqlx::PgPool;
use tonic::Status;

use crate::auth::Tokens;
use crate::reader::Reader;
use crate::telemetry::Telemetry;
use ablate_schema::Limits;

mod experiments;
mod workers;

pub use experiments::ExperimentsService;
pub use workers::WorkersService;

/// Metric batches of one stream written concurrently.
const INGEST_IN_FLIGHT: usize = 4;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub fn experiments_server(
    pool: PgPool,
    reader: Reader,
    tokens: Option<Tokens>,
    options: &crate::Options,
    http_port: Option<u16>,
    objects: Option<crate::Objects>,
) -> experiments_server::ExperimentsServer<ExperimentsService> {
    experiments_server::ExperimentsServer::new(ExperimentsService {
        pool,
        reader,
        limits: options.limits,
        lease_ttl: options.lease_ttl,
        tokens,
        // The reader login reads where the researchers' pool does: the replica, when there is one.
        database_url: options
            .reader_database_url
            .clone()
            .unwrap_or_else(|| options.database_url.clone()),
        data_roots: options.data_roots.clone(),
        http_port,
        objects,
    })
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20)
}

pub fn workers_server(
    pool: PgPool,
    lease_ttl: Duration,
    limits: Limits,
    telemetry: Arc<Telemetry>,
) -> workers_server::WorkersServer<WorkersService> {
    workers_server::WorkersServer::new(WorkersService {
        lessor: crate::platform::lease::Lessor::spawn(pool.clone(), lease_ttl),
        completer: crate::platform::completion::Completer::spawn(pool.clone(), telemetry.clone()),
        pool,
        lease_ttl,
        limits,
        names: Arc::new(Mutex::new(HashMap::new())),
        telemetry,
    })
    .max_decoding_message_size(64 << 20)
}
