//! Access control holds for the whole life of what it let through, and for sessions the
//! index has not caught up with. Pins defects found by trying the crate as an attacker would:
//!
//! - a revoked principal's open `watch` kept receiving the session's events;
//! - a `watch` taken on a session that did not exist yet received the events of the
//!   principal that then created (and owns) it;
//! - a session holding only recorded steps (`record_step`, not yet flushed) was readable
//!   and claimable by any principal, since "exists" was read from the index alone;
//! - an `ActorRef` from `session_actor`, handed out to an owner who then deleted the
//!   session, still reached the session after another principal claimed the id.

use std::time::Duration;

use mars_state::{
    Access, ErrorKind, EventKind, MemoryStorageBackend, Principal, SessionMsg, StateBytes,
    StateManager, WatchError,
};
use serde_json::json;

fn p(s: &str) -> Principal {
    Principal::new(s).unwrap()
}

/// The next event of `w`, or `None` if none comes within a short while.
async fn next(w: &mut mars_state::Watch) -> Option<Result<mars_state::StateEvent, WatchError>> {
    tokio::time::timeout(Duration::from_millis(300), w.recv()).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_principal_s_watch_receives_nothing_more() {
    let m = StateManager::start(MemoryStorageBackend::new()).await.unwrap();
    let alice = m.for_principal(p("alice"));
    let bob = m.for_principal(p("bob"));
    alice.save_session("plan", &json!({"step": 1})).await.unwrap();
    alice.grant_access("plan", p("bob"), Access::Read).await.unwrap();

    let mut w = bob.watch("plan").await.unwrap();
    alice.save_session("plan", &json!({"step": 2})).await.unwrap();
    assert_eq!(
        next(&mut w).await.unwrap().unwrap().kind,
        EventKind::Saved,
        "granted: bob sees the save"
    );

    alice.revoke_access("plan", &p("bob")).await.unwrap();
    alice.save_session("plan", &json!({"step": 3})).await.unwrap();
    alice.create_checkpoint("plan", "main", &json!({"step": 3})).await.unwrap();
    alice.pause_session("plan", &json!({"step": 3}), "secret reason").await.unwrap();
    alice.fail_session("plan", "another secret").await.unwrap();
    match next(&mut w).await {
        Some(Ok(event)) => panic!("a revoked watcher received {event:?}"),
        Some(Err(e)) => assert_eq!(e, WatchError::AccessDenied),
        None => panic!("the watch neither ended nor said why"),
    }
    // The watch has ended for good, even if access comes back.
    alice.grant_access("plan", p("bob"), Access::Read).await.unwrap();
    alice.save_session("plan", &json!({"step": 4})).await.unwrap();
    assert_eq!(next(&mut w).await.unwrap(), Err(WatchError::AccessDenied));
    // A new watch after the grant works.
    let mut again = bob.watch("plan").await.unwrap();
    alice.save_session("plan", &json!({"step": 5})).await.unwrap();
    assert_eq!(next(&mut again).await.unwrap().unwrap().kind, EventKind::Saved);
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_missing_session_does_not_see_another_principal_create_it() {
    let m = StateManager::start(MemoryStorageBackend::new()).await.unwrap();
    let alice = m.for_principal(p("alice"));
    let mallory = m.for_principal(p("mallory"));
    let mut w = mallory.watch("plan").await.unwrap();
    alice.save_session("plan", &json!({"secret": 1})).await.unwrap();
    alice.pause_session("plan", &json!({"secret": 1}), "waiting for the board").await.unwrap();
    match next(&mut w).await {
        Some(Ok(event)) => panic!("mallory saw alice's session: {event:?}"),
        Some(Err(e)) => assert_eq!(e, WatchError::AccessDenied),
        None => panic!("the watch neither ended nor said why"),
    }
    // Sessions the system creates have no owner: principals see none of their events.
    let mut w = mallory.watch("system-run").await.unwrap();
    m.save_session("system-run", &json!(1)).await.unwrap();
    assert!(!matches!(next(&mut w).await, Some(Ok(_))));
    // The owner's own watch, taken before creating the session, sees everything,
    // including the delete.
    let mut own = alice.watch("draft").await.unwrap();
    alice.save_session("draft", &json!(1)).await.unwrap();
    alice.delete_session("draft").await.unwrap();
    assert_eq!(next(&mut own).await.unwrap().unwrap().kind, EventKind::Saved);
    assert_eq!(next(&mut own).await.unwrap().unwrap().kind, EventKind::Deleted);
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_only_recorded_steps_exists_for_access_control() {
    let m = StateManager::start(MemoryStorageBackend::new()).await.unwrap();
    // The system records steps of a run; nothing is flushed yet (on-demand policy).
    m.record_step("run", 1, &json!({"secret": "step 1"})).await.unwrap();
    let mallory = m.for_principal(p("mallory"));
    assert_eq!(mallory.load_session("run").await.unwrap_err().kind(), ErrorKind::AccessDenied);
    assert_eq!(
        mallory.load_session_bytes("run").await.unwrap_err().kind(),
        ErrorKind::AccessDenied
    );
    assert_eq!(
        mallory.save_session("run", &json!("mine")).await.unwrap_err().kind(),
        ErrorKind::AccessDenied
    );
    assert_eq!(
        mallory
            .transactional_update("run", |_: Option<i64>| Ok::<_, std::io::Error>(1))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::AccessDenied
    );
    assert_eq!(m.access_record("run").await.unwrap(), None, "no one claimed it");
    assert_eq!(m.load_session("run").await.unwrap(), Some(json!({"secret": "step 1"})));

    // The same for a principal's run: the owner's recorded steps are the owner's.
    let alice = m.for_principal(p("alice"));
    alice.record_step("plan", 1, &json!({"step": 1})).await.unwrap();
    assert_eq!(mallory.load_session("plan").await.unwrap_err().kind(), ErrorKind::AccessDenied);
    assert_eq!(alice.load_session("plan").await.unwrap(), Some(json!({"step": 1})));
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_reference_does_not_outlive_its_owner_s_claim() {
    let m = StateManager::start(MemoryStorageBackend::new()).await.unwrap();
    let alice = m.for_principal(p("alice"));
    let bob = m.for_principal(p("bob"));
    alice.save_session("shared-name", &json!("alice's")).await.unwrap();
    let actor = alice.session_actor("shared-name").await.unwrap();
    alice.delete_session("shared-name").await.unwrap();

    // The id is free again; bob claims it.
    bob.save_session("shared-name", &json!("bob's")).await.unwrap();
    let state = StateBytes::from_serialize(&json!("overwritten by alice")).unwrap();
    let sent = ractor::call!(actor, |reply| SessionMsg::Save { state, reply });
    assert!(sent.is_err(), "alice's old reference still reaches the session: {sent:?}");
    assert_eq!(bob.load_session("shared-name").await.unwrap(), Some(json!("bob's")));
    assert_eq!(m.access_record("shared-name").await.unwrap().unwrap().owner, p("bob"));
    m.shutdown().await.unwrap();
}
