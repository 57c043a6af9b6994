//! Opening a file store read-only, beside the process that holds it
//! ([`FileOptions::read_only`](super::FileOptions::read_only)).
//!
//! This file owns that open: the store must exist, no lock is taken, no directory is made,
//! and the write-ahead log is read once and replayed into the overlay in memory (never
//! into the record files, never cut, never removed). It calls `frame.rs` for the replay,
//! `Core` for the overlay and the file-system seam for one read. The handle's write
//! methods refuse (`FileStorageBackend::refuse` in `mod.rs`), so nothing of this open or
//! of any later call changes a byte of the store.
//!
//! Why this is safe beside a live writer: every record file is replaced by an atomic
//! rename, so a read sees a whole old or a whole new record; the log is only appended to
//! (a torn last batch is what a reader can catch mid-write, and the replay ignores it
//! exactly as recovery does) and is removed only after every value in it is durable in
//! its record file, so a log that is gone by the time it is read left nothing that the
//! files lack.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::direct::Core;
use super::fs::Fs;
use super::{FileStorageBackend, Inner, frame};
use crate::backend::StorageKey;
use crate::error::{Result, StateError};
use crate::store::keys::{METADATA, WAL_FILE};
use crate::sync::lock;

impl FileStorageBackend {
    /// The read-only open (see [`FileOptions::read_only`](super::FileOptions::read_only)).
    pub(super) fn open_read_only_with(root: &Path, fs: Arc<dyn Fs>) -> Result<Self> {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir().map_err(|e| StateError::io("resolving", root, e))?.join(root)
        };
        // A missing store is an error, not an empty one: a read-only open creates nothing.
        match std::fs::symlink_metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StateError::Config {
                    message: format!("{} is not a directory, so not a file store", root.display()),
                });
            }
            Err(e) => return Err(StateError::io("opening the store (read-only)", &root, e)),
        }
        let core = Arc::new(Core::new(root, fs));
        core.replay_log_in_memory()?;
        Ok(FileStorageBackend {
            inner: Arc::new(Inner { core, log: None, _lock: None, read_only: true }),
        })
    }
}

impl Core {
    /// Reads the write-ahead log, if there is one, and puts the newest value of every key
    /// it holds into the overlay, so reads see writes that are only in the log. Writes
    /// nothing. A torn tail is ignored; damage before whole frames of a later batch is
    /// [`StateError::Corrupt`] (acknowledged writes cannot be read back).
    fn replay_log_in_memory(&self) -> Result<()> {
        let path = self.root.join(METADATA).join(WAL_FILE);
        let Some(bytes) =
            self.fs.read(&path).map_err(|e| StateError::io("reading the log", &path, e))?
        else {
            return Ok(());
        };
        let replayed = frame::replay(&bytes).map_err(|d| {
            StateError::corrupt(
                format!("{METADATA}/{WAL_FILE}"),
                format!(
                    "the write-ahead log is damaged at byte {} of {}, and whole frames of a later \
                     batch follow at byte {}: acknowledged writes cannot be read back (the store's \
                     holder will refuse to reopen it too; see its log)",
                    d.at,
                    bytes.len(),
                    d.next_frame
                ),
            )
        })?;
        if replayed.valid_len < bytes.len() {
            tracing::debug!(
                ignored_bytes = bytes.len() - replayed.valid_len,
                "read-only open: the write-ahead log ends in a write in progress; ignoring it"
            );
        }
        let mut latest: HashMap<StorageKey, Option<Arc<Vec<u8>>>> = HashMap::new();
        for (key, value) in replayed.frames {
            latest.insert(key, value.map(Arc::new));
        }
        lock(&self.overlay).extend(latest);
        Ok(())
    }
}
