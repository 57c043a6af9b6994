//! An orchestrator written as a ractor actor that messages its session's actor directly.
//!
//! The orchestrator follows ractor's conventions: a stateless behaviour struct
//! (`Orchestrator`), its state (`OrchestratorState`), and a message enum (`OrchestratorMsg`)
//! whose requests end in an `RpcReplyPort`. It holds the `ActorRef<SessionMsg>` of its
//! session (from [`StateManager::session_actor`]) and talks to it with `ractor::call_t!`
//! and `ractor::cast!` and the public [`SessionMsg`] variants, with no facade in between.
//!
//! The run it drives explores two branches from one starting point: it saves the task and
//! checkpoints it on `main` (`Save`, `CreateCheckpoint`); for each of `plan-a` and `plan-b`
//! it rolls the session back to the start (`Rollback`), does three steps (`RecordStep`,
//! sent as pipelined `cast!`s whose replies are collected afterwards) and checkpoints the
//! result on the branch's own name; it adopts the better branch with `Rollback`; then, while
//! it waits for a human to sign off for longer than the session's idle timeout, the session
//! actor passivates, so the orchestrator's next send fails with `SendErr`: it fetches the
//! actor again with `session_actor` and resends, as the docs of [`SessionMsg`] say. It
//! finishes the run and marks it completed (`SetStatus`). At the end `main` checks
//! everything through the [`StateManager`] facade, prints `OK` and exits 0, or prints what
//! differs and exits 1.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example orchestrator_actor
//! ```
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use mars_state::{
    BranchId, CheckpointId, CheckpointReason, FileStorageBackend, SessionMsg, SessionStatus,
    StateBytes, StateError, StateManager,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr, RactorErr, RpcReplyPort};
use serde::{Deserialize, Serialize};

/// The session the run lives in.
const SESSION: &str = "essay-run";
/// The session actor's idle timeout: short, so the demo sees it passivate.
const IDLE: Duration = Duration::from_millis(300);
/// How long the orchestrator waits for any reply from the session actor.
const CALL_TIMEOUT_MS: u64 = 10_000;

/// The run's state: what the agents have produced so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Work {
    task: String,
    /// The branch the latest step was done on.
    branch: String,
    step: u64,
    notes: Vec<String>,
    /// How good the work is so far, by the (simulated) critic.
    quality: u32,
}

impl Work {
    fn new(task: &str) -> Self {
        Work {
            task: task.to_owned(),
            branch: "main".to_owned(),
            step: 0,
            notes: Vec::new(),
            quality: 0,
        }
    }

    /// One deterministic step.
    fn apply(&mut self, branch: &str, what: &str, gain: u32) {
        self.step += 1;
        self.branch = branch.to_owned();
        self.notes.push(format!("{branch} step {}: {what}", self.step));
        self.quality += gain;
    }
}

/// A way to go about the task: three moves, each with the quality it adds.
#[derive(Debug, Clone, Copy)]
struct Plan {
    branch: &'static str,
    moves: [(&'static str, u32); 3],
}

const PLAN_A: Plan = Plan {
    branch: "plan-a",
    moves: [
        ("outline the argument", 2),
        ("write section 1 from memory", 3),
        ("write section 2 from memory", 1),
    ],
};
const PLAN_B: Plan = Plan {
    branch: "plan-b",
    moves: [("collect three sources", 3), ("draft from the sources", 4), ("tighten the prose", 2)],
};
/// The moves after a branch is adopted.
const FINISH: [(&str, u32); 2] = [("add a conclusion", 1), ("proof-read", 1)];
const TASK: &str = "write a short essay on crash-safe storage";

/// What the orchestrator reports about an explored branch.
#[derive(Debug, Clone)]
struct BranchOutcome {
    branch: &'static str,
    checkpoint: CheckpointId,
    quality: u32,
}

/// Why an orchestrator request failed.
#[derive(Debug, thiserror::Error)]
enum OrchError {
    /// The state manager refused or failed (the session actor's reply).
    #[error(transparent)]
    State(#[from] StateError),
    /// No reply in time: the request may or may not have been applied.
    #[error("the session actor did not answer {what} within {CALL_TIMEOUT_MS} ms; outcome unknown")]
    Timeout { what: &'static str },
    /// The session actor could not be reached or stopped while handling the request.
    #[error("the session actor failed during {what}: {detail}")]
    Actor { what: &'static str, detail: String },
}

type Reply<T> = RpcReplyPort<Result<T, OrchError>>;

/// The orchestrator's messages.
enum OrchestratorMsg {
    /// Save the task as the session's state and checkpoint it on `main`; replies that
    /// checkpoint (the point the branches start from).
    Start { reply: Reply<CheckpointId> },
    /// Explore `plan` from the checkpoint `from`; replies the branch's checkpoint and score.
    Explore { plan: Plan, from: CheckpointId, reply: Reply<BranchOutcome> },
    /// Make `outcome`'s checkpoint the session's state.
    Adopt { outcome: BranchOutcome, reply: Reply<()> },
    /// Do the remaining steps and mark the run completed; replies the final state and how
    /// often the session actor had to be fetched again.
    Finish { reply: Reply<(Work, u32)> },
}

/// The orchestrator's behaviour (stateless, as ractor has it).
struct Orchestrator;

struct OrchestratorArgs {
    manager: StateManager,
    session: String,
    /// When the demo started (for the timestamps it prints).
    started: Instant,
}

/// The orchestrator's state.
struct OrchestratorState {
    manager: StateManager,
    session: String,
    /// The session's actor: valid until it passivates.
    actor: ActorRef<SessionMsg>,
    /// How often `actor` was fetched again after a send failed.
    refetches: u32,
    started: Instant,
}

impl OrchestratorState {
    fn say(&self, text: impl std::fmt::Display) {
        println!("[{:5.2}s] [orchestrator] {text}", self.started.elapsed().as_secs_f64());
    }

    /// Fetches the session's actor again (after it passivated).
    async fn refetch(&mut self) -> Result<(), OrchError> {
        let old = self.actor.get_id();
        self.actor = self.manager.session_actor(&self.session).await?;
        self.refetches += 1;
        self.say(format_args!(
            "  the send failed with SendErr: actor {old} has passivated; session_actor() gave {} and the \
             request is sent again",
            self.actor.get_id()
        ));
        Ok(())
    }

    /// Calls the session actor (`ractor::call_t!`). A send refused with `SendErr` was never
    /// queued, so it is safe to fetch the actor again and resend.
    async fn call<R: Send + 'static>(
        &mut self,
        what: &'static str,
        build: impl Fn(RpcReplyPort<mars_state::Result<R>>) -> SessionMsg,
    ) -> Result<R, OrchError> {
        loop {
            match ractor::call_t!(self.actor, &build, CALL_TIMEOUT_MS) {
                Ok(reply) => return Ok(reply?),
                Err(RactorErr::Messaging(MessagingErr::SendErr(_))) if self.refetches < 10 => {
                    self.refetch().await?
                }
                Err(RactorErr::Timeout) => return Err(OrchError::Timeout { what }),
                Err(e) => return Err(OrchError::Actor { what, detail: e.to_string() }),
            }
        }
    }

    /// Reports a step with `ractor::cast!`, without waiting: returns the receiver of its
    /// reply, to be collected later.
    async fn cast_step(
        &mut self,
        work: &Work,
    ) -> Result<tokio::sync::oneshot::Receiver<mars_state::Result<Option<CheckpointId>>>, OrchError>
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let state = StateBytes::from_serialize(work)?;
        let mut msg = SessionMsg::RecordStep { step: work.step, state, reply: tx.into() };
        loop {
            match ractor::cast!(self.actor, msg) {
                Ok(()) => return Ok(rx),
                // The message comes back untouched: resend it to the fresh actor.
                Err(RactorErr::Messaging(MessagingErr::SendErr(back))) if self.refetches < 10 => {
                    msg = back;
                    self.refetch().await?;
                }
                Err(e) => {
                    return Err(OrchError::Actor { what: "record_step", detail: e.to_string() });
                }
            }
        }
    }

    /// Waits for the replies of cast steps.
    async fn collect(
        &self,
        pending: Vec<tokio::sync::oneshot::Receiver<mars_state::Result<Option<CheckpointId>>>>,
    ) -> Result<(), OrchError> {
        for rx in pending {
            match tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS), rx).await {
                Ok(Ok(r)) => {
                    r?;
                }
                Ok(Err(_)) => {
                    return Err(OrchError::Actor {
                        what: "record_step",
                        detail: "reply port dropped".into(),
                    });
                }
                Err(_) => return Err(OrchError::Timeout { what: "record_step" }),
            }
        }
        Ok(())
    }

    async fn load(&mut self) -> Result<Work, OrchError> {
        let bytes = self.call("load", |reply| SessionMsg::Load { reply }).await?;
        let bytes = bytes
            .ok_or_else(|| StateError::Config { message: "the session has no state".into() })?;
        Ok(bytes.deserialize()?)
    }

    async fn start(&mut self) -> Result<CheckpointId, OrchError> {
        let work = Work::new(TASK);
        let state = StateBytes::from_serialize(&work)?;
        self.call("save", |reply| SessionMsg::Save { state: state.clone(), reply }).await?;
        let main = BranchId::new("main")?;
        let id = self
            .call("create_checkpoint", |reply| SessionMsg::CreateCheckpoint {
                branch_id: main.clone(),
                state: state.clone(),
                reason: CheckpointReason::Manual,
                reply,
            })
            .await?;
        self.say(format_args!(
            "Save + CreateCheckpoint: task saved, starting point {id} on branch main"
        ));
        Ok(id)
    }

    async fn explore(
        &mut self,
        plan: Plan,
        from: CheckpointId,
    ) -> Result<BranchOutcome, OrchError> {
        self.call("rollback", |reply| SessionMsg::Rollback {
            checkpoint_id: from.clone(),
            truncate: false,
            reply,
        })
        .await?;
        let mut work = self.load().await?;
        self.say(format_args!(
            "Rollback to {from}: exploring {} from step {}",
            plan.branch, work.step
        ));
        let mut pending = Vec::new();
        for (what, gain) in plan.moves {
            work.apply(plan.branch, what, gain);
            pending.push(self.cast_step(&work).await?);
        }
        let sent = pending.len();
        self.collect(pending).await?;
        let branch = BranchId::new(plan.branch)?;
        let state = StateBytes::from_serialize(&work)?;
        let checkpoint = self
            .call("create_checkpoint", |reply| SessionMsg::CreateCheckpoint {
                branch_id: branch.clone(),
                state: state.clone(),
                reason: CheckpointReason::Manual,
                reply,
            })
            .await?;
        self.say(format_args!(
            "  {sent} x cast!(RecordStep) (steps 1-{}), then CreateCheckpoint on {}: {checkpoint}, quality {}",
            work.step, plan.branch, work.quality
        ));
        Ok(BranchOutcome { branch: plan.branch, checkpoint, quality: work.quality })
    }

    async fn adopt(&mut self, outcome: BranchOutcome) -> Result<(), OrchError> {
        let id = outcome.checkpoint.clone();
        self.call("rollback", |reply| SessionMsg::Rollback {
            checkpoint_id: id.clone(),
            truncate: false,
            reply,
        })
        .await?;
        let work = self.load().await?;
        self.say(format_args!(
            "Rollback to {} ({}): the session's state is that branch's, step {}, quality {}",
            outcome.checkpoint, outcome.branch, work.step, work.quality
        ));
        Ok(())
    }

    async fn finish(&mut self) -> Result<(Work, u32), OrchError> {
        self.say("signed off; finishing the run");
        let mut work = self.load().await?;
        for (what, gain) in FINISH {
            work.apply(&work.branch.clone(), what, gain);
            let state = StateBytes::from_serialize(&work)?;
            let step = work.step;
            self.call("record_step", |reply| SessionMsg::RecordStep {
                step,
                state: state.clone(),
                reply,
            })
            .await?;
            self.say(format_args!("  call_t!(RecordStep) step {step}: {what}"));
        }
        let state = StateBytes::from_serialize(&work)?;
        self.call("set_status", |reply| SessionMsg::SetStatus {
            status: SessionStatus::Completed,
            reason: None,
            state: Some(state.clone()),
            reply,
        })
        .await?;
        self.say(format_args!("SetStatus(Completed): final state saved at step {}", work.step));
        Ok((work, self.refetches))
    }
}

impl Actor for Orchestrator {
    type Msg = OrchestratorMsg;
    type State = OrchestratorState;
    type Arguments = OrchestratorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<OrchestratorMsg>,
        args: OrchestratorArgs,
    ) -> Result<OrchestratorState, ActorProcessingErr> {
        let actor = args.manager.session_actor(&args.session).await?;
        Ok(OrchestratorState {
            manager: args.manager,
            session: args.session,
            actor,
            refetches: 0,
            started: args.started,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<OrchestratorMsg>,
        msg: OrchestratorMsg,
        st: &mut OrchestratorState,
    ) -> Result<(), ActorProcessingErr> {
        // Failures travel back in the replies; the orchestrator itself keeps running.
        match msg {
            OrchestratorMsg::Start { reply } => {
                let _ = reply.send(st.start().await);
            }
            OrchestratorMsg::Explore { plan, from, reply } => {
                let _ = reply.send(st.explore(plan, from).await);
            }
            OrchestratorMsg::Adopt { outcome, reply } => {
                let _ = reply.send(st.adopt(outcome).await);
            }
            OrchestratorMsg::Finish { reply } => {
                let _ = reply.send(st.finish().await);
            }
        }
        Ok(())
    }
}

/// The same run computed directly: the expected final state.
fn expected_run() -> (Work, Work, Work) {
    let mut a = Work::new(TASK);
    for (what, gain) in PLAN_A.moves {
        a.apply(PLAN_A.branch, what, gain);
    }
    let mut b = Work::new(TASK);
    for (what, gain) in PLAN_B.moves {
        b.apply(PLAN_B.branch, what, gain);
    }
    let mut done = if b.quality > a.quality { b.clone() } else { a.clone() };
    for (what, gain) in FINISH {
        done.apply(&done.branch.clone(), what, gain);
    }
    (a, b, done)
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Asks the orchestrator and waits for its answer.
async fn ask<T: Send + 'static>(
    orchestrator: &ActorRef<OrchestratorMsg>,
    build: impl FnOnce(Reply<T>) -> OrchestratorMsg,
) -> AnyResult<T> {
    match orchestrator.call(build, Some(Duration::from_secs(30))).await? {
        ractor::rpc::CallResult::Success(r) => Ok(r?),
        ractor::rpc::CallResult::Timeout => Err("the orchestrator did not answer in 30 s".into()),
        ractor::rpc::CallResult::SenderError => Err("the orchestrator stopped".into()),
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        println!("FAILED: {e}");
        std::process::exit(1);
    }
}

async fn run() -> AnyResult<()> {
    let dir = tempfile::Builder::new().prefix("mars-orchestrator-actor-").tempdir()?;
    let started = Instant::now();
    let t = || format!("[{:5.2}s]", started.elapsed().as_secs_f64());
    println!("mars-state orchestrator-as-actor demo");
    println!(
        "  store: {} (session {SESSION:?}, idle timeout {} ms)",
        dir.path().display(),
        IDLE.as_millis()
    );
    println!();
    let manager = StateManager::builder(FileStorageBackend::new(dir.path())?)
        .idle_timeout(IDLE)
        .start()
        .await?;
    let args = OrchestratorArgs { manager: manager.clone(), session: SESSION.to_owned(), started };
    // No name: two managers (or two demos) in one process must not collide.
    let (orchestrator, handle) = Actor::spawn(None, Orchestrator, args).await?;

    let start = ask(&orchestrator, |reply| OrchestratorMsg::Start { reply }).await?;
    let a = ask(&orchestrator, |reply| OrchestratorMsg::Explore {
        plan: PLAN_A,
        from: start.clone(),
        reply,
    })
    .await?;
    let b = ask(&orchestrator, |reply| OrchestratorMsg::Explore {
        plan: PLAN_B,
        from: start.clone(),
        reply,
    })
    .await?;
    let best = if b.quality > a.quality { b.clone() } else { a.clone() };
    println!(
        "{} [main] {} scores {}, {} scores {}: adopting {}",
        t(),
        a.branch,
        a.quality,
        b.branch,
        b.quality,
        best.branch
    );
    ask(&orchestrator, |reply| OrchestratorMsg::Adopt { outcome: best.clone(), reply }).await?;

    // A human signs off. Meanwhile nobody talks to the session, and its actor passivates.
    println!("{} [main] waiting for a human to sign off (longer than the idle timeout)...", t());
    let deadline = Instant::now() + Duration::from_secs(10);
    while manager.live_session_actors().await? > 0 {
        if Instant::now() > deadline {
            return Err("the session actor did not passivate within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{} [main] the session actor has passivated (live_session_actors() = 0)", t());
    let (done, refetches) = ask(&orchestrator, |reply| OrchestratorMsg::Finish { reply }).await?;
    orchestrator.drain_and_wait(Some(Duration::from_secs(10))).await?;
    handle.await?;
    println!();

    // Check everything through the facade.
    let (exp_a, exp_b, exp_done) = expected_run();
    let mut problems = Vec::new();
    let final_state: Option<Work> = manager.load_session_as(SESSION).await?;
    if done != exp_done {
        problems.push(format!("the orchestrator ended with {done:?}, expected {exp_done:?}"));
    }
    if final_state.as_ref() != Some(&exp_done) {
        problems
            .push(format!("final state {final_state:?} differs from the expected {exp_done:?}"));
    }
    for (outcome, expected) in [(&a, &exp_a), (&b, &exp_b)] {
        let cp = manager.restore_checkpoint_as::<Work>(&outcome.checkpoint).await?;
        match cp {
            Some(cp) if cp.data == *expected && cp.branch_id.as_str() == outcome.branch => {}
            other => problems.push(format!(
                "checkpoint of {} is {other:?}, expected {expected:?}",
                outcome.branch
            )),
        }
    }
    let completed = manager.list_sessions_by_status(SessionStatus::Completed).await?;
    if !completed.iter().any(|s| s.session_id.as_str() == SESSION) {
        problems.push("the session is not listed as completed".to_owned());
    }
    if refetches == 0 {
        problems.push(
            "the orchestrator never had to fetch the passivated session actor again".to_owned(),
        );
    }
    println!("check (through the StateManager)");
    for c in manager.list_checkpoints(SESSION).await? {
        let step = c.step.map_or("-".to_owned(), |s| s.to_string());
        println!(
            "  checkpoint {} branch {:<7} step {step:<2} ({:?})",
            c.id,
            c.branch_id.as_str(),
            c.reason
        );
    }
    if let Some(w) = &final_state {
        println!(
            "  final state: branch {}, step {}, quality {}, {} notes; status completed: {}",
            w.branch,
            w.step,
            w.quality,
            w.notes.len(),
            completed.iter().any(|s| s.session_id.as_str() == SESSION)
        );
        for n in &w.notes {
            println!("    {n}");
        }
    }
    println!("  session actor fetched again after passivation: {refetches} time(s)");
    manager.shutdown().await?;
    if !problems.is_empty() {
        for p in &problems {
            println!("MISMATCH: {p}");
        }
        return Err(format!("{} check(s) failed", problems.len()).into());
    }
    println!(
        "OK: the actor-driven run with two branches ended as expected ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
