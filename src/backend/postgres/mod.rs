//! The PostgreSQL backend (cargo feature `postgres`): every key a row of one table.
//!
//! This module owns the public handle ([`PostgresStorageBackend`]), the connections (a
//! deadpool pool of `tokio_postgres` clients, no TLS), the reads and the [`StorageBackend`]
//! impl. `options.rs` connects ([`PostgresOptions`]); `schema.rs` holds the tables, their
//! migrations and the durability checks; `writer.rs` the group-commit writers (fenced
//! writes among them); `lease.rs` the leases; `error.rs` the mapping of failures to
//! [`StateError`]; `real_time.rs` every wait on the server (timeouts, backoffs), measured in
//! real time so that a paused tokio clock neither fires them early nor stops them. It calls
//! nothing above the backends.
//!
//! Durability contract, and why each piece is there:
//! - an `Ok` from put or delete means the transaction holding it committed with
//!   `synchronous_commit = on` (set with `SET LOCAL` in every write transaction): its WAL
//!   record was flushed to the server's disk before COMMIT returned, so it survives a crash
//!   of the server or the machine.
//! - at connect the backend reads `fsync`, `full_page_writes` and `synchronous_commit` as
//!   they apply to its role and database; if any would let a committed write be lost, the
//!   connect fails with [`StateError::Config`] naming the setting, unless
//!   [`PostgresOptions::best_effort`] (a warning; then an `Ok` can be lost).
//! - writes queued together commit in one transaction (group commit); each caller is
//!   answered after that COMMIT. An append to a log is a row of its own (`mars_state_log`),
//!   so its cost does not grow with the log; it is acknowledged once queued and committed
//!   in order by a flusher without waiting for the WAL flush (`append.rs`): the contract
//!   does not make an append durable by itself (a crash may cut a log's tail), and the next
//!   put or delete's flush covers it (the WAL is sequential).
//! - after `Err` nothing of the write was committed, except [`StateError::Timeout`]: the
//!   connection died after COMMIT was sent and the server could not be asked (within the
//!   connect timeout) what became of the transaction (`txid_status`), so the write may or
//!   may not be there. Puts and deletes are retried on a fresh connection in that case
//!   (they are idempotent); appends are not (a retry could apply one twice).
//! - no session state on the server: no session advisory locks, no `SET` outside a
//!   transaction; with [`PostgresOptions::prepared_statements`]`(false)` not even prepared
//!   statements, so it runs behind transaction-mode poolers.
//! - an interrupted transaction is rolled back by the server: there are no staged leftovers,
//!   so `sweep` has nothing to remove.
//! - leases (`lease.rs`, table `mars_state_leases`) are granted, renewed (one or many in
//!   one statement) and released in short transactions of their own, by the server's clock;
//!   a release sets the row's `released` column, which a grant or renewal clears. A fenced
//!   write is part of a group-commit batch: a statement of its own, or one multi-row
//!   statement for the batch's fenced writes of one kind, that locks the lease rows
//!   `FOR SHARE` and writes each row only under its lease's current token, so a grant to
//!   another node waits for the old holder's writes in flight, and a refused write changes
//!   nothing while the rest of its batch commits.

mod append;
mod error;
mod events;
mod lease;
mod options;
mod real_time;
mod schema;
mod writer;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Object, Pool};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{NoTls, Row};

use self::error::Failure;
use self::schema::Sql;
use self::writer::{Op, Writers};
use super::{
    Acquired, EventFeed, Fence, KeyClass, Lease, LeaseState, ObjectMeta, RecordMeta,
    StorageBackend, StorageKey, SweepReport,
};
use crate::error::{Result, StateError};

pub use self::options::PostgresOptions;

/// Retries of a read after a transient failure (the connection or server went away).
const READ_RETRIES: u32 = 2;

/// Stores every record as a row of a PostgreSQL table (`mars_state_records`: key, value,
/// size, kind, updated time; an append adds a row to `mars_state_log`, so its cost does not
/// grow with the log), in a schema of your choice. An `Ok` from a write means committed with
/// synchronous commit: flushed to the server's disk, it survives a crash. Writes queued
/// together are committed in one transaction; reads run on the pool's other connections.
///
/// Many processes may share one database, but a `StateManager` keeps an index of its store
/// in memory: give each manager its own [`schema`](PostgresOptions::schema).
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mars_state::StateError> {
/// use mars_state::{PostgresStorageBackend, StateManager};
/// let url = "postgres://postgres@127.0.0.1:5432/postgres";
/// let manager = StateManager::start(PostgresStorageBackend::connect(url).await?).await?;
/// manager.save_session("s1", &serde_json::json!({ "step": 1 })).await?;
/// manager.shutdown().await?;
///
/// // Reconnected: the save is there.
/// let manager = StateManager::start(PostgresStorageBackend::connect(url).await?).await?;
/// let state: Option<serde_json::Value> = manager.load_session("s1").await?;
/// assert_eq!(state, Some(serde_json::json!({ "step": 1 })));
/// # manager.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStorageBackend {
    shared: Arc<Shared>,
    writers: Arc<Writers>,
    appender: Arc<Closing>,
}

/// The appender, closed (its flusher commits what is queued and ends) when the last clone
/// of the backend is dropped.
#[derive(Debug)]
struct Closing(Arc<append::Appender>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl fmt::Debug for PostgresStorageBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStorageBackend")
            .field("schema", &self.shared.schema)
            .field("pool", &self.shared.pool.status())
            .finish_non_exhaustive()
    }
}

/// What the reads and the writers share: the pool, the statements, the settings.
pub(super) struct Shared {
    pool: Pool,
    sql: Sql,
    schema: String,
    prepared: bool,
    connect_timeout: Duration,
    statement_timeout: Option<Duration>,
    /// The statements that open a write transaction and return its id.
    begin: String,
    /// The notification channel of the schema's change events (`events.rs`).
    events_channel: String,
    /// The settings for a connection of its own that listens for change events; `None`
    /// for a backend made from a pool (its settings cannot be read back).
    listen: Option<tokio_postgres::Config>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").field("schema", &self.schema).finish_non_exhaustive()
    }
}

impl Shared {
    fn new(
        pool: Pool,
        quoted_schema: &str,
        options: &PostgresOptions,
        listen: Option<tokio_postgres::Config>,
    ) -> Self {
        let mut begin = "BEGIN".to_owned();
        if !options.best_effort {
            // Belt and braces beside the check at connect: whatever the role, database or a
            // pooler's session says, this transaction's COMMIT waits for the WAL flush.
            begin.push_str("; SET LOCAL synchronous_commit = on");
        }
        if let Some(t) = options.statement_timeout {
            begin.push_str(&format!("; SET LOCAL statement_timeout = {}", t.as_millis()));
        }
        begin.push_str("; SELECT txid_current()");
        Shared {
            pool,
            sql: Sql::new(quoted_schema),
            schema: options.schema.clone(),
            prepared: options.prepared_statements,
            connect_timeout: options.connect_timeout,
            statement_timeout: options.statement_timeout,
            begin,
            events_channel: events::channel(&options.schema),
            listen: listen.map(events::listen_config),
        }
    }

    /// A connection from the pool (waiting for a free one, or connecting), within the
    /// connect timeout of real time (`real_time`: the pool itself has no timers).
    async fn connection(&self) -> Result<Object, Failure> {
        match real_time::within(self.connect_timeout, self.pool.get()).await {
            Ok(got) => Ok(got?),
            Err(_) => Err(Failure::Pool(format!(
                "no PostgreSQL connection within {} ms",
                self.connect_timeout.as_millis()
            ))),
        }
    }

    /// The longest a whole write attempt may take before its connection is dropped: the
    /// statement timeout (the server's own bound) plus the connect timeout as slack. `None`
    /// when statements are unbounded.
    fn attempt_bound(&self) -> Option<Duration> {
        self.statement_timeout.map(|t| t + self.connect_timeout)
    }

    /// Runs one read statement, retrying transient failures on fresh connections.
    async fn read(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Failure> {
        self.retrying(|| self.read_once(sql, params)).await
    }

    /// Runs `once` until it succeeds, fails for good, or has been retried
    /// [`READ_RETRIES`] times after transient failures (not after its own deadline).
    async fn retrying<T, F, Fut>(&self, once: F) -> Result<T, Failure>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let mut attempt = 0;
        loop {
            match once().await {
                Err(f)
                    if f.transient()
                        && !matches!(f, Failure::Deadline(_))
                        && attempt < READ_RETRIES =>
                {
                    attempt += 1;
                    real_time::sleep(Duration::from_millis(20 << attempt)).await;
                }
                result => return result,
            }
        }
    }

    async fn read_once(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Failure> {
        let mut conn = Discard::new(self.connection().await?);
        let rows = match self.statement_timeout {
            Some(bound) => {
                match real_time::within(bound, query(conn.client(), self.prepared, sql, params))
                    .await
                {
                    Ok(rows) => rows?,
                    Err(_) => {
                        // Stop the statement on the server too; the connection is dropped.
                        let token = conn.client().cancel_token();
                        tokio::spawn(async move {
                            let _ = token.cancel_query(NoTls).await;
                        });
                        return Err(Failure::Deadline(bound));
                    }
                }
            }
            None => real_time::hold(query(conn.client(), self.prepared, sql, params)).await?,
        };
        conn.keep();
        Ok(rows)
    }
}

/// A pooled connection that is closed, not returned to the pool, unless [`keep`](Self::keep)
/// is called: after a failure (or a cancelled future) it may be inside a transaction.
pub(super) struct Discard(Option<Object>);

impl Discard {
    pub(super) fn new(conn: Object) -> Self {
        Discard(Some(conn))
    }

    pub(super) fn client(&self) -> &Object {
        // Always `Some` until dropped or kept.
        self.0.as_ref().unwrap_or_else(|| unreachable!("connection used after keep"))
    }

    /// Gives the connection back to the pool.
    pub(super) fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for Discard {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            // Taken out of the pool: dropping the client closes the connection, and the
            // server rolls back any transaction left open on it.
            drop(Object::take(conn));
        }
    }
}

/// Prepares (or finds in the connection's cache) the statement `sql` of a put, delete or
/// append: its parameter types.
pub(super) async fn prepare(
    client: &Object,
    sql: &str,
    types: &[Type],
) -> Result<(), tokio_postgres::Error> {
    client.prepare_typed_cached(sql, types).await.map(drop)
}

/// Runs `sql` with `params`: as a cached named statement when `prepared`, else unnamed with
/// the parameters' types (`query_typed`: one round trip, nothing left on the server).
pub(super) async fn query(
    client: &Object,
    prepared: bool,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    if prepared {
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        let statement = client.prepare_typed_cached(sql, &types).await?;
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
        client.query(&statement, &values).await
    } else {
        client.query_typed(sql, params).await
    }
}

impl PostgresStorageBackend {
    /// Connects to the server at `url` with the default [`PostgresOptions`] (schema
    /// `public`, 16 connections, durable settings required). See
    /// [`PostgresOptions::connect`].
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mars_state::StateError> {
    /// let backend =
    ///     mars_state::PostgresStorageBackend::connect("postgres://app@localhost/state").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self> {
        PostgresOptions::default().connect(url).await
    }

    /// Uses `pool` with the default [`PostgresOptions`]. See [`PostgresOptions::from_pool`].
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use deadpool_postgres::{Manager, Pool};
    /// let config: tokio_postgres::Config = "postgres://app@localhost/state".parse()?;
    /// let pool = Pool::builder(Manager::new(config, tokio_postgres::NoTls)).build()?;
    /// let backend = mars_state::PostgresStorageBackend::from_pool(pool).await?;
    /// # Ok(()) }
    /// ```
    pub async fn from_pool(pool: Pool) -> Result<Self> {
        PostgresOptions::default().from_pool(pool).await
    }

    /// Options for connecting: pool size, timeouts, schema, best effort, prepared
    /// statements.
    ///
    /// ```
    /// let options = mars_state::PostgresStorageBackend::options().schema("agents").pool_size(8);
    /// ```
    pub fn options() -> PostgresOptions {
        PostgresOptions::default()
    }

    /// The schema holding the backend's tables.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mars_state::StateError> {
    /// let backend = mars_state::PostgresStorageBackend::options()
    ///     .schema("agents")
    ///     .connect("postgres://app@localhost/state")
    ///     .await?;
    /// assert_eq!(backend.schema(), "agents");
    /// # Ok(()) }
    /// ```
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    fn start(shared: Shared, writers: usize) -> Self {
        let shared = Arc::new(shared);
        let appender = append::Appender::start(shared.clone());
        let writers = Arc::new(Writers::start(shared.clone(), appender.clone(), writers));
        let appender = Arc::new(Closing(appender));
        PostgresStorageBackend { shared, writers, appender }
    }
}

#[async_trait]
impl StorageBackend for PostgresStorageBackend {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        let k = key.as_str();
        let params: [(&(dyn ToSql + Sync), Type); 1] = [(&k, Type::TEXT)];
        if key.class() != KeyClass::Log {
            let rows = self.shared.read(&self.shared.sql.get, &params).await;
            let rows = rows.map_err(|f| f.read_error(k))?;
            return rows
                .first()
                .map(|row| row.try_get::<_, Vec<u8>>(0))
                .transpose()
                .map_err(|e| StateError::corrupt(key, format!("unexpected row: {e}")));
        }
        // Appends queued before this get are committed first (read your appends).
        self.appender.0.settle().await;
        // One statement, so one snapshot: the head, then the appended pieces in order.
        let rows = self.shared.read(&self.shared.sql.get_log, &params).await;
        let rows = rows.map_err(|f| f.read_error(k))?;
        let mut rows = rows.iter();
        let Some(head) = rows.next() else { return Ok(None) };
        let bad =
            |e: tokio_postgres::Error| StateError::corrupt(key, format!("unexpected row: {e}"));
        let mut value: Vec<u8> = head.try_get(2).map_err(bad)?;
        for piece in rows {
            value.extend_from_slice(piece.try_get::<_, &[u8]>(2).map_err(bad)?);
        }
        Ok(Some(value))
    }

    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        if key.class() != KeyClass::Log {
            return self.writers.submit(Op::Put(key.clone(), value)).await.map(drop);
        }
        // A put replaces a log: its queued appends go first, so none lands after it.
        self.appender.0.settle().await;
        self.writers.submit(Op::Put(key.clone(), value)).await?;
        self.appender.0.replaced(key);
        Ok(())
    }

    /// Writes the record's facts into the row's plain columns (`session_id`,
    /// `checkpoint_id`, `branch`, `parent`, `step`, `reason`, `status`, `saved_at`) in the
    /// same statement as its value.
    async fn put_record(&self, key: &StorageKey, value: Vec<u8>, meta: &RecordMeta) -> Result<()> {
        if key.class() == KeyClass::Log {
            return self.put(key, value).await;
        }
        let op = Op::PutRecord(key.clone(), value, Box::new(meta.clone()));
        self.writers.submit(op).await.map(drop)
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool> {
        if key.class() != KeyClass::Log {
            return self.writers.submit(Op::Delete(key.clone())).await;
        }
        self.appender.0.settle().await;
        let existed = self.writers.submit(Op::Delete(key.clone())).await?;
        self.appender.0.replaced(key);
        Ok(existed)
    }

    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        // Every key under `prefix/`: at least `prefix/`, below `prefix0` ('0' follows '/'),
        // compared byte by byte (the keys' "C" collation), so `prefix-x` and `prefixx` are
        // out. One range of the primary key, which INCLUDEs the size: an index-only scan
        // that never reads other sessions' rows or any value.
        let low = format!("{prefix}/");
        let high = format!("{prefix}0");
        // Sizes include the appends queued before this listing.
        self.appender.0.settle().await;
        let params: [(&(dyn ToSql + Sync), Type); 2] = [(&low, Type::TEXT), (&high, Type::TEXT)];
        let rows = self.shared.read(&self.shared.sql.list, &params).await;
        let rows = rows.map_err(|f| f.read_error(prefix.as_str()))?;
        rows.iter()
            .map(|row| {
                let bad = |e: String| StateError::corrupt(prefix, e);
                let key: &str = row.try_get(0).map_err(|e| bad(format!("unexpected row: {e}")))?;
                let size: i64 = row.try_get(1).map_err(|e| bad(format!("unexpected row: {e}")))?;
                let key = StorageKey::new(key)
                    .map_err(|e| bad(format!("a stored key is not valid: {e}")))?;
                Ok(ObjectMeta { key, size: u64::try_from(size).unwrap_or(0) })
            })
            .collect()
    }

    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        if key.class() == KeyClass::Log {
            return self.appender.0.append(key, bytes).await;
        }
        // Another class concatenates in place, durably, like a put.
        self.writers.submit(Op::Append(key.clone(), bytes)).await.map(drop)
    }

    /// Nothing to sweep: the server rolls back a transaction interrupted by a crash or a
    /// dropped connection; no staged rows are ever made.
    async fn sweep(&self) -> Result<SweepReport> {
        Ok(SweepReport::default())
    }

    /// Many processes may connect to one schema.
    fn shared(&self) -> bool {
        true
    }

    /// One statement on `mars_state_leases`, in a transaction of its own, times by the
    /// server's `clock_timestamp()`. A grant to another node waits for the fenced writes of
    /// the old holder in flight (they hold its row `FOR SHARE`). A grant over a row that
    /// expired with `released` false names its old holder in [`Lease::taken_from`] (kept in
    /// the row's `taken_from` column).
    async fn acquire_lease(&self, name: &str, node: &str, ttl: Duration) -> Result<Acquired> {
        lease::acquire(&self.shared, name, node, ttl).await
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>> {
        lease::renew(&self.shared, lease, ttl).await
    }

    /// One `UPDATE ... FROM unnest(names, nodes, tokens)` for all of them: one round trip
    /// and one transaction, whatever their number.
    async fn renew_leases(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<Option<Lease>>> {
        lease::renew_many(&self.shared, leases, ttl).await
    }

    /// One `SELECT` of the lease's row; the time left by the server's `clock_timestamp()`,
    /// `released` from its column of that name.
    async fn read_lease(&self, name: &str) -> Result<Option<LeaseState>> {
        lease::read(&self.shared, name).await
    }

    /// Expires the lease now and sets its `released` column, so the next grant reports no
    /// takeover ([`Lease::taken_from`] `None`).
    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        lease::release(&self.shared, lease).await
    }

    /// `put_record`'s statement gated by the fence: in one statement of a group-commit
    /// transaction (shared with the batch's other fenced puts of non-log keys), the lease's
    /// row is locked `FOR SHARE` and the row is written only if its token is the fence's (so
    /// a grant to another node waits for this transaction to commit, and a write after it
    /// sees the new token).
    async fn put_fenced(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        meta: &RecordMeta,
        fence: &Fence,
    ) -> Result<()> {
        let log = key.class() == KeyClass::Log;
        if log {
            self.appender.0.settle().await;
        }
        let facts = Box::new((meta.clone(), fence.clone()));
        self.writers.submit(Op::PutFenced(key.clone(), value, facts)).await?;
        if log {
            self.appender.0.replaced(key);
        }
        Ok(())
    }

    /// `delete`'s statement gated by the fence, as [`put_fenced`](Self::put_fenced).
    async fn delete_fenced(&self, key: &StorageKey, fence: &Fence) -> Result<bool> {
        let log = key.class() == KeyClass::Log;
        if log {
            self.appender.0.settle().await;
        }
        let existed =
            self.writers.submit(Op::DeleteFenced(key.clone(), Box::new(fence.clone()))).await?;
        if log {
            self.appender.0.replaced(key);
        }
        Ok(existed)
    }

    /// `pg_notify` on the schema's channel (`mars_state_events:<schema>`), every payload
    /// base64 in one statement, outside the write transactions: a notification is sent
    /// when its own statement commits.
    async fn publish_events(&self, payloads: Vec<Vec<u8>>) -> Result<()> {
        events::publish(&self.shared, payloads).await
    }

    /// `LISTEN` on a connection of its own (not from the pool), made with the settings of
    /// [`PostgresOptions::connect`]; its feed ends when that connection does. A backend made
    /// [`from_pool`](PostgresOptions::from_pool) cannot open one: [`StateError::Config`].
    async fn subscribe_events(&self) -> Result<EventFeed> {
        events::subscribe(&self.shared).await
    }
}
