//! Crash and resume: a multi-agent run survives a `kill -9` and finishes with the same result.
//!
//! Three simulated agents (a planner, a researcher and a writer) take turns on a 30-step
//! task in one session. After every step the run reports its state with
//! [`StateManager::record_step`], which is cheap: the state stays in the session actor's
//! memory, and the session's [`CheckpointPolicy::every_steps`]`(5)` makes it durable (the
//! session record plus a checkpoint) every fifth step. The example re-runs itself as a
//! child process that does the run in a fresh temporary store ([`FileStorageBackend`]);
//! at a random moment (or after the step you pass as an argument) the parent kills it with
//! SIGKILL: no destructor, flush or shutdown runs. The parent then opens the same store,
//! asks [`StateManager::recover_session`] what survived (the run is flagged `interrupted`,
//! and the newest valid checkpoint says which step it holds), resumes from that step, redoes
//! the steps that were only in memory, and finishes. It prints the timeline (one line per
//! checkpoint) and checks the result against the same run done in memory without a crash:
//! the final state and every checkpoint must match. It prints `OK` and exits 0, or prints
//! what differs and exits 1.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example crash_and_resume          # kill during a random step, 7 to 27
//! cargo run --example crash_and_resume -- 12    # kill during step 13, after 12 is reported
//! cargo run --example crash_and_resume -- 9 42  # kill 42 ms after step 9 is reported
//! ```
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mars_state::{
    CheckpointPolicy, CheckpointReason, FileStorageBackend, SessionStatus, StateManager,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The session the run lives in.
const SESSION: &str = "research-run";
/// How many steps the run has.
const STEPS: u64 = 30;
/// The policy: a checkpoint every this many steps.
const EVERY: u64 = 5;
/// Simulated work per step ("the model is thinking").
const WORK: Duration = Duration::from_millis(40);
/// The agents, in turn order.
const AGENTS: [&str; 3] = ["planner", "researcher", "writer"];
/// The argument that makes this program the child.
const CHILD_FLAG: &str = "--child";

type AnyResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The run's shared state: everything the agents need to carry on after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RunState {
    /// How many steps are done.
    step: u64,
    /// What each step did, one entry per step.
    transcript: Vec<Turn>,
    /// Sub-tasks the planner opened and the others have not closed yet.
    open_tasks: u32,
    /// Facts the researcher has collected.
    facts: u32,
    /// Words the writer has drafted.
    words: u32,
    /// A running FNV-1a digest over every turn, as hex (so `jq` shows it exactly).
    digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Turn {
    agent: String,
    said: String,
}

impl RunState {
    fn new() -> Self {
        RunState {
            step: 0,
            transcript: Vec::new(),
            open_tasks: 0,
            facts: 0,
            words: 0,
            digest: format!("{FNV_OFFSET:016x}"),
        }
    }

    /// The agent whose turn step `step` is.
    fn agent_of(step: u64) -> &'static str {
        AGENTS[((step - 1) % AGENTS.len() as u64) as usize]
    }

    /// Does one step: the next agent takes its turn. Deterministic: the same state always
    /// gives the same next state, which is what makes "resume from a checkpoint" equal
    /// "never crashed".
    fn advance(&mut self) {
        self.step += 1;
        let agent = Self::agent_of(self.step);
        let prev = u64::from_str_radix(&self.digest, 16).unwrap_or(FNV_OFFSET);
        let said = match agent {
            "planner" => {
                self.open_tasks += 2;
                format!("splits the goal into 2 sub-tasks ({} open)", self.open_tasks)
            }
            "researcher" => {
                let found = 1 + (prev % 3) as u32;
                self.facts += found;
                self.open_tasks = self.open_tasks.saturating_sub(1);
                format!("finds {found} facts ({} in all)", self.facts)
            }
            _ => {
                let written = 100 + (prev % 200) as u32;
                self.words += written;
                self.open_tasks = self.open_tasks.saturating_sub(1);
                format!("drafts {written} words ({} in all)", self.words)
            }
        };
        let said = format!("step {}: {said} [after {:04x}]", self.step, prev & 0xffff);
        self.digest = format!("{:016x}", fnv1a(fnv1a(prev, agent.as_bytes()), said.as_bytes()));
        self.transcript.push(Turn { agent: agent.to_owned(), said });
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

/// The run start to finish in memory, with no crash and no storage: the reference.
/// Element `i` is the state after `i` steps.
fn uninterrupted_run() -> Vec<RunState> {
    let mut state = RunState::new();
    let mut all = vec![state.clone()];
    for _ in 0..STEPS {
        state.advance();
        all.push(state.clone());
    }
    all
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = if args.get(1).map(String::as_str) == Some(CHILD_FLAG) {
        match args.get(2) {
            Some(store) => child(Path::new(store)).await,
            None => Err("--child needs the store directory".into()),
        }
    } else {
        parent(args.get(1).map(String::as_str), args.get(2).map(String::as_str)).await
    };
    if let Err(e) = result {
        println!("FAILED: {e}");
        std::process::exit(1);
    }
}

/// The child: does the run from step 1, reporting every step with `record_step`, and tells
/// the parent on stdout about each finished step (`step N` or `step N checkpoint ID` when
/// the policy took a checkpoint). It is killed before it finishes.
async fn child(store: &Path) -> AnyResult<()> {
    let manager = StateManager::builder(FileStorageBackend::new(store)?)
        .checkpoint_policy(CheckpointPolicy::every_steps(EVERY))
        .start()
        .await?;
    let mut state = RunState::new();
    while state.step < STEPS {
        tokio::time::sleep(WORK).await;
        state.advance();
        // Rust's stdout is line-buffered, so the parent sees each line at once.
        match manager.record_step(SESSION, state.step, &state).await? {
            Some(id) => println!("step {} checkpoint {id}", state.step),
            None => println!("step {}", state.step),
        }
    }
    manager.complete_session(SESSION, &state).await?;
    manager.shutdown().await?;
    Ok(())
}

/// A line the child printed.
struct Report {
    step: u64,
    checkpoint: Option<String>,
}

/// Parses `step N` or `step N checkpoint ID`.
fn parse_report(line: &str) -> AnyResult<Report> {
    let parts: Vec<&str> = line.split_whitespace().collect();
    match parts.as_slice() {
        ["step", n] => Ok(Report { step: n.parse()?, checkpoint: None }),
        ["step", n, "checkpoint", id] => {
            Ok(Report { step: n.parse()?, checkpoint: Some((*id).to_owned()) })
        }
        _ => Err(format!("unexpected line from the child: {line:?}").into()),
    }
}

fn span(from: u64, to: u64) -> String {
    match to.cmp(&from) {
        std::cmp::Ordering::Less => "none".to_owned(),
        std::cmp::Ordering::Equal => format!("step {from}"),
        std::cmp::Ordering::Greater => format!("steps {from}-{to}"),
    }
}

async fn parent(kill_arg: Option<&str>, delay_arg: Option<&str>) -> AnyResult<()> {
    // Random enough without a dependency: the clock's nanoseconds mixed with our pid.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
    let seed = nanos ^ std::process::id().wrapping_mul(2_654_435_761);
    let kill_after = match kill_arg {
        Some(s) => match s.parse::<u64>() {
            // Leave the child a few steps, so it is killed before it can finish.
            Ok(n) if (1..=STEPS - 4).contains(&n) => n,
            _ => {
                return Err(
                    format!("the kill step must be a number from 1 to {}", STEPS - 4).into()
                );
            }
        },
        // After the first checkpoint, well before the end.
        None => EVERY + 1 + u64::from(seed) % (STEPS - EVERY - 4),
    };
    // Where in the next step the kill lands: during the "thinking" or while a checkpoint
    // is being written.
    let kill_delay = Duration::from_millis(match delay_arg {
        Some(ms) => ms.parse().map_err(|_| "the kill delay must be a number of milliseconds")?,
        None => u64::from(seed >> 8) % (WORK.as_millis() as u64 + 5),
    });
    let dir = tempfile::Builder::new().prefix("mars-crash-and-resume-").tempdir()?;
    let store = dir.path();
    let start = Instant::now();
    let t = || format!("[{:5.2}s]", start.elapsed().as_secs_f64());

    println!("mars-state crash-and-resume demo");
    println!();
    println!(
        "  The run: {} agents take turns for {STEPS} steps in session {SESSION:?}:",
        AGENTS.len()
    );
    println!(
        "           {} -> ...",
        AGENTS.iter().chain(AGENTS.iter()).copied().collect::<Vec<_>>().join(" -> ")
    );
    println!("           Each step is reported with record_step() (kept in memory); the session's");
    println!(
        "           CheckpointPolicy::every_steps({EVERY}) makes it durable every {EVERY} steps."
    );
    println!(
        "  The crash: a child process does the run; {} ms after it reports step {kill_after}",
        kill_delay.as_millis()
    );
    println!(
        "           it is killed with SIGKILL (choose the step: cargo run --example crash_and_resume -- 12)."
    );
    println!("  The store: {} (plain JSON files)", store.display());
    println!();
    println!("timeline");

    // 1. The child does the run until we kill it.
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .arg(CHILD_FLAG)
        .arg(store)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or("the child has no pid")?;
    println!("{} child process {pid} starts the run", t());
    let stdout = child.stdout.take().ok_or("the child's stdout is not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut log = ChildLog { last_reported: 0, since: 1, checkpoints: Vec::new() };
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut kill_at = None;
    loop {
        let deadline = kill_at.unwrap_or(give_up);
        // `next_line` is cancel-safe: a line cut off by the deadline is read after the kill.
        let next = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(line) => line?,
            Err(_) if kill_at.is_some() => break, // time to pull the plug
            Err(_) => return Err("the child reported nothing for 30 s".into()),
        };
        let Some(line) = next else {
            let status = child.wait().await?;
            return Err(format!(
                "the child stopped after step {} on its own ({status})",
                log.last_reported
            )
            .into());
        };
        let report = parse_report(&line)?;
        let step = report.step;
        log.report(report, &t(), "");
        if step == kill_after {
            kill_at = Some(tokio::time::Instant::now() + kill_delay);
        }
    }
    child.start_kill()?; // SIGKILL on Unix
    let status = child.wait().await?;
    // Whatever the child printed before the signal landed is still in the pipe.
    while let Some(line) = lines.next_line().await? {
        log.report(parse_report(&line)?, &t(), " (reported just before the kill)");
    }
    if status.signal() != Some(libc::SIGKILL) {
        return Err(format!("the child was not killed by SIGKILL: {status}").into());
    }
    let ChildLog { last_reported, since, checkpoints: reported_checkpoints } = log;
    let last_cp_reported = reported_checkpoints.last().map_or(0, |(s, _)| *s);
    if since <= last_reported {
        println!(
            "{} {:<11} done, in memory only (the next checkpoint was due at step {})",
            t(),
            span(since, last_reported),
            last_cp_reported + EVERY
        );
    }
    println!(
        "{} >>> SIGKILL during step {} <<< child {pid} is dead; no shutdown, no flush ran",
        t(),
        last_reported + 1
    );
    println!();

    // 2. A new manager on the same store (the OS released the dead child's lock).
    println!("recovery: a new StateManager opens the same store");
    let manager = StateManager::start(FileStorageBackend::new(store)?).await?;
    let listed = manager.list_sessions().await?;
    let info = listed.iter().find(|s| s.session_id.as_str() == SESSION);
    let recovery = manager.recover_session(SESSION).await?;
    let saved_step = match &recovery.state {
        Some(v) => Some(serde_json::from_value::<RunState>(v.clone())?.step),
        None => None,
    };
    let checkpoint_step = recovery.checkpoint.as_ref().and_then(|cp| cp.step);
    println!("{} recover_session({SESSION:?}) reports:", t());
    match saved_step {
        Some(step) => {
            println!(
                "           interrupted: {}  (its status was {:?} when its process died; list_sessions agrees: {})",
                recovery.interrupted,
                recovery.status,
                info.is_some_and(|i| i.interrupted)
            );
            let note = if checkpoint_step.unwrap_or(0) < step {
                " (newer than the newest checkpoint: the kill landed between the two writes of a checkpoint)"
            } else {
                ""
            };
            println!("           last saved state: step {step}{note}");
        }
        None => {
            println!(
                "           interrupted: {}  (nothing was durable yet: no session record)",
                recovery.interrupted
            );
        }
    }
    let mut problems = Vec::new();
    let mut state = match &recovery.checkpoint {
        Some(cp) => {
            println!(
                "           newest valid checkpoint: step {}, {} ({})",
                cp.step.map_or("?".to_owned(), |s| s.to_string()),
                cp.id,
                reason_text(cp.reason)
            );
            println!("           damaged checkpoints skipped: {}", recovery.skipped.len());
            serde_json::from_value::<RunState>(cp.data.clone())?
        }
        None => {
            println!("           no checkpoint: the run starts over from step 0");
            if recovery.state.is_some() {
                // The session record of the first checkpoint was written, its checkpoint
                // was not. Clear the session, so nothing of the cut-off run (its state, its
                // step count, which the step policy counts from) carries over.
                manager.delete_session(SESSION).await?;
                println!(
                    "           delete_session() clears the half-written first checkpoint's session record"
                );
            }
            RunState::new()
        }
    };
    if recovery.state.is_some() && !recovery.interrupted {
        problems.push(
            "the run was cut off while running but recover_session does not say interrupted"
                .to_owned(),
        );
    }
    // Every checkpoint the child reported was durable when reported: it must be here.
    for (step, id) in &reported_checkpoints {
        let found = manager.list_checkpoints(SESSION).await?.iter().any(|c| c.id.as_str() == id);
        if !found {
            problems.push(format!(
                "checkpoint {id} of step {step} was reported taken but is gone after the crash"
            ));
        }
    }
    if state.step < last_cp_reported {
        problems.push(format!(
            "recovery resumes from step {} but a checkpoint at step {last_cp_reported} was reported",
            state.step
        ));
    }
    let resumed_from = state.step;
    // Make the checkpoint the session's state again (the session record may be newer if
    // the kill landed between the two writes of a checkpoint), so the policy counts from it
    // and the next checkpoint's parent is this one.
    if let Some(cp) = &recovery.checkpoint {
        manager.rollback_to_checkpoint(&cp.id).await?;
    }
    // Policies live in the process that set them: set it again when resuming a run.
    manager.set_checkpoint_policy(SESSION, CheckpointPolicy::every_steps(EVERY)).await?;
    let lost = lost_work(resumed_from, last_reported);
    println!("{} resuming from step {resumed_from}; redone now: {lost}", t());

    // 3. Finish the run in this process.
    let mut since = resumed_from + 1;
    let mut taken = manager.list_checkpoints(SESSION).await?.len();
    while state.step < STEPS {
        tokio::time::sleep(WORK).await;
        state.advance();
        if let Some(id) = manager.record_step(SESSION, state.step, &state).await? {
            taken += 1;
            println!(
                "{} {:<11} done -> checkpoint #{} at step {} {id}",
                t(),
                span(since, state.step),
                taken,
                state.step
            );
            since = state.step + 1;
        }
    }
    if since <= STEPS {
        println!("{} {:<11} done", t(), span(since, STEPS));
    }
    manager.complete_session(SESSION, &state).await?;
    println!("{} the run is complete at step {STEPS}; complete_session() marks it completed", t());
    println!();

    // 4. Compare with the run that never crashed.
    let reference = uninterrupted_run();
    let expected = &reference[STEPS as usize];
    let final_state: RunState =
        manager.load_session_as(SESSION).await?.ok_or("the final state is missing")?;
    if &final_state != expected {
        problems.push(format!(
            "final state differs: step {} digest {} vs step {} digest {}",
            final_state.step, final_state.digest, expected.step, expected.digest
        ));
    }
    // Every checkpoint, the child's and ours, must be the uninterrupted run's state at its
    // step, one every EVERY steps, each the parent of the next.
    let checkpoints = manager.list_checkpoints(SESSION).await?;
    let mut steps = Vec::new();
    let mut previous = None;
    for info in &checkpoints {
        let cp = manager
            .restore_checkpoint_as::<RunState>(&info.id)
            .await?
            .ok_or("a listed checkpoint is gone")?;
        let at = cp.data.step;
        if cp.step != Some(at) || reference.get(at as usize) != Some(&cp.data) {
            problems.push(format!(
                "checkpoint {} (step {at}) differs from the uninterrupted run",
                info.id
            ));
        }
        if cp.reason != CheckpointReason::Steps {
            problems.push(format!(
                "checkpoint {} was taken for {:?}, not the step policy",
                info.id, cp.reason
            ));
        }
        if cp.parent != previous {
            problems.push(format!(
                "checkpoint {} has parent {:?}, expected {:?}",
                info.id, cp.parent, previous
            ));
        }
        previous = Some(cp.id);
        steps.push(at);
    }
    let expected_steps: Vec<u64> = (EVERY..=STEPS).step_by(EVERY as usize).collect();
    if steps != expected_steps {
        problems.push(format!("expected checkpoints at steps {expected_steps:?}, found {steps:?}"));
    }
    let completed = manager.list_sessions_by_status(SessionStatus::Completed).await?;
    if !completed.iter().any(|s| s.session_id.as_str() == SESSION) {
        problems.push("the session is not listed as completed".to_owned());
    }
    manager.shutdown().await?;

    println!("check against the same run done in memory without a crash");
    let show = |s: &RunState| {
        format!(
            "step {}, {} turns, {} facts, {} words, {} open tasks, digest {}",
            s.step,
            s.transcript.len(),
            s.facts,
            s.words,
            s.open_tasks,
            s.digest
        )
    };
    println!("  resumed run:       {}", show(&final_state));
    println!("  uninterrupted run: {}", show(expected));
    println!(
        "  checkpoints:       {} on disk, at steps {}; each equals the uninterrupted run at its step",
        steps.len(),
        steps.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
    );
    println!("  work redone after the crash: {}", lost_work(resumed_from, last_reported));
    if !problems.is_empty() {
        for p in &problems {
            println!("MISMATCH: {p}");
        }
        return Err(format!(
            "{} mismatch(es) between the resumed and the uninterrupted run",
            problems.len()
        )
        .into());
    }
    println!(
        "OK: the resumed run equals the uninterrupted run ({:.1}s in all)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the child reported, as the parent prints it: one line per checkpoint.
struct ChildLog {
    /// The last step the child reported done.
    last_reported: u64,
    /// The first step after the last reported checkpoint.
    since: u64,
    /// Steps and ids of the checkpoints the child reported: each was durable when reported.
    checkpoints: Vec<(u64, String)>,
}

impl ChildLog {
    fn report(&mut self, r: Report, time: &str, note: &str) {
        self.last_reported = r.step;
        if let Some(id) = r.checkpoint {
            self.checkpoints.push((r.step, id.clone()));
            println!(
                "{time} {:<11} done -> checkpoint #{} at step {} {id}{note}",
                span(self.since, r.step),
                self.checkpoints.len(),
                r.step,
            );
            self.since = r.step + 1;
        }
    }
}

/// The steps a resume from `resumed_from` redoes, in words.
fn lost_work(resumed_from: u64, last_reported: u64) -> String {
    let in_progress = last_reported + 1;
    if resumed_from >= in_progress {
        // The kill landed after a checkpoint was written but before it was reported.
        return format!("nothing (step {resumed_from} was checkpointed just before the kill)");
    }
    if resumed_from == last_reported {
        return format!("step {in_progress} only (it was in progress at the kill)");
    }
    format!(
        "{} (done, but only in memory) and step {in_progress} (in progress at the kill)",
        span(resumed_from + 1, last_reported)
    )
}

/// Why a checkpoint was taken, in words.
fn reason_text(reason: CheckpointReason) -> String {
    match reason {
        CheckpointReason::Steps => "taken by the every-N-steps policy".to_owned(),
        other => format!("reason: {other:?}"),
    }
}
