//! `crash_private_cluster`: a PostgreSQL cluster of the test's own (`initdb` in a temporary
//! directory, its own port; run as the `postgres` user when the test runs as root) is
//! stopped with `pg_ctl stop -m immediate` (no shutdown checkpoint: crash recovery at the
//! next start) while a child process (this binary re-executed) saves and checkpoints,
//! printing an ack after each `Ok`. After a restart every acked save and checkpoint is
//! there, byte for byte. 20 rounds, or `MARS_PG_CRASH_ROUNDS`. The cluster is stopped and
//! removed at the end by a guard, also when the test fails.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mars_state::{CheckpointId, PostgresStorageBackend, StateManager};
use serde_json::{Value, json};

use super::{LIMIT, bounded};

/// Set in the child's environment to `url|schema`; makes `crash_child` the saver.
pub const CRASH_CHILD_ENV: &str = "MARS_PG_CRASH_CHILD";
const BIN: &str = "/usr/lib/postgresql/15/bin";
const SCHEMA: &str = "crash";
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

/// A private cluster, stopped and removed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// A PostgreSQL program, as the `postgres` user when we are root (the server refuses root).
fn pg(program: &str) -> Command {
    let path = format!("{BIN}/{program}");
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    }
}

fn run(mut c: Command, what: &str) {
    let out = c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    fn init() -> Self {
        let dir = tempfile::Builder::new().prefix("mars-pg-crash").tempdir().unwrap();
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["postgres:", dir.path().to_str().unwrap()]);
                    c
                },
                "chown",
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cluster = Cluster { dir, port };
        let mut c = pg("initdb");
        c.args([
            "-D",
            cluster.data().to_str().unwrap(),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        ]);
        run(c, "initdb");
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c shared_buffers=16MB \
             -c max_connections=40 -c fsync=on -c synchronous_commit=on",
            self.port,
            self.dir.path().display()
        );
        let mut c = pg("pg_ctl");
        c.args(["-D", self.data().to_str().unwrap(), "-l"])
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"]);
        run(c, "pg_ctl start");
    }

    /// Stops the server like a crash: every process killed, no checkpoint.
    fn stop_immediate(&self) {
        let mut c = pg("pg_ctl");
        c.args(["-D", self.data().to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
        run(c, "pg_ctl stop -m immediate");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut c = pg("pg_ctl");
        c.args(["-D", self.data().to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

async fn open_manager(url: &str) -> StateManager {
    let backend = PostgresStorageBackend::options().schema(SCHEMA).connect(url).await;
    let backend = backend.unwrap_or_else(|e| panic!("cannot connect to the private cluster: {e}"));
    bounded("start", StateManager::start(backend)).await.unwrap()
}

/// The child: a no-op unless the parent set `CRASH_CHILD_ENV`.
pub fn crash_child() {
    let Ok(url) = std::env::var(CRASH_CHILD_ENV) else { return };
    runtime().block_on(async {
        let m = open_manager(&url).await;
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
        }
    });
}

/// A small xorshift generator for the crash moments; the seed is printed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub fn crash_private_cluster() {
    let rounds: usize =
        std::env::var("MARS_PG_CRASH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(20);
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
            | 1;
    println!("crash moments from seed {seed}");
    let mut rng = XorShift(seed);
    let started = Instant::now();
    let cluster = Cluster::init();
    cluster.start();
    let mut acked_save = [0u64; SESSIONS as usize];
    let mut acked_cps: Vec<(CheckpointId, u64)> = Vec::new();
    let (mut total_acks, mut total_errs) = (0, 0);
    for round in 0..rounds {
        let (acks, errs) =
            crash_during_saves(&cluster, Duration::from_millis(5 + rng.next() % 250));
        total_acks += acks.len();
        total_errs += errs;
        for (seq, cp) in acks {
            let (s, _) = op_of(seq);
            match cp {
                Some(id) => acked_cps.push((id.parse().unwrap(), seq)),
                None => acked_save[s as usize] = acked_save[s as usize].max(seq),
            }
        }
        cluster.start();
        runtime().block_on(check_store(&cluster.url(), &acked_save, &acked_cps, round));
    }
    println!(
        "{rounds} immediate stops in {:?}: {total_acks} acknowledged writes ({} checkpoints), \
         {total_errs} failed calls after the stops; every acknowledged write present",
        started.elapsed(),
        acked_cps.len()
    );
}

/// Runs a child until its first ack, lets it save for `delay` more, stops the server
/// (immediate), kills the child, and returns its acks (seq, checkpoint id) and error count.
fn crash_during_saves(cluster: &Cluster, delay: Duration) -> (Vec<(u64, Option<String>)>, usize) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD_ENV, cluster.url())
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
    std::thread::sleep(delay);
    cluster.stop_immediate();
    // Whatever the child was told after the stop is in its output before the kill.
    std::thread::sleep(Duration::from_millis(50));
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    let errs = lines.iter().filter(|l| l.starts_with("err ")).count();
    let acks = lines
        .iter()
        .filter_map(|l| l.strip_prefix("ack "))
        .map(|ack| {
            let mut parts = ack.split(' ');
            let seq: u64 = parts.next().unwrap().parse().unwrap();
            let cp = match parts.next() {
                Some("cp") => Some(parts.next().unwrap().to_owned()),
                _ => None,
            };
            (seq, cp)
        })
        .collect();
    (acks, errs)
}

/// After a restart: every acked save and checkpoint is there, exactly.
async fn check_store(
    url: &str,
    acked_save: &[u64],
    acked_cps: &[(CheckpointId, u64)],
    round: usize,
) {
    let m = open_manager(url).await;
    for s in 0..SESSIONS {
        let stored = bounded("load", m.load_session(&session(s)))
            .await
            .unwrap_or_else(|e| panic!("round {round}: session {s} does not load: {e}"));
        let Some(stored) = stored else {
            assert_eq!(acked_save[s as usize], 0, "round {round}: session {s} lost");
            continue;
        };
        let seq = stored["seq"].as_u64().unwrap();
        assert_eq!(stored, payload(seq), "round {round}: session {s} holds a wrong value");
        assert!(
            seq >= acked_save[s as usize],
            "round {round}: session {s} holds seq {seq}, older than its acked {}",
            acked_save[s as usize]
        );
    }
    for (id, seq) in acked_cps {
        let restored = bounded("restore", m.restore_checkpoint(id)).await.unwrap();
        assert_eq!(
            restored.map(|c| c.data),
            Some(payload(*seq)),
            "round {round}: acked checkpoint {id} (seq {seq}) lost or wrong"
        );
    }
    bounded("shutdown", m.shutdown()).await.unwrap();
}
