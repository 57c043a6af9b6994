//! The simulated file system's state: a tree of inodes, each with a current and a durable
//! version ([`Tree`]), and the crash images a [`CrashMode`] builds from it. It calls only
//! the standard library and `libc` error codes; [`SimFs`](super::SimFs) wraps it, and the
//! tests build crash images from its snapshots.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Component, Path};

pub(super) type Ino = u64;
const ROOT: Ino = 0;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Node {
    File { durable: Vec<u8>, current: Vec<u8> },
    Dir { durable: BTreeMap<String, Ino>, current: BTreeMap<String, Ino> },
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
pub(super) struct SplitMix(pub(super) u64);

impl SplitMix {
    pub(super) fn next(&mut self) -> u64 {
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

pub(super) fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The normal components of an absolute path; anything else is refused.
fn components(path: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(s) => {
                out.push(s.to_str().ok_or_else(|| errno(libc::EINVAL))?.to_owned())
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "SimFs takes absolute, normalized paths",
                ));
            }
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
    /// A tree holding `root` and its ancestors, all durable, and nothing else.
    pub(super) fn rooted_at(root: &Path) -> Tree {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::Dir { durable: BTreeMap::new(), current: BTreeMap::new() });
        let mut tree = Tree { nodes, next: ROOT + 1 };
        let mut dir = ROOT;
        for name in components(root).unwrap_or_default() {
            let child =
                tree.alloc(Node::Dir { durable: BTreeMap::new(), current: BTreeMap::new() });
            if let Some(Node::Dir { durable, current }) = tree.nodes.get_mut(&dir) {
                durable.insert(name.clone(), child);
                current.insert(name, child);
            }
            dir = child;
        }
        tree
    }

    /// How many inodes the tree holds (reachable or not).
    pub(super) fn inodes(&self) -> usize {
        self.nodes.len()
    }

    pub(super) fn alloc(&mut self, node: Node) -> Ino {
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, node);
        ino
    }

    pub(super) fn node(&self, ino: Ino) -> io::Result<&Node> {
        self.nodes.get(&ino).ok_or_else(|| errno(libc::ESTALE))
    }

    pub(super) fn node_mut(&mut self, ino: Ino) -> io::Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or_else(|| errno(libc::ESTALE))
    }

    /// The current entries of a directory.
    pub(super) fn entries(&self, ino: Ino) -> io::Result<&BTreeMap<String, Ino>> {
        match self.node(ino)? {
            Node::Dir { current, .. } => Ok(current),
            Node::File { .. } => Err(errno(libc::ENOTDIR)),
        }
    }

    pub(super) fn entries_mut(&mut self, ino: Ino) -> io::Result<&mut BTreeMap<String, Ino>> {
        match self.node_mut(ino)? {
            Node::Dir { current, .. } => Ok(current),
            Node::File { .. } => Err(errno(libc::ENOTDIR)),
        }
    }

    pub(super) fn is_dir(&self, ino: Ino) -> bool {
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

    pub(super) fn lookup(&self, path: &Path) -> io::Result<Option<Ino>> {
        self.walk(&components(path)?, false)
    }

    /// The directory that holds `path` (which must exist) and the last component.
    pub(super) fn parent(&self, path: &Path) -> io::Result<(Ino, String)> {
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
                            let names: BTreeSet<&String> =
                                durable.keys().chain(current.keys()).collect();
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

/// The unit in which a power loss tears an overwrite in place: each block of this many
/// bytes comes back from the durable or the current version independently. Far smaller
/// than a sector, so that frames and headers tear in the middle too.
pub(crate) const TORN_BLOCK: usize = 16;

/// What a power loss leaves of a file with unsynced data: the durable content, the current
/// content, or a torn mix: after appends only, the durable content and a prefix of the
/// unsynced tail; after an overwrite in place, each [`TORN_BLOCK`] from either version,
/// at a length between the two (zeros where the version a block is taken from ends).
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
        _ => {
            let (short, long) = if durable.len() <= current.len() {
                (durable.len(), current.len())
            } else {
                (current.len(), durable.len())
            };
            let len = short + rng.below((long - short) as u64 + 1) as usize;
            let mut out = vec![0; len];
            for (i, block) in out.chunks_mut(TORN_BLOCK).enumerate() {
                let from = if rng.coin() { current } else { durable };
                let at = i * TORN_BLOCK;
                for (j, byte) in block.iter_mut().enumerate() {
                    *byte = from.get(at + j).copied().unwrap_or(0);
                }
            }
            out
        }
    }
}
