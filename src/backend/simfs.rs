//! A simulated file system for power-loss and fault-injection tests of the file backend,
//! and the tests that use it (issue 5, items 4 and 5).
//!
//! # The durability model of [`SimFs`]
//!
//! The simulated file system is a tree of inodes. Every inode has two versions of itself:
//! the *current* one, which every read and listing sees, and the *durable* one, which is
//! what stable storage holds.
//!
//! - A **file** has current and durable content. [`FsFile::write_all`] appends to the
//!   current content; [`FsFile::sync_data`] copies the current content to the durable one.
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
//!   unsynced data keeps its durable content, its current content, or its durable content
//!   followed by a prefix of the unsynced tail (a torn append). Letting the two halves of
//!   one rename disagree is more than a journaling file system does; a program that
//!   survives that survives the atomic rename too.
//!
//! Not modelled: file metadata other than size; hard links and directory renames (the
//! backend uses neither; renaming a directory is refused); overwrites in place (the
//! backend only creates and appends); an unsynced tail that comes back as zeros or
//! garbage rather than as a prefix; and the Linux behaviour after a failed fsync (pages
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
//! - Ignored tests pin library bugs found here (`cargo test --lib simfs -- --ignored`);
//!   each names the bug in its `ignore` reason.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex, MutexGuard};

use super::fs::{DirEntry, Fs, FsFile};

type Ino = u64;
const ROOT: Ino = 0;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    File { durable: Vec<u8>, current: Vec<u8> },
    Dir { durable: BTreeMap<String, Ino>, current: BTreeMap<String, Ino> },
}

/// The file operations that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Op {
    CreateNew,
    OpenAppend,
    WriteAll,
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

/// What a crash keeps of the unsynced state (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CrashMode {
    /// A power loss that keeps only what was synced.
    Durable,
    /// A process crash: the tree is kept as it is, synced or not.
    ProcessKill,
    /// A power loss that keeps a random part of the unsynced state, from this seed.
    Random(u64),
}

/// A small deterministic generator (SplitMix64), so every crash image can be rebuilt
/// from its seed.
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The normal components of an absolute path; anything else is refused.
fn components(path: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(s) => out.push(s.to_str().ok_or_else(|| errno(libc::EINVAL))?.to_owned()),
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "SimFs takes absolute, normalized paths")),
        }
    }
    if !path.is_absolute() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "SimFs takes absolute paths"));
    }
    Ok(out)
}

/// A file system tree: a snapshot of a [`SimFs`], and the input of a crash image.
#[derive(Clone, Debug)]
pub(crate) struct Tree {
    nodes: HashMap<Ino, Node>,
    next: Ino,
}

impl Tree {
    fn empty() -> Tree {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::Dir { durable: BTreeMap::new(), current: BTreeMap::new() });
        Tree { nodes, next: ROOT + 1 }
    }

    fn alloc(&mut self, node: Node) -> Ino {
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, node);
        ino
    }

    fn node(&self, ino: Ino) -> io::Result<&Node> {
        self.nodes.get(&ino).ok_or_else(|| errno(libc::ESTALE))
    }

    fn node_mut(&mut self, ino: Ino) -> io::Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or_else(|| errno(libc::ESTALE))
    }

    /// The current entries of a directory.
    fn entries(&self, ino: Ino) -> io::Result<&BTreeMap<String, Ino>> {
        match self.node(ino)? {
            Node::Dir { current, .. } => Ok(current),
            Node::File { .. } => Err(errno(libc::ENOTDIR)),
        }
    }

    fn entries_mut(&mut self, ino: Ino) -> io::Result<&mut BTreeMap<String, Ino>> {
        match self.node_mut(ino)? {
            Node::Dir { current, .. } => Ok(current),
            Node::File { .. } => Err(errno(libc::ENOTDIR)),
        }
    }

    fn is_dir(&self, ino: Ino) -> bool {
        matches!(self.nodes.get(&ino), Some(Node::Dir { .. }))
    }

    /// Follows `comps` from the root through current (or durable) entries.
    fn walk(&self, comps: &[String], durable: bool) -> io::Result<Option<Ino>> {
        let mut ino = ROOT;
        for c in comps {
            let entries = match self.node(ino)? {
                Node::Dir { durable: d, current: cur } => {
                    if durable {
                        d
                    } else {
                        cur
                    }
                }
                Node::File { .. } => return Err(errno(libc::ENOTDIR)),
            };
            match entries.get(c) {
                Some(&i) => ino = i,
                None => return Ok(None),
            }
        }
        Ok(Some(ino))
    }

    fn lookup(&self, path: &Path) -> io::Result<Option<Ino>> {
        self.walk(&components(path)?, false)
    }

    /// The directory that holds `path` (which must exist) and the last component.
    fn parent(&self, path: &Path) -> io::Result<(Ino, String)> {
        let mut comps = components(path)?;
        let name = comps.pop().ok_or_else(|| errno(libc::EINVAL))?;
        let dir = self.walk(&comps, false)?.ok_or_else(|| errno(libc::ENOENT))?;
        self.entries(dir)?;
        Ok((dir, name))
    }

    /// Whether `path` exists in the current tree, and whether it exists durably.
    pub(crate) fn exists(&self, path: &Path) -> (bool, bool) {
        let Ok(comps) = components(path) else { return (false, false) };
        let current = matches!(self.walk(&comps, false), Ok(Some(_)));
        let durable = matches!(self.walk(&comps, true), Ok(Some(_)));
        (current, durable)
    }

    /// Every path of the current (or durable) tree, depth first, sorted, with its node.
    fn visit(&self, durable: bool, mut f: impl FnMut(&str, &Node)) {
        let mut stack = vec![(String::new(), ROOT)];
        while let Some((path, ino)) = stack.pop() {
            let Some(node) = self.nodes.get(&ino) else { continue };
            if ino != ROOT {
                f(&path, node);
            }
            if let Node::Dir { durable: d, current } = node {
                for (name, &child) in (if durable { d } else { current }).iter().rev() {
                    stack.push((format!("{path}/{name}"), child));
                }
            }
        }
    }

    /// A canonical encoding of the current and the durable tree: two trees with the same
    /// fingerprint look the same to every read and listing, and to every later crash.
    pub(crate) fn fingerprint(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for durable in [false, true] {
            out.extend_from_slice(if durable { b"\0durable\0" } else { b"\0current\0" });
            self.visit(durable, |path, node| {
                out.extend_from_slice(path.as_bytes());
                match node {
                    Node::Dir { .. } => out.extend_from_slice(b"\0d\0"),
                    Node::File { durable: d, current } => {
                        let content = if durable { d } else { current };
                        out.extend_from_slice(format!("\0f{}\0", content.len()).as_bytes());
                        out.extend_from_slice(content);
                    }
                }
            });
        }
        out
    }

    /// The paths of staged files (names containing `.tmp-`) in the current tree.
    pub(crate) fn staged_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit(false, |path, node| {
            let name = path.rsplit('/').next().unwrap_or(path);
            if matches!(node, Node::File { .. }) && name.contains(".tmp-") {
                out.push(path.to_owned());
            }
        });
        out
    }

    /// The tree a crash in `mode` leaves. After a power loss that is only what is reachable
    /// from the root through the kept entries, every kept version now both current and
    /// durable; after a process kill it is the tree as it is.
    pub(crate) fn crash_image(&self, mode: CrashMode) -> Tree {
        if mode == CrashMode::ProcessKill {
            return self.clone();
        }
        let mut rng = SplitMix(match mode {
            CrashMode::Random(seed) => seed,
            _ => 0,
        });
        let mut out = Tree { nodes: HashMap::new(), next: self.next };
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            // An inode reached twice (both halves of a rename kept) is decided once.
            if out.nodes.contains_key(&ino) {
                continue;
            }
            let Some(node) = self.nodes.get(&ino) else { continue };
            let kept = match node {
                Node::Dir { durable, current } => {
                    let entries = match mode {
                        CrashMode::Durable => durable.clone(),
                        CrashMode::ProcessKill => current.clone(),
                        CrashMode::Random(_) => {
                            let mut kept = durable.clone();
                            let names: BTreeSet<&String> = durable.keys().chain(current.keys()).collect();
                            for name in names {
                                let now = current.get(name);
                                if durable.get(name) != now && rng.coin() {
                                    match now {
                                        Some(&child) => kept.insert(name.clone(), child),
                                        None => kept.remove(name),
                                    };
                                }
                            }
                            kept
                        }
                    };
                    stack.extend(entries.values().rev().copied());
                    Node::Dir { durable: entries.clone(), current: entries }
                }
                Node::File { durable, current } => {
                    let content = match mode {
                        CrashMode::Durable => durable.clone(),
                        CrashMode::ProcessKill => current.clone(),
                        CrashMode::Random(_) => torn(durable, current, &mut rng),
                    };
                    Node::File { durable: content.clone(), current: content }
                }
            };
            out.nodes.insert(ino, kept);
        }
        out
    }
}

/// What a power loss leaves of a file with unsynced data: the durable content, the current
/// content, or the durable content and a prefix of the unsynced tail.
fn torn(durable: &[u8], current: &[u8], rng: &mut SplitMix) -> Vec<u8> {
    if durable == current {
        return durable.to_vec();
    }
    match rng.below(3) {
        0 => durable.to_vec(),
        1 => current.to_vec(),
        _ if current.starts_with(durable) => {
            let tail = (current.len() - durable.len()) as u64;
            current[..durable.len() + rng.below(tail + 1) as usize].to_vec()
        }
        // Not an append (the backend never rewrites in place): keep either version.
        _ => durable.to_vec(),
    }
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
        f.debug_struct("SimFs").field("inodes", &g.tree.nodes.len()).field("broken", &g.broken).finish()
    }
}

impl SimFs {
    /// A file system holding `root` and its ancestors, all durable, and nothing else.
    pub(crate) fn new(root: &Path) -> SimFs {
        let mut tree = Tree::empty();
        let mut dir = ROOT;
        for name in components(root).unwrap_or_default() {
            let child = tree.alloc(Node::Dir { durable: BTreeMap::new(), current: BTreeMap::new() });
            if let Some(Node::Dir { durable, current }) = tree.nodes.get_mut(&dir) {
                durable.insert(name.clone(), child);
                current.insert(name, child);
            }
            dir = child;
        }
        SimFs::from_tree(tree)
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
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut g = self.lock();
        g.check(Op::OpenAppend)?;
        let (dir, name) = g.tree.parent(path)?;
        let ino = match g.tree.entries(dir)?.get(&name).copied() {
            Some(ino) if g.tree.is_dir(ino) => return Err(errno(libc::EISDIR)),
            Some(ino) => ino,
            None => g.create_file(dir, name)?,
        };
        Ok(Box::new(SimFile { fs: self.clone(), ino }))
    }

    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        let g = self.lock();
        match g.tree.lookup(path)? {
            None => Ok(None),
            Some(ino) => match g.tree.node(ino)? {
                Node::File { current, .. } => Ok(Some(current.clone())),
                Node::Dir { .. } => Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file")),
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
            return Err(io::Error::new(io::ErrorKind::Unsupported, "SimFs does not rename directories"));
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
                let ino = g.tree.alloc(Node::Dir { durable: BTreeMap::new(), current: BTreeMap::new() });
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::path::PathBuf;

    use serde_json::{Value, json};

    use super::*;
    use crate::backend::FileStorageBackend;
    use crate::error::{ErrorKind, StateError};
    use crate::manager::StateManager;
    use crate::store::index::Index;
    use crate::types::CheckpointId;

    /// A simulated file system and the store root in it. The root is a real (empty)
    /// directory too, because `FileStorageBackend::with_fs` checks `root.exists()` and
    /// would otherwise create it with `std::fs`, outside the seam.
    struct Bed {
        _dir: tempfile::TempDir,
        root: PathBuf,
        fs: SimFs,
    }

    impl Bed {
        fn new() -> Bed {
            let dir = tempfile::Builder::new().prefix("simfs-root").tempdir().unwrap();
            let root = dir.path().to_path_buf();
            let fs = SimFs::new(&root);
            Bed { _dir: dir, root, fs }
        }
    }

    /// A manager over `fs` writing records directly (the fault tests below count the
    /// calls of that protocol).
    async fn open(fs: &SimFs, root: &Path, gzip: bool) -> crate::Result<StateManager> {
        open_mode(fs, root, gzip, false).await
    }

    /// A manager over `fs`, with or without the write-ahead log.
    async fn open_mode(fs: &SimFs, root: &Path, gzip: bool, log: bool) -> crate::Result<StateManager> {
        let backend = FileStorageBackend::with_fs(root, Arc::new(fs.clone()), log)?;
        let builder = StateManager::builder(backend);
        let builder = if gzip { builder.compression(6) } else { builder };
        builder.start().await
    }

    /// Loads `sid` through a fresh manager over `fs` (session actors cache what they saved).
    async fn load_fresh(fs: &SimFs, root: &Path, sid: &str) -> Option<Value> {
        let m = open(fs, root, false).await.unwrap();
        let v = m.load_session(sid).await.unwrap();
        m.shutdown().await.unwrap();
        v
    }

    fn payload(sid: &str, seq: u64) -> Value {
        json!({"sid": sid, "seq": seq, "pad": "x".repeat((seq * 37 % 151) as usize)})
    }

    fn seq_of(v: Option<&Value>) -> Option<u64> {
        v.and_then(|v| v["seq"].as_u64())
    }

    // ---------------------------------------------------------------------------------
    // The power-loss oracle
    // ---------------------------------------------------------------------------------

    const SIDS: [&str; 3] = ["s0", "s1", "s2"];

    #[derive(Clone, Copy, Debug)]
    enum Step {
        Save(&'static str),
        Update(&'static str),
        Checkpoint(&'static str),
        Delete(&'static str),
        /// Roll back to the session's newest live checkpoint.
        Rollback(&'static str),
        Cleanup(&'static str, usize),
    }

    /// Every kind of write, sessions re-created after a delete, checkpoints of deleted
    /// sessions, a rollback and a cleanup.
    const WORKLOAD: [Step; 19] = [
        Step::Save("s0"),
        Step::Save("s1"),
        Step::Checkpoint("s0"),
        Step::Save("s0"),
        Step::Update("s1"),
        Step::Checkpoint("s1"),
        Step::Checkpoint("s0"),
        Step::Save("s2"),
        Step::Delete("s1"),
        Step::Save("s0"),
        Step::Checkpoint("s2"),
        Step::Rollback("s0"),
        Step::Update("s1"),
        Step::Checkpoint("s1"),
        Step::Cleanup("s0", 1),
        Step::Save("s2"),
        Step::Delete("s2"),
        Step::Checkpoint("s2"),
        Step::Update("s0"),
    ];

    #[derive(Clone, Debug)]
    struct Cp {
        sid: String,
        data: Value,
        live: bool,
    }

    /// What has been acknowledged.
    #[derive(Clone, Debug, Default)]
    struct Model {
        sessions: BTreeMap<String, Value>,
        cps: BTreeMap<CheckpointId, Cp>,
    }

    /// The operation under way at a crash point: its effect may or may not be present.
    #[derive(Clone, Debug)]
    enum InFlight {
        Idle,
        Write { sid: String, new: Value },
        Checkpoint { sid: String, data: Value },
        Delete { sid: String },
        Cleanup { sid: String, doomed: BTreeSet<CheckpointId> },
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Class {
        /// An older (or foreign) version where the acknowledged one was expected.
        Lost,
        /// Acknowledged data absent.
        Missing,
        /// A load or restore reported damage.
        Corrupt,
        /// Deleted data came back.
        Resurrected,
        /// Listing and restoring checkpoints disagree.
        Inconsistent,
        /// A staged file survived recovery.
        Leftover,
        /// Recovery left a journal that the next start cannot replay.
        Journal,
        Other,
    }

    fn class_of(e: &StateError) -> Class {
        if e.kind() == ErrorKind::Corrupt { Class::Corrupt } else { Class::Other }
    }

    #[derive(Debug, Default)]
    struct Report {
        /// Crash points: every change of the file system, and every acknowledgement.
        points: usize,
        /// Distinct crash images recovered and checked.
        states: usize,
        /// Of those, process-kill images recovered, written to, then power-lost again.
        second_crashes: usize,
        fsyncs: u64,
        violations: BTreeMap<Class, usize>,
        examples: Vec<String>,
    }

    impl Report {
        fn add(&mut self, class: Class, what: String) {
            *self.violations.entry(class).or_default() += 1;
            if self.examples.len() < 8 {
                self.examples.push(format!("{class:?}: {what}"));
            }
        }
        fn failures(&self) -> usize {
            self.violations.values().sum()
        }
        /// Lost, corrupt or missing data: what the oracle exists to find.
        fn data_failures(&self) -> usize {
            self.count(Class::Lost) + self.count(Class::Corrupt) + self.count(Class::Missing)
        }
        fn count(&self, class: Class) -> usize {
            self.violations.get(&class).copied().unwrap_or(0)
        }
    }

    fn plan(step: Step, model: &Model, seq: u64) -> InFlight {
        let live = |sid: &str| -> Vec<CheckpointId> {
            model.cps.iter().filter(|(_, c)| c.sid == sid && c.live).map(|(id, _)| id.clone()).collect()
        };
        match step {
            Step::Save(s) | Step::Update(s) => InFlight::Write { sid: s.into(), new: payload(s, seq) },
            Step::Rollback(s) => {
                let newest = live(s).pop().unwrap();
                InFlight::Write { sid: s.into(), new: model.cps[&newest].data.clone() }
            }
            Step::Checkpoint(s) => InFlight::Checkpoint { sid: s.into(), data: payload(s, seq) },
            Step::Delete(s) => InFlight::Delete { sid: s.into() },
            Step::Cleanup(s, keep) => {
                let ids = live(s);
                let n = ids.len().saturating_sub(keep);
                InFlight::Cleanup { sid: s.into(), doomed: ids.into_iter().take(n).collect() }
            }
        }
    }

    /// Runs `step` and checks its reply; returns the new checkpoint's id, if any.
    async fn perform(m: &StateManager, step: Step, model: &Model, planned: &InFlight) -> Option<CheckpointId> {
        match (step, planned) {
            (Step::Save(s), InFlight::Write { new, .. }) => m.save_session(s, new).await.unwrap(),
            (Step::Update(s), InFlight::Write { new, .. }) => {
                let (expected, new) = (model.sessions.get(s).cloned(), new.clone());
                let out = m
                    .transactional_update(s, move |old: Option<Value>| {
                        if old == expected { Ok(new) } else { Err(io::Error::other("update saw a stale state")) }
                    })
                    .await
                    .unwrap();
                assert_eq!(Some(&out), planned_value(planned));
            }
            (Step::Rollback(s), InFlight::Write { .. }) => {
                let newest = model.cps.iter().filter(|(_, c)| c.sid == s && c.live).map(|(id, _)| id).next_back();
                m.rollback_to_checkpoint(newest.unwrap()).await.unwrap();
            }
            (Step::Checkpoint(s), InFlight::Checkpoint { data, .. }) => {
                return Some(m.create_checkpoint(s, "main", data).await.unwrap());
            }
            (Step::Delete(s), InFlight::Delete { .. }) => {
                let existed = model.sessions.contains_key(s) || model.cps.values().any(|c| c.sid == s && c.live);
                assert_eq!(m.delete_session(s).await.unwrap(), existed);
            }
            (Step::Cleanup(s, keep), InFlight::Cleanup { doomed, .. }) => {
                assert_eq!(m.cleanup_checkpoints(s, keep).await.unwrap(), doomed.len());
            }
            (step, planned) => panic!("step {step:?} planned as {planned:?}"),
        }
        None
    }

    fn planned_value(planned: &InFlight) -> Option<&Value> {
        match planned {
            InFlight::Write { new, .. } => Some(new),
            _ => None,
        }
    }

    fn apply(model: &mut Model, done: InFlight, cid: Option<CheckpointId>) {
        match done {
            InFlight::Idle => {}
            InFlight::Write { sid, new } => {
                model.sessions.insert(sid, new);
            }
            InFlight::Checkpoint { sid, data } => {
                model.cps.insert(cid.unwrap(), Cp { sid, data, live: true });
            }
            InFlight::Delete { sid } => {
                model.sessions.remove(&sid);
                model.cps.values_mut().filter(|c| c.sid == sid).for_each(|c| c.live = false);
            }
            InFlight::Cleanup { doomed, .. } => {
                for id in doomed {
                    if let Some(c) = model.cps.get_mut(&id) {
                        c.live = false;
                    }
                }
            }
        }
    }

    /// Checks what a recovered manager shows against what was acknowledged (`model`) and
    /// the operation that was under way (`inflight`).
    async fn verify(m: &StateManager, model: &Model, inflight: &InFlight, out: &mut Vec<(Class, String)>) {
        let mut with_data = BTreeSet::new();
        for sid in SIDS {
            let expected = model.sessions.get(sid);
            let alternative = match inflight {
                InFlight::Write { sid: s, new } if s == sid => Some(Some(new)),
                InFlight::Delete { sid: s } if s == sid => Some(None),
                _ => None,
            };
            match m.load_session(sid).await {
                Ok(got) => {
                    if got.is_some() {
                        with_data.insert(sid);
                    }
                    if got.as_ref() != expected && alternative != Some(got.as_ref()) {
                        let class = match (&got, expected) {
                            (None, Some(_)) => Class::Missing,
                            (Some(_), None) => Class::Resurrected,
                            _ => Class::Lost,
                        };
                        let what = format!(
                            "session {sid}: acked seq {:?}, in flight {:?}, found seq {:?}",
                            seq_of(expected),
                            alternative.map(seq_of),
                            seq_of(got.as_ref())
                        );
                        out.push((class, what));
                    }
                }
                Err(e) => out.push((class_of(&e), format!("load_session({sid}): {e}"))),
            }

            let listed = match m.list_checkpoints(sid).await {
                Ok(l) => l,
                Err(e) => {
                    out.push((class_of(&e), format!("list_checkpoints({sid}): {e}")));
                    continue;
                }
            };
            if !listed.is_empty() {
                with_data.insert(sid);
            }
            let listed_ids: BTreeSet<CheckpointId> = listed.iter().map(|c| c.id.clone()).collect();
            let mut unknown = 0;
            for info in &listed {
                let want = match (model.cps.get(&info.id), inflight) {
                    (Some(cp), _) if cp.sid == sid => Some(&cp.data),
                    (None, InFlight::Checkpoint { sid: s, data }) if s == sid => {
                        unknown += 1;
                        Some(data)
                    }
                    _ => None,
                };
                match m.restore_checkpoint(&info.id).await {
                    Ok(Some(cp)) if want == Some(&cp.data) && cp.session_id.as_str() == sid => {}
                    Ok(Some(cp)) => out.push((
                        Class::Lost,
                        format!("checkpoint {} of {sid} holds seq {:?}", info.id.as_str(), seq_of(Some(&cp.data))),
                    )),
                    Ok(None) => out.push((
                        Class::Inconsistent,
                        format!("checkpoint {} of {sid} is listed but does not restore", info.id.as_str()),
                    )),
                    Err(e) => out.push((class_of(&e), format!("restore_checkpoint({}): {e}", info.id.as_str()))),
                }
            }
            if unknown > 1 {
                out.push((Class::Inconsistent, format!("{unknown} unknown checkpoints of {sid}")));
            }
            for (id, cp) in model.cps.iter().filter(|(_, c)| c.sid == sid) {
                let may_be_gone = match inflight {
                    InFlight::Delete { sid: s } => s == sid,
                    InFlight::Cleanup { sid: s, doomed } => s == sid && doomed.contains(id),
                    _ => false,
                };
                if listed_ids.contains(id) {
                    if !cp.live {
                        out.push((Class::Resurrected, format!("deleted checkpoint {} of {sid} listed", id.as_str())));
                    }
                    continue;
                }
                match m.restore_checkpoint(id).await {
                    Ok(None) => {}
                    Ok(Some(_)) => out.push((
                        Class::Inconsistent,
                        format!("checkpoint {} of {sid} restores but is not listed", id.as_str()),
                    )),
                    Err(e) => out.push((class_of(&e), format!("restore_checkpoint({}): {e}", id.as_str()))),
                }
                if cp.live && !may_be_gone {
                    out.push((Class::Missing, format!("acked checkpoint {} of {sid} missing", id.as_str())));
                }
            }
        }
        match m.list_sessions().await {
            Ok(list) => {
                let listed: BTreeSet<&str> =
                    list.iter().map(|s| s.session_id.as_str()).filter(|s| *s != PROBE).collect();
                if listed != with_data {
                    out.push((Class::Inconsistent, format!("list_sessions {listed:?} but data for {with_data:?}")));
                }
            }
            Err(e) => out.push((class_of(&e), format!("list_sessions: {e}"))),
        }
    }

    /// A session the checks write after recovery, to see that the store takes writes.
    const PROBE: &str = "probe";

    /// What one check needs to know: the run's settings, the acknowledged writes and the
    /// operation under way.
    struct Ctx<'a> {
        oracle: &'a Oracle,
        root: &'a Path,
        model: &'a Model,
        inflight: &'a InFlight,
    }

    /// Recovers a crash image, checks it, writes to it; and with `second_crash`, loses
    /// power after that and checks again, the writes made after recovery included.
    async fn recover_and_check(image: &SimFs, ctx: &Ctx<'_>, second_crash: bool, out: &mut Vec<(Class, String)>) {
        let Ctx { oracle, root, model, inflight } = *ctx;
        let m = match open_mode(image, root, oracle.gzip, oracle.log).await {
            Ok(m) => m,
            Err(e) => return out.push((class_of(&e), format!("recovery failed: {e}"))),
        };
        verify(&m, model, inflight, out).await;
        // The recovered store takes new writes: a session, and a checkpoint per session.
        let probe = json!({"probe": true});
        if let Err(e) = m.save_session(PROBE, &probe).await {
            out.push((Class::Other, format!("save after recovery: {e}")));
        }
        let mut after = model.clone();
        if second_crash {
            for sid in SIDS {
                let data = json!({"probe": sid});
                match m.create_checkpoint(sid, "probe", &data).await {
                    Ok(id) => {
                        after.cps.insert(id, Cp { sid: sid.into(), data, live: true });
                    }
                    Err(e) => out.push((Class::Other, format!("checkpoint after recovery: {e}"))),
                }
            }
        }
        m.shutdown().await.unwrap();
        let staged = image.tree().staged_files();
        if !staged.is_empty() {
            out.push((Class::Leftover, format!("staged files after recovery: {staged:?}")));
        }
        match image.read(&root.join("metadata/index.log")) {
            Ok(Some(journal)) if Index::replay(&journal).is_none() => {
                out.push((Class::Journal, "the journal left by recovery does not replay".into()))
            }
            Ok(_) => {}
            Err(e) => out.push((Class::Other, format!("reading the journal: {e}"))),
        }
        if !second_crash {
            return;
        }
        let again = image.crash(CrashMode::Durable);
        let m = match open_mode(&again, root, oracle.gzip, oracle.log).await {
            Ok(m) => m,
            Err(e) => return out.push((class_of(&e), format!("second recovery failed: {e}"))),
        };
        let mut second = Vec::new();
        verify(&m, &after, inflight, &mut second).await;
        match m.load_session(PROBE).await {
            Ok(Some(v)) if v == probe => {}
            Ok(v) => second.push((Class::Missing, format!("probe session after recovery: {v:?}"))),
            Err(e) => second.push((class_of(&e), format!("load_session(probe): {e}"))),
        }
        m.shutdown().await.unwrap();
        out.extend(second.into_iter().map(|(c, w)| (c, format!("after a second crash: {w}"))));
    }

    struct Oracle {
        gzip: bool,
        /// Writes through the write-ahead log.
        log: bool,
        broken: Option<Broken>,
        /// Random "some unsynced kept" images per crash point, besides the durable-only
        /// and process-kill ones.
        variants: u64,
        /// After recovering a process-kill image, write, lose power, and check again.
        second_crash: bool,
        stop_at_first_loss: bool,
    }

    const SEED: u64 = 0x6d61_7273_2d73_696d;

    /// Builds the crash images of one crash point and checks each distinct one.
    async fn check_point(tree: &Tree, point: u64, ctx: &Ctx<'_>, seen: &mut HashSet<Vec<u8>>, report: &mut Report) {
        report.points += 1;
        let mut rng = SplitMix(SEED ^ point.wrapping_mul(0x9E37_79B9));
        let modes = [CrashMode::Durable, CrashMode::ProcessKill]
            .into_iter()
            .chain((0..ctx.oracle.variants).map(|_| CrashMode::Random(rng.next())));
        for mode in modes {
            let image = tree.crash_image(mode);
            if !seen.insert(image.fingerprint()) {
                continue;
            }
            report.states += 1;
            let second_crash = ctx.oracle.second_crash && mode == CrashMode::ProcessKill;
            report.second_crashes += usize::from(second_crash);
            let mut found = Vec::new();
            recover_and_check(&SimFs::from_tree(image), ctx, second_crash, &mut found).await;
            for (class, what) in found {
                report.add(class, format!("{what} (crash point {point}, {mode:?})"));
            }
            if ctx.oracle.stop_at_first_loss && report.data_failures() > 0 {
                return;
            }
        }
    }

    /// Runs [`WORKLOAD`]; at every change of the file system inside each operation, and
    /// after each acknowledgement, builds the crash images and checks them.
    async fn run_oracle(oracle: Oracle) -> Report {
        let bed = Bed::new();
        let m = open_mode(&bed.fs, &bed.root, oracle.gzip, oracle.log).await.unwrap();
        // Broken only now: the store's layout is durable, so what the oracle catches is
        // a save that a broken primitive fails to make durable.
        if let Some(b) = oracle.broken {
            bed.fs.break_durability(b);
        }
        bed.fs.record(true);
        let mut model = Model::default();
        let mut report = Report::default();
        let mut point = 0;
        let stop = |r: &Report| oracle.stop_at_first_loss && r.data_failures() > 0;
        for (seq, step) in (1..).zip(WORKLOAD) {
            let inflight = plan(step, &model, seq);
            let cid = perform(&m, step, &model, &inflight).await;
            let ctx = Ctx { oracle: &oracle, root: &bed.root, model: &model, inflight: &inflight };
            let mut seen = HashSet::new();
            for tree in bed.fs.take_snapshots() {
                point += 1;
                check_point(&tree, point, &ctx, &mut seen, &mut report).await;
                if stop(&report) {
                    return report;
                }
            }
            apply(&mut model, inflight, cid);
            point += 1;
            let ctx = Ctx { oracle: &oracle, root: &bed.root, model: &model, inflight: &InFlight::Idle };
            check_point(&bed.fs.tree(), point, &ctx, &mut HashSet::new(), &mut report).await;
            if stop(&report) {
                return report;
            }
        }
        report.fsyncs = bed.fs.calls(Op::SyncData) + bed.fs.calls(Op::SyncDir);
        m.shutdown().await.unwrap();
        report
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn power_loss_at_every_step_loses_no_acknowledged_write() {
        for (gzip, log) in [(false, false), (true, false), (false, true), (true, true)] {
            let oracle =
                Oracle { gzip, log, broken: None, variants: 12, second_crash: false, stop_at_first_loss: false };
            let report = run_oracle(oracle).await;
            println!(
                "power-loss oracle (gzip: {gzip}, log: {log}): {} steps ({} fsyncs), {} crash points, {} distinct \
                 crash states recovered and checked; lost {} / corrupt {} / missing {}; all violations {:?}",
                WORKLOAD.len(),
                report.fsyncs,
                report.points,
                report.states,
                report.count(Class::Lost),
                report.count(Class::Corrupt),
                report.count(Class::Missing),
                report.violations
            );
            assert_eq!(report.failures(), 0, "gzip {gzip}, log {log}: {:#?}", report.examples);
            assert!(report.states > 200, "too few crash states: {}", report.states);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn power_loss_after_a_process_crash_and_restart_loses_no_acknowledged_write() {
        for log in [false, true] {
            let oracle =
                Oracle { gzip: false, log, broken: None, variants: 0, second_crash: true, stop_at_first_loss: false };
            let report = run_oracle(oracle).await;
            println!(
                "process crash, restart, writes, power loss (log: {log}): {} crash points, {} restarts then power \
                 losses; violations {:?}; examples {:#?}",
                report.points, report.second_crashes, report.violations, report.examples
            );
            assert_eq!(report.failures(), 0, "log {log}: {:#?}", report.examples);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_oracle_catches_a_missing_file_fsync_and_a_missing_directory_fsync() {
        // With the log, a save syncs only the log's data (its directory once, when the log
        // is created): a no-op data sync is what must be caught there.
        for (broken, log) in [(Broken::SyncDataNoop, false), (Broken::SyncDirNoop, false), (Broken::SyncDataNoop, true)]
        {
            let oracle = Oracle {
                gzip: false,
                log,
                broken: Some(broken),
                variants: 2,
                second_crash: false,
                stop_at_first_loss: true,
            };
            let report = run_oracle(oracle).await;
            println!(
                "broken variant {broken:?} (log: {log}): caught after {} crash states: {:?}",
                report.states, report.examples
            );
            assert!(report.data_failures() > 0, "the oracle did not notice {broken:?} (log: {log}): {report:?}");
        }
    }

    /// A torn last journal line is allowed (the journal is never fsynced), and replay skips
    /// it; but recovery compacts the journal only if the records disagree with the index.
    /// When they agree (the torn line was a save of a same-sized state, or a delete that
    /// recovery itself finishes), the torn bytes stay, the next append is glued to them,
    /// and the start after that finds a damaged journal and re-reads every record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovery_terminates_a_torn_journal_tail() {
        let bed = Bed::new();
        let m = open(&bed.fs, &bed.root, false).await.unwrap();
        m.save_session("f", &json!({"n": 1})).await.unwrap();
        m.save_session("f", &json!({"n": 2})).await.unwrap();
        m.shutdown().await.unwrap();
        // Tear the last line, as a power loss may.
        let path = bed.root.join("metadata/index.log");
        let journal = bed.fs.read(&path).unwrap().unwrap();
        assert!(bed.fs.remove_file(&path).unwrap());
        bed.fs.create_new(&path).unwrap().write_all(&journal[..journal.len() - 10]).unwrap();

        let m = open(&bed.fs, &bed.root, false).await.unwrap();
        assert_eq!(m.load_session("f").await.unwrap(), Some(json!({"n": 2})));
        m.save_session("f", &json!({"n": 3})).await.unwrap();
        m.shutdown().await.unwrap();
        let journal = bed.fs.read(&path).unwrap().unwrap();
        assert!(Index::replay(&journal).is_some(), "damaged journal:\n{}", String::from_utf8_lossy(&journal));
    }

    // ---------------------------------------------------------------------------------
    // Fault points
    // ---------------------------------------------------------------------------------

    /// The steps of a direct save, in the order `put_blocking` takes them.
    const SAVE_POINTS: [Op; 5] = [Op::CreateNew, Op::WriteAll, Op::SyncData, Op::Rename, Op::SyncDir];

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_fault_point_of_a_save_fails_cleanly() {
        let mut cases = 0;
        for op in SAVE_POINTS {
            for fault in [Fault::Eio, Fault::Enospc] {
                let case = format!("{op:?}/{fault:?}");
                let bed = Bed::new();
                let (v1, v2, v3) = (payload("f", 1), payload("f", 2), payload("f", 3));
                let m = open(&bed.fs, &bed.root, false).await.unwrap();
                m.save_session("f", &v1).await.unwrap();
                // On ENOSPC the store cleans up and retries once: fail both attempts.
                let (times, kind) = match fault {
                    Fault::Eio => (1, ErrorKind::Io),
                    Fault::Enospc => (2, ErrorKind::StorageFull),
                };
                bed.fs.fail(op, 1, times, fault);
                let err = m.save_session("f", &v2).await.expect_err(&case);
                assert_eq!(err.kind(), kind, "{case}: {err}");
                assert_eq!(bed.fs.faults_pending(), 0, "{case}: the fault did not fire");
                // A power loss now leaves the previous version.
                assert_eq!(load_fresh(&bed.fs.crash(CrashMode::Durable), &bed.root, "f").await, Some(v1.clone()));
                m.shutdown().await.unwrap();

                let m = open(&bed.fs, &bed.root, false).await.unwrap();
                let got = m.load_session("f").await.unwrap();
                if op == Op::SyncDir {
                    // The rename had happened when the directory fsync failed: the new
                    // version is visible (and not durable). See the report: the put
                    // contract says "after Err the old value is intact".
                    assert!(got == Some(v1.clone()) || got == Some(v2.clone()), "{case}: {got:?}");
                } else {
                    assert_eq!(got, Some(v1.clone()), "{case}");
                }
                assert_eq!(bed.fs.tree().staged_files(), Vec::<String>::new(), "{case}");
                m.save_session("f", &v3).await.unwrap();
                assert_eq!(m.load_session("f").await.unwrap(), Some(v3.clone()), "{case}");
                m.shutdown().await.unwrap();
                assert_eq!(load_fresh(&bed.fs, &bed.root, "f").await, Some(v3.clone()), "{case}");
                assert_eq!(load_fresh(&bed.fs.crash(CrashMode::Durable), &bed.root, "f").await, Some(v3), "{case}");
                cases += 1;
            }
        }
        println!("save fault points: {cases} cases (5 points x EIO, ENOSPC twice) failed cleanly");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_enospc_is_absorbed_by_the_retry() {
        for op in SAVE_POINTS {
            let bed = Bed::new();
            let m = open(&bed.fs, &bed.root, false).await.unwrap();
            m.save_session("f", &payload("f", 1)).await.unwrap();
            bed.fs.fail(op, 1, 1, Fault::Enospc);
            m.save_session("f", &payload("f", 2)).await.unwrap_or_else(|e| panic!("{op:?}: {e}"));
            assert_eq!(bed.fs.faults_pending(), 0, "{op:?}: the fault did not fire");
            m.shutdown().await.unwrap();
            assert_eq!(load_fresh(&bed.fs, &bed.root, "f").await, Some(payload("f", 2)), "{op:?}");
            let image = bed.fs.crash(CrashMode::Durable);
            assert_eq!(load_fresh(&image, &bed.root, "f").await, Some(payload("f", 2)), "{op:?}");
            assert_eq!(bed.fs.tree().staged_files(), Vec::<String>::new(), "{op:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_journal_append_does_not_fail_the_save() {
        // The journal is best effort: open_append, then the second write_all of a save.
        for (op, nth) in [(Op::OpenAppend, 1), (Op::WriteAll, 2)] {
            let bed = Bed::new();
            let m = open(&bed.fs, &bed.root, false).await.unwrap();
            bed.fs.fail(op, nth, 1, Fault::Eio);
            m.save_session("f", &payload("f", 1)).await.unwrap_or_else(|e| panic!("{op:?}: {e}"));
            assert_eq!(bed.fs.faults_pending(), 0, "{op:?}: the fault did not fire");
            m.shutdown().await.unwrap();
            let m = open(&bed.fs.crash(CrashMode::Durable), &bed.root, false).await.unwrap();
            assert_eq!(m.load_session("f").await.unwrap(), Some(payload("f", 1)), "{op:?}");
            assert_eq!(m.list_sessions().await.unwrap().len(), 1, "{op:?}");
            m.shutdown().await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_delete_leaves_no_half_deleted_session() {
        let bed = Bed::new();
        let m = open(&bed.fs, &bed.root, false).await.unwrap();
        m.save_session("f", &payload("f", 1)).await.unwrap();
        let id = m.create_checkpoint("f", "main", &payload("f", 2)).await.unwrap();
        // The first remove_file of the delete is the session record (after the marker).
        bed.fs.fail(Op::RemoveFile, 1, 1, Fault::Eio);
        let err = m.delete_session("f").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io, "{err}");
        m.shutdown().await.unwrap();
        for fs in [bed.fs.clone(), bed.fs.crash(CrashMode::Durable)] {
            let m = open(&fs, &bed.root, false).await.unwrap();
            // The durable pending-delete marker makes the next start finish the delete.
            assert_eq!(m.load_session("f").await.unwrap(), None);
            assert!(m.list_checkpoints("f").await.unwrap().is_empty());
            assert!(m.restore_checkpoint(&id).await.unwrap().is_none());
            m.shutdown().await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_mkdir_fails_the_checkpoint_cleanly() {
        let bed = Bed::new();
        let m = open(&bed.fs, &bed.root, false).await.unwrap();
        bed.fs.fail(Op::CreateDir, 1, 1, Fault::Eio);
        let err = m.create_checkpoint("n", "main", &payload("n", 1)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io, "{err}");
        let id = m.create_checkpoint("n", "main", &payload("n", 2)).await.unwrap();
        m.shutdown().await.unwrap();
        let m = open(&bed.fs.crash(CrashMode::Durable), &bed.root, false).await.unwrap();
        assert_eq!(m.restore_checkpoint(&id).await.unwrap().map(|c| c.data), Some(payload("n", 2)));
        assert_eq!(m.list_checkpoints("n").await.unwrap().len(), 1);
        m.shutdown().await.unwrap();
        assert!(bed.fs.calls(Op::CreateDir) >= 2);
    }

    // ---------------------------------------------------------------------------------
    // Known library bug: a directory whose creation was not made durable is never synced
    // ---------------------------------------------------------------------------------

    /// `FileStorageBackend::ensure_dir` syncs the parent only when `create_dir` reports
    /// that it created the directory. If that sync failed (or the process died before it),
    /// the next attempt finds the directory existing, skips the sync, and acknowledges
    /// records inside a directory that a power loss removes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_whose_parent_fsync_failed_is_synced_before_use() {
        let bed = Bed::new();
        let m = open(&bed.fs, &bed.root, false).await.unwrap();
        // The first sync_dir of a new session's first checkpoint is checkpoints/ (mkdir).
        bed.fs.fail(Op::SyncDir, 1, 1, Fault::Eio);
        assert!(m.create_checkpoint("n", "main", &payload("n", 1)).await.is_err());
        let id = m.create_checkpoint("n", "main", &payload("n", 2)).await.unwrap();
        m.shutdown().await.unwrap();
        let m = open(&bed.fs.crash(CrashMode::Durable), &bed.root, false).await.unwrap();
        let restored = m.restore_checkpoint(&id).await.unwrap();
        m.shutdown().await.unwrap();
        assert_eq!(restored.map(|c| c.data), Some(payload("n", 2)), "acknowledged checkpoint lost");
    }

    /// The same bug reached by a process crash between the mkdir and its parent's fsync,
    /// then a restart, an acknowledged checkpoint, and a power loss.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_left_by_a_process_crash_is_synced_before_use() {
        let bed = Bed::new();
        let m = open(&bed.fs, &bed.root, false).await.unwrap();
        bed.fs.record(true);
        m.create_checkpoint("n", "main", &payload("n", 1)).await.unwrap();
        bed.fs.record(false);
        m.shutdown().await.unwrap();
        let dir = bed.root.join("checkpoints/n");
        let after_mkdir = bed.fs.take_snapshots().into_iter().find(|t| t.exists(&dir) == (true, false)).unwrap();
        let restarted = SimFs::from_tree(after_mkdir.crash_image(CrashMode::ProcessKill));
        let m = open(&restarted, &bed.root, false).await.unwrap();
        let id = m.create_checkpoint("n", "main", &payload("n", 2)).await.unwrap();
        m.shutdown().await.unwrap();
        let m = open(&restarted.crash(CrashMode::Durable), &bed.root, false).await.unwrap();
        let restored = m.restore_checkpoint(&id).await.unwrap();
        m.shutdown().await.unwrap();
        assert_eq!(restored.map(|c| c.data), Some(payload("n", 2)), "acknowledged checkpoint lost");
    }

    // ---------------------------------------------------------------------------------
    // The model itself
    // ---------------------------------------------------------------------------------

    #[test]
    fn the_model_keeps_only_what_was_synced() {
        let root = Path::new("/r");
        let fs = SimFs::new(root);
        fs.create_dir(&root.join("d")).unwrap();
        let mut f = fs.create_new(&root.join("d/a")).unwrap();
        f.write_all(b"hello").unwrap();
        // Nothing synced: the directory itself is gone after a power loss.
        assert_eq!(fs.crash(CrashMode::Durable).list_dir(root).unwrap().len(), 0);
        assert_eq!(fs.crash(CrashMode::ProcessKill).read(&root.join("d/a")).unwrap(), Some(b"hello".to_vec()));
        fs.sync_dir(root).unwrap();
        fs.sync_dir(&root.join("d")).unwrap();
        // Names durable, data not: an empty file.
        assert_eq!(fs.crash(CrashMode::Durable).read(&root.join("d/a")).unwrap(), Some(Vec::new()));
        f.sync_data().unwrap();
        f.write_all(b" world").unwrap();
        assert_eq!(fs.crash(CrashMode::Durable).read(&root.join("d/a")).unwrap(), Some(b"hello".to_vec()));
        // A torn append keeps a prefix of the unsynced tail, never anything else.
        let torn: BTreeSet<Vec<u8>> =
            (0..200).map(|s| fs.crash(CrashMode::Random(s)).read(&root.join("d/a")).unwrap().unwrap()).collect();
        assert!(torn.len() > 3, "{torn:?}");
        assert!(torn.iter().all(|t| t.len() >= 5 && b"hello world".starts_with(t)));
        // A rename is durable only once its directory is synced.
        fs.rename(&root.join("d/a"), &root.join("d/b")).unwrap();
        let image = fs.crash(CrashMode::Durable);
        assert!(image.read(&root.join("d/a")).unwrap().is_some());
        assert!(image.read(&root.join("d/b")).unwrap().is_none());
        fs.sync_dir(&root.join("d")).unwrap();
        let image = fs.crash(CrashMode::Durable);
        assert!(image.read(&root.join("d/a")).unwrap().is_none());
        assert_eq!(image.read(&root.join("d/b")).unwrap(), Some(b"hello".to_vec()));
        // Faults fire on the Nth call and only as many times as asked.
        fs.fail(Op::RemoveFile, 2, 1, Fault::Enospc);
        assert!(!fs.remove_file(&root.join("d/missing")).unwrap());
        let e = fs.remove_file(&root.join("d/b")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(fs.remove_file(&root.join("d/b")).unwrap());
        assert_eq!(fs.faults_pending(), 0);
        assert!(format!("{fs:?}").starts_with("SimFs"));
    }
}
