//! Crash tests: a child (this binary re-executed) saves in a loop through a `StateManager`
//! and prints an ack after each `Ok`; the private Redis server, or the child, is SIGKILLed
//! at a random moment; afterwards every acknowledged save and checkpoint is there, byte for
//! byte, and nothing fails to load.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mars_state::{CheckpointId, RedisStorageBackend, StateManager};
use serde_json::{Value, json};

use super::redis_support::{LIMIT, Server, bounded, random_prefix};

/// Set in the child's environment to `<url> <prefix>`; makes `crash_child` the saver.
const CHILD_ENV: &str = "MARS_REDIS_CRASH_CHILD";
const SESSIONS: u64 = 4;

fn session(s: u64) -> String {
    format!("crash-s{s}")
}

/// What `seq` is: every third one a checkpoint, sessions take turns.
fn op_of(seq: u64) -> (u64, bool) {
    (seq % SESSIONS, seq.is_multiple_of(3))
}

/// The value saved at `seq`: 200 bytes to 8 KB, determined by `seq`.
fn payload(seq: u64) -> Value {
    let len = 200 + (seq.wrapping_mul(7919) % 8000) as usize;
    let c = char::from(b'a' + (seq % 26) as u8);
    json!({ "seq": seq, "pad": c.to_string().repeat(len) })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn open(url: &str, prefix: &str) -> StateManager {
    let backend = RedisStorageBackend::options()
        .prefix(prefix)
        .timeout(Duration::from_secs(2))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    bounded("start", StateManager::start(backend)).await.unwrap()
}

/// The child: a no-op unless the parent set `CHILD_ENV`. Exits at its first error (the
/// server was killed under it).
#[test]
fn crash_child() {
    let Ok(target) = std::env::var(CHILD_ENV) else { return };
    let (url, prefix) = target.split_once(' ').unwrap();
    runtime().block_on(async {
        let m = open(url, prefix).await;
        // Resume from what is stored, so seqs keep rising across rounds.
        let mut seq = 0;
        for s in 0..SESSIONS {
            if let Some(v) = m.load_session(&session(s)).await.unwrap() {
                seq = seq.max(v["seq"].as_u64().unwrap());
            }
            if let Some(last) = m.list_checkpoints(&session(s)).await.unwrap().last() {
                let cp = m.restore_checkpoint(&last.id).await.unwrap().unwrap();
                seq = seq.max(cp.data["seq"].as_u64().unwrap());
            }
        }
        let mut out = std::io::stdout();
        out.write_all(b"\n").unwrap();
        let started = Instant::now();
        while started.elapsed() < LIMIT {
            seq += 1;
            let (s, checkpoint) = op_of(seq);
            let line = if checkpoint {
                match m.create_checkpoint(session(s), "main", &payload(seq)).await {
                    Ok(id) => format!("ack {seq} cp {id}\n"),
                    Err(e) => format!("err {seq} {:?}\n", e.kind()),
                }
            } else {
                match m.save_session(session(s), &payload(seq)).await {
                    Ok(()) => format!("ack {seq} save\n"),
                    Err(e) => format!("err {seq} {:?}\n", e.kind()),
                }
            };
            out.write_all(line.as_bytes()).unwrap();
            out.flush().unwrap();
            if line.starts_with("err") {
                std::process::exit(0);
            }
        }
    });
}

/// A small xorshift generator for kill delays; the seed is printed.
struct XorShift(u64);

impl XorShift {
    fn new() -> Self {
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
                as u64
                | 1;
        println!("kill delays from seed {seed}");
        XorShift(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn rounds(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|r| r.parse().ok()).unwrap_or(default)
}

/// Highest acked save per session, every acked checkpoint (id, seq), counts.
#[derive(Default)]
struct Acked {
    save: [u64; SESSIONS as usize],
    cps: Vec<(CheckpointId, u64)>,
    total: usize,
    errors: usize,
}

impl Acked {
    fn add(&mut self, lines: &[String]) {
        for line in lines {
            if line.starts_with("err ") {
                self.errors += 1;
            }
            let Some(ack) = line.strip_prefix("ack ") else { continue };
            let mut parts = ack.split(' ');
            let seq: u64 = parts.next().unwrap().parse().unwrap();
            let (s, _) = op_of(seq);
            self.total += 1;
            match parts.next() {
                Some("cp") => self.cps.push((parts.next().unwrap().parse().unwrap(), seq)),
                _ => self.save[s as usize] = self.save[s as usize].max(seq),
            }
        }
    }
}

#[test]
fn sigkill_redis_while_saving() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let rounds = rounds("MARS_REDIS_CRASH_ROUNDS", 20);
    let mut rng = XorShift::new();
    let mut server = Server::start();
    let prefix = random_prefix();
    let mut acked = Acked::default();
    let started = Instant::now();
    for round in 0..rounds {
        let delay = Duration::from_millis(2 + rng.next() % 250);
        let url = server.url();
        let lines = run_child(&url, &prefix, delay, || server.kill(), Duration::from_millis(2500));
        acked.add(&lines);
        server.restart();
        runtime().block_on(check_store(&server.url(), &prefix, &acked, round));
    }
    println!(
        "{rounds} SIGKILLs of redis-server in {:?}: {} acknowledged writes ({} checkpoints), \
         {} failed calls at the kills: none lost, none corrupt",
        started.elapsed(),
        acked.total,
        acked.cps.len(),
        acked.errors
    );
    assert!(acked.total > rounds, "too few acks to say anything");
}

#[test]
fn sigkill_client_while_saving() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let rounds = rounds("MARS_REDIS_CLIENT_ROUNDS", 50);
    let mut rng = XorShift::new();
    let server = Server::start();
    let prefix = random_prefix();
    let mut acked = Acked::default();
    let started = Instant::now();
    for round in 0..rounds {
        let delay = Duration::from_millis(2 + rng.next() % 60);
        let lines = run_child(&server.url(), &prefix, delay, || {}, Duration::ZERO);
        acked.add(&lines);
        runtime().block_on(check_store(&server.url(), &prefix, &acked, round));
    }
    println!(
        "{rounds} SIGKILLs of the saving process in {:?}: {} acknowledged writes ({} \
         checkpoints): none lost, none corrupt",
        started.elapsed(),
        acked.total,
        acked.cps.len()
    );
}

/// Runs a child until its first ack, lets it save for `delay` more, calls `kill_server`,
/// waits up to `exit_wait` for the child to exit, SIGKILLs it, and returns its lines.
fn run_child(
    url: &str,
    prefix: &str,
    delay: Duration,
    kill_server: impl FnOnce(),
    exit_wait: Duration,
) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash::crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{url} {prefix}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the child printed no ack within {LIMIT:?}")
        });
        let first = line.starts_with("ack ");
        lines.push(line);
        if first {
            break;
        }
    }
    // The kill moment: a random delay after the first ack (not a synchronization).
    std::thread::sleep(delay);
    kill_server();
    // With the server gone the child's next call fails (typed) and it exits; wait for that,
    // up to a bit over its 2 s timeout, so its last answered calls are printed. (Killing it
    // sooner would only lose acks, not data.)
    let wait_until = Instant::now() + exit_wait;
    while Instant::now() < wait_until && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    lines
}

/// Reconnects after a kill: every acked save and checkpoint is there, exactly.
async fn check_store(url: &str, prefix: &str, acked: &Acked, round: usize) {
    let m = open(url, prefix).await;
    for s in 0..SESSIONS {
        let stored = bounded("load", m.load_session(&session(s)))
            .await
            .unwrap_or_else(|e| panic!("round {round}: session {s} does not load: {e}"));
        let Some(stored) = stored else {
            assert_eq!(acked.save[s as usize], 0, "round {round}: session {s} lost");
            continue;
        };
        let seq = stored["seq"].as_u64().unwrap();
        assert_eq!(stored, payload(seq), "round {round}: session {s} holds a wrong value");
        assert!(
            seq >= acked.save[s as usize],
            "round {round}: session {s} holds seq {seq}, older than its acked {}",
            acked.save[s as usize]
        );
        for cp in bounded("list", m.list_checkpoints(&session(s))).await.unwrap() {
            let restored = bounded("restore", m.restore_checkpoint(&cp.id))
                .await
                .unwrap_or_else(|e| panic!("round {round}: checkpoint {} is damaged: {e}", cp.id));
            let data = restored.unwrap().data;
            assert_eq!(data, payload(data["seq"].as_u64().unwrap()), "round {round}");
        }
    }
    for (id, seq) in &acked.cps {
        let restored = bounded("restore", m.restore_checkpoint(id)).await.unwrap();
        assert_eq!(
            restored.map(|c| c.data),
            Some(payload(*seq)),
            "round {round}: acked checkpoint {id} (seq {seq}) lost or wrong"
        );
    }
    bounded("shutdown", m.shutdown()).await.unwrap();
}
