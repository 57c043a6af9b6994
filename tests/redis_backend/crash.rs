//! Crash tests, on the kill loop of `common::oracle` (shared with the SQLite and PostgreSQL
//! backends): a child (this binary re-executed) saves in a loop through a `StateManager` and
//! prints an ack after each `Ok`; the private Redis server, or the child, is SIGKILLed at a
//! random moment; afterwards every acknowledged save and checkpoint is there, byte for byte,
//! nothing fails to load and the index agrees with the keys (counts printed).

use std::cell::RefCell;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mars_state::RedisStorageBackend;

use super::common::oracle::{self, Acked, Counts, CrashPlan};
use super::redis_support::{Server, random_prefix};

/// Set in the child's environment to `<url> <prefix>`; makes `crash_child` the saver.
const CHILD_ENV: &str = "MARS_REDIS_CRASH_CHILD";

async fn connect(url: &str, prefix: &str) -> RedisStorageBackend {
    RedisStorageBackend::options()
        .prefix(prefix)
        .timeout(Duration::from_secs(2))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// The child: a no-op unless the parent set `CHILD_ENV`. Exits at its first error (the
/// server was killed under it).
#[test]
fn crash_child() {
    let Ok(target) = std::env::var(CHILD_ENV) else { return };
    let (url, prefix) = target.split_once(' ').unwrap();
    oracle::run_saving_child(connect(url, prefix));
}

/// The command that runs the child on `prefix` at `url`.
fn child(url: &str, prefix: &str) -> Command {
    oracle::child_command("crash::crash_child", CHILD_ENV, format!("{url} {prefix}"))
}

/// Reconnects after a round and checks the store (`common::oracle`).
async fn check_store(url: &str, prefix: &str, acked: &mut Acked, counts: &mut Counts, label: &str) {
    oracle::check_backend(Arc::new(connect(url, prefix).await), acked, counts, label).await;
}

#[test]
fn sigkill_redis_while_saving() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let server = RefCell::new(Server::start());
    let url = server.borrow().url();
    let prefix = random_prefix();
    let plan = CrashPlan {
        label: "SIGKILL of redis-server",
        rounds: oracle::rounds_from_env("MARS_REDIS_CRASH_ROUNDS", 20),
        delay_ms: (2, 252),
        // With the server gone the child's next call fails (typed) and it exits; wait for
        // that, up to a bit over its 2 s timeout, so its last answered calls are printed.
        // (Killing it sooner would only lose acks, not data.)
        exit_wait: Duration::from_millis(2500),
    };
    let rt = oracle::runtime();
    let counts = oracle::crash_rounds(
        &plan,
        oracle::BACKEND_WORKLOAD,
        || child(&url, &prefix),
        || server.borrow_mut().kill(),
        |acked, counts, label| {
            server.borrow_mut().restart();
            rt.block_on(check_store(&url, &prefix, acked, counts, label));
        },
    );
    assert!(counts.acks > plan.rounds, "too few acks to say anything");
}

#[test]
fn sigkill_client_while_saving() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let server = Server::start();
    let (url, prefix) = (server.url(), random_prefix());
    let rt = oracle::runtime();
    oracle::sigkill_child_rounds(
        "SIGKILL of a process saving to Redis",
        "MARS_REDIS_CLIENT_ROUNDS",
        || child(&url, &prefix),
        |acked, counts, label| rt.block_on(check_store(&url, &prefix, acked, counts, label)),
    );
}
