//! The embedded file backend: one file per record, every write atomic and durable.
//!
//! This module owns the public handle ([`FileStorageBackend`], [`FileOptions`]), opening a
//! store (its directories, its OS lock, recovery of a log left by a crash) and the
//! [`StorageBackend`] impl, which sends each request either to the direct paths of `Core`
//! (`direct.rs`) or, in log mode, to the log writer (`log.rs`). It calls those two and the
//! file-system seam (`fs.rs`); `frame.rs` (the log's bytes) is called only by `log.rs`.
//!
//! Durability contract, and why each step is there:
//! - a put writes a staged file `.NAME.tmp-RANDOM` in the record's own directory
//!   (`create_new`, so a stale or planted file is never reused, and `O_NOFOLLOW`), writes
//!   it, `fdatasync`s it (so the data is on disk before any name points at it), renames
//!   it over the record (atomic: readers see the old or the new file), then fsyncs the
//!   directory (so the rename itself survives a power loss). Only then is `Ok` returned.
//!   On any error the staged file is removed and the old record is untouched.
//! - a delete unlinks the record and fsyncs its directory before returning `Ok`.
//! - a new directory is fsynced into its parent before any record is written in it.
//! - the store is locked with an OS file lock on `metadata/LOCK` for the backend's life,
//!   so a second process gets [`StateError::Locked`] instead of racing this one.
//!
//! A store opened [read-only](FileOptions::read_only) takes no lock and writes nothing:
//! its write-ahead log is read once at open and replayed into memory (the overlay) only,
//! and every write method answers [`StateError::ReadOnly`] (see `read_only.rs`).

mod direct;
mod frame;
pub(super) mod fs;
mod log;
mod read_only;
#[cfg(test)]
mod seam;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use crate::sync::lock;

use async_trait::async_trait;

use self::direct::Core;
use self::fs::{Fs, OsFs};
use self::log::{Log, LogReq, LogSizes, Reply, through_log};
use super::{ObjectMeta, StorageBackend, StorageKey, SweepReport};
use crate::error::{Result, StateError};
use crate::store::keys;

/// Stores each record as a file under a base directory (`sessions/`, `checkpoints/`,
/// `metadata/`), writing through a staged file, fsync, rename and directory fsync so that
/// every `Ok` survives a power loss. Files are created `0600`, directories `0700`.
///
/// ```no_run
/// # fn main() -> Result<(), mars_state::StateError> {
/// let backend = mars_state::FileStorageBackend::new("./state_storage")?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct FileStorageBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    core: Arc<Core>,
    /// The log, in log mode.
    log: Option<Arc<Log>>,
    /// Held for the backend's life: released when the backend is dropped, or by the OS when
    /// the process dies.
    _lock: Option<StoreLock>,
    /// Opened with [`FileOptions::read_only`]: every write is refused.
    read_only: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: wait for a running commit (the writer lock), bring the
        // record files up to date and start the log's next generation, all while the store lock (a field,
        // dropped after this) is still held. A leader that starts later finds the queue
        // closed and writes nothing.
        if let Some(log) = &self.log {
            log.close();
        }
    }
}

/// Creates the store's base directory and any missing ancestors (owner-only), each made
/// durable in its parent, through the file-system seam.
fn create_root(fs: &dyn Fs, dir: &Path) -> std::io::Result<()> {
    match fs.create_dir(dir) {
        Ok(false) => Ok(()),
        Ok(true) => match dir.parent() {
            // A new level must be durable in its parent before anything is stored below it.
            Some(parent) => fs.sync_dir(parent),
            None => Ok(()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = dir.parent().ok_or(e)?;
            create_root(fs, parent)?;
            fs.create_dir(dir)?;
            fs.sync_dir(parent)
        }
        Err(e) => Err(e),
    }
}

/// How a [`FileStorageBackend`] is opened: see [`FileStorageBackend::options`].
#[derive(Debug, Clone)]
pub struct FileOptions {
    lock_wait: std::time::Duration,
    log: bool,
    read_only: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions { lock_wait: std::time::Duration::ZERO, log: true, read_only: false }
    }
}

impl FileOptions {
    /// If another process holds the store, wait up to `timeout` for it to let go (it
    /// exits, is killed, or shuts its manager down) before failing with
    /// [`StateError::Locked`]. Default: do not wait. Opening blocks the calling thread
    /// while it waits.
    pub fn lock_wait(mut self, timeout: std::time::Duration) -> Self {
        self.lock_wait = timeout;
        self
    }

    /// Whether writes go through the write-ahead log (default: yes).
    ///
    /// With the log, a put or delete of a session or checkpoint record is durable once its
    /// frame is written to `metadata/.wal` and `fdatasync`ed (the store's own metadata is
    /// always written directly); the frames of all writes that arrive while one
    /// `fdatasync` runs share the next one (group commit). The record files are brought up
    /// to date in batches (each one staged, `fdatasync`ed, renamed, its directory
    /// `fsync`ed) when the log passes 8 MiB, when the last handle of the backend is
    /// dropped (the [`StateManager`](crate::StateManager) drops it at shutdown), and at the
    /// next open after a crash; only then does the log start again from its beginning. The
    /// log is zero-filled ahead of its frames (256 KiB for a new log, doubled by a batch
    /// that would run past it, up to 9 MiB) and reused in place, its frames
    /// written over those of the generation before, each carrying the salt of its
    /// generation so that no older frame is ever replayed. Reads see the newest value
    /// either way; the overlay of values not yet in their files stays under the log's size.
    ///
    /// Without it, every put writes its record file directly (stage, `fdatasync`, rename,
    /// `fsync` the directory): two flushes and a new inode per write, but the files on disk
    /// are always current, for tools that read them while the store is open. Either way an
    /// `Ok` survives a crash and a power loss. With the log, saves of one session are about
    /// twice as fast and saves of many sessions at once several times faster (one
    /// `fdatasync` serves them all); see `BENCHMARKS.md`.
    pub fn write_ahead_log(mut self, on: bool) -> Self {
        self.log = on;
        self
    }

    /// Opens the store read-only (default: no), beside the process that holds it, if any:
    /// no lock is taken and nothing is ever written (no lock file, no directory, no
    /// recovery, no staged file). The store must exist.
    ///
    /// The write-ahead log of the holder is read once, at open, and replayed in memory
    /// only, so every save acknowledged before the open is seen, also one that is still
    /// only in the log; a torn tail (a write in progress, never acknowledged) is ignored as
    /// at recovery, and damage before whole frames of a later batch is
    /// [`StateError::Corrupt`] as there. Records the holder brings up to date in their
    /// files later are read from those files; the values taken from the log at open stay
    /// as they were then (reopen for a newer view).
    ///
    /// Every write method (`put`, `put_record`, `delete`, `append`, `sweep`, and the
    /// fenced writes) answers [`StateError::ReadOnly`] and touches nothing. Reading takes
    /// no lock, so it never waits for the holder, and the holder never waits for it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mars_state::StateError> {
    /// use mars_state::{ErrorKind, FileStorageBackend, StateManager, StorageBackend, StorageKey};
    /// # let dir = tempfile::tempdir().unwrap();
    /// let manager = StateManager::start(FileStorageBackend::new(dir.path())?).await?;
    /// manager.save_session("run-1", &serde_json::json!({ "step": 3 })).await?;
    ///
    /// // Beside the running manager, which holds the store's lock:
    /// let reader = FileStorageBackend::options().read_only(true).open(dir.path())?;
    /// let key = StorageKey::new("sessions/run-1.json")?;
    /// assert!(reader.get(&key).await?.is_some());
    /// let refused = reader.put(&key, b"{}".to_vec()).await.unwrap_err();
    /// assert_eq!(refused.kind(), ErrorKind::ReadOnly);
    /// # manager.shutdown().await?;
    /// # Ok(()) }
    /// ```
    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }

    /// Opens (creating if needed) the store at `path` with these options and takes its
    /// lock (a [read-only](Self::read_only) open neither creates nor locks). An existing log (a crash cut the last process off) is replayed into the
    /// record files first, whatever [`write_ahead_log`](Self::write_ahead_log) says.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), mars_state::StateError> {
    /// use std::time::Duration;
    /// let backend = mars_state::FileStorageBackend::options()
    ///     .lock_wait(Duration::from_secs(5))
    ///     .write_ahead_log(false)
    ///     .open("./state_storage")?;
    /// # Ok(()) }
    /// ```
    pub fn open(&self, path: impl AsRef<Path>) -> Result<FileStorageBackend> {
        if self.read_only {
            return FileStorageBackend::open_read_only_with(path.as_ref(), Arc::new(OsFs));
        }
        FileStorageBackend::open_with(
            path.as_ref(),
            Arc::new(OsFs),
            Some(self.lock_wait),
            self.log,
            LogSizes::default(),
        )
    }
}

impl FileStorageBackend {
    /// Opens (creating if needed) the store at `path` and takes its lock, with the
    /// default [`FileOptions`] (writes through the write-ahead log, no waiting for the
    /// lock).
    ///
    /// Fails with [`StateError::Locked`] if another process, or another backend in this
    /// process, has it open. (A process that spawns children while it holds the store lends
    /// them the lock between their fork and exec, for microseconds; a process that reopens
    /// the store right after such a child was spawned should use
    /// [`open_waiting`](Self::open_waiting).)
    pub fn new(path: impl AsRef<Path>) -> Result<Self> {
        FileOptions::default().open(path)
    }

    /// Like [`new`](Self::new), but if another process holds the store, waits up to
    /// `timeout` for it to let go (it exits, is killed, or shuts its manager down) before
    /// failing with [`StateError::Locked`]. Blocks the calling thread while it waits.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), mars_state::StateError> {
    /// use std::time::Duration;
    /// let backend =
    ///     mars_state::FileStorageBackend::open_waiting("./state_storage", Duration::from_secs(5))?;
    /// # Ok(()) }
    /// ```
    pub fn open_waiting(path: impl AsRef<Path>, timeout: std::time::Duration) -> Result<Self> {
        FileOptions::default().lock_wait(timeout).open(path)
    }

    /// Options for opening a store: waiting for its lock, the write-ahead log.
    pub fn options() -> FileOptions {
        FileOptions::default()
    }

    /// `lock_wait`: `None` takes no OS lock (simulated file systems); otherwise how long to
    /// wait for a lock held by someone else.
    fn open_with(
        root: &Path,
        fs: Arc<dyn Fs>,
        lock_wait: Option<std::time::Duration>,
        log: bool,
        sizes: LogSizes,
    ) -> Result<Self> {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir().map_err(|e| StateError::io("resolving", root, e))?.join(root)
        };
        create_root(fs.as_ref(), &root)
            .map_err(|e| StateError::io("creating the store directory", &root, e))?;
        let core = Arc::new(Core::new(root.clone(), fs));
        for dir in keys::FOLDERS {
            core.ensure_dir(&root.join(dir))?;
        }
        let lock = match lock_wait {
            Some(wait) => Some(take_lock(&root.join(keys::METADATA).join(keys::LOCK_FILE), wait)?),
            None => None,
        };
        // Only now, holding the lock: what a crashed process left in the log goes into the
        // record files before anything reads them.
        let kept = core.recover_log(log)?;
        let log = if log { Some(Arc::new(Log::new(core.clone(), kept, sizes))) } else { None };
        Ok(FileStorageBackend {
            inner: Arc::new(Inner { core, log, _lock: lock, read_only: false }),
        })
    }

    /// Whether this handle was opened [read-only](FileOptions::read_only).
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// The error of a write on a read-only handle, if this is one.
    fn refuse(&self, operation: &'static str) -> Result<()> {
        if self.inner.read_only {
            return Err(StateError::read_only(operation, self.root().display()));
        }
        Ok(())
    }

    /// The store's base directory.
    pub fn root(&self) -> &Path {
        &self.inner.core.root
    }

    fn core(&self) -> &Arc<Core> {
        &self.inner.core
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Core) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let core = self.core().clone();
        // File I/O blocks; run it on tokio's blocking pool so the async workers stay free.
        tokio::task::spawn_blocking(move || f(&core))
            .await
            .map_err(|e| StateError::unavailable(format!("file I/O task failed: {e}")))?
    }

    /// Sends a write to the log writer and waits for its answer (given once the write is
    /// durable in the log, or has failed and left nothing behind).
    async fn through_log(&self, log: &Log, make: impl FnOnce(Reply) -> LogReq) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if log.enqueue(make(tx)) {
            // This caller leads the commit. Where it may block its thread (a session
            // actor's I/O on a multi-thread runtime) it commits its own batch right here
            // (`block_in_place` hands the worker's other tasks to another thread first):
            // its answer then needs no hop from a pool thread back to this task, which is
            // most of a lone writer's cost besides the sync itself. Whatever was queued
            // meanwhile is left to a leader on the blocking pool, so this caller is
            // answered after one batch however busy the log is. Anywhere else (a
            // current-thread runtime, a caller's `LocalSet`) every commit runs on the pool.
            let more = !crate::sync::may_block_in_place()
                || tokio::task::block_in_place(|| log.lead_once());
            if more {
                let log = self.inner.log.clone();
                tokio::task::spawn_blocking(move || {
                    if let Some(log) = log {
                        log.lead();
                    }
                });
            }
        }
        rx.await.map_err(|_| {
            StateError::unavailable("the log writer stopped before answering; outcome unknown")
        })?
    }
}

/// A store's OS lock (an exclusive `flock` on its lock file), released when dropped.
///
/// `flock` belongs to the open file description, and a child process forked by another
/// thread holds a duplicate of every descriptor until it calls `exec` (close-on-exec closes
/// it only then). Closing our descriptor alone would leave the lock held through that
/// duplicate for that moment, and an open right after the drop would see `Locked`. So the
/// drop unlocks explicitly first (`LOCK_UN` releases the description's lock, whichever
/// descriptor names it), then closes.
#[derive(Debug)]
pub(super) struct StoreLock(File);

impl Drop for StoreLock {
    fn drop(&mut self) {
        // An error here would mean the descriptor is not a lock holder: nothing to release.
        let _ = self.0.unlock();
    }
}

/// Takes the store's OS lock, waiting up to `wait` for another holder to let go. Also used by
/// the SQLite backend for its `<file>-lock`.
pub(super) fn take_lock(lock_path: &Path, wait: std::time::Duration) -> Result<StoreLock> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(lock_path)
        .map_err(|e| StateError::io("opening the lock file", lock_path, e))?;
    // An exclusive flock: held until this backend (and every clone) is dropped or the
    // process dies, so a second process can never write the same store concurrently.
    let deadline = std::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(StoreLock(file)),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                // The OS drops a dead holder's lock at once; poll rather than block in
                // lock() so the wait is bounded.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateError::Locked { path: lock_path.into() });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StateError::io("locking", lock_path, e));
            }
        }
    }
}

#[async_trait]
impl StorageBackend for FileStorageBackend {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        if let Some(pending) = self.core().pending(key) {
            return Ok(pending.map(|v| v.as_ref().clone()));
        }
        /// Larger records are read on the pool: copying them would hold the caller's thread.
        const INLINE_MAX: u64 = 256 << 10;
        let path = self.core().path_of(key);
        // No symbolic link on the way (stats of cached directories: done here).
        match self.core().check_parents(path.parent().unwrap_or(&self.core().root)) {
            Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None);
            }
            other => other?,
        }
        // A small record already in the page cache is read right here: the read takes a few
        // microseconds, a hop to the blocking pool and back more. Anything that would wait
        // for the disk (or is large) goes to the pool.
        let reading = |e| StateError::io("reading", &path, e);
        if let Some(found) = self.core().fs.read_cached(&path, INLINE_MAX).map_err(reading)? {
            return Ok(found);
        }
        self.blocking(move |b| b.fs.read(&path).map_err(|e| StateError::io("reading", &path, e)))
            .await
    }

    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        self.refuse("put")?;
        if let Some(log) = &self.inner.log
            && through_log(key)
        {
            return self
                .through_log(log, |reply| LogReq::Put { key: key.clone(), value, reply })
                .await;
        }
        let key = key.clone();
        self.blocking(move |b| b.put_blocking(&key, &value)).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool> {
        self.refuse("delete")?;
        // A key the log holds a write for must be deleted through the log too, or a replay
        // would bring the write back. Any other key is unlinked directly (and durably).
        if let (Some(log), Some(pending)) = (&self.inner.log, self.core().pending(key)) {
            if pending.is_none() {
                return Ok(false);
            }
            self.through_log(log, |reply| LogReq::Delete { key: key.clone(), reply }).await?;
            return Ok(true);
        }
        let key = key.clone();
        self.blocking(move |b| b.delete_blocking(&key)).await
    }

    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        let p = prefix.clone();
        let mut listed = self.blocking(move |b| b.list_blocking(&p)).await?;
        let overlay = lock(&self.core().overlay);
        if overlay.is_empty() {
            return Ok(listed);
        }
        // Writes still only in the log: the newest value's size, deletes hidden.
        listed.retain(|m| !overlay.contains_key(&m.key));
        for (key, value) in overlay.iter() {
            if let Some(v) = value
                && key.starts_with(prefix)
            {
                listed.push(ObjectMeta { key: key.clone(), size: v.len() as u64 });
            }
        }
        Ok(listed)
    }

    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        self.refuse("append")?;
        // A small append to a file already open (the index journal's lines, after the
        // first) is one `write` to the page cache, never synced: made right here, as a
        // small cached read is, since the hop to the blocking pool and back costs more.
        const INLINE_MAX: usize = 16 << 10;
        if bytes.len() <= INLINE_MAX
            && let Some(r) = self.core().append_open(key, &bytes)
        {
            return r;
        }
        let key = key.clone();
        self.blocking(move |b| b.append_blocking(&key, &bytes)).await
    }

    async fn sweep(&self) -> Result<SweepReport> {
        self.refuse("sweep")?;
        self.blocking(|b| b.sweep_blocking()).await
    }
}
