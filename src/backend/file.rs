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
use super::{ObjectMeta, StorageBackend, StorageKey, SweepReport, wal};
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
    core: Arc<Core>,
    /// The log, in log mode.
    log: Option<Arc<Log>>,
    /// Held for the backend's life: the OS releases the lock when the process dies.
    _lock: Option<File>,
}

/// What the backend's handles and the log's leader share.
#[derive(Debug)]
struct Core {
    root: PathBuf,
    fs: Arc<dyn Fs>,
    /// Directories known to exist durably, so puts skip the mkdir and its fsync.
    known_dirs: Mutex<HashSet<PathBuf>>,
    /// Staged files of writes in progress; `sweep` leaves these alone.
    in_flight: Mutex<HashSet<PathBuf>>,
    /// Open handles of append-only logs. A put or delete of the same key drops the handle,
    /// which would otherwise keep appending to the replaced (unlinked) file.
    appenders: Appenders,
    /// In log mode: the newest value (`None`: deleted) of every key whose latest write is
    /// durable in the log but not yet in its record file. Reads look here first.
    overlay: Mutex<HashMap<StorageKey, Option<Arc<Vec<u8>>>>>,
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

/// How a [`FileStorageBackend`] is opened: see [`FileStorageBackend::options`].
#[derive(Debug, Clone)]
pub struct FileOptions {
    lock_wait: std::time::Duration,
    log: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions { lock_wait: std::time::Duration::ZERO, log: true }
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
    /// frame is appended to `metadata/.wal` and `fdatasync`ed (the store's own metadata is
    /// always written directly); the frames of all writes that arrive while one
    /// `fdatasync` runs share the next one (group commit). The record files are brought up
    /// to date in batches (each one staged, `fdatasync`ed, renamed, its directory
    /// `fsync`ed) when the log passes 8 MiB, when the last handle of the backend is
    /// dropped (the [`StateManager`](crate::StateManager) drops it at shutdown), and at the
    /// next open after a crash; only then is the log removed. Reads see the newest value
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

    /// Opens (creating if needed) the store at `path` with these options and takes its
    /// lock. An existing log (a crash cut the last process off) is replayed into the
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
        FileStorageBackend::open_with(path.as_ref(), Arc::new(OsFs), Some(self.lock_wait), self.log)
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
    /// let backend = mars_state::FileStorageBackend::open_waiting("./state_storage", std::time::Duration::from_secs(5))?;
    /// # Ok(()) }
    /// ```
    pub fn open_waiting(path: impl AsRef<Path>, timeout: std::time::Duration) -> Result<Self> {
        FileOptions::default().lock_wait(timeout).open(path)
    }

    /// Options for opening a store: waiting for its lock, the write-ahead log.
    pub fn options() -> FileOptions {
        FileOptions::default()
    }

    #[allow(dead_code)] // used by the power-loss simulator tests
    pub(crate) fn with_fs(path: &Path, fs: Arc<dyn Fs>, log: bool) -> Result<Self> {
        Self::open_with(path, fs, None, log)
    }

    /// `lock_wait`: `None` takes no OS lock (simulated file systems); otherwise how long to
    /// wait for a lock held by someone else.
    fn open_with(root: &Path, fs: Arc<dyn Fs>, lock_wait: Option<std::time::Duration>, log: bool) -> Result<Self> {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir().map_err(|e| StateError::io("resolving", root, e))?.join(root)
        };
        create_root(fs.as_ref(), &root).map_err(|e| StateError::io("creating the store directory", &root, e))?;
        let core = Arc::new(Core {
            root: root.clone(),
            fs,
            known_dirs: Mutex::new(HashSet::new()),
            in_flight: Mutex::new(HashSet::new()),
            appenders: Appenders(Mutex::new(HashMap::new())),
            overlay: Mutex::new(HashMap::new()),
        });
        for dir in ["sessions", "checkpoints", "metadata", "quarantine"] {
            core.ensure_dir(&root.join(dir))?;
        }
        let lock = match lock_wait {
            Some(wait) => Some(take_lock(&root.join("metadata").join("LOCK"), wait)?),
            None => None,
        };
        // Only now, holding the lock: what a crashed process left in the log goes into the
        // record files before anything reads them.
        let kept = core.recover_log(log)?;
        let log = if log { Some(Arc::new(Log::new(core.clone(), kept))) } else { None };
        Ok(FileStorageBackend { inner: Arc::new(Inner { core, log, _lock: lock }) })
    }

    /// The store's base directory.
    pub fn root(&self) -> &Path {
        &self.inner.core.root
    }

    fn core(&self) -> &Arc<Core> {
        &self.inner.core
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Core) -> Result<T> + Send + 'static) -> Result<T> {
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
            let log = self.inner.log.clone();
            tokio::task::spawn_blocking(move || {
                if let Some(log) = log {
                    log.lead();
                }
            });
        }
        rx.await.map_err(|_| StateError::unavailable("the log writer stopped before answering; outcome unknown"))?
    }
}

/// Takes the store's OS lock, waiting up to `wait` for another holder to let go.
fn take_lock(lock_path: &Path, wait: std::time::Duration) -> Result<File> {
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
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                // The OS drops a dead holder's lock at once; poll rather than block in
                // lock() so the wait is bounded.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(StateError::Locked { path: lock_path.into() }),
            Err(std::fs::TryLockError::Error(e)) => return Err(StateError::io("locking", lock_path, e)),
        }
    }
}

impl Core {
    fn path_of(&self, key: &StorageKey) -> PathBuf {
        let mut p = self.root.clone();
        p.extend(key.segments());
        p
    }

    /// Creates `dir` and any missing ancestors below the root, each fsynced into its parent.
    fn ensure_dir(&self, dir: &Path) -> Result<()> {
        if lock(&self.known_dirs).contains(dir) {
            return self.check_parents(dir);
        }
        if dir != self.root
            && let Some(parent) = dir.parent()
        {
            if parent.starts_with(&self.root) && parent != self.root {
                self.ensure_dir(parent)?;
            }
            self.fs.create_dir(dir).map_err(|e| StateError::io("creating directory", dir, e))?;
            // The entry must be durable in its parent before records go in it. Synced even
            // when the directory already existed: a crash (or a failed fsync) right after an
            // earlier mkdir may have left it there but not yet durable.
            self.fs.sync_dir(parent).map_err(|e| StateError::io("syncing directory", parent, e))?;
        }
        lock(&self.known_dirs).insert(dir.to_path_buf());
        Ok(())
    }

    /// Checks that `dir` and each directory between it and the root is a real directory,
    /// not a symbolic link swapped in since it was created: `O_NOFOLLOW` guards only the
    /// last component of a path. (A swap racing this check is outside the threat model: it
    /// needs write access to the store while it is open.)
    fn check_parents(&self, dir: &Path) -> Result<()> {
        let mut d = dir;
        while d != self.root && d.starts_with(&self.root) {
            self.fs.check_dir(d).map_err(|e| StateError::io("checking directory", d, e))?;
            match d.parent() {
                Some(p) => d = p,
                None => break,
            }
        }
        Ok(())
    }

    /// A direct put: stage, rename over the record, fsync the directory.
    fn put_blocking(&self, key: &StorageKey, value: &[u8]) -> Result<()> {
        let path = self.path_of(key);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        self.ensure_dir(&dir)?;
        lock(&self.appenders.0).remove(&path);
        let staged = self.stage(&dir, key.file_name(), value)?;
        let result = self.write_atomic(&staged, &path, &dir);
        // On error, never leave a staged file behind; the record itself is untouched.
        self.unstage(&staged, result.is_err());
        result
    }

    /// Writes `value` to a new staged file `.NAME.tmp-RANDOM` in `dir` (`create_new`, so a
    /// stale or planted file is never reused) and `fdatasync`s it: the data must be on disk
    /// before a rename can make a name point at it. The file is marked in flight (a sweep
    /// leaves it alone) until [`unstage`](Self::unstage); on error it is already gone.
    fn stage(&self, dir: &Path, name: &str, value: &[u8]) -> Result<PathBuf> {
        let staged = dir.join(format!(".{name}{STAGED_MARK}{}", random_suffix()));
        lock(&self.in_flight).insert(staged.clone());
        let written =
            self.fs.create_new(&staged).map_err(|e| StateError::io("creating staged file", &staged, e)).and_then(
                |mut f| {
                    f.write_all(value).map_err(|e| StateError::io("writing", &staged, e))?;
                    f.sync_data().map_err(|e| StateError::io("syncing", &staged, e))
                },
            );
        match written {
            Ok(()) => Ok(staged),
            Err(e) => {
                self.unstage(&staged, true);
                Err(e)
            }
        }
    }

    /// Ends a staged file's life in flight, removing it first if it was not renamed.
    fn unstage(&self, staged: &Path, remove: bool) {
        if remove {
            let _ = self.fs.remove_file(staged);
        }
        lock(&self.in_flight).remove(staged);
    }

    /// The one place a record is replaced on its own: a staged, synced file renamed over
    /// it, then the directory fsynced.
    ///
    /// The previous version keeps a second name (a hard link, `.NAME.tmp-prev-…` so a sweep
    /// removes it if a crash leaves it) until the new one is durable: if the directory
    /// fsync after the rename fails, the previous version is renamed back (or, if there was
    /// none, the new record removed), so an `Err` leaves what was there before.
    fn write_atomic(&self, staged: &Path, path: &Path, dir: &Path) -> Result<()> {
        let fs = &self.fs;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let backup = dir.join(format!(".{name}{STAGED_MARK}prev-{}", random_suffix()));
        lock(&self.in_flight).insert(backup.clone());
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
        lock(&self.in_flight).remove(&backup);
        result
    }

    fn replace(&self, staged: &Path, path: &Path, dir: &Path, previous: Previous<'_>) -> Result<()> {
        let fs = &self.fs;
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
        lock(&self.appenders.0).remove(&path);
        let dir = path.parent().unwrap_or(&self.root);
        match self.check_parents(dir) {
            Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            other => other?,
        }
        let existed = self.fs.remove_file(&path).map_err(|e| StateError::io("deleting", &path, e))?;
        if existed {
            let dir = path.parent().unwrap_or(&self.root);
            // The unlink must be durable before Ok, or the record reappears after a power loss.
            self.fs.sync_dir(dir).map_err(|e| StateError::io("syncing directory", dir, e))?;
        }
        Ok(existed)
    }

    fn list_blocking(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let mut stack = vec![(self.path_of(prefix), prefix.as_str().to_owned())];
        while let Some((dir, key_prefix)) = stack.pop() {
            let entries = self.fs.list_dir(&dir).map_err(|e| StateError::io("listing", &dir, e))?;
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
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = self.fs.list_dir(&dir).map_err(|e| StateError::io("listing", &dir, e))?;
            let mut removed_here = false;
            for e in entries {
                let path = dir.join(&e.name);
                if e.is_dir {
                    stack.push(path);
                } else if e.is_file && e.name.starts_with('.') && e.name.contains(STAGED_MARK) {
                    if lock(&self.in_flight).contains(&path) {
                        continue;
                    }
                    if self.fs.remove_file(&path).map_err(|e| StateError::io("removing staged file", &path, e))? {
                        report.files_removed += 1;
                        report.bytes_freed += e.size;
                        removed_here = true;
                    }
                }
            }
            if removed_here {
                // Make the removals durable so a power loss does not bring the files back.
                self.fs.sync_dir(&dir).map_err(|e| StateError::io("syncing directory", &dir, e))?;
            }
        }
        Ok(report)
    }

    fn append_blocking(&self, key: &StorageKey, bytes: &[u8]) -> Result<()> {
        let path = self.path_of(key);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        self.ensure_dir(&dir)?;
        let mut appenders = lock(&self.appenders.0);
        let f = match appenders.entry(path.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(self.fs.open_append(&path).map_err(|e| StateError::io("opening log", &path, e))?)
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
}

// ----------------------------------------------------------------------------------------
// Log mode: group commit through the write-ahead log, record files brought up to date later

/// Whether writes of `key` go through the log in log mode: the records (sessions and
/// checkpoints), written on every step. The store's own files (`metadata/`, the index
/// journal that is also appended to, `quarantine/`) are written rarely and directly, so
/// every name that is appended to is also replaced in one place, and the files a person
/// or the store reads first at open are always current.
fn through_log(key: &StorageKey) -> bool {
    matches!(key.segments().next(), Some("sessions" | "checkpoints"))
}

/// The log's file: hidden, so listings never show it and a sweep (which removes only
/// `.tmp-` names) never touches it.
const WAL: &str = ".wal";
/// Bring the record files up to date once the log is this long...
const MATERIALIZE_AT: u64 = 8 << 20;
/// At most this many bytes of frames in one batch (one write, one `fdatasync`).
const MAX_BATCH: usize = 16 << 20;

type Reply = tokio::sync::oneshot::Sender<Result<()>>;

/// A write for the log writer.
enum LogReq {
    Put { key: StorageKey, value: Vec<u8>, reply: Reply },
    Delete { key: StorageKey, reply: Reply },
}

impl LogReq {
    fn key(&self) -> &StorageKey {
        match self {
            LogReq::Put { key, .. } | LogReq::Delete { key, .. } => key,
        }
    }
    /// The new value of a put, `None` for a delete.
    fn value(&self) -> Option<&[u8]> {
        match self {
            LogReq::Put { value, .. } => Some(value),
            LogReq::Delete { .. } => None,
        }
    }
    fn size(&self) -> usize {
        self.key().as_str().len() + if let LogReq::Put { value, .. } = self { value.len() } else { 0 }
    }
    fn answer(self, r: Result<()>) {
        match self {
            LogReq::Put { reply, .. } | LogReq::Delete { reply, .. } => {
                let _ = reply.send(r);
            }
        }
    }
}

/// The log: writes waiting for the next group commit, and the writer that makes them.
///
/// There is no thread of its own: the first writer to find no commit running becomes the
/// leader and runs commits on tokio's blocking pool until the queue is empty; everyone who
/// queues meanwhile is answered by those commits. (A blocking-pool task, unlike a thread of
/// our own, also keeps a paused test clock from jumping ahead while a commit runs.)
struct Log {
    queue: Mutex<Queue>,
    writer: Mutex<LogWriter>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<LogReq>,
    leading: bool,
    /// The backend is gone: nothing more is written.
    closed: bool,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Log")
    }
}

impl Log {
    /// `kept`: a log recovery could not replay yet (full disk), to go on appending to.
    fn new(core: Arc<Core>, kept: Option<(Box<dyn FsFile>, u64)>) -> Log {
        let (file, len) = match kept {
            Some((f, len)) => (Some(f), len),
            None => (None, 0),
        };
        let writer = LogWriter { core, file, len, cut_failed: false };
        Log { queue: Mutex::new(Queue::default()), writer: Mutex::new(writer) }
    }

    /// Queues `req`; returns whether the caller must start a leader.
    fn enqueue(&self, req: LogReq) -> bool {
        let mut q = lock(&self.queue);
        q.waiting.push(req);
        !std::mem::replace(&mut q.leading, true)
    }

    /// The leader: commits what is queued, batch after batch, until nothing is.
    fn lead(&self) {
        let mut writer = lock(&self.writer);
        loop {
            let batch = {
                let mut q = lock(&self.queue);
                if q.closed {
                    // Only requests whose callers gave up can be left when the last handle
                    // is dropped: refuse them, the files are final.
                    for req in q.waiting.drain(..) {
                        req.answer(Err(StateError::unavailable("the file backend was dropped")));
                    }
                    q.leading = false;
                    return;
                }
                if q.waiting.is_empty() {
                    // Decided under the queue lock: a writer queueing after this starts a
                    // new leader.
                    q.leading = false;
                    return;
                }
                let mut bytes = 0;
                let n = q
                    .waiting
                    .iter()
                    .take_while(|r| {
                        let fits = bytes < MAX_BATCH;
                        bytes += r.size();
                        fits
                    })
                    .count();
                q.waiting.drain(..n).collect::<Vec<_>>()
            };
            writer.commit(batch);
            if writer.len >= MATERIALIZE_AT {
                writer.materialize_logged();
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: wait for a running commit (the writer lock), bring the
        // record files up to date and remove the log, all while the store lock (a field,
        // dropped after this) is still held. A leader that starts later finds the queue
        // closed and writes nothing.
        if let Some(log) = &self.log {
            lock(&log.queue).closed = true;
            lock(&log.writer).materialize_logged();
        }
    }
}

/// What the leader commits with.
struct LogWriter {
    core: Arc<Core>,
    /// The open log, once this writer has created it.
    file: Option<Box<dyn FsFile>>,
    /// Bytes of whole, durable frames in it.
    len: u64,
    /// A failed write could not be cut off the log: nothing may be appended after it.
    cut_failed: bool,
}

impl LogWriter {
    fn materialize_logged(&mut self) {
        if let Err(e) = self.materialize() {
            // Nothing is lost: the log still holds every write and is replayed at the next
            // open; until then reads are served from the overlay.
            tracing::warn!(error = %e, "bringing record files up to date from the log failed; will retry");
        }
    }

    /// Appends the batch's frames, makes them durable, then publishes them to the overlay
    /// and answers every caller.
    fn commit(&mut self, batch: Vec<LogReq>) {
        let mut accepted = Vec::with_capacity(batch.len());
        for req in batch {
            // The same checks a direct write makes (no symbolic link on the way), before
            // anything is promised; the directory is created (durably) now so that bringing
            // the record file up to date later cannot fail for want of it.
            let path = self.core.path_of(req.key());
            let dir = path.parent().unwrap_or(&self.core.root);
            if let Err(e) = self.core.ensure_dir(dir) {
                req.answer(Err(e));
                continue;
            }
            match wal::check(req.key(), req.value()) {
                Ok(()) => accepted.push(req),
                Err(why) => req.answer(Err(StateError::Config { message: why.to_owned() })),
            }
        }
        if accepted.is_empty() {
            return;
        }
        match self.append(&accepted) {
            Ok(()) => {
                let mut overlay = lock(&self.core.overlay);
                let mut answers = Vec::with_capacity(accepted.len());
                for req in accepted {
                    match req {
                        LogReq::Put { key, value, reply } => {
                            overlay.insert(key, Some(Arc::new(value)));
                            answers.push(reply);
                        }
                        LogReq::Delete { key, reply } => {
                            overlay.insert(key, None);
                            answers.push(reply);
                        }
                    }
                }
                drop(overlay);
                for reply in answers {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                let (kind, code, op) = match &e {
                    StateError::Io { source, operation, .. } => (source.kind(), source.raw_os_error(), *operation),
                    StateError::StorageFull { operation, .. } => {
                        (std::io::ErrorKind::StorageFull, Some(libc::ENOSPC), *operation)
                    }
                    _ => (std::io::ErrorKind::Other, None, "appending to the log"),
                };
                let path = self.core.wal_path();
                for req in accepted {
                    let source = match code {
                        Some(c) => std::io::Error::from_raw_os_error(c),
                        None => std::io::Error::from(kind),
                    };
                    req.answer(Err(StateError::io(op, &path, source)));
                }
            }
        }
    }

    /// Appends the frames of `reqs` as one batch and makes them durable. On failure the log
    /// is cut back to its last durable length (through a fresh descriptor: one whose sync
    /// failed is never synced again), so a failed write leaves nothing that a replay would
    /// apply, and the next batch is written in its place.
    fn append(&mut self, reqs: &[LogReq]) -> Result<()> {
        if self.cut_failed {
            // Nothing is appended after an uncut failed write (a replay would stop at it):
            // first the files are brought up to date and the log is gone.
            self.materialize()?;
        }
        let path = self.core.wal_path();
        let fs = &self.core.fs;
        let created = self.file.is_none();
        if created {
            // The writer starts a log only where none is left over (recovery removed it or
            // handed it over, and so does `materialize`); if removing one failed, the new
            // frames go after what it holds (values already in their record files).
            let mut file = fs.open_append(&path).map_err(|e| StateError::io("opening the log", &path, e))?;
            self.len = file.len().map_err(|e| StateError::io("opening the log", &path, e))?;
            self.file = Some(file);
        }
        // Every frame names the offset where its batch starts (the log's length before the
        // batch): what tells a torn last batch from damage to an earlier one at replay
        // (`wal.rs`). A failed batch is cut off, and the next one starts at the same place.
        let mut frames = Vec::new();
        for req in reqs {
            wal::encode(&mut frames, req.key(), req.value(), self.len)
                .map_err(|why| StateError::Config { message: why.to_owned() })?;
        }
        let frames = frames.as_slice();
        let Some(file) = self.file.as_mut() else { return Err(StateError::unavailable("log not open")) };
        let result = file
            .write_all(frames)
            .map_err(|e| StateError::io("appending to the log", &path, e))
            // The frames must be on disk before any caller hears Ok.
            .and_then(|()| file.sync_data().map_err(|e| StateError::io("syncing the log", &path, e)))
            // A new log's name must be durable too, or a power loss takes the whole log.
            .and_then(|()| {
                if created {
                    let dir = self.core.root.join("metadata");
                    fs.sync_dir(&dir).map_err(|e| StateError::io("syncing directory", &dir, e))
                } else {
                    Ok(())
                }
            });
        match result {
            Ok(()) => {
                self.len += frames.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.file = None;
                let cut = fs.open_append(&path).and_then(|mut f| {
                    f.set_len(self.len)?;
                    f.sync_data()?;
                    Ok(f)
                });
                match cut {
                    Ok(f) if !created => self.file = Some(f),
                    Ok(_) => {
                        // A log this writer had only just created: remove it again.
                        let _ = self.core.remove_log();
                    }
                    Err(cut_err) => {
                        // The tail could not be cut: bring the files up to date from the
                        // overlay and drop the whole log before the next write.
                        tracing::warn!(error = %cut_err, "could not cut a failed write off the log");
                        self.cut_failed = true;
                    }
                }
                Err(e)
            }
        }
    }

    /// Writes every overlay entry to its record file, durably, then removes the log.
    fn materialize(&mut self) -> Result<()> {
        let entries: Vec<(StorageKey, Option<Arc<Vec<u8>>>)> =
            lock(&self.core.overlay).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if entries.is_empty() && self.file.is_none() && self.len == 0 && !self.cut_failed {
            return Ok(());
        }
        self.core.write_records(entries.iter().map(|(k, v)| (k, v.as_ref().map(|v| v.as_slice()))))?;
        // Every entry is durable in its own file now: the log may go.
        self.file = None;
        self.core.remove_log()?;
        self.len = 0;
        self.cut_failed = false;
        // Only the writer (whose lock the caller holds) adds to the overlay, so it holds
        // exactly the entries just written.
        lock(&self.core.overlay).clear();
        Ok(())
    }
}

impl Core {
    fn wal_path(&self) -> PathBuf {
        self.root.join("metadata").join(WAL)
    }

    /// Removes the log, durably. Called only when nothing in it is needed any more: every
    /// value it holds is durable in its record file, or (a log just created whose first
    /// append failed) it holds nothing acknowledged. If a crash comes before the removal is
    /// durable, the next open replays the log and rewrites the same values.
    fn remove_log(&self) -> Result<()> {
        let path = self.wal_path();
        self.fs.remove_file(&path).map_err(|e| StateError::io("removing the log", &path, e))?;
        let dir = self.root.join("metadata");
        self.fs.sync_dir(&dir).map_err(|e| StateError::io("syncing directory", &dir, e))
    }

    /// At open, with the lock held: replays a log a crash left behind into the record
    /// files, then removes it. A torn tail (a write that was never acknowledged) is ignored.
    ///
    /// Damage followed by whole frames of a later batch is not a torn tail: it hit writes
    /// that were acknowledged (see `wal.rs`). Then the open fails with
    /// [`StateError::Corrupt`] naming the log, before anything is written: the log stays in
    /// place byte for byte and no record file is touched, so nothing is lost and it can be
    /// inspected, cut or moved aside by hand (the message says how). Replaying the frames
    /// before the damage alone would give back older values than were acknowledged, as if
    /// nothing were wrong.
    ///
    /// With `keep_if_full` (log mode), a disk too full for the second copy does not stop
    /// the open: the log's values go to the overlay, the log is cut to its whole frames and
    /// kept, and its handle and length are returned for the writer to go on appending; the
    /// files are brought up to date later, once there is room.
    fn recover_log(&self, keep_if_full: bool) -> Result<Option<(Box<dyn FsFile>, u64)>> {
        let path = self.wal_path();
        let Some(bytes) = self.fs.read(&path).map_err(|e| StateError::io("reading the log", &path, e))? else {
            return Ok(None);
        };
        let replayed = wal::replay(&bytes).map_err(|d| {
            tracing::error!(
                damaged_at = d.at,
                next_frame = d.next_frame,
                len = bytes.len(),
                "the write-ahead log is damaged before frames that were acknowledged; not opening the store"
            );
            StateError::corrupt(
                format!("metadata/{WAL}"),
                format!(
                    "the write-ahead log is damaged at byte {} of {}, and whole frames written after that part \
                     was made durable follow at byte {}: acknowledged writes cannot be read back. Nothing was \
                     changed and the log is kept at {}. To open the store anyway, keep a copy of the log, then \
                     either cut it to its first {} bytes (the writes from the damage on are lost) or move it out \
                     of the store (every write it holds is lost; the record files keep their older values)",
                    d.at,
                    bytes.len(),
                    d.next_frame,
                    path.display(),
                    d.at
                ),
            )
        })?;
        if replayed.valid_len < bytes.len() {
            tracing::info!(
                ignored_bytes = bytes.len() - replayed.valid_len,
                "the write-ahead log ends in an unacknowledged, torn write; ignoring it"
            );
        }
        let mut latest: HashMap<StorageKey, Option<Vec<u8>>> = HashMap::new();
        let frames = replayed.frames.len();
        for (k, v) in replayed.frames {
            latest.insert(k, v);
        }
        match self.write_records(latest.iter().map(|(k, v)| (k, v.as_deref()))) {
            Ok(()) => {}
            Err(e @ StateError::StorageFull { .. }) if keep_if_full => {
                tracing::warn!(error = %e, "no room to replay the write-ahead log into the record files; serving it from memory");
                let valid = replayed.valid_len as u64;
                let mut file = self.fs.open_append(&path).map_err(|e| StateError::io("opening the log", &path, e))?;
                // Appends must follow the last whole frame, or a replay would stop at the
                // torn one and never reach them.
                file.set_len(valid).map_err(|e| StateError::io("cutting the log", &path, e))?;
                file.sync_data().map_err(|e| StateError::io("syncing the log", &path, e))?;
                lock(&self.overlay).extend(latest.into_iter().map(|(k, v)| (k, v.map(Arc::new))));
                return Ok(Some((file, valid)));
            }
            Err(e) => return Err(e),
        }
        self.remove_log()?;
        if frames > 0 {
            tracing::info!(frames, records = latest.len(), "replayed the write-ahead log into the record files");
        }
        Ok(None)
    }

    /// Brings record files up to date in one batch: each new value staged in its record's
    /// directory and `fdatasync`ed, then renamed into place; each deleted record unlinked;
    /// then each directory touched `fsync`ed once. Returns only when all of it is durable.
    /// (The log still holds every value, so a failure part-way loses nothing.)
    fn write_records<'a>(&self, entries: impl Iterator<Item = (&'a StorageKey, Option<&'a [u8]>)>) -> Result<()> {
        let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut removed: Vec<PathBuf> = Vec::new();
        let mut dirs: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
        let result = (|| {
            for (key, value) in entries {
                let path = self.path_of(key);
                let dir = path.parent().unwrap_or(&self.root).to_path_buf();
                self.ensure_dir(&dir)?;
                match value {
                    Some(bytes) => staged.push((self.stage(&dir, key.file_name(), bytes)?, path)),
                    None => removed.push(path),
                }
                dirs.insert(dir);
            }
            for (s, path) in &staged {
                lock(&self.appenders.0).remove(path);
                // Atomic replace: a reader sees the old file or the new one, both of which
                // hold a value the log also holds.
                self.fs.rename(s, path).map_err(|e| StateError::io("renaming into place", path, e))?;
            }
            for path in &removed {
                lock(&self.appenders.0).remove(path);
                // Not durable until the directory fsync below; until then a crash brings the
                // record back, and the replay of the log (which holds the delete) removes it.
                self.fs.remove_file(path).map_err(|e| StateError::io("deleting", path, e))?;
            }
            // The renames and unlinks must be durable before the log that holds them goes.
            for dir in &dirs {
                self.fs.sync_dir(dir).map_err(|e| StateError::io("syncing directory", dir, e))?;
            }
            Ok(())
        })();
        for (s, _) in &staged {
            // A staged file not renamed (an error part-way) goes; the log still holds it.
            self.unstage(s, result.is_err());
        }
        result
    }

    /// What the overlay says of `key`: `Some(Some(v))` written, `Some(None)` deleted,
    /// `None` nothing pending (the record file is current).
    fn pending(&self, key: &StorageKey) -> Option<Option<Arc<Vec<u8>>>> {
        lock(&self.overlay).get(key).cloned()
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
            Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            other => other?,
        }
        // A small record already in the page cache is read right here: the read takes a few
        // microseconds, a hop to the blocking pool and back more. Anything that would wait
        // for the disk (or is large) goes to the pool.
        let reading = |e| StateError::io("reading", &path, e);
        if let Some(found) = self.core().fs.read_cached(&path, INLINE_MAX).map_err(reading)? {
            return Ok(found);
        }
        self.blocking(move |b| b.fs.read(&path).map_err(|e| StateError::io("reading", &path, e))).await
    }

    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        if let Some(log) = &self.inner.log
            && through_log(key)
        {
            return self.through_log(log, |reply| LogReq::Put { key: key.clone(), value, reply }).await;
        }
        let key = key.clone();
        self.blocking(move |b| b.put_blocking(&key, &value)).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool> {
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
        let key = key.clone();
        self.blocking(move |b| b.append_blocking(&key, &bytes)).await
    }

    async fn sweep(&self) -> Result<SweepReport> {
        self.blocking(|b| b.sweep_blocking()).await
    }
}
