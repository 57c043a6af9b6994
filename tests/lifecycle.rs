//! Pins the orchestrator lifecycle (issue 4): automatic checkpoint policies, durability of
//! recorded steps, pause and resume across processes, crash recovery, checkpoint lineage,
//! live watches, and schema migrations over golden fixtures of the on-disk format.
//!
//! Timing-dependent behaviours run under paused tokio time (`start_paused = true`) over a
//! `MemoryStorageBackend`: the manager's clock and the session actors' timers follow tokio
//! time, so `tokio::time::advance` moves them and nothing is slept on. Behaviours that must
//! survive a restart run on the file backend over a multi-thread runtime; crashes are real
//! `SIGKILL`s of a child process that re-executes this test binary (the same test function,
//! with `MARS_LIFE_CHILD` set, plays the child).
//!
//! Golden fixtures: `tests/fixtures/v1/` (plain JSON) and `tests/fixtures/v1-gzip/` (gzip
//! level 6) are stores written by the code of schema version 1. They are only ever opened
//! from a copy in a temporary directory. `MARS_WRITE_FIXTURES=1 cargo test --test lifecycle
//! write_fixtures` regenerates them (without the variable that test does nothing); the
//! values the golden tests expect are hard-coded from the generator's deterministic inputs.
//! Their records are also of record format 1 (before the header said where `data` starts,
//! issue 15) and their `metadata/store.json` of store format 1: they pin that such stores
//! still open and load, and that an open for writing marks them format 2 (regenerated with
//! today's code they would lose that).
//!
//! The "file" stores are on the backend `MARS_STATE_TEST_BACKEND` picks
//! (`tests/common/backend.rs`; the file backend by default). On another backend, a fixture
//! is imported key by key (a file's path in the fixture is its key), checks of record files
//! are skipped, and the tests that count record files by schema say `NOT RUN`.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::backend::{FileWrites, open_backend};
use common::{file_backend_only, on_file_backend, quiet, session_info, settle, with_compression};
use mars_state::{
    BoxError, CheckpointId, CheckpointInfo, CheckpointPolicy, CheckpointReason, ErrorKind,
    EventKind, MemoryStorageBackend, SessionInfo, SessionStatus, StateManager, StateManagerBuilder,
    StorageBackend, StorageKey, Watch,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Far longer than any test: no session actor passivates unless a test asks for it.
const NEVER_IDLE: Duration = Duration::from_secs(24 * 3600);

/// A quiet manager over `backend` (shared map: a clone is the same store) whose actors
/// never go idle, with `policy` as every session's default.
async fn memory_manager(backend: &MemoryStorageBackend, policy: CheckpointPolicy) -> StateManager {
    quiet(StateManager::builder(backend.clone()))
        .idle_timeout(NEVER_IDLE)
        .checkpoint_policy(policy)
        .start()
        .await
        .unwrap()
}

/// A quiet builder over the store named by `dir` on the chosen backend (a file store at
/// `dir` by default, with default settings: through the write-ahead log). Waits briefly for
/// the lock: a child spawned by another test of this binary may hold an inherited copy
/// between its fork and exec, and a killed child's lock is released by the kernel.
fn file_builder(dir: &Path, compression: Option<u32>) -> StateManagerBuilder {
    file_builder_mode(dir, compression, true)
}

/// [`file_builder`] with records written directly (no write-ahead log), for the tests
/// that read record files while the manager is open.
fn file_builder_direct(dir: &Path, compression: Option<u32>) -> StateManagerBuilder {
    file_builder_mode(dir, compression, false)
}

fn file_builder_mode(dir: &Path, compression: Option<u32>, log: bool) -> StateManagerBuilder {
    let writes = if log { FileWrites::Defaults } else { FileWrites::Direct };
    builder_over(open_store(dir, writes), compression)
}

/// The store named by `dir` on the chosen backend, waiting for its lock as [`file_builder`].
fn open_store(dir: &Path, writes: FileWrites) -> Arc<dyn StorageBackend> {
    open_backend(dir, writes, Duration::from_secs(5)).expect("open the store")
}

/// [`file_builder`] over a backend the test holds too.
fn builder_over(backend: Arc<dyn StorageBackend>, compression: Option<u32>) -> StateManagerBuilder {
    quiet(with_compression(StateManager::builder(backend), compression))
        .idle_timeout(NEVER_IDLE)
        .lease_ttl(LEASE_TTL)
}

/// The session lease TTL of these tests' managers (on a shared store: PostgreSQL, Redis).
const LEASE_TTL: Duration = Duration::from_secs(1);

/// After a process using the store was killed: on a shared store, the other nodes learn that
/// it died when its session leases run out (a store one process holds learns it from its
/// lock at once).
fn wait_for_the_dead_processes_leases() {
    if matches!(common::backend_name(), "postgres" | "redis") {
        std::thread::sleep(LEASE_TTL + Duration::from_millis(300));
    }
}

async fn open_file(dir: &Path) -> StateManager {
    file_builder(dir, None).start().await.unwrap()
}

/// The state an orchestrator reports after `step` in these tests.
fn run_state(step: u64) -> Value {
    json!({"step": step, "agents": {"planner": format!("plan v{step}"), "writer": step * 10}})
}

/// `(branch, reason, step)` of each checkpoint, oldest first.
fn summary(infos: &[CheckpointInfo]) -> Vec<(String, CheckpointReason, Option<u64>)> {
    infos.iter().map(|c| (c.branch_id.to_string(), c.reason, c.step)).collect()
}

/// Lets the actors run (timers that are due fire; paused time does not move).
async fn let_actors_run() {
    for _ in 0..4 {
        settle().await;
    }
}

/// The session's checkpoints once there are at least `n` (or whatever there is after the
/// actors have had ample time to get there).
async fn checkpoints_once(m: &StateManager, session: &str, n: usize) -> Vec<CheckpointInfo> {
    for _ in 0..40 {
        let cps = m.list_checkpoints(session).await.unwrap();
        if cps.len() >= n {
            return cps;
        }
        settle().await;
    }
    m.list_checkpoints(session).await.unwrap()
}

/// Parses a record file as JSON (gunzipping `.gz` records).
fn read_record(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    let text = if path.to_string_lossy().ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut out).unwrap();
        out
    } else {
        bytes
    };
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Record files (not staged or hidden ones) directly in `dir`, sorted.
fn records_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    out.sort();
    out
}

/// Every session record and every checkpoint record of the store at `dir`.
fn all_records(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let sessions = records_in(&dir.join("sessions"));
    let mut checkpoints = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("checkpoints")) {
        let mut dirs: Vec<PathBuf> =
            entries.map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
        dirs.sort();
        for d in dirs {
            checkpoints.extend(records_in(&d));
        }
    }
    (sessions, checkpoints)
}

/// `n` records at schema version `v`, as [`schemas`] reports them.
fn at(v: u64, n: usize) -> BTreeMap<u64, usize> {
    BTreeMap::from([(v, n)])
}

/// How many of `records` are stored at each schema version.
fn schemas(records: &[PathBuf]) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for r in records {
        *out.entry(read_record(r)["meta"]["schema"].as_u64().unwrap()).or_default() += 1;
    }
    out
}

/// The key of checkpoint `cid` of `session` in a plain-JSON store.
fn checkpoint_key(session: &str, cid: &CheckpointId) -> StorageKey {
    StorageKey::new(format!("checkpoints/{session}/{cid}.json")).unwrap()
}

/// XORs the byte at `at(value length)` of the value at `key` with `mask`, through `store`.
async fn flip_stored(
    store: &dyn StorageBackend,
    key: &StorageKey,
    at: impl FnOnce(usize) -> usize,
    mask: u8,
) {
    let mut bytes = store.get(key).await.unwrap().unwrap_or_else(|| panic!("{key} is missing"));
    let i = at(bytes.len());
    bytes[i] ^= mask;
    store.put(key, bytes).await.unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

// ---------------------------------------------------------------------------------------
// Child processes (for SIGKILL tests)
// ---------------------------------------------------------------------------------------

/// Set in a child's environment: which test body to play, and the store directory.
const CHILD_ENV: &str = "MARS_LIFE_CHILD";
const CHILD_DIR_ENV: &str = "MARS_LIFE_DIR";
/// A child that is never killed exits by itself after this long.
const CHILD_MAX_LIFETIME: Duration = Duration::from_secs(60);

/// `Some(store dir)` when this process is the child playing `role`.
fn child_role(role: &str) -> Option<PathBuf> {
    (std::env::var(CHILD_ENV).ok()? == role)
        .then(|| PathBuf::from(std::env::var_os(CHILD_DIR_ENV).unwrap()))
}

/// A child running test `test_name` of this binary as `role` on `dir`, and its stdout lines.
fn spawn_child(test_name: &str, role: &str, dir: &Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role)
        .env(CHILD_DIR_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits (up to 30 s) for the child to print `line`; panics if it exits first.
fn wait_for_line(rx: &mpsc::Receiver<String>, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.trim_end() == line => return,
            Ok(_) => {}
            Err(e) => panic!("the child never printed {line:?}: {e}"),
        }
    }
}

/// Prints `line` on a line of its own, flushed (libtest has printed `test NAME ... `).
fn child_says(line: &str) {
    let mut out = std::io::stdout();
    out.write_all(format!("\n{line}\n").as_bytes()).unwrap();
    out.flush().unwrap();
}

fn sigkill(mut child: Child) {
    child.kill().unwrap(); // SIGKILL on Unix: no destructor, no shutdown, no flush.
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the child was not killed: {status:?}");
}

// ---------------------------------------------------------------------------------------
// 1. Interval policy
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn every_3_steps_checkpoints_at_steps_3_6_9_only() {
    let m = memory_manager(&MemoryStorageBackend::new(), CheckpointPolicy::every_steps(3)).await;
    let mut taken = Vec::new();
    for step in 1..=10 {
        if let Some(id) = m.record_step("run", step, &run_state(step)).await.unwrap() {
            taken.push((step, id));
        }
        // Loads see a recorded step at once, checkpointed or not.
        assert_eq!(m.load_session("run").await.unwrap(), Some(run_state(step)));
    }
    assert_eq!(taken.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [3, 6, 9]);

    let_actors_run().await;
    let cps = m.list_checkpoints("run").await.unwrap();
    assert_eq!(
        summary(&cps),
        [3, 6, 9].map(|s| ("main".to_owned(), CheckpointReason::Steps, Some(s))),
        "exactly one checkpoint per 3 steps, and nothing else"
    );
    assert_eq!(
        cps.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        taken.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>()
    );
    for (step, id) in &taken {
        let cp = m.restore_checkpoint(id).await.unwrap().unwrap();
        assert_eq!(
            (cp.reason, cp.step, cp.data),
            (CheckpointReason::Steps, Some(*step), run_state(*step))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_step_rule_counts_from_the_last_checkpoint_and_per_session() {
    let m = memory_manager(&MemoryStorageBackend::new(), CheckpointPolicy::on_demand()).await;
    m.set_checkpoint_policy("a", CheckpointPolicy::every_steps(4)).await.unwrap();
    // Another session keeps the default (on demand).
    for step in 1..=9 {
        assert_eq!(m.record_step("b", step, &run_state(step)).await.unwrap(), None);
    }
    // Steps may jump: a checkpoint when the step is at least 4 past the last checkpoint's.
    let mut taken = Vec::new();
    for step in [1, 2, 5, 6, 8, 9, 15, 16] {
        if m.record_step("a", step, &run_state(step)).await.unwrap().is_some() {
            taken.push(step);
        }
    }
    assert_eq!(taken, [5, 9, 15]);
    assert!(m.list_checkpoints("b").await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------
// 2. Time policy
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn every_60s_checkpoints_once_per_interval_while_steps_are_recorded() {
    let m = memory_manager(&MemoryStorageBackend::new(), CheckpointPolicy::on_demand()).await;
    // Starts the session actor (and its policy timer) now.
    m.set_checkpoint_policy("run", CheckpointPolicy::every(Duration::from_secs(60))).await.unwrap();
    assert_eq!(
        m.record_step("run", 1, &run_state(1)).await.unwrap(),
        None,
        "the time rule never fires in record_step"
    );

    tokio::time::advance(Duration::from_secs(59)).await;
    let_actors_run().await;
    assert!(m.list_checkpoints("run").await.unwrap().is_empty(), "no checkpoint before 60 s");

    tokio::time::advance(Duration::from_secs(2)).await;
    let cps = checkpoints_once(&m, "run", 1).await;
    assert_eq!(summary(&cps), [("main".to_owned(), CheckpointReason::Time, Some(1))]);
    assert_eq!(m.restore_checkpoint(&cps[0].id).await.unwrap().unwrap().data, run_state(1));

    // Nothing recorded since: no more checkpoints, however much time passes.
    for _ in 0..20 {
        tokio::time::advance(Duration::from_secs(30)).await;
        let_actors_run().await;
    }
    assert_eq!(
        m.list_checkpoints("run").await.unwrap().len(),
        1,
        "no new steps, no new checkpoint"
    );

    // A new step: one more checkpoint within the next interval, and only one.
    assert_eq!(m.record_step("run", 2, &run_state(2)).await.unwrap(), None);
    let_actors_run().await;
    assert_eq!(m.list_checkpoints("run").await.unwrap().len(), 1, "not before the timer ticks");
    tokio::time::advance(Duration::from_secs(60)).await;
    let cps = checkpoints_once(&m, "run", 2).await;
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(30)).await;
        let_actors_run().await;
    }
    let cps_later = m.list_checkpoints("run").await.unwrap();
    assert_eq!(cps_later, cps);
    assert_eq!(
        summary(&cps),
        [
            ("main".to_owned(), CheckpointReason::Time, Some(1)),
            ("main".to_owned(), CheckpointReason::Time, Some(2))
        ]
    );
    assert_eq!(cps[1].parent.as_ref(), Some(&cps[0].id));
}

#[tokio::test(start_paused = true)]
async fn step_and_time_rules_together_each_fire_and_each_resets_the_other() {
    let policy = CheckpointPolicy::every_steps(5).and_every(Duration::from_secs(60));
    let m = memory_manager(&MemoryStorageBackend::new(), policy).await;
    for step in 1..=4 {
        assert_eq!(m.record_step("run", step, &run_state(step)).await.unwrap(), None);
    }
    tokio::time::advance(Duration::from_secs(59)).await;
    let_actors_run().await;
    assert!(m.list_checkpoints("run").await.unwrap().is_empty());
    tokio::time::advance(Duration::from_secs(2)).await;
    let cps = checkpoints_once(&m, "run", 1).await;
    assert_eq!(summary(&cps), [("main".to_owned(), CheckpointReason::Time, Some(4))]);

    // The time checkpoint at step 4 resets the step rule: the next is due at step 9.
    let mut taken = Vec::new();
    for step in 5..=9 {
        if m.record_step("run", step, &run_state(step)).await.unwrap().is_some() {
            taken.push(step);
        }
    }
    assert_eq!(taken, [9]);

    // The step checkpoint resets the time rule: a step recorded right after it waits a
    // whole interval again.
    m.record_step("run", 10, &run_state(10)).await.unwrap();
    tokio::time::advance(Duration::from_secs(59)).await;
    let_actors_run().await;
    assert_eq!(
        m.list_checkpoints("run").await.unwrap().len(),
        2,
        "the step checkpoint restarted the clock"
    );
    // The timer ticks every quarter interval, so the checkpoint comes within 75 s.
    tokio::time::advance(Duration::from_secs(17)).await;
    let cps = checkpoints_once(&m, "run", 3).await;
    assert_eq!(
        summary(&cps),
        [
            ("main".to_owned(), CheckpointReason::Time, Some(4)),
            ("main".to_owned(), CheckpointReason::Steps, Some(9)),
            ("main".to_owned(), CheckpointReason::Time, Some(10)),
        ]
    );
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(60)).await;
        let_actors_run().await;
    }
    assert_eq!(m.list_checkpoints("run").await.unwrap().len(), 3);
}

// ---------------------------------------------------------------------------------------
// 3. Durability of recorded steps
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_steps_are_flushed_at_shutdown_and_load_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let m = open_file(dir.path()).await;
    m.set_checkpoint_policy("stepped", CheckpointPolicy::every_steps(3)).await.unwrap();
    for step in 1..=5 {
        m.record_step("stepped", step, &run_state(step)).await.unwrap();
    }
    for step in 1..=2 {
        assert_eq!(m.record_step("on-demand", step, &run_state(step)).await.unwrap(), None);
    }
    assert!(m.list_checkpoints("on-demand").await.unwrap().is_empty());
    m.shutdown().await.unwrap();

    let m = open_file(dir.path()).await;
    assert_eq!(m.load_session("stepped").await.unwrap(), Some(run_state(5)));
    assert_eq!(m.load_session("on-demand").await.unwrap(), Some(run_state(2)));
    let stepped = m.list_checkpoints("stepped").await.unwrap();
    assert_eq!(
        summary(&stepped),
        [
            ("main".to_owned(), CheckpointReason::Steps, Some(3)),
            ("main".to_owned(), CheckpointReason::Flush, Some(5))
        ]
    );
    assert_eq!(m.restore_checkpoint(&stepped[1].id).await.unwrap().unwrap().data, run_state(5));
    let on_demand = m.list_checkpoints("on-demand").await.unwrap();
    assert_eq!(summary(&on_demand), [("main".to_owned(), CheckpointReason::Flush, Some(2))]);
    let sessions = m.list_sessions().await.unwrap();
    for s in ["stepped", "on-demand"] {
        assert_eq!(
            (session_info(&sessions, s).status, session_info(&sessions, s).interrupted),
            (SessionStatus::Running, false)
        );
    }
    // A clean restart with nothing recorded flushes nothing more.
    m.shutdown().await.unwrap();
    let m = open_file(dir.path()).await;
    assert_eq!(m.list_checkpoints("stepped").await.unwrap(), stepped);
    m.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn recorded_steps_are_flushed_when_the_session_actor_passivates() {
    let backend = MemoryStorageBackend::new();
    let m = quiet(StateManager::builder(backend.clone()))
        .idle_timeout(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    for step in 1..=4 {
        assert_eq!(m.record_step("run", step, &run_state(step)).await.unwrap(), None);
    }
    assert!(m.list_checkpoints("run").await.unwrap().is_empty());
    tokio::time::advance(Duration::from_secs(2)).await;
    let mut live = usize::MAX;
    for _ in 0..40 {
        live = m.live_session_actors().await.unwrap();
        if live == 0 {
            break;
        }
        settle().await;
    }
    assert_eq!(live, 0, "the idle session actor passivated");
    let cps = m.list_checkpoints("run").await.unwrap();
    assert_eq!(summary(&cps), [("main".to_owned(), CheckpointReason::Flush, Some(4))]);
    m.shutdown().await.unwrap();

    // What the passivation flushed is what storage holds.
    let m = memory_manager(&backend, CheckpointPolicy::on_demand()).await;
    assert_eq!(m.load_session("run").await.unwrap(), Some(run_state(4)));
    assert_eq!(m.list_checkpoints("run").await.unwrap(), cps, "shutdown had nothing left to flush");
    m.shutdown().await.unwrap();
}

/// A session actor that is already stopping when the manager shuts down (it passivated
/// after its idle timeout, and a save queued before its mailbox closed is still being
/// written) is waited for before the store is closed: the clean close (its last step
/// removes the running marker) comes only after that write, and the save is there after a
/// restart.
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_store_after_a_passivating_actor_s_last_write() {
    use mars_state::testing::{Faulty, Hold, Method};
    let (flush, save, closing) = (Hold::new(), Hold::new(), Hold::new());
    // A file store: a store with one writer keeps a running marker (a shared one does not).
    let dir = tempfile::tempdir().unwrap();
    let file = mars_state::FileStorageBackend::new(dir.path()).unwrap();
    // The flush writes the session record, then its checkpoint: the checkpoint's write is
    // held. The queued save writes the session record.
    let checkpoint = |k: &StorageKey| k.as_str().starts_with("checkpoints/");
    let session = |k: &StorageKey| k.as_str().starts_with("sessions/");
    let running = |k: &StorageKey| k.as_str() == "metadata/running";
    let backend = Arc::new(
        Faulty::new(file)
            .hold(Method::Put, &flush, checkpoint)
            .hold(Method::Put, &save, session)
            .hold(Method::Delete, &closing, running),
    );
    let m = quiet(StateManager::builder(backend.clone()))
        .idle_timeout(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    m.record_step("run", 1, &run_state(1)).await.unwrap();
    // The idle actor passivates: its flush of step 1 is held.
    flush.arm();
    tokio::time::timeout(Duration::from_secs(10), flush.held()).await.expect("the flush");
    // A save queued behind the flush, before the mailbox closes.
    let saving = tokio::spawn({
        let m = m.clone();
        async move { m.save_session("run", &run_state(2)).await }
    });
    // Time for it to reach the actor's mailbox (the actor is busy, so it waits there).
    tokio::time::sleep(Duration::from_millis(200)).await;
    save.arm();
    flush.release();
    // The actor is draining now, and writing the queued save.
    tokio::time::timeout(Duration::from_secs(10), save.held()).await.expect("the queued save");
    closing.arm();
    let stopping = tokio::spawn({
        let m = m.clone();
        async move { m.shutdown().await }
    });
    let early = tokio::time::timeout(Duration::from_millis(300), closing.held()).await;
    assert!(early.is_err(), "the store was closed while a stopping actor was writing");
    save.release();
    tokio::time::timeout(Duration::from_secs(10), closing.held()).await.expect("the close");
    closing.release();
    stopping.await.unwrap().unwrap();
    saving.await.unwrap().unwrap();

    drop(m);
    drop(backend);
    let m = quiet(StateManager::builder(mars_state::FileStorageBackend::new(dir.path()).unwrap()))
        .start()
        .await
        .unwrap();
    assert_eq!(m.load_session("run").await.unwrap(), Some(run_state(2)));
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. Pause and resume across managers
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_session_resumes_in_a_fresh_manager_and_stays_running_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let m = open_file(dir.path()).await;
    for step in 1..=3 {
        m.record_step("run", step, &run_state(step)).await.unwrap();
    }
    m.save_session("other", &json!({"n": 1})).await.unwrap();
    let paused_cp =
        m.pause_session("run", &run_state(3), "waiting for human approval").await.unwrap();
    m.shutdown().await.unwrap();

    let m = open_file(dir.path()).await;
    let sessions = m.list_sessions().await.unwrap();
    assert_eq!(session_info(&sessions, "run").status, SessionStatus::Paused);
    assert!(!session_info(&sessions, "run").interrupted, "a paused session was not cut off");
    let paused: Vec<String> = m
        .list_sessions_by_status(SessionStatus::Paused)
        .await
        .unwrap()
        .iter()
        .map(|s| s.session_id.to_string())
        .collect();
    assert_eq!(paused, ["run"]);
    let running: Vec<String> = m
        .list_sessions_by_status(SessionStatus::Running)
        .await
        .unwrap()
        .iter()
        .map(|s| s.session_id.to_string())
        .collect();
    assert_eq!(running, ["other"]);
    let cps = m.list_checkpoints("run").await.unwrap();
    assert_eq!(cps.last().unwrap().id, paused_cp);
    assert_eq!(summary(&cps), [("main".to_owned(), CheckpointReason::Pause, Some(3))]);
    let cp = m.restore_checkpoint(&paused_cp).await.unwrap().unwrap();
    assert_eq!((cp.reason, cp.data), (CheckpointReason::Pause, run_state(3)));
    // The pause reason and time are stored with the state (the plain-JSON record file of
    // the file backend shows them).
    if on_file_backend() {
        let record = read_record(&common::session_file(dir.path(), "run", None));
        assert_eq!(record["meta"]["status"], "paused");
        assert_eq!(record["meta"]["reason"], "waiting for human approval");
        assert!(record["meta"]["status_at"].as_u64().unwrap() >= cp.timestamp.saturating_sub(1000));
    }

    assert_eq!(m.resume_session("run").await.unwrap(), Some(run_state(3)));
    assert_eq!(
        session_info(&m.list_sessions().await.unwrap(), "run").status,
        SessionStatus::Running
    );
    m.shutdown().await.unwrap();

    let m = open_file(dir.path()).await;
    let sessions = m.list_sessions().await.unwrap();
    assert_eq!(
        (session_info(&sessions, "run").status, session_info(&sessions, "run").interrupted),
        (SessionStatus::Running, false)
    );
    assert!(m.list_sessions_by_status(SessionStatus::Paused).await.unwrap().is_empty());
    assert_eq!(m.load_session("run").await.unwrap(), Some(run_state(3)));
    if on_file_backend() {
        assert_eq!(
            read_record(&common::session_file(dir.path(), "run", None))["meta"]["status"],
            "running"
        );
    }
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_and_fail_are_stored_and_filterable() {
    let dir = tempfile::tempdir().unwrap();
    let m = open_file(dir.path()).await;
    m.save_session("done", &run_state(1)).await.unwrap();
    m.complete_session("done", &run_state(9)).await.unwrap();
    m.save_session("broken", &run_state(2)).await.unwrap();
    m.fail_session("broken", "the model refused").await.unwrap();
    m.save_session("busy", &run_state(3)).await.unwrap();
    m.shutdown().await.unwrap();

    let m = open_file(dir.path()).await;
    let ids =
        |v: Vec<SessionInfo>| v.into_iter().map(|s| s.session_id.to_string()).collect::<Vec<_>>();
    assert_eq!(ids(m.list_sessions_by_status(SessionStatus::Completed).await.unwrap()), ["done"]);
    assert_eq!(ids(m.list_sessions_by_status(SessionStatus::Failed).await.unwrap()), ["broken"]);
    assert_eq!(ids(m.list_sessions_by_status(SessionStatus::Running).await.unwrap()), ["busy"]);
    assert_eq!(m.load_session("done").await.unwrap(), Some(run_state(9)));
    assert_eq!(
        m.load_session("broken").await.unwrap(),
        Some(run_state(2)),
        "failing keeps the state"
    );
    if on_file_backend() {
        assert_eq!(
            read_record(&common::session_file(dir.path(), "broken", None))["meta"]["reason"],
            "the model refused"
        );
    }
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 5. Crash recovery
// ---------------------------------------------------------------------------------------

/// The child: records steps 1..=7 of "run" checkpointing every 3 (so steps 1..=6 are
/// durable and step 7 only in memory), completes "done", pauses "held", says `ready` and
/// waits to be killed.
fn crash_child(dir: &Path) {
    runtime().block_on(async {
        let m = open_file(dir).await;
        m.set_checkpoint_policy("run", CheckpointPolicy::every_steps(3)).await.unwrap();
        for step in 1..=7 {
            m.record_step("run", step, &run_state(step)).await.unwrap();
        }
        m.complete_session("done", &json!({"result": 42})).await.unwrap();
        m.pause_session("held", &run_state(1), "lunch").await.unwrap();
        child_says("ready");
        tokio::time::sleep(CHILD_MAX_LIFETIME).await;
    });
}

#[test]
fn a_run_killed_while_running_is_recognised_as_interrupted_after_a_restart() {
    if let Some(dir) = child_role("crash") {
        return crash_child(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let (child, lines) = spawn_child(
        "a_run_killed_while_running_is_recognised_as_interrupted_after_a_restart",
        "crash",
        dir.path(),
    );
    wait_for_line(&lines, "ready");
    sigkill(child);
    wait_for_the_dead_processes_leases();

    runtime().block_on(async {
        let m = open_file(dir.path()).await;
        let sessions = m.list_sessions().await.unwrap();
        let flags =
            |id| (session_info(&sessions, id).status, session_info(&sessions, id).interrupted);
        assert_eq!(flags("run"), (SessionStatus::Running, true));
        assert_eq!(flags("done"), (SessionStatus::Completed, false));
        assert_eq!(flags("held"), (SessionStatus::Paused, false));

        let r = m.recover_session("run").await.unwrap();
        assert!(r.interrupted);
        assert_eq!(r.status, SessionStatus::Running);
        assert_eq!(
            r.state,
            Some(run_state(6)),
            "the last durable state: step 7 was only in memory"
        );
        let cp = r.checkpoint.expect("a checkpoint to resume from");
        assert_eq!(
            (cp.reason, cp.step, &cp.data),
            (CheckpointReason::Steps, Some(6), &run_state(6))
        );
        assert_eq!(
            cp.id,
            m.list_checkpoints("run").await.unwrap().last().unwrap().id,
            "the newest checkpoint"
        );
        assert!(r.skipped.is_empty());

        let r = m.recover_session("done").await.unwrap();
        assert_eq!(
            (r.interrupted, r.status, r.state),
            (false, SessionStatus::Completed, Some(json!({"result": 42})))
        );

        // Picking the run up again clears the mark.
        m.record_step("run", 7, &run_state(7)).await.unwrap();
        m.save_session("run", &run_state(7)).await.unwrap();
        assert!(!session_info(&m.list_sessions().await.unwrap(), "run").interrupted);
        assert!(!m.recover_session("run").await.unwrap().interrupted);
        m.shutdown().await.unwrap();
    });
}

#[test]
fn the_interrupted_mark_survives_a_clean_restart_until_the_session_is_saved() {
    // Regression: a clean open and shutdown by another process after the crash cleared the
    // mark before anyone had looked at it.
    if let Some(dir) = child_role("crash-then-clean") {
        return crash_child(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let (child, lines) = spawn_child(
        "the_interrupted_mark_survives_a_clean_restart_until_the_session_is_saved",
        "crash-then-clean",
        dir.path(),
    );
    wait_for_line(&lines, "ready");
    sigkill(child);
    wait_for_the_dead_processes_leases();

    runtime().block_on(async {
        // A process that opens the store and shuts it down cleanly without looking.
        open_file(dir.path()).await.shutdown().await.unwrap();
        // The next one still learns that "run" was cut off, from the listing and recovery.
        let m = open_file(dir.path()).await;
        let sessions = m.list_sessions().await.unwrap();
        assert_eq!(
            (session_info(&sessions, "run").status, session_info(&sessions, "run").interrupted),
            (SessionStatus::Running, true)
        );
        assert!(!session_info(&sessions, "done").interrupted);
        assert!(!session_info(&sessions, "held").interrupted);
        assert!(m.recover_session("run").await.unwrap().interrupted);
        m.shutdown().await.unwrap();

        // Looking does not clear it; picking the run up again does, for good.
        let m = open_file(dir.path()).await;
        assert!(m.recover_session("run").await.unwrap().interrupted);
        m.save_session("run", &run_state(7)).await.unwrap();
        assert!(!m.recover_session("run").await.unwrap().interrupted);
        m.shutdown().await.unwrap();
        let m = open_file(dir.path()).await;
        assert!(!session_info(&m.list_sessions().await.unwrap(), "run").interrupted);
        m.shutdown().await.unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_only_recorded_steps_is_listed_counted_and_deleted() {
    // Regression: such a session exists (loads return its state), but listings, stats and
    // delete went by the index alone, which has not caught up with it.
    let dir = tempfile::tempdir().unwrap();
    let m = open_file(dir.path()).await;
    m.record_step("run", 1, &run_state(1)).await.unwrap();
    assert_eq!(m.load_session("run").await.unwrap(), Some(run_state(1)));
    let sessions = m.list_sessions().await.unwrap();
    assert_eq!(session_info(&sessions, "run").status, SessionStatus::Running);
    assert_eq!(m.list_sessions_by_status(SessionStatus::Running).await.unwrap().len(), 1);
    assert_eq!(m.get_storage_stats().await.unwrap().session_count, 1);
    assert!(m.delete_session("run").await.unwrap(), "it existed");
    assert_eq!(m.load_session("run").await.unwrap(), None);
    assert!(m.list_sessions().await.unwrap().is_empty());
    assert_eq!(m.get_storage_stats().await.unwrap().session_count, 0);
    m.shutdown().await.unwrap();
    let m = open_file(dir.path()).await;
    assert_eq!(
        m.load_session("run").await.unwrap(),
        None,
        "the delete outlived the shutdown flush"
    );
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_failure_reasons_and_times_are_listed_and_recovered() {
    // Regression: the reason and time were stored in the record but reachable only by
    // reading the file.
    let dir = tempfile::tempdir().unwrap();
    let m = open_file(dir.path()).await;
    let before =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as u64;
    m.pause_session("held", &run_state(3), "waiting for approval").await.unwrap();
    m.save_session("broken", &run_state(1)).await.unwrap();
    m.fail_session("broken", "the model refused").await.unwrap();
    m.save_session("plain", &run_state(1)).await.unwrap();

    let check = |sessions: &[SessionInfo]| {
        let held = session_info(sessions, "held");
        assert_eq!(held.status, SessionStatus::Paused);
        assert_eq!(held.status_reason.as_deref(), Some("waiting for approval"));
        assert!(held.status_at.is_some_and(|t| t >= before), "{held:?}");
        let broken = session_info(sessions, "broken");
        assert_eq!(broken.status_reason.as_deref(), Some("the model refused"));
        assert!(broken.status_at.is_some_and(|t| t >= before));
        let plain = session_info(sessions, "plain");
        assert_eq!((plain.status_reason.as_deref(), plain.status_at), (None, None));
    };
    check(&m.list_sessions().await.unwrap());
    let r = m.recover_session("held").await.unwrap();
    assert_eq!(r.status_reason.as_deref(), Some("waiting for approval"));
    assert!(r.status_at.is_some_and(|t| t >= before));
    m.shutdown().await.unwrap();

    // After a clean restart (from the index journal) and after one that re-reads the records.
    let m = open_file(dir.path()).await;
    check(&m.list_sessions().await.unwrap());
    m.vacuum_storage().await.unwrap();
    check(&m.list_sessions().await.unwrap());

    // Resuming clears the reason and records when.
    m.resume_session("held").await.unwrap();
    let sessions = m.list_sessions().await.unwrap();
    let held = session_info(&sessions, "held");
    assert_eq!((held.status, held.status_reason.as_deref()), (SessionStatus::Running, None));
    assert!(held.status_at.is_some_and(|t| t >= before));
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_skips_a_corrupted_newest_checkpoint_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let m = open_file(dir.path()).await;
    m.set_checkpoint_policy("run", CheckpointPolicy::every_steps(1)).await.unwrap();
    let mut ids = Vec::new();
    for step in 1..=3 {
        ids.push(m.record_step("run", step, &run_state(step)).await.unwrap().unwrap());
    }
    m.shutdown().await.unwrap();
    drop(m);
    // Damaged through the store's backend (on the file backend: the record files), which
    // the test keeps beside the manager.
    let store = open_store(dir.path(), FileWrites::Defaults);
    flip_stored(&*store, &checkpoint_key("run", &ids[2]), |n| n / 2, 0x04).await;

    let m = builder_over(store.clone(), None).start().await.unwrap();
    let r = m.recover_session("run").await.unwrap();
    assert_eq!(r.state, Some(run_state(3)), "the session record is intact");
    let cp = r.checkpoint.expect("the checkpoint before the damaged one");
    assert_eq!((&cp.id, cp.step, &cp.data), (&ids[1], Some(2), &run_state(2)));
    assert_eq!(r.skipped.iter().map(|s| s.id.clone()).collect::<Vec<_>>(), [ids[2].clone()]);
    assert!(!r.skipped[0].reason.is_empty());

    // Two damaged: both skipped, newest first.
    flip_stored(&*store, &checkpoint_key("run", &ids[1]), |n| n / 3, 0x10).await;
    let r = m.recover_session("run").await.unwrap();
    assert_eq!(r.checkpoint.unwrap().id, ids[0]);
    assert_eq!(
        r.skipped.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        [ids[2].clone(), ids[1].clone()]
    );
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 6. Lineage
// ---------------------------------------------------------------------------------------

fn parents(cps: &[CheckpointInfo]) -> BTreeMap<CheckpointId, Option<CheckpointId>> {
    cps.iter().map(|c| (c.id.clone(), c.parent.clone())).collect()
}

#[tokio::test(start_paused = true)]
async fn checkpoints_record_their_parent_on_their_branch_and_rollback_forks_or_truncates() {
    let m = memory_manager(&MemoryStorageBackend::new(), CheckpointPolicy::on_demand()).await;
    let a1 = m.create_checkpoint("s", "main", &1).await.unwrap();
    let b1 = m.create_checkpoint("s", "alt", &101).await.unwrap();
    let a2 = m.create_checkpoint("s", "main", &2).await.unwrap();
    let b2 = m.create_checkpoint("s", "alt", &102).await.unwrap();
    let a3 = m.create_checkpoint("s", "main", &3).await.unwrap();
    let cps = m.list_checkpoints("s").await.unwrap();
    let expected: BTreeMap<CheckpointId, Option<CheckpointId>> = [
        (a1.clone(), None),
        (b1.clone(), None),
        (a2.clone(), Some(a1.clone())),
        (b2.clone(), Some(b1.clone())),
        (a3.clone(), Some(a2.clone())),
    ]
    .into();
    assert_eq!(parents(&cps), expected);
    assert_eq!(m.restore_checkpoint(&a3).await.unwrap().unwrap().parent, Some(a2.clone()));

    // Rollback without truncation keeps later checkpoints; the branch forks at a1.
    m.rollback_to_checkpoint(&a1).await.unwrap();
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!(1)));
    assert_eq!(m.list_checkpoints("s").await.unwrap().len(), 5);
    let a4 = m.create_checkpoint("s", "main", &4).await.unwrap();
    let b3 = m.create_checkpoint("s", "alt", &103).await.unwrap();
    let cps = m.list_checkpoints("s").await.unwrap();
    let p = parents(&cps);
    assert_eq!(p[&a4], Some(a1.clone()), "the fork's parent is the checkpoint rolled back to");
    assert_eq!(p[&a3], Some(a2.clone()), "the old line is kept");
    assert_eq!(p[&b3], Some(b2.clone()), "the other branch is untouched");

    // Rollback with truncation removes what came after a1 on main, and main only.
    m.rollback_and_truncate(&a1).await.unwrap();
    let left: Vec<CheckpointId> =
        m.list_checkpoints("s").await.unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(left, [a1.clone(), b1.clone(), b2.clone(), b3.clone()]);
    for gone in [&a2, &a3, &a4] {
        assert_eq!(m.restore_checkpoint(gone).await.unwrap(), None);
    }
    let a5 = m.create_checkpoint("s", "main", &5).await.unwrap();
    assert_eq!(m.restore_checkpoint(&a5).await.unwrap().unwrap().parent, Some(a1.clone()));
    // Truncating on alt leaves main alone.
    m.rollback_and_truncate(&b1).await.unwrap();
    let left: Vec<CheckpointId> =
        m.list_checkpoints("s").await.unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(left, [a1, b1, a5]);
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!(101)));
}

#[tokio::test(start_paused = true)]
async fn lineage_continues_across_a_restart() {
    let backend = MemoryStorageBackend::new();
    let m = memory_manager(&backend, CheckpointPolicy::on_demand()).await;
    let a1 = m.create_checkpoint("s", "main", &1).await.unwrap();
    let b1 = m.create_checkpoint("s", "alt", &101).await.unwrap();
    m.shutdown().await.unwrap();
    let m = memory_manager(&backend, CheckpointPolicy::on_demand()).await;
    let a2 = m.create_checkpoint("s", "main", &2).await.unwrap();
    let b2 = m.create_checkpoint("s", "alt", &102).await.unwrap();
    let p = parents(&m.list_checkpoints("s").await.unwrap());
    assert_eq!((&p[&a2], &p[&b2]), (&Some(a1), &Some(b1)));
    m.shutdown().await.unwrap();
}

/// Regression: the fork point set by `rollback_to_checkpoint` lives only in the session
/// actor's memory (`heads`), so it is lost when the actor passivates after its idle timeout
/// (60 s by default: a human taking a minute to decide is enough).
#[tokio::test(start_paused = true)]
async fn a_fork_survives_the_session_actor_going_idle() {
    let m = quiet(StateManager::builder(MemoryStorageBackend::new()))
        .idle_timeout(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let a1 = m.create_checkpoint("s", "main", &1).await.unwrap();
    m.create_checkpoint("s", "main", &2).await.unwrap();
    m.rollback_to_checkpoint(&a1).await.unwrap();
    tokio::time::advance(Duration::from_secs(3)).await;
    for _ in 0..40 {
        if m.live_session_actors().await.unwrap() == 0 {
            break;
        }
        settle().await;
    }
    assert_eq!(m.live_session_actors().await.unwrap(), 0, "the actor passivated");
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!(1)));
    let a3 = m.create_checkpoint("s", "main", &3).await.unwrap();
    assert_eq!(
        m.restore_checkpoint(&a3).await.unwrap().unwrap().parent,
        Some(a1),
        "the state derives from a1 (rolled back to), so the next checkpoint forks from it"
    );
}

/// Regression: as above, across a restart of the manager.
#[tokio::test(start_paused = true)]
async fn a_fork_survives_a_restart() {
    let backend = MemoryStorageBackend::new();
    let m = memory_manager(&backend, CheckpointPolicy::on_demand()).await;
    let a1 = m.create_checkpoint("s", "main", &1).await.unwrap();
    m.create_checkpoint("s", "main", &2).await.unwrap();
    m.rollback_to_checkpoint(&a1).await.unwrap();
    m.shutdown().await.unwrap();
    let m = memory_manager(&backend, CheckpointPolicy::on_demand()).await;
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!(1)));
    let a3 = m.create_checkpoint("s", "main", &3).await.unwrap();
    assert_eq!(m.restore_checkpoint(&a3).await.unwrap().unwrap().parent, Some(a1));
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 7. Watch
// ---------------------------------------------------------------------------------------

/// Every event the watch has queued, then checks that no more arrive.
async fn drain(w: &mut Watch, n: usize) -> Vec<mars_state::StateEvent> {
    let mut out = Vec::new();
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(5), w.recv()).await {
            Ok(Ok(e)) => out.push(e),
            Ok(Err(e)) => panic!("watch failed after {} events: {e}", out.len()),
            Err(_) => panic!("only {} of {n} events arrived: {out:?}", out.len()),
        }
    }
    // Paused time: the timeout elapses at once when nothing is left to run.
    if let Ok(extra) = tokio::time::timeout(Duration::from_secs(5), w.recv()).await {
        panic!("an unexpected extra event: {extra:?} after {out:?}");
    }
    out
}

#[tokio::test(start_paused = true)]
async fn watch_delivers_every_event_of_a_scripted_sequence_in_order() {
    let m = memory_manager(&MemoryStorageBackend::new(), CheckpointPolicy::on_demand()).await;
    let mut w = m.watch("run").await.unwrap();

    m.save_session("run", &run_state(0)).await.unwrap();
    let manual = m.create_checkpoint("run", "main", &run_state(0)).await.unwrap();
    m.set_checkpoint_policy("run", CheckpointPolicy::every_steps(2)).await.unwrap();
    assert_eq!(m.record_step("run", 1, &run_state(1)).await.unwrap(), None);
    let auto = m.record_step("run", 2, &run_state(2)).await.unwrap().unwrap();
    let pause = m.pause_session("run", &run_state(2), "approval").await.unwrap();
    m.resume_session("run").await.unwrap();
    m.complete_session("run", &run_state(3)).await.unwrap();
    m.rollback_to_checkpoint(&manual).await.unwrap();
    m.fail_session("run", "gave up").await.unwrap();
    assert!(m.delete_session("run").await.unwrap());

    use CheckpointReason as R;
    use EventKind as E;
    let expected = vec![
        E::Saved,
        E::Checkpointed { id: manual.clone(), reason: R::Manual, step: None },
        // record_step 1: in memory only, no event.
        E::Saved,
        E::Checkpointed { id: auto, reason: R::Steps, step: Some(2) },
        E::Saved,
        E::Checkpointed { id: pause, reason: R::Pause, step: Some(2) },
        E::Paused { reason: "approval".into() },
        E::Saved,
        E::Resumed,
        E::Saved,
        E::Completed,
        E::Saved,
        E::RolledBack { to: manual },
        E::Saved,
        E::Failed { reason: "gave up".into() },
        E::Deleted,
    ];
    let events = drain(&mut w, expected.len()).await;
    assert_eq!(events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(), expected);
    assert!(events.iter().all(|e| e.session_id.as_str() == "run"));
    assert!(events.windows(2).all(|p| p[0].at <= p[1].at), "timestamps never go back");
}

#[tokio::test(start_paused = true)]
async fn watch_all_sees_every_session_and_watch_one_sees_only_its_own() {
    let m = memory_manager(&MemoryStorageBackend::new(), CheckpointPolicy::on_demand()).await;
    let mut all = m.watch_all().await.unwrap();
    let mut only_a = m.watch("a").await.unwrap();
    let mut only_b = m.watch("b").await.unwrap();

    m.save_session("a", &1).await.unwrap();
    m.save_session("b", &2).await.unwrap();
    let cb = m.create_checkpoint("b", "main", &2).await.unwrap();
    m.save_session("a", &3).await.unwrap();
    m.delete_session("b").await.unwrap();

    let got = |v: Vec<mars_state::StateEvent>| {
        v.into_iter().map(|e| (e.session_id.to_string(), e.kind)).collect::<Vec<_>>()
    };
    let cp_b = EventKind::Checkpointed { id: cb, reason: CheckpointReason::Manual, step: None };
    assert_eq!(
        got(drain(&mut all, 5).await),
        [
            ("a".to_owned(), EventKind::Saved),
            ("b".to_owned(), EventKind::Saved),
            ("b".to_owned(), cp_b.clone()),
            ("a".to_owned(), EventKind::Saved),
            ("b".to_owned(), EventKind::Deleted),
        ]
    );
    assert_eq!(
        got(drain(&mut only_a, 2).await),
        [("a".to_owned(), EventKind::Saved), ("a".to_owned(), EventKind::Saved)]
    );
    assert_eq!(
        got(drain(&mut only_b, 3).await),
        [
            ("b".to_owned(), EventKind::Saved),
            ("b".to_owned(), cp_b),
            ("b".to_owned(), EventKind::Deleted)
        ]
    );
}

// ---------------------------------------------------------------------------------------
// 8. Golden fixtures and migrations
// ---------------------------------------------------------------------------------------

const FIXTURES_ENV: &str = "MARS_WRITE_FIXTURES";

/// The fixture stores: directory name and compression.
const FIXTURES: [(&str, Option<u32>); 2] = [("v1", None), ("v1-gzip", Some(6))];

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name)
}

fn msgs(n: u64) -> Vec<String> {
    (1..=n).map(|i| format!("message {i}")).collect()
}

/// A state of schema version 1 after `n` steps.
fn v1_state(n: u64) -> Value {
    json!({"msgs": msgs(n), "step": n})
}

/// The same state at schema version 2 (`msgs` renamed `messages`).
fn v2_state(n: u64) -> Value {
    json!({"messages": msgs(n), "step": n})
}

/// The v1 → v2 migration. Strict: a state without `msgs` (already v2) is an error, so a
/// record migrated twice would be noticed.
fn rename_msgs(mut v: Value) -> Result<Value, BoxError> {
    let obj = v.as_object_mut().ok_or("the state is not an object")?;
    let m = obj.remove("msgs").ok_or("no \"msgs\" field: not a v1 state")?;
    obj.insert("messages".to_owned(), m);
    Ok(v)
}

fn v2_app(b: StateManagerBuilder) -> StateManagerBuilder {
    b.schema_version(2).migration(1, rename_msgs)
}

/// What a checkpoint of the fixture holds: branch, reason, step, the step of its data
/// (`v1_state(n)`), and the index (in the session's list) of its parent.
type FixtureCheckpoint = (&'static str, CheckpointReason, Option<u64>, u64, Option<usize>);

/// Every session of the fixtures: id, status, the step of its state, its checkpoints
/// oldest first. Hard-coded from what `write_fixtures` does.
fn fixture_sessions() -> Vec<(&'static str, SessionStatus, u64, Vec<FixtureCheckpoint>)> {
    use CheckpointReason as R;
    vec![
        (
            "agent-a",
            SessionStatus::Running,
            4,
            vec![
                ("main", R::Steps, Some(2), 2, None),
                ("main", R::Steps, Some(4), 4, Some(0)),
                ("main", R::BeforeRisky, Some(4), 4, Some(1)),
                ("alt", R::Manual, Some(4), 3, None),
            ],
        ),
        ("agent-b", SessionStatus::Paused, 2, vec![("main", R::Pause, Some(2), 2, None)]),
        ("agent-c", SessionStatus::Completed, 5, vec![("main", R::Manual, None, 1, None)]),
    ]
}

/// Writes the fixture stores with today's code at schema version 1 (only with
/// `MARS_WRITE_FIXTURES=1`; otherwise it does nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_fixtures() {
    if std::env::var(FIXTURES_ENV).as_deref() != Ok("1") {
        return;
    }
    if !file_backend_only("write_fixtures", "fixtures are file stores") {
        return;
    }
    for (name, compression) in FIXTURES {
        let dir = fixture_path(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        let m = file_builder(&dir, compression).schema_version(1).start().await.unwrap();

        m.set_checkpoint_policy("agent-a", CheckpointPolicy::every_steps(2)).await.unwrap();
        for step in 1..=4 {
            m.record_step("agent-a", step, &v1_state(step)).await.unwrap();
        }
        m.checkpoint_before_risky("agent-a", "main", &v1_state(4)).await.unwrap();
        m.create_checkpoint("agent-a", "alt", &v1_state(3)).await.unwrap();

        for step in 1..=2 {
            m.record_step("agent-b", step, &v1_state(step)).await.unwrap();
        }
        m.pause_session("agent-b", &v1_state(2), "waiting for human review").await.unwrap();

        m.save_session("agent-c", &v1_state(1)).await.unwrap();
        m.create_checkpoint("agent-c", "main", &v1_state(1)).await.unwrap();
        m.complete_session("agent-c", &v1_state(5)).await.unwrap();
        m.shutdown().await.unwrap();

        // A clean store: no lock file, no running marker, no empty directories (git keeps none).
        for f in ["metadata/LOCK", "metadata/running"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        remove_empty_dirs(&dir);
    }
}

fn remove_empty_dirs(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            remove_empty_dirs(&path);
            if std::fs::read_dir(&path).unwrap().next().is_none() {
                std::fs::remove_dir(&path).unwrap();
            }
        }
    }
}

/// A copy of fixture `name` in a fresh temporary directory (fixtures are never opened in
/// place).
fn fixture_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let src = fixture_path(name);
    assert!(
        src.join("metadata").is_dir(),
        "fixture {} is missing; run `{FIXTURES_ENV}=1 cargo test --test lifecycle write_fixtures`",
        src.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    copy_dir(&src, &dir);
    (tmp, dir)
}

/// Fixture `name` as a fresh store on the chosen backend, named by the returned directory:
/// on the file backend a [`fixture_copy`]; on another, every file of the fixture imported
/// as the key of its path (the file backend keeps key `a/b` at path `a/b`), except the
/// lock and hidden files.
async fn fixture_store(name: &str) -> (tempfile::TempDir, PathBuf) {
    if on_file_backend() {
        return fixture_copy(name);
    }
    let src = fixture_path(name);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    let store = open_store(&dir, FileWrites::Defaults);
    let mut stack = vec![src.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                stack.push(path);
            } else if !rel.split('/').any(|s| s.starts_with('.')) && rel != "metadata/LOCK" {
                let key = StorageKey::new(rel).unwrap();
                store.put(&key, std::fs::read(&path).unwrap()).await.unwrap();
            }
        }
    }
    (tmp, dir)
}

/// Checks that `m` sees exactly the fixture sessions, with states of schema `state`.
async fn check_fixture(m: &StateManager, state: fn(u64) -> Value) {
    let sessions = m.list_sessions().await.unwrap();
    let expected = fixture_sessions();
    assert_eq!(
        sessions
            .iter()
            .map(|s| (s.session_id.to_string(), s.status, s.checkpoint_count, s.interrupted))
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|(id, st, _, cps)| (id.to_string(), *st, cps.len(), false))
            .collect::<Vec<_>>(),
    );
    for (id, _, step, cps_expected) in expected {
        assert_eq!(m.load_session(id).await.unwrap(), Some(state(step)), "state of {id}");
        let cps = m.list_checkpoints(id).await.unwrap();
        assert_eq!(cps.len(), cps_expected.len());
        for (i, (c, (branch, reason, cstep, data_step, parent))) in
            cps.iter().zip(cps_expected).enumerate()
        {
            let what = format!("checkpoint {i} of {id}");
            assert_eq!((c.branch_id.as_str(), c.reason, c.step), (branch, reason, cstep), "{what}");
            assert_eq!(c.parent, parent.map(|p| cps[p].id.clone()), "{what}: parent");
            assert_eq!(c.timestamp, c.id.timestamp_ms(), "{what}: timestamp");
            let full = m.restore_checkpoint(&c.id).await.unwrap().unwrap();
            assert_eq!(full.data, state(data_step), "{what}: data");
            assert_eq!(
                (full.reason, full.step, &full.parent, full.session_id.as_str()),
                (reason, cstep, &c.parent, id)
            );
        }
        let r = m.recover_session(id).await.unwrap();
        assert_eq!((r.state, r.interrupted), (Some(state(step)), false));
        assert_eq!(r.checkpoint.unwrap().id, cps.last().unwrap().id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_fixtures_load_unchanged_with_todays_code() {
    for (name, compression) in FIXTURES {
        let (_tmp, dir) = fixture_store(name).await;
        let m = file_builder(&dir, compression).start().await.unwrap();
        check_fixture(&m, v1_state).await;
        let stats = m.get_storage_stats().await.unwrap();
        assert_eq!((stats.session_count, stats.checkpoint_count), (3, 6), "{name}");
        m.shutdown().await.unwrap();
    }
}

#[test]
fn the_plain_v1_fixture_is_jq_readable_json_at_schema_1() {
    let (_tmp, dir) = fixture_copy("v1");
    let (sessions, checkpoints) = all_records(&dir);
    assert_eq!((sessions.len(), checkpoints.len()), (3, 6));
    for r in sessions.iter().chain(&checkpoints) {
        assert!(
            std::fs::read(r).unwrap().starts_with(br#"{"mars_state":1,"crc32":""#),
            "{}",
            r.display()
        );
        assert_eq!(read_record(r)["meta"]["schema"], 1, "{}", r.display());
    }
    let b = read_record(&dir.join("sessions").join("agent-b.json"));
    assert_eq!(
        (&b["meta"]["status"], &b["meta"]["reason"]),
        (&json!("paused"), &json!("waiting for human review"))
    );
    assert_eq!(b["data"], v1_state(2));
}

/// `"mars_state"` of a store's `metadata/store.json`, and the rest of it.
fn store_format(dir: &Path) -> (Value, Value) {
    let mut meta: Value =
        serde_json::from_slice(&std::fs::read(dir.join("metadata/store.json")).unwrap()).unwrap();
    let format = meta.as_object_mut().unwrap().remove("mars_state").unwrap();
    (format, meta)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_format_1_is_marked_format_2_by_an_open_for_writing_only() {
    if !file_backend_only(
        "a_store_of_format_1_is_marked_format_2_by_an_open_for_writing_only",
        "reads metadata/store.json as a file",
    ) {
        return;
    }
    for (name, compression) in FIXTURES {
        let (_tmp, dir) = fixture_copy(name);
        let (format, settings) = store_format(&dir);
        assert_eq!(format, 1, "{name}");
        let before = std::fs::read(dir.join("metadata/store.json")).unwrap();
        // Read-only: nothing is written, the records of format 1 load.
        let m = file_builder(&dir, compression).read_only().start().await.unwrap();
        check_fixture(&m, v1_state).await;
        m.shutdown().await.unwrap();
        assert_eq!(std::fs::read(dir.join("metadata/store.json")).unwrap(), before, "{name}");
        // For writing: marked format 2 at the open, settings kept, old records still load,
        // and a save writes a record of format 2 beside them.
        let m = file_builder_direct(&dir, compression).start().await.unwrap();
        assert_eq!(store_format(&dir), (json!(2), settings.clone()), "{name}");
        check_fixture(&m, v1_state).await;
        m.save_session("new", &json!({"n": 1})).await.unwrap();
        m.shutdown().await.unwrap();
        let m = file_builder(&dir, compression).start().await.unwrap();
        assert_eq!(m.load_session("new").await.unwrap(), Some(json!({"n": 1})), "{name}");
        assert_eq!(m.load_session("agent-b").await.unwrap(), Some(v1_state(2)), "{name}");
        m.shutdown().await.unwrap();
        if compression.is_none() {
            let new = std::fs::read(dir.join("sessions/new.json")).unwrap();
            assert!(new.starts_with(br#"{"mars_state":2,"crc32":""#), "{name}");
        }
        assert_eq!(store_format(&dir), (json!(2), settings), "{name}");
    }
    // A format this version does not know is refused, and the store is left as it is.
    let (_tmp, dir) = fixture_copy("v1");
    let later = br#"{"mars_state":3,"compression":"none","encrypted":false}"#;
    common::put_file(&dir.join("metadata/store.json"), later);
    let err = file_builder(&dir, None).start().await.expect_err("a store of format 3 opened");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("unsupported store format 3"), "{err}");
    assert_eq!(std::fs::read(dir.join("metadata/store.json")).unwrap(), later);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_fixtures_load_through_a_v1_to_v2_migration_and_migrate_store_rewrites_them() {
    if !file_backend_only(
        "v1_fixtures_load_through_a_v1_to_v2_migration_and_migrate_store_rewrites_them",
        "counts record files by schema",
    ) {
        return;
    }
    for (name, compression) in FIXTURES {
        let (_tmp, dir) = fixture_copy(name);
        let m = v2_app(file_builder_direct(&dir, compression)).start().await.unwrap();
        check_fixture(&m, v2_state).await;
        // Loads migrate in memory only: every record on disk is still at version 1.
        let (sessions, checkpoints) = all_records(&dir);
        assert_eq!((sessions.len(), checkpoints.len()), (3, 6), "{name}");
        assert_eq!(schemas(&sessions), at(1, 3), "{name}");
        assert_eq!(schemas(&checkpoints), at(1, 6), "{name}");

        let report = m.migrate_store().await.unwrap();
        assert_eq!((report.sessions, report.checkpoints), (3, 6), "{name}");
        assert_eq!(schemas(&sessions), at(2, 3), "{name}");
        assert_eq!(schemas(&checkpoints), at(2, 6), "{name}");
        for r in &sessions {
            let data = &read_record(r)["data"];
            assert!(
                data.get("messages").is_some() && data.get("msgs").is_none(),
                "{}",
                r.display()
            );
        }
        check_fixture(&m, v2_state).await;
        let again = m.migrate_store().await.unwrap();
        assert_eq!(
            (again.sessions, again.checkpoints),
            (0, 0),
            "{name}: a second pass rewrites nothing"
        );
        m.shutdown().await.unwrap();

        // A restart reads the v2 records as they are (the strict migration is not rerun).
        let m = v2_app(file_builder(&dir, compression)).start().await.unwrap();
        check_fixture(&m, v2_state).await;
        // Statuses survive the rewrite: the paused session resumes.
        assert_eq!(m.resume_session("agent-b").await.unwrap(), Some(v2_state(2)));
        m.shutdown().await.unwrap();
    }
}

/// Regression: `migrate_store` drops the session actor's cached state after rewriting the
/// on-disk record, throwing away steps recorded (in memory) but not yet flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_store_keeps_recorded_steps_that_are_not_flushed_yet() {
    let (_tmp, dir) = fixture_store("v1").await;
    let m = v2_app(file_builder(&dir, None)).start().await.unwrap();
    assert_eq!(m.record_step("agent-a", 5, &v2_state(5)).await.unwrap(), None);
    m.migrate_store().await.unwrap();
    assert_eq!(
        m.load_session("agent-a").await.unwrap(),
        Some(v2_state(5)),
        "the recorded step is still there"
    );
    m.shutdown().await.unwrap();
    let m = v2_app(file_builder(&dir, None)).start().await.unwrap();
    assert_eq!(
        m.load_session("agent-a").await.unwrap(),
        Some(v2_state(5)),
        "and was flushed at shutdown"
    );
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_newer_than_the_app_or_a_missing_migration_step_is_a_migration_error() {
    if !file_backend_only(
        "a_record_newer_than_the_app_or_a_missing_migration_step_is_a_migration_error",
        "counts record files by schema",
    ) {
        return;
    }
    // Newer than the app: migrate a copy to v2, then read it with a v1 app.
    let (_tmp, dir) = fixture_copy("v1");
    let m = v2_app(file_builder(&dir, None)).start().await.unwrap();
    m.migrate_store().await.unwrap();
    let cp = m.list_checkpoints("agent-a").await.unwrap()[0].id.clone();
    m.shutdown().await.unwrap();
    let m = file_builder(&dir, None).schema_version(1).start().await.unwrap();
    assert_eq!(m.load_session("agent-a").await.unwrap_err().kind(), ErrorKind::Migration);
    assert_eq!(m.restore_checkpoint(&cp).await.unwrap_err().kind(), ErrorKind::Migration);
    assert_eq!(m.recover_session("agent-a").await.unwrap_err().kind(), ErrorKind::Migration);
    assert_eq!(m.list_sessions().await.unwrap().len(), 3, "listing needs no migration");
    m.shutdown().await.unwrap();
    assert_eq!(schemas(&all_records(&dir).0), at(2, 3), "nothing was rewritten");

    // A missing step: v1 records, an app at v3 with only the 1 → 2 step, or none at all.
    let (_tmp, dir) = fixture_copy("v1");
    let apps: [fn(StateManagerBuilder) -> StateManagerBuilder; 2] =
        [|b| b.schema_version(3).migration(1, rename_msgs), |b| b.schema_version(2)];
    for app in apps {
        let m = app(file_builder(&dir, None)).start().await.unwrap();
        let cp = m.list_checkpoints("agent-c").await.unwrap()[0].id.clone();
        let err = m.load_session("agent-c").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Migration, "{err}");
        assert_eq!(m.restore_checkpoint(&cp).await.unwrap_err().kind(), ErrorKind::Migration);
        assert_eq!(m.migrate_store().await.unwrap_err().kind(), ErrorKind::Migration);
        m.shutdown().await.unwrap();
    }
    assert_eq!(schemas(&all_records(&dir).0), at(1, 3), "nothing was rewritten");
}

/// Sessions added to the v1 fixture for the interrupted-migration test.
const BULK: u64 = 150;

/// Session records rewritten when the parent kills the migrating child.
const KILL_AFTER: usize = BULK as usize / 3;

fn bulk_id(i: u64) -> String {
    format!("bulk-{i:03}")
}

/// The child: runs `migrate_store` with the v2 app until it is killed.
fn migrate_child(dir: &Path) {
    runtime().block_on(async {
        // Direct writes: the parent watches the record files change.
        let m = v2_app(file_builder_direct(dir, None)).start().await.unwrap();
        child_says("migrating");
        m.migrate_store().await.unwrap();
        child_says("migrated");
        tokio::time::sleep(CHILD_MAX_LIFETIME).await;
    });
}

#[test]
fn a_migrate_store_killed_midway_is_finished_by_the_next_pass() {
    if let Some(dir) = child_role("migrate") {
        return migrate_child(&dir);
    }
    if !file_backend_only(
        "a_migrate_store_killed_midway_is_finished_by_the_next_pass",
        "counts record files by schema",
    ) {
        return;
    }
    let (_tmp, dir) = fixture_copy("v1");
    runtime().block_on(async {
        let m = file_builder(&dir, None).start().await.unwrap();
        for i in 0..BULK {
            m.save_session(bulk_id(i), &v1_state(i % 5 + 1)).await.unwrap();
            m.create_checkpoint(bulk_id(i), "main", &v1_state(i % 5)).await.unwrap();
        }
        m.shutdown().await.unwrap();
    });
    let total_sessions = BULK as usize + 3;

    let (child, lines) =
        spawn_child("a_migrate_store_killed_midway_is_finished_by_the_next_pass", "migrate", &dir);
    wait_for_line(&lines, "migrating");
    // Kill once a third of the sessions are rewritten: the pass is well under way.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let migrated = schemas(&all_records(&dir).0).get(&2).copied().unwrap_or(0);
        if migrated >= KILL_AFTER {
            break;
        }
        assert!(Instant::now() < deadline, "the migration never got a third of the way");
        std::thread::sleep(Duration::from_millis(1));
    }
    sigkill(child);

    let (sessions, checkpoints) = all_records(&dir);
    let (s_left, c_left) = (
        schemas(&sessions).get(&1).copied().unwrap_or(0),
        schemas(&checkpoints).get(&1).copied().unwrap_or(0),
    );
    assert!(s_left > 0, "the kill came too late to interrupt the pass (raise BULK)");
    assert!(s_left < total_sessions, "some sessions were migrated before the kill");
    eprintln!("killed midway: {s_left} session and {c_left} checkpoint records still at v1");

    runtime().block_on(async {
        let m = v2_app(file_builder_direct(&dir, None)).start().await.unwrap();
        // Every session loads correctly, migrated on disk or not.
        for (id, _, step, _) in fixture_sessions() {
            assert_eq!(m.load_session(id).await.unwrap(), Some(v2_state(step)), "{id}");
        }
        for i in 0..BULK {
            assert_eq!(
                m.load_session(bulk_id(i)).await.unwrap(),
                Some(v2_state(i % 5 + 1)),
                "{}",
                bulk_id(i)
            );
            let cps = m.list_checkpoints(bulk_id(i)).await.unwrap();
            assert_eq!(cps.len(), 1);
            assert_eq!(
                m.restore_checkpoint(&cps[0].id).await.unwrap().unwrap().data,
                v2_state(i % 5)
            );
        }
        assert_eq!(m.list_sessions().await.unwrap().len(), total_sessions);
        let report = m.migrate_store().await.unwrap();
        assert_eq!(
            (report.sessions, report.checkpoints),
            (s_left, c_left),
            "the second pass does exactly the rest"
        );
        let (sessions, checkpoints) = all_records(&dir);
        assert_eq!(schemas(&sessions), at(2, total_sessions));
        assert_eq!(schemas(&checkpoints), at(2, BULK as usize + 6));
        let again = m.migrate_store().await.unwrap();
        assert_eq!((again.sessions, again.checkpoints), (0, 0));
        m.shutdown().await.unwrap();
    });
}
