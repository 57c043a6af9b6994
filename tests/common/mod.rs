//! Helpers shared by the integration tests. Every file in `tests/` is a crate of its own
//! that includes this module with `mod common;`, and none of them uses every helper.
#![allow(dead_code, unused_imports, unused_macros)]

pub mod backend;
pub mod oracle;
pub mod wal;

pub use backend::{backend, backend_defaults, backend_name, file_backend_only, on_file_backend};

/// Every awaited operation of a backend test finishes within this, or the test fails.
pub const LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Awaits `f`, failing the test (naming `what`) if it takes over [`LIMIT`].
pub async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.unwrap_or_else(|_| panic!("{what} took over {LIMIT:?}"))
}

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use mars_state::{
    CheckpointId, ErrorKind, FileStorageBackend, SessionInfo, StateManager, StateManagerBuilder,
    StorageBackend,
};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------
// One test per storage mode
// ---------------------------------------------------------------------------------------

/// The gzip level of the compressed variant of a test.
pub const GZIP_LEVEL: u32 = 6;

/// Expands each behaviour `async fn NAME(compression: Option<u32>)` into one test per
/// storage mode, `$plain::NAME` (plain JSON) and `$gzip::NAME` (gzip level 6), each under
/// the test attribute given, so one failing mode or behaviour hides no other:
///
/// `per_mode!(plain, gzip, #[tokio::test(start_paused = true)]: behaviour_a, behaviour_b);`
macro_rules! per_mode {
    ($plain:ident, $gzip:ident, #[$test:meta]: $($name:ident),* $(,)?) => {
        mod $plain {
            $(
                #[$test]
                async fn $name() {
                    super::$name(None).await;
                }
            )*
        }
        mod $gzip {
            $(
                #[$test]
                async fn $name() {
                    super::$name(Some($crate::common::GZIP_LEVEL)).await;
                }
            )*
        }
    };
}
pub(crate) use per_mode;

/// Two named tests around one behaviour `async fn(compression: Option<u32>)`, on a
/// two-worker runtime: `$plain` runs it on plain JSON, `$compressed` with gzip level 6.
///
/// `plain_and_compressed! { test_name, test_name_compressed => behaviour; }`
macro_rules! plain_and_compressed {
    ($($plain:ident, $compressed:ident => $run:path;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $plain() {
                $run(None).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $compressed() {
                $run(Some($crate::common::GZIP_LEVEL)).await;
            }
        )*
    };
}
pub(crate) use plain_and_compressed;

// ---------------------------------------------------------------------------------------
// Managers over a store on the chosen backend (`backend.rs`: `MARS_STATE_TEST_BACKEND`)
// ---------------------------------------------------------------------------------------

/// A janitor interval long enough that no pass runs during a test.
pub const JANITOR_HOURLY: Duration = Duration::from_secs(3600);

/// Applies `compression` (a gzip level; `None` stores plain JSON) to `b`.
pub fn with_compression(b: StateManagerBuilder, compression: Option<u32>) -> StateManagerBuilder {
    match compression {
        Some(level) => b.compression(level),
        None => b,
    }
}

/// Set (to anything) to run the suites that use [`builder`] with the file backend's
/// write-ahead log on. [`builder`] writes records directly otherwise (not the backend's
/// default), because several of its users read record files while a manager is open;
/// `.ci/run` runs the suites that never do (concurrency, access) a second time with it.
/// Other backends ignore it.
pub const LOG_ENV: &str = "MARS_STATE_TEST_WAL";

/// A builder with default settings over the store named by `dir` on the chosen backend (a
/// file store at `dir` by default), in the given mode.
pub fn builder(dir: &Path, compression: Option<u32>) -> StateManagerBuilder {
    with_compression(StateManager::builder(backend(dir)), compression)
}

/// `b` with the tests' encryption key (needs the `encryption` feature).
#[cfg(feature = "encryption")]
pub fn encrypt(b: StateManagerBuilder) -> StateManagerBuilder {
    b.encryption_key(mars_state::EncryptionKey::from_bytes([7; 32]))
}

/// Without the `encryption` feature no test asks for an encrypted store.
#[cfg(not(feature = "encryption"))]
pub fn encrypt(_b: StateManagerBuilder) -> StateManagerBuilder {
    unreachable!("encrypted stores need the encryption feature")
}

/// A manager with default settings over the store named by `dir`, in the given mode.
pub async fn open(dir: &Path, compression: Option<u32>) -> StateManager {
    builder(dir, compression).start().await.expect("start manager")
}

/// A manager with default settings over a fresh store named by a fresh temporary directory
/// (on the file backend, the store's base), in the given mode; the directory lives as long as the returned guard.
pub async fn open_temp(compression: Option<u32>) -> (tempfile::TempDir, StateManager) {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), compression).await;
    (dir, m)
}

/// Shuts `m` down and opens a new manager on the same store (while the old handle still
/// lives: `shutdown` alone releases the store).
pub async fn restart(m: StateManager, dir: &Path, compression: Option<u32>) -> StateManager {
    m.shutdown().await.expect("shutdown");
    open(dir, compression).await
}

/// `b` with no janitor pass during the test and a 10 s call timeout, so that a stuck call
/// fails the test instead of hanging it.
pub fn quiet(b: StateManagerBuilder) -> StateManagerBuilder {
    b.janitor_interval(JANITOR_HOURLY).call_timeout(Duration::from_secs(10))
}

/// [`builder`], made [`quiet`].
pub fn quiet_builder(dir: &Path, compression: Option<u32>) -> StateManagerBuilder {
    quiet(builder(dir, compression))
}

/// [`open`], made [`quiet`].
pub async fn open_quiet(dir: &Path, compression: Option<u32>) -> StateManager {
    quiet_builder(dir, compression).start().await.expect("start manager")
}

/// Every session id the manager lists, in its order.
pub async fn session_ids(m: &StateManager) -> Vec<String> {
    m.list_sessions().await.unwrap().into_iter().map(|s| s.session_id.to_string()).collect()
}

/// The entry of session `id` in a listing; panics if it is not listed.
/// `m.list_sessions()` with each session's owner and lease end left out: what the records
/// say. (On a shared store the owner and the lease end are live facts: the end moves at every
/// renewal, and a restart releases the lease.)
pub async fn listed_records(m: &StateManager) -> Vec<SessionInfo> {
    let mut listed = m.list_sessions().await.unwrap();
    for s in &mut listed {
        s.owner = None;
        s.lease_until = None;
    }
    listed
}

pub fn session_info<'a>(sessions: &'a [SessionInfo], id: &str) -> &'a SessionInfo {
    sessions
        .iter()
        .find(|s| s.session_id.as_str() == id)
        .unwrap_or_else(|| panic!("session {id} not listed"))
}

/// The ids of `session`'s checkpoints, as listed (oldest first).
pub async fn checkpoint_ids(m: &StateManager, session: &str) -> Vec<CheckpointId> {
    m.list_checkpoints(session).await.unwrap().into_iter().map(|c| c.id).collect()
}

// ---------------------------------------------------------------------------------------
// Files on disk
// ---------------------------------------------------------------------------------------

/// A fresh temporary directory and the store path `rel` inside it (not created).
pub fn temp_store(rel: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join(rel);
    (dir, base)
}

/// The record file extension of a store in the given mode.
pub fn ext(compression: Option<u32>) -> &'static str {
    if compression.is_some() { ".json.gz" } else { ".json" }
}

/// Where the record of session `sid` lives in a store at `dir`.
pub fn session_file(dir: &Path, sid: &str, compression: Option<u32>) -> PathBuf {
    dir.join("sessions").join(format!("{sid}{}", ext(compression)))
}

/// Writes a whole file, replacing it, without the crate's helpers (tests simulate outside
/// damage) and without `std::fs::write` (banned crate-wide by clippy.toml).
pub fn put_file(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
}

/// XORs the byte at `at(file length)` of the file at `path` with `mask`; returns the
/// damaged bytes as written.
pub fn flip_byte(path: &Path, at: impl FnOnce(usize) -> usize, mask: u8) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    let i = at(bytes.len());
    bytes[i] ^= mask;
    put_file(path, &bytes);
    bytes
}

/// What a path in a [`snapshot`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(Vec<u8>),
    Link(PathBuf),
    Other,
}

/// Every path under `root` (relative), with file contents and link targets.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        let mut entries: Vec<_> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel, Node::Link(std::fs::read_link(&path).unwrap()));
            } else if meta.is_dir() {
                out.insert(rel, Node::Dir);
                walk(root, &path, out);
            } else if meta.is_file() {
                out.insert(rel, Node::File(std::fs::read(&path).unwrap()));
            } else {
                out.insert(rel, Node::Other);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Every regular file under `root` (path relative to it) with its bytes: a [`snapshot`]
/// without directories and links.
pub fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    snapshot(root)
        .into_iter()
        .filter_map(|(path, node)| match node {
            Node::File(bytes) => Some((path, bytes)),
            _ => None,
        })
        .collect()
}

/// Staged files (`.NAME.tmp-RANDOM`) anywhere under the store at `dir` (none if it does not
/// exist yet).
pub fn staged_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("reading {}: {e}", d.display()),
        };
        for e in entries {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().contains(".tmp-") {
                out.push(e.path());
            }
        }
    }
    out
}

/// Describes how two snapshots differ (empty if they are equal).
pub fn diff(before: &BTreeMap<PathBuf, Node>, after: &BTreeMap<PathBuf, Node>) -> Vec<String> {
    let mut out = Vec::new();
    for (p, n) in before {
        match after.get(p) {
            None => out.push(format!("removed: {}", p.display())),
            Some(m) if m != n => out.push(format!("changed: {}", p.display())),
            _ => {}
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        out.push(format!("added: {}", p.display()));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------

/// A small seeded PRNG (SplitMix64): the same seed gives the same numbers on every run.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------

/// The stdout of a finished child (`what`, for the message); fails the test with its
/// status, stdout and stderr unless it exited successfully.
#[track_caller]
pub fn stdout_of_success(out: std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

// ---------------------------------------------------------------------------------------
// Tasks, waiting, panics
// ---------------------------------------------------------------------------------------

/// Spawns `f(clone of m, item)` as a task of its own for each item.
pub fn spawn_each<I, F, Fut>(m: &StateManager, items: I, f: F) -> Vec<JoinHandle<Fut::Output>>
where
    I: IntoIterator,
    F: Fn(StateManager, I::Item) -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    items.into_iter().map(|item| tokio::spawn(f(m.clone(), item))).collect()
}

/// Polls until no session actor is alive or `deadline` passes; returns the last count seen.
pub async fn wait_for_no_live_actors(m: &StateManager, deadline: Duration) -> usize {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let live = m.live_session_actors().await.unwrap();
        if live == 0 || tokio::time::Instant::now() > until {
            return live;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls opening the store named by `base` on the chosen backend (with the file backend's
/// defaults, as `FileStorageBackend::new`) until it succeeds or `within` passes.
pub async fn reopen_within(base: &Path, within: Duration) -> Arc<dyn StorageBackend> {
    let deadline = Instant::now() + within;
    loop {
        match backend::open_backend(base, backend::FileWrites::Defaults, Duration::ZERO) {
            Ok(b) => return b,
            Err(e) if e.kind() == ErrorKind::Locked && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("the store was not released within {within:?}: {e}"),
        }
    }
}

/// Lets the actors run until they have nothing left to do (paused time does not move).
pub async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Silences the default panic message for panics the tests cause on purpose (those whose
/// message contains "deliberate").
pub fn quiet_deliberate_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if !msg.contains("deliberate") {
                default(info);
            }
        }));
    });
}

/// The error of an update closure that never fails.
#[derive(Debug, thiserror::Error)]
#[error("never")]
pub struct Never;

/// An update closure: `{"n": N}` becomes `{"n": N + 1}`; no state counts as `N = 0`.
pub fn increment(old: Option<Value>) -> Result<Value, Never> {
    Ok(json!({"n": old.and_then(|v| v["n"].as_i64()).unwrap_or(0) + 1}))
}

// ---------------------------------------------------------------------------------------
// Tests that need more than a Rust toolchain
// ---------------------------------------------------------------------------------------

/// Set (to anything but empty or `0`) by `.ci/run`: the tests that need more than a Rust
/// toolchain (`strace`, ptrace of a running process, root or a user namespace for a private
/// tmpfs) must run, and fail where they cannot.
pub const REQUIRE_SYSTEM_TESTS: &str = "MARS_STATE_REQUIRE_SYSTEM_TESTS";

/// Whether `REQUIRE_SYSTEM_TESTS` is set.
pub fn system_tests_required() -> bool {
    std::env::var(REQUIRE_SYSTEM_TESTS).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// For a test that cannot run on this machine (`why`): fails it when `REQUIRE_SYSTEM_TESTS`
/// is set; otherwise writes one `NOT RUN` line saying so and how to run it, and the caller
/// returns without checking anything. The line goes straight to stderr, past libtest's
/// capture (which hides what a passing test prints), so `cargo test` shows it.
pub fn not_run(test: &str, why: &str) {
    assert!(
        !system_tests_required(),
        "{test} cannot run here, and {REQUIRE_SYSTEM_TESTS} says it must: {why}"
    );
    not_run_line(
        test,
        &format!(
            "{why}. Run it as root with strace installed: `{REQUIRE_SYSTEM_TESTS}=1 cargo test`, or \
             `bash .ci/run`"
        ),
    );
}

/// Writes `NOT RUN {test}: {why}` straight to stderr (past libtest's capture).
pub fn not_run_line(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "NOT RUN {test}: {why}");
}
