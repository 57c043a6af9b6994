//! A first end-to-end pass over the file backend: save, checkpoint, rollback, restart, restore, delete.

use mars_state::{FileStorageBackend, StateManager};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let m = StateManager::builder(FileStorageBackend::new(dir.path()).unwrap()).start().await.unwrap();
    m.save_session("s1", &json!({"step": 42})).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 42})));
    let id = m.create_checkpoint("s1", "b", &json!({"step": 1})).await.unwrap();
    m.rollback_to_checkpoint(&id).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 1})));
    assert_eq!(m.list_checkpoints("s1").await.unwrap().len(), 1);
    m.shutdown().await.unwrap();
    let m = StateManager::builder(FileStorageBackend::new(dir.path()).unwrap()).start().await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 1})));
    let cp = m.restore_checkpoint(&id).await.unwrap().unwrap();
    assert_eq!(cp.data, json!({"step": 1}));
    assert_eq!(m.list_checkpoints("s1").await.unwrap().len(), 1);
    assert!(m.delete_session("s1").await.unwrap());
    m.shutdown().await.unwrap();
}
