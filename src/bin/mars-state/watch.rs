//! `mars-state watch`: live change events, one line each (or one JSON object per line with
//! `--json`), until interrupted. Events of other processes arrive on a shared store
//! (PostgreSQL, Redis), whose backends publish them; a file or SQLite store has one writer
//! at a time, so there the tool sees only what happens while it holds the store.

use std::process::ExitCode;

use clap::Args;
use mars_state::{EventKind, StateEvent, WatchError};
use serde_json::json;

use crate::Global;
use crate::log::reason_name;
use crate::output::{self, CliError};
use crate::store::Opened;

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
    /// Only this session's events (default: every session).
    session: Option<String>,
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
    let opened = Opened::open(Some(a.store.as_str()), &g.keys).await?;
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
    eprintln!(
        "watching {} ({}); Ctrl-C to stop",
        crate::store::redact(&opened.url),
        a.session.as_deref().map_or_else(|| "every session".to_owned(), |s| format!("session {s}"))
    );
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
            format!("store {}: the watch ended: {e}", crate::store::redact(&url)),
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
