//! The bodies that pairs of the handle's public methods share (the two checkpoint kinds,
//! the two rollbacks, the status changes, the two resumes, the two key-rotation entries),
//! each taking the [`Operation`] of the public method it serves, so that the method is
//! named in timeouts, spans and errors.
//! Owns nothing of its own. Calls the request helper (`request.rs`), the load path
//! (`load.rs`), the session actors through their messages, and the crypto key ring.

#[cfg(feature = "encryption")]
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StateManager;
use super::request::Target;
use crate::actor;
#[cfg(feature = "encryption")]
use crate::actor::session::InternalMsg;
use crate::actor::session::SessionMsg;
use crate::actor::supervisor::{self, SupervisorMsg};
#[cfg(feature = "encryption")]
use crate::error::StateError;
use crate::error::{Operation, Result};
#[cfg(feature = "encryption")]
use crate::middleware::crypto::KeyRing;
use crate::types::{BranchId, CheckpointId, CheckpointReason, SessionId, SessionStatus};

impl StateManager {
    /// Stores a checkpoint (for `create_checkpoint` and `checkpoint_before_risky`).
    pub(super) async fn checkpoint<T: Serialize + ?Sized>(
        &self,
        op: Operation,
        session: &str,
        branch: &str,
        state: &T,
        reason: CheckpointReason,
    ) -> Result<CheckpointId> {
        // Every id is validated, and the state serialized, before access control may claim
        // the session.
        let prepare = |_: &SessionId| Ok((BranchId::new(branch)?, self.encode(state)?));
        self.request(op, session.into(), prepare, |cx, (branch_id, state)| async move {
            cx.call(|reply| SessionMsg::CreateCheckpoint { branch_id, state, reason, reply }).await
        })
        .await
    }

    /// Rolls back to a checkpoint (for `rollback_to_checkpoint` and `rollback_and_truncate`).
    pub(super) async fn rollback(
        &self,
        op: Operation,
        id: &CheckpointId,
        truncate: bool,
    ) -> Result<()> {
        self.run(op, Target::Checkpoint(id), |cx| async move {
            let checkpoint_id = id.clone();
            cx.call(|reply| SessionMsg::Rollback { checkpoint_id, truncate, reply }).await
        })
        .await
    }

    /// Sets the session's status, saving `state` with it if given (pause, complete, fail).
    pub(super) async fn set_status<T: Serialize + ?Sized>(
        &self,
        op: Operation,
        session: &str,
        status: SessionStatus,
        reason: Option<String>,
        state: Option<&T>,
    ) -> Result<Option<CheckpointId>> {
        let encode = |_: &SessionId| state.map(|s| self.encode(s)).transpose();
        self.request(op, session.into(), encode, |cx, state| async move {
            cx.call(|reply| SessionMsg::SetStatus { status, reason, state, reply }).await
        })
        .await
    }

    /// Marks the session running and returns its state (`None`, and no change, if it has
    /// none).
    pub(super) async fn resume<T: DeserializeOwned>(
        &self,
        op: Operation,
        session: &str,
    ) -> Result<Option<T>> {
        self.run(op, session.into(), |cx| async move {
            let Some(state) = self.load_state(&cx).await? else { return Ok(None) };
            let running = SessionStatus::Running;
            cx.call(|reply| SessionMsg::SetStatus {
                status: running,
                reason: None,
                state: None,
                reply,
            })
            .await?;
            state.deserialize().map(Some)
        })
        .await
    }

    /// Rewrites every record still sealed under an older key with the current one, then
    /// retires the older keys (for `rotate_key` and `finish_key_rotation`).
    #[cfg(feature = "encryption")]
    pub(super) async fn reencrypt(&self, op: Operation) -> Result<usize> {
        let crypt = self.crypt()?;
        // Every session with a record, including those with only an access record (owned,
        // but never saved), which the index does not hold.
        let sessions = self.store()?.reencrypt_sessions().await?;
        let mut rewritten = 0;
        for sid in sessions {
            rewritten +=
                self.call(op, &sid, |reply| InternalMsg::Reencrypt { reply }.into()).await?;
        }
        rewritten += self.on_storage(|store| async move { store.reencrypt_rest().await }).await?;
        crypt.retire_keys_except_current().await?;
        Ok(rewritten)
    }

    /// The encryption layer's key ring, for rotation.
    #[cfg(feature = "encryption")]
    pub(super) fn crypt(&self) -> Result<Arc<dyn KeyRing>> {
        // A read-only manager has no key ring to rotate (its key ring would write below the
        // read-only wrapper): say so, rather than that the store is not encrypted.
        if self.store()?.read_only {
            return Err(StateError::read_only(
                "key rotation",
                "opened with StateManagerBuilder::read_only",
            ));
        }
        match self.inner.crypt.upgrade() {
            Some(c) => Ok(c),
            None if self.inner.store.strong_count() == 0 => {
                Err(StateError::unavailable("the state manager is shut down"))
            }
            None => Err(StateError::Config {
                message: "encryption is not enabled for this store".into(),
            }),
        }
    }

    /// What the janitor's functions need, with the current storage actor.
    pub(super) async fn shared(&self) -> Result<actor::Shared> {
        let storage =
            supervisor::ask(&self.inner.supervisor, |reply| SupervisorMsg::Storage { reply })
                .await?;
        Ok(actor::Shared {
            store: self.store()?,
            rt: self.rt()?,
            storage,
            config: self.inner.config.clone(),
        })
    }
}
