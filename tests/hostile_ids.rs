//! Pins what the store does with hostile input: ids, planted symbolic links, and payloads
//! that must never leak into error messages or logs.
//!
//! - Every manager method that takes a session or branch id rejects each of more than 60
//!   hostile ids with `ErrorKind::InvalidId`, spawns no actor and writes nothing: the whole
//!   temporary directory around the store is byte-for-byte the same afterwards.
//! - Hostile checkpoint id strings are rejected by `CheckpointId::parse`, `FromStr` and
//!   serde, so they cannot reach `restore_checkpoint` or `rollback_to_checkpoint`.
//! - Unusual but valid ids stay inside the store and do not collide.
//! - Symbolic links planted in the store are never followed: not to read, not to write,
//!   not to delete.
//! - Error messages (`Display` and `Debug`) and logs never contain the state's payload, and
//!   hostile ids appear in them escaped and cut short.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{
    JANITOR_HOURLY, backend, builder, diff, ext, file_backend_only, on_file_backend, open_quiet,
    plain_and_compressed, put_file, quiet, snapshot, temp_store,
};
use mars_state::{
    BranchId, CheckpointId, ErrorKind, FileStorageBackend, SessionId, StateError, StateManager,
    StorageKey,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

async fn start(base: &Path) -> StateManager {
    open_quiet(base, None).await
}

/// Escaped form for failure messages.
fn show(id: &str) -> String {
    let s: String = id.chars().take(40).flat_map(char::escape_debug).collect();
    if id.chars().count() > 40 { format!("{s}…({} chars)", id.chars().count()) } else { s }
}

/// Characters that must never appear raw in an error message: they break log lines or
/// reorder or hide text (bidi overrides, zero-width characters).
fn is_dangerous(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{AD}' | '\u{61C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{E0000}'..='\u{E007F}')
}

fn owned(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// More than 60 ids that must all be rejected.
fn hostile_ids() -> Vec<String> {
    let mut v = owned(&[
        // empty, dots, traversal, absolute paths, separators
        "",
        ".",
        "..",
        "...",
        "../x",
        "../../../../../../etc/passwd",
        "/etc/passwd",
        "/",
        "//",
        "a/b",
        "a/",
        "./a",
        "a/../b",
        "a:b/..",
        "a:b\\..",
        "a\\b",
        "..\\..\\x",
        "C:\\x",
        "C:\\Windows\\system32",
        "\\\\server\\share",
        // NUL and control characters
        "\0",
        "a\0b",
        "a\0",
        "a\nb",
        "a\r\nb",
        "a\tb",
        "\u{1b}[31mred",
        "a\u{7f}b",
        "a\u{85}b",
        "\u{1}",
        // bidi overrides and invisible format characters
        "a\u{202E}txt.exe",
        "\u{2066}a\u{2069}",
        "a\u{200B}b",
        "\u{200B}",
        "\u{FEFF}a",
        "a\u{AD}b",
        "a\u{2028}b",
        "a\u{200D}b",
        "a\u{61C}b",
        "a\u{E0041}",
        // percent-encodings
        "%2e%2e%2f",
        "..%2f..%2fetc%2fpasswd",
        "%00",
        // leading dot or dash
        ".hidden",
        ".a.tmp-0000000000000000",
        "-rf",
        "--help",
        "-",
        // homoglyphs and other non-ASCII
        "\u{455}ession",            // Cyrillic dze for the s
        "sessi\u{43E}n",            // Cyrillic o
        "\u{FF53}\u{FF45}\u{FF53}", // fullwidth "ses"
        "caf\u{E9}",
        "cafe\u{301}",
        "\u{1F600}",
        // shell and URL specials, whitespace
        "~",
        "~root",
        "a b",
        " a",
        "a ",
        "$HOME",
        "a*",
        "a?b",
        "a|b",
        "a\"b",
        "a'b",
        "<a>",
        "a#b",
        "a;b",
        "a%b",
        "a&b",
        "a+b",
    ]);
    v.push("a".repeat(129));
    v.push("a".repeat(10_000));
    v.push("\u{E9}".repeat(64)); // 128 bytes, but not ASCII
    v.push(format!("{}\u{E9}", "a".repeat(127))); // 129 bytes
    v
}

fn check_invalid<T>(
    failures: &mut Vec<String>,
    call: &str,
    what: &str,
    id: &str,
    r: Result<T, StateError>,
) {
    match r {
        Ok(_) => failures.push(format!("{call}({}) succeeded", show(id))),
        Err(e) if e.kind() != ErrorKind::InvalidId => failures.push(format!(
            "{call}({}) failed with {:?} instead of InvalidId: {e}",
            show(id),
            e.kind()
        )),
        Err(e) => {
            if let StateError::InvalidId { what: w, .. } = &e
                && *w != what
            {
                failures.push(format!("{call}({}) blamed the {w}, expected the {what}", show(id)));
            }
            let msg = e.to_string();
            if let Some(c) = msg.chars().find(|c| is_dangerous(*c)) {
                failures.push(format!("{call}({}): message holds raw {:?}: {msg:?}", show(id), c));
            }
            if msg.chars().count() > 400 {
                failures.push(format!(
                    "{call}({}): message is {} chars long",
                    show(id),
                    msg.chars().count()
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Hostile session and branch ids
// ---------------------------------------------------------------------------------------

async fn hostile_ids_touch_nothing(compression: Option<u32>) {
    let (dir, base) = temp_store("tmp/store");
    // Canaries where an escaping id could land.
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    put_file(&dir.path().join("etc").join("passwd"), b"root:x:0:0\n");
    put_file(&dir.path().join("x"), b"canary");
    let m = open_quiet(&base, compression).await;
    m.save_session("legit", &json!({"step": 1})).await.unwrap();
    let legit_cp = m.create_checkpoint("legit", "main", &json!({"step": 0})).await.unwrap();

    let before = snapshot(dir.path());
    let sessions_before = common::listed_records(&m).await;
    let stats_before = m.get_storage_stats().await.unwrap();
    let actors_before = m.live_session_actors().await.unwrap();
    let state = json!({"payload": "must never be written"});
    let closure_ran = Arc::new(AtomicBool::new(false));
    let mut failures = Vec::new();
    let ids = hostile_ids();
    assert!(ids.len() >= 30);

    for id in &ids {
        let id = id.as_str();
        let f = &mut failures;
        check_invalid(f, "save_session", "session id", id, m.save_session(id, &state).await);
        check_invalid(f, "load_session", "session id", id, m.load_session(id).await);
        check_invalid(f, "load_session_as", "session id", id, m.load_session_as::<Value>(id).await);
        check_invalid(f, "delete_session", "session id", id, m.delete_session(id).await);
        check_invalid(
            f,
            "create_checkpoint(session)",
            "session id",
            id,
            m.create_checkpoint(id, "main", &state).await,
        );
        check_invalid(
            f,
            "create_checkpoint(branch)",
            "branch id",
            id,
            m.create_checkpoint("legit", id, &state).await,
        );
        check_invalid(
            f,
            "create_checkpoint(both)",
            "session id",
            id,
            m.create_checkpoint(id, id, &state).await,
        );
        check_invalid(f, "list_checkpoints", "session id", id, m.list_checkpoints(id).await);
        check_invalid(
            f,
            "cleanup_checkpoints",
            "session id",
            id,
            m.cleanup_checkpoints(id, 0).await,
        );
        let ran = closure_ran.clone();
        let r = m
            .transactional_update(id, move |_old: Option<Value>| {
                ran.store(true, Ordering::SeqCst);
                Ok::<_, std::io::Error>(json!({"payload": "must never be written"}))
            })
            .await;
        check_invalid(f, "transactional_update", "session id", id, r);
        check_invalid(f, "session_actor", "session id", id, m.session_actor(id).await);
        check_invalid(f, "SessionId::new", "session id", id, SessionId::new(id));
        check_invalid(f, "BranchId::new", "branch id", id, BranchId::new(id));
        if serde_json::from_value::<SessionId>(json!(id)).is_ok() {
            f.push(format!("SessionId deserialized from {}", show(id)));
        }
        if serde_json::from_value::<BranchId>(json!(id)).is_ok() {
            f.push(format!("BranchId deserialized from {}", show(id)));
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(
        !closure_ran.load(Ordering::SeqCst),
        "a transactional_update closure ran for a hostile id"
    );

    // Nothing was written anywhere: not outside the store, not inside it.
    let after = snapshot(dir.path());
    let d = diff(&before, &after);
    assert!(d.is_empty(), "hostile ids changed the file tree:\n{}", d.join("\n"));
    assert_eq!(common::listed_records(&m).await, sessions_before);
    assert_eq!(m.get_storage_stats().await.unwrap(), stats_before);
    assert_eq!(
        m.live_session_actors().await.unwrap(),
        actors_before,
        "hostile ids spawned session actors"
    );
    if on_file_backend() {
        let records: Vec<_> = std::fs::read_dir(base.join("sessions"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let legit = std::ffi::OsString::from(format!("legit{}", ext(compression)));
        assert_eq!(records, vec![legit], "the sessions folder gained entries");
        let cps: Vec<_> = std::fs::read_dir(base.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            cps,
            vec![std::ffi::OsString::from("legit")],
            "the checkpoints folder gained entries"
        );
    }
    assert_eq!(m.list_checkpoints("legit").await.unwrap().len(), 1);
    assert_eq!(m.load_session("legit").await.unwrap(), Some(json!({"step": 1})));
    assert!(m.restore_checkpoint(&legit_cp).await.unwrap().is_some());
    m.shutdown().await.unwrap();
}

plain_and_compressed! {
    hostile_ids_are_rejected_by_every_method_and_touch_nothing,
    hostile_ids_are_rejected_by_every_method_and_touch_nothing_compressed => hostile_ids_touch_nothing;
}

#[test]
fn hostile_checkpoint_ids_are_rejected() {
    let valid = "0192a3b4c5d60001-1a2b3c4d";
    assert!(CheckpointId::parse(valid).is_ok());
    let mut bad = owned(&[
        "",
        ".",
        "..",
        "../../x",
        "/etc/passwd",
        "0192a3b4c5d60001-1a2b3c4d/..",
        "../0192a3b4c5d60001-1a2b3c",
        "0192a3b4c5d60001/1a2b3c4d",
        "0192a3b4c5d60001\\1a2b3c4d",
        "0192A3B4C5D60001-1A2B3C4D",
        "0192a3b4c5d60001-1a2b3c4",
        "0192a3b4c5d60001-1a2b3c4d0",
        "0192a3b4c5d6000-1a2b3c4d",
        "0192a3b4c5d60001_1a2b3c4d",
        "0192a3b4c5d600011a2b3c4d-",
        "-0192a3b4c5d60001-1a2b3c4d",
        "0192a3b4c5d6000g-1a2b3c4d",
        "+192a3b4c5d60001-1a2b3c4d",
        " 192a3b4c5d60001-1a2b3c4d",
        "0192a3b4c5d60001-1a2b3c4\0",
        "0192a3b4c5d60001-1a2b3c4\n",
        "0192a3b4c5d60001-1a2b3c\u{e9}",
        "0192a3b4c5d6000\u{e9}-1a2b3c4d",
        "0192a3b4c5d60001\u{2011}1a2b3c4d",
        "0192a3b4c5d60001-1a2b\u{202E}c4d",
        "\u{200B}0192a3b4c5d60001-1a2b3c4",
        "0192a3b4c5d60001-1a2b3c4d.json",
        "0192a3b4c5d60001-1a2b3c4d.json.gz",
        "%2e%2e%2f0192a3b4c5d60001-1a2b3c",
        "0x92a3b4c5d60001-1a2b3c4d",
        "0192a3b4c5d60001-1a2b3c4d\u{301}",
    ]);
    bad.push("0".repeat(10_000));
    bad.push(format!("{}-{}", "0".repeat(16), "0".repeat(10_000)));
    let mut failures = Vec::new();
    for s in &bad {
        check_invalid(
            &mut failures,
            "CheckpointId::parse",
            "checkpoint id",
            s,
            CheckpointId::parse(s),
        );
        check_invalid(&mut failures, "str::parse", "checkpoint id", s, s.parse::<CheckpointId>());
        if serde_json::from_value::<CheckpointId>(json!(s)).is_ok() {
            failures.push(format!("CheckpointId deserialized from {}", show(s)));
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// A well-formed id that names nothing is "not there", not an error, and touches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_checkpoint_ids_find_nothing_and_touch_nothing() {
    let (dir, base) = temp_store("tmp/store");
    let m = start(&base).await;
    m.save_session("s1", &json!(1)).await.unwrap();
    let before = snapshot(dir.path());
    for s in ["0000000000000000-00000000", "ffffffffffffffff-ffffffff", "0192a3b4c5d60001-1a2b3c4d"]
    {
        let id = CheckpointId::parse(s).unwrap();
        assert!(m.restore_checkpoint(&id).await.unwrap().is_none());
        assert_eq!(m.rollback_to_checkpoint(&id).await.unwrap_err().kind(), ErrorKind::NotFound);
    }
    assert!(diff(&before, &snapshot(dir.path())).is_empty());
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!(1)));
    m.shutdown().await.unwrap();
}

/// Ids at the edge of the accepted set (dots inside, colons, `@`, 128 bytes, names of the
/// store's own files) stay inside `sessions/` and `checkpoints/` and never collide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_valid_ids_stay_inside_the_store_and_do_not_collide() {
    let (dir, base) = temp_store("tmp/store");
    put_file(&dir.path().join("x"), b"canary");
    let m = start(&base).await;
    let long = "a".repeat(128);
    let ids = [
        "a",
        "A",
        "_",
        "0",
        "a.",
        "a..",
        "a...b",
        "a:b",
        "C:x",
        "x@y",
        "a-",
        "x.json",
        "x",
        "x.json.gz",
        "LOCK",
        "index.log",
        "store.json",
        "pending",
        "quarantine",
        "a.tmp-0000000000000000",
        "CON",
        "nul",
        long.as_str(),
    ];
    for id in ids {
        assert!(SessionId::new(id).is_ok(), "{id} should be a valid id");
    }
    let outside_before: Vec<_> =
        snapshot(dir.path()).into_iter().filter(|(p, _)| !p.starts_with("tmp")).collect();
    for id in ids {
        m.save_session(id, &json!({"id": id})).await.unwrap();
        m.create_checkpoint(id, id, &json!({"cp": id})).await.unwrap();
    }
    m.run_janitor_now().await.unwrap();
    m.vacuum_storage().await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);

    let m = start(&base).await;
    assert_eq!(m.list_sessions().await.unwrap().len(), ids.len());
    for id in ids {
        assert_eq!(m.load_session(id).await.unwrap(), Some(json!({"id": id})), "session {id}");
        let cps = m.list_checkpoints(id).await.unwrap();
        assert_eq!(cps.len(), 1, "checkpoints of {id}");
        assert_eq!(cps[0].branch_id.as_str(), id);
        assert_eq!(
            m.restore_checkpoint(&cps[0].id).await.unwrap().unwrap().data,
            json!({"cp": id})
        );
        if on_file_backend() {
            assert!(
                base.join("sessions").join(format!("{id}.json")).is_file(),
                "record of {id} not where expected"
            );
        }
    }
    if on_file_backend() {
        for (p, _) in snapshot(&base) {
            let top = p.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
            assert!(
                ["sessions", "checkpoints", "metadata", "quarantine"].contains(&top.as_str()),
                "stray {}",
                p.display()
            );
        }
    }
    let outside_after: Vec<_> =
        snapshot(dir.path()).into_iter().filter(|(p, _)| !p.starts_with("tmp")).collect();
    assert_eq!(outside_before, outside_after, "something changed outside the store");
    for id in ids {
        assert!(m.delete_session(id).await.unwrap());
    }
    assert!(m.list_sessions().await.unwrap().is_empty());
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Planted symbolic links
// ---------------------------------------------------------------------------------------

/// A genuine record of `sid` holding `data`, made in a throw-away store: (session record
/// bytes, checkpoint id, checkpoint record bytes).
async fn genuine_records(sid: &str, data: &Value) -> (Vec<u8>, CheckpointId, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    m.save_session(sid, data).await.unwrap();
    let cid = m.create_checkpoint(sid, "main", data).await.unwrap();
    m.shutdown().await.unwrap();
    let session = std::fs::read(dir.path().join("sessions").join(format!("{sid}.json"))).unwrap();
    let cp = std::fs::read(dir.path().join("checkpoints").join(sid).join(format!("{cid}.json")))
        .unwrap();
    (session, cid, cp)
}

const OUTSIDE_SECRET: &str = "outside-secret-4b1d";

/// A fresh temporary directory with the store path `tmp/store` in it (not created yet) and
/// the folder `outside/` beside the store, for planted links to point to.
fn store_and_outside() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (dir, base) = temp_store("tmp/store");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    (dir, base, outside)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_session_symlink_is_not_followed() {
    if !file_backend_only(
        "planted_session_symlink_is_not_followed",
        "plants a symbolic link among the store's files",
    ) {
        return;
    }
    let (_dir, base, outside) = store_and_outside();
    let (record, _, _) = genuine_records("evil", &json!({"secret": OUTSIDE_SECRET})).await;
    let target = outside.join("evil.json");
    put_file(&target, &record);
    drop(FileStorageBackend::new(&base).unwrap()); // create the layout
    std::os::unix::fs::symlink(&target, base.join("sessions").join("evil.json")).unwrap();

    let m = start(&base).await;
    match m.load_session("evil").await {
        Err(e) => assert!(!e.to_string().contains(OUTSIDE_SECRET)),
        Ok(v) => panic!("loading through a planted symlink must fail, got {v:?}"),
    }
    let r = m.save_session("evil", &json!({"mine": true})).await;
    assert_eq!(std::fs::read(&target).unwrap(), record, "save_session wrote through the symlink");
    if r.is_ok() {
        let meta = std::fs::symlink_metadata(base.join("sessions").join("evil.json")).unwrap();
        assert!(meta.is_file(), "the saved record is not a regular file");
        assert_eq!(m.load_session("evil").await.unwrap(), Some(json!({"mine": true})));
    }
    let _ = m.delete_session("evil").await;
    assert_eq!(
        std::fs::read(&target).unwrap(),
        record,
        "delete_session touched the symlink's target"
    );
    m.shutdown().await.unwrap();
}

/// Fixture for the checkpoint-folder link: `checkpoints/s1 -> outside/` where `outside/`
/// holds a genuine checkpoint record of `s1` and an unrelated file.
async fn planted_checkpoint_dir() -> (tempfile::TempDir, PathBuf, PathBuf, CheckpointId) {
    let (dir, base, outside) = store_and_outside();
    let (_, cid, cp) = genuine_records("s1", &json!({"secret": OUTSIDE_SECRET})).await;
    put_file(&outside.join(format!("{cid}.json")), &cp);
    put_file(&outside.join("precious.txt"), b"do not delete");
    drop(FileStorageBackend::new(&base).unwrap());
    std::os::unix::fs::symlink(&outside, base.join("checkpoints").join("s1")).unwrap();
    (dir, base, outside, cid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_checkpoint_dir_symlink_is_not_read_or_written() {
    if !file_backend_only(
        "planted_checkpoint_dir_symlink_is_not_read_or_written",
        "plants a symbolic link among the store's files",
    ) {
        return;
    }
    let (_dir, base, outside, cid) = planted_checkpoint_dir().await;
    let before = snapshot(&outside);
    let m = start(&base).await;
    assert!(
        m.list_checkpoints("s1").await.unwrap().is_empty(),
        "checkpoints listed through a symlink"
    );
    if let Ok(Some(cp)) = m.restore_checkpoint(&cid).await {
        panic!("restore_checkpoint read through a planted symlink: {cp:?}");
    }
    let _ = m.create_checkpoint("s1", "main", &json!({"mine": 1})).await;
    let _ = m.cleanup_checkpoints("s1", 0).await;
    let _ = m.vacuum_storage().await;
    let d = diff(&before, &snapshot(&outside));
    assert!(d.is_empty(), "the link's target changed: {d:?}");
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_session_does_not_follow_a_planted_checkpoint_dir_symlink() {
    if !file_backend_only(
        "delete_session_does_not_follow_a_planted_checkpoint_dir_symlink",
        "plants a symbolic link among the store's files",
    ) {
        return;
    }
    let (_dir, base, outside, _) = planted_checkpoint_dir().await;
    let before = snapshot(&outside);
    let m = start(&base).await;
    m.save_session("s1", &json!(1)).await.unwrap();
    let r = m.delete_session("s1").await;
    let d = diff(&before, &snapshot(&outside));
    assert!(
        d.is_empty(),
        "delete_session(\"s1\") = {r:?} changed files outside the store:\n{}",
        d.join("\n")
    );
    m.shutdown().await.unwrap();
}

/// Runs every operation once against a store in which `link` was replaced by a symbolic
/// link to `outside` (a directory, or a file in it). Results are ignored; only the effect
/// on `outside` and any leak of its content count. Returns the problems found.
async fn workload_against_link(link: &str, to_dir: bool) -> Vec<String> {
    let (_dir, base, outside) = store_and_outside();
    let (session, cid, cp) = genuine_records("s1", &json!({"secret": OUTSIDE_SECRET})).await;
    put_file(&outside.join("s1.json"), &session);
    put_file(&outside.join(format!("{cid}.json")), &cp);
    put_file(&outside.join("s1"), b"");
    put_file(&outside.join("precious.txt"), b"do not delete");
    {
        let m = start(&base).await;
        m.save_session("s1", &json!({"mine": 0})).await.unwrap();
        m.create_checkpoint("s1", "main", &json!({"mine": 0})).await.unwrap();
        m.save_session("s2", &json!({"mine": 0})).await.unwrap();
        assert!(m.delete_session("s2").await.unwrap()); // creates metadata/pending
        m.shutdown().await.unwrap();
    }
    let at = base.join(link);
    if std::fs::symlink_metadata(&at).unwrap().is_dir() {
        std::fs::remove_dir_all(&at).unwrap();
    } else {
        std::fs::remove_file(&at).unwrap();
    }
    let target = if to_dir { outside.clone() } else { outside.join("precious.txt") };
    std::os::unix::fs::symlink(&target, &at).unwrap();
    let before = snapshot(&outside);

    let mut problems = Vec::new();
    let t = Duration::from_secs(15);
    let mut leak = |what: &str, v: String| {
        if v.contains(OUTSIDE_SECRET) {
            problems.push(format!("{link}: {what} returned the link target's content"));
        }
    };
    let backend = FileStorageBackend::new(&base);
    if let Ok(backend) = backend {
        let started = tokio::time::timeout(t, quiet(StateManager::builder(backend)).start()).await;
        if let Ok(Ok(m)) = started {
            let _ = tokio::time::timeout(t, m.save_session("s1", &json!({"mine": 1}))).await;
            if let Ok(r) = tokio::time::timeout(t, m.load_session("s1")).await {
                leak("load_session", format!("{r:?}"));
            }
            if let Ok(r) = tokio::time::timeout(t, m.restore_checkpoint(&cid)).await {
                leak("restore_checkpoint", format!("{r:?}"));
            }
            let _ = tokio::time::timeout(t, m.create_checkpoint("s1", "main", &json!({"mine": 1})))
                .await;
            if let Ok(r) = tokio::time::timeout(t, m.list_checkpoints("s1")).await {
                leak("list_checkpoints", format!("{r:?}"));
            }
            let _ = tokio::time::timeout(t, m.cleanup_checkpoints("s1", 0)).await;
            let _ = tokio::time::timeout(
                t,
                m.transactional_update("s1", |_: Option<Value>| Ok::<_, std::io::Error>(json!(2))),
            )
            .await;
            let _ = tokio::time::timeout(t, m.vacuum_storage()).await;
            let _ = tokio::time::timeout(t, m.run_janitor_now()).await;
            let _ = tokio::time::timeout(t, m.delete_session("s1")).await;
            let _ = tokio::time::timeout(t, m.save_session("s3", &json!({"mine": 3}))).await;
            let _ = tokio::time::timeout(t, m.shutdown()).await;
        }
    }
    let d = diff(&before, &snapshot(&outside));
    if !d.is_empty() {
        problems.push(format!("{link} -> {}: outside changed: {}", target.display(), d.join(", ")));
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_symlinks_anywhere_in_the_store_are_not_followed() {
    if !file_backend_only(
        "planted_symlinks_anywhere_in_the_store_are_not_followed",
        "plants symbolic links among the store's files",
    ) {
        return;
    }
    let cases = [
        ("sessions", true),
        ("checkpoints", true),
        ("checkpoints/s1", true),
        ("metadata", true),
        ("metadata/pending", true),
        ("quarantine", true),
        ("sessions/s1.json", false),
        ("metadata/index.log", false),
        ("metadata/store.json", false),
        ("metadata/LOCK", false),
    ];
    let mut problems = Vec::new();
    for (link, to_dir) in cases {
        problems.extend(workload_against_link(link, to_dir).await);
    }
    assert!(problems.is_empty(), "planted symlinks were followed:\n{}", problems.join("\n"));
}

/// A folder swapped for a symbolic link while the manager runs (after the backend has
/// cached that the folder exists) must not be written through either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_dir_swapped_for_a_symlink_while_running_is_not_written_through() {
    if !file_backend_only(
        "checkpoint_dir_swapped_for_a_symlink_while_running_is_not_written_through",
        "swaps a folder of the store for a symbolic link",
    ) {
        return;
    }
    let (dir, base, outside) = store_and_outside();
    let m = start(&base).await;
    m.create_checkpoint("s1", "main", &json!(1)).await.unwrap();
    let real = base.join("checkpoints").join("s1");
    std::fs::rename(&real, dir.path().join("moved-away")).unwrap();
    std::os::unix::fs::symlink(&outside, &real).unwrap();
    let r = m.create_checkpoint("s1", "main", &json!(2)).await;
    let written: Vec<_> =
        std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(
        written.is_empty(),
        "create_checkpoint = {r:?} wrote {written:?} outside the store through the link"
    );
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// No payload in errors or logs
// ---------------------------------------------------------------------------------------

const MARKER: &str = "PAYLOAD-MARKER-93c1f7";

/// Captures every log line of this test binary (installed once, globally: the library
/// logs from actor tasks on other threads).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Typed {
    step: u64,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Mode {
    Fast,
    Slow,
}

fn no_marker(failures: &mut Vec<String>, what: &str, e: &StateError) {
    let shown = e.to_string();
    let debug = format!("{e:?}");
    let mut chain = String::new();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        chain.push_str(&s.to_string());
        src = s.source();
    }
    for (form, text) in [("Display", &shown), ("Debug", &debug), ("source chain", &chain)] {
        if text.contains(MARKER) {
            failures.push(format!("{what}: {form} of {:?} contains the payload: {text}", e.kind()));
        }
    }
}

/// Forces every error a stored payload can cause (type mismatches on load, restore and
/// update; damaged records; oversized states) and checks none of them, nor the logs,
/// repeats the payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_logs_never_contain_the_payload() {
    let logs = captured_logs();
    let (_dir, base) = temp_store("store");
    let open =
        || builder(&base, None).janitor_interval(JANITOR_HOURLY).max_state_bytes(4096).start();
    let m = open().await.unwrap();
    let mut failures = Vec::new();
    let f = &mut failures;

    // A string where a number is expected.
    m.save_session("typed", &json!({"step": MARKER})).await.unwrap();
    let e = m.load_session_as::<Typed>("typed").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Serialization);
    no_marker(f, "load_session_as (wrong type)", &e);
    let e = m
        .transactional_update("typed", |old: Option<Typed>| Ok::<_, std::io::Error>(old.unwrap()))
        .await
        .unwrap_err();
    no_marker(f, "transactional_update (wrong type)", &e);
    // An unknown enum variant.
    m.save_session("mode", &json!(MARKER)).await.unwrap();
    let e = m.load_session_as::<Mode>("mode").await.unwrap_err();
    no_marker(f, "load_session_as (unknown variant)", &e);
    // The same through a checkpoint.
    let cid = m.create_checkpoint("typed", "main", &json!({"step": MARKER})).await.unwrap();
    let e = m.restore_checkpoint_as::<Typed>(&cid).await.unwrap_err();
    no_marker(f, "restore_checkpoint_as (wrong type)", &e);
    // Too large.
    let big = json!({"blob": format!("{MARKER}{}", "x".repeat(5000))});
    no_marker(f, "save_session (too large)", &m.save_session("big", &big).await.unwrap_err());
    no_marker(
        f,
        "create_checkpoint (too large)",
        &m.create_checkpoint("big", "main", &big).await.unwrap_err(),
    );
    // Damaged records: a flipped byte inside the data, and a truncation.
    m.save_session("flip", &json!({"note": MARKER})).await.unwrap();
    m.save_session("cut", &json!({"note": MARKER})).await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);
    // Damaged from outside, through the store's backend (on the file backend: the record
    // files), while no manager has it open.
    {
        let store = backend(&base);
        let flip = StorageKey::new("sessions/flip.json").unwrap();
        let mut bytes = store.get(&flip).await.unwrap().expect("the record of flip");
        let at = bytes.len() - 4;
        bytes[at] ^= 0x01;
        store.put(&flip, bytes).await.unwrap();
        let cut = StorageKey::new("sessions/cut.json").unwrap();
        let mut bytes = store.get(&cut).await.unwrap().expect("the record of cut");
        bytes.truncate(bytes.len() - 3);
        store.put(&cut, bytes).await.unwrap();
    }
    let m = open().await.unwrap();
    no_marker(f, "load_session (flipped byte)", &m.load_session("flip").await.unwrap_err());
    no_marker(f, "load_session (truncated)", &m.load_session("cut").await.unwrap_err());
    let report = m.vacuum_storage().await.unwrap();
    assert!(report.corrupt_records.iter().all(|k| !k.contains(MARKER)));
    m.shutdown().await.unwrap();

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    if logs.contains(MARKER) {
        let lines: Vec<_> = logs.lines().filter(|l| l.contains(MARKER)).take(5).collect();
        failures.push(format!("the logs contain the payload:\n{}", lines.join("\n")));
    }
    assert!(failures.is_empty(), "payload leaked:\n{}", failures.join("\n"));
}
