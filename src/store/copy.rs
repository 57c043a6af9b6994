//! Moving a store between backends: [`copy_store`] and its [`CopyReport`]. This file owns
//! the copy's order, its verification and the marker that makes an interrupted copy
//! resumable (and keeps a manager off a half-copied store). It calls the two backends it is
//! given and the key layout (`keys`); nothing of the codec: records move as the bytes they
//! are, so a gzipped or encrypted store arrives gzipped or encrypted under the same key.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::stream::{self, StreamExt, TryStreamExt};
use tracing::info;

use super::keys;
use crate::backend::{StorageBackend, StorageKey};
use crate::error::{Result, StateError};

/// Keys copied at once: enough to fill a server backend's group commit.
const IN_FLIGHT: usize = 16;

/// What [`copy_store`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CopyReport {
    /// Keys written to the destination (and read back equal).
    pub copied: usize,
    /// Keys the destination already held with the same bytes (from an interrupted copy).
    pub already_there: usize,
    /// Keys removed from the destination because the source no longer has them (written by
    /// an interrupted copy before the source changed).
    pub removed: usize,
    /// Bytes written.
    pub bytes_copied: u64,
}

/// Copies every key of the store on `from` (sessions, checkpoints, access records, the
/// format and encryption descriptors, the index journal) to `to`, byte for byte, and reads
/// each one back to verify it. Records are not decoded: a gzipped or encrypted store stays
/// so, and opens on the destination with the same settings (and key). The source must not
/// be in use by a manager while it is copied (the file and SQLite backends hold their own
/// lock, so open them only after the manager using them has shut down).
///
/// Resumable: the destination must be empty, or hold an earlier interrupted copy. The copy
/// first writes a marker (`metadata/copying`) to the destination and removes it only when
/// every key is copied and verified; a manager, read-only or not, refuses to open a store
/// that has the marker ([`StateError::Config`]). Run again after a kill or an error, it
/// skips keys already there with the same bytes, rewrites the others, and removes keys the
/// source no longer has; nothing is duplicated, since every key is written with `put`
/// (idempotent).
///
/// Errors: [`StateError::Config`] if the destination holds another store (keys, but no
/// marker), or if the source is itself an unfinished copy (it has the marker);
/// [`StateError::Corrupt`] if a key reads back different from what was written; any error
/// of either backend. After an error, the destination holds the marker and part of the
/// store; the source is never written.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mars_state::StateError> {
/// use mars_state::{FileStorageBackend, MemoryStorageBackend, StateManager, copy_store};
/// # let dir = tempfile::tempdir().unwrap();
/// let manager = StateManager::start(FileStorageBackend::new(dir.path())?).await?;
/// manager.save_session("run-1", &serde_json::json!({ "step": 3 })).await?;
/// manager.shutdown().await?;
/// drop(manager);
///
/// let to = MemoryStorageBackend::new();
/// let report = copy_store(&FileStorageBackend::new(dir.path())?, &to).await?;
/// assert!(report.copied >= 2); // the session and the store's descriptor, at least
///
/// let copy = StateManager::start(to).await?;
/// let state: Option<serde_json::Value> = copy.load_session("run-1").await?;
/// assert_eq!(state, Some(serde_json::json!({ "step": 3 })));
/// # copy.shutdown().await?;
/// # Ok(()) }
/// ```
pub async fn copy_store(from: &dyn StorageBackend, to: &dyn StorageBackend) -> Result<CopyReport> {
    copy_store_with_progress(from, to, |_done, _total| {}).await
}

/// [`copy_store`], calling `progress(done, total)` as it goes, for a progress bar: once with
/// `done == 0` when the source is listed (`total` is the number of its keys), then after
/// each key is copied and verified (or found already there), in key order, up to
/// `done == total`. Stale keys of an earlier run are removed after that, and the copy is
/// finished only when this function returns `Ok`: a callback that saw `done == total` does
/// not mean the copy is complete. Everything else (the order, the marker, resuming, the
/// errors) is as in [`copy_store`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mars_state::StateError> {
/// use mars_state::{MemoryStorageBackend, StateManager, copy_store_with_progress};
/// let from = MemoryStorageBackend::new();
/// let manager = StateManager::start(from.clone()).await?;
/// manager.save_session("run-1", &serde_json::json!({ "step": 3 })).await?;
/// manager.shutdown().await?;
///
/// let mut seen = Vec::new();
/// let to = MemoryStorageBackend::new();
/// let report = copy_store_with_progress(&from, &to, |done, total| seen.push((done, total))).await?;
/// let total = seen[0].1;
/// assert_eq!(seen.first(), Some(&(0, total)));
/// assert_eq!(seen.last(), Some(&(total, total)));
/// assert_eq!(total as usize, report.copied + report.already_there);
/// # Ok(()) }
/// ```
pub async fn copy_store_with_progress(
    from: &dyn StorageBackend,
    to: &dyn StorageBackend,
    mut progress: impl FnMut(u64, u64) + Send,
) -> Result<CopyReport> {
    let marker = keys::copying();
    // A half copy is no source: copied on, it would lose its marker and open as a whole
    // store with keys missing. Checked before anything is written.
    if from.get(&marker).await?.is_some() {
        return Err(StateError::Config {
            message: "the source of the copy is itself a copy that did not finish \
                      (metadata/copying is there): finish that copy first (run copy_store \
                      into it again), then copy from it"
                .into(),
        });
    }
    let there = listing(to).await?;
    let resuming = to.get(&marker).await?.is_some();
    if !resuming && let Some(key) = there.keys().next() {
        return Err(StateError::Config {
            message: format!(
                "the destination of the copy is not empty (it holds {key} and {} more keys) and \
                 is not an interrupted copy: copy into an empty store",
                there.len() - 1
            ),
        });
    }
    // Durable before anything else is written: from here on, a kill leaves a destination
    // that says it is incomplete.
    to.put(&marker, Vec::new()).await?;
    let source = listing(from).await?;
    let mut report = CopyReport::default();
    // Descriptors first (a reader of a half copy sees what kind of store it is), then the
    // rest in key order.
    let mut order: Vec<&StorageKey> = Vec::with_capacity(source.len());
    order.extend(source.keys().filter(|k| k.class() == crate::KeyClass::Plaintext));
    order.extend(source.keys().filter(|k| k.class() != crate::KeyClass::Plaintext));
    let total = order.len() as u64;
    progress(0, total);
    let mut outcomes = stream::iter(order)
        .map(|key| copy_one(from, to, key, there.get(key).copied()))
        .buffered(IN_FLIGHT);
    let mut done = 0;
    while let Some(outcome) = outcomes.try_next().await? {
        match outcome {
            Some(bytes) => {
                report.copied += 1;
                report.bytes_copied += bytes;
            }
            None => report.already_there += 1,
        }
        done += 1;
        progress(done, total);
    }
    // Left by an earlier run from keys the source has since lost.
    let stale: BTreeSet<&StorageKey> =
        there.keys().filter(|k| !source.contains_key(*k) && **k != marker).collect();
    for key in stale {
        to.delete(key).await?;
        report.removed += 1;
    }
    to.delete(&marker).await?;
    info!(
        copied = report.copied,
        already_there = report.already_there,
        removed = report.removed,
        bytes = report.bytes_copied,
        "store copied"
    );
    Ok(report)
}

/// Every key of the store on `backend` with its size, but the backend's own lock file.
async fn listing(backend: &dyn StorageBackend) -> Result<BTreeMap<StorageKey, u64>> {
    let mut all = BTreeMap::new();
    for folder in keys::FOLDERS {
        for meta in backend.list(&StorageKey::from_valid(folder.to_owned())).await? {
            if !keys::is_lock(&meta.key) {
                all.insert(meta.key, meta.size);
            }
        }
    }
    Ok(all)
}

/// Copies one key unless the destination has the same bytes; `Some(bytes written)`, or
/// `None` when it was already there (or the source lost it meanwhile).
async fn copy_one(
    from: &dyn StorageBackend,
    to: &dyn StorageBackend,
    key: &StorageKey,
    size_there: Option<u64>,
) -> Result<Option<u64>> {
    let Some(value) = from.get(key).await? else {
        return Ok(None);
    };
    if size_there == Some(value.len() as u64) && to.get(key).await?.as_deref() == Some(&value[..]) {
        return Ok(None);
    }
    let len = value.len() as u64;
    to.put(key, value.clone()).await?;
    match to.get(key).await? {
        Some(back) if back == value => Ok(Some(len)),
        Some(back) => Err(StateError::corrupt(
            key,
            format!("the copy reads back {} bytes that differ from the {len} written", back.len()),
        )),
        None => Err(StateError::corrupt(key, "the copy is missing right after it was written")),
    }
}
