//! A delete that fails part way (an error, not a crash) must neither lose a later save nor
//! lock the owner out; a save that fails must not drop acknowledged recorded steps. Pins
//! defects found by trying the crate as a user would:
//!
//! - a save made after a failed delete was lost: the delete's pending marker stayed on
//!   disk, and `vacuum_storage` or the next start replayed the old delete over the newer
//!   save;
//! - the owner could not retry a failed delete: the access record was removed first, so
//!   with checkpoints left the session had no owner and the owner got `AccessDenied`.
//!
//! - the owner's save after a failed delete removed her access record with the records it
//!   finished deleting: she was locked out of her own session;
//! - a failed save, or a panicking update closure, dropped recorded steps that had been
//!   acknowledged (the session actor threw its cache away).
//!
//! The failure is a backend that refuses to delete checkpoint records while a switch is on
//! (like a checkpoint folder the OS will not let go of): the file backend inside
//! `mars_state::testing::Faulty`.

use std::io::ErrorKind as IoKind;
use std::path::Path;

use mars_state::testing::{FaultSwitch, Faulty, Method};
use mars_state::{ErrorKind, FileStorageBackend, Principal, StateManager};
use serde_json::json;

/// The file backend, except that deleting a checkpoint record fails while `stuck` is on.
async fn open(dir: &Path, stuck: &FaultSwitch) -> StateManager {
    let backend = Faulty::new(FileStorageBackend::new(dir).unwrap())
        .controlled_by(stuck.clone())
        .fail(Method::Delete, IoKind::PermissionDenied, |key| {
            key.as_str().starts_with("checkpoints/")
        });
    StateManager::start(backend).await.unwrap()
}

/// Opens `dir`, saves "s" with two checkpoints, and makes a delete of it fail part way.
async fn failed_delete(dir: &Path, stuck: &FaultSwitch, as_owner: Option<&str>) -> StateManager {
    let m = open(dir, stuck).await;
    let h = match as_owner {
        Some(p) => m.for_principal(Principal::new(p).unwrap()),
        None => m.clone(),
    };
    h.save_session("s", &json!({"v": 1})).await.unwrap();
    h.create_checkpoint("s", "main", &json!({"cp": 1})).await.unwrap();
    h.create_checkpoint("s", "main", &json!({"cp": 2})).await.unwrap();
    stuck.set(true);
    let err = h.delete_session("s").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_after_a_failed_delete_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let stuck = FaultSwitch::off();
    let m = failed_delete(dir.path(), &stuck, None).await;

    // The obstacle goes; the application saves the session again.
    stuck.set(false);
    m.save_session("s", &json!({"v": 2})).await.unwrap();
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!({"v": 2})));
    // The delete asked for before the save was finished first: the save starts afresh.
    assert!(
        m.list_checkpoints("s").await.unwrap().is_empty(),
        "the failed delete was finished before the save"
    );
    m.shutdown().await.unwrap();

    let m = open(dir.path(), &stuck).await;
    assert_eq!(
        m.load_session("s").await.unwrap(),
        Some(json!({"v": 2})),
        "the save was lost at the restart"
    );
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_does_not_replay_a_failed_delete_over_a_newer_save() {
    let dir = tempfile::tempdir().unwrap();
    let stuck = FaultSwitch::off();
    let m = failed_delete(dir.path(), &stuck, None).await;
    stuck.set(false);
    m.save_session("s", &json!({"v": 2})).await.unwrap();

    let report = m.vacuum_storage().await.unwrap();
    assert_eq!(report.orphans_removed, 0, "nothing is left to finish: {report:?}");
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!({"v": 2})));
    let listed: Vec<String> =
        m.list_sessions().await.unwrap().iter().map(|s| s.session_id.to_string()).collect();
    assert_eq!(listed, ["s"]);
    m.shutdown().await.unwrap();

    let m = open(dir.path(), &stuck).await;
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!({"v": 2})));
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delete_left_alone_is_finished_by_vacuum() {
    let dir = tempfile::tempdir().unwrap();
    let stuck = FaultSwitch::off();
    let m = failed_delete(dir.path(), &stuck, None).await;
    stuck.set(false);
    let report = m.vacuum_storage().await.unwrap();
    assert_eq!(report.orphans_removed, 1, "{report:?}");
    assert_eq!(m.load_session("s").await.unwrap(), None);
    assert!(m.list_sessions().await.unwrap().is_empty());
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_while_the_obstacle_remains_fails_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let stuck = FaultSwitch::off();
    let m = failed_delete(dir.path(), &stuck, None).await;
    // Still stuck: the write must first finish the delete, cannot, and fails.
    let err = m.save_session("s", &json!({"v": 2})).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert_ne!(m.load_session("s").await.unwrap(), Some(json!({"v": 2})));
    m.shutdown().await.unwrap();

    // A start that cannot finish the delete still opens the store; the next write does.
    let m = open(dir.path(), &stuck).await;
    stuck.set(false);
    m.save_session("s", &json!({"v": 3})).await.unwrap();
    m.shutdown().await.unwrap();
    let m = open(dir.path(), &stuck).await;
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!({"v": 3})));
    assert!(m.list_checkpoints("s").await.unwrap().is_empty());
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_can_retry_a_failed_delete_and_no_one_else_can_claim_the_remains() {
    let dir = tempfile::tempdir().unwrap();
    let stuck = FaultSwitch::off();
    let m = failed_delete(dir.path(), &stuck, Some("alice")).await;
    let alice = m.for_principal(Principal::new("alice").unwrap());
    let mallory = m.for_principal(Principal::new("mallory").unwrap());

    // What is left still belongs to alice.
    assert_eq!(
        m.access_record("s").await.unwrap().map(|r| r.owner.to_string()),
        Some("alice".to_owned())
    );
    assert_eq!(
        mallory.save_session("s", &json!("mine")).await.unwrap_err().kind(),
        ErrorKind::AccessDenied
    );
    assert_eq!(mallory.list_checkpoints("s").await.unwrap_err().kind(), ErrorKind::AccessDenied);

    stuck.set(false);
    alice.delete_session("s").await.unwrap();
    assert!(alice.list_checkpoints("s").await.unwrap().is_empty());
    assert_eq!(alice.load_session("s").await.unwrap(), None);
    assert_eq!(m.access_record("s").await.unwrap(), None, "a finished delete frees the id");
    m.shutdown().await.unwrap();
}

/// The owner's next save finishes a failed delete and the session stays hers: she reads it
/// back, another principal may not, and so after a restart (the access record was kept,
/// not removed with the records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_save_after_a_failed_delete_keeps_the_session_hers() {
    let dir = tempfile::tempdir().unwrap();
    let stuck = FaultSwitch::off();
    let m = failed_delete(dir.path(), &stuck, Some("alice")).await;
    stuck.set(false);
    let alice = m.for_principal(Principal::new("alice").unwrap());
    let bob = m.for_principal(Principal::new("bob").unwrap());
    alice.save_session("s", &json!({"alice": "private"})).await.unwrap();
    assert_eq!(alice.load_session("s").await.unwrap(), Some(json!({"alice": "private"})));
    assert!(alice.list_checkpoints("s").await.unwrap().is_empty(), "the delete was finished");
    let err = bob.load_session("s").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AccessDenied, "{err}");
    let err = bob.save_session("s", &json!({"bob": 1})).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AccessDenied, "{err}");
    assert_eq!(
        m.access_record("s").await.unwrap().map(|r| r.owner),
        Some(Principal::new("alice").unwrap())
    );
    m.shutdown().await.unwrap();

    let m = open(dir.path(), &stuck).await;
    let alice = m.for_principal(Principal::new("alice").unwrap());
    assert_eq!(alice.load_session("s").await.unwrap(), Some(json!({"alice": "private"})));
    let bob = m.for_principal(Principal::new("bob").unwrap());
    assert_eq!(bob.load_session("s").await.unwrap_err().kind(), ErrorKind::AccessDenied);
    m.shutdown().await.unwrap();
}

/// Recorded steps are acknowledged state: a save that fails, and an update closure that
/// panics, leave them in place (read back, and made durable by the next successful write or
/// the flush at shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_steps_survive_a_failed_save_and_a_panicking_update() {
    let dir = tempfile::tempdir().unwrap();
    let broken = FaultSwitch::off();
    let backend = Faulty::new(FileStorageBackend::new(dir.path()).unwrap())
        .controlled_by(broken.clone())
        .fail(Method::Put, IoKind::PermissionDenied, |key| key.as_str().starts_with("sessions/"));
    let m = StateManager::start(backend).await.unwrap();
    m.save_session("r", &json!({"s": 0})).await.unwrap();
    m.record_step("r", 1, &json!({"s": 1})).await.unwrap();

    broken.set(true);
    let err = m.save_session("r", &json!({"s": 2})).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    broken.set(false);
    assert_eq!(m.load_session("r").await.unwrap(), Some(json!({"s": 1})), "after a failed save");

    let err = m
        .transactional_update(
            "r",
            |_: Option<serde_json::Value>| -> Result<serde_json::Value, std::io::Error> {
                panic!("provoked panic in an update")
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Panicked, "{err}");
    assert_eq!(m.load_session("r").await.unwrap(), Some(json!({"s": 1})), "after a panic");

    // A session that exists only as recorded steps stays listed, and durable at shutdown.
    m.record_step("mem", 1, &json!({"m": 1})).await.unwrap();
    let _ = m
        .transactional_update(
            "mem",
            |_: Option<serde_json::Value>| -> Result<serde_json::Value, std::io::Error> {
                panic!("provoked panic in an update")
            },
        )
        .await;
    assert_eq!(m.load_session("mem").await.unwrap(), Some(json!({"m": 1})));
    m.shutdown().await.unwrap();

    let m = StateManager::start(FileStorageBackend::new(dir.path()).unwrap()).await.unwrap();
    assert_eq!(m.load_session("r").await.unwrap(), Some(json!({"s": 1})), "after a restart");
    assert_eq!(m.load_session("mem").await.unwrap(), Some(json!({"m": 1})), "after a restart");
    m.shutdown().await.unwrap();
}
