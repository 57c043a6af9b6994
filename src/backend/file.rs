//! The embedded file backend: one file per record, every write atomic and durable.
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

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::sync::lock;

use async_trait::async_trait;

use super::fs::{Fs, FsFile, OsFs};
use super::{ObjectMeta, StorageBackend, StorageKey, SweepReport};
use crate::error::{Result, StateError};

/// Marker in the names of staged files (`.NAME.tmp-RANDOM`).
const STAGED_MARK: &str = ".tmp-";

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
    root: PathBuf,
    fs: Arc<dyn Fs>,
    /// Directories known to exist durably, so puts skip the mkdir and its fsync.
    known_dirs: Mutex<HashSet<PathBuf>>,
    /// Staged files of writes in progress; `sweep` leaves these alone.
    in_flight: Mutex<HashSet<PathBuf>>,
    /// Open handles of append-only logs. A put or delete of the same key drops the handle,
    /// which would otherwise keep appending to the replaced (unlinked) file.
    appenders: Appenders,
    /// Held for the backend's life: the OS releases the lock when the process dies.
    _lock: Option<File>,
}

struct Appenders(Mutex<HashMap<PathBuf, Box<dyn FsFile>>>);

impl std::fmt::Debug for Appenders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Appenders")
    }
}

/// What was at a record's name before a write replaced it.
#[derive(Clone, Copy)]
enum Previous<'a> {
    /// A record, kept under this second name until the new one is durable.
    Kept(&'a PathBuf),
    /// Nothing.
    None,
    /// Unknown (the file system gave no second name).
    Unknown,
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

fn random_suffix() -> String {
    let mut r = [0u8; 8];
    let _ = getrandom::fill(&mut r);
    format!("{:016x}", u64::from_le_bytes(r))
}

impl FileStorageBackend {
    /// Opens (creating if needed) the store at `path` and takes its lock.
    ///
    /// Fails with [`StateError::Locked`] if another process, or another backend in this
    /// process, has it open. (A process that spawns children while it holds the store lends
    /// them the lock between their fork and exec, for microseconds; a process that reopens
    /// the store right after such a child was spawned should use
    /// [`open_waiting`](Self::open_waiting).)
    pub fn new(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path.as_ref(), Arc::new(OsFs), Some(std::time::Duration::ZERO))
    }

    /// Like [`new`](Self::new), but if another process holds the store, waits up to
    /// `timeout` for it to let go (it exits, is killed, or shuts its manager down) before
    /// failing with [`StateError::Locked`]. Blocks the calling thread while it waits.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), mars_state::StateError> {
    /// let backend = mars_state::FileStorageBackend::open_waiting("./state_storage", std::time::Duration::from_secs(5))?;
    /// # Ok(()) }
    /// ```
    pub fn open_waiting(path: impl AsRef<Path>, timeout: std::time::Duration) -> Result<Self> {
        Self::open_with(path.as_ref(), Arc::new(OsFs), Some(timeout))
    }

    #[allow(dead_code)] // used by the power-loss simulator tests
    pub(crate) fn with_fs(path: &Path, fs: Arc<dyn Fs>) -> Result<Self> {
        Self::open_with(path, fs, None)
    }

    /// `lock_wait`: `None` takes no OS lock (simulated file systems); otherwise how long to
    /// wait for a lock held by someone else.
    fn open_with(root: &Path, fs: Arc<dyn Fs>, lock_wait: Option<std::time::Duration>) -> Result<Self> {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir().map_err(|e| StateError::io("resolving", root, e))?.join(root)
        };
        create_root(fs.as_ref(), &root).map_err(|e| StateError::io("creating the store directory", &root, e))?;
        let backend = FileStorageBackend {
            inner: Arc::new(Inner {
                root: root.clone(),
                fs,
                known_dirs: Mutex::new(HashSet::new()),
                in_flight: Mutex::new(HashSet::new()),
                appenders: Appenders(Mutex::new(HashMap::new())),
                _lock: None,
            }),
        };
        for dir in ["sessions", "checkpoints", "metadata", "quarantine"] {
            backend.ensure_dir(&root.join(dir))?;
        }
        let Some(lock_wait) = lock_wait else { return Ok(backend) };
        let lock_path = root.join("metadata").join("LOCK");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|e| StateError::io("opening the lock file", &lock_path, e))?;
        // An exclusive flock: held until this backend (and every clone) is dropped or the
        // process dies, so a second process can never write the same store concurrently.
        let deadline = std::time::Instant::now() + lock_wait;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    // The OS drops a dead holder's lock at once; poll rather than block in
                    // lock() so the wait is bounded.
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(StateError::Locked { path: lock_path }),
                Err(std::fs::TryLockError::Error(e)) => return Err(StateError::io("locking", &lock_path, e)),
            }
        }
        let inner = Arc::try_unwrap(backend.inner).map_err(|_| StateError::unavailable("backend in use"))?;
        Ok(FileStorageBackend { inner: Arc::new(Inner { _lock: Some(file), ..inner }) })
    }

    /// The store's base directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn path_of(&self, key: &StorageKey) -> PathBuf {
        let mut p = self.inner.root.clone();
        p.extend(key.segments());
        p
    }

    /// Creates `dir` and any missing ancestors below the root, each fsynced into its parent.
    fn ensure_dir(&self, dir: &Path) -> Result<()> {
        if lock(&self.inner.known_dirs).contains(dir) {
            return self.check_parents(dir);
        }
        if dir != self.inner.root
            && let Some(parent) = dir.parent()
        {
            if parent.starts_with(&self.inner.root) && parent != self.inner.root {
                self.ensure_dir(parent)?;
            }
            self.inner.fs.create_dir(dir).map_err(|e| StateError::io("creating directory", dir, e))?;
            // The entry must be durable in its parent before records go in it. Synced even
            // when the directory already existed: a crash (or a failed fsync) right after an
            // earlier mkdir may have left it there but not yet durable.
            self.inner.fs.sync_dir(parent).map_err(|e| StateError::io("syncing directory", parent, e))?;
        }
        lock(&self.inner.known_dirs).insert(dir.to_path_buf());
        Ok(())
    }

    /// Checks that `dir` and each directory between it and the root is a real directory,
    /// not a symbolic link swapped in since it was created: `O_NOFOLLOW` guards only the
    /// last component of a path. (A swap racing this check is outside the threat model: it
    /// needs write access to the store while it is open.)
    fn check_parents(&self, dir: &Path) -> Result<()> {
        let mut d = dir;
        while d != self.inner.root && d.starts_with(&self.inner.root) {
            self.inner.fs.check_dir(d).map_err(|e| StateError::io("checking directory", d, e))?;
            match d.parent() {
                Some(p) => d = p,
                None => break,
            }
        }
        Ok(())
    }

    fn put_blocking(&self, key: &StorageKey, value: &[u8]) -> Result<()> {
        let path = self.path_of(key);
        let dir = path.parent().unwrap_or(&self.inner.root).to_path_buf();
        self.ensure_dir(&dir)?;
        let staged = dir.join(format!(".{}{STAGED_MARK}{}", key.file_name(), random_suffix()));
        lock(&self.inner.in_flight).insert(staged.clone());
        lock(&self.inner.appenders.0).remove(&path);
        let result = self.write_atomic(&staged, &path, &dir, value);
        if result.is_err() {
            // Never leave a half-written staged file behind; the record itself is untouched.
            let _ = self.inner.fs.remove_file(&staged);
        }
        lock(&self.inner.in_flight).remove(&staged);
        result
    }

    /// The one place records are written: stage, fdatasync, rename, fsync the directory.
    ///
    /// The previous version keeps a second name (a hard link, `.NAME.tmp-prev-…` so a sweep
    /// removes it if a crash leaves it) until the new one is durable: if the directory
    /// fsync after the rename fails, the previous version is renamed back (or, if there was
    /// none, the new record removed), so an `Err` leaves what was there before.
    fn write_atomic(&self, staged: &Path, path: &Path, dir: &Path, value: &[u8]) -> Result<()> {
        let fs = &self.inner.fs;
        let mut f = fs.create_new(staged).map_err(|e| StateError::io("creating staged file", staged, e))?;
        f.write_all(value).map_err(|e| StateError::io("writing", staged, e))?;
        // The data must be on disk before the rename can make a name point at it.
        f.sync_data().map_err(|e| StateError::io("syncing", staged, e))?;
        drop(f);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let backup = dir.join(format!(".{name}{STAGED_MARK}prev-{}", random_suffix()));
        lock(&self.inner.in_flight).insert(backup.clone());
        let previous = match fs.hard_link(path, &backup) {
            Ok(()) => Previous::Kept(&backup),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Previous::None,
            // No second name to be had: a failure after the rename cannot be undone.
            Err(_) => Previous::Unknown,
        };
        let had_previous = matches!(previous, Previous::Kept(_));
        let result = self.replace(staged, path, dir, previous);
        if had_previous {
            // Not fsynced: if a crash brings the name back, the next sweep removes it.
            let _ = fs.remove_file(&backup);
        }
        lock(&self.inner.in_flight).remove(&backup);
        result
    }

    fn replace(&self, staged: &Path, path: &Path, dir: &Path, previous: Previous<'_>) -> Result<()> {
        let fs = &self.inner.fs;
        // Atomic replace: a reader or a crash sees either the old record or the new one.
        fs.rename(staged, path).map_err(|e| StateError::io("renaming into place", path, e))?;
        // Without this the rename may be lost on power failure, resurrecting the old record.
        if let Err(e) = fs.sync_dir(dir) {
            // The new version is visible but not durable, and the caller is told the save
            // failed: put back what was there (best effort; each step is atomic).
            let undone = match previous {
                Previous::Kept(b) => fs.rename(b, path),
                Previous::None => fs.remove_file(path).map(|_| ()),
                Previous::Unknown => Err(std::io::Error::from(std::io::ErrorKind::Unsupported)),
            };
            if undone.is_ok() {
                let _ = fs.sync_dir(dir);
            }
            return Err(StateError::io("syncing directory", dir, e));
        }
        Ok(())
    }

    fn delete_blocking(&self, key: &StorageKey) -> Result<bool> {
        let path = self.path_of(key);
        lock(&self.inner.appenders.0).remove(&path);
        let dir = path.parent().unwrap_or(&self.inner.root);
        match self.check_parents(dir) {
            Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            other => other?,
        }
        let existed = self.inner.fs.remove_file(&path).map_err(|e| StateError::io("deleting", &path, e))?;
        if existed {
            let dir = path.parent().unwrap_or(&self.inner.root);
            // The unlink must be durable before Ok, or the record reappears after a power loss.
            self.inner.fs.sync_dir(dir).map_err(|e| StateError::io("syncing directory", dir, e))?;
        }
        Ok(existed)
    }

    fn list_blocking(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let mut stack = vec![(self.path_of(prefix), prefix.as_str().to_owned())];
        while let Some((dir, key_prefix)) = stack.pop() {
            let entries = self.inner.fs.list_dir(&dir).map_err(|e| StateError::io("listing", &dir, e))?;
            for e in entries {
                if e.name.starts_with('.') {
                    continue; // staged files and anything hidden are not records
                }
                let key = format!("{key_prefix}/{}", e.name);
                if e.is_dir {
                    stack.push((dir.join(&e.name), key));
                } else if e.is_file
                    && let Ok(key) = StorageKey::new(key)
                {
                    out.push(ObjectMeta { key, size: e.size });
                }
            }
        }
        Ok(out)
    }

    fn sweep_blocking(&self) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        let mut stack = vec![self.inner.root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = self.inner.fs.list_dir(&dir).map_err(|e| StateError::io("listing", &dir, e))?;
            let mut removed_here = false;
            for e in entries {
                let path = dir.join(&e.name);
                if e.is_dir {
                    stack.push(path);
                } else if e.is_file && e.name.starts_with('.') && e.name.contains(STAGED_MARK) {
                    if lock(&self.inner.in_flight).contains(&path) {
                        continue;
                    }
                    if self.inner.fs.remove_file(&path).map_err(|e| StateError::io("removing staged file", &path, e))? {
                        report.files_removed += 1;
                        report.bytes_freed += e.size;
                        removed_here = true;
                    }
                }
            }
            if removed_here {
                // Make the removals durable so a power loss does not bring the files back.
                self.inner.fs.sync_dir(&dir).map_err(|e| StateError::io("syncing directory", &dir, e))?;
            }
        }
        Ok(report)
    }

    fn append_blocking(&self, key: &StorageKey, bytes: &[u8]) -> Result<()> {
        let path = self.path_of(key);
        let dir = path.parent().unwrap_or(&self.inner.root).to_path_buf();
        self.ensure_dir(&dir)?;
        let mut appenders = lock(&self.inner.appenders.0);
        let f = match appenders.entry(path.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(self.inner.fs.open_append(&path).map_err(|e| StateError::io("opening log", &path, e))?)
            }
        };
        // No fsync: the contract says an appended log may lose its tail in a crash; its
        // only user, the index journal, is reconciled against the records at start.
        let r = f.write_all(bytes).map_err(|e| StateError::io("appending", &path, e));
        if r.is_err() {
            appenders.remove(&path);
        }
        r
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(FileStorageBackend) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        // File I/O blocks; run it on tokio's blocking pool so the async workers stay free.
        tokio::task::spawn_blocking(move || f(this))
            .await
            .map_err(|e| StateError::unavailable(format!("file I/O task failed: {e}")))?
    }
}

#[async_trait]
impl StorageBackend for FileStorageBackend {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        let key = key.clone();
        self.blocking(move |b| {
            let path = b.path_of(&key);
            match b.check_parents(path.parent().unwrap_or(&b.inner.root)) {
                Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                other => other?,
            }
            b.inner.fs.read(&path).map_err(|e| StateError::io("reading", &path, e))
        })
        .await
    }

    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        let key = key.clone();
        self.blocking(move |b| b.put_blocking(&key, &value)).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool> {
        let key = key.clone();
        self.blocking(move |b| b.delete_blocking(&key)).await
    }

    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        let prefix = prefix.clone();
        self.blocking(move |b| b.list_blocking(&prefix)).await
    }

    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        let key = key.clone();
        self.blocking(move |b| b.append_blocking(&key, &bytes)).await
    }

    async fn sweep(&self) -> Result<SweepReport> {
        self.blocking(|b| b.sweep_blocking()).await
    }
}
