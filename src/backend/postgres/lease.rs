//! The PostgreSQL backend's leases (table `mars_state_leases`, migrations 3 and 4): grant,
//! renew (one lease or many in one statement) and release, each one statement in a short
//! transaction of its own on a pooled connection, never in the group-commit writers'
//! batches (a grant waits for the fenced writes in flight, and a batch must not wait for a
//! grant); and the read of a lease, one statement outside any transaction. Owns those
//! calls; the statements are `schema::Sql`'s, the fenced writes the writers' (`writer.rs`).
//!
//! Every time is the server's: `clock_timestamp()`, read once the row is locked, so a grant
//! that waited for writes in flight still runs its full TTL, and no node's clock matters.
//! Every statement is idempotent for its caller (a grant to a node that holds the lease live
//! keeps the token), so a transient failure, even after COMMIT was sent, is retried.
//!
//! Column `released` says whether the last holder released the lease (set by a release,
//! cleared by every grant and renewal); a grant to another node over an expired, unreleased
//! row writes the old holder into `taken_from` and returns it as
//! [`Lease::taken_from`](crate::Lease::taken_from).

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use super::error::Failure;
use super::writer::token_param;
use super::{Discard, Shared};
use crate::backend::{Acquired, Lease, LeaseState, ttl_ms};
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
                let taken_from: Option<String> = row.try_get(4)?;
                Acquired::Granted(Lease {
                    name: name.to_owned(),
                    node: holder,
                    token,
                    expires_in,
                    taken_from,
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

/// [`StorageBackend::renew_leases`](crate::StorageBackend::renew_leases): one UPDATE over
/// the leases as arrays (one round trip, one transaction), answered in the order of
/// `leases`. A lease named twice gets the same answer twice.
pub(super) async fn renew_many(
    shared: &Shared,
    leases: &[Lease],
    ttl: Duration,
) -> Result<Vec<Option<Lease>>> {
    let Some(first) = leases.first() else { return Ok(Vec::new()) };
    let ms = i64::try_from(ttl_ms(ttl)).unwrap_or(i64::MAX);
    let names: Vec<&str> = leases.iter().map(|l| l.name.as_str()).collect();
    let nodes: Vec<&str> = leases.iter().map(|l| l.node.as_str()).collect();
    let tokens: Vec<i64> = leases.iter().map(|l| token_param(l.token)).collect();
    let params: [(&(dyn ToSql + Sync), Type); 4] = [
        (&names, Type::TEXT_ARRAY),
        (&nodes, Type::TEXT_ARRAY),
        (&tokens, Type::INT8_ARRAY),
        (&ms, Type::INT8),
    ];
    let what =
        if leases.len() == 1 { first.name.clone() } else { format!("{} and others", first.name) };
    let rows = shared.lease_statement(&shared.sql.renew_leases, &params).await;
    let rows = rows.map_err(|f| lease_error(&f, "renewing", &what))?;
    // A row per renewed lease, naming it by name, node and token: a stale copy of a lease
    // renewed in the same call (same name, older token) is not.
    let mut left = HashMap::with_capacity(rows.len());
    for row in &rows {
        let parse = || -> Result<_, tokio_postgres::Error> {
            let id: (String, String, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            Ok((id, millis(row.try_get(3)?)))
        };
        let (id, ms) = parse().map_err(|e| bad_row(&what, &e))?;
        left.insert(id, ms);
    }
    Ok(leases
        .iter()
        .map(|lease| {
            let id = (lease.name.clone(), lease.node.clone(), token_param(lease.token));
            let expires_in = *left.get(&id)?;
            Some(Lease { expires_in, taken_from: None, ..lease.clone() })
        })
        .collect())
}

/// [`StorageBackend::read_lease`](crate::StorageBackend::read_lease): one read statement,
/// the time left by the server's clock.
pub(super) async fn read(shared: &Shared, name: &str) -> Result<Option<LeaseState>> {
    let params: [(&(dyn ToSql + Sync), Type); 1] = [(&name, Type::TEXT)];
    let rows = shared.read(&shared.sql.read_lease, &params).await;
    let rows = rows.map_err(|f| f.read_error(&format!("lease {name}")))?;
    let Some(row) = rows.first() else { return Ok(None) };
    let parse = || -> Result<LeaseState, tokio_postgres::Error> {
        let token: i64 = row.try_get(1)?;
        let left: Option<i64> = row.try_get(3)?;
        Ok(LeaseState {
            node: row.try_get(0)?,
            token: u64::try_from(token).unwrap_or(0),
            expires_in: left.map(millis),
            released: row.try_get(2)?,
        })
    };
    parse().map(Some).map_err(|e| bad_row(name, &e))
}

/// [`StorageBackend::release_lease`](crate::StorageBackend::release_lease).
pub(super) async fn release(shared: &Shared, lease: &Lease) -> Result<()> {
    let token = token_param(lease.token);
    let params: [(&(dyn ToSql + Sync), Type); 3] =
        [(&lease.name, Type::TEXT), (&lease.node, Type::TEXT), (&token, Type::INT8)];
    let rows = shared.lease_statement(&shared.sql.release_lease, &params).await;
    rows.map(drop).map_err(|f| lease_error(&f, "releasing", &lease.name))
}
