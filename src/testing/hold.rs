//! [`Hold`]: a gate a [`Faulty`](super::Faulty) backend stops a call at until the test
//! releases it, so a test can make two operations interleave exactly as it wants. This
//! module calls only `tokio`'s `Notify`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Stops the next call it is armed for until [`release`](Self::release)d. Give it to
/// [`Faulty::hold`](super::Faulty::hold) or [`Faulty::hold_after`](super::Faulty::hold_after)
/// with the calls it may stop; clones share the state, so the test keeps one.
///
/// A test [`arm`](Self::arm)s it, starts the operation whose call it wants stopped, waits
/// with [`held`](Self::held) until the call is being held, does what must happen meanwhile,
/// then releases it. An unarmed hold lets every call through.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> mars_state::Result<()> {
/// use std::sync::Arc;
/// use mars_state::testing::{Faulty, Hold, Method};
/// use mars_state::{MemoryStorageBackend, StorageBackend, StorageKey};
///
/// let hold = Hold::new();
/// let backend = Faulty::new(MemoryStorageBackend::new()).hold(Method::Put, &hold, |_| true);
/// let backend = Arc::new(backend);
/// let key = StorageKey::new("sessions/s1.json")?;
/// hold.arm();
/// let put = tokio::spawn({
///     let (backend, key) = (backend.clone(), key.clone());
///     async move { backend.put(&key, b"{}".to_vec()).await }
/// });
/// hold.held().await;
/// assert_eq!(backend.get(&key).await?, None, "the put is stopped before it writes");
/// hold.release();
/// put.await.expect("the put task")?;
/// assert_eq!(backend.get(&key).await?, Some(b"{}".to_vec()));
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Hold(Arc<State>);

#[derive(Default)]
struct State {
    armed: AtomicBool,
    released: AtomicBool,
    /// Notified (one permit kept) when a call starts being held.
    held: Notify,
    /// Notified (every waiter) on release.
    release: Notify,
}

impl Hold {
    /// A hold that is not armed.
    pub fn new() -> Self {
        Hold::default()
    }

    /// Makes the next call that this hold picks wait until [`release`](Self::release).
    pub fn arm(&self) {
        self.0.released.store(false, Ordering::SeqCst);
        self.0.armed.store(true, Ordering::SeqCst);
    }

    /// Lets the held call (if any) go on; a call picked later passes unless re-armed.
    pub fn release(&self) {
        self.0.released.store(true, Ordering::SeqCst);
        self.0.release.notify_waiters();
    }

    /// Waits until a call is being held: returns at once if one was stopped since the
    /// last `held` returned, and never if no picked call comes (wrap it in a timeout).
    pub async fn held(&self) {
        self.0.held.notified().await;
    }

    /// Whether the hold is armed and has not stopped a call yet.
    pub fn is_armed(&self) -> bool {
        self.0.armed.load(Ordering::SeqCst)
    }

    /// Called by the backend on a picked call: waits if armed, else returns at once.
    pub(super) async fn pass(&self) {
        if !self.0.armed.swap(false, Ordering::SeqCst) {
            return;
        }
        self.0.held.notify_one();
        loop {
            // Registered before the check, so a release in between is not missed.
            let released = self.0.release.notified();
            if self.0.released.load(Ordering::SeqCst) {
                return;
            }
            released.await;
        }
    }
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hold")
            .field("armed", &self.is_armed())
            .field("released", &self.0.released.load(Ordering::SeqCst))
            .finish()
    }
}
