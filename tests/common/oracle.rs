//! The crash oracle of the tests that kill a saving child process (`tests/crash.rs`: SIGKILL
//! at random delays; `tests/syscalls.rs`: SIGKILL just before the Nth system call; the
//! SQLite, PostgreSQL and Redis backends' tests: SIGKILL of the child, or of the server, at
//! random delays). It owns the workload the children run (4 sessions, every third operation
//! a checkpoint), the ack lines they print, the parent's model of what was acknowledged
//! ([`Acked`]) and the check of a reopened store against that model ([`verify_reopened`] for
//! a file store, [`verify_store`] for any, summed in [`Counts`]). For the backends' tests it
//! also owns the whole kill loop ([`crash_rounds`]: start the child, kill it, check, repeat)
//! and the child's saving loop ([`save_until_killed`]), and the test that a manager's state
//! survives a reopen ([`state_survives_reopen`]). It calls only the public `StateManager` and
//! `StorageBackend` API and reads the store's files.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use mars_state::{StateManager, StorageBackend, StorageKey};
use serde_json::{Value, json};

use super::staged_files;

/// Sessions the workload writes to.
pub const SESSIONS: u64 = 4;
/// The branch of every checkpoint the workload creates.
pub const BRANCH: &str = "main";

/// What operation `seq` is: (session, is a checkpoint). Every third one is a checkpoint, the
/// rest session saves; sessions take turns, so every session gets both kinds.
pub fn op_of(seq: u64) -> (u64, bool) {
    (seq % SESSIONS, seq.is_multiple_of(3))
}

/// One test's workload: how it names session number `s`, and the value operation `seq`
/// writes for session `s` (fully determined by the two, so the parent can tell a right
/// record from a wrong or torn one).
#[derive(Clone, Copy)]
pub struct Workload {
    pub session_name: fn(u64) -> String,
    pub payload: fn(u64, u64) -> Value,
}

impl Workload {
    /// Performs operation `seq` on `m` (a save or a checkpoint, see [`op_of`]) and returns
    /// the ack line (without its newline) the child prints once the call returned `Ok`.
    pub async fn apply(&self, m: &StateManager, seq: u64) -> String {
        self.try_apply(m, seq).await.unwrap()
    }

    /// [`apply`](Self::apply), returning the call's error instead of panicking.
    pub async fn try_apply(&self, m: &StateManager, seq: u64) -> mars_state::Result<String> {
        let (s, checkpoint) = op_of(seq);
        let name = (self.session_name)(s);
        let value = (self.payload)(s, seq);
        Ok(if checkpoint {
            let id = m.create_checkpoint(&name, BRANCH, &value).await?;
            format!("ack {s} {seq} cp {id}")
        } else {
            m.save_session(&name, &value).await?;
            format!("ack {s} {seq} save")
        })
    }

    /// The highest seq stored in `m` (0 if none): a child resumes after it, so seqs keep
    /// rising across the rounds on one store.
    pub async fn last_stored_seq(&self, m: &StateManager) -> u64 {
        let mut seq = 0;
        for s in 0..SESSIONS {
            let name = (self.session_name)(s);
            if let Some(v) = m.load_session(&name).await.unwrap() {
                seq = seq.max(v["seq"].as_u64().unwrap());
            }
            if let Some(last) = m.list_checkpoints(&name).await.unwrap().last() {
                let cp = m.restore_checkpoint(&last.id).await.unwrap().unwrap();
                seq = seq.max(cp.data["seq"].as_u64().unwrap());
            }
        }
        seq
    }
}

/// One acknowledgement a saving child printed after a call returned `Ok`:
/// `ack <session> <seq> save` or `ack <session> <seq> cp <checkpoint id>`.
pub struct Ack<'a> {
    pub session: u64,
    pub seq: u64,
    /// The checkpoint's id for a `cp` ack; `None` for a session save.
    pub checkpoint: Option<&'a str>,
}

/// Parses an ack line (one that starts with `ack `); panics on a malformed one.
pub fn parse_ack(line: &str) -> Ack<'_> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (session, seq): (u64, u64) = (f[1].parse().unwrap(), f[2].parse().unwrap());
    Ack { session, seq, checkpoint: (f[3] == "cp").then(|| f[4]) }
}

/// Reads `r` (a child's stdout) line by line on a thread of its own; the receiver ends when
/// the child's end of the pipe closes. A last line without its newline was cut off by a
/// kill: it is not a report, and is dropped.
pub fn read_lines(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(_) if buf.ends_with(b"\n") => {
                    if tx.send(String::from_utf8_lossy(&buf).trim_end().to_owned()).is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
    });
    rx
}

/// A checkpoint the child acknowledged.
pub struct AckedCheckpoint {
    pub id: String,
    pub session: u64,
    pub seq: u64,
}

/// What the parent knows from the acks it has read, over one or several runs of a child on
/// the same store.
pub struct Acked {
    workload: Workload,
    /// Highest acked session-save seq per session (0: none yet).
    pub save: [u64; SESSIONS as usize],
    /// Every acked seq (saves and checkpoints).
    pub seqs: HashSet<u64>,
    /// The highest seq ever acked.
    pub max: u64,
    /// Acked checkpoints the test has not removed itself (see [`Acked::retain_checkpoints`]).
    pub checkpoints: Vec<AckedCheckpoint>,
    /// Stored seqs already counted as "stored without an ack", so each counts once.
    unacked_seen: HashSet<u64>,
}

impl Acked {
    /// Nothing acked yet of `workload`.
    pub fn new(workload: Workload) -> Self {
        Acked {
            workload,
            save: [0; SESSIONS as usize],
            seqs: HashSet::new(),
            max: 0,
            checkpoints: Vec::new(),
            unacked_seen: HashSet::new(),
        }
    }

    /// Takes in every ack among `lines` (a child's output) and returns how many there were.
    /// Panics (naming `label`) where the seqs do not keep rising or an ack is not the
    /// workload's operation of that seq.
    pub fn read(&mut self, lines: &[String], label: &str) -> usize {
        let mut count = 0;
        for line in lines.iter().filter(|l| l.starts_with("ack ")) {
            let Ack { session: s, seq, checkpoint } = parse_ack(line);
            assert!(seq > self.max, "{label}: ack seqs must keep rising: {line}");
            assert_eq!((s, checkpoint.is_some()), op_of(seq), "{label}: unexpected ack {line}");
            self.max = seq;
            self.seqs.insert(seq);
            if let Some(id) = checkpoint {
                self.checkpoints.push(AckedCheckpoint { id: id.to_owned(), session: s, seq });
            } else {
                self.save[s as usize] = seq;
            }
            count += 1;
        }
        count
    }

    /// Forgets the acked checkpoints whose id `keep` rejects: those the test removed itself.
    pub fn retain_checkpoints(&mut self, keep: impl Fn(&str) -> bool) {
        self.checkpoints.retain(|c| keep(&c.id));
    }

    /// Whether `seq` is stored without an ack and was not seen so before (it counts once).
    fn newly_unacked(&mut self, seq: u64) -> bool {
        !self.seqs.contains(&seq) && self.unacked_seen.insert(seq)
    }
}

/// What the kills and the checks of the reopened store found, summed over runs. The test
/// counts `runs`, `killed`, `acks` and `killed_mid_write`; [`verify_reopened`] the rest.
#[derive(Default, Debug)]
pub struct Counts {
    pub runs: usize,
    /// Runs whose child died of the SIGKILL.
    pub killed: usize,
    pub acks: usize,
    /// Kills that left a staged file behind, i.e. landed in the middle of a write.
    pub killed_mid_write: usize,
    /// Acked writes whose value is not stored: a session holding an older seq than its last
    /// acked save, or an acked checkpoint that is not listed.
    pub lost: usize,
    /// Loads and restores that fail, or return anything but the exact payload of the seq
    /// they claim.
    pub corrupt: usize,
    /// Index and disk that disagree: a checkpoint listed but not on disk or not restorable,
    /// on disk but not listed, or a stats count that differs from the files.
    pub missing: usize,
    /// Writes that completed but were killed before their ack was printed (allowed: at most
    /// one per run, the one in flight).
    pub stored_unacked: usize,
    /// Staged files found after a reopen (must be 0: opening sweeps them).
    pub staged_left: usize,
    /// Calls the child saw fail (`err` lines: the server died under it).
    pub failed_calls: usize,
}

impl Counts {
    /// The counts on one line, for a test's summary.
    pub fn summary(&self) -> String {
        format!(
            "runs={} killed={} acks={} lost={} corrupt={} missing={} (stored but unacked={}, \
             kills leaving a staged file={}, staged files left after reopen={}, failed calls={})",
            self.runs,
            self.killed,
            self.acks,
            self.lost,
            self.corrupt,
            self.missing,
            self.stored_unacked,
            self.killed_mid_write,
            self.staged_left,
            self.failed_calls
        )
    }

    /// Fails the test unless nothing was lost, corrupt or missing and no staged file
    /// survived a reopen.
    #[track_caller]
    pub fn assert_sound(&self) {
        assert_eq!((self.lost, self.corrupt, self.missing), (0, 0, 0), "{self:?}");
        assert_eq!(self.staged_left, 0, "staged files survived a reopen");
    }
}

/// Checkpoint ids with a record file (name ending in `ext`) in `checkpoints/<session>/`,
/// staged files excluded. A file with another ending keeps its whole name, so it matches
/// no id.
pub fn checkpoint_files(dir: &Path, session: &str, ext: &str) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(dir.join("checkpoints").join(session)) else {
        return BTreeSet::new();
    };
    entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .map(|n| n.strip_suffix(ext).map(str::to_owned).unwrap_or(n))
        .collect()
}

/// Where a reopened store's checkpoints are, to compare with its index.
pub enum Stored<'a> {
    /// A file store's directory, record files ending `ext`; staged files are looked for too.
    Files { dir: &'a Path, ext: &'a str },
    /// Any backend: its keys under `checkpoints/<session>/`, records ending `ext`.
    Keys { backend: &'a dyn StorageBackend, ext: &'a str },
}

impl Stored<'_> {
    /// The ids of the checkpoints of `session` the store holds a record of.
    async fn checkpoints(&self, session: &str) -> BTreeSet<String> {
        match self {
            Stored::Files { dir, ext } => checkpoint_files(dir, session, ext),
            Stored::Keys { backend, ext } => {
                let prefix = StorageKey::new(format!("checkpoints/{session}")).unwrap();
                let keys = backend.list(&prefix).await.unwrap();
                keys.iter()
                    .map(|meta| meta.key.file_name())
                    .map(|n| n.strip_suffix(*ext).unwrap_or(n).to_owned())
                    .collect()
            }
        }
    }

    /// Staged files left in a file store (a server store has none to leave).
    fn staged(&self) -> Vec<PathBuf> {
        match self {
            Stored::Files { dir, .. } => staged_files(dir),
            Stored::Keys { .. } => Vec::new(),
        }
    }
}

/// Checks the store at `dir`, just reopened as `m` after a kill, against what was acked:
/// [`verify_store`] over its files.
pub async fn verify_reopened(
    m: &StateManager,
    dir: &Path,
    ext: &str,
    acked: &mut Acked,
    label: &str,
    counts: &mut Counts,
) {
    verify_store(m, &Stored::Files { dir, ext }, acked, label, counts).await;
}

/// Checks a store just reopened as `m` after a kill against what was acked, and adds what
/// it finds to `counts`: every session record is exactly the payload of some save of its
/// session and not older than the last acked one; the checkpoint index agrees with the
/// records in `stored` and with the stats, and every listed checkpoint restores to exactly
/// its session's, branch's and seq's payload; no acked checkpoint is gone; no staged file is
/// left. A stored value may be one seq ahead of the acks (the write finished, the kill came
/// before its ack), but only one per call: only one operation was in flight. Each finding is
/// printed to stderr with `label` and LOST, CORRUPT or MISSING.
pub async fn verify_store(
    m: &StateManager,
    stored: &Stored<'_>,
    acked: &mut Acked,
    label: &str,
    counts: &mut Counts,
) {
    let Workload { session_name, payload } = acked.workload;
    let left = stored.staged();
    for path in &left {
        eprintln!("{label}: staged file left after reopen: {}", path.display());
    }
    counts.staged_left += left.len();
    let mut unacked = 0;
    let mut on_disk_total = 0;

    for s in 0..SESSIONS {
        let name = session_name(s);
        let acked_save = acked.save[s as usize];
        // The session record: readable, exactly some seq's payload, not older than the last
        // ack.
        match m.load_session(&name).await {
            Ok(Some(v)) => match v["seq"].as_u64() {
                Some(seq)
                    if v == payload(s, seq) && op_of(seq) == (s, false) && seq <= acked.max + 1 =>
                {
                    if seq < acked_save {
                        eprintln!("{label}: LOST: {name} holds seq {seq}, acked {acked_save}");
                        counts.lost += 1;
                    }
                    if acked.newly_unacked(seq) {
                        unacked += 1;
                    }
                }
                _ => {
                    eprintln!("{label}: CORRUPT: {name} holds a value that is no save's payload");
                    counts.corrupt += 1;
                }
            },
            Ok(None) => {
                if acked_save > 0 {
                    eprintln!("{label}: LOST: {name} has no state, acked {acked_save}");
                    counts.lost += 1;
                }
            }
            Err(e) => {
                eprintln!("{label}: CORRUPT: load_session({name}): {e}");
                counts.corrupt += 1;
            }
        }

        // Checkpoints: the index agrees with the files, and every listed one restores.
        let listed = m.list_checkpoints(&name).await.unwrap();
        let listed_ids: BTreeSet<String> = listed.iter().map(|c| c.id.to_string()).collect();
        let on_disk = stored.checkpoints(&name).await;
        on_disk_total += on_disk.len();
        for id in listed_ids.symmetric_difference(&on_disk) {
            let side = if on_disk.contains(id) {
                "on disk but not listed"
            } else {
                "listed but not on disk"
            };
            eprintln!("{label}: MISSING: checkpoint {id} of {name} is {side}");
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
                            cp.data == payload(s, q) && op_of(q) == (s, true) && q <= acked.max + 1
                        });
                    if !ok {
                        eprintln!(
                            "{label}: CORRUPT: checkpoint {} of {name} holds the wrong value",
                            info.id
                        );
                        counts.corrupt += 1;
                    } else if let Some(q) = seq
                        && acked.newly_unacked(q)
                    {
                        unacked += 1;
                    }
                }
                Ok(None) => {
                    eprintln!(
                        "{label}: MISSING: listed checkpoint {} of {name} does not restore",
                        info.id
                    );
                    counts.missing += 1;
                }
                Err(e) => {
                    eprintln!("{label}: CORRUPT: restore_checkpoint({}): {e}", info.id);
                    counts.corrupt += 1;
                }
            }
        }
        for c in acked.checkpoints.iter().filter(|c| c.session == s) {
            if !listed_ids.contains(&c.id) {
                eprintln!(
                    "{label}: LOST: acked checkpoint {} (seq {}) of {name} is not listed",
                    c.id, c.seq
                );
                counts.lost += 1;
            }
        }
    }
    let stats = m.get_storage_stats().await.unwrap();
    if stats.checkpoint_count != on_disk_total {
        eprintln!(
            "{label}: MISSING: stats count {} checkpoints, {on_disk_total} on disk",
            stats.checkpoint_count
        );
        counts.missing += stats.checkpoint_count.abs_diff(on_disk_total);
    }
    assert!(
        unacked <= 1,
        "{label}: {unacked} unacknowledged writes stored; only one was in flight"
    );
    counts.stored_unacked += unacked;
}

// ---------------------------------------------------------------------------------------
// The backends' kill loop: one store, a saving child killed again and again
// ---------------------------------------------------------------------------------------

// Every awaited step of a check, and the wait for a child's first ack, ends within LIMIT.
pub use super::{LIMIT, bounded};
/// Checkpoints each session keeps between rounds ([`verify_and_trim`]), so a store does not
/// grow with the rounds and each check stays short.
pub const KEEP_CHECKPOINTS: usize = 12;

/// The session names of the backends' crash tests.
pub fn crash_session(s: u64) -> String {
    format!("crash-s{s}")
}

/// The value operation `seq` writes: 200 bytes to 8 KB, fully determined by `seq` (and
/// `session`, which `seq` determines).
pub fn small_payload(session: u64, seq: u64) -> Value {
    let len = 200 + (seq.wrapping_mul(7919) % 8000) as usize;
    let c = char::from(b'a' + (seq % 26) as u8);
    json!({ "session": session, "seq": seq, "pad": c.to_string().repeat(len) })
}

/// The workload of the backends' crash tests.
pub const BACKEND_WORKLOAD: Workload =
    Workload { session_name: crash_session, payload: small_payload };

/// The saving child of [`crash_rounds`]: resumes after the last stored seq, then performs
/// the workload's operations one by one, printing each ack line (one flushed write) once its
/// call returned `Ok`, for at most [`LIMIT`]. At the first failed call (the server died
/// under it) it prints `err <seq> <kind>` and returns: one call in flight at a time, so at
/// most one write is stored without an ack.
pub async fn save_until_killed(m: &StateManager, workload: Workload) {
    let mut seq = workload.last_stored_seq(m).await;
    let mut out = std::io::stdout();
    // libtest has printed "test NAME ... " without a newline: end that line so every ack
    // starts a line of its own.
    out.write_all(b"\n").unwrap();
    let started = Instant::now();
    while started.elapsed() < LIMIT {
        seq += 1;
        let (line, failed) = match workload.try_apply(m, seq).await {
            Ok(ack) => (ack + "\n", false),
            Err(e) => (format!("err {seq} {:?}\n", e.kind()), true),
        };
        out.write_all(line.as_bytes()).unwrap();
        out.flush().unwrap();
        if failed {
            return;
        }
    }
}

/// How [`crash_rounds`] kills.
pub struct CrashPlan<'a> {
    /// Names the test in its output.
    pub label: &'a str,
    /// Kill rounds.
    pub rounds: usize,
    /// The kill comes `min..max` ms (uniform) after the child's first ack.
    pub delay_ms: (u64, u64),
    /// After the crash (a server killed), how long the child may take to see its call fail
    /// and exit before it is SIGKILLed too (its last answers are printed meanwhile); zero
    /// when the child itself is what is killed.
    pub exit_wait: Duration,
}

/// The rounds a test runs: the variable `var` if set, else `default`.
pub fn rounds_from_env(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|r| r.parse().ok()).unwrap_or(default)
}

/// Runs `plan.rounds` kill rounds on one store. Each round starts the saving child
/// (`child()`: this test binary re-executed so that it runs [`save_until_killed`]), waits
/// for its first ack and then a random delay (seed printed; `MARS_CRASH_SEED` replays it),
/// calls `crash` (kill a server; nothing when only the child dies), SIGKILLs the child,
/// reads every ack it got out, and calls `check(acked, counts, label)` to restart what was
/// killed, reopen the store and check it ([`verify_and_trim`]). Prints the counts; fails
/// unless every round acked and nothing was lost, corrupt or missing.
pub fn crash_rounds(
    plan: &CrashPlan,
    workload: Workload,
    mut child: impl FnMut() -> Command,
    mut crash: impl FnMut(),
    mut check: impl FnMut(&mut Acked, &mut Counts, &str),
) -> Counts {
    let seed: u64 =
        std::env::var("MARS_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            t.as_nanos() as u64 ^ u64::from(std::process::id())
        });
    let label = plan.label;
    println!("{label}: {} rounds, seed {seed} (replay with MARS_CRASH_SEED={seed})", plan.rounds);
    let mut rng = super::SplitMix64(seed);
    let (min, max) = plan.delay_ms;
    let mut acked = Acked::new(workload);
    let mut counts = Counts::default();
    let started = Instant::now();
    for round in 0..plan.rounds {
        let round_label = format!("{label}, round {round}");
        let delay = Duration::from_millis(min + rng.next() % (max - min).max(1));
        let lines = kill_one_child(child(), delay, &mut crash, plan.exit_wait, &round_label);
        counts.killed += usize::from(lines.killed);
        counts.failed_calls += lines.lines.iter().filter(|l| l.starts_with("err ")).count();
        counts.acks += acked.read(&lines.lines, &round_label);
        check(&mut acked, &mut counts, &round_label);
        counts.runs += 1;
    }
    println!("{label}: {} in {:.1}s", counts.summary(), started.elapsed().as_secs_f64());
    assert!(counts.acks >= counts.runs, "{label}: every round must ack at least once");
    counts.assert_sound();
    counts
}

/// Kill rounds of the tests in which only the saving child dies, unless their variable says
/// otherwise: 50 per backend.
pub const CHILD_KILL_ROUNDS: usize = 50;

/// [`crash_rounds`] in which only the child dies: SIGKILLed 2 to 60 ms after its first ack,
/// [`CHILD_KILL_ROUNDS`] times (or the variable `rounds_var`); `child` and `check` as there.
pub fn sigkill_child_rounds(
    label: &str,
    rounds_var: &str,
    child: impl FnMut() -> Command,
    check: impl FnMut(&mut Acked, &mut Counts, &str),
) -> Counts {
    let plan = CrashPlan {
        label,
        rounds: rounds_from_env(rounds_var, CHILD_KILL_ROUNDS),
        delay_ms: (2, 60),
        exit_wait: Duration::ZERO,
    };
    crash_rounds(&plan, BACKEND_WORKLOAD, child, || {}, check)
}

/// What one child printed, and whether the SIGKILL ended it (`false`: it had exited by
/// itself after a failed call).
struct ChildRun {
    lines: Vec<String>,
    killed: bool,
}

/// Starts `cmd`, waits for its first ack, sleeps `delay`, calls `crash`, gives the child
/// up to `exit_wait` to exit by itself, SIGKILLs it, and returns every complete line it
/// wrote.
fn kill_one_child(
    mut cmd: Command,
    delay: Duration,
    crash: &mut impl FnMut(),
    exit_wait: Duration,
    label: &str,
) -> ChildRun {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let rx = read_lines(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let deadline = Instant::now() + LIMIT;
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
                panic!("{label}: the child never acked ({e:?}; exit {status}); output: {lines:?}");
            }
        }
    }
    // The kill moment: a random delay after the first ack (not a synchronization).
    std::thread::sleep(delay);
    crash();
    let wait_until = Instant::now() + exit_wait;
    while Instant::now() < wait_until && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let exited = child.try_wait().unwrap().is_some();
    let _ = child.kill(); // SIGKILL: no destructor, no shutdown, no flush.
    let status = child.wait().unwrap();
    let killed = !exited && status.signal() == Some(libc::SIGKILL);
    assert!(exited || killed, "{label}: the child was not killed: {status}");
    // Every line the child got out before it died: the receiver ends with its stdout.
    lines.extend(rx.iter());
    ChildRun { lines, killed }
}

/// The node id of every manager of a crash loop, the children's and the parent's checks: on
/// a shared store (PostgreSQL, Redis) they are one node restarted, so a killed child's
/// session leases are taken back at once by the next process, as a restarted worker with a
/// stable name would (the crash is tested here; failover after a lease runs out is tested
/// in `tests/cluster_chaos.rs` and `tests/nodes.rs`).
pub const ORACLE_NODE: &str = "crash-oracle";

/// The runtime of a crash test's parent and child: two workers, as an application's.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The child of [`crash_rounds`]: this test binary re-executed to run only `test`, with
/// `env` set to `value` (which makes that test the saver).
pub fn child_command(test: &str, env: &str, value: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--nocapture", "--test-threads=1"]).env(env, value);
    c
}

/// The saving child's whole body: on a runtime of its own, a manager over the backend
/// `open` returns runs [`save_until_killed`] with [`BACKEND_WORKLOAD`].
pub fn run_saving_child<B: StorageBackend + 'static>(open: impl Future<Output = B>) {
    runtime().block_on(async {
        let start = StateManager::builder(open.await).node_id(ORACLE_NODE).start();
        let m = bounded("start", start).await.unwrap();
        save_until_killed(&m, BACKEND_WORKLOAD).await;
    });
}

/// The check of a round of [`crash_rounds`] on a backend store (records ending `.json`):
/// a manager over `backend`, [`verify_and_trim`], shutdown.
pub async fn check_backend(
    backend: Arc<dyn StorageBackend>,
    acked: &mut Acked,
    counts: &mut Counts,
    label: &str,
) {
    let start = StateManager::builder(backend.clone()).node_id(ORACLE_NODE).start();
    let m = bounded("start", start).await.unwrap();
    let stored = Stored::Keys { backend: backend.as_ref(), ext: ".json" };
    verify_and_trim(&m, &stored, acked, label, counts).await;
    bounded("shutdown", m.shutdown()).await.unwrap();
}

/// The check of a round of [`crash_rounds`] on a store reopened as `m`: [`verify_store`],
/// then each session trimmed to its [`KEEP_CHECKPOINTS`] newest checkpoints (the next
/// rounds check what is left again).
pub async fn verify_and_trim(
    m: &StateManager,
    stored: &Stored<'_>,
    acked: &mut Acked,
    label: &str,
    counts: &mut Counts,
) {
    bounded("verify", verify_store(m, stored, acked, label, counts)).await;
    let mut remaining = HashSet::new();
    for s in 0..SESSIONS {
        let name = (acked.workload.session_name)(s);
        bounded("trim", m.cleanup_checkpoints(&name, KEEP_CHECKPOINTS)).await.unwrap();
        let left = bounded("list", m.list_checkpoints(&name)).await.unwrap();
        remaining.extend(left.into_iter().map(|c| c.id.to_string()));
    }
    acked.retain_checkpoints(|id| remaining.contains(id));
}

// ---------------------------------------------------------------------------------------
// A manager's state across a reopen
// ---------------------------------------------------------------------------------------

/// Sessions, checkpoints, listings, restores and deletes made through a manager are all
/// there after its shutdown and a reopen. `open` opens the store (a new backend on the same
/// file, schema or prefix) each time it is called; the test checks what is particular to its
/// backend afterwards.
pub async fn state_survives_reopen<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = StateManager>,
{
    let m = open().await;
    let big = json!({ "pad": "z".repeat(50_000) });
    bounded("save", m.save_session("s1", &json!({ "step": 1 }))).await.unwrap();
    bounded("save", m.save_session("s2", &big)).await.unwrap();
    bounded("save", m.save_session("gone", &json!("bye"))).await.unwrap();
    let cp1 = bounded("checkpoint", m.create_checkpoint("s1", "main", &json!({ "step": 1 })))
        .await
        .unwrap();
    bounded("save", m.save_session("s1", &json!({ "step": 2 }))).await.unwrap();
    let cp2 = bounded("checkpoint", m.create_checkpoint("s1", "main", &json!({ "step": 2 })))
        .await
        .unwrap();
    assert!(bounded("delete", m.delete_session("gone")).await.unwrap());
    bounded("shutdown", m.shutdown()).await.unwrap();

    let m = open().await;
    let s1: Option<Value> = bounded("load", m.load_session("s1")).await.unwrap();
    assert_eq!(s1, Some(json!({ "step": 2 })));
    let s2: Option<Value> = bounded("load", m.load_session("s2")).await.unwrap();
    assert_eq!(s2, Some(big));
    let gone: Option<Value> = bounded("load", m.load_session("gone")).await.unwrap();
    assert_eq!(gone, None, "a deleted session came back");
    let ids: Vec<_> = bounded("list", m.list_checkpoints("s1"))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, [cp1.clone(), cp2]);
    let restored = bounded("restore", m.restore_checkpoint(&cp1)).await.unwrap();
    assert_eq!(restored.map(|c| c.data), Some(json!({ "step": 1 })));
    let mut sessions: Vec<String> = bounded("list sessions", m.list_sessions())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.session_id.to_string())
        .collect();
    sessions.sort();
    assert_eq!(sessions, ["s1", "s2"]);
    bounded("shutdown", m.shutdown()).await.unwrap();
}
