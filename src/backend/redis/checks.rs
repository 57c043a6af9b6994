//! What the Redis backend checks when it connects: the key prefix, and that the server
//! fsyncs its append-only file before it acknowledges a write (see the durability contract
//! in `super`). Calls redis-rs and the error mapping of `super`.

use std::collections::HashMap;

use redis::RedisError;
use redis::aio::ConnectionManager;

use super::{RedisOptions, error_of};
use crate::error::{Result, StateError};

/// The prefix rule of [`RedisOptions::prefix`]: no `:` (so no prefix is another one's
/// start followed by our separators), no `{}` (Cluster hash tags), no spaces.
pub(super) fn check_prefix(prefix: &str) -> Result<()> {
    let ok = (1..=64).contains(&prefix.len())
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        return Ok(());
    }
    Err(StateError::Config {
        message: format!(
            "Redis key prefix {:?} is not 1 to 64 ASCII letters, digits, '_', '-' or '.'",
            prefix.chars().take(80).collect::<String>()
        ),
    })
}

/// Refuses (unless best effort) a server that may acknowledge a write before it is on disk.
pub(super) async fn check_durability(
    conn: &mut ConnectionManager,
    options: &RedisOptions,
    addr: &str,
) -> Result<()> {
    let query = async {
        let mut settings = HashMap::new();
        for name in ["appendonly", "appendfsync", "no-appendfsync-on-rewrite"] {
            let got: HashMap<String, String> =
                redis::cmd("CONFIG").arg("GET").arg(name).query_async(conn).await?;
            settings.extend(got);
        }
        Ok::<_, RedisError>(settings)
    };
    let timed_out = || StateError::unavailable(format!("Redis at {addr} did not answer in time"));
    let config = tokio::time::timeout(options.timeout, query).await.map_err(|_| timed_out())?;
    let mut problems = Vec::new();
    match config {
        Ok(settings) => {
            let get = |name: &str| settings.get(name).map_or("(not reported)", String::as_str);
            if get("appendonly") != "yes" {
                problems.push(format!("appendonly is {}", get("appendonly")));
            }
            if get("appendfsync") != "always" {
                problems.push(format!("appendfsync is {}", get("appendfsync")));
            }
            if get("no-appendfsync-on-rewrite") == "yes" {
                problems.push(
                    "no-appendfsync-on-rewrite is yes (no fsync while the AOF is rewritten)".into(),
                );
            }
        }
        Err(e) if e.is_io_error() => return Err(error_of(&e, None, 0)),
        Err(e) => {
            // CONFIG renamed away or denied (managed Redis): INFO shows whether the AOF is on,
            // not its fsync policy.
            let info: String = tokio::time::timeout(
                options.timeout,
                redis::cmd("INFO").arg("persistence").query_async(conn),
            )
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| error_of(&e, None, 0))?;
            let aof = info.lines().find_map(|l| l.trim().strip_prefix("aof_enabled:"));
            if aof != Some("1") {
                problems.push(format!("aof_enabled is {} (INFO persistence)", aof.unwrap_or("?")));
            }
            problems.push(format!(
                "appendfsync cannot be verified: CONFIG GET failed ({}), and INFO does not show it",
                e.code().unwrap_or("error")
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let problems = problems.join("; ");
    if options.best_effort {
        tracing::warn!(
            %addr,
            %problems,
            "Redis may acknowledge writes before they are on disk; opened best effort: an Ok can be lost"
        );
        return Ok(());
    }
    Err(StateError::Config {
        message: format!(
            "Redis at {addr} does not fsync each write before acknowledging it: {problems}. \
             Run `CONFIG SET appendonly yes` and `CONFIG SET appendfsync always` (then \
             `CONFIG REWRITE`), or put `appendonly yes` and `appendfsync always` in redis.conf; \
             or open with RedisOptions::best_effort() to accept that an acknowledged write can \
             be lost"
        ),
    })
}
