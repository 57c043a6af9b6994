//! The SQLite backend (cargo feature `sqlite`): every key a row of one database file.
//!
//! This module owns the public handle ([`SqliteStorageBackend`], [`SqliteOptions`]), opening
//! a store (its OS lock, the pragmas and their checks, the schema), the read connections, the
//! mapping of SQLite's errors to [`StateError`] and the [`StorageBackend`] impl; writes go to
//! the writer thread (`writer.rs`). It calls rusqlite, the file backend's lock helper
//! (`file::take_lock`) and nothing above the backends.
//!
//! Durability contract, and why each setting is there:
//! - `journal_mode=WAL`: a commit appends its pages to `<file>-wal`; readers on other
//!   connections keep reading the last committed state beside the writer.
//! - `synchronous=FULL`: the WAL is fsynced at every commit, before the commit returns. So an
//!   `Ok` from put or delete means committed *and* on disk: it survives a crash and a power
//!   loss (an append is durable once a later put or delete commits; see below). (`NORMAL`, common with WAL, syncs only at checkpoints: a power loss could
//!   take back the last acknowledged writes.)
//! - one writer thread commits every write queued while the previous commit ran in one
//!   transaction (group commit) and answers each caller only after that commit. A batch of
//!   appends only (the index journal, which the contract does not require to be durable by
//!   itself) commits at `NORMAL`, without an fsync; the WAL is sequential, so the next
//!   `FULL` commit makes those frames durable too.
//! - an append is a row of its own (`tail`), so its cost does not grow with the log.
//! - a crash mid-transaction leaves a WAL tail without a commit record, which SQLite ignores
//!   when it next opens the file: there are no staged leftovers, so `sweep` has nothing to
//!   remove.
//! - the store is held with an OS lock (`flock`) on `<file>-lock` for the backend's life: the
//!   manager keeps an index of the store in memory, so a second opener, in this process or
//!   another, gets [`StateError::Locked`].

mod writer;

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};

use self::writer::{Op, Writer};
use super::{ObjectMeta, StorageBackend, StorageKey, SweepReport};
use crate::error::{Result, StateError};

/// The schema this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;
/// `PRAGMA application_id` of a mars-state store: "mars" in ASCII, so `file(1)` and a reader
/// of the header can tell the file from other SQLite databases.
const APPLICATION_ID: i64 = 0x6d61_7273;
/// The largest value SQLite stores (its default `SQLITE_MAX_LENGTH`, which the bundled build
/// keeps): a larger put is [`StateError::TooLarge`].
const MAX_VALUE: usize = 1_000_000_000;
/// How long a statement waits for SQLite's own file locks (held only by this process's
/// connections, or by a tool reading the file) before failing with `Locked`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle read connections kept for reuse.
const MAX_IDLE_READERS: usize = 4;

/// Stores every record as a row of one SQLite database file (`key TEXT PRIMARY KEY, value
/// BLOB`; an append adds a row to a second table, so its cost does not grow with the log), in
/// WAL mode with `synchronous=FULL`: an `Ok` from a write means committed and
/// fsynced, so it survives a crash and a power loss. Writes queued together are committed in
/// one transaction (one fsync); reads run on their own connections beside the writer, on
/// tokio's blocking pool.
///
/// One process (one backend) has a store open at a time: a second opener gets
/// [`StateError::Locked`] (see [`SqliteOptions::lock_wait`]). Dropping the last clone waits
/// for queued writes, closes the database and releases the lock.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mars_state::StateError> {
/// use mars_state::{SqliteStorageBackend, StateManager};
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("state.db");
/// let manager = StateManager::start(SqliteStorageBackend::open(&path)?).await?;
/// manager.save_session("s1", &serde_json::json!({ "step": 1 })).await?;
/// manager.shutdown().await?;
///
/// // Reopened: the save is there.
/// let manager = StateManager::start(SqliteStorageBackend::open(&path)?).await?;
/// let state: Option<serde_json::Value> = manager.load_session("s1").await?;
/// assert_eq!(state, Some(serde_json::json!({ "step": 1 })));
/// # manager.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteStorageBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Arc<Db>,
    /// `None` when opened [read-only](SqliteOptions::read_only).
    writer: Option<Writer>,
    /// Held for the backend's life: released when it is dropped, or by the OS when the
    /// process dies. `None` when opened read-only.
    _lock: Option<super::file::StoreLock>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Idle readers first, then the writer (it commits what is queued and closes the
        // database, checkpointing the WAL), all while the lock (a field, dropped after this)
        // is still held.
        crate::sync::lock(&self.db.readers).clear();
        if let Some(writer) = &mut self.writer {
            writer.close();
        }
    }
}

/// The database file and its idle read connections.
#[derive(Debug)]
struct Db {
    path: Arc<Path>,
    readers: Mutex<Vec<Connection>>,
    /// Read connections are opened `SQLITE_OPEN_READONLY` (a read-only backend).
    read_only: bool,
}

/// How a [`SqliteStorageBackend`] is opened: see [`SqliteStorageBackend::options`].
#[derive(Debug, Clone, Default)]
pub struct SqliteOptions {
    lock_wait: Duration,
    read_only: bool,
}

impl SqliteOptions {
    /// If another process holds the store, wait up to `timeout` for it to let go (it exits,
    /// is killed, or shuts its manager down) before failing with [`StateError::Locked`].
    /// Default: do not wait. Opening blocks the calling thread while it waits.
    pub fn lock_wait(mut self, timeout: Duration) -> Self {
        self.lock_wait = timeout;
        self
    }

    /// Opens (creating if needed) the database at `path` with these options: takes the lock
    /// on `<path>-lock`, sets and checks the pragmas, creates the schema. Blocks the calling
    /// thread (file I/O, and the lock wait).
    ///
    /// Errors: [`StateError::Locked`] if another backend holds the store;
    /// [`StateError::Corrupt`] if the file is not an SQLite database or is damaged;
    /// [`StateError::Config`] if it is another application's database or a newer schema;
    /// [`StateError::Io`] if the file system cannot give SQLite its WAL mode (it needs
    /// shared memory beside the file, which some network file systems lack).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), mars_state::StateError> {
    /// use std::time::Duration;
    /// let backend = mars_state::SqliteStorageBackend::options()
    ///     .lock_wait(Duration::from_secs(5))
    ///     .open("./state.db")?;
    /// # Ok(()) }
    /// ```
    pub fn open(&self, path: impl AsRef<Path>) -> Result<SqliteStorageBackend> {
        if self.read_only {
            return SqliteStorageBackend::open_read_only_with(path.as_ref());
        }
        SqliteStorageBackend::open_with(path.as_ref(), self.lock_wait)
    }

    /// Opens the store read-only (default: no), beside the process that holds it, if any:
    /// no lock is taken, the file is not created, no pragma or schema is written, and
    /// every connection is opened `SQLITE_OPEN_READONLY` (with `query_only` on as well).
    /// Every write method answers [`StateError::ReadOnly`]. The store must exist and be a
    /// mars-state store ([`StateError::Config`] otherwise).
    ///
    /// Reads see every commit made before they start (SQLite's WAL gives each read one
    /// consistent snapshot), also commits still only in `<file>-wal`. The one thing a
    /// reader of a WAL database changes on disk is the `<file>-shm` index, which is shared
    /// memory that every reader marks its snapshot in, not data; when no process has the
    /// store open and the `-wal` and `-shm` files are absent, SQLite creates them (they
    /// hold no data, and the next writer would make them anyway). SQLite's `immutable`
    /// mode would avoid even that, but it is unsafe beside a writer (it reads without
    /// locks and ignores the WAL), so it is not used.
    ///
    /// ```
    /// # fn main() -> Result<(), mars_state::StateError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let path = dir.path().join("state.db");
    /// # drop(mars_state::SqliteStorageBackend::open(&path)?);
    /// let reader = mars_state::SqliteStorageBackend::options().read_only(true).open(&path)?;
    /// # Ok(()) }
    /// ```
    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }
}

impl SqliteStorageBackend {
    /// Opens (creating if needed) the database at `path` with the default
    /// [`SqliteOptions`] (no waiting for the lock). See [`SqliteOptions::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        SqliteOptions::default().open(path)
    }

    /// Options for opening a store: waiting for its lock.
    pub fn options() -> SqliteOptions {
        SqliteOptions::default()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.db.path
    }

    fn open_with(path: &Path, lock_wait: Duration) -> Result<Self> {
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().map_err(|e| StateError::io("resolving", path, e))?.join(path)
        };
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| StateError::io("creating the directory of", &path, e))?;
        let lock = super::file::take_lock(&sidecar(&path, "-lock"), lock_wait)?;
        // Only now, holding the lock, is the file created or opened.
        let created = create_file(&path)?;
        let path: Arc<Path> = path.into();
        let conn = open_writer(&path)?;
        if created {
            // The new file's name must survive a power loss before anything is acknowledged
            // in it (SQLite syncs the directory for its WAL, not for the database file).
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| StateError::io("syncing the directory of", &*path, e))?;
        }
        let writer = Writer::start(conn, path.clone())?;
        let db = Arc::new(Db { path, readers: Mutex::new(Vec::new()), read_only: false });
        Ok(SqliteStorageBackend {
            inner: Arc::new(Inner { db, writer: Some(writer), _lock: Some(lock) }),
        })
    }

    /// The read-only open (see [`SqliteOptions::read_only`]): no lock, no writer; the file
    /// must be a store of ours, checked on a read-only connection that is then kept for
    /// reads.
    fn open_read_only_with(path: &Path) -> Result<Self> {
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().map_err(|e| StateError::io("resolving", path, e))?.join(path)
        };
        if let Err(e) = std::fs::symlink_metadata(&path) {
            return Err(StateError::io("opening the store (read-only)", &path, e));
        }
        let path: Arc<Path> = path.into();
        let conn = open_reader(&path, true)
            .map_err(|e| sql_error(&e, "opening (read-only)", &path, None, 0))?;
        let (app, version, _) =
            identity(&conn).map_err(|e| sql_error(&e, "reading", &path, None, 0))?;
        if app != APPLICATION_ID {
            return Err(StateError::Config {
                message: format!("{} is not a mars-state store", path.display()),
            });
        }
        if version != SCHEMA_VERSION {
            return Err(StateError::Config {
                message: format!(
                    "{} has store schema version {version}; this build reads version {SCHEMA_VERSION}",
                    path.display()
                ),
            });
        }
        let db = Arc::new(Db { path, readers: Mutex::new(vec![conn]), read_only: true });
        Ok(SqliteStorageBackend { inner: Arc::new(Inner { db, writer: None, _lock: None }) })
    }

    /// Whether this handle was opened [read-only](SqliteOptions::read_only).
    pub fn is_read_only(&self) -> bool {
        self.inner.writer.is_none()
    }

    /// The writer, or [`StateError::ReadOnly`] on a read-only handle.
    fn writer(&self, operation: &'static str) -> Result<&Writer> {
        self.inner
            .writer
            .as_ref()
            .ok_or_else(|| StateError::read_only(operation, self.path().display()))
    }

    /// Runs `f` on a read connection, on tokio's blocking pool (SQLite blocks).
    async fn read<T: Send + 'static>(
        &self,
        what: &'static str,
        key: &StorageKey,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.inner.db.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            db.read(f).map_err(|e| sql_error(&e, what, &db.path, Some(&key), 0))
        })
        .await
        .map_err(|e| StateError::unavailable(format!("SQLite read task failed: {e}")))?
    }
}

impl Db {
    /// Runs `f` on an idle read connection (or a new one), then keeps it for the next read.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        let idle = crate::sync::lock(&self.readers).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => open_reader(&self.path, self.read_only)?,
        };
        let result = f(&conn);
        let mut idle = crate::sync::lock(&self.readers);
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        result
    }
}

/// `path` with `suffix` appended to its file name (`state.db` → `state.db-lock`), as SQLite
/// names its `-wal` and `-shm` files.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates the database file, owner-only, unless it exists. Returns whether it was created.
/// (SQLite would create it `0644`; its `-wal` and `-shm` files take the database's mode.)
fn create_file(path: &Path) -> Result<bool> {
    let made = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path);
    match made {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(StateError::io("creating", path, e)),
    }
}

fn flags() -> OpenFlags {
    // No symbolic link as the database file; one connection per thread at a time (the
    // writer thread, or the read that took it from the pool), so SQLite's mutex is not needed.
    OpenFlags::SQLITE_OPEN_READ_WRITE | common_flags()
}

/// The flags of every connection but the access mode.
fn common_flags() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_NOFOLLOW
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_EXRESCODE
}

/// Opens the writer's connection: sets and checks the pragmas, creates or checks the schema.
fn open_writer(path: &Path) -> Result<Connection> {
    let err = |what: &'static str| move |e: rusqlite::Error| sql_error(&e, what, path, None, 0);
    let conn = Connection::open_with_flags(path, flags()).map_err(err("opening"))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err("opening"))?;
    // Another application's database is refused before anything below changes its file
    // (the journal mode persists in it). Checked again under the schema's transaction.
    let (app, version, objects) = identity(&conn).map_err(err("reading"))?;
    if !is_ours_or_new(app, version, objects) {
        return Err(foreign(path));
    }
    stable_plans(&conn).map_err(err("opening"))?;
    // WAL: readers run beside the writer, and a commit is one append to the WAL. The mode
    // persists in the file. It needs shared memory (`<file>-shm`, mmap): where the file
    // system refuses it, SQLite keeps the old mode and says so in the answer.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(err("setting WAL mode on"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StateError::io(
            "setting WAL mode on",
            path,
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "SQLite kept journal_mode={mode}: the file system does not support WAL \
                     (shared memory beside the database file)"
                ),
            ),
        ));
    }
    // FULL: the WAL is fsynced at every commit, so a committed (acknowledged) write survives
    // a power loss; NORMAL would sync only at checkpoints.
    conn.pragma_update(None, "synchronous", "FULL").map_err(err("setting synchronous on"))?;
    let sync: i64 =
        conn.pragma_query_value(None, "synchronous", |row| row.get(0)).map_err(err("checking"))?;
    if sync != 2 {
        return Err(StateError::Config {
            message: format!("SQLite kept synchronous={sync}, not FULL (2)"),
        });
    }
    // A damaged or hostile file must not run code from its schema.
    conn.pragma_update(None, "trusted_schema", "OFF").map_err(err("opening"))?;
    create_schema(&conn, path)?;
    Ok(conn)
}

/// The file's `application_id`, `user_version` and number of schema objects.
fn identity(conn: &Connection) -> rusqlite::Result<(i64, i64, i64)> {
    let app: i64 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let objects: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
    Ok((app, version, objects))
}

/// A store of ours (any schema version), or a new, empty file.
fn is_ours_or_new(app: i64, version: i64, objects: i64) -> bool {
    app == APPLICATION_ID || (app == 0 && version == 0 && objects == 0)
}

fn foreign(path: &Path) -> StateError {
    StateError::Config {
        message: format!(
            "{} is an SQLite database of another application, not a mars-state store",
            path.display()
        ),
    }
}

/// Creates the table in a new file, or checks an existing file is a store of a schema this
/// build reads. One transaction, so a crash leaves a file with the schema or an empty one.
fn create_schema(conn: &Connection, path: &Path) -> Result<()> {
    let err = |e: rusqlite::Error| sql_error(&e, "creating the schema of", path, None, 0);
    conn.execute_batch("BEGIN IMMEDIATE").map_err(err)?;
    let checked = (|| {
        let (app, version, objects) = identity(conn).map_err(err)?;
        let config = |message: String| StateError::Config { message };
        if app == 0 && version == 0 && objects == 0 {
            // A new (empty) file.
            // `kv`: every key and its value. `tail`: the pieces appended to a key of `kv`
            // since its last put, in order; its value is the `kv` value followed by them.
            conn.execute_batch(&format!(
                "CREATE TABLE kv (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL) \
                 WITHOUT ROWID, STRICT;
                 CREATE TABLE tail (key TEXT NOT NULL, seq INTEGER NOT NULL, \
                 bytes BLOB NOT NULL, PRIMARY KEY (key, seq)) WITHOUT ROWID, STRICT;
                 PRAGMA application_id = {APPLICATION_ID};
                 PRAGMA user_version = {SCHEMA_VERSION};"
            ))
            .map_err(err)?;
        } else if !is_ours_or_new(app, version, objects) {
            return Err(foreign(path));
        } else if version != SCHEMA_VERSION {
            return Err(config(format!(
                "{} has store schema version {version}; this build reads version {SCHEMA_VERSION}",
                path.display()
            )));
        }
        Ok(())
    })();
    match checked {
        Ok(()) => conn.execute_batch("COMMIT").map_err(err),
        Err(e) => {
            // Nothing was written; the file stays as it was.
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Turns on SQLite's query planner stability guarantee: a statement's plan no longer depends
/// on the values bound to it. Without it, a statement whose plan looked at a bound value
/// (the append's `max(seq)` lookup, say) is marked expired when rusqlite's statement cache
/// clears its bindings, and SQLite compiles it again at its next use: every write and read
/// through `prepare_cached` paid a full re-prepare.
fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map(drop)
}

/// Opens a read connection (the writer made the file a WAL store already); with
/// `read_only`, `SQLITE_OPEN_READONLY` (a read-only backend).
fn open_reader(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let flags = if read_only { OpenFlags::SQLITE_OPEN_READ_ONLY | common_flags() } else { flags() };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    stable_plans(&conn)?;
    conn.pragma_update(None, "query_only", "ON")?;
    conn.pragma_update(None, "trusted_schema", "OFF")?;
    Ok(conn)
}

/// Maps an SQLite failure while `operation` (a verb: "reading", "writing") `key` of the store
/// at `path` to the typed error: a damaged file is `Corrupt`, a full disk `StorageFull`, a
/// lock held too long `Locked`, a value over SQLite's limit `TooLarge` (`size`: its
/// length), permissions `PermissionDenied`, anything else `Io`.
fn sql_error(
    e: &rusqlite::Error,
    operation: &'static str,
    path: &Path,
    key: Option<&StorageKey>,
    size: usize,
) -> StateError {
    use rusqlite::ErrorCode as Code;
    use std::io::ErrorKind as Kind;
    let damaged = |reason: String| match key {
        Some(key) => StateError::corrupt(key, format!("{reason} (in {})", path.display())),
        None => StateError::corrupt(path.display(), reason),
    };
    let Some(code) = e.sqlite_error_code() else {
        // Not a failure of SQLite: a row it gave back is not what this backend writes (a
        // value that is not a blob, say).
        return damaged(format!("unexpected row: {e}"));
    };
    let kind = match code {
        Code::DatabaseCorrupt | Code::NotADatabase => return damaged(e.to_string()),
        Code::DatabaseBusy | Code::DatabaseLocked => {
            return StateError::Locked { path: path.to_path_buf() };
        }
        Code::TooBig => return StateError::TooLarge { size, limit: MAX_VALUE },
        Code::DiskFull => Kind::StorageFull,
        Code::PermissionDenied | Code::ReadOnly | Code::AuthorizationForStatementDenied => {
            Kind::PermissionDenied
        }
        Code::CannotOpen => Kind::NotFound,
        _ => Kind::Other,
    };
    let what = match key {
        Some(key) => format!("{e} (key {key})"),
        None => e.to_string(),
    };
    StateError::io(operation, path, std::io::Error::new(kind, what))
}

#[async_trait]
impl StorageBackend for SqliteStorageBackend {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        let k = key.clone();
        self.read("reading", key, move |conn| {
            // The value, and whether pieces were appended after it (a log; never a record).
            // Two plain lookups, not one `UNION ALL … ORDER BY`: SQLite re-prepared that
            // statement at every execution and sorted its rows, several times the cost of
            // the lookup itself.
            let mut st = conn.prepare_cached(
                "SELECT value, EXISTS (SELECT 1 FROM tail WHERE key = ?1) FROM kv WHERE key = ?1",
            )?;
            let mut rows = st.query([k.as_str()])?;
            let Some(head) = rows.next()? else { return Ok(None) };
            let mut value: Vec<u8> = head.get(0)?;
            if head.get::<_, bool>(1)? {
                // `head` is still the current row of its statement, so the read transaction
                // it began is still open: the pieces come from the same snapshot.
                let mut st =
                    conn.prepare_cached("SELECT bytes FROM tail WHERE key = ?1 ORDER BY seq")?;
                let mut pieces = st.query([k.as_str()])?;
                while let Some(piece) = pieces.next()? {
                    value.extend_from_slice(piece.get_ref(0)?.as_blob()?);
                }
            }
            Ok(Some(value))
        })
        .await
    }

    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        self.writer("put")?.submit(Op::Put(key.clone(), value)).await.map(drop)
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool> {
        self.writer("delete")?.submit(Op::Delete(key.clone())).await
    }

    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        // Every key under `prefix/`: at least `prefix/`, below `prefix0` ('0' follows '/'),
        // compared byte by byte (the BINARY collation), so `prefix-x` and `prefixx` are out.
        // An index range, sizes without reading the values.
        let low = format!("{prefix}/");
        let high = format!("{prefix}0");
        let rows = self
            .read("listing", prefix, move |conn| {
                let mut st = conn.prepare_cached(
                    "SELECT key, length(value) + coalesce((SELECT sum(length(bytes)) \
                     FROM tail WHERE tail.key = kv.key), 0) \
                     FROM kv WHERE key >= ?1 AND key < ?2",
                )?;
                let rows = st.query_map([&low, &high], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        rows.into_iter()
            .map(|(key, size)| {
                let key = StorageKey::new(key).map_err(|e| {
                    StateError::corrupt(prefix, format!("a stored key is not valid: {e}"))
                })?;
                Ok(ObjectMeta { key, size: u64::try_from(size).unwrap_or(0) })
            })
            .collect()
    }

    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        self.writer("append")?.submit(Op::Append(key.clone(), bytes)).await.map(drop)
    }

    /// Nothing to sweep: a write interrupted by a crash is an uncommitted WAL tail, which
    /// SQLite ignores and overwrites by itself; no staged files are ever made.
    async fn sweep(&self) -> Result<SweepReport> {
        self.writer("sweep")?;
        Ok(SweepReport::default())
    }
}
