//! The storage contract ([`StorageBackend`]) and the backends that implement it.
//!
//! Backends store opaque bytes under [`StorageKey`]s. Serialization, compression and
//! integrity checks happen above them (in the codec), so every backend gets them. A backend
//! that treats keys differently (a log for the bulk records, say) asks the key for its
//! [`KeyClass`] rather than matching names; the names belong to the store.
//!
//! Owns the trait, the lease and fence types of shared backends (`lease.rs`),
//! [`StorageKey`] (validation: a hostile key never reaches a file system),
//! the backends (`memory`, `file/`, with the `sqlite` feature `sqlite/`, with `postgres`
//! `postgres/`, with `redis` `redis/`) and [`open`], which names any of them with a URL.
//! Backends call nothing above them: not the store, the codec, the actors nor the handle; only the
//! key's class (`store::keys`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Result, StateError};

mod feed;
mod file;
mod lease;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod read_only;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
mod sqlite;
mod url;

/// The file backend's file-system seam, for the power-loss simulator
/// (`crate::testing::simfs`, test builds only), which implements it.
#[cfg(test)]
pub(crate) use file::fs::{DirEntry, Fs, FsFile};

#[cfg(feature = "redis")]
pub use self::redis::{RedisOptions, RedisStorageBackend};
pub use feed::{EventFeed, MAX_EVENT_PAYLOAD};
pub use file::{FileOptions, FileStorageBackend};
pub(crate) use lease::ttl_ms;
pub use lease::{Acquired, Fence, Lease, LeaseState};
pub use memory::MemoryStorageBackend;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStorageBackend};
pub use read_only::ReadOnly;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteOptions, SqliteStorageBackend};
pub use url::{open, open_read_only};

/// A validated relative key such as `sessions/s1.json`: `/`-separated segments, each
/// non-empty, without NUL or `\`, not `.` or `..`, and not starting with `.` (names starting
/// with a dot are reserved for a backend's staged files). Its [`class`](Self::class) says
/// what kind of value it holds.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorageKey(String);

impl StorageKey {
    /// Validates `path` as a key.
    ///
    /// ```
    /// use mars_state::StorageKey;
    /// assert!(StorageKey::new("sessions/s1.json").is_ok());
    /// assert!(StorageKey::new("sessions/../../etc/passwd").is_err());
    /// ```
    pub fn new(path: impl Into<String>) -> Result<Self> {
        let path = path.into();
        let ok = !path.is_empty()
            && path.len() <= 1024
            && path.split('/').all(|seg| {
                !seg.is_empty()
                    && !seg.starts_with('.')
                    && seg.len() <= 255
                    && !seg.chars().any(|c| c == '\\' || c.is_control())
            });
        if !ok {
            return Err(StateError::InvalidId {
                what: "storage key",
                id: path.chars().take(80).flat_map(char::escape_debug).collect(),
                reason: "segments must be non-empty, not start with '.', and hold no '\\' or control characters",
            });
        }
        Ok(StorageKey(path))
    }

    /// Builds a key from segments the crate has already validated.
    pub(crate) fn from_valid(path: String) -> Self {
        StorageKey(path)
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key's segments.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The last segment.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The class of this key: what a backend or wrapper must do with it (see
    /// [`KeyClass`]). Decided from the key's name by the store's layout, so backends never
    /// match names themselves.
    ///
    /// ```
    /// use mars_state::{KeyClass, StorageKey};
    /// assert_eq!(StorageKey::new("sessions/s1.json")?.class(), KeyClass::Record);
    /// assert_eq!(StorageKey::new("metadata/store.json")?.class(), KeyClass::Plaintext);
    /// assert_eq!(StorageKey::new("metadata/index.log")?.class(), KeyClass::Log);
    /// # Ok::<(), mars_state::StateError>(())
    /// ```
    pub fn class(&self) -> KeyClass {
        crate::store::keys::class_of(&self.0)
    }

    /// Whether this key lies under `prefix` (`prefix/...`).
    pub fn starts_with(&self, prefix: &StorageKey) -> bool {
        self.0.len() > prefix.0.len()
            && self.0.starts_with(&prefix.0)
            && self.0.as_bytes()[prefix.0.len()] == b'/'
    }
}

impl fmt::Display for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// What kind of value a [`StorageKey`] holds, from [`StorageKey::class`]: the contract a
/// backend or wrapper reads to treat keys differently without knowing the store's names.
///
/// A backend may ignore the class entirely (store every key alike, as the memory backend
/// does); the classes say where it *may* differ, and what it must keep in any case.
///
/// | class | written | a write-ahead log (file backend) | encryption (`Encrypted`) |
/// |---|---|---|---|
/// | [`Record`](Self::Record) | every step; bulk | goes through it | sealed; listed size is the plaintext's |
/// | [`Plaintext`](Self::Plaintext) | rarely; small | written directly | passed through as it is |
/// | [`Log`](Self::Log) | by `append`; also replaced by `put` | written directly | sealed frame by frame |
/// | [`Metadata`](Self::Metadata) | rarely; small | written directly | sealed like a record |
///
/// New classes may be added; a backend that matches on the class should treat an unknown
/// one like [`Metadata`](Self::Metadata) (durable, written directly, sealed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyClass {
    /// A session state or a checkpoint: the bulk data, written on every step. A backend
    /// may batch or log these writes (the file backend's write-ahead log carries only this
    /// class), as long as `put` keeps its contract. Encryption seals them, and `list`
    /// through it reports the plaintext size.
    Record,
    /// Store metadata that must stay readable without the encryption key: the format and
    /// encryption descriptors (`metadata/store.json`, `metadata/crypto.json`), the file
    /// backend's lock, and the empty pending-delete and copy-in-progress markers. Read first at open, so a
    /// backend writes them directly (never only into a log), and encryption stores them
    /// as they are.
    Plaintext,
    /// An append-only log (the index journal, `metadata/*.log`): grown by `append`,
    /// compacted by `put`. A backend writes it directly, so every name that is appended to
    /// is also replaced in one place. Encryption seals each append as its own frame; `list`
    /// reports the stored size.
    Log,
    /// Other store metadata: access records, the running marker, quarantine copies, and any
    /// key of no other class. Written rarely and directly; encryption seals it like a
    /// record.
    Metadata,
}

/// A key and the size of its value, as returned by [`StorageBackend::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key.
    pub key: StorageKey,
    /// Size of the stored value in bytes.
    pub size: u64,
}

/// What the store knows about a record it writes with [`StorageBackend::put_record`]: the
/// facts a backend may keep in plain columns of its own beside the (possibly compressed,
/// possibly encrypted) bytes, so that an operator, or a query, can read them without the
/// codec. The PostgreSQL backend stores them (columns `session_id`, `checkpoint_id`,
/// `branch`, `parent`, `step`, `reason`, `status`, `saved_at`); other backends ignore them.
///
/// Through the encryption layer (`middleware::crypto::Encrypted`) the branch name, the one fact a
/// caller names freely, is left out; ids (already in the key), step, reason kind, status
/// and time are passed on. A session's status reason (a pause or failure message) is never
/// part of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RecordMeta {
    /// The session the record belongs to.
    pub session: String,
    /// The checkpoint's id, for a checkpoint record; `None` for a session's current state.
    pub checkpoint: Option<String>,
    /// The checkpoint's branch.
    pub branch: Option<String>,
    /// The checkpoint it was taken after on its branch.
    pub parent: Option<String>,
    /// The orchestrator's step of the state, if it gave one.
    pub step: Option<u64>,
    /// Why a checkpoint was taken (`manual`, `steps`, `time`, `pause`, `before_risky`,
    /// `flush`).
    pub reason: Option<String>,
    /// A session's status (`active`, `paused`, `completed`, `failed`, ...).
    pub status: Option<String>,
    /// When it was saved, in milliseconds since the Unix epoch.
    pub saved_at_ms: u64,
}

/// What [`StorageBackend::sweep`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Staged leftovers of interrupted writes that were removed.
    pub files_removed: usize,
    /// Bytes they held.
    pub bytes_freed: u64,
}

/// Where records are kept. Small on purpose: every method is a contract that the
/// conformance tests check for every backend.
///
/// Implementations must be usable as `Arc<dyn StorageBackend>` from many tasks at once;
/// callers never issue two writes to the same key concurrently (the session actor
/// serializes them), but do issue writes to different keys concurrently.
///
/// # Testing an implementation
///
/// With the cargo feature `testing` (on by default), `mars_state::testing::conformance`
/// holds this contract as one `pub async fn` per clause, and `mars_state::conformance_tests!`
/// turns them into one `#[tokio::test]` per clause for each backend you name (this crate
/// runs it over its own backends and wrappers). `mars_state::testing::Faulty` wraps a
/// backend to fail, drop or hold the calls a test picks. In a file under `tests/`:
///
/// ```
/// # #[cfg(feature = "testing")]
/// # mod with_feature {
/// use mars_state::MemoryStorageBackend as MyBackend;
///
/// // A module `my_backend` with one test per clause, each on a fresh backend. Return
/// // `(backend, guard)` to keep something (a temporary directory) alive beside it.
/// mars_state::conformance_tests! {
///     my_backend => MyBackend::new(),
/// }
///
/// // Or every clause in one test, stopping at the first failure:
/// #[tokio::test]
/// async fn conformance() {
///     mars_state::testing::conformance::run_all(|| async { MyBackend::new() }).await;
/// }
/// # pub(crate) async fn run() {
/// #     mars_state::testing::conformance::run_all(|| async { MyBackend::new() }).await;
/// # }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// #     #[cfg(feature = "testing")]
/// #     with_feature::run().await;
/// # }
/// ```
#[async_trait]
pub trait StorageBackend: Send + Sync + fmt::Debug + 'static {
    /// Reads the whole value at `key`. Absence is `Ok(None)`, never an error.
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>>;

    /// Replaces the value at `key` atomically and durably: readers see the old value or the
    /// new one, never a mix; after `Ok` the new value survives a crash and a power loss;
    /// after `Err` the old value is intact.
    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()>;

    /// [`put`](Self::put) of a session or checkpoint record (class
    /// [`KeyClass::Record`]), with what the store knows about it. Same contract as `put`;
    /// a backend that keeps [`RecordMeta`] in columns of its own replaces them with the
    /// value, atomically. The default ignores `meta` and calls `put`. A wrapper must pass it
    /// on (calling its inner backend's `put_record`), or the facts are lost below it.
    async fn put_record(&self, key: &StorageKey, value: Vec<u8>, meta: &RecordMeta) -> Result<()> {
        let _ = meta;
        self.put(key, value).await
    }

    /// Removes `key` durably. Returns whether it existed; removing a missing key succeeds.
    async fn delete(&self, key: &StorageKey) -> Result<bool>;

    /// Lists every key under `prefix` (at any depth) with its size, without reading values,
    /// in no particular order. A missing prefix lists nothing.
    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>>;

    /// Appends `bytes` to the log at `key`, creating it if needed. Not durable by itself:
    /// after a crash the log may lack a tail or end in a torn write. Used only for data that
    /// can be rebuilt (the index journal).
    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()>;

    /// Removes leftovers of interrupted writes (staged files), except those of writes in
    /// progress. Backends without such leftovers return an empty report.
    async fn sweep(&self) -> Result<SweepReport>;

    /// Whether several processes (or several handles of one process) may open this store
    /// and write to it at once. A shared backend implements the lease methods and checks
    /// the fence of [`put_fenced`](Self::put_fenced) and
    /// [`delete_fenced`](Self::delete_fenced); one that is not (the default) is held by one
    /// writer already (the file and SQLite backends' OS lock), has no leases, and ignores
    /// fences.
    ///
    /// ```
    /// use mars_state::{MemoryStorageBackend, StorageBackend};
    /// assert!(MemoryStorageBackend::new().shared());
    /// ```
    fn shared(&self) -> bool {
        false
    }

    /// Takes lease `name` for `node` for `ttl` (cut to a year at most), judged by the
    /// store server's clock: [`Acquired::Granted`] if no node holds it, if its holder's
    /// lease expired or was released, or if `node` holds it already (then its expiry is
    /// extended and its token kept); else [`Acquired::Held`] with the holder and the time
    /// it has left. The token grows by one whenever the lease goes to a node that did not
    /// hold it live (the first grant gives 1), is stored where it never expires, and never
    /// decreases, also after an expiry or a release. A grant to another node over a lease
    /// whose holder let it expire without releasing it names that holder in
    /// [`Lease::taken_from`] (`None` for every other grant). A grant is durable like a put.
    /// The default, for a backend that is not [`shared`](Self::shared), is a
    /// [`StateError::Config`] error.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mars_state::Result<()> {
    /// use std::time::Duration;
    /// use mars_state::{Acquired, MemoryStorageBackend, StorageBackend};
    /// let b = MemoryStorageBackend::new();
    /// let ttl = Duration::from_secs(10);
    /// let Acquired::Granted(a) = b.acquire_lease("s1", "node-a", ttl).await? else { panic!() };
    /// b.release_lease(&a).await?;
    /// let Acquired::Granted(bee) = b.acquire_lease("s1", "node-b", ttl).await? else { panic!() };
    /// assert_eq!(bee.token, a.token + 1);
    /// # Ok(()) }
    /// ```
    async fn acquire_lease(&self, name: &str, node: &str, ttl: Duration) -> Result<Acquired> {
        let _ = (name, node, ttl);
        Err(not_shared("acquire_lease"))
    }

    /// Extends `lease` to `ttl` from now (by the server's clock) if its token is still the
    /// lease's current one and its node the holder: `Some` with the new expiry, also when
    /// it had expired and nobody took it since. `None` when it is no longer the caller's
    /// (another node was granted it: the token changed); writes under its fence are then
    /// refused. The default, for a backend that is not [`shared`](Self::shared), is a
    /// [`StateError::Config`] error.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mars_state::Result<()> {
    /// use std::time::Duration;
    /// use mars_state::{Acquired, MemoryStorageBackend, StorageBackend};
    /// let b = MemoryStorageBackend::new();
    /// let ttl = Duration::from_secs(10);
    /// let Acquired::Granted(a) = b.acquire_lease("s1", "node-a", ttl).await? else { panic!() };
    /// let renewed = b.renew_lease(&a, Duration::from_secs(30)).await?.expect("still ours");
    /// assert_eq!(renewed.token, a.token);
    /// # Ok(()) }
    /// ```
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>> {
        let _ = (lease, ttl);
        Err(not_shared("renew_lease"))
    }

    /// Renews several leases in one round (one statement or script where the backend can):
    /// the answers are in the order of `leases`, each as [`renew_lease`](Self::renew_lease)
    /// would give it. A node renews all the leases it holds with one call per round, not
    /// one timer per lease. The default calls `renew_lease` for each.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mars_state::Result<()> {
    /// use std::time::Duration;
    /// use mars_state::{Acquired, MemoryStorageBackend, StorageBackend};
    /// let b = MemoryStorageBackend::new();
    /// let ttl = Duration::from_secs(10);
    /// let Acquired::Granted(x) = b.acquire_lease("s1", "node-a", ttl).await? else { panic!() };
    /// let Acquired::Granted(y) = b.acquire_lease("s2", "node-a", ttl).await? else { panic!() };
    /// let renewed = b.renew_leases(&[x, y], ttl).await?;
    /// assert!(renewed.iter().all(Option::is_some));
    /// # Ok(()) }
    /// ```
    async fn renew_leases(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<Option<Lease>>> {
        let mut renewed = Vec::with_capacity(leases.len());
        for lease in leases {
            renewed.push(self.renew_lease(lease, ttl).await?);
        }
        Ok(renewed)
    }

    /// The lease `name` as it stands, without taking it: its holder (or last holder), token,
    /// time left while live, and whether it was released. `None` if it was never granted.
    /// The default, for a backend that is not [`shared`](Self::shared), is a
    /// [`StateError::Config`] error.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mars_state::Result<()> {
    /// use std::time::Duration;
    /// use mars_state::{Acquired, MemoryStorageBackend, StorageBackend};
    /// let b = MemoryStorageBackend::new();
    /// assert!(b.read_lease("s1").await?.is_none());
    /// let Acquired::Granted(a) = b.acquire_lease("s1", "node-a", Duration::from_secs(10)).await? else { panic!() };
    /// let state = b.read_lease("s1").await?.expect("granted");
    /// assert_eq!((state.node.as_str(), state.token), ("node-a", a.token));
    /// assert!(state.expires_in.is_some());
    /// b.release_lease(&a).await?;
    /// let state = b.read_lease("s1").await?.expect("still known");
    /// assert!(state.expires_in.is_none() && state.released);
    /// # Ok(()) }
    /// ```
    async fn read_lease(&self, name: &str) -> Result<Option<LeaseState>> {
        let _ = name;
        Err(not_shared("read_lease"))
    }

    /// Gives `lease` up: if it is still the caller's (same token and node), it expires now
    /// and any node may take it at once (with the next token); the token is kept, so the
    /// next grant is higher. The lease is marked released (see
    /// [`read_lease`](Self::read_lease)) until the next grant or renewal, so the next grant
    /// reports no takeover. Releasing a lease that is no longer the caller's does nothing
    /// and succeeds. The default, for a backend that is not [`shared`](Self::shared), is a
    /// [`StateError::Config`] error.
    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        let _ = lease;
        Err(not_shared("release_lease"))
    }

    /// [`put_record`](Self::put_record) under `fence`: applied only if lease
    /// `fence.name`'s current token is `fence.token`, checked atomically with the write (in
    /// the same statement, transaction or script, so a takeover cannot come between the
    /// check and the write). Otherwise [`StateError::Fenced`], and nothing of the write is
    /// stored. A fence's lease need not be live: a holder whose lease expired may still
    /// write until another node is granted it (the token, not the clock, decides).
    ///
    /// The default, for a backend that is not [`shared`](Self::shared), is `put_record`
    /// (the fence is ignored: the store has one writer); a backend that says it is shared
    /// but does not implement this fails with [`StateError::Config`] rather than write
    /// unfenced.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mars_state::Result<()> {
    /// use std::time::Duration;
    /// use mars_state::{Acquired, ErrorKind, MemoryStorageBackend, RecordMeta, StorageBackend, StorageKey};
    /// let b = MemoryStorageBackend::new();
    /// let ttl = Duration::from_secs(10);
    /// let key = StorageKey::new("sessions/s1.json")?;
    /// let meta = RecordMeta::default();
    /// let Acquired::Granted(a) = b.acquire_lease("s1", "node-a", ttl).await? else { panic!() };
    /// b.put_fenced(&key, b"by a".to_vec(), &meta, &a.fence()).await?;
    /// b.release_lease(&a).await?;
    /// let Acquired::Granted(_) = b.acquire_lease("s1", "node-b", ttl).await? else { panic!() };
    /// let stale = b.put_fenced(&key, b"late".to_vec(), &meta, &a.fence()).await;
    /// assert_eq!(stale.unwrap_err().kind(), ErrorKind::Fenced);
    /// assert_eq!(b.get(&key).await?.as_deref(), Some(&b"by a"[..]));
    /// # Ok(()) }
    /// ```
    async fn put_fenced(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        meta: &RecordMeta,
        fence: &Fence,
    ) -> Result<()> {
        if self.shared() {
            return Err(unfenced("put_fenced", fence));
        }
        self.put_record(key, value, meta).await
    }

    /// [`delete`](Self::delete) under `fence`, as [`put_fenced`](Self::put_fenced): applied
    /// only if lease `fence.name`'s current token is `fence.token`, atomically; otherwise
    /// [`StateError::Fenced`] and the key is left as it was. Returns whether the key
    /// existed. The default, for a backend that is not [`shared`](Self::shared), is
    /// `delete`.
    async fn delete_fenced(&self, key: &StorageKey, fence: &Fence) -> Result<bool> {
        if self.shared() {
            return Err(unfenced("delete_fenced", fence));
        }
        self.delete(key).await
    }

    /// Publishes change-event `payloads` (each at most [`MAX_EVENT_PAYLOAD`] bytes, any
    /// bytes), in their order, to every live [`subscribe_events`](Self::subscribe_events)
    /// feed of this store, this handle's and other processes' alike, in one round where the
    /// backend can. Delivery is at most once and not durable: a subscriber that is not
    /// connected when they are published never gets them. Payloads published by one handle
    /// reach each subscriber in the order they were published. The default, for a backend
    /// that is not [`shared`](Self::shared) (one process holds the store, and its events
    /// stay in it), is a [`StateError::Config`] error.
    ///
    /// A [`StateManager`](crate::StateManager) on a shared store publishes every change
    /// event it emits (session id, node id, sequence numbers, kind; never a state) and feeds
    /// those of other nodes to its watchers.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mars_state::Result<()> {
    /// use mars_state::{FileStorageBackend, MemoryStorageBackend, StorageBackend};
    /// let memory = MemoryStorageBackend::new();
    /// let mut feed = memory.subscribe_events().await?;
    /// memory.publish_events(vec![b"saved s1".to_vec()]).await?;
    /// assert_eq!(feed.recv().await.as_deref(), Some(&b"saved s1"[..]));
    /// # let dir = tempfile::tempdir().unwrap();
    /// let file = FileStorageBackend::new(dir.path())?;
    /// assert!(file.publish_events(vec![b"saved s1".to_vec()]).await.is_err());
    /// # Ok(()) }
    /// ```
    async fn publish_events(&self, payloads: Vec<Vec<u8>>) -> Result<()> {
        let _ = payloads;
        Err(no_events("publish_events"))
    }

    /// A feed of the payloads [`publish_events`](Self::publish_events) sends to this store
    /// from now on, by any handle. The feed ends when its connection is lost; call again
    /// to go on (what was published in between is lost to this subscriber). The default,
    /// for a backend that is not [`shared`](Self::shared), is a [`StateError::Config`]
    /// error.
    async fn subscribe_events(&self) -> Result<EventFeed> {
        Err(no_events("subscribe_events"))
    }
}

/// The error of an event method on a backend that does not carry events between handles.
fn no_events(method: &str) -> StateError {
    StateError::Config {
        message: format!(
            "{method}: this backend does not carry change events between handles (it is not \
             shared, or does not implement them); events stay in the process that made them"
        ),
    }
}

/// The error of a lease method on a backend that is not shared.
fn not_shared(method: &str) -> StateError {
    StateError::Config {
        message: format!(
            "{method}: this backend is not shared (one process holds the store, under its \
             lock), so it has no leases; that lock already makes its holder the one writer"
        ),
    }
}

/// The error of a fenced write on a backend that says it is shared but does not check
/// fences: refused rather than written unfenced.
fn unfenced(method: &str, fence: &Fence) -> StateError {
    StateError::Config {
        message: format!(
            "{method} (lease {}): this backend says it is shared but does not implement \
             fenced writes",
            fence.name
        ),
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<T: StorageBackend + ?Sized> StorageBackend for Arc<T> {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        (**self).get(key).await
    }
    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        (**self).put(key, value).await
    }
    async fn put_record(&self, key: &StorageKey, value: Vec<u8>, meta: &RecordMeta) -> Result<()> {
        (**self).put_record(key, value, meta).await
    }
    async fn delete(&self, key: &StorageKey) -> Result<bool> {
        (**self).delete(key).await
    }
    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        (**self).list(prefix).await
    }
    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        (**self).append(key, bytes).await
    }
    async fn sweep(&self) -> Result<SweepReport> {
        (**self).sweep().await
    }
    fn shared(&self) -> bool {
        (**self).shared()
    }
    async fn acquire_lease(&self, name: &str, node: &str, ttl: Duration) -> Result<Acquired> {
        (**self).acquire_lease(name, node, ttl).await
    }
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>> {
        (**self).renew_lease(lease, ttl).await
    }
    async fn renew_leases(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<Option<Lease>>> {
        (**self).renew_leases(leases, ttl).await
    }
    async fn read_lease(&self, name: &str) -> Result<Option<LeaseState>> {
        (**self).read_lease(name).await
    }
    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        (**self).release_lease(lease).await
    }
    async fn put_fenced(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        meta: &RecordMeta,
        fence: &Fence,
    ) -> Result<()> {
        (**self).put_fenced(key, value, meta, fence).await
    }
    async fn delete_fenced(&self, key: &StorageKey, fence: &Fence) -> Result<bool> {
        (**self).delete_fenced(key, fence).await
    }
    async fn publish_events(&self, payloads: Vec<Vec<u8>>) -> Result<()> {
        (**self).publish_events(payloads).await
    }
    async fn subscribe_events(&self) -> Result<EventFeed> {
        (**self).subscribe_events().await
    }
}
