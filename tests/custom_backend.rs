//! Proves that `StorageBackend` is implementable outside the crate: an in-memory backend
//! written here against the public trait (with `#[async_trait::async_trait]`) runs a
//! `StateManager` through its core flows (save, load, checkpoint, list, restore, rollback,
//! update, delete, restart), with and without compression, also as `Arc<dyn StorageBackend>`.
//!
//! It also runs the trait's contract clauses (absence is `Ok(None)`, deleting a missing key
//! is `Ok(false)`, a missing prefix lists nothing, ...), the public conformance suite of
//! `mars_state::testing`, one test per clause, against this backend and against the crate's
//! own `MemoryStorageBackend` and `FileStorageBackend` so the three agree.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use common::{ext, plain_and_compressed, spawn_each, with_compression};
use mars_state::{
    FileStorageBackend, MemoryStorageBackend, ObjectMeta, StateManager, StorageBackend, StorageKey,
    SweepReport,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// The backend under test: a map behind a mutex, shared by clones (a "restart" hands a
// clone to a new manager).
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct MapBackend {
    map: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl MapBackend {
    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keys(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }
}

#[async_trait::async_trait]
impl StorageBackend for MapBackend {
    async fn get(&self, key: &StorageKey) -> mars_state::Result<Option<Vec<u8>>> {
        Ok(self.map().get(key.as_str()).cloned())
    }

    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> mars_state::Result<()> {
        self.map().insert(key.as_str().to_owned(), value);
        Ok(())
    }

    async fn delete(&self, key: &StorageKey) -> mars_state::Result<bool> {
        Ok(self.map().remove(key.as_str()).is_some())
    }

    async fn list(&self, prefix: &StorageKey) -> mars_state::Result<Vec<ObjectMeta>> {
        let under = format!("{}/", prefix.as_str());
        Ok(self
            .map()
            .iter()
            .filter(|(k, _)| k.starts_with(&under))
            .map(|(k, v)| ObjectMeta {
                key: StorageKey::new(k.clone()).unwrap(),
                size: v.len() as u64,
            })
            .collect())
    }

    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> mars_state::Result<()> {
        self.map().entry(key.as_str().to_owned()).or_default().extend_from_slice(&bytes);
        Ok(())
    }

    async fn sweep(&self) -> mars_state::Result<SweepReport> {
        Ok(SweepReport::default())
    }
}

// ---------------------------------------------------------------------------------------
// Core flows through a StateManager over the custom backend.
// ---------------------------------------------------------------------------------------

async fn start(backend: &MapBackend, compression: Option<u32>) -> StateManager {
    with_compression(StateManager::builder(backend.clone()), compression)
        .start()
        .await
        .expect("start over the custom backend")
}

async fn core_flows(compression: Option<u32>) {
    let backend = MapBackend::default();
    let m = start(&backend, compression).await;

    // save / load
    assert_eq!(m.load_session("s1").await.unwrap(), None);
    m.save_session("s1", &json!({"step": 42})).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 42})));
    let ext = ext(compression);
    assert!(backend.keys().contains(&format!("sessions/s1{ext}")), "keys: {:?}", backend.keys());
    let raw = backend.map().get(&format!("sessions/s1{ext}")).cloned().unwrap();
    if compression.is_none() {
        let v: Value = serde_json::from_slice(&raw).expect("plain JSON record");
        assert_eq!(v["data"], json!({"step": 42}));
    } else {
        assert_eq!(&raw[..2], &[0x1f, 0x8b], "gzip record");
    }

    // checkpoints
    let c1 = m.create_checkpoint("s1", "main", &json!({"step": 1})).await.unwrap();
    let c2 = m.create_checkpoint("s1", "alt", &json!({"step": 2})).await.unwrap();
    assert!(c1 < c2);
    let listed = m.list_checkpoints("s1").await.unwrap();
    assert_eq!(
        listed.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![c1.clone(), c2.clone()]
    );
    assert_eq!(listed[1].branch_id.as_str(), "alt");
    let cp = m.restore_checkpoint(&c1).await.unwrap().unwrap();
    assert_eq!(
        (cp.session_id.as_str(), cp.branch_id.as_str(), cp.data),
        ("s1", "main", json!({"step": 1}))
    );

    // list / stats
    m.save_session("s2", &json!("two")).await.unwrap();
    let sessions = m.list_sessions().await.unwrap();
    assert_eq!(sessions.iter().map(|s| s.session_id.as_str()).collect::<Vec<_>>(), ["s1", "s2"]);
    assert_eq!(sessions[0].checkpoint_count, 2);
    assert_eq!(sessions[0].size_bytes, backend.map()[&format!("sessions/s1{ext}")].len() as u64);
    let stats = m.get_storage_stats().await.unwrap();
    assert_eq!((stats.session_count, stats.checkpoint_count), (2, 2));

    // rollback / update
    m.rollback_to_checkpoint(&c2).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 2})));
    let new = m
        .transactional_update("s1", |old: Option<Value>| {
            Ok::<_, std::io::Error>(json!({"step": old.unwrap()["step"].as_i64().unwrap() + 1}))
        })
        .await
        .unwrap();
    assert_eq!(new, json!({"step": 3}));

    // restart: a new manager over the same map sees everything, and restores by id alone
    let before_restart = m.list_sessions().await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);
    let m = start(&backend, compression).await;
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 3})));
    assert_eq!(m.restore_checkpoint(&c2).await.unwrap().unwrap().data, json!({"step": 2}));
    assert_eq!(m.list_checkpoints("s1").await.unwrap().len(), 2);
    assert_eq!(m.list_sessions().await.unwrap(), before_restart, "the listing survives a restart");

    // cleanup / delete (also removes the checkpoints from the backend)
    assert_eq!(m.cleanup_checkpoints("s1", 1).await.unwrap(), 1);
    assert!(m.restore_checkpoint(&c1).await.unwrap().is_none());
    assert!(m.delete_session("s1").await.unwrap());
    assert_eq!(m.load_session("s1").await.unwrap(), None);
    assert!(m.restore_checkpoint(&c2).await.unwrap().is_none());
    assert!(
        !backend
            .keys()
            .iter()
            .any(|k| k.starts_with("sessions/s1") || k.starts_with("checkpoints/s1")),
        "records of a deleted session remain: {:?}",
        backend.keys()
    );
    assert!(!m.delete_session("s1").await.unwrap());
    assert_eq!(m.load_session("s2").await.unwrap(), Some(json!("two")));
    let report = m.vacuum_storage().await.unwrap();
    assert_eq!(report.index_entries, 1);
    m.shutdown().await.unwrap();
}

plain_and_compressed! {
    core_flows_plain, core_flows_gzip => core_flows;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_over_arc_dyn_backend() {
    let map = MapBackend::default();
    let dynamic: Arc<dyn StorageBackend> = Arc::new(map.clone());
    let m = StateManager::start(dynamic).await.unwrap();
    m.save_session("s1", &json!({"via": "dyn"})).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"via": "dyn"})));
    assert!(map.keys().contains(&"sessions/s1.json".to_owned()));
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_store_opens_without_its_compression() {
    let backend = MapBackend::default();
    let m = start(&backend, Some(6)).await;
    m.save_session("s1", &json!(1)).await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);
    let m = StateManager::start(backend.clone()).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!(1)));
    m.save_session("s2", &json!(2)).await.unwrap();
    assert!(backend.keys().contains(&"sessions/s2.json.gz".to_owned()), "the store stays gzip");
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_over_custom_backend() {
    let backend = MapBackend::default();
    let m = start(&backend, None).await;
    let tasks = spawn_each(&m, 0..100, |m, _| async move {
        m.transactional_update("n", |old: Option<u64>| {
            Ok::<_, std::io::Error>(old.unwrap_or(0) + 1)
        })
        .await
    });
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(m.load_session_as::<u64>("n").await.unwrap(), Some(100));
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// The trait contract: the public conformance suite, one test per clause, run against every
// backend.
// ---------------------------------------------------------------------------------------

mars_state::conformance_tests! {
    contract_custom => MapBackend::default(),
    contract_memory => MemoryStorageBackend::new(),
    contract_file => {
        let dir = tempfile::tempdir().unwrap();
        (FileStorageBackend::new(dir.path()).unwrap(), dir)
    },
}
