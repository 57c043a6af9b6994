//! The one lock helper the crate uses.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, going on past poisoning: every mutex in this crate guards maps or sets that
/// are changed by single calls (insert, remove, replace), so a panic while one is held
/// cannot leave its contents half-updated.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
