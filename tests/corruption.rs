//! Pins what the store does with damaged files, with and without compression.
//!
//! - A session or checkpoint record with a flipped byte (every offset of small records, a
//!   sample of larger ones), cut at any length, with garbage appended, emptied, or swapped
//!   for another key's record is `ErrorKind::Corrupt` naming its key: never `Ok(None)`,
//!   never wrong data, never a panic. The damaged bytes are copied to `quarantine/` and the
//!   record itself stays in place.
//! - 2,000 seeded random corruptions, spread over plain, gzip, encrypted and gzip+encrypted
//!   stores, are all detected; the counts are printed.
//! - A damaged, truncated, stale or missing index journal (`metadata/index.log`) does not
//!   stop the manager, and listings and stats still match the records.
//! - A damaged record is not mistaken for a session idle since 1970.
//!
//! Every probe starts from a byte-exact copy of a pristine store and reads through a fresh
//! `StateManager` (a running one caches states).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    JANITOR_HOURLY, Node, SplitMix64, plain_and_compressed, put_file, session_info, temp_store,
};
use mars_state::{
    CheckpointId, CheckpointInfo, ErrorKind, SessionInfo, StateError, StateManagerBuilder,
    StorageStats,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// [`common::snapshot`] of a store, which must hold only directories and regular files.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let tree = common::snapshot(root);
    for (rel, node) in &tree {
        assert!(
            matches!(node, Node::Dir | Node::File(_)),
            "unexpected file type at {}",
            root.join(rel).display()
        );
    }
    tree
}

/// Offsets to damage: all of them for records up to 512 bytes, else 256 spread evenly
/// (first and last bytes included).
fn offsets(len: usize) -> Vec<usize> {
    if len <= 512 {
        (0..len).collect()
    } else {
        let mut v: Vec<usize> = (0..256).map(|i| i * (len - 1) / 255).collect();
        v.dedup();
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comp {
    Plain,
    Gzip,
    /// Encrypted (XChaCha20-Poly1305), without and with gzip.
    Enc,
    GzipEnc,
}

impl Comp {
    fn of(compression: Option<u32>) -> Comp {
        if compression.is_some() { Comp::Gzip } else { Comp::Plain }
    }
    fn compression(self) -> Option<u32> {
        match self {
            Comp::Plain | Comp::Enc => None,
            Comp::Gzip | Comp::GzipEnc => Some(common::GZIP_LEVEL),
        }
    }
    fn encrypted(self) -> bool {
        matches!(self, Comp::Enc | Comp::GzipEnc)
    }
    fn ext(self) -> &'static str {
        match (self.compression(), self.encrypted()) {
            (None, true) => ".json.enc",
            (Some(_), true) => ".json.gz.enc",
            (c, false) => common::ext(c),
        }
    }
    fn builder(self, base: &Path) -> StateManagerBuilder {
        let b = common::builder(base, self.compression())
            .janitor_interval(JANITOR_HOURLY)
            .call_timeout(Duration::from_secs(20));
        if self.encrypted() {
            b.encryption_key(mars_state::EncryptionKey::from_bytes([42; 32]))
        } else {
            b
        }
    }
}

/// The record a probe damages.
#[derive(Debug, Clone)]
enum Target {
    Session(&'static str),
    Checkpoint(&'static str, CheckpointId),
}

impl Target {
    fn key(&self, comp: Comp) -> String {
        match self {
            Target::Session(s) => format!("sessions/{s}{}", comp.ext()),
            Target::Checkpoint(s, c) => format!("checkpoints/{s}/{c}{}", comp.ext()),
        }
    }
}

fn state_a() -> Value {
    json!({"who": "A", "n": 2, "note": "alpha"})
}
fn state_b() -> Value {
    json!({"who": "B", "n": 3, "note": "alpha"})
}
fn state_big() -> Value {
    // Incompressible text, so the gzipped record is large too.
    let mut rng = SplitMix64(7);
    let blob: String =
        (0..20_000).map(|_| char::from(b"0123456789abcdef"[rng.below(16)])).collect();
    json!({"who": "big", "blob": blob})
}

/// A pristine store: sessions `sA` (saved twice, same size), `sB`, `sBig` (20 KB), and
/// checkpoints `cpA1`, `cpA2` of `sA` and `cpB` of `sB`.
struct Fixture {
    _dir: tempfile::TempDir,
    base: PathBuf,
    comp: Comp,
    pristine: BTreeMap<PathBuf, Node>,
    sessions: Vec<SessionInfo>,
    checkpoints: Vec<(String, Vec<CheckpointInfo>)>,
    stats: StorageStats,
    cp_a1: CheckpointId,
    cp_a2: CheckpointId,
    cp_b: CheckpointId,
}

impl Fixture {
    async fn new(comp: Comp) -> Fixture {
        let (dir, base) = temp_store("store");
        let m = comp.builder(&base).start().await.unwrap();
        m.save_session("sB", &state_b()).await.unwrap();
        m.save_session("sBig", &state_big()).await.unwrap();
        let cp_a1 = m.create_checkpoint("sA", "main", &json!({"cp": "A1"})).await.unwrap();
        let cp_a2 = m.create_checkpoint("sA", "alt", &json!({"cp": "A2"})).await.unwrap();
        let cp_b = m.create_checkpoint("sB", "main", &json!({"cp": "B1"})).await.unwrap();
        // sA is saved twice, the second time a few ms later with a record of the same size
        // (as a step counter does). Gzipped sizes vary with the timestamp: retry until equal.
        let record = base.join(Target::Session("sA").key(comp));
        let mut same_size = false;
        for _ in 0..100 {
            m.save_session("sA", &json!({"who": "A", "n": 1, "note": "alpha"})).await.unwrap();
            let first = std::fs::metadata(&record).unwrap().len();
            tokio::time::sleep(Duration::from_millis(3)).await;
            m.save_session("sA", &state_a()).await.unwrap();
            if std::fs::metadata(&record).unwrap().len() == first {
                same_size = true;
                break;
            }
        }
        assert!(same_size, "could not get two same-size saves of sA");
        m.shutdown().await.unwrap();
        drop(m);
        // Reopen once so that whatever a start writes is part of the pristine image.
        let m = comp.builder(&base).start().await.unwrap();
        let sessions = m.list_sessions().await.unwrap();
        let mut checkpoints = Vec::new();
        for s in ["sA", "sB", "sBig"] {
            checkpoints.push((s.to_owned(), m.list_checkpoints(s).await.unwrap()));
        }
        let stats = m.get_storage_stats().await.unwrap();
        m.shutdown().await.unwrap();
        drop(m);
        assert_eq!(sessions.len(), 3);
        assert_eq!(stats.checkpoint_count, 3);
        let pristine = snapshot(&base);
        Fixture {
            _dir: dir,
            base,
            comp,
            pristine,
            sessions,
            checkpoints,
            stats,
            cp_a1,
            cp_a2,
            cp_b,
        }
    }

    /// Puts the store back to its pristine bytes.
    fn restore(&self) {
        std::fs::remove_dir_all(&self.base).unwrap();
        std::fs::create_dir_all(&self.base).unwrap();
        for (rel, node) in &self.pristine {
            match node {
                Node::Dir => std::fs::create_dir_all(self.base.join(rel)).unwrap(),
                Node::File(bytes) => put_file(&self.base.join(rel), bytes),
                other => unreachable!("snapshot() admits no {other:?}"),
            }
        }
    }

    fn bytes(&self, key: &str) -> Vec<u8> {
        match self.pristine.get(Path::new(key)) {
            Some(Node::File(b)) => b.clone(),
            other => panic!("no pristine file {key}: {other:?}"),
        }
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target::Session("sA"),
            Target::Session("sBig"),
            Target::Checkpoint("sA", self.cp_a1.clone()),
            Target::Checkpoint("sB", self.cp_b.clone()),
        ]
    }

    fn expected(&self, t: &Target) -> Value {
        match t {
            Target::Session("sA") => state_a(),
            Target::Session("sB") => state_b(),
            Target::Session("sBig") => state_big(),
            Target::Checkpoint(_, c) if *c == self.cp_a1 => json!({"cp": "A1"}),
            Target::Checkpoint(_, c) if *c == self.cp_a2 => json!({"cp": "A2"}),
            Target::Checkpoint(_, c) if *c == self.cp_b => json!({"cp": "B1"}),
            other => panic!("no expectation for {other:?}"),
        }
    }
}

/// What reading a damaged record gave.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// `ErrorKind::Corrupt` naming the record's key: the only right answer.
    Detected,
    /// `Corrupt`, but naming another key.
    WrongKey(String),
    /// Another kind of error.
    OtherError(ErrorKind, String),
    /// `Ok(None)`: reported as missing.
    Missing,
    /// `Ok(Some(..))` with data that is not what was saved.
    WrongData(String),
    /// `Ok(Some(..))` with exactly what was saved (the damage went unnoticed).
    SameData,
    /// The manager did not start.
    StartFailed(String),
    /// The read panicked.
    Panic(String),
    /// No answer within the time limit.
    Hang,
}

#[derive(Debug, Clone)]
struct Probe {
    verdict: Verdict,
    quarantined: bool,
    original_kept: bool,
    /// A healthy record (`sB`) read wrongly after the damage.
    collateral: Option<String>,
}

impl Probe {
    fn ok(&self) -> bool {
        self.verdict == Verdict::Detected
            && self.quarantined
            && self.original_kept
            && self.collateral.is_none()
    }
}

fn classify_err(e: &StateError, key: &str) -> Verdict {
    match e {
        StateError::Corrupt { key: k, .. } if k == key => {
            if e.to_string().contains(key) {
                Verdict::Detected
            } else {
                Verdict::WrongKey(format!("message does not name the key: {e}"))
            }
        }
        StateError::Corrupt { key: k, .. } => Verdict::WrongKey(k.clone()),
        other => Verdict::OtherError(other.kind(), other.to_string()),
    }
}

/// Writes `bytes` over `target`'s record in a pristine copy of the store, reads it through
/// a fresh manager, and reports what happened.
async fn probe(fx: &Fixture, target: &Target, bytes: &[u8]) -> Probe {
    fx.restore();
    let key = target.key(fx.comp);
    let path = fx.base.join(&key);
    put_file(&path, bytes);
    let (base, comp, t, expected) = (fx.base.clone(), fx.comp, target.clone(), fx.expected(target));
    let expected_b = state_b();
    let key2 = key.clone();
    let read = tokio::spawn(async move {
        let m = match comp.builder(&base).start().await {
            Ok(m) => m,
            Err(e) => return (Verdict::StartFailed(e.to_string()), None),
        };
        let verdict = match &t {
            Target::Session(s) => match m.load_session(s).await {
                Err(e) => classify_err(&e, &key2),
                Ok(None) => Verdict::Missing,
                Ok(Some(v)) if v == expected => Verdict::SameData,
                Ok(Some(v)) => Verdict::WrongData(format!("{v:.200}")),
            },
            Target::Checkpoint(s, c) => match m.restore_checkpoint(c).await {
                Err(e) => classify_err(&e, &key2),
                Ok(None) => Verdict::Missing,
                Ok(Some(cp))
                    if cp.data == expected && cp.session_id.as_str() == *s && cp.id == *c =>
                {
                    Verdict::SameData
                }
                Ok(Some(cp)) => Verdict::WrongData(format!("{:.200}", format!("{cp:?}"))),
            },
        };
        let collateral = match m.load_session("sB").await {
            Ok(Some(v)) if v == expected_b => None,
            other => Some(format!("healthy session sB read as {other:?}")),
        };
        let _ = m.shutdown().await;
        (verdict, collateral)
    });
    let (verdict, collateral) = match tokio::time::timeout(Duration::from_secs(60), read).await {
        Err(_) => (Verdict::Hang, None),
        Ok(Err(e)) if e.is_panic() => (Verdict::Panic(format!("{e}")), None),
        Ok(Err(e)) => (Verdict::Panic(format!("task failed: {e}")), None),
        Ok(Ok(r)) => r,
    };
    let quarantined = std::fs::read_dir(fx.base.join("quarantine"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()).any(|e| std::fs::read(e.path()).is_ok_and(|q| q == bytes))
        })
        .unwrap_or(false);
    let original_kept = std::fs::read(&path).is_ok_and(|b| b == bytes);
    Probe { verdict, quarantined, original_kept, collateral }
}

/// Runs `cases` (name, target, damaged bytes) and fails listing every probe that went wrong.
async fn expect_all_detected(fx: &Fixture, what: &str, cases: Vec<(String, Target, Vec<u8>)>) {
    let n = cases.len();
    let mut bad = Vec::new();
    for (name, target, bytes) in cases {
        let p = probe(fx, &target, &bytes).await;
        if !p.ok() {
            bad.push(format!("{name} of {}: {p:?}", target.key(fx.comp)));
        }
    }
    println!("{what} ({:?}): {n} probes, {} wrong", fx.comp, bad.len());
    assert!(
        bad.is_empty(),
        "{what} ({:?}): {} of {n} probes went wrong; first ones:\n{}",
        fx.comp,
        bad.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Deterministic damage
// ---------------------------------------------------------------------------------------

/// Damages the pristine record of every target with `damage` (named damaged copies of the
/// record's bytes) and expects every copy to be detected.
async fn damage_every_target(
    compression: Option<u32>,
    what: &str,
    mut damage: impl FnMut(&[u8]) -> Vec<(String, Vec<u8>)>,
) {
    let fx = Fixture::new(Comp::of(compression)).await;
    let mut cases = Vec::new();
    for t in fx.targets() {
        let good = fx.bytes(&t.key(fx.comp));
        cases.extend(damage(&good).into_iter().map(|(name, bad)| (name, t.clone(), bad)));
    }
    expect_all_detected(&fx, what, cases).await;
}

async fn flipped_bytes(compression: Option<u32>) {
    damage_every_target(compression, "flipped bytes", |good| {
        let flipped = |i: usize| {
            let mut bad = good.to_vec();
            bad[i] ^= 0xff;
            (format!("byte {i} of {} flipped", good.len()), bad)
        };
        offsets(good.len()).into_iter().map(flipped).collect()
    })
    .await;
}

plain_and_compressed! {
    flipped_bytes_are_corrupt,
    flipped_bytes_are_corrupt_compressed => flipped_bytes;
}

async fn truncations(compression: Option<u32>) {
    damage_every_target(compression, "truncations", |good| {
        let cut =
            |len: usize| (format!("cut to {len} of {} bytes", good.len()), good[..len].to_vec());
        offsets(good.len()).into_iter().map(cut).collect()
    })
    .await;
}

plain_and_compressed! {
    truncated_records_are_corrupt,
    truncated_records_are_corrupt_compressed => truncations;
}

async fn appended_and_emptied(compression: Option<u32>) {
    let mut rng = SplitMix64(42);
    damage_every_target(compression, "appended garbage / emptied", |good| {
        let mut cases = Vec::new();
        for extra in
            [&b"\n"[..], b" ", b"\0", b"}", b"{}\n", b"garbage", &rng.bytes(1), &rng.bytes(4096)]
        {
            cases.push((format!("{} bytes appended", extra.len()), [good, extra].concat()));
        }
        cases.push(("doubled".to_owned(), [good, good].concat()));
        cases.push(("emptied".to_owned(), Vec::new()));
        cases.push(("zeroed".to_owned(), vec![0; good.len()]));
        cases.push(("random, same size".to_owned(), rng.bytes(good.len())));
        cases
    })
    .await;
}

plain_and_compressed! {
    appended_garbage_and_empty_files_are_corrupt,
    appended_garbage_and_empty_files_are_corrupt_compressed => appended_and_emptied;
}

/// The swap cases: another key's genuine record put in place of `sA`'s and of `cpA1`'s.
fn swaps(fx: &Fixture) -> Vec<(String, Target, Vec<u8>)> {
    let c = fx.comp;
    let a1 = Target::Checkpoint("sA", fx.cp_a1.clone());
    let a2 = Target::Checkpoint("sA", fx.cp_a2.clone());
    let b = Target::Checkpoint("sB", fx.cp_b.clone());
    vec![
        (
            "sB's record in sA's place".into(),
            Target::Session("sA"),
            fx.bytes(&Target::Session("sB").key(c)),
        ),
        (
            "sBig's record in sA's place".into(),
            Target::Session("sA"),
            fx.bytes(&Target::Session("sBig").key(c)),
        ),
        ("a checkpoint record in sA's place".into(), Target::Session("sA"), fx.bytes(&a1.key(c))),
        ("cpA2's record in cpA1's place".into(), a1.clone(), fx.bytes(&a2.key(c))),
        ("cpB's record (of sB) in cpA1's place".into(), a1.clone(), fx.bytes(&b.key(c))),
        ("sA's session record in cpA1's place".into(), a1, fx.bytes(&Target::Session("sA").key(c))),
    ]
}

/// Probes every swap case and returns the mode and, for each probe `problem` finds fault
/// with, the case's name and the fault.
async fn swap_problems(
    compression: Option<u32>,
    problem: impl Fn(&Probe) -> Option<String>,
) -> (Comp, Vec<String>) {
    let fx = Fixture::new(Comp::of(compression)).await;
    let mut bad = Vec::new();
    for (name, t, bytes) in swaps(&fx) {
        if let Some(fault) = problem(&probe(&fx, &t, &bytes).await) {
            bad.push(format!("{name}: {fault}"));
        }
    }
    (fx.comp, bad)
}

/// A genuine record of another key must be refused as corrupt (the envelope binds the
/// session and checkpoint id), and the healthy records it came from still read right.
async fn swapped_detected(compression: Option<u32>) {
    let (comp, bad) = swap_problems(compression, |p| {
        let ok = p.verdict == Verdict::Detected && p.original_kept && p.collateral.is_none();
        (!ok).then(|| format!("{p:?}"))
    })
    .await;
    assert!(bad.is_empty(), "swapped records ({comp:?}):\n{}", bad.join("\n"));
}

plain_and_compressed! {
    swapped_records_are_rejected,
    swapped_records_are_rejected_compressed => swapped_detected;
}

/// A record refused because it belongs to another key is damaged like any other: a copy
/// must go to `quarantine/` ("the file is kept (moved to a quarantine folder)").
async fn swapped_quarantined(compression: Option<u32>) {
    let (comp, bad) = swap_problems(compression, |p| {
        (!p.quarantined).then(|| format!("no copy in quarantine/ ({:?})", p.verdict))
    })
    .await;
    assert!(bad.is_empty(), "swapped records ({comp:?}) were not quarantined:\n{}", bad.join("\n"));
}

plain_and_compressed! {
    swapped_records_are_quarantined,
    swapped_records_are_quarantined_compressed => swapped_quarantined;
}

// ---------------------------------------------------------------------------------------
// Random damage
// ---------------------------------------------------------------------------------------

fn random_damage(rng: &mut SplitMix64, good: &[u8]) -> (String, Vec<u8>) {
    loop {
        let len = good.len();
        let (name, bad) = match rng.below(7) {
            0 => {
                let i = rng.below(len);
                let mut b = good.to_vec();
                b[i] = rng.byte();
                (format!("byte {i} replaced"), b)
            }
            1 => {
                let i = rng.below(len);
                let n = 1 + rng.below(16.min(len - i));
                let mut b = good.to_vec();
                for x in &mut b[i..i + n] {
                    *x = rng.byte();
                }
                (format!("{n} bytes at {i} replaced"), b)
            }
            2 => {
                let k = 1 + rng.below(8);
                let mut b = good.to_vec();
                for _ in 0..k {
                    let i = rng.below(len);
                    b[i] ^= 1 << rng.below(8);
                }
                (format!("{k} random bit flips"), b)
            }
            3 => {
                let cut = rng.below(len);
                let mut b = good[..cut].to_vec();
                let n = rng.below(64);
                b.extend(rng.bytes(n));
                (format!("cut at {cut}, {n} random bytes appended"), b)
            }
            4 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let mut b = good[..i].to_vec();
                b.extend(rng.bytes(n));
                b.extend_from_slice(&good[i..]);
                (format!("{n} bytes inserted at {i}"), b)
            }
            5 => {
                let i = rng.below(len);
                let n = 1 + rng.below(16.min(len - i));
                let mut b = good[..i].to_vec();
                b.extend_from_slice(&good[i + n..]);
                (format!("{n} bytes removed at {i}"), b)
            }
            _ => {
                // Two distant regions copied over each other (a torn, misplaced write).
                let n = 1 + rng.below(32.min(len / 2));
                let (i, j) = (rng.below(len - n + 1), rng.below(len - n + 1));
                let mut b = good.to_vec();
                b.copy_within(i..i + n, j);
                (format!("{n} bytes copied from {i} to {j}"), b)
            }
        };
        if bad != good {
            return (name, bad);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_corruptions_are_all_detected() {
    const N: usize = 2000;
    let fixtures = [
        Fixture::new(Comp::Plain).await,
        Fixture::new(Comp::Gzip).await,
        Fixture::new(Comp::Enc).await,
        Fixture::new(Comp::GzipEnc).await,
    ];
    let mut rng = SplitMix64(0x6d61_7273_2d73_7461); // "mars-sta"
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut examples: Vec<String> = Vec::new();
    for i in 0..N {
        let fx = &fixtures[i % fixtures.len()];
        let targets = fx.targets();
        let t = &targets[rng.below(targets.len())];
        let good = fx.bytes(&t.key(fx.comp));
        let (name, bad) = random_damage(&mut rng, &good);
        let p = probe(fx, t, &bad).await;
        let class = match &p.verdict {
            Verdict::Detected => "detected (Corrupt, right key)",
            Verdict::WrongKey(_) => "detected, wrong key",
            Verdict::OtherError(..) => "error of another kind",
            Verdict::Missing => "SILENT: reported missing",
            Verdict::WrongData(_) => "SILENT: wrong data",
            Verdict::SameData => "undetected, data unchanged",
            Verdict::StartFailed(_) => "manager failed to start",
            Verdict::Panic(_) => "PANIC",
            Verdict::Hang => "HANG",
        };
        *counts.entry(class).or_default() += 1;
        if !p.quarantined {
            *counts.entry("not quarantined").or_default() += 1;
        }
        if !p.original_kept {
            *counts.entry("original not kept").or_default() += 1;
        }
        if p.collateral.is_some() {
            *counts.entry("healthy record harmed").or_default() += 1;
        }
        if !p.ok() && examples.len() < 20 {
            examples.push(format!("#{i} {:?} {} ({name}): {p:?}", fx.comp, t.key(fx.comp)));
        }
    }
    println!("random corruptions: {N} (seeded), by outcome:");
    for (k, v) in &counts {
        println!("  {v:>5}  {k}");
    }
    let get = |k: &str| counts.get(k).copied().unwrap_or(0);
    assert_eq!(get("SILENT: wrong data"), 0, "{examples:#?}");
    assert_eq!(get("PANIC"), 0, "{examples:#?}");
    assert_eq!(get("SILENT: reported missing"), 0, "{examples:#?}");
    assert_eq!(
        get("detected (Corrupt, right key)"),
        N,
        "not every corruption was detected: {examples:#?}"
    );
    assert!(examples.is_empty(), "{examples:#?}");
}

// ---------------------------------------------------------------------------------------
// The index journal
// ---------------------------------------------------------------------------------------

/// Starts a fresh manager and compares listings and stats with the pristine ones.
async fn listings_match(fx: &Fixture) -> Result<(), String> {
    let m = fx
        .comp
        .builder(&fx.base)
        .start()
        .await
        .map_err(|e| format!("manager did not start: {e}"))?;
    let mut problems = Vec::new();
    let sessions = m.list_sessions().await.unwrap();
    if sessions != fx.sessions {
        problems.push(format!("list_sessions: {sessions:?}\n   expected: {:?}", fx.sessions));
    }
    for (s, want) in &fx.checkpoints {
        let got = m.list_checkpoints(s).await.unwrap();
        if &got != want {
            problems.push(format!("list_checkpoints({s}): {got:?}\n   expected: {want:?}"));
        }
    }
    let stats = m.get_storage_stats().await.unwrap();
    if stats != fx.stats {
        problems.push(format!("stats: {stats:?}, expected {:?}", fx.stats));
    }
    if m.load_session("sA").await.ok().flatten() != Some(state_a()) {
        problems.push("sA no longer loads".into());
    }
    if m.restore_checkpoint(&fx.cp_b).await.ok().flatten().map(|c| c.data)
        != Some(json!({"cp": "B1"}))
    {
        problems.push("cpB no longer restores".into());
    }
    m.shutdown().await.unwrap();
    if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
}

const JOURNAL: &str = "metadata/index.log";

async fn damaged_journal(compression: Option<u32>) {
    let comp = Comp::of(compression);
    let fx = Fixture::new(comp).await;
    let good = fx.bytes(JOURNAL);
    assert!(good.len() > 100, "journal unexpectedly small");
    let mut rng = SplitMix64(99);
    let mut cases: Vec<(String, Option<Vec<u8>>)> = vec![
        ("deleted".into(), None),
        ("emptied".into(), Some(Vec::new())),
        ("random garbage".into(), Some(rng.bytes(700))),
        ("garbage lines".into(), Some(b"not a journal\n{\"op\":\"s\"}\n\n".to_vec())),
        ("garbage appended".into(), Some([good.clone(), rng.bytes(300)].concat())),
        (
            "a line appended twice".into(),
            Some([good.clone(), good[..good.len() / 2].to_vec()].concat()),
        ),
        ("zeroed".into(), Some(vec![0; good.len()])),
    ];
    // Truncations: at every line boundary and one byte either side, plus a spread.
    let mut cuts: Vec<usize> = Vec::new();
    for (i, b) in good.iter().enumerate() {
        if *b == b'\n' {
            cuts.extend([i, i + 1, i + 2]);
        }
    }
    cuts.extend(offsets(good.len()).into_iter().step_by(4));
    cuts.sort();
    cuts.dedup();
    for cut in cuts.into_iter().filter(|c| *c < good.len()) {
        cases.push((format!("cut to {cut} of {} bytes", good.len()), Some(good[..cut].to_vec())));
    }
    for i in offsets(good.len()).into_iter().step_by(2) {
        let mut bad = good.clone();
        bad[i] ^= 0xff;
        cases.push((format!("byte {i} flipped"), Some(bad)));
    }
    let n = cases.len();
    let mut bad = Vec::new();
    for (name, bytes) in cases {
        fx.restore();
        let path = fx.base.join(JOURNAL);
        match &bytes {
            None => std::fs::remove_file(&path).unwrap(),
            Some(b) => put_file(&path, b),
        }
        if let Err(e) = listings_match(&fx).await {
            bad.push(format!("journal {name}:\n{e}"));
        }
    }
    println!("damaged journal ({comp:?}): {n} cases, {} wrong", bad.len());
    assert!(
        bad.is_empty(),
        "damaged journal ({comp:?}): {} of {n} cases listed wrongly; first ones:\n{}",
        bad.len(),
        bad.iter().take(6).cloned().collect::<Vec<_>>().join("\n")
    );
}

plain_and_compressed! {
    damaged_index_journal_is_rebuilt_from_the_records,
    damaged_index_journal_is_rebuilt_from_the_records_compressed => damaged_journal;
}

/// The journal is not fsynced, so a crash may drop its last line. If that line recorded a
/// save that left the record's size unchanged, the surviving older line still matches the
/// record's size. Here the surviving line says `sA` was saved 40 days ago, while its record
/// was saved just now: an age-based cleanup must not delete it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_that_lost_its_tail_does_not_make_a_fresh_session_look_idle() {
    let (_dir, base) = temp_store("store");
    let m = Comp::Plain.builder(&base).start().await.unwrap();
    m.save_session("sA", &json!({"n": 1})).await.unwrap();
    m.save_session("keep", &json!({"n": 1})).await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);
    let record = std::fs::read(base.join("sessions/sA.json")).unwrap();
    let saved_at = serde_json::from_slice::<Value>(&record).unwrap()["saved_at"].as_u64().unwrap();
    // The line an earlier save of the same size would have left.
    let old_at = saved_at - 40 * 86_400_000;
    let line = format!(r#"{{"op":"s","sid":"sA","at":{old_at},"size":{}}}"#, record.len());
    let path = base.join(JOURNAL);
    let mut journal = std::fs::read(&path).unwrap();
    journal.extend(format!("{:08x} {line}\n", crc32fast::hash(line.as_bytes())).into_bytes());
    // ...and the later line for the save of just now was lost: put the old one last by
    // dropping every other line for sA.
    let text = String::from_utf8(journal).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !l.contains(r#""sid":"sA""#) || l.contains(&format!(r#""at":{old_at}"#)))
        .map(|l| format!("{l}\n"))
        .collect();
    put_file(&path, kept.as_bytes());

    let m = Comp::Plain.builder(&base).start().await.unwrap();
    let sessions = m.list_sessions().await.unwrap();
    let info = session_info(&sessions, "sA");
    let removed = m.cleanup_old_sessions(Duration::from_secs(30 * 86_400), 0).await.unwrap();
    let still_there = m.load_session("sA").await.unwrap();
    m.shutdown().await.unwrap();
    let mut problems = Vec::new();
    if info.updated_at != saved_at {
        problems.push(format!(
            "list_sessions reports updated_at {} (the stale journal line), the record says {saved_at}",
            info.updated_at
        ));
    }
    if removed != 0 {
        problems.push(format!(
            "cleanup_old_sessions(30 days) deleted {removed} session(s) saved seconds ago"
        ));
    }
    if still_there != Some(json!({"n": 1})) {
        problems.push(format!("load_session(\"sA\") afterwards: {still_there:?}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A damaged record whose save time cannot be read must not count as "idle since 1970":
/// an age-based cleanup would delete the very file kept for inspection.
async fn corrupt_not_idle(compression: Option<u32>) {
    let comp = Comp::of(compression);
    let fx = Fixture::new(comp).await;
    let key = Target::Session("sBig").key(comp);
    let good = fx.bytes(&key);
    fx.restore();
    put_file(&fx.base.join(&key), &good[..good.len() / 2]);
    let m = comp.builder(&fx.base).start().await.unwrap();
    let removed = m.cleanup_old_sessions(Duration::from_secs(30 * 86_400), 0).await.unwrap();
    let load = m.load_session("sBig").await;
    m.shutdown().await.unwrap();
    assert_eq!(
        removed, 0,
        "cleanup_old_sessions(30 days) removed a session saved seconds ago whose record is damaged"
    );
    assert_eq!(
        load.map_err(|e| e.kind()).err(),
        Some(ErrorKind::Corrupt),
        "the damaged record is gone"
    );
    assert!(fx.base.join(&key).is_file(), "the damaged record was deleted");
}

plain_and_compressed! {
    damaged_record_is_not_removed_as_idle,
    damaged_record_is_not_removed_as_idle_compressed => corrupt_not_idle;
}

/// Damaged store metadata stops the start with an error naming it; it is not silently
/// replaced (which could flip the store's compression and hide every record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_metadata_is_reported_not_replaced() {
    let fx = Fixture::new(Comp::Gzip).await;
    let key = "metadata/store.json";
    let good = fx.bytes(key);
    let mut cases = vec![("emptied", Vec::new()), ("garbage", b"\x00\x01garbage".to_vec())];
    for cut in [1, good.len() / 2, good.len() - 1] {
        cases.push(("truncated", good[..cut].to_vec()));
    }
    for (name, bytes) in cases {
        fx.restore();
        put_file(&fx.base.join(key), &bytes);
        match Comp::Gzip.builder(&fx.base).start().await {
            Ok(m) => {
                m.shutdown().await.unwrap();
                panic!("store metadata {name}: the manager started");
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Corrupt, "store metadata {name}: {e}");
                assert!(
                    e.to_string().contains(key),
                    "store metadata {name}: error does not name it: {e}"
                );
            }
        }
        assert_eq!(
            std::fs::read(fx.base.join(key)).unwrap(),
            bytes,
            "store metadata {name} was rewritten"
        );
    }
}
