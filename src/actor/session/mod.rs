//! The session actor: one per live session id, the only writer of that session.
//! Owns the session's cached state, its checkpoint policy and timers, and its writes
//! (`msg.rs`: its messages; `checkpoint.rs`: checkpoints, recorded steps, rollback). Calls
//! the store for every record I/O, in its own task (through [`SessionState::io`]), and for
//! the index, hot map, events and access records it reads or publishes, [`crate::config`] for
//! migrations, and tells the supervisor when it passivates.
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
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::lease::{acquire_within, lease_name};
use super::{Shared, supervisor::SupervisorMsg};
use crate::config::CheckpointPolicy;
use crate::error::{Result, StateError};
use crate::events::EventKind;
use crate::store::codec::{RecordHead, SessionMeta};
use crate::store::{AccessRule, Store};
use crate::sync::lock;
use crate::types::{
    BranchId, CheckpointId, CheckpointReason, MigrationReport, SessionId, SessionStatus, StateBytes,
};

mod checkpoint;
mod msg;

pub(crate) use msg::InternalMsg;
pub use msg::{Internal, SessionMsg, UpdateFn};

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
    /// This actor, to close its mailbox from `&self` once a fence refusal is seen.
    me: ActorRef<SessionMsg>,
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
    /// On a shared store: the fencing token of the lease this actor last held. A grant with
    /// any other token (but the next one, after a lapse nobody else used) means another
    /// node may have written the session: what this actor knew is dropped and read again.
    token: Option<u64>,
    /// A grant took the session from a node that let its lease run out, and what this actor
    /// knows has not been read again since (the read failed): the next read still marks the
    /// run as cut off, though the lease, already this node's, no longer says so.
    taken_over: bool,
    /// A write was refused by the fence (another node holds the session now): the actor
    /// stops once the request that found it is answered.
    fenced: AtomicBool,
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
        let idle_timer = Some(myself.send_interval(tick, || InternalMsg::IdleCheck.into()));
        let policy = lock(&args.shared.rt.policies)
            .get(&args.sid)
            .cloned()
            .unwrap_or_else(|| args.shared.config.checkpoint_policy.clone());
        let mut st = SessionState {
            sid: args.sid,
            shared: args.shared,
            supervisor: args.supervisor,
            me: myself.clone(),
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
            token: None,
            taken_over: false,
            fenced: AtomicBool::new(false),
        };
        st.set_policy(&myself, policy);
        Ok(st)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SessionMsg>,
        st: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        for t in [st.idle_timer.take(), st.policy_timer.take()].into_iter().flatten() {
            t.abort();
        }
        // Drained at shutdown (or passivating): recorded steps become durable now.
        if st.dirty
            && let Err(e) = st.flush(CheckpointReason::Flush).await
        {
            warn!(session = %st.sid, error = %e, "could not flush recorded steps while stopping");
        }
        // Then the lease goes at once, so another node takes the session over without
        // waiting for it to run out.
        st.release().await;
        // Only now, with nothing of this session left only in memory: from here on loads
        // read the record (`StateManager::load_session` reads it directly on a miss in the
        // hot map, so unpublishing before the flush would let it return an older state
        // than recorded steps already acknowledged).
        st.shared.rt.publish(&st.sid, None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        st: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(
            msg,
            SessionMsg::Internal(Internal(InternalMsg::IdleCheck | InternalMsg::TimeCheck))
        ) {
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
                lock(&st.shared.rt.policies).insert(st.sid.clone(), policy.clone());
                st.set_policy(&myself, policy);
                let _ = reply.send(Ok(()));
            }
            SessionMsg::Migrate { reply } => {
                let _ = reply.send(st.migrate().await);
            }
            SessionMsg::DeleteIfIdle { cutoff_ms, reply } => {
                let _ = reply.send(st.delete_if_idle(cutoff_ms).await);
            }
            SessionMsg::Internal(Internal(msg)) => st.handle_internal(&myself, msg).await,
        }
        if st.fenced.load(Ordering::Relaxed) && !st.passivating {
            st.lose();
        }
        Ok(())
    }
}

impl SessionState {
    async fn handle_internal(&mut self, myself: &ActorRef<SessionMsg>, msg: InternalMsg) {
        let st = self;
        match msg {
            InternalMsg::Reencrypt { reply } => {
                let r = match st.own().await {
                    Ok(()) => {
                        let sid = st.sid.clone();
                        st.io(move |store| async move { store.reencrypt_session(&sid).await }).await
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            InternalMsg::Own { reply } => {
                let _ = reply.send(st.own().await);
            }
            InternalMsg::FinishDelete { reply } => {
                let r = if st.shared.store.is_deleting(&st.sid) {
                    st.delete().await.map(|_| true)
                } else {
                    Ok(false)
                };
                let _ = reply.send(r);
            }
            InternalMsg::Retire { reply } => {
                let r = if st.passivating { Ok(()) } else { st.passivate(myself).await };
                let _ = reply.send(r);
            }
            InternalMsg::TimeCheck => {
                let due =
                    st.policy.every.is_some_and(|every| st.last_checkpoint_at.elapsed() >= every);
                if st.dirty
                    && due
                    && let Err(e) = st.flush(CheckpointReason::Time).await
                {
                    warn!(session = %st.sid, error = %e, "time-based checkpoint failed; retrying at the next tick");
                }
            }
            InternalMsg::IdleCheck => {
                if !st.passivating
                    && st.last_activity.elapsed() >= st.shared.config.idle_timeout
                    && let Err(e) = st.passivate(myself).await
                {
                    warn!(session = %st.sid, error = %e, "flush before passivation failed; staying alive");
                }
            }
        }
    }

    /// Runs `job` against the store and waits for it: every record I/O of this actor goes
    /// through here, one at a time. The job runs right here, in this actor's task (a hop
    /// through the storage actor and a task of its own would cost two thread hand-offs per
    /// save): the actor awaits each write anyway, and nothing ends it part way (it is
    /// drained, never killed; a shutdown waits for draining actors too).
    async fn io<T, F, Fut>(&self, job: F) -> Result<T>
    where
        F: FnOnce(Arc<Store>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let r = crate::sync::in_own_task(job(self.shared.store.clone())).await;
        if matches!(r, Err(StateError::Fenced { .. })) {
            self.mark_fenced();
        }
        r
    }

    /// Another node took the session over: from now on loads read the store, not this
    /// actor's memory. Done before the refusal is answered (the actor itself stops after
    /// the request, in `lose`), so a caller told `Fenced` never loads the state this node
    /// had.
    ///
    /// The mailbox is closed here too (the supervisor told first, so it parks new requests
    /// until this actor has stopped): a request sent after the refusal goes to a fresh actor,
    /// which waits for the lease and is told who holds the session
    /// ([`StateError::OwnedElsewhere`]). Requests queued before it are still answered here,
    /// `Fenced`.
    fn mark_fenced(&self) {
        if self.fenced.swap(true, Ordering::Relaxed) {
            return;
        }
        self.shared.rt.publish(&self.sid, None);
        let _ = self
            .supervisor
            .cast(SupervisorMsg::Passivating { sid: self.sid.clone(), actor: self.me.get_id() });
        let _ = self.me.drain();
    }

    /// Whether this actor serves the session from memory: always on a store with one
    /// writer; on a shared store only while it holds the session's lease live (else
    /// another node may be writing, and loads read the store).
    fn serves_from_memory(&self) -> bool {
        !self.shared.store.shared
            || (self.shared.rt.leases.holds(&self.sid) && !self.fenced.load(Ordering::Relaxed))
    }

    /// Makes sure this node holds the session's lease before a write (on a shared store;
    /// nothing to do on a store with one writer). A lease held with time to spare is kept;
    /// otherwise it is taken (or extended: same holder, same token), waiting up to the
    /// lease wait while another node holds it, then [`StateError::OwnedElsewhere`]. A lease
    /// lost to another node is [`StateError::Fenced`]: the actor stops after this request.
    /// When the grant shows that another node may have written since this actor last held
    /// the lease, everything it knew of the session is dropped and read again from the
    /// records (and the session is marked interrupted if its last holder let the lease run
    /// out while it was running).
    pub(super) async fn own(&mut self) -> Result<()> {
        if !self.shared.store.shared {
            return Ok(());
        }
        let config = self.shared.config.clone();
        let ttl = config.lease_ttl;
        let name = lease_name(&self.sid);
        if let Some((token, valid_until, lost)) = self.shared.rt.leases.peek(&self.sid) {
            if lost {
                self.mark_fenced();
                return Err(StateError::Fenced { name, token, current: token + 1 });
            }
            // A write started now finishes well inside the lease (and if it does not, the
            // fence refuses it once another node took over).
            if self.token == Some(token)
                && valid_until > Instant::now() + ttl / 4
                && !self.shared.store.is_unsure(&self.sid)
            {
                return Ok(());
            }
        }
        // An actor that held the session does not wait for another node's lease: it lost
        // the session (its renewals stopped, as in a paused process) and stops, rather than
        // take over a session whose state it no longer knows.
        let wait = if self.token.is_some() { Duration::ZERO } else { config.lease_wait() };
        let store = &self.shared.store;
        let taken =
            acquire_within(store.backend.as_ref(), &store.clock, &name, &config.node_id, ttl, wait)
                .await;
        let (lease, sent) = match (taken, self.token) {
            (Err(StateError::OwnedElsewhere { .. }), Some(token)) => {
                self.mark_fenced();
                return Err(crate::actor::lease::fenced(store.backend.as_ref(), name, token).await);
            }
            (taken, _) => taken?,
        };
        self.shared.rt.leases.insert(&self.sid, lease.clone(), sent + lease.expires_in);
        self.shared.store.set_fence(&self.sid, Some(lease.fence()));
        let continuous = self.token.is_some_and(|t| t == lease.token || t + 1 == lease.token)
            && lease.taken_from.is_none()
            && !self.taken_over
            && !self.shared.store.is_unsure(&self.sid);
        if !continuous {
            if self.dirty {
                warn!(session = %self.sid, "another node held the session since these steps were recorded; they are dropped");
            }
            self.dirty = false;
            self.set_current(None);
            self.heads.clear();
            self.last_clock = None;
            self.last_checkpoint_step = None;
            self.taken_over |= lease.taken_from.is_some();
            if let Err(e) = self.shared.store.refresh_session(&self.sid, self.taken_over).await {
                // Nothing was written under the lease: give it up at once rather than keep
                // other nodes waiting for a session this node could not read. `taken_over`
                // stays, so the next grant (after a release, which no longer says so) still
                // marks the run cut off.
                self.release().await;
                return Err(e);
            }
            self.taken_over = false;
        }
        self.token = Some(lease.token);
        Ok(())
    }

    /// Gives the session's lease up (at passivation and shutdown, after the last write).
    async fn release(&mut self) {
        if self.shared.rt.leases.has(&self.sid) {
            // This node's events of the session reach the other nodes before the next
            // holder's can.
            self.shared.rt.flush_events().await;
        }
        let Some(held) = self.shared.rt.leases.remove(&self.sid) else { return };
        self.shared.store.set_fence(&self.sid, None);
        if held.lost {
            return;
        }
        self.shared.rt.leases.no_renewal_in_flight().await;
        if let Err(e) = self.shared.store.backend.release_lease(&held.lease).await {
            warn!(session = %self.sid, error = %e, "could not release the session's lease; it runs out on its own");
        }
    }

    /// Another node holds the session now: nothing this actor knows of it is current, and
    /// nothing it still holds can be written (recorded steps not yet saved are dropped). It
    /// stops; the next request gets a fresh actor, which waits for the lease.
    fn lose(&mut self) {
        warn!(session = %self.sid, dropped_steps = self.dirty, "another node holds this session now; its actor here stops");
        self.dirty = false;
        self.set_current(None);
        self.shared.rt.leases.remove(&self.sid);
        self.shared.store.set_fence(&self.sid, None);
        // The supervisor was told and the mailbox closed when the refusal was seen
        // (`mark_fenced`).
        self.passivating = true;
    }

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
        let state = if self.serves_from_memory() {
            self.current.as_ref().map(|c| c.state.clone())
        } else {
            None
        };
        self.shared.rt.publish(&self.sid, state);
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
        let _ = self
            .supervisor
            .cast(SupervisorMsg::Passivating { sid: self.sid.clone(), actor: myself.get_id() });
        myself
            .drain()
            .map_err(|e| StateError::unavailable(format!("could not close the session actor: {e}")))
    }

    /// Finishes a delete of this session that failed part way, before a write: the write
    /// then starts from a deleted session, and the old delete can never be replayed over it
    /// (by vacuum or at the next start). If the delete fails again, so does the write, and
    /// nothing of it is written.
    ///
    /// The access record stays: the write was authorized against it, and a session whose
    /// delete failed part way is still its owner's (so the owner's next save neither loses
    /// the session to another principal's claim nor locks the owner out).
    async fn settle_delete(&mut self) -> Result<()> {
        self.own().await?;
        if self.shared.store.is_deleting(&self.sid) {
            self.delete_with(AccessRule::Keep).await?;
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
            self.policy_timer = Some(myself.send_interval(tick, || InternalMsg::TimeCheck.into()));
        }
        self.policy = policy;
    }

    /// The current state and meta, read from storage (and migrated) on first use.
    async fn current(&mut self) -> Result<&mut Current> {
        if self.current.is_none() {
            let sid = self.sid.clone();
            let loaded = self
                .io(move |store| async move {
                    Ok(store.load_session(&sid).await?.map(|d| match d.head.clone() {
                        RecordHead::Session { saved_at, meta, .. } => (d, saved_at, meta),
                        RecordHead::Checkpoint { timestamp, .. } => {
                            (d, timestamp, SessionMeta::default())
                        }
                    }))
                })
                .await?;
            let current = match loaded {
                Some((d, saved_at, mut meta)) => {
                    let state = self.shared.config.migrations.state_of(&self.sid, &d)?;
                    if state.migrated {
                        meta.schema = self.shared.config.migrations.current;
                    }
                    Current { state: Some(state.state), saved_at, meta }
                }
                None => Current {
                    state: None,
                    saved_at: 0,
                    meta: SessionMeta {
                        schema: self.shared.config.migrations.current,
                        ..SessionMeta::default()
                    },
                },
            };
            // The step policy counts from the newest checkpoint on its branch (not from the
            // session record: a crash between a flush's two writes leaves the record ahead).
            self.last_checkpoint_step = {
                let idx = self.shared.store.index();
                idx.sessions.get(&self.sid).and_then(|e| {
                    e.checkpoints
                        .values()
                        .rev()
                        .find(|c| c.branch_id == self.policy.branch)
                        .and_then(|c| c.step)
                })
            };
            self.set_current(Some(current));
        }
        self.current.as_mut().ok_or_else(|| StateError::unavailable("session state missing"))
    }

    async fn load(&mut self) -> Result<Option<StateBytes>> {
        if !self.serves_from_memory() {
            // Another node may be writing: read the record, keep nothing.
            self.current = None;
            let state = self.current().await?.state.clone();
            self.current = None;
            return Ok(state);
        }
        Ok(self.current().await?.state.clone())
    }

    /// Saves `state` durably with the current meta changed by `edit`.
    async fn save_with(
        &mut self,
        state: StateBytes,
        edit: impl FnOnce(&mut SessionMeta),
    ) -> Result<u64> {
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
        let r = self
            .io(move |store| async move { store.save_session(&sid, data.as_bytes(), at, m).await })
            .await;
        match r {
            Ok(()) => {
                self.set_current(Some(Current { state: Some(state), saved_at: at, meta }));
                self.dirty = false;
                self.shared.rt.emit(&self.sid, EventKind::Saved);
                Ok(at)
            }
            Err(e) => {
                // Nothing of this save is known to be on disk. Recorded steps not yet saved
                // (`dirty`) were acknowledged: they stay, to be saved by the next write or
                // flush. Otherwise the cache is dropped, to be read again from the records.
                if !self.dirty {
                    self.set_current(None);
                }
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
        self.delete_with(AccessRule::Remove).await
    }

    async fn delete_with(&mut self, rule: AccessRule) -> Result<bool> {
        self.own().await?;
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
            self.io(move |store| async move { store.delete_session(&sid, rule).await }).await?;
        self.set_current(Some(Current { state: None, saved_at: 0, meta: SessionMeta::default() }));
        self.shared.rt.emit_as(&self.sid, EventKind::Deleted, access);
        Ok(existed || in_memory)
    }
}

impl SessionState {
    async fn update(&mut self, update: UpdateFn) -> Result<StateBytes> {
        self.settle_delete().await?;
        let old = self.load().await?;
        let sid = self.sid.to_string();
        let run = || {
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                update(old.as_ref().map(|s| s.as_bytes()))
            }))
        };
        // The closure is the caller's code and may block (or sleep, or spin). On a
        // multi-thread runtime it runs under `block_in_place`: this worker's other tasks move
        // to another thread first, so timers (the caller's call timeout) and other sessions go
        // on while it runs. A current-thread runtime has no other worker to hand them to.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let outcome = if multi_thread { tokio::task::block_in_place(run) } else { run() };
        let new = match outcome {
            Ok(r) => r?,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned());
                warn!(session = %sid, "a panic in an update closure was contained; nothing was written");
                // The closure only read the state: the cache (with any recorded steps not
                // yet saved, which were acknowledged) is as it was, and stays.
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
                checkpoint =
                    Some(self.checkpoint(branch, state, CheckpointReason::Pause, step).await?);
                self.shared.rt.emit(&self.sid, EventKind::Paused { reason });
            }
            SessionStatus::Running => self.shared.rt.emit(&self.sid, EventKind::Resumed),
            SessionStatus::Completed => self.shared.rt.emit(&self.sid, EventKind::Completed),
            SessionStatus::Failed => self.shared.rt.emit(&self.sid, EventKind::Failed { reason }),
        }
        Ok(checkpoint)
    }

    /// Rewrites the session record and checkpoints stored at an older schema version.
    /// Each rewrite is one atomic put, and records already current are skipped, so an
    /// interrupted pass simply runs again.
    async fn migrate(&mut self) -> Result<MigrationReport> {
        self.own().await?;
        let mut report = MigrationReport::default();
        let current = self.shared.config.migrations.current;
        let sid = self.sid.clone();
        let on_disk = self.io(move |store| async move { store.load_session(&sid).await }).await?;
        if let Some(d) = on_disk
            && let RecordHead::Session { saved_at, mut meta, .. } = d.head.clone()
            && let migrated = self.shared.config.migrations.state_of(&self.sid, &d)?
            && migrated.migrated
        {
            meta.schema = current;
            let (sid, m) = (self.sid.clone(), meta.clone());
            self.io(move |store| async move {
                store.save_session(&sid, migrated.state.as_bytes(), saved_at, m).await
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
            idx.sessions
                .get(&self.sid)
                .map(|e| e.checkpoints.keys().cloned().collect())
                .unwrap_or_default()
        };
        for cid in ids {
            let (sid, id) = (self.sid.clone(), cid.clone());
            let Some(d) =
                self.io(move |store| async move { store.load_checkpoint(&sid, &id).await }).await?
            else {
                continue;
            };
            let RecordHead::Checkpoint { branch_id, timestamp, mut meta, .. } = d.head.clone()
            else {
                continue;
            };
            let migrated = self.shared.config.migrations.state_of(&self.sid, &d)?;
            if !migrated.migrated {
                continue;
            }
            meta.schema = current;
            let sid = self.sid.clone();
            self.io(move |store| async move {
                store
                    .put_checkpoint(
                        &sid,
                        &cid,
                        &branch_id,
                        timestamp,
                        meta,
                        migrated.state.as_bytes(),
                    )
                    .await
            })
            .await?;
            report.checkpoints += 1;
        }
        Ok(report)
    }
}
