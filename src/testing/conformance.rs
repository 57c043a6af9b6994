//! The [`StorageBackend`] contract, one `pub async fn` per clause. This module owns the
//! clauses, [`run_all`], [`Fixture`] and the [`conformance_tests!`](crate::conformance_tests)
//! macro; it calls only the public [`StorageBackend`] trait.
//!
//! Each function takes a fresh, empty backend and panics, naming the clause's broken
//! promise, if the backend breaks it. Run them all, one test each, with
//! [`conformance_tests!`](crate::conformance_tests), or in one go with [`run_all`].
//!
//! The lease and fence clauses (`lease_*`, `read_lease_*`, `renew_leases_*`, `*fence*`)
//! check the leases and fenced writes of a [`shared`](StorageBackend::shared) backend, and
//! pass at once on one that is not; `unshared_backend_has_no_leases_and_ignores_fences` checks the defaults of a
//! backend that is not shared, and passes at once on one that is. Lease clauses that wait
//! for an expiry sleep for real (about two seconds): a server's clock cannot be paused.
//!
//! The suite writes only record-like keys (`sessions/...`, `checkpoints/...`, any depth)
//! and appends only to `metadata/conformance.log`, so it runs unchanged over wrappers that
//! treat other `metadata/` keys specially (an `Encrypted<B>` backend appends only to
//! `metadata/*.log` and keeps `metadata/crypto.json` for itself). It lists only `sessions`
//! and `checkpoints`, never `metadata`, where a backend may keep files of its own.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use crate::backend::{Acquired, Fence, Lease, RecordMeta, StorageBackend, StorageKey, SweepReport};
use crate::error::{ErrorKind, Result, StateError};

/// What a constructor given to [`conformance_tests!`](crate::conformance_tests) or
/// [`run_all`] returns: a backend, or a pair of a backend and a guard that must outlive it
/// (a temporary directory, a server). The pair is dropped backend first.
pub trait Fixture: Send {
    /// The backend under test.
    fn backend(&self) -> &dyn StorageBackend;
}

impl<B: StorageBackend> Fixture for B {
    fn backend(&self) -> &dyn StorageBackend {
        self
    }
}

impl<B: StorageBackend, G: Send> Fixture for (B, G) {
    fn backend(&self) -> &dyn StorageBackend {
        &self.0
    }
}

/// The log the suite appends to (a key every backend and wrapper must accept for appends).
pub const LOG_KEY: &str = "metadata/conformance.log";

/// The names of every clause, in the order [`run_all`] runs them (each is a function of
/// this module, and a test [`conformance_tests!`](crate::conformance_tests) writes).
pub const CLAUSES: &[&str] = &crate::conformance_tests!(@clauses [names]);

/// A key the suite knows to be valid.
fn key(k: &str) -> StorageKey {
    StorageKey::from_valid(k.to_owned())
}

/// The value of `r`, or a panic naming what failed: the suite's assertions panic.
#[track_caller]
fn ok<T>(what: impl Display, r: Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

async fn get(b: &dyn StorageBackend, k: &str) -> Option<Vec<u8>> {
    let r = b.get(&key(k)).await;
    ok(format_args!("get {k}"), r)
}

async fn put(b: &dyn StorageBackend, k: &str, value: impl Into<Vec<u8>>) {
    let r = b.put(&key(k), value.into()).await;
    ok(format_args!("put {k}"), r)
}

async fn delete(b: &dyn StorageBackend, k: &str) -> bool {
    let r = b.delete(&key(k)).await;
    ok(format_args!("delete {k}"), r)
}

/// The keys under `prefix` and their sizes, sorted.
async fn list(b: &dyn StorageBackend, prefix: &str) -> Vec<(String, u64)> {
    let r = b.list(&key(prefix)).await;
    let metas = ok(format_args!("list {prefix}"), r);
    let mut listed: Vec<(String, u64)> =
        metas.into_iter().map(|m| (m.key.to_string(), m.size)).collect();
    listed.sort();
    listed
}

/// The keys under `prefix`, sorted.
async fn list_keys(b: &dyn StorageBackend, prefix: &str) -> Vec<String> {
    list(b, prefix).await.into_iter().map(|(k, _)| k).collect()
}

type Task<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Runs `tasks` concurrently on the current task until all are done (a backend that does
/// its I/O on other threads, as the file backend does, runs them in parallel).
async fn join_all(mut tasks: Vec<Task<'_>>) {
    std::future::poll_fn(|cx| {
        tasks.retain_mut(|t| t.as_mut().poll(cx).is_pending());
        if tasks.is_empty() { Poll::Ready(()) } else { Poll::Pending }
    })
    .await
}

/// Absence is `Ok(None)`, never an error, also under prefixes that do not exist.
pub async fn get_missing_is_none(b: &dyn StorageBackend) {
    assert_eq!(get(b, "sessions/nobody.json").await, None);
    assert_eq!(get(b, "no/such/dir/at/all").await, None);
}

/// A put is read back as written; a put replaces; an empty value is present, not absent.
pub async fn put_then_get_round_trips(b: &dyn StorageBackend) {
    let k = "sessions/s1.json";
    put(b, k, b"first".to_vec()).await;
    assert_eq!(get(b, k).await.as_deref(), Some(&b"first"[..]));
    put(b, k, b"second, longer".to_vec()).await;
    assert_eq!(get(b, k).await.as_deref(), Some(&b"second, longer"[..]), "put replaces");
    put(b, k, Vec::new()).await;
    assert_eq!(get(b, k).await, Some(Vec::new()), "an empty value is present, not absent");
}

/// A put replaces the whole value: a shorter value leaves no tail of the longer one.
pub async fn put_replaces_a_longer_value(b: &dyn StorageBackend) {
    let k = "checkpoints/s1/c1.json";
    put(b, k, vec![b'x'; 10_000]).await;
    put(b, k, b"short".to_vec()).await;
    assert_eq!(get(b, k).await.as_deref(), Some(&b"short"[..]), "a tail of the old value remains");
}

/// `put_record` keeps `put`'s contract: the value is read back as written, replaces, is
/// listed with its size, and a plain `put` replaces it in turn.
pub async fn put_record_is_a_put(b: &dyn StorageBackend) {
    let k = "checkpoints/s1/c2.json";
    let mut meta = RecordMeta {
        session: "s1".into(),
        checkpoint: Some("c2".into()),
        step: Some(3),
        saved_at_ms: 1_700_000_000_000,
        ..RecordMeta::default()
    };
    let r = b.put_record(&key(k), b"first record".to_vec(), &meta).await;
    ok(format_args!("put_record {k}"), r);
    assert_eq!(get(b, k).await.as_deref(), Some(&b"first record"[..]));
    meta.step = Some(4);
    let r = b.put_record(&key(k), b"second".to_vec(), &meta).await;
    ok(format_args!("put_record {k}"), r);
    assert_eq!(get(b, k).await.as_deref(), Some(&b"second"[..]), "put_record replaces");
    assert_eq!(list(b, "checkpoints/s1").await, vec![(k.to_owned(), 6)]);
    put(b, k, b"by put".to_vec()).await;
    assert_eq!(get(b, k).await.as_deref(), Some(&b"by put"[..]), "put replaces it");
}

/// Values are opaque bytes: every byte value, and a value of over a mebibyte, round-trip.
pub async fn values_are_opaque_bytes(b: &dyn StorageBackend) {
    let every_byte: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    put(b, "sessions/bytes.json", every_byte.clone()).await;
    assert!(get(b, "sessions/bytes.json").await == Some(every_byte), "a binary value changed");
    let large: Vec<u8> = (0..(1 << 20) + 7u32).map(|i| (i % 251) as u8).collect();
    put(b, "sessions/large.json", large.clone()).await;
    assert!(
        get(b, "sessions/large.json").await == Some(large),
        "a value of 1 MiB + 7 bytes changed"
    );
}

/// Keys of any depth are stored, read, listed and deleted like any other.
pub async fn keys_at_any_depth_round_trip(b: &dyn StorageBackend) {
    let k = "checkpoints/s1/branch/deeper/still/c.json";
    put(b, k, b"deep".to_vec()).await;
    assert_eq!(get(b, k).await.as_deref(), Some(&b"deep"[..]));
    assert_eq!(list(b, "checkpoints/s1/branch").await, [(k.to_owned(), 4)]);
    assert!(delete(b, k).await);
    assert_eq!(get(b, k).await, None);
}

/// Deleting a missing key succeeds and reports that it did not exist.
pub async fn delete_missing_is_false(b: &dyn StorageBackend) {
    assert!(!delete(b, "sessions/nobody.json").await);
    assert!(!delete(b, "no/such/dir/at/all").await);
}

/// Deleting an existing key reports that it existed and removes it; a second delete finds
/// nothing.
pub async fn delete_existing_is_true_and_removes(b: &dyn StorageBackend) {
    let k = "checkpoints/s1/c1.json";
    put(b, k, b"x".to_vec()).await;
    assert!(delete(b, k).await);
    assert_eq!(get(b, k).await, None);
    assert!(!delete(b, k).await);
}

/// A delete removes its key and nothing else, not keys that share its text.
pub async fn delete_removes_only_its_key(b: &dyn StorageBackend) {
    let keys =
        ["sessions/a.json", "sessions/a.json.gz", "sessions/ab.json", "checkpoints/a/c.json"];
    for k in keys {
        put(b, k, k.as_bytes().to_vec()).await;
    }
    assert!(delete(b, "sessions/a.json").await);
    assert_eq!(get(b, "sessions/a.json").await, None);
    for k in &keys[1..] {
        assert_eq!(
            get(b, k).await.as_deref(),
            Some(k.as_bytes()),
            "deleting sessions/a.json touched {k}"
        );
    }
}

/// A prefix under which nothing was ever stored lists nothing (not an error).
pub async fn list_missing_prefix_is_empty(b: &dyn StorageBackend) {
    assert!(list(b, "nothing_here").await.is_empty());
    assert!(list(b, "checkpoints/nobody").await.is_empty());
}

/// A list returns every key under the prefix, at any depth, with the size of its value.
pub async fn list_returns_keys_under_prefix_with_sizes(b: &dyn StorageBackend) {
    put(b, "checkpoints/s1/a.json", vec![0; 3]).await;
    put(b, "checkpoints/s1/b.json", vec![0; 5]).await;
    put(b, "checkpoints/s10/c.json", vec![0; 7]).await;
    put(b, "checkpoints/s1x", vec![0; 1]).await;
    put(b, "sessions/s1.json", vec![0; 9]).await;

    let s1 = list(b, "checkpoints/s1").await;
    assert_eq!(
        s1,
        [("checkpoints/s1/a.json".to_owned(), 3), ("checkpoints/s1/b.json".to_owned(), 5)]
    );

    // At any depth, and only under the prefix (not siblings sharing its text).
    let all = list_keys(b, "checkpoints").await;
    assert_eq!(
        all,
        [
            "checkpoints/s1/a.json",
            "checkpoints/s1/b.json",
            "checkpoints/s10/c.json",
            "checkpoints/s1x"
        ]
    );
}

/// A prefix is a whole segment: `a/b` is not under `a/bc`, nor `a/bc` under `a/b`.
pub async fn list_respects_prefix_boundaries(b: &dyn StorageBackend) {
    put(b, "checkpoints/ab/x.json", b"1".to_vec()).await;
    put(b, "checkpoints/abc/y.json", b"22".to_vec()).await;
    put(b, "checkpoints/ab-z.json", b"333".to_vec()).await;
    assert_eq!(list_keys(b, "checkpoints/ab").await, ["checkpoints/ab/x.json"]);
    assert_eq!(list_keys(b, "checkpoints/abc").await, ["checkpoints/abc/y.json"]);
    assert!(
        list(b, "checkpoints/a").await.is_empty(),
        "checkpoints/a is the start of other names only"
    );
}

/// A list shows the current state: the new size after a replace, no deleted keys, and
/// nothing once every key under the prefix is deleted.
pub async fn list_reflects_replaces_and_deletes(b: &dyn StorageBackend) {
    put(b, "checkpoints/s1/a.json", vec![0; 3]).await;
    put(b, "checkpoints/s1/b.json", vec![0; 5]).await;
    put(b, "checkpoints/s1/a.json", vec![0; 11]).await;
    assert_eq!(
        list(b, "checkpoints/s1").await,
        [("checkpoints/s1/a.json".to_owned(), 11), ("checkpoints/s1/b.json".to_owned(), 5)]
    );
    assert!(delete(b, "checkpoints/s1/b.json").await);
    assert_eq!(list(b, "checkpoints/s1").await, [("checkpoints/s1/a.json".to_owned(), 11)]);
    assert!(delete(b, "checkpoints/s1/a.json").await);
    assert!(list(b, "checkpoints/s1").await.is_empty(), "deleted keys are still listed");
    assert!(list(b, "checkpoints").await.is_empty(), "deleted keys are still listed");
}

/// An append to a missing log creates it; later appends extend it, in order.
pub async fn append_creates_then_extends(b: &dyn StorageBackend) {
    let k = key(LOG_KEY);
    ok("append", b.append(&k, b"one\n".to_vec()).await);
    ok("append", b.append(&k, b"two\n".to_vec()).await);
    assert_eq!(get(b, LOG_KEY).await.as_deref(), Some(&b"one\ntwo\n"[..]));
}

/// An append after a put extends the value the put wrote (a log rewritten, then appended).
pub async fn append_after_put_extends(b: &dyn StorageBackend) {
    let k = key(LOG_KEY);
    ok("append", b.append(&k, b"old\n".to_vec()).await);
    put(b, LOG_KEY, b"compacted\n".to_vec()).await;
    ok("append", b.append(&k, b"next\n".to_vec()).await);
    assert_eq!(get(b, LOG_KEY).await.as_deref(), Some(&b"compacted\nnext\n"[..]));
}

/// A sweep of a backend with no interrupted writes removes nothing and reports nothing.
pub async fn sweep_on_clean_store_removes_nothing(b: &dyn StorageBackend) {
    put(b, "sessions/s1.json", b"keep".to_vec()).await;
    let report = ok("sweep", b.sweep().await);
    assert_eq!(report, SweepReport::default());
    assert_eq!(get(b, "sessions/s1.json").await.as_deref(), Some(&b"keep"[..]));
}

/// Puts to different keys issued at once all land, each with its own value.
pub async fn concurrent_puts_to_different_keys_all_land(b: &dyn StorageBackend) {
    const N: usize = 32;
    let tasks: Vec<Task<'_>> = (0..N)
        .map(|i| -> Task<'_> {
            Box::pin(async move {
                let k = if i % 2 == 0 {
                    format!("sessions/s{i}.json")
                } else {
                    format!("checkpoints/s{i}/c.json")
                };
                put(b, &k, vec![i as u8; i + 1]).await;
            })
        })
        .collect();
    join_all(tasks).await;
    for i in 0..N {
        let k = if i % 2 == 0 {
            format!("sessions/s{i}.json")
        } else {
            format!("checkpoints/s{i}/c.json")
        };
        assert_eq!(
            get(b, &k).await,
            Some(vec![i as u8; i + 1]),
            "concurrent put of {k} was lost or mixed"
        );
    }
    assert_eq!(list(b, "sessions").await.len(), N / 2);
    assert_eq!(list(b, "checkpoints").await.len(), N / 2);
}

/// A put is atomic: a read during it sees the whole old value or the whole new one.
pub async fn readers_see_the_old_or_the_new_value(b: &dyn StorageBackend) {
    let k = "sessions/atomic.json";
    let old = vec![b'o'; 64 << 10];
    let new = vec![b'n'; 96 << 10];
    put(b, k, old.clone()).await;
    let done = AtomicBool::new(false);
    let (old, new, done) = (&old, &new, &done);
    let writer: Task<'_> = Box::pin(async move {
        for i in 0..20 {
            put(b, k, if i % 2 == 0 { new.clone() } else { old.clone() }).await;
            tokio::task::yield_now().await;
        }
        done.store(true, Ordering::SeqCst);
    });
    let reader: Task<'_> = Box::pin(async move {
        let mut reads = 0;
        while reads < 10 || !done.load(Ordering::SeqCst) {
            let seen = get(b, k).await;
            assert!(
                seen.as_ref() == Some(old) || seen.as_ref() == Some(new),
                "a read during a put saw neither the old nor the new value ({:?} bytes)",
                seen.map(|v| v.len())
            );
            reads += 1;
            tokio::task::yield_now().await;
        }
    });
    join_all(vec![writer, reader]).await;
}

/// A lease TTL no clause waits out.
const LONG: Duration = Duration::from_secs(60);

async fn acquire(b: &dyn StorageBackend, name: &str, node: &str, ttl: Duration) -> Acquired {
    let r = b.acquire_lease(name, node, ttl).await;
    ok(format_args!("acquire_lease {name} for {node}"), r)
}

/// The lease granted to `node`, or a panic saying who holds it.
#[track_caller]
fn granted(what: &str, answer: Acquired) -> Lease {
    match answer {
        Acquired::Granted(lease) => lease,
        Acquired::Held { node, expires_in } => {
            panic!(
                "{what}: expected the lease to be granted, but {node} holds it for {expires_in:?}"
            )
        }
    }
}

/// The holder of a lease that is not granted, or a panic.
#[track_caller]
fn held(what: &str, answer: Acquired) -> (String, Duration) {
    match answer {
        Acquired::Held { node, expires_in } => (node, expires_in),
        Acquired::Granted(lease) => {
            panic!("{what}: expected Held, but the lease was granted with token {}", lease.token)
        }
    }
}

/// Checks that `r` is a [`StateError::Fenced`] for `fence` with `current`.
#[track_caller]
fn assert_fenced<T: std::fmt::Debug>(what: &str, r: Result<T>, fence: &Fence, current: u64) {
    match r {
        Err(StateError::Fenced { name, token, current: got }) => {
            assert_eq!(
                (name.as_str(), token, got),
                (fence.name.as_str(), fence.token, current),
                "{what}: Fenced names the wrong lease or tokens"
            );
        }
        Err(e) => panic!("{what}: expected Fenced, got {:?}: {e}", e.kind()),
        Ok(v) => panic!("{what}: a write under a stale fence was accepted (returned {v:?})"),
    }
}

/// `put_fenced` of a session record (`sessions/<s>.json`) or a checkpoint
/// (`checkpoints/<s>/<c>.json`), with the facts its key names.
async fn put_fenced(b: &dyn StorageBackend, k: &str, value: &[u8], fence: &Fence) -> Result<()> {
    let mut parts = k.trim_end_matches(".json").split('/').skip(1);
    let meta = RecordMeta {
        session: parts.next().unwrap_or_default().into(),
        checkpoint: parts.next().map(Into::into),
        step: Some(1),
        saved_at_ms: 1_700_000_000_000,
        ..RecordMeta::default()
    };
    b.put_fenced(&key(k), value.to_vec(), &meta, fence).await
}

async fn delete_fenced(b: &dyn StorageBackend, k: &str, fence: &Fence) -> Result<bool> {
    b.delete_fenced(&key(k), fence).await
}

/// One node holds a lease at a time: the first asker is granted token 1 or more, another
/// node is told who holds it and for at most the TTL; the holder asking again is granted
/// the same token (its expiry extended); other names are independent.
pub async fn lease_has_one_holder_at_a_time(b: &dyn StorageBackend) {
    if !b.shared() {
        return;
    }
    let a = granted("first acquire", acquire(b, "s1", "node-a", LONG).await);
    assert_eq!((a.name.as_str(), a.node.as_str()), ("s1", "node-a"));
    assert!(a.token >= 1, "the first token is {}, not at least 1", a.token);
    assert!(a.expires_in <= LONG && a.expires_in > LONG / 2, "expires_in {:?}", a.expires_in);
    let (node, left) = held("another node", acquire(b, "s1", "node-b", LONG).await);
    assert_eq!(node, "node-a", "Held names the wrong holder");
    assert!(left <= LONG && left > Duration::ZERO, "Held reports {left:?} left of {LONG:?}");
    let again = granted("the holder again", acquire(b, "s1", "node-a", LONG).await);
    assert_eq!(again.token, a.token, "the holder re-acquiring changed the token");
    held("another node after the re-acquire", acquire(b, "s1", "node-b", LONG).await);
    let other = granted("another name", acquire(b, "s2", "node-b", LONG).await);
    assert_eq!(other.node, "node-b");
}

/// When the holder's lease expires (by the server's clock) another node is granted it with
/// the next token; until then it is told `Held`. A renewal sets the expiry from now.
pub async fn lease_expires_then_another_node_gets_the_next_token(b: &dyn StorageBackend) {
    if !b.shared() {
        return;
    }
    let a = granted("first acquire", acquire(b, "s1", "node-a", LONG).await);
    held("before expiry", acquire(b, "s1", "node-b", LONG).await);
    let short = Duration::from_millis(1500);
    let renewed = ok("renew_lease", b.renew_lease(&a, short).await);
    let renewed = renewed.unwrap_or_else(|| panic!("the holder's renewal was refused"));
    assert_eq!(renewed.token, a.token, "a renewal changed the token");
    assert!(renewed.expires_in <= short, "renewed for {:?}, asked {short:?}", renewed.expires_in);
    let (_, left) = held("after a short renewal", acquire(b, "s1", "node-b", LONG).await);
    assert!(left <= short, "Held reports {left:?} left after a renewal to {short:?}");
    let deadline = tokio::time::Instant::now() + short + Duration::from_secs(10);
    let bee = loop {
        match acquire(b, "s1", "node-b", LONG).await {
            Acquired::Granted(lease) => break lease,
            Acquired::Held { .. } if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Acquired::Held { node, expires_in } => {
                panic!("{node}'s lease did not expire: {expires_in:?} left after {short:?}")
            }
        }
    };
    assert_eq!(bee.token, a.token + 1, "the next holder's token");
    held("the old holder", acquire(b, "s1", "node-a", LONG).await);
}

/// A release expires the lease at once: another node is granted it with the next token
/// without waiting; the token is kept through the release, never reset.
pub async fn lease_release_lets_another_node_take_it_at_once(b: &dyn StorageBackend) {
    if !b.shared() {
        return;
    }
    let a = granted("first acquire", acquire(b, "s1", "node-a", LONG).await);
    ok("release_lease", b.release_lease(&a).await);
    let bee = granted("after the release", acquire(b, "s1", "node-b", LONG).await);
    assert_eq!(bee.token, a.token + 1, "the token after a release");
    ok("release_lease", b.release_lease(&bee).await);
    let a2 = granted("the first node again", acquire(b, "s1", "node-a", LONG).await);
    assert_eq!(a2.token, bee.token + 1, "a grant after a release must raise the token");
}

/// A lease another node was granted since cannot be renewed (`None`) or released by its
/// old holder; its release changes nothing.
pub async fn lease_renew_by_a_stale_lease_is_none(b: &dyn StorageBackend) {
    if !b.shared() {
        return;
    }
    let a = granted("first acquire", acquire(b, "s1", "node-a", LONG).await);
    ok("release_lease", b.release_lease(&a).await);
    let bee = granted("after the release", acquire(b, "s1", "node-b", LONG).await);
    let stale = ok("renew_lease", b.renew_lease(&a, LONG).await);
    assert_eq!(stale, None, "a stale lease was renewed");
    ok("release_lease (stale)", b.release_lease(&a).await);
    let (node, _) = held("after a stale release", acquire(b, "s1", "node-c", LONG).await);
    assert_eq!(node, "node-b", "a stale release freed the new holder's lease");
    let renewed = ok("renew_lease", b.renew_lease(&bee, LONG).await);
    assert_eq!(renewed.map(|l| l.token), Some(bee.token), "the holder's renewal");
}

/// The longest a clause waits for a lease of [`SHORT`] to expire (by the server's clock).
const EXPIRY_WAIT: Duration = Duration::from_secs(10);

/// A lease TTL clauses wait out.
const SHORT: Duration = Duration::from_millis(1500);

/// Asks for lease `name` for `node` until it is granted (its holder's lease expired), or
/// panics after [`SHORT`] and [`EXPIRY_WAIT`].
async fn acquire_once_expired(b: &dyn StorageBackend, name: &str, node: &str) -> Lease {
    let deadline = tokio::time::Instant::now() + SHORT + EXPIRY_WAIT;
    loop {
        match acquire(b, name, node, LONG).await {
            Acquired::Granted(lease) => return lease,
            Acquired::Held { .. } if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Acquired::Held { node, expires_in } => {
                panic!("{node}'s lease {name} did not expire: {expires_in:?} left after {SHORT:?}")
            }
        }
    }
}

/// A grant names in `taken_from` the node it takes the lease over from when that node let
/// it expire without releasing it, and only then: a first grant, a grant after a release
/// (also a release made after the expiry), a grant to the node that held it, the holder
/// asking again, and renewals all say `None`.
pub async fn lease_taken_from_names_an_expired_holder_not_a_released_one(b: &dyn StorageBackend) {
    if !b.shared() {
        return;
    }
    // Granted in this order with one TTL: once `s1` is free, by the server's clock, so are
    // `s2` and `s3`, granted before it.
    let own = granted("first acquire of s2", acquire(b, "s2", "node-a", SHORT).await);
    let late = granted("first acquire of s3", acquire(b, "s3", "node-a", SHORT).await);
    let a = granted("first acquire of s1", acquire(b, "s1", "node-a", SHORT).await);
    for first in [&own, &late, &a] {
        assert_eq!(first.taken_from, None, "a first grant of {} names a holder", first.name);
    }
    let again = granted("the holder again", acquire(b, "s1", "node-a", SHORT).await);
    assert_eq!(again.taken_from, None, "the live holder asking again names a holder");
    let renewed = ok("renew_lease", b.renew_lease(&a, SHORT).await);
    let renewed = renewed.unwrap_or_else(|| panic!("the holder's renewal was refused"));
    assert_eq!(renewed.taken_from, None, "a renewal names a holder");

    let c = acquire_once_expired(b, "s1", "node-c").await;
    assert_eq!(c.token, a.token + 1, "the token after an expiry");
    assert_eq!(
        c.taken_from.as_deref(),
        Some("node-a"),
        "a grant over an expired, unreleased lease must name its old holder"
    );
    let renewed = ok("renew_lease", b.renew_lease(&c, LONG).await);
    let renewed = renewed.unwrap_or_else(|| panic!("the new holder's renewal was refused"));
    assert_eq!(renewed.taken_from, None, "a renewal after a takeover names a holder");
    let renewed = ok("renew_leases", b.renew_leases(std::slice::from_ref(&c), LONG).await);
    assert_eq!(renewed.len(), 1, "renew_leases of one lease");
    assert_eq!(
        renewed[0].as_ref().map(|l| &l.taken_from),
        Some(&None),
        "renew_leases after a takeover names a holder"
    );
    let again = granted("the new holder again", acquire(b, "s1", "node-c", LONG).await);
    assert_eq!(again.taken_from, None, "the live holder asking again names a holder");

    // The node that let its own lease expire takes it again: the next token, no takeover.
    let own2 = granted("s2 by its own holder", acquire(b, "s2", "node-a", LONG).await);
    assert_eq!(own2.token, own.token + 1, "a grant after an expiry must raise the token");
    assert_eq!(own2.taken_from, None, "a grant to the node that held it names a holder");

    // Released after it expired, before anyone took it: still a clean handover.
    ok("release_lease (expired)", b.release_lease(&late).await);
    let bee = granted("s3 after a late release", acquire(b, "s3", "node-b", LONG).await);
    assert_eq!(bee.token, late.token + 1, "the token after a release");
    assert_eq!(
        bee.taken_from, None,
        "a grant after a release made after the expiry names a holder"
    );

    // Released while live: no takeover either.
    ok("release_lease", b.release_lease(&bee).await);
    let cee = granted("s3 after a release", acquire(b, "s3", "node-c", LONG).await);
    assert_eq!(cee.taken_from, None, "a grant after a release names a holder");
}

/// `read_lease` reports a lease without taking it: `None` if never granted; else its holder
/// (or last holder), its token, the time left while it is live (`None` once it expired or
/// was released), and whether it was released. A grant or a renewal clears `released`.
pub async fn read_lease_reports_holder_token_expiry_and_release(b: &dyn StorageBackend) {
    if !b.shared() {
        return;
    }
    assert_eq!(ok("read_lease s1", b.read_lease("s1").await), None, "a lease never granted");
    // Granted first so it expires while the rest runs.
    let short = granted("acquire s2", acquire(b, "s2", "node-a", SHORT).await);
    let a = granted("acquire s1", acquire(b, "s1", "node-a", LONG).await);
    let read = |name: &'static str| async move {
        let r = b.read_lease(name).await;
        let state = ok(format_args!("read_lease {name}"), r);
        state.unwrap_or_else(|| panic!("read_lease {name}: a granted lease reads as None"))
    };
    let state = read("s1").await;
    assert_eq!((state.node.as_str(), state.token), ("node-a", a.token), "holder and token");
    let left = state.expires_in.unwrap_or_else(|| panic!("a live lease reads as expired"));
    assert!(left <= LONG && left > LONG / 2, "a live lease reports {left:?} left of {LONG:?}");
    assert!(!state.released, "a live lease reads as released");
    // Reading takes nothing.
    held("after a read", acquire(b, "s1", "node-b", LONG).await);

    ok("release_lease", b.release_lease(&a).await);
    let state = read("s1").await;
    assert_eq!((state.node.as_str(), state.token), ("node-a", a.token), "after a release");
    assert_eq!(state.expires_in, None, "a released lease reports time left");
    assert!(state.released, "a released lease reads as not released");

    // Renewed after its release (nobody took it): live again, no longer released.
    let renewed = ok("renew_lease", b.renew_lease(&a, LONG).await);
    assert!(renewed.is_some(), "a released lease nobody took could not be renewed");
    let state = read("s1").await;
    assert!(state.expires_in.is_some() && !state.released, "after a renewal: {state:?}");
    ok("release_lease", b.release_lease(&a).await);
    let bee = granted("after the release", acquire(b, "s1", "node-b", LONG).await);
    let state = read("s1").await;
    assert_eq!((state.node.as_str(), state.token), ("node-b", bee.token), "the new holder");
    assert!(state.expires_in.is_some() && !state.released, "after a grant: {state:?}");

    // Expired without a release: the last holder, no time left, not released.
    let deadline = tokio::time::Instant::now() + SHORT + EXPIRY_WAIT;
    let state = loop {
        let state = read("s2").await;
        if state.expires_in.is_none() {
            break state;
        }
        assert!(tokio::time::Instant::now() < deadline, "s2 did not expire: {state:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((state.node.as_str(), state.token), ("node-a", short.token), "after an expiry");
    assert!(!state.released, "a lease that expired reads as released");
    assert_eq!(ok("read_lease s3", b.read_lease("s3").await), None, "another name");
}

/// `renew_leases` renews many leases in one call, answering in their order as `renew_lease`
/// would: the new expiry for each lease still its node's at its token, `None` for a stale
/// one (another node took it since; also when the current holder's lease of the same name
/// is in the same call) or one never granted; a stale entry changes nothing.
pub async fn renew_leases_renews_many_and_refuses_stale_ones(b: &dyn StorageBackend) {
    if !b.shared() {
        return;
    }
    let none = ok("renew_leases of none", b.renew_leases(&[], LONG).await);
    assert!(none.is_empty(), "renew_leases of no lease answered {none:?}");
    let a1 = granted("acquire s1", acquire(b, "s1", "node-a", LONG).await);
    let a2 = granted("acquire s2", acquire(b, "s2", "node-a", LONG).await);
    let a3 = granted("acquire s3", acquire(b, "s3", "node-a", LONG).await);
    ok("release_lease", b.release_lease(&a2).await);
    let b2 = granted("takeover of s2", acquire(b, "s2", "node-b", LONG).await);
    let never = Lease {
        name: "never-granted".into(),
        node: "node-a".into(),
        token: 1,
        expires_in: LONG,
        taken_from: None,
    };
    let asked = [a3.clone(), a2.clone(), never, a1.clone(), b2.clone()];
    let ttl = Duration::from_secs(20);
    let answers = ok("renew_leases", b.renew_leases(&asked, ttl).await);
    assert_eq!(answers.len(), asked.len(), "one answer per lease");
    let summary: Vec<Option<(&str, &str, u64)>> = answers
        .iter()
        .map(|a| a.as_ref().map(|l| (l.name.as_str(), l.node.as_str(), l.token)))
        .collect();
    assert_eq!(
        summary,
        [
            Some(("s3", "node-a", a3.token)),
            None,
            None,
            Some(("s1", "node-a", a1.token)),
            Some(("s2", "node-b", b2.token)),
        ],
        "renew_leases answered out of order, renewed a stale lease, or refused a current one"
    );
    for lease in answers.iter().flatten() {
        assert!(
            lease.expires_in <= ttl,
            "{} renewed for {:?}, asked {ttl:?}",
            lease.name,
            lease.expires_in
        );
        assert!(
            lease.expires_in > ttl / 2,
            "{} renewed for {:?} only",
            lease.name,
            lease.expires_in
        );
        assert_eq!(lease.taken_from, None, "a renewal names a holder");
    }
    // The renewals took effect (shorter than the grants' TTL); the stale one changed nothing.
    for (name, holder) in [("s1", "node-a"), ("s2", "node-b"), ("s3", "node-a")] {
        let (node, left) = held("after renew_leases", acquire(b, name, "node-c", LONG).await);
        assert_eq!(node, holder, "the holder of {name} after renew_leases");
        assert!(left <= ttl, "{name} has {left:?} left after a renewal to {ttl:?}");
    }
    let renewed = ok("renew_lease", b.renew_lease(&a2, LONG).await);
    assert_eq!(renewed, None, "the stale lease became renewable");
}

/// A stale fence's save (a put of an existing session record), checkpoint (a put of a new
/// key) and delete are each refused with `Fenced` naming the current token, and change
/// nothing: values, absences and listings are as before. Writes under the current fence
/// succeed; a fence of a lease never granted, or of a token not yet granted, is refused.
pub async fn stale_fence_save_checkpoint_and_delete_are_refused(b: &dyn StorageBackend) {
    if !b.shared() {
        return;
    }
    let (save, cp1, cp2) = ("sessions/s1.json", "checkpoints/s1/c1.json", "checkpoints/s1/c2.json");
    let a = granted("first acquire", acquire(b, "s1", "node-a", LONG).await);
    let fa = a.fence();
    let r = put_fenced(b, save, b"saved by a", &fa).await;
    ok("put_fenced (current fence)", r);
    let r = put_fenced(b, cp1, b"checkpoint by a", &fa).await;
    ok("put_fenced (current fence)", r);
    ok("release_lease", b.release_lease(&a).await);
    let bee = granted("takeover", acquire(b, "s1", "node-b", LONG).await);
    let before_sessions = list(b, "sessions").await;
    let before_checkpoints = list(b, "checkpoints").await;

    let r = put_fenced(b, save, b"late save", &fa).await;
    assert_fenced("a stale save", r, &fa, bee.token);
    let r = put_fenced(b, cp2, b"late checkpoint", &fa).await;
    assert_fenced("a stale checkpoint", r, &fa, bee.token);
    let r = delete_fenced(b, cp1, &fa).await;
    assert_fenced("a stale delete", r, &fa, bee.token);
    let r = delete_fenced(b, save, &fa).await;
    assert_fenced("a stale delete", r, &fa, bee.token);
    assert_eq!(
        get(b, save).await.as_deref(),
        Some(&b"saved by a"[..]),
        "a refused save changed it"
    );
    assert_eq!(get(b, cp2).await, None, "a refused checkpoint was stored");
    assert_eq!(get(b, cp1).await.as_deref(), Some(&b"checkpoint by a"[..]), "a refused delete");
    assert_eq!(list(b, "sessions").await, before_sessions, "refused writes changed a listing");
    assert_eq!(
        list(b, "checkpoints").await,
        before_checkpoints,
        "refused writes changed a listing"
    );

    let future = Fence::new("s1", bee.token + 1);
    let r = put_fenced(b, save, b"from the future", &future).await;
    assert_fenced("a token not yet granted", r, &future, bee.token);
    let never = Fence::new("never-granted", 1);
    let r = put_fenced(b, cp2, b"no lease", &never).await;
    assert_fenced("a lease never granted", r, &never, 0);
    assert_eq!(get(b, cp2).await, None, "a refused checkpoint was stored");

    let fb = bee.fence();
    let r = put_fenced(b, save, b"saved by b", &fb).await;
    ok("put_fenced (current fence)", r);
    let r = put_fenced(b, cp2, b"checkpoint by b", &fb).await;
    ok("put_fenced (current fence)", r);
    assert!(ok("delete_fenced", delete_fenced(b, cp1, &fb).await), "cp1 existed");
    assert!(!ok("delete_fenced", delete_fenced(b, cp1, &fb).await), "cp1 is gone");
    assert_eq!(get(b, save).await.as_deref(), Some(&b"saved by b"[..]));
    assert_eq!(list_keys(b, "checkpoints/s1").await, [cp2]);
}

/// Fences are per lease: a takeover of one lease refuses only the writes fenced by it.
pub async fn fence_of_another_lease_is_unaffected(b: &dyn StorageBackend) {
    if !b.shared() {
        return;
    }
    let one = granted("acquire s1", acquire(b, "s1", "node-a", LONG).await);
    let two = granted("acquire s2", acquire(b, "s2", "node-a", LONG).await);
    ok("release_lease", b.release_lease(&one).await);
    granted("takeover of s1", acquire(b, "s1", "node-b", LONG).await);
    let r = put_fenced(b, "sessions/s2.json", b"s2", &two.fence()).await;
    ok("put_fenced of s2", r);
    let r = put_fenced(b, "sessions/s1.json", b"s1", &one.fence()).await;
    assert!(r.is_err(), "a write fenced by the lost lease s1 was accepted");
    assert_eq!(list_keys(b, "sessions").await, ["sessions/s2.json"]);
}

/// A takeover racing a stream of the old holder's fenced writes: every write the old holder
/// sends after the grant to the new node was answered is refused, once one is refused all
/// later ones are, and the new holder's write after its grant is the value that stays (no
/// write of the old holder lands after it).
pub async fn fenced_writes_racing_a_takeover_never_land_after_it(b: &dyn StorageBackend) {
    use std::sync::Mutex;
    use tokio::time::Instant;
    if !b.shared() {
        return;
    }
    let k = "sessions/race.json";
    let a = granted("first acquire", acquire(b, "race", "node-a", LONG).await);
    let fa = a.fence();
    // (sent at, accepted) of each write of the old holder; when the grant was answered.
    let sent: Mutex<Vec<(Instant, bool)>> = Mutex::new(Vec::new());
    let granted_at: Mutex<Option<Instant>> = Mutex::new(None);
    let (sent_ref, granted_ref, fa_ref) = (&sent, &granted_at, &fa);
    let old_holder: Task<'_> = Box::pin(async move {
        for i in 0..10_000u32 {
            let at = Instant::now();
            let r = put_fenced(b, k, format!("a{i}").as_bytes(), fa_ref).await;
            let accepted = match r {
                Ok(()) => true,
                Err(StateError::Fenced { .. }) => false,
                Err(e) => panic!("a racing fenced write failed: {e}"),
            };
            crate::sync::lock(sent_ref).push((at, accepted));
            if !accepted {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("ten thousand writes under a lease taken over were all accepted");
    });
    let new_holder: Task<'_> = Box::pin(async move {
        while crate::sync::lock(sent_ref).len() < 3 {
            tokio::task::yield_now().await;
        }
        // The old holder's lease ends (as if it expired while the holder was paused).
        ok("release_lease", b.release_lease(&a).await);
        let bee = granted("takeover", acquire(b, "race", "node-b", LONG).await);
        *crate::sync::lock(granted_ref) = Some(Instant::now());
        ok("put_fenced (new holder)", put_fenced(b, k, b"b", &bee.fence()).await);
    });
    join_all(vec![old_holder, new_holder]).await;
    let granted_at = crate::sync::lock(&granted_at).unwrap_or_else(|| panic!("no takeover"));
    let sent = crate::sync::lock(&sent).clone();
    for (at, accepted) in &sent {
        assert!(
            !(*accepted && *at > granted_at),
            "a write sent after the takeover was answered was accepted"
        );
    }
    assert!(sent.last().is_some_and(|(_, accepted)| !accepted), "the old holder was never refused");
    assert_eq!(get(b, k).await.as_deref(), Some(&b"b"[..]), "an old holder's write landed last");
}

/// A backend that is not shared has no leases (each lease method is a `Config` error) and
/// writes fenced writes as plain ones (its lock gives it one writer).
pub async fn unshared_backend_has_no_leases_and_ignores_fences(b: &dyn StorageBackend) {
    if b.shared() {
        return;
    }
    let r = b.acquire_lease("s1", "node-a", LONG).await;
    assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::Config), "acquire_lease");
    let lease = Lease {
        name: "s1".into(),
        node: "node-a".into(),
        token: 1,
        expires_in: LONG,
        taken_from: None,
    };
    let r = b.renew_lease(&lease, LONG).await;
    assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::Config), "renew_lease");
    let r = b.release_lease(&lease).await;
    assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::Config), "release_lease");
    let r = b.renew_leases(std::slice::from_ref(&lease), LONG).await;
    assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::Config), "renew_leases");
    let r = b.read_lease("s1").await;
    assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::Config), "read_lease");
    let any = Fence::new("no-such-lease", 42);
    let k = "sessions/s1.json";
    ok("put_fenced", put_fenced(b, k, b"v", &any).await);
    assert_eq!(get(b, k).await.as_deref(), Some(&b"v"[..]));
    assert!(ok("delete_fenced", delete_fenced(b, k, &any).await));
    assert_eq!(get(b, k).await, None);
}

/// Runs every clause in turn, each on a fresh backend from `make`, and stops at the first
/// failure (a panic). In tests prefer [`conformance_tests!`](crate::conformance_tests),
/// which reports every failing clause.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future,
    Fut::Output: Fixture,
{
    crate::conformance_tests!(@clauses [run make]);
}

/// Expands, for each `name => constructor` pair, into a module `name` holding one
/// `#[tokio::test]` per clause of [`testing::conformance`](crate::testing::conformance),
/// each on a fresh backend from evaluating `constructor` (inside the async test, so it may
/// `.await`). The constructor yields a [`Fixture`](crate::testing::Fixture): a
/// backend, or `(backend, guard)` where `guard` must outlive the backend (a temporary
/// directory). Items of the enclosing module are in scope in the constructor.
///
/// Needs the cargo feature `testing` of `mars-state`, and `tokio` (features `macros`, `rt`)
/// among the crate's dev-dependencies.
///
/// In a file under `tests/` (here the generated tests are only compiled):
///
/// ```
/// use mars_state::{FileStorageBackend, MemoryStorageBackend};
///
/// mars_state::conformance_tests! {
///     memory => MemoryStorageBackend::new(),
///     // The temporary directory lives as long as the backend.
///     file => {
///         let dir = tempfile::tempdir().unwrap();
///         (FileStorageBackend::new(dir.path()).unwrap(), dir)
///     },
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! conformance_tests {
    // Internal arms (`@...`) first; the public form is the last arm.
    // The one list of clauses: `@clauses [what ...]` hands it to the `@what` arm.
    (@clauses [$what:ident $($args:tt)*]) => {
        $crate::conformance_tests! {@$what [$($args)*]
            get_missing_is_none
            put_then_get_round_trips
            put_replaces_a_longer_value
            put_record_is_a_put
            values_are_opaque_bytes
            keys_at_any_depth_round_trip
            delete_missing_is_false
            delete_existing_is_true_and_removes
            delete_removes_only_its_key
            list_missing_prefix_is_empty
            list_returns_keys_under_prefix_with_sizes
            list_respects_prefix_boundaries
            list_reflects_replaces_and_deletes
            append_creates_then_extends
            append_after_put_extends
            sweep_on_clean_store_removes_nothing
            concurrent_puts_to_different_keys_all_land
            readers_see_the_old_or_the_new_value
            lease_has_one_holder_at_a_time
            lease_expires_then_another_node_gets_the_next_token
            lease_release_lets_another_node_take_it_at_once
            lease_renew_by_a_stale_lease_is_none
            lease_taken_from_names_an_expired_holder_not_a_released_one
            read_lease_reports_holder_token_expiry_and_release
            renew_leases_renews_many_and_refuses_stale_ones
            stale_fence_save_checkpoint_and_delete_are_refused
            fence_of_another_lease_is_unaffected
            fenced_writes_racing_a_takeover_never_land_after_it
            unshared_backend_has_no_leases_and_ignores_fences
        }
    };
    (@names [] $($clause:ident)*) => {
        [$(stringify!($clause)),*]
    };
    (@run [$make:ident] $($clause:ident)*) => {
        $(
            {
                let fixture = $make().await;
                $crate::testing::conformance::$clause($crate::testing::Fixture::backend(&fixture)).await;
            }
        )*
    };
    (@tests [$name:ident, $make:expr] $($clause:ident)*) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[::tokio::test]
                async fn $clause() {
                    let fixture = $make;
                    $crate::testing::conformance::$clause($crate::testing::Fixture::backend(&fixture)).await;
                }
            )*
        }
    };
    ($($name:ident => $make:expr),+ $(,)?) => {
        $( $crate::conformance_tests! {@clauses [tests $name, $make]} )+
    };
}
