//! Several nodes on one shared store, in one process: managers over clones of one
//! `MemoryStorageBackend` (shared: it keeps leases and checks fences like the PostgreSQL and
//! Redis backends), each with its own node id. What the leases promise a user: a session is
//! written by one node at a time, other nodes read what it wrote and are told who owns it,
//! a clean shutdown or passivation hands it over at once, a node that stops (here: frozen,
//! every call of its backend held, as a SIGSTOPped process) is taken over after its lease
//! runs out and its late writes are refused, and recovery on the new owner says the run
//! was cut off. The same behaviours run over PostgreSQL and Redis in
//! `tests/postgres_backend.rs` and `tests/redis_backend.rs` where those features are on.
//! Watches on one node see the changes made on every node, and say how many they missed
//! when their feed from the store was cut.

mod common;
mod nodes_common;

nodes_common::node_tests!(memory, || async {
    let store = std::sync::Arc::new(mars_state::MemoryStorageBackend::new());
    (store as std::sync::Arc<dyn mars_state::StorageBackend>, ())
});

/// Through the encryption layer, where change events travel sealed: the watch behaviours.
#[cfg(feature = "encryption")]
mod encrypted_memory {
    use std::sync::Arc;

    use mars_state::middleware::crypto::EncryptionLayer;
    use mars_state::{EncryptionKey, MemoryStorageBackend, StorageBackend};

    use super::nodes_common as n;

    async fn store() -> Arc<dyn StorageBackend> {
        let layer = EncryptionLayer::new(EncryptionKey::from_bytes([7; 32]));
        Arc::new(layer.wrap(MemoryStorageBackend::new()).await.unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_on_one_node_sees_writes_made_on_another() {
        n::a_watch_on_one_node_sees_writes_made_on_another(store().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_all_sees_every_nodes_events() {
        n::a_watch_all_sees_every_nodes_events(store().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_principals_watch_on_another_node_is_checked_against_the_sessions_owner() {
        n::a_principals_watch_on_another_node_is_checked_against_the_sessions_owner(store().await)
            .await;
    }
}

/// A watcher's feed from the store is cut (as a dropped connection cuts a server backend's)
/// and can subscribe again only later: the events another node made meanwhile are lost to
/// it, and its watches say exactly how many before the next event of that node, then go on
/// with every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_event_feed_is_reconnected_and_what_was_missed_is_counted() {
    use mars_state::EventKind;
    use nodes_common::{Freezer, next_events, node};
    use serde_json::json;
    use std::sync::Arc;
    use std::time::Duration;

    let memory = mars_state::MemoryStorageBackend::new();
    let store: Arc<dyn mars_state::StorageBackend> = Arc::new(memory.clone());
    let watcher_store = Freezer::new(store.clone());
    let a = node(&store, "node-a", Duration::ZERO).await;
    let frozen: Arc<dyn mars_state::StorageBackend> = Arc::new(watcher_store.clone());
    let c = node(&frozen, "node-c", Duration::ZERO).await;
    let mut one = c.watch("s1").await.unwrap();
    let mut all = c.watch_all().await.unwrap();
    a.save_session("s1", &json!({"step": 0})).await.unwrap();
    assert_eq!(next_events(&mut one, 1).await[0].kind, EventKind::Saved);
    assert_eq!(next_events(&mut all, 1).await[0].kind, EventKind::Saved);
    // Cut, and hold the watcher's new subscription until thawed.
    watcher_store.freeze();
    memory.interrupt_events();
    for step in 1..=3 {
        a.save_session("s1", &json!({"step": step})).await.unwrap();
    }
    a.save_session("s2", &json!({"step": 1})).await.unwrap();
    watcher_store.thaw();
    // Until the watcher has subscribed again, a's saves are lost too: save until one
    // arrives, counting them.
    let (first, after) = nodes_common::save_until_delivered(&a, &mut one, 100).await;
    // s1's three saves while cut and those after: each delivered or counted as missed, and
    // at least the one the watcher subscribed too late for is missed.
    let missed = nodes_common::account_for(&mut one, Some(first), 3 + after).await;
    assert!(missed >= 1, "the saves made while the feed was cut were not all delivered");
    // watch_all: s2's save too.
    nodes_common::account_for(&mut all, None, 4 + after).await;
    // And then nothing is lost.
    a.create_checkpoint("s1", "main", &json!({"step": 99})).await.unwrap();
    assert!(matches!(next_events(&mut one, 1).await[0].kind, EventKind::Checkpointed { .. }));
    assert!(matches!(next_events(&mut all, 1).await[0].kind, EventKind::Checkpointed { .. }));
    a.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}
