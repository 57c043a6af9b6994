//! The PostgreSQL crash tests, on the kill loop of `common::oracle` (shared with the SQLite
//! and Redis backends): a child process (this binary re-executed, `crash_child`) saves and
//! checkpoints in a loop, printing an ack after each `Ok`, and at a random moment
//!
//! - `sigkill_client_while_saving`: the child is SIGKILLed (50 rounds,
//!   `MARS_PG_CLIENT_ROUNDS`), on the test server in a schema of its own;
//! - `crash_private_cluster`: a PostgreSQL cluster of the test's own (`initdb` in a temporary
//!   directory, its own port; run as the `postgres` user when the test runs as root) is
//!   stopped with `pg_ctl stop -m immediate` (no shutdown checkpoint: crash recovery at the
//!   next start), then the child is killed (20 rounds, `MARS_PG_CRASH_ROUNDS`). The cluster
//!   is stopped and removed at the end by a guard, also when the test fails.
//!
//! After each round the store, reopened, holds every acked save and checkpoint byte for
//! byte, nothing fails to load and the index agrees with the rows; the counts are printed.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mars_state::PostgresStorageBackend;

use super::{Schema, test_url};
use crate::common::oracle::{self, Acked, Counts, CrashPlan};

/// Set in the child's environment to `<url> <schema>`; makes `crash_child` the saver.
pub const CRASH_CHILD_ENV: &str = "MARS_PG_CRASH_CHILD";
const BIN: &str = "/usr/lib/postgresql/15/bin";
/// The schema of the private cluster's store.
const SCHEMA: &str = "crash";

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

async fn connect(url: &str, schema: &str) -> PostgresStorageBackend {
    let backend = PostgresStorageBackend::options().schema(schema).connect(url).await;
    backend.unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {url}: {e}"))
}

/// The child: a no-op unless the parent set `CRASH_CHILD_ENV`.
pub fn crash_child() {
    let Ok(target) = std::env::var(CRASH_CHILD_ENV) else { return };
    let (url, schema) = target.split_once(' ').unwrap();
    oracle::run_saving_child(connect(url, schema));
}

/// The command that runs the child on `schema` at `url`.
fn child(url: &str, schema: &str) -> Command {
    oracle::child_command("crash_child", CRASH_CHILD_ENV, format!("{url} {schema}"))
}

/// Reconnects after a round and checks the store (`common::oracle`).
async fn check_store(url: &str, schema: &str, acked: &mut Acked, counts: &mut Counts, label: &str) {
    oracle::check_backend(Arc::new(connect(url, schema).await), acked, counts, label).await;
}

pub fn sigkill_client_while_saving() {
    let schema = Schema::new();
    let url = test_url();
    let rt = oracle::runtime();
    oracle::sigkill_child_rounds(
        "SIGKILL of a process saving to PostgreSQL",
        "MARS_PG_CLIENT_ROUNDS",
        || child(&url, schema.name()),
        |acked, counts, label| rt.block_on(check_store(&url, schema.name(), acked, counts, label)),
    );
}

pub fn crash_private_cluster() {
    let cluster = Cluster::init();
    cluster.start();
    let url = cluster.url();
    let plan = CrashPlan {
        label: "immediate stops of a private PostgreSQL cluster",
        rounds: oracle::rounds_from_env("MARS_PG_CRASH_ROUNDS", 20),
        delay_ms: (5, 255),
        // Whatever the child was told after the stop is in its output before the kill.
        exit_wait: Duration::from_millis(50),
    };
    let rt = oracle::runtime();
    oracle::crash_rounds(
        &plan,
        oracle::BACKEND_WORKLOAD,
        || child(&url, SCHEMA),
        || cluster.stop_immediate(),
        |acked, counts, label| {
            cluster.start();
            rt.block_on(check_store(&url, SCHEMA, acked, counts, label));
        },
    );
}
