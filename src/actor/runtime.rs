//! The actor runtime's live state: what exists only while a manager runs and is lost,
//! by design, when it stops. Owns the hot map (the current state of every live session,
//! published by its session actor), the change-event channel, the per-session checkpoint
//! policies set at run time, and the directory of live session actors; on a shared store,
//! the link to the other nodes' events (`remote.rs`). Calls the store only
//! for what is persisted (the index, pending deletes, access records, the clock); the store
//! never calls it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::Directory;
use super::lease::Leases;
use super::remote::Remote;
use crate::access::AccessRecord;
use crate::config::CheckpointPolicy;
use crate::events::{Envelope, EventKind, Missed, StateEvent};
use crate::store::Store;
use crate::sync::Sharded;
use crate::types::{SessionId, StateBytes};

/// How many events a watcher may fall behind before it is told how many it missed.
const EVENT_BUFFER: usize = 4096;

/// The live state of one manager's actors (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct Runtime {
    store: Arc<Store>,
    /// The current state of every live session, published by its session actor: loads are
    /// served from here without a message. `Some(None)`: known to have no state. Sharded to
    /// keep concurrent loads of different sessions from contending.
    hot: Sharded<Option<StateBytes>>,
    /// Live change events for watchers, each with the access record it was made under.
    events: broadcast::Sender<Envelope>,
    /// Per-session checkpoint policies set at run time (in memory: an orchestrator sets
    /// them again when it resumes a run).
    pub(crate) policies: Mutex<HashMap<SessionId, CheckpointPolicy>>,
    /// The live session actors (kept by the supervisor), for requests that skip it.
    pub(crate) actors: Directory,
    /// The session leases this node holds, on a shared store.
    pub(crate) leases: Leases,
    /// On a shared store: this node's events go to the other nodes through it, and theirs
    /// come in. A read-only manager on a shared store has it for the incoming events only
    /// (it makes none).
    pub(crate) remote: Option<Remote>,
}

impl Runtime {
    /// The runtime of node `node`; `others_write` says whether other nodes write the
    /// store (its backend is shared, also when this manager only reads it), so that their
    /// events are received.
    pub(crate) fn new(store: Arc<Store>, node: &str, others_write: bool) -> Runtime {
        Runtime {
            remote: (store.shared || others_write).then(|| Remote::new(node)),
            store,
            hot: Sharded::default(),
            events: broadcast::channel(EVENT_BUFFER).0,
            policies: Mutex::new(HashMap::new()),
            actors: Directory::default(),
            leases: Leases::default(),
        }
    }

    /// Publishes a live session's state (`None`: unknown, loads go to the actor).
    pub(crate) fn publish(&self, sid: &SessionId, state: Option<Option<StateBytes>>) {
        let mut shard = self.hot.shard(sid);
        match state {
            // The usual case, a save of a live session: no new key.
            Some(s) => match shard.get_mut(sid) {
                Some(slot) => *slot = s,
                None => {
                    shard.insert(sid.clone(), s);
                }
            },
            None => {
                shard.remove(sid);
            }
        }
    }

    /// A live session's state, if its actor has published one.
    pub(crate) fn hot(&self, sid: &SessionId) -> Option<Option<StateBytes>> {
        self.hot.shard(sid).get(sid).cloned()
    }

    /// Sessions whose state lives only in their actor's memory so far (recorded steps not
    /// yet flushed, and no record or checkpoint yet): they exist, but the index has not
    /// caught up with them.
    pub(crate) fn memory_only_sessions(&self) -> Vec<SessionId> {
        let mut live = self.hot.ids_where(|s| s.is_some());
        let idx = self.store.index();
        live.retain(|sid| !idx.sessions.contains_key(sid));
        live
    }

    /// Whether anything of `sid` is kept, for access control's "may a first write claim
    /// it": records (the index), a state only in its actor's memory (recorded steps not
    /// flushed yet), or a delete that failed part way. Not only what the index has caught
    /// up with.
    pub(crate) fn exists(&self, sid: &SessionId) -> bool {
        self.store.index().sessions.contains_key(sid)
            || matches!(self.hot(sid), Some(Some(_)))
            || self.store.is_deleting(sid)
    }

    /// A new receiver of every change event from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Envelope> {
        self.events.subscribe()
    }

    /// Whether anyone watches this node's events.
    pub(crate) fn has_watchers(&self) -> bool {
        self.events.receiver_count() > 0
    }

    /// Tells watchers about a change (no one listening is fine), with the session's access
    /// record as it is now: a watcher sees the event only if that record lets it read. On a
    /// shared store it also goes to the other nodes.
    pub(crate) fn emit(&self, sid: &SessionId, kind: EventKind) {
        // Every save emits: with no watcher, skip the access lookup (the event would be
        // dropped anyway).
        let access = if self.has_watchers() { self.store.access.shared(sid) } else { None };
        self.emit_as(sid, kind, access);
    }

    /// Like [`emit`](Self::emit), under an access record taken earlier (a delete's event
    /// goes to those who could read the session before it was deleted).
    pub(crate) fn emit_as(
        &self,
        sid: &SessionId,
        kind: EventKind,
        access: Option<Arc<AccessRecord>>,
    ) {
        let event = StateEvent { session_id: sid.clone(), kind, at: self.store.clock.now_ms() };
        if let Some(remote) = &self.remote {
            remote.publish(&event);
        }
        self.deliver(event, access, Missed::default());
    }

    /// Hands an event (this node's, or another's received through the store) to this
    /// node's watchers.
    pub(crate) fn deliver(
        &self,
        event: StateEvent,
        access: Option<Arc<AccessRecord>>,
        missed: Missed,
    ) {
        if self.has_watchers() {
            let _ = self.events.send(Envelope { event, access, missed });
        }
    }

    /// Waits until this node's events so far were handed to the store (before a session's
    /// lease is released: the next holder's events then follow them). Nothing to wait for
    /// on a store with one writer.
    pub(crate) async fn flush_events(&self) {
        if let Some(remote) = &self.remote {
            remote.flush().await;
        }
    }
}
