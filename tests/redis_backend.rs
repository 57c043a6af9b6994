//! The Redis backend (feature `redis`). Every test that needs a durable server starts its own
//! `redis-server` (`appendonly yes`, `appendfsync always`, no RDB, `KEYS` and `SCAN` renamed
//! away so any use of them fails) on a free port in a temporary directory, and kills it at
//! the end. A test FAILS if `redis-server` cannot be started or reached. Pinned here:
//!
//! - the conformance suite over `RedisStorageBackend` and `Encrypted<RedisStorageBackend>`;
//! - `manager_state_survives_reopen_{plain,gzip}`: what a manager wrote is there after a
//!   shutdown and a new connection;
//! - `machine_server_*`: the machine's Redis (127.0.0.1:6379, `appendonly no`, never
//!   reconfigured) is refused by the default (durable) connect with `Config` naming the
//!   settings, and works with `best_effort()` (random prefix, keys removed at the end);
//! - `without_config_the_fsync_policy_cannot_be_verified`: with `CONFIG` disabled the check
//!   falls back to `INFO persistence` and the durable mode refuses, saying what it could not
//!   verify; `best_effort()` opens;
//! - `rewrites_after_a_delete_are_listed_again`: a put or append after a delete (bare
//!   `SET`/`APPEND` otherwise) makes the listing entry again;
//! - `backend_open_names_a_redis_store_by_url`: `backend::open("redis://…")`;
//! - `listing_walks_sets_not_the_keyspace`: listings work with `KEYS`/`SCAN` disabled, and
//!   the commands a listing runs grow with what it returns, not with the store;
//! - `session_ttl_expires_every_key_of_a_session`;
//! - `a_server_that_stops_answering_gives_typed_errors` (SIGSTOP): a write is `Timeout`
//!   (outcome unknown), a read `Unavailable`, within the configured timeout;
//! - `dropped_connections_*`: `CLIENT KILL TYPE normal` during a stream of writes: each
//!   call is `Ok` or a typed error, every acknowledged save is there, no append is doubled;
//! - `sigkill_redis_while_saving` (20 rounds, `MARS_REDIS_CRASH_ROUNDS`) and
//!   `sigkill_client_while_saving` (50 rounds, `MARS_REDIS_CLIENT_ROUNDS`): a child process
//!   (this binary re-executed) saves in a loop and acks each `Ok`; the Redis server, or the
//!   child, is SIGKILLed at a random moment; every acknowledged save is there afterwards and
//!   nothing is corrupt.

mod common;
mod nodes_common;
#[path = "redis_backend/support.rs"]
mod redis_support;

use std::time::{Duration, Instant};

use mars_state::middleware::crypto::EncryptionLayer;
use mars_state::{
    EncryptionKey, ErrorKind, RedisStorageBackend, StateManager, StorageBackend, StorageKey,
};
use redis_support::{Server, bounded, random_prefix};
use serde_json::{Value, json};

/// A backend on a private durable server, kept alive beside it.
async fn fresh() -> (RedisStorageBackend, Server) {
    let server = Server::start();
    let backend = RedisStorageBackend::options()
        .prefix(random_prefix())
        .connect(&server.url())
        .await
        .unwrap_or_else(|e| panic!("connect to the private server: {e}"));
    (backend, server)
}

// The behaviours of several nodes on one store (tests/nodes_common), on a private server
// each.
nodes_common::node_tests!(nodes, || async {
    let (backend, server) = super::fresh().await;
    (std::sync::Arc::new(backend) as std::sync::Arc<dyn mars_state::StorageBackend>, server)
});

fn layer() -> EncryptionLayer {
    EncryptionLayer::new(EncryptionKey::from_bytes([7; 32]))
}

mars_state::conformance_tests! {
    plain_redis => fresh().await,
    encrypted_redis => {
        let (backend, server) = fresh().await;
        (layer().wrap(backend).await.unwrap(), server)
    },
}

async fn open_manager(url: &str, prefix: &str, compression: Option<u32>) -> StateManager {
    let options = RedisStorageBackend::options().prefix(prefix);
    let mut builder =
        StateManager::builder(bounded("connect", options.connect(url)).await.unwrap());
    if let Some(level) = compression {
        builder = builder.compression(level);
    }
    bounded("start", builder.start()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_state_survives_reopen_plain() {
    manager_state_survives_reopen(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_state_survives_reopen_gzip() {
    manager_state_survives_reopen(Some(6)).await;
}

async fn manager_state_survives_reopen(compression: Option<u32>) {
    let server = Server::start();
    let (url, prefix) = (server.url(), random_prefix());
    common::oracle::state_survives_reopen(|| open_manager(&url, &prefix, compression)).await;
    // A different prefix on the same server is a different, empty store.
    let other = open_manager(&url, &random_prefix(), compression).await;
    assert!(bounded("list", other.list_sessions()).await.unwrap().is_empty());
    bounded("shutdown", other.shutdown()).await.unwrap();
}

// ------------------------------------------------------------------------------------------
// The machine's server: appendonly no. Never reconfigured; keys removed at the end.

const MACHINE_URL: &str = "redis://127.0.0.1:6379";

#[tokio::test]
async fn machine_server_refuses_the_durable_mode() {
    let err = bounded("connect", RedisStorageBackend::connect(MACHINE_URL))
        .await
        .expect_err("connected durably to a server with appendonly no");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let msg = err.to_string();
    for needle in [
        "appendonly is no",
        "CONFIG SET appendonly yes",
        "CONFIG SET appendfsync always",
        "best_effort",
    ] {
        assert!(msg.contains(needle), "the error does not say {needle:?}: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_server_works_best_effort() {
    let prefix = random_prefix();
    let b = bounded(
        "connect",
        RedisStorageBackend::options().prefix(&prefix).best_effort().connect(MACHINE_URL),
    )
    .await
    .unwrap_or_else(|e| panic!("the machine's Redis at {MACHINE_URL} is not reachable: {e}"));
    let key = StorageKey::new("sessions/s1.json").unwrap();
    bounded("put", b.put(&key, b"one".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(b"one".to_vec()));
    let m = bounded("start", StateManager::start(b.clone())).await.unwrap();
    bounded("save", m.save_session("s2", &json!({ "n": 2 }))).await.unwrap();
    let s2: Option<Value> = bounded("load", m.load_session("s2")).await.unwrap();
    assert_eq!(s2, Some(json!({ "n": 2 })));
    bounded("shutdown", m.shutdown()).await.unwrap();
    let removed = redis_support::remove_prefix(MACHINE_URL, &prefix).await;
    assert!(removed > 0, "the test left no keys to remove under {prefix}");
}

#[tokio::test]
async fn without_config_the_fsync_policy_cannot_be_verified() {
    // As on managed Redis: CONFIG is disabled, INFO shows the AOF but not its fsync policy.
    let server = Server::start_with(&["--rename-command", "CONFIG", ""]);
    let err = bounded("connect", RedisStorageBackend::connect(&server.url()))
        .await
        .expect_err("connected durably without verifying appendfsync");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("appendfsync cannot be verified"), "{msg}");
    assert!(!msg.contains("aof_enabled is"), "the AOF is on, yet reported off: {msg}");
    let options = RedisStorageBackend::options().best_effort();
    let b = bounded("connect", options.connect(&server.url())).await.unwrap();
    let key = StorageKey::new("sessions/s.json").unwrap();
    bounded("put", b.put(&key, b"x".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(b"x".to_vec()));
}

#[tokio::test]
async fn bad_prefixes_and_urls_are_config_errors() {
    for prefix in ["", "a:b", "has space", "{tag}", &"x".repeat(65)] {
        let err = RedisStorageBackend::options()
            .prefix(prefix)
            .best_effort()
            .connect(MACHINE_URL)
            .await
            .expect_err("a bad prefix was accepted");
        assert_eq!(err.kind(), ErrorKind::Config, "{prefix:?}: {err}");
    }
    let err = RedisStorageBackend::connect("http://nope").await.expect_err("a bad URL");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    // Nothing listens there: Unavailable, within the timeout.
    let t = Instant::now();
    let err = RedisStorageBackend::options()
        .timeout(Duration::from_millis(500))
        .connect(&format!("redis://127.0.0.1:{}", redis_support::free_port()))
        .await
        .expect_err("connected to nothing");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "gave up after {:?}", t.elapsed());
}

// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn listing_walks_sets_not_the_keyspace() {
    let (b, server) = fresh().await;
    let mut admin = server.admin().await;
    let keys_err: redis::RedisResult<Vec<String>> =
        redis::cmd("KEYS").arg("*").query_async(&mut admin).await;
    assert!(keys_err.is_err(), "KEYS is not disabled on the private server");
    for i in 0..500 {
        let k = StorageKey::new(format!("checkpoints/big/c{i}.json")).unwrap();
        bounded("put", b.put(&k, vec![1; 10])).await.unwrap();
    }
    for i in 0..3 {
        let k = StorageKey::new(format!("checkpoints/small/c{i}.json")).unwrap();
        bounded("put", b.put(&k, vec![1; 4])).await.unwrap();
    }
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut admin).await.unwrap();
    let small =
        bounded("list", b.list(&StorageKey::new("checkpoints/small").unwrap())).await.unwrap();
    assert_eq!(small.len(), 3);
    let stats: String =
        redis::cmd("INFO").arg("commandstats").query_async(&mut admin).await.unwrap();
    let calls = |cmd: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    };
    // One set read and one EXISTS + STRLEN per returned key: nothing scales with the 500.
    assert!(calls("smembers") <= 1, "{stats}");
    assert!(calls("exists") <= 3 && calls("strlen") <= 3, "{stats}");
    assert_eq!(calls("keys") + calls("scan"), 0, "{stats}");
    let all = bounded("list", b.list(&StorageKey::new("checkpoints").unwrap())).await.unwrap();
    assert_eq!(all.len(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ttl_expires_every_key_of_a_session() {
    let server = Server::start();
    let b = RedisStorageBackend::options()
        .prefix(random_prefix())
        .session_ttl(Duration::from_millis(1500))
        .connect(&server.url())
        .await
        .unwrap();
    let k = |s: &str| StorageKey::new(s).unwrap();
    bounded("put", b.put(&k("sessions/s1.json"), b"s".to_vec())).await.unwrap();
    bounded("put", b.put(&k("checkpoints/s1/c1.json"), b"c".to_vec())).await.unwrap();
    bounded("put", b.put(&k("sessions/s2.json"), b"other".to_vec())).await.unwrap();
    bounded("put", b.put(&k("metadata/store.json"), b"{}".to_vec())).await.unwrap();
    // A later write of s1 (not of its checkpoint) keeps the checkpoint alive too.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    bounded("put", b.put(&k("sessions/s1.json"), b"s'".to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(bounded("get", b.get(&k("sessions/s2.json"))).await.unwrap(), None, "s2 kept");
    assert!(bounded("get", b.get(&k("checkpoints/s1/c1.json"))).await.unwrap().is_some());
    let listed = bounded("list", b.list(&k("sessions"))).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for key in ["sessions/s1.json", "checkpoints/s1/c1.json"] {
        assert_eq!(bounded("get", b.get(&k(key))).await.unwrap(), None, "{key} did not expire");
    }
    assert!(bounded("list", b.list(&k("sessions"))).await.unwrap().is_empty());
    assert!(bounded("list", b.list(&k("checkpoints"))).await.unwrap().is_empty());
    assert!(bounded("get", b.get(&k("metadata/store.json"))).await.unwrap().is_some());
    // Nothing of the sessions is left in Redis: values, folder sets and groups all expired,
    // or were removed by the listings.
    let mut admin = server.admin().await;
    let size: u64 = redis::cmd("DBSIZE").query_async(&mut admin).await.unwrap();
    assert_eq!(size, 2, "metadata/store.json and the metadata folder set only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_gives_typed_errors() {
    let server = Server::start();
    let b = RedisStorageBackend::options()
        .prefix(random_prefix())
        .timeout(Duration::from_millis(300))
        .connect(&server.url())
        .await
        .unwrap();
    let key = StorageKey::new("sessions/s.json").unwrap();
    bounded("put", b.put(&key, b"before".to_vec())).await.unwrap();
    server.signal("STOP");
    let t = Instant::now();
    let err =
        bounded("put", b.put(&key, b"during".to_vec())).await.expect_err("put on a stopped server");
    assert_eq!(
        err.kind(),
        ErrorKind::Timeout,
        "a write without an answer must say outcome unknown: {err}"
    );
    let err = bounded("get", b.get(&key)).await.expect_err("get on a stopped server");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "gave up after {:?}", t.elapsed());
    server.signal("CONT");
    // The unanswered put ran when the server woke up (its outcome was unknown, not "lost");
    // the backend works on.
    bounded("put", b.put(&key, b"after".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(b"after".to_vec()));
}

#[tokio::test]
async fn oversized_values_are_too_large() {
    let (b, _server) = fresh().await;
    let err = b
        .put(&StorageKey::new("sessions/big.json").unwrap(), vec![0; (512 << 20) + 1])
        .await
        .expect_err("a value over 512 MB was accepted");
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
}

#[path = "redis_backend/crash.rs"]
mod crash;
#[path = "redis_backend/dropped.rs"]
mod dropped;

#[tokio::test]
async fn rewrites_after_a_delete_are_listed_again() {
    // After a first write, puts and appends of a key are bare SET/APPEND; a delete must
    // bring back the script (and so the listing entry) for the next write.
    let (b, _server) = fresh().await;
    let k = |s: &str| StorageKey::new(s).unwrap();
    let listed = |v: Vec<mars_state::ObjectMeta>| {
        let mut v: Vec<_> = v.into_iter().map(|m| (m.key.to_string(), m.size)).collect();
        v.sort();
        v
    };
    for round in 0..3u64 {
        bounded("put", b.put(&k("checkpoints/s/c.json"), b"one".to_vec())).await.unwrap();
        bounded("put", b.put(&k("checkpoints/s/c.json"), b"two!".to_vec())).await.unwrap();
        bounded("append", b.append(&k("metadata/j.log"), vec![0, 0xff])).await.unwrap();
        bounded("append", b.append(&k("metadata/j.log"), vec![1])).await.unwrap();
        let got = listed(bounded("list", b.list(&k("checkpoints"))).await.unwrap());
        assert_eq!(got, [("checkpoints/s/c.json".to_owned(), 4)], "round {round}");
        let got = listed(bounded("list", b.list(&k("metadata"))).await.unwrap());
        assert_eq!(got, [("metadata/j.log".to_owned(), 3)], "round {round}");
        assert_eq!(
            bounded("get", b.get(&k("metadata/j.log"))).await.unwrap(),
            Some(vec![0, 0xff, 1])
        );
        assert!(bounded("delete", b.delete(&k("checkpoints/s/c.json"))).await.unwrap());
        assert!(bounded("delete", b.delete(&k("metadata/j.log"))).await.unwrap());
        assert!(bounded("list", b.list(&k("checkpoints"))).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn backend_open_names_a_redis_store_by_url() {
    let server = Server::start();
    let b = bounded("open", mars_state::backend::open(&server.url())).await.unwrap();
    let key = StorageKey::new("sessions/u.json").unwrap();
    bounded("put", b.put(&key, b"u".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(b"u".to_vec()));
    // The machine's server keeps nothing on disk: the durable default refuses it.
    let err = bounded("open", mars_state::backend::open(MACHINE_URL)).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

/// A write whose outcome is unknown (the server stopped answering: `Timeout`) may have been
/// stored: the node that made it reads the session again before it answers about it, so its
/// recovery and listing agree with another node's (and with the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_write_of_unknown_outcome_the_writer_reads_the_session_again() {
    let server = Server::start();
    let prefix = random_prefix();
    let open = || async {
        RedisStorageBackend::options()
            .prefix(prefix.clone())
            .timeout(Duration::from_millis(500))
            .connect(&server.url())
            .await
            .unwrap()
    };
    let a = StateManager::builder(open().await)
        .node_id("node-a")
        .lease_ttl(Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    a.create_checkpoint("s", "main", &json!({"step": 1})).await.unwrap();
    server.signal("STOP");
    let r = a.create_checkpoint("s", "main", &json!({"step": 2})).await;
    server.signal("CONT");
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Timeout, "the server did not answer in time");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The stopped server applied the write when it went on (or not): whichever, node a says
    // what the store says.
    let seen_by_a = a.recover_session("s").await.unwrap().checkpoint.map(|c| c.data);
    let listed_by_a = a.list_checkpoints("s").await.unwrap().len();
    a.shutdown().await.unwrap();
    let b = StateManager::builder(open().await).node_id("node-b").start().await.unwrap();
    let listed_by_b = b.list_checkpoints("s").await.unwrap().len();
    let seen_by_b = b.recover_session("s").await.unwrap().checkpoint.map(|c| c.data);
    b.shutdown().await.unwrap();
    assert_eq!(seen_by_a, seen_by_b, "the writer's recovery disagrees with the store");
    assert_eq!(listed_by_a, listed_by_b, "the writer's listing disagrees with the store");
}

/// Two backends (two processes) on one prefix: a key one of them put, the other deleted, and
/// the first put again is listed (a backend that remembered it had listed the key and sent a
/// bare SET would leave it stored but missing from every listing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_after_another_backends_delete_is_listed() {
    let server = Server::start();
    let prefix = random_prefix();
    let open = || async {
        let options = RedisStorageBackend::options().prefix(prefix.clone());
        bounded("connect", options.connect(&server.url())).await.unwrap()
    };
    let (a, b) = (open().await, open().await);
    let key = StorageKey::new("metadata/access/s1.json").unwrap();
    let folder = StorageKey::new("metadata/access").unwrap();
    a.put(&key, b"first".to_vec()).await.unwrap();
    assert!(b.delete(&key).await.unwrap());
    a.put(&key, b"second".to_vec()).await.unwrap();
    let listed: Vec<_> = b.list(&folder).await.unwrap().into_iter().map(|m| m.key).collect();
    assert_eq!(listed, std::slice::from_ref(&key), "the key put again is listed");
    assert_eq!(b.get(&key).await.unwrap().as_deref(), Some(&b"second"[..]));
}
