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
    Acquired, ErrorKind, Fence, Lease, LeaseState, ObjectMeta, RecordMeta, SessionStatus,
    StateError, StateManager, StorageBackend, StorageKey, SweepReport,
};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::common::bounded;

/// The lease TTL of every node here: short, so a takeover is quick.
pub const TTL: Duration = Duration::from_millis(600);

/// Expands the behaviours into one test each, in module `$name`, over stores from `$make`
/// (an async closure giving a fresh `Arc<dyn StorageBackend>` and a guard that keeps what
/// it needs alive: a schema dropped after the test, a private server).
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
                janitor_passes_run_on_one_node_at_a_time,
                an_access_claim_made_on_one_node_is_enforced_on_another,
            );
        }
    };
    (@each $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let (store, _guard) = ($make)().await;
                n::$test(store).await;
            }
        )*
    };
}
pub(crate) use node_tests;

/// A node: a manager named `node` over `store`, with the short TTL.
pub async fn node(
    store: &Arc<dyn StorageBackend>,
    node: &str,
    lease_wait: Duration,
) -> StateManager {
    StateManager::builder(store.clone())
        .node_id(node)
        .lease_ttl(TTL)
        .lease_wait(lease_wait)
        .janitor_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap_or_else(|e| panic!("start node {node}: {e}"))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
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

/// Which write a frozen node has in flight when another node takes over.
#[derive(Debug, Clone, Copy)]
enum Late {
    Save,
    Checkpoint,
    Delete,
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
    let a = node(&a_store, "node-a", Duration::from_millis(50)).await;
    let b = node(&store, "node-b", TTL * 4).await;
    a.save_session("s1", &json!({"step": 1, "by": "a"})).await.unwrap();
    let first = a.create_checkpoint("s1", "main", &json!({"step": 1, "by": "a"})).await.unwrap();

    frozen.freeze();
    let a2 = a.clone();
    let in_flight = tokio::spawn(async move {
        match late {
            Late::Save => a2.save_session("s1", &json!({"step": 2, "by": "a"})).await.map(|_| ()),
            Late::Checkpoint => {
                a2.create_checkpoint("s1", "main", &json!({"step": 2, "by": "a"})).await.map(|_| ())
            }
            Late::Delete => a2.delete_session("s1").await.map(|_| ()),
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!in_flight.is_finished(), "node a's write is held while it is frozen");

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
    let refused = bounded("node a's late write", in_flight).await.unwrap();
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
    use mars_state::{AccessControlLayer, Principal};
    let start = |name: &'static str| {
        let store = store.clone();
        async move {
            StateManager::builder(store)
                .node_id(name)
                .lease_ttl(TTL)
                .lease_wait(TTL * 4)
                .access_control(AccessControlLayer::new())
                .start()
                .await
                .unwrap()
        }
    };
    let a = start("node-a").await;
    let b = start("node-b").await;
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
}

/// A JSON value's `step`, for messages.
pub fn step_of(v: &Value) -> u64 {
    v["step"].as_u64().unwrap_or(0)
}
