//! The PostgreSQL backend against raw PostgreSQL, in one run, as ratios: a durable save of a
//! 1 KB state through a `StateManager` (one session; 64 sessions at once, for several writer
//! counts) against a raw `INSERT … ON CONFLICT DO UPDATE` of a 1 KB row in its own
//! transaction (one connection; 16 connections); and the reads of a session holding 1,000
//! checkpoints (its latest checkpoint, its listing). LangGraph's PostgresSaver figures for
//! the same operations come from `/work/shared/peers/pg_bench.py`, run beside this.
//!
//! Run: `cargo bench --features postgres --bench postgres`. The server is
//! `MARS_STATE_BENCH_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`); the
//! bench works in a schema of its own and drops it at the end. `MARS_STATE_BENCH_SECS` sets
//! the seconds per figure (default 3).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::{
    client, create_schema, fill_checkpoints, load_latest_checkpoint, manager, raw_upserts, url,
};
use common::{save_64_at_once, state_1kb};
use mars_state::PostgresStorageBackend;

fn seconds() -> Duration {
    let s: f64 =
        std::env::var("MARS_STATE_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    Duration::from_secs_f64(s)
}

/// Runs `op` in a loop for the bench's seconds; returns operations per second (each call of
/// `op` counts `per_call`).
async fn rate<F, Fut>(per_call: usize, mut op: F) -> f64
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    op(0).await; // warm-up
    let (start, budget) = (Instant::now(), seconds());
    let mut n = 0u64;
    while start.elapsed() < budget {
        n += 1;
        op(n).await;
    }
    (n as usize * per_call) as f64 / start.elapsed().as_secs_f64()
}

/// PostgreSQL's count of updated rows of the leases table in `schema`.
async fn lease_updates(admin: &tokio_postgres::Client, schema: &str) -> i64 {
    let q = format!(
        "SELECT n_tup_upd FROM pg_stat_user_tables \
         WHERE schemaname = '{schema}' AND relname = 'mars_state_leases'"
    );
    admin.query_one(&q, &[]).await.unwrap().get::<_, i64>(0)
}

fn main() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let schema_name = format!("mars_bench_{}", std::process::id());
    let schema = format!("\"{schema_name}\"");
    let url = url();
    let url = url.as_str();
    rt.block_on(async {
        let admin = client(url).await.unwrap();
        create_schema(&admin, &schema).await;
        let state = Arc::new(state_1kb());
        let secs = seconds().as_secs_f64();
        println!("PostgreSQL backend bench, {secs} s per figure, 1 KB states");

        let raw1 = raw_upserts(url, &schema, 1, seconds()).await;
        println!("raw upsert 1 KB, 1 connection:        {raw1:>8.0} /s");
        let raw16 = raw_upserts(url, &schema, 16, seconds()).await;
        println!("raw upsert 1 KB, 16 connections:      {raw16:>8.0} /s");

        // The backend alone: a durable put, and a journal append.
        {
            use mars_state::{StorageBackend, StorageKey};
            let b =
                PostgresStorageBackend::options().schema(&schema_name).connect(url).await.unwrap();
            let key = StorageKey::new("sessions/raw.json").unwrap();
            let value = vec![b'x'; 1024];
            let put = rate(1, |_| {
                let (b, key, value) = (&b, &key, &value);
                async move { b.put(key, value.clone()).await.unwrap() }
            })
            .await;
            println!(
                "backend put 1 KB (durable):           {put:>8.0} /s   {:.2}x raw 1-conn upsert",
                put / raw1
            );
            let log = StorageKey::new("metadata/bench.log").unwrap();
            let append = rate(1, |_| {
                let (b, log) = (&b, &log);
                async move { b.append(log, vec![b'y'; 100]).await.unwrap() }
            })
            .await;
            println!("backend append 100 B (journal):       {append:>8.0} /s   (queued; one flusher commits)");
        }

        let m = manager(url, &schema_name, 4, 16).await;
        let save1 = rate(1, |_| {
            let (m, state) = (&m, &state);
            async move { m.save_session("bench", &**state).await.unwrap() }
        })
        .await;
        println!(
            "save 1 KB, 1 session (durable):       {save1:>8.0} /s   {:.2}x raw 1-conn upsert",
            save1 / raw1
        );
        m.shutdown().await.unwrap();

        let mut best64 = 0f64;
        for (writers, pool) in [(1, 16), (4, 16), (8, 16), (16, 24)] {
            let m = manager(url, &schema_name, writers, pool).await;
            let save64 = rate(64, |_| {
                let (m, state) = (m.clone(), state.clone());
                async move { save_64_at_once(&m, &state).await }
            })
            .await;
            best64 = best64.max(save64);
            println!(
                "save 1 KB, 64 sessions, {writers:>2} writers:    {save64:>8.0} /s   {:.2}x raw 16-conn upsert",
                save64 / raw16
            );
            m.shutdown().await.unwrap();
        }

        // Several nodes: the same 64 sessions saved at once by one node, then spread over
        // three nodes (three managers, each with its own pool, node id and leases; session
        // i on node i % 3), in the same run.
        let one_node = {
            let m = manager(url, &schema_name, 4, 16).await;
            let r = rate(64, |_| {
                let (m, state) = (m.clone(), state.clone());
                async move { save_64_at_once(&m, &state).await }
            })
            .await;
            m.shutdown().await.unwrap();
            r
        };
        let three_nodes = {
            let mut nodes = Vec::new();
            for _ in 0..3 {
                nodes.push(manager(url, &schema_name, 4, 16).await);
            }
            let r = rate(64, |_| {
                let (nodes, state) = (nodes.clone(), state.clone());
                async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    for i in 0..64 {
                        let (m, state) = (nodes[i % 3].clone(), state.clone());
                        tasks.spawn(async move { m.save_session(format!("s{i}"), &*state).await });
                    }
                    while let Some(done) = tasks.join_next().await {
                        done.unwrap().unwrap();
                    }
                }
            })
            .await;
            for m in nodes {
                m.shutdown().await.unwrap();
            }
            r
        };
        println!("save 1 KB, 64 sessions, 1 node:       {one_node:>8.0} /s");
        println!(
            "save 1 KB, 64 sessions, 3 nodes:      {three_nodes:>8.0} /s   {:.2}x one node",
            three_nodes / one_node
        );

        // Lease traffic: one node holding 64 sessions' leases (default TTL 10 s) and
        // writing nothing; PostgreSQL's own count of lease-row updates over 30 s.
        {
            let m = manager(url, &schema_name, 4, 16).await;
            save_64_at_once(&m, &state).await;
            // Counters reach the statistics at most about a second after a transaction.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let before = lease_updates(&admin, &schema_name).await;
            let window = Duration::from_secs(30);
            tokio::time::sleep(window).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = lease_updates(&admin, &schema_name).await;
            let per_session_min = (after - before) as f64 / 64.0 / (window.as_secs_f64() / 60.0);
            println!(
                "lease traffic, 64 idle sessions:      {per_session_min:>8.1} lease-row updates per session per minute (one statement per renewal round for all 64)"
            );
            m.shutdown().await.unwrap();
        }

        // A session with 1,000 checkpoints.
        let m = manager(url, &schema_name, 4, 16).await;
        let last = fill_checkpoints(&m, "deep", 1000, &state).await;
        let latest = rate(1, |_| load_latest_checkpoint(&m, "deep")).await;
        println!("load latest checkpoint of 1,000:      {latest:>8.0} /s   (listing + one read)");
        let by_id = rate(1, |_| {
            let (m, last) = (&m, &last);
            async move { assert!(m.restore_checkpoint(last).await.unwrap().is_some()) }
        })
        .await;
        println!("restore a checkpoint by id:           {by_id:>8.0} /s");
        let list = rate(1, |_| {
            let m = &m;
            async move { assert_eq!(m.list_checkpoints("deep").await.unwrap().len(), 1000) }
        })
        .await;
        println!("list 1,000 checkpoints:               {:>8.3} ms (from the manager's index)", 1000.0 / list);
        m.shutdown().await.unwrap();
        // The session's latest state (LangGraph's get_tuple of the latest checkpoint): a
        // fresh manager, so no session actor holds it and every load reads PostgreSQL.
        {
            let m = manager(url, &schema_name, 4, 16).await;
            m.save_session("deep", &*state).await.unwrap();
            m.shutdown().await.unwrap();
        }
        let m = manager(url, &schema_name, 4, 16).await;
        let load = rate(1, |_| {
            let m = &m;
            async move { assert!(m.load_session("deep").await.unwrap().is_some()) }
        })
        .await;
        println!("load latest state (1,000 checkpoints): {load:>7.0} /s   (load_session, read from PostgreSQL)");
        m.shutdown().await.unwrap();
        // The backend's own listing (a cold start reads it): one index range.
        let b = PostgresStorageBackend::options().schema(&schema_name).connect(url).await.unwrap();
        let prefix = mars_state::StorageKey::new("checkpoints/deep").unwrap();
        let backend_list = rate(1, |_| {
            let (b, prefix) = (&b, &prefix);
            async move {
                use mars_state::StorageBackend;
                assert_eq!(b.list(prefix).await.unwrap().len(), 1000);
            }
        })
        .await;
        println!(
            "backend list of 1,000 keys (SQL):     {:>8.3} ms (index-only range)",
            1000.0 / backend_list
        );
        drop(b);
        println!("best of 64 sessions: {best64:.0} /s = {:.2}x raw 16-conn", best64 / raw16);
        admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
    });
}
