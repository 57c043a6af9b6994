//! Crash and resume: an agent task survives a `kill -9` and finishes with the same result.
//!
//! The example re-runs itself as a child process that works through a simulated 40-step
//! agent task (each step appends a message to a conversation and updates a running digest
//! and token count). After every step the child saves the session state and takes a
//! checkpoint on branch `main` in a [`FileStorageBackend`] in a fresh temporary directory.
//! Somewhere in the middle (a random step, or the step you pass as an argument) the parent
//! kills the child with SIGKILL: no destructor, no flush, no shutdown runs. The parent then
//! opens the same store with a new [`StateManager`], restores the latest checkpoint, resumes
//! from that step and finishes the task. Finally it runs the whole task uninterrupted in
//! memory and checks that both end in the same state (and that every checkpoint on disk
//! matches the uninterrupted run at its step), printing `OK` and exiting 0, or exiting
//! non-zero on any mismatch.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example crash_and_resume          # kill during a random step, 9 to 33
//! cargo run --example crash_and_resume -- 17    # kill during step 18, after 17 is reported
//! ```
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mars_state::{FileStorageBackend, StateManager};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The session the agent's task runs in.
const SESSION: &str = "agent-run-1";
/// The branch every checkpoint is taken on.
const BRANCH: &str = "main";
/// How many steps the task has.
const STEPS: u32 = 40;
/// Simulated work per step ("the model is thinking").
const WORK: Duration = Duration::from_millis(40);
/// The argument that makes this program the child.
const CHILD_FLAG: &str = "--child";

type AnyResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The agent's state: everything it needs to carry on after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AgentState {
    /// How many steps are done.
    step: u32,
    /// The conversation so far, one message per step.
    conversation: Vec<Message>,
    /// Tokens "spent" so far.
    tokens_used: u64,
    /// A running FNV-1a digest over every message, as hex (so `jq` shows it exactly).
    digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Message {
    role: String,
    content: String,
}

impl AgentState {
    fn new() -> Self {
        AgentState { step: 0, conversation: Vec::new(), tokens_used: 0, digest: format!("{FNV_OFFSET:016x}") }
    }

    /// Does one step of the task. Deterministic: the same state always gives the same next
    /// state, which is what makes "resume from a checkpoint" equal "never crashed".
    fn advance(&mut self) {
        const ACTIONS: [(&str, &str); 5] = [
            ("assistant", "plans the next sub-goal"),
            ("tool", "searches the knowledge base"),
            ("tool", "reads a document"),
            ("assistant", "summarizes what it found"),
            ("assistant", "writes part of the report"),
        ];
        self.step += 1;
        let (role, action) = ACTIONS[(self.step as usize - 1) % ACTIONS.len()];
        let prev = u64::from_str_radix(&self.digest, 16).unwrap_or(FNV_OFFSET);
        let content = format!("step {}: the agent {action} (after {:04x})", self.step, prev & 0xffff);
        let digest = fnv1a(prev, content.as_bytes());
        self.tokens_used += 50 + digest % 450;
        self.digest = format!("{digest:016x}");
        self.conversation.push(Message { role: role.to_owned(), content });
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The task run start to finish in memory, with no crash and no storage: the reference.
/// Element `i` is the state after step `i + 1`.
fn uninterrupted_run() -> Vec<AgentState> {
    let mut state = AgentState::new();
    (0..STEPS)
        .map(|_| {
            state.advance();
            state.clone()
        })
        .collect()
}

#[tokio::main]
async fn main() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_FLAG) {
        let store = args.get(2).ok_or("--child needs the store directory")?;
        return child(Path::new(store)).await;
    }
    parent(args.get(1).map(String::as_str)).await
}

/// The child: runs the task from step 1, saving and checkpointing after every step, and
/// reports each finished step on stdout (`step N CHECKPOINT_ID`). It is killed before it
/// finishes.
async fn child(store: &Path) -> AnyResult<()> {
    let manager = StateManager::start(FileStorageBackend::new(store)?).await?;
    let mut state = AgentState::new();
    while state.step < STEPS {
        tokio::time::sleep(WORK).await;
        state.advance();
        manager.save_session(SESSION, &state).await?;
        let id = manager.create_checkpoint(SESSION, BRANCH, &state).await?;
        // Rust's stdout is line-buffered, so the parent sees this line at once.
        println!("step {} {id}", state.step);
    }
    manager.shutdown().await?;
    Ok(())
}

async fn parent(kill_arg: Option<&str>) -> AnyResult<()> {
    // Random-ish without a dependency: the clock's nanoseconds mixed with our pid.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
    let seed = nanos ^ std::process::id().wrapping_mul(2_654_435_761);
    let kill_after = match kill_arg {
        Some(s) => match s.parse::<u32>() {
            // Leave the child a few steps, so it is killed before it can finish.
            Ok(n) if (1..=STEPS - 5).contains(&n) => n,
            _ => return Err(format!("the kill step must be a number from 1 to {}", STEPS - 5).into()),
        },
        None => 8 + seed % 25,
    };
    // Where in the next step the kill lands: during the "thinking", the save or the checkpoint.
    let kill_delay = Duration::from_millis(u64::from(seed >> 8) % (WORK.as_millis() as u64 + 5));
    let dir = tempfile::Builder::new().prefix("mars-crash-and-resume-").tempdir()?;
    let store = dir.path();
    let start = Instant::now();
    let t = || format!("[{:6.3}s]", start.elapsed().as_secs_f64());

    println!("mars-state crash-and-resume demo");
    println!("  store:   {} (FileStorageBackend, plain JSON records)", store.display());
    println!("  task:    {STEPS} steps in session {SESSION:?}; after each step the agent saves its");
    println!("           state and takes a checkpoint on branch {BRANCH:?}");
    println!(
        "  plan:    a child process runs the task; {} ms after it reports step {kill_after}",
        kill_delay.as_millis()
    );
    println!("           it is killed with SIGKILL (pass a step number to choose another:");
    println!("           cargo run --example crash_and_resume -- 17)");
    println!();

    // 1. The child runs the task until we kill it.
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .arg(CHILD_FLAG)
        .arg(store)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or("the child has no pid")?;
    println!("{} started child process {pid}", t());
    let stdout = child.stdout.take().ok_or("the child's stdout is not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut last_reported = 0;
    let mut kill_at = None;
    loop {
        let next = match kill_at {
            None => lines.next_line().await?,
            // `next_line` is cancel-safe: a line cut off by the deadline is read after the kill.
            Some(deadline) => match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(line) => line?,
                Err(_) => break, // time to pull the plug
            },
        };
        let Some(line) = next else {
            let status = child.wait().await?;
            return Err(format!("the child stopped after step {last_reported} on its own ({status})").into());
        };
        let (step, id) = report_line(&line)?;
        last_reported = step;
        println!("{} [child {pid}] step {step:2} done, state saved, checkpoint {id} taken", t());
        if step == kill_after {
            kill_at = Some(tokio::time::Instant::now() + kill_delay);
        }
    }
    child.start_kill()?; // SIGKILL on Unix
    println!("{} >>> SIGKILL sent to child {pid} <<<", t());
    let status = child.wait().await?;
    // Whatever the child printed before the signal landed is still in the pipe.
    while let Some(line) = lines.next_line().await? {
        let (step, _) = report_line(&line)?;
        last_reported = step;
        println!("{} [child {pid}] step {step:2} done (reported just before the kill landed)", t());
    }
    match status.signal() {
        Some(libc::SIGKILL) => println!("{} child {pid} is dead: killed by SIGKILL; no shutdown or flush ran", t()),
        _ => return Err(format!("the child was not killed by SIGKILL: {status}").into()),
    }
    println!();

    // 2. A new manager on the same store; the dead child's lock was released by the OS.
    println!("{} reopening the store with a new FileStorageBackend and StateManager", t());
    let manager = StateManager::start(FileStorageBackend::new(store)?).await?;
    let checkpoints = manager.list_checkpoints(SESSION).await?;
    let latest = checkpoints.last().ok_or("no checkpoint survived the crash")?;
    let restored =
        manager.restore_checkpoint_as::<AgentState>(&latest.id).await?.ok_or("the latest checkpoint is gone")?;
    let saved: Option<AgentState> = manager.load_session_as(SESSION).await?;
    let mut state = restored.data;
    println!(
        "{}   {} checkpoints on disk; the latest, {}, holds step {}",
        t(),
        checkpoints.len(),
        latest.id,
        state.step
    );
    if let Some(saved) = &saved {
        let note = if saved.step == state.step {
            "the same step"
        } else {
            "saved after that checkpoint, just before the kill"
        };
        println!("{}   the session record holds step {} ({note})", t(), saved.step);
    }
    if state.step < last_reported {
        return Err(
            format!("step {last_reported} was reported done but the latest checkpoint is step {}", state.step).into()
        );
    }
    println!(
        "{} resuming from step {}: step {} was in progress when the child died and is redone",
        t(),
        state.step,
        state.step + 1
    );
    println!();

    // 3. Finish the task in this process, saving and checkpointing as before.
    let resumed_from = state.step;
    while state.step < STEPS {
        tokio::time::sleep(WORK).await;
        state.advance();
        manager.save_session(SESSION, &state).await?;
        let id = manager.create_checkpoint(SESSION, BRANCH, &state).await?;
        println!("{} [resumed] step {:2} done, state saved, checkpoint {id} taken", t(), state.step);
    }
    println!();

    // 4. Compare with a run that never crashed.
    let reference = uninterrupted_run();
    let expected = reference.last().ok_or("the task has no steps")?;
    let final_state: AgentState = manager.load_session_as(SESSION).await?.ok_or("the final state is missing")?;
    let mut problems = Vec::new();
    if &final_state != expected {
        problems.push(format!(
            "final state differs: step {} digest {} vs step {} digest {}",
            final_state.step, final_state.digest, expected.step, expected.digest
        ));
    }
    // Every checkpoint, the child's and ours, must be the uninterrupted run's state at its step.
    let checkpoints = manager.list_checkpoints(SESSION).await?;
    let mut steps = Vec::new();
    for info in &checkpoints {
        let cp = manager.restore_checkpoint_as::<AgentState>(&info.id).await?.ok_or("a listed checkpoint is gone")?;
        let at = cp.data.step;
        if at == 0 || reference.get(at as usize - 1) != Some(&cp.data) {
            problems.push(format!("checkpoint {} (step {at}) differs from the uninterrupted run", info.id));
        }
        steps.push(at);
    }
    if steps != (1..=STEPS).collect::<Vec<_>>() {
        problems.push(format!("expected one checkpoint per step 1..={STEPS} in order, found steps {steps:?}"));
    }
    println!("summary");
    println!("  child finished steps 1..={resumed_from} and was killed with SIGKILL during step {}", resumed_from + 1);
    println!(
        "  resumed from the checkpoint of step {resumed_from} in this process and ran steps {}..={STEPS}",
        resumed_from + 1
    );
    println!("  work redone: step {} only (it was in progress at the kill)", resumed_from + 1);
    println!("  checkpoints: {} listed, each compared with the uninterrupted run at its step", steps.len());
    println!(
        "  final state:        step {}, {} messages, {} tokens, digest {}",
        final_state.step,
        final_state.conversation.len(),
        final_state.tokens_used,
        final_state.digest
    );
    println!(
        "  uninterrupted run:  step {}, {} messages, {} tokens, digest {}",
        expected.step,
        expected.conversation.len(),
        expected.tokens_used,
        expected.digest
    );
    manager.shutdown().await?;
    let record = store.join("sessions").join(format!("{SESSION}.json"));
    let record_len = std::fs::metadata(&record)?.len();
    let cp_files = std::fs::read_dir(store.join("checkpoints").join(SESSION))?.count();
    println!("  on disk:            sessions/{SESSION}.json ({record_len} bytes of plain JSON: jq reads it),");
    println!("                      checkpoints/{SESSION}/ ({cp_files} records), metadata/ (lock, index journal)");
    if !problems.is_empty() {
        for p in &problems {
            println!("MISMATCH: {p}");
        }
        return Err(format!("{} mismatch(es) between the resumed and the uninterrupted run", problems.len()).into());
    }
    println!("OK: the resumed run equals the uninterrupted run ({:.1}s in all)", start.elapsed().as_secs_f64());
    Ok(())
}

/// Parses a child report `step N CHECKPOINT_ID`.
fn report_line(line: &str) -> AnyResult<(u32, String)> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next().and_then(|n| n.parse().ok()), parts.next()) {
        (Some("step"), Some(n), Some(id)) => Ok((n, id.to_owned())),
        _ => Err(format!("unexpected line from the child: {line:?}").into()),
    }
}
