//! A node's session leases on a shared store: which sessions this node holds, until when,
//! and the one renewal round that keeps them. Owns [`Leases`] (the table the session actors
//! fill when they take a lease and empty when they give it up) and the keeper task
//! ([`spawn_keeper`]). Calls the backend's lease methods and the runtime's hot map (a
//! session whose lease ran out or was lost is no longer served from memory); the session
//! actors call it.
//!
//! The keeper renews every lease the node holds with one
//! [`renew_leases`](crate::StorageBackend::renew_leases) call every third of the TTL (not one
//! timer per session). A renewal counts from when it was sent, so this node's idea of when a
//! lease ends is never later than the server's. A lease the backend no longer renews (another
//! node was granted it) is marked lost: its actor's next request fails with
//! [`StateError::Fenced`](crate::StateError::Fenced) and the actor stops; its writes already
//! in flight are refused by the backend's fence.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Config, Runtime};
use crate::backend::{Acquired, Lease, StorageBackend};
use crate::error::{Result, StateError};
use crate::store::Store;
use crate::sync::lock;
use crate::types::Clock;
use crate::types::SessionId;

/// The lease name of a session.
pub(crate) fn lease_name(sid: &SessionId) -> String {
    format!("session/{sid}")
}

/// The lease name of the janitor's turn.
pub(crate) const JANITOR_LEASE: &str = "janitor";

/// How often a node waiting for a lease asks again at most: often enough to catch a
/// release, which frees a lease at once.
const POLL: Duration = Duration::from_millis(100);

/// When a lease with `left` to run ends, in milliseconds since the Unix epoch by this node's
/// clock (for [`StateError::OwnedElsewhere`] and listings).
pub(crate) fn until_ms(clock: &Clock, left: Duration) -> u64 {
    clock.now_ms().saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
}

/// The [`StateError::Fenced`] for a node whose lease `name` at `token` is another node's
/// now, naming the lease's current token (read from the backend; `token + 1` if it cannot
/// be read, the least it can be).
pub(crate) async fn fenced(backend: &dyn StorageBackend, name: String, token: u64) -> StateError {
    let current = match backend.read_lease(&name).await {
        Ok(Some(state)) => state.token,
        _ => token + 1,
    };
    StateError::Fenced { name, token, current }
}

/// Takes lease `name` for `node`, waiting up to `wait` while another node holds it (asking
/// again when the holder's lease runs out, or after [`POLL`]), then
/// [`StateError::OwnedElsewhere`] naming the holder. Returns the lease and when the granting
/// request was sent (a lease's local end counts from then).
pub(crate) async fn acquire_within(
    backend: &dyn StorageBackend,
    clock: &Clock,
    name: &str,
    node: &str,
    ttl: Duration,
    wait: Duration,
) -> Result<(Lease, Instant)> {
    let deadline = Instant::now() + wait;
    loop {
        let sent = Instant::now();
        match backend.acquire_lease(name, node, ttl).await? {
            Acquired::Granted(lease) => return Ok((lease, sent)),
            Acquired::Held { node, expires_in } => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(StateError::OwnedElsewhere {
                        node,
                        until: until_ms(clock, expires_in),
                    });
                }
                let nap = (expires_in + Duration::from_millis(5)).min(POLL).min(deadline - now);
                tokio::time::sleep(nap).await;
            }
        }
    }
}

/// A lease this node holds.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) lease: Lease,
    /// When it ends by this node's clock unless renewed (counted from when the grant or
    /// renewal was sent).
    pub(crate) valid_until: Instant,
    /// The backend refused to renew it: another node was granted it.
    pub(crate) lost: bool,
}

impl Held {
    /// Whether this node may serve the session from memory: held, not lost, not run out.
    pub(crate) fn live(&self, now: Instant) -> bool {
        !self.lost && self.valid_until > now
    }
}

/// The session leases this node holds (see the [module docs](self)).
#[derive(Debug, Default)]
pub(crate) struct Leases(Mutex<HashMap<SessionId, Held>>, tokio::sync::Mutex<()>);

impl Leases {
    /// Waits until no renewal round is in flight. A release waits for it after taking its
    /// lease out of the table (so no later round carries it): a renewal sent before the
    /// release and answered after it would mark the lease held again (a renewal clears
    /// `released` and extends the lease), and other nodes would wait for it to run out.
    pub(crate) async fn no_renewal_in_flight(&self) {
        drop(self.1.lock().await);
    }

    /// `sid`'s lease as the session actor checks it before every write, without copying
    /// it: its token, its local end, and whether it was lost.
    pub(crate) fn peek(&self, sid: &SessionId) -> Option<(u64, Instant, bool)> {
        lock(&self.0).get(sid).map(|h| (h.lease.token, h.valid_until, h.lost))
    }

    /// Whether this node holds `sid`'s lease (live or not).
    pub(crate) fn has(&self, sid: &SessionId) -> bool {
        lock(&self.0).contains_key(sid)
    }

    pub(crate) fn insert(&self, sid: &SessionId, lease: Lease, valid_until: Instant) {
        lock(&self.0).insert(sid.clone(), Held { lease, valid_until, lost: false });
    }

    pub(crate) fn remove(&self, sid: &SessionId) -> Option<Held> {
        lock(&self.0).remove(sid)
    }

    /// Whether this node holds `sid`'s lease live.
    pub(crate) fn holds(&self, sid: &SessionId) -> bool {
        lock(&self.0).get(sid).is_some_and(|h| h.live(Instant::now()))
    }

    fn snapshot(&self) -> Vec<(SessionId, Lease)> {
        lock(&self.0)
            .iter()
            .filter(|(_, h)| !h.lost)
            .map(|(s, h)| (s.clone(), h.lease.clone()))
            .collect()
    }
}

/// Starts the renewal round of this node's leases: every third of the TTL, until the
/// manager's runtime is gone.
pub(crate) fn spawn_keeper(store: &Arc<Store>, rt: &Arc<Runtime>, config: &Arc<Config>) {
    let (store, rt) = (Arc::downgrade(store), Arc::downgrade(rt));
    let ttl = config.lease_ttl;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !renew_round(&store, &rt, ttl).await {
                break;
            }
        }
    });
}

/// One renewal round. Returns false once the manager is gone.
async fn renew_round(store: &Weak<Store>, rt: &Weak<Runtime>, ttl: Duration) -> bool {
    let (Some(store), Some(rt)) = (store.upgrade(), rt.upgrade()) else { return false };
    // Held for the round's call: a release waits for it (`no_renewal_in_flight`).
    let _round = rt.leases.1.lock().await;
    let held = rt.leases.snapshot();
    if !held.is_empty() {
        let leases: Vec<Lease> = held.iter().map(|(_, l)| l.clone()).collect();
        let sent = Instant::now();
        match store.backend.renew_leases(&leases, ttl).await {
            Ok(answers) => {
                let mut table = lock(&rt.leases.0);
                for ((sid, old), answer) in held.iter().zip(answers) {
                    // Only the lease the answer is about: the actor may have given it up,
                    // or taken a new one, meanwhile.
                    let Some(h) = table.get_mut(sid).filter(|h| h.lease.token == old.token) else {
                        continue;
                    };
                    match answer {
                        Some(renewed) => h.valid_until = sent + renewed.expires_in,
                        None => {
                            debug!(session = %sid, "session lease lost to another node");
                            h.lost = true;
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, leases = leases.len(), "lease renewal failed; retrying at the next round")
            }
        }
    }
    // A session whose lease is lost or ran out is no longer served from this node's memory:
    // loads read the store (where another node may be writing) until its actor takes the
    // lease again.
    let now = Instant::now();
    let stale: Vec<SessionId> =
        lock(&rt.leases.0).iter().filter(|(_, h)| !h.live(now)).map(|(s, _)| s.clone()).collect();
    for sid in stale {
        rt.publish(&sid, None);
    }
    true
}
