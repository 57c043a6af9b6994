//! The PostgreSQL backend's appends to a log key (the index journal): one round trip each,
//! committed without waiting for the WAL flush. Owns that statement text and its retry
//! rule; calls the pool and error mapping of `super`.
//!
//! The store appends one line of its index journal per change, one at a time, and the
//! contract does not make an append durable by itself (after a crash a log may lack its
//! tail; the journal is rebuilt from the records). So an append is sent as one simple-query
//! message, `BEGIN; SET LOCAL synchronous_commit = off; …; INSERT …; COMMIT` (the bytes as a
//! hex literal), answered once the server has run it, without the flush: one round trip
//! instead of three plus a flush. The WAL is sequential, so the next synchronous commit (any
//! put or delete) makes it durable too, and a later put of the same log, which the caller
//! sends only after this answer, replaces it in order.
//!
//! Retries: a failure the server reported (an SQL error) stopped the message before its
//! COMMIT: nothing committed, so a transient one is retried. A lost connection after the
//! message was sent leaves the outcome unknown: an append is not idempotent, so it is
//! answered [`StateError::Timeout`] rather than sent again.

use std::fmt::Write as _;
use std::time::Duration;

use super::error::{Failure, MAX_VALUE, outcome_unknown};
use super::{Discard, Shared};
use crate::backend::StorageKey;
use crate::error::{Result, StateError};

/// Retries of an append the server refused with a transient error.
const RETRIES: u32 = 3;

/// Appends `bytes` to the log `key` (a key of class `Log`).
pub(super) async fn append_log(shared: &Shared, key: &StorageKey, bytes: &[u8]) -> Result<()> {
    if bytes.len() > MAX_VALUE {
        return Err(StateError::TooLarge { size: bytes.len(), limit: MAX_VALUE });
    }
    let sql = statement(shared, key, bytes);
    let bound = shared.attempt_bound();
    let mut attempt = 0;
    loop {
        let mut sent = false;
        let once = async {
            let mut conn = Discard::new(shared.connection().await?);
            sent = true;
            conn.client().simple_query(&sql).await?;
            conn.keep();
            Ok::<_, Failure>(())
        };
        let result = match bound {
            Some(bound) => {
                tokio::time::timeout(bound, once).await.unwrap_or(Err(Failure::Deadline(bound)))
            }
            None => once.await,
        };
        let failure = match result {
            Ok(()) => return Ok(()),
            Err(failure) => failure,
        };
        // An error the server sent back means it stopped before COMMIT; anything else after
        // the message went out leaves the outcome open.
        let refused = matches!(&failure, Failure::Pg(e) if e.code().is_some());
        if sent && !refused {
            let wait = bound.unwrap_or(Duration::ZERO);
            return Err(outcome_unknown("appending to", key.as_str(), wait));
        }
        if failure.transient() && attempt < RETRIES {
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(25 << (2 * attempt))).await;
            continue;
        }
        return Err(failure.not_committed("appending to", key.as_str(), bytes.len()));
    }
}

/// The one message of an append: the transaction and its statement, with the key and the
/// bytes as literals (the key is a valid `StorageKey`: no backslash or control character, so
/// doubling `'` quotes it whatever `standard_conforming_strings` says; the bytes go as hex,
/// which has no backslash either).
fn statement(shared: &Shared, key: &StorageKey, bytes: &[u8]) -> String {
    let (r, l) = (&shared.sql.records, &shared.sql.log);
    let key = key.as_str().replace('\'', "''");
    let mut hex = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(hex, "{b:02x}");
    }
    let mut sql = String::from("BEGIN; SET LOCAL synchronous_commit = off;");
    if let Some(t) = shared.statement_timeout {
        let _ = write!(sql, " SET LOCAL statement_timeout = {};", t.as_millis());
    }
    let _ = write!(
        sql,
        " WITH head AS (INSERT INTO {r} (key, value, size, kind, updated_at) \
         VALUES ('{key}', ''::bytea, {len}, 'log', now()) \
         ON CONFLICT (key) DO UPDATE SET size = {r}.size + excluded.size, \
         updated_at = excluded.updated_at) \
         INSERT INTO {l} (key, bytes) VALUES ('{key}', decode('{hex}', 'hex')); COMMIT",
        len = bytes.len()
    );
    sql
}
