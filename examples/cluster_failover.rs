//! Cluster failover: three node processes share one PostgreSQL store; one is SIGKILLed
//! mid-run and the other two take over its agent sessions once its leases expire.
//!
//! The orchestrator (this example) makes a schema of its own on the server at
//! `MARS_STATE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) and starts three
//! nodes: this example re-run with `--node`, each a [`StateManager`] with its own node id and
//! a 2 s lease TTL. It spreads 30 agent sessions across them. An agent runs 20 steps, each
//! state derived from the one before, and reports each with
//! [`StateManager::record_step`]; the session's [`CheckpointPolicy::every_steps`]`(3)`
//! makes every third step durable (state and checkpoint, under the node's lease), and
//! [`StateManager::complete_session`] stores the last. Once a third of the work is
//! acknowledged, the orchestrator SIGKILLs `node-2` (no shutdown: its leases stay until
//! they expire) and hands its unfinished sessions to `node-1` and `node-3`. Their
//! [`StateManager::recover_session`] waits for each lease to expire, takes it (the session
//! is reported `interrupted`), and the agent resumes from the newest checkpoint, redoing the
//! steps that were only in `node-2`'s memory.
//!
//! It prints a timeline, with the failover time from the SIGKILL to the first write the
//! new owners got acknowledged, then checks that every session is completed with exactly
//! the final state of an uninterrupted run (computed here, in memory). It drops its schema
//! and exits 0 (`OK`), 1 when a check fails, or 2 when the server cannot be reached.
//!
//! ```text
//! cargo run --example cluster_failover --features postgres
//! MARS_STATE_URL=postgres://app@db.internal:5432/agents cargo run --example cluster_failover --features postgres
//! ```
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::error::Error;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use mars_state::{
    CheckpointPolicy, ErrorKind, PostgresStorageBackend, SessionStatus, StateManager,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// The server when `MARS_STATE_URL` is not set: the machine's, as its superuser.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// 30 agents of 20 steps each, 100 ms of work (a model call, in a real orchestrator) per
/// step.
const AGENTS: usize = 30;
const STEPS: u64 = 20;
const THINK: Duration = Duration::from_millis(100);
/// How long a node's lease on a session lasts unless renewed; a dead node's sessions can
/// be taken this long after its last renewal at the latest.
const LEASE_TTL: Duration = Duration::from_secs(2);
/// The node killed mid-run (`node-2`).
const VICTIM: usize = 1;

type BoxError = Box<dyn Error + Send + Sync>;

fn agent_name(i: usize) -> String {
    format!("agent-{i:02}")
}

/// The agent's state after `step`, from its state after the step before: a running digest
/// of everything it did, and a token count. The same on every node and in every run.
fn advance(agent: &str, before: &Value, step: u64) -> Value {
    let mut digest = before["digest"].as_u64().unwrap_or(0xcbf2_9ce4_8422_2325);
    for byte in agent.bytes().chain(step.to_le_bytes()) {
        digest = (digest ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    let tokens = before["tokens"].as_u64().unwrap_or(0) + 50 + digest % 200;
    json!({ "agent": agent, "step": step, "digest": digest, "tokens": tokens })
}

/// What an uninterrupted run ends with.
fn uninterrupted(agent: &str) -> Value {
    (1..=STEPS).fold(json!({}), |state, step| advance(agent, &state, step))
}

fn main() -> ExitCode {
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, id, url, schema] = &args[..]
        && flag == "--node"
    {
        return match rt.block_on(node(id, url, schema)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{id}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    rt.block_on(orchestrate())
}

// ---------------------------------------------------------------------------------------
// A node: runs the agents it is handed
// ---------------------------------------------------------------------------------------

async fn node(id: &str, url: &str, schema: &str) -> Result<(), BoxError> {
    let backend = PostgresStorageBackend::options().schema(schema).connect(url).await?;
    let manager = StateManager::builder(backend)
        .node_id(id)
        .lease_ttl(LEASE_TTL)
        .checkpoint_policy(CheckpointPolicy::every_steps(3))
        .start()
        .await?;
    println!("ready");
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Some(command) = commands.next_line().await? {
        match command.strip_prefix("run ") {
            Some(agent) => drop(tokio::spawn(agent_loop(manager.clone(), agent.to_owned()))),
            None => break, // "quit", or anything else
        }
    }
    manager.shutdown().await?;
    Ok(())
}

/// Runs `agent` to completion, starting over from the store after a failed call; gives it
/// back (`elsewhere`) if another node still holds it after the lease wait.
async fn agent_loop(manager: StateManager, agent: String) {
    loop {
        match run_agent(&manager, &agent).await {
            Ok(()) => return,
            Err(e) if e.kind() == ErrorKind::OwnedElsewhere => {
                return println!("elsewhere {agent}");
            }
            Err(e) => {
                println!("failed {agent} {:?}", e.kind());
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

async fn run_agent(manager: &StateManager, agent: &str) -> mars_state::Result<()> {
    // Takes the session's lease (waiting for a dead owner's to expire) and finds the newest
    // durable step.
    let recovery = manager.recover_session(agent).await?;
    let mut state = recovery.checkpoint.map_or_else(|| json!({}), |c| c.data);
    let resumed_at = state["step"].as_u64().unwrap_or(0);
    println!("took {agent} {resumed_at} {}", recovery.interrupted);
    for step in resumed_at + 1..=STEPS {
        tokio::time::sleep(THINK).await;
        state = advance(agent, &state, step);
        if manager.record_step(agent, step, &state).await?.is_some() {
            println!("durable {agent} {step}");
        }
    }
    manager.complete_session(agent, &state).await?;
    println!("completed {agent}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The orchestrator
// ---------------------------------------------------------------------------------------

struct NodeProcess {
    name: String,
    child: Child,
    stdin: ChildStdin,
}

/// The session state the orchestrator tracks.
struct Agent {
    owner: usize,
    durable: u64,
    completed: bool,
    /// Set when the agent was handed on after the kill, until the new owner's first
    /// durable write.
    taken_over: bool,
}

async fn orchestrate() -> ExitCode {
    let url = std::env::var("MARS_STATE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let admin = match connect_admin(&url).await {
        Ok(admin) => admin,
        Err(e) => {
            eprintln!(
                "cluster_failover needs a PostgreSQL server whose user may create a schema: \
                 set MARS_STATE_URL (now {url:?}) to one, e.g. \
                 postgres://postgres@127.0.0.1:5432/postgres.\ncould not connect: {e}"
            );
            return ExitCode::from(2);
        }
    };
    let schema = format!("mars_failover_{:016x}", getrandom::u64().expect("OS randomness"));
    let outcome = run(&url, &schema).await;
    let dropped = admin.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).await;
    match (outcome, dropped) {
        (Ok(true), Ok(())) => {
            println!("OK");
            ExitCode::SUCCESS
        }
        (Ok(false), _) => ExitCode::FAILURE,
        (Err(e), _) => {
            eprintln!("cluster_failover failed: {e}");
            ExitCode::FAILURE
        }
        (Ok(true), Err(e)) => {
            eprintln!("could not drop schema {schema}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn connect_admin(url: &str) -> Result<tokio_postgres::Client, BoxError> {
    let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, connection) = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Err(_) => return Err("no answer within 5 s".into()),
        // "error connecting to server: Connection refused (os error 111)"
        Ok(Err(e)) => match e.source() {
            Some(cause) => return Err(format!("{e}: {cause}").into()),
            None => return Err(e.into()),
        },
        Ok(Ok(connected)) => connected,
    };
    tokio::spawn(connection);
    Ok(client)
}

/// The run: nodes, the kill, the takeover, the checks. `Ok(false)` when a check failed: a
/// takeover that resumed before the dead node's last durable step or was not reported
/// interrupted, or a final state that differs from an uninterrupted run's.
async fn run(url: &str, schema: &str) -> Result<bool, BoxError> {
    let t0 = Instant::now();
    let at = move || format!("{:6.2}s", t0.elapsed().as_secs_f64());
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.push(start_node(n, url, schema, tx.clone())?);
    }
    drop(tx);
    let mut ready = 0;
    while ready < nodes.len() {
        let (n, line) = events.recv().await.ok_or("a node exited before it was ready")?;
        if line == "ready" {
            ready += 1;
            println!("{} {} ready (schema {schema})", at(), nodes[n].name);
        }
    }

    let mut agents: Vec<Agent> = (0..AGENTS)
        .map(|i| Agent { owner: i % 3, durable: 0, completed: false, taken_over: false })
        .collect();
    for (i, agent) in agents.iter().enumerate() {
        send(&mut nodes[agent.owner], &format!("run {}", agent_name(i))).await?;
    }
    println!("{} {AGENTS} agents spread over 3 nodes, {STEPS} steps each", at());

    let index: BTreeMap<String, usize> = (0..AGENTS).map(|i| (agent_name(i), i)).collect();
    let mut durable_writes = 0usize;
    let mut killed_at: Option<Instant> = None;
    let mut failovers = Vec::new();
    let mut retry: Vec<(Instant, usize)> = Vec::new();
    let mut takeover_faults = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while agents.iter().any(|a| !a.completed) {
        if Instant::now() > deadline {
            return Err("the agents did not finish within 90 s".into());
        }
        for (_, i) in retry.extract_if(.., |(when, _)| *when <= Instant::now()) {
            send(&mut nodes[agents[i].owner], &format!("run {}", agent_name(i))).await?;
        }
        let Ok(event) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await
        else {
            continue;
        };
        let (n, line) = event.ok_or("every node exited")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(&i) = words.get(1).and_then(|a| index.get(*a)) else { continue };
        let agent = &mut agents[i];
        match words[0] {
            "durable" | "completed" if agent.owner == n => {
                durable_writes += 1;
                if words[0] == "completed" {
                    agent.completed = true;
                } else {
                    agent.durable = words[2].parse()?;
                }
                if std::mem::take(&mut agent.taken_over) {
                    let after = killed_at.map_or(Duration::ZERO, |k| k.elapsed());
                    failovers.push(after);
                    println!(
                        "{} {} wrote {} (first acknowledged write after the takeover, {:.2} s \
                         after the SIGKILL)",
                        at(),
                        nodes[n].name,
                        words[1],
                        after.as_secs_f64()
                    );
                }
            }
            "took" if agent.taken_over => {
                let (from, interrupted): (u64, bool) = (words[2].parse()?, words[3].parse()?);
                println!(
                    "{} {} took over {} at its checkpoint of step {from} (interrupted: \
                     {interrupted})",
                    at(),
                    nodes[n].name,
                    words[1]
                );
                // The new owner must resume at least from the last step the dead node got
                // acknowledged as durable, and learn that the run was cut off.
                if from < agent.durable {
                    println!("LOST: {} had step {} durable", words[1], agent.durable);
                    takeover_faults += 1;
                }
                if !interrupted {
                    println!("NOT FLAGGED: {} was not reported interrupted", words[1]);
                    takeover_faults += 1;
                }
            }
            "elsewhere" => retry.push((Instant::now() + Duration::from_millis(500), i)),
            "failed" => println!("{} {} {line}", at(), nodes[n].name),
            _ => {}
        }
        if killed_at.is_none() && durable_writes >= AGENTS * STEPS as usize / 3 / 3 {
            killed_at = Some(kill_and_hand_on(&mut nodes, &mut agents, &at).await?);
        }
    }
    println!("{} every agent completed", at());
    for node in nodes.iter_mut().filter(|n| n.name != nodes_name(VICTIM)) {
        send(node, "quit").await?;
        let status = node.child.wait().await?;
        if !status.success() {
            return Err(format!("{} exited with {status}", node.name).into());
        }
    }

    failovers.sort();
    let (first, last) = (failovers.first(), failovers.last());
    println!(
        "failover: {} sessions taken over; first write acknowledged {:.2} s after the SIGKILL, \
         the last {:.2} s after (lease TTL {LEASE_TTL:?})",
        failovers.len(),
        first.map_or(0.0, Duration::as_secs_f64),
        last.map_or(0.0, Duration::as_secs_f64)
    );
    Ok(check(url, schema).await? && takeover_faults == 0)
}

fn nodes_name(n: usize) -> String {
    format!("node-{}", n + 1)
}

fn start_node(
    n: usize,
    url: &str,
    schema: &str,
    events: mpsc::UnboundedSender<(usize, String)>,
) -> Result<NodeProcess, BoxError> {
    let name = nodes_name(n);
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--node", &name, url, schema])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdin = child.stdin.take().ok_or("no stdin")?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if events.send((n, line)).is_err() {
                break;
            }
        }
    });
    Ok(NodeProcess { name, child, stdin })
}

async fn send(node: &mut NodeProcess, command: &str) -> Result<(), BoxError> {
    node.stdin.write_all(format!("{command}\n").as_bytes()).await?;
    Ok(node.stdin.flush().await?)
}

/// SIGKILLs the victim and hands its unfinished agents to the other nodes in turn; returns
/// the moment of the kill.
async fn kill_and_hand_on(
    nodes: &mut [NodeProcess],
    agents: &mut [Agent],
    at: &impl Fn() -> String,
) -> Result<Instant, BoxError> {
    let victim = &mut nodes[VICTIM];
    victim.child.kill().await?; // SIGKILL: no shutdown, its leases are left to expire
    let killed_at = Instant::now();
    let orphans: Vec<usize> =
        (0..AGENTS).filter(|&i| agents[i].owner == VICTIM && !agents[i].completed).collect();
    println!(
        "{} SIGKILL {} holding {} unfinished agents (durable steps: {:?})",
        at(),
        victim.name,
        orphans.len(),
        orphans.iter().map(|&i| agents[i].durable).collect::<Vec<_>>()
    );
    let heirs = [0, 2];
    for (k, &i) in orphans.iter().enumerate() {
        let heir = heirs[k % heirs.len()];
        agents[i].owner = heir;
        agents[i].taken_over = true;
        send(&mut nodes[heir], &format!("run {}", agent_name(i))).await?;
    }
    println!("{} its agents handed to node-1 and node-3", at());
    Ok(killed_at)
}

/// Every agent is completed with the final state of an uninterrupted run.
async fn check(url: &str, schema: &str) -> Result<bool, BoxError> {
    let backend = PostgresStorageBackend::options().schema(schema).connect(url).await?;
    let manager = StateManager::builder(backend).node_id("checker").start().await?;
    let completed = manager.list_sessions_by_status(SessionStatus::Completed).await?.len();
    let mut wrong = 0;
    for i in 0..AGENTS {
        let agent = agent_name(i);
        let stored = manager.load_session(&agent).await?;
        if stored.as_ref() != Some(&uninterrupted(&agent)) {
            println!(
                "MISMATCH {agent}: stored {stored:?}, an uninterrupted run ends with {}",
                uninterrupted(&agent)
            );
            wrong += 1;
        }
    }
    manager.shutdown().await?;
    println!(
        "check: {completed} of {AGENTS} sessions completed, {} of {AGENTS} final states equal \
         an uninterrupted run's",
        AGENTS - wrong
    );
    Ok(wrong == 0 && completed == AGENTS)
}
