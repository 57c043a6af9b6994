//! Change events across the nodes of a shared store. Owns the wire form of a published
//! event, the numbering that lets a receiver count what it missed ([`Numbers`]), the
//! publisher task (this node's events, in batches, to
//! [`publish_events`](crate::StorageBackend::publish_events)) and the subscriber task (other
//! nodes' events from [`subscribe_events`](crate::StorageBackend::subscribe_events) into
//! the runtime's broadcast, where [`Watch`](crate::Watch) delivers them). Calls the backend's
//! event methods and the store's access table; the runtime calls it when it emits.
//!
//! Every event a node publishes carries its node id, a random number for this run of the
//! manager (a restarted node starts its numbers again), a node-wide sequence number and a
//! per-session one. A receiver keeps the last of each it saw per sender: a gap is events it
//! missed (the publisher's queue was full, a publish failed, or the receiver's feed was cut
//! and reconnected), told to watchers as [`WatchError::Lagged`](crate::WatchError::Lagged)
//! before the next event (the session's gap to a session watch, the node's to `watch_all`).
//! Events published while a receiver is cut off, by a node that publishes nothing after, are
//! reported only with that node's next event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::Runtime;
use crate::backend::{EventFeed, StorageBackend};
use crate::error::ErrorKind;
use crate::events::{EventKind, Missed, StateEvent};
use crate::store::Store;
use crate::sync::lock;
use crate::types::{CheckpointId, CheckpointReason, SessionId};

/// How many events may wait for the publisher; further ones are dropped (and counted as
/// missed by the receivers).
const OUTBOX: usize = 4096;

/// How many queued events one publish call carries at most.
const BATCH: usize = 256;

/// The longest pause and free-text reason a published event carries, in bytes; a longer
/// one is cut at a character boundary and ends in `…`.
pub(crate) const MAX_REASON: usize = 1024;

/// What goes to the publisher.
#[derive(Debug)]
pub(crate) enum Out {
    Event(Vec<u8>),
    /// Answered once everything queued before it was published (or failed to be).
    Flush(oneshot::Sender<()>),
}

/// This node's side: its names and numbers, and the publisher's queue.
#[derive(Debug)]
pub(crate) struct Remote {
    node: String,
    run: u64,
    numbers: Mutex<Numbers>,
    outbox: mpsc::Sender<Out>,
    /// Taken by [`start`].
    queued: Mutex<Option<mpsc::Receiver<Out>>>,
    /// Never sent: dropped with the runtime, which stops the subscriber.
    _stop: oneshot::Sender<()>,
    stopped: Mutex<Option<oneshot::Receiver<()>>>,
}

#[derive(Debug, Default)]
struct Numbers {
    node: u64,
    sessions: HashMap<SessionId, u64>,
}

/// An event as published (see the [module docs](self)).
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    /// The format version.
    v: u8,
    node: String,
    run: u64,
    /// Node-wide sequence number (from 1).
    n: u64,
    sid: String,
    /// Per-session sequence number of this node's run (from 1).
    s: u64,
    at: u64,
    #[serde(flatten)]
    kind: WireKind,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
enum WireKind {
    Saved,
    Checkpointed { id: String, reason: CheckpointReason, step: Option<u64> },
    RolledBack { to: String },
    Paused { reason: String },
    Resumed,
    Completed,
    Failed { reason: String },
    Deleted,
}

impl WireKind {
    fn of(kind: &EventKind) -> WireKind {
        match kind {
            EventKind::Saved => WireKind::Saved,
            EventKind::Checkpointed { id, reason, step } => {
                WireKind::Checkpointed { id: id.as_str().to_owned(), reason: *reason, step: *step }
            }
            EventKind::RolledBack { to } => WireKind::RolledBack { to: to.as_str().to_owned() },
            EventKind::Paused { reason } => WireKind::Paused { reason: cut(reason) },
            EventKind::Resumed => WireKind::Resumed,
            EventKind::Completed => WireKind::Completed,
            EventKind::Failed { reason } => WireKind::Failed { reason: cut(reason) },
            EventKind::Deleted => WireKind::Deleted,
        }
    }

    /// The event kind; `None` if a checkpoint id in it is not valid.
    fn into_kind(self) -> Option<EventKind> {
        Some(match self {
            WireKind::Saved => EventKind::Saved,
            WireKind::Checkpointed { id, reason, step } => {
                EventKind::Checkpointed { id: CheckpointId::parse(&id).ok()?, reason, step }
            }
            WireKind::RolledBack { to } => {
                EventKind::RolledBack { to: CheckpointId::parse(&to).ok()? }
            }
            WireKind::Paused { reason } => EventKind::Paused { reason },
            WireKind::Resumed => EventKind::Resumed,
            WireKind::Completed => EventKind::Completed,
            WireKind::Failed { reason } => EventKind::Failed { reason },
            WireKind::Deleted => EventKind::Deleted,
        })
    }
}

/// `reason` cut to [`MAX_REASON`] bytes at a character boundary, marked with `…`.
fn cut(reason: &str) -> String {
    if reason.len() <= MAX_REASON {
        return reason.to_owned();
    }
    let mut end = MAX_REASON - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

impl Remote {
    pub(crate) fn new(node: &str) -> Remote {
        let (outbox, queued) = mpsc::channel(OUTBOX);
        let (stop, stopped) = oneshot::channel();
        Remote {
            node: node.to_owned(),
            run: crate::random::unique_u64(),
            numbers: Mutex::new(Numbers::default()),
            outbox,
            queued: Mutex::new(Some(queued)),
            _stop: stop,
            stopped: Mutex::new(Some(stopped)),
        }
    }

    /// Numbers `event` and queues it for the publisher. A full queue drops it: receivers
    /// see the gap and report it as missed.
    pub(crate) fn publish(&self, event: &StateEvent) {
        let kind = WireKind::of(&event.kind);
        let mut numbers = lock(&self.numbers);
        numbers.node += 1;
        let n = numbers.node;
        let s = match numbers.sessions.get_mut(&event.session_id) {
            Some(s) => {
                *s += 1;
                *s
            }
            None => {
                numbers.sessions.insert(event.session_id.clone(), 1);
                1
            }
        };
        let wire = Wire {
            v: 1,
            node: self.node.clone(),
            run: self.run,
            n,
            sid: event.session_id.as_str().to_owned(),
            s,
            at: event.at,
            kind,
        };
        let Ok(payload) = serde_json::to_vec(&wire) else { return };
        // Queued under the numbers' lock, so the queue's order is the numbers' order.
        if self.outbox.try_send(Out::Event(payload)).is_err() {
            debug!(session = %event.session_id, "event publisher queue full; the event is dropped (counted as missed by other nodes)");
        }
        drop(numbers);
    }

    /// Waits until every event queued so far was handed to the backend: before a session's
    /// lease is released, so that the next holder's events follow this node's on every feed.
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.outbox.send(Out::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the publisher and the subscriber of a manager on a shared store. Subscribes once
/// before returning, so every event published after `start` reaches this node; a backend
/// that carries no events (an error of kind `Config`) leaves the node's events local, with
/// a warning.
pub(crate) async fn start(store: &Arc<Store>, rt: &Arc<Runtime>) -> crate::Result<()> {
    let Some(remote) = rt.remote.as_ref() else { return Ok(()) };
    let feed = match store.backend.subscribe_events().await {
        Ok(feed) => feed,
        Err(e) if e.kind() == ErrorKind::Config => {
            warn!(error = %e, "this shared backend carries no change events: watches see this node's changes only");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let (Some(queued), Some(stopped)) = (lock(&remote.queued).take(), lock(&remote.stopped).take())
    else {
        return Ok(());
    };
    tokio::spawn(publisher(store.backend.clone(), queued));
    tokio::spawn(subscriber(Arc::downgrade(store), Arc::downgrade(rt), feed, stopped));
    Ok(())
}

/// Publishes what is queued, in batches, until the runtime (the queue's sender) is gone.
async fn publisher(backend: Arc<dyn StorageBackend>, mut queued: mpsc::Receiver<Out>) {
    let mut batch = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = queued.recv().await {
        let mut next = Some(first);
        while let Some(out) = next {
            match out {
                Out::Event(p) => batch.push(p),
                Out::Flush(tx) => flushes.push(tx),
            }
            next = if batch.len() < BATCH { queued.try_recv().ok() } else { None };
        }
        if !batch.is_empty() {
            let count = batch.len();
            if let Err(e) = backend.publish_events(std::mem::take(&mut batch)).await {
                warn!(error = %e, events = count, "publishing change events failed; other nodes count them as missed");
            }
        }
        for tx in flushes.drain(..) {
            let _ = tx.send(());
        }
    }
}

/// What a receiver knows of one sender's run.
#[derive(Debug, Default)]
struct Seen {
    node: u64,
    sessions: HashMap<SessionId, u64>,
}

/// Feeds other nodes' events into the runtime's broadcast until the runtime is gone;
/// subscribes again (with a backoff) when the feed ends.
async fn subscriber(
    store: Weak<Store>,
    rt: Weak<Runtime>,
    feed: EventFeed,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut seen: HashMap<(String, u64), Seen> = HashMap::new();
    let mut feed = Some(feed);
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(current) = feed.as_mut() else {
            let Some(store) = store.upgrade() else { return };
            let backend = store.backend.clone();
            drop(store);
            tokio::select! {
                _ = &mut stopped => return,
                subscribed = backend.subscribe_events() => match subscribed {
                    Ok(f) => {
                        debug!("change-event feed subscribed again");
                        feed = Some(f);
                        backoff = Duration::from_millis(50);
                    }
                    Err(e) => {
                        warn!(error = %e, "subscribing to change events failed; retrying");
                        tokio::select! {
                            _ = &mut stopped => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                },
            }
            continue;
        };
        let payload = tokio::select! {
            _ = &mut stopped => return,
            p = current.recv() => p,
        };
        let Some(payload) = payload else {
            // Published until the next subscription are lost; the numbers show how many.
            warn!("the change-event feed was cut; subscribing again");
            feed = None;
            continue;
        };
        let (Some(store), Some(rt)) = (store.upgrade(), rt.upgrade()) else { return };
        receive(&store, &rt, &mut seen, &payload).await;
    }
}

/// Hands one received payload to the local watchers, with what was missed before it.
async fn receive(
    store: &Store,
    rt: &Runtime,
    seen: &mut HashMap<(String, u64), Seen>,
    payload: &[u8],
) {
    let Ok(wire) = serde_json::from_slice::<Wire>(payload) else {
        debug!("ignored a change event in an unknown form");
        return;
    };
    let Ok(sid) = SessionId::new(&wire.sid) else {
        debug!("ignored a change event with an invalid session id");
        return;
    };
    let Some(remote) = rt.remote.as_ref() else { return };
    if wire.node == remote.node && wire.run == remote.run {
        return;
    }
    let sender = seen.entry((wire.node, wire.run)).or_default();
    let last = sender.sessions.entry(sid.clone()).or_default();
    // A repeat (a publish retried after its reply was lost) is delivered once.
    let Some(session) = gap(last, wire.s) else { return };
    let node = gap(&mut sender.node, wire.n).unwrap_or(0);
    if !rt.has_watchers() {
        return;
    }
    let Some(kind) = wire.kind.into_kind() else {
        debug!(session = %sid, "ignored a change event with an invalid checkpoint id");
        return;
    };
    if store.access.shared(&sid).is_none()
        && let Err(e) = store.refresh_access(&sid, crate::store::AccessRule::Keep).await
    {
        debug!(session = %sid, error = %e, "could not read the access record of a remote event's session");
    }
    let access = store.access.shared(&sid);
    let event = StateEvent { session_id: sid, kind, at: wire.at };
    rt.deliver(event, access, Missed { session, node });
}

/// The events missed between `*last` and `next` (0 for the first one seen), and `*last`
/// becomes `next`; `None` for one that is not newer than `*last` (a repeat).
fn gap(last: &mut u64, next: u64) -> Option<u64> {
    if next <= *last {
        return None;
    }
    let missed = if *last == 0 { 0 } else { next - *last - 1 };
    *last = next;
    Some(missed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_count_what_was_skipped() {
        let mut last = 0;
        assert_eq!(gap(&mut last, 5), Some(0), "the first seen");
        assert_eq!(gap(&mut last, 6), Some(0));
        assert_eq!(gap(&mut last, 9), Some(2));
        assert_eq!(gap(&mut last, 9), None, "a repeat");
        assert_eq!(gap(&mut last, 7), None, "an older one");
        assert_eq!(last, 9);
    }

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_REASON);
        let cut = cut(&long);
        assert!(cut.len() <= MAX_REASON && cut.ends_with('…'));
        assert_eq!(super::cut("short"), "short");
    }
}
