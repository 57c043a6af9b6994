//! The session actor: one per live session id, the only writer of that session.
//!
//! Every save, checkpoint and read-modify-write of a session goes through this actor's
//! mailbox and is finished (durably) before the next one starts, so updates are never
//! lost. It keeps the latest state in memory (write-through), so loads of a live session
//! never touch the disk. After an idle timeout it passivates: it tells the supervisor,
//! closes its mailbox (later sends are refused, not dropped), finishes what was queued and
//! stops. The next request spawns a fresh one.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Shared, storage, supervisor::SupervisorMsg};
use crate::codec::RecordHead;
use crate::error::{Result, StateError};
use crate::types::{BranchId, CheckpointId, SessionId, StateBytes};

/// A read-modify-write step run inside the session actor: it receives the current state
/// (JSON) and returns the new one (JSON) or an error, in which case nothing is written.
pub type UpdateFn = Box<dyn FnOnce(Option<&[u8]>) -> Result<Vec<u8>> + Send>;

/// The messages a session actor handles. An orchestrator that is itself a ractor actor
/// can hold the session's `ActorRef<SessionMsg>` (from
/// [`StateManager::session_actor`](crate::StateManager::session_actor)) and use
/// `ractor::call!` with these variants. Every reply is a `Result`: domain failures travel
/// back in it and never stop the actor.
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
        /// Receives the new checkpoint's id once it is durable.
        reply: RpcReplyPort<Result<CheckpointId>>,
    },
    /// Replace the session's state with a checkpoint's.
    Rollback {
        /// The checkpoint (of this session).
        checkpoint_id: CheckpointId,
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
    /// Delete the session if its last activity is older than `cutoff_ms` (Unix ms).
    DeleteIfIdle {
        /// The cutoff.
        cutoff_ms: u64,
        /// Receives whether it was deleted.
        reply: RpcReplyPort<Result<bool>>,
    },
    /// Internal: the idle timer's tick.
    #[doc(hidden)]
    IdleCheck,
}

pub(crate) struct SessionActor;

pub(crate) struct SessionArgs {
    pub(crate) sid: SessionId,
    pub(crate) shared: Shared,
    pub(crate) supervisor: ActorRef<SupervisorMsg>,
}

enum Cache {
    Unknown,
    Absent,
    /// The state and its record's `saved_at`.
    Present(StateBytes, u64),
}

pub(crate) struct SessionState {
    sid: SessionId,
    shared: Shared,
    supervisor: ActorRef<SupervisorMsg>,
    cache: Cache,
    last_clock: Option<u64>,
    last_activity: Instant,
    passivating: bool,
    timer: Option<JoinHandle<()>>,
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
        let timer = Some(myself.send_interval(tick, || SessionMsg::IdleCheck));
        Ok(SessionState {
            sid: args.sid,
            shared: args.shared,
            supervisor: args.supervisor,
            cache: Cache::Unknown,
            last_clock: None,
            last_activity: Instant::now(),
            passivating: false,
            timer,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SessionMsg>,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.timer.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        st: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(msg, SessionMsg::IdleCheck) {
            st.last_activity = Instant::now();
        }
        match msg {
            SessionMsg::Save { state, reply } => {
                let _ = reply.send(st.save(state).await);
            }
            SessionMsg::Load { reply } => {
                let _ = reply.send(st.load().await);
            }
            SessionMsg::Delete { reply } => {
                let _ = reply.send(st.delete().await);
            }
            SessionMsg::CreateCheckpoint { branch_id, state, reply } => {
                let _ = reply.send(st.checkpoint(branch_id, state).await);
            }
            SessionMsg::Rollback { checkpoint_id, reply } => {
                let _ = reply.send(st.rollback(checkpoint_id).await);
            }
            SessionMsg::CleanupCheckpoints { keep, reply } => {
                let _ = reply.send(st.cleanup(keep).await);
            }
            SessionMsg::Update { update, reply } => {
                let _ = reply.send(st.update(update).await);
            }
            SessionMsg::DeleteIfIdle { cutoff_ms, reply } => {
                let _ = reply.send(st.delete_if_idle(cutoff_ms).await);
            }
            SessionMsg::IdleCheck => {
                if !st.passivating && st.last_activity.elapsed() >= st.shared.config.idle_timeout {
                    st.passivating = true;
                    debug!(session = %st.sid, "passivating idle session actor");
                    // Tell the supervisor first so it parks new requests for this session
                    // until this actor has stopped; then close the mailbox. Anything already
                    // queued is still handled; later sends are refused and retried.
                    let _ =
                        st.supervisor.cast(SupervisorMsg::Passivating { sid: st.sid.clone(), actor: myself.get_id() });
                    myself.drain()?;
                }
            }
        }
        Ok(())
    }
}

impl SessionState {
    fn check_size(&self, state: &StateBytes) -> Result<()> {
        let limit = self.shared.config.max_state_bytes;
        if state.len() > limit {
            return Err(StateError::TooLarge { size: state.len(), limit });
        }
        Ok(())
    }

    async fn save(&mut self, state: StateBytes) -> Result<()> {
        self.check_size(&state)?;
        let sid = self.sid.clone();
        let data = state.clone();
        let at = self.shared.store.clock.now_ms();
        let r = storage::run(&self.shared.storage, move |store| async move {
            store.save_session(&sid, data.as_bytes(), at).await
        })
        .await;
        match r {
            Ok(()) => {
                self.cache = Cache::Present(state, at);
                Ok(())
            }
            Err(e) => {
                // The old version is intact on disk, but be conservative about the cache.
                self.cache = Cache::Unknown;
                Err(e)
            }
        }
    }

    async fn load(&mut self) -> Result<Option<StateBytes>> {
        match &self.cache {
            Cache::Present(s, _) => return Ok(Some(s.clone())),
            Cache::Absent => return Ok(None),
            Cache::Unknown => {}
        }
        let sid = self.sid.clone();
        let loaded = storage::run(&self.shared.storage, move |store| async move {
            Ok(store.load_session(&sid).await?.map(|d| {
                let at = match d.head {
                    RecordHead::Session { saved_at, .. } => saved_at,
                    RecordHead::Checkpoint { timestamp, .. } => timestamp,
                };
                (StateBytes::from_slice(d.data()), at)
            }))
        })
        .await?;
        Ok(match loaded {
            Some((s, at)) => {
                self.cache = Cache::Present(s.clone(), at);
                Some(s)
            }
            None => {
                self.cache = Cache::Absent;
                None
            }
        })
    }

    /// Deletes the session if nothing happened to it since `cutoff_ms`. The index's
    /// save time may be stale after a power loss (its journal is not fsynced), so the
    /// record's own `saved_at` decides; checkpoint times come from their files.
    async fn delete_if_idle(&mut self, cutoff_ms: u64) -> Result<bool> {
        let (indexed, newest_cp) = match self.shared.store.index().sessions.get(&self.sid) {
            Some(e) => (e.last_activity(), e.checkpoints.values().map(|c| c.ts).max().unwrap_or(0)),
            None => return Ok(false),
        };
        if indexed >= cutoff_ms {
            return Ok(false);
        }
        let saved_at = match self.load().await {
            Ok(_) => match &self.cache {
                Cache::Present(_, at) => *at,
                _ => 0,
            },
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
        self.cache = Cache::Unknown;
        let existed =
            storage::run(&self.shared.storage, move |store| async move { store.delete_session(&sid).await }).await?;
        self.cache = Cache::Absent;
        self.last_clock = None;
        Ok(existed)
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

    async fn checkpoint(&mut self, branch: BranchId, state: StateBytes) -> Result<CheckpointId> {
        self.check_size(&state)?;
        let clock = self.next_clock();
        let cid = CheckpointId::generate(clock);
        let (sid, id) = (self.sid.clone(), cid.clone());
        storage::run(&self.shared.storage, move |store| async move {
            store.put_checkpoint(&sid, &id, &branch, clock >> 16, state.as_bytes()).await
        })
        .await?;
        Ok(cid)
    }

    async fn rollback(&mut self, cid: CheckpointId) -> Result<()> {
        let (sid, id) = (self.sid.clone(), cid.clone());
        let cp = storage::run(&self.shared.storage, move |store| async move {
            Ok(store.load_checkpoint(&sid, &id).await?.map(|d| StateBytes::from_slice(d.data())))
        })
        .await?;
        let state = cp.ok_or_else(|| StateError::CheckpointNotFound { id: cid.to_string() })?;
        self.save(state).await
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
                self.cache = Cache::Unknown;
                return Err(StateError::Panicked { session: sid, message });
            }
        };
        let new = StateBytes::from_slice(&new);
        self.save(new.clone()).await?;
        Ok(new)
    }
}
