//! Leases and fencing tokens: the types a shared backend's lease methods
//! ([`StorageBackend::acquire_lease`](super::StorageBackend::acquire_lease) and the rest)
//! and fenced writes ([`StorageBackend::put_fenced`](super::StorageBackend::put_fenced),
//! [`delete_fenced`](super::StorageBackend::delete_fenced)) exchange. Owns [`Fence`],
//! [`Lease`], [`Acquired`] and [`LeaseState`]; calls nothing.
//!
//! A lease names a thing one node at a time may write (a session, the janitor's turn), the
//! node holding it, until when (by the store server's clock, reported relative), and a
//! fencing token: a number that grows by one whenever the lease is granted to a node that
//! did not hold it live (another node, or any grant after an expiry or a release), and
//! never decreases. Every write made under the lease carries the token as a [`Fence`];
//! the backend refuses, in the same statement or script as the write, one whose token is
//! no longer the lease's. On a shared store every session actor takes its session's lease
//! (`session/<id>`) before it writes, and the janitor takes `janitor` for each pass (see
//! [`StateManagerBuilder::node_id`](crate::StateManagerBuilder::node_id)).

use std::time::Duration;

/// What a write made under a [`Lease`] carries: the lease's name and the fencing token the
/// writer was granted. A fenced write succeeds only while the lease's current token is
/// `token`; after another node took the lease (a higher token) it is refused with
/// [`StateError::Fenced`](crate::StateError::Fenced) and changes nothing.
///
/// ```
/// use mars_state::Fence;
/// let fence = Fence::new("session/s1", 7);
/// assert_eq!((fence.name.as_str(), fence.token), ("session/s1", 7));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The lease whose token is checked.
    pub name: String,
    /// The token the writer holds.
    pub token: u64,
}

impl Fence {
    /// A fence of lease `name` at `token`.
    pub fn new(name: impl Into<String>, token: u64) -> Self {
        Fence { name: name.into(), token }
    }
}

/// A lease granted to a node: see
/// [`StorageBackend::acquire_lease`](super::StorageBackend::acquire_lease).
///
/// `expires_in` is how long the lease had left when the backend answered, measured by the
/// store server's clock (PostgreSQL's `clock_timestamp()`, Redis's `TIME`, the process's
/// monotonic clock for the memory backend), so clocks of the nodes never need to agree. A
/// holder should renew well before it runs out, counting from when it sent the request.
///
/// ```
/// use std::time::Duration;
/// use mars_state::{Fence, Lease};
/// let lease = Lease {
///     name: "session/s1".into(),
///     node: "node-a".into(),
///     token: 3,
///     expires_in: Duration::from_secs(10),
///     taken_from: None,
/// };
/// assert_eq!(lease.fence(), Fence::new("session/s1", 3));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease's name.
    pub name: String,
    /// The node holding it.
    pub node: String,
    /// Its fencing token (1 at the first grant).
    pub token: u64,
    /// Time left until it expires, by the server's clock, when the backend answered.
    pub expires_in: Duration,
    /// On a grant: the node that held the lease before and let it expire without releasing
    /// it (it died, hung or lost the store): the caller is taking over from it. `None` for
    /// a first grant, a grant after a release, a grant to the node that held it, and on
    /// renewals.
    pub taken_from: Option<String>,
}

impl Lease {
    /// The fence that writes made under this lease carry.
    pub fn fence(&self) -> Fence {
        Fence { name: self.name.clone(), token: self.token }
    }
}

/// The answer to [`StorageBackend::acquire_lease`](super::StorageBackend::acquire_lease).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> mars_state::Result<()> {
/// use std::time::Duration;
/// use mars_state::{Acquired, MemoryStorageBackend, StorageBackend};
/// let backend = MemoryStorageBackend::new();
/// let ttl = Duration::from_secs(10);
/// let Acquired::Granted(lease) = backend.acquire_lease("session/s1", "node-a", ttl).await? else {
///     unreachable!("a new lease is free")
/// };
/// assert_eq!(lease.token, 1);
/// match backend.acquire_lease("session/s1", "node-b", ttl).await? {
///     Acquired::Held { node, expires_in } => {
///         assert_eq!(node, "node-a");
///         assert!(expires_in <= ttl);
///     }
///     Acquired::Granted(_) => unreachable!("node-a holds it"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The lease is the caller's, with this token and expiry.
    Granted(Lease),
    /// Another node holds it, for `expires_in` more unless it renews or releases it.
    Held {
        /// The node holding it.
        node: String,
        /// Time left until it expires, by the server's clock.
        expires_in: Duration,
    },
}

/// What [`StorageBackend::read_lease`](super::StorageBackend::read_lease) reports of a
/// lease, without taking it.
///
/// ```
/// use std::time::Duration;
/// use mars_state::LeaseState;
/// let state = LeaseState {
///     node: "node-a".into(),
///     token: 4,
///     expires_in: None,
///     released: false,
/// };
/// // Expired without a release: node-a died or hung holding it.
/// assert!(state.expires_in.is_none() && !state.released);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// The node that holds it, or held it last.
    pub node: String,
    /// Its current fencing token.
    pub token: u64,
    /// Time left, by the server's clock, while it is live; `None` once it expired or was
    /// released.
    pub expires_in: Option<Duration>,
    /// Whether its last holder released it (a clean handover) rather than letting it
    /// expire.
    pub released: bool,
}

/// The longest lease a backend grants: a longer TTL is cut to it (so it fits every
/// server's time arithmetic).
pub(crate) const MAX_LEASE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A TTL in whole milliseconds, at least 1 (a lease of no time would be expired when
/// granted) and at most [`MAX_LEASE_TTL`].
pub(crate) fn ttl_ms(ttl: Duration) -> u64 {
    let ms = ttl.min(MAX_LEASE_TTL).as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}
