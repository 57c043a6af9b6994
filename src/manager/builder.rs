//! [`StateManagerBuilder`]: the settings of a manager, and `start`, which opens the store
//! (finding or adding the encryption layer) and spawns the supervisor.
//! Owns the builder and the checks of its settings. Calls the codec (record format), the
//! crypto middleware (layer and key ring), the store (`Store::open`, its metadata) and the
//! supervisor; once started, hands everything to the [`StateManager`] handle.

use std::sync::Arc;
#[cfg(feature = "encryption")]
use std::sync::Weak;
use std::time::Duration;

use ractor::Actor;
use serde_json::Value;

use super::{Inner, StateManager};
use crate::access::AccessControlLayer;
use crate::actor::supervisor::{SupervisorActor, SupervisorArgs};
use crate::actor::{Config, Runtime};
use crate::backend::StorageBackend;
use crate::config::{CheckpointPolicy, Migrations, RetentionPolicy};
use crate::error::{BoxError, Result, StateError};
#[cfg(feature = "encryption")]
use crate::middleware::crypto::{
    Encrypted, EncryptionKey, EncryptionLayer, FoundLayer, KeyRing, KeySource, Passphrase,
};
#[cfg(feature = "encryption")]
use crate::store;
use crate::store::Store;
use crate::store::codec::{Codec, Compression};

/// Configures and starts a [`StateManager`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
/// use std::time::Duration;
/// use mars_state::{MemoryStorageBackend, RetentionPolicy, StateManager};
///
/// let manager = StateManager::builder(MemoryStorageBackend::new())
///     .compression(6)
///     .idle_timeout(Duration::from_secs(30))
///     .retention(RetentionPolicy { keep_checkpoints: Some(10), ..Default::default() })
///     .start()
///     .await?;
/// manager.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until .start() is awaited"]
pub struct StateManagerBuilder {
    backend: Arc<dyn StorageBackend>,
    compression: Option<u32>,
    config: Config,
    access: Option<AccessControlLayer>,
    #[cfg(feature = "encryption")]
    encryption: Option<(KeySource, Vec<KeySource>)>,
    /// The encryption layer of a backend given already encrypted (an
    /// `EncryptedFileStorageBackend`), and the backend below it.
    #[cfg(feature = "encryption")]
    layer: Option<FoundLayer>,
    /// [`read_only`](Self::read_only).
    read_only: bool,
}

#[cfg(feature = "encryption")]
type EncryptedBackend = Encrypted<Arc<dyn StorageBackend>>;

impl StateManagerBuilder {
    /// A builder over `backend` with the default settings (see
    /// [`StateManager::builder`]).
    pub(super) fn new(backend: impl StorageBackend) -> Self {
        let backend = Arc::new(backend);
        // An encrypted backend (an `EncryptedFileStorageBackend`) is recognised here, while
        // its type is known, so the store is opened as encrypted.
        #[cfg(feature = "encryption")]
        let layer = crate::middleware::crypto::find_layer(
            &(backend.clone() as Arc<dyn std::any::Any + Send + Sync>),
        );
        StateManagerBuilder {
            backend,
            #[cfg(feature = "encryption")]
            layer,
            compression: None,
            read_only: false,
            access: None,
            #[cfg(feature = "encryption")]
            encryption: None,
            config: Config {
                idle_timeout: Duration::from_secs(60),
                call_timeout: Duration::from_secs(30),
                max_state_bytes: 64 * 1024 * 1024,
                janitor_interval: Some(Duration::from_secs(600)),
                retention: RetentionPolicy::default(),
                migrations: Migrations { current: 1, steps: Default::default() },
                checkpoint_policy: CheckpointPolicy::default(),
                node_id: default_node_id(),
                lease_ttl: Duration::from_secs(10),
                lease_wait: None,
            },
        }
    }

    /// This process's name among the nodes sharing a store (default: the host name, the
    /// process id and a random suffix, so that a restarted process is a new node). On a
    /// shared backend (PostgreSQL, Redis, clones of a `MemoryStorageBackend`), the session
    /// actor of a session holds a lease on it in this name while it writes; other nodes
    /// see it as the session's owner (`SessionInfo::owner`,
    /// [`StateError::OwnedElsewhere`]). Give each process its own: two processes with one
    /// node id are one node to the leases, and their writes are not fenced from each other.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// use mars_state::{MemoryStorageBackend, StateManager};
    /// let manager = StateManager::builder(MemoryStorageBackend::new())
    ///     .node_id("worker-1")
    ///     .start()
    ///     .await?;
    /// assert_eq!(manager.node_id(), "worker-1");
    /// # Ok(()) }
    /// ```
    pub fn node_id(mut self, node: impl Into<String>) -> Self {
        self.config.node_id = node.into();
        self
    }

    /// How long a session lease lasts unless renewed (default 10 s; at least 100 ms). The
    /// node renews all its leases in one round every third of it. A node that dies holds
    /// its sessions this long: other nodes take them over once it has run out.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.lease_ttl = ttl;
        self
    }

    /// How long a write to a session another node holds waits for its lease (default: the
    /// lease TTL and one second, so a write to a session whose node died goes through in
    /// one call). Then the write fails with [`StateError::OwnedElsewhere`]. Keep it under
    /// the [`call_timeout`](Self::call_timeout).
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.config.lease_wait = Some(wait);
        self
    }

    /// Stores records gzipped at `level` (1 = fastest … 9 = smallest).
    ///
    /// This decides the format of a new store. A store keeps the format it was created
    /// with, so all its records have one format and one file-name ending (`.json`, or
    /// `.json.gz` that `zcat | jq` reads), and it opens whatever this is set to: a gzip
    /// store opened without `compression` gzips new records at level 6, one opened at
    /// another level uses that level, and a plain store opened with `compression` stays
    /// plain JSON (both logged at `info`). Every record reads back either way.
    pub fn compression(mut self, level: u32) -> Self {
        self.compression = Some(level);
        self
    }

    /// How long a session actor may sit idle before it is passivated (default 60 s). Its
    /// cached state is dropped; the next request respawns it and reads from storage.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.idle_timeout = timeout;
        self
    }

    /// How long a call waits for its session actor's reply (default 30 s). A call that
    /// times out returns [`StateError::Timeout`]: its outcome is unknown.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.config.call_timeout = timeout;
        self
    }

    /// Largest serialized state accepted, in bytes (default 64 MiB). Larger states are
    /// rejected with [`StateError::TooLarge`] before anything is written.
    pub fn max_state_bytes(mut self, limit: usize) -> Self {
        self.config.max_state_bytes = limit;
        self
    }

    /// How often the janitor runs (default every 10 minutes).
    pub fn janitor_interval(mut self, every: Duration) -> Self {
        self.config.janitor_interval = Some(every);
        self
    }

    /// Access control settings (administrators) for handles from
    /// [`StateManager::for_principal`]. Access control is always on for such handles; this
    /// only names administrators.
    pub fn access_control(mut self, layer: AccessControlLayer) -> Self {
        self.access = Some(layer);
        self
    }

    /// Encrypts every record, the index and access records at rest with `key`
    /// (XChaCha20-Poly1305; see [`middleware::crypto`](crate::middleware::crypto) for what
    /// stays visible). A wrong key is [`StateError::WrongKey`] at start. A store keeps the
    /// encryption setting it was created with.
    ///
    /// Giving the builder an [`EncryptedFileStorageBackend`](crate::EncryptedFileStorageBackend)
    /// instead is the same: the manager finds its encryption layer and uses it (key
    /// rotation included), and a store made one way opens the other way. Such a backend is
    /// encrypted already, so adding a key here as well is a [`StateError::Config`] error at
    /// [`start`](Self::start) rather than a store encrypted twice.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// use mars_state::{EncryptionKey, MemoryStorageBackend, StateManager};
    /// let manager = StateManager::builder(MemoryStorageBackend::new())
    ///     .encryption_key(EncryptionKey::from_bytes([7; 32]))
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "encryption")]
    pub fn encryption_key(mut self, key: EncryptionKey) -> Self {
        self.encryption = Some((key.into(), Vec::new()));
        self
    }

    /// Like [`encryption_key`](Self::encryption_key), with a key stretched from
    /// `passphrase` by Argon2id (salt and costs are kept in the store's metadata).
    #[cfg(feature = "encryption")]
    pub fn encryption_passphrase(mut self, passphrase: impl Into<String>) -> Self {
        self.encryption = Some((Passphrase::new(passphrase).into(), Vec::new()));
        self
    }

    /// A key the store used before [`rotate_key`](StateManager::rotate_key): records still
    /// sealed under it stay readable. Needed only to finish a rotation that was cut off.
    #[cfg(feature = "encryption")]
    pub fn previous_encryption_key(mut self, key: impl Into<KeySource>) -> Self {
        if let Some((_, previous)) = &mut self.encryption {
            previous.push(key.into());
        }
        self
    }

    /// The checkpoint policy of every session unless
    /// [`set_checkpoint_policy`](StateManager::set_checkpoint_policy) says otherwise
    /// (default: on demand).
    pub fn checkpoint_policy(mut self, policy: CheckpointPolicy) -> Self {
        self.config.checkpoint_policy = policy;
        self
    }

    /// The application's schema version of its states (default 1). Every record stores
    /// the version it was written at; older ones are brought up to date on load through
    /// the [`migration`](Self::migration)s registered.
    pub fn schema_version(mut self, version: u32) -> Self {
        self.config.migrations.current = version;
        self
    }

    /// Registers the step that turns a state at version `from` into one at `from + 1`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// use mars_state::{MemoryStorageBackend, StateManager};
    /// let manager = StateManager::builder(MemoryStorageBackend::new())
    ///     .schema_version(2)
    ///     .migration(1, |mut v| {
    ///         // v2 renamed "msgs" to "messages".
    ///         if let Some(m) = v.as_object_mut().and_then(|o| o.remove("msgs")) {
    ///             v["messages"] = m;
    ///         }
    ///         Ok(v)
    ///     })
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn migration(
        mut self,
        from: u32,
        step: impl Fn(Value) -> std::result::Result<Value, BoxError> + Send + Sync + 'static,
    ) -> Self {
        self.config.migrations.steps.insert(from, Arc::new(step));
        self
    }

    /// The retention policy the janitor enforces (default: keep everything).
    pub fn retention(mut self, policy: RetentionPolicy) -> Self {
        self.config.retention = policy;
        self
    }

    /// Starts a manager that never writes to the store: for looking inside a store, also
    /// one another process holds and keeps writing (open it with
    /// [`backend::open_read_only`](crate::backend::open_read_only), or a file store with
    /// [`FileOptions::read_only`](crate::FileOptions::read_only)).
    ///
    /// What changes:
    /// - the backend is wrapped in [`backend::ReadOnly`](crate::backend::ReadOnly) (under
    ///   the encryption layer), so every write of the manager, whatever the backend,
    ///   fails with [`StateError::ReadOnly`] and stores nothing; a shared store is read as
    ///   one this manager reads alone (no leases, no change events sent), though the change
    ///   events the other nodes send reach its [`watch`](StateManager::watch)es;
    /// - the start writes nothing: the store must exist (its `metadata/store.json`), no
    ///   staged file is swept, no delete left part way is finished (its session is only
    ///   marked, as while it is being deleted), the index is rebuilt from the journal and
    ///   the records in memory (the journal is not rewritten), and the running marker is
    ///   neither written nor taken as a sign of a crash (no session is marked interrupted);
    /// - no janitor runs, and the index journal, quarantine copies of damaged records (the
    ///   damage is still reported) and the clean snapshot at shutdown are not written;
    /// - an encrypted store needs its current key (a key that only a cut-off rotation
    ///   recorded would have to be written, and is refused), and
    ///   [`rotate_key`](StateManager::rotate_key) is refused.
    ///
    /// The view is the store as it was read at start (and, for records read later, as they
    /// are then); start again for a newer one.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// use mars_state::{ErrorKind, FileStorageBackend, StateManager};
    /// # let dir = tempfile::tempdir().unwrap();
    /// let writer = StateManager::start(FileStorageBackend::new(dir.path())?).await?;
    /// writer.save_session("run-1", &serde_json::json!({ "step": 12 })).await?;
    ///
    /// let backend = FileStorageBackend::options().read_only(true).open(dir.path())?;
    /// let reader = StateManager::builder(backend).read_only().start().await?;
    /// assert_eq!(reader.list_sessions().await?.len(), 1);
    /// let refused = reader.save_session("run-1", &serde_json::json!({})).await.unwrap_err();
    /// assert_eq!(refused.kind(), ErrorKind::ReadOnly);
    /// # reader.shutdown().await?;
    /// # writer.shutdown().await?;
    /// # Ok(()) }
    /// ```
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Opens the store (checks its format, sweeps staged files, loads and reconciles the
    /// index, finishes interrupted deletes) and starts the actors.
    pub async fn start(self) -> Result<StateManager> {
        let compression = match self.compression {
            None => Compression::None,
            Some(level) => Compression::gzip(level)?,
        };
        if self.config.idle_timeout.is_zero() || self.config.call_timeout.is_zero() {
            return Err(StateError::Config {
                message: "timeouts must be greater than zero".into(),
            });
        }
        if self.config.lease_ttl < Duration::from_millis(100) {
            return Err(StateError::Config {
                message: "the lease TTL must be at least 100 ms".into(),
            });
        }
        if self.config.node_id.is_empty() || self.config.node_id.len() > 256 {
            return Err(StateError::Config {
                message: "the node id must be 1 to 256 bytes long".into(),
            });
        }
        if self.config.janitor_interval.is_some_and(|d| d.is_zero()) {
            return Err(StateError::Config {
                message: "the janitor interval must be greater than zero".into(),
            });
        }
        // The envelope adds well under 1 KiB to the state.
        let max_record = self.config.max_state_bytes.saturating_add(64 * 1024);
        #[allow(unused_mut)]
        let mut codec = Codec { compression, encrypted: false, max_record };
        #[allow(unused_mut)]
        let mut backend = self.backend;
        let read_only = self.read_only;
        // Whether other nodes write the store (checked before the read-only wrapper, which
        // reads a shared store as one read alone): their change events reach the watches.
        let others_write = backend.shared();
        let mut config = self.config;
        if read_only {
            backend = Arc::new(crate::backend::ReadOnly::new(backend, "of this read-only manager"));
            // The janitor's passes write (retention, vacuum): none in a read-only manager.
            config.janitor_interval = None;
        }
        #[allow(unused_mut)]
        let mut below = None;
        #[cfg(feature = "encryption")]
        let mut crypt: Weak<dyn KeyRing> = Weak::<EncryptedBackend>::new();
        #[cfg(feature = "encryption")]
        match (self.layer, self.encryption) {
            (Some(_), Some(_)) => {
                return Err(StateError::Config {
                    message: "the backend is encrypted already (an EncryptedFileStorageBackend); give the key \
                              there or to the builder, not both"
                        .into(),
                });
            }
            // A backend given encrypted: the same store as with `encryption_key`.
            (Some((layer, under)), None) => {
                codec.encrypted = true;
                if let Some(meta) = store::read_store_meta(under.as_ref()).await?
                    && !meta.encrypted()
                {
                    // Made by an earlier version, which did not see this layer: its
                    // records are sealed but named without `.enc`. Keep reading it so.
                    tracing::warn!(
                        "this encrypted store was created without .enc record names; it keeps them"
                    );
                    codec.encrypted = false;
                }
                crypt = Arc::downgrade(&layer);
                below = Some(under);
            }
            (None, Some((current, previous))) => {
                codec.encrypted = true;
                // Check the store's settings before the layer writes its key metadata, so an
                // unencrypted store is refused untouched.
                if let Some(meta) = store::read_store_meta(backend.as_ref()).await? {
                    meta.check(&codec)?;
                }
                let layer = previous
                    .into_iter()
                    .fold(EncryptionLayer::new(current), |l, k| l.previous_key(k));
                below = Some(backend.clone());
                let encrypted: Arc<EncryptedBackend> = Arc::new(layer.wrap(backend).await?);
                let keys: Arc<dyn KeyRing> = encrypted.clone();
                crypt = Arc::downgrade(&keys);
                backend = encrypted;
            }
            (None, None) => {}
        }
        // A key rotation writes the key metadata through the layer itself, below the
        // read-only wrapper: a read-only manager has no key ring to rotate with.
        #[cfg(feature = "encryption")]
        if read_only {
            crypt = Weak::<EncryptedBackend>::new();
        }
        let store = Arc::new(
            Store::open(
                backend,
                codec,
                config.retention.clone(),
                self.access.unwrap_or_default(),
                below,
                read_only,
            )
            .await?,
        );
        let rt = Arc::new(Runtime::new(store.clone(), &config.node_id, others_write));
        let config = Arc::new(config);
        if store.shared {
            crate::actor::lease::spawn_keeper(&store, &rt, &config);
        }
        if store.shared || others_write {
            crate::actor::remote::start(&store, &rt).await?;
        }
        let args = SupervisorArgs { store: store.clone(), rt: rt.clone(), config: config.clone() };
        let (supervisor, _) = Actor::spawn(None, SupervisorActor, args)
            .await
            .map_err(|e| StateError::unavailable(format!("could not start the supervisor: {e}")))?;
        Ok(StateManager {
            inner: Arc::new(Inner {
                supervisor,
                store: Arc::downgrade(&store),
                rt: Arc::downgrade(&rt),
                config,
                #[cfg(feature = "encryption")]
                crypt,
            }),
            principal: None,
        })
    }
}

/// The default node id: the host name, the process id and a random suffix.
fn default_node_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{host}-{}-{:08x}", std::process::id(), h.finish() as u32)
}

impl StateManager {
    /// The store behind this handle, for a store-wide pass defined outside the manager
    /// module (`store::verify`, `store::dump`), after the handle's principal is checked for
    /// `op` (administrators only).
    pub(crate) fn store_for(&self, op: crate::error::Operation) -> Result<Arc<Store>> {
        self.maintenance(op)
    }

    /// The manager's settings (node id, lease TTL and wait), for the store's own paths.
    pub(crate) fn config(&self) -> &crate::actor::Config {
        &self.inner.config
    }
}
