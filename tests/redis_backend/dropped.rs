//! Dropped connections: `CLIENT KILL TYPE normal` on the private server, every few
//! milliseconds, during a stream of writes. Every call ends `Ok` or with a typed error
//! (`Timeout`: outcome unknown; `Unavailable`: not applied); every acknowledged write is
//! there; a put is retried (idempotent) but an append never is, so no append is doubled.
//! An append is acknowledged when queued (the contract does not make it durable): one lost
//! to a dropped connection stops its log taking appends until a put replaces it, so the log
//! holds a prefix of the acknowledged appends, in order, each once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mars_state::{ErrorKind, RedisStorageBackend, StateManager, StorageBackend, StorageKey};
use serde_json::{Value, json};

use super::redis_support::{Server, bounded, kill_clients, random_prefix};

/// Kills every normal client connection but its own every `every`, until `stop`.
fn killer(server: &Server, every: Duration) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let url = server.url();
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let client = redis::Client::open(url).unwrap();
        let mut admin = client.get_multiplexed_async_connection().await.unwrap();
        let mut killed = 0;
        while !flag.load(Ordering::Relaxed) {
            tokio::time::sleep(every).await;
            killed += kill_clients(&mut admin).await;
        }
        killed
    });
    (stop, task)
}

fn typed(e: &mars_state::StateError) {
    assert!(
        matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Unavailable),
        "a dropped connection gave an untyped error: {e}"
    );
}

async fn backend(server: &Server) -> RedisStorageBackend {
    RedisStorageBackend::options()
        .prefix(random_prefix())
        .timeout(Duration::from_secs(2))
        .connect(&server.url())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_connections_keep_acked_saves() {
    let server = Server::start();
    let m = StateManager::start(backend(&server).await).await.unwrap();
    let (stop, kills) = killer(&server, Duration::from_millis(7));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for s in 0..4u64 {
        let (m, errors) = (m.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let sid = format!("drop-s{s}");
            let (mut acked, mut cps) = (0u64, Vec::new());
            for seq in 1..=200u64 {
                let state = json!({ "seq": seq, "pad": "p".repeat(300) });
                let result = if seq % 10 == 0 {
                    m.create_checkpoint(&sid, "main", &state).await.map(|id| cps.push((id, seq)))
                } else {
                    m.save_session(&sid, &state).await
                };
                match result {
                    Ok(()) if seq % 10 != 0 => acked = seq,
                    Ok(()) => {}
                    Err(e) => {
                        typed(&e);
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (sid, acked, cps)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(bounded("saves", t).await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let kills = kills.await.unwrap();
    let mut acked_total = 0;
    for (sid, acked, cps) in &results {
        let stored: Option<Value> = bounded("load", m.load_session(sid)).await.unwrap();
        let seq = stored.as_ref().map_or(0, |v| v["seq"].as_u64().unwrap());
        assert!(seq >= *acked, "{sid}: stored seq {seq} is older than the acked {acked}");
        let listed = bounded("list", m.list_checkpoints(sid)).await.unwrap();
        let mut ids: Vec<_> = listed.iter().map(|c| c.id.clone()).collect();
        ids.dedup();
        assert_eq!(ids.len(), listed.len(), "{sid}: a checkpoint is listed twice");
        for (id, seq) in cps {
            let cp = bounded("restore", m.restore_checkpoint(id)).await.unwrap();
            assert_eq!(cp.map(|c| c.data["seq"].clone()), Some(json!(seq)), "{sid}: lost {id}");
        }
        acked_total += cps.len() + usize::from(*acked > 0);
    }
    bounded("shutdown", m.shutdown()).await.unwrap();
    println!(
        "{kills} connections killed during 800 writes: {} typed errors, every acked save \
         and checkpoint ({acked_total} checked) present",
        errors.load(Ordering::Relaxed)
    );
    assert!(kills > 0, "no connection was killed: the test proves nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_connections_never_double_an_append() {
    let server = Server::start();
    let b = backend(&server).await;
    let (stop, kills) = killer(&server, Duration::from_millis(5));
    let log = StorageKey::new("metadata/index.log").unwrap();
    // The appends acknowledged since the log was last replaced.
    let mut acked = Vec::new();
    let mut put_acked = Vec::new();
    let (mut errors, mut resets) = (0, 0);
    for i in 0..600u32 {
        match b.append(&log, format!("{i};").into_bytes()).await {
            Ok(()) => acked.push(i),
            Err(e) => {
                typed(&e);
                errors += 1;
                // What the store does with a log that refuses appends: replace it.
                if b.put(&log, Vec::new()).await.is_ok() {
                    acked.clear();
                    resets += 1;
                }
            }
        }
        let key = StorageKey::new(format!("sessions/k{i}.json")).unwrap();
        match b.put(&key, i.to_string().into_bytes()).await {
            Ok(()) => put_acked.push(key),
            Err(e) => {
                typed(&e);
                errors += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let kills = kills.await.unwrap();
    let stored = bounded("get", b.get(&log)).await.unwrap().unwrap_or_default();
    let text = String::from_utf8(stored).unwrap();
    let applied: Vec<u32> = text
        .split(';')
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().unwrap_or_else(|_| panic!("a torn append: {t:?}")))
        .collect();
    assert_eq!(
        applied.as_slice(),
        &acked[..applied.len().min(acked.len())],
        "the log is not a prefix of the acknowledged appends (a gap, a double, or disorder)"
    );
    let seen: HashMap<u32, usize> = applied.iter().map(|&i| (i, 1)).collect();
    // A put replaces a log that lost an append; it takes appends again.
    bounded("put", b.put(&log, b"fresh;".to_vec())).await.unwrap();
    bounded("append", b.append(&log, b"after;".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&log)).await.unwrap().unwrap(), b"fresh;after;".to_vec());
    for key in &put_acked {
        assert!(bounded("get", b.get(key)).await.unwrap().is_some(), "acked put {key} missing");
    }
    let listed = bounded("list", b.list(&StorageKey::new("sessions").unwrap())).await.unwrap();
    assert!(listed.len() >= put_acked.len());
    println!(
        "{kills} connections killed during 1200 writes: {errors} typed errors, the log \
         replaced {resets} times; after the last, {} appends acked, the first {} of them \
         applied, in order, none twice",
        acked.len(),
        seen.len()
    );
    assert!(kills > 0, "no connection was killed: the test proves nothing");
}
