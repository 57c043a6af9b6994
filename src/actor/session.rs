//! The session actor: one per live session id, the only writer of that session.
//!
//! Every save, checkpoint and read-modify-write of a session goes through this actor's
//! mailbox and is finished (durably) before the next one starts, so updates are never
//! lost. It keeps the latest state in memory (write-through), so loads of a live session
//! never touch the disk. It also runs the session's [`CheckpointPolicy`]: steps reported
//! with `RecordStep` update the state in memory, and the actor checkpoints when the policy
//! says (on its own timer for time rules). After an idle timeout it flushes unsaved steps
//! and passivates: it tells the supervisor, closes its mailbox (later sends are refused,
//! not dropped), finishes what was queued and stops. The next request spawns a fresh one.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Shared, storage, supervisor::SupervisorMsg};
use crate::error::{Result, StateError};
use crate::lifecycle::{CheckpointPolicy, EventKind, MigrationReport};
use crate::store::codec::{CheckpointMeta, Fork, RecordHead, SessionMeta};
use crate::sync::lock;
use crate::types::{BranchId, CheckpointId, CheckpointReason, SessionId, SessionStatus, StateBytes};

/// A read-modify-write step run inside the session actor: it receives the current state
/// (JSON) and returns the new one (JSON) or an error, in which case nothing is written.
pub type UpdateFn = Box<dyn FnOnce(Option<&[u8]>) -> Result<Vec<u8>> + Send>;

/// The messages a session actor handles. An orchestrator that is itself a ractor actor
/// can hold the session's `ActorRef<SessionMsg>` (from
/// [`StateManager::session_actor`](crate::StateManager::session_actor)) and use
/// `ractor::call!` / `ractor::cast!` with these variants. Every reply is a `Result`: domain
/// failures travel back in it and never stop the actor.
///
/// A session actor passivates after its idle timeout; sends to it then fail with
/// `MessagingErr::SendErr` (the message was not queued): ask the manager for the actor
/// again.
#[non_exhaustive]
pub enum SessionMsg {
    /// Save the state (replacing the previous one) durably.
    Save {
        /// The new state.
        state: StateBytes,
        /// Receives `Ok(())` once the state is durable.
        reply: RpcReplyPort<Result<()>>,
    },
    /// Load the latest state; `None` if the session has none.
    Load {
        /// Receives the state.
        reply: RpcReplyPort<Result<Option<StateBytes>>>,
    },
    /// Delete the state and every checkpoint; replies whether anything existed.
    Delete {
        /// Receives whether the session existed.
        reply: RpcReplyPort<Result<bool>>,
    },
    /// Store a checkpoint of `state` on `branch_id`.
    CreateCheckpoint {
        /// The branch.
        branch_id: BranchId,
        /// The state to capture.
        state: StateBytes,
        /// Why (normally [`CheckpointReason::Manual`]).
        reason: CheckpointReason,
        /// Receives the new checkpoint's id once it is durable.
        reply: RpcReplyPort<Result<CheckpointId>>,
    },
    /// Report progress: `state` after `step`. Cheap: the state is kept in memory and made
    /// durable (session record plus a checkpoint) when the session's policy says so, or at
    /// the next save, pause, passivation or shutdown.
    RecordStep {
        /// The orchestrator's step number.
        step: u64,
        /// The state after it.
        state: StateBytes,
        /// Receives the checkpoint taken, if the policy took one.
        reply: RpcReplyPort<Result<Option<CheckpointId>>>,
    },
    /// Replace the session's state with a checkpoint's.
    Rollback {
        /// The checkpoint (of this session).
        checkpoint_id: CheckpointId,
        /// Also delete the checkpoints taken after it on its branch (otherwise they are
        /// kept, and the next checkpoint on the branch forks from this one).
        truncate: bool,
        /// Receives `Ok(())` once the session state is durable.
        reply: RpcReplyPort<Result<()>>,
    },
    /// Delete all but the `keep` newest checkpoints; replies how many were removed.
    CleanupCheckpoints {
        /// How many of the newest to keep.
        keep: usize,
        /// Receives the number removed.
        reply: RpcReplyPort<Result<usize>>,
    },
    /// Read-modify-write the state atomically with respect to every other request.
    Update {
        /// The step to run; a panic in it is caught and reported.
        update: UpdateFn,
        /// Receives the new state once it is durable.
        reply: RpcReplyPort<Result<StateBytes>>,
    },
    /// Save `state` (or keep the current one) with a new status, and for a pause, take a
    /// checkpoint. Replies with the checkpoint of a pause.
    SetStatus {
        /// The new status.
        status: SessionStatus,
        /// Why (a pause or failure reason).
        reason: Option<String>,
        /// The state to save with it; `None` keeps the current state.
        state: Option<StateBytes>,
        /// Receives the pause checkpoint (for [`SessionStatus::Paused`]).
        reply: RpcReplyPort<Result<Option<CheckpointId>>>,
    },
    /// Set this session's checkpoint policy (kept in memory for the process's life).
    SetPolicy {
        /// The policy.
        policy: CheckpointPolicy,
        /// Receives `Ok(())`.
        reply: RpcReplyPort<Result<()>>,
    },
    /// Rewrite this session's records that are at an older schema version.
    Migrate {
        /// Receives what was rewritten.
        reply: RpcReplyPort<Result<MigrationReport>>,
    },
    /// Internal: rewrite this session's records under the current encryption key.
    #[doc(hidden)]
    Reencrypt {
        /// Receives how many records were rewritten.
        reply: RpcReplyPort<Result<usize>>,
    },
    /// Delete the session if its last activity is older than `cutoff_ms` (Unix ms).
    DeleteIfIdle {
        /// The cutoff.
        cutoff_ms: u64,
        /// Receives whether it was deleted.
        reply: RpcReplyPort<Result<bool>>,
    },
    /// Internal: finish this session's delete if one failed part way; replies whether it
    /// did.
    #[doc(hidden)]
    FinishDelete {
        /// Receives whether a failed delete was finished.
        reply: RpcReplyPort<Result<bool>>,
    },
    /// Internal: the session was claimed by a new owner; this actor (whose references may
    /// have been handed out under an earlier owner) flushes and stops, and the next
    /// request gets a fresh one.
    #[doc(hidden)]
    Retire {
        /// Receives `Ok(())` once the mailbox is closed.
        reply: RpcReplyPort<Result<()>>,
    },
    /// Internal: the idle timer's tick.
    #[doc(hidden)]
    IdleCheck,
    /// Internal: the checkpoint policy's timer tick.
    #[doc(hidden)]
    TimeCheck,
}

pub(crate) struct SessionActor;

pub(crate) struct SessionArgs {
    pub(crate) sid: SessionId,
    pub(crate) shared: Shared,
    pub(crate) supervisor: ActorRef<SupervisorMsg>,
}

/// The latest state as this actor knows it.
#[derive(Clone)]
struct Current {
    /// `None`: the session has no saved state.
    state: Option<StateBytes>,
    saved_at: u64,
    meta: SessionMeta,
}

pub(crate) struct SessionState {
    sid: SessionId,
    shared: Shared,
    supervisor: ActorRef<SupervisorMsg>,
    /// `None` until read from storage.
    current: Option<Current>,
    /// Steps were recorded that are not durable yet.
    dirty: bool,
    policy: CheckpointPolicy,
    last_checkpoint_step: Option<u64>,
    last_checkpoint_at: Instant,
    /// Newest checkpoint of each branch, the parent of the next one (looked up lazily).
    heads: HashMap<BranchId, Option<CheckpointId>>,
    last_clock: Option<u64>,
    last_activity: Instant,
    passivating: bool,
    idle_timer: Option<JoinHandle<()>>,
    policy_timer: Option<JoinHandle<()>>,
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        let idle = args.shared.config.idle_timeout;
        let tick = (idle / 2).max(Duration::from_millis(10));
        let idle_timer = Some(myself.send_interval(tick, || SessionMsg::IdleCheck));
        let policy = lock(&args.shared.store.policies)
            .get(&args.sid)
            .cloned()
            .unwrap_or_else(|| args.shared.config.checkpoint_policy.clone());
        let mut st = SessionState {
            sid: args.sid,
            shared: args.shared,
            supervisor: args.supervisor,
            current: None,
            dirty: false,
            policy: CheckpointPolicy::default(),
            last_checkpoint_step: None,
            last_checkpoint_at: Instant::now(),
            heads: HashMap::new(),
            last_clock: None,
            last_activity: Instant::now(),
            passivating: false,
            idle_timer,
            policy_timer: None,
        };
        st.set_policy(&myself, policy);
        Ok(st)
    }

    async fn post_stop(&self, _myself: ActorRef<SessionMsg>, st: &mut SessionState) -> Result<(), ActorProcessingErr> {
        for t in [st.idle_timer.take(), st.policy_timer.take()].into_iter().flatten() {
            t.abort();
        }
        // Drained at shutdown (or passivating): recorded steps become durable now.
        if st.dirty
            && let Err(e) = st.flush(CheckpointReason::Flush).await
        {
            warn!(session = %st.sid, error = %e, "could not flush recorded steps while stopping");
        }
        // Only now, with nothing of this session left only in memory: from here on loads
        // read the record (`StateManager::load_session` reads it directly on a miss in the
        // hot map, so unpublishing before the flush would let it return an older state
        // than recorded steps already acknowledged).
        st.shared.store.publish(&st.sid, None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        st: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(msg, SessionMsg::IdleCheck | SessionMsg::TimeCheck) {
            st.last_activity = Instant::now();
        }
        match msg {
            SessionMsg::Save { state, reply } => {
                let r = st.save_with(state, |_| {}).await.map(|_| ());
                let _ = reply.send(r);
            }
            SessionMsg::Load { reply } => {
                let _ = reply.send(st.load().await);
            }
            SessionMsg::Delete { reply } => {
                let _ = reply.send(st.delete().await);
            }
            SessionMsg::CreateCheckpoint { branch_id, state, reason, reply } => {
                let step = st.current.as_ref().and_then(|c| c.meta.step);
                let _ = reply.send(st.checkpoint(branch_id, state, reason, step).await);
            }
            SessionMsg::RecordStep { step, state, reply } => {
                let _ = reply.send(st.record_step(step, state).await);
            }
            SessionMsg::Rollback { checkpoint_id, truncate, reply } => {
                let _ = reply.send(st.rollback(checkpoint_id, truncate).await);
            }
            SessionMsg::CleanupCheckpoints { keep, reply } => {
                let _ = reply.send(st.cleanup(keep).await);
            }
            SessionMsg::Update { update, reply } => {
                let _ = reply.send(st.update(update).await);
            }
            SessionMsg::SetStatus { status, reason, state, reply } => {
                let _ = reply.send(st.set_status(status, reason, state).await);
            }
            SessionMsg::SetPolicy { policy, reply } => {
                lock(&st.shared.store.policies).insert(st.sid.clone(), policy.clone());
                st.set_policy(&myself, policy);
                let _ = reply.send(Ok(()));
            }
            SessionMsg::Migrate { reply } => {
                let _ = reply.send(st.migrate().await);
            }
            SessionMsg::Reencrypt { reply } => {
                let sid = st.sid.clone();
                let r =
                    storage::run(&st.shared.storage, move |store| async move { store.reencrypt_session(&sid).await })
                        .await;
                let _ = reply.send(r);
            }
            SessionMsg::DeleteIfIdle { cutoff_ms, reply } => {
                let _ = reply.send(st.delete_if_idle(cutoff_ms).await);
            }
            SessionMsg::FinishDelete { reply } => {
                let r = if st.shared.store.is_deleting(&st.sid) { st.delete().await.map(|_| true) } else { Ok(false) };
                let _ = reply.send(r);
            }
            SessionMsg::Retire { reply } => {
                let r = if st.passivating { Ok(()) } else { st.passivate(&myself).await };
                let _ = reply.send(r);
            }
            SessionMsg::TimeCheck => {
                let due = st.policy.every.is_some_and(|every| st.last_checkpoint_at.elapsed() >= every);
                if st.dirty
                    && due
                    && let Err(e) = st.flush(CheckpointReason::Time).await
                {
                    warn!(session = %st.sid, error = %e, "time-based checkpoint failed; retrying at the next tick");
                }
            }
            SessionMsg::IdleCheck => {
                if !st.passivating
                    && st.last_activity.elapsed() >= st.shared.config.idle_timeout
                    && let Err(e) = st.passivate(&myself).await
                {
                    warn!(session = %st.sid, error = %e, "flush before passivation failed; staying alive");
                }
            }
        }
        Ok(())
    }
}

impl SessionState {
    /// Replaces what this actor knows of the state and publishes it to the store's hot
    /// map, which serves loads of live sessions without a message to this actor. Called
    /// before any reply, so a caller that saw a write acknowledged reads it (or newer).
    ///
    /// On a miss in the hot map, loads read the session record directly, without this
    /// actor (see `StateManager::load_state`). So a state the record lacks is never
    /// unpublished while this actor still means to make it durable (`post_stop` flushes
    /// first); `None` here means "this actor will re-read the record", as such a load does.
    fn set_current(&mut self, current: Option<Current>) {
        self.current = current;
        self.publish();
    }

    fn publish(&self) {
        self.shared.store.publish(&self.sid, self.current.as_ref().map(|c| c.state.clone()));
    }

    /// Flushes recorded steps and stops this actor (idle, or retired after a new owner
    /// claimed the session). On a failed flush it stays alive and says why.
    async fn passivate(&mut self, myself: &ActorRef<SessionMsg>) -> Result<()> {
        if self.dirty {
            // Never passivate with steps only in memory.
            self.flush(CheckpointReason::Flush).await?;
        }
        self.passivating = true;
        debug!(session = %self.sid, "passivating session actor");
        // Tell the supervisor first so it parks new requests for this session until this
        // actor has stopped; then close the mailbox. Anything already queued is still
        // handled; later sends are refused and retried with a fresh actor.
        let _ = self.supervisor.cast(SupervisorMsg::Passivating { sid: self.sid.clone(), actor: myself.get_id() });
        myself.drain().map_err(|e| StateError::unavailable(format!("could not close the session actor: {e}")))
    }

    /// Finishes a delete of this session that failed part way, before a write: the write
    /// then starts from a deleted session, and the old delete can never be replayed over it
    /// (by vacuum or at the next start). If the delete fails again, so does the write, and
    /// nothing of it is written.
    async fn settle_delete(&mut self) -> Result<()> {
        if self.shared.store.is_deleting(&self.sid) {
            self.delete().await?;
        }
        Ok(())
    }

    fn check_size(&self, state: &StateBytes) -> Result<()> {
        let limit = self.shared.config.max_state_bytes;
        if state.len() > limit {
            return Err(StateError::TooLarge { size: state.len(), limit });
        }
        Ok(())
    }

    fn set_policy(&mut self, myself: &ActorRef<SessionMsg>, policy: CheckpointPolicy) {
        if let Some(t) = self.policy_timer.take() {
            t.abort();
        }
        if let Some(every) = policy.every {
            // Tick often enough that a checkpoint is never much later than `every`.
            let tick = (every / 4).max(Duration::from_millis(5));
            self.policy_timer = Some(myself.send_interval(tick, || SessionMsg::TimeCheck));
        }
        self.policy = policy;
    }

    /// The current state and meta, read from storage (and migrated) on first use.
    async fn current(&mut self) -> Result<&mut Current> {
        if self.current.is_none() {
            let sid = self.sid.clone();
            let loaded = storage::run(&self.shared.storage, move |store| async move {
                Ok(store.load_session(&sid).await?.map(|d| match d.head.clone() {
                    RecordHead::Session { saved_at, meta, .. } => (d, saved_at, meta),
                    RecordHead::Checkpoint { timestamp, .. } => (d, timestamp, SessionMeta::default()),
                }))
            })
            .await?;
            let current = match loaded {
                Some((d, saved_at, mut meta)) => {
                    let migrated = self.shared.config.migrations.upgrade(&self.sid, meta.schema, d.data())?;
                    let state = match migrated {
                        Some(bytes) => {
                            meta.schema = self.shared.config.migrations.current;
                            StateBytes::from_slice(&bytes)
                        }
                        None => StateBytes::from_slice(d.data()),
                    };
                    Current { state: Some(state), saved_at, meta }
                }
                None => Current {
                    state: None,
                    saved_at: 0,
                    meta: SessionMeta { schema: self.shared.config.migrations.current, ..SessionMeta::default() },
                },
            };
            // The step policy counts from the newest checkpoint on its branch (not from the
            // session record: a crash between a flush's two writes leaves the record ahead).
            self.last_checkpoint_step = {
                let idx = self.shared.store.index();
                idx.sessions.get(&self.sid).and_then(|e| {
                    e.checkpoints.values().rev().find(|c| c.branch_id == self.policy.branch).and_then(|c| c.step)
                })
            };
            self.set_current(Some(current));
        }
        self.current.as_mut().ok_or_else(|| StateError::unavailable("session state missing"))
    }

    async fn load(&mut self) -> Result<Option<StateBytes>> {
        Ok(self.current().await?.state.clone())
    }

    /// Saves `state` durably with the current meta changed by `edit`.
    async fn save_with(&mut self, state: StateBytes, edit: impl FnOnce(&mut SessionMeta)) -> Result<u64> {
        self.check_size(&state)?;
        self.settle_delete().await?;
        let mut meta = match self.current().await {
            Ok(c) => c.meta.clone(),
            // A damaged record must not block overwriting it with a good state.
            Err(StateError::Corrupt { .. }) => SessionMeta::default(),
            Err(e) => return Err(e),
        };
        meta.schema = self.shared.config.migrations.current;
        edit(&mut meta);
        let sid = self.sid.clone();
        let at = self.shared.store.clock.now_ms();
        let (data, m) = (state.clone(), meta.clone());
        let r = storage::run(&self.shared.storage, move |store| async move {
            store.save_session(&sid, data.as_bytes(), at, m).await
        })
        .await;
        match r {
            Ok(()) => {
                self.set_current(Some(Current { state: Some(state), saved_at: at, meta }));
                self.dirty = false;
                self.shared.store.emit(&self.sid, EventKind::Saved);
                Ok(at)
            }
            Err(e) => {
                // The old version is intact on disk, but be conservative about the cache.
                self.set_current(None);
                Err(e)
            }
        }
    }

    /// Deletes the session if nothing happened to it since `cutoff_ms`. The index's
    /// save time may be stale after a power loss (its journal is not fsynced), so the
    /// record's own `saved_at` decides; checkpoint times come from their files.
    async fn delete_if_idle(&mut self, cutoff_ms: u64) -> Result<bool> {
        let (indexed, newest_cp) = match self.shared.store.index().sessions.get(&self.sid) {
            Some(e) => (e.last_activity(), e.newest_checkpoint_at()),
            None => return Ok(false),
        };
        if indexed >= cutoff_ms || self.dirty {
            return Ok(false);
        }
        let saved_at = match self.current().await {
            Ok(c) => c.saved_at,
            // A damaged record is kept for inspection, not removed as "idle since 1970";
            // it is reported by loads and by vacuum_storage.
            Err(StateError::Corrupt { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        if saved_at.max(newest_cp) >= cutoff_ms {
            return Ok(false);
        }
        self.delete().await
    }

    async fn delete(&mut self) -> Result<bool> {
        let sid = self.sid.clone();
        // Who could read the session before it is deleted (the access record goes with it):
        // they are told of the delete.
        let access = self.shared.store.access.shared(&self.sid);
        // A state only in memory (recorded steps) existed too.
        let in_memory = self.dirty && self.current.as_ref().is_some_and(|c| c.state.is_some());
        self.set_current(None);
        // Whatever happens, what this actor derived from the records may be stale now (a
        // failed delete removed some of them): look it up again on next use.
        self.dirty = false;
        self.heads.clear();
        self.last_clock = None;
        self.last_checkpoint_step = None;
        let existed =
            storage::run(&self.shared.storage, move |store| async move { store.delete_session(&sid).await }).await?;
        self.set_current(Some(Current { state: None, saved_at: 0, meta: SessionMeta::default() }));
        self.shared.store.emit_as(&self.sid, EventKind::Deleted, access);
        Ok(existed || in_memory)
    }

    fn next_clock(&mut self) -> u64 {
        let last = *self.last_clock.get_or_insert_with(|| {
            let idx = self.shared.store.index();
            idx.sessions.get(&self.sid).and_then(|e| e.checkpoints.keys().next_back()).map(|c| c.clock()).unwrap_or(0)
        });
        // A hybrid logical clock: wall-clock milliseconds in the high bits, a counter in
        // the low 16, never going backwards: ids stay ordered even within a millisecond.
        let next = (self.shared.store.clock.now_ms() << 16).max(last + 1);
        self.last_clock = Some(next);
        next
    }

    /// The newest checkpoint on `branch` (the parent of the next one there).
    fn head(&mut self, branch: &BranchId) -> Option<CheckpointId> {
        self.heads
            .entry(branch.clone())
            .or_insert_with(|| {
                let idx = self.shared.store.index();
                idx.sessions.get(&self.sid).and_then(|e| {
                    e.checkpoints.iter().rev().find(|(_, c)| &c.branch_id == branch).map(|(id, _)| id.clone())
                })
            })
            .clone()
    }

    async fn checkpoint(
        &mut self,
        branch: BranchId,
        state: StateBytes,
        reason: CheckpointReason,
        step: Option<u64>,
    ) -> Result<CheckpointId> {
        self.check_size(&state)?;
        self.settle_delete().await?;
        let clock = self.next_clock();
        let cid = CheckpointId::generate(clock);
        if !self.heads.contains_key(&branch) {
            let fork = match self.current().await {
                Ok(c) => c.meta.fork.clone(),
                Err(_) => None,
            };
            let newest = self.head(&branch);
            let head = match fork {
                Some(f) if f.branch == branch && newest.as_ref().is_none_or(|n| n.clock() < f.clock) => {
                    Some(f.checkpoint)
                }
                _ => newest,
            };
            self.heads.insert(branch.clone(), head);
        }
        let meta =
            CheckpointMeta { schema: self.shared.config.migrations.current, reason, step, parent: self.head(&branch) };
        let (sid, id, b) = (self.sid.clone(), cid.clone(), branch.clone());
        storage::run(&self.shared.storage, move |store| async move {
            store.put_checkpoint(&sid, &id, &b, clock >> 16, meta, state.as_bytes()).await
        })
        .await?;
        self.heads.insert(branch, Some(cid.clone()));
        self.last_checkpoint_at = Instant::now();
        if step.is_some() {
            self.last_checkpoint_step = step;
        }
        self.shared.store.emit(&self.sid, EventKind::Checkpointed { id: cid.clone(), reason, step });
        Ok(cid)
    }

    /// Makes recorded steps durable: the session record, then a checkpoint of it.
    async fn flush(&mut self, reason: CheckpointReason) -> Result<Option<CheckpointId>> {
        let Some(state) = self.current.as_ref().and_then(|c| c.state.clone()) else { return Ok(None) };
        let step = self.current.as_ref().and_then(|c| c.meta.step);
        self.save_with(state.clone(), |_| {}).await?;
        let branch = self.policy.branch.clone();
        self.checkpoint(branch, state, reason, step).await.map(Some)
    }

    async fn record_step(&mut self, step: u64, state: StateBytes) -> Result<Option<CheckpointId>> {
        self.check_size(&state)?;
        self.settle_delete().await?;
        let now = self.shared.store.clock.now_ms();
        let current = match self.current().await {
            Ok(c) => c,
            Err(StateError::Corrupt { .. }) => {
                self.set_current(Some(Current { state: None, saved_at: 0, meta: SessionMeta::default() }));
                self.current().await?
            }
            Err(e) => return Err(e),
        };
        let was_paused = current.meta.status == SessionStatus::Paused;
        current.state = Some(state);
        current.meta.step = Some(step);
        if current.meta.status != SessionStatus::Running {
            // Recording a step resumes the run, as resume_session would.
            current.meta.status = SessionStatus::Running;
            current.meta.reason = None;
            current.meta.status_at = Some(now);
        }
        if was_paused {
            // Recording a step resumes a paused run; say so.
            self.shared.store.emit(&self.sid, EventKind::Resumed);
        }
        self.dirty = true;
        self.publish();
        let due = self.policy.every_steps.is_some_and(|n| match self.last_checkpoint_step {
            // A step below the last checkpoint's: the run was restarted; count from zero.
            Some(last) if step >= last => step >= last.saturating_add(n),
            _ => step >= n,
        });
        if due { self.flush(CheckpointReason::Steps).await } else { Ok(None) }
    }

    async fn rollback(&mut self, cid: CheckpointId, truncate: bool) -> Result<()> {
        self.settle_delete().await?;
        let (sid, id) = (self.sid.clone(), cid.clone());
        let cp = storage::run(&self.shared.storage, move |store| async move { store.load_checkpoint(&sid, &id).await })
            .await?
            .ok_or_else(|| StateError::CheckpointNotFound { id: cid.to_string() })?;
        let RecordHead::Checkpoint { branch_id, meta, .. } = cp.head.clone() else {
            return Err(StateError::corrupt(&cid, "not a checkpoint record"));
        };
        let data = match self.shared.config.migrations.upgrade(&self.sid, meta.schema, cp.data())? {
            Some(bytes) => StateBytes::from_slice(&bytes),
            None => StateBytes::from_slice(cp.data()),
        };
        let fork = Fork { branch: branch_id.clone(), checkpoint: cid.clone(), clock: self.next_clock() };
        self.save_with(data, |m| {
            m.step = meta.step;
            m.status = SessionStatus::Running;
            m.fork = Some(fork);
        })
        .await?;
        if truncate {
            let later: Vec<CheckpointId> = {
                let idx = self.shared.store.index();
                idx.sessions
                    .get(&self.sid)
                    .map(|e| e.checkpoints.range(cid.clone()..).skip(1).filter(|(_, c)| c.branch_id == branch_id))
                    .into_iter()
                    .flatten()
                    .map(|(id, _)| id.clone())
                    .collect()
            };
            let sid = self.sid.clone();
            storage::run(&self.shared.storage, move |store| async move {
                // Newest first: a crash midway leaves a shorter branch, never a gap.
                for id in later.iter().rev() {
                    store.delete_checkpoint(&sid, id).await?;
                }
                Ok(())
            })
            .await?;
        }
        // The branch continues (forks) from here.
        self.heads.insert(branch_id, Some(cid.clone()));
        self.last_checkpoint_step = meta.step;
        self.shared.store.emit(&self.sid, EventKind::RolledBack { to: cid });
        Ok(())
    }

    async fn cleanup(&mut self, keep: usize) -> Result<usize> {
        let doomed: Vec<CheckpointId> = {
            let idx = self.shared.store.index();
            idx.sessions
                .get(&self.sid)
                .map(|e| {
                    let n = e.checkpoints.len().saturating_sub(keep);
                    e.checkpoints.keys().take(n).cloned().collect()
                })
                .unwrap_or_default()
        };
        let sid = self.sid.clone();
        storage::run(&self.shared.storage, move |store| async move {
            let mut removed = 0;
            for cid in doomed {
                // Each delete is durable before the next; a crash leaves a prefix removed.
                if store.delete_checkpoint(&sid, &cid).await? {
                    removed += 1;
                }
            }
            Ok(removed)
        })
        .await
    }

    async fn update(&mut self, update: UpdateFn) -> Result<StateBytes> {
        self.settle_delete().await?;
        let old = self.load().await?;
        let sid = self.sid.to_string();
        let new = match std::panic::catch_unwind(AssertUnwindSafe(|| update(old.as_ref().map(|s| s.as_bytes())))) {
            Ok(r) => r?,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned());
                warn!(session = %sid, "a panic in an update closure was contained; nothing was written");
                // Start from a clean slate: re-read from disk on next use.
                self.set_current(None);
                self.dirty = false;
                return Err(StateError::Panicked { session: sid, message });
            }
        };
        let new = StateBytes::from_vec(new);
        self.save_with(new.clone(), |_| {}).await?;
        Ok(new)
    }

    async fn set_status(
        &mut self,
        status: SessionStatus,
        reason: Option<String>,
        state: Option<StateBytes>,
    ) -> Result<Option<CheckpointId>> {
        self.settle_delete().await?;
        let state = match state {
            Some(s) => s,
            None => self.load().await?.ok_or_else(|| StateError::Config {
                message: format!("session {} has no state to mark {status:?}", self.sid),
            })?,
        };
        let at = self.shared.store.clock.now_ms();
        let r = reason.clone();
        self.save_with(state.clone(), |m| {
            m.status = status;
            m.reason = r;
            m.status_at = Some(at);
        })
        .await?;
        let reason = reason.unwrap_or_default();
        let mut checkpoint = None;
        match status {
            SessionStatus::Paused => {
                let step = self.current.as_ref().and_then(|c| c.meta.step);
                let branch = self.policy.branch.clone();
                checkpoint = Some(self.checkpoint(branch, state, CheckpointReason::Pause, step).await?);
                self.shared.store.emit(&self.sid, EventKind::Paused { reason });
            }
            SessionStatus::Running => self.shared.store.emit(&self.sid, EventKind::Resumed),
            SessionStatus::Completed => self.shared.store.emit(&self.sid, EventKind::Completed),
            SessionStatus::Failed => self.shared.store.emit(&self.sid, EventKind::Failed { reason }),
        }
        Ok(checkpoint)
    }

    /// Rewrites the session record and checkpoints stored at an older schema version.
    /// Each rewrite is one atomic put, and records already current are skipped, so an
    /// interrupted pass simply runs again.
    async fn migrate(&mut self) -> Result<MigrationReport> {
        let mut report = MigrationReport::default();
        let current = self.shared.config.migrations.current;
        let sid = self.sid.clone();
        let on_disk =
            storage::run(&self.shared.storage, move |store| async move { store.load_session(&sid).await }).await?;
        if let Some(d) = on_disk
            && let RecordHead::Session { saved_at, mut meta, .. } = d.head.clone()
            && let Some(bytes) = self.shared.config.migrations.upgrade(&self.sid, meta.schema, d.data())?
        {
            meta.schema = current;
            let (sid, m) = (self.sid.clone(), meta.clone());
            storage::run(&self.shared.storage, move |store| async move {
                store.save_session(&sid, &bytes, saved_at, m).await
            })
            .await?;
            // The cache holds the migrated state or newer recorded steps: keep it then.
            if !self.dirty {
                self.set_current(None);
            }
            report.sessions += 1;
        }
        let ids: Vec<CheckpointId> = {
            let idx = self.shared.store.index();
            idx.sessions.get(&self.sid).map(|e| e.checkpoints.keys().cloned().collect()).unwrap_or_default()
        };
        for cid in ids {
            let (sid, id) = (self.sid.clone(), cid.clone());
            let Some(d) =
                storage::run(&self.shared.storage, move |store| async move { store.load_checkpoint(&sid, &id).await })
                    .await?
            else {
                continue;
            };
            let RecordHead::Checkpoint { branch_id, timestamp, mut meta, .. } = d.head.clone() else { continue };
            let Some(bytes) = self.shared.config.migrations.upgrade(&self.sid, meta.schema, d.data())? else {
                continue;
            };
            meta.schema = current;
            let sid = self.sid.clone();
            storage::run(&self.shared.storage, move |store| async move {
                store.put_checkpoint(&sid, &cid, &branch_id, timestamp, meta, &bytes).await
            })
            .await?;
            report.checkpoints += 1;
        }
        Ok(report)
    }
}
