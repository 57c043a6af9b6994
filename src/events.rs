//! Live change events: [`StateEvent`], [`EventKind`] and the [`Watch`] that delivers them.
//! Owns the event types and the access check a principal's watch makes at every event.
//! Calls [`crate::access`] (who may read a session) and [`crate::types`]; the session
//! actors emit events through the store's broadcast channel, the handle hands out watches.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::access::AccessRecord;
use crate::types::{CheckpointId, CheckpointReason, Principal, SessionId};

/// A change to a session, as delivered by [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEvent {
    /// The session that changed.
    pub session_id: SessionId,
    /// What happened.
    pub kind: EventKind,
    /// When, in milliseconds since the Unix epoch.
    pub at: u64,
}

/// What happened to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// Its state was saved durably (save, update, rollback, flush of recorded steps).
    Saved,
    /// A checkpoint was taken.
    Checkpointed {
        /// The checkpoint.
        id: CheckpointId,
        /// Why.
        reason: CheckpointReason,
        /// The step it captures, if known.
        step: Option<u64>,
    },
    /// It was rolled back to a checkpoint.
    RolledBack {
        /// The checkpoint.
        to: CheckpointId,
    },
    /// It was paused.
    Paused {
        /// The reason given.
        reason: String,
    },
    /// It was resumed.
    Resumed,
    /// It was marked completed.
    Completed,
    /// It was marked failed.
    Failed {
        /// The reason given.
        reason: String,
    },
    /// It was deleted.
    Deleted,
}

/// A change event as the crate broadcasts it: the event, and the session's access record
/// at the moment the change was applied, which decides who may see it.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    pub(crate) event: StateEvent,
    /// `None`: the session has no owner (only administrators and the unscoped manager may
    /// see its events).
    pub(crate) access: Option<Arc<AccessRecord>>,
    /// Events of the same sender this node missed just before this one (another node's
    /// event, received through the store).
    pub(crate) missed: Missed,
}

/// How many events a node missed before an event of another node (see
/// `actor::remote`): of the same session, for a session's watch, and of any session, for
/// `watch_all`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Missed {
    pub(crate) session: u64,
    pub(crate) node: u64,
}

/// A live feed of [`StateEvent`]s from [`watch`](crate::StateManager::watch), without
/// polling. Events arrive in the order the session actor applied them.
///
/// On a [shared](crate::StorageBackend::shared) store a watch also delivers the events of
/// the writes other nodes make (received through the store, see
/// [`publish_events`](crate::StorageBackend::publish_events)), in order per session. Events
/// of other nodes this node did not receive (its feed from the store was cut and
/// reconnected, or a publish failed) are counted by their sequence numbers and reported as
/// [`WatchError::Lagged`] just before the next event received from the same node (for a
/// session's watch, the next one of that session), which the next `recv` returns.
///
/// A watch taken by a principal (a handle from
/// [`for_principal`](crate::StateManager::for_principal)) is checked at every event, not
/// only when it was taken: an event of a change made while the principal could not read
/// the session (its access was revoked, or the session was created and is owned by someone
/// else) is never delivered; [`recv`](Watch::recv) returns [`WatchError::AccessDenied`]
/// instead, and the watch ends.
#[derive(Debug)]
pub struct Watch {
    pub(crate) rx: broadcast::Receiver<Envelope>,
    pub(crate) session: Option<SessionId>,
    /// Checked at every event; `None` for the unscoped manager and administrators.
    pub(crate) reader: Option<Principal>,
    /// Set once an event was refused: the watch has ended.
    pub(crate) denied: bool,
    /// An event held back while the events missed before it are reported.
    pub(crate) pending: Option<StateEvent>,
}

/// Why [`Watch::recv`] returned no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The watcher fell more than the buffer (4,096 events) behind, or (on a shared store)
    /// this node did not receive some of another node's events; this many were lost. The
    /// watch goes on with the newest events.
    #[error("the watcher fell behind and missed {0} events")]
    Lagged(u64),
    /// The manager has shut down.
    #[error("the state manager has shut down")]
    Closed,
    /// The watching principal may no longer read the session (its access was revoked, or
    /// the session now belongs to someone else). The watch has ended: every later call
    /// returns this too; take a new watch once access is granted again.
    #[error("the watching principal may not read this session")]
    AccessDenied,
}

impl Watch {
    pub(crate) fn new(
        rx: broadcast::Receiver<Envelope>,
        session: Option<SessionId>,
        reader: Option<Principal>,
    ) -> Watch {
        Watch { rx, session, reader, denied: false, pending: None }
    }

    /// The next event (of the watched session, or of any session).
    pub async fn recv(&mut self) -> std::result::Result<StateEvent, WatchError> {
        if let Some(event) = self.pending.take() {
            return Ok(event);
        }
        loop {
            if self.denied {
                return Err(WatchError::AccessDenied);
            }
            match self.rx.recv().await {
                Ok(e) if self.session.as_ref().is_none_or(|s| *s == e.event.session_id) => {
                    if let Some(p) = &self.reader
                        && !e.access.as_deref().is_some_and(|r| r.readable_by(p))
                    {
                        self.denied = true;
                        continue;
                    }
                    let missed =
                        if self.session.is_some() { e.missed.session } else { e.missed.node };
                    if missed > 0 {
                        self.pending = Some(e.event);
                        return Err(WatchError::Lagged(missed));
                    }
                    return Ok(e.event);
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(WatchError::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return Err(WatchError::Closed),
            }
        }
    }
}
