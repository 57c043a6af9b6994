//! The multi-node chaos test (features `postgres` and `redis`): three node processes (this
//! binary re-executed, `NODE_ENV` set) share one store and run sessions the test (the
//! driver) hands them, while the driver kills, stops and cuts them off at random. Pinned:
//! no acknowledged write is lost, and no write is accepted from a node after another node
//! was granted the session's lease.
//!
//! - `chaos_on_postgres`: the store is a random database on the machine's PostgreSQL
//!   (`MARS_STATE_TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`),
//!   dropped at the end, also when the test fails.
//! - `chaos_on_redis`: the store is a private durable `redis-server` (`appendonly yes`,
//!   `appendfsync always`) on a free port, killed and removed at the end.
//!
//! A store that cannot be reached fails the test.
//!
//! Protocol. The driver writes `run <session>` or `quit` lines to a node's stdin. A node
//! (its manager's node id given by the driver, lease TTL [`TTL`]) resumes a session with
//! `recover_session` (printing `resumed <session> <step> interrupted=<bool>`) and runs its
//! steps up to [`STEPS`]: each step creates a checkpoint whose state is `{session, step,
//! node}`, then saves the session state with the same value, and prints `ack <session>
//! <step> cp <id>` and `ack <session> <step> save` once each call returned `Ok`. A refused
//! write ends the node's work on that session with `fenced <session>` (`ErrorKind::Fenced`)
//! or `elsewhere <session>` (`ErrorKind::OwnedElsewhere`); any other error prints `err
//! <session> <kind>` and the node resumes the session from the store again.
//!
//! Faults, chosen at random (seed printed; `MARS_CHAOS_SEED` replays the choices, not the
//! moments): SIGKILL of a node, whose unfinished sessions go to the other nodes and to a
//! replacement (a new node id); SIGSTOP of a node past the TTL, its sessions handed to the
//! other nodes, then SIGCONT: the zombie's next writes must be refused (it is then killed
//! and replaced, so a node id writes one stretch of a session at most); and cut
//! connections (PostgreSQL: `pg_terminate_backend` of every connection to the database;
//! Redis: `CLIENT KILL TYPE normal`; every 15 ms for 0.6 s). The first fault is a SIGSTOP,
//! so the zombie path is taken in every run.
//!
//! Checks, counts printed, a failed one panics with them: every acknowledged checkpoint is
//! listed with its step and node, and each session's final state is not older than its
//! highest ack (0 lost); each session's checkpoints hold every step 1..=STEPS exactly once
//! (no two writers continued from one step, and a node that resumed after a call with an
//! unknown outcome did not redo a step the store holds) and, ordered by step, never return
//! to a node after another node wrote (no A..B..A: no write accepted after a higher token
//! was granted); every session reaches STEPS; a zombie's write was refused with `fenced`
//! at least once; every takeover after a kill or a stop reported `interrupted`. An `err`
//! line, and the `resumed` line that follows it, are printed in the timeline.

mod common;
#[allow(unused_imports)]
mod pg_common;
#[allow(dead_code)]
#[path = "redis_backend/support.rs"]
mod redis_support;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::oracle::{self, parse_ack};
use common::{SplitMix64, bounded};
use mars_state::{ErrorKind, StateManager};
use redis_support::{Server, kill_clients};
use serde_json::{Value, json};

/// Set in a node's environment to `<node id> <store url>`; makes the test a node.
const NODE_ENV: &str = "MARS_CHAOS_NODE";
/// Replays a run's fault choices.
const SEED_ENV: &str = "MARS_CHAOS_SEED";
/// Sessions the nodes run, and the steps of each.
const SESSIONS: u64 = 12;
const STEPS: u64 = 120;
/// A node's pause before each step: about 16 s for a session no fault touches.
const PACE: Duration = Duration::from_millis(130);
/// The nodes' lease TTL (renewed every TTL/3; `lease_wait` is its default, TTL + 1 s).
const TTL: Duration = Duration::from_secs(2);
/// Live nodes at any time.
const NODES: usize = 3;
/// A connection cut: every connection of the nodes to the store cut this often, this many
/// times (0.6 s), so that some writes are cut off after the server applied them (`Timeout`:
/// outcome unknown) and the node must learn from the store where the session stands.
const CUT_ROUNDS: usize = 40;
const CUT_EVERY: Duration = Duration::from_millis(15);
/// The whole run, from the first assignment to the last session's last step.
const RUN_LIMIT: Duration = Duration::from_secs(100);
/// Faults after the first SIGSTOP: these, shuffled.
const MORE_FAULTS: [Fault; 5] =
    [Fault::Kill, Fault::Kill, Fault::Stop, Fault::CutConnections, Fault::CutConnections];

#[test]
fn chaos_on_postgres() {
    if let Ok(spec) = std::env::var(NODE_ENV) {
        return node_main(&spec);
    }
    let db = oracle::runtime().block_on(pg_common::Database::new());
    let sql = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = '{}' AND pid <> pg_backend_pid()",
        db.name()
    );
    let cut = || pg_common::admin_query_sync(&sql)[0].0.parse().unwrap();
    let store = Store { label: "postgres", test: "chaos_on_postgres", url: db.url(), cut: &cut };
    run_chaos(&store);
}

#[test]
fn chaos_on_redis() {
    if let Ok(spec) = std::env::var(NODE_ENV) {
        return node_main(&spec);
    }
    let server = Server::start();
    let cut = || {
        oracle::runtime().block_on(async { kill_clients(&mut server.admin().await).await as usize })
    };
    let store = Store { label: "redis", test: "chaos_on_redis", url: server.url(), cut: &cut };
    run_chaos(&store);
}

// ---------------------------------------------------------------------------------------
// A node
// ---------------------------------------------------------------------------------------

fn session_name(s: u64) -> String {
    format!("chaos-s{s}")
}

/// One line to the driver; `println!` writes it whole and flushes it (stdout is line
/// buffered).
fn say(line: impl std::fmt::Display) {
    println!("{line}");
}

/// A node: a manager on the store, running the sessions the driver hands it until `quit`
/// (or the driver's end of stdin closes), then shutting down (releasing its leases).
fn node_main(spec: &str) {
    let (node, url) = spec.split_once(' ').unwrap();
    oracle::runtime().block_on(async {
        let backend = bounded("open", mars_state::backend::open(url))
            .await
            .unwrap_or_else(|e| panic!("node {node}: cannot open the store: {e}"));
        let m =
            bounded("start", StateManager::builder(backend).node_id(node).lease_ttl(TTL).start())
                .await
                .unwrap();
        // libtest has printed "test NAME ... " without a newline: end that line first.
        say(format_args!("\nready {node}"));
        let mut commands = commands();
        while let Some(line) = commands.recv().await {
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["run", s] => {
                    tokio::spawn(run_session(m.clone(), node.to_owned(), s.parse().unwrap()));
                }
                ["quit"] => break,
                _ => panic!("node {node}: unknown command {line:?}"),
            }
        }
        bounded("shutdown", m.shutdown()).await.unwrap();
        say("bye");
    });
}

/// The driver's commands, one a line, read on a thread of their own.
fn commands() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs session `s` to its last step; on a refused write says so and stops, on any other
/// error says so and resumes from the store again.
async fn run_session(m: StateManager, node: String, s: u64) {
    loop {
        let Err(e) = steps(&m, &node, s).await else { return };
        match e.kind() {
            ErrorKind::Fenced => return say(format_args!("fenced {s}")),
            ErrorKind::OwnedElsewhere => return say(format_args!("elsewhere {s}")),
            kind => say(format_args!("err {s} {kind:?}")),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Resumes session `s` from its newest checkpoint (saving it as the session state first
/// if the last step's save did not happen) and runs the steps after it.
async fn steps(m: &StateManager, node: &str, s: u64) -> mars_state::Result<()> {
    let name = session_name(s);
    let recovery = m.recover_session(&name).await?;
    let step_of = |v: &Value| v["step"].as_u64().unwrap();
    let saved = recovery.state.as_ref().map_or(0, step_of);
    let checkpoint = recovery.checkpoint.map(|c| c.data);
    let from = checkpoint.as_ref().map_or(0, step_of);
    say(format_args!("resumed {s} {from} interrupted={}", recovery.interrupted));
    if let Some(value) = checkpoint.filter(|_| saved < from) {
        m.save_session(&name, &value).await?;
        say(format_args!("ack {s} {from} save"));
    }
    for step in from + 1..=STEPS {
        tokio::time::sleep(PACE).await;
        let value = json!({ "session": s, "step": step, "node": node });
        let id = m.create_checkpoint(&name, "main", &value).await?;
        say(format_args!("ack {s} {step} cp {id}"));
        m.save_session(&name, &value).await?;
        say(format_args!("ack {s} {step} save"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------

/// The store of a run: how nodes open it and how its connections are cut.
struct Store<'a> {
    label: &'static str,
    /// The test the nodes run (re-executed with `NODE_ENV`).
    test: &'static str,
    url: String,
    /// Cuts every node's connection to the store; returns how many it cut.
    cut: &'a dyn Fn() -> usize,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Stop,
    CutConnections,
}

struct Node {
    id: String,
    child: Child,
    stdin: ChildStdin,
    live: bool,
}

/// What the driver knows of one session.
#[derive(Default)]
struct Session {
    /// The node it is assigned to now (an index into `Cluster::nodes`).
    owner: usize,
    /// Every node id it was assigned to, in order.
    owners: Vec<String>,
    /// The highest acknowledged save.
    acked: u64,
    /// Acknowledged checkpoints: id → (step, node).
    checkpoints: BTreeMap<String, (u64, String)>,
    done: bool,
    /// Set at a takeover (the kill or stop): cleared by the new owner's first ack.
    failover_from: Option<Instant>,
    /// Set at a takeover: cleared by the new owner's `resumed` line.
    takeover: bool,
    /// Set by an `err` line: the owner's next `resumed` line is printed.
    erred: bool,
}

#[derive(Default, Debug)]
struct Counts {
    acks: usize,
    kills: usize,
    stops: usize,
    cuts: usize,
    connections_cut: usize,
    /// Sessions handed to another node after a kill or a stop.
    handed_on: usize,
    /// Takeovers: a handed-on session's new owner resumed it (a session handed on again
    /// before its new owner resumed it counts once).
    takeovers: usize,
    /// ... reporting it `interrupted`.
    takeovers_interrupted: usize,
    /// Refusals of a zombie's writes (a node no longer assigned the session).
    zombie_fenced: usize,
    zombie_elsewhere: usize,
    /// Sessions of a zombie that got no refusal within the wait (it may not have tried).
    zombie_unanswered: usize,
    /// The longest time from a SIGCONT to a refusal of the zombie's write.
    zombie_refusal_max_ms: u128,
    /// Acks a node printed after its session was handed on (writes that committed before
    /// the takeover; allowed, and checked like any ack).
    late_acks: usize,
    /// Refusals a session's owner got (its lease lapsed): it is handed the session again.
    owner_fenced: usize,
    owner_elsewhere: usize,
    /// `err` lines: calls that failed for another reason (cut connections); retried.
    errors: usize,
    failover_max_ms: u128,
    // The checks of the store after the run.
    checkpoints: usize,
    lost: usize,
    /// Steps stored by more than one node.
    duplicate_steps: usize,
    /// Steps stored twice by one node: it resumed after a call with an unknown outcome, and
    /// recovery did not show the checkpoint that call had stored.
    steps_redone: usize,
    missing_steps: usize,
    returns_to_node: usize,
    unfinished: usize,
}

struct Cluster<'a> {
    store: &'a Store<'a>,
    nodes: Vec<Node>,
    lines: mpsc::Receiver<(usize, String)>,
    tx: mpsc::Sender<(usize, String)>,
    sessions: Vec<Session>,
    counts: Counts,
    rng: SplitMix64,
    /// When the run started, for the timeline.
    started: Instant,
    /// (node, session) of every refusal a zombie got.
    zombie_refusals: HashSet<(usize, u64)>,
    /// When the last zombie was woken (SIGCONT).
    woken: Instant,
    /// Sessions to hand again to the node that refused them (if it still owns them), and
    /// when: (when, node, session).
    resend: Vec<(Instant, usize, u64)>,
}

fn run_chaos(store: &Store) {
    let seed: u64 =
        std::env::var(SEED_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            t.as_nanos() as u64 ^ u64::from(std::process::id())
        });
    let label = store.label;
    println!(
        "{label}: {NODES} nodes, {SESSIONS} sessions of {STEPS} steps, TTL {TTL:?}, seed {seed} \
         (replay with {SEED_ENV}={seed})"
    );
    let started = Instant::now();
    let (tx, lines) = mpsc::channel();
    let mut c = Cluster {
        store,
        nodes: Vec::new(),
        lines,
        tx,
        sessions: (0..SESSIONS).map(|_| Session::default()).collect(),
        counts: Counts::default(),
        rng: SplitMix64(seed),
        started,
        zombie_refusals: HashSet::new(),
        woken: started,
        resend: Vec::new(),
    };
    for _ in 0..NODES {
        c.spawn_node();
    }
    for s in 0..SESSIONS {
        c.assign(s, s as usize % NODES);
    }

    let mut faults = MORE_FAULTS.to_vec();
    for i in (1..faults.len()).rev() {
        faults.swap(i, c.rng.below(i + 1));
    }
    faults.insert(0, Fault::Stop);
    for fault in faults {
        let gap = Duration::from_millis(1000 + c.rng.next() % 1500);
        c.pump_for(gap);
        if c.all_done() {
            break;
        }
        c.inject(fault);
    }
    c.wait_for(RUN_LIMIT.saturating_sub(started.elapsed()), "every session's last step", |c| {
        c.all_done()
    });
    let ran = started.elapsed();
    c.quit_all();
    oracle::runtime().block_on(verify(&store.url, &c.sessions, &mut c.counts));
    c.report(&format!(
        "{label}: seed {seed}, run {:.1}s, checks {:.1}s",
        ran.as_secs_f64(),
        (started.elapsed() - ran).as_secs_f64()
    ));
}

impl Cluster<'_> {
    /// Starts a node with a new id; its lines come to `self.lines`.
    fn spawn_node(&mut self) -> usize {
        let index = self.nodes.len();
        let id = format!("node-{}", index + 1);
        let mut cmd =
            oracle::child_command(self.store.test, NODE_ENV, format!("{id} {}", self.store.url));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = oracle::read_lines(child.stdout.take().unwrap());
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in out {
                if tx.send((index, line)).is_err() {
                    break;
                }
            }
        });
        self.nodes.push(Node { id, child, stdin, live: true });
        index
    }

    fn tell(&mut self, node: usize, command: &str) {
        let n = &mut self.nodes[node];
        writeln!(n.stdin, "{command}").unwrap_or_else(|e| panic!("{}: {command}: {e}", n.id));
        n.stdin.flush().unwrap();
    }

    fn assign(&mut self, s: u64, node: usize) {
        let id = self.nodes[node].id.clone();
        let session = &mut self.sessions[s as usize];
        assert!(!session.owners.contains(&id), "session {s} handed back to {id}");
        session.owner = node;
        session.owners.push(id);
        self.tell(node, &format!("run {s}"));
    }

    fn all_done(&self) -> bool {
        self.sessions.iter().all(|s| s.done)
    }

    /// Unfinished sessions assigned to `node`.
    fn unfinished_of(&self, node: usize) -> Vec<u64> {
        (0..SESSIONS)
            .filter(|&s| self.sessions[s as usize].owner == node)
            .filter(|&s| !self.sessions[s as usize].done)
            .collect()
    }

    /// Hands every unfinished session of `from` to the live nodes other than `from`, in
    /// turn from a random one, marking the takeover at `at`.
    fn hand_on(&mut self, from: usize, at: Instant) -> Vec<u64> {
        let targets: Vec<usize> =
            (0..self.nodes.len()).filter(|&n| n != from && self.nodes[n].live).collect();
        let moved = self.unfinished_of(from);
        let first = self.rng.below(targets.len());
        for (i, &s) in moved.iter().enumerate() {
            let session = &mut self.sessions[s as usize];
            session.failover_from = Some(at);
            session.takeover = true;
            self.assign(s, targets[(first + i) % targets.len()]);
        }
        self.counts.handed_on += moved.len();
        moved
    }

    fn signal(&self, node: usize, signal: &str) {
        let pid = self.nodes[node].child.id().to_string();
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(&pid).status().unwrap();
        assert!(ok.success(), "kill -{signal} {pid} failed");
    }

    /// SIGKILLs `node` and reaps it.
    fn kill(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.child.kill().unwrap();
        n.child.wait().unwrap();
        n.live = false;
    }

    /// A live node with unfinished sessions, at random.
    fn victim(&mut self) -> Option<usize> {
        let busy: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].live && !self.unfinished_of(n).is_empty())
            .collect();
        (!busy.is_empty()).then(|| busy[self.rng.below(busy.len())])
    }

    /// `<store>: <seconds since the start>`, to begin a timeline line.
    fn at(&self) -> String {
        format!("{}: {:5.1}s", self.store.label, self.started.elapsed().as_secs_f64())
    }

    fn inject(&mut self, fault: Fault) {
        let Some(victim) = self.victim() else { return };
        let (at, id) = (self.at(), self.nodes[victim].id.clone());
        match fault {
            Fault::Kill => {
                let killed = Instant::now();
                self.kill(victim);
                self.spawn_node();
                let moved = self.hand_on(victim, killed);
                println!("{at} SIGKILL {id}; sessions {moved:?} handed on");
                self.counts.kills += 1;
            }
            Fault::Stop => self.zombie(victim),
            Fault::CutConnections => {
                for _ in 0..CUT_ROUNDS {
                    self.counts.connections_cut += (self.store.cut)();
                    self.pump_for(CUT_EVERY);
                }
                println!("{at} connections cut, {CUT_ROUNDS} rounds {CUT_EVERY:?} apart");
                self.counts.cuts += 1;
            }
        }
    }

    /// SIGSTOPs `node` past the TTL, hands its sessions on, waits for each new owner's
    /// first ack, SIGCONTs it and gives its writes time to be refused; then kills and
    /// replaces it.
    fn zombie(&mut self, node: usize) {
        let id = self.nodes[node].id.clone();
        println!("{} SIGSTOP {id}", self.at());
        self.signal(node, "STOP");
        let at = Instant::now();
        self.pump_for(TTL + Duration::from_millis(500));
        let moved = self.hand_on(node, at);
        println!("{} after the TTL, {id}'s sessions {moved:?} handed on", self.at());
        self.wait_for(TTL * 3 + Duration::from_secs(10), "the new owners' first acks", |c| {
            moved.iter().all(|&s| c.sessions[s as usize].failover_from.is_none())
        });
        println!("{} SIGCONT {id}", self.at());
        self.signal(node, "CONT");
        self.woken = Instant::now();
        // Each moved session's task in the zombie tries its next write within a step; a
        // refusal may come as late as the lease wait (TTL + 1 s).
        let deadline = Instant::now() + PACE + TTL + Duration::from_secs(3);
        let answered = |c: &Self| moved.iter().all(|&s| c.zombie_refusals.contains(&(node, s)));
        while !answered(self) && Instant::now() < deadline {
            self.pump_for(Duration::from_millis(20));
        }
        let refused = moved.iter().filter(|&&s| self.zombie_refusals.contains(&(node, s))).count();
        self.counts.zombie_unanswered += moved.len() - refused;
        println!(
            "{} {id}: writes of {refused} of its {} sessions refused; killed and replaced",
            self.at(),
            moved.len()
        );
        self.kill(node);
        self.spawn_node();
        self.counts.stops += 1;
    }

    /// Takes in one line of `node`.
    fn handle(&mut self, node: usize, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(s) = words.get(1).and_then(|s| s.parse::<u64>().ok()) else { return };
        let is_owner = self.sessions.get(s as usize).is_some_and(|x| x.owner == node);
        let counts = &mut self.counts;
        match words[0] {
            "ack" => {
                let ack = parse_ack(line);
                let session = &mut self.sessions[s as usize];
                counts.acks += 1;
                if !is_owner {
                    counts.late_acks += 1;
                } else if let Some(at) = session.failover_from.take() {
                    counts.failover_max_ms = counts.failover_max_ms.max(at.elapsed().as_millis());
                }
                let node_id = self.nodes[node].id.clone();
                match ack.checkpoint {
                    Some(id) => {
                        session.checkpoints.insert(id.to_owned(), (ack.seq, node_id));
                    }
                    None => {
                        session.acked = session.acked.max(ack.seq);
                        session.done |= ack.seq == STEPS;
                    }
                }
            }
            "resumed" if is_owner => {
                let session = &mut self.sessions[s as usize];
                if std::mem::take(&mut session.erred) {
                    let t = self.started.elapsed().as_secs_f64();
                    println!("{}: {t:5.1}s {}: {line}", self.store.label, self.nodes[node].id);
                }
                if std::mem::take(&mut session.takeover) {
                    counts.takeovers += 1;
                    counts.takeovers_interrupted += usize::from(line.ends_with("interrupted=true"));
                }
            }
            "fenced" | "elsewhere" if !is_owner => {
                match words[0] {
                    "fenced" => counts.zombie_fenced += 1,
                    _ => counts.zombie_elsewhere += 1,
                }
                self.zombie_refusals.insert((node, s));
                let after = self.woken.elapsed().as_millis();
                counts.zombie_refusal_max_ms = counts.zombie_refusal_max_ms.max(after);
            }
            "fenced" | "elsewhere" => {
                match words[0] {
                    "fenced" => counts.owner_fenced += 1,
                    _ => counts.owner_elsewhere += 1,
                }
                self.resend.push((Instant::now() + Duration::from_millis(300), node, s));
            }
            "err" => {
                counts.errors += 1;
                self.sessions[s as usize].erred = true;
                let t = self.started.elapsed().as_secs_f64();
                println!("{}: {t:5.1}s {}: {line}", self.store.label, self.nodes[node].id);
            }
            _ => {}
        }
    }

    /// Takes in lines until `deadline`, handing refused sessions back to their owners when
    /// due.
    fn pump_until(&mut self, deadline: Instant) {
        loop {
            let now = Instant::now();
            let due: Vec<(usize, u64)> =
                self.resend.iter().filter(|r| r.0 <= now).map(|&(_, n, s)| (n, s)).collect();
            self.resend.retain(|r| r.0 > now);
            for (node, s) in due {
                let session = &self.sessions[s as usize];
                if session.owner == node && self.nodes[node].live && !session.done {
                    self.tell(node, &format!("run {s}"));
                }
            }
            if now >= deadline {
                return;
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            if let Ok((node, line)) = self.lines.recv_timeout(wait) {
                self.handle(node, &line);
            }
        }
    }

    fn pump_for(&mut self, d: Duration) {
        self.pump_until(Instant::now() + d);
    }

    /// Takes in lines until `done(self)`; fails the test with the counts after `limit`.
    fn wait_for(&mut self, limit: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {limit:?}; sessions at steps {:?}; {:?}",
                self.store.label,
                self.sessions.iter().map(|s| s.acked).collect::<Vec<_>>(),
                self.counts
            );
            self.pump_for(Duration::from_millis(50));
        }
    }

    /// Tells every live node to shut down and waits for each to exit successfully.
    fn quit_all(&mut self) {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&n| self.nodes[n].live).collect();
        for &n in &live {
            self.tell(n, "quit");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in live {
            let status = loop {
                if let Some(status) = self.nodes[n].child.try_wait().unwrap() {
                    break status;
                }
                assert!(Instant::now() < deadline, "{} did not shut down", self.nodes[n].id);
                self.pump_for(Duration::from_millis(20));
            };
            assert!(status.success(), "{} exited with {status}", self.nodes[n].id);
            self.nodes[n].live = false;
        }
    }

    /// Prints the counts; panics with them unless every check passed.
    fn report(&self, head: &str) {
        let c = &self.counts;
        println!("{head}");
        println!(
            "  faults: {} SIGKILL, {} SIGSTOP (zombies), {} connection cuts ({} connections); \
             failover (fault to the new owner's first ack) at most {} ms",
            c.kills, c.stops, c.cuts, c.connections_cut, c.failover_max_ms
        );
        println!(
            "  writes: {} acks ({} late acks of a node whose session was handed on), {} \
             checkpoints stored, {} calls failed and retried",
            c.acks, c.late_acks, c.checkpoints, c.errors
        );
        println!(
            "  refusals: zombie fenced {}, zombie elsewhere {}, zombie sessions without a \
             refusal {}, a zombie's refusal at most {} ms after its SIGCONT; owner fenced {}, \
             owner elsewhere {}",
            c.zombie_fenced,
            c.zombie_elsewhere,
            c.zombie_unanswered,
            c.zombie_refusal_max_ms,
            c.owner_fenced,
            c.owner_elsewhere
        );
        println!(
            "  takeovers: {} sessions handed on, {} resumed by their new owner, {} of those \
             reported interrupted",
            c.handed_on, c.takeovers, c.takeovers_interrupted
        );
        println!(
            "  checks: lost {}, steps written by two nodes {}, steps redone by one node {}, \
             missing steps {}, returns to a node after another wrote {}, sessions short of \
             step {STEPS}: {}",
            c.lost,
            c.duplicate_steps,
            c.steps_redone,
            c.missing_steps,
            c.returns_to_node,
            c.unfinished
        );
        let failed: Vec<&str> = [
            (c.lost > 0, "acknowledged writes lost"),
            (c.duplicate_steps > 0, "a step written by two nodes (both went on from one step)"),
            (
                c.steps_redone > 0,
                "a step written twice by one node (recovery after a call with an unknown outcome \
                 did not show the checkpoint that call stored)",
            ),
            (c.returns_to_node > 0, "a node wrote again after another node took over"),
            (c.missing_steps + c.unfinished > 0, "sessions short of their last step"),
            (c.zombie_fenced == 0, "no zombie write was refused with Fenced"),
            (c.takeovers == 0, "no takeover"),
            (c.takeovers_interrupted < c.takeovers, "takeovers not reported interrupted"),
        ]
        .into_iter()
        .filter_map(|(bad, what)| bad.then_some(what))
        .collect();
        assert!(failed.is_empty(), "{head}: FAILED: {}; {c:?}", failed.join("; "));
    }
}

impl Drop for Cluster<'_> {
    /// A failed test leaves no node behind (a stopped one dies of SIGKILL too).
    fn drop(&mut self) {
        for n in self.nodes.iter_mut().filter(|n| n.live) {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

/// Checks the store after the run against what was acknowledged, adding to `counts`.
async fn verify(url: &str, sessions: &[Session], counts: &mut Counts) {
    let backend = bounded("open", mars_state::backend::open(url)).await.unwrap();
    let m =
        bounded("start", StateManager::builder(backend).node_id("verifier").start()).await.unwrap();
    for (s, session) in sessions.iter().enumerate() {
        let name = session_name(s as u64);
        let listed = bounded("list", m.list_checkpoints(&name)).await.unwrap();
        counts.checkpoints += listed.len();
        // step → the nodes whose checkpoint holds it; id → (step, node).
        let mut by_step: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        let mut stored = BTreeMap::new();
        for info in &listed {
            let cp = bounded("restore", m.restore_checkpoint(&info.id)).await.unwrap().unwrap();
            let step = cp.data["step"].as_u64().unwrap();
            let node = cp.data["node"].as_str().unwrap().to_owned();
            by_step.entry(step).or_default().push(node.clone());
            stored.insert(info.id.to_string(), (step, node));
        }
        for (id, acked) in &session.checkpoints {
            if stored.get(id) != Some(acked) {
                eprintln!("{name}: LOST: acked checkpoint {id} {acked:?}: {:?}", stored.get(id));
                counts.lost += 1;
            }
        }
        for (step, nodes) in by_step.iter().filter(|(_, n)| n.len() > 1) {
            eprintln!("{name}: step {step} written {} times, by {nodes:?}", nodes.len());
            if nodes.iter().all(|n| *n == nodes[0]) {
                counts.steps_redone += nodes.len() - 1;
            } else {
                counts.duplicate_steps += nodes.len() - 1;
            }
        }
        counts.missing_steps += (1..=STEPS).filter(|k| !by_step.contains_key(k)).count();
        let mut wrote: HashSet<&str> = HashSet::new();
        let mut last = "";
        for (step, nodes) in &by_step {
            let node = nodes[0].as_str();
            if node != last && !wrote.insert(node) {
                eprintln!("{name}: step {step} by {node} after another node wrote");
                counts.returns_to_node += 1;
            }
            last = node;
        }
        let state = bounded("load", m.load_session(&name)).await.unwrap();
        let step = state.as_ref().and_then(|v| v["step"].as_u64()).unwrap_or(0);
        if step < session.acked {
            eprintln!("{name}: LOST: state at step {step}, acked {}", session.acked);
            counts.lost += 1;
        }
        counts.unfinished += usize::from(step != STEPS);
    }
    bounded("shutdown", m.shutdown()).await.unwrap();
}
