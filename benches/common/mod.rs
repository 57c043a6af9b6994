//! Shared by the benches: the states they save, shaped like an agent's working state (a
//! conversation plus a few scalar fields), sized by their compact JSON; the save loops every
//! bench times the same way; per server backend, the raw baselines and set-up that both
//! that backend's own bench and the comparison runner use (`pg`, `redis`); and SQLite's
//! own engine as a yardstick (`sqlite`).

// Each bench is its own crate and uses a part of this module.
#![allow(dead_code)]

#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "redis")]
pub mod redis;
/// Private durable `redis-server`s (the Redis tests' own helper).
#[cfg(feature = "redis")]
#[path = "../../tests/redis_backend/support.rs"]
pub mod redis_server;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mars_state::StateManager;
use serde_json::{Value, json};

/// One round of 64 sessions (`s0` … `s63`) saving `state` at once; returns when every save
/// is durable.
pub async fn save_64_at_once(m: &StateManager, state: &Arc<Value>) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let (m, state) = (m.clone(), state.clone());
        tasks.spawn(async move { m.save_session(format!("s{i}"), &*state).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
}

/// Saves per second from `sessions` tasks at once, one session each (`c0`, `c1`, …), each
/// saving `state` again as soon as its last save returned: they run for `warm_up`, then the
/// saves that return during the next `time` are counted.
pub async fn saves_per_sec(
    m: &StateManager,
    sessions: usize,
    state: &Value,
    warm_up: Duration,
    time: Duration,
) -> f64 {
    let state = Arc::new(state.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..sessions)
        .map(|k| {
            let (m, state, stop, done) = (m.clone(), state.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let sid = format!("c{k}");
                while !stop.load(Ordering::Relaxed) {
                    m.save_session(&sid, &*state).await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(warm_up).await;
    let (start, before) = (Instant::now(), done.load(Ordering::Relaxed));
    tokio::time::sleep(time).await;
    let n = done.load(Ordering::Relaxed) - before;
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / elapsed.as_secs_f64()
}

/// The 1 KB state (the first of [`SIZES`]).
pub fn state_1kb() -> Value {
    let (label, size) = SIZES[0];
    assert_eq!(label, "1KB");
    agent_state(size)
}

/// The state sizes every bench covers: label and target size of the compact JSON in bytes.
pub const SIZES: [(&str, usize); 3] = [("1KB", 1_000), ("100KB", 100_000), ("1MB", 1_000_000)];

const WORDS: &[&str] = &[
    "the",
    "agent",
    "should",
    "plan",
    "review",
    "summarize",
    "search",
    "results",
    "tool",
    "call",
    "output",
    "user",
    "request",
    "context",
    "memory",
    "retrieve",
    "document",
    "policy",
    "answer",
    "question",
    "draft",
    "reply",
    "error",
    "retry",
    "timeout",
    "schedule",
    "budget",
    "report",
    "analysis",
    "data",
    "customer",
    "order",
    "status",
    "update",
    "approve",
    "escalate",
    "ticket",
    "priority",
    "deadline",
    "confirm",
    "account",
    "balance",
    "history",
    "code",
    "function",
    "test",
    "failure",
    "build",
    "deploy",
    "rollback",
    "latency",
    "throughput",
    "cache",
];

/// A deterministic agent-like state whose compact JSON is `target` bytes, give or take a
/// few (messages are added until the size is reached, then the task text pads or trims
/// the rest), so every bench and every run saves the same bytes.
pub fn agent_state(target: usize) -> Value {
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move || {
        // xorshift64*: cheap, deterministic, good enough to vary word choice.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut state = json!({
        "task": "",
        "agent": "planner",
        "step": 0,
        "scratchpad": {"last_tool": "search", "attempts": 1, "ok": true},
        "messages": [],
    });
    let mut size = serde_json::to_vec(&state).map_or(0, |v| v.len());
    let mut messages = Vec::new();
    while size + 40 < target {
        let role = ["user", "assistant", "tool"][(next() % 3) as usize];
        let n_words = 20 + (next() % 70) as usize;
        let mut text = format!("{role}:");
        for _ in 0..n_words {
            text.push(' ');
            text.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
        }
        // Never overshoot: the last message is cut to what is left.
        text.truncate(target.saturating_sub(size + 40).max(8));
        size += text.len() + 3; // quotes and comma
        messages.push(Value::String(text));
    }
    state["messages"] = Value::Array(messages);
    let size = serde_json::to_vec(&state).map_or(0, |v| v.len());
    state["task"] = Value::String("t".repeat(target.saturating_sub(size).max(1)));
    state
}
