//! How a [`PostgresStorageBackend`] is connected: [`PostgresOptions`], the pool it builds and
//! the checks made at connect (durability settings, migrations). Owns the defaults; calls
//! `schema` for the checks and `super` for the backend it returns.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::error::Failure;
use super::schema::{self, MigrateError};
use super::{PostgresStorageBackend, real_time};
use crate::error::{Result, StateError};

/// Write transactions at once unless [`PostgresOptions::writers`] says otherwise.
const DEFAULT_WRITERS: usize = 4;

/// How a [`PostgresStorageBackend`] connects: see [`PostgresStorageBackend::options`].
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mars_state::StateError> {
/// use std::time::Duration;
/// let backend = mars_state::PostgresStorageBackend::options()
///     .pool_size(16)
///     .connect_timeout(Duration::from_secs(5))
///     .statement_timeout(Duration::from_secs(10))
///     .schema("agents")
///     .connect("postgres://app@db.internal/state")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    pub(super) pool_size: usize,
    pub(super) writers: Option<usize>,
    pub(super) connect_timeout: Duration,
    pub(super) statement_timeout: Option<Duration>,
    pub(super) schema: String,
    pub(super) best_effort: bool,
    pub(super) prepared_statements: bool,
    pub(super) read_only: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            writers: None,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Some(Duration::from_secs(30)),
            schema: "public".to_owned(),
            best_effort: false,
            prepared_statements: true,
            read_only: false,
        }
    }
}

impl PostgresOptions {
    /// The most connections the backend opens (default 16), shared by its reads and its
    /// writers. Ignored by [`from_pool`](Self::from_pool), which uses the pool's size.
    ///
    /// ```
    /// let options = mars_state::PostgresStorageBackend::options().pool_size(32);
    /// ```
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    /// How many write transactions may run at once (default 4, or the pool size if
    /// smaller), each committing every write queued while it was busy. More writers overlap
    /// their statements with each other's WAL flush; fewer make bigger batches. At most the
    /// pool size.
    ///
    /// ```
    /// let options = mars_state::PostgresStorageBackend::options().pool_size(16).writers(8);
    /// ```
    pub fn writers(mut self, n: usize) -> Self {
        self.writers = Some(n);
        self
    }

    /// How long connecting, or waiting for a free connection of the pool, may take
    /// (default 10 s) before the call fails with [`StateError::Unavailable`].
    ///
    /// ```
    /// let options = mars_state::PostgresStorageBackend::options().connect_timeout(std::time::Duration::from_secs(3));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest one statement may run on the server (default 30 s), set per write
    /// transaction with `SET LOCAL` and bounding each read; `Duration::ZERO` turns the bound
    /// off. A write that hits it committed nothing ([`StateError::Unavailable`]).
    ///
    /// ```
    /// let options = mars_state::PostgresStorageBackend::options().statement_timeout(std::time::Duration::from_secs(5));
    /// ```
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// The schema holding the backend's tables (default `public`), created if missing.
    /// Must be a plain identifier (ASCII letters, digits, `_`, not starting with a digit
    /// or `pg_`), else connecting fails with [`StateError::Config`].
    ///
    /// ```
    /// let options = mars_state::PostgresStorageBackend::options().schema("tenant_a");
    /// ```
    pub fn schema(mut self, name: impl Into<String>) -> Self {
        self.schema = name.into();
        self
    }

    /// Connect even when the server's settings do not make a commit durable (`fsync`,
    /// `full_page_writes` or `synchronous_commit` off), with a warning in the log, and
    /// commit with the server's own `synchronous_commit` instead of forcing it on. **An `Ok`
    /// from a write may then be lost in a crash.** Without it such a server fails the
    /// connect with [`StateError::Config`].
    ///
    /// ```
    /// // A throwaway development database:
    /// let options = mars_state::PostgresStorageBackend::options().best_effort();
    /// ```
    pub fn best_effort(mut self) -> Self {
        self.best_effort = true;
        self
    }

    /// Whether to use named prepared statements, cached per connection (default `true`).
    /// `false` sends every statement unnamed with its parameter types (one round trip,
    /// nothing kept on the server between transactions): for poolers in transaction mode
    /// that do not track prepared statements (PgBouncer before 1.21, some proxies).
    ///
    /// ```
    /// let options = mars_state::PostgresStorageBackend::options().prepared_statements(false);
    /// ```
    pub fn prepared_statements(mut self, enabled: bool) -> Self {
        self.prepared_statements = enabled;
        self
    }

    /// Opens for reading only (default `false`): the connect creates and migrates nothing.
    /// The schema must be there at this build's version; a database without one is
    /// [`StateError::Config`] ("no mars-state store", nothing created), and so is a schema
    /// of an older version (a writing open migrates it). For looking at a store others
    /// write, under [`StateManagerBuilder::read_only`](crate::StateManagerBuilder::read_only)
    /// (which refuses every write); [`backend::open_read_only`](crate::backend::open_read_only)
    /// opens `postgres://` URLs so.
    ///
    /// ```
    /// let options = mars_state::PostgresStorageBackend::options().read_only(true);
    /// ```
    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }

    /// Connects to the server at `url` (a libpq-style URL or key=value string, without
    /// TLS) with these options: builds the pool, checks the durability settings, creates
    /// or migrates the schema, starts the writers. Needs a tokio runtime.
    ///
    /// Errors: [`StateError::Config`] for a bad URL or schema name, a server whose settings
    /// are not durable (see [`best_effort`](Self::best_effort)), or a schema of a newer
    /// mars-state version; [`StateError::Unavailable`] if the server cannot be reached
    /// within the connect timeout.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mars_state::StateError> {
    /// let backend = mars_state::PostgresStorageBackend::options()
    ///     .prepared_statements(false) // behind PgBouncer in transaction mode
    ///     .connect("postgres://app@pgbouncer:6432/state")
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self, url: &str) -> Result<PostgresStorageBackend> {
        schema::quoted_schema(&self.schema)?;
        // The parser's message may quote the string it could not read: never repeat it (a
        // URL can hold a password).
        let mut config = tokio_postgres::Config::from_str(url).map_err(|_| StateError::Config {
            message: "the PostgreSQL connection string is not valid (expected \
                      postgres://user@host:port/db or key=value pairs)"
                .to_owned(),
        })?;
        // No `config.connect_timeout` and no pool timeouts: they are tokio timers, which a
        // paused test clock fires while the server is still answering. The backend bounds
        // every wait for a connection itself, in real time (`real_time`, `Shared::connection`).
        if config.get_application_name().is_none() {
            config.application_name("mars-state");
        }
        let listen = config.clone();
        let manager = Manager::from_config(
            config,
            NoTls,
            // Fast: a returned connection is reused as it is; the backend returns one to the
            // pool only after its transaction ended cleanly, and closes it otherwise.
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size.max(1))
            .build()
            .map_err(|e| StateError::Config { message: format!("PostgreSQL pool: {e}") })?;
        self.open(pool, Some(listen)).await
    }

    /// Like [`connect`](Self::connect), over a pool you built (its size and timeouts
    /// apply; `pool_size` is ignored). Its connections must not be shared with other code
    /// while the backend holds them.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use deadpool_postgres::{Manager, Pool};
    /// let config: tokio_postgres::Config = "postgres://app@localhost/state".parse()?;
    /// let pool = Pool::builder(Manager::new(config, tokio_postgres::NoTls)).max_size(8).build()?;
    /// let backend = mars_state::PostgresStorageBackend::options().schema("agents").from_pool(pool).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Such a backend cannot carry change events between processes (it has no connection
    /// settings for a listening connection of its own): a manager over it warns and its
    /// watches see its own changes only.
    pub async fn from_pool(&self, pool: Pool) -> Result<PostgresStorageBackend> {
        self.open(pool, None).await
    }

    /// [`from_pool`](Self::from_pool), with the settings of a listening connection when
    /// they are known.
    async fn open(
        &self,
        pool: Pool,
        listen: Option<tokio_postgres::Config>,
    ) -> Result<PostgresStorageBackend> {
        let schema = schema::quoted_schema(&self.schema)?;
        let size = pool.status().max_size;
        let writers = self.writers.unwrap_or(DEFAULT_WRITERS.min(size));
        if writers == 0 || writers > size {
            return Err(StateError::Config {
                message: format!(
                    "PostgreSQL writers = {writers} must be between 1 and the pool size ({size})"
                ),
            });
        }
        let shared = super::Shared::new(pool, &schema, self, listen);
        let client = shared.connection().await.map_err(|f| connect_error(&f))?;
        let problems = real_time::hold(schema::durability_problems(&client))
            .await
            .map_err(|f| connect_error(&f))?;
        if !problems.is_empty() {
            if !self.best_effort {
                return Err(StateError::Config {
                    message: format!(
                        "the PostgreSQL server would not make a commit durable: {}; or \
                         accept that with PostgresOptions::best_effort()",
                        problems.join("; ")
                    ),
                });
            }
            tracing::warn!(
                problems = %problems.join("; "),
                "PostgreSQL backend in best-effort mode: an acknowledged write may be lost"
            );
        }
        if self.read_only {
            let checked = real_time::hold(schema::check_version(&client, &schema, &self.schema));
            checked.await.map_err(|e| match e {
                MigrateError::Newer(e) => e,
                MigrateError::Failed(f) => connect_error(&f),
            })?;
            drop(client);
            return Ok(PostgresStorageBackend::start(shared, writers));
        }
        // Unbounded as before (it may wait for another process's migration), but held in
        // real time like every wait on the server.
        match real_time::hold(schema::migrate(&client, &schema, &self.schema)).await {
            Ok(()) => {}
            Err(MigrateError::Newer(e)) => return Err(e),
            Err(MigrateError::Failed(f)) => {
                // The transaction may be open or aborted: do not give the connection back.
                drop(deadpool_postgres::Object::take(client));
                return Err(connect_error(&f));
            }
        }
        drop(client);
        Ok(PostgresStorageBackend::start(shared, writers))
    }
}

/// The error for a failed connect step: `Unavailable` when the server could not be
/// reached, the mapped error otherwise.
fn connect_error(f: &Failure) -> StateError {
    match f {
        Failure::Pg(e) if e.code().is_some() && !f.transient() => {
            StateError::Config { message: format!("PostgreSQL refused the set-up: {}", f.reason()) }
        }
        _ => StateError::unavailable(format!("PostgreSQL: {}", f.reason())),
    }
}
