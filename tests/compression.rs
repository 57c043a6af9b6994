//! Pins that a store opens whatever compression the manager is configured with (issue 10,
//! defect 9): a store keeps the record format it was created with (plain `.json`, or gzip
//! `.json.gz` that `zcat | jq` reads), the builder's `compression(level)` sets the level of
//! a gzip store's new records, and every record, session list and checkpoint list reads
//! back. Opening an encrypted store without its key, or a plain one with a key, stays a
//! configuration error (tests/encryption.rs).

mod common;

use std::io::Read;
use std::path::Path;

use common::{open, session_file};
use mars_state::StateManager;
use serde_json::{Value, json};

/// Two sessions, each with a state and a checkpoint.
async fn fill(m: &StateManager) {
    for s in ["a", "b"] {
        m.save_session(s, &json!({"s": s, "v": 1})).await.unwrap();
        m.create_checkpoint(s, "main", &json!({"s": s, "cp": 1})).await.unwrap();
    }
}

/// Everything `fill` and the earlier `new_session` calls wrote reads back, listings included.
async fn check(m: &StateManager, extra: &[String]) {
    let mut ids: Vec<String> =
        m.list_sessions().await.unwrap().into_iter().map(|s| s.session_id.to_string()).collect();
    ids.sort();
    let mut want: Vec<String> =
        ["a", "b"].iter().map(|s| s.to_string()).chain(extra.iter().cloned()).collect();
    want.sort();
    assert_eq!(ids, want);
    for s in ["a", "b"] {
        assert_eq!(m.load_session(s).await.unwrap(), Some(json!({"s": s, "v": 1})), "{s}");
        let cps = m.list_checkpoints(s).await.unwrap();
        assert_eq!(cps.len(), 1, "{s}");
        assert_eq!(
            m.restore_checkpoint(&cps[0].id).await.unwrap().unwrap().data,
            json!({"s": s, "cp": 1})
        );
    }
    for s in extra {
        assert_eq!(m.load_session(s).await.unwrap(), Some(json!({"new": s})), "{s}");
        assert_eq!(m.list_checkpoints(s).await.unwrap().len(), 1, "{s}");
    }
}

async fn new_session(m: &StateManager, s: &str) {
    m.save_session(s, &json!({"new": s})).await.unwrap();
    m.create_checkpoint(s, "main", &json!({"new": s})).await.unwrap();
}

/// The record of `s` as JSON, read the way the README says: `jq` for a plain store,
/// `zcat | jq` for a gzip one.
fn read_record(dir: &Path, s: &str, gzip: bool) -> Value {
    let level = gzip.then_some(6);
    let bytes = std::fs::read(session_file(dir, s, level)).unwrap();
    let text = if gzip {
        let mut out = String::new();
        gunzip(&bytes, &mut out);
        out
    } else {
        String::from_utf8(bytes).unwrap()
    };
    serde_json::from_str(&text).unwrap()
}

/// Gunzips with the system's `gzip -dc` (as `zcat` does), so the test needs no gzip crate.
fn gunzip(bytes: &[u8], out: &mut String) {
    let mut child = std::process::Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), bytes).unwrap();
    child.stdout.take().unwrap().read_to_string(out).unwrap();
    assert!(child.wait().unwrap().success(), "gzip -dc failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_store_opens_without_compression_and_at_other_levels() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), Some(6)).await;
    fill(&m).await;
    m.shutdown().await.unwrap();

    let mut extra = Vec::new();
    for (round, level) in [None, Some(1), Some(9), None].into_iter().enumerate() {
        let m = common::builder(dir.path(), level)
            .start()
            .await
            .unwrap_or_else(|e| panic!("gzip store opened with compression {level:?}: {e}"));
        check(&m, &extra).await;
        let s = format!("new{round}");
        new_session(&m, &s).await;
        extra.push(s.clone());
        check(&m, &extra).await;
        m.shutdown().await.unwrap();
        // New records keep the store's format: gzip, `.json.gz`, readable with zcat.
        assert_record(&read_record(dir.path(), &s, true), &s);
    }
    let m = open(dir.path(), Some(6)).await;
    check(&m, &extra).await;
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_store_opens_with_compression() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), None).await;
    fill(&m).await;
    m.shutdown().await.unwrap();

    let m = common::builder(dir.path(), Some(6))
        .start()
        .await
        .unwrap_or_else(|e| panic!("plain store opened with compression(6): {e}"));
    let new = ["new".to_owned()];
    check(&m, &[]).await;
    new_session(&m, "new").await;
    check(&m, &new).await;
    m.shutdown().await.unwrap();
    // The store stays plain JSON that `jq` reads.
    assert_record(&read_record(dir.path(), "new", false), "new");

    let m = open(dir.path(), None).await;
    check(&m, &new).await;
    m.shutdown().await.unwrap();
}

/// The record of a session saved by `new_session`.
#[track_caller]
fn assert_record(v: &Value, s: &str) {
    assert_eq!(
        (&v["kind"], &v["session_id"], &v["data"]),
        (&json!("session"), &json!(s), &json!({"new": s})),
        "{v}"
    );
}
