//! Pins the two load paths that skip the session actor: a cold load (no actor is live for
//! the session) reads and decodes the record in the caller's task, and `load_session_bytes`
//! hands out the live actor's bytes without parsing them. Both must give exactly the
//! answers of the actor path: the saved state after a restart, the same `Corrupt` error
//! (and quarantine copy) for a damaged record, migrations of older records, access checks,
//! and never a state older than one acknowledged before the load began, also while actors
//! passivate, respawn and flush recorded steps around the load. A cold load finds `data`
//! from the record's header (format 2): a record of format 1, written before that header
//! existed, still loads cold, and a header whose numbers lie (its checksum made to agree)
//! is `Corrupt` and quarantined like any other damage.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{
    flip_byte, increment, open_quiet, plain_and_compressed, quiet, quiet_builder, restart,
    session_file, wait_for_no_live_actors,
};
use mars_state::testing::{Faulty, Hold, Method};
use mars_state::{
    Access, ErrorKind, MemoryStorageBackend, Principal, StateBytes, StateError, StateManager,
    StorageKey,
};
use serde_json::{Value, json};

plain_and_compressed! {
    cold_load_equals_the_saved_state_after_a_restart,
    cold_load_equals_the_saved_state_after_a_restart_compressed => cold_load_after_restart;
    cold_load_of_a_damaged_record_is_corrupt_and_quarantined,
    cold_load_of_a_damaged_record_is_corrupt_and_quarantined_compressed => cold_load_of_damaged_record;
    cold_load_of_an_older_schema_is_migrated_like_the_actor_does,
    cold_load_of_an_older_schema_is_migrated_like_the_actor_does_compressed => cold_load_of_older_schema;
    load_session_bytes_is_the_json_of_load_session,
    load_session_bytes_is_the_json_of_load_session_compressed => bytes_equal_json;
}

/// A state of about 1 KB whose `n` tells the writes apart.
fn state(n: u64) -> Value {
    json!({"n": n, "messages": [{"role": "user", "content": "x".repeat(960)}]})
}

fn n_of(v: &Value) -> u64 {
    v["n"].as_u64().expect("every state has an n")
}

/// The contents of every file in the store's `quarantine/` folder.
fn quarantined(dir: &Path) -> Vec<Vec<u8>> {
    match std::fs::read_dir(dir.join("quarantine")) {
        Ok(rd) => rd.map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect(),
        Err(_) => Vec::new(),
    }
}

async fn cold_load_after_restart(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = open_quiet(dir.path(), compression).await;
    for i in 0..5 {
        m.save_session(format!("s{i}"), &state(i)).await.unwrap();
    }
    m.record_step("stepped", 7, &state(70)).await.unwrap();
    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.live_session_actors().await.unwrap(), 0);

    for i in 0..5 {
        let sid = format!("s{i}");
        assert_eq!(m.load_session(&sid).await.unwrap(), Some(state(i)), "{sid}");
        // Again: still cold (no actor was spawned by the first load), still the same.
        assert_eq!(m.load_session(&sid).await.unwrap(), Some(state(i)), "{sid}, second load");
        let bytes = m.load_session_bytes(&sid).await.unwrap().expect("a saved state");
        assert_eq!(bytes.as_bytes(), serde_json::to_vec(&state(i)).unwrap(), "{sid}: bytes");
    }
    // A recorded step was flushed at shutdown and is what a cold load reads.
    assert_eq!(m.load_session("stepped").await.unwrap(), Some(state(70)));
    assert_eq!(m.load_session("never-saved").await.unwrap(), None);
    assert_eq!(m.load_session_bytes("never-saved").await.unwrap(), None);
    assert_eq!(
        m.live_session_actors().await.unwrap(),
        0,
        "cold loads read the record without spawning actors"
    );

    // Once a session's actor is live again, loads see its writes at once.
    m.save_session("s0", &state(100)).await.unwrap();
    assert_eq!(m.load_session("s0").await.unwrap(), Some(state(100)));
    m.shutdown().await.unwrap();
}

async fn cold_load_of_damaged_record(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = open_quiet(dir.path(), compression).await;
    m.save_session("hurt", &state(1)).await.unwrap();
    m.shutdown().await.unwrap();
    let path = session_file(dir.path(), "hurt", compression);
    let damaged = flip_byte(&path, |len| len / 2, 0x01);

    let m = open_quiet(dir.path(), compression).await;
    let err = m.load_session("hurt").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(
        quarantined(dir.path()).contains(&damaged),
        "the damaged bytes are copied to quarantine/ by the cold load"
    );
    assert_eq!(std::fs::read(&path).unwrap(), damaged, "the damaged record stays in place");
    let again = m.load_session_bytes("hurt").await.unwrap_err();
    assert_eq!(again.to_string(), err.to_string(), "load_session_bytes reports the same damage");
    // The session actor's own read of the record gives the very same error.
    let from_actor = m.transactional_update("hurt", increment).await.unwrap_err();
    assert_eq!(from_actor.to_string(), err.to_string(), "the actor path reports the same error");
    assert_eq!(quarantined(dir.path()).len(), 1, "one quarantine copy per record and process");

    // A save replaces the damaged record; a cold load then reads the new one.
    m.save_session("hurt", &state(2)).await.unwrap();
    let m = restart(m, dir.path(), compression).await;
    assert_eq!(m.load_session("hurt").await.unwrap(), Some(state(2)));
    m.shutdown().await.unwrap();
}

async fn cold_load_of_older_schema(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = open_quiet(dir.path(), compression).await;
    m.save_session("old", &json!({"msgs": [1, 2]})).await.unwrap();
    m.shutdown().await.unwrap();

    let v2 = || {
        quiet_builder(dir.path(), compression).schema_version(2).migration(1, |mut v| {
            if let Some(m) = v.as_object_mut().and_then(|o| o.remove("msgs")) {
                v["messages"] = m;
            }
            Ok(v)
        })
    };
    let m = v2().start().await.unwrap();
    assert_eq!(m.load_session("old").await.unwrap(), Some(json!({"messages": [1, 2]})));
    let bytes = m.load_session_bytes("old").await.unwrap().unwrap();
    assert_eq!(bytes.as_bytes(), br#"{"messages":[1,2]}"#);
    // The migration ran in the session actor (user code never runs in the caller's task).
    assert_eq!(m.live_session_actors().await.unwrap(), 1);
    m.save_session("new", &json!({"messages": [3]})).await.unwrap();
    m.shutdown().await.unwrap();

    // A record newer than the application's schema: the same error on both paths.
    let m = open_quiet(dir.path(), compression).await;
    let err = m.load_session("new").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Migration, "{err}");
    let err_bytes = m.load_session_bytes("new").await.unwrap_err();
    assert_eq!(err_bytes.to_string(), err.to_string());
    let from_actor = m.transactional_update("new", increment).await.unwrap_err();
    assert_eq!(from_actor.to_string(), err.to_string());
    m.shutdown().await.unwrap();

    // At the current schema again: served cold, without an actor.
    let m = v2().start().await.unwrap();
    assert_eq!(m.load_session("new").await.unwrap(), Some(json!({"messages": [3]})));
    assert_eq!(m.live_session_actors().await.unwrap(), 0);
    m.shutdown().await.unwrap();
}

async fn bytes_equal_json(compression: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let m = open_quiet(dir.path(), compression).await;
    let nested = json!({"b": [1, 2.5, null, "three"], "a": {"z": true, "y": "ü\n\"q\""}, "n": 1});
    m.save_session("s", &nested).await.unwrap();

    let check = async |m: &StateManager, what: &str| {
        let value = m.load_session("s").await.unwrap().expect("saved");
        let bytes = m.load_session_bytes("s").await.unwrap().expect("saved");
        assert_eq!(value, nested, "{what}");
        assert_eq!(
            bytes.as_bytes(),
            serde_json::to_vec(&value).unwrap(),
            "{what}: compact JSON of the state"
        );
        assert_eq!(bytes.deserialize::<Value>().unwrap(), value, "{what}");
        bytes
    };
    // Warm: the live actor's bytes, shared rather than copied.
    let a = check(&m, "warm").await;
    let b = m.load_session_bytes("s").await.unwrap().unwrap();
    assert_eq!(a.as_bytes().as_ptr(), b.as_bytes().as_ptr(), "warm loads share the actor's bytes");
    // A recorded step is visible at once in both forms.
    m.record_step("s", 1, &json!({"n": 2})).await.unwrap();
    assert_eq!(m.load_session_bytes("s").await.unwrap().unwrap().as_bytes(), br#"{"n":2}"#);
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!({"n": 2})));
    m.save_session("s", &nested).await.unwrap();
    // Cold, after a restart.
    let m = restart(m, dir.path(), compression).await;
    check(&m, "cold").await;
    m.delete_session("s").await.unwrap();
    assert_eq!(m.load_session_bytes("s").await.unwrap(), None, "deleted");
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_session_bytes_is_denied_to_another_principal() {
    let dir = tempfile::tempdir().unwrap();
    let m = open_quiet(dir.path(), None).await;
    let alice = m.for_principal(Principal::new("alice").unwrap());
    let bob = m.for_principal(Principal::new("bob").unwrap());
    alice.save_session("plan", &json!({"secret": 1})).await.unwrap();

    let denied = |r: Result<Option<StateBytes>, StateError>, when: &str| match r {
        Err(StateError::AccessDenied { principal, session, .. }) => {
            assert_eq!((principal.as_str(), session.as_str()), ("bob", "plan"), "{when}");
        }
        other => panic!("{when}: expected AccessDenied, got {other:?}"),
    };
    denied(bob.load_session_bytes("plan").await, "warm");
    assert_eq!(
        alice.load_session_bytes("plan").await.unwrap().unwrap().as_bytes(),
        br#"{"secret":1}"#
    );

    // Cold (no actor live after a restart): still denied, and the denial read nothing.
    let m = restart(m, dir.path(), None).await;
    let alice = m.for_principal(Principal::new("alice").unwrap());
    let bob = m.for_principal(Principal::new("bob").unwrap());
    denied(bob.load_session_bytes("plan").await, "cold");
    assert_eq!(bob.load_session("plan").await.unwrap_err().kind(), ErrorKind::AccessDenied);
    // A grant takes effect; a revocation too.
    alice.grant_access("plan", Principal::new("bob").unwrap(), Access::Read).await.unwrap();
    assert_eq!(
        bob.load_session_bytes("plan").await.unwrap().unwrap().as_bytes(),
        br#"{"secret":1}"#
    );
    alice.revoke_access("plan", &Principal::new("bob").unwrap()).await.unwrap();
    denied(bob.load_session_bytes("plan").await, "revoked");
    m.shutdown().await.unwrap();
}

/// One writer task saves `n = 1, 2, ...` (every third one as a recorded step, which is only
/// in the actor's memory until it is flushed), and lets the session actor passivate every
/// tenth write, while two reader tasks load in a loop, mostly cold. No load may return a
/// state older than the newest one acknowledged before it began, nor older than one an
/// earlier load of the same reader returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_loads_racing_with_writes_never_return_an_older_state() {
    const WRITES: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let m = quiet_builder(dir.path(), None)
        .idle_timeout(Duration::from_millis(20))
        .start()
        .await
        .unwrap();
    m.save_session("race", &state(0)).await.unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));

    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (m, acked, done) = (m.clone(), acked.clone(), done.clone());
            tokio::spawn(async move {
                let (mut last, mut loads) = (0, 0u64);
                while !done.load(Ordering::SeqCst) {
                    let floor = acked.load(Ordering::SeqCst);
                    let n = if loads % 2 == 0 {
                        n_of(&m.load_session("race").await.unwrap().expect("a state"))
                    } else {
                        n_of(
                            &m.load_session_bytes("race")
                                .await
                                .unwrap()
                                .expect("a state")
                                .deserialize()
                                .unwrap(),
                        )
                    };
                    assert!(
                        n >= floor,
                        "reader {r}: loaded n = {n}, but n = {floor} was acknowledged before"
                    );
                    assert!(
                        n >= last,
                        "reader {r}: loaded n = {n} after an earlier load returned {last}"
                    );
                    assert!(n <= WRITES, "reader {r}: n = {n} was never written");
                    last = n;
                    loads += 1;
                    tokio::task::yield_now().await;
                }
                loads
            })
        })
        .collect();

    let mut passivations = 0;
    for n in 1..=WRITES {
        if n % 3 == 0 {
            m.record_step("race", n, &state(n)).await.unwrap();
        } else {
            m.save_session("race", &state(n)).await.unwrap();
        }
        acked.store(n, Ordering::SeqCst);
        if n % 10 == 0 {
            // The readers keep loading meanwhile; cold loads spawn no actor, so it goes.
            if wait_for_no_live_actors(&m, Duration::from_secs(5)).await == 0 {
                passivations += 1;
            }
        }
    }
    done.store(true, Ordering::SeqCst);
    for r in readers {
        assert!(r.await.unwrap() > 0, "every reader loaded");
    }
    assert!(
        passivations >= WRITES / 10 - 2,
        "the actor passivated between writes ({passivations} times)"
    );
    assert_eq!(m.load_session("race").await.unwrap(), Some(state(WRITES)));
    let m = restart(m, dir.path(), None).await;
    assert_eq!(
        m.load_session("race").await.unwrap(),
        Some(state(WRITES)),
        "the last write is durable"
    );
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// A backend that can stop a read or a write of a session record midway.
// ---------------------------------------------------------------------------------------

/// `MemoryStorageBackend` whose reads and writes of `sessions/...` can be held: a read
/// before it reads, a write before or after it writes. Clones share the backend and the
/// holds (a restart hands a clone to the new manager).
#[derive(Debug, Clone)]
struct HoldingBackend {
    backend: Arc<Faulty<MemoryStorageBackend>>,
    get: Hold,
    put_before: Hold,
    put_after: Hold,
}

impl Default for HoldingBackend {
    fn default() -> Self {
        let (get, put_before, put_after) = (Hold::new(), Hold::new(), Hold::new());
        let backend = Faulty::new(MemoryStorageBackend::new())
            .hold(Method::Get, &get, is_session)
            .hold(Method::Put, &put_before, is_session)
            .hold_after(Method::Put, &put_after, is_session);
        HoldingBackend { backend: Arc::new(backend), get, put_before, put_after }
    }
}

fn is_session(key: &StorageKey) -> bool {
    key.as_str().starts_with("sessions/")
}

/// Waits until `hold` is holding a call.
async fn until_held(hold: &Hold, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), hold.held())
        .await
        .unwrap_or_else(|_| panic!("{what} never came"));
}

async fn start_holding(backend: &HoldingBackend) -> StateManager {
    quiet(StateManager::builder(backend.backend.clone())).start().await.unwrap()
}

/// Regression: a stopping session actor unpublished its state before flushing recorded
/// steps, so a load in between (which reads the record directly when the hot map misses)
/// returned the record's older state although the step had been acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_steps_stay_visible_while_a_stopping_actor_flushes_them() {
    let backend = HoldingBackend::default();
    let m = start_holding(&backend).await;
    m.save_session("run", &state(0)).await.unwrap();
    m.record_step("run", 1, &state(1)).await.unwrap();

    // Shutdown drains the actor, whose post_stop flushes step 1: hold that write.
    backend.put_before.arm();
    let stopping = {
        let m = m.clone();
        tokio::spawn(async move { m.shutdown().await })
    };
    until_held(&backend.put_before, "the flush of the recorded step").await;
    assert_eq!(
        m.load_session("run").await.unwrap(),
        Some(state(1)),
        "an acknowledged step went missing"
    );
    backend.put_before.release();
    stopping.await.unwrap().unwrap();

    let m = start_holding(&backend).await;
    assert_eq!(
        m.load_session("run").await.unwrap(),
        Some(state(1)),
        "the flush made the step durable"
    );
    m.shutdown().await.unwrap();
}

/// A cold load may read a write that is on disk but not acknowledged yet, while the actor
/// that makes it still publishes the state it had before. It must then answer with that
/// published state, or a later load (served from it) would go back in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_load_never_returns_a_state_later_loads_go_back_from() {
    let backend = HoldingBackend::default();
    let m = start_holding(&backend).await;
    m.save_session("s", &state(1)).await.unwrap();
    let m = {
        m.shutdown().await.unwrap();
        start_holding(&backend).await
    };

    // A cold load misses the hot map and is held just before it reads the record.
    backend.get.arm();
    let first = {
        let m = m.clone();
        tokio::spawn(async move { m.load_session("s").await })
    };
    until_held(&backend.get, "the cold load's read").await;
    // Meanwhile a save spawns the session's actor, which reads and publishes state 1 and
    // writes state 2; it is held after the write, before it is acknowledged.
    backend.put_after.arm();
    let saving = {
        let m = m.clone();
        tokio::spawn(async move { m.save_session("s", &state(2)).await })
    };
    until_held(&backend.put_after, "the save's write").await;
    backend.get.release();
    let first = n_of(&first.await.unwrap().unwrap().unwrap());
    let second = n_of(&m.load_session("s").await.unwrap().unwrap());
    assert!(
        second >= first,
        "a load returned n = {second} after an earlier one returned n = {first}"
    );
    backend.put_after.release();
    saving.await.unwrap().unwrap();
    assert_eq!(m.load_session("s").await.unwrap(), Some(state(2)));
    m.shutdown().await.unwrap();
}

/// A plain record's checksum written again over its bytes (what a writer with a bug in its
/// header would store): the CRC-32 of every byte after the 8 hex digits and `",`.
fn reseal(record: &mut [u8]) {
    let prefix = br#"{"mars_state":2,"crc32":""#.len();
    let crc = crc32fast::hash(&record[prefix + 10..]);
    record[prefix..prefix + 8].copy_from_slice(format!("{crc:08x}").as_bytes());
}

/// Where the digits of the header field `name` (`data_at` or `data_len`) are in a record.
fn header_field(record: &[u8], name: &str) -> std::ops::Range<usize> {
    let key = format!("\"{name}\":\"");
    let at = record.windows(key.len()).position(|w| w == key.as_bytes()).unwrap() + key.len();
    let len = record[at..].iter().position(|b| *b == b'"').unwrap();
    at..at + len
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_format_1_loads_cold_and_is_rewritten_in_format_2_by_a_save() {
    let dir = tempfile::tempdir().unwrap();
    let m = open_quiet(dir.path(), None).await;
    m.save_session("other", &state(1)).await.unwrap();
    m.shutdown().await.unwrap();
    // As versions before format 2 wrote it: no `data_at`, no `data_len`.
    let data = r#"{"msgs":["message 1","message \"2\""],"step":2,"nested":{"k":[1,2.5,null]}}"#;
    let mut v1 = format!(
        r#"{{"mars_state":1,"crc32":"00000000","kind":"session","session_id":"old","saved_at":1795636056182,"meta":{{"schema":1,"status":"running","step":2}},"data":{data}}}"#
    )
    .into_bytes();
    v1.push(b'\n');
    let crc = crc32fast::hash(&v1[br#"{"mars_state":1,"crc32":"00000000","#.len()..]);
    v1[25..33].copy_from_slice(format!("{crc:08x}").as_bytes());
    let path = session_file(dir.path(), "old", None);
    common::put_file(&path, &v1);

    let m = open_quiet(dir.path(), None).await;
    let expected: Value = serde_json::from_str(data).unwrap();
    assert_eq!(m.load_session("old").await.unwrap(), Some(expected.clone()));
    let m = restart(m, dir.path(), None).await;
    assert_eq!(m.load_session_bytes("old").await.unwrap().unwrap().as_bytes(), data.as_bytes());
    assert!(quarantined(dir.path()).is_empty(), "nothing was taken for damage");

    // A save writes format 2, which loads cold too.
    m.transactional_update("old", |v: Option<Value>| {
        let mut v = v.expect("the state of format 1");
        v["step"] = json!(3);
        Ok::<_, common::Never>(v)
    })
    .await
    .unwrap();
    let m = restart(m, dir.path(), None).await;
    let stored = std::fs::read(&path).unwrap();
    assert!(
        stored.starts_with(br#"{"mars_state":2,"crc32":""#),
        "{}",
        String::from_utf8_lossy(&stored)
    );
    let mut updated = expected;
    updated["step"] = json!(3);
    assert_eq!(m.load_session("old").await.unwrap(), Some(updated));
    assert_eq!(m.load_session("other").await.unwrap(), Some(state(1)));
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_header_lies_about_data_is_corrupt_and_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let m = open_quiet(dir.path(), None).await;
    m.save_session("lied", &state(1)).await.unwrap();
    m.save_session("fine", &state(2)).await.unwrap();
    m.shutdown().await.unwrap();
    let path = session_file(dir.path(), "lied", None);
    let good = std::fs::read(&path).unwrap();
    let number = |name: &str| -> usize {
        std::str::from_utf8(&good[header_field(&good, name)]).unwrap().parse().unwrap()
    };
    let (data_at, data_len) = (number("data_at"), number("data_len"));
    assert_eq!(good.len(), data_at + data_len + 2);
    // Each number moved, alone or both together (so that they still add up), and a length
    // past the end: the checksum is made to agree every time.
    let set = |changes: &[(&str, usize)]| {
        let mut b = good.clone();
        for (name, value) in changes {
            let at = header_field(&b, name);
            let text = format!("{value:0width$}", width = at.len());
            b[at].copy_from_slice(text.as_bytes());
        }
        reseal(&mut b);
        b
    };
    let cases = [
        ("offset one late", set(&[("data_at", data_at + 1)])),
        ("offset one early", set(&[("data_at", data_at - 1)])),
        ("length one short", set(&[("data_len", data_len - 1)])),
        ("length past the end", set(&[("data_len", 10 * good.len())])),
        ("both moved", set(&[("data_at", data_at + 1), ("data_len", data_len - 1)])),
        ("both at the fields", set(&[("data_at", data_at - 20), ("data_len", data_len + 20)])),
    ];
    for (name, lying) in cases {
        common::put_file(&path, &lying);
        let m = open_quiet(dir.path(), None).await;
        let err = m.load_session("lied").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{name}: {err}");
        assert!(quarantined(dir.path()).contains(&lying), "{name}: quarantined");
        let bytes = m.load_session_bytes("lied").await.unwrap_err();
        assert_eq!(bytes.kind(), ErrorKind::Corrupt, "{name}: {bytes}");
        assert_eq!(m.load_session("fine").await.unwrap(), Some(state(2)), "{name}");
        let report = m.verify_store(|_, _| {}).await.unwrap();
        assert_eq!(report.damaged.len(), 1, "{name}: {report:?}");
        m.shutdown().await.unwrap();
    }
    // The record as written still loads.
    common::put_file(&path, &good);
    let m = open_quiet(dir.path(), None).await;
    assert_eq!(m.load_session("lied").await.unwrap(), Some(state(1)));
    m.shutdown().await.unwrap();
}
