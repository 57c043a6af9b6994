//! The crash oracle of the tests that kill a saving child process (`tests/crash.rs`: SIGKILL
//! at random delays; `tests/syscalls.rs`: SIGKILL just before the Nth system call). It owns
//! the workload both children run (4 sessions, every third operation a checkpoint), the ack
//! lines they print, the parent's model of what was acknowledged ([`Acked`]) and the check of
//! a reopened store against that model ([`verify_reopened`], summed in [`Counts`]). It calls
//! only the public `StateManager` API and reads the store's files.

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::mpsc;

use mars_state::StateManager;
use serde_json::Value;

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
        let (s, checkpoint) = op_of(seq);
        let name = (self.session_name)(s);
        let value = (self.payload)(s, seq);
        if checkpoint {
            let id = m.create_checkpoint(&name, BRANCH, &value).await.unwrap();
            format!("ack {s} {seq} cp {id}")
        } else {
            m.save_session(&name, &value).await.unwrap();
            format!("ack {s} {seq} save")
        }
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
}

impl Counts {
    /// The counts on one line, for a test's summary.
    pub fn summary(&self) -> String {
        format!(
            "runs={} killed={} acks={} lost={} corrupt={} missing={} (stored but unacked={}, \
             kills leaving a staged file={}, staged files left after reopen={})",
            self.runs,
            self.killed,
            self.acks,
            self.lost,
            self.corrupt,
            self.missing,
            self.stored_unacked,
            self.killed_mid_write,
            self.staged_left
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

/// Checks the store at `dir`, just reopened as `m` after a kill, against what was acked,
/// and adds what it finds to `counts`: every session record is exactly the payload of some
/// save of its session and not older than the last acked one; the checkpoint index agrees
/// with the files (record ending `ext`) and with the stats, and every listed checkpoint
/// restores to exactly its session's, branch's and seq's payload; no acked checkpoint is
/// gone; no staged file is left. A stored value may be one seq ahead of the acks (the write
/// finished, the kill came before its ack), but only one per call: only one operation was in
/// flight. Each finding is printed to stderr with `label` and LOST, CORRUPT or MISSING.
pub async fn verify_reopened(
    m: &StateManager,
    dir: &Path,
    ext: &str,
    acked: &mut Acked,
    label: &str,
    counts: &mut Counts,
) {
    let Workload { session_name, payload } = acked.workload;
    let left = staged_files(dir);
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
        let on_disk = checkpoint_files(dir, &name, ext);
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
