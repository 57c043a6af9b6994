//! The supervisor: spawns and links the storage actor, the janitor and one session actor
//! per session id, restarts what fails, and shuts everything down in order.
//! Owns the slots of the session actors (live or draining, with the requests waiting for
//! a draining one) and the memory-return policy. Calls the other actors' constructors, the
//! store (the directory of live actors, the hot map, closing the store at shutdown) and
//! `trim`.

use std::collections::HashMap;
use std::time::Duration;

use ractor::{
    Actor, ActorId, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SupervisionEvent,
};
use tokio::time::Instant;
use tracing::{error, warn};

use super::janitor::{JanitorActor, JanitorMsg};
use super::session::{SessionActor, SessionArgs, SessionMsg};
use super::storage::{StorageActor, StorageMsg};
use super::{Config, Shared};
use crate::store::Store;
use std::sync::Arc;

use super::trim::{Decision, MemoryReturn};
use crate::error::{Result, StateError};
use crate::types::SessionId;

type SessionReply = RpcReplyPort<Result<ActorRef<SessionMsg>>>;

/// Messages of the supervisor.
pub(crate) enum SupervisorMsg {
    /// The session actor for `sid`, spawned if there is none.
    Get { sid: SessionId, reply: SessionReply },
    /// A session actor is about to drain after its idle timeout.
    Passivating { sid: SessionId, actor: ActorId },
    /// Number of live session actors.
    LiveSessions { reply: RpcReplyPort<usize> },
    /// The janitor, for on-demand passes.
    Janitor { reply: RpcReplyPort<Option<ActorRef<JanitorMsg>>> },
    /// The current storage actor.
    Storage { reply: RpcReplyPort<ActorRef<StorageMsg>> },
    /// Drain every session actor, then the janitor and the storage actor, then stop.
    Shutdown { reply: RpcReplyPort<()> },
    /// A rate-limited return of freed memory is due again (sent by the supervisor to itself).
    ReturnMemory,
}

enum Slot {
    Live(ActorRef<SessionMsg>),
    /// Draining; requests wait here until it has stopped, so two actors never serve one
    /// session at the same time.
    Draining {
        actor: ActorRef<SessionMsg>,
        waiting: Vec<SessionReply>,
    },
}

pub(crate) struct SupervisorActor;

pub(crate) struct SupervisorState {
    shared: Shared,
    sessions: HashMap<SessionId, Slot>,
    by_actor: HashMap<ActorId, SessionId>,
    janitor: Option<ActorRef<JanitorMsg>>,
    closing: bool,
    /// Follows the number of live session actors, to give the memory of a passivated
    /// wave of them back to the system.
    memory: MemoryReturn,
}

/// Arguments: the opened store and the settings; the supervisor spawns the rest.
pub(crate) struct SupervisorArgs {
    pub(crate) store: Arc<Store>,
    pub(crate) rt: Arc<super::Runtime>,
    pub(crate) config: Arc<Config>,
}

impl SupervisorState {
    async fn spawn_session(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        sid: &SessionId,
    ) -> Result<ActorRef<SessionMsg>> {
        let args = SessionArgs {
            sid: sid.clone(),
            shared: self.shared.clone(),
            supervisor: myself.clone(),
        };
        let (actor, _) =
            Actor::spawn_linked(None, SessionActor, args, myself.get_cell()).await.map_err(
                |e| StateError::unavailable(format!("could not start a session actor: {e}")),
            )?;
        self.sessions.insert(sid.clone(), Slot::Live(actor.clone()));
        self.by_actor.insert(actor.get_id(), sid.clone());
        self.shared.rt.actors.insert(sid, &actor);
        self.memory.on_spawn(self.sessions.len());
        Ok(actor)
    }

    /// Carries out what the memory policy decided.
    fn return_memory(&mut self, myself: &ActorRef<SupervisorMsg>, decision: Decision) {
        match decision {
            Decision::Nothing => {}
            Decision::TrimNow => {
                // Our own maps were sized for the wave's peak, too.
                self.sessions.shrink_to_fit();
                self.by_actor.shrink_to_fit();
                self.memory.trim(self.sessions.len());
            }
            Decision::RetryIn(after) => {
                myself.send_after(after, || SupervisorMsg::ReturnMemory);
            }
        }
    }
}

impl Actor for SupervisorActor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let (storage, _) =
            Actor::spawn_linked(None, StorageActor, args.store.clone(), myself.get_cell()).await?;
        let shared = Shared { store: args.store, rt: args.rt, storage, config: args.config };
        let janitor = Some(
            Actor::spawn_linked(
                None,
                JanitorActor,
                (shared.clone(), myself.clone()),
                myself.get_cell(),
            )
            .await?
            .0,
        );
        Ok(SupervisorState {
            shared,
            sessions: HashMap::new(),
            by_actor: HashMap::new(),
            janitor,
            closing: false,
            memory: MemoryReturn::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Get { sid, reply } => {
                if st.closing {
                    let _ =
                        reply.send(Err(StateError::unavailable("the state manager is shut down")));
                    return Ok(());
                }
                if let Some(Slot::Live(actor)) = st.sessions.get(&sid) {
                    // A draining or dead actor refuses messages: park the request until
                    // its termination is reported, then hand out a fresh actor.
                    if actor.get_status() >= ActorStatus::Draining {
                        let actor = actor.clone();
                        st.sessions
                            .insert(sid.clone(), Slot::Draining { actor, waiting: Vec::new() });
                    }
                }
                match st.sessions.get_mut(&sid) {
                    Some(Slot::Live(actor)) => {
                        let _ = reply.send(Ok(actor.clone()));
                    }
                    Some(Slot::Draining { waiting, .. }) => waiting.push(reply),
                    None => {
                        let r = st.spawn_session(&myself, &sid).await;
                        let _ = reply.send(r);
                    }
                }
            }
            SupervisorMsg::Passivating { sid, actor } => {
                if let Some(slot) = st.sessions.get_mut(&sid)
                    && let Slot::Live(a) = slot
                    && a.get_id() == actor
                {
                    *slot = Slot::Draining { actor: a.clone(), waiting: Vec::new() };
                }
            }
            SupervisorMsg::LiveSessions { reply } => {
                let _ = reply.send(st.sessions.len());
            }
            SupervisorMsg::Janitor { reply } => {
                let _ = reply.send(st.janitor.clone());
            }
            SupervisorMsg::Storage { reply } => {
                let _ = reply.send(st.shared.storage.clone());
            }
            SupervisorMsg::Shutdown { reply } => {
                st.closing = true;
                let timeout = Some(st.shared.config.call_timeout.max(Duration::from_secs(5)));
                // The janitor first, and killed rather than drained: its pass may be waiting
                // on this very actor. Killing it is safe because it does no I/O itself.
                if let Some(j) = st.janitor.take() {
                    let _ = j.kill_and_wait(timeout).await;
                }
                for (_, slot) in st.sessions.drain() {
                    match slot {
                        // Drain, not stop: every queued save is finished first.
                        Slot::Live(actor) => {
                            if let Err(e) = actor.drain_and_wait(timeout).await {
                                warn!(error = %e, "a session actor did not drain in time");
                            }
                        }
                        // Stopping already (passivating, or fenced): its last writes run in
                        // its own task, so it is waited for before the store is closed.
                        Slot::Draining { actor, waiting } => {
                            for w in waiting {
                                let _ = w.send(Err(StateError::unavailable(
                                    "the state manager is shut down",
                                )));
                            }
                            if let Err(e) = actor.wait(timeout).await {
                                warn!(error = %e, "a session actor did not stop in time");
                            }
                        }
                    }
                }
                // Session actors do their own I/O, so this only waits for jobs started
                // outside them (restores, listings, vacuum, the janitor's).
                let _ = st.shared.storage.drain_and_wait(timeout).await;
                // Everything is written: leave a clean journal so the next start reads no record.
                if let Err(e) = st.shared.store.close().await {
                    warn!(error = %e, "could not write the clean index journal; the next start re-reads session records");
                }
                let _ = reply.send(());
                myself.stop(None);
            }
            SupervisorMsg::ReturnMemory => {
                if !st.closing {
                    let decision = st.memory.on_retry(st.sessions.len(), Instant::now());
                    st.return_memory(&myself, decision);
                }
            }
        }
        Ok(())
    }

    // Overridden: ractor's default stops the supervisor when any child ends.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err)),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if st.closing {
            return Ok(());
        }
        if st.janitor.as_ref().is_some_and(|j| j.get_id() == id) {
            if let Some(err) = failure {
                error!(error = %err, "janitor failed; restarting it");
                st.janitor = Actor::spawn_linked(
                    None,
                    JanitorActor,
                    (st.shared.clone(), myself.clone()),
                    myself.get_cell(),
                )
                .await
                .ok()
                .map(|(a, _)| a);
            }
            return Ok(());
        }
        if st.shared.storage.get_id() == id {
            error!(error = ?failure.map(|e| e.to_string()), "storage actor stopped; restarting it");
            let (storage, _) =
                Actor::spawn_linked(None, StorageActor, st.shared.store.clone(), myself.get_cell())
                    .await?;
            st.shared.storage = storage;
            return Ok(());
        }
        let Some(sid) = st.by_actor.remove(&id) else { return Ok(()) };
        // Whatever the actor published is no longer backed by a live writer.
        st.shared.rt.publish(&sid, None);
        st.shared.rt.actors.remove(&sid, id);
        if let Some(err) = &failure {
            error!(session = %sid, error = %err, "session actor failed; it is restarted on next use");
        }
        match st.sessions.remove(&sid) {
            Some(Slot::Draining { actor, waiting })
                if actor.get_id() == id && !waiting.is_empty() =>
            {
                let r = st.spawn_session(&myself, &sid).await;
                for w in waiting {
                    let _ = w.send(match &r {
                        Ok(a) => Ok(a.clone()),
                        Err(e) => Err(StateError::unavailable(e.to_string())),
                    });
                }
            }
            Some(Slot::Live(a)) if a.get_id() != id => {
                st.sessions.insert(sid, Slot::Live(a));
            }
            // Another actor's slot (a newer one for the same session): leave it alone.
            Some(Slot::Draining { actor, waiting }) if actor.get_id() != id => {
                st.sessions.insert(sid, Slot::Draining { actor, waiting });
            }
            // This actor's slot with nobody waiting, or its live slot: the session simply
            // has no actor now; the next request spawns one.
            _ => {}
        }
        let decision = st.memory.on_end(st.sessions.len(), Instant::now());
        st.return_memory(&myself, decision);
        Ok(())
    }
}

/// Asks the supervisor for `sid`'s session actor.
pub(crate) async fn get_session(
    supervisor: &ActorRef<SupervisorMsg>,
    sid: &SessionId,
) -> Result<ActorRef<SessionMsg>> {
    let sid = sid.clone();
    ask(supervisor, |reply| SupervisorMsg::Get { sid, reply }).await?
}

/// Calls the supervisor with a request that has no error path of its own.
pub(crate) async fn ask<T: Send + 'static>(
    supervisor: &ActorRef<SupervisorMsg>,
    build: impl FnOnce(RpcReplyPort<T>) -> SupervisorMsg,
) -> Result<T> {
    super::ask(supervisor, "the state manager is shut down", build).await
}
