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
//!   prints an ack after each `Ok`; it is SIGKILLed at a random moment, 10 times
//!   (`MARS_SQLITE_CRASH_ROUNDS`); after each kill a reopened store holds every acknowledged
//!   save and checkpoint, byte for byte, and nothing fails to load.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mars_state::middleware::crypto::EncryptionLayer;
use mars_state::{
    CheckpointId, EncryptionKey, ErrorKind, SqliteStorageBackend, StateManager, StorageBackend,
    StorageKey,
};
use serde_json::{Value, json};

/// Every awaited operation of a test finishes within this, or the test fails.
const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.unwrap_or_else(|_| panic!("{what} took over {LIMIT:?}"))
}

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
    let m = open_manager(&path, compression).await;
    let big = json!({ "pad": "z".repeat(50_000) });
    bounded("save", m.save_session("s1", &json!({ "step": 1 }))).await.unwrap();
    bounded("save", m.save_session("s2", &big)).await.unwrap();
    bounded("save", m.save_session("gone", &json!("bye"))).await.unwrap();
    let cp1 = bounded("checkpoint", m.create_checkpoint("s1", "main", &json!({ "step": 1 })))
        .await
        .unwrap();
    bounded("save", m.save_session("s1", &json!({ "step": 2 }))).await.unwrap();
    let cp2 = bounded("checkpoint", m.create_checkpoint("s1", "main", &json!({ "step": 2 })))
        .await
        .unwrap();
    assert!(bounded("delete", m.delete_session("gone")).await.unwrap());
    bounded("shutdown", m.shutdown()).await.unwrap();

    let m = open_manager(&path, compression).await;
    let s1: Option<Value> = bounded("load", m.load_session("s1")).await.unwrap();
    assert_eq!(s1, Some(json!({ "step": 2 })));
    let s2: Option<Value> = bounded("load", m.load_session("s2")).await.unwrap();
    assert_eq!(s2, Some(big));
    let gone: Option<Value> = bounded("load", m.load_session("gone")).await.unwrap();
    assert_eq!(gone, None, "a deleted session came back");
    let ids: Vec<_> = bounded("list", m.list_checkpoints("s1"))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, [cp1.clone(), cp2]);
    let restored = bounded("restore", m.restore_checkpoint(&cp1)).await.unwrap();
    assert_eq!(restored.map(|c| c.data), Some(json!({ "step": 1 })));
    let mut sessions: Vec<String> = bounded("list sessions", m.list_sessions())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.session_id.to_string())
        .collect();
    sessions.sort();
    assert_eq!(sessions, ["s1", "s2"]);
    bounded("shutdown", m.shutdown()).await.unwrap();
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
    let key = StorageKey::new("metadata/bytes.log").unwrap();
    let every: Vec<u8> = (0..=255u8).collect();
    bounded("append", b.append(&key, every.clone())).await.unwrap();
    bounded("append", b.append(&key, vec![0, 0xff, 0xfe, 0])).await.unwrap();
    let mut want = every;
    want.extend([0, 0xff, 0xfe, 0]);
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(want));
    let listed = bounded("list", b.list(&StorageKey::new("metadata").unwrap())).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, 260, "the size of an appended value is not its byte count");
    // A delete removes the appended pieces with the value; a new log starts empty.
    assert!(bounded("delete", b.delete(&key)).await.unwrap());
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), None);
    bounded("append", b.append(&key, b"new".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(b"new".to_vec()));
    // Many appends, then a put replaces them all.
    for i in 0..100u8 {
        bounded("append", b.append(&key, vec![i])).await.unwrap();
    }
    let got = bounded("get", b.get(&key)).await.unwrap().unwrap();
    assert_eq!(got.len(), 103);
    assert_eq!(&got[3..], (0..100u8).collect::<Vec<_>>().as_slice(), "appends out of order");
    bounded("put", b.put(&key, b"compacted".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(b"compacted".to_vec()));
    let listed = bounded("list", b.list(&StorageKey::new("metadata").unwrap())).await.unwrap();
    assert_eq!(listed[0].size, 9);
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
// Crash test: a child saves in a loop, acking each Ok on stdout, and is SIGKILLed.

/// Set in the child's environment to the database path; makes `crash_child` the saver.
const CHILD_ENV: &str = "MARS_SQLITE_CRASH_CHILD";
const SESSIONS: u64 = 4;

fn session(s: u64) -> String {
    format!("crash-s{s}")
}

/// What `seq` is: every third one a checkpoint, sessions take turns.
fn op_of(seq: u64) -> (u64, bool) {
    (seq % SESSIONS, seq.is_multiple_of(3))
}

/// The value saved at `seq`: 200 bytes to 8 KB, determined by `seq`.
fn payload(seq: u64) -> Value {
    let len = 200 + (seq.wrapping_mul(7919) % 8000) as usize;
    let c = char::from(b'a' + (seq % 26) as u8);
    json!({ "seq": seq, "pad": c.to_string().repeat(len) })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The child: a no-op unless the parent set `CHILD_ENV`.
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else { return };
    runtime().block_on(async {
        let m = open_manager(Path::new(&path), None).await;
        // Resume from what is stored, so seqs keep rising across rounds.
        let mut seq = 0;
        for s in 0..SESSIONS {
            if let Some(v) = m.load_session(&session(s)).await.unwrap() {
                seq = seq.max(v["seq"].as_u64().unwrap());
            }
            if let Some(last) = m.list_checkpoints(&session(s)).await.unwrap().last() {
                let cp = m.restore_checkpoint(&last.id).await.unwrap().unwrap();
                seq = seq.max(cp.data["seq"].as_u64().unwrap());
            }
        }
        let mut out = std::io::stdout();
        out.write_all(b"\n").unwrap();
        let started = Instant::now();
        while started.elapsed() < LIMIT {
            seq += 1;
            let (s, checkpoint) = op_of(seq);
            let line = if checkpoint {
                let id = m.create_checkpoint(session(s), "main", &payload(seq)).await.unwrap();
                format!("ack {seq} cp {id}\n")
            } else {
                m.save_session(session(s), &payload(seq)).await.unwrap();
                format!("ack {seq} save\n")
            };
            out.write_all(line.as_bytes()).unwrap();
            out.flush().unwrap();
        }
    });
}

/// A small xorshift generator for kill delays; the seed is printed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_while_saving() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let rounds: usize =
        std::env::var("MARS_SQLITE_CRASH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
            | 1;
    println!("kill delays from seed {seed}");
    let mut rng = XorShift(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    // Highest acked save per session; every acked checkpoint (id, seq).
    let mut acked_save = [0u64; SESSIONS as usize];
    let mut acked_cps: Vec<(CheckpointId, u64)> = Vec::new();
    let mut total_acks = 0;
    for round in 0..rounds {
        let acks = kill_a_child(&path, Duration::from_millis(2 + rng.next() % 60));
        total_acks += acks.len();
        for (seq, cp) in acks {
            let (s, _) = op_of(seq);
            match cp {
                Some(id) => acked_cps.push((id.parse().unwrap(), seq)),
                None => acked_save[s as usize] = acked_save[s as usize].max(seq),
            }
        }
        runtime().block_on(check_store(&path, &acked_save, &acked_cps, round));
    }
    println!(
        "{rounds} kills, {total_acks} acknowledged writes, {} checkpoints: none lost, none corrupt",
        acked_cps.len()
    );
}

/// Runs a child until its first ack, lets it save for `delay` more, SIGKILLs it, and
/// returns every ack it printed: (seq, checkpoint id for a checkpoint).
fn kill_a_child(path: &Path, delay: Duration) -> Vec<(u64, Option<String>)> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + LIMIT;
    // Wait (bounded) for the first ack: the child has opened the store and is saving.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the child printed no ack within {LIMIT:?}")
        });
        let first = line.starts_with("ack ");
        lines.push(line);
        if first {
            break;
        }
    }
    // The kill moment: a random delay after the first ack (not a synchronization).
    std::thread::sleep(delay);
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("ack "))
        .map(|ack| {
            let mut parts = ack.split(' ');
            let seq: u64 = parts.next().unwrap().parse().unwrap();
            let cp = match parts.next() {
                Some("cp") => Some(parts.next().unwrap().to_owned()),
                _ => None,
            };
            (seq, cp)
        })
        .collect()
}

/// Reopens the store after a kill: every acked save and checkpoint is there, exactly.
async fn check_store(
    path: &PathBuf,
    acked_save: &[u64],
    acked_cps: &[(CheckpointId, u64)],
    round: usize,
) {
    let m = open_manager(path, None).await;
    for s in 0..SESSIONS {
        let stored = bounded("load", m.load_session(&session(s)))
            .await
            .unwrap_or_else(|e| panic!("round {round}: session {s} does not load: {e}"));
        let Some(stored) = stored else {
            assert_eq!(acked_save[s as usize], 0, "round {round}: session {s} lost");
            continue;
        };
        let seq = stored["seq"].as_u64().unwrap();
        assert_eq!(stored, payload(seq), "round {round}: session {s} holds a wrong value");
        assert!(
            seq >= acked_save[s as usize],
            "round {round}: session {s} holds seq {seq}, older than its acked {}",
            acked_save[s as usize]
        );
        for cp in bounded("list", m.list_checkpoints(&session(s))).await.unwrap() {
            let restored = bounded("restore", m.restore_checkpoint(&cp.id))
                .await
                .unwrap_or_else(|e| panic!("round {round}: checkpoint {} is damaged: {e}", cp.id));
            let data = restored.unwrap().data;
            assert_eq!(data, payload(data["seq"].as_u64().unwrap()), "round {round}");
        }
    }
    for (id, seq) in acked_cps {
        let restored = bounded("restore", m.restore_checkpoint(id)).await.unwrap();
        assert_eq!(
            restored.map(|c| c.data),
            Some(payload(*seq)),
            "round {round}: acked checkpoint {id} (seq {seq}) lost or wrong"
        );
    }
    bounded("shutdown", m.shutdown()).await.unwrap();
    // And SQLite's own check of the file: every page and index entry consistent.
    let db = rusqlite::Connection::open(path).unwrap();
    let check: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok", "round {round}: the database file is damaged");
}
