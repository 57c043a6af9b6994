//! `mars-state watch`: live change events, one line each (or one JSON object per line with
//! `--json`), until interrupted. The tool only reads: it never takes a store's lock and
//! never writes.
//!
//! - On a shared store (PostgreSQL, Redis) every node publishes its events, and the tool
//!   subscribes through a read-only manager: each event arrives as it happens.
//! - A file or SQLite store is held by one process, which publishes nothing outside itself.
//!   There the tool looks at the store every `--interval` (opening it read-only beside its
//!   holder, the write-ahead log replayed in memory) and prints what changed between two
//!   looks: new sessions and saves, new checkpoints, status changes, deletions. Several
//!   saves of one session within one interval are one line, and a rollback shows as a save.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use mars_state::{
    CheckpointId, CheckpointInfo, EventKind, SessionInfo, SessionStatus, StateEvent, WatchError,
};
use serde_json::json;

use crate::Global;
use crate::log::reason_name;
use crate::output::{self, CliError};
use crate::store::{self, Access, Key, Opened};

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
    /// Only this session's events (default: every session).
    session: Option<String>,
    /// On a file or SQLite store: milliseconds between two looks at the store (at least
    /// 50). Shared stores deliver each event as it happens and ignore it.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(50..))]
    interval: u64,
}

/// What happened, in words and as JSON fields.
fn describe(kind: &EventKind) -> (String, serde_json::Value) {
    match kind {
        EventKind::Saved => ("saved".into(), json!({"event": "saved"})),
        EventKind::Checkpointed { id, reason, step } => {
            let step_text = step.map_or_else(String::new, |s| format!(" step {s}"));
            (
                format!("checkpoint {id} ({}{step_text})", reason_name(*reason)),
                json!({"event": "checkpointed", "checkpoint": id, "reason": reason, "step": step}),
            )
        }
        EventKind::RolledBack { to } => {
            (format!("rolled back to {to}"), json!({"event": "rolled_back", "checkpoint": to}))
        }
        EventKind::Paused { reason } => {
            (format!("paused: {reason}"), json!({"event": "paused", "reason": reason}))
        }
        EventKind::Resumed => ("resumed".into(), json!({"event": "resumed"})),
        EventKind::Completed => ("completed".into(), json!({"event": "completed"})),
        EventKind::Failed { reason } => {
            (format!("failed: {reason}"), json!({"event": "failed", "reason": reason}))
        }
        EventKind::Deleted => ("deleted".into(), json!({"event": "deleted"})),
        _ => ("changed".into(), json!({"event": "other"})),
    }
}

fn print_event(g: &Global, e: &StateEvent) {
    let (text, mut fields) = describe(&e.kind);
    if g.json {
        fields["session_id"] = json!(e.session_id);
        fields["at"] = json!(e.at);
        output::print_lines(&fields.to_string());
    } else {
        let line = format!("{}  {}  {text}", output::time(e.at), e.session_id);
        output::print_lines(&output::truncate(&line, output::WIDTH));
    }
}

pub(crate) async fn run(g: &Global, a: WatchArgs) -> Result<ExitCode, CliError> {
    let url = store::resolve(Some(a.store.as_str()))?;
    let key = Key::from_args(&g.keys)?;
    let what =
        a.session.as_deref().map_or_else(|| "every session".to_owned(), |s| format!("session {s}"));
    // Read-only on every backend: the tool never holds a store its application needs.
    if store::is_local(&url) {
        return polled(g, &a, &url, &key, &what).await;
    }
    let opened = Opened::with_key(&url, key, Access::Read).await?;
    subscribed(g, &a, opened, &what).await
}

/// A shared store: the events every node publishes, through a read-only manager.
async fn subscribed(
    g: &Global,
    a: &WatchArgs,
    opened: Opened,
    what: &str,
) -> Result<ExitCode, CliError> {
    let watch = match &a.session {
        Some(s) => opened.manager.watch(s).await.map_err(|e| opened.error(e, Some(s))),
        None => opened.manager.watch_all().await.map_err(|e| opened.error(e, None)),
    };
    let mut watch = match watch {
        Ok(w) => w,
        Err(e) => {
            opened.close().await?;
            return Err(e);
        }
    };
    eprintln!("watching {} ({what}); Ctrl-C to stop", store::redact(&opened.url));
    let result = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break Ok(()),
            event = watch.recv() => match event {
                Ok(e) => print_event(g, &e),
                Err(WatchError::Lagged(missed)) => {
                    eprintln!("mars-state: {missed} events were missed (the tool fell behind or the feed was cut)");
                }
                Err(e) => break Err(e),
            },
        }
    };
    let url = opened.url.clone();
    opened.close().await?;
    result.map_err(|e| {
        CliError::new(
            crate::output::Exit::Failure,
            format!("store {}: the watch ended: {e}", store::redact(&url)),
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// What one look at a session saw.
struct Seen {
    info: SessionInfo,
    checkpoints: BTreeSet<CheckpointId>,
}

/// One look at a file or SQLite store: its sessions (or the one asked for) and their
/// checkpoints, read through a read-only manager opened for this look only (so the look
/// sees what the holder has written since the last one) and shut down again. The
/// checkpoints of a session are listed only when its checkpoint count or last save
/// changed since `before`; the new ones are returned beside the look.
async fn look(
    url: &str,
    key: &Key,
    session: Option<&str>,
    before: &BTreeMap<String, Seen>,
) -> Result<(BTreeMap<String, Seen>, Vec<CheckpointInfo>), CliError> {
    let opened = Opened::with_key(url, key.clone(), Access::Read).await?;
    let result = async {
        let mut sessions =
            opened.manager.list_sessions().await.map_err(|e| opened.error(e, None))?;
        if let Some(s) = session {
            sessions.retain(|i| i.session_id.as_str() == s);
        }
        let mut now = BTreeMap::new();
        let mut new_checkpoints = Vec::new();
        for info in sessions {
            let id = info.session_id.as_str().to_owned();
            let unchanged = before.get(&id).filter(|b| {
                b.info.checkpoint_count == info.checkpoint_count && !record_changed(&b.info, &info)
            });
            let checkpoints = match unchanged {
                Some(b) => b.checkpoints.clone(),
                None => {
                    let listed = match opened.manager.list_checkpoints(&id).await {
                        Ok(l) => l,
                        // Deleted between the listing and this read: gone in the next look.
                        Err(e) if e.kind() == mars_state::ErrorKind::NotFound => continue,
                        Err(e) => return Err(opened.error(e, Some(&id))),
                    };
                    let known = before.get(&id).map(|b| &b.checkpoints);
                    let ids = listed.iter().map(|c| c.id.clone()).collect();
                    new_checkpoints.extend(
                        listed.into_iter().filter(|c| known.is_none_or(|k| !k.contains(&c.id))),
                    );
                    ids
                }
            };
            now.insert(id, Seen { info, checkpoints });
        }
        Ok((now, new_checkpoints))
    }
    .await;
    opened.close().await?;
    result
}

/// Whether the session record behind `now` differs from the one behind `before`: another
/// save time, or (two saves in one millisecond) another size, step or status.
fn record_changed(before: &SessionInfo, now: &SessionInfo) -> bool {
    before.updated_at != now.updated_at
        || before.size_bytes != now.size_bytes
        || before.step != now.step
        || before.status != now.status
        || before.status_at != now.status_at
        || before.status_reason != now.status_reason
}

/// The events that turn look `before` into look `now` (`new_checkpoints` from [`look`]),
/// in the order they happened. `deleted_at` stamps deletions, which leave no time behind.
///
/// A status change is printed after the checkpoints its session took in the same look, as
/// the live feed has it (pausing saves the state, takes the pause checkpoint, then reports
/// the pause), though its time is the status's own.
fn changes(
    before: &BTreeMap<String, Seen>,
    now: &BTreeMap<String, Seen>,
    new_checkpoints: Vec<CheckpointInfo>,
    deleted_at: u64,
) -> Vec<StateEvent> {
    // (when it sorts, the event); ties keep this order: saves, checkpoints, statuses,
    // deletions (a save comes before the checkpoint or status of the same instant).
    let mut saves: Vec<(u64, StateEvent)> = Vec::new();
    let mut statuses: Vec<(u64, StateEvent)> = Vec::new();
    let mut last_checkpoint: BTreeMap<&str, u64> = BTreeMap::new();
    for c in &new_checkpoints {
        let last = last_checkpoint.entry(c.session_id.as_str()).or_default();
        *last = (*last).max(c.timestamp);
    }
    for (id, seen) in now {
        let info = &seen.info;
        let old = before.get(id).map(|b| &b.info);
        let event = |kind, at| StateEvent { session_id: info.session_id.clone(), kind, at };
        // A save changes the record: its time, and (within the same millisecond, which a
        // fast disk allows) its size, step or status, which live in the record too.
        if old.is_none_or(|o| record_changed(o, info)) {
            saves.push((info.updated_at, event(EventKind::Saved, info.updated_at)));
        }
        let was = old.map_or(SessionStatus::Running, |o| o.status);
        if info.status != was || old.is_some_and(|o| o.status_at != info.status_at) {
            let reason = info.status_reason.clone().unwrap_or_default();
            let kind = match info.status {
                SessionStatus::Paused => Some(EventKind::Paused { reason }),
                SessionStatus::Completed => Some(EventKind::Completed),
                SessionStatus::Failed => Some(EventKind::Failed { reason }),
                SessionStatus::Running if was == SessionStatus::Paused => Some(EventKind::Resumed),
                _ => None,
            };
            if let Some(kind) = kind {
                let at = info.status_at.unwrap_or(info.updated_at);
                let after = last_checkpoint.get(id.as_str()).map_or(at, |c| at.max(*c));
                statuses.push((after, event(kind, at)));
            }
        }
    }
    let checkpoints = new_checkpoints.into_iter().map(|c| {
        let at = c.timestamp;
        (
            at,
            StateEvent {
                session_id: c.session_id,
                kind: EventKind::Checkpointed { id: c.id, reason: c.reason, step: c.step },
                at,
            },
        )
    });
    let mut events: Vec<(u64, StateEvent)> =
        saves.into_iter().chain(checkpoints).chain(statuses).collect();
    for (id, seen) in before {
        if !now.contains_key(id) {
            let e = StateEvent {
                session_id: seen.info.session_id.clone(),
                kind: EventKind::Deleted,
                at: deleted_at,
            };
            events.push((deleted_at, e));
        }
    }
    events.sort_by_key(|(when, _)| *when);
    events.into_iter().map(|(_, e)| e).collect()
}

/// A file or SQLite store: a look every `--interval`, printing what changed.
async fn polled(
    g: &Global,
    a: &WatchArgs,
    url: &str,
    key: &Key,
    what: &str,
) -> Result<ExitCode, CliError> {
    let session = a.session.as_deref();
    let (mut before, _) = look(url, key, session, &BTreeMap::new()).await?;
    eprintln!(
        "watching {} ({what}, a look every {} ms); Ctrl-C to stop",
        store::redact(url),
        a.interval
    );
    let mut tick = tokio::time::interval(Duration::from_millis(a.interval));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // One listener for the whole watch, so a Ctrl-C during a look is not lost.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
            _ = tick.tick() => {}
        }
        // A look cut short by Ctrl-C wrote nothing: the manager it opened only read.
        let (now, new_checkpoints) = tokio::select! {
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
            looked = look(url, key, session, &before) => looked?,
        };
        for e in changes(&before, &now, new_checkpoints, output::now_ms()) {
            print_event(g, &e);
        }
        before = now;
    }
}
