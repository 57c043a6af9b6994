//! The behaviours of several nodes on one shared store, for any shared backend: each
//! `async fn NAME(store: Arc<dyn StorageBackend>)` takes a fresh store, and every manager a
//! behaviour starts is a node over that same store (one process, several node ids).
//! [`node_tests!`] expands them into one test each for a backend.
//!
//! A node is "frozen" through [`Freezer`]: every call of its backend waits until it is
//! thawed, as every request of a SIGSTOPped process would; its lease renewals stop with them.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use mars_state::{
    Acquired, ErrorKind, EventKind, Fence, Lease, LeaseState, ObjectMeta, RecordMeta,
    SessionStatus, StateError, StateEvent, StateManager, StorageBackend, StorageKey, SweepReport,
    Watch, WatchError,
};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::common::bounded;

/// The lease TTL of every node here: short, so a takeover is quick.
pub const TTL: Duration = Duration::from_millis(600);

/// Expands the behaviours into one test each, in module `$name`, over stores from `$make`
/// (an async closure giving a fresh `Arc<dyn StorageBackend>`, or one and a guard kept
/// alive beside it: see [`NodeStore`]).
macro_rules! node_tests {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::nodes_common as n;
            n::node_tests!(@each $make;
                a_second_node_reads_the_owners_writes_and_is_told_who_owns_it,
                shutdown_hands_a_session_over_at_once,
                passivation_hands_a_session_over_at_once,
                checkpoints_made_on_one_node_are_listed_and_restored_on_another,
                a_frozen_node_is_taken_over_and_its_late_save_is_refused,
                a_frozen_node_is_taken_over_and_its_late_checkpoint_is_refused,
                a_frozen_node_is_taken_over_and_its_late_delete_is_refused,
                a_frozen_node_that_wakes_is_refused_at_once_not_kept_waiting,
                janitor_passes_run_on_one_node_at_a_time,
                an_access_claim_made_on_one_node_is_enforced_on_another,
                a_watch_on_one_node_sees_writes_made_on_another,
                a_watch_all_sees_every_nodes_events,
                a_principals_watch_on_another_node_is_checked_against_the_sessions_owner,
                a_read_only_manager_s_watch_sees_the_writers_events,
                an_import_waits_for_the_owner_of_a_session_it_writes,
                an_import_that_fails_part_way_lets_go_of_the_session_it_was_writing,
            );
        }
    };
    (@each $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let (store, _guard) = n::NodeStore::split(($make)().await);
                n::$test(store).await;
            }
        )*
    };
}
pub(crate) use node_tests;

/// What a `node_tests!` store maker gives: a store, or a store and a guard (a private server,
/// a schema dropped at the end) kept alive until the behaviour ends.
pub trait NodeStore {
    fn split(self) -> (Arc<dyn StorageBackend>, Box<dyn std::any::Any + Send>);
}

impl NodeStore for Arc<dyn StorageBackend> {
    fn split(self) -> (Arc<dyn StorageBackend>, Box<dyn std::any::Any + Send>) {
        (self, Box::new(()))
    }
}

impl<G: Send + 'static> NodeStore for (Arc<dyn StorageBackend>, G) {
    fn split(self) -> (Arc<dyn StorageBackend>, Box<dyn std::any::Any + Send>) {
        (self.0, Box::new(self.1))
    }
}

/// A node: a manager named `node` over `store`, with the short TTL.
pub async fn node(
    store: &Arc<dyn StorageBackend>,
    node: &str,
    lease_wait: Duration,
) -> StateManager {
    start(node_builder(store, node, lease_wait), node).await
}

/// The builder of a [`node`].
fn node_builder(
    store: &Arc<dyn StorageBackend>,
    node: &str,
    lease_wait: Duration,
) -> mars_state::StateManagerBuilder {
    StateManager::builder(store.clone())
        .node_id(node)
        .lease_ttl(TTL)
        .lease_wait(lease_wait)
        .janitor_interval(Duration::from_secs(3600))
}

async fn start(builder: mars_state::StateManagerBuilder, node: &str) -> StateManager {
    builder.start().await.unwrap_or_else(|e| panic!("start node {node}: {e}"))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A node as [`node`] makes, with access control on.
pub async fn access_node(
    store: &Arc<dyn StorageBackend>,
    node: &str,
    lease_wait: Duration,
) -> StateManager {
    let builder = node_builder(store, node, lease_wait);
    start(builder.access_control(mars_state::AccessControlLayer::new()), node).await
}

/// After a watcher's event feed was cut and it is subscribing again: `writer` saves `s1`
/// until `watch` gets something (at most `limit` saves, a second apart at most); returns
/// what it got and how many saves that took. The saves before the feed is back are missed
/// too, so the watcher's first answer counts them.
pub async fn save_until_delivered(
    writer: &StateManager,
    watch: &mut mars_state::Watch,
    limit: u64,
) -> (Result<mars_state::StateEvent, mars_state::WatchError>, u64) {
    let mut after = 0;
    loop {
        writer.save_session("s1", &json!({"step": 10 + after})).await.unwrap();
        after += 1;
        match tokio::time::timeout(Duration::from_secs(1), watch.recv()).await {
            Ok(r) => return (r, after),
            Err(_) => assert!(after < limit, "the watcher never subscribed again"),
        }
    }
}

/// After a cut feed: `first` (if given) and the events `watch` receives next must account
/// for exactly `expected` events: each either delivered or counted as missed
/// (`WatchError::Lagged`). Which ones are lost depends on when the publisher and the new
/// subscription ran, so only the sum is pinned: none lost without being counted, none counted
/// twice. Returns how many were counted as missed.
pub async fn account_for(
    watch: &mut mars_state::Watch,
    first: Option<Result<mars_state::StateEvent, mars_state::WatchError>>,
    expected: u64,
) -> u64 {
    let (mut missed, mut delivered) = (0u64, 0u64);
    let mut next = first;
    loop {
        match next.take() {
            Some(Err(mars_state::WatchError::Lagged(n))) => missed += n,
            Some(Ok(_)) => delivered += 1,
            Some(Err(e)) => panic!("the watch ended: {e:?}"),
            None => {}
        }
        assert!(
            missed + delivered <= expected,
            "{missed} missed + {delivered} delivered is more than the {expected} events made"
        );
        if missed + delivered == expected {
            return missed;
        }
        next =
            Some(tokio::time::timeout(Duration::from_secs(5), watch.recv()).await.unwrap_or_else(
                |_| panic!("{missed} missed + {delivered} delivered of {expected} events"),
            ));
    }
}

/// `r` must be `OwnedElsewhere` naming `owner`, with a lease end in the future.
fn assert_owned_by<T: std::fmt::Debug>(r: mars_state::Result<T>, owner: &str) {
    match r {
        Err(StateError::OwnedElsewhere { node, until }) => {
            assert_eq!(node, owner, "the owner named");
            assert!(until + 50 >= now_ms(), "the lease end {until} is not in the past");
        }
        other => panic!("expected OwnedElsewhere naming {owner}, got {other:?}"),
    }
}

pub async fn a_second_node_reads_the_owners_writes_and_is_told_who_owns_it(
    store: Arc<dyn StorageBackend>,
) {
    let a = node(&store, "node-a", Duration::ZERO).await;
    let b = node(&store, "node-b", Duration::from_millis(100)).await;
    a.save_session("s1", &json!({"step": 1})).await.unwrap();
    a.save_session("s1", &json!({"step": 2})).await.unwrap();
    // Reads on another node see the last acknowledged write.
    assert_eq!(b.load_session("s1").await.unwrap(), Some(json!({"step": 2})));
    // Writes wait for the lease, then name its holder; nothing of them is stored.
    let started = Instant::now();
    assert_owned_by(b.save_session("s1", &json!({"step": 99})).await, "node-a");
    assert!(started.elapsed() >= Duration::from_millis(100), "the write waited its lease_wait");
    assert_owned_by(b.create_checkpoint("s1", "main", &json!({"x": 1})).await, "node-a");
    assert_owned_by(b.delete_session("s1").await, "node-a");
    assert_eq!(a.load_session("s1").await.unwrap(), Some(json!({"step": 2})));
    assert_eq!(b.load_session("s1").await.unwrap(), Some(json!({"step": 2})));
    assert!(b.list_checkpoints("s1").await.unwrap().is_empty());
    // Listings show the owner and when its lease runs out.
    let listed = b.list_sessions().await.unwrap();
    let s1 = listed.iter().find(|s| s.session_id.as_str() == "s1").expect("s1 listed");
    assert_eq!(s1.owner.as_deref(), Some("node-a"));
    assert!(s1.lease_until.expect("a lease end") + 50 >= now_ms());
    assert!(!s1.interrupted);
    // The owner keeps writing past several TTLs: its lease is renewed.
    for step in 3..6 {
        tokio::time::sleep(TTL / 2).await;
        a.save_session("s1", &json!({"step": step})).await.unwrap();
    }
    assert_eq!(b.load_session("s1").await.unwrap(), Some(json!({"step": 5})));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

pub async fn shutdown_hands_a_session_over_at_once(store: Arc<dyn StorageBackend>) {
    let a = node(&store, "node-a", Duration::ZERO).await;
    a.save_session("s1", &json!({"by": "a"})).await.unwrap();
    a.shutdown().await.unwrap();
    // No wait at all: the lease was released.
    let b = node(&store, "node-b", Duration::ZERO).await;
    b.save_session("s1", &json!({"by": "b"})).await.unwrap();
    let r = b.recover_session("s1").await.unwrap();
    assert!(!r.interrupted, "a clean handover is no interruption");
    assert_eq!(r.state, Some(json!({"by": "b"})));
    b.shutdown().await.unwrap();
}

pub async fn passivation_hands_a_session_over_at_once(store: Arc<dyn StorageBackend>) {
    let a = StateManager::builder(store.clone())
        .node_id("node-a")
        .lease_ttl(Duration::from_secs(30))
        .idle_timeout(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    let b = node(&store, "node-b", Duration::ZERO).await;
    a.save_session("s1", &json!({"by": "a"})).await.unwrap();
    assert_owned_by(b.save_session("s1", &json!({"by": "b"})).await, "node-a");
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.live_session_actors().await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "the idle actor did not passivate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The 30 s lease went with the actor.
    b.save_session("s1", &json!({"by": "b"})).await.unwrap();
    assert_eq!(a.load_session("s1").await.unwrap(), Some(json!({"by": "b"})));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

pub async fn checkpoints_made_on_one_node_are_listed_and_restored_on_another(
    store: Arc<dyn StorageBackend>,
) {
    let a = node(&store, "node-a", Duration::ZERO).await;
    let b = node(&store, "node-b", Duration::ZERO).await;
    let first = a.create_checkpoint("s1", "main", &json!({"step": 1})).await.unwrap();
    let second = a.create_checkpoint("s1", "main", &json!({"step": 2})).await.unwrap();
    let listed: Vec<_> =
        b.list_checkpoints("s1").await.unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(listed, [first.clone(), second.clone()]);
    let restored = b.restore_checkpoint(&second).await.unwrap().expect("restored on node-b");
    assert_eq!(restored.data, json!({"step": 2}));
    // A rollback elsewhere is a write: it waits for the owner.
    assert_owned_by(b.rollback_to_checkpoint(&first).await, "node-a");
    a.shutdown().await.unwrap();
    // Once handed over, the new owner continues the same lineage.
    b.rollback_to_checkpoint(&first).await.unwrap();
    assert_eq!(b.load_session("s1").await.unwrap(), Some(json!({"step": 1})));
    let third = b.create_checkpoint("s1", "main", &json!({"step": 3})).await.unwrap();
    let cps = b.list_checkpoints("s1").await.unwrap();
    let ids: Vec<_> = cps.iter().map(|c| c.id.clone()).collect();
    assert_eq!(ids, [first.clone(), second, third]);
    assert_eq!(cps[2].parent.as_ref(), Some(&first), "after the rollback, the lineage forks at it");
    b.shutdown().await.unwrap();
}

/// How long node a's writes wait for a lease another node holds, in the frozen-node tests.
const A_LEASE_WAIT: Duration = Duration::from_millis(1500);

/// Which write a frozen node has in flight when another node takes over.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Late {
    Save,
    Checkpoint,
    Delete,
    /// No write in flight: the first write after the node wakes.
    AfterWake,
}

pub async fn a_frozen_node_that_wakes_is_refused_at_once_not_kept_waiting(
    store: Arc<dyn StorageBackend>,
) {
    frozen_node_is_taken_over(store, Late::AfterWake).await;
}

pub async fn a_frozen_node_is_taken_over_and_its_late_save_is_refused(
    store: Arc<dyn StorageBackend>,
) {
    frozen_node_is_taken_over(store, Late::Save).await;
}

pub async fn a_frozen_node_is_taken_over_and_its_late_checkpoint_is_refused(
    store: Arc<dyn StorageBackend>,
) {
    frozen_node_is_taken_over(store, Late::Checkpoint).await;
}

pub async fn a_frozen_node_is_taken_over_and_its_late_delete_is_refused(
    store: Arc<dyn StorageBackend>,
) {
    frozen_node_is_taken_over(store, Late::Delete).await;
}

/// Node a owns `s1` and is frozen with a write in flight; node b takes the session over once
/// a's lease ran out (recovery says the run was cut off), and writes; a is thawed: its write
/// is refused with `Fenced` and changes nothing, its actor stops, and its next write is told
/// b owns the session.
async fn frozen_node_is_taken_over(store: Arc<dyn StorageBackend>, late: Late) {
    let frozen = Freezer::new(store.clone());
    let a_store: Arc<dyn StorageBackend> = Arc::new(frozen.clone());
    let a = node(&a_store, "node-a", A_LEASE_WAIT).await;
    let b = node(&store, "node-b", TTL * 4).await;
    a.save_session("s1", &json!({"step": 1, "by": "a"})).await.unwrap();
    let first = a.create_checkpoint("s1", "main", &json!({"step": 1, "by": "a"})).await.unwrap();

    frozen.freeze();
    let a2 = a.clone();
    let write = move || async move {
        match late {
            Late::Save | Late::AfterWake => {
                a2.save_session("s1", &json!({"step": 2, "by": "a"})).await.map(|_| ())
            }
            Late::Checkpoint => {
                a2.create_checkpoint("s1", "main", &json!({"step": 2, "by": "a"})).await.map(|_| ())
            }
            Late::Delete => a2.delete_session("s1").await.map(|_| ()),
        }
    };
    let in_flight = (late != Late::AfterWake).then(|| tokio::spawn(write.clone()()));
    if let Some(in_flight) = &in_flight {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!in_flight.is_finished(), "node a's write is held while it is frozen");
    }

    // Node b: recovery takes the session once a's lease ran out, and says it was cut off.
    let started = Instant::now();
    let r = bounded("recover on node b", b.recover_session("s1")).await.unwrap();
    let took = started.elapsed();
    assert!(took >= TTL / 2, "b waited for a's lease to run out (took {took:?})");
    assert!(r.interrupted, "a's lease ran out while s1 was running: its run was cut off");
    assert_eq!(r.status, SessionStatus::Running);
    assert_eq!(r.state, Some(json!({"step": 1, "by": "a"})));
    assert_eq!(r.checkpoint.expect("a's checkpoint").id, first);
    b.save_session("s1", &json!({"step": 2, "by": "b"})).await.unwrap();
    let second = b.create_checkpoint("s1", "main", &json!({"step": 2, "by": "b"})).await.unwrap();
    let listed = b.list_sessions().await.unwrap();
    let s1 = listed.iter().find(|s| s.session_id.as_str() == "s1").expect("s1 listed");
    assert_eq!(s1.owner.as_deref(), Some("node-b"));
    assert!(!s1.interrupted, "saved since");

    // The zombie wakes: its write in flight is refused, and nothing of it is visible.
    frozen.thaw();
    let woke = Instant::now();
    let refused = match in_flight {
        Some(in_flight) => bounded("node a's late write", in_flight).await.unwrap(),
        None => bounded("node a's first write after waking", write()).await,
    };
    // Refused as soon as it is known, not after waiting out a's lease_wait for a lease it
    // has lost.
    assert!(woke.elapsed() < A_LEASE_WAIT, "the refusal took {:?}", woke.elapsed());
    match &refused {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Fenced, "{late:?} in flight: {e}"),
        Ok(()) => panic!("{late:?} by the node that lost the lease was accepted"),
    }
    for m in [&a, &b] {
        assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 2, "by": "b"})));
        let ids: Vec<_> =
            m.list_checkpoints("s1").await.unwrap().into_iter().map(|c| c.id).collect();
        assert_eq!(ids, [first.clone(), second.clone()], "{late:?}: checkpoints after the refusal");
    }
    // Its next write goes to a fresh actor, which is told b owns the session.
    assert_owned_by(a.save_session("s1", &json!({"step": 9, "by": "a"})).await, "node-b");
    assert_eq!(b.load_session("s1").await.unwrap(), Some(json!({"step": 2, "by": "b"})));
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

pub async fn janitor_passes_run_on_one_node_at_a_time(store: Arc<dyn StorageBackend>) {
    let a = node(&store, "node-a", Duration::from_millis(100)).await;
    // Another node is in the middle of a pass.
    let Acquired::Granted(turn) = store.acquire_lease("janitor", "node-x", TTL * 10).await.unwrap()
    else {
        panic!("the janitor's lease is free")
    };
    assert_owned_by(a.run_janitor_now().await, "node-x");
    store.release_lease(&turn).await.unwrap();
    a.run_janitor_now().await.unwrap();
    // And a's pass gave its turn back.
    let Acquired::Granted(_) = store.acquire_lease("janitor", "node-x", TTL).await.unwrap() else {
        panic!("node-a kept the janitor's lease after its pass")
    };
    a.shutdown().await.unwrap();
}

pub async fn an_access_claim_made_on_one_node_is_enforced_on_another(
    store: Arc<dyn StorageBackend>,
) {
    use mars_state::Principal;
    let a = access_node(&store, "node-a", TTL * 4).await;
    let b = access_node(&store, "node-b", TTL * 4).await;
    let alice = Principal::new("alice").unwrap();
    let mallory = Principal::new("mallory").unwrap();
    a.for_principal(alice.clone()).save_session("s1", &json!({"secret": 1})).await.unwrap();
    a.shutdown().await.unwrap();
    // Node b opened before the claim; it still refuses another principal.
    let as_mallory = b.for_principal(mallory);
    let denied = as_mallory.load_session("s1").await;
    assert_eq!(denied.map_err(|e| e.kind()).unwrap_err(), ErrorKind::AccessDenied);
    let denied = as_mallory.save_session("s1", &json!({"secret": 2})).await;
    assert_eq!(denied.map_err(|e| e.kind()).unwrap_err(), ErrorKind::AccessDenied);
    assert_eq!(
        b.for_principal(alice).load_session("s1").await.unwrap(),
        Some(json!({"secret": 1}))
    );
    b.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// A backend whose calls can be held, as a stopped process's would be
// ---------------------------------------------------------------------------------------

/// How long a watcher waits for an event another node made before the test fails.
pub const EVENT_WAIT: Duration = Duration::from_secs(10);

/// The next `n` events of `w`, each within [`EVENT_WAIT`]; a missed-events report or an
/// end fails the test.
pub async fn next_events(w: &mut Watch, n: usize) -> Vec<StateEvent> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(EVENT_WAIT, w.recv()).await {
            Ok(Ok(e)) => got.push(e),
            Ok(Err(e)) => panic!("after {got:?}: {e}"),
            Err(_) => panic!("after {got:?}: no event within {EVENT_WAIT:?}"),
        }
    }
    got
}

/// `w` has nothing more within `wait`.
pub async fn nothing_more(w: &mut Watch, wait: Duration) {
    if let Ok(r) = tokio::time::timeout(wait, w.recv()).await {
        panic!("expected no more events, got {r:?}");
    }
}

fn kind_name(k: &EventKind) -> &'static str {
    match k {
        EventKind::Saved => "saved",
        EventKind::Checkpointed { .. } => "checkpointed",
        EventKind::RolledBack { .. } => "rolled_back",
        EventKind::Paused { .. } => "paused",
        EventKind::Resumed => "resumed",
        EventKind::Completed => "completed",
        EventKind::Failed { .. } => "failed",
        EventKind::Deleted => "deleted",
        _ => "other",
    }
}

/// A run of every kind of change to `sid` on `m`: saves, a checkpoint, a rollback, a pause
/// and a resume, a completion, a failure, a delete.
async fn every_kind_of_change(m: &StateManager, sid: &str) {
    m.save_session(sid, &json!({"step": 1})).await.unwrap();
    let cp = m.create_checkpoint(sid, "main", &json!({"step": 1})).await.unwrap();
    m.save_session(sid, &json!({"step": 2})).await.unwrap();
    m.rollback_to_checkpoint(&cp).await.unwrap();
    m.pause_session(sid, &json!({"step": 3}), "waiting for a human").await.unwrap();
    m.resume_session(sid).await.unwrap();
    m.complete_session(sid, &json!({"step": 4})).await.unwrap();
    m.fail_session(sid, "the tool broke").await.unwrap();
    m.delete_session(sid).await.unwrap();
}

pub async fn a_watch_on_one_node_sees_writes_made_on_another(store: Arc<dyn StorageBackend>) {
    let a = node(&store, "node-a", Duration::ZERO).await;
    let b = node(&store, "node-b", Duration::from_secs(5)).await;
    let c = node(&store, "node-c", Duration::ZERO).await;
    // The writer's own watch is the reference: every other node must see the same events,
    // in the same order, with the same ids, reasons and times.
    let mut here = a.watch("s1").await.unwrap();
    let mut there = c.watch("s1").await.unwrap();
    let mut other_session = c.watch("s2").await.unwrap();
    every_kind_of_change(&a, "s1").await;
    a.save_session("s1", &json!({"step": 5})).await.unwrap();
    // The reference holds one of each kind.
    let local = next_events(&mut here, 1).await;
    let mut local = local;
    loop {
        match tokio::time::timeout(Duration::from_millis(200), here.recv()).await {
            Ok(Ok(e)) => local.push(e),
            Ok(Err(e)) => panic!("the local watch: {e}"),
            Err(_) => break,
        }
    }
    let kinds: Vec<&str> = local.iter().map(|e| kind_name(&e.kind)).collect();
    for kind in [
        "saved",
        "checkpointed",
        "rolled_back",
        "paused",
        "resumed",
        "completed",
        "failed",
        "deleted",
    ] {
        assert!(kinds.contains(&kind), "the writer's watch has no {kind} event: {kinds:?}");
    }
    assert_eq!(kinds.last(), Some(&"saved"));
    let remote = next_events(&mut there, local.len()).await;
    assert_eq!(remote, local, "another node's watch sees the writer's events, in order");
    assert!(local.iter().all(|e| e.session_id.as_str() == "s1"));
    // The session moves to another node (a clean hand-over): the watch goes on with the
    // new writer's events, after the old one's.
    a.shutdown().await.unwrap();
    b.save_session("s1", &json!({"step": 6})).await.unwrap();
    b.pause_session("s1", &json!({"step": 7}), "lunch").await.unwrap();
    let after = next_events(&mut there, 1).await;
    assert_eq!(after[0].kind, EventKind::Saved);
    let mut rest = Vec::new();
    loop {
        let e = next_events(&mut there, 1).await.remove(0);
        let paused = matches!(e.kind, EventKind::Paused { .. });
        rest.push(e);
        if paused {
            break;
        }
    }
    assert_eq!(
        rest.last().map(|e| e.kind.clone()),
        Some(EventKind::Paused { reason: "lunch".into() })
    );
    // A watch of another session saw none of it.
    nothing_more(&mut other_session, Duration::from_millis(200)).await;
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

/// A read-only manager on the shared store (a tool looking on) takes no lease and sends
/// no events, but its watches get the writing nodes' events as any node's do; its own
/// write is refused and reaches no watch.
pub async fn a_read_only_manager_s_watch_sees_the_writers_events(store: Arc<dyn StorageBackend>) {
    let a = node(&store, "node-a", Duration::ZERO).await;
    // A save made before the reader starts, seen through the store's feed by another
    // onlooker first: its event is delivered before the reader subscribes (an event goes
    // to the feed after its save is answered), so the reader's watches must not see it.
    let probe = start(node_builder(&store, "probe", Duration::ZERO).read_only(), "probe").await;
    let mut before = probe.watch_all().await.unwrap();
    a.save_session("s0", &json!({"step": 0})).await.unwrap();
    assert_eq!(next_events(&mut before, 1).await[0].session_id.as_str(), "s0");
    let reader = start(node_builder(&store, "reader", Duration::ZERO).read_only(), "reader").await;
    let mut one = reader.watch("s1").await.unwrap();
    let mut all = reader.watch_all().await.unwrap();
    let mut reference = a.watch("s1").await.unwrap();
    a.save_session("s1", &json!({"step": 1})).await.unwrap();
    let cp = a.create_checkpoint("s1", "main", &json!({"step": 1})).await.unwrap();
    a.complete_session("s1", &json!({"step": 2})).await.unwrap();
    let local = next_events(&mut reference, 4).await;
    assert!(matches!(&local[1].kind, EventKind::Checkpointed { id, .. } if *id == cp), "{local:?}");
    assert_eq!(next_events(&mut one, local.len()).await, local);
    assert_eq!(next_events(&mut all, local.len()).await, local);
    let refused = reader.save_session("s1", &json!({"step": 9})).await.unwrap_err();
    assert_eq!(refused.kind(), mars_state::ErrorKind::ReadOnly, "{refused}");
    nothing_more(&mut reference, Duration::from_millis(300)).await;
    nothing_more(&mut all, Duration::ZERO).await;
    // No lease of the reader's: the writer still owns the session.
    assert_eq!(
        a.list_sessions()
            .await
            .unwrap()
            .iter()
            .filter(|s| s.owner.as_deref() == Some("reader"))
            .count(),
        0
    );
    reader.shutdown().await.unwrap();
    probe.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// An import into a shared store takes each session's lease, as a session actor does: a
/// session another node holds stops it with `OwnedElsewhere` before anything of that
/// session is written (and the node's state stays); once the node let go, the same import
/// goes through, and the next node reads the imported state.
pub async fn an_import_waits_for_the_owner_of_a_session_it_writes(store: Arc<dyn StorageBackend>) {
    let source = StateManager::start(mars_state::MemoryStorageBackend::new()).await.unwrap();
    source.save_session("s1", &json!({"step": 100})).await.unwrap();
    source.save_session("s2", &json!({"step": 200})).await.unwrap();
    let mut dump = Vec::new();
    source.export_store(&mut dump, &mars_state::ExportOptions::new()).await.unwrap();
    source.shutdown().await.unwrap();

    let a = node(&store, "node-a", Duration::ZERO).await;
    a.save_session("s1", &json!({"step": 1})).await.unwrap();
    let importer = node(&store, "importer", Duration::ZERO).await;
    let refused = importer.import_store(dump.as_slice()).await.unwrap_err();
    match &refused {
        StateError::OwnedElsewhere { node, .. } => assert_eq!(node, "node-a"),
        other => panic!("expected OwnedElsewhere, got {other}"),
    }
    assert_eq!(a.load_session("s1").await.unwrap(), Some(json!({"step": 1})));
    a.shutdown().await.unwrap();

    let report = importer.import_store(dump.as_slice()).await.unwrap();
    assert_eq!(report.session_records, 2, "{report:?}");
    importer.shutdown().await.unwrap();
    let b = node(&store, "node-b", Duration::ZERO).await;
    assert_eq!(b.load_session("s1").await.unwrap(), Some(json!({"step": 100})));
    assert_eq!(b.load_session("s2").await.unwrap(), Some(json!({"step": 200})));
    b.shutdown().await.unwrap();
}

/// An import into a shared store whose write fails part way through a session stops with
/// that error, and lets go of the session: its lease is released at once (another node
/// that does not wait for leases takes the session right away). The sessions before it are
/// imported, and the same import run again once the fault is gone imports the rest whole.
pub async fn an_import_that_fails_part_way_lets_go_of_the_session_it_was_writing(
    store: Arc<dyn StorageBackend>,
) {
    use mars_state::testing::{Faulty, Method};
    let source = StateManager::start(mars_state::MemoryStorageBackend::new()).await.unwrap();
    for (sid, step) in [("s1", 100), ("s2", 200)] {
        source.save_session(sid, &json!({"step": step})).await.unwrap();
        source.create_checkpoint(sid, "main", &json!({"step": step + 1})).await.unwrap();
    }
    let mut dump = Vec::new();
    source.export_store(&mut dump, &mars_state::ExportOptions::new()).await.unwrap();
    source.shutdown().await.unwrap();

    // s2's checkpoint cannot be written: its session record is, then the import stops.
    let faulty = Faulty::new(store.clone()).fail(Method::Put, std::io::ErrorKind::Other, |k| {
        k.as_str().starts_with("checkpoints/s2/")
    });
    let switch = faulty.switch().clone();
    let faulty: Arc<dyn StorageBackend> = Arc::new(faulty);
    let importer = node(&faulty, "importer", Duration::ZERO).await;
    let failed = importer.import_store(dump.as_slice()).await.unwrap_err();
    assert_eq!(failed.kind(), mars_state::ErrorKind::Io, "{failed}");

    // Another node takes s2 at once: the import's lease is released, not left to run out.
    let b = node(&store, "node-b", Duration::ZERO).await;
    assert_eq!(b.load_session("s1").await.unwrap(), Some(json!({"step": 100})));
    assert_eq!(b.list_checkpoints("s1").await.unwrap().len(), 1);
    b.save_session("s2", &json!({"step": 7})).await.unwrap();
    b.shutdown().await.unwrap();

    // The fault gone, the same importer imports s2 whole.
    switch.set(false);
    let report = importer.import_store(dump.as_slice()).await.unwrap();
    assert_eq!(report.session_records, 2, "{report:?}");
    importer.shutdown().await.unwrap();
    let c = node(&store, "node-c", Duration::ZERO).await;
    assert_eq!(c.load_session("s2").await.unwrap(), Some(json!({"step": 200})));
    assert_eq!(c.list_checkpoints("s2").await.unwrap().len(), 1);
    c.shutdown().await.unwrap();
}

pub async fn a_watch_all_sees_every_nodes_events(store: Arc<dyn StorageBackend>) {
    let a = node(&store, "node-a", Duration::ZERO).await;
    let b = node(&store, "node-b", Duration::ZERO).await;
    let c = node(&store, "node-c", Duration::ZERO).await;
    let mut all = c.watch_all().await.unwrap();
    let mut a_all = a.watch_all().await.unwrap();
    // Two writers at once, on sessions of their own; the watcher writes too.
    let writes = |m: StateManager, sid: &'static str| async move {
        for step in 0..20u64 {
            m.save_session(sid, &json!({"step": step})).await.unwrap();
            if step % 5 == 4 {
                m.create_checkpoint(sid, "main", &json!({"step": step})).await.unwrap();
            }
        }
    };
    let (ra, rb) = tokio::join!(
        tokio::spawn(writes(a.clone(), "from-a")),
        tokio::spawn(writes(b.clone(), "from-b"))
    );
    ra.unwrap();
    rb.unwrap();
    c.save_session("from-c", &json!({"step": 0})).await.unwrap();
    // 20 saves and 4 checkpoints on each of a and b, one save on c.
    let got = next_events(&mut all, 49).await;
    for sid in ["from-a", "from-b"] {
        let mine: Vec<&str> = got
            .iter()
            .filter(|e| e.session_id.as_str() == sid)
            .map(|e| kind_name(&e.kind))
            .collect();
        let mut expected = Vec::new();
        for step in 0..20 {
            expected.push("saved");
            if step % 5 == 4 {
                expected.push("checkpointed");
            }
        }
        assert_eq!(mine, expected, "{sid}'s events, in order");
    }
    assert_eq!(got.iter().filter(|e| e.session_id.as_str() == "from-c").count(), 1);
    // The writers' own watch_all sees the same: its own events and the other writer's.
    let on_a = next_events(&mut a_all, 49).await;
    let key = |e: &StateEvent| (e.session_id.as_str().to_owned(), e.at, kind_name(&e.kind));
    let mut x: Vec<_> = got.iter().map(key).collect();
    let mut y: Vec<_> = on_a.iter().map(key).collect();
    x.sort();
    y.sort();
    assert_eq!(x, y, "every node's watch_all sees the same events");
    nothing_more(&mut all, Duration::from_millis(200)).await;
    for m in [a, b, c] {
        m.shutdown().await.unwrap();
    }
}

pub async fn a_principals_watch_on_another_node_is_checked_against_the_sessions_owner(
    store: Arc<dyn StorageBackend>,
) {
    use mars_state::Principal;
    let a = access_node(&store, "node-a", Duration::ZERO).await;
    let b = access_node(&store, "node-b", Duration::ZERO).await;
    let alice = Principal::new("alice").unwrap();
    let bob = Principal::new("bob").unwrap();
    // Alice's session, made on a after both watches were taken on b: b learns its owner
    // from the store when the first event arrives.
    let mut alices = b.for_principal(alice.clone()).watch("plan").await.unwrap();
    let mut bobs = b.for_principal(bob.clone()).watch("plan").await.unwrap();
    a.for_principal(alice.clone()).save_session("plan", &json!({"step": 1})).await.unwrap();
    let got = next_events(&mut alices, 1).await;
    assert_eq!(got[0].kind, EventKind::Saved);
    match tokio::time::timeout(EVENT_WAIT, bobs.recv()).await {
        Ok(Err(WatchError::AccessDenied)) => {}
        other => panic!("bob's watch of alice's session: {other:?}"),
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Forwards every call to a backend; while frozen, every call waits until thawed (a call
/// already in the backend finishes).
#[derive(Clone)]
pub struct Freezer {
    inner: Arc<dyn StorageBackend>,
    frozen: Arc<AtomicBool>,
    thawed: Arc<Notify>,
}

impl std::fmt::Debug for Freezer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Freezer").field("frozen", &self.frozen.load(Ordering::SeqCst)).finish()
    }
}

impl Freezer {
    pub fn new(inner: Arc<dyn StorageBackend>) -> Self {
        Freezer { inner, frozen: Arc::new(AtomicBool::new(false)), thawed: Arc::new(Notify::new()) }
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
        self.thawed.notify_waiters();
    }

    async fn gate(&self) {
        loop {
            let thawed = self.thawed.notified();
            if !self.frozen.load(Ordering::SeqCst) {
                return;
            }
            thawed.await;
        }
    }
}

#[async_trait]
impl StorageBackend for Freezer {
    async fn get(&self, key: &StorageKey) -> mars_state::Result<Option<Vec<u8>>> {
        self.gate().await;
        self.inner.get(key).await
    }
    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> mars_state::Result<()> {
        self.gate().await;
        self.inner.put(key, value).await
    }
    async fn put_record(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        meta: &RecordMeta,
    ) -> mars_state::Result<()> {
        self.gate().await;
        self.inner.put_record(key, value, meta).await
    }
    async fn delete(&self, key: &StorageKey) -> mars_state::Result<bool> {
        self.gate().await;
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &StorageKey) -> mars_state::Result<Vec<ObjectMeta>> {
        self.gate().await;
        self.inner.list(prefix).await
    }
    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> mars_state::Result<()> {
        self.gate().await;
        self.inner.append(key, bytes).await
    }
    async fn sweep(&self) -> mars_state::Result<SweepReport> {
        self.gate().await;
        self.inner.sweep().await
    }
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    async fn acquire_lease(
        &self,
        name: &str,
        node: &str,
        ttl: Duration,
    ) -> mars_state::Result<Acquired> {
        self.gate().await;
        self.inner.acquire_lease(name, node, ttl).await
    }
    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> mars_state::Result<Option<Lease>> {
        self.gate().await;
        self.inner.renew_lease(lease, ttl).await
    }
    async fn renew_leases(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> mars_state::Result<Vec<Option<Lease>>> {
        self.gate().await;
        self.inner.renew_leases(leases, ttl).await
    }
    async fn read_lease(&self, name: &str) -> mars_state::Result<Option<LeaseState>> {
        self.gate().await;
        self.inner.read_lease(name).await
    }
    async fn release_lease(&self, lease: &Lease) -> mars_state::Result<()> {
        self.gate().await;
        self.inner.release_lease(lease).await
    }
    async fn put_fenced(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        meta: &RecordMeta,
        fence: &Fence,
    ) -> mars_state::Result<()> {
        self.gate().await;
        self.inner.put_fenced(key, value, meta, fence).await
    }
    async fn delete_fenced(&self, key: &StorageKey, fence: &Fence) -> mars_state::Result<bool> {
        self.gate().await;
        self.inner.delete_fenced(key, fence).await
    }
    async fn publish_events(&self, payloads: Vec<Vec<u8>>) -> mars_state::Result<()> {
        self.gate().await;
        self.inner.publish_events(payloads).await
    }
    /// A frozen node subscribes again (after its feed was cut) only once thawed; a feed it
    /// has keeps delivering, as a stopped process's socket keeps receiving.
    async fn subscribe_events(&self) -> mars_state::Result<mars_state::EventFeed> {
        self.gate().await;
        self.inner.subscribe_events().await
    }
}

/// A JSON value's `step`, for messages.
pub fn step_of(v: &Value) -> u64 {
    v["step"].as_u64().unwrap_or(0)
}
