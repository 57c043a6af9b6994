//! The PostgreSQL backend's leases (table `mars_state_leases`, migration 3): grant, renew
//! and release, each one statement in a short transaction of its own on a pooled
//! connection, never in the group-commit writers' batches (a grant waits for the fenced
//! writes in flight, and a batch must not wait for a grant). Owns those calls; the
//! statements are `schema::Sql`'s, the fenced writes the writers' (`writer.rs`).
//!
//! Every time is the server's: `clock_timestamp()`, read once the row is locked, so a grant
//! that waited for writes in flight still runs its full TTL, and no node's clock matters.
//! Every statement is idempotent for its caller (a grant to a node that holds the lease live
//! keeps the token), so a transient failure, even after COMMIT was sent, is retried.

use std::time::Duration;

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use super::error::Failure;
use super::writer::token_param;
use super::{Discard, Shared};
use crate::backend::{Acquired, Lease, ttl_ms};
use crate::error::{Result, StateError};

/// Grants of a lease asked again when the answer was empty (a first grant by another node
/// committed during the statement, not yet visible to it).
const EMPTY_RETRIES: usize = 3;

impl Shared {
    /// Runs one lease statement in its own transaction (`BEGIN` with the write
    /// transactions' `SET LOCAL`s, the statement, `COMMIT`, pipelined), retrying transient
    /// failures on fresh connections.
    async fn lease_statement(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Failure> {
        self.retrying(|| self.lease_once(sql, params)).await
    }

    async fn lease_once(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Failure> {
        let mut conn = Discard::new(self.connection().await?);
        let client = conn.client();
        let run = async {
            if self.prepared {
                // Prepared first, so the statement goes out between BEGIN and COMMIT.
                let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
                super::prepare(client, sql, &types).await?;
            }
            let (begun, rows, committed) = futures_util::future::join3(
                client.batch_execute(&self.begin),
                super::query(client, self.prepared, sql, params),
                client.batch_execute("COMMIT"),
            )
            .await;
            begun?;
            let rows = rows?;
            committed?;
            Ok::<_, Failure>(rows)
        };
        // Bounded in real time (`real_time`), as every wait of the backend on the server.
        let rows = match self.attempt_bound() {
            Some(bound) => super::real_time::within(bound, run)
                .await
                .unwrap_or(Err(Failure::Deadline(bound)))?,
            None => super::real_time::hold(run).await?,
        };
        conn.keep();
        Ok(rows)
    }
}

/// The typed error of a lease call on `name` that failed.
fn lease_error(f: &Failure, doing: &'static str, name: &str) -> StateError {
    if f.transient() {
        // Retried already; the last attempt may have committed.
        return StateError::unavailable(format!(
            "{doing} lease {name}: {}; outcome unknown (ask again: it is idempotent)",
            f.reason()
        ));
    }
    f.not_committed(doing, &format!("lease {name}"), 0)
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn bad_row(name: &str, e: &tokio_postgres::Error) -> StateError {
    StateError::corrupt(format!("lease {name}"), format!("unexpected row: {e}"))
}

/// [`StorageBackend::acquire_lease`](crate::StorageBackend::acquire_lease).
pub(super) async fn acquire(
    shared: &Shared,
    name: &str,
    node: &str,
    ttl: Duration,
) -> Result<Acquired> {
    let ms = i64::try_from(ttl_ms(ttl)).unwrap_or(i64::MAX);
    let params: [(&(dyn ToSql + Sync), Type); 3] =
        [(&name, Type::TEXT), (&node, Type::TEXT), (&ms, Type::INT8)];
    for _ in 0..EMPTY_RETRIES {
        let rows = shared.lease_statement(&shared.sql.acquire_lease, &params).await;
        let rows = rows.map_err(|f| lease_error(&f, "taking", name))?;
        let Some(row) = rows.first() else { continue };
        let parse = || -> Result<Acquired, tokio_postgres::Error> {
            let granted: bool = row.try_get(0)?;
            let holder: String = row.try_get(1)?;
            let token: i64 = row.try_get(2)?;
            let expires_in = millis(row.try_get(3)?);
            Ok(if granted {
                let token = u64::try_from(token).unwrap_or(0);
                Acquired::Granted(Lease {
                    name: name.to_owned(),
                    node: holder,
                    token,
                    expires_in,
                    taken_from: None,
                })
            } else {
                Acquired::Held { node: holder, expires_in }
            })
        };
        return parse().map_err(|e| bad_row(name, &e));
    }
    Err(StateError::unavailable(format!(
        "taking lease {name}: the server gave no answer row {EMPTY_RETRIES} times"
    )))
}

/// [`StorageBackend::renew_lease`](crate::StorageBackend::renew_lease).
pub(super) async fn renew(shared: &Shared, lease: &Lease, ttl: Duration) -> Result<Option<Lease>> {
    let ms = i64::try_from(ttl_ms(ttl)).unwrap_or(i64::MAX);
    let token = token_param(lease.token);
    let params: [(&(dyn ToSql + Sync), Type); 4] = [
        (&lease.name, Type::TEXT),
        (&lease.node, Type::TEXT),
        (&token, Type::INT8),
        (&ms, Type::INT8),
    ];
    let rows = shared.lease_statement(&shared.sql.renew_lease, &params).await;
    let rows = rows.map_err(|f| lease_error(&f, "renewing", &lease.name))?;
    let Some(row) = rows.first() else { return Ok(None) };
    let left: i64 = row.try_get(0).map_err(|e| bad_row(&lease.name, &e))?;
    Ok(Some(Lease { expires_in: millis(left), taken_from: None, ..lease.clone() }))
}

/// [`StorageBackend::release_lease`](crate::StorageBackend::release_lease).
pub(super) async fn release(shared: &Shared, lease: &Lease) -> Result<()> {
    let token = token_param(lease.token);
    let params: [(&(dyn ToSql + Sync), Type); 3] =
        [(&lease.name, Type::TEXT), (&lease.node, Type::TEXT), (&token, Type::INT8)];
    let rows = shared.lease_statement(&shared.sql.release_lease, &params).await;
    rows.map(drop).map_err(|f| lease_error(&f, "releasing", &lease.name))
}
