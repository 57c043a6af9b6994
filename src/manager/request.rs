//! The one path every request of the handle takes: [`StateManager::request`] validates the
//! id, checks access (a first write claims the session, durably), names the operation
//! (tracing span, timeout and error messages), and [`Ctx::call`] sends the session actor
//! its message under the call timeout.
//! Owns the handle's plumbing: access checks and access-record writes, serializing a state
//! against the size limit, calls to the session actors and jobs on the storage actor.
//! Calls [`crate::access`] (the table), the store (access records, the index), and the
//! actors (`call_session`, the supervisor, the storage actor).

use std::future::Future;
use std::sync::Arc;

use ractor::RpcReplyPort;
use serde::Serialize;
use tracing::Instrument;

use super::StateManager;
use crate::access::{AccessRecord, Decision};
use crate::actor::session::{InternalMsg, SessionMsg};
use crate::actor::supervisor::{self, SupervisorMsg};
use crate::actor::{Runtime, call_session, storage};
use crate::error::{Operation, Result, StateError};
use crate::store::{AccessRule, Store};
use crate::types::{CheckpointId, SessionId, StateBytes};

/// What a request is about: a session named by the caller, or the session of a checkpoint.
#[derive(Clone, Copy)]
pub(super) enum Target<'a> {
    /// A session id, validated before anything else.
    Session(&'a str),
    /// A checkpoint id, looked up in the index ([`StateError::CheckpointNotFound`] if it is
    /// not there).
    Checkpoint(&'a CheckpointId),
}

impl<'a> From<&'a str> for Target<'a> {
    fn from(session: &'a str) -> Self {
        Target::Session(session)
    }
}

/// An authorized request: its operation, its session and the store. Consumed by
/// [`call`](Self::call), so a request sends at most what its body sends.
pub(super) struct Ctx<'h> {
    pub(super) handle: &'h StateManager,
    pub(super) op: Operation,
    pub(super) sid: SessionId,
    pub(super) store: Arc<Store>,
    /// The actors' live state (hot map, events, directory).
    pub(super) rt: Arc<Runtime>,
}

impl Ctx<'_> {
    /// Sends the session actor the message `build` makes and waits for its reply, under the
    /// call timeout ([`StateError::Timeout`] names this request's operation).
    pub(super) async fn call<R: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<Result<R>>) -> SessionMsg,
    ) -> Result<R> {
        self.handle.call(self.op, &self.sid, build).await
    }
}

/// The `prepare` step of a request that has nothing to prepare.
fn no_prep(_: &SessionId) -> Result<()> {
    Ok(())
}

/// A state serialization error names the session it is about.
pub(super) fn ser_err(session: &SessionId, e: StateError) -> StateError {
    match e {
        StateError::Serialization { detail, .. } => {
            StateError::Serialization { session: session.to_string(), detail }
        }
        other => other,
    }
}

impl StateManager {
    /// Runs one request on a session: validates the id (a rejected id touches nothing),
    /// runs `prepare` (serializing a state: before access control, so a state that cannot
    /// be stored never claims a session), checks access for `op`, then runs `body` in a
    /// tracing span named for `op`. Errors that concern the session's state name it.
    pub(super) async fn request<'h, P, R, Fut>(
        &'h self,
        op: Operation,
        target: Target<'_>,
        prepare: impl FnOnce(&SessionId) -> Result<P>,
        body: impl FnOnce(Ctx<'h>, P) -> Fut,
    ) -> Result<R>
    where
        Fut: Future<Output = Result<R>>,
    {
        let sid = match target {
            Target::Session(session) => SessionId::new(session)?,
            Target::Checkpoint(id) => {
                let store = self.store()?;
                let known = store.index().by_checkpoint.get(id).cloned();
                let known = match known {
                    // On a shared store, another node may have made it: read the records
                    // again before saying there is none.
                    None if store.shared => {
                        store.refresh_all().await?;
                        store.index().by_checkpoint.get(id).cloned()
                    }
                    known => known,
                };
                known.ok_or_else(|| StateError::CheckpointNotFound { id: id.to_string() })?
            }
        };
        let span = tracing::debug_span!("request", operation = op.name(), session = %sid);
        let prepared = prepare(&sid).map_err(|e| ser_err(&sid, e))?;
        let run = async {
            let (store, rt) = (self.store()?, self.rt()?);
            self.authorize(op, &sid, &store, &rt).await?;
            body(Ctx { handle: self, op, sid: sid.clone(), store, rt }, prepared).await
        };
        run.instrument(span).await.map_err(|e| ser_err(&sid, e))
    }

    /// [`request`](Self::request) for a request with nothing to prepare (no state to
    /// serialize).
    pub(super) async fn run<'h, R, Fut>(
        &'h self,
        op: Operation,
        target: Target<'_>,
        body: impl FnOnce(Ctx<'h>) -> Fut,
    ) -> Result<R>
    where
        Fut: Future<Output = Result<R>>,
    {
        self.request(op, target, no_prep, |cx, ()| body(cx)).await
    }

    /// Checks a store-wide operation (administrators and the unscoped manager only).
    pub(super) fn maintenance(&self, op: Operation) -> Result<Arc<Store>> {
        let store = self.store()?;
        if let Some(p) = &self.principal {
            store.access.check_maintenance(p, op)?;
        }
        Ok(store)
    }

    /// Checks `op` on `sid` for this handle's principal; a first write claims the session,
    /// and its access record is made durable before the request goes on.
    ///
    /// A claim that fails leaves nothing: the in-memory claim (taken by the check, so no
    /// other principal can claim meanwhile) is undone, and the access record is written
    /// last, so an error before it leaves none on disk, and the put is atomic.
    async fn authorize(
        &self,
        op: Operation,
        sid: &SessionId,
        store: &Store,
        rt: &Runtime,
    ) -> Result<()> {
        let Some(p) = &self.principal else { return Ok(()) };
        if store.shared && !rt.leases.holds(sid) {
            // Another node may have claimed the session, or changed who may use it.
            store.refresh_access(sid, AccessRule::Keep).await?;
        }
        match store.access.check(p, op, sid, rt.exists(sid), store.clock.now_ms())? {
            Decision::Allow => Ok(()),
            Decision::Claim(record) => {
                // A live actor of this session served it before this claim (under another
                // owner, since deleted, or none): references to it may have been handed
                // out. Retire it, so none of them reaches the new owner's session. Done
                // before the record is written: a retire that fails (times out) must not
                // leave a durable claim on a session the request never reached.
                let claimed = async {
                    if rt.actors.get(sid).is_some() {
                        self.call(Operation::Claim, sid, |reply| {
                            InternalMsg::Retire { reply }.into()
                        })
                        .await?;
                    }
                    self.put_access(sid, &record).await
                };
                let outcome = claimed.await;
                if outcome.is_err() {
                    store.access.unclaim(sid, &record.owner);
                }
                outcome
            }
        }
    }

    /// Whether this handle's principal may read `sid` (for filtering listings).
    pub(super) fn can_read(&self, store: &Store, sid: &SessionId) -> bool {
        self.principal.as_ref().is_none_or(|p| store.access.can_read(p, sid))
    }

    /// Changes the session's access record (grant, revoke), durably.
    pub(super) async fn change_access(
        &self,
        op: Operation,
        session: &str,
        change: impl FnOnce(&mut AccessRecord) + Send,
    ) -> Result<()> {
        self.request(
            op,
            session.into(),
            |_| Ok(()),
            |cx, ()| async move {
                let Some(mut record) = cx.store.access.get(&cx.sid) else {
                    return Err(StateError::Config {
                        message: format!("session {} has no owner to grant from", cx.sid),
                    });
                };
                change(&mut record);
                self.put_access(&cx.sid, &record).await?;
                cx.store.access.set(&cx.sid, record);
                Ok(())
            },
        )
        .await
    }

    /// Serializes a state and checks it against the size limit.
    pub(super) fn encode<T: Serialize + ?Sized>(&self, state: &T) -> Result<StateBytes> {
        let state = StateBytes::from_serialize(state)?;
        let limit = self.inner.config.max_state_bytes;
        if state.len() > limit {
            return Err(StateError::TooLarge { size: state.len(), limit });
        }
        Ok(state)
    }

    /// Runs a job on the current storage actor (the supervisor may have restarted it).
    pub(super) async fn on_storage<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Store>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let storage =
            supervisor::ask(&self.inner.supervisor, |reply| SupervisorMsg::Storage { reply })
                .await?;
        storage::run(&storage, f).await
    }

    /// Makes a session's access record durable (before the request it guards goes on).
    async fn put_access(&self, sid: &SessionId, record: &AccessRecord) -> Result<()> {
        let (s, r) = (sid.clone(), record.clone());
        self.on_storage(move |store| async move { store.put_access(&s, &r).await }).await
    }

    /// The store, while the manager runs.
    pub(super) fn store(&self) -> Result<Arc<Store>> {
        self.inner
            .store
            .upgrade()
            .ok_or_else(|| StateError::unavailable("the state manager is shut down"))
    }

    /// The actors' live state, while the manager runs.
    pub(super) fn rt(&self) -> Result<Arc<Runtime>> {
        self.inner
            .rt
            .upgrade()
            .ok_or_else(|| StateError::unavailable("the state manager is shut down"))
    }

    /// Sends `sid`'s session actor a message, under the call timeout, for `op`.
    pub(super) async fn call<R: Send + 'static>(
        &self,
        op: Operation,
        sid: &SessionId,
        build: impl FnOnce(RpcReplyPort<Result<R>>) -> SessionMsg,
    ) -> Result<R> {
        let rt = self.rt()?;
        call_session(
            &self.inner.supervisor,
            &rt.actors,
            self.inner.config.call_timeout,
            op,
            sid,
            build,
        )
        .await
    }
}
