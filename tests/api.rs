//! Pins every public `StateManager` method on the file backend, once without and once with
//! gzip compression: each behaviour below is a plain `async fn(compression)` that the
//! `common::per_mode!` macro expands into two `#[tokio::test]`s (`plain::NAME` and
//! `gzip::NAME`), so one failing mode or behaviour hides no other.
//!
//! Besides the facade's results, the tests look at the disk: uncompressed records are plain
//! JSON under `sessions/<id>.json`, compressed ones gzip under `sessions/<id>.json.gz`, and
//! sizes reported by `list_sessions`, `list_checkpoints` and `get_storage_stats` are the sizes
//! of those files. Every behaviour that must survive a restart is checked across a full
//! `shutdown` and a new manager on the same directory.
//!
//! The store is on the backend `MARS_STATE_TEST_BACKEND` picks (`tests/common/backend.rs`):
//! on any but the file backend, the checks of files on disk are skipped (`on_file_backend`)
//! and the tests that are only about them say `NOT RUN`; every other check runs.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::backend::{FileWrites, backend_for_paused_time, locking_backend_only, open_backend};
use common::{
    builder, checkpoint_ids, ext, file_backend_only, flip_byte, increment, listed_records,
    on_file_backend, open, open_temp, per_mode, put_file, quiet_deliberate_panics, restart,
    session_file, session_ids, session_info, spawn_each, with_compression,
};
use mars_state::{
    CheckpointId, ErrorKind, RetentionPolicy, SessionMsg, StateBytes, StateError, StateManager,
    UpdateFn,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

// Under paused tokio time (the manager's clock follows it): for behaviours that depend on
// how old sessions are. `tokio::time::advance` ages them.
per_mode!(plain_paused, gzip_paused, #[tokio::test(start_paused = true)]:
    cleanup_old_sessions_respects_age_and_keep_last,
    cleanup_old_sessions_keeps_recent_sessions,
    run_janitor_now_drops_idle_sessions,
);

per_mode!(plain, gzip, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]:
    save_and_load_round_trip,
    load_missing_session_is_none,
    load_session_as_typed,
    load_session_as_wrong_type_is_serialization_error,
    delete_session_removes_state_and_checkpoints,
    delete_checkpoint_only_session,
    list_sessions_reports_fields,
    create_and_restore_checkpoint,
    restore_checkpoint_after_restart_by_id_alone,
    restore_unknown_checkpoint_is_none,
    checkpoint_ids_unique_across_sessions,
    rollback_to_checkpoint_replaces_state,
    rollback_to_unknown_checkpoint_is_not_found,
    list_checkpoints_200_in_a_tight_loop,
    list_checkpoints_of_unknown_session_is_empty,
    cleanup_checkpoints_keeps_newest,
    transactional_update_increments,
    transactional_update_typed,
    transactional_update_err_writes_nothing,
    transactional_update_panic_is_contained,
    get_storage_stats_matches_disk,
    vacuum_storage_sweeps_and_rebuilds,
    vacuum_storage_reports_corrupt_records,
    shutdown_makes_later_calls_unavailable,
    shutdown_drains_and_releases_the_store,
    session_actor_answers_session_msgs,
    records_have_documented_on_disk_format,
    store_keeps_its_format_under_any_compression_setting,
    too_large_states_are_rejected,
    invalid_ids_are_rejected,
    second_backend_on_same_dir_is_locked,
    builder_rejects_zero_durations,
    run_janitor_now_applies_retention,
    transactional_update_on_corrupt_record_is_an_error,
    live_session_actors_counts_session_actors,
);

/// Every regular, non-hidden file under `dir/sub`, recursively, with its size.
fn files_under(dir: &Path, sub: &str) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join(sub)];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            let hidden = e.file_name().to_string_lossy().starts_with('.');
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() && !hidden {
                out.push((e.path(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

/// Checkpoint record files on disk whose name contains `cid`.
fn checkpoint_files(dir: &Path, cid: &CheckpointId) -> Vec<PathBuf> {
    files_under(dir, "checkpoints")
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.to_string_lossy().contains(cid.as_str()))
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Reads a record file and returns its JSON envelope, gunzipping if the store compresses.
fn read_record(path: &Path, compression: Option<u32>) -> Value {
    let raw = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let text = if compression.is_some() {
        assert_eq!(&raw[..2], &[0x1f, 0x8b], "{} is not gzip", path.display());
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).expect("gunzip record");
        out
    } else {
        raw
    };
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn assert_kind<T: std::fmt::Debug>(
    r: mars_state::Result<T>,
    kind: ErrorKind,
    what: &str,
) -> StateError {
    match r {
        Err(e) => {
            assert_eq!(e.kind(), kind, "{what}: expected {kind:?}, got {e:?} ({e})");
            e
        }
        Ok(v) => panic!("{what}: expected {kind:?}, got Ok({v:?})"),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Agent {
    step: u32,
    name: String,
    history: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Counter {
    n: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("closure refused: {0}")]
struct Refused(&'static str);

// ---------------------------------------------------------------------------------------
// save_session / load_session / load_session_as
// ---------------------------------------------------------------------------------------

async fn save_and_load_round_trip(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    let v1 = json!({"step": 42, "nested": {"list": [1, 2, 3], "s": "héllo \"quoted\" \n"}, "f": 1.5, "null": null});
    m.save_session("session_123", &v1).await.unwrap();
    assert_eq!(m.load_session("session_123").await.unwrap(), Some(v1.clone()));

    // A save replaces the previous state.
    let v2 = json!({"step": 43});
    m.save_session("session_123", &v2).await.unwrap();
    assert_eq!(m.load_session("session_123").await.unwrap(), Some(v2.clone()));

    // Any Serialize works, including non-object JSON values.
    m.save_session("scalar", &7u32).await.unwrap();
    m.save_session("array", &vec!["a", "b"]).await.unwrap();
    assert_eq!(m.load_session("scalar").await.unwrap(), Some(json!(7)));
    assert_eq!(m.load_session("array").await.unwrap(), Some(json!(["a", "b"])));

    // Durable: a new manager on the same directory reads the same states.
    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session("session_123").await.unwrap(), Some(v2));
    assert_eq!(m.load_session("scalar").await.unwrap(), Some(json!(7)));
    assert_eq!(m.load_session("array").await.unwrap(), Some(json!(["a", "b"])));
    m.shutdown().await.unwrap();
}

async fn load_missing_session_is_none(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    assert_eq!(m.load_session("nobody").await.unwrap(), None);
    assert_eq!(m.load_session_as::<Agent>("nobody").await.unwrap(), None);
    // A lookup creates nothing.
    assert!(m.list_sessions().await.unwrap().is_empty());
    if on_file_backend() {
        assert!(files_under(dir.path(), "sessions").is_empty());
    }
    m.shutdown().await.unwrap();
}

async fn load_session_as_typed(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    let a = Agent { step: 7, name: "planner".into(), history: vec!["think".into(), "act".into()] };
    m.save_session("agent", &a).await.unwrap();
    assert_eq!(m.load_session_as::<Agent>("agent").await.unwrap(), Some(a.clone()));
    // The same record is also readable as JSON.
    assert_eq!(
        m.load_session("agent").await.unwrap(),
        Some(json!({"step": 7, "name": "planner", "history": ["think", "act"]}))
    );
    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session_as::<Agent>("agent").await.unwrap(), Some(a));
    m.shutdown().await.unwrap();
}

async fn load_session_as_wrong_type_is_serialization_error(compression: Option<u32>) {
    let (_dir, m) = open_temp(compression).await;
    m.save_session("s1", &json!({"unrelated": true})).await.unwrap();
    let e =
        assert_kind(m.load_session_as::<Agent>("s1").await, ErrorKind::Serialization, "wrong type");
    match e {
        StateError::Serialization { session, .. } => assert_eq!(session, "s1"),
        other => panic!("unexpected {other:?}"),
    }
    // The stored state is untouched by the failed typed read.
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"unrelated": true})));
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// delete_session
// ---------------------------------------------------------------------------------------

async fn delete_session_removes_state_and_checkpoints(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    m.save_session("doomed", &json!({"step": 1})).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(m.create_checkpoint("doomed", "main", &json!({"step": i})).await.unwrap());
    }
    m.save_session("bystander", &json!({"keep": true})).await.unwrap();
    let kept = m.create_checkpoint("bystander", "main", &json!({"keep": 1})).await.unwrap();
    if on_file_backend() {
        assert!(session_file(dir.path(), "doomed", compression).exists());
        for id in &ids {
            assert_eq!(checkpoint_files(dir.path(), id).len(), 1, "checkpoint file for {id}");
        }
    }

    assert!(
        m.delete_session("doomed").await.unwrap(),
        "delete of an existing session returns true"
    );
    assert_eq!(m.load_session("doomed").await.unwrap(), None);
    assert!(m.list_checkpoints("doomed").await.unwrap().is_empty());
    for id in &ids {
        assert!(
            m.restore_checkpoint(id).await.unwrap().is_none(),
            "checkpoint {id} survived the delete"
        );
        if on_file_backend() {
            assert!(
                checkpoint_files(dir.path(), id).is_empty(),
                "checkpoint file {id} survived the delete"
            );
        }
        assert_kind(
            m.rollback_to_checkpoint(id).await,
            ErrorKind::NotFound,
            "rollback to deleted checkpoint",
        );
    }
    if on_file_backend() {
        assert!(!session_file(dir.path(), "doomed", compression).exists());
    }
    let listed = session_ids(&m).await;
    assert_eq!(listed, vec!["bystander".to_string()]);
    let stats = m.get_storage_stats().await.unwrap();
    assert_eq!((stats.session_count, stats.checkpoint_count), (1, 1));

    // A second delete, and a delete of a session that never existed, return false.
    assert!(!m.delete_session("doomed").await.unwrap());
    assert!(!m.delete_session("never_was").await.unwrap());

    // The session can be used again after its deletion.
    m.save_session("doomed", &json!({"reborn": true})).await.unwrap();
    assert_eq!(m.load_session("doomed").await.unwrap(), Some(json!({"reborn": true})));
    assert!(m.list_checkpoints("doomed").await.unwrap().is_empty());
    assert!(m.delete_session("doomed").await.unwrap());

    // Still gone after a restart; the bystander is intact.
    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session("doomed").await.unwrap(), None);
    assert!(m.list_checkpoints("doomed").await.unwrap().is_empty());
    for id in &ids {
        assert!(m.restore_checkpoint(id).await.unwrap().is_none());
    }
    assert_eq!(m.load_session("bystander").await.unwrap(), Some(json!({"keep": true})));
    assert_eq!(m.restore_checkpoint(&kept).await.unwrap().unwrap().data, json!({"keep": 1}));
    m.shutdown().await.unwrap();
}

async fn delete_checkpoint_only_session(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    let id = m.create_checkpoint("cp_only", "b", &json!(1)).await.unwrap();
    assert_eq!(m.list_sessions().await.unwrap().len(), 1);
    assert!(m.delete_session("cp_only").await.unwrap(), "a session with only checkpoints existed");
    assert!(m.restore_checkpoint(&id).await.unwrap().is_none());
    assert!(m.list_sessions().await.unwrap().is_empty());
    if on_file_backend() {
        assert!(files_under(dir.path(), "checkpoints").is_empty());
    }
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// list_sessions
// ---------------------------------------------------------------------------------------

async fn list_sessions_reports_fields(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    assert!(m.list_sessions().await.unwrap().is_empty());

    let before = now_ms();
    m.save_session("b_session", &json!({"x": "y".repeat(500)})).await.unwrap();
    m.save_session("a_session", &json!({"x": 1})).await.unwrap();
    m.create_checkpoint("a_session", "main", &json!({"c": 1})).await.unwrap();
    m.create_checkpoint("a_session", "alt", &json!({"c": 2})).await.unwrap();
    m.create_checkpoint("c_only_checkpoints", "main", &json!({"c": 3})).await.unwrap();
    let after = now_ms();

    let check = |list: &[mars_state::SessionInfo], b_window: (u64, u64)| {
        let ids: Vec<&str> = list.iter().map(|s| s.session_id.as_str()).collect();
        assert_eq!(ids, ["a_session", "b_session", "c_only_checkpoints"], "sorted by id");
        for (s, (lo, hi)) in list[..2].iter().zip([(before, after), b_window]) {
            assert!(
                (lo..=hi).contains(&s.updated_at),
                "{}: updated_at {} not within [{lo}, {hi}]",
                s.session_id,
                s.updated_at
            );
            if on_file_backend() {
                let on_disk =
                    std::fs::metadata(session_file(dir.path(), s.session_id.as_str(), compression))
                        .unwrap()
                        .len();
                assert_eq!(
                    s.size_bytes, on_disk,
                    "{}: size_bytes is the record's size",
                    s.session_id
                );
            }
        }
        assert_eq!(list[0].checkpoint_count, 2);
        assert_eq!(list[1].checkpoint_count, 0);
        assert!(list[1].size_bytes > list[0].size_bytes, "the 500-char state is larger");
        // Documented: a session with checkpoints only has updated_at 0 and size 0.
        assert_eq!((list[2].updated_at, list[2].size_bytes, list[2].checkpoint_count), (0, 0, 1));
    };
    let list = m.list_sessions().await.unwrap();
    check(&list, (before, after));

    // A later save moves updated_at forward.
    tokio::time::sleep(Duration::from_millis(3)).await;
    let resave_before = now_ms();
    m.save_session("b_session", &json!({"x": "y".repeat(500)})).await.unwrap();
    let resave_after = now_ms();
    let list = m.list_sessions().await.unwrap();
    check(&list, (resave_before, resave_after));
    let second = list[1].updated_at;

    let m = restart(m, dir.path(), compression).await;
    let list = m.list_sessions().await.unwrap();
    check(&list, (resave_before, resave_after));
    assert_eq!(list[1].updated_at, second, "updated_at survives a restart");
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// create_checkpoint / restore_checkpoint
// ---------------------------------------------------------------------------------------

async fn create_and_restore_checkpoint(compression: Option<u32>) {
    let (_dir, m) = open_temp(compression).await;
    let before = now_ms();
    let id = m.create_checkpoint("s1", "branch_456", &json!({"step": 25})).await.unwrap();
    let after = now_ms();

    let cp = m.restore_checkpoint(&id).await.unwrap().expect("checkpoint exists");
    assert_eq!(cp.id, id);
    assert_eq!(cp.session_id.as_str(), "s1");
    assert_eq!(cp.branch_id.as_str(), "branch_456");
    assert_eq!(cp.data, json!({"step": 25}));
    assert!(
        (before..=after).contains(&cp.timestamp),
        "timestamp {} not within [{before}, {after}]",
        cp.timestamp
    );
    assert_eq!(cp.timestamp, id.timestamp_ms());

    // A checkpoint does not change the session's state.
    assert_eq!(m.load_session("s1").await.unwrap(), None);

    // Typed restore.
    let a = Agent { step: 3, name: "n".into(), history: vec![] };
    let typed_id = m.create_checkpoint("s1", "main", &a).await.unwrap();
    let typed = m.restore_checkpoint_as::<Agent>(&typed_id).await.unwrap().unwrap();
    assert_eq!(typed.data, a);
    assert_eq!(typed.branch_id.as_str(), "main");

    // The id is file-name safe and round-trips through its text form.
    assert!(id.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "{id}");
    let parsed: CheckpointId = id.to_string().parse().unwrap();
    assert_eq!(parsed, id);
    assert_eq!(m.restore_checkpoint(&parsed).await.unwrap().unwrap().data, json!({"step": 25}));
    m.shutdown().await.unwrap();
}

async fn restore_checkpoint_after_restart_by_id_alone(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    let id = m.create_checkpoint("s1", "branch_456", &json!({"step": 25})).await.unwrap();
    let other = m.create_checkpoint("s2", "main", &json!({"step": 99})).await.unwrap();
    let text = id.to_string();
    let other_text = other.to_string();
    m.shutdown().await.unwrap();
    drop(m);

    // Only the id's text survives the "process": nothing else about the session is known.
    let m = open(dir.path(), compression).await;
    let id = CheckpointId::parse(&text).unwrap();
    let cp = m.restore_checkpoint(&id).await.unwrap().expect("checkpoint found after restart");
    assert_eq!(cp.session_id.as_str(), "s1");
    assert_eq!(cp.branch_id.as_str(), "branch_456");
    assert_eq!(cp.data, json!({"step": 25}));
    let cp2 =
        m.restore_checkpoint(&CheckpointId::parse(&other_text).unwrap()).await.unwrap().unwrap();
    assert_eq!((cp2.session_id.as_str(), cp2.data.clone()), ("s2", json!({"step": 99})));

    // Rollback by id alone after the restart too.
    m.rollback_to_checkpoint(&id).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 25})));
    m.shutdown().await.unwrap();
}

async fn restore_unknown_checkpoint_is_none(compression: Option<u32>) {
    let (_dir, m) = open_temp(compression).await;
    m.create_checkpoint("s1", "main", &json!(1)).await.unwrap();
    let unknown = CheckpointId::parse("0000000000000001-00000000").unwrap();
    assert!(m.restore_checkpoint(&unknown).await.unwrap().is_none());
    m.shutdown().await.unwrap();
}

async fn checkpoint_ids_unique_across_sessions(compression: Option<u32>) {
    let (_dir, m) = open_temp(compression).await;
    let mut all = BTreeSet::new();
    let mut owners = Vec::new();
    for i in 0..20 {
        for s in ["x", "y", "z"] {
            let id = m.create_checkpoint(s, "main", &json!({"s": s, "i": i})).await.unwrap();
            assert!(all.insert(id.clone()), "duplicate checkpoint id {id}");
            owners.push((id, s, i));
        }
    }
    for (id, s, i) in owners {
        let cp = m.restore_checkpoint(&id).await.unwrap().unwrap();
        assert_eq!(cp.session_id.as_str(), s);
        assert_eq!(cp.data, json!({"s": s, "i": i}));
    }
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// rollback_to_checkpoint
// ---------------------------------------------------------------------------------------

async fn rollback_to_checkpoint_replaces_state(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    m.save_session("s1", &json!({"step": 0})).await.unwrap();
    let c1 = m.create_checkpoint("s1", "main", &json!({"step": 1})).await.unwrap();
    let c2 = m.create_checkpoint("s1", "main", &json!({"step": 2})).await.unwrap();
    m.save_session("s1", &json!({"step": 9})).await.unwrap();

    m.rollback_to_checkpoint(&c1).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 1})));
    m.rollback_to_checkpoint(&c2).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 2})));
    // A rollback keeps the checkpoints.
    assert_eq!(m.list_checkpoints("s1").await.unwrap().len(), 2);

    // Rollback works on a session that had no saved state yet.
    let c3 = m.create_checkpoint("fresh", "main", &json!({"from": "checkpoint"})).await.unwrap();
    m.rollback_to_checkpoint(&c3).await.unwrap();
    assert_eq!(m.load_session("fresh").await.unwrap(), Some(json!({"from": "checkpoint"})));

    // Durable.
    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 2})));
    assert_eq!(m.load_session("fresh").await.unwrap(), Some(json!({"from": "checkpoint"})));
    m.rollback_to_checkpoint(&c1).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 1})));
    m.shutdown().await.unwrap();
}

async fn rollback_to_unknown_checkpoint_is_not_found(compression: Option<u32>) {
    let (_dir, m) = open_temp(compression).await;
    m.save_session("s1", &json!({"step": 5})).await.unwrap();
    m.create_checkpoint("s1", "main", &json!({"step": 1})).await.unwrap();
    let unknown = CheckpointId::parse("0000000000000001-deadbeef").unwrap();
    let e = assert_kind(
        m.rollback_to_checkpoint(&unknown).await,
        ErrorKind::NotFound,
        "unknown checkpoint",
    );
    match e {
        StateError::CheckpointNotFound { id } => assert_eq!(id, unknown.to_string()),
        other => panic!("expected CheckpointNotFound, got {other:?}"),
    }
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 5})), "state untouched");
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// list_checkpoints
// ---------------------------------------------------------------------------------------

async fn list_checkpoints_200_in_a_tight_loop(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    let mut created = Vec::new();
    for i in 0..200 {
        let branch = if i % 2 == 0 { "even" } else { "odd" };
        created.push((m.create_checkpoint("s1", branch, &json!({"i": i})).await.unwrap(), branch));
    }
    for w in created.windows(2) {
        assert!(w[0].0 < w[1].0, "ids not strictly increasing: {} then {}", w[0].0, w[1].0);
    }
    let check = |list: &[mars_state::CheckpointInfo]| {
        assert_eq!(list.len(), 200, "no checkpoint made in a tight loop may overwrite another");
        for (info, (id, branch)) in list.iter().zip(&created) {
            assert_eq!(&info.id, id, "listed oldest first, in creation order");
            assert_eq!(info.session_id.as_str(), "s1");
            assert_eq!(info.branch_id.as_str(), *branch);
            assert_eq!(info.timestamp, id.timestamp_ms());
            assert!(info.size_bytes > 0);
        }
        for w in list.windows(2) {
            assert!(w[0].id < w[1].id);
            assert!(w[0].timestamp <= w[1].timestamp);
        }
    };
    let list = m.list_checkpoints("s1").await.unwrap();
    check(&list);
    // size_bytes is the record's size on disk.
    if on_file_backend() {
        for info in [&list[0], &list[199]] {
            let files = checkpoint_files(dir.path(), &info.id);
            assert_eq!(files.len(), 1);
            assert_eq!(std::fs::metadata(&files[0]).unwrap().len(), info.size_bytes);
        }
        assert_eq!(files_under(dir.path(), "checkpoints").len(), 200);
    }
    // Every one restores to its own data.
    for (i, (id, _)) in created.iter().enumerate().step_by(37) {
        assert_eq!(m.restore_checkpoint(id).await.unwrap().unwrap().data, json!({"i": i}));
    }

    // Same list after a restart, and new ids keep increasing past the old ones.
    let m = restart(m, dir.path(), compression).await;
    let list = m.list_checkpoints("s1").await.unwrap();
    check(&list);
    let last = created.last().unwrap().0.clone();
    let mut prev = last;
    for i in 0..20 {
        let id = m.create_checkpoint("s1", "even", &json!({"after": i})).await.unwrap();
        assert!(id > prev, "id {id} after restart is not after {prev}");
        prev = id;
    }
    let list = m.list_checkpoints("s1").await.unwrap();
    assert_eq!(list.len(), 220);
    assert_eq!(list.last().unwrap().id, prev);
    m.shutdown().await.unwrap();
}

async fn list_checkpoints_of_unknown_session_is_empty(compression: Option<u32>) {
    let (_dir, m) = open_temp(compression).await;
    m.save_session("has_state_only", &json!(1)).await.unwrap();
    assert!(m.list_checkpoints("nobody").await.unwrap().is_empty());
    assert!(m.list_checkpoints("has_state_only").await.unwrap().is_empty());
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// cleanup_checkpoints
// ---------------------------------------------------------------------------------------

async fn cleanup_checkpoints_keeps_newest(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    m.save_session("s1", &json!({"state": true})).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(m.create_checkpoint("s1", "main", &json!({"i": i})).await.unwrap());
    }
    let other = m.create_checkpoint("s2", "main", &json!("other")).await.unwrap();

    assert_eq!(m.cleanup_checkpoints("s1", 3).await.unwrap(), 4);
    let listed = checkpoint_ids(&m, "s1").await;
    assert_eq!(listed, ids[4..].to_vec(), "the 3 newest are kept");
    for id in &ids[..4] {
        assert!(m.restore_checkpoint(id).await.unwrap().is_none(), "{id} should be gone");
        if on_file_backend() {
            assert!(checkpoint_files(dir.path(), id).is_empty(), "{id}'s file should be gone");
        }
        assert_kind(
            m.rollback_to_checkpoint(id).await,
            ErrorKind::NotFound,
            "rollback to removed checkpoint",
        );
    }
    for (i, id) in ids.iter().enumerate().skip(4) {
        assert_eq!(m.restore_checkpoint(id).await.unwrap().unwrap().data, json!({"i": i}));
    }
    // Nothing else is touched.
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"state": true})));
    assert!(m.restore_checkpoint(&other).await.unwrap().is_some());
    assert_eq!(m.get_storage_stats().await.unwrap().checkpoint_count, 4);

    // Idempotent; keeping more than exist removes nothing.
    assert_eq!(m.cleanup_checkpoints("s1", 3).await.unwrap(), 0);
    assert_eq!(m.cleanup_checkpoints("s1", 100).await.unwrap(), 0);
    assert_eq!(m.cleanup_checkpoints("nobody", 0).await.unwrap(), 0);

    // Survives a restart; keep 0 removes all, but not the session's state.
    let m = restart(m, dir.path(), compression).await;
    let listed = checkpoint_ids(&m, "s1").await;
    assert_eq!(listed, ids[4..].to_vec());
    assert_eq!(m.cleanup_checkpoints("s1", 0).await.unwrap(), 3);
    assert!(m.list_checkpoints("s1").await.unwrap().is_empty());
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"state": true})));
    assert_eq!(session_info(&m.list_sessions().await.unwrap(), "s1").checkpoint_count, 0);
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// transactional_update
// ---------------------------------------------------------------------------------------

async fn transactional_update_increments(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    // The first call sees no state.
    let seen = m
        .transactional_update("s1", |old: Option<Value>| {
            assert!(old.is_none());
            Ok::<_, Refused>(json!({"n": 1}))
        })
        .await
        .unwrap();
    assert_eq!(seen, json!({"n": 1}));
    for expected in 2..=10 {
        assert_eq!(m.transactional_update("s1", increment).await.unwrap(), json!({"n": expected}));
    }
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"n": 10})));
    // Sees a state written by save_session.
    m.save_session("s1", &json!({"n": 100})).await.unwrap();
    assert_eq!(m.transactional_update("s1", increment).await.unwrap(), json!({"n": 101}));

    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"n": 101})));
    // After a restart the closure sees the stored state.
    assert_eq!(m.transactional_update("s1", increment).await.unwrap(), json!({"n": 102}));
    m.shutdown().await.unwrap();
}

async fn transactional_update_typed(compression: Option<u32>) {
    let (_dir, m) = open_temp(compression).await;
    for expected in 1..=3u64 {
        let c: Counter = m
            .transactional_update("typed", |old: Option<Counter>| {
                Ok::<_, std::io::Error>(Counter { n: old.map_or(0, |c| c.n) + 1 })
            })
            .await
            .unwrap();
        assert_eq!(c, Counter { n: expected });
    }
    assert_eq!(m.load_session_as::<Counter>("typed").await.unwrap(), Some(Counter { n: 3 }));
    // A stored state that does not fit T is a Serialization error, and nothing is written.
    m.save_session("untyped", &json!({"n": "not a number"})).await.unwrap();
    let r = m
        .transactional_update("untyped", |_old: Option<Counter>| {
            Ok::<_, std::io::Error>(Counter { n: 0 })
        })
        .await;
    assert_kind(r, ErrorKind::Serialization, "old state of the wrong type");
    assert_eq!(m.load_session("untyped").await.unwrap(), Some(json!({"n": "not a number"})));
    m.shutdown().await.unwrap();
}

async fn transactional_update_err_writes_nothing(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    m.save_session("s1", &json!({"n": 5})).await.unwrap();
    // The record's bytes, on the file backend.
    let path = session_file(dir.path(), "s1", compression);
    let bytes_before = on_file_backend().then(|| std::fs::read(&path).unwrap());
    let info_before = listed_records(&m).await;

    let r =
        m.transactional_update("s1", |_old: Option<Value>| Err::<Value, _>(Refused("no"))).await;
    let e = assert_kind(r, ErrorKind::UpdateRejected, "closure error");
    match &e {
        StateError::UpdateRejected { session, source } => {
            assert_eq!(session, "s1");
            assert_eq!(source.to_string(), "closure refused: no");
            assert!(
                source.downcast_ref::<Refused>().is_some(),
                "the closure's error is the source"
            );
        }
        other => panic!("expected UpdateRejected, got {other:?}"),
    }
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"n": 5})));
    if let Some(bytes_before) = &bytes_before {
        assert_eq!(&std::fs::read(&path).unwrap(), bytes_before, "the record was rewritten");
    }
    assert_eq!(listed_records(&m).await, info_before, "the index changed");

    // On a session without state, a rejected update creates nothing.
    let r =
        m.transactional_update("empty", |_old: Option<Value>| Err::<Value, _>(Refused("no"))).await;
    assert_kind(r, ErrorKind::UpdateRejected, "closure error on empty session");
    assert_eq!(m.load_session("empty").await.unwrap(), None);
    if on_file_backend() {
        assert!(!session_file(dir.path(), "empty", compression).exists());
    }
    assert_eq!(m.list_sessions().await.unwrap().len(), 1);

    // The session keeps working.
    assert_eq!(m.transactional_update("s1", increment).await.unwrap(), json!({"n": 6}));
    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"n": 6})));
    assert_eq!(m.load_session("empty").await.unwrap(), None);
    m.shutdown().await.unwrap();
}

async fn transactional_update_panic_is_contained(compression: Option<u32>) {
    quiet_deliberate_panics();
    let (dir, m) = open_temp(compression).await;
    m.save_session("s1", &json!({"n": 1})).await.unwrap();
    // The record's bytes, on the file backend.
    let path = session_file(dir.path(), "s1", compression);
    let bytes_before = on_file_backend().then(|| std::fs::read(&path).unwrap());

    let r = m
        .transactional_update("s1", |_old: Option<Value>| -> Result<Value, Refused> {
            panic!("deliberate boom")
        })
        .await;
    let e = assert_kind(r, ErrorKind::Panicked, "panicking closure");
    match &e {
        StateError::Panicked { session, message } => {
            assert_eq!(session, "s1");
            assert!(message.contains("deliberate boom"), "panic message not carried: {message:?}");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    // Nothing was written.
    if let Some(bytes_before) = &bytes_before {
        assert_eq!(&std::fs::read(&path).unwrap(), bytes_before);
    }
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"n": 1})));

    // A formatted (String) panic payload is carried too.
    let r = m
        .transactional_update("s1", |_old: Option<Value>| -> Result<Value, Refused> {
            panic!("deliberate panic number {}", 2)
        })
        .await;
    match assert_kind(r, ErrorKind::Panicked, "String payload") {
        StateError::Panicked { message, .. } => {
            assert!(message.contains("deliberate panic number 2"), "{message:?}")
        }
        other => panic!("{other:?}"),
    }

    // The session keeps working afterwards: save, load, update, checkpoint.
    assert_eq!(m.transactional_update("s1", increment).await.unwrap(), json!({"n": 2}));
    m.save_session("s1", &json!({"n": 10})).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"n": 10})));
    let id = m.create_checkpoint("s1", "main", &json!({"n": 10})).await.unwrap();
    assert!(m.restore_checkpoint(&id).await.unwrap().is_some());
    // Other sessions were never affected.
    m.save_session("s2", &json!("ok")).await.unwrap();
    assert_eq!(m.load_session("s2").await.unwrap(), Some(json!("ok")));

    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"n": 10})));
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// get_storage_stats
// ---------------------------------------------------------------------------------------

fn record_bytes_on_disk(dir: &Path) -> u64 {
    files_under(dir, "sessions")
        .iter()
        .chain(files_under(dir, "checkpoints").iter())
        .map(|(_, s)| s)
        .sum()
}

async fn get_storage_stats_matches_disk(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    let empty = m.get_storage_stats().await.unwrap();
    assert_eq!((empty.session_count, empty.checkpoint_count, empty.total_bytes), (0, 0, 0));
    assert_eq!(empty.total_size_mb(), 0.0);

    for i in 0..5 {
        m.save_session(format!("s{i}"), &json!({"i": i, "pad": "p".repeat(1000 * i)}))
            .await
            .unwrap();
    }
    for i in 0..4 {
        m.create_checkpoint("s0", "main", &json!({"c": i})).await.unwrap();
    }
    m.create_checkpoint("cp_only", "main", &json!({"c": 0})).await.unwrap();

    let stats = m.get_storage_stats().await.unwrap();
    assert_eq!(stats.session_count, 6);
    assert_eq!(stats.checkpoint_count, 5);
    if on_file_backend() {
        assert_eq!(
            stats.total_bytes,
            record_bytes_on_disk(dir.path()),
            "total_bytes is the records' size on disk"
        );
    }
    assert!((stats.total_size_mb() - stats.total_bytes as f64 / (1024.0 * 1024.0)).abs() < 1e-12);
    let listed: u64 = m.list_sessions().await.unwrap().iter().map(|s| s.size_bytes).sum::<u64>()
        + m.list_checkpoints("s0").await.unwrap().iter().map(|c| c.size_bytes).sum::<u64>()
        + m.list_checkpoints("cp_only").await.unwrap().iter().map(|c| c.size_bytes).sum::<u64>();
    assert_eq!(stats.total_bytes, listed);

    // Deletes are reflected.
    m.delete_session("s0").await.unwrap();
    let after = m.get_storage_stats().await.unwrap();
    assert_eq!((after.session_count, after.checkpoint_count), (5, 1));
    if on_file_backend() {
        assert_eq!(after.total_bytes, record_bytes_on_disk(dir.path()));
    }

    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.get_storage_stats().await.unwrap(), after);
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// cleanup_old_sessions
// ---------------------------------------------------------------------------------------

/// [`builder`], for a test under paused time (see `backend_for_paused_time`).
fn paused_builder(dir: &Path, compression: Option<u32>) -> mars_state::StateManagerBuilder {
    with_compression(StateManager::builder(backend_for_paused_time(dir)), compression)
}

/// A manager for paused-time tests: session actors never passivate while time is advanced
/// (passivation has tests of its own in tests/concurrency.rs).
async fn open_for_aging(dir: &Path, compression: Option<u32>) -> StateManager {
    paused_builder(dir, compression)
        .idle_timeout(Duration::from_secs(365 * 86_400))
        .start()
        .await
        .expect("start manager")
}

async fn cleanup_old_sessions_respects_age_and_keep_last(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = open_for_aging(dir.path(), compression).await;
    let minute = Duration::from_secs(60);
    m.save_session("old1", &json!(1)).await.unwrap();
    let old1_cp = m.create_checkpoint("old1", "main", &json!(1)).await.unwrap();
    tokio::time::advance(minute).await;
    m.save_session("old2", &json!(2)).await.unwrap();
    tokio::time::advance(minute).await;
    m.save_session("old3", &json!(3)).await.unwrap();
    tokio::time::advance(minute).await;
    // Activity of a checkpoint-only session is its newest checkpoint.
    m.create_checkpoint("newest_cp_only", "main", &json!(4)).await.unwrap();
    tokio::time::advance(minute).await;

    // Nothing is older than an hour.
    assert_eq!(m.cleanup_old_sessions(Duration::from_secs(3600), 0).await.unwrap(), 0);
    assert_eq!(m.list_sessions().await.unwrap().len(), 4);
    // Older than 150 s: old1 and old2 (4 and 3 minutes), not old3 (2 minutes).
    assert_eq!(m.cleanup_old_sessions(Duration::from_secs(150), 0).await.unwrap(), 2);
    let ids = session_ids(&m).await;
    assert_eq!(ids, ["newest_cp_only", "old3"]);
    assert_eq!(m.load_session("old1").await.unwrap(), None);
    assert_eq!(m.load_session("old2").await.unwrap(), None);
    assert!(
        m.restore_checkpoint(&old1_cp).await.unwrap().is_none(),
        "checkpoints go with their session"
    );
    if on_file_backend() {
        assert!(!session_file(dir.path(), "old1", compression).exists());
        assert!(
            files_under(dir.path(), "checkpoints")
                .iter()
                .all(|(p, _)| !p.to_string_lossy().contains("old1"))
        );
    }
    assert_eq!(m.load_session("old3").await.unwrap(), Some(json!(3)));

    // Everything is older than 30 s, but keep_last spares the most recently active one.
    assert_eq!(m.cleanup_old_sessions(Duration::from_secs(30), 1).await.unwrap(), 1);
    let ids = session_ids(&m).await;
    assert_eq!(ids, ["newest_cp_only"]);

    // The ages survive a restart.
    m.save_session("old3", &json!(3)).await.unwrap();
    tokio::time::advance(minute).await;
    m.shutdown().await.unwrap();
    let m = open_for_aging(dir.path(), compression).await;
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(m.cleanup_old_sessions(Duration::from_secs(30), 0).await.unwrap(), 2);
    assert!(m.list_sessions().await.unwrap().is_empty());
    assert_eq!(m.get_storage_stats().await.unwrap().total_bytes, 0);
    m.shutdown().await.unwrap();
}

async fn cleanup_old_sessions_keeps_recent_sessions(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = open_for_aging(dir.path(), compression).await;
    m.save_session("stale", &json!("stale")).await.unwrap();
    m.create_checkpoint("stale", "main", &json!("stale")).await.unwrap();
    tokio::time::advance(Duration::from_secs(2 * 3600)).await;
    m.save_session("recent", &json!("recent")).await.unwrap();
    m.save_session("touched", &json!("v1")).await.unwrap();
    tokio::time::advance(Duration::from_secs(2 * 3600)).await;
    // A checkpoint is activity too: it keeps an otherwise old session.
    m.create_checkpoint("touched", "main", &json!("cp")).await.unwrap();
    tokio::time::advance(Duration::from_secs(60)).await;

    // Idle longer than 3 h: only "stale" (4 h); "recent" is 2 h idle, "touched" 1 minute.
    assert_eq!(m.cleanup_old_sessions(Duration::from_secs(3 * 3600), 0).await.unwrap(), 1);
    assert_eq!(m.load_session("stale").await.unwrap(), None);
    assert_eq!(m.load_session("recent").await.unwrap(), Some(json!("recent")));
    assert_eq!(m.load_session("touched").await.unwrap(), Some(json!("v1")));
    assert_eq!(m.list_checkpoints("touched").await.unwrap().len(), 1);
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// vacuum_storage
// ---------------------------------------------------------------------------------------

async fn vacuum_storage_sweeps_and_rebuilds(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    m.save_session("s1", &json!({"a": 1})).await.unwrap();
    m.save_session("s2", &json!({"b": 2})).await.unwrap();
    let cp = m.create_checkpoint("s1", "main", &json!({"c": 3})).await.unwrap();
    let stats_before = m.get_storage_stats().await.unwrap();

    // A staged file left by an interrupted write (the file backend's kind of leftover; the
    // other backends leave none).
    let staged = on_file_backend().then(|| {
        let staged = dir
            .path()
            .join("sessions")
            .join(format!(".s1{}.tmp-0123456789abcdef", ext(compression)));
        put_file(&staged, b"half a record");
        staged
    });

    let report = m.vacuum_storage().await.unwrap();
    let planted = usize::from(staged.is_some());
    assert_eq!(report.temp_files_removed, planted, "{report:?}");
    assert_eq!(report.temp_bytes_freed, 13 * planted as u64, "{report:?}");
    if let Some(staged) = &staged {
        assert!(!staged.exists(), "staged file not removed");
    }
    assert_eq!(report.index_entries, 3, "{report:?}");
    assert!(report.corrupt_records.is_empty(), "{report:?}");
    assert_eq!(report.orphans_removed, 0);

    // Nothing live was touched.
    assert_eq!(m.get_storage_stats().await.unwrap(), stats_before);
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"a": 1})));
    assert_eq!(m.restore_checkpoint(&cp).await.unwrap().unwrap().data, json!({"c": 3}));
    assert_eq!(m.list_checkpoints("s1").await.unwrap().len(), 1);

    // A second pass finds nothing to do.
    let again = m.vacuum_storage().await.unwrap();
    assert_eq!((again.temp_files_removed, again.index_entries), (0, 3));
    m.shutdown().await.unwrap();
}

async fn vacuum_storage_reports_corrupt_records(compression: Option<u32>) {
    if !file_backend_only("vacuum_storage_reports_corrupt_records", "damages a record file") {
        return;
    }
    let (dir, m) = open_temp(compression).await;
    m.save_session("good", &json!({"ok": true})).await.unwrap();
    m.save_session("bad", &json!({"ok": false})).await.unwrap();
    let path = session_file(dir.path(), "bad", compression);
    flip_byte(&path, |len| len / 2, 0x20);

    let report = m.vacuum_storage().await.unwrap();
    assert_eq!(report.corrupt_records.len(), 1, "{report:?}");
    assert!(report.corrupt_records[0].contains("bad"), "{report:?}");
    assert!(path.exists(), "the damaged record is kept for inspection");
    m.shutdown().await.unwrap();

    // A fresh manager reports the damage on load, never None or wrong data.
    let m = open(dir.path(), compression).await;
    let e = assert_kind(m.load_session("bad").await, ErrorKind::Corrupt, "damaged record");
    assert!(e.to_string().contains("bad"), "the error names the key: {e}");
    assert_eq!(m.load_session("good").await.unwrap(), Some(json!({"ok": true})));
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// shutdown
// ---------------------------------------------------------------------------------------

async fn shutdown_makes_later_calls_unavailable(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    m.save_session("s1", &json!(1)).await.unwrap();
    let id = m.create_checkpoint("s1", "main", &json!(1)).await.unwrap();
    let clone = m.clone();
    m.shutdown().await.unwrap();

    for h in [&m, &clone] {
        let u = ErrorKind::Unavailable;
        assert_kind(h.save_session("s1", &json!(2)).await, u, "save_session");
        assert_kind(h.load_session("s1").await, u, "load_session");
        assert_kind(h.load_session_as::<Value>("s1").await, u, "load_session_as");
        assert_kind(h.delete_session("s1").await, u, "delete_session");
        assert_kind(h.list_sessions().await, u, "list_sessions");
        assert_kind(h.create_checkpoint("s1", "main", &json!(2)).await, u, "create_checkpoint");
        assert_kind(h.restore_checkpoint(&id).await, u, "restore_checkpoint");
        assert_kind(h.rollback_to_checkpoint(&id).await, u, "rollback_to_checkpoint");
        assert_kind(h.list_checkpoints("s1").await, u, "list_checkpoints");
        assert_kind(h.cleanup_checkpoints("s1", 0).await, u, "cleanup_checkpoints");
        assert_kind(h.transactional_update("s1", increment).await, u, "transactional_update");
        assert_kind(h.get_storage_stats().await, u, "get_storage_stats");
        assert_kind(h.cleanup_old_sessions(Duration::ZERO, 0).await, u, "cleanup_old_sessions");
        assert_kind(h.vacuum_storage().await, u, "vacuum_storage");
        assert_kind(h.run_janitor_now().await, u, "run_janitor_now");
        assert_kind(h.session_actor("s1").await, u, "session_actor");
        assert_kind(h.live_session_actors().await, u, "live_session_actors");
    }
    // A second shutdown is harmless.
    m.shutdown().await.unwrap();
    clone.shutdown().await.unwrap();

    // Nothing was written after shutdown.
    let m2 = open(dir.path(), compression).await;
    assert_eq!(m2.load_session("s1").await.unwrap(), Some(json!(1)));
    assert_eq!(m2.list_checkpoints("s1").await.unwrap().len(), 1);
    m2.shutdown().await.unwrap();
}

async fn shutdown_drains_and_releases_the_store(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    // Queue many saves from other tasks, then shut down while they may still be queued.
    let tasks = spawn_each(&m, 0..20, |m, i| async move {
        (i, m.save_session(format!("s{i}"), &json!({"i": i})).await)
    });
    tokio::task::yield_now().await;
    m.shutdown().await.unwrap();
    let mut acked = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r {
            Ok(()) => acked.push(i),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Unavailable, "save {i} failed with {e}"),
        }
    }
    // The lock is released at once: a new backend on the same directory opens.
    let m = open(dir.path(), compression).await;
    for i in acked {
        assert_eq!(
            m.load_session(format!("s{i}")).await.unwrap(),
            Some(json!({"i": i})),
            "acked save s{i} lost"
        );
    }
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// session_actor + SessionMsg
// ---------------------------------------------------------------------------------------

async fn session_actor_answers_session_msgs(compression: Option<u32>) {
    let (_dir, m) = open_temp(compression).await;
    let actor = m.session_actor("s1").await.unwrap();

    let state = StateBytes::from_serialize(&json!({"step": 3})).unwrap();
    ractor::call!(actor, |reply| SessionMsg::Save { state, reply }).unwrap().unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 3})));

    m.save_session("s1", &json!({"step": 4})).await.unwrap();
    let loaded =
        ractor::call!(actor, |reply| SessionMsg::Load { reply }).unwrap().unwrap().unwrap();
    assert_eq!(loaded.deserialize::<Value>().unwrap(), json!({"step": 4}));

    let branch_id = mars_state::BranchId::new("main").unwrap();
    let state = StateBytes::from_serialize(&json!({"cp": 1})).unwrap();
    let cid = ractor::call!(actor, |reply| SessionMsg::CreateCheckpoint {
        branch_id,
        state,
        reason: mars_state::CheckpointReason::Manual,
        reply
    })
    .unwrap()
    .unwrap();
    assert_eq!(m.restore_checkpoint(&cid).await.unwrap().unwrap().data, json!({"cp": 1}));
    assert_eq!(m.list_checkpoints("s1").await.unwrap().len(), 1);

    let update: UpdateFn = Box::new(|old: Option<&[u8]>| {
        let old: Value = serde_json::from_slice(old.expect("state present")).unwrap();
        Ok(serde_json::to_vec(&json!({"step": old["step"].as_i64().unwrap() + 1})).unwrap())
    });
    let new = ractor::call!(actor, |reply| SessionMsg::Update { update, reply }).unwrap().unwrap();
    assert_eq!(new.deserialize::<Value>().unwrap(), json!({"step": 5}));
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 5})));

    let checkpoint_id = cid.clone();
    ractor::call!(actor, |reply| SessionMsg::Rollback { checkpoint_id, truncate: false, reply })
        .unwrap()
        .unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"cp": 1})));

    // Domain failures come back in the reply and do not stop the actor.
    let checkpoint_id = CheckpointId::parse("0000000000000001-00000000").unwrap();
    let r = ractor::call!(actor, |reply| SessionMsg::Rollback {
        checkpoint_id,
        truncate: false,
        reply
    })
    .unwrap();
    assert_kind(r, ErrorKind::NotFound, "rollback via actor to unknown checkpoint");
    let loaded =
        ractor::call!(actor, |reply| SessionMsg::Load { reply }).unwrap().unwrap().unwrap();
    assert_eq!(loaded.deserialize::<Value>().unwrap(), json!({"cp": 1}), "the actor still serves");

    let removed = ractor::call!(actor, |reply| SessionMsg::CleanupCheckpoints { keep: 0, reply })
        .unwrap()
        .unwrap();
    assert_eq!(removed, 1);

    // DeleteIfIdle: not idle since the epoch, so kept; idle before the end of time, so deleted.
    let kept = ractor::call!(actor, |reply| SessionMsg::DeleteIfIdle { cutoff_ms: 0, reply })
        .unwrap()
        .unwrap();
    assert!(!kept, "a session active after the cutoff is kept");
    assert!(m.load_session("s1").await.unwrap().is_some());
    let gone =
        ractor::call!(actor, |reply| SessionMsg::DeleteIfIdle { cutoff_ms: u64::MAX, reply })
            .unwrap()
            .unwrap();
    assert!(gone, "a session idle since before the cutoff is deleted");
    assert_eq!(m.load_session("s1").await.unwrap(), None);
    m.save_session("s1", &json!({"cp": 1})).await.unwrap();

    let existed = ractor::call!(actor, |reply| SessionMsg::Delete { reply }).unwrap().unwrap();
    assert!(existed);
    assert_eq!(m.load_session("s1").await.unwrap(), None);
    let loaded = ractor::call!(actor, |reply| SessionMsg::Load { reply }).unwrap().unwrap();
    assert!(loaded.is_none());

    // The manager hands out the same live actor for the same session.
    assert_eq!(m.session_actor("s1").await.unwrap().get_id(), actor.get_id());
    assert_ne!(m.session_actor("s2").await.unwrap().get_id(), actor.get_id());
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// On-disk format and store settings
// ---------------------------------------------------------------------------------------

async fn records_have_documented_on_disk_format(compression: Option<u32>) {
    if !file_backend_only("records_have_documented_on_disk_format", "reads the record files") {
        return;
    }
    let (dir, m) = open_temp(compression).await;
    let state = json!({"step": 42, "msg": "hello"});
    m.save_session("session_123", &state).await.unwrap();
    let cid = m.create_checkpoint("session_123", "branch_456", &json!({"step": 25})).await.unwrap();

    let path = session_file(dir.path(), "session_123", compression);
    assert!(path.exists(), "expected {}", path.display());
    let other =
        session_file(dir.path(), "session_123", if compression.is_some() { None } else { Some(6) });
    assert!(!other.exists(), "unexpected {}", other.display());
    let record = read_record(&path, compression);
    assert_eq!(record["data"], state, "record: {record}");
    assert_eq!(record["session_id"], "session_123");

    let cp_files = checkpoint_files(dir.path(), &cid);
    assert_eq!(cp_files.len(), 1);
    assert!(cp_files[0].to_string_lossy().ends_with(ext(compression)), "{}", cp_files[0].display());
    let cp = read_record(&cp_files[0], compression);
    assert_eq!(cp["data"], json!({"step": 25}), "checkpoint record: {cp}");
    assert_eq!(cp["branch_id"], "branch_456");
    assert_eq!(cp["checkpoint_id"], cid.as_str());

    // Every record file carries the store's extension.
    for (p, _) in files_under(dir.path(), "sessions")
        .into_iter()
        .chain(files_under(dir.path(), "checkpoints"))
    {
        assert!(p.to_string_lossy().ends_with(ext(compression)), "{}", p.display());
        if compression.is_none() {
            assert!(!p.to_string_lossy().ends_with(".gz"), "{}", p.display());
        }
    }
    for sub in ["sessions", "checkpoints", "metadata"] {
        assert!(dir.path().join(sub).is_dir(), "{sub}/ missing");
    }
    m.shutdown().await.unwrap();
}

async fn store_keeps_its_format_under_any_compression_setting(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    m.save_session("s1", &json!(1)).await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);

    // The other setting opens the store, reads it, and writes in the store's format.
    let opposite = if compression.is_some() { None } else { Some(6) };
    let m = open(dir.path(), opposite).await;
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!(1)));
    m.save_session("s2", &json!(2)).await.unwrap();
    m.shutdown().await.unwrap();
    if on_file_backend() {
        assert!(
            session_file(dir.path(), "s2", compression).exists(),
            "s2 is named like the store's records"
        );
    }
    // Another gzip level too.
    if compression.is_some() {
        let m = open(dir.path(), Some(1)).await;
        assert_eq!(m.load_session("s2").await.unwrap(), Some(json!(2)));
        m.shutdown().await.unwrap();
    }
    let m = open(dir.path(), compression).await;
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!(1)));
    assert_eq!(m.load_session("s2").await.unwrap(), Some(json!(2)));
    m.shutdown().await.unwrap();

    // Invalid levels are configuration errors.
    for level in [0, 10] {
        let other = tempfile::tempdir().unwrap();
        let r = builder(other.path(), Some(level)).start().await;
        assert_kind(r, ErrorKind::Config, "gzip level out of range");
    }
}

async fn too_large_states_are_rejected(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = builder(dir.path(), compression).max_state_bytes(100).start().await.unwrap();
    // A JSON string of n characters serializes to n + 2 bytes.
    let fits = "x".repeat(98);
    let too_big = "x".repeat(99);
    m.save_session("s1", &fits).await.unwrap();
    let e = assert_kind(
        m.save_session("s1", &too_big).await,
        ErrorKind::TooLarge,
        "save over the limit",
    );
    match e {
        StateError::TooLarge { size, limit } => assert_eq!((size, limit), (101, 100)),
        other => panic!("{other:?}"),
    }
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!(fits)), "previous state kept");

    assert_kind(
        m.save_session("new", &too_big).await,
        ErrorKind::TooLarge,
        "save of a new session",
    );
    assert_eq!(m.load_session("new").await.unwrap(), None);
    if on_file_backend() {
        assert!(!session_file(dir.path(), "new", compression).exists());
    }

    assert_kind(
        m.create_checkpoint("s1", "main", &too_big).await,
        ErrorKind::TooLarge,
        "checkpoint over the limit",
    );
    assert!(m.list_checkpoints("s1").await.unwrap().is_empty());
    m.create_checkpoint("s1", "main", &fits).await.unwrap();

    let big = too_big.clone();
    let r =
        m.transactional_update("s1", move |_old: Option<Value>| Ok::<_, Refused>(json!(big))).await;
    assert_kind(r, ErrorKind::TooLarge, "update producing a state over the limit");
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!(fits)));
    m.shutdown().await.unwrap();
}

async fn invalid_ids_are_rejected(compression: Option<u32>) {
    let (_dir, m) = open_temp(compression).await;
    for bad in ["", "..", "../x", "/abs", "a/b", "a\0b"] {
        let k = ErrorKind::InvalidId;
        assert_kind(m.save_session(bad, &json!(1)).await, k, "save_session");
        assert_kind(m.load_session(bad).await, k, "load_session");
        assert_kind(m.delete_session(bad).await, k, "delete_session");
        assert_kind(m.create_checkpoint(bad, "main", &json!(1)).await, k, "create_checkpoint");
        assert_kind(m.create_checkpoint("ok", bad, &json!(1)).await, k, "create_checkpoint branch");
        assert_kind(m.list_checkpoints(bad).await, k, "list_checkpoints");
        assert_kind(m.cleanup_checkpoints(bad, 0).await, k, "cleanup_checkpoints");
        assert_kind(m.transactional_update(bad, increment).await, k, "transactional_update");
        assert_kind(m.session_actor(bad).await, k, "session_actor");
    }
    assert!(m.list_sessions().await.unwrap().is_empty(), "a rejected id touched nothing");
    m.shutdown().await.unwrap();
}

async fn second_backend_on_same_dir_is_locked(compression: Option<u32>) {
    if !locking_backend_only("second_backend_on_same_dir_is_locked") {
        return;
    }
    let (dir, m) = open_temp(compression).await;
    m.save_session("s1", &json!(1)).await.unwrap();
    match open_backend(dir.path(), FileWrites::Defaults, Duration::ZERO) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Locked, "{e}"),
        Ok(_) => panic!("a second backend opened a locked store"),
    }
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!(1)));
    m.shutdown().await.unwrap();
    // Released by shutdown.
    let m = open(dir.path(), compression).await;
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!(1)));
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Builder settings, janitor, live actors
// ---------------------------------------------------------------------------------------

async fn builder_rejects_zero_durations(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let r = builder(dir.path(), compression).idle_timeout(Duration::ZERO).start().await;
    assert_kind(r, ErrorKind::Config, "zero idle timeout");
    let r = builder(dir.path(), compression).call_timeout(Duration::ZERO).start().await;
    assert_kind(r, ErrorKind::Config, "zero call timeout");
    let r = builder(dir.path(), compression).janitor_interval(Duration::ZERO).start().await;
    assert_kind(r, ErrorKind::Config, "zero janitor interval");
    // A rejected configuration leaves the store usable.
    let m = open(dir.path(), compression).await;
    m.save_session("s1", &json!(1)).await.unwrap();
    m.shutdown().await.unwrap();
}

async fn run_janitor_now_applies_retention(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let policy = RetentionPolicy { keep_checkpoints: Some(2), ..Default::default() };
    let m = builder(dir.path(), compression).retention(policy).start().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(m.create_checkpoint("s1", "main", &json!({"i": i})).await.unwrap());
    }
    m.create_checkpoint("s2", "main", &json!("only one")).await.unwrap();
    // A staged file of the file backend (the other backends leave none).
    let staged = on_file_backend().then(|| {
        let staged = dir.path().join("checkpoints").join(".junk.json.tmp-00000000000000ff");
        put_file(&staged, b"abc");
        staged
    });

    let report = m.run_janitor_now().await.unwrap();
    assert_eq!(report.checkpoints_removed, 3, "{report:?}");
    assert_eq!(report.temp_files_removed, usize::from(staged.is_some()), "{report:?}");
    assert_eq!(report.sessions_removed, 0, "{report:?}");
    if let Some(staged) = &staged {
        assert!(!staged.exists());
    }
    let kept = checkpoint_ids(&m, "s1").await;
    assert_eq!(kept, ids[3..].to_vec(), "the newest 2 are kept");
    assert_eq!(m.list_checkpoints("s2").await.unwrap().len(), 1);
    assert!(m.restore_checkpoint(&ids[0]).await.unwrap().is_none());
    assert_eq!(m.run_janitor_now().await.unwrap().checkpoints_removed, 0);
    m.shutdown().await.unwrap();
}

async fn run_janitor_now_drops_idle_sessions(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let policy =
        RetentionPolicy { max_session_idle: Some(Duration::from_secs(3600)), ..Default::default() };
    let m = paused_builder(dir.path(), compression)
        .retention(policy)
        .idle_timeout(Duration::from_secs(365 * 86_400))
        .janitor_interval(Duration::from_secs(365 * 86_400))
        .start()
        .await
        .unwrap();
    m.save_session("idle", &json!(1)).await.unwrap();
    m.create_checkpoint("idle_cp_only", "main", &json!(1)).await.unwrap();
    tokio::time::advance(Duration::from_secs(2 * 3600)).await;
    m.save_session("active", &json!(2)).await.unwrap();
    let report = m.run_janitor_now().await.unwrap();
    assert_eq!(report.sessions_removed, 2, "{report:?}");
    let ids = session_ids(&m).await;
    assert_eq!(ids, ["active"]);
    assert_eq!(m.load_session("idle").await.unwrap(), None);
    assert_eq!(m.run_janitor_now().await.unwrap().sessions_removed, 0);
    m.shutdown().await.unwrap();
}

async fn transactional_update_on_corrupt_record_is_an_error(compression: Option<u32>) {
    if !file_backend_only(
        "transactional_update_on_corrupt_record_is_an_error",
        "damages a record file",
    ) {
        return;
    }
    let (dir, m) = open_temp(compression).await;
    m.save_session("s1", &json!({"n": 1})).await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);
    let path = session_file(dir.path(), "s1", compression);
    let bytes = flip_byte(&path, |len| len - 3, 0x01);

    let m = open(dir.path(), compression).await;
    let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = called.clone();
    let r = m
        .transactional_update("s1", move |old: Option<Value>| {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            increment(old)
        })
        .await;
    let e = assert_kind(r, ErrorKind::Corrupt, "update over a damaged record");
    assert!(e.to_string().contains("s1"), "{e}");
    assert!(
        !called.load(std::sync::atomic::Ordering::SeqCst),
        "the closure must not see a damaged state as None"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "the damaged record is kept as it was");
    assert_kind(m.load_session("s1").await, ErrorKind::Corrupt, "load of a damaged record");
    m.shutdown().await.unwrap();
}

async fn live_session_actors_counts_session_actors(compression: Option<u32>) {
    let (_dir, m) = open_temp(compression).await;
    assert_eq!(m.live_session_actors().await.unwrap(), 0);
    let id = m.create_checkpoint("a", "main", &json!(1)).await.unwrap();
    m.save_session("b", &json!(2)).await.unwrap();
    let _ = m.session_actor("c").await.unwrap();
    assert_eq!(m.live_session_actors().await.unwrap(), 3);
    // Reads served from the index or by id do not spawn session actors.
    m.list_sessions().await.unwrap();
    m.list_checkpoints("d").await.unwrap();
    m.get_storage_stats().await.unwrap();
    m.restore_checkpoint(&id).await.unwrap();
    assert_eq!(m.live_session_actors().await.unwrap(), 3);
    // Another request for a live session reuses its actor.
    m.load_session("b").await.unwrap();
    assert_eq!(m.live_session_actors().await.unwrap(), 3);
    m.shutdown().await.unwrap();
}
