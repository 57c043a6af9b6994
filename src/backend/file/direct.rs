//! The file backend's direct writes, and the one place record files change on disk.
//!
//! This module owns [`Core`], the state that the backend's handles and the log's leader
//! share, and every operation on record files: directories made durable, staging
//! (`create_new`, write, `fdatasync`), `write_atomic` and `replace` (rename, directory
//! fsync, undo on failure), the batch `write_records` that the log uses to bring record
//! files up to date, and the blocking paths of put, delete, list, sweep and append. It
//! calls only the file-system seam (`fs.rs`) and the crate's error and lock helpers; it
//! knows nothing of the log beyond the overlay it holds for it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::fs::{Fs, FsFile};
use crate::backend::{ObjectMeta, StorageKey, SweepReport};
use crate::error::{Result, StateError};
use crate::sync::lock;

/// Marker in the names of staged files (`.NAME.tmp-RANDOM`).
const STAGED_MARK: &str = ".tmp-";

/// What the backend's handles and the log's leader share.
#[derive(Debug)]
pub(super) struct Core {
    pub(super) root: PathBuf,
    pub(super) fs: Arc<dyn Fs>,
    /// Directories known to exist durably, so puts skip the mkdir and its fsync.
    known_dirs: Mutex<HashSet<PathBuf>>,
    /// Staged files of writes in progress; `sweep` leaves these alone.
    in_flight: Mutex<HashSet<PathBuf>>,
    /// Open handles of append-only logs. A put or delete of the same key drops the handle,
    /// which would otherwise keep appending to the replaced (unlinked) file.
    appenders: Appenders,
    /// In log mode: the newest value (`None`: deleted) of every key whose latest write is
    /// durable in the log but not yet in its record file. Reads look here first.
    pub(super) overlay: Mutex<HashMap<StorageKey, Option<Arc<Vec<u8>>>>>,
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

/// The random part of a staged name (best effort; see `crate::random` for why a staged
/// name may fall back to a non-random one).
fn random_suffix() -> String {
    format!("{:016x}", crate::random::unique_u64())
}

impl Core {
    /// The shared state of a store whose base directory `root` exists: no directory known
    /// yet, nothing in flight, no appender open, nothing in the overlay.
    pub(super) fn new(root: PathBuf, fs: Arc<dyn Fs>) -> Core {
        Core {
            root,
            fs,
            known_dirs: Mutex::new(HashSet::new()),
            in_flight: Mutex::new(HashSet::new()),
            appenders: Appenders(Mutex::new(HashMap::new())),
            overlay: Mutex::new(HashMap::new()),
        }
    }
}

impl Core {
    pub(super) fn path_of(&self, key: &StorageKey) -> PathBuf {
        let mut p = self.root.clone();
        p.extend(key.segments());
        p
    }

    /// Creates `dir` and any missing ancestors below the root, each fsynced into its parent.
    pub(super) fn ensure_dir(&self, dir: &Path) -> Result<()> {
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
    pub(super) fn check_parents(&self, dir: &Path) -> Result<()> {
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
    pub(super) fn put_blocking(&self, key: &StorageKey, value: &[u8]) -> Result<()> {
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
        let written = self
            .fs
            .create_new(&staged)
            .map_err(|e| StateError::io("creating staged file", &staged, e))
            .and_then(|mut f| {
                f.write_all(value).map_err(|e| StateError::io("writing", &staged, e))?;
                f.sync_data().map_err(|e| StateError::io("syncing", &staged, e))
            });
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

    fn replace(
        &self,
        staged: &Path,
        path: &Path,
        dir: &Path,
        previous: Previous<'_>,
    ) -> Result<()> {
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

    pub(super) fn delete_blocking(&self, key: &StorageKey) -> Result<bool> {
        let path = self.path_of(key);
        lock(&self.appenders.0).remove(&path);
        let dir = path.parent().unwrap_or(&self.root);
        match self.check_parents(dir) {
            Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(false);
            }
            other => other?,
        }
        let existed =
            self.fs.remove_file(&path).map_err(|e| StateError::io("deleting", &path, e))?;
        if existed {
            let dir = path.parent().unwrap_or(&self.root);
            // The unlink must be durable before Ok, or the record reappears after a power loss.
            self.fs.sync_dir(dir).map_err(|e| StateError::io("syncing directory", dir, e))?;
        }
        Ok(existed)
    }

    pub(super) fn list_blocking(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
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

    pub(super) fn sweep_blocking(&self) -> Result<SweepReport> {
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
                    if self
                        .fs
                        .remove_file(&path)
                        .map_err(|e| StateError::io("removing staged file", &path, e))?
                    {
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

    pub(super) fn append_blocking(&self, key: &StorageKey, bytes: &[u8]) -> Result<()> {
        self.append_to(self.path_of(key), bytes)
    }

    /// An append that only writes to a file already open for appending (no directory to
    /// create, no file to open): one `write` to the page cache, made on the caller's
    /// thread. `None` if the file is not open yet; the caller appends the blocking way.
    pub(super) fn append_open(&self, key: &StorageKey, bytes: &[u8]) -> Option<Result<()>> {
        let path = self.path_of(key);
        if !lock(&self.appenders.0).contains_key(&path) {
            return None;
        }
        Some(self.append_to(path, bytes))
    }

    fn append_to(&self, path: PathBuf, bytes: &[u8]) -> Result<()> {
        let mut appenders = lock(&self.appenders.0);
        let f = match appenders.entry(path.clone()) {
            // Written through its open descriptor: no path is resolved, so there is no
            // directory on the way to check.
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                self.ensure_dir(path.parent().unwrap_or(&self.root))?;
                v.insert(
                    self.fs
                        .open_append(&path)
                        .map_err(|e| StateError::io("opening log", &path, e))?,
                )
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

    /// Brings record files up to date in one batch: each new value staged in its record's
    /// directory and `fdatasync`ed, then renamed into place; each deleted record unlinked;
    /// then each directory touched `fsync`ed once. Returns only when all of it is durable.
    /// (The log still holds every value, so a failure part-way loses nothing.)
    pub(super) fn write_records<'a>(
        &self,
        entries: impl Iterator<Item = (&'a StorageKey, Option<&'a [u8]>)>,
    ) -> Result<()> {
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
                self.fs
                    .rename(s, path)
                    .map_err(|e| StateError::io("renaming into place", path, e))?;
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
}
