//! The `mars-state` binary on the server backends: a PostgreSQL database and a private
//! durable Redis of each test's own (removed after). The same golden timeline and diff as
//! the file stores (tests/cli_golden/), gzipped and encrypted stores, `watch` printing
//! another process's events as they happen, and `copy` from files to each server and back.

mod cli_common;
mod common;
#[allow(unused_imports)]
mod pg_common;
#[allow(dead_code)]
#[path = "redis_backend/support.rs"]
mod redis_support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cli_common::*;
use mars_state::{PostgresStorageBackend, RedisStorageBackend, StateManager, StorageBackend};
use serde_json::Value;

const PASSPHRASE: &str = "correct horse battery staple";

fn golden(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli_golden").join(name);
    std::fs::read_to_string(path).unwrap()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Builds the demo store on `backend` (gzipped, and encrypted with `passphrase` if given).
async fn demo_on(backend: impl StorageBackend, passphrase: Option<&str>) -> Vec<String> {
    let mut b = StateManager::builder(backend).compression(6);
    if let Some(p) = passphrase {
        b = b.encryption_passphrase(p);
    }
    let m = b.start().await.unwrap();
    let ids = build_demo(&m).await;
    m.shutdown().await.unwrap();
    ids
}

/// `log`, `diff`, `ls` and `show` of the demo store at `url` (with `passphrase`).
fn reads_like_the_file_store(url: &str, ids: &[String], passphrase: Option<&str>) {
    let run = |args: &[&str]| {
        let mut c = bin();
        c.args(args);
        if let Some(p) = passphrase {
            c.env("MARS_STATE_PASSPHRASE", p);
        }
        expect_with(&mut c, 0)
    };
    assert_eq!(normalise(&run(&["log", url, "research-1"])), golden("log.txt"));
    assert_eq!(
        normalise(&run(&["diff", url, "research-1", &ids[0], "current"])),
        golden("diff.txt")
    );
    let ls = json(&run(&["ls", url, "--json"]));
    let names: Vec<&str> =
        ls.as_array().unwrap().iter().map(|s| s["session_id"].as_str().unwrap()).collect();
    assert_eq!(names, ["report-3", "research-1", "scrape-2", "triage-7"]);
    assert_eq!(json(&run(&["show", url, "triage-7"]))["step"], 3);
}

/// Runs `watch URL --json` while `act` changes the store through another manager; returns
/// the events the tool printed up to the session's completion, after stopping it with
/// SIGINT (it must exit 0).
async fn watched<F, Fut>(url: &str, act: F) -> Vec<Value>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (child, lines) = spawn_watch(&[url, "--json"], &[]);
    act().await;
    let mut events = Vec::new();
    loop {
        let line = lines.recv_timeout(Duration::from_secs(30));
        let line = line
            .unwrap_or_else(|e| panic!("the events did not arrive within 30 s ({e}): {events:?}"));
        let done = line.contains("\"completed\"");
        events.push(json(&line));
        if done {
            break;
        }
    }
    interrupt_watch(child);
    events
}

/// Saves, checkpoints and completes `live-1` through a manager of its own on `url`.
async fn change(backend: impl StorageBackend) {
    let m = StateManager::start(backend).await.unwrap();
    m.save_session("live-1", &serde_json::json!({"step": 1})).await.unwrap();
    m.create_checkpoint("live-1", "main", &serde_json::json!({"step": 1})).await.unwrap();
    m.complete_session("live-1", &serde_json::json!({"step": 2})).await.unwrap();
    m.shutdown().await.unwrap();
}

fn check_events(events: &[Value]) {
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    // Completing saves the final state, then marks the session.
    assert_eq!(kinds, ["saved", "checkpointed", "saved", "completed"], "{events:?}");
    assert!(events.iter().all(|e| e["session_id"] == "live-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stores_gzipped_and_encrypted() {
    let db = pg_common::Database::new().await;
    let url = db.url();
    let ids = demo_on(PostgresStorageBackend::connect(&url).await.unwrap(), None).await;
    reads_like_the_file_store(&url, &ids, None);
    let stats = json(&expect(&["stats", &url, "--json"], 0));
    assert_eq!(stats["session_count"], 4);
    expect(&["vacuum", &url], 0);

    let enc = pg_common::Database::new().await;
    let enc_url = enc.url();
    let enc_ids =
        demo_on(PostgresStorageBackend::connect(&enc_url).await.unwrap(), Some(PASSPHRASE)).await;
    reads_like_the_file_store(&enc_url, &enc_ids, Some(PASSPHRASE));
    stderr_of(&["ls", &enc_url], 4);

    // A database with no store in it: exit code 3, and it stays without one.
    let empty = pg_common::Database::new().await;
    let err = stderr_of(&["ls", &empty.url()], 3);
    assert!(err.contains("no mars-state store"), "{err}");
    let (client, conn) =
        tokio_postgres::connect(&empty.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let tables = "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'mars_state%'";
    let made: i64 = client.query_one(tables, &[]).await.unwrap().get(0);
    assert_eq!(made, 0, "`ls` made the store's tables");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_watch_prints_another_process_s_events() {
    let db = pg_common::Database::new().await;
    let url = db.url();
    demo_on(PostgresStorageBackend::connect(&url).await.unwrap(), None).await;
    let events = watched(&url, || async {
        change(PostgresStorageBackend::connect(&url).await.unwrap()).await;
    })
    .await;
    check_events(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stores_and_watch() {
    let server = redis_support::Server::start();
    let url = server.url();
    let ids = demo_on(RedisStorageBackend::connect(&url).await.unwrap(), None).await;
    reads_like_the_file_store(&url, &ids, None);
    let events = watched(&url, || async {
        change(RedisStorageBackend::connect(&url).await.unwrap()).await;
    })
    .await;
    check_events(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_files_to_each_server_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("state");
    demo_file_store(&files, true, None).await;
    let f = files.to_str().unwrap();
    let want = expect(&["ls", f, "--json"], 0);
    let db = pg_common::Database::new().await;
    let server = redis_support::Server::start();
    for url in [db.url(), server.url()] {
        let out = json(&expect(&["copy", "--from", f, "--to", &url, "--json"], 0));
        assert!(out["copied"].as_u64().unwrap() >= 10, "{out}");
        assert_eq!(expect(&["ls", &url, "--json"], 0), want, "{url}");
        let back = dir.path().join(format!("back-{}", url.split(':').next().unwrap()));
        let b = back.to_str().unwrap();
        expect(&["copy", "--from", &url, "--to", b], 0);
        assert_eq!(expect(&["ls", b, "--json"], 0), want);
        assert_eq!(normalise(&expect(&["log", b, "research-1"], 0)), golden("log.txt"));
    }
}

/// Sessions and checkpoints of the store (issue 14): 1,000 and 10,000.
const BIG_SESSIONS: usize = 1_000;
const BIG_CHECKPOINTS_PER_SESSION: usize = 10;

/// Fills the file store at `dir` with `BIG_SESSIONS` sessions of `BIG_CHECKPOINTS_PER_SESSION`
/// checkpoints each (states of a few hundred bytes, every session its own), through the
/// library as an application would, many sessions at once (the log's group commit makes
/// that fast).
async fn big_file_store(dir: &Path) {
    use futures_util::stream::{self, StreamExt};
    let m = StateManager::start(mars_state::FileStorageBackend::new(dir).unwrap()).await.unwrap();
    stream::iter(0..BIG_SESSIONS)
        .map(|i| {
            let m = m.clone();
            async move {
                let session = format!("agent-{i:04}");
                for step in 0..BIG_CHECKPOINTS_PER_SESSION {
                    let state = serde_json::json!({
                        "session": i, "step": step, "plan": format!("task {i}, step {step}"),
                        "notes": (0..step).map(|n| format!("note {n} of {i}")).collect::<Vec<_>>(),
                    });
                    m.create_checkpoint(&session, "main", &state).await.unwrap();
                }
                let last = serde_json::json!({"session": i, "step": BIG_CHECKPOINTS_PER_SESSION});
                m.save_session(&session, &last).await.unwrap();
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    m.shutdown().await.unwrap();
}

/// A temporary directory in memory (`/dev/shm`, where there is one), else the usual one.
/// The file backend `fdatasync`s every record file (twice over: its log, then the record
/// files it brings up to date at shutdown), which on this test's 22,000 record files costs
/// more than everything else together; the copy's behaviour is the same on either.
fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new().prefix("mars-cli-copy-").tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().unwrap()
}

/// `mars-state export STORE` into `dir/name`; the dump's bytes.
fn exported(store: &str, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    let report = json(&expect(&["export", store, "--out", out.to_str().unwrap(), "--json"], 0));
    assert_eq!(report["sessions"], BIG_SESSIONS, "{store}: {report}");
    assert_eq!(report["checkpoints"], BIG_SESSIONS * BIG_CHECKPOINTS_PER_SESSION, "{report}");
    std::fs::read(out).unwrap()
}

/// What a store's PostgreSQL database holds: (record rows, of them checkpoints, log rows,
/// the copy's marker there); zeros while the copy has not made the tables yet.
async fn pg_rows(url: &str) -> (u64, u64, u64, bool) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    let sql = "SELECT (SELECT count(*) FROM public.mars_state_records), \
                      (SELECT count(*) FROM public.mars_state_records \
                        WHERE key LIKE 'checkpoints/%'), \
                      (SELECT count(*) FROM public.mars_state_log), \
                      (SELECT count(*) FROM public.mars_state_records \
                        WHERE key = 'metadata/copying')";
    let rows = match client.query_one(sql, &[]).await {
        Ok(row) => {
            let n = |i: usize| row.get::<_, i64>(i) as u64;
            (n(0), n(1), n(2), n(3) == 1)
        }
        // The tables are made when the copy connects.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            (0, 0, 0, false)
        }
        Err(e) => panic!("{sql}: {e}"),
    };
    drop(client);
    let _ = conn.await;
    rows
}

/// Issue 14's acceptance test: a file store of 1,000 sessions and 10,000 checkpoints copied
/// to PostgreSQL and back to files, the three exports byte-identical; then a copy into
/// another database SIGKILLed midway (the target holds some but not all records, and says
/// it is an unfinished copy), run again: it finishes, skips what was there, and the store
/// exports as the original, with no record twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_a_big_store_to_postgres_and_back_and_after_a_kill() {
    let started = std::time::Instant::now();
    let lap = |what: &str| eprintln!("{:>6.1} s  {what}", started.elapsed().as_secs_f64());
    let dir = fast_tempdir();
    let files = dir.path().join("files");
    big_file_store(&files).await;
    lap("file store built");
    let f = files.to_str().unwrap();
    let original = exported(f, dir.path(), "original.jsonl");
    lap("original exported");

    let db = pg_common::Database::new().await;
    let url = db.url();
    let out = json(&expect(&["copy", "--from", f, "--to", &url, "--json"], 0));
    lap("copied to PostgreSQL");
    let keys = out["copied"].as_u64().unwrap();
    assert!(keys > (BIG_SESSIONS * (BIG_CHECKPOINTS_PER_SESSION + 1)) as u64, "{out}");
    assert_eq!((out["already_there"].as_u64(), out["removed"].as_u64()), (Some(0), Some(0)));
    let whole = pg_rows(&url).await;
    assert_eq!(whole, (keys, (BIG_SESSIONS * BIG_CHECKPOINTS_PER_SESSION) as u64, 0, false));
    let files2 = dir.path().join("files2");
    let f2 = files2.to_str().unwrap();
    let back = json(&expect(&["copy", "--from", &url, "--to", f2, "--json"], 0));
    lap("copied back to files");
    assert_eq!(back["copied"].as_u64(), Some(keys), "{back}");
    assert!(original == exported(f2, dir.path(), "files2.jsonl"), "FILES2 exports otherwise");
    assert!(original == exported(&url, dir.path(), "pg.jsonl"), "PostgreSQL exports otherwise");
    lap("both exported");

    // Killed midway: polled until the target holds a quarter of the keys, then SIGKILL.
    let killed_db = pg_common::Database::new().await;
    let killed = killed_db.url();
    let mut child = bin()
        .args(["copy", "--from", f, "--to", &killed])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        assert!(child.try_wait().unwrap().is_none(), "the copy ended before it was killed");
        if pg_rows(&killed).await.0 >= keys / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // A statement the server had already received may still commit after the client died:
    // counted once the count holds still.
    let mut last = pg_rows(&killed).await;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = pg_rows(&killed).await;
        if now == last {
            break;
        }
        last = now;
    }
    let (rows, _, _, marker) = last;
    lap(&format!("copy killed with {rows} of {keys} keys in the target"));
    assert!(rows >= keys / 4 && rows < keys, "not killed midway: {rows} of {keys} keys");
    assert!(marker, "the half copy does not say it is one");
    let err = stderr_of(&["ls", &killed], 3);
    assert!(err.contains("copy"), "a half copy opened as a store: {err}");

    let again = json(&expect(&["copy", "--from", f, "--to", &killed, "--json"], 0));
    lap("copy run again");
    // Every key the killed copy wrote is whole (each put is one transaction) and is skipped;
    // the marker, counted in `rows`, is no key of the source.
    let skipped = again["already_there"].as_u64().unwrap();
    assert_eq!(skipped, rows - 1, "{again}");
    assert_eq!(again["copied"].as_u64().unwrap() + skipped, keys, "{again}");
    assert_eq!(pg_rows(&killed).await, whole, "the resumed copy holds other rows");
    assert!(original == exported(&killed, dir.path(), "killed.jsonl"), "resumed copy differs");
    lap("resumed copy exported");
}
