//! Save, load and list figures for 1 KB, 100 KB and 1 MB states on the file backend, each
//! next to the raw durable-write loop (write a staged file, fdatasync, rename, fsync the
//! directory) measured in the same run, so the ratio is what to read on a noisy machine.
//!
//! Run: `cargo bench --bench core` (add `-- --quick` for a shorter run).

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use mars_state::{EncryptionKey, FileStorageBackend, StateManager};
use serde_json::{Value, json};

fn state_of(size: usize) -> Value {
    let msg = "x".repeat(100);
    let n = (size / 110).max(1);
    json!({"step": 1, "messages": (0..n).map(|i| format!("{i}:{msg}")).collect::<Vec<_>>()})
}

/// Runs `f` repeatedly for about `budget`, returning operations per second (median of 3).
fn rate(budget: Duration, mut f: impl FnMut()) -> f64 {
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget / 3 || n < 3 {
            f();
            n += 1;
        }
        rates.push(n as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    rates[1]
}

fn raw_durable_write(dir: &Path, bytes: &[u8], i: u64) {
    let staged = dir.join(format!(".raw.tmp-{i}"));
    let mut f = OpenOptions::new().write(true).create_new(true).open(&staged).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_data().unwrap();
    drop(f);
    std::fs::rename(&staged, dir.join("raw.json")).unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 600 } else { 3000 });
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("{:<34} {:>12} {:>12} {:>8}", "operation", "mars-state", "raw loop", "ratio");
    for (label, size) in [("1 KB", 1_000), ("100 KB", 100_000), ("1 MB", 1_000_000)] {
        let state = state_of(size);
        let bytes = serde_json::to_vec(&state).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let raw_dir = dir.path().join("raw");
        std::fs::create_dir(&raw_dir).unwrap();
        let mut i = 0;
        let raw = rate(budget, || {
            i += 1;
            raw_durable_write(&raw_dir, &bytes, i)
        });

        let store = dir.path().join("store");
        let manager =
            rt.block_on(StateManager::start(FileStorageBackend::new(&store).unwrap())).unwrap();
        let save = rate(budget, || rt.block_on(manager.save_session("bench", &state)).unwrap());
        println!(
            "{:<34} {:>10.0}/s {:>10.0}/s {:>7.2}x",
            format!("save {label} (durable)"),
            save,
            raw,
            save / raw
        );

        let warm = rate(budget, || {
            rt.block_on(manager.load_session("bench")).unwrap().unwrap();
        });
        println!(
            "{:<34} {:>10.0}/s {:>10.0}/s {:>7.2}x",
            format!("load {label} (session in memory)"),
            warm,
            raw,
            warm / raw
        );
        rt.block_on(manager.shutdown()).unwrap();

        // Cold: a fresh manager each time, so the state comes from disk (page cache).
        let cold = rate(budget, || {
            let m =
                rt.block_on(StateManager::start(FileStorageBackend::new(&store).unwrap())).unwrap();
            rt.block_on(m.load_session("bench")).unwrap().unwrap();
            rt.block_on(m.shutdown()).unwrap();
        });
        println!(
            "{:<34} {:>10.0}/s {:>10.0}/s {:>7.2}x",
            format!("open + load {label} (cold)"),
            cold,
            raw,
            cold / raw
        );

        // 1,000 checkpoints, then list them (from the index: no state is read).
        let m = rt.block_on(StateManager::start(FileStorageBackend::new(&store).unwrap())).unwrap();
        let cp_state = if size > 100_000 { state_of(100_000) } else { state.clone() };
        let n_cp = if quick { 200 } else { 1000 };
        let t = Instant::now();
        for _ in 0..n_cp {
            rt.block_on(m.create_checkpoint("bench", "main", &cp_state)).unwrap();
        }
        let cp_rate = n_cp as f64 / t.elapsed().as_secs_f64();
        println!(
            "{:<34} {:>10.0}/s {:>10.0}/s {:>7.2}x",
            format!("create checkpoint {}", if size > 100_000 { "100 KB" } else { label }),
            cp_rate,
            raw,
            cp_rate / raw
        );
        let list = rate(budget, || {
            assert_eq!(rt.block_on(m.list_checkpoints("bench")).unwrap().len(), n_cp);
        });
        println!("{:<34} {:>10.3} ms", format!("list {n_cp} checkpoints"), 1000.0 / list);
        rt.block_on(m.shutdown()).unwrap();
    }

    // Encryption at rest, on against off, same run: durable saves, and loads after a restart
    // (each reads and, when on, decrypts a record from storage).
    println!();
    println!("{:<34} {:>12} {:>12} {:>8}", "encryption", "on", "off", "on/off");
    for (label, size) in [("1 KB", 1_000), ("100 KB", 100_000)] {
        let state = state_of(size);
        let mut figures = Vec::new();
        for encrypted in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut b = StateManager::builder(FileStorageBackend::new(dir.path()).unwrap());
            if encrypted {
                b = b.encryption_key(EncryptionKey::from_bytes([7; 32]));
            }
            let m = rt.block_on(b.start()).unwrap();
            let save = rate(budget, || rt.block_on(m.save_session("bench", &state)).unwrap());
            for i in 0..200 {
                rt.block_on(m.save_session(format!("cold{i}"), &state)).unwrap();
            }
            rt.block_on(m.shutdown()).unwrap();
            // After a restart every load reads (and decrypts) a record from storage.
            let mut b = StateManager::builder(FileStorageBackend::new(dir.path()).unwrap());
            if encrypted {
                b = b.encryption_key(EncryptionKey::from_bytes([7; 32]));
            }
            let m = rt.block_on(b.start()).unwrap();
            let t = Instant::now();
            for i in 0..200 {
                rt.block_on(m.load_session(format!("cold{i}"))).unwrap().unwrap();
            }
            let load = 200.0 / t.elapsed().as_secs_f64();
            rt.block_on(m.shutdown()).unwrap();
            figures.push((save, load));
        }
        let ((se, le), (sp, lp)) = (figures[0], figures[1]);
        println!(
            "{:<34} {:>10.0}/s {:>10.0}/s {:>7.2}x",
            format!("save {label} (durable)"),
            se,
            sp,
            se / sp
        );
        println!(
            "{:<34} {:>10.0}/s {:>10.0}/s {:>7.2}x",
            format!("load {label} after a restart"),
            le,
            lp,
            le / lp
        );
    }
}
