//! The SQLite backend against the file backend, in one run: a durable save of a 1 KB state
//! through a `StateManager`, for one session, and for 64 sessions saving at once (where both
//! backends share one fsync among the saves that queue together).
//!
//! Run: `cargo bench --features sqlite --bench sqlite`. Stores live under
//! `$MARS_STATE_BENCH_DIR` if set, else the system temporary directory (a real disk for
//! figures that mean anything: fsync on tmpfs is free).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{save_64_at_once, state_1kb};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mars_state::{FileStorageBackend, SqliteStorageBackend, StateManager};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn tempdir() -> tempfile::TempDir {
    match std::env::var_os("MARS_STATE_BENCH_DIR") {
        Some(root) => {
            std::fs::create_dir_all(&root).unwrap();
            tempfile::tempdir_in(root).unwrap()
        }
        None => tempfile::tempdir().unwrap(),
    }
}

const BACKENDS: [&str; 2] = ["file", "sqlite"];

async fn open(backend: &str, dir: &std::path::Path) -> StateManager {
    let builder = match backend {
        "file" => StateManager::builder(FileStorageBackend::new(dir.join("files")).unwrap()),
        _ => StateManager::builder(SqliteStorageBackend::open(dir.join("state.db")).unwrap()),
    };
    builder.janitor_interval(Duration::from_secs(3600)).start().await.unwrap()
}

fn save_1kb(c: &mut Criterion) {
    let rt = runtime();
    let state = state_1kb();
    let mut group = c.benchmark_group("sqlite_vs_file/save_1KB");
    group.throughput(Throughput::Elements(1));
    for backend in BACKENDS {
        let dir = tempdir();
        let m = rt.block_on(open(backend, dir.path()));
        group.bench_function(BenchmarkId::from_parameter(backend), |b| {
            b.to_async(&rt).iter(|| async { m.save_session("bench", &state).await.unwrap() })
        });
        rt.block_on(m.shutdown()).unwrap();
    }
    group.finish();
}

fn save_1kb_64_sessions(c: &mut Criterion) {
    let rt = runtime();
    let state = Arc::new(state_1kb());
    let mut group = c.benchmark_group("sqlite_vs_file/save_1KB_64_sessions");
    group.throughput(Throughput::Elements(64));
    for backend in BACKENDS {
        let dir = tempdir();
        let m = rt.block_on(open(backend, dir.path()));
        group.bench_function(BenchmarkId::from_parameter(backend), |b| {
            b.to_async(&rt).iter(|| save_64_at_once(&m, &state))
        });
        rt.block_on(m.shutdown()).unwrap();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .nresamples(2_000);
    targets = save_1kb, save_1kb_64_sessions
}
criterion_main!(benches);
