//! Researchers' reads (`ablate sql`, reports, the dashboard's reads) on their own
//! bounded pool, so they never take a connection from leases, heartbeats,
//! completions and metric ingest; with a cap on queries per caller, beyond which
//! the answer is "busy, retry". With `--reader-database-url` the pool reaches a
//! streaming replica, so analytic queries never touch the primary.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;

use crate::error::{Error, Result};

/// The reader pool and who is using it.
#[derive(Clone)]
pub struct Reader {
    pub pool: PgPool,
    /// The replica the pool reads from (`host:port`), when it is not the primary.
    pub replica: Option<String>,
    connections: usize,
    per_caller: usize,
    running: Arc<Mutex<Running>>,
}

#[derive(Default)]
struct Running {
    total: usize,
    by_caller: HashMap<Option<IpAddr>, usize>,
}

/// A query's place on the reader pool; gives it back when dropped.
pub struct Admission {
    caller: Option<IpAddr>,
    running: Arc<Mutex<Running>>,
}

impl Reader {
    /// `connections` reader connections in all, at most `per_caller` queries at once from one address.
    pub fn new(pool: PgPool, connections: usize, per_caller: usize) -> Reader {
        Reader {
            pool,
            replica: None,
            connections: connections.max(1),
            per_caller: per_caller.max(1),
            running: Arc::default(),
        }
    }

    /// Admits one query from `caller`, or refuses it at once when the pool or the caller's share is full.
    pub fn admit(&self, caller: Option<IpAddr>) -> Result<Admission> {
        let mut running = self.running.lock().expect("reader lock");
        let mine = running.by_caller.get(&caller).copied().unwrap_or(0);
        if mine >= self.per_caller {
            return Err(Error::Busy(format!(
                "busy: you have {mine} queries running, the most one caller may run at once; retry when one ends"
            )));
        }
        if running.total >= self.connections {
            return Err(Error::Busy(format!(
                "busy: {} queries are running, the most this coordinator serves at once; retry in a moment",
                running.total
            )));
        }
        running.total += 1;
        *running.by_caller.entry(caller).or_default() += 1;
        Ok(Admission {
            caller,
            running: self.running.clone(),
        })
    }
}

impl Reader {
    /// The same pool, reading from the replica at `replica` (`host:port`).
    pub fn on_replica(mut self, replica: String) -> Reader {
        self.replica = Some(replica);
        self
    }

    /// A database error of a read, saying which server failed when it is the replica.
    pub fn explain(&self, error: Error) -> Error {
        match (&self.replica, error) {
            (Some(replica), Error::Db(e)) => Error::Replica(format!(
                "the reader database, the replica at {replica} (--reader-database-url), failed: {e}; \
                 `ablate sql`, reports and the dashboard read from it, while leases and metrics go on on the primary"
            )),
            (_, other) => other,
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut running = self.running.lock().expect("reader lock");
        running.total -= 1;
        if let Some(n) = running.by_caller.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                running.by_caller.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn callers_get_their_share_and_the_pool_its_bound() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://unused@127.0.0.1:1/x")
            .unwrap();
        let reader = Reader::new(pool, 3, 2);
        let a: Option<IpAddr> = Some("10.0.0.1".parse().unwrap());
        let b: Option<IpAddr> = Some("10.0.0.2".parse().unwrap());
        let a1 = reader.admit(a).unwrap();
        let _a2 = reader.admit(a).unwrap();
        let err = reader.admit(a).err().unwrap().to_string();
        assert!(err.contains("you have 2 queries running"), "{err}");
        let _b1 = reader.admit(b).unwrap();
        let err = reader.admit(b).err().unwrap().to_string();
        assert!(err.contains("3 queries are running"), "{err}");
        drop(a1);
        assert!(reader.admit(b).is_ok(), "a finished query frees its place");
    }
}
