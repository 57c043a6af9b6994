//! [`StateManager`]: the handle orchestrators use.
//! Owns the public methods, each a thin use of one request helper (`request.rs`): validate
//! the id, check access, name the [`Operation`], run under the call timeout, map errors.
//! The builder is in `builder.rs`, the load paths (hot map, cold read, checkpoints,
//! recovery) in `load.rs`, the bodies pairs of methods share in `variants.rs`. Calls the actors
//! (session actors through their messages, the supervisor, the janitor), the actors' runtime
//! state (hot map, events, directory), the store's index and access table, and the crypto
//! middleware's key ring for rotation.

use std::sync::{Arc, Weak};
use std::time::Duration;

use ractor::ActorRef;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::access::{Access, AccessRecord};
use crate::actor::janitor::{self, JanitorMsg};
use crate::actor::session::{InternalMsg, SessionMsg, UpdateFn};
use crate::actor::supervisor::{self, SupervisorMsg};
use crate::actor::{self, Config, Runtime};
use crate::backend::StorageBackend;
use crate::config::CheckpointPolicy;
use crate::error::{BoxError, Operation, Result, StateError};
use crate::events::Watch;
#[cfg(feature = "encryption")]
use crate::middleware::crypto::{KeyRing, KeySource};
use crate::store::Store;
use crate::types::{
    Checkpoint, CheckpointId, CheckpointInfo, CheckpointReason, MigrationReport, Principal,
    Recovery, SessionId, SessionInfo, SessionStatus, StateBytes, StorageStats, VacuumReport,
};

mod builder;
mod load;
mod request;
mod variants;

pub use builder::StateManagerBuilder;

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
    /// The actors' live state (hot map, events, directory); weak for the same reason.
    rt: Weak<Runtime>,
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

impl StateManager {
    /// A builder over `backend`.
    pub fn builder(backend: impl StorageBackend) -> StateManagerBuilder {
        StateManagerBuilder::new(backend)
    }

    /// Starts a manager over `backend` with default settings.
    pub async fn start(backend: impl StorageBackend) -> Result<StateManager> {
        Self::builder(backend).start().await
    }

    /// A handle that makes every request as `principal`, checked by access control (see
    /// [`access`](crate::access)). It has the same methods; requests it is
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

    /// This process's name among the nodes sharing the store (see
    /// [`StateManagerBuilder::node_id`]).
    pub fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    /// Lets `principal` read, or read and write, `session`. Only the owner, an
    /// administrator or the unscoped manager may grant. A session without an owner (created
    /// by the unscoped manager) has no access record to grant from: [`StateError::Config`].
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
    pub async fn grant_access(
        &self,
        session: impl AsRef<str>,
        principal: Principal,
        access: Access,
    ) -> Result<()> {
        self.change_access(Operation::GrantAccess, session.as_ref(), |r| {
            r.grants.insert(principal, access);
        })
        .await
    }

    /// Takes back whatever `principal` was granted on `session`.
    pub async fn revoke_access(
        &self,
        session: impl AsRef<str>,
        principal: &Principal,
    ) -> Result<()> {
        self.change_access(Operation::RevokeAccess, session.as_ref(), |r| {
            r.grants.remove(principal);
        })
        .await
    }

    /// The session's access record, if it has an owner (readable by whoever may read it).
    pub async fn access_record(&self, session: impl AsRef<str>) -> Result<Option<AccessRecord>> {
        self.run(Operation::AccessRecord, session.as_ref().into(), |cx| async move {
            Ok(cx.store.access.get(&cx.sid))
        })
        .await
    }

    /// Saves `state` as the session's state, replacing the previous one. Durable on `Ok`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// manager.save_session("s1", &serde_json::json!({"step": 1})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn save_session<T: Serialize + ?Sized>(
        &self,
        session: impl AsRef<str>,
        state: &T,
    ) -> Result<()> {
        let encode = |_: &SessionId| self.encode(state);
        self.request(
            Operation::SaveSession,
            session.as_ref().into(),
            encode,
            |cx, state| async move { cx.call(|reply| SessionMsg::Save { state, reply }).await },
        )
        .await
    }

    /// Loads the session's state as JSON; `Ok(None)` if it has none. A damaged record is
    /// [`StateError::Corrupt`], never `None`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// assert_eq!(manager.load_session("nobody").await?, None);
    /// # Ok(()) }
    /// ```
    pub async fn load_session(&self, session: impl AsRef<str>) -> Result<Option<Value>> {
        self.load_as(Operation::LoadSession, session.as_ref()).await
    }

    /// Loads the session's state into `T`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    /// struct Run { step: u32 }
    /// manager.save_session("s1", &Run { step: 7 }).await?;
    /// assert_eq!(manager.load_session_as::<Run>("s1").await?, Some(Run { step: 7 }));
    /// # Ok(()) }
    /// ```
    pub async fn load_session_as<T: DeserializeOwned>(
        &self,
        session: impl AsRef<str>,
    ) -> Result<Option<T>> {
        self.load_as(Operation::LoadSessionAs, session.as_ref()).await
    }

    /// Loads the session's state as its compact JSON bytes, without parsing them; `Ok(None)`
    /// if it has none. While the session's actor is live these are the very bytes it holds
    /// (shared, not copied), so this is the cheapest way to read a state that is passed on
    /// as JSON or parsed by the caller ([`StateBytes::deserialize`]). Same access check,
    /// same answers and errors as [`load_session`](Self::load_session).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// manager.save_session("s1", &serde_json::json!({"step": 1})).await?;
    /// let bytes = manager.load_session_bytes("s1").await?.unwrap();
    /// assert_eq!(bytes.as_bytes(), br#"{"step":1}"#);
    /// assert_eq!(manager.load_session_bytes("nobody").await?, None);
    /// # Ok(()) }
    /// ```
    pub async fn load_session_bytes(&self, session: impl AsRef<str>) -> Result<Option<StateBytes>> {
        self.run(Operation::LoadSessionBytes, session.as_ref().into(), |cx| async move {
            self.load_state(&cx).await
        })
        .await
    }

    /// Deletes the session's state and all its checkpoints; returns whether anything
    /// existed. Crash-safe: an interrupted delete is finished at the next start. A delete
    /// that fails part way returns the error and leaves the rest, still owned by the same
    /// principal (who may retry); the session's next write finishes it first, or fails
    /// with the same error and writes nothing.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// manager.save_session("s1", &1).await?;
    /// assert!(manager.delete_session("s1").await?);
    /// assert!(!manager.delete_session("s1").await?);
    /// # Ok(()) }
    /// ```
    pub async fn delete_session(&self, session: impl AsRef<str>) -> Result<bool> {
        self.run(Operation::DeleteSession, session.as_ref().into(), |cx| async move {
            cx.call(|reply| SessionMsg::Delete { reply }).await
        })
        .await
    }

    /// Every session with a state or checkpoints, sorted by id, from the index (no record
    /// is read). A session whose only state is recorded steps not yet flushed is listed
    /// too (with no bytes stored and `updated_at` 0).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// manager.save_session("s1", &1).await?;
    /// let sessions = manager.list_sessions().await?;
    /// assert_eq!(sessions[0].session_id.as_str(), "s1");
    /// # Ok(()) }
    /// ```
    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>> {
        let store = self.store()?;
        // Other nodes write a shared store: read what they wrote first.
        store.refresh_all().await?;
        let memory_only = self.rt()?.memory_only_sessions();
        let mut sessions = store.index().list_sessions(memory_only);
        sessions.retain(|s| self.can_read(&store, &s.session_id));
        if store.shared {
            self.add_owners(&store, &mut sessions).await?;
        }
        Ok(sessions)
    }

    /// Stores a checkpoint of `state` for the session on `branch`, durably, and returns its
    /// id. Ids are ordered by creation within a session, even within one millisecond.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
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
        let (session, branch) = (session.as_ref(), branch.as_ref());
        self.checkpoint(
            Operation::CreateCheckpoint,
            session,
            branch,
            state,
            CheckpointReason::Manual,
        )
        .await
    }

    /// Reads a checkpoint by id alone (also after a restart); `Ok(None)` if there is none.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// let id = manager.create_checkpoint("s1", "main", &serde_json::json!({"step": 25})).await?;
    /// let cp = manager.restore_checkpoint(&id).await?.unwrap();
    /// assert_eq!(cp.data["step"], 25);
    /// assert_eq!(cp.branch_id.as_str(), "main");
    /// # Ok(()) }
    /// ```
    pub async fn restore_checkpoint(&self, id: &CheckpointId) -> Result<Option<Checkpoint>> {
        self.restore(Operation::RestoreCheckpoint, id).await
    }

    /// Like [`restore_checkpoint`](Self::restore_checkpoint), deserializing into `T`.
    pub async fn restore_checkpoint_as<T: DeserializeOwned>(
        &self,
        id: &CheckpointId,
    ) -> Result<Option<Checkpoint<T>>> {
        self.restore(Operation::RestoreCheckpointAs, id).await
    }

    /// Makes the checkpoint's state the session's state, atomically and durably.
    /// [`StateError::CheckpointNotFound`] if there is no such checkpoint.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// let id = manager.create_checkpoint("s1", "main", &serde_json::json!({"step": 1})).await?;
    /// manager.save_session("s1", &serde_json::json!({"step": 9})).await?;
    /// manager.rollback_to_checkpoint(&id).await?;
    /// assert_eq!(manager.load_session("s1").await?, Some(serde_json::json!({"step": 1})));
    /// # Ok(()) }
    /// ```
    pub async fn rollback_to_checkpoint(&self, id: &CheckpointId) -> Result<()> {
        self.rollback(Operation::RollbackToCheckpoint, id, false).await
    }

    /// Like [`rollback_to_checkpoint`](Self::rollback_to_checkpoint), and also deletes the
    /// checkpoints taken after `id` on its branch, so the branch ends at `id` again.
    /// (Without truncation, later checkpoints are kept and the next checkpoint on the branch
    /// starts a fork whose parent is `id`.)
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// let a = manager.create_checkpoint("s1", "main", &1).await?;
    /// manager.create_checkpoint("s1", "main", &2).await?;
    /// manager.rollback_and_truncate(&a).await?;
    /// assert_eq!(manager.list_checkpoints("s1").await?.len(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn rollback_and_truncate(&self, id: &CheckpointId) -> Result<()> {
        self.rollback(Operation::RollbackAndTruncate, id, true).await
    }

    /// The session's checkpoints, oldest first, from the index (no state is read).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// manager.create_checkpoint("s1", "main", &1).await?;
    /// assert_eq!(manager.list_checkpoints("s1").await?.len(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn list_checkpoints(&self, session: impl AsRef<str>) -> Result<Vec<CheckpointInfo>> {
        self.run(Operation::ListCheckpoints, session.as_ref().into(), |cx| async move {
            if cx.store.shared && (!cx.rt.leases.holds(&cx.sid) || cx.store.is_unsure(&cx.sid)) {
                // Another node may be writing it: read its checkpoints again.
                cx.store.refresh_session(&cx.sid, false).await?;
            }
            Ok(cx.store.index().list_checkpoints(&cx.sid))
        })
        .await
    }

    /// Deletes all but the `keep` newest checkpoints of the session; returns how many went.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// for i in 0..5 { manager.create_checkpoint("s1", "main", &i).await?; }
    /// assert_eq!(manager.cleanup_checkpoints("s1", 3).await?, 2);
    /// # Ok(()) }
    /// ```
    pub async fn cleanup_checkpoints(
        &self,
        session: impl AsRef<str>,
        keep: usize,
    ) -> Result<usize> {
        self.run(Operation::CleanupCheckpoints, session.as_ref().into(), |cx| async move {
            cx.call(|reply| SessionMsg::CleanupCheckpoints { keep, reply }).await
        })
        .await
    }

    /// Reads the state, applies `f`, and saves the result, with no other request for the
    /// session in between. If `f` returns an error (or panics) nothing is written and the
    /// error is returned as [`StateError::UpdateRejected`] (or [`StateError::Panicked`]).
    ///
    /// `f` runs inside the session's actor. On tokio's multi-thread runtime it runs under
    /// [`tokio::task::block_in_place`], so a slow or blocking `f` holds up only its own
    /// session: other sessions go on, and the caller's
    /// [`call_timeout`](crate::StateManagerBuilder::call_timeout) fires on time (the outcome
    /// is then unknown: `f` may still finish and its result be saved). On a current-thread
    /// runtime a blocking `f` blocks the whole runtime: keep it short there.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// use serde_json::{json, Value};
    /// let new = manager.transactional_update("s1", |old: Option<Value>| {
    ///     let n = old.and_then(|v| v["n"].as_i64()).unwrap_or(0);
    ///     Ok::<_, std::io::Error>(json!({"n": n + 1}))
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
        self.run(Operation::TransactionalUpdate, session.as_ref().into(), |cx| async move {
            let slot: Arc<std::sync::Mutex<Option<T>>> = Arc::new(std::sync::Mutex::new(None));
            let out = slot.clone();
            let name = cx.sid.to_string();
            let update: UpdateFn = Box::new(move |old: Option<&[u8]>| {
                let ser = |e: serde_json::Error| StateError::json(name.as_str(), &e);
                let old: Option<T> = old.map(serde_json::from_slice).transpose().map_err(ser)?;
                let new = f(old).map_err(|e| StateError::UpdateRejected {
                    session: name.clone(),
                    source: e.into(),
                })?;
                let bytes = serde_json::to_vec(&new).map_err(ser)?;
                *crate::sync::lock(&out) = Some(new);
                Ok(bytes)
            });
            let bytes = cx.call(|reply| SessionMsg::Update { update, reply }).await?;
            let kept = crate::sync::lock(&slot).take();
            match kept {
                Some(v) => Ok(v),
                None => bytes.deserialize(),
            }
        })
        .await
    }

    /// Totals over the store, from the index.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// manager.save_session("s1", &1).await?;
    /// let stats = manager.get_storage_stats().await?;
    /// assert_eq!(stats.session_count, 1);
    /// # Ok(()) }
    /// ```
    pub async fn get_storage_stats(&self) -> Result<StorageStats> {
        let store = self.store()?;
        let memory_only = self.rt()?.memory_only_sessions();
        let idx = store.index();
        Ok(idx.stats_where(memory_only, |sid| self.can_read(&store, sid)))
    }

    /// Deletes sessions (state and checkpoints) whose last save or checkpoint is older than
    /// `older_than`, always keeping the `keep_last` most recently active ones. Returns how
    /// many were deleted. A session saved while this runs is kept.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// use std::time::Duration;
    /// manager.save_session("s1", &1).await?;
    /// assert_eq!(manager.cleanup_old_sessions(Duration::from_secs(86_400), 0).await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn cleanup_old_sessions(
        &self,
        older_than: Duration,
        keep_last: usize,
    ) -> Result<usize> {
        let store = self.maintenance(Operation::CleanupOldSessions)?;
        let cutoff = store.clock.now_ms().saturating_sub(older_than.as_millis() as u64);
        drop(store);
        let shared = self.shared().await?;
        Ok(janitor::remove_idle_sessions(&self.inner.supervisor, &shared, cutoff, keep_last)
            .await?
            .0)
    }

    /// Removes staged files of interrupted writes, finishes interrupted deletes, and
    /// rebuilds the index from every record (reporting damaged ones).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// manager.save_session("s1", &1).await?;
    /// let report = manager.vacuum_storage().await?;
    /// assert_eq!(report.index_entries, 1);
    /// # Ok(()) }
    /// ```
    pub async fn vacuum_storage(&self) -> Result<VacuumReport> {
        let store = self.maintenance(Operation::VacuumStorage)?;
        // On a shared store, also the deletes other nodes left part way.
        store.note_pending_deletes().await?;
        let deleting = store.deleting();
        drop(store);
        // Deletes that failed part way are finished through their session actors, which
        // drop what they cached of the session; the pass below finishes any other marker
        // (on a store with one writer).
        let mut finished = 0;
        for sid in deleting {
            let finish = |reply| InternalMsg::FinishDelete { reply }.into();
            match self.call(Operation::VacuumStorage, &sid, finish).await {
                Ok(done) => finished += usize::from(done),
                // Held by another node: its holder finishes the delete before it writes.
                Err(StateError::OwnedElsewhere { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let mut report = self.on_storage(|store| async move { store.vacuum().await }).await?;
        report.orphans_removed += finished;
        Ok(report)
    }

    /// Runs one janitor pass now (sweep, retention) and returns what it did.
    pub async fn run_janitor_now(&self) -> Result<VacuumReport> {
        self.maintenance(Operation::RunJanitorNow)?;
        let janitor =
            supervisor::ask(&self.inner.supervisor, |reply| SupervisorMsg::Janitor { reply })
                .await?
                .ok_or_else(|| StateError::unavailable("the janitor is not running"))?;
        actor::ask(&janitor, "the janitor stopped during its pass", |reply| JanitorMsg::RunNow {
            reply,
        })
        .await?
    }

    /// The session's actor, for orchestrators that are ractor actors themselves and want
    /// to message it directly with [`SessionMsg`]. It passivates when idle; after that,
    /// sends fail with `SendErr` and you ask again.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// use mars_state::{SessionMsg, StateBytes};
    /// let actor = manager.session_actor("s1").await?;
    /// let state = StateBytes::from_serialize(&serde_json::json!({"step": 3}))?;
    /// ractor::call!(actor, |reply| SessionMsg::Save { state, reply }).unwrap()?;
    /// assert_eq!(manager.load_session("s1").await?, Some(serde_json::json!({"step": 3})));
    /// # Ok(()) }
    /// ```
    pub async fn session_actor(&self, session: impl AsRef<str>) -> Result<ActorRef<SessionMsg>> {
        self.run(Operation::SessionActor, session.as_ref().into(), |cx| async move {
            supervisor::get_session(&self.inner.supervisor, &cx.sid).await
        })
        .await
    }

    /// How many session actors are alive (not passivated) right now.
    pub async fn live_session_actors(&self) -> Result<usize> {
        supervisor::ask(&self.inner.supervisor, |reply| SupervisorMsg::LiveSessions { reply }).await
    }

    /// Sets the session's [`CheckpointPolicy`] (for this process's life; an orchestrator
    /// sets it again when it resumes a run after a restart). The builder's
    /// [`checkpoint_policy`](StateManagerBuilder::checkpoint_policy) is the default.
    pub async fn set_checkpoint_policy(
        &self,
        session: impl AsRef<str>,
        policy: CheckpointPolicy,
    ) -> Result<()> {
        self.run(Operation::SetCheckpointPolicy, session.as_ref().into(), |cx| async move {
            cx.call(|reply| SessionMsg::SetPolicy { policy, reply }).await
        })
        .await
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
    ///     let state = serde_json::json!({"step": step});
    ///     if manager.record_step("run", step, &state).await?.is_some() {
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
        // Serialized before access control may claim the session for this write.
        let encode = |_: &SessionId| self.encode(state);
        self.request(
            Operation::RecordStep,
            session.as_ref().into(),
            encode,
            |cx, state| async move {
                cx.call(|reply| SessionMsg::RecordStep { step, state, reply }).await
            },
        )
        .await
    }

    /// Takes a checkpoint marked [`CheckpointReason::BeforeRisky`], for an orchestrator
    /// about to do something it may want to undo.
    pub async fn checkpoint_before_risky<T: Serialize + ?Sized>(
        &self,
        session: impl AsRef<str>,
        branch: impl AsRef<str>,
        state: &T,
    ) -> Result<CheckpointId> {
        let (session, branch) = (session.as_ref(), branch.as_ref());
        self.checkpoint(
            Operation::CheckpointBeforeRisky,
            session,
            branch,
            state,
            CheckpointReason::BeforeRisky,
        )
        .await
    }

    /// Pauses the session: saves `state` with status [`SessionStatus::Paused`], the pause
    /// time and `reason`, and takes a checkpoint ([`CheckpointReason::Pause`]). Returns that
    /// checkpoint. Another process can [`resume_session`](Self::resume_session) it later.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// use mars_state::SessionStatus;
    /// let state = serde_json::json!({"step": 7});
    /// manager.pause_session("run", &state, "waiting for approval").await?;
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
        let (paused, reason) = (SessionStatus::Paused, Some(reason.into()));
        self.set_status(Operation::PauseSession, session.as_ref(), paused, reason, Some(state))
            .await?
            .ok_or_else(|| StateError::unavailable("pause took no checkpoint"))
    }

    /// Resumes the session: marks it [`SessionStatus::Running`] (durably) and returns its
    /// state (`None` if it has none).
    pub async fn resume_session(&self, session: impl AsRef<str>) -> Result<Option<Value>> {
        self.resume(Operation::ResumeSession, session.as_ref()).await
    }

    /// Like [`resume_session`](Self::resume_session), deserializing into `T`.
    pub async fn resume_session_as<T: DeserializeOwned>(
        &self,
        session: impl AsRef<str>,
    ) -> Result<Option<T>> {
        self.resume(Operation::ResumeSessionAs, session.as_ref()).await
    }

    /// Saves the final `state` and marks the session [`SessionStatus::Completed`].
    pub async fn complete_session<T: Serialize + ?Sized>(
        &self,
        session: impl AsRef<str>,
        state: &T,
    ) -> Result<()> {
        let completed = SessionStatus::Completed;
        self.set_status(Operation::CompleteSession, session.as_ref(), completed, None, Some(state))
            .await
            .map(|_| ())
    }

    /// Marks the session [`SessionStatus::Failed`] with `reason`, keeping its state.
    pub async fn fail_session(
        &self,
        session: impl AsRef<str>,
        reason: impl Into<String>,
    ) -> Result<()> {
        let (failed, reason) = (SessionStatus::Failed, Some(reason.into()));
        self.set_status::<Value>(Operation::FailSession, session.as_ref(), failed, reason, None)
            .await
            .map(|_| ())
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
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// manager.create_checkpoint("run", "main", &serde_json::json!({"step": 3})).await?;
    /// let recovery = manager.recover_session("run").await?;
    /// assert_eq!(recovery.checkpoint.unwrap().data["step"], 3);
    /// assert!(recovery.skipped.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn recover_session(&self, session: impl AsRef<str>) -> Result<Recovery> {
        self.run(Operation::RecoverSession, session.as_ref().into(), |cx| async move {
            self.recover(&cx).await
        })
        .await
    }

    /// Live change events of one session, in the order they were applied. On a handle
    /// from [`for_principal`](Self::for_principal) the watch is checked at every event, not
    /// just now: once the principal may not read the session (access revoked, or an id that
    /// did not exist yet created by someone else) it ends with
    /// [`WatchError::AccessDenied`](crate::WatchError::AccessDenied).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// # let backend = mars_state::MemoryStorageBackend::new();
    /// # let manager = mars_state::StateManager::start(backend).await?;
    /// use mars_state::EventKind;
    /// let mut watch = manager.watch("s1").await?;
    /// manager.save_session("s1", &1).await?;
    /// assert_eq!(watch.recv().await.unwrap().kind, EventKind::Saved);
    /// # Ok(()) }
    /// ```
    pub async fn watch(&self, session: impl AsRef<str>) -> Result<Watch> {
        self.run(Operation::Watch, session.as_ref().into(), |cx| async move {
            // Checked again at every event: access taken back, or a session that did not
            // exist yet created by someone else, ends the watch (see `Watch`).
            let reader = self.principal.clone().filter(|p| !cx.store.access.is_admin(p));
            Ok(Watch::new(cx.rt.subscribe(), Some(cx.sid), reader))
        })
        .await
    }

    /// Live change events of every session (administrators and the unscoped manager only).
    pub async fn watch_all(&self) -> Result<Watch> {
        self.maintenance(Operation::WatchAll)?;
        let rx = self.rt()?.subscribe();
        Ok(Watch::new(rx, None, None))
    }

    /// Rewrites every record stored at an older schema version at the current one (see
    /// [`schema_version`](StateManagerBuilder::schema_version)). Loads migrate in memory
    /// without this; the pass makes it permanent. Each record is rewritten atomically and
    /// records already current are skipped, so a pass that was interrupted is simply run
    /// again.
    pub async fn migrate_store(&self) -> Result<MigrationReport> {
        let sessions: Vec<SessionId> =
            self.maintenance(Operation::MigrateStore)?.index().sessions.keys().cloned().collect();
        let mut total = MigrationReport::default();
        for sid in sessions {
            let r = self
                .call(Operation::MigrateStore, &sid, |reply| SessionMsg::Migrate { reply })
                .await?;
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
        self.maintenance(Operation::RotateKey)?;
        self.crypt()?.rotate_to(new.into()).await?;
        self.reencrypt(Operation::RotateKey).await
    }

    /// Rewrites every record still sealed under an older key with the current one, then
    /// retires the older keys. Idempotent: run it again after an interruption.
    #[cfg(feature = "encryption")]
    pub async fn finish_key_rotation(&self) -> Result<usize> {
        self.maintenance(Operation::FinishKeyRotation)?;
        self.reencrypt(Operation::FinishKeyRotation).await
    }

    /// Finishes every queued request, stops the actors and releases the store. Later calls
    /// on any clone of this handle fail with [`StateError::Unavailable`].
    pub async fn shutdown(&self) -> Result<()> {
        match self.maintenance(Operation::Shutdown) {
            // Dropped at once: the wait below is for the last reference to go.
            Ok(store) => drop(store),
            // Shut down already (through this handle or a clone).
            Err(StateError::Unavailable { .. }) => return Ok(()),
            Err(e) => return Err(e),
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
