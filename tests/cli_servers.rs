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

use std::io::{BufRead, BufReader};
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
/// the events the tool printed, after stopping it with SIGINT (it must exit 0).
async fn watched<F, Fut>(url: &str, act: F) -> Vec<Value>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut child = bin()
        .args(["watch", url, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The tool says on stderr when it is watching.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(first.starts_with("watching"), "{first}");
    act().await;
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.contains("\"completed\"");
            lines.push(json(&line));
            if done {
                break;
            }
        }
        lines
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGINT, as Ctrl-C would send.
    let sent = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(sent.unwrap().success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "watch did not end cleanly on SIGINT");
    assert!(reader.is_finished(), "the events did not arrive within 30 s");
    reader.join().unwrap()
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
