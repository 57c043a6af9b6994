//! The janitor on its interval, under paused time: it trims checkpoints past the retention
//! limit and removes idle sessions exactly when the policy says, and nothing else.

use std::time::Duration;

use mars_state::{FileStorageBackend, MemoryStorageBackend, RetentionPolicy, StateManager};
use serde_json::json;

/// Lets the actors run until they have nothing left to do (paused time does not move).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn interval_pass_trims_checkpoints_to_the_limit() {
    let m = StateManager::builder(MemoryStorageBackend::new())
        .janitor_interval(Duration::from_secs(60))
        .retention(RetentionPolicy { keep_checkpoints: Some(2), ..Default::default() })
        .start()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(m.create_checkpoint("s1", "main", &json!({"i": i})).await.unwrap());
    }
    m.create_checkpoint("s2", "main", &json!({"i": 0})).await.unwrap();
    // The first tick of an interval fires at once; let it pass, then check that nothing
    // more happens before the next one.
    settle().await;
    let before_next = m.list_checkpoints("s1").await.unwrap().len();
    tokio::time::advance(Duration::from_secs(59)).await;
    settle().await;
    assert_eq!(m.list_checkpoints("s1").await.unwrap().len(), before_next);
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    let left: Vec<_> = m.list_checkpoints("s1").await.unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(left, ids[3..].to_vec(), "the two newest are kept");
    assert_eq!(m.list_checkpoints("s2").await.unwrap().len(), 1, "a session under the limit is untouched");
    m.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_are_removed_and_active_ones_kept() {
    let m = StateManager::builder(MemoryStorageBackend::new())
        .janitor_interval(Duration::from_secs(3600))
        .retention(RetentionPolicy { max_session_idle: Some(Duration::from_secs(86_400)), ..Default::default() })
        .start()
        .await
        .unwrap();
    m.save_session("old", &json!({"v": 1})).await.unwrap();
    m.create_checkpoint("old", "main", &json!({"v": 1})).await.unwrap();
    m.save_session("busy", &json!({"v": 1})).await.unwrap();
    settle().await;
    // 23 hours: nobody is idle long enough yet.
    for _ in 0..23 {
        tokio::time::advance(Duration::from_secs(3600)).await;
        settle().await;
    }
    assert_eq!(m.list_sessions().await.unwrap().len(), 2);
    m.save_session("busy", &json!({"v": 2})).await.unwrap();
    // Two more hours: "old" is now idle over a day, "busy" was saved an hour and a bit ago.
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(3600)).await;
        settle().await;
    }
    let names: Vec<String> = m.list_sessions().await.unwrap().into_iter().map(|s| s.session_id.to_string()).collect();
    assert_eq!(names, vec!["busy".to_string()]);
    assert_eq!(m.load_session("old").await.unwrap(), None);
    assert!(m.list_checkpoints("old").await.unwrap().is_empty());
    assert_eq!(m.load_session("busy").await.unwrap(), Some(json!({"v": 2})));
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_now_sweeps_staged_files_of_interrupted_writes() {
    let dir = tempfile::tempdir().unwrap();
    let m = StateManager::start(FileStorageBackend::new(dir.path()).unwrap()).await.unwrap();
    m.save_session("s1", &json!({"v": 1})).await.unwrap();
    // What a crash between "create staged file" and "rename" leaves behind.
    let staged = dir.path().join("sessions").join(".s1.json.tmp-0123456789abcdef");
    std::fs::File::create(&staged).unwrap();
    let report = m.run_janitor_now().await.unwrap();
    assert_eq!(report.temp_files_removed, 1);
    assert!(!staged.exists());
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"v": 1})), "the record itself is untouched");
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_old_sessions_keeps_the_most_recent() {
    let m = StateManager::start(MemoryStorageBackend::new()).await.unwrap();
    for s in ["a", "b", "c"] {
        m.save_session(s, &json!(s)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Everything is older than 0 s; keep the two most recently updated.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(m.cleanup_old_sessions(Duration::ZERO, 2).await.unwrap(), 1);
    let names: Vec<String> = m.list_sessions().await.unwrap().into_iter().map(|s| s.session_id.to_string()).collect();
    assert_eq!(names, vec!["b".to_string(), "c".to_string()]);
    m.shutdown().await.unwrap();
}
