//! The power-loss simulator's entry into the file backend, in test builds only: a store
//! over a simulated file system (`crate::testing::simfs`). Calls only the backend's own
//! opening path.

use std::path::Path;
use std::sync::Arc;

use super::FileStorageBackend;
use super::fs::Fs;
use crate::error::Result;

impl FileStorageBackend {
    /// Opens a store over `fs` instead of the real file system, without an OS lock.
    pub(crate) fn with_fs(path: &Path, fs: Arc<dyn Fs>, log: bool) -> Result<Self> {
        Self::open_with(path, fs, None, log)
    }
}
