//! The PostgreSQL backend's waits on the server, bounded and paced in real time. Owns every
//! timeout, backoff and pause of the backend; calls only tokio's blocking pool.
//!
//! Why not `tokio::time`: a tokio timer follows tokio's clock, and under a paused clock
//! (`#[tokio::test(start_paused = true)]`, `tokio::time::pause`) that clock moves only when
//! a test advances it, or by itself to the next timer as soon as every task waits. A
//! `tokio::time::timeout` around a query then fires while the server is still answering
//! (the socket is real, the clock is not), and decides the outcome of a write that the
//! server may be committing; a `tokio::time::sleep` between two steps never ends while
//! anything holds the clock still. So every wait of the backend on the server goes through
//! [`within`] (or [`hold`], [`sleep`]): the bound is a thread of tokio's blocking pool
//! waiting on a condition variable, which measures real time, and while such a task runs,
//! tokio does not move a paused clock by itself. The server's time to answer then takes no
//! test time, as a file backend's I/O on the blocking pool takes none, and the timers of
//! the code above the backend (a manager's call timeout, a session's idle timeout) do not
//! fire while a query is in flight. In real time this changes nothing: the bounds are the
//! same durations.
//!
//! A wait whose future is ready at once (a free pooled connection) takes no thread.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::{Arc, Condvar, Mutex};
use std::task::Poll;
use std::time::Duration;

use crate::sync::lock;

/// The bound of [`within`] passed before its future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Elapsed;

/// Runs `fut` until it finishes or `limit` of real time has passed (`Err(Elapsed)`; `fut`
/// is dropped). While it waits, a paused tokio clock stays where it is.
pub(super) async fn within<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    bounded(Some(limit), fut).await
}

/// Runs `fut` to its end, with no bound, keeping a paused tokio clock where it is while it
/// waits (see the module doc).
pub(super) async fn hold<F: Future>(fut: F) -> F::Output {
    match bounded(None, fut).await {
        Ok(out) => out,
        // Without a limit the watch never elapses.
        Err(Elapsed) => unreachable_elapsed(),
    }
}

/// Waits `pause` of real time (a backoff between retries, a window for other writers).
pub(super) async fn sleep(pause: Duration) {
    let _ = within(pause, std::future::pending::<()>()).await;
}

#[cold]
fn unreachable_elapsed<T>() -> T {
    unreachable!("an unbounded wait cannot elapse")
}

/// Wakes the watch of a [`bounded`] wait when dropped: the wait is over (done, or its future
/// dropped), and the blocking thread goes back to the pool at once.
struct Release(Arc<(Mutex<bool>, Condvar)>);

impl Drop for Release {
    fn drop(&mut self) {
        let (done, wake) = &*self.0;
        *lock(done) = true;
        wake.notify_one();
    }
}

async fn bounded<F: Future>(limit: Option<Duration>, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = pin!(fut);
    // Ready at once: nothing to wait for, no thread.
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    if let Poll::Ready(out) = first {
        return Ok(out);
    }
    let state = Arc::new((Mutex::new(false), Condvar::new()));
    let _release = Release(state.clone());
    // The watch: returns `true` when `limit` passed before the wait was released.
    let watch = tokio::task::spawn_blocking(move || {
        let (done, wake) = &*state;
        let guard = lock(done);
        match limit {
            Some(limit) => {
                let (guard, _) =
                    wake.wait_timeout_while(guard, limit, |done| !*done).unwrap_or_else(|p| {
                        // Poisoned: the flag is a plain bool, still meaningful.
                        p.into_inner()
                    });
                !*guard
            }
            None => {
                let _guard =
                    wake.wait_while(guard, |done| !*done).unwrap_or_else(|p| p.into_inner());
                false
            }
        }
    });
    let mut watch = Some(watch);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if let Some(w) = watch.as_mut() {
            match Pin::new(w).poll(cx) {
                Poll::Ready(Ok(true)) => return Poll::Ready(Err(Elapsed)),
                // Released without elapsing cannot happen while we wait; a watch that could
                // not run (the runtime is shutting down) leaves the future unbounded.
                Poll::Ready(_) => watch = None,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}
