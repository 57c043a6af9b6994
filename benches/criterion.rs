//! Criterion benches of the `StateManager` facade on the file backend (every write durable):
//! save, load warm (the session's actor is live and holds the state; parsed, or as shared
//! bytes with `load_session_bytes`) and cold (a fresh manager after a restart: the state is
//! read from the file), create / restore / roll back to / list checkpoints, and
//! transactional update, for 1 KB, 100 KB and 1 MB states, with compression off and on
//! (gzip level 6) and encryption off and on, for one session and for 64 sessions at once.
//!
//! Run: `cargo bench --bench criterion` (a few minutes on 2 cores); one group:
//! `cargo bench --bench criterion -- save/`. Side-by-side figures against the peers come
//! from `cargo bench --bench compare` (see `BENCHMARKS.md`).
//!
//! Stores live in temporary directories under `$MARS_STATE_BENCH_DIR` if set, else under
//! the system temporary directory (which must be a real disk for the figures to mean
//! anything: fsync on tmpfs is free).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{SIZES, agent_state};
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main,
};
use mars_state::{FileStorageBackend, StateManager};
use serde_json::Value;
use tokio::runtime::Runtime;

/// A store setting: compression and encryption on or off.
#[derive(Clone, Copy)]
struct Setting {
    name: &'static str,
    gzip: bool,
    encrypt: bool,
}

const PLAIN: Setting = Setting { name: "plain", gzip: false, encrypt: false };

/// Every setting this build supports (encryption needs the `encryption` feature).
fn settings() -> Vec<Setting> {
    let mut all = vec![PLAIN, Setting { name: "gzip6", gzip: true, encrypt: false }];
    if cfg!(feature = "encryption") {
        all.push(Setting { name: "encrypted", gzip: false, encrypt: true });
        all.push(Setting { name: "gzip6+encrypted", gzip: true, encrypt: true });
    }
    all
}

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

async fn open(dir: &Path, setting: Setting) -> StateManager {
    let mut builder = StateManager::builder(FileStorageBackend::new(dir).unwrap());
    if setting.gzip {
        builder = builder.compression(6);
    }
    #[cfg(feature = "encryption")]
    if setting.encrypt {
        builder = builder.encryption_key(mars_state::EncryptionKey::from_bytes([7; 32]));
    }
    #[cfg(not(feature = "encryption"))]
    assert!(!setting.encrypt, "encrypted stores need the `encryption` feature");
    builder.start().await.unwrap()
}

/// Slow cases (durable 1 MB writes, gzip of 1 MB) take one flat batch per sample so a
/// group stays within its time budget.
fn tune(group: &mut BenchmarkGroup<'_, WallTime>, bytes: usize) {
    group.throughput(Throughput::Bytes(bytes as u64));
    group.sampling_mode(if bytes >= 100_000 { SamplingMode::Flat } else { SamplingMode::Auto });
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).unwrap().len()
}

/// Runs `bench` in the group `name` for every setting and every size, each setting on a
/// fresh store that is shut down after its sizes: `bench(group, runtime, manager, setting,
/// size label, state)`, with the group's throughput and sampling tuned to the state first.
fn per_setting_and_size(
    c: &mut Criterion,
    name: &str,
    mut bench: impl FnMut(
        &mut BenchmarkGroup<'_, WallTime>,
        &Runtime,
        &StateManager,
        Setting,
        &str,
        &Value,
    ),
) {
    let rt = runtime();
    let mut group = c.benchmark_group(name);
    for setting in settings() {
        let dir = tempdir();
        let m = rt.block_on(open(dir.path(), setting));
        for (label, size) in SIZES {
            let state = agent_state(size);
            tune(&mut group, json_len(&state));
            bench(&mut group, &rt, &m, setting, label, &state);
        }
        rt.block_on(m.shutdown()).unwrap();
    }
    group.finish();
}

fn save(c: &mut Criterion) {
    per_setting_and_size(c, "save", |group, rt, m, setting, label, state| {
        group.bench_function(BenchmarkId::new(setting.name, label), |b| {
            b.to_async(rt).iter(|| async { m.save_session("bench", state).await.unwrap() })
        });
    });
}

/// Warm loads: each size's state is saved first (its session actor stays live), then
/// `load` of that session is timed.
fn warm_loads<T>(c: &mut Criterion, name: &str, load: impl AsyncFn(&StateManager, &str) -> T) {
    per_setting_and_size(c, name, |group, rt, m, setting, label, state| {
        let sid = format!("warm-{label}");
        rt.block_on(m.save_session(&sid, state)).unwrap();
        group.bench_function(BenchmarkId::new(setting.name, label), |b| {
            b.to_async(rt).iter(|| async { black_box(load(m, &sid).await) })
        });
    });
}

fn load_warm(c: &mut Criterion) {
    warm_loads(c, "load_warm", async |m, sid| m.load_session(sid).await.unwrap().unwrap());
}

/// Like `load_warm`, with `load_session_bytes`: the live actor's JSON bytes, shared and not
/// parsed.
fn load_warm_bytes(c: &mut Criterion) {
    warm_loads(c, "load_warm_bytes", async |m, sid| {
        m.load_session_bytes(sid).await.unwrap().unwrap()
    });
}

/// Cold loads: sessions saved by an earlier manager, loaded once each by a fresh one (the
/// record is read, decoded and checked in the caller's task; no session actor is spawned).
/// Only the loads are timed; opening and shutting down the managers are not.
fn load_cold(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("load_cold");
    for setting in settings() {
        for (label, size) in SIZES {
            let state = agent_state(size);
            // Enough sessions for several loads per manager, few enough to set up quickly.
            let pool = (2_000_000 / size).clamp(16, 256);
            let dir = tempdir();
            let m = rt.block_on(open(dir.path(), setting));
            rt.block_on(save_many(&m, pool, &state));
            rt.block_on(m.shutdown()).unwrap();
            tune(&mut group, json_len(&state));
            group.bench_function(BenchmarkId::new(setting.name, label), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let dir = dir.path().to_path_buf();
                    async move {
                        let mut timed = Duration::ZERO;
                        let mut left = iters as usize;
                        while left > 0 {
                            let m = open(&dir, setting).await;
                            let n = left.min(pool);
                            let t = Instant::now();
                            for i in 0..n {
                                black_box(m.load_session(format!("s{i}")).await.unwrap().unwrap());
                            }
                            timed += t.elapsed();
                            left -= n;
                            m.shutdown().await.unwrap();
                        }
                        timed
                    }
                })
            });
        }
    }
    group.finish();
}

/// Saves `n` sessions `s0..s{n-1}`, 64 at a time.
async fn save_many(m: &StateManager, n: usize, state: &Value) {
    let state = Arc::new(state.clone());
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let mut tasks = tokio::task::JoinSet::new();
        for &i in chunk {
            let (m, state) = (m.clone(), state.clone());
            tasks.spawn(async move { m.save_session(format!("s{i}"), &*state).await.unwrap() });
        }
        while tasks.join_next().await.transpose().unwrap().is_some() {}
    }
}

fn checkpoints(c: &mut Criterion) {
    per_setting_and_size(c, "checkpoint", |group, rt, m, setting, label, state| {
        let sid = format!("cp-{label}");
        group.bench_function(BenchmarkId::new(format!("create/{}", setting.name), label), |b| {
            b.to_async(rt).iter(|| async {
                black_box(m.create_checkpoint(&sid, "main", state).await.unwrap())
            })
        });
        let id = rt.block_on(m.create_checkpoint(&sid, "main", state)).unwrap();
        // Restore reads the checkpoint from storage: it is not cached.
        group.bench_function(BenchmarkId::new(format!("restore/{}", setting.name), label), |b| {
            b.to_async(rt)
                .iter(|| async { black_box(m.restore_checkpoint(&id).await.unwrap().unwrap()) })
        });
        // Rollback makes it the session's state: a read and a durable write.
        group.bench_function(BenchmarkId::new(format!("rollback/{}", setting.name), label), |b| {
            b.to_async(rt).iter(|| async { m.rollback_to_checkpoint(&id).await.unwrap() })
        });
        // Keep the store small for the next size.
        rt.block_on(m.cleanup_checkpoints(&sid, 0)).unwrap();
    });
}

/// Listing 1,000 checkpoints comes from the index: no state is read, so the state size and
/// the store setting should not matter. Checked for 1 KB and 100 KB states.
fn list_checkpoints(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("list_1000_checkpoints");
    for (label, size) in &SIZES[..2] {
        let state = agent_state(*size);
        let dir = tempdir();
        let m = rt.block_on(open(dir.path(), PLAIN));
        rt.block_on(async {
            for _ in 0..1000 {
                m.create_checkpoint("listed", "main", &state).await.unwrap();
            }
        });
        group.throughput(Throughput::Elements(1000));
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(m.list_checkpoints("listed").await.unwrap()) })
        });
        rt.block_on(m.shutdown()).unwrap();
    }
    group.finish();
}

fn transactional_update(c: &mut Criterion) {
    per_setting_and_size(c, "transactional_update", |group, rt, m, setting, label, state| {
        let sid = format!("upd-{label}");
        rt.block_on(m.save_session(&sid, state)).unwrap();
        group.bench_function(BenchmarkId::new(setting.name, label), |b| {
            b.to_async(rt).iter(|| async {
                m.transactional_update(&sid, |old: Option<Value>| {
                    let mut v = old.unwrap_or_default();
                    v["step"] = (v["step"].as_u64().unwrap_or(0) + 1).into();
                    Ok::<_, std::io::Error>(v)
                })
                .await
                .unwrap()
            })
        });
    });
}

/// 64 sessions at once: each iteration is one round of 64 concurrent requests, one per
/// session, each answered only once durable (for saves). Throughput counts requests.
fn concurrent_64(c: &mut Criterion) {
    const N: usize = 64;
    let rt = runtime();
    let mut group = c.benchmark_group("sessions_64_at_once");
    group.sampling_mode(SamplingMode::Flat);
    for setting in [PLAIN, Setting { name: "gzip6", gzip: true, encrypt: false }] {
        let dir = tempdir();
        let m = rt.block_on(open(dir.path(), setting));
        for (label, size) in &SIZES[..2] {
            let state = Arc::new(agent_state(*size));
            group.throughput(Throughput::Elements(N as u64));
            group.bench_function(BenchmarkId::new(format!("save/{}", setting.name), label), |b| {
                b.to_async(&rt).iter(|| {
                    let (m, state) = (m.clone(), state.clone());
                    async move {
                        let mut tasks = tokio::task::JoinSet::new();
                        for i in 0..N {
                            let (m, state) = (m.clone(), state.clone());
                            tasks.spawn(async move {
                                m.save_session(format!("c{i}"), &*state).await.unwrap()
                            });
                        }
                        while tasks.join_next().await.transpose().unwrap().is_some() {}
                    }
                })
            });
            group.bench_function(
                BenchmarkId::new(format!("load_warm/{}", setting.name), label),
                |b| {
                    b.to_async(&rt).iter(|| {
                        let m = m.clone();
                        async move {
                            let mut tasks = tokio::task::JoinSet::new();
                            for i in 0..N {
                                let m = m.clone();
                                tasks.spawn(async move {
                                    black_box(m.load_session(format!("c{i}")).await.unwrap())
                                });
                            }
                            while tasks.join_next().await.transpose().unwrap().is_some() {}
                        }
                    })
                },
            );
        }
        rt.block_on(m.shutdown()).unwrap();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Small samples and short windows: the whole suite runs in a few minutes on 2 cores.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500))
        .nresamples(2_000);
    targets = save, load_warm, load_warm_bytes, load_cold, checkpoints, list_checkpoints, transactional_update, concurrent_64
}
criterion_main!(benches);
