//! Which backend the suites' stores live on, chosen by `MARS_STATE_TEST_BACKEND` as OpenDAL
//! chooses the service of its behaviour tests: `file` (the default, also when unset or
//! empty) or `sqlite` (needs `--features sqlite`). A test names its store by the directory
//! it would give the file backend (`dir`); opening again with the same `dir` reaches the
//! same store, so restart tests work on every backend.
//!
//! `MARS_STATE_TEST_BACKEND=sqlite cargo test --features sqlite --test api`
//!
//! Adding a backend is one arm in [`opener`] (and its words in [`ACCEPTED`]). Tests that
//! look at the file backend's files on disk ask [`file_backend_only`] first; every other
//! test runs on whichever backend is chosen.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mars_state::{
    Acquired, Fence, FileStorageBackend, Lease, LeaseState, ObjectMeta, StorageBackend, StorageKey,
    SweepReport,
};

/// The variable that picks the backend.
pub const BACKEND_ENV: &str = "MARS_STATE_TEST_BACKEND";

/// The values [`BACKEND_ENV`] accepts, and the cargo feature each needs.
pub const ACCEPTED: &str = "`file` (the default when unset or empty; no feature), \
                            `sqlite` (cargo feature `sqlite`: `--features sqlite`), \
                            `postgres` (`--features postgres`; server at \
                            MARS_STATE_TEST_PG_URL), `redis` (`--features redis`; server at \
                            MARS_STATE_TEST_REDIS_URL, opened best-effort)";

/// How long [`backend`] waits for the store's lock on backends other than the file backend:
/// a restart right after `shutdown` may find the previous backend still closing (the SQLite
/// backend's writer thread checkpoints the WAL and closes the database while the lock is
/// held). The file backend is opened without waiting, as the suites always opened it: its
/// lock is released within `shutdown`, and a test that expects `Locked` gets it at once.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// [`LOCK_WAIT`] on the chosen backend (zero on the file backend).
fn lock_wait() -> Duration {
    if on_file_backend() { Duration::ZERO } else { LOCK_WAIT }
}

/// Opens the store named by a directory: see [`open_backend`].
type Opener = fn(&Path, FileWrites, Duration) -> mars_state::Result<Arc<dyn StorageBackend>>;

/// The one place that knows the backends: how to open a store of backend `name`; `None` if
/// there is no such backend. Panics if `name` is a backend this build lacks the feature of.
fn opener(name: &str) -> Option<Opener> {
    Some(match name {
        "file" => open_file,
        #[cfg(feature = "sqlite")]
        "sqlite" => open_sqlite,
        #[cfg(not(feature = "sqlite"))]
        "sqlite" => panic!(
            "{BACKEND_ENV}=sqlite needs the SQLite backend compiled in: run with \
             `--features sqlite`"
        ),
        #[cfg(feature = "redis")]
        "redis" => open_redis,
        #[cfg(not(feature = "redis"))]
        "redis" => panic!(
            "{BACKEND_ENV}=redis needs the Redis backend compiled in: run with `--features redis`"
        ),
        #[cfg(feature = "postgres")]
        "postgres" => open_postgres,
        #[cfg(not(feature = "postgres"))]
        "postgres" => panic!(
            "{BACKEND_ENV}=postgres needs the PostgreSQL backend compiled in: run with \
             `--features postgres`"
        ),
        _ => return None,
    })
}

/// The backend [`BACKEND_ENV`] names, and how to open its stores (checked once; panics on
/// a value not in [`ACCEPTED`], or on one whose cargo feature this build lacks).
fn chosen() -> &'static (String, Opener) {
    static CHOSEN: OnceLock<(String, Opener)> = OnceLock::new();
    CHOSEN.get_or_init(|| {
        let value = std::env::var(BACKEND_ENV).unwrap_or_default();
        let name = if value.is_empty() { "file".to_owned() } else { value };
        match opener(&name) {
            Some(open) => (name, open),
            None => panic!("{BACKEND_ENV}={name:?} is not a test backend; accepted: {ACCEPTED}"),
        }
    })
}

/// The name of the backend [`BACKEND_ENV`] picks (`file` when it is unset or empty).
pub fn backend_name() -> &'static str {
    &chosen().0
}

/// Whether the chosen backend is the file backend.
pub fn on_file_backend() -> bool {
    backend_name() == "file"
}

/// How the file backend is opened when it is the chosen one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileWrites {
    /// As [`super::builder`] opens it: records written directly unless
    /// [`super::LOG_ENV`] is set (several tests read record files while a manager is open).
    Suite,
    /// `FileStorageBackend::new`'s defaults (the write-ahead log on), for tests that always
    /// opened it that way.
    Defaults,
    /// Records written directly (no write-ahead log), whatever [`super::LOG_ENV`] says.
    Direct,
}

/// Opens the store named by `dir` on the chosen backend. `file`: how a file backend is
/// opened (other backends ignore it). `lock_wait`: how long to wait if another backend
/// holds the store (it is still closing, or a killed process held it).
pub fn open_backend(
    dir: &Path,
    file: FileWrites,
    lock_wait: Duration,
) -> mars_state::Result<Arc<dyn StorageBackend>> {
    (chosen().1)(dir, file, lock_wait)
}

/// A file store at `dir`.
fn open_file(
    dir: &Path,
    writes: FileWrites,
    lock_wait: Duration,
) -> mars_state::Result<Arc<dyn StorageBackend>> {
    let log = match writes {
        FileWrites::Suite => std::env::var_os(super::LOG_ENV).is_some(),
        FileWrites::Defaults => true,
        FileWrites::Direct => false,
    };
    let b = FileStorageBackend::options().write_ahead_log(log).lock_wait(lock_wait).open(dir)?;
    Ok(Arc::new(b))
}

/// One SQLite database file in the store's directory, `dir/state.db` (the directory is
/// created if needed).
#[cfg(feature = "sqlite")]
fn open_sqlite(
    dir: &Path,
    _: FileWrites,
    lock_wait: Duration,
) -> mars_state::Result<Arc<dyn StorageBackend>> {
    let b = mars_state::SqliteStorageBackend::options()
        .lock_wait(lock_wait)
        .open(dir.join("state.db"))?;
    Ok(Arc::new(b))
}

/// The name of the server-side store (a key prefix, a schema) for the store named by `dir`:
/// `MARS_STATE_TEST_PREFIX` (default `mars_state_test`; CI sets one per run and removes
/// everything under it afterwards), then a hash of `dir`'s path, so the same `dir` reaches
/// the same store and every test (every temporary directory) gets a fresh one.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn server_store_name(dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let run = std::env::var("MARS_STATE_TEST_PREFIX").unwrap_or_else(|_| "mars_state_test".into());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    format!("{run}_{:016x}", h.finish())
}

/// A Redis store under a key prefix named from `dir`, on the server at
/// `MARS_STATE_TEST_REDIS_URL` (default the machine's, `redis://127.0.0.1:6379`). Opened
/// best-effort: the machine's Redis keeps nothing on disk, and these suites test behaviour
/// (tests/redis_backend.rs tests durability on private servers). Connected at the first
/// call, on the test's own runtime.
#[cfg(feature = "redis")]
fn open_redis(
    dir: &Path,
    _: FileWrites,
    _: Duration,
) -> mars_state::Result<Arc<dyn StorageBackend>> {
    let url = std::env::var("MARS_STATE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = server_store_name(dir);
    Ok(Arc::new(Connected::new(move || {
        let (url, prefix) = (url.clone(), prefix.clone());
        async move {
            let b = mars_state::RedisStorageBackend::options()
                .prefix(prefix)
                .best_effort()
                .connect(&url)
                .await?;
            Ok(Arc::new(b) as Arc<dyn StorageBackend>)
        }
    })))
}

/// A PostgreSQL store in a schema named from `dir`, on the server at
/// `MARS_STATE_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`; CI
/// gives each run a database of its own and drops it). Connected at the first call.
#[cfg(feature = "postgres")]
fn open_postgres(
    dir: &Path,
    _: FileWrites,
    _: Duration,
) -> mars_state::Result<Arc<dyn StorageBackend>> {
    let url = std::env::var("MARS_STATE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let schema = server_store_name(dir);
    Ok(Arc::new(Connected::new(move || {
        let (url, schema) = (url.clone(), schema.clone());
        async move {
            let b =
                mars_state::PostgresStorageBackend::options().schema(schema).connect(&url).await?;
            Ok(Arc::new(b) as Arc<dyn StorageBackend>)
        }
    })))
}

#[cfg(any(feature = "redis", feature = "postgres"))]
type Connect = Box<
    dyn Fn() -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = mars_state::Result<Arc<dyn StorageBackend>>>
                    + Send,
            >,
        > + Send
        + Sync,
>;

#[cfg(any(feature = "redis", feature = "postgres"))]
/// A server backend connected at its first call (the suites open stores from synchronous
/// helpers; a connection must be made on the test's runtime, where its tasks then live).
/// A failed connect fails that call and is tried again at the next.
struct Connected {
    connect: Connect,
    backend: tokio::sync::OnceCell<Arc<dyn StorageBackend>>,
}

#[cfg(any(feature = "redis", feature = "postgres"))]
impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected").field("backend", &self.backend.get()).finish()
    }
}

#[cfg(any(feature = "redis", feature = "postgres"))]
impl Connected {
    fn new<F, Fut>(connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = mars_state::Result<Arc<dyn StorageBackend>>>
            + Send
            + 'static,
    {
        let connect: Connect = Box::new(move || Box::pin(connect()));
        Connected { connect, backend: Default::default() }
    }

    async fn get(&self) -> mars_state::Result<&Arc<dyn StorageBackend>> {
        // `get_or_try_init` keeps the cell empty after an error, so the next call connects
        // again.
        self.backend.get_or_try_init(|| (self.connect)()).await
    }
}

#[cfg(any(feature = "redis", feature = "postgres"))]
#[async_trait::async_trait]
impl StorageBackend for Connected {
    async fn get(&self, key: &StorageKey) -> mars_state::Result<Option<Vec<u8>>> {
        self.get().await?.get(key).await
    }
    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> mars_state::Result<()> {
        self.get().await?.put(key, value).await
    }
    async fn put_record(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        meta: &mars_state::RecordMeta,
    ) -> mars_state::Result<()> {
        self.get().await?.put_record(key, value, meta).await
    }
    async fn delete(&self, key: &StorageKey) -> mars_state::Result<bool> {
        self.get().await?.delete(key).await
    }
    async fn list(&self, prefix: &StorageKey) -> mars_state::Result<Vec<ObjectMeta>> {
        self.get().await?.list(prefix).await
    }
    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> mars_state::Result<()> {
        self.get().await?.append(key, bytes).await
    }
    async fn sweep(&self) -> mars_state::Result<SweepReport> {
        self.get().await?.sweep().await
    }
    /// Server backends are shared (the answer needs no connection).
    fn shared(&self) -> bool {
        true
    }
    async fn acquire_lease(
        &self,
        name: &str,
        node: &str,
        ttl: Duration,
    ) -> mars_state::Result<Acquired> {
        self.get().await?.acquire_lease(name, node, ttl).await
    }
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> mars_state::Result<Option<Lease>> {
        self.get().await?.renew_lease(lease, ttl).await
    }
    async fn renew_leases(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> mars_state::Result<Vec<Option<Lease>>> {
        self.get().await?.renew_leases(leases, ttl).await
    }
    async fn read_lease(&self, name: &str) -> mars_state::Result<Option<LeaseState>> {
        self.get().await?.read_lease(name).await
    }
    async fn release_lease(&self, lease: &Lease) -> mars_state::Result<()> {
        self.get().await?.release_lease(lease).await
    }
    async fn put_fenced(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        meta: &mars_state::RecordMeta,
        fence: &Fence,
    ) -> mars_state::Result<()> {
        self.get().await?.put_fenced(key, value, meta, fence).await
    }
    async fn delete_fenced(&self, key: &StorageKey, fence: &Fence) -> mars_state::Result<bool> {
        self.get().await?.delete_fenced(key, fence).await
    }
    async fn publish_events(&self, payloads: Vec<Vec<u8>>) -> mars_state::Result<()> {
        self.get().await?.publish_events(payloads).await
    }
    async fn subscribe_events(&self) -> mars_state::Result<mars_state::EventFeed> {
        self.get().await?.subscribe_events().await
    }
}

/// The store named by `dir` on the chosen backend, opened as [`super::builder`] opens it;
/// waits up to [`LOCK_WAIT`] (not on the file backend) for a store still being released.
/// Panics if it cannot open.
pub fn backend(dir: &Path) -> Arc<dyn StorageBackend> {
    open_backend(dir, FileWrites::Suite, lock_wait())
        .unwrap_or_else(|e| panic!("open the {} backend at {}: {e}", backend_name(), dir.display()))
}

/// [`backend`], but a file backend is opened with `FileStorageBackend::new`'s defaults
/// (the write-ahead log on).
pub fn backend_defaults(dir: &Path) -> Arc<dyn StorageBackend> {
    open_backend(dir, FileWrites::Defaults, lock_wait())
        .unwrap_or_else(|e| panic!("open the {} backend at {}: {e}", backend_name(), dir.display()))
}

/// For a test that is about the file backend itself (it reads, damages or plants files in
/// the store's directory): true on the file backend; on any other, writes one
/// `NOT RUN <test>: <why> (file backend only)` line, and the caller returns without checking
/// anything.
pub fn file_backend_only(test: &str, why: &str) -> bool {
    if on_file_backend() {
        return true;
    }
    super::not_run_line(test, &format!("{why} (file backend only)"));
    false
}

/// For a test of the store lock (a second opener gets `Locked`): true on the backends that
/// hold their store with an OS lock (file, SQLite); on a server backend, which several
/// processes may open at once, writes one `NOT RUN` line and returns false.
pub fn locking_backend_only(test: &str) -> bool {
    if matches!(backend_name(), "file" | "sqlite") {
        return true;
    }
    super::not_run_line(test, "a server store may be opened by several processes (no store lock)");
    false
}

/// [`backend`], for a test under paused tokio time (`start_paused = true`): on a backend
/// that waits for a thread of its own (SQLite's writer thread) or a server without holding
/// the clock (Redis), each call runs on tokio's blocking pool, which keeps the paused clock
/// from jumping ahead while the call is in flight. Without that, tokio sees an idle runtime
/// while the writer commits, advances the clock to the next timer, and the manager's call
/// timeout fires (`Timeout` after "30 s"). The file backend's I/O runs on the blocking pool
/// already, and the PostgreSQL backend holds the clock itself while it waits on the server
/// (its `real_time` module): both are returned as they are, so the suites test them as an
/// application's paused-clock tests would use them.
pub fn backend_for_paused_time(dir: &Path) -> Arc<dyn StorageBackend> {
    let b = backend(dir);
    if matches!(backend_name(), "file" | "postgres") { b } else { Arc::new(OnBlockingPool(b)) }
}

/// Runs every call of the backend inside `spawn_blocking` (see [`backend_for_paused_time`]).
#[derive(Debug)]
struct OnBlockingPool(Arc<dyn StorageBackend>);

impl OnBlockingPool {
    async fn run<T, F>(&self, call: impl FnOnce(Arc<dyn StorageBackend>) -> F) -> T
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let fut = call(self.0.clone());
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || rt.block_on(fut)).await.expect("backend call panicked")
    }
}

#[async_trait::async_trait]
impl StorageBackend for OnBlockingPool {
    async fn get(&self, key: &StorageKey) -> mars_state::Result<Option<Vec<u8>>> {
        let key = key.clone();
        self.run(|b| async move { b.get(&key).await }).await
    }
    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> mars_state::Result<()> {
        let key = key.clone();
        self.run(|b| async move { b.put(&key, value).await }).await
    }
    async fn put_record(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        meta: &mars_state::RecordMeta,
    ) -> mars_state::Result<()> {
        let (key, meta) = (key.clone(), meta.clone());
        self.run(|b| async move { b.put_record(&key, value, &meta).await }).await
    }
    async fn delete(&self, key: &StorageKey) -> mars_state::Result<bool> {
        let key = key.clone();
        self.run(|b| async move { b.delete(&key).await }).await
    }
    async fn list(&self, prefix: &StorageKey) -> mars_state::Result<Vec<ObjectMeta>> {
        let prefix = prefix.clone();
        self.run(|b| async move { b.list(&prefix).await }).await
    }
    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> mars_state::Result<()> {
        let key = key.clone();
        self.run(|b| async move { b.append(&key, bytes).await }).await
    }
    async fn sweep(&self) -> mars_state::Result<SweepReport> {
        self.run(|b| async move { b.sweep().await }).await
    }
    fn shared(&self) -> bool {
        self.0.shared()
    }
    async fn acquire_lease(
        &self,
        name: &str,
        node: &str,
        ttl: Duration,
    ) -> mars_state::Result<Acquired> {
        let (name, node) = (name.to_owned(), node.to_owned());
        self.run(|b| async move { b.acquire_lease(&name, &node, ttl).await }).await
    }
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> mars_state::Result<Option<Lease>> {
        let lease = lease.clone();
        self.run(|b| async move { b.renew_lease(&lease, ttl).await }).await
    }
    async fn renew_leases(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> mars_state::Result<Vec<Option<Lease>>> {
        let leases = leases.to_vec();
        self.run(|b| async move { b.renew_leases(&leases, ttl).await }).await
    }
    async fn read_lease(&self, name: &str) -> mars_state::Result<Option<LeaseState>> {
        let name = name.to_owned();
        self.run(|b| async move { b.read_lease(&name).await }).await
    }
    async fn release_lease(&self, lease: &Lease) -> mars_state::Result<()> {
        let lease = lease.clone();
        self.run(|b| async move { b.release_lease(&lease).await }).await
    }
    async fn put_fenced(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        meta: &mars_state::RecordMeta,
        fence: &Fence,
    ) -> mars_state::Result<()> {
        let (key, meta, fence) = (key.clone(), meta.clone(), fence.clone());
        self.run(|b| async move { b.put_fenced(&key, value, &meta, &fence).await }).await
    }
    async fn delete_fenced(&self, key: &StorageKey, fence: &Fence) -> mars_state::Result<bool> {
        let (key, fence) = (key.clone(), fence.clone());
        self.run(|b| async move { b.delete_fenced(&key, &fence).await }).await
    }
    async fn publish_events(&self, payloads: Vec<Vec<u8>>) -> mars_state::Result<()> {
        self.run(|b| async move { b.publish_events(payloads).await }).await
    }
    async fn subscribe_events(&self) -> mars_state::Result<mars_state::EventFeed> {
        self.run(|b| async move { b.subscribe_events().await }).await
    }
}

/// What the SQL backends keep of appended logs, beyond the conformance suite: appends of
/// every byte value concatenate in order and are listed with their byte count; a delete
/// removes the appended pieces with the value (a new log starts empty); a put replaces
/// every piece; an append to a key of another class concatenates in place.
pub async fn appends_keep_every_byte(b: &dyn StorageBackend) {
    use super::bounded;
    let key = StorageKey::new("metadata/bytes.log").unwrap();
    let every: Vec<u8> = (0..=255u8).collect();
    bounded("append", b.append(&key, every.clone())).await.unwrap();
    bounded("append", b.append(&key, vec![0, 0xff, 0xfe, 0])).await.unwrap();
    let mut want = every;
    want.extend([0, 0xff, 0xfe, 0]);
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(want));
    let listed = bounded("list", b.list(&StorageKey::new("metadata").unwrap())).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, 260, "the size of an appended value is not its byte count");
    assert!(bounded("delete", b.delete(&key)).await.unwrap());
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), None);
    bounded("append", b.append(&key, b"new".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(b"new".to_vec()));
    for i in 0..100u8 {
        bounded("append", b.append(&key, vec![i])).await.unwrap();
    }
    let got = bounded("get", b.get(&key)).await.unwrap().unwrap();
    assert_eq!(got.len(), 103);
    assert_eq!(&got[3..], (0..100u8).collect::<Vec<_>>().as_slice(), "appends out of order");
    bounded("put", b.put(&key, b"compacted".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(b"compacted".to_vec()));
    let listed = bounded("list", b.list(&StorageKey::new("metadata").unwrap())).await.unwrap();
    assert_eq!(listed[0].size, 9);
    let rec = StorageKey::new("sessions/x.json").unwrap();
    bounded("append", b.append(&rec, b"ab".to_vec())).await.unwrap();
    bounded("append", b.append(&rec, b"cd".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&rec)).await.unwrap(), Some(b"abcd".to_vec()));
}
