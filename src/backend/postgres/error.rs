//! How the PostgreSQL backend's failures become [`StateError`]s. Owns the classification of a
//! `tokio_postgres` or pool error (transient or not, committed or not) and the mapping;
//! calls nothing but the error type.
//!
//! The rule the writer relies on: an error that arrives *before* COMMIT was sent means
//! nothing of the transaction was committed (it was explicit, begun and acknowledged
//! first), so it is [`StateError::Unavailable`] (or a more precise kind) and safe to retry
//! whatever the write; an error *after* COMMIT was sent (the connection died waiting for its
//! answer) leaves the outcome unknown: [`StateError::Timeout`].

use std::time::Duration;

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use crate::error::StateError;

/// The largest value stored: PostgreSQL's `bytea` holds at most 1 GB; a larger put is
/// [`StateError::TooLarge`] before anything is sent.
pub(super) const MAX_VALUE: usize = 1_000_000_000;

/// A failure of one attempt, before it is mapped: what the writer needs to decide on a retry.
#[derive(Debug)]
pub(super) enum Failure {
    /// The pool gave no connection (timeout, server unreachable, pool closed).
    Pool(String),
    /// A statement or the connection failed.
    Pg(tokio_postgres::Error),
    /// The attempt as a whole took longer than its bound (statement timeout plus slack):
    /// the connection was dropped.
    Deadline(Duration),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Pg(e)
    }
}

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Self {
        Failure::Pool(match e {
            PoolError::Timeout(t) => format!("no PostgreSQL connection in time ({t:?})"),
            PoolError::Backend(e) => format!("cannot connect to PostgreSQL: {}", describe(&e)),
            PoolError::Closed => "the PostgreSQL connection pool is closed".to_owned(),
            other => format!("PostgreSQL connection pool: {other}"),
        })
    }
}

impl Failure {
    /// Whether the same attempt may succeed on a fresh connection: the connection or the
    /// server went away, the pool had none, or the server chose this transaction as the
    /// victim of a deadlock or serialization conflict.
    pub(super) fn transient(&self) -> bool {
        match self {
            Failure::Pool(_) | Failure::Deadline(_) => true,
            Failure::Pg(e) => match e.code() {
                None => true, // the connection: closed, I/O, protocol
                Some(code) => {
                    let class = &code.code()[..2];
                    class == "08" // connection exception
                        || *code == SqlState::ADMIN_SHUTDOWN // pg_terminate_backend, fast stop
                        || *code == SqlState::CRASH_SHUTDOWN
                        || *code == SqlState::CANNOT_CONNECT_NOW // starting up, recovering
                        || *code == SqlState::TOO_MANY_CONNECTIONS
                        || *code == SqlState::T_R_SERIALIZATION_FAILURE
                        || *code == SqlState::T_R_DEADLOCK_DETECTED
                }
            },
        }
    }

    /// Whether the failure was one statement's own (an SQL error with nothing wrong with the
    /// connection): the rest of its batch may succeed without it.
    pub(super) fn statement_error(&self) -> bool {
        matches!(self, Failure::Pg(e) if e.code().is_some()) && !self.transient()
    }

    /// The typed error for `operation` on `key` (a value of `size` bytes) when nothing was
    /// committed.
    pub(super) fn not_committed(
        &self,
        operation: &'static str,
        key: &str,
        size: usize,
    ) -> StateError {
        let Failure::Pg(e) = self else {
            return StateError::unavailable(format!(
                "{operation} {key}: {}; nothing was written",
                self.reason()
            ));
        };
        let Some(code) = e.code() else {
            return StateError::unavailable(format!(
                "{operation} {key}: {}; nothing was written",
                self.reason()
            ));
        };
        let io = |kind: std::io::ErrorKind| {
            StateError::io(
                operation,
                format!("postgresql:{key}"),
                std::io::Error::new(kind, describe(e)),
            )
        };
        match *code {
            SqlState::PROGRAM_LIMIT_EXCEEDED => StateError::TooLarge { size, limit: MAX_VALUE },
            SqlState::DISK_FULL => io(std::io::ErrorKind::StorageFull),
            SqlState::INSUFFICIENT_PRIVILEGE => io(std::io::ErrorKind::PermissionDenied),
            SqlState::DATA_CORRUPTED | SqlState::INDEX_CORRUPTED => {
                StateError::corrupt(key, describe(e))
            }
            SqlState::QUERY_CANCELED => StateError::unavailable(format!(
                "{operation} {key}: the statement timeout expired; nothing was written"
            )),
            _ if self.transient() => StateError::unavailable(format!(
                "{operation} {key}: {}; nothing was written",
                describe(e)
            )),
            _ => io(std::io::ErrorKind::Other),
        }
    }

    /// The error for a read of `key` that failed.
    pub(super) fn read_error(&self, key: &str) -> StateError {
        self.not_committed("reading", key, 0)
    }

    /// A short description, without the connection string (which may hold a password).
    pub(super) fn reason(&self) -> String {
        match self {
            Failure::Pool(why) => why.clone(),
            Failure::Pg(e) => describe(e),
            Failure::Deadline(d) => {
                format!("no answer from PostgreSQL within {} ms", d.as_millis())
            }
        }
    }
}

/// The error for a write whose COMMIT was sent but not answered: it may or may not have
/// been applied.
pub(super) fn outcome_unknown(operation: &'static str, key: &str, timeout: Duration) -> StateError {
    StateError::Timeout {
        operation,
        session: key.to_owned(),
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    }
}

/// A `tokio_postgres` error as one line: the server's message and code when it sent one,
/// else the client's description (and its cause: "connection closed", an I/O error).
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}: {})", db.message(), db.severity(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}
