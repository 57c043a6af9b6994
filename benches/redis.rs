//! The Redis backend against plain Redis, in one run on one private `redis-server` with
//! `appendonly yes` and `appendfsync always` (the settings the durable mode requires):
//!
//! - a durable save of a 1 KB state through a `StateManager`, 64 sessions saving at once
//!   (their writes queue together and go out in one pipeline, sharing one AOF fsync), against
//!   one client doing one `SET` of 1 KB per round trip, sequentially: the ratio is printed;
//! - a save from one session at a time; a load of a live session (from the manager's
//!   memory) and a `get` straight from Redis (what a cold load costs).
//!
//! Run: `cargo bench --features redis --bench redis` (needs `redis-server` on PATH). The
//! server's directory is under `$MARS_STATE_BENCH_DIR` if set, else the system temporary
//! directory: it must be a real disk for figures that mean anything (fsync on tmpfs is
//! free). `MARS_REDIS_BENCH_SECS` sets the time of each measurement (default 3).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::time::{Duration, Instant};

use common::redis::{backend, manager, plain_sets_per_sec};
use common::redis_server::Server;
use common::{SIZES, agent_state, saves_per_sec, state_1kb};
use mars_state::{RedisStorageBackend, StateManager, StorageBackend, StorageKey};

const SESSIONS: usize = 64;
/// How long the savers run before their saves are counted.
const WARM_UP: Duration = Duration::from_millis(300);

fn secs() -> Duration {
    let s = std::env::var("MARS_REDIS_BENCH_SECS").ok().and_then(|s| s.parse().ok());
    Duration::from_secs_f64(s.unwrap_or(3.0))
}

/// Loads of one 1 KB session, one after another, for `time`: loads/s.
async fn loads_per_sec(m: &StateManager, time: Duration) -> f64 {
    m.save_session("bench-load", &agent_state(SIZES[0].1)).await.unwrap();
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < time {
        assert!(m.load_session("bench-load").await.unwrap().is_some());
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `get`s of one stored 1 KB record straight from the backend (one Redis round trip each,
/// as a manager's cold load after a restart makes), one after another, for `time`: gets/s.
async fn gets_per_sec(b: &RedisStorageBackend, time: Duration) -> f64 {
    let key = StorageKey::new("sessions/bench-get.json").unwrap();
    b.put(&key, vec![b'x'; 1000]).await.unwrap();
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < time {
        assert!(b.get(&key).await.unwrap().is_some());
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; a filter or `--test` run (cargo test --benches) only
    // checks that the bench starts.
    let quick = std::env::args().any(|a| a == "--test");
    let time = if quick { Duration::from_millis(200) } else { secs() };
    if let Some(root) = std::env::var_os("MARS_STATE_BENCH_DIR") {
        std::fs::create_dir_all(&root).unwrap();
        in_bench_dir(root);
    }
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let server = Server::start();
    let url = server.url();
    rt.block_on(async {
        let backend = backend(&url, "bench").await;
        let reads = backend.clone();
        let m = manager(backend).await;
        let state = state_1kb();
        // Ours and plain SET in turns, three times: the machine's load changes over a run,
        // so each ratio compares two measurements taken side by side; the median is printed.
        let mut ratios = Vec::new();
        let (mut best_ours, mut best_plain) = (0f64, 0f64);
        for _ in 0..3 {
            let ours = saves_per_sec(&m, SESSIONS, &state, WARM_UP, time).await;
            let plain = plain_sets_per_sec(&url, time).await;
            ratios.push(ours / plain);
            (best_ours, best_plain) = (best_ours.max(ours), best_plain.max(plain));
            println!("  64 sessions {ours:>7.0} saves/s | plain SET {plain:>7.0}/s | {:.2}x", ours / plain);
        }
        ratios.sort_by(f64::total_cmp);
        let ours_1 = saves_per_sec(&m, 1, &state, WARM_UP, time).await;
        let loads = loads_per_sec(&m, time).await;
        let gets = gets_per_sec(&reads, time).await;
        m.shutdown().await.unwrap();
        println!("redis-server with appendonly yes, appendfsync always; 1 KB states; {time:?} each");
        println!("  StateManager save, {SESSIONS} sessions at once : {best_ours:>9.0} saves/s (best of 3)");
        println!("  plain SET, one client, one per round trip  : {best_plain:>9.0} SETs/s (best of 3)");
        println!("  ratio (ours, 64 sessions / plain SET)      : {:>9.2}x (median of 3)", ratios[1]);
        println!(
            "  StateManager save, 1 session              : {ours_1:>9.0} saves/s ({:.0} us each)",
            1e6 / ours_1
        );
        println!(
            "  StateManager load, 1 session (in memory)  : {loads:>9.0} loads/s ({:.0} us each)",
            1e6 / loads
        );
        println!(
            "  backend get of a 1 KB record (from Redis) : {gets:>9.0} gets/s ({:.0} us each)",
            1e6 / gets
        );
    });
    drop(server);
}

/// Makes `root` the temporary directory (where the server's directory is made): tempfile
/// reads `TMPDIR`, which this process cannot set safely (`set_var` is unsafe), so it runs
/// itself again with it set, and exits with that run's status.
fn in_bench_dir(root: std::ffi::OsString) {
    if std::env::var_os("TMPDIR").as_deref() != Some(root.as_os_str()) {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env("TMPDIR", &root)
            .status()
            .unwrap();
        std::process::exit(status.code().unwrap_or(1));
    }
}
