//! Model test (issue 5, item 1): random sequences of save, load, delete, checkpoint,
//! restore, rollback, cleanup, transactional update and reopen, run against a
//! `StateManager` and against a plain in-memory reference model; every result and every
//! listing must agree.
//!
//! The reference model is a map of session states plus, per session, the list of its
//! checkpoints in creation order (id, branch, value). After each operation the test
//! compares the operation's result with the model's, then the listings: `list_sessions`,
//! `list_checkpoints` of every session the sequence uses, and `get_storage_stats`. A
//! `Reopen` step shuts the manager down and starts a new one on the same storage, so what
//! the model holds must also be what was made durable (and what the index journal and its
//! reconciliation rebuild).
//!
//! The runs share the generator (`proptest`, shrinking to a minimal failing sequence):
//! - `model_memory_backend`: 1,000 sequences over `MemoryStorageBackend` (a reopen hands a
//!   clone of the backend, which shares its map, to the new manager);
//! - `model_file_backend`: 300 sequences over `FileStorageBackend` in a fresh directory
//!   under `/dev/shm` (tmpfs) when it exists, else the system temporary directory;
//! - `model_catches_a_backend_that_drops_writes`: the deliberately broken variant, a
//!   backend that acknowledges every fifth session write without storing it, must diverge.
//!
//! Each sequence picks its record format (plain JSON, gzip, and with the `encryption`
//! feature also encrypted and gzip+encrypted) and holds 1 to 59 steps over three sessions.
//! The tests print how many sequences (per format) and steps ran and how many diverged
//! (0 for the real backends). `MARS_MODEL_CASES=<n>` overrides the number of sequences of
//! the two real runs.
//!
//! Run alone: `cargo test --test model -- --nocapture`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::encrypt;
use mars_state::testing::{Faulty, Method};
use mars_state::{CheckpointId, ErrorKind, FileStorageBackend, MemoryStorageBackend, StateManager};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use serde_json::{Value, json};

const SESSIONS: [&str; 3] = ["alpha", "beta", "gamma"];
const BRANCHES: [&str; 2] = ["main", "alt"];
/// A well-formed checkpoint id that no sequence ever creates.
const NEVER_CREATED: &str = "0000000000000001-deadbeef";

#[derive(Clone, Debug)]
enum Op {
    Save {
        s: usize,
        v: u32,
        pad: usize,
    },
    Load {
        s: usize,
    },
    Delete {
        s: usize,
    },
    Checkpoint {
        s: usize,
        b: usize,
        v: u32,
        pad: usize,
    },
    /// `pick` indexes every id created so far (deleted ones included); with none, or
    /// when `never`, a well-formed id that was never created.
    Restore {
        pick: usize,
        never: bool,
    },
    Rollback {
        pick: usize,
        never: bool,
    },
    Cleanup {
        s: usize,
        keep: usize,
    },
    /// `reject`: the closure returns an error, so nothing may be written.
    Update {
        s: usize,
        delta: i64,
        reject: bool,
    },
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let s = 0..SESSIONS.len();
    prop_oneof![
        6 => (s.clone(), any::<u32>(), 0usize..3000).prop_map(|(s, v, pad)| Op::Save { s, v, pad }),
        3 => s.clone().prop_map(|s| Op::Load { s }),
        1 => s.clone().prop_map(|s| Op::Delete { s }),
        5 => (s.clone(), 0..BRANCHES.len(), any::<u32>(), 0usize..3000)
            .prop_map(|(s, b, v, pad)| Op::Checkpoint { s, b, v, pad }),
        2 => (any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(pick, never)| Op::Restore { pick, never }),
        2 => (any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(pick, never)| Op::Rollback { pick, never }),
        2 => (s.clone(), 0usize..4).prop_map(|(s, keep)| Op::Cleanup { s, keep }),
        2 => (s, -50i64..50, prop::bool::weighted(0.2)).prop_map(|(s, delta, reject)| Op::Update { s, delta, reject }),
        1 => Just(Op::Reopen),
    ]
}

fn value(s: usize, v: u32, pad: usize) -> Value {
    json!({ "session": SESSIONS[s], "v": v, "pad": "p".repeat(pad) })
}

/// The reference: what every operation must leave behind.
#[derive(Default)]
struct Model {
    states: BTreeMap<usize, Value>,
    /// Per session, its checkpoints oldest first: (id, branch index, value).
    checkpoints: BTreeMap<usize, Vec<(CheckpointId, usize, Value)>>,
    /// Every id ever created, with its session (for restores of deleted checkpoints).
    created: Vec<(CheckpointId, usize)>,
}

impl Model {
    fn find(&self, id: &CheckpointId) -> Option<(usize, usize, &Value)> {
        self.checkpoints
            .iter()
            .find_map(|(s, cps)| cps.iter().find(|(c, _, _)| c == id).map(|(_, b, v)| (*s, *b, v)))
    }

    fn pick(&self, pick: usize, never: bool) -> CheckpointId {
        if never || self.created.is_empty() {
            CheckpointId::parse(NEVER_CREATED).unwrap()
        } else {
            self.created[pick % self.created.len()].0.clone()
        }
    }

    fn exists(&self, s: usize) -> bool {
        self.states.contains_key(&s) || self.checkpoints.get(&s).is_some_and(|c| !c.is_empty())
    }
}

/// Where a sequence's store lives.
enum Storage {
    Memory(MemoryStorageBackend),
    File(tempfile::TempDir),
    /// The deliberately broken variant: a memory backend that acknowledges some session
    /// writes without storing them.
    Dropping(DroppingBackend),
}

/// Acknowledges every fifth put of a session record without storing it: a lost write the
/// model test must notice (after a reopen, when the session actor's cache is gone). Shared
/// by clones (a reopen hands a clone to a new manager).
type DroppingBackend = Arc<Faulty<MemoryStorageBackend>>;

fn dropping_backend() -> DroppingBackend {
    let session_puts = AtomicUsize::new(0);
    Arc::new(Faulty::new(MemoryStorageBackend::new()).lose(Method::Put, move |key| {
        key.as_str().starts_with("sessions/")
            && session_puts.fetch_add(1, Ordering::Relaxed) % 5 == 4
    }))
}

/// How records are stored.
#[derive(Clone, Copy, Debug)]
struct Format {
    gzip: bool,
    encrypted: bool,
}

fn format_strategy() -> impl Strategy<Value = Format> {
    let encrypted =
        if cfg!(feature = "encryption") { any::<bool>().boxed() } else { Just(false).boxed() };
    (any::<bool>(), encrypted).prop_map(|(gzip, encrypted)| Format { gzip, encrypted })
}

async fn start(storage: &Storage, format: Format) -> Result<StateManager, TestCaseError> {
    let mut builder = match storage {
        Storage::Memory(b) => StateManager::builder(b.clone()),
        Storage::Dropping(b) => StateManager::builder(b.clone()),
        Storage::File(dir) => StateManager::builder(
            FileStorageBackend::new(dir.path())
                .map_err(|e| TestCaseError::fail(format!("opening the file backend: {e}")))?,
        ),
    };
    builder = builder.janitor_interval(std::time::Duration::from_secs(3600));
    if format.gzip {
        builder = builder.compression(6);
    }
    if format.encrypted {
        builder = encrypt(builder);
    }
    builder.start().await.map_err(|e| TestCaseError::fail(format!("starting the manager: {e}")))
}

macro_rules! check {
    ($cond:expr, $step:expr, $op:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(TestCaseError::fail(format!("step {} ({:?}): {}", $step, $op, format!($($fmt)*))));
        }
    };
}

/// Runs one sequence; `Err` describes the first divergence.
async fn run_sequence(storage: Storage, format: Format, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut m = start(&storage, format).await?;
    let mut model = Model::default();
    let result = async {
        for (step, op) in ops.iter().enumerate() {
            apply(&mut m, &storage, format, &mut model, step, op).await?;
            check_listings(&m, &model, step, op).await?;
        }
        Ok(())
    }
    .await;
    m.shutdown().await.map_err(|e| TestCaseError::fail(format!("final shutdown: {e}")))?;
    result
}

async fn apply(
    m: &mut StateManager,
    storage: &Storage,
    format: Format,
    model: &mut Model,
    step: usize,
    op: &Op,
) -> Result<(), TestCaseError> {
    match *op {
        Op::Save { s, v, pad } => {
            let val = value(s, v, pad);
            let r = m.save_session(SESSIONS[s], &val).await;
            check!(r.is_ok(), step, op, "save failed: {r:?}");
            model.states.insert(s, val);
        }
        Op::Load { s } => {
            let got = m.load_session(SESSIONS[s]).await;
            check!(
                matches!(&got, Ok(g) if g.as_ref() == model.states.get(&s)),
                step,
                op,
                "loaded {got:?}, model has {:?}",
                model.states.get(&s)
            );
        }
        Op::Delete { s } => {
            let existed = model.exists(s);
            let got = m.delete_session(SESSIONS[s]).await;
            check!(
                matches!(got, Ok(e) if e == existed),
                step,
                op,
                "delete returned {got:?}, model: existed={existed}"
            );
            model.states.remove(&s);
            model.checkpoints.remove(&s);
            let after = m.load_session(SESSIONS[s]).await;
            check!(matches!(after, Ok(None)), step, op, "load after delete: {after:?}");
        }
        Op::Checkpoint { s, b, v, pad } => {
            let val = value(s, v, pad);
            let id = match m.create_checkpoint(SESSIONS[s], BRANCHES[b], &val).await {
                Ok(id) => id,
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "step {step} ({op:?}): checkpoint failed: {e}"
                    )));
                }
            };
            let cps = model.checkpoints.entry(s).or_default();
            if let Some((last, _, _)) = cps.last() {
                check!(id > *last, step, op, "new id {id} is not after the previous {last}");
            }
            check!(
                model.created.iter().all(|(c, _)| *c != id),
                step,
                op,
                "id {id} was handed out before"
            );
            cps.push((id.clone(), b, val));
            model.created.push((id, s));
        }
        Op::Restore { pick, never } => {
            let id = model.pick(pick, never);
            let got = m.restore_checkpoint(&id).await;
            match (model.find(&id), got) {
                (None, Ok(None)) => {}
                (Some((s, b, val)), Ok(Some(cp))) => {
                    check!(
                        cp.id == id
                            && cp.session_id.as_str() == SESSIONS[s]
                            && cp.branch_id.as_str() == BRANCHES[b]
                            && cp.data == *val,
                        step,
                        op,
                        "restored {} of {} on {}: data differs or wrong ids",
                        cp.id,
                        cp.session_id,
                        cp.branch_id
                    );
                }
                (want, got) => {
                    return Err(TestCaseError::fail(format!(
                        "step {step} ({op:?}): restore {id}: model {:?}, got {got:?}",
                        want.map(|(s, b, _)| (SESSIONS[s], BRANCHES[b]))
                    )));
                }
            }
        }
        Op::Rollback { pick, never } => {
            let id = model.pick(pick, never);
            let got = m.rollback_to_checkpoint(&id).await;
            match model.find(&id).map(|(s, _, v)| (s, v.clone())) {
                Some((s, val)) => {
                    check!(got.is_ok(), step, op, "rollback to {id} failed: {got:?}");
                    model.states.insert(s, val);
                }
                None => {
                    check!(
                        matches!(&got, Err(e) if e.kind() == ErrorKind::NotFound),
                        step,
                        op,
                        "rollback to missing {id}: {got:?}"
                    );
                }
            }
        }
        Op::Cleanup { s, keep } => {
            let cps = model.checkpoints.entry(s).or_default();
            let doomed = cps.len().saturating_sub(keep);
            let got = m.cleanup_checkpoints(SESSIONS[s], keep).await;
            check!(
                matches!(got, Ok(n) if n == doomed),
                step,
                op,
                "cleanup returned {got:?}, model removes {doomed}"
            );
            cps.drain(..doomed);
        }
        Op::Update { s, delta, reject } => {
            let got = m
                .transactional_update(SESSIONS[s], move |old: Option<Value>| {
                    if reject {
                        return Err(std::io::Error::other("rejected by the model test"));
                    }
                    let n = old.as_ref().and_then(|o| o["n"].as_i64()).unwrap_or(0);
                    Ok(json!({ "n": n + delta, "was": old }))
                })
                .await;
            if reject {
                check!(
                    matches!(&got, Err(e) if e.kind() == ErrorKind::UpdateRejected),
                    step,
                    op,
                    "a rejecting update returned {got:?}"
                );
            } else {
                let old = model.states.get(&s).cloned();
                let n = old.as_ref().and_then(|o| o["n"].as_i64()).unwrap_or(0);
                let want = json!({ "n": n + delta, "was": old });
                check!(
                    matches!(&got, Ok(v) if *v == want),
                    step,
                    op,
                    "update returned {got:?}, model {want}"
                );
                model.states.insert(s, want);
            }
        }
        Op::Reopen => {
            m.shutdown()
                .await
                .map_err(|e| TestCaseError::fail(format!("step {step}: shutdown: {e}")))?;
            *m = start(storage, format).await?;
            // A fresh manager has no cache: every state comes from storage.
            for (s, name) in SESSIONS.iter().enumerate() {
                let got = m.load_session(name).await;
                check!(
                    matches!(&got, Ok(g) if g.as_ref() == model.states.get(&s)),
                    step,
                    op,
                    "after reopen {name} loads {got:?}, model has {:?}",
                    model.states.get(&s)
                );
            }
        }
    }
    Ok(())
}

async fn check_listings(
    m: &StateManager,
    model: &Model,
    step: usize,
    op: &Op,
) -> Result<(), TestCaseError> {
    let listed: Vec<String> = match m.list_sessions().await {
        Ok(l) => l.into_iter().map(|i| i.session_id.to_string()).collect(),
        Err(e) => return Err(TestCaseError::fail(format!("step {step}: list_sessions: {e}"))),
    };
    let mut want: Vec<String> =
        (0..SESSIONS.len()).filter(|s| model.exists(*s)).map(|s| SESSIONS[s].into()).collect();
    want.sort();
    check!(listed == want, step, op, "list_sessions {listed:?}, model {want:?}");
    let mut total = 0;
    for (s, name) in SESSIONS.iter().enumerate() {
        let got = match m.list_checkpoints(name).await {
            Ok(l) => l,
            Err(e) => {
                return Err(TestCaseError::fail(format!(
                    "step {step}: list_checkpoints({name}): {e}"
                )));
            }
        };
        let got: Vec<(String, String)> =
            got.into_iter().map(|c| (c.id.to_string(), c.branch_id.to_string())).collect();
        let want: Vec<(String, String)> = model
            .checkpoints
            .get(&s)
            .map(|c| c.iter().map(|(id, b, _)| (id.to_string(), BRANCHES[*b].to_owned())).collect())
            .unwrap_or_default();
        check!(got == want, step, op, "list_checkpoints({name}) {got:?}, model {want:?}");
        total += want.len();
    }
    match m.get_storage_stats().await {
        Ok(st) => check!(
            st.session_count == listed.len() && st.checkpoint_count == total,
            step,
            op,
            "stats {st:?}, model {} sessions, {total} checkpoints",
            listed.len()
        ),
        Err(e) => return Err(TestCaseError::fail(format!("step {step}: stats: {e}"))),
    }
    Ok(())
}

fn cases(default: u32) -> u32 {
    std::env::var("MARS_MODEL_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn scratch_parent() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(&shm).is_ok() { shm } else { std::env::temp_dir() }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Memory,
    File,
    Dropping,
}

/// Runs `cases` sequences; returns the number of divergent runs and the minimal failing
/// case's description, if any.
fn run(label: &str, cases: u32, kind: Kind) -> Option<String> {
    let file = kind == Kind::File;
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let parent = scratch_parent();
    let sequences = AtomicUsize::new(0);
    let steps = AtomicUsize::new(0);
    let divergences = AtomicUsize::new(0);
    // Sequences per format: plain, gzip, encrypted, gzip+encrypted.
    let formats: [AtomicUsize; 4] = Default::default();
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2_000,
        // Each case is a whole sequence; no time limit per case (debug builds are slow).
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = (format_strategy(), proptest::collection::vec(op_strategy(), 1..60));
    let started = Instant::now();
    let result = runner.run(&strategy, |(format, ops)| {
        sequences.fetch_add(1, Ordering::Relaxed);
        steps.fetch_add(ops.len(), Ordering::Relaxed);
        formats[usize::from(format.gzip) + 2 * usize::from(format.encrypted)]
            .fetch_add(1, Ordering::Relaxed);
        let storage = match kind {
            Kind::File => Storage::File(tempfile::tempdir_in(&parent).unwrap()),
            Kind::Memory => Storage::Memory(MemoryStorageBackend::new()),
            Kind::Dropping => Storage::Dropping(dropping_backend()),
        };
        let r = rt.block_on(run_sequence(storage, format, &ops));
        if r.is_err() {
            divergences.fetch_add(1, Ordering::Relaxed);
        }
        r
    });
    let (n, k, d) = (sequences.into_inner(), steps.into_inner(), divergences.into_inner());
    let where_ = if file { format!(" in {}", parent.display()) } else { String::new() };
    let f = formats.map(AtomicUsize::into_inner);
    println!(
        "model test ({label}{where_}): {n} sequences ({} plain, {} gzip, {} encrypted, {} gzip+encrypted), {k} steps, \
         {d} divergences (shrinking included) in {:.1}s",
        f[0],
        f[1],
        f[2],
        f[3],
        started.elapsed().as_secs_f64()
    );
    match result {
        Ok(()) => {
            assert_eq!(d, 0);
            None
        }
        Err(TestError::Fail(reason, (format, ops))) => Some(format!(
            "divergence from the model: {reason}\nminimal sequence ({format:?}, {} steps):\n{ops:#?}",
            ops.len()
        )),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn model_memory_backend() {
    if let Some(failure) = run("memory backend", cases(1_000), Kind::Memory) {
        panic!("{failure}");
    }
}

#[test]
fn model_file_backend() {
    if let Some(failure) = run("file backend", cases(300), Kind::File) {
        panic!("{failure}");
    }
}

/// The harness can fail: a backend that acknowledges a fifth of the session writes without
/// storing them must be caught.
#[test]
fn model_catches_a_backend_that_drops_writes() {
    let failure =
        run("broken variant: a backend that drops every fifth session write", 300, Kind::Dropping)
            .expect("the model test did not notice a backend that drops acknowledged writes");
    println!("broken variant caught; {}", failure.lines().next().unwrap_or_default());
}
