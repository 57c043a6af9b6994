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
//! `MARS_CRASH_SEED` replays the same kill delays), reads every ack the child got out, reopens the
//! store with a new `StateManager` (the dead child's lock must be free) and counts:
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

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Ack, SplitMix64, ext, parse_ack, with_compression};
use mars_state::{FileStorageBackend, StateManager};
use serde_json::{Value, json};

/// Set in the child's environment to the store directory; makes the test the saving child.
const CHILD_ENV: &str = "MARS_CRASH_CHILD";
const SESSIONS: u64 = 4;
const BRANCH: &str = "main";
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

/// What operation `seq` is: every third one a checkpoint, the rest session saves; sessions
/// take turns, so every session gets both kinds.
fn op_of(seq: u64) -> (u64, bool) {
    (seq % SESSIONS, seq.is_multiple_of(3))
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
            let (s, checkpoint) = op_of(seq);
            let name = session_name(s);
            let value = payload(s, seq);
            let line = if checkpoint {
                let id = m.create_checkpoint(&name, BRANCH, &value).await.unwrap();
                format!("ack {s} {seq} cp {id}\n")
            } else {
                m.save_session(&name, &value).await.unwrap();
                format!("ack {s} {seq} save\n")
            };
            // One write of a whole line, flushed: the parent sees it even if we die next.
            out.write_all(line.as_bytes()).unwrap();
            out.flush().unwrap();
        }
        m.shutdown().await.unwrap();
    });
}

// ----------------------------------------------------------------------------------------
// The parent: kill, reopen, check, repeat.

/// What the parent knows from the acks it has read.
#[derive(Default)]
struct Model {
    /// Highest acked session-save seq per session (0: none yet).
    acked_save: [u64; SESSIONS as usize],
    /// Every acked seq (saves and checkpoints).
    acked: HashSet<u64>,
    /// The highest seq ever acked.
    max_acked: u64,
    /// Acked checkpoints not yet trimmed by the parent: id -> (session, seq).
    acked_checkpoints: HashMap<String, (u64, u64)>,
    /// Stored seqs already counted as "stored without an ack", so each counts once.
    unacked_seen: HashSet<u64>,
}

#[derive(Default, Debug)]
struct Counts {
    rounds: usize,
    acks: usize,
    lost: usize,
    corrupt: usize,
    missing: usize,
    /// Saves that completed but were killed before their ack was printed (allowed).
    stored_unacked: usize,
    /// Kills that left a staged file behind, i.e. landed in the middle of a write.
    killed_mid_write: usize,
    /// Staged files found after a reopen (must be 0: opening sweeps them).
    staged_left: usize,
}

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
    let mut model = Model::default();
    let mut counts = Counts::default();

    for round in 0..rounds {
        let delay = Duration::from_millis(2 + rng.next() % 59);
        let lines = run_child_and_kill(&exe, test_name, dir.path(), delay, round);
        if staged_files(dir.path(), false) > 0 {
            counts.killed_mid_write += 1;
        }
        let mut last_seq = 0;
        for line in lines.iter().filter(|l| l.starts_with("ack ")) {
            let Ack { session: s, seq, checkpoint } = parse_ack(line);
            assert!(
                seq > last_seq && seq > model.max_acked,
                "round {round}: ack seqs must keep rising: {line}"
            );
            assert_eq!(
                (s, checkpoint.is_some()),
                op_of(seq),
                "round {round}: unexpected ack {line}"
            );
            last_seq = seq;
            model.max_acked = seq;
            model.acked.insert(seq);
            if let Some(id) = checkpoint {
                model.acked_checkpoints.insert(id.to_owned(), (s, seq));
            } else {
                model.acked_save[s as usize] = seq;
            }
            counts.acks += 1;
        }
        let unacked_before = counts.stored_unacked;
        rt.block_on(check(dir.path(), compression, log, &mut model, &mut counts, round));
        // Only the one operation in flight at the kill can be stored without an ack.
        assert!(
            counts.stored_unacked - unacked_before <= 1,
            "round {round}: several unacked writes are stored"
        );
        counts.rounds += 1;
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
        "crash test ({label}): rounds={} acks={} lost={} corrupt={} missing={} \
         (stored but unacked={}, kills mid-write={}, staged files left after reopen={}) in {:.1}s, seed {seed}",
        counts.rounds,
        counts.acks,
        counts.lost,
        counts.corrupt,
        counts.missing,
        counts.stored_unacked,
        counts.killed_mid_write,
        counts.staged_left,
        started.elapsed().as_secs_f64()
    );
    assert!(counts.acks >= counts.rounds, "every round must ack at least once");
    assert_eq!((counts.lost, counts.corrupt, counts.missing), (0, 0, 0), "{counts:?}");
    assert_eq!(counts.staged_left, 0, "staged files survived a reopen");
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
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                // A last line without its newline was cut off by the kill: not an ack.
                Ok(_) if buf.ends_with(b"\n") => {
                    let _ = tx.send(String::from_utf8_lossy(&buf).trim_end().to_owned());
                }
                _ => break,
            }
        }
    });

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
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    lines
}

/// Reopens the store and checks it against what was acked.
async fn check(
    dir: &Path,
    compression: Option<u32>,
    log: bool,
    model: &mut Model,
    counts: &mut Counts,
    round: usize,
) {
    let m = open(dir, compression, log)
        .await
        .unwrap_or_else(|e| panic!("round {round}: reopening failed: {e}"));
    counts.staged_left += staged_files(dir, true);
    let ext = ext(compression);
    let mut on_disk_total = 0;

    for s in 0..SESSIONS {
        let name = session_name(s);
        // The session record: readable, exactly some seq's payload, not older than the last ack.
        match m.load_session(&name).await {
            Ok(Some(v)) => match v["seq"].as_u64() {
                Some(seq)
                    if v == payload(s, seq)
                        && op_of(seq) == (s, false)
                        && seq <= model.max_acked + 1 =>
                {
                    if seq < model.acked_save[s as usize] {
                        eprintln!(
                            "round {round}: LOST: {name} holds seq {seq}, acked {}",
                            model.acked_save[s as usize]
                        );
                        counts.lost += 1;
                    }
                    if !model.acked.contains(&seq) && model.unacked_seen.insert(seq) {
                        counts.stored_unacked += 1;
                    }
                }
                _ => {
                    eprintln!(
                        "round {round}: CORRUPT: {name} holds a value that is no save's payload"
                    );
                    counts.corrupt += 1;
                }
            },
            Ok(None) => {
                if model.acked_save[s as usize] > 0 {
                    eprintln!(
                        "round {round}: LOST: {name} has no state, acked {}",
                        model.acked_save[s as usize]
                    );
                    counts.lost += 1;
                }
            }
            Err(e) => {
                eprintln!("round {round}: CORRUPT: load_session({name}): {e}");
                counts.corrupt += 1;
            }
        }

        // Checkpoints: the index agrees with the files, and every listed one restores.
        let listed = m.list_checkpoints(&name).await.unwrap();
        let listed_ids: BTreeSet<String> = listed.iter().map(|c| c.id.to_string()).collect();
        let on_disk = checkpoint_files(dir, &name, ext);
        on_disk_total += on_disk.len();
        for id in listed_ids.symmetric_difference(&on_disk) {
            let side = if on_disk.contains(id) {
                "on disk but not listed"
            } else {
                "listed but not on disk"
            };
            eprintln!("round {round}: MISSING: checkpoint {id} of {name} is {side}");
            counts.missing += 1;
        }
        for info in &listed {
            match m.restore_checkpoint(&info.id).await {
                Ok(Some(cp)) => {
                    let seq = cp.data["seq"].as_u64();
                    let ok = cp.session_id.as_str() == name
                        && cp.branch_id.as_str() == BRANCH
                        && cp.id == info.id
                        && seq.is_some_and(|q| {
                            cp.data == payload(s, q)
                                && op_of(q) == (s, true)
                                && q <= model.max_acked + 1
                        });
                    if !ok {
                        eprintln!(
                            "round {round}: CORRUPT: checkpoint {} of {name} holds the wrong value",
                            info.id
                        );
                        counts.corrupt += 1;
                    } else if let Some(q) = seq
                        && !model.acked.contains(&q)
                        && model.unacked_seen.insert(q)
                    {
                        counts.stored_unacked += 1;
                    }
                }
                Ok(None) => {
                    eprintln!(
                        "round {round}: MISSING: listed checkpoint {} of {name} does not restore",
                        info.id
                    );
                    counts.missing += 1;
                }
                Err(e) => {
                    eprintln!("round {round}: CORRUPT: restore_checkpoint({}): {e}", info.id);
                    counts.corrupt += 1;
                }
            }
        }
        for (id, (_, seq)) in model.acked_checkpoints.iter().filter(|(_, (cs, _))| *cs == s) {
            if !listed_ids.contains(id) {
                eprintln!(
                    "round {round}: LOST: acked checkpoint {id} (seq {seq}) of {name} is not listed"
                );
                counts.lost += 1;
            }
        }
    }
    let stats = m.get_storage_stats().await.unwrap();
    if stats.checkpoint_count != on_disk_total {
        eprintln!(
            "round {round}: MISSING: stats count {} checkpoints, {on_disk_total} on disk",
            stats.checkpoint_count
        );
        counts.missing += stats.checkpoint_count.abs_diff(on_disk_total);
    }

    // Keep the store small: the next round checks what is left again.
    let mut remaining = HashSet::new();
    for s in 0..SESSIONS {
        let name = session_name(s);
        m.cleanup_checkpoints(&name, KEEP_CHECKPOINTS).await.unwrap();
        remaining
            .extend(m.list_checkpoints(&name).await.unwrap().into_iter().map(|c| c.id.to_string()));
    }
    model.acked_checkpoints.retain(|id, _| remaining.contains(id));
    m.shutdown().await.unwrap();
}

/// Checkpoint ids with a record file in `checkpoints/<session>/` (staged files excluded).
fn checkpoint_files(dir: &Path, session: &str, ext: &str) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(dir.join("checkpoints").join(session)) else {
        return BTreeSet::new();
    };
    entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .map(|n| n.strip_suffix(ext).map(str::to_owned).unwrap_or(n))
        .collect()
}

/// Staged files (`.NAME.tmp-RANDOM`) anywhere under the store; `report` prints each.
fn staged_files(dir: &Path, report: bool) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if name.starts_with('.') && name.contains(".tmp-") {
                if report {
                    eprintln!("staged file left after reopen: {}", e.path().display());
                }
                n += 1;
            }
        }
    }
    n
}
