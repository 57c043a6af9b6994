//! The crate's lock helpers, the only place that handles lock poisoning, [`Sharded`], a
//! session-keyed map split over several mutexes, and the mark of the crate's own tasks
//! ([`in_own_task`], [`may_block_in_place`]).
//! Owns: how a poisoned lock is treated (go on: see [`lock`]). Calls nothing else in the
//! crate but [`crate::types::SessionId`].

use std::sync::{Mutex, MutexGuard};
#[cfg(feature = "encryption")]
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, going on past poisoning: every lock in this crate guards maps, sets or values
/// that are changed by single calls (insert, remove, replace), so a panic while one is held
/// cannot leave its contents half-updated.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

tokio::task_local! {
    /// Set around the I/O of a task the crate spawned itself on the runtime (a session
    /// actor's), see [`may_block_in_place`].
    static OWN_TASK: ();
}

/// Runs `f` marked as the I/O of one of the crate's own tasks: a task spawned on the
/// runtime (never one of the caller's, which may be a `LocalSet`'s local task or the future
/// of a `block_on`), so it may block its thread with `tokio::task::block_in_place`.
pub(crate) async fn in_own_task<F: std::future::Future>(f: F) -> F::Output {
    OWN_TASK.scope((), f).await
}

/// Whether the running code may call `tokio::task::block_in_place`, which panics where
/// blocking is not allowed (a current-thread runtime; a `LocalSet`'s task, even on a
/// multi-thread runtime): only inside [`in_own_task`] on a multi-thread runtime.
pub(crate) fn may_block_in_place() -> bool {
    OWN_TASK.try_with(|_| ()).is_ok()
        && tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Read-locks `l`, going on past poisoning (for the same reason as [`lock`]).
#[cfg(feature = "encryption")]
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-locks `l`, going on past poisoning (for the same reason as [`lock`]).
#[cfg(feature = "encryption")]
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// A map from session ids split over 16 mutexes, so that calls for different sessions
/// seldom wait on each other.
pub(crate) struct Sharded<V> {
    shards: [Mutex<std::collections::HashMap<crate::types::SessionId, V>>; 16],
}

impl<V> Default for Sharded<V> {
    fn default() -> Self {
        Sharded { shards: std::array::from_fn(|_| Mutex::new(std::collections::HashMap::new())) }
    }
}

impl<V> std::fmt::Debug for Sharded<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sharded")
    }
}

impl<V> Sharded<V> {
    /// The locked shard that holds `sid`.
    pub(crate) fn shard(
        &self,
        sid: &crate::types::SessionId,
    ) -> MutexGuard<'_, std::collections::HashMap<crate::types::SessionId, V>> {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        sid.hash(&mut h);
        lock(&self.shards[(h.finish() as usize) % self.shards.len()])
    }

    /// The ids whose value `keep` accepts, one shard locked at a time.
    pub(crate) fn ids_where(&self, keep: impl Fn(&V) -> bool) -> Vec<crate::types::SessionId> {
        let mut out = Vec::new();
        for shard in &self.shards {
            out.extend(lock(shard).iter().filter(|(_, v)| keep(v)).map(|(k, _)| k.clone()));
        }
        out
    }
}
