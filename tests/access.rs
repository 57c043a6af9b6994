//! Access control: for every operation a second principal is denied, with a typed error,
//! and the stored bytes do not change; grants and revocations take effect; listings
//! filter; administrators and the unscoped manager may do everything.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{backend_defaults, files};
use mars_state::{Access, AccessControlLayer, ErrorKind, Principal, StateError, StateManager};
use serde_json::{Value, json};

fn p(s: &str) -> Principal {
    Principal::new(s).unwrap()
}

async fn start(dir: &Path) -> StateManager {
    StateManager::builder(backend_defaults(dir))
        .access_control(AccessControlLayer::new().admin(p("root")))
        .start()
        .await
        .unwrap()
}

fn assert_denied<T: std::fmt::Debug>(r: Result<T, StateError>, op: &str) {
    match r {
        Err(StateError::AccessDenied { principal, session, .. }) => {
            assert_eq!(principal, "mallory", "{op}");
            assert!(session == "plan" || session == "*", "{op}: {session}");
        }
        other => panic!("{op}: expected AccessDenied, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_of_another_principal_is_denied_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let alice = m.for_principal(p("alice"));
    alice.save_session("plan", &json!({"secret": "alice's plan"})).await.unwrap();
    let cp = alice.create_checkpoint("plan", "main", &json!({"step": 1})).await.unwrap();
    let record = m.access_record("plan").await.unwrap().unwrap();
    assert_eq!(record.owner, p("alice"));
    assert!(record.created_at > 0);

    // Every file's bytes (the LOCK file's contents never change; on another backend, the
    // files it keeps in the store's directory).
    let before = files(dir.path());
    let mallory = m.for_principal(p("mallory"));
    assert_denied(mallory.load_session("plan").await, "load");
    assert_denied(mallory.load_session_as::<Value>("plan").await, "load_as");
    assert_denied(mallory.save_session("plan", &json!({"evil": true})).await, "save");
    assert_denied(mallory.delete_session("plan").await, "delete");
    assert_denied(mallory.create_checkpoint("plan", "main", &json!(1)).await, "create_checkpoint");
    assert_denied(mallory.list_checkpoints("plan").await, "list_checkpoints");
    assert_denied(mallory.restore_checkpoint(&cp).await, "restore_checkpoint");
    assert_denied(mallory.rollback_to_checkpoint(&cp).await, "rollback");
    assert_denied(mallory.cleanup_checkpoints("plan", 0).await, "cleanup_checkpoints");
    let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c = called.clone();
    let r = mallory
        .transactional_update("plan", move |_: Option<Value>| {
            c.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(json!({"evil": true}))
        })
        .await;
    assert_denied(r, "transactional_update");
    assert!(!called.load(std::sync::atomic::Ordering::SeqCst), "the closure never ran");
    assert_denied(mallory.session_actor("plan").await, "session_actor");
    assert_denied(mallory.grant_access("plan", p("mallory"), Access::Write).await, "grant");
    assert_denied(mallory.revoke_access("plan", &p("alice")).await, "revoke");
    assert_denied(mallory.access_record("plan").await, "access_record");
    assert_denied(mallory.cleanup_old_sessions(Duration::ZERO, 0).await, "cleanup_old_sessions");
    assert_denied(mallory.vacuum_storage().await, "vacuum");
    assert_denied(mallory.run_janitor_now().await, "janitor");
    assert_denied(mallory.shutdown().await, "shutdown");
    assert!(
        mallory.list_sessions().await.unwrap().is_empty(),
        "listing hides what mallory may not read"
    );
    assert_eq!(mallory.get_storage_stats().await.unwrap().session_count, 0);
    assert_eq!(files(dir.path()), before, "no byte of the store changed");

    // The owner still has everything.
    assert_eq!(alice.load_session("plan").await.unwrap(), Some(json!({"secret": "alice's plan"})));
    assert_eq!(alice.list_checkpoints("plan").await.unwrap().len(), 1);
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_revocations_take_effect_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let (alice, bob) = (m.for_principal(p("alice")), m.for_principal(p("bob")));
    alice.save_session("plan", &json!(1)).await.unwrap();

    alice.grant_access("plan", p("bob"), Access::Read).await.unwrap();
    assert_eq!(bob.load_session("plan").await.unwrap(), Some(json!(1)));
    assert_eq!(bob.list_sessions().await.unwrap().len(), 1);
    assert_eq!(
        bob.save_session("plan", &json!(2)).await.unwrap_err().kind(),
        ErrorKind::AccessDenied
    );

    alice.grant_access("plan", p("bob"), Access::Write).await.unwrap();
    bob.save_session("plan", &json!(2)).await.unwrap();
    assert_eq!(
        bob.delete_session("plan").await.unwrap_err().kind(),
        ErrorKind::AccessDenied,
        "write is not owner"
    );
    m.shutdown().await.unwrap();

    // Grants are durable.
    let m = start(dir.path()).await;
    let (alice, bob) = (m.for_principal(p("alice")), m.for_principal(p("bob")));
    assert_eq!(bob.load_session("plan").await.unwrap(), Some(json!(2)));
    alice.revoke_access("plan", &p("bob")).await.unwrap();
    assert_eq!(bob.load_session("plan").await.unwrap_err().kind(), ErrorKind::AccessDenied);
    assert!(bob.list_sessions().await.unwrap().is_empty());
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_and_the_system_principal_may_do_everything() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let alice = m.for_principal(p("alice"));
    alice.save_session("plan", &json!(1)).await.unwrap();
    m.save_session("system-made", &json!(0)).await.unwrap();

    let root = m.for_principal(p("root"));
    assert_eq!(root.load_session("plan").await.unwrap(), Some(json!(1)));
    assert_eq!(root.list_sessions().await.unwrap().len(), 2);
    root.vacuum_storage().await.unwrap();
    // A session the system created has no owner: principals other than admins are denied.
    assert_eq!(
        alice.load_session("system-made").await.unwrap_err().kind(),
        ErrorKind::AccessDenied
    );
    assert_eq!(alice.list_sessions().await.unwrap().len(), 1);
    assert!(root.delete_session("plan").await.unwrap());
    // Deleted: the name is free to claim again, by anyone.
    let bob = m.for_principal(p("bob"));
    bob.save_session("plan", &json!("bob's")).await.unwrap();
    assert_eq!(m.access_record("plan").await.unwrap().unwrap().owner, p("bob"));
    assert_eq!(alice.load_session("plan").await.unwrap_err().kind(), ErrorKind::AccessDenied);
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_first_writers_have_exactly_one_owner() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let h = m.for_principal(p(&format!("agent{i}")));
        tasks.push(tokio::spawn(
            async move { h.save_session("contested", &json!(i)).await.is_ok() },
        ));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
    let owner = m.access_record("contested").await.unwrap().unwrap().owner;
    let i: usize = owner.as_str().trim_start_matches("agent").parse().unwrap();
    assert_eq!(
        m.load_session("contested").await.unwrap(),
        Some(json!(i)),
        "the owner's save is the one stored"
    );
    m.shutdown().await.unwrap();
}

/// A write rejected for its input (a hostile branch id, an oversized state) must not leave
/// the principal owning a session it never wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_first_write_claims_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = StateManager::builder(backend_defaults(dir.path()))
        .max_state_bytes(64)
        .start()
        .await
        .unwrap();
    let alice = m.for_principal(p("alice"));
    let before = files(dir.path());
    assert_eq!(
        alice.create_checkpoint("fresh", "../evil", &json!(1)).await.unwrap_err().kind(),
        ErrorKind::InvalidId
    );
    assert_eq!(
        alice.save_session("fresh", &"x".repeat(100)).await.unwrap_err().kind(),
        ErrorKind::TooLarge
    );
    assert_eq!(
        alice.record_step("fresh", 1, &"x".repeat(100)).await.unwrap_err().kind(),
        ErrorKind::TooLarge
    );
    assert!(m.access_record("fresh").await.unwrap().is_none());
    assert_eq!(files(dir.path()), before, "nothing was written");
    // Bob can still take it.
    m.for_principal(p("bob")).save_session("fresh", &json!(1)).await.unwrap();
    assert_eq!(m.access_record("fresh").await.unwrap().unwrap().owner, p("bob"));
    m.shutdown().await.unwrap();
}

/// An administrator's first write of a new session records it as the owner, like anyone's
/// (the module's rule), so it can grant; it keeps its reach over everyone else's sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrators_first_write_makes_it_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path()).await;
    let (root, bob, alice) =
        (m.for_principal(p("root")), m.for_principal(p("bob")), m.for_principal(p("alice")));
    root.save_session("ops", &json!({"n": 1})).await.unwrap();
    assert_eq!(m.access_record("ops").await.unwrap().map(|r| r.owner), Some(p("root")));
    let err = bob.load_session("ops").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AccessDenied, "load before the grant: {err}");
    root.grant_access("ops", p("bob"), Access::Read).await.unwrap();
    assert_eq!(bob.load_session("ops").await.unwrap(), Some(json!({"n": 1})));

    alice.save_session("hers", &json!(1)).await.unwrap();
    root.save_session("hers", &json!(2)).await.unwrap();
    assert_eq!(m.access_record("hers").await.unwrap().map(|r| r.owner), Some(p("alice")));
    m.shutdown().await.unwrap();
}
