//! Shared by the benches: the states they save, shaped like an agent's working state (a
//! conversation plus a few scalar fields), sized by their compact JSON.

use serde_json::{Value, json};

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
