//! A first write by a principal claims a session; a claim that fails leaves nothing behind.
//!
//! - `claim_whose_retire_times_out_leaves_no_record`: a live actor of an absent session is
//!   busy (in an update function that then refuses) when a principal's first write claims
//!   the session; retiring that actor times out, so the write fails with `Timeout`, and no
//!   access record exists afterwards, in memory or in the backend. Once the actor is free,
//!   another principal's first write claims the session.

use std::time::Duration;

use mars_state::{
    AccessControlLayer, ErrorKind, MemoryStorageBackend, Principal, StateManager, StorageBackend,
    StorageKey,
};
use serde_json::{Value, json};

fn p(s: &str) -> Principal {
    Principal::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_whose_retire_times_out_leaves_no_record() {
    let memory = MemoryStorageBackend::new();
    let m = StateManager::builder(memory.clone())
        .access_control(AccessControlLayer::new().admin(p("root")))
        .call_timeout(Duration::from_millis(500))
        .start()
        .await
        .unwrap();

    // The system principal updates the absent session: its actor starts and stays busy in
    // the update function, which then refuses (so the session stays absent).
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let updater = tokio::spawn({
        let m = m.clone();
        async move {
            m.transactional_update("s1", move |_old: Option<Value>| {
                started_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(1500));
                done_tx.send(()).unwrap();
                Err::<Value, _>("refused")
            })
            .await
        }
    });
    tokio::task::spawn_blocking(move || started_rx.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the update runs");

    let alice = m.for_principal(p("alice"));
    let err = alice.save_session("s1", &json!({ "step": 1 })).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");

    // Nothing of the claim is left: no record in memory, none in the backend.
    let root = m.for_principal(p("root"));
    assert_eq!(root.access_record("s1").await.unwrap(), None);
    let records = memory.list(&StorageKey::new("metadata/access").unwrap()).await.unwrap();
    assert!(records.is_empty(), "a failed claim left an access record: {records:?}");

    // The update's caller times out too (500 ms); the function refuses either way.
    assert!(updater.await.unwrap().is_err());
    tokio::task::spawn_blocking(move || done_rx.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the update function returns");
    // The session is still free: another principal's first write claims it.
    let bob = m.for_principal(p("bob"));
    bob.save_session("s1", &json!({ "step": 2 })).await.expect("the session is free to claim");
    assert_eq!(root.access_record("s1").await.unwrap().unwrap().owner, p("bob"));
    let err = alice.save_session("s1", &json!({ "step": 3 })).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AccessDenied, "{err}");
    m.shutdown().await.unwrap();
}
