//! The power-loss simulator's entry into the file backend, in test builds only: a store
//! over a simulated file system (`crate::testing::simfs`). Calls only the backend's own
//! opening path.

use std::path::Path;
use std::sync::Arc;

use super::FileStorageBackend;
use super::fs::Fs;
use super::log::LogSizes;
use crate::error::Result;

impl FileStorageBackend {
    /// Opens a store over `fs` instead of the real file system, without an OS lock.
    pub(crate) fn with_fs(path: &Path, fs: Arc<dyn Fs>, log: bool) -> Result<Self> {
        Self::open_with(path, fs, None, log, LogSizes::default())
    }

    /// Like [`with_fs`](Self::with_fs), in log mode, with a log preallocated to `prealloc`
    /// bytes (filled ahead of its frames up to `prealloc_max`) and brought into the record
    /// files past `materialize_at`; with `broken_reuse_salt`, a deliberately broken log
    /// that never changes its salt.
    pub(crate) fn with_fs_log_sizes(
        path: &Path,
        fs: Arc<dyn Fs>,
        (prealloc, prealloc_max): (u64, u64),
        materialize_at: u64,
        broken_reuse_salt: bool,
    ) -> Result<Self> {
        let sizes = LogSizes { prealloc, prealloc_max, materialize_at, broken_reuse_salt };
        Self::open_with(path, fs, None, true, sizes)
    }
}
