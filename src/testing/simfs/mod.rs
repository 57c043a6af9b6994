//! The power-loss simulator: [`SimFs`], an in-memory implementation of the file backend's
//! file-system seam ([`Fs`], [`FsFile`]) that tracks what is durable, and the tests that run
//! the file backend and a whole `StateManager` over it (issue 5, items 4 and 5). Test-only
//! (`cfg(test)`, whatever the features): it calls the seam's traits and `libc` error codes,
//! and its tests call the file backend (`FileStorageBackend::with_fs`), the manager and the
//! index; nothing in the library calls it.
//!
//! Layout: `tree.rs` holds the inode tree and builds crash images; this file is the
//! [`Fs`] over it, with fault injection; `tests/` runs the file backend over it
//! (`tests/oracle.rs` is the power-loss oracle).
//!
//! # The durability model of [`SimFs`]
//!
//! The simulated file system is a tree of inodes. Every inode has two versions of itself:
//! the *current* one, which every read and listing sees, and the *durable* one, which is
//! what stable storage holds.
//!
//! - A **file** has current and durable content. [`FsFile::write_all`] appends to the
//!   current content, [`FsFile::write_at`] overwrites it in place (extending it with
//!   zeros if it ends before the offset); [`FsFile::sync_data`] copies the current content
//!   to the durable one.
//! - A **directory** has current and durable entries (name → inode). `create_new`,
//!   `open_append` (when it creates), `create_dir`, `rename` and `remove_file` change only
//!   the current entries of the directories involved; [`Fs::sync_dir`] copies a
//!   directory's current entries to its durable ones. So a new directory exists durably
//!   in its parent only after its parent is synced, and a rename is durable only after
//!   both directories are synced. Syncing a file never makes its name durable, and
//!   syncing a directory never makes the contents of its files durable (POSIX semantics,
//!   the ones the ALICE study tests applications against).
//! - An unlinked or replaced inode is kept: a directory's durable entries may still point
//!   at it, and an open handle may still write to it.
//!
//! A crash ([`Tree::crash_image`]) keeps, from the root down, each directory's entries and
//! each reachable file's content according to a [`CrashMode`]:
//! - [`CrashMode::Durable`]: a power loss that keeps the durable versions only;
//! - [`CrashMode::ProcessKill`]: a process crash (`kill -9`): the kernel keeps everything,
//!   and what was unsynced stays unsynced, so a later power loss can still lose it;
//! - [`CrashMode::Random`]: a power loss that keeps the durable versions plus a random
//!   subset of what is unsynced: each differing directory entry (a create, a removal,
//!   either half of a rename) is independently kept or dropped, and each file with
//!   unsynced data keeps its durable content, its current content, or a torn mix of the
//!   two: after appends only (the durable content is a prefix of the current one), the
//!   durable content followed by a prefix of the unsynced tail (a torn append); after an
//!   overwrite in place, every block of [`TORN_BLOCK`](tree::TORN_BLOCK) bytes taken from
//!   either version independently (a disk that wrote some of the dirty sectors), at a
//!   length between the two versions' (a block taken from a version that ends before it
//!   reads as zeros). Letting the two halves of one rename disagree, or blocks far smaller than a
//!   sector tear apart, is more than a disk or a journaling file system does; a program
//!   that survives that survives the real thing too.
//!
//! Not modelled: file metadata other than size; hard links and directory renames (the
//! backend uses neither; renaming a directory is refused); an unsynced append that comes
//! back as zeros or garbage rather than as a prefix (an overwrite in place may come back
//! as any mix of its blocks, see above); and the Linux behaviour after a failed fsync (pages
//! marked clean, so a retried fsync reports success for lost data): an injected fsync
//! failure simply leaves the durable version unchanged.
//!
//! # Fault injection and broken variants
//!
//! [`SimFs::fail`] arms a countdown: the Nth next call of an [`Op`] fails (and the calls
//! after it, as many times as asked) with `EIO` or `ENOSPC`. A failing `write_all` writes
//! half its buffer first (a short write, as a full disk does). [`SimFs::break_durability`]
//! turns `sync_data` or `sync_dir` into a no-op that reports success: the deliberately
//! broken variants that prove the power-loss oracle can fail.
//!
//! [`SimFs::record`] makes the file system keep a copy of its tree after every change, so
//! a test can build the crash images of every point inside an operation.
//!
//! # The tests
//!
//! Run them with `cargo test --lib simfs -- --nocapture` (they print their counts).
//! - `power_loss_at_every_step_loses_no_acknowledged_write`: a workload of saves,
//!   updates, checkpoints, deletes, a rollback and a cleanup over three sessions, plain and
//!   gzipped. After every change of the file system and every acknowledgement it builds the
//!   crash images (durable only, process kill, random "some unsynced kept"), recovers each
//!   distinct one with a fresh manager and checks it against the acknowledged writes.
//! - `the_oracle_catches_a_missing_file_fsync_and_a_missing_directory_fsync`: the same
//!   oracle over [`Broken`] variants must report lost, corrupt or missing data.
//! - `every_fault_point_of_a_save_fails_cleanly` and its neighbours: `EIO` and `ENOSPC`
//!   at each step of a save (and of a journal append, a delete, a mkdir).
//! - `a_directory_whose_parent_fsync_failed_is_synced_before_use` and its neighbour pin a
//!   bug found here and since fixed: a directory whose creation was not made durable was
//!   never synced before records were written in it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

pub(crate) use self::tree::{CrashMode, Tree};
use self::tree::{Ino, Node, errno};
use crate::backend::{DirEntry, Fs, FsFile};

#[cfg(test)]
mod tests;
mod tree;

/// The file operations that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Op {
    CreateNew,
    OpenAppend,
    OpenInPlace,
    WriteAll,
    WriteAt,
    SyncData,
    Rename,
    RemoveFile,
    CreateDir,
    SyncDir,
    SetLen,
}

/// The error an armed fault returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// `EIO`: a failing disk.
    Eio,
    /// `ENOSPC`: a full disk.
    Enospc,
}

impl Fault {
    fn error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            Fault::Eio => libc::EIO,
            Fault::Enospc => libc::ENOSPC,
        })
    }
}

/// A deliberately broken durability primitive (test-only switch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Broken {
    /// `sync_data` reports success without making the file's content durable.
    SyncDataNoop,
    /// `sync_dir` reports success without making the directory's entries durable.
    SyncDirNoop,
}

struct Armed {
    op: Op,
    /// Calls of `op` to let through before failing.
    skip: u64,
    /// Calls of `op` still to fail.
    left: u64,
    fault: Fault,
}

struct Inner {
    tree: Tree,
    armed: Vec<Armed>,
    calls: HashMap<Op, u64>,
    broken: Option<Broken>,
    recording: bool,
    snapshots: Vec<Tree>,
}

impl Inner {
    /// Counts a call of `op` and fails it if a fault is armed for it.
    fn check(&mut self, op: Op) -> io::Result<()> {
        *self.calls.entry(op).or_default() += 1;
        for a in self.armed.iter_mut().filter(|a| a.op == op) {
            if a.skip > 0 {
                a.skip -= 1;
            } else if a.left > 0 {
                a.left -= 1;
                return Err(a.fault.error());
            }
        }
        Ok(())
    }

    /// Called after every change of the tree (including durability changes).
    fn changed(&mut self) {
        if self.recording {
            self.snapshots.push(self.tree.clone());
        }
    }

    fn create_file(&mut self, dir: Ino, name: String) -> io::Result<Ino> {
        let ino = self.tree.alloc(Node::File { durable: Vec::new(), current: Vec::new() });
        self.tree.entries_mut(dir)?.insert(name, ino);
        self.changed();
        Ok(ino)
    }
}

/// An in-memory [`Fs`] that tracks what is durable (see the module docs). Clones share
/// the same file system.
#[derive(Clone)]
pub(crate) struct SimFs {
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("SimFs")
            .field("inodes", &g.tree.inodes())
            .field("broken", &g.broken)
            .finish()
    }
}

impl SimFs {
    /// Opens `path` for writing (an `op` the fault plan may fail), creating it if there is
    /// none; a directory is `EISDIR`. How a write lands (appended or in place) is the
    /// caller's: `write_all` appends, `write_at` writes where it is told.
    fn open_or_create(&self, path: &Path, op: Op) -> io::Result<Box<dyn FsFile>> {
        let mut g = self.lock();
        g.check(op)?;
        let (dir, name) = g.tree.parent(path)?;
        let ino = match g.tree.entries(dir)?.get(&name).copied() {
            Some(ino) if g.tree.is_dir(ino) => return Err(errno(libc::EISDIR)),
            Some(ino) => ino,
            None => g.create_file(dir, name)?,
        };
        Ok(Box::new(SimFile { fs: self.clone(), ino }))
    }

    /// A file system holding `root` and its ancestors, all durable, and nothing else.
    pub(crate) fn new(root: &Path) -> SimFs {
        SimFs::from_tree(Tree::rooted_at(root))
    }

    /// A file system whose state is `tree` (for example a crash image).
    pub(crate) fn from_tree(tree: Tree) -> SimFs {
        SimFs {
            inner: Arc::new(Mutex::new(Inner {
                tree,
                armed: Vec::new(),
                calls: HashMap::new(),
                broken: None,
                recording: false,
                snapshots: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread cannot leave the tree half-updated: every change is one
        // map operation.
        crate::sync::lock(&self.inner)
    }

    /// Makes the `nth` next call (1-based) of `op` fail with `fault`, and the `times - 1`
    /// calls of `op` after it.
    pub(crate) fn fail(&self, op: Op, nth: u64, times: u64, fault: Fault) {
        self.lock().armed.push(Armed { op, skip: nth.saturating_sub(1), left: times, fault });
    }

    /// How many armed failures have not fired yet.
    pub(crate) fn faults_pending(&self) -> u64 {
        self.lock().armed.iter().map(|a| a.left).sum()
    }

    /// How many times `op` was called.
    pub(crate) fn calls(&self, op: Op) -> u64 {
        self.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// Turns a durability primitive into a no-op that reports success.
    pub(crate) fn break_durability(&self, broken: Broken) {
        self.lock().broken = Some(broken);
    }

    /// Starts or stops keeping a copy of the tree after every change.
    pub(crate) fn record(&self, on: bool) {
        self.lock().recording = on;
    }

    /// The copies kept since the last call.
    pub(crate) fn take_snapshots(&self) -> Vec<Tree> {
        std::mem::take(&mut self.lock().snapshots)
    }

    /// A copy of the tree as it is now.
    pub(crate) fn tree(&self) -> Tree {
        self.lock().tree.clone()
    }

    /// A new file system holding what a crash in `mode` would leave of this one now.
    pub(crate) fn crash(&self, mode: CrashMode) -> SimFs {
        SimFs::from_tree(self.tree().crash_image(mode))
    }
}

struct SimFile {
    fs: SimFs,
    ino: Ino,
}

impl FsFile for SimFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut g = self.fs.lock();
        let fault = g.check(Op::WriteAll);
        // A failing write is a short write first, as on a full disk.
        let n = if fault.is_err() { buf.len() / 2 } else { buf.len() };
        match g.tree.node_mut(self.ino)? {
            Node::File { current, .. } => current.extend_from_slice(&buf[..n]),
            Node::Dir { .. } => return Err(errno(libc::EISDIR)),
        }
        g.changed();
        fault
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut g = self.fs.lock();
        g.check(Op::SyncData)?;
        if g.broken == Some(Broken::SyncDataNoop) {
            return Ok(());
        }
        match g.tree.node_mut(self.ino)? {
            Node::File { durable, current } => durable.clone_from(current),
            Node::Dir { .. } => return Err(errno(libc::EISDIR)),
        }
        g.changed();
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.fs.lock();
        let fault = g.check(Op::WriteAt);
        // A failing write is a short write first, as on a failing or full disk.
        let n = if fault.is_err() { buf.len() / 2 } else { buf.len() };
        let at = usize::try_from(offset).map_err(|_| errno(libc::EFBIG))?;
        match g.tree.node_mut(self.ino)? {
            Node::File { current, .. } => {
                if current.len() < at + n {
                    // A write past the end leaves a hole, which reads as zeros.
                    current.resize(at + n, 0);
                }
                current[at..at + n].copy_from_slice(&buf[..n]);
            }
            Node::Dir { .. } => return Err(errno(libc::EISDIR)),
        }
        g.changed();
        fault
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut g = self.fs.lock();
        g.check(Op::SetLen)?;
        match g.tree.node_mut(self.ino)? {
            Node::File { current, .. } => current.resize(len as usize, 0),
            Node::Dir { .. } => return Err(errno(libc::EISDIR)),
        }
        g.changed();
        Ok(())
    }

    fn len(&mut self) -> io::Result<u64> {
        match self.fs.lock().tree.node_mut(self.ino)? {
            Node::File { current, .. } => Ok(current.len() as u64),
            Node::Dir { .. } => Err(errno(libc::EISDIR)),
        }
    }
}

impl Fs for SimFs {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let mut g = self.lock();
        g.check(Op::CreateNew)?;
        let (dir, name) = g.tree.parent(path)?;
        if g.tree.entries(dir)?.contains_key(&name) {
            return Err(errno(libc::EEXIST));
        }
        let ino = g.create_file(dir, name)?;
        Ok(Box::new(SimFile { fs: self.clone(), ino }))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        self.open_or_create(path, Op::OpenAppend)
    }

    fn open_in_place(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        self.open_or_create(path, Op::OpenInPlace)
    }

    fn read_head(&self, path: &Path, max: usize) -> io::Result<Option<Vec<u8>>> {
        Ok(self.read(path)?.map(|mut b| {
            b.truncate(max);
            b
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        let g = self.lock();
        match g.tree.lookup(path)? {
            None => Ok(None),
            Some(ino) => match g.tree.node(ino)? {
                Node::File { current, .. } => Ok(Some(current.clone())),
                Node::Dir { .. } => {
                    Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"))
                }
            },
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut g = self.lock();
        g.check(Op::Rename)?;
        let (from_dir, from_name) = g.tree.parent(from)?;
        let (to_dir, to_name) = g.tree.parent(to)?;
        let ino = *g.tree.entries(from_dir)?.get(&from_name).ok_or_else(|| errno(libc::ENOENT))?;
        if g.tree.is_dir(ino) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "SimFs does not rename directories",
            ));
        }
        if let Some(&target) = g.tree.entries(to_dir)?.get(&to_name) {
            if g.tree.is_dir(target) {
                return Err(errno(libc::EISDIR));
            }
            if target == ino {
                return Ok(());
            }
        }
        g.tree.entries_mut(from_dir)?.remove(&from_name);
        g.tree.entries_mut(to_dir)?.insert(to_name, ino);
        g.changed();
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<bool> {
        let mut g = self.lock();
        g.check(Op::RemoveFile)?;
        // Like unlink(2) through OsFs: a missing directory means a missing file.
        let (dir, name) = match g.tree.parent(path) {
            Ok(found) => found,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        match g.tree.entries(dir)?.get(&name).copied() {
            None => Ok(false),
            Some(ino) if g.tree.is_dir(ino) => Err(errno(libc::EISDIR)),
            Some(_) => {
                g.tree.entries_mut(dir)?.remove(&name);
                g.changed();
                Ok(true)
            }
        }
    }

    fn create_dir(&self, path: &Path) -> io::Result<bool> {
        let mut g = self.lock();
        g.check(Op::CreateDir)?;
        let (dir, name) = g.tree.parent(path)?;
        match g.tree.entries(dir)?.get(&name).copied() {
            Some(ino) if g.tree.is_dir(ino) => Ok(false),
            Some(_) => Err(errno(libc::EEXIST)),
            None => {
                let ino =
                    g.tree.alloc(Node::Dir { durable: BTreeMap::new(), current: BTreeMap::new() });
                g.tree.entries_mut(dir)?.insert(name, ino);
                g.changed();
                Ok(true)
            }
        }
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut g = self.lock();
        g.check(Op::SyncDir)?;
        let ino = g.tree.lookup(path)?.ok_or_else(|| errno(libc::ENOENT))?;
        if g.broken == Some(Broken::SyncDirNoop) {
            return Ok(());
        }
        match g.tree.node_mut(ino)? {
            Node::Dir { durable, current } => durable.clone_from(current),
            Node::File { .. } => return Err(errno(libc::ENOTDIR)),
        }
        g.changed();
        Ok(())
    }

    fn check_dir(&self, path: &Path) -> io::Result<()> {
        let g = self.lock();
        match g.tree.lookup(path)? {
            None => Err(errno(libc::ENOENT)),
            Some(ino) if g.tree.is_dir(ino) => Ok(()),
            Some(_) => Err(errno(libc::ENOTDIR)),
        }
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let g = self.lock();
        let Some(ino) = g.tree.lookup(path)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for (name, &child) in g.tree.entries(ino)? {
            let (is_dir, size) = match g.tree.node(child)? {
                Node::Dir { .. } => (true, 0),
                Node::File { current, .. } => (false, current.len() as u64),
            };
            out.push(DirEntry { name: name.clone(), is_dir, is_file: !is_dir, size });
        }
        Ok(out)
    }
}
