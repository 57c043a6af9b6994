//! Pins the concurrency contract of the state manager on the file backend: no lost updates
//! when many tasks update one session, no lost saves when many sessions are written at once
//! (also across a restart), panics in one session's closures do not disturb other sessions,
//! and idle session actors are passivated (and respawned on demand) without losing or
//! reordering any acknowledged write, even when requests race the passivation.
//!
//! All runtimes are multi-threaded and every task works on a clone of one manager. Real
//! time is used only where passivation needs it; nothing asserts on timing or speed (waits
//! poll with generous deadlines).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{
    Never, builder, checkpoint_ids, increment, open_temp, per_mode, quiet_deliberate_panics,
    restart, session_ids, spawn_each, wait_for_no_live_actors,
};
use mars_state::{ErrorKind, RetentionPolicy, StateError, StateManager};
use serde_json::{Value, json};

per_mode!(plain, gzip, #[tokio::test(flavor = "multi_thread", worker_threads = 4)]:
    hundred_concurrent_increments_end_at_100,
    hundred_sessions_saved_concurrently_all_load,
    panics_in_one_session_do_not_disturb_others,
    idle_actors_are_passivated,
    passivated_sessions_load_correctly,
    saves_racing_passivation_are_never_lost,
    updates_racing_passivation_are_never_lost,
    concurrent_checkpoints_on_one_session_are_ordered,
    constant_janitor_passes_never_break_writes,
    cleanup_old_sessions_racing_saves_never_serves_stale_state,
);

/// A manager whose session actors passivate after 50 ms idle. The call timeout is short so
/// that a request stuck behind a passivated actor fails the test quickly instead of hanging.
async fn open_passivating(dir: &Path, compression: Option<u32>) -> StateManager {
    builder(dir, compression)
        .idle_timeout(Duration::from_millis(50))
        .call_timeout(Duration::from_secs(5))
        .start()
        .await
        .expect("start manager")
}

async fn hundred_concurrent_increments_end_at_100(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    let tasks =
        spawn_each(
            &m,
            0..100,
            |m, _| async move { m.transactional_update("counter", increment).await },
        );
    let mut seen = BTreeSet::new();
    for t in tasks {
        let v = t.await.unwrap().expect("increment failed");
        assert!(seen.insert(v["n"].as_i64().unwrap()), "two updates saw the same old state: {v}");
    }
    // Each update saw the previous one's result: the returned values are exactly 1..=100.
    assert_eq!(seen, (1..=100).collect::<BTreeSet<i64>>());
    assert_eq!(m.load_session("counter").await.unwrap(), Some(json!({"n": 100})));

    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session("counter").await.unwrap(), Some(json!({"n": 100})));
    m.shutdown().await.unwrap();
}

async fn hundred_sessions_saved_concurrently_all_load(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    let state = |i: usize| json!({"session": i, "payload": "p".repeat(i * 10)});
    let tasks = spawn_each(&m, 0..100, |m, i| async move {
        m.save_session(format!("s{i:03}"), &state(i)).await
    });
    for (i, t) in tasks.into_iter().enumerate() {
        t.await.unwrap().unwrap_or_else(|e| panic!("save of s{i:03} failed: {e}"));
    }
    for i in 0..100 {
        assert_eq!(m.load_session(format!("s{i:03}")).await.unwrap(), Some(state(i)), "s{i:03}");
    }
    let listed = common::listed_records(&m).await;
    assert_eq!(listed.len(), 100);
    assert_eq!(m.get_storage_stats().await.unwrap().session_count, 100);

    let m = restart(m, dir.path(), compression).await;
    // Loaded concurrently too, after the restart.
    let tasks =
        spawn_each(&m, 0..100, |m, i| async move { (i, m.load_session(format!("s{i:03}")).await) });
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(r.unwrap(), Some(state(i)), "s{i:03} after restart");
    }
    assert_eq!(common::listed_records(&m).await, listed, "the listing survives the restart");
    m.shutdown().await.unwrap();
}

async fn panics_in_one_session_do_not_disturb_others(compression: Option<u32>) {
    quiet_deliberate_panics();
    let (dir, m) = open_temp(compression).await;
    m.save_session("victim", &json!({"n": 7})).await.unwrap();

    let panicker = {
        let m = m.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..50 {
                let r = m
                    .transactional_update(
                        "victim",
                        move |_old: Option<Value>| -> Result<Value, Never> {
                            panic!("deliberate panic {i}")
                        },
                    )
                    .await;
                outcomes.push(r);
            }
            outcomes
        })
    };
    let savers = spawn_each(&m, 0..20, |m, s| async move {
        let mut last = None;
        for round in 0..10 {
            let v = json!({"session": s, "round": round});
            m.save_session(format!("other{s}"), &v)
                .await
                .unwrap_or_else(|e| panic!("other{s}: {e}"));
            last = Some(v);
        }
        (s, last.unwrap())
    });

    for (i, r) in panicker.await.unwrap().into_iter().enumerate() {
        match r {
            Err(StateError::Panicked { session, message }) => {
                assert_eq!(session, "victim");
                assert!(message.contains(&format!("deliberate panic {i}")), "{message:?}");
            }
            other => panic!("panicking update {i}: expected Panicked, got {other:?}"),
        }
    }
    for t in savers {
        let (s, last) = t.await.unwrap();
        assert_eq!(m.load_session(format!("other{s}")).await.unwrap(), Some(last), "other{s}");
    }
    // The victim's state is what it was, and the session still works.
    assert_eq!(m.load_session("victim").await.unwrap(), Some(json!({"n": 7})));
    assert_eq!(m.transactional_update("victim", increment).await.unwrap(), json!({"n": 8}));
    m.save_session("victim", &json!({"n": 100})).await.unwrap();
    assert_eq!(m.load_session("victim").await.unwrap(), Some(json!({"n": 100})));

    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session("victim").await.unwrap(), Some(json!({"n": 100})));
    for s in 0..20 {
        assert_eq!(
            m.load_session(format!("other{s}")).await.unwrap(),
            Some(json!({"session": s, "round": 9}))
        );
    }
    m.shutdown().await.unwrap();
}

async fn touch_50_sessions(m: &StateManager) {
    let tasks = spawn_each(m, 0..50, |m, i| async move {
        m.save_session(format!("p{i}"), &json!({"i": i})).await
    });
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

async fn idle_actors_are_passivated(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = open_passivating(dir.path(), compression).await;
    touch_50_sessions(&m).await;
    // (No assertion that actors are alive right now: on a slow machine they may already
    // have passivated, and that is not a failure.)
    let live = wait_for_no_live_actors(&m, Duration::from_secs(10)).await;
    assert_eq!(live, 0, "idle session actors were not passivated");
    m.shutdown().await.unwrap();
}

async fn passivated_sessions_load_correctly(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = open_passivating(dir.path(), compression).await;
    touch_50_sessions(&m).await;
    // Well past the idle timeout; whether every actor is gone is the other test's concern.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Concurrently, so that a stuck session costs one call timeout, not fifty.
    let tasks =
        spawn_each(&m, 0..50, |m, i| async move { (i, m.load_session(format!("p{i}")).await) });
    let mut failures = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r {
            Ok(Some(v)) if v == json!({"i": i}) => {}
            other => failures.push(format!("p{i}: {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 50 passivated sessions did not load: {failures:#?}",
        failures.len()
    );

    // And they take writes again after respawning.
    m.save_session("p0", &json!({"i": "again"})).await.unwrap();
    assert_eq!(m.load_session("p0").await.unwrap(), Some(json!({"i": "again"})));
    m.shutdown().await.unwrap();
}

/// Pauses around the 50 ms idle timeout (below, at, and above it) so that requests land
/// before, during and after the actor's passivation.
fn pause(i: usize) -> Duration {
    const PAUSES_MS: [u64; 9] = [0, 10, 30, 45, 50, 55, 60, 75, 110];
    Duration::from_millis(PAUSES_MS[i % PAUSES_MS.len()])
}

async fn saves_racing_passivation_are_never_lost(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = open_passivating(dir.path(), compression).await;
    let mut last_acked = None;
    let mut failures = Vec::new();
    for i in 0..45 {
        tokio::time::sleep(pause(i)).await;
        match m.save_session("hammered", &json!({"i": i})).await {
            Ok(()) => last_acked = Some(i),
            Err(e) => failures.push(format!("save {i}: {e}")),
        }
        if let Some(acked) = last_acked {
            // Read-your-writes across passivation.
            match m.load_session("hammered").await {
                Ok(Some(v)) if v == json!({"i": acked}) => {}
                other => {
                    failures.push(format!("load after save {i}: expected i={acked}, got {other:?}"))
                }
            }
        }
        if failures.len() >= 3 {
            break;
        }
    }
    assert!(failures.is_empty(), "requests racing passivation failed: {failures:#?}");
    let acked = last_acked.expect("at least one save acked");

    // Once more after the actor has certainly gone idle, then after a restart.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(m.load_session("hammered").await.unwrap(), Some(json!({"i": acked})));
    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session("hammered").await.unwrap(), Some(json!({"i": acked})));
    m.shutdown().await.unwrap();
}

async fn updates_racing_passivation_are_never_lost(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = open_passivating(dir.path(), compression).await;
    // Two tasks increment the same counter with pauses around the idle timeout.
    let tasks = spawn_each(&m, 0..2, |m, t| async move {
        let mut acked = 0;
        let mut errors = Vec::new();
        for i in 0..20 {
            tokio::time::sleep(pause(i + t * 4)).await;
            match m.transactional_update("racy_counter", increment).await {
                Ok(_) => acked += 1,
                Err(e) => {
                    errors.push(format!("task {t} update {i}: {e} ({:?})", e.kind()));
                    if e.kind() == ErrorKind::Timeout {
                        break;
                    }
                }
            }
        }
        (acked, errors)
    });
    let mut total = 0;
    let mut errors = Vec::new();
    for t in tasks {
        let (acked, e) = t.await.unwrap();
        total += acked;
        errors.extend(e);
    }
    assert!(errors.is_empty(), "updates racing passivation failed: {errors:#?}");
    assert_eq!(total, 40);
    assert_eq!(m.load_session("racy_counter").await.unwrap(), Some(json!({"n": 40})));
    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session("racy_counter").await.unwrap(), Some(json!({"n": 40})));
    m.shutdown().await.unwrap();
}

async fn concurrent_checkpoints_on_one_session_are_ordered(compression: Option<u32>) {
    let (_dir, m) = open_temp(compression).await;
    let tasks = spawn_each(&m, 0..100, |m, i| async move {
        (i, m.create_checkpoint("s1", "main", &json!({"i": i})).await)
    });
    let mut created = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        created.push((r.unwrap_or_else(|e| panic!("checkpoint {i}: {e}")), i));
    }
    let listed = checkpoint_ids(&m, "s1").await;
    assert_eq!(listed.len(), 100, "no checkpoint overwrote another");
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "listed ids strictly increasing");
    created.sort();
    assert_eq!(created.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), listed);
    for (id, i) in created.iter().step_by(9) {
        assert_eq!(m.restore_checkpoint(id).await.unwrap().unwrap().data, json!({"i": i}));
    }
    m.shutdown().await.unwrap();
}

async fn constant_janitor_passes_never_break_writes(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = builder(dir.path(), compression)
        .janitor_interval(Duration::from_millis(2))
        .retention(RetentionPolicy { keep_checkpoints: Some(3), ..Default::default() })
        .start()
        .await
        .unwrap();
    // The janitor sweeps staged files every few ms while 20 sessions write concurrently: it
    // must never remove the staged file of a write in progress.
    let tasks = spawn_each(&m, 0..20, |m, s| async move {
        let mut last = Vec::new();
        for round in 0..10 {
            m.save_session(format!("s{s}"), &json!({"round": round})).await.unwrap();
            let id =
                m.create_checkpoint(format!("s{s}"), "main", &json!({"cp": round})).await.unwrap();
            last.push(id);
        }
        (s, last)
    });
    let mut newest = Vec::new();
    for t in tasks {
        let (s, ids) = t.await.unwrap();
        newest.push((s, ids[ids.len() - 3..].to_vec()));
    }
    // One more pass so retention has seen every checkpoint.
    m.run_janitor_now().await.unwrap();
    for (s, ids) in newest {
        assert_eq!(
            m.load_session(format!("s{s}")).await.unwrap(),
            Some(json!({"round": 9})),
            "s{s}"
        );
        let listed = checkpoint_ids(&m, &format!("s{s}")).await;
        assert_eq!(listed, ids, "s{s}: retention keeps exactly the 3 newest");
        assert_eq!(m.restore_checkpoint(&ids[2]).await.unwrap().unwrap().data, json!({"cp": 9}));
    }
    m.shutdown().await.unwrap();
}

async fn cleanup_old_sessions_racing_saves_never_serves_stale_state(compression: Option<u32>) {
    let (dir, m) = open_temp(compression).await;
    for s in 0..30 {
        m.save_session(format!("s{s}"), &json!({"v": "old"})).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cleaner = {
        let m = m.clone();
        tokio::spawn(async move { m.cleanup_old_sessions(Duration::ZERO, 0).await })
    };
    let savers = spawn_each(&m, 0..30, |m, s| async move {
        m.save_session(format!("s{s}"), &json!({"v": "new"})).await
    });
    for (s, t) in savers.into_iter().enumerate() {
        t.await.unwrap().unwrap_or_else(|e| panic!("save s{s}: {e}"));
    }
    let removed = cleaner.await.unwrap().expect("cleanup");
    assert!(removed <= 30);
    // Whatever the interleaving, a session is either gone or holds its last acknowledged
    // state: never the old one, and the listing agrees with the loads.
    let listed: BTreeSet<String> = session_ids(&m).await.into_iter().collect();
    let mut present = 0;
    for s in 0..30 {
        let sid = format!("s{s}");
        match m.load_session(&sid).await.unwrap() {
            Some(v) => {
                assert_eq!(v, json!({"v": "new"}), "{sid} serves a stale state");
                assert!(listed.contains(&sid), "{sid} loads but is not listed");
                present += 1;
            }
            None => assert!(!listed.contains(&sid), "{sid} is listed but does not load"),
        }
    }
    // A session missing now was removed (one removed and then saved again counts in both).
    assert!(
        present + removed >= 30,
        "{present} present + {removed} removed < 30: a session vanished"
    );
    // And the disk agrees with what was served.
    let m = restart(m, dir.path(), compression).await;
    let after: BTreeSet<String> = session_ids(&m).await.into_iter().collect();
    assert_eq!(after, listed);
    m.shutdown().await.unwrap();
}
