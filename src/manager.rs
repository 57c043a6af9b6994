//! [`StateManager`]: the handle orchestrators use, and its builder.

use std::sync::{Arc, Weak};
use std::time::Duration;

use ractor::{Actor, ActorRef};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::actor::session::{SessionMsg, UpdateFn};
use crate::actor::supervisor::{self, SupervisorActor, SupervisorArgs, SupervisorMsg};
use crate::actor::{Config, call_session, janitor, storage};
use crate::backend::StorageBackend;
use crate::error::{BoxError, Result, StateError};
use crate::lifecycle::{CheckpointPolicy, MigrationReport, Migrations, Recovery, SkippedCheckpoint, Watch};
use crate::middleware::acl::{Access, AccessControlLayer, AccessRecord, Decision, Op};
#[cfg(feature = "encryption")]
use crate::middleware::crypto::{
    Encrypted, EncryptionKey, EncryptionLayer, FoundLayer, KeyRing, KeySource, Passphrase,
};
#[cfg(feature = "encryption")]
use crate::store;
use crate::store::codec::{Codec, Compression, RecordHead};
use crate::store::{RetentionPolicy, Store};
use crate::types::{
    BranchId, Checkpoint, CheckpointId, CheckpointInfo, CheckpointReason, Principal, SessionId, SessionInfo,
    SessionStatus, StateBytes, StorageStats, VacuumReport,
};

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
}

#[cfg(feature = "encryption")]
type EncryptedBackend = Encrypted<Arc<dyn StorageBackend>>;

impl StateManagerBuilder {
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

    /// Opens the store (checks its format, sweeps staged files, loads and reconciles the
    /// index, finishes interrupted deletes) and starts the actors.
    pub async fn start(self) -> Result<StateManager> {
        let compression = match self.compression {
            None => Compression::None,
            Some(level) => Compression::gzip(level)?,
        };
        if self.config.idle_timeout.is_zero() || self.config.call_timeout.is_zero() {
            return Err(StateError::Config { message: "timeouts must be greater than zero".into() });
        }
        if self.config.janitor_interval.is_some_and(|d| d.is_zero()) {
            return Err(StateError::Config { message: "the janitor interval must be greater than zero".into() });
        }
        // The envelope adds well under 1 KiB to the state.
        let max_record = self.config.max_state_bytes.saturating_add(64 * 1024);
        #[allow(unused_mut)]
        let mut codec = Codec { compression, encrypted: false, max_record };
        #[allow(unused_mut)]
        let mut backend = self.backend;
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
                    tracing::warn!("this encrypted store was created without .enc record names; it keeps them");
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
                let layer = previous.into_iter().fold(EncryptionLayer::new(current), |l, k| l.previous_key(k));
                below = Some(backend.clone());
                let encrypted: Arc<EncryptedBackend> = Arc::new(layer.wrap(backend).await?);
                let keys: Arc<dyn KeyRing> = encrypted.clone();
                crypt = Arc::downgrade(&keys);
                backend = encrypted;
            }
            (None, None) => {}
        }
        let store = Arc::new(
            Store::open(backend, codec, self.config.retention.clone(), self.access.unwrap_or_default(), below).await?,
        );
        let config = Arc::new(self.config);
        let (supervisor, _) =
            Actor::spawn(None, SupervisorActor, SupervisorArgs { store: store.clone(), config: config.clone() })
                .await
                .map_err(|e| StateError::unavailable(format!("could not start the supervisor: {e}")))?;
        Ok(StateManager {
            inner: Arc::new(Inner {
                supervisor,
                store: Arc::downgrade(&store),
                config,
                #[cfg(feature = "encryption")]
                crypt,
            }),
            principal: None,
        })
    }
}

/// The handle to a running state manager: cheap to clone, usable from any task.
///
/// Every method validates its ids first (a rejected id touches nothing), then sends the
/// request to the session's actor, which applies requests for that session one at a time.
/// Loads need no message: they take the state a live actor publishes, or read the record
/// when no actor holds the session (without spawning one). An `Ok` from a save,
/// checkpoint, rollback, update or delete means the change is durable: it survives a crash
/// and a power loss.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
/// use mars_state::{MemoryStorageBackend, StateManager};
/// use serde_json::json;
///
/// let manager = StateManager::start(MemoryStorageBackend::new()).await?;
/// manager.save_session("session_123", &json!({"step": 42})).await?;
/// assert_eq!(manager.load_session("session_123").await?, Some(json!({"step": 42})));
/// manager.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct StateManager {
    inner: Arc<Inner>,
    /// `None`: the trusted in-process system principal, never checked.
    principal: Option<Principal>,
}

#[derive(Debug)]
struct Inner {
    supervisor: ActorRef<SupervisorMsg>,
    /// Weak: the actors own the store, so once they have stopped it is dropped and the
    /// backend (and its lock) released, even while handles to this manager remain.
    store: Weak<Store>,
    config: Arc<Config>,
    /// The encryption layer under the store, for key rotation (weak for the same reason).
    #[cfg(feature = "encryption")]
    crypt: Weak<dyn KeyRing>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone without shutdown(): drain in the background so queued
        // work still finishes and the actors do not outlive their users.
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let _ = self.supervisor.cast(SupervisorMsg::Shutdown { reply: tx.into() });
    }
}

fn sid(session: impl AsRef<str>) -> Result<SessionId> {
    SessionId::new(session)
}

fn ser_err(session: &SessionId, e: StateError) -> StateError {
    match e {
        StateError::Serialization { detail, .. } => StateError::Serialization { session: session.to_string(), detail },
        other => other,
    }
}

impl StateManager {
    /// A builder over `backend`.
    pub fn builder(backend: impl StorageBackend) -> StateManagerBuilder {
        let backend = Arc::new(backend);
        // An encrypted backend (an `EncryptedFileStorageBackend`) is recognised here, while
        // its type is known, so the store is opened as encrypted.
        #[cfg(feature = "encryption")]
        let layer = crate::middleware::crypto::find_layer(&(backend.clone() as Arc<dyn std::any::Any + Send + Sync>));
        StateManagerBuilder {
            backend,
            #[cfg(feature = "encryption")]
            layer,
            compression: None,
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
            },
        }
    }

    /// Starts a manager over `backend` with default settings.
    pub async fn start(backend: impl StorageBackend) -> Result<StateManager> {
        Self::builder(backend).start().await
    }

    /// A handle that makes every request as `principal`, checked by access control (see
    /// [`middleware::acl`](crate::middleware::acl)). It has the same methods; requests it is
    /// not allowed to make fail with [`StateError::AccessDenied`] and touch nothing.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// use mars_state::{ErrorKind, MemoryStorageBackend, Principal, StateManager};
    /// let manager = StateManager::start(MemoryStorageBackend::new()).await?;
    /// let alice = manager.for_principal(Principal::new("alice")?);
    /// let bob = manager.for_principal(Principal::new("bob")?);
    /// alice.save_session("plan", &serde_json::json!({"step": 1})).await?;   // alice owns "plan"
    /// let err = bob.load_session("plan").await.unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::AccessDenied);
    /// # Ok(()) }
    /// ```
    pub fn for_principal(&self, principal: Principal) -> StateManager {
        StateManager { inner: self.inner.clone(), principal: Some(principal) }
    }

    /// The principal of this handle; `None` for the unscoped (system) manager.
    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_ref()
    }

    /// Checks `op` on `sid` for this handle's principal; a first write claims the session,
    /// and its access record is made durable before the request goes on.
    async fn authorize(&self, op: Op, sid: &SessionId) -> Result<()> {
        let Some(p) = &self.principal else { return Ok(()) };
        let store = self.store()?;
        match store.access.check(p, op, sid, store.exists(sid), store.clock.now_ms())? {
            Decision::Allow => Ok(()),
            Decision::Claim(record) => {
                let put = self.put_access(sid, &record).await;
                if put.is_err() {
                    store.access.unclaim(sid, &record.owner);
                    return put;
                }
                // A live actor of this session served it before this claim (under another
                // owner, since deleted, or none): references to it may have been handed
                // out. Retire it, so none of them reaches the new owner's session.
                if store.actors.get(sid).is_some() {
                    self.call("claim", sid, |reply| SessionMsg::Retire { reply }).await?;
                }
                Ok(())
            }
        }
    }

    fn authorize_maintenance(&self, name: &'static str) -> Result<()> {
        match &self.principal {
            None => Ok(()),
            Some(p) => self.store()?.access.check_maintenance(p, Op::Maintenance(name)),
        }
    }

    fn can_read(&self, store: &Store, sid: &SessionId) -> bool {
        self.principal.as_ref().is_none_or(|p| store.access.can_read(p, sid))
    }

    /// Lets `principal` read, or read and write, `session`. Only the owner, an
    /// administrator or the unscoped manager may grant.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// use mars_state::{Access, MemoryStorageBackend, Principal, StateManager};
    /// let manager = StateManager::start(MemoryStorageBackend::new()).await?;
    /// let alice = manager.for_principal(Principal::new("alice")?);
    /// alice.save_session("plan", &1).await?;
    /// alice.grant_access("plan", Principal::new("bob")?, Access::Read).await?;
    /// let bob = manager.for_principal(Principal::new("bob")?);
    /// assert_eq!(bob.load_session("plan").await?, Some(serde_json::json!(1)));
    /// # Ok(()) }
    /// ```
    pub async fn grant_access(&self, session: impl AsRef<str>, principal: Principal, access: Access) -> Result<()> {
        let sid = sid(session)?;
        self.change_access(Op::Grant, &sid, |r| {
            r.grants.insert(principal, access);
        })
        .await
    }

    /// Takes back whatever `principal` was granted on `session`.
    pub async fn revoke_access(&self, session: impl AsRef<str>, principal: &Principal) -> Result<()> {
        let sid = sid(session)?;
        self.change_access(Op::Revoke, &sid, |r| {
            r.grants.remove(principal);
        })
        .await
    }

    /// The session's access record, if it has an owner (readable by whoever may read it).
    pub async fn access_record(&self, session: impl AsRef<str>) -> Result<Option<AccessRecord>> {
        let sid = sid(session)?;
        self.authorize(Op::Load, &sid).await?;
        Ok(self.store()?.access.get(&sid))
    }

    async fn change_access(&self, op: Op, sid: &SessionId, change: impl FnOnce(&mut AccessRecord)) -> Result<()> {
        self.authorize(op, sid).await?;
        let store = self.store()?;
        let Some(mut record) = store.access.get(sid) else {
            return Err(StateError::Config { message: format!("session {sid} has no owner to grant from") });
        };
        change(&mut record);
        self.put_access(sid, &record).await?;
        store.access.set(sid, record);
        Ok(())
    }

    /// Serializes a state and checks it against the size limit, before anything else
    /// (access control's claim of a new session included) happens.
    fn encode<T: Serialize + ?Sized>(&self, sid: &SessionId, state: &T) -> Result<StateBytes> {
        let state = StateBytes::from_serialize(state).map_err(|e| ser_err(sid, e))?;
        let limit = self.inner.config.max_state_bytes;
        if state.len() > limit {
            return Err(StateError::TooLarge { size: state.len(), limit });
        }
        Ok(state)
    }

    /// Runs a job on the current storage actor (the supervisor may have restarted it).
    async fn on_storage<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Store>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let storage = supervisor::ask(&self.inner.supervisor, |reply| SupervisorMsg::Storage { reply }).await?;
        storage::run(&storage, f).await
    }

    /// Makes a session's access record durable (before the request it guards goes on).
    async fn put_access(&self, sid: &SessionId, record: &AccessRecord) -> Result<()> {
        let (s, r) = (sid.clone(), record.clone());
        self.on_storage(move |store| async move { store.put_access(&s, &r).await }).await
    }

    fn store(&self) -> Result<Arc<Store>> {
        self.inner.store.upgrade().ok_or_else(|| StateError::unavailable("the state manager is shut down"))
    }

    async fn call<R: Send + 'static>(
        &self,
        operation: &'static str,
        sid: &SessionId,
        build: impl FnOnce(ractor::RpcReplyPort<Result<R>>) -> SessionMsg,
    ) -> Result<R> {
        let store = self.store()?;
        call_session(&self.inner.supervisor, &store.actors, self.inner.config.call_timeout, operation, sid, build).await
    }

    /// Saves `state` as the session's state, replacing the previous one. Durable on `Ok`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// manager.save_session("s1", &serde_json::json!({"step": 1})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn save_session<T: Serialize + ?Sized>(&self, session: impl AsRef<str>, state: &T) -> Result<()> {
        let sid = sid(session)?;
        // Serialized before access control may claim the session for this write.
        let state = self.encode(&sid, state)?;
        self.authorize(Op::Save, &sid).await?;
        self.call("save_session", &sid, |reply| SessionMsg::Save { state, reply }).await
    }

    /// Loads the session's state as JSON; `Ok(None)` if it has none. A damaged record is
    /// [`StateError::Corrupt`], never `None`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// assert_eq!(manager.load_session("nobody").await?, None);
    /// # Ok(()) }
    /// ```
    pub async fn load_session(&self, session: impl AsRef<str>) -> Result<Option<Value>> {
        self.load_session_as(session).await
    }

    /// Loads the session's state into `T`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    /// struct Run { step: u32 }
    /// manager.save_session("s1", &Run { step: 7 }).await?;
    /// assert_eq!(manager.load_session_as::<Run>("s1").await?, Some(Run { step: 7 }));
    /// # Ok(()) }
    /// ```
    pub async fn load_session_as<T: DeserializeOwned>(&self, session: impl AsRef<str>) -> Result<Option<T>> {
        let sid = sid(session)?;
        self.authorize(Op::Load, &sid).await?;
        let state = self.load_state(&sid).await?;
        state.map(|s| s.deserialize().map_err(|e| ser_err(&sid, e))).transpose()
    }

    /// Loads the session's state as its compact JSON bytes, without parsing them; `Ok(None)`
    /// if it has none. While the session's actor is live these are the very bytes it holds
    /// (shared, not copied), so this is the cheapest way to read a state that is passed on
    /// as JSON or parsed by the caller ([`StateBytes::deserialize`]). Same access check,
    /// same answers and errors as [`load_session`](Self::load_session).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// manager.save_session("s1", &serde_json::json!({"step": 1})).await?;
    /// let bytes = manager.load_session_bytes("s1").await?.unwrap();
    /// assert_eq!(bytes.as_bytes(), br#"{"step":1}"#);
    /// assert_eq!(manager.load_session_bytes("nobody").await?, None);
    /// # Ok(()) }
    /// ```
    pub async fn load_session_bytes(&self, session: impl AsRef<str>) -> Result<Option<StateBytes>> {
        let sid = sid(session)?;
        self.authorize(Op::Load, &sid).await?;
        self.load_state(&sid).await
    }

    /// The session's current state, for a caller already authorized: from the live
    /// actor's published state, else read straight from the store, else (a record that
    /// needs migrating) through the session actor.
    async fn load_state(&self, sid: &SessionId) -> Result<Option<StateBytes>> {
        let store = self.store()?;
        // A live session's actor publishes its state: no message needed.
        if let Some(state) = store.hot(sid) {
            return Ok(state);
        }
        // Cold: read the record in this task, without spawning an actor. A miss in the hot
        // map means the durable record holds every acknowledged write:
        // - A session actor publishes its state (`SessionState::set_current`) before it
        //   replies to any request that changed it, `record_step` included, so a published
        //   state always holds every acknowledged write. It is unpublished only (a) by the
        //   actor's `post_stop` (passivation, shutdown), *after* it has flushed recorded
        //   steps; (b) by the supervisor once the actor has terminated, before it spawns the
        //   next actor of the session; (c) by `set_current(None)` when the actor drops its
        //   cache (failed write, panicking update, delete or migration in flight), after
        //   which the actor itself answers a load by reading the record, as done here.
        // - A fresh actor publishes nothing until it has read the record, and the writes it
        //   makes before that (delete, migration and key-rotation rewrites) publish on
        //   success. Two actors of one session never overlap, and an actor awaits its
        //   storage jobs, so an actor that has stopped has no write in flight.
        // - A write in flight may be seen here or not (a put is atomic): this load is then
        //   ordered after or before it. But it may be seen before its actor, still
        //   publishing the state it had before, acknowledges it; so the hot map is read
        //   again after the read and a state published meanwhile wins. With that, a later
        //   load never returns an older state than this one: an actor that publishes after
        //   the second miss publishes what it wrote, or what it read from the record with
        //   no write in between (it is the only writer and is busy reading): what we read,
        //   or newer.
        // Damage gives the same `Corrupt` error (and quarantine copy) as the actor's read:
        // both are `Store::load_session`. A record at another schema version (migration
        // runs user code, in the actor) or anything unexpected goes through the actor.
        let Some(d) = store.load_session(sid).await? else {
            return Ok(store.hot(sid).unwrap_or(None));
        };
        match &d.head {
            RecordHead::Session { meta, .. } if meta.schema == self.inner.config.migrations.current => {
                Ok(store.hot(sid).unwrap_or_else(|| Some(StateBytes::from_slice(d.data()))))
            }
            _ => self.call("load_session", sid, |reply| SessionMsg::Load { reply }).await,
        }
    }

    /// Deletes the session's state and all its checkpoints; returns whether anything
    /// existed. Crash-safe: an interrupted delete is finished at the next start. A delete
    /// that fails part way returns the error and leaves the rest, still owned by the same
    /// principal (who may retry); the session's next write finishes it first, or fails
    /// with the same error and writes nothing.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// manager.save_session("s1", &1).await?;
    /// assert!(manager.delete_session("s1").await?);
    /// assert!(!manager.delete_session("s1").await?);
    /// # Ok(()) }
    /// ```
    pub async fn delete_session(&self, session: impl AsRef<str>) -> Result<bool> {
        let sid = sid(session)?;
        self.authorize(Op::Delete, &sid).await?;
        self.call("delete_session", &sid, |reply| SessionMsg::Delete { reply }).await
    }

    /// Every session with a state or checkpoints, sorted by id, from the index (no record
    /// is read). A session whose only state is recorded steps not yet flushed is listed
    /// too (with no bytes stored and `updated_at` 0).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// manager.save_session("s1", &1).await?;
    /// let sessions = manager.list_sessions().await?;
    /// assert_eq!(sessions[0].session_id.as_str(), "s1");
    /// # Ok(()) }
    /// ```
    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>> {
        let store = self.store()?;
        let memory_only = store.memory_only_sessions();
        let mut sessions = store.index().list_sessions(memory_only);
        sessions.retain(|s| self.can_read(&store, &s.session_id));
        Ok(sessions)
    }

    /// Stores a checkpoint of `state` for the session on `branch`, durably, and returns its
    /// id. Ids are ordered by creation within a session, even within one millisecond.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// let a = manager.create_checkpoint("s1", "main", &serde_json::json!({"step": 1})).await?;
    /// let b = manager.create_checkpoint("s1", "main", &serde_json::json!({"step": 2})).await?;
    /// assert!(a < b);
    /// # Ok(()) }
    /// ```
    pub async fn create_checkpoint<T: Serialize + ?Sized>(
        &self,
        session: impl AsRef<str>,
        branch: impl AsRef<str>,
        state: &T,
    ) -> Result<CheckpointId> {
        self.checkpoint(session, branch, state, CheckpointReason::Manual).await
    }

    async fn checkpoint<T: Serialize + ?Sized>(
        &self,
        session: impl AsRef<str>,
        branch: impl AsRef<str>,
        state: &T,
        reason: CheckpointReason,
    ) -> Result<CheckpointId> {
        // Every id is validated before access control may claim the session.
        let sid = sid(session)?;
        let branch_id = BranchId::new(branch)?;
        let state = self.encode(&sid, state)?;
        self.authorize(Op::CreateCheckpoint, &sid).await?;
        self.call("create_checkpoint", &sid, |reply| SessionMsg::CreateCheckpoint { branch_id, state, reason, reply })
            .await
    }

    /// Reads a checkpoint by id alone (also after a restart); `Ok(None)` if there is none.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// let id = manager.create_checkpoint("s1", "main", &serde_json::json!({"step": 25})).await?;
    /// let cp = manager.restore_checkpoint(&id).await?.unwrap();
    /// assert_eq!(cp.data["step"], 25);
    /// assert_eq!(cp.branch_id.as_str(), "main");
    /// # Ok(()) }
    /// ```
    pub async fn restore_checkpoint(&self, id: &CheckpointId) -> Result<Option<Checkpoint>> {
        self.restore_checkpoint_as(id).await
    }

    /// Like [`restore_checkpoint`](Self::restore_checkpoint), deserializing into `T`.
    pub async fn restore_checkpoint_as<T: DeserializeOwned>(&self, id: &CheckpointId) -> Result<Option<Checkpoint<T>>> {
        let Some(sid) = self.store()?.index().by_checkpoint.get(id).cloned() else { return Ok(None) };
        self.authorize(Op::RestoreCheckpoint, &sid).await?;
        let (s, cid) = (sid.clone(), id.clone());
        let decoded = self.on_storage(move |store| async move { store.load_checkpoint(&s, &cid).await }).await?;
        let Some(d) = decoded else { return Ok(None) };
        let RecordHead::Checkpoint { session_id, checkpoint_id, branch_id, timestamp, meta } = d.head.clone() else {
            return Err(StateError::corrupt(id, "not a checkpoint record"));
        };
        let migrated = self.inner.config.migrations.upgrade(&sid, meta.schema, d.data())?;
        let data = serde_json::from_slice(migrated.as_deref().unwrap_or(d.data()))
            .map_err(|e| StateError::json(sid.as_str(), &e))?;
        Ok(Some(Checkpoint {
            id: checkpoint_id,
            session_id,
            branch_id,
            timestamp,
            reason: meta.reason,
            step: meta.step,
            parent: meta.parent,
            data,
        }))
    }

    /// Makes the checkpoint's state the session's state, atomically and durably.
    /// [`StateError::CheckpointNotFound`] if there is no such checkpoint.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// let id = manager.create_checkpoint("s1", "main", &serde_json::json!({"step": 1})).await?;
    /// manager.save_session("s1", &serde_json::json!({"step": 9})).await?;
    /// manager.rollback_to_checkpoint(&id).await?;
    /// assert_eq!(manager.load_session("s1").await?, Some(serde_json::json!({"step": 1})));
    /// # Ok(()) }
    /// ```
    pub async fn rollback_to_checkpoint(&self, id: &CheckpointId) -> Result<()> {
        self.rollback(id, false).await
    }

    /// Like [`rollback_to_checkpoint`](Self::rollback_to_checkpoint), and also deletes the
    /// checkpoints taken after `id` on its branch, so the branch ends at `id` again.
    /// (Without truncation, later checkpoints are kept and the next checkpoint on the branch
    /// starts a fork whose parent is `id`.)
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// let a = manager.create_checkpoint("s1", "main", &1).await?;
    /// manager.create_checkpoint("s1", "main", &2).await?;
    /// manager.rollback_and_truncate(&a).await?;
    /// assert_eq!(manager.list_checkpoints("s1").await?.len(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn rollback_and_truncate(&self, id: &CheckpointId) -> Result<()> {
        self.rollback(id, true).await
    }

    async fn rollback(&self, id: &CheckpointId, truncate: bool) -> Result<()> {
        let sid = self
            .store()?
            .index()
            .by_checkpoint
            .get(id)
            .cloned()
            .ok_or_else(|| StateError::CheckpointNotFound { id: id.to_string() })?;
        self.authorize(Op::Rollback, &sid).await?;
        let checkpoint_id = id.clone();
        self.call("rollback_to_checkpoint", &sid, |reply| SessionMsg::Rollback { checkpoint_id, truncate, reply }).await
    }

    /// The session's checkpoints, oldest first, from the index (no state is read).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// manager.create_checkpoint("s1", "main", &1).await?;
    /// assert_eq!(manager.list_checkpoints("s1").await?.len(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn list_checkpoints(&self, session: impl AsRef<str>) -> Result<Vec<CheckpointInfo>> {
        let sid = sid(session)?;
        self.authorize(Op::ListCheckpoints, &sid).await?;
        Ok(self.store()?.index().list_checkpoints(&sid))
    }

    /// Deletes all but the `keep` newest checkpoints of the session; returns how many went.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// for i in 0..5 { manager.create_checkpoint("s1", "main", &i).await?; }
    /// assert_eq!(manager.cleanup_checkpoints("s1", 3).await?, 2);
    /// # Ok(()) }
    /// ```
    pub async fn cleanup_checkpoints(&self, session: impl AsRef<str>, keep: usize) -> Result<usize> {
        let sid = sid(session)?;
        self.authorize(Op::CleanupCheckpoints, &sid).await?;
        self.call("cleanup_checkpoints", &sid, |reply| SessionMsg::CleanupCheckpoints { keep, reply }).await
    }

    /// Reads the state, applies `f`, and saves the result, with no other request for the
    /// session in between. If `f` returns an error (or panics) nothing is written and the
    /// error is returned as [`StateError::UpdateRejected`] (or [`StateError::Panicked`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// use serde_json::{json, Value};
    /// let new = manager.transactional_update("s1", |old: Option<Value>| {
    ///     Ok::<_, std::io::Error>(json!({"n": old.and_then(|v| v["n"].as_i64()).unwrap_or(0) + 1}))
    /// }).await?;
    /// assert_eq!(new, json!({"n": 1}));
    /// # Ok(()) }
    /// ```
    pub async fn transactional_update<T, E, F>(&self, session: impl AsRef<str>, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Into<BoxError>,
        F: FnOnce(Option<T>) -> std::result::Result<T, E> + Send + 'static,
    {
        let sid = sid(session)?;
        self.authorize(Op::Update, &sid).await?;
        let slot: Arc<std::sync::Mutex<Option<T>>> = Arc::new(std::sync::Mutex::new(None));
        let out = slot.clone();
        let name = sid.to_string();
        let update: UpdateFn = Box::new(move |old: Option<&[u8]>| {
            let ser = |e: serde_json::Error| StateError::json(name.as_str(), &e);
            let old: Option<T> = old.map(serde_json::from_slice).transpose().map_err(ser)?;
            let new = f(old).map_err(|e| StateError::UpdateRejected { session: name.clone(), source: e.into() })?;
            let bytes = serde_json::to_vec(&new).map_err(ser)?;
            *crate::sync::lock(&out) = Some(new);
            Ok(bytes)
        });
        let bytes = self.call("transactional_update", &sid, |reply| SessionMsg::Update { update, reply }).await?;
        let kept = crate::sync::lock(&slot).take();
        match kept {
            Some(v) => Ok(v),
            None => bytes.deserialize().map_err(|e| ser_err(&sid, e)),
        }
    }

    /// Totals over the store, from the index.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// manager.save_session("s1", &1).await?;
    /// let stats = manager.get_storage_stats().await?;
    /// assert_eq!(stats.session_count, 1);
    /// # Ok(()) }
    /// ```
    pub async fn get_storage_stats(&self) -> Result<StorageStats> {
        let store = self.store()?;
        let memory_only = store.memory_only_sessions();
        let idx = store.index();
        Ok(idx.stats_where(memory_only, |sid| self.can_read(&store, sid)))
    }

    /// Deletes sessions (state and checkpoints) whose last save or checkpoint is older than
    /// `older_than`, always keeping the `keep_last` most recently active ones. Returns how
    /// many were deleted. A session saved while this runs is kept.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// use std::time::Duration;
    /// manager.save_session("s1", &1).await?;
    /// assert_eq!(manager.cleanup_old_sessions(Duration::from_secs(86_400), 0).await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn cleanup_old_sessions(&self, older_than: Duration, keep_last: usize) -> Result<usize> {
        self.authorize_maintenance("clean up old sessions of")?;
        let cutoff = self.store()?.clock.now_ms().saturating_sub(older_than.as_millis() as u64);
        let shared = self.shared().await?;
        Ok(janitor::remove_idle_sessions(&self.inner.supervisor, &shared, cutoff, keep_last).await?.0)
    }

    /// Removes staged files of interrupted writes, finishes interrupted deletes, and
    /// rebuilds the index from every record (reporting damaged ones).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// manager.save_session("s1", &1).await?;
    /// let report = manager.vacuum_storage().await?;
    /// assert_eq!(report.index_entries, 1);
    /// # Ok(()) }
    /// ```
    pub async fn vacuum_storage(&self) -> Result<VacuumReport> {
        self.authorize_maintenance("vacuum")?;
        // Deletes that failed part way are finished through their session actors, which
        // drop what they cached of the session; the pass below finishes any other marker.
        let mut finished = 0;
        for sid in self.store()?.deleting() {
            finished +=
                usize::from(self.call("vacuum_storage", &sid, |reply| SessionMsg::FinishDelete { reply }).await?);
        }
        let mut report = self.on_storage(|store| async move { store.vacuum().await }).await?;
        report.orphans_removed += finished;
        Ok(report)
    }

    /// Runs one janitor pass now (sweep, retention) and returns what it did.
    pub async fn run_janitor_now(&self) -> Result<VacuumReport> {
        self.authorize_maintenance("run the janitor on")?;
        let janitor = supervisor::ask(&self.inner.supervisor, |reply| SupervisorMsg::Janitor { reply })
            .await?
            .ok_or_else(|| StateError::unavailable("the janitor is not running"))?;
        match janitor.call(|reply| janitor::JanitorMsg::RunNow { reply }, None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(StateError::unavailable("the janitor stopped during its pass")),
        }
    }

    /// The session's actor, for orchestrators that are ractor actors themselves and want
    /// to message it directly with [`SessionMsg`]. It passivates when idle; after that,
    /// sends fail with `SendErr` and you ask again.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// use mars_state::{SessionMsg, StateBytes};
    /// let actor = manager.session_actor("s1").await?;
    /// let state = StateBytes::from_serialize(&serde_json::json!({"step": 3}))?;
    /// ractor::call!(actor, |reply| SessionMsg::Save { state, reply }).unwrap()?;
    /// assert_eq!(manager.load_session("s1").await?, Some(serde_json::json!({"step": 3})));
    /// # Ok(()) }
    /// ```
    pub async fn session_actor(&self, session: impl AsRef<str>) -> Result<ActorRef<SessionMsg>> {
        let sid = sid(session)?;
        self.authorize(Op::SessionActor, &sid).await?;
        supervisor::get_session(&self.inner.supervisor, &sid).await
    }

    /// How many session actors are alive (not passivated) right now.
    pub async fn live_session_actors(&self) -> Result<usize> {
        supervisor::ask(&self.inner.supervisor, |reply| SupervisorMsg::LiveSessions { reply }).await
    }

    /// Sets the session's [`CheckpointPolicy`] (for this process's life; an orchestrator
    /// sets it again when it resumes a run after a restart). The builder's
    /// [`checkpoint_policy`](StateManagerBuilder::checkpoint_policy) is the default.
    pub async fn set_checkpoint_policy(&self, session: impl AsRef<str>, policy: CheckpointPolicy) -> Result<()> {
        let sid = sid(session)?;
        self.authorize(Op::Save, &sid).await?;
        self.call("set_checkpoint_policy", &sid, |reply| SessionMsg::SetPolicy { policy, reply }).await
    }

    /// Reports progress: the state after `step`. Cheap: the state is kept in the session
    /// actor's memory (loads see it at once), and it is made durable, as the session record
    /// plus a checkpoint, when the session's policy says so; it is also made durable by the
    /// next save or pause, when the actor goes idle, and at shutdown. Returns the checkpoint
    /// the policy took, if any. After a crash, recorded steps since the last checkpoint are
    /// redone.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// use mars_state::{CheckpointPolicy, MemoryStorageBackend, StateManager};
    /// let manager = StateManager::builder(MemoryStorageBackend::new())
    ///     .checkpoint_policy(CheckpointPolicy::every_steps(10))
    ///     .start()
    ///     .await?;
    /// let mut taken = 0;
    /// for step in 1..=25 {
    ///     if manager.record_step("run", step, &serde_json::json!({"step": step})).await?.is_some() {
    ///         taken += 1;
    ///     }
    /// }
    /// assert_eq!(taken, 2); // at steps 10 and 20
    /// # Ok(()) }
    /// ```
    pub async fn record_step<T: Serialize + ?Sized>(
        &self,
        session: impl AsRef<str>,
        step: u64,
        state: &T,
    ) -> Result<Option<CheckpointId>> {
        let sid = sid(session)?;
        // Serialized before access control may claim the session for this write.
        let state = self.encode(&sid, state)?;
        self.authorize(Op::Save, &sid).await?;
        self.call("record_step", &sid, |reply| SessionMsg::RecordStep { step, state, reply }).await
    }

    /// Takes a checkpoint marked [`CheckpointReason::BeforeRisky`], for an orchestrator
    /// about to do something it may want to undo.
    pub async fn checkpoint_before_risky<T: Serialize + ?Sized>(
        &self,
        session: impl AsRef<str>,
        branch: impl AsRef<str>,
        state: &T,
    ) -> Result<CheckpointId> {
        self.checkpoint(session, branch, state, CheckpointReason::BeforeRisky).await
    }

    async fn set_status<T: Serialize + ?Sized>(
        &self,
        op: Op,
        session: impl AsRef<str>,
        status: SessionStatus,
        reason: Option<String>,
        state: Option<&T>,
    ) -> Result<Option<CheckpointId>> {
        let sid = sid(session)?;
        let state = state.map(|s| self.encode(&sid, s)).transpose()?;
        self.authorize(op, &sid).await?;
        self.call("set_status", &sid, |reply| SessionMsg::SetStatus { status, reason, state, reply }).await
    }

    /// Pauses the session: saves `state` with status [`SessionStatus::Paused`], the pause
    /// time and `reason`, and takes a checkpoint ([`CheckpointReason::Pause`]). Returns that
    /// checkpoint. Another process can [`resume_session`](Self::resume_session) it later.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// use mars_state::SessionStatus;
    /// manager.pause_session("run", &serde_json::json!({"step": 7}), "waiting for approval").await?;
    /// assert_eq!(manager.list_sessions_by_status(SessionStatus::Paused).await?.len(), 1);
    /// let state = manager.resume_session("run").await?;
    /// assert_eq!(state, Some(serde_json::json!({"step": 7})));
    /// # Ok(()) }
    /// ```
    pub async fn pause_session<T: Serialize + ?Sized>(
        &self,
        session: impl AsRef<str>,
        state: &T,
        reason: impl Into<String>,
    ) -> Result<CheckpointId> {
        self.set_status(Op::Save, session, SessionStatus::Paused, Some(reason.into()), Some(state))
            .await?
            .ok_or_else(|| StateError::unavailable("pause took no checkpoint"))
    }

    /// Resumes the session: marks it [`SessionStatus::Running`] (durably) and returns its
    /// state (`None` if it has none).
    pub async fn resume_session(&self, session: impl AsRef<str>) -> Result<Option<Value>> {
        self.resume_session_as(session).await
    }

    /// Like [`resume_session`](Self::resume_session), deserializing into `T`.
    pub async fn resume_session_as<T: DeserializeOwned>(&self, session: impl AsRef<str>) -> Result<Option<T>> {
        let session = session.as_ref();
        let state = self.load_session_as::<Value>(session).await?;
        if state.is_none() {
            return Ok(None);
        }
        self.set_status::<Value>(Op::Save, session, SessionStatus::Running, None, None).await?;
        let sid = sid(session)?;
        state.map(|v| serde_json::from_value(v).map_err(|e| StateError::json(sid.as_str(), &e))).transpose()
    }

    /// Saves the final `state` and marks the session [`SessionStatus::Completed`].
    pub async fn complete_session<T: Serialize + ?Sized>(&self, session: impl AsRef<str>, state: &T) -> Result<()> {
        self.set_status(Op::Save, session, SessionStatus::Completed, None, Some(state)).await.map(|_| ())
    }

    /// Marks the session [`SessionStatus::Failed`] with `reason`, keeping its state.
    pub async fn fail_session(&self, session: impl AsRef<str>, reason: impl Into<String>) -> Result<()> {
        self.set_status::<Value>(Op::Save, session, SessionStatus::Failed, Some(reason.into()), None).await.map(|_| ())
    }

    /// The sessions with `status` (see [`list_sessions`](Self::list_sessions)).
    pub async fn list_sessions_by_status(&self, status: SessionStatus) -> Result<Vec<SessionInfo>> {
        let mut sessions = self.list_sessions().await?;
        sessions.retain(|s| s.status == status);
        Ok(sessions)
    }

    /// What a run needs to pick up after a crash: the session's last saved state, its
    /// status with the reason and time it was set, whether its run was cut off (it was
    /// running when a process using the store died, and has not been saved since), and the
    /// newest checkpoint that verifies, with any newer damaged ones skipped and reported.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// manager.create_checkpoint("run", "main", &serde_json::json!({"step": 3})).await?;
    /// let recovery = manager.recover_session("run").await?;
    /// assert_eq!(recovery.checkpoint.unwrap().data["step"], 3);
    /// assert!(recovery.skipped.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn recover_session(&self, session: impl AsRef<str>) -> Result<Recovery> {
        let sid = sid(session)?;
        self.authorize(Op::Load, &sid).await?;
        let store = self.store()?;
        let (interrupted, status, status_reason, status_at) = {
            let idx = store.index();
            let record = idx.sessions.get(&sid).and_then(|e| e.record.clone());
            let status = record.as_ref().map_or(SessionStatus::Running, |r| r.status);
            let (reason, at) = record.map_or((None, None), |r| (r.reason, r.status_at));
            (idx.interrupted.contains(&sid), status, reason, at)
        };
        let state = match self.load_session(sid.as_str()).await {
            Ok(s) => s,
            // A damaged session record: recovery falls back to the checkpoints.
            Err(StateError::Corrupt { .. }) => None,
            Err(e) => return Err(e),
        };
        let mut skipped = Vec::new();
        let mut checkpoint = None;
        let newest_first: Vec<CheckpointInfo> = store.index().list_checkpoints(&sid).into_iter().rev().collect();
        for info in newest_first {
            match self.restore_checkpoint(&info.id).await {
                Ok(Some(cp)) => {
                    checkpoint = Some(cp);
                    break;
                }
                Ok(None) => {}
                Err(
                    e @ (StateError::Corrupt { .. } | StateError::Migration { .. } | StateError::Serialization { .. }),
                ) => skipped.push(SkippedCheckpoint { id: info.id, reason: e.to_string() }),
                Err(e) => return Err(e),
            }
        }
        Ok(Recovery { state, status, status_reason, status_at, interrupted, checkpoint, skipped })
    }

    /// Live change events of one session, in the order they were applied. On a handle
    /// from [`for_principal`](Self::for_principal) the watch is checked at every event, not
    /// just now: once the principal may not read the session (access revoked, or an id that
    /// did not exist yet created by someone else) it ends with
    /// [`WatchError::AccessDenied`](crate::WatchError::AccessDenied).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let manager = mars_state::StateManager::start(mars_state::MemoryStorageBackend::new()).await?;
    /// use mars_state::EventKind;
    /// let mut watch = manager.watch("s1").await?;
    /// manager.save_session("s1", &1).await?;
    /// assert_eq!(watch.recv().await.unwrap().kind, EventKind::Saved);
    /// # Ok(()) }
    /// ```
    pub async fn watch(&self, session: impl AsRef<str>) -> Result<Watch> {
        let sid = sid(session)?;
        self.authorize(Op::Load, &sid).await?;
        let store = self.store()?;
        // Checked again at every event: access taken back, or a session that did not exist
        // yet created by someone else, ends the watch (see `Watch`).
        let reader = self.principal.clone().filter(|p| !store.access.is_admin(p));
        Ok(Watch { rx: store.events.subscribe(), session: Some(sid), reader, denied: false })
    }

    /// Live change events of every session (administrators and the unscoped manager only).
    pub async fn watch_all(&self) -> Result<Watch> {
        self.authorize_maintenance("watch all sessions of")?;
        Ok(Watch { rx: self.store()?.events.subscribe(), session: None, reader: None, denied: false })
    }

    /// Rewrites every record stored at an older schema version at the current one (see
    /// [`schema_version`](StateManagerBuilder::schema_version)). Loads migrate in memory
    /// without this; the pass makes it permanent. Each record is rewritten atomically and
    /// records already current are skipped, so a pass that was interrupted is simply run
    /// again.
    pub async fn migrate_store(&self) -> Result<MigrationReport> {
        self.authorize_maintenance("migrate")?;
        let sessions: Vec<SessionId> = self.store()?.index().sessions.keys().cloned().collect();
        let mut total = MigrationReport::default();
        for sid in sessions {
            let r = self.call("migrate_store", &sid, |reply| SessionMsg::Migrate { reply }).await?;
            total.sessions += r.sessions;
            total.checkpoints += r.checkpoints;
        }
        Ok(total)
    }

    /// Re-encrypts every record under `new` and retires the old key. Reads of old-key
    /// records keep working throughout; each record is rewritten atomically (session
    /// records and checkpoints through their session actors, so no write is lost). If the
    /// process dies midway, start again with `new` as the key and the old one as
    /// [`previous_encryption_key`](StateManagerBuilder::previous_encryption_key), and call
    /// [`finish_key_rotation`](Self::finish_key_rotation) (or `rotate_key(new)` again).
    /// Returns how many records were rewritten.
    #[cfg(feature = "encryption")]
    pub async fn rotate_key(&self, new: impl Into<KeySource>) -> Result<usize> {
        self.authorize_maintenance("rotate the key of")?;
        self.crypt()?.rotate_to(new.into()).await?;
        self.finish_key_rotation().await
    }

    /// Rewrites every record still sealed under an older key with the current one, then
    /// retires the older keys. Idempotent: run it again after an interruption.
    #[cfg(feature = "encryption")]
    pub async fn finish_key_rotation(&self) -> Result<usize> {
        self.authorize_maintenance("rotate the key of")?;
        let crypt = self.crypt()?;
        // Every session with a record, including those with only an access record (owned,
        // but never saved), which the index does not hold.
        let sessions = self.store()?.reencrypt_sessions().await?;
        let mut rewritten = 0;
        for sid in sessions {
            rewritten += self.call("rotate_key", &sid, |reply| SessionMsg::Reencrypt { reply }).await?;
        }
        rewritten += self.on_storage(|store| async move { store.reencrypt_rest().await }).await?;
        crypt.retire_keys_except_current().await?;
        Ok(rewritten)
    }

    #[cfg(feature = "encryption")]
    fn crypt(&self) -> Result<Arc<dyn KeyRing>> {
        match self.inner.crypt.upgrade() {
            Some(c) => Ok(c),
            None if self.inner.store.strong_count() == 0 => {
                Err(StateError::unavailable("the state manager is shut down"))
            }
            None => Err(StateError::Config { message: "encryption is not enabled for this store".into() }),
        }
    }

    async fn shared(&self) -> Result<crate::actor::Shared> {
        let storage = supervisor::ask(&self.inner.supervisor, |reply| SupervisorMsg::Storage { reply }).await?;
        Ok(crate::actor::Shared { store: self.store()?, storage, config: self.inner.config.clone() })
    }

    /// Finishes every queued request, stops the actors and releases the store. Later calls
    /// on any clone of this handle fail with [`StateError::Unavailable`].
    pub async fn shutdown(&self) -> Result<()> {
        if self.inner.store.strong_count() > 0 {
            self.authorize_maintenance("shut down")?;
        }
        if self.inner.store.strong_count() == 0 {
            return Ok(());
        }
        supervisor::ask(&self.inner.supervisor, |reply| SupervisorMsg::Shutdown { reply }).await?;
        self.inner.supervisor.wait(Some(Duration::from_secs(10))).await.ok();
        // The actors' states (and so the store and its lock) are dropped just after they
        // report stopped; wait for that so the store can be reopened at once.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.inner.store.strong_count() > 0 {
            if tokio::time::Instant::now() > deadline {
                return Err(StateError::unavailable("the store was not released within 10 s"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}
