//! Crash test: a real child process saves in a loop and is killed with SIGKILL at random
//! moments; after every kill the store is reopened and checked.
//!
//! Each test re-executes this test binary (`current_exe() <test name> --exact --nocapture`)
//! with `MARS_CRASH_CHILD=<store dir>`; in that child the same test function runs the saving
//! loop instead: 4 sessions, a global sequence number that keeps rising across rounds (the
//! child resumes from what is stored), `save_session` and `create_checkpoint` mixed, payloads
//! of 1 to 20 KB derived from `(session, seq)`, and a flushed `ack <session> <seq> ...` line on
//! stdout after each call returns `Ok`. The parent kills the child 2–60 ms after its first
//! ack of the round (xorshift RNG seeded from the clock; the seed is printed and
//! `MARS_CRASH_SEED` replays the same kill delays), reads every ack the child got out,
//! reopens the store with a new `StateManager` (the dead child's lock must be free) and
//! counts, with the crash oracle it shares with `tests/syscalls.rs` (`common::oracle`):
//!
//! - **lost**: an acked save whose value is not stored (a session holding an older seq than
//!   its last acked save, or an acked checkpoint that is not listed);
//! - **corrupt**: a `load_session` / `restore_checkpoint` that fails, or returns anything
//!   but the exact payload of the seq it claims;
//! - **missing**: index and disk disagree (a checkpoint listed but not on disk or not
//!   restorable, on disk but not listed, or a stats count that differs from the files).
//!
//! All three must be 0. A stored value may be one seq ahead of the acks (the write finished,
//! the kill came before its ack), but at most one per round: only one call is in flight.
//! It also checks that no staged file survives a reopen. The parent trims each session to
//! its 12 newest checkpoints after each round so the store stays small.
//! `MARS_CRASH_ROUNDS` sets the rounds per test (default 150).
//!
//! Through the write-ahead log, the log is preallocated once and reused in place: every
//! round's child writes its frames over the older generations' frames of the rounds before
//! (each reopen replays the live generation and starts a new one). The parent checks that
//! the log stays the same file (same inode, its preallocated size) across all rounds, and
//! counts the rounds whose kill left live frames for the reopen to replay and whose next
//! generation was written over them.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::oracle::{Acked, Counts, SESSIONS, Workload, op_of, read_lines, verify_reopened};
use common::{SplitMix64, ext, staged_files, with_compression};
use mars_state::{FileStorageBackend, StateManager};
use serde_json::{Value, json};

/// Set in the child's environment to the store directory; makes the test the saving child.
const CHILD_ENV: &str = "MARS_CRASH_CHILD";
/// Checkpoints kept per session by the parent between rounds.
const KEEP_CHECKPOINTS: usize = 12;
/// A child that is never killed stops by itself after this long.
const CHILD_MAX_LIFETIME: Duration = Duration::from_secs(60);
/// Kill rounds per test unless `MARS_CRASH_ROUNDS` says otherwise.
const DEFAULT_ROUNDS: usize = 150;

#[test]
fn sigkill_while_saving_plain() {
    crash_test("sigkill_while_saving_plain", None, false);
}

#[test]
fn sigkill_while_saving_gzip() {
    crash_test("sigkill_while_saving_gzip", Some(6), false);
}

/// The same through the write-ahead log: every acknowledged save is only in the log until
/// the next reopen replays it.
#[test]
fn sigkill_while_saving_through_the_log() {
    crash_test("sigkill_while_saving_through_the_log", None, true);
}

fn crash_test(test_name: &str, compression: Option<u32>, log: bool) {
    match std::env::var_os(CHILD_ENV) {
        Some(dir) => child(Path::new(&dir), compression, log),
        None => parent(test_name, compression, log),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn open(dir: &Path, compression: Option<u32>, log: bool) -> mars_state::Result<StateManager> {
    // Waiting briefly: a child spawned by the other test of this file may hold an inherited
    // copy of the lock between its fork and its exec.
    let backend = FileStorageBackend::options()
        .lock_wait(Duration::from_secs(2))
        .write_ahead_log(log)
        .open(dir)?;
    with_compression(StateManager::builder(backend), compression).start().await
}

fn session_name(s: u64) -> String {
    format!("crash-s{s}")
}

/// A simple xorshift64 generator: reproducible from its seed, no dependency.
struct XorShift(u64);

impl XorShift {
    /// Scrambles `seed` first (splitmix64), so nearby seeds give unrelated sequences.
    fn new(seed: u64) -> Self {
        XorShift(SplitMix64(seed).next().max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The value saved at `seq`: 1 to 20 KB, fully determined by `(session, seq)`, so the
/// parent can tell a right record from a wrong or torn one.
fn payload(session: u64, seq: u64) -> Value {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = XorShift::new(
        seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (session + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
    );
    let len = 1024 + (rng.next() % (19 * 1024)) as usize;
    let mut pad = String::with_capacity(len);
    while pad.len() < len {
        let mut r = rng.next();
        for _ in 0..10 {
            if pad.len() == len {
                break;
            }
            pad.push(ALPHABET[(r & 63) as usize] as char);
            r >>= 6;
        }
    }
    let kind = if op_of(seq).1 { "checkpoint" } else { "save" };
    json!({ "session": session, "seq": seq, "kind": kind, "pad": pad })
}

/// What the child writes and the parent checks (`common::oracle`).
const WORKLOAD: Workload = Workload { session_name, payload };

// ----------------------------------------------------------------------------------------
// The child: save forever (until killed), acking each save on stdout.

fn child(dir: &Path, compression: Option<u32>, log: bool) {
    runtime().block_on(async {
        let m = open(dir, compression, log).await.unwrap();
        // Resume the sequence from what is stored, so it keeps rising across rounds.
        let mut seq = 0;
        for s in 0..SESSIONS {
            let name = session_name(s);
            if let Some(v) = m.load_session(&name).await.unwrap() {
                seq = seq.max(v["seq"].as_u64().unwrap());
            }
            if let Some(last) = m.list_checkpoints(&name).await.unwrap().last() {
                let cp = m.restore_checkpoint(&last.id).await.unwrap().unwrap();
                seq = seq.max(cp.data["seq"].as_u64().unwrap());
            }
        }
        let mut out = std::io::stdout();
        // libtest has printed "test NAME ... " without a newline: end that line so every
        // ack starts a line of its own.
        out.write_all(b"\n").unwrap();
        let started = Instant::now();
        while started.elapsed() < CHILD_MAX_LIFETIME {
            seq += 1;
            let line = WORKLOAD.apply(&m, seq).await + "\n";
            // One write of a whole line, flushed: the parent sees it even if we die next.
            out.write_all(line.as_bytes()).unwrap();
            out.flush().unwrap();
        }
        m.shutdown().await.unwrap();
    });
}

// ----------------------------------------------------------------------------------------
// The parent: kill, reopen, check, repeat.

fn parent(test_name: &str, compression: Option<u32>, log: bool) {
    let label = match (compression.is_some(), log) {
        (false, false) => "plain",
        (true, false) => "gzip",
        (false, true) => "plain, write-ahead log",
        (true, true) => "gzip, write-ahead log",
    };
    let rounds: usize = std::env::var("MARS_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    let seed: u64 =
        std::env::var("MARS_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            t.as_nanos() as u64
                ^ (u64::from(std::process::id()) << 32)
                ^ u64::from(compression.unwrap_or(0))
        });
    println!(
        "crash test ({label}): {rounds} rounds, seed {seed} (replay with MARS_CRASH_SEED={seed})"
    );
    let mut rng = XorShift::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let mut acked = Acked::new(WORKLOAD);
    let mut counts = Counts::default();
    // Log mode: the log's inode (the same file in every round) and the rounds whose kill
    // left live frames in it.
    let mut log_inode = None;
    let mut log_len = 0;
    let mut replayed_rounds = 0;

    for round in 0..rounds {
        let delay = Duration::from_millis(2 + rng.next() % 59);
        let lines = run_child_and_kill(&exe, test_name, dir.path(), delay, round);
        counts.killed += 1;
        if !staged_files(dir.path()).is_empty() {
            counts.killed_mid_write += 1;
        }
        counts.acks += acked.read(&lines, &format!("round {round}"));
        if log {
            let path = dir.path().join("metadata/.wal");
            let meta = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("round {round}: no log left by the child: {e}"));
            use std::os::unix::fs::MetadataExt;
            common::wal::assert_filled_size(meta.len(), &format!("round {round}"));
            // Filled ahead and reused: it never shrinks.
            assert!(meta.len() >= log_len, "round {round}: the log shrank");
            log_len = meta.len();
            let inode = *log_inode.get_or_insert(meta.ino());
            assert_eq!(meta.ino(), inode, "round {round}: the log was replaced, not reused");
            let frames = common::wal::live_frames(&std::fs::read(&path).unwrap()).len();
            replayed_rounds += usize::from(frames > 0);
        }
        rt.block_on(check(dir.path(), compression, log, &mut acked, &mut counts, round));
        counts.runs += 1;
        if (round + 1) % 20 == 0 {
            println!(
                "crash test ({label}): {} rounds, {:?} so far, {:.1}s",
                round + 1,
                counts,
                started.elapsed().as_secs_f64()
            );
        }
    }

    println!(
        "crash test ({label}): {} in {:.1}s, seed {seed}",
        counts.summary(),
        started.elapsed().as_secs_f64()
    );
    assert!(counts.acks >= counts.runs, "every round must ack at least once");
    counts.assert_sound();
    if log {
        println!(
            "crash test ({label}): one log file reused in place in all {rounds} rounds; {replayed_rounds} \
             kills left live frames that the reopen replayed"
        );
        // Every round acks at least once before its kill, through the log.
        assert_eq!(replayed_rounds, rounds, "a kill after an ack left no live frame in the log");
    }
}

/// Starts the child, waits for its first ack, kills it `delay` later with SIGKILL, and
/// returns every complete line it wrote.
fn run_child_and_kill(
    exe: &Path,
    test_name: &str,
    dir: &Path,
    delay: Duration,
    round: usize,
) -> Vec<String> {
    let mut child = Command::new(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let rx = read_lines(child.stdout.take().unwrap());

    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let first_ack = line.starts_with("ack ");
                lines.push(line);
                if first_ack {
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                panic!(
                    "round {round}: the child never acked ({e:?}; exit {status}); its output: {lines:?}"
                );
            }
        }
    }
    std::thread::sleep(delay);
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "round {round}: the child was not killed: {status}"
    );
    // Every line the child got out before it died: the receiver ends with its stdout.
    lines.extend(rx.iter());
    lines
}

/// Reopens the store, checks it against what was acked (`common::oracle`), then trims each
/// session to its newest checkpoints so the store stays small.
async fn check(
    dir: &Path,
    compression: Option<u32>,
    log: bool,
    acked: &mut Acked,
    counts: &mut Counts,
    round: usize,
) {
    let m = open(dir, compression, log)
        .await
        .unwrap_or_else(|e| panic!("round {round}: reopening failed: {e}"));
    verify_reopened(&m, dir, ext(compression), acked, &format!("round {round}"), counts).await;

    // Keep the store small: the next round checks what is left again.
    let mut remaining = HashSet::new();
    for s in 0..SESSIONS {
        let name = session_name(s);
        m.cleanup_checkpoints(&name, KEEP_CHECKPOINTS).await.unwrap();
        remaining
            .extend(m.list_checkpoints(&name).await.unwrap().into_iter().map(|c| c.id.to_string()));
    }
    acked.retain_checkpoints(|id| remaining.contains(id));
    m.shutdown().await.unwrap();
}
