//! The power-loss oracle: a workload of saves, updates, checkpoints, deletes, a rollback and
//! a cleanup; at every change of the file system inside each operation and after each
//! acknowledgement, it builds the crash images, recovers each distinct one with a fresh
//! manager and checks it against the acknowledged writes. It calls the manager over
//! [`SimFs`] through the helpers of `super`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::path::Path;

use serde_json::{Value, json};

use super::*;
use crate::testing::simfs::tree::SplitMix;

const SIDS: [&str; 3] = ["s0", "s1", "s2"];

#[derive(Clone, Copy, Debug)]
enum Step {
    Save(&'static str),
    Update(&'static str),
    Checkpoint(&'static str),
    Delete(&'static str),
    /// Roll back to the session's newest live checkpoint.
    Rollback(&'static str),
    Cleanup(&'static str, usize),
}

/// Every kind of write, sessions re-created after a delete, checkpoints of deleted
/// sessions, a rollback and a cleanup.
const WORKLOAD: [Step; 19] = [
    Step::Save("s0"),
    Step::Save("s1"),
    Step::Checkpoint("s0"),
    Step::Save("s0"),
    Step::Update("s1"),
    Step::Checkpoint("s1"),
    Step::Checkpoint("s0"),
    Step::Save("s2"),
    Step::Delete("s1"),
    Step::Save("s0"),
    Step::Checkpoint("s2"),
    Step::Rollback("s0"),
    Step::Update("s1"),
    Step::Checkpoint("s1"),
    Step::Cleanup("s0", 1),
    Step::Save("s2"),
    Step::Delete("s2"),
    Step::Checkpoint("s2"),
    Step::Update("s0"),
];

#[derive(Clone, Debug)]
struct Cp {
    sid: String,
    data: Value,
    live: bool,
}

/// What has been acknowledged.
#[derive(Clone, Debug, Default)]
struct Model {
    sessions: BTreeMap<String, Value>,
    cps: BTreeMap<CheckpointId, Cp>,
}

/// The operation under way at a crash point: its effect may or may not be present.
#[derive(Clone, Debug)]
enum InFlight {
    Idle,
    Write { sid: String, new: Value },
    Checkpoint { sid: String, data: Value },
    Delete { sid: String },
    Cleanup { sid: String, doomed: BTreeSet<CheckpointId> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// An older (or foreign) version where the acknowledged one was expected.
    Lost,
    /// Acknowledged data absent.
    Missing,
    /// A load or restore reported damage.
    Corrupt,
    /// Deleted data came back.
    Resurrected,
    /// Listing and restoring checkpoints disagree.
    Inconsistent,
    /// A staged file survived recovery.
    Leftover,
    /// Recovery left a journal that the next start cannot replay.
    Journal,
    Other,
}

fn class_of(e: &StateError) -> Class {
    if e.kind() == ErrorKind::Corrupt { Class::Corrupt } else { Class::Other }
}

#[derive(Debug, Default)]
struct Report {
    /// Crash points: every change of the file system, and every acknowledgement.
    points: usize,
    /// Distinct crash images recovered and checked.
    states: usize,
    /// Of those, process-kill images recovered, written to, then power-lost again.
    second_crashes: usize,
    fsyncs: u64,
    /// Log mode: distinct generation headers the log went through, and its largest size.
    log_generations: usize,
    log_max_len: usize,
    violations: BTreeMap<Class, usize>,
    examples: Vec<String>,
}

impl Report {
    fn add(&mut self, class: Class, what: String) {
        *self.violations.entry(class).or_default() += 1;
        if self.examples.len() < 8 {
            self.examples.push(format!("{class:?}: {what}"));
        }
    }
    fn failures(&self) -> usize {
        self.violations.values().sum()
    }
    /// Lost, corrupt or missing data: what the oracle exists to find.
    fn data_failures(&self) -> usize {
        self.count(Class::Lost) + self.count(Class::Corrupt) + self.count(Class::Missing)
    }
    fn count(&self, class: Class) -> usize {
        self.violations.get(&class).copied().unwrap_or(0)
    }
}

fn plan(step: Step, model: &Model, seq: u64) -> InFlight {
    let live = |sid: &str| -> Vec<CheckpointId> {
        model.cps.iter().filter(|(_, c)| c.sid == sid && c.live).map(|(id, _)| id.clone()).collect()
    };
    match step {
        Step::Save(s) | Step::Update(s) => InFlight::Write { sid: s.into(), new: payload(s, seq) },
        Step::Rollback(s) => {
            let newest = live(s).pop().unwrap();
            InFlight::Write { sid: s.into(), new: model.cps[&newest].data.clone() }
        }
        Step::Checkpoint(s) => InFlight::Checkpoint { sid: s.into(), data: payload(s, seq) },
        Step::Delete(s) => InFlight::Delete { sid: s.into() },
        Step::Cleanup(s, keep) => {
            let ids = live(s);
            let n = ids.len().saturating_sub(keep);
            InFlight::Cleanup { sid: s.into(), doomed: ids.into_iter().take(n).collect() }
        }
    }
}

/// Runs `step` and checks its reply; returns the new checkpoint's id, if any.
async fn perform(
    m: &StateManager,
    step: Step,
    model: &Model,
    planned: &InFlight,
) -> Option<CheckpointId> {
    match (step, planned) {
        (Step::Save(s), InFlight::Write { new, .. }) => m.save_session(s, new).await.unwrap(),
        (Step::Update(s), InFlight::Write { new, .. }) => {
            let (expected, new) = (model.sessions.get(s).cloned(), new.clone());
            let out = m
                .transactional_update(s, move |old: Option<Value>| {
                    if old == expected {
                        Ok(new)
                    } else {
                        Err(io::Error::other("update saw a stale state"))
                    }
                })
                .await
                .unwrap();
            assert_eq!(Some(&out), planned_value(planned));
        }
        (Step::Rollback(s), InFlight::Write { .. }) => {
            let newest = model
                .cps
                .iter()
                .filter(|(_, c)| c.sid == s && c.live)
                .map(|(id, _)| id)
                .next_back();
            m.rollback_to_checkpoint(newest.unwrap()).await.unwrap();
        }
        (Step::Checkpoint(s), InFlight::Checkpoint { data, .. }) => {
            return Some(m.create_checkpoint(s, "main", data).await.unwrap());
        }
        (Step::Delete(s), InFlight::Delete { .. }) => {
            let existed =
                model.sessions.contains_key(s) || model.cps.values().any(|c| c.sid == s && c.live);
            assert_eq!(m.delete_session(s).await.unwrap(), existed);
        }
        (Step::Cleanup(s, keep), InFlight::Cleanup { doomed, .. }) => {
            assert_eq!(m.cleanup_checkpoints(s, keep).await.unwrap(), doomed.len());
        }
        (step, planned) => panic!("step {step:?} planned as {planned:?}"),
    }
    None
}

fn planned_value(planned: &InFlight) -> Option<&Value> {
    match planned {
        InFlight::Write { new, .. } => Some(new),
        _ => None,
    }
}

fn apply(model: &mut Model, done: InFlight, cid: Option<CheckpointId>) {
    match done {
        InFlight::Idle => {}
        InFlight::Write { sid, new } => {
            model.sessions.insert(sid, new);
        }
        InFlight::Checkpoint { sid, data } => {
            model.cps.insert(cid.unwrap(), Cp { sid, data, live: true });
        }
        InFlight::Delete { sid } => {
            model.sessions.remove(&sid);
            model.cps.values_mut().filter(|c| c.sid == sid).for_each(|c| c.live = false);
        }
        InFlight::Cleanup { doomed, .. } => {
            for id in doomed {
                if let Some(c) = model.cps.get_mut(&id) {
                    c.live = false;
                }
            }
        }
    }
}

/// Checks what a recovered manager shows against what was acknowledged (`model`) and
/// the operation that was under way (`inflight`).
async fn verify(
    m: &StateManager,
    model: &Model,
    inflight: &InFlight,
    out: &mut Vec<(Class, String)>,
) {
    let mut with_data = BTreeSet::new();
    for sid in SIDS {
        let expected = model.sessions.get(sid);
        let alternative = match inflight {
            InFlight::Write { sid: s, new } if s == sid => Some(Some(new)),
            InFlight::Delete { sid: s } if s == sid => Some(None),
            _ => None,
        };
        match m.load_session(sid).await {
            Ok(got) => {
                if got.is_some() {
                    with_data.insert(sid);
                }
                if got.as_ref() != expected && alternative != Some(got.as_ref()) {
                    let class = match (&got, expected) {
                        (None, Some(_)) => Class::Missing,
                        (Some(_), None) => Class::Resurrected,
                        _ => Class::Lost,
                    };
                    let what = format!(
                        "session {sid}: acked seq {:?}, in flight {:?}, found seq {:?}",
                        seq_of(expected),
                        alternative.map(seq_of),
                        seq_of(got.as_ref())
                    );
                    out.push((class, what));
                }
            }
            Err(e) => out.push((class_of(&e), format!("load_session({sid}): {e}"))),
        }

        let listed = match m.list_checkpoints(sid).await {
            Ok(l) => l,
            Err(e) => {
                out.push((class_of(&e), format!("list_checkpoints({sid}): {e}")));
                continue;
            }
        };
        if !listed.is_empty() {
            with_data.insert(sid);
        }
        let listed_ids: BTreeSet<CheckpointId> = listed.iter().map(|c| c.id.clone()).collect();
        let mut unknown = 0;
        for info in &listed {
            let want = match (model.cps.get(&info.id), inflight) {
                (Some(cp), _) if cp.sid == sid => Some(&cp.data),
                (None, InFlight::Checkpoint { sid: s, data }) if s == sid => {
                    unknown += 1;
                    Some(data)
                }
                _ => None,
            };
            match m.restore_checkpoint(&info.id).await {
                Ok(Some(cp)) if want == Some(&cp.data) && cp.session_id.as_str() == sid => {}
                Ok(Some(cp)) => out.push((
                    Class::Lost,
                    format!(
                        "checkpoint {} of {sid} holds seq {:?}",
                        info.id.as_str(),
                        seq_of(Some(&cp.data))
                    ),
                )),
                Ok(None) => out.push((
                    Class::Inconsistent,
                    format!(
                        "checkpoint {} of {sid} is listed but does not restore",
                        info.id.as_str()
                    ),
                )),
                Err(e) => out
                    .push((class_of(&e), format!("restore_checkpoint({}): {e}", info.id.as_str()))),
            }
        }
        if unknown > 1 {
            out.push((Class::Inconsistent, format!("{unknown} unknown checkpoints of {sid}")));
        }
        for (id, cp) in model.cps.iter().filter(|(_, c)| c.sid == sid) {
            let may_be_gone = match inflight {
                InFlight::Delete { sid: s } => s == sid,
                InFlight::Cleanup { sid: s, doomed } => s == sid && doomed.contains(id),
                _ => false,
            };
            if listed_ids.contains(id) {
                if !cp.live {
                    out.push((
                        Class::Resurrected,
                        format!("deleted checkpoint {} of {sid} listed", id.as_str()),
                    ));
                }
                continue;
            }
            match m.restore_checkpoint(id).await {
                Ok(None) => {}
                Ok(Some(_)) => out.push((
                    Class::Inconsistent,
                    format!("checkpoint {} of {sid} restores but is not listed", id.as_str()),
                )),
                Err(e) => {
                    out.push((class_of(&e), format!("restore_checkpoint({}): {e}", id.as_str())))
                }
            }
            if cp.live && !may_be_gone {
                out.push((
                    Class::Missing,
                    format!("acked checkpoint {} of {sid} missing", id.as_str()),
                ));
            }
        }
    }
    match m.list_sessions().await {
        Ok(list) => {
            let listed: BTreeSet<&str> =
                list.iter().map(|s| s.session_id.as_str()).filter(|s| *s != PROBE).collect();
            if listed != with_data {
                out.push((
                    Class::Inconsistent,
                    format!("list_sessions {listed:?} but data for {with_data:?}"),
                ));
            }
        }
        Err(e) => out.push((class_of(&e), format!("list_sessions: {e}"))),
    }
}

/// A session the checks write after recovery, to see that the store takes writes.
const PROBE: &str = "probe";

/// What one check needs to know: the run's settings, the acknowledged writes and the
/// operation under way.
struct Ctx<'a> {
    oracle: &'a Oracle,
    root: &'a Path,
    model: &'a Model,
    inflight: &'a InFlight,
}

/// Recovers a crash image, checks it, writes to it; and with `second_crash`, loses
/// power after that and checks again, the writes made after recovery included.
async fn recover_and_check(
    image: &SimFs,
    ctx: &Ctx<'_>,
    second_crash: bool,
    out: &mut Vec<(Class, String)>,
) {
    let Ctx { oracle, root, model, inflight } = *ctx;
    let m = match open_mode(image, root, oracle.gzip, oracle.log).await {
        Ok(m) => m,
        Err(e) => return out.push((class_of(&e), format!("recovery failed: {e}"))),
    };
    verify(&m, model, inflight, out).await;
    // The recovered store takes new writes: a session, and a checkpoint per session.
    let probe = json!({"probe": true});
    if let Err(e) = m.save_session(PROBE, &probe).await {
        out.push((Class::Other, format!("save after recovery: {e}")));
    }
    let mut after = model.clone();
    if second_crash {
        for sid in SIDS {
            let data = json!({"probe": sid});
            match m.create_checkpoint(sid, "probe", &data).await {
                Ok(id) => {
                    after.cps.insert(id, Cp { sid: sid.into(), data, live: true });
                }
                Err(e) => out.push((Class::Other, format!("checkpoint after recovery: {e}"))),
            }
        }
    }
    m.shutdown().await.unwrap();
    let staged = image.tree().staged_files();
    if !staged.is_empty() {
        out.push((Class::Leftover, format!("staged files after recovery: {staged:?}")));
    }
    match image.read(&root.join("metadata/index.log")) {
        Ok(Some(journal)) if Index::replay(&journal).is_none() => {
            out.push((Class::Journal, "the journal left by recovery does not replay".into()))
        }
        Ok(_) => {}
        Err(e) => out.push((Class::Other, format!("reading the journal: {e}"))),
    }
    if !second_crash {
        return;
    }
    let again = image.crash(CrashMode::Durable);
    let m = match open_mode(&again, root, oracle.gzip, oracle.log).await {
        Ok(m) => m,
        Err(e) => return out.push((class_of(&e), format!("second recovery failed: {e}"))),
    };
    let mut second = Vec::new();
    verify(&m, &after, inflight, &mut second).await;
    match m.load_session(PROBE).await {
        Ok(Some(v)) if v == probe => {}
        Ok(v) => second.push((Class::Missing, format!("probe session after recovery: {v:?}"))),
        Err(e) => second.push((class_of(&e), format!("load_session(probe): {e}"))),
    }
    m.shutdown().await.unwrap();
    out.extend(second.into_iter().map(|(c, w)| (c, format!("after a second crash: {w}"))));
}

struct Oracle {
    gzip: bool,
    /// Writes through the write-ahead log.
    log: bool,
    broken: Option<Broken>,
    /// A deliberately broken log writer that never changes its generation's salt.
    broken_log: bool,
    /// Random "some unsynced kept" images per crash point, besides the durable-only
    /// and process-kill ones.
    variants: u64,
    /// After recovering a process-kill image, write, lose power, and check again.
    second_crash: bool,
    stop_at_first_loss: bool,
}

const SEED: u64 = 0x6d61_7273_2d73_696d;

/// Builds the crash images of one crash point and checks each distinct one.
async fn check_point(
    tree: &Tree,
    point: u64,
    ctx: &Ctx<'_>,
    seen: &mut HashSet<Vec<u8>>,
    report: &mut Report,
) {
    report.points += 1;
    let mut rng = SplitMix(SEED ^ point.wrapping_mul(0x9E37_79B9));
    let modes = [CrashMode::Durable, CrashMode::ProcessKill]
        .into_iter()
        .chain((0..ctx.oracle.variants).map(|_| CrashMode::Random(rng.next())));
    for mode in modes {
        let image = tree.crash_image(mode);
        if !seen.insert(image.fingerprint()) {
            continue;
        }
        report.states += 1;
        let second_crash = ctx.oracle.second_crash && mode == CrashMode::ProcessKill;
        report.second_crashes += usize::from(second_crash);
        let mut found = Vec::new();
        recover_and_check(&SimFs::from_tree(image), ctx, second_crash, &mut found).await;
        for (class, what) in found {
            report.add(class, format!("{what} (crash point {point}, {mode:?})"));
        }
        if ctx.oracle.stop_at_first_loss && report.data_failures() > 0 {
            return;
        }
    }
}

/// Runs [`WORKLOAD`]; at every change of the file system inside each operation, and
/// after each acknowledgement, builds the crash images and checks them.
async fn run_oracle(oracle: Oracle) -> Report {
    let bed = Bed::new();
    let m = open_log(&bed.fs, &bed.root, oracle.gzip, oracle.log, oracle.broken_log).await.unwrap();
    let wal = bed.root.join("metadata/.wal");
    let mut headers = HashSet::new();
    // Broken only now: the store's layout is durable, so what the oracle catches is
    // a save that a broken primitive fails to make durable.
    if let Some(b) = oracle.broken {
        bed.fs.break_durability(b);
    }
    bed.fs.record(true);
    let mut model = Model::default();
    let mut report = Report::default();
    let mut point = 0;
    let stop = |r: &Report| oracle.stop_at_first_loss && r.data_failures() > 0;
    for (seq, step) in (1..).zip(WORKLOAD) {
        let inflight = plan(step, &model, seq);
        let cid = perform(&m, step, &model, &inflight).await;
        let ctx = Ctx { oracle: &oracle, root: &bed.root, model: &model, inflight: &inflight };
        let mut seen = HashSet::new();
        for tree in bed.fs.take_snapshots() {
            if let Ok(Some(log)) = SimFs::from_tree(tree.clone()).read(&wal) {
                report.log_max_len = report.log_max_len.max(log.len());
                if log.len() >= 32 && log.starts_with(b"MSWH") {
                    headers.insert(log[..32].to_vec());
                }
            }
            point += 1;
            check_point(&tree, point, &ctx, &mut seen, &mut report).await;
            if stop(&report) {
                return report;
            }
        }
        apply(&mut model, inflight, cid);
        point += 1;
        let ctx =
            Ctx { oracle: &oracle, root: &bed.root, model: &model, inflight: &InFlight::Idle };
        check_point(&bed.fs.tree(), point, &ctx, &mut HashSet::new(), &mut report).await;
        if stop(&report) {
            return report;
        }
    }
    report.fsyncs = bed.fs.calls(Op::SyncData) + bed.fs.calls(Op::SyncDir);
    report.log_generations = headers.len();
    m.shutdown().await.unwrap();
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_at_every_step_loses_no_acknowledged_write() {
    for (gzip, log) in [(false, false), (true, false), (false, true), (true, true)] {
        let oracle = Oracle {
            gzip,
            log,
            broken: None,
            broken_log: false,
            variants: 12,
            second_crash: false,
            stop_at_first_loss: false,
        };
        let report = run_oracle(oracle).await;
        println!(
            "power-loss oracle (gzip: {gzip}, log: {log}): {} steps ({} fsyncs), {} crash points, {} distinct \
             crash states recovered and checked; log generations written in place {}, largest log {} bytes \
             (preallocated {LOG_PREALLOC}); lost {} / corrupt {} / missing {}; all violations {:?}",
            WORKLOAD.len(),
            report.fsyncs,
            report.points,
            report.states,
            report.log_generations,
            report.log_max_len,
            report.count(Class::Lost),
            report.count(Class::Corrupt),
            report.count(Class::Missing),
            report.violations
        );
        assert_eq!(report.failures(), 0, "gzip {gzip}, log {log}: {:#?}", report.examples);
        assert!(report.states > 200, "too few crash states: {}", report.states);
        if log {
            // The workload must cross several generations of the log, each written over the
            // one before in place, and grow it past its preallocated part at least once.
            assert!(report.log_generations >= 4, "log generations: {}", report.log_generations);
            assert!(report.log_max_len as u64 > LOG_PREALLOC, "the log never grew");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_after_a_process_crash_and_restart_loses_no_acknowledged_write() {
    for log in [false, true] {
        let oracle = Oracle {
            gzip: false,
            log,
            broken: None,
            broken_log: false,
            variants: 0,
            second_crash: true,
            stop_at_first_loss: false,
        };
        let report = run_oracle(oracle).await;
        println!(
            "process crash, restart, writes, power loss (log: {log}): {} crash points, {} restarts then power \
             losses; violations {:?}; examples {:#?}",
            report.points, report.second_crashes, report.violations, report.examples
        );
        assert_eq!(report.failures(), 0, "log {log}: {:#?}", report.examples);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracle_catches_a_missing_file_fsync_and_a_missing_directory_fsync() {
    // With the log, a save syncs only the log's data (its directory once, when the log
    // is created): a no-op data sync is what must be caught there.
    for (broken, log) in
        [(Broken::SyncDataNoop, false), (Broken::SyncDirNoop, false), (Broken::SyncDataNoop, true)]
    {
        let oracle = Oracle {
            gzip: false,
            log,
            broken: Some(broken),
            broken_log: false,
            variants: 2,
            second_crash: false,
            stop_at_first_loss: true,
        };
        let report = run_oracle(oracle).await;
        println!(
            "broken variant {broken:?} (log: {log}): caught after {} crash states: {:?}",
            report.states, report.examples
        );
        assert!(
            report.data_failures() > 0,
            "the oracle did not notice {broken:?} (log: {log}): {report:?}"
        );
    }
}

/// The same oracle over a log writer that never changes its generation's salt: frames of
/// older generations, left in the file after the live generation's end, look live again.
/// Overwriting in place is only safe with the salt; the oracle must see the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracle_catches_a_log_that_reuses_its_salt() {
    let oracle = Oracle {
        gzip: false,
        log: true,
        broken: None,
        broken_log: true,
        variants: 4,
        second_crash: false,
        stop_at_first_loss: true,
    };
    let report = run_oracle(oracle).await;
    println!(
        "broken log (one salt for every generation): caught after {} crash states: {:?}",
        report.states, report.examples
    );
    assert!(report.data_failures() > 0, "the oracle did not notice a reused salt: {report:?}");
}
