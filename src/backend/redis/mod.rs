//! The Redis backend (cargo feature `redis`): every key a Redis string under one prefix,
//! listed through one set per folder.
//!
//! This module owns the public handle ([`RedisStorageBackend`], [`RedisOptions`]),
//! connecting (loading the scripts), the reads, the mapping of redis-rs errors to
//! [`StateError`] and the [`StorageBackend`] impl; writes go to the writer task
//! (`writer.rs`); the key names and Lua scripts are in `layout.rs`; the checks made at
//! connect (prefix, persistence settings) in `checks.rs`. It calls redis-rs and
//! nothing above the backends but the key's class.
//!
//! Durability contract, and what an `Ok` means exactly:
//! - every write is one Lua script (value and listing entries together; see `layout.rs`), so
//!   Redis applies it whole, and writes it to its append-only file (AOF) as one unit: after a
//!   crash of Redis the value and its listing entry are both there or both absent. (A key
//!   whose entries a script of this backend already made is then written with a bare `SET`
//!   or `APPEND`, one command, as atomic.) (A torn
//!   last AOF record is dropped at load: Redis's default `aof-load-truncated yes`.)
//! - at connect, the server must have `appendonly yes` and `appendfsync always` (and not
//!   `no-appendfsync-on-rewrite yes`), or the default (durable) mode refuses to open with
//!   [`StateError::Config`]. With `appendfsync always` Redis writes and fsyncs the AOF before
//!   it sends the replies of an event-loop pass, so an `Ok` from put or delete means applied
//!   *and* on the disk of the Redis host: it survives a crash of Redis or of that host. It
//!   does not say a replica has it: after a failover to a replica an acknowledged write can
//!   be missing (there is no `WAIT`; `WAITAOF`, Redis 7.2+, is not used, so 7.0 works).
//! - the settings are checked once, at connect: a later `CONFIG SET appendfsync everysec` on
//!   the server is not seen. Where `CONFIG` is disabled (managed Redis), the check falls back
//!   to `INFO persistence`, which shows `aof_enabled` but not the fsync policy: the durable
//!   mode then refuses to open, saying what could not be verified.
//! - [`RedisOptions::best_effort`] opens on any settings (with a warning in the log): an `Ok`
//!   then means applied in Redis's memory, and is lost if Redis stops before its next save.
//! - an append (the index journal) is one `APPEND` in its script. It is acknowledged when
//!   queued (before Redis answers; reads wait for it, see `writer.rs`), is durable once a
//!   later put or delete is acknowledged (the AOF is sequential), and is never retried. If
//!   it is lost (a dropped connection), later appends to its log fail until a put replaces
//!   the log: a log can lose its tail, never a piece in the middle, as the contract allows.
//! - writes queued while a round trip is in flight go out as one pipeline (group commit),
//!   and share one fsync of the AOF.
//! - nothing is ever staged, so `sweep` has nothing to remove.
//! - leases are hashes `<prefix>:l:<name>` (node, token, expiry by the server's `TIME`,
//!   whether the last holder released it), changed only by Lua scripts (many leases are
//!   renewed by one script); a fenced write is its write script with the token
//!   comparison first, in one script, so nothing can come between the check and the write
//!   (see `layout.rs`).
//!
//! Not supported: Redis Cluster (the scripts build key names at run time; one prefix's keys
//! would need one hash slot). Many processes may share a prefix: every put runs the script
//! that makes its listing entries (a delete by another process is never missed), and the
//! manager's session leases keep one writer per session. Only log appends skip the script
//! for a log this backend has listed since its last delete (logs are per process: the
//! manager keeps no journal on a shared store).

mod checks;
mod layout;
mod writer;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};

use self::checks::{check_durability, check_prefix};
use self::layout::{LIST_SCRIPT, Layout};
use self::writer::{Op, Writer, refused};
use super::{
    Acquired, EventFeed, Fence, Lease, LeaseState, ObjectMeta, RecordMeta, StorageBackend,
    StorageKey, SweepReport, ttl_ms,
};
use crate::error::{Result, StateError};

/// The largest string Redis stores (its `proto-max-bulk-len` default, 512 MB): a larger put
/// or append is [`StateError::TooLarge`].
const MAX_VALUE: usize = 512 << 20;
/// How long one request to Redis may take by default (see [`RedisOptions::timeout`]).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The prefix when none is set.
const DEFAULT_PREFIX: &str = "mars-state";

/// Stores every record as a Redis string under a prefix (`mars-state:v:<key>`), listed
/// through one set per folder, and changes a value and its listing entries in one Lua
/// script. Opens only on a server that fsyncs its append-only file before every reply
/// (`appendonly yes`, `appendfsync always`), unless [`RedisOptions::best_effort`]: an `Ok`
/// from a write then means it is on the Redis host's disk. Writes queued together go out in
/// one pipeline and share one fsync.
///
/// Plain Redis 7 (no modules, not Cluster). Many managers (nodes) may share a prefix. Clones share one
/// set of connections; when the last clone is dropped the writer sends what is queued and
/// ends.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mars_state::StateError> {
/// use mars_state::{RedisStorageBackend, StateManager};
/// let backend = RedisStorageBackend::connect("redis://127.0.0.1:6379").await?;
/// let manager = StateManager::start(backend).await?;
/// manager.save_session("s1", &serde_json::json!({ "step": 1 })).await?;
/// manager.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStorageBackend {
    inner: Arc<Inner>,
}

struct Inner {
    reads: ConnectionManager,
    writer: Writer,
    layout: Layout,
    list: redis::Script,
    leases: LeaseScripts,
    options: RedisOptions,
    /// `host:port` (never the URL, which may hold a password).
    addr: String,
    /// For the subscriptions to change events, each a connection of its own.
    client: redis::Client,
}

impl fmt::Debug for RedisStorageBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStorageBackend")
            .field("addr", &self.inner.addr)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// How a [`RedisStorageBackend`] connects: see [`RedisStorageBackend::options`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    prefix: String,
    best_effort: bool,
    timeout: Duration,
    session_ttl: Option<Duration>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: DEFAULT_PREFIX.to_owned(),
            best_effort: false,
            timeout: DEFAULT_TIMEOUT,
            session_ttl: None,
        }
    }
}

impl RedisOptions {
    /// Keeps every Redis key of the store under `prefix:` (default `mars-state`). 1 to 64
    /// ASCII letters, digits, `_`, `-` or `.`; checked by [`connect`](Self::connect), which
    /// fails with [`StateError::Config`] otherwise. Stores under different prefixes share a
    /// server without seeing each other.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Opens even when the server does not fsync before it replies (`appendonly no`, or
    /// `appendfsync everysec`), with a warning in the log. Then an `Ok` from a write means
    /// applied in Redis's memory only: it is lost if Redis stops before it next saves to disk.
    pub fn best_effort(mut self) -> Self {
        self.best_effort = true;
        self
    }

    /// How long one request (a connect, a read, a write's round trip) may take; default 10 s.
    /// A write that gets no answer in time fails with [`StateError::Timeout`]: its outcome is
    /// unknown.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Lets every key of a session (its record, its checkpoints, and their listing sets)
    /// expire `ttl` after the session's last write: each write of a session's record or
    /// checkpoint sets the TTL again on all of them. Default: no expiry. Other keys (the
    /// store's metadata, access records) never expire. An expired session's entry in the
    /// folder of all sessions is removed by the next listing of it.
    ///
    /// Redis expires the keys behind the manager's back. A running
    /// [`StateManager`](crate::StateManager) serves a live session from its session actor's
    /// cache until the actor passivates (the builder's `idle_timeout`, default 60 s); after
    /// that, a load of an expired session finds nothing (`Ok(None)`), but the manager's
    /// in-memory index still lists the session and its checkpoints until the manager is
    /// restarted. Choose a TTL far above the time a session may sit idle while it is
    /// expected to come back, and above the manager's `idle_timeout`.
    pub fn session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = Some(ttl.max(Duration::from_millis(1)));
        self
    }

    /// Connects to the Redis server at `url` (`redis://[:password@]host:port[/db]`) with
    /// these options: checks its persistence settings and loads the scripts.
    ///
    /// Errors: [`StateError::Config`] for a bad prefix or URL, or (unless
    /// [`best_effort`](Self::best_effort)) a server that does not fsync before replying;
    /// [`StateError::Unavailable`] if the server cannot be reached in the timeout.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mars_state::StateError> {
    /// use std::time::Duration;
    /// let backend = mars_state::RedisStorageBackend::options()
    ///     .prefix("agents-prod")
    ///     .timeout(Duration::from_secs(2))
    ///     .session_ttl(Duration::from_secs(7 * 24 * 3600))
    ///     .connect("redis://127.0.0.1:6379")
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self, url: &str) -> Result<RedisStorageBackend> {
        RedisStorageBackend::connect_with(url, self.clone()).await
    }
}

impl RedisStorageBackend {
    /// Connects to `url` with the default [`RedisOptions`] (prefix `mars-state`, durable).
    /// See [`RedisOptions::connect`].
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mars_state::StateError> {
    /// let backend = mars_state::RedisStorageBackend::connect("redis://127.0.0.1:6379").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self> {
        RedisOptions::default().connect(url).await
    }

    /// Options for connecting: prefix, durability, timeout, session TTL.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mars_state::StateError> {
    /// let backend = mars_state::RedisStorageBackend::options()
    ///     .prefix("tests")
    ///     .best_effort()
    ///     .connect("redis://127.0.0.1:6379")
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn options() -> RedisOptions {
        RedisOptions::default()
    }

    /// The prefix of this store's Redis keys (without the `:`).
    pub fn prefix(&self) -> &str {
        &self.inner.options.prefix
    }

    async fn connect_with(url: &str, options: RedisOptions) -> Result<Self> {
        check_prefix(&options.prefix)?;
        let client = redis::Client::open(url).map_err(|e| StateError::Config {
            message: format!("not a valid Redis URL ({})", e.category()),
        })?;
        let addr = client.get_connection_info().addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        let connect = || async {
            tokio::time::timeout(
                options.timeout * 2,
                client.get_connection_manager_with_config(config.clone()),
            )
            .await
            .map_err(|_| StateError::unavailable(format!("no answer from Redis at {addr}")))?
            .map_err(|e| StateError::unavailable(format!("cannot connect to Redis at {addr}: {e}")))
        };
        let mut reads = connect().await?;
        check_durability(&mut reads, &options, &addr).await?;
        let scripts = Scripts::new();
        scripts.load(&mut reads, options.timeout).await?;
        let writes = connect().await?;
        let layout = Layout::new(&options.prefix);
        let ttl_ms =
            options.session_ttl.map_or(0, |t| t.as_millis().clamp(1, u64::MAX as u128) as u64);
        let writer = Writer::start(
            writes,
            writer::Config { layout: layout.clone(), scripts, ttl_ms, timeout: options.timeout },
        );
        let list = redis::Script::new(LIST_SCRIPT);
        let leases = LeaseScripts::new();
        Ok(RedisStorageBackend {
            inner: Arc::new(Inner { reads, writer, layout, list, leases, options, addr, client }),
        })
    }

    /// Runs a read, once more if the connection dropped under it (reads are idempotent).
    async fn read<T, F, Fut>(&self, key: &StorageKey, f: F) -> Result<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let timeout = self.inner.options.timeout;
        for attempt in 0..2 {
            match tokio::time::timeout(timeout, f(self.inner.reads.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e))
                    if attempt == 0 && e.is_connection_dropped() && !e.is_connection_refusal() => {}
                Ok(Err(e)) => return Err(error_of(&e, Some(key), 0)),
                Err(_) => break,
            }
        }
        Err(StateError::unavailable(format!(
            "Redis at {} did not answer a read of {key} in {} ms",
            self.inner.addr,
            timeout.as_millis()
        )))
    }

    /// Runs a lease script on `lease`'s hash, once more if the connection dropped under it
    /// (every lease script is idempotent for its caller). Not through the writer: a lease
    /// call needs no batching, and the fence of every write is checked in its own script.
    async fn lease_call(
        &self,
        script: &redis::Script,
        name: &str,
        args: &[String],
    ) -> Result<Value> {
        let hash = self.inner.layout.lease(name);
        self.lease_script(script, &format!("lease {name}"), &[hash], args).await
    }

    /// Runs a lease script on the hashes `keys` (what `what` names in errors), as
    /// [`lease_call`](Self::lease_call).
    async fn lease_script(
        &self,
        script: &redis::Script,
        what: &str,
        keys: &[String],
        args: &[String],
    ) -> Result<Value> {
        let timeout = self.inner.options.timeout;
        for attempt in 0..2 {
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(key);
            }
            for arg in args {
                invocation.arg(arg);
            }
            let mut conn = self.inner.reads.clone();
            match tokio::time::timeout(timeout, invocation.invoke_async(&mut conn)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e))
                    if attempt == 0 && e.is_connection_dropped() && !e.is_connection_refusal() => {}
                Ok(Err(e)) => {
                    let detail = e.detail().unwrap_or("");
                    return Err(StateError::unavailable(format!(
                        "Redis failed a call on {what}: {} {detail}",
                        e.code().unwrap_or("")
                    )));
                }
                Err(_) => break,
            }
        }
        Err(StateError::unavailable(format!(
            "Redis at {} did not answer a call on {what} in {} ms; outcome unknown",
            self.inner.addr,
            timeout.as_millis()
        )))
    }
}

/// The lease scripts (`layout.rs`), run with `EVALSHA`, loaded on `NOSCRIPT`.
struct LeaseScripts {
    acquire: redis::Script,
    renew: redis::Script,
    renew_many: redis::Script,
    release: redis::Script,
    read: redis::Script,
}

impl LeaseScripts {
    fn new() -> Self {
        LeaseScripts {
            acquire: redis::Script::new(&layout::acquire_script()),
            renew: redis::Script::new(&layout::renew_script()),
            renew_many: redis::Script::new(&layout::renew_many_script()),
            release: redis::Script::new(&layout::release_script()),
            read: redis::Script::new(&layout::read_script()),
        }
    }
}

/// A lease's answer in a wrong shape.
fn bad_lease_reply(name: &str) -> StateError {
    StateError::corrupt(format!("lease {name}"), "Redis answered a lease call in a wrong shape")
}

/// Whole milliseconds from a script's integer reply (negative: none).
fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The write scripts, by hash; loaded at connect and after a `NOSCRIPT`.
pub(super) struct Scripts {
    put: redis::Script,
    append: redis::Script,
    delete: redis::Script,
    put_fenced: redis::Script,
    delete_fenced: redis::Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            put: redis::Script::new(&layout::put_script(false)),
            append: redis::Script::new(&layout::append_script()),
            delete: redis::Script::new(&layout::delete_script(false)),
            put_fenced: redis::Script::new(&layout::put_script(true)),
            delete_fenced: redis::Script::new(&layout::delete_script(true)),
        }
    }

    /// `SCRIPT LOAD`s them all.
    async fn load(&self, conn: &mut ConnectionManager, timeout: Duration) -> Result<()> {
        for script in [&self.put, &self.append, &self.delete, &self.put_fenced, &self.delete_fenced]
        {
            tokio::time::timeout(timeout, script.load_async(conn))
                .await
                .map_err(|_| StateError::unavailable("Redis did not answer SCRIPT LOAD in time"))?
                .map_err(|e| error_of(&e, None, 0))?;
        }
        Ok(())
    }
}

/// The typed error for a redis-rs failure of a request that surely was not applied (or a
/// read), about `key` if any, with `size` the bytes written.
fn error_of(e: &RedisError, key: Option<&StorageKey>, size: usize) -> StateError {
    let about = key.map(|k| format!(" (key {k})")).unwrap_or_default();
    let detail = e.detail().unwrap_or("");
    match e.code() {
        Some("WRONGTYPE") => {
            let key = key.map_or_else(|| "(redis)".to_owned(), ToString::to_string);
            StateError::corrupt(key, "a Redis key under the store's prefix is of another type")
        }
        Some("ERR") if detail.contains("exceeds maximum allowed size") => {
            StateError::TooLarge { size, limit: MAX_VALUE }
        }
        Some(code) => {
            StateError::unavailable(format!("Redis refused the request{about}: {code} {detail}"))
        }
        None => StateError::unavailable(format!("Redis request failed{about}: {e}")),
    }
}

/// "Outcome unknown": the request may or may not have been applied.
fn unknown_outcome(operation: &'static str, key: String, after: Duration) -> StateError {
    StateError::Timeout {
        operation,
        session: key,
        timeout_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
    }
}

/// A copy of an error this module made (the error type is not `Clone`).
fn copy_error(e: &StateError) -> StateError {
    match e {
        StateError::Timeout { operation, session, timeout_ms } => {
            StateError::Timeout { operation, session: session.clone(), timeout_ms: *timeout_ms }
        }
        StateError::TooLarge { size, limit } => StateError::TooLarge { size: *size, limit: *limit },
        StateError::Corrupt { key, reason } => StateError::corrupt(key, reason.clone()),
        StateError::Config { message } => StateError::Config { message: message.clone() },
        StateError::Fenced { name, token, current } => {
            StateError::Fenced { name: name.clone(), token: *token, current: *current }
        }
        other => StateError::unavailable(match other {
            StateError::Unavailable { reason } => reason.clone(),
            other => other.to_string(),
        }),
    }
}

fn too_large(size: usize) -> Result<()> {
    if size > MAX_VALUE {
        return Err(StateError::TooLarge { size, limit: MAX_VALUE });
    }
    Ok(())
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        _ => 0,
    }
}

#[async_trait]
impl StorageBackend for RedisStorageBackend {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        self.inner.writer.barrier(key).await?;
        let name = self.inner.layout.value(key);
        self.read(key, |mut conn| {
            let name = name.clone();
            async move { redis::cmd("GET").arg(name).query_async(&mut conn).await }
        })
        .await
    }

    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        too_large(value.len())?;
        self.inner.writer.submit(Op::Put(key.clone(), value)).await.map(drop)
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool> {
        let existed = self.inner.writer.submit(Op::Delete(key.clone())).await?;
        Ok(int(&existed) > 0)
    }

    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        self.inner.writer.barrier(prefix).await?;
        let (base, folder) = (self.inner.layout.base().to_owned(), prefix.to_string());
        let set = self.inner.layout.folder(prefix.as_str());
        let list = &self.inner.list;
        let flat: Vec<Value> = self
            .read(prefix, |mut conn| {
                let mut call = list.key(&set);
                call.arg(&base).arg(&folder);
                async move { call.invoke_async(&mut conn).await }
            })
            .await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            let (Some(Value::BulkString(name)), Some(Value::Int(size))) =
                (pair.first(), pair.get(1))
            else {
                return Err(StateError::corrupt(
                    prefix,
                    "Redis answered a listing in a wrong shape",
                ));
            };
            let key = String::from_utf8(name.clone())
                .ok()
                .and_then(|k| StorageKey::new(k).ok())
                .ok_or_else(|| {
                    StateError::corrupt(prefix, "a listed Redis key is not a valid key")
                })?;
            out.push(ObjectMeta { key, size: u64::try_from(*size).unwrap_or(0) });
        }
        Ok(out)
    }

    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        too_large(bytes.len())?;
        self.inner.writer.append(key.clone(), bytes)
    }

    /// Nothing to sweep: a write is one script, applied whole or not at all; nothing is
    /// staged.
    async fn sweep(&self) -> Result<SweepReport> {
        Ok(SweepReport::default())
    }

    /// Many processes may connect to one prefix.
    fn shared(&self) -> bool {
        true
    }

    /// One Lua script on the lease's hash (`<prefix>:l:<name>`), with the server's `TIME`.
    /// A grant over a hash that expired without `released` set names its old holder in
    /// [`Lease::taken_from`].
    async fn acquire_lease(&self, name: &str, node: &str, ttl: Duration) -> Result<Acquired> {
        let args = [node.to_owned(), ttl_ms(ttl).to_string()];
        let reply = self.lease_call(&self.inner.leases.acquire, name, &args).await?;
        let Value::Array(parts) = reply else { return Err(bad_lease_reply(name)) };
        let [
            Value::Int(granted),
            Value::BulkString(holder),
            Value::Int(token),
            Value::Int(left),
            rest @ ..,
        ] = parts.as_slice()
        else {
            return Err(bad_lease_reply(name));
        };
        let holder = String::from_utf8(holder.clone()).map_err(|_| bad_lease_reply(name))?;
        let expires_in = millis(*left);
        if *granted == 0 {
            return Ok(Acquired::Held { node: holder, expires_in });
        }
        let token = u64::try_from(*token).map_err(|_| bad_lease_reply(name))?;
        let taken_from = match rest {
            [] | [Value::Nil] => None,
            [Value::BulkString(from)] => {
                Some(String::from_utf8(from.clone()).map_err(|_| bad_lease_reply(name))?)
            }
            _ => return Err(bad_lease_reply(name)),
        };
        Ok(Acquired::Granted(Lease {
            name: name.to_owned(),
            node: holder,
            token,
            expires_in,
            taken_from,
        }))
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>> {
        let args = [lease.node.clone(), lease.token.to_string(), ttl_ms(ttl).to_string()];
        let reply = self.lease_call(&self.inner.leases.renew, &lease.name, &args).await?;
        match reply {
            Value::Int(left) if left >= 0 => {
                Ok(Some(Lease { expires_in: millis(left), taken_from: None, ..lease.clone() }))
            }
            Value::Int(_) => Ok(None),
            _ => Err(bad_lease_reply(&lease.name)),
        }
    }

    /// One Lua script over every lease's hash: one round trip and one reading of the
    /// server's `TIME` for all of them.
    async fn renew_leases(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<Option<Lease>>> {
        let Some(first) = leases.first() else { return Ok(Vec::new()) };
        let what = match leases.len() {
            1 => format!("lease {}", first.name),
            n => format!("{n} leases ({} and others)", first.name),
        };
        let keys: Vec<String> = leases.iter().map(|l| self.inner.layout.lease(&l.name)).collect();
        let mut args = Vec::with_capacity(1 + 2 * leases.len());
        args.push(ttl_ms(ttl).to_string());
        for lease in leases {
            args.push(lease.node.clone());
            args.push(lease.token.to_string());
        }
        let reply = self.lease_script(&self.inner.leases.renew_many, &what, &keys, &args).await?;
        let bad =
            || StateError::corrupt(what.clone(), "Redis answered a lease call in a wrong shape");
        let Value::Array(answers) = reply else { return Err(bad()) };
        if answers.len() != leases.len() {
            return Err(bad());
        }
        leases
            .iter()
            .zip(answers)
            .map(|(lease, answer)| match answer {
                Value::Int(left) if left >= 0 => {
                    Ok(Some(Lease { expires_in: millis(left), taken_from: None, ..lease.clone() }))
                }
                Value::Int(_) => Ok(None),
                _ => Err(bad()),
            })
            .collect()
    }

    /// One read-only Lua script on the lease's hash, with the server's `TIME`; `released`
    /// is the hash's field of that name.
    async fn read_lease(&self, name: &str) -> Result<Option<LeaseState>> {
        let reply = self.lease_call(&self.inner.leases.read, name, &[]).await?;
        let parts = match reply {
            Value::Nil => return Ok(None),
            Value::Array(parts) => parts,
            _ => return Err(bad_lease_reply(name)),
        };
        let [Value::BulkString(node), Value::Int(token), Value::Int(left), Value::Int(released)] =
            parts.as_slice()
        else {
            return Err(bad_lease_reply(name));
        };
        Ok(Some(LeaseState {
            node: String::from_utf8(node.clone()).map_err(|_| bad_lease_reply(name))?,
            token: u64::try_from(*token).map_err(|_| bad_lease_reply(name))?,
            expires_in: (*left > 0).then(|| millis(*left)),
            released: *released == 1,
        }))
    }

    /// Expires the lease now and sets its hash's `released` field to "1", so the next grant
    /// reports no takeover ([`Lease::taken_from`] `None`).
    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        let args = [lease.node.clone(), lease.token.to_string()];
        self.lease_call(&self.inner.leases.release, &lease.name, &args).await.map(drop)
    }

    /// The put script with the fence check first, in one script (`layout.rs`). `meta` is
    /// not kept (Redis stores bytes only).
    async fn put_fenced(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        _meta: &RecordMeta,
        fence: &Fence,
    ) -> Result<()> {
        too_large(value.len())?;
        let reply =
            self.inner.writer.submit(Op::PutFenced(key.clone(), value, fence.clone())).await?;
        check_fence(&reply, fence)
    }

    /// The delete script with the fence check first, in one script.
    async fn delete_fenced(&self, key: &StorageKey, fence: &Fence) -> Result<bool> {
        let reply = self.inner.writer.submit(Op::DeleteFenced(key.clone(), fence.clone())).await?;
        check_fence(&reply, fence)?;
        Ok(int(&reply) > 0)
    }

    /// `PUBLISH <prefix>:events`, one per payload, in one pipeline on the reads'
    /// connection (Redis runs a connection's commands in order). Not retried: a retry after
    /// a lost reply could deliver a payload twice.
    async fn publish_events(&self, payloads: Vec<Vec<u8>>) -> Result<()> {
        if payloads.is_empty() {
            return Ok(());
        }
        let channel = self.inner.layout.events();
        let mut pipe = redis::pipe();
        for payload in &payloads {
            pipe.publish(&channel, payload.as_slice()).ignore();
        }
        let mut conn = self.inner.reads.clone();
        let timeout = self.inner.options.timeout;
        match tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StateError::unavailable(format!(
                "Redis at {} failed to publish change events: {}",
                self.inner.addr,
                e.category()
            ))),
            Err(_) => Err(StateError::unavailable(format!(
                "Redis at {} did not answer a publish of change events in {} ms",
                self.inner.addr,
                timeout.as_millis()
            ))),
        }
    }

    /// `SUBSCRIBE <prefix>:events` on a connection of its own; the feed ends when that
    /// connection does.
    async fn subscribe_events(&self) -> Result<EventFeed> {
        let channel = self.inner.layout.events();
        let addr = &self.inner.addr;
        let setup = async {
            let mut pubsub = self.inner.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub.into_on_message())
        };
        let mut messages = match tokio::time::timeout(self.inner.options.timeout * 2, setup).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                return Err(StateError::unavailable(format!(
                    "cannot subscribe to change events at Redis {addr}: {}",
                    e.category()
                )));
            }
            Err(_) => {
                return Err(StateError::unavailable(format!(
                    "no answer from Redis at {addr} to a subscription to change events"
                )));
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            use futures_util::StreamExt;
            loop {
                tokio::select! {
                    () = tx.closed() => break,
                    message = messages.next() => match message {
                        Some(m) => {
                            if tx.send(m.get_payload_bytes().to_vec()).await.is_err() {
                                break;
                            }
                        }
                        // The connection ended: so does the feed (`tx` is dropped).
                        None => break,
                    },
                }
            }
        });
        Ok(EventFeed::channel(rx))
    }
}

/// [`StateError::Fenced`] if a fenced script refused the write.
fn check_fence(reply: &Value, fence: &Fence) -> Result<()> {
    match refused(reply) {
        Some(current) => {
            Err(StateError::Fenced { name: fence.name.clone(), token: fence.token, current })
        }
        None => Ok(()),
    }
}
