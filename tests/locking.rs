//! Pins the store lock and the store's file permissions.
//!
//! - A second `FileStorageBackend` on an open store, in this process or in another one,
//!   fails at once with `ErrorKind::Locked` and changes nothing on disk; the lock goes away
//!   when the manager is shut down and dropped (at once, even while other threads start
//!   child processes that briefly hold copies of its descriptor), and when the holding
//!   process is killed.
//! - Records, logs and metadata are created `0600`, directories `0700`.
//!
//! The cross-process tests re-run this test binary as a child (`--exact` one of the
//! `child_*` tests, selected by an environment variable); without that variable the
//! `child_*` tests do nothing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Node, flip_byte, open_quiet, plain_and_compressed, reopen_within, session_file, snapshot,
    stdout_of_success, temp_store,
};
use mars_state::{ErrorKind, FileStorageBackend, StateError, StateManager};
use serde_json::json;

/// Set in a child: the store the child probes (tries to open, prints the outcome, exits).
const PROBE_ENV: &str = "MARS_STATE_LOCKING_PROBE_DIR";
/// Set in a child: the store the child opens and holds until it is killed.
const HOLD_ENV: &str = "MARS_STATE_LOCKING_HOLD_DIR";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn expect_locked<T>(r: Result<T, StateError>, base: &Path) {
    match r {
        Ok(_) => panic!("a second backend on {} opened while the first holds it", base.display()),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Locked, "wrong error kind: {e}");
            let StateError::Locked { path } = &e else { panic!("not StateError::Locked: {e:?}") };
            assert!(
                path.starts_with(base),
                "lock path {} is not inside the store {}",
                path.display(),
                base.display()
            );
            let msg = e.to_string();
            assert!(msg.contains("locked"), "message does not say the store is locked: {msg}");
        }
    }
}

/// Runs this test binary as a child executing only `test`, with `env` set.
fn child(test: &str, env: (&str, &Path)) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .env_remove(if env.0 == PROBE_ENV { HOLD_ENV } else { PROBE_ENV })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs a probe child against `base`; returns what it printed after `LOCK_PROBE=` and how
/// long it took. Kills the child if it has not answered within 10 s (a blocking lock).
fn probe(base: &Path) -> (String, Duration) {
    let started = Instant::now();
    let mut c = child("child_probe_store", (PROBE_ENV, base)).spawn().unwrap();
    loop {
        if c.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = c.kill();
            let _ = c.wait();
            panic!("the probe child did not answer within 10 s: opening a locked store blocks");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = started.elapsed();
    let stdout = stdout_of_success(c.wait_with_output().unwrap(), "probe child");
    let answer = stdout
        .lines()
        .find_map(|l| l.split_once("LOCK_PROBE=").map(|(_, a)| a.trim()))
        .unwrap_or_else(|| panic!("probe child printed no answer:\n{stdout}"))
        .to_owned();
    (answer, elapsed)
}

/// Starts a manager on `backend` and checks that session `s1` holds `{"step": step}`.
async fn reopened_with_step(backend: impl mars_state::StorageBackend, step: u64) -> StateManager {
    let m = StateManager::start(backend).await.unwrap();
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": step})));
    m
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

// ---------------------------------------------------------------------------------------
// Child entry points (no-ops unless the parent set their variable)
// ---------------------------------------------------------------------------------------

/// Child: tries to open the store named by `PROBE_ENV`, prints `LOCK_PROBE=<kind>` or
/// `LOCK_PROBE=Ok`, and exits.
#[test]
fn child_probe_store() {
    let Some(dir) = std::env::var_os(PROBE_ENV) else { return };
    let answer = match FileStorageBackend::new(PathBuf::from(dir)) {
        Ok(_) => "Ok".to_owned(),
        Err(e) => format!("{:?}", e.kind()),
    };
    // A line of its own: libtest has already printed "test child_probe_store ... ".
    println!("\nLOCK_PROBE={answer}");
    std::io::stdout().flush().unwrap();
}

/// Child: opens the store named by `HOLD_ENV`, prints `LOCK_HELD`, and sleeps until killed
/// (at most 60 s).
#[test]
fn child_hold_store() {
    let Some(dir) = std::env::var_os(HOLD_ENV) else { return };
    let backend = FileStorageBackend::new(PathBuf::from(dir)).unwrap();
    println!("\nLOCK_HELD");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
    drop(backend);
}

// ---------------------------------------------------------------------------------------
// Same process
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_backend_in_this_process_is_locked() {
    let (_dir, base) = temp_store("store");
    let first = FileStorageBackend::new(&base).unwrap();
    expect_locked(FileStorageBackend::new(&base), &base);
    // Also through another spelling of the same path.
    expect_locked(FileStorageBackend::new(base.join("sessions").join("..")), &base);
    drop(first);
    let again =
        FileStorageBackend::new(&base).expect("the lock is released when the backend is dropped");
    drop(again);
}

/// Another thread of the process starting child processes: each child holds a copy of every
/// descriptor (the lock file's too) until it calls `exec`. Dropping a backend must still
/// release the store at once, so that an open right after the drop succeeds every time.
#[test]
fn lock_is_released_at_drop_while_other_threads_start_processes() {
    let (_dir, base) = temp_store("store");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spawner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut started = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut child = Command::new("true").spawn().expect("start `true`");
                child.wait().expect("wait for `true`");
                started += 1;
            }
            started
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        let first = FileStorageBackend::new(&base).unwrap_or_else(|e| {
            panic!("round {rounds}: the store was not released by the previous drop: {e}")
        });
        drop(first);
        rounds += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let started = spawner.join().unwrap();
    assert!(rounds > 10 && started > 10, "too little overlap: {rounds} opens, {started} children");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_is_held_while_the_manager_runs_and_released_by_shutdown() {
    let (_dir, base) = temp_store("store");
    let m = open_quiet(&base, None).await;
    m.save_session("s1", &json!({"step": 1})).await.unwrap();
    expect_locked(FileStorageBackend::new(&base), &base);
    let before = snapshot(&base);
    expect_locked(FileStorageBackend::new(&base), &base);
    assert_eq!(snapshot(&base), before, "a refused open changed the store");

    m.shutdown().await.unwrap();
    // shutdown() documents that it releases the store, even while the handle lives on.
    let b = FileStorageBackend::new(&base).expect("the lock is released by shutdown()");
    drop(b);
    drop(m);
    let m2 =
        reopened_with_step(FileStorageBackend::new(&base).expect("reopen after drop"), 1).await;
    m2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_is_released_when_the_last_handle_is_dropped_without_shutdown() {
    let (_dir, base) = temp_store("store");
    let m = open_quiet(&base, None).await;
    m.save_session("s1", &json!({"step": 1})).await.unwrap();
    let clone = m.clone();
    drop(m);
    expect_locked(FileStorageBackend::new(&base), &base);
    drop(clone);
    let m2 = reopened_with_step(reopen_within(&base, Duration::from_secs(5)).await, 1).await;
    m2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_clone_of_a_backend_holds_the_lock() {
    let (_dir, base) = temp_store("store");
    let first = FileStorageBackend::new(&base).unwrap();
    let clone = first.clone();
    drop(first);
    expect_locked(FileStorageBackend::new(&base), &base);
    drop(clone);
    FileStorageBackend::new(&base).expect("released after the last clone is dropped");
}

// ---------------------------------------------------------------------------------------
// Another process
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_process_gets_locked_at_once_and_changes_nothing() {
    let (dir, base) = temp_store("store");
    let m = open_quiet(&base, None).await;
    m.save_session("s1", &json!({"step": 1})).await.unwrap();
    let cp = m.create_checkpoint("s1", "main", &json!({"step": 1})).await.unwrap();
    let before = snapshot(dir.path());

    let (answer, took) = probe(&base);
    println!("second process answered {answer:?} in {took:?}");
    assert_eq!(answer, "Locked", "a second process opening the store must get ErrorKind::Locked");
    assert!(
        took < Duration::from_secs(1),
        "the second process took {took:?} to answer (limit 1 s)"
    );
    assert_eq!(snapshot(dir.path()), before, "the refused second process changed the store");

    // The first process is unaffected.
    assert_eq!(m.load_session("s1").await.unwrap(), Some(json!({"step": 1})));
    m.save_session("s1", &json!({"step": 2})).await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);

    // Released: the second process may open it now.
    let (answer, _) = probe(&base);
    assert_eq!(answer, "Ok", "after shutdown and drop the store must open in another process");

    let m = reopened_with_step(FileStorageBackend::new(&base).unwrap(), 2).await;
    assert_eq!(m.restore_checkpoint(&cp).await.unwrap().unwrap().data, json!({"step": 1}));
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_of_a_killed_process_is_released() {
    let (_dir, base) = temp_store("store");
    {
        let m = open_quiet(&base, None).await;
        m.save_session("s1", &json!({"step": 7})).await.unwrap();
        m.shutdown().await.unwrap();
    }
    let mut holder = child("child_hold_store", (HOLD_ENV, &base)).spawn().unwrap();
    let stdout = holder.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim() == "LOCK_HELD" {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(20)).is_err() {
        let _ = holder.kill();
        let _ = holder.wait();
        panic!("the holding child never reported LOCK_HELD");
    }
    expect_locked(FileStorageBackend::new(&base), &base);
    holder.kill().unwrap(); // SIGKILL: no destructor runs, the OS drops the lock
    holder.wait().unwrap();
    let b = FileStorageBackend::new(&base).expect("the OS releases the lock of a killed process");
    reopened_with_step(b, 7).await.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Permissions
// ---------------------------------------------------------------------------------------

/// Builds a store with every kind of file the backend creates: records, checkpoints, the
/// journal, store metadata, the lock, a pending-delete directory and a quarantine copy.
async fn populate(base: &Path, compression: Option<u32>) {
    let m = open_quiet(base, compression).await;
    m.save_session("s1", &json!({"secret": "token"})).await.unwrap();
    m.save_session("s1", &json!({"secret": "token2"})).await.unwrap();
    m.create_checkpoint("s1", "main", &json!({"step": 1})).await.unwrap();
    m.save_session("doomed", &json!(1)).await.unwrap();
    m.create_checkpoint("doomed", "main", &json!(1)).await.unwrap();
    assert!(m.delete_session("doomed").await.unwrap());
    m.save_session("broken", &json!({"x": 1})).await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);
    // Damage a record so that reading it writes a quarantine copy.
    flip_byte(&session_file(base, "broken", compression), |len| len / 2, 0xff);
    let m = open_quiet(base, compression).await;
    assert_eq!(m.load_session("broken").await.unwrap_err().kind(), ErrorKind::Corrupt);
    m.shutdown().await.unwrap();
}

fn check_permissions(base: &Path) {
    let mut bad = Vec::new();
    let mut files = 0;
    let mut dirs = 0;
    for (rel, node) in snapshot(base) {
        let path = base.join(&rel);
        let m = mode(&path);
        match node {
            Node::Dir => {
                dirs += 1;
                if m != 0o700 {
                    bad.push(format!("directory {} is {m:o}, expected 700", rel.display()));
                }
            }
            Node::File(_) => {
                files += 1;
                if m != 0o600 {
                    bad.push(format!("file {} is {m:o}, expected 600", rel.display()));
                }
            }
            other => bad.push(format!("unexpected {other:?} at {}", rel.display())),
        }
    }
    for must in
        ["sessions", "checkpoints", "checkpoints/s1", "metadata", "metadata/pending", "quarantine"]
    {
        assert!(base.join(must).is_dir(), "{must} was not created");
    }
    assert!(
        std::fs::read_dir(base.join("quarantine")).unwrap().count() > 0,
        "no quarantine copy was written"
    );
    assert!(files >= 6 && dirs >= 6, "too few files ({files}) or directories ({dirs}) to check");
    assert!(bad.is_empty(), "wrong permissions:\n{}", bad.join("\n"));
}

async fn populated_store_has_private_permissions(compression: Option<u32>) {
    let (_dir, base) = temp_store("store");
    populate(&base, compression).await;
    check_permissions(&base);
}

plain_and_compressed! {
    files_are_0600_and_directories_0700,
    files_are_0600_and_directories_0700_compressed => populated_store_has_private_permissions;
}

/// The backend's docs say "Files are created 0600, directories 0700"; the store's base
/// directory, when the backend creates it, is one of those directories.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_directory_created_by_the_backend_is_0700() {
    let (_dir, base) = temp_store("tmp/store");
    drop(FileStorageBackend::new(&base).unwrap());
    let m = mode(&base);
    assert_eq!(m, 0o700, "the base directory {} was created {m:o}, expected 700", base.display());
}
