//! Supervision under fire (issue 5, item 11): panics in user closures are contained to the
//! call that made them, and cost neither other sessions' saves, nor liveness, nor memory.
//!
//! - `a_thousand_panics_in_a_row_while_fifty_sessions_save`: one session's
//!   `transactional_update` closure panics 1,000 times in a row (each call gets
//!   `ErrorKind::Panicked`) while 50 other sessions save 20 times each, concurrently, on a
//!   store (a file store unless `MARS_STATE_TEST_BACKEND` says otherwise). Every one of the
//!   1,000 other saves must be acknowledged and, read back by a fresh manager, present; the
//!   whole run must finish within 120 s (no hang); the panicking session must work normally
//!   afterwards; and resident memory (`VmRSS` from
//!   `/proc/self/status`) may grow by less than 20 MiB between the 100th and the 1,000th
//!   panic. Both figures are printed.
//! - `a_panic_under_a_call_timeout_returns_panicked_and_never_hangs`: with a 500 ms call
//!   timeout, a closure that panics at once and one that panics after 200 ms both give the
//!   caller `Panicked` (not a timeout, not a hang); a closure that sleeps 1.5 s and then
//!   panics gives `Timeout` after about 500 ms; 20 callers queued behind panicking closures
//!   on one session all get an answer; and the session serves loads and saves afterwards.
//! - `a_blocking_update_closure_holds_up_neither_other_sessions_nor_the_call_timeout`: on a
//!   runtime with one worker thread, a closure that blocks its thread for 1.5 s delays
//!   neither five saves of another session (< 1 s) nor its caller's 500 ms call timeout
//!   (< 1.2 s), and its result is saved afterwards (the caller was told "outcome unknown").
//!
//! The tests install a panic hook that stays silent for the panics they provoke (their
//! message starts with `provoked panic`) and passes every other panic to the default hook.
//!
//! Run alone: `cargo test --test supervision -- --nocapture`. The store is on the backend
//! `MARS_STATE_TEST_BACKEND` picks (`tests/common/backend.rs`; a file store by default).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use common::backend_defaults;
use mars_state::{ErrorKind, StateManager};
use serde_json::{Value, json};

const PANIC_TAG: &str = "provoked panic";

fn quiet_provoked_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if !msg.starts_with(PANIC_TAG) {
                default(info);
            }
        }));
    });
}

/// The tests measure this process's memory: run them one at a time.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("no VmRSS in /proc/self/status")
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("mars-supervision-").tempdir().unwrap()
}

fn value(s: usize, i: usize) -> Value {
    json!({ "session": s, "i": i, "pad": "s".repeat(200) })
}

async fn panicking_update(m: &StateManager, session: &str, n: usize) -> mars_state::Result<Value> {
    m.transactional_update(session, move |_old: Option<Value>| -> Result<Value, std::io::Error> {
        panic!("{PANIC_TAG} number {n}")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_panics_in_a_row_while_fifty_sessions_save() {
    quiet_provoked_panics();
    let _one = serial().await;
    const PANICS: usize = 1_000;
    const OTHERS: usize = 50;
    const SAVES_EACH: usize = 20;
    let tmp = scratch();
    let dir = tmp.path().join("store");
    let m = StateManager::builder(backend_defaults(&dir))
        .janitor_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    m.save_session("boom", &json!({"n": 0})).await.unwrap();
    let started = Instant::now();

    let acked_so_far = Arc::new(AtomicUsize::new(0));
    let run = async {
        let savers: Vec<_> = (0..OTHERS)
            .map(|s| {
                let m = m.clone();
                let acked_so_far = acked_so_far.clone();
                tokio::spawn(async move {
                    let mut acked = 0;
                    for i in 0..SAVES_EACH {
                        match m.save_session(format!("other-{s:02}"), &value(s, i)).await {
                            Ok(()) => acked += 1,
                            Err(e) => panic!("save {i} of other-{s:02} failed: {e}"),
                        }
                        acked_so_far.fetch_add(1, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                    acked
                })
            })
            .collect();
        let mut rss_at_100 = 0;
        let mut acked_at_100 = 0;
        let mut kinds = std::collections::BTreeMap::new();
        for n in 1..=PANICS {
            // Keep the panics alongside the saves (the panics alone are faster): never more
            // than 50 panics ahead of the acknowledged saves.
            while acked_so_far.load(Ordering::Relaxed) + 50 < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let err =
                panicking_update(&m, "boom", n).await.expect_err("a panicking closure returned Ok");
            *kinds.entry(format!("{:?}", err.kind())).or_insert(0) += 1;
            assert_eq!(err.kind(), ErrorKind::Panicked, "panic {n}: {err}");
            if n == 100 {
                rss_at_100 = vm_rss_kib();
                acked_at_100 = acked_so_far.load(Ordering::Relaxed);
            }
        }
        let rss_at_1000 = vm_rss_kib();
        let acked_at_1000 = acked_so_far.load(Ordering::Relaxed);
        let mut acked = 0;
        for s in savers {
            acked += s.await.expect("a saving task panicked");
        }
        (rss_at_100, rss_at_1000, acked, kinds, (acked_at_100, acked_at_1000))
    };
    let (rss_100, rss_1000, acked, kinds, (acked_at_100, acked_at_1000)) =
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("hang: the run did not finish within 120 s");
    let took = started.elapsed();

    // The panicking session works normally afterwards.
    assert_eq!(
        m.load_session("boom").await.unwrap(),
        Some(json!({"n": 0})),
        "a panic changed the state"
    );
    let n: Value = m
        .transactional_update("boom", |old: Option<Value>| {
            Ok::<_, std::io::Error>(json!({"n": old.unwrap()["n"].as_i64().unwrap() + 1}))
        })
        .await
        .unwrap();
    assert_eq!(n, json!({"n": 1}));
    let live = m.live_session_actors().await.unwrap();
    m.shutdown().await.unwrap();

    // Every acknowledged save is present, read by a fresh manager.
    let m = StateManager::start(backend_defaults(&dir)).await.unwrap();
    let mut present = 0;
    for s in 0..OTHERS {
        if m.load_session(format!("other-{s:02}")).await.unwrap() == Some(value(s, SAVES_EACH - 1))
        {
            present += 1;
        }
    }
    assert_eq!(m.load_session("boom").await.unwrap(), Some(json!({"n": 1})));
    m.shutdown().await.unwrap();

    let growth_kib = rss_1000.saturating_sub(rss_100);
    println!(
        "supervision: {PANICS} panics in a row ({kinds:?}) while {OTHERS} sessions saved {SAVES_EACH} times each: \
         {acked}/{} saves acknowledged ({acked_at_100} by the 100th panic, {acked_at_1000} by the last), \
         {present}/{OTHERS} sessions hold their last save after a restart, {live} live session actors, {:.1}s; \
         VmRSS after 100 panics {} KiB, after {PANICS} {} KiB (growth {} KiB, limit 20 MiB)",
        OTHERS * SAVES_EACH,
        took.as_secs_f64(),
        rss_100,
        rss_1000,
        growth_kib
    );
    assert_eq!(acked, OTHERS * SAVES_EACH);
    assert_eq!(present, OTHERS);
    assert!(
        growth_kib < 20 * 1024,
        "memory grew by {growth_kib} KiB between the 100th and the 1,000th panic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_under_a_call_timeout_returns_panicked_and_never_hangs() {
    quiet_provoked_panics();
    let _one = serial().await;
    let tmp = scratch();
    let m = StateManager::builder(backend_defaults(&tmp.path().join("store")))
        .call_timeout(Duration::from_millis(500))
        .janitor_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    m.save_session("s", &json!({"v": 1})).await.unwrap();
    let limit = Duration::from_secs(10);

    // Panics at once.
    let t = Instant::now();
    let err =
        tokio::time::timeout(limit, panicking_update(&m, "s", 1)).await.expect("hang").unwrap_err();
    let immediate = t.elapsed();
    assert_eq!(err.kind(), ErrorKind::Panicked, "{err}");
    assert!(err.to_string().contains("number 1"), "the panic message is not passed on: {err}");

    // Panics after 200 ms, within the timeout.
    let t = Instant::now();
    let r = m.transactional_update("s", |_old: Option<Value>| -> Result<Value, std::io::Error> {
        std::thread::sleep(Duration::from_millis(200));
        panic!("{PANIC_TAG} after 200 ms")
    });
    let err = tokio::time::timeout(limit, r).await.expect("hang").unwrap_err();
    let delayed = t.elapsed();
    assert_eq!(err.kind(), ErrorKind::Panicked, "{err}");

    // Panics after the timeout: the caller learns "outcome unknown" on time.
    let t = Instant::now();
    let r = m.transactional_update("s", |_old: Option<Value>| -> Result<Value, std::io::Error> {
        std::thread::sleep(Duration::from_millis(1500));
        panic!("{PANIC_TAG} after 1.5 s")
    });
    let err = tokio::time::timeout(limit, r).await.expect("hang").unwrap_err();
    let late = t.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(late < Duration::from_millis(1400), "the timeout fired after {late:?}");

    // Callers queued behind panicking closures all get an answer.
    let t = Instant::now();
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let m = m.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    panicking_update(&m, "q", i).await.map(|_| ())
                } else {
                    m.save_session("q", &json!({"i": i})).await
                }
            })
        })
        .collect();
    let mut answers = std::collections::BTreeMap::new();
    for c in calls {
        let r = tokio::time::timeout(limit, c).await.expect("a queued caller hung").unwrap();
        let key = match r {
            Ok(()) => "Ok".to_owned(),
            Err(e) => format!("{:?}", e.kind()),
        };
        *answers.entry(key).or_insert(0) += 1;
    }
    let queued = t.elapsed();
    assert_eq!(answers.get("Panicked"), Some(&10), "{answers:?}");
    assert_eq!(answers.get("Ok"), Some(&10), "{answers:?}");

    // The sessions still serve requests.
    tokio::time::sleep(Duration::from_millis(1200)).await; // let the 1.5 s closure finish
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!({"v": 1})));
    m.save_session("s", &json!({"v": 2})).await.unwrap();
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!({"v": 2})));
    assert!(m.load_session("q").await.unwrap().is_some());
    m.shutdown().await.unwrap();
    println!(
        "call timeout 500 ms: immediate panic -> Panicked in {immediate:?}; panic after 200 ms -> Panicked in \
         {delayed:?}; panic after 1.5 s -> Timeout in {late:?}; 20 queued callers answered in {queued:?}: {answers:?}"
    );
}

/// One worker thread: before update closures ran under `block_in_place`, a closure that
/// blocked for 1.5 s held that worker, so other sessions' saves and the caller's own call
/// timeout all waited for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_blocking_update_closure_holds_up_neither_other_sessions_nor_the_call_timeout() {
    let _one = serial().await;
    let tmp = scratch();
    let m = StateManager::builder(backend_defaults(&tmp.path().join("store")))
        .call_timeout(Duration::from_millis(500))
        .janitor_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    m.save_session("other", &json!({"v": 0})).await.unwrap();
    m.save_session("slow", &json!({"v": 0})).await.unwrap();

    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let slow = {
        let m = m.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = m
                .transactional_update("slow", move |_old: Option<Value>| {
                    let _ = started_tx.send(());
                    std::thread::sleep(Duration::from_millis(1500));
                    Ok::<_, std::io::Error>(json!({"v": 1}))
                })
                .await;
            (r, t.elapsed())
        })
    };
    started_rx.await.unwrap();

    let t = Instant::now();
    for i in 1..=5 {
        m.save_session("other", &json!({"v": i})).await.unwrap();
    }
    let others = t.elapsed();
    assert!(
        others < Duration::from_millis(1000),
        "another session waited for the closure: {others:?}"
    );

    let (r, waited) = slow.await.unwrap();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Timeout);
    assert!(waited < Duration::from_millis(1200), "the call timeout fired after {waited:?}");

    // The outcome was unknown to the caller; the closure went on and its result was saved.
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.load_session("slow").await.unwrap() != Some(json!({"v": 1})) {
        assert!(Instant::now() < deadline, "the closure's result was never saved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(m.load_session("other").await.unwrap(), Some(json!({"v": 5})));
    println!(
        "5 saves of another session during a 1.5 s closure: {others:?}; the caller's timeout: {waited:?}"
    );
    m.shutdown().await.unwrap();
}
