//! Redis for the benches: a manager on the Redis backend and the plain `SET` baseline, both
//! against a private durable server (`redis_server`: `appendonly yes`, `appendfsync always`).

use std::time::{Duration, Instant};

use mars_state::{RedisStorageBackend, StateManager};

/// A durable Redis backend on `url` under key prefix `prefix` (the connect checks the
/// server's `appendfsync always`).
pub async fn backend(url: &str, prefix: &str) -> RedisStorageBackend {
    RedisStorageBackend::options()
        .prefix(prefix)
        .connect(url)
        .await
        .expect("the private server is durable")
}

/// A manager on [`backend`].
pub async fn manager(backend: RedisStorageBackend) -> StateManager {
    StateManager::builder(backend)
        .janitor_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap()
}

/// One client, one `SET` of 1 KB per round trip, sequentially, for `time`: SETs/s. With
/// `appendfsync always` each `SET` is in the fsynced append-only file before its reply.
pub async fn plain_sets_per_sec(url: &str, time: Duration) -> f64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let value = vec![b'x'; 1000];
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < time {
        let _: () = redis::cmd("SET")
            .arg(format!("plain-bench:{}", n % 64))
            .arg(&value)
            .query_async(&mut conn)
            .await
            .unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}
