//! The janitor on its interval, under paused time: it trims checkpoints past the retention
//! limit and removes idle sessions exactly when the policy says, and nothing else.

mod common;

use std::time::Duration;

use common::{
    backend, builder, checkpoint_ids, file_backend_only, on_file_backend, open_temp, session_ids,
    settle,
};
use mars_state::{MemoryStorageBackend, RetentionPolicy, StateManager, StorageKey};
use serde_json::json;

/// A manager over a fresh in-memory store whose janitor runs `every` so long under `policy`.
async fn memory_manager(every: Duration, policy: RetentionPolicy) -> StateManager {
    StateManager::builder(MemoryStorageBackend::new())
        .janitor_interval(every)
        .retention(policy)
        .start()
        .await
        .unwrap()
}

/// Advances paused time by `n` hours, one at a time, letting the janitor run after each.
async fn pass_hours(n: usize) {
    for _ in 0..n {
        tokio::time::advance(Duration::from_secs(3600)).await;
        settle().await;
    }
}

#[tokio::test(start_paused = true)]
async fn interval_pass_trims_checkpoints_to_the_limit() {
    let policy = RetentionPolicy { keep_checkpoints: Some(2), ..Default::default() };
    let m = memory_manager(Duration::from_secs(60), policy).await;
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
    assert_eq!(
        m.list_checkpoints("s2").await.unwrap().len(),
        1,
        "a session under the limit is untouched"
    );
    m.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_are_removed_and_active_ones_kept() {
    let policy = RetentionPolicy {
        max_session_idle: Some(Duration::from_secs(86_400)),
        ..Default::default()
    };
    let m = memory_manager(Duration::from_secs(3600), policy).await;
    m.save_session("old", &json!({"v": 1})).await.unwrap();
    m.create_checkpoint("old", "main", &json!({"v": 1})).await.unwrap();
    m.save_session("busy", &json!({"v": 1})).await.unwrap();
    settle().await;
    // 23 hours: nobody is idle long enough yet.
    pass_hours(23).await;
    assert_eq!(m.list_sessions().await.unwrap().len(), 2);
    m.save_session("busy", &json!({"v": 2})).await.unwrap();
    // Two more hours: "old" is now idle over a day, "busy" was saved an hour and a bit ago.
    pass_hours(2).await;
    assert_eq!(session_ids(&m).await, vec!["busy".to_string()]);
    assert_eq!(m.load_session("old").await.unwrap(), None);
    assert!(m.list_checkpoints("old").await.unwrap().is_empty());
    assert_eq!(m.load_session("busy").await.unwrap(), Some(json!({"v": 2})));
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_now_sweeps_staged_files_of_interrupted_writes() {
    if !file_backend_only(
        "run_now_sweeps_staged_files_of_interrupted_writes",
        "plants a staged file of the file backend",
    ) {
        return;
    }
    let (dir, m) = open_temp(None).await;
    m.save_session("s1", &json!({"v": 1})).await.unwrap();
    // What a crash between "create staged file" and "rename" leaves behind.
    let staged = dir.path().join("sessions").join(".s1.json.tmp-0123456789abcdef");
    std::fs::File::create(&staged).unwrap();
    let report = m.run_janitor_now().await.unwrap();
    assert_eq!(report.temp_files_removed, 1);
    assert!(!staged.exists());
    assert_eq!(
        m.load_session("s1").await.unwrap(),
        Some(json!({"v": 1})),
        "the record itself is untouched"
    );
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
    assert_eq!(session_ids(&m).await, vec!["b".to_string(), "c".to_string()]);
    m.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn old_checkpoints_go_but_each_sessions_newest_stays() {
    let policy = RetentionPolicy {
        max_checkpoint_age: Some(Duration::from_secs(86_400)),
        ..Default::default()
    };
    let m = memory_manager(Duration::from_secs(3600), policy).await;
    settle().await;
    let old_a = m.create_checkpoint("a", "main", &json!(1)).await.unwrap();
    let old_b = m.create_checkpoint("b", "main", &json!(1)).await.unwrap();
    // Ten hours later "a" gets a newer checkpoint; "b" does not.
    pass_hours(10).await;
    let new_a = m.create_checkpoint("a", "main", &json!(2)).await.unwrap();
    // Past a day for the old ones, not for the new one.
    pass_hours(15).await;
    assert_eq!(checkpoint_ids(&m, "a").await, vec![new_a], "the old one of a is removed");
    assert_eq!(
        checkpoint_ids(&m, "b").await,
        vec![old_b],
        "b's only (newest) checkpoint is spared however old"
    );
    assert!(m.restore_checkpoint(&old_a).await.unwrap().is_none());
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_cap_holds_across_1000_checkpoints_and_evicts_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let cap: u64 = 64 * 1024;
    let m = builder(dir.path(), None)
        .retention(RetentionPolicy { max_total_bytes: Some(cap), ..Default::default() })
        .start()
        .await
        .unwrap();
    let payload = "x".repeat(900);
    let mut all = Vec::new();
    let mut max_seen = 0;
    for i in 0..1000 {
        let s = ["a", "b", "c"][i % 3];
        all.push(m.create_checkpoint(s, "main", &json!({"i": i, "p": payload})).await.unwrap());
        let stats = m.get_storage_stats().await.unwrap();
        max_seen = max_seen.max(stats.total_bytes);
        assert!(
            stats.total_bytes <= cap,
            "over the cap after checkpoint {i}: {}",
            stats.total_bytes
        );
    }
    // What is left is exactly a suffix of the creation order (oldest evicted first),
    // and (on the file backend) the bytes on disk agree with the stats.
    let mut left: Vec<_> = Vec::new();
    for s in ["a", "b", "c"] {
        left.extend(m.list_checkpoints(s).await.unwrap().into_iter().map(|c| c.id));
    }
    left.sort_by_key(|id| all.iter().position(|x| x == id).unwrap());
    let first = all.iter().position(|x| *x == left[0]).unwrap();
    assert_eq!(left, all[first..].to_vec());
    assert!(left.len() > 10, "the cap leaves room for {} checkpoints", left.len());
    if on_file_backend() {
        let mut on_disk = 0;
        for s in ["a", "b", "c"] {
            for e in std::fs::read_dir(dir.path().join("checkpoints").join(s)).unwrap() {
                on_disk += e.unwrap().metadata().unwrap().len();
            }
        }
        assert_eq!(on_disk, m.get_storage_stats().await.unwrap().total_bytes);
    }
    println!("byte cap {cap}: max total seen {max_seen}, {} checkpoints kept of 1000", left.len());
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn janitor_repairs_an_index_that_disagrees_with_the_records_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = backend(dir.path());
    let m = StateManager::start(store.clone()).await.unwrap();
    m.save_session("s1", &json!({"v": 1})).await.unwrap();
    let cp = m.create_checkpoint("s1", "main", &json!({"v": 1})).await.unwrap();
    // A record removed behind the store's back, through the backend under the manager: the
    // index still lists it.
    let key = StorageKey::new(format!("checkpoints/s1/{cp}.json")).unwrap();
    assert!(store.delete(&key).await.unwrap(), "{key} was not stored");
    assert_eq!(m.list_checkpoints("s1").await.unwrap().len(), 1);
    let report = m.run_janitor_now().await.unwrap();
    assert_eq!(report.index_repairs, 1, "{report:?}");
    assert!(m.list_checkpoints("s1").await.unwrap().is_empty());
    assert_eq!(m.get_storage_stats().await.unwrap().checkpoint_count, 0);
    m.shutdown().await.unwrap();
}
