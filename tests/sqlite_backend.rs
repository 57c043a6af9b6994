//! The SQLite backend (feature `sqlite`): the conformance suite over `SqliteStorageBackend`
//! and `Encrypted<SqliteStorageBackend>`, and what a store on it must keep:
//!
//! - `manager_state_survives_reopen_{plain,gzip}`: sessions, checkpoints, listings, restores
//!   and deletes made through a `StateManager` are all there after shutdown and reopen.
//! - `appends_keep_every_byte`: appends of arbitrary bytes (NUL, 0xFF) concatenate byte for
//!   byte and in order, `list` reports the size in bytes, and a delete or a put replaces
//!   every appended piece.
//! - `second_open_is_locked`: a second backend on the same file gets `Locked` at once, a
//!   waiting one after its wait; after shutdown the file opens again.
//! - `garbage_file_is_corrupt`, `foreign_database_is_refused`: a file that is not a database
//!   fails the open with `Corrupt`; another application's SQLite database with `Config`;
//!   neither is modified.
//! - `sigkill_while_saving`: a child process (this binary re-executed) saves in a loop and
//!   prints an ack after each `Ok`; it is SIGKILLed at a random moment, 50 times
//!   (`MARS_SQLITE_CRASH_ROUNDS`); after each kill a reopened store holds every acknowledged
//!   save and checkpoint, byte for byte, nothing fails to load, the index agrees with the
//!   rows, and `PRAGMA integrity_check` passes (`common::oracle`, shared with the PostgreSQL
//!   and Redis backends' crash tests; counts printed).

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::oracle;

use mars_state::middleware::crypto::EncryptionLayer;
use mars_state::{
    EncryptionKey, ErrorKind, SqliteStorageBackend, StateManager, StorageBackend, StorageKey,
};
use serde_json::json;

/// Every awaited operation of a test finishes within this, or the test fails.
use common::bounded;

/// A fresh database in a temporary directory, kept alive beside the backend.
fn fresh() -> (SqliteStorageBackend, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (SqliteStorageBackend::open(dir.path().join("state.db")).unwrap(), dir)
}

fn layer() -> EncryptionLayer {
    EncryptionLayer::new(EncryptionKey::from_bytes([7; 32]))
}

mars_state::conformance_tests! {
    sqlite => fresh(),
    encrypted_sqlite => {
        let (backend, dir) = fresh();
        (layer().wrap(backend).await.unwrap(), dir)
    },
}

async fn open_manager(path: &Path, compression: Option<u32>) -> StateManager {
    let backend = SqliteStorageBackend::options().lock_wait(Duration::from_secs(5)).open(path);
    let mut builder = StateManager::builder(backend.unwrap());
    if let Some(level) = compression {
        builder = builder.compression(level);
    }
    bounded("start", builder.start()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_state_survives_reopen_plain() {
    manager_state_survives_reopen(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_state_survives_reopen_gzip() {
    manager_state_survives_reopen(Some(6)).await;
}

async fn manager_state_survives_reopen(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("state.db");
    oracle::state_survives_reopen(|| open_manager(&path, compression)).await;
    // A store's files: the database and its lock; the WAL is checkpointed and removed
    // when the last connection closes.
    let mut names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["state.db", "state.db-lock"]);
}

#[tokio::test]
async fn appends_keep_every_byte() {
    let (b, _dir) = fresh();
    common::backend::appends_keep_every_byte(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_open_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let m = open_manager(&path, None).await;
    bounded("save", m.save_session("s", &1)).await.unwrap();

    let t = Instant::now();
    let err = SqliteStorageBackend::open(&path).expect_err("a second backend opened a held store");
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(t.elapsed() < Duration::from_millis(100), "Locked after {:?}", t.elapsed());

    let t = Instant::now();
    let err = SqliteStorageBackend::options()
        .lock_wait(Duration::from_millis(200))
        .open(&path)
        .expect_err("a waiting backend opened a held store");
    let waited = t.elapsed();
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "lock_wait(200 ms) gave up after {waited:?}"
    );

    bounded("shutdown", m.shutdown()).await.unwrap();
    let m = open_manager(&path, None).await;
    let s = bounded("load", m.load_session("s")).await.unwrap();
    assert_eq!(s, Some(json!(1)));
    bounded("shutdown", m.shutdown()).await.unwrap();
}

#[test]
fn garbage_file_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let garbage: Vec<u8> =
        (0..8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::File::create(&path).unwrap().write_all(&garbage).unwrap();
    let err = SqliteStorageBackend::open(&path).expect_err("opened a file of garbage");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("state.db"), "the error does not name the file: {err}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage, "the open changed the damaged file");
}

#[test]
fn foreign_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('x');").unwrap();
    drop(other);
    let before = std::fs::read(&path).unwrap();
    let err = SqliteStorageBackend::open(&path).expect_err("opened another application's db");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    // Not a byte changed: not even the journal mode in its header (bytes 18 and 19).
    assert!(std::fs::read(&path).unwrap() == before, "the refused open changed the file");
    let other = rusqlite::Connection::open(&path).unwrap();
    let n: i64 = other.query_row("SELECT count(*) FROM notes", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 1);
    let tables: i64 =
        other.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0)).unwrap();
    assert_eq!(tables, 1, "the open added a table to another application's database");
}

// ------------------------------------------------------------------------------------------
// Crash test: a child saves in a loop, acking each Ok on stdout, and is SIGKILLed
// (`common::oracle`: the loop, the child's saves and the check are the other backends').

/// Set in the child's environment to the database path; makes `crash_child` the saver.
const CHILD_ENV: &str = "MARS_SQLITE_CRASH_CHILD";

/// The child: a no-op unless the parent set `CHILD_ENV`.
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else { return };
    oracle::run_saving_child(async move {
        SqliteStorageBackend::options().lock_wait(Duration::from_secs(5)).open(path).unwrap()
    });
}

#[test]
fn sigkill_while_saving() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let rt = oracle::runtime();
    oracle::sigkill_child_rounds(
        "SIGKILL of a process saving to SQLite",
        "MARS_SQLITE_CRASH_ROUNDS",
        || oracle::child_command("crash_child", CHILD_ENV, &path),
        |acked, counts, label| rt.block_on(check_store(&path, acked, counts, label)),
    );
}

/// Reopens the store after a kill and checks it (`common::oracle`; the findings are added to
/// `counts`, which the caller asserts), then SQLite's own check of the file: every page and
/// index entry consistent.
async fn check_store(
    path: &Path,
    acked: &mut oracle::Acked,
    counts: &mut oracle::Counts,
    label: &str,
) {
    let backend = SqliteStorageBackend::options()
        .lock_wait(Duration::from_secs(5))
        .open(path)
        .unwrap_or_else(|e| panic!("{label}: reopening failed: {e}"));
    oracle::check_backend(std::sync::Arc::new(backend), acked, counts, label).await;
    let db = rusqlite::Connection::open(path).unwrap();
    let check: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok", "{label}: the database file is damaged");
}

/// The check the crash tests rely on can fail: after a clean run, a removed session row and
/// a checkpoint row holding another checkpoint's bytes are reported LOST and CORRUPT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crash_oracle_catches_lost_and_corrupt_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let workload = oracle::BACKEND_WORKLOAD;
    let m = open_manager(&path, None).await;
    let mut lines = Vec::new();
    for seq in 1..=24 {
        lines.push(bounded("apply", workload.apply(&m, seq)).await);
    }
    bounded("shutdown", m.shutdown()).await.unwrap();
    let mut acked = oracle::Acked::new(workload);
    assert_eq!(acked.read(&lines, "clean run"), 24);

    let b = SqliteStorageBackend::options().lock_wait(Duration::from_secs(5)).open(&path).unwrap();
    let session = StorageKey::new(format!("sessions/{}.json", oracle::crash_session(1))).unwrap();
    assert!(bounded("delete", b.delete(&session)).await.unwrap(), "no row {session}");
    let cps = StorageKey::new(format!("checkpoints/{}", oracle::crash_session(0))).unwrap();
    let rows = bounded("list", b.list(&cps)).await.unwrap();
    assert!(rows.len() >= 2, "session 0 has {} checkpoints", rows.len());
    let other = bounded("get", b.get(&rows[1].key)).await.unwrap().unwrap();
    bounded("put", b.put(&rows[0].key, other)).await.unwrap();
    drop(b);

    let mut counts = oracle::Counts::default();
    check_store(&path, &mut acked, &mut counts, "damaged").await;
    println!("crash oracle on a damaged store: {}", counts.summary());
    assert!(counts.lost >= 1 && counts.corrupt >= 1, "the oracle missed damage: {counts:?}");
}
