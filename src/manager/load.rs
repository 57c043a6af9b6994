//! The handle's read paths: a session's state (from the live actor's published state,
//! else read straight from the store, else through the actor), a checkpoint, and the
//! recovery report.
//! Owns the rules that let a load skip the session actor (see [`StateManager::load_state`]).
//! Calls the store (hot map, record reads, index), the storage actor for checkpoint reads,
//! [`crate::config`] to bring a record to the current schema, and the session actor when a
//! record needs migrating.

use serde::de::DeserializeOwned;

use super::StateManager;
use super::request::{Ctx, Target, ser_err};
use crate::actor::session::{InternalMsg, SessionMsg};
use crate::error::{Operation, Result, StateError};
use crate::store::codec::RecordHead;
use crate::types::{
    Checkpoint, CheckpointId, CheckpointInfo, Recovery, SessionStatus, SkippedCheckpoint,
    StateBytes,
};

impl StateManager {
    /// Loads the session's state into `T` (for `load_session` and `load_session_as`).
    pub(super) async fn load_as<T: DeserializeOwned>(
        &self,
        op: Operation,
        session: &str,
    ) -> Result<Option<T>> {
        self.run(op, session.into(), |cx| async move {
            self.load_state(&cx).await?.map(|s| s.deserialize()).transpose()
        })
        .await
    }

    /// Reads a checkpoint by id (for `restore_checkpoint` and `restore_checkpoint_as`);
    /// `Ok(None)` if there is none.
    pub(super) async fn restore<T: DeserializeOwned>(
        &self,
        op: Operation,
        id: &CheckpointId,
    ) -> Result<Option<Checkpoint<T>>> {
        let read = self.run(op, Target::Checkpoint(id), |cx| async move {
            self.read_checkpoint(&cx, id).await
        });
        match read.await {
            // Not in the index: there is no such checkpoint (to read; a rollback says so).
            Err(StateError::CheckpointNotFound { .. }) => Ok(None),
            r => r,
        }
    }

    /// The session's current state, for an authorized request: from the live actor's
    /// published state, else read straight from the store, else (a record that needs
    /// migrating) through the session actor.
    pub(super) async fn load_state(&self, cx: &Ctx<'_>) -> Result<Option<StateBytes>> {
        let (store, sid) = (&cx.store, &cx.sid);
        // A live session's actor publishes its state: no message needed.
        if let Some(state) = cx.rt.hot(sid) {
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
            return Ok(cx.rt.hot(sid).unwrap_or(None));
        };
        match &d.head {
            RecordHead::Session { meta, .. }
                if meta.schema == self.inner.config.migrations.current =>
            {
                Ok(cx.rt.hot(sid).unwrap_or_else(|| Some(d.state())))
            }
            _ => cx.call(|reply| SessionMsg::Load { reply }).await,
        }
    }

    /// Reads checkpoint `id` of the request's session, brought to the current schema.
    async fn read_checkpoint<T: DeserializeOwned>(
        &self,
        cx: &Ctx<'_>,
        id: &CheckpointId,
    ) -> Result<Option<Checkpoint<T>>> {
        let (s, cid) = (cx.sid.clone(), id.clone());
        let decoded = self
            .on_storage(move |store| async move { store.load_checkpoint(&s, &cid).await })
            .await?;
        let Some(d) = decoded else { return Ok(None) };
        let RecordHead::Checkpoint { session_id, checkpoint_id, branch_id, timestamp, meta } =
            d.head.clone()
        else {
            return Err(StateError::corrupt(id, "not a checkpoint record"));
        };
        let state = self.inner.config.migrations.state_of(&cx.sid, &d)?.state;
        let data = state.deserialize().map_err(|e| ser_err(&cx.sid, e))?;
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

    /// What a run needs to pick up after a crash (see `recover_session`).
    pub(super) async fn recover(&self, cx: &Ctx<'_>) -> Result<Recovery> {
        let (store, sid) = (&cx.store, &cx.sid);
        if store.shared {
            // Recovery takes the session over: its lease (waiting for a dead node's to run
            // out), which also reads what other nodes wrote and marks it interrupted if its
            // last holder let the lease run out while it was running.
            cx.call(|reply| InternalMsg::Own { reply }.into()).await?;
        }
        let (interrupted, status, status_reason, status_at) = {
            let idx = store.index();
            let record = idx.sessions.get(sid).and_then(|e| e.record.clone());
            let status = record.as_ref().map_or(SessionStatus::Running, |r| r.status);
            let (reason, at) = record.map_or((None, None), |r| (r.reason, r.status_at));
            (idx.interrupted.contains(sid), status, reason, at)
        };
        let state = match self.load_state(cx).await {
            Ok(s) => s.map(|s| s.deserialize()).transpose()?,
            // A damaged session record: recovery falls back to the checkpoints.
            Err(StateError::Corrupt { .. }) => None,
            Err(e) => return Err(e),
        };
        let mut skipped = Vec::new();
        let mut checkpoint = None;
        let newest_first: Vec<CheckpointInfo> =
            store.index().list_checkpoints(sid).into_iter().rev().collect();
        for info in newest_first {
            match self.read_checkpoint(cx, &info.id).await {
                Ok(Some(cp)) => {
                    checkpoint = Some(cp);
                    break;
                }
                Ok(None) => {}
                Err(
                    e @ (StateError::Corrupt { .. }
                    | StateError::Migration { .. }
                    | StateError::Serialization { .. }),
                ) => skipped.push(SkippedCheckpoint { id: info.id, reason: e.to_string() }),
                Err(e) => return Err(e),
            }
        }
        Ok(Recovery { state, status, status_reason, status_at, interrupted, checkpoint, skipped })
    }
}

impl StateManager {
    /// Fills in each listed session's owner and lease expiry from its lease (a shared
    /// store), and marks interrupted a running session whose last holder let its lease run
    /// out.
    pub(super) async fn add_owners(
        &self,
        store: &crate::store::Store,
        sessions: &mut [crate::types::SessionInfo],
    ) -> Result<()> {
        for s in sessions {
            let name = crate::actor::lease::lease_name(&s.session_id);
            let Some(lease) = store.backend.read_lease(&name).await? else { continue };
            match lease.expires_in {
                Some(left) => {
                    s.owner = Some(lease.node);
                    s.lease_until = Some(crate::actor::lease::until_ms(&store.clock, left));
                }
                None if !lease.released && s.status == SessionStatus::Running => {
                    s.interrupted = true;
                }
                None => {}
            }
        }
        Ok(())
    }
}
