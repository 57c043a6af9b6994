//! Pause and resume: a run pauses for a human in one process and is finished by another.
//!
//! The example re-runs itself twice as a child process over one store in a fresh temporary
//! directory ([`FileStorageBackend`]):
//!
//! 1. child #1 drafts a contract (steps 1 to 5, reported with
//!    [`record_step`](StateManager::record_step)), then calls
//!    [`pause_session`](StateManager::pause_session) with the reason
//!    `"waiting for human approval"` (which saves the state with status `Paused` and takes a
//!    checkpoint), shuts down and exits;
//! 2. the parent, a third process that knows nothing of the run's internals, opens the store
//!    and finds the run with [`list_sessions_by_status`](StateManager::list_sessions_by_status)
//!    (`Paused`), shows its pause checkpoint, and "approves" it;
//! 3. child #2 opens the store, [`resume_session`](StateManager::resume_session)s the run (its
//!    status becomes `Running` again, durably), finishes steps 6 to 10 and calls
//!    [`complete_session`](StateManager::complete_session).
//!
//! Finally the parent opens the store once more and checks the final state against the same
//! run done in memory, the statuses (`Completed`, nothing paused or running), and the pause
//! checkpoint. It prints `OK` and exits 0, or prints what differs and exits 1.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example pause_and_resume
//! ```
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mars_state::{
    CheckpointPolicy, CheckpointReason, FileStorageBackend, SessionStatus, StateManager,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The session the run lives in.
const SESSION: &str = "contract-draft-42";
/// The reason the run pauses.
const REASON: &str = "waiting for human approval";
/// The step after which the run pauses, and the last step.
const PAUSE_AT: u64 = 5;
const STEPS: u64 = 10;
/// Who approves (passed to child #2 on its command line).
const APPROVER: &str = "legal@example.com";

type AnyResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The run's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Draft {
    /// How many steps are done.
    step: u64,
    /// The clauses written so far.
    clauses: Vec<String>,
    /// Who approved the draft to go on, once someone has.
    approved_by: Option<String>,
    /// Which process did each step (1 = child #1, 2 = child #2), to show the hand-over.
    done_by: Vec<u8>,
}

impl Draft {
    fn new() -> Self {
        Draft { step: 0, clauses: Vec::new(), approved_by: None, done_by: Vec::new() }
    }

    /// One deterministic step: the next clause.
    fn advance(&mut self, process: u8) {
        const TOPICS: [&str; 10] = [
            "parties",
            "definitions",
            "scope of work",
            "fees",
            "payment terms",
            "confidentiality",
            "liability cap",
            "termination",
            "governing law",
            "signatures",
        ];
        self.step += 1;
        let topic = TOPICS[(self.step as usize - 1) % TOPICS.len()];
        let approval =
            self.approved_by.as_deref().map_or(String::new(), |a| format!(", approved by {a}"));
        self.clauses.push(format!("§{} {topic}{approval}", self.step));
        self.done_by.push(process);
    }
}

/// The whole run in memory, with the same approval: the reference.
fn reference_run() -> Draft {
    let mut d = Draft::new();
    while d.step < PAUSE_AT {
        d.advance(1);
    }
    d.approved_by = Some(APPROVER.to_owned());
    while d.step < STEPS {
        d.advance(2);
    }
    d
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let result = match (arg(1), arg(2), arg(3)) {
        (Some("--child-1"), Some(store), _) => child_1(Path::new(store)).await,
        (Some("--child-2"), Some(store), Some(approver)) => {
            child_2(Path::new(store), approver).await
        }
        (None, _, _) => parent().await,
        _ => Err("usage: pause_and_resume [--child-1 STORE | --child-2 STORE APPROVER]".into()),
    };
    if let Err(e) = result {
        println!("FAILED: {e}");
        std::process::exit(1);
    }
}

/// Child #1: starts the run and pauses it.
async fn child_1(store: &Path) -> AnyResult<()> {
    let manager = StateManager::builder(FileStorageBackend::new(store)?)
        .checkpoint_policy(CheckpointPolicy::every_steps(3))
        .start()
        .await?;
    println!("opened the store; starting the run in session {SESSION:?}");
    let mut draft = Draft::new();
    while draft.step < PAUSE_AT {
        tokio::time::sleep(Duration::from_millis(20)).await;
        draft.advance(1);
        let checkpoint = manager.record_step(SESSION, draft.step, &draft).await?;
        let note = checkpoint.map_or(String::new(), |id| format!(" (policy checkpoint {id})"));
        println!("step {}: wrote {}{note}", draft.step, draft.clauses[draft.step as usize - 1]);
    }
    let id = manager.pause_session(SESSION, &draft, REASON).await?;
    println!("pause_session(.., {REASON:?}) -> state saved as Paused, checkpoint {id}");
    manager.shutdown().await?;
    println!("shut down; exiting");
    Ok(())
}

/// Child #2: resumes the run, finishes and completes it.
async fn child_2(store: &Path, approver: &str) -> AnyResult<()> {
    let manager = StateManager::builder(FileStorageBackend::new(store)?)
        .checkpoint_policy(CheckpointPolicy::every_steps(3))
        .start()
        .await?;
    let mut draft: Draft =
        manager.resume_session_as(SESSION).await?.ok_or("no paused run to resume")?;
    let running = manager.list_sessions_by_status(SessionStatus::Running).await?;
    let status = if running.iter().any(|s| s.session_id.as_str() == SESSION) {
        "Running"
    } else {
        "NOT running"
    };
    println!(
        "opened the store; resume_session({SESSION:?}) -> step {} with {} clauses; status now {status}",
        draft.step,
        draft.clauses.len(),
    );
    draft.approved_by = Some(approver.to_owned());
    while draft.step < STEPS {
        tokio::time::sleep(Duration::from_millis(20)).await;
        draft.advance(2);
        let checkpoint = manager.record_step(SESSION, draft.step, &draft).await?;
        let note = checkpoint.map_or(String::new(), |id| format!(" (policy checkpoint {id})"));
        println!("step {}: wrote {}{note}", draft.step, draft.clauses[draft.step as usize - 1]);
    }
    manager.complete_session(SESSION, &draft).await?;
    println!("complete_session({SESSION:?}) -> final state saved as Completed");
    manager.shutdown().await?;
    println!("shut down; exiting");
    Ok(())
}

/// Runs this program as a child with `args`, printing its output indented, and waits for it.
async fn run_child(label: &str, args: &[&str], start: Instant) -> AnyResult<()> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or("the child has no pid")?;
    let stdout = child.stdout.take().ok_or("the child's stdout is not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let work = async {
        while let Some(line) = lines.next_line().await? {
            println!("[{:5.2}s] [{label}, pid {pid}] {line}", start.elapsed().as_secs_f64());
        }
        child.wait().await
    };
    let status = tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .map_err(|_| format!("{label} hung"))??;
    if !status.success() {
        return Err(format!("{label} failed ({status})").into());
    }
    Ok(())
}

async fn parent() -> AnyResult<()> {
    let dir = tempfile::Builder::new().prefix("mars-pause-and-resume-").tempdir()?;
    let store = dir.path();
    let store_arg = store.to_str().ok_or("the temporary directory's path is not UTF-8")?;
    let start = Instant::now();
    let t = || format!("[{:5.2}s]", start.elapsed().as_secs_f64());
    println!("mars-state pause-and-resume demo");
    println!("  store: {}", store.display());
    println!(
        "  child #1 drafts a contract and pauses for approval; this process (the parent) finds"
    );
    println!(
        "  the paused run; child #2 resumes and finishes it. One process holds the store at a time."
    );
    println!();

    // 1. Child #1 runs and pauses.
    run_child("child #1", &["--child-1", store_arg], start).await?;
    println!();

    // 2. The parent, a third handle on the store, looks for paused runs.
    let manager = StateManager::start(FileStorageBackend::new(store)?).await?;
    let paused = manager.list_sessions_by_status(SessionStatus::Paused).await?;
    println!("{} [parent] list_sessions_by_status(Paused) -> {} session(s)", t(), paused.len());
    for s in &paused {
        println!(
            "{}          {}: {} checkpoints, {} bytes, interrupted: {}",
            t(),
            s.session_id,
            s.checkpoint_count,
            s.size_bytes,
            s.interrupted
        );
    }
    let mut problems = Vec::new();
    if !(paused.len() == 1 && paused[0].session_id.as_str() == SESSION && !paused[0].interrupted) {
        problems.push(format!(
            "expected exactly {SESSION:?} paused (and not interrupted), found {paused:?}"
        ));
    }
    let pause_cp = manager
        .list_checkpoints(SESSION)
        .await?
        .into_iter()
        .rev()
        .find(|c| c.reason == CheckpointReason::Pause)
        .ok_or("the pause took no checkpoint")?;
    println!(
        "{}          its newest checkpoint {} was taken by the pause, at step {}",
        t(),
        pause_cp.id,
        pause_cp.step.map_or("?".to_owned(), |s| s.to_string())
    );
    if pause_cp.step != Some(PAUSE_AT) {
        problems.push(format!(
            "the pause checkpoint is at step {:?}, expected {PAUSE_AT}",
            pause_cp.step
        ));
    }
    let at_pause: Draft =
        manager.load_session_as(SESSION).await?.ok_or("the paused state is missing")?;
    println!(
        "{}          its state: step {}, approved_by: {:?}",
        t(),
        at_pause.step,
        at_pause.approved_by
    );
    println!("{} [parent] a human reviews the draft and approves it as {APPROVER}", t());
    manager.shutdown().await?;
    println!("{} [parent] released the store", t());
    println!();

    // 3. Child #2 resumes and finishes.
    run_child("child #2", &["--child-2", store_arg, APPROVER], start).await?;
    println!();

    // 4. Check the outcome.
    let manager = StateManager::start(FileStorageBackend::new(store)?).await?;
    let final_state: Draft =
        manager.load_session_as(SESSION).await?.ok_or("the final state is missing")?;
    let expected = reference_run();
    let mut counts = [0; 3];
    for (n, status) in counts.iter_mut().zip([
        SessionStatus::Running,
        SessionStatus::Paused,
        SessionStatus::Completed,
    ]) {
        *n = manager.list_sessions_by_status(status).await?.len();
    }
    let [running, paused, completed] = counts;
    let checkpoints = manager.list_checkpoints(SESSION).await?;
    manager.shutdown().await?;
    println!("check");
    let by = |p: u8| final_state.done_by.iter().filter(|&&d| d == p).count();
    println!(
        "  final state: step {}, {} clauses, approved by {}; {} steps done by child #1, {} by child #2",
        final_state.step,
        final_state.clauses.len(),
        final_state.approved_by.as_deref().unwrap_or("nobody"),
        by(1),
        by(2)
    );
    println!("  statuses: running {running}, paused {paused}, completed {completed}");
    println!(
        "  checkpoints: {}",
        checkpoints
            .iter()
            .map(|c| format!(
                "step {} ({:?})",
                c.step.map_or("?".to_owned(), |s| s.to_string()),
                c.reason
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if final_state != expected {
        problems.push(format!(
            "the final state differs from the reference run: {final_state:?} vs {expected:?}"
        ));
    }
    if (running, paused, completed) != (0, 0, 1) {
        problems.push(format!(
            "expected 1 completed session and none running or paused, found {running}/{paused}/{completed}"
        ));
    }
    if !checkpoints.iter().any(|c| c.id == pause_cp.id) {
        problems.push("the pause checkpoint is gone".to_owned());
    }
    if !problems.is_empty() {
        for p in &problems {
            println!("MISMATCH: {p}");
        }
        return Err(format!("{} check(s) failed", problems.len()).into());
    }
    println!(
        "OK: paused in one process, resumed and completed in another ({:.1}s in all)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
