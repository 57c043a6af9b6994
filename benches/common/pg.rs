//! PostgreSQL for the benches: the server, the raw upsert baseline, a manager on the
//! PostgreSQL backend, and the reads of a session holding many checkpoints.

use std::time::{Duration, Instant};

use mars_state::{CheckpointId, PostgresStorageBackend, StateManager};
use serde_json::Value;

/// The server: `MARS_STATE_BENCH_PG_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`.
pub fn url() -> String {
    std::env::var("MARS_STATE_BENCH_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A plain connection (its driver runs on the current runtime).
pub async fn client(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Creates `schema` (a quoted identifier) and in it the raw baseline's table.
pub async fn create_schema(admin: &tokio_postgres::Client, schema: &str) {
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; \
             CREATE TABLE {schema}.bench_raw (key text PRIMARY KEY, value bytea NOT NULL)"
        ))
        .await
        .unwrap();
}

/// Raw upserts of 1 KB rows (`INSERT … ON CONFLICT DO UPDATE`, one transaction each:
/// autocommit, so one WAL flush each) on `conns` connections at once, each writing its own
/// keys, for `time`: upserts/s over all connections.
pub async fn raw_upserts(url: &str, schema: &str, conns: usize, time: Duration) -> f64 {
    let sql = format!(
        "INSERT INTO {schema}.bench_raw (key, value) VALUES ($1, $2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    );
    let value = vec![b'x'; 1024];
    let mut clients = Vec::new();
    for _ in 0..conns {
        let client = client(url).await.unwrap();
        let st = client.prepare(&sql).await.unwrap();
        clients.push((client, st));
    }
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for (c, (client, st)) in clients.into_iter().enumerate() {
        let value = value.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < time {
                let key = format!("k{c}-{}", n % 64);
                client.execute(&st, &[&key, &value]).await.unwrap();
                n += 1;
            }
            n
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// A manager on the PostgreSQL backend in `schema` (unquoted), with `writers` writer tasks
/// over a pool of `pool` connections (the defaults are 4 and 16).
pub async fn manager(url: &str, schema: &str, writers: usize, pool: usize) -> StateManager {
    let backend = PostgresStorageBackend::options()
        .schema(schema)
        .pool_size(pool)
        .writers(writers)
        .connect(url)
        .await
        .unwrap();
    StateManager::builder(backend)
        .janitor_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap()
}

/// Creates `n` checkpoints of `state` in session `sid`; returns the last one's id.
pub async fn fill_checkpoints(
    m: &StateManager,
    sid: &str,
    n: usize,
    state: &Value,
) -> CheckpointId {
    let mut last = None;
    for _ in 0..n {
        last = Some(m.create_checkpoint(sid, "main", state).await.unwrap());
    }
    last.unwrap()
}

/// The session's latest checkpoint, as LangGraph's `get_tuple` of a thread gives it: the
/// listing (from the manager's index), then one read of that checkpoint from the store.
pub async fn load_latest_checkpoint(m: &StateManager, sid: &str) {
    let list = m.list_checkpoints(sid).await.unwrap();
    let id = &list.last().unwrap().id;
    assert!(m.restore_checkpoint(id).await.unwrap().is_some());
}
