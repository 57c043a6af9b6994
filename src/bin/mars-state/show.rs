//! `mars-state show`: a session's state, or a checkpoint's, as pretty JSON (or the exact
//! bytes with `--raw`). Also the lookup of a checkpoint by (part of) its id or by step,
//! which `diff` shares.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use mars_state::{CheckpointId, CheckpointInfo, StateManager};
use serde_json::{Value, json};

use crate::Global;
use crate::output::{self, CliError, Exit};
use crate::store::Opened;

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
    /// The session.
    session: String,
    /// A checkpoint instead of the current state: its id, a unique part of it, or `step:N`.
    #[arg(long, value_name = "CHECKPOINT", conflicts_with = "step")]
    at: Option<String>,
    /// The newest checkpoint taken at this step.
    #[arg(long, value_name = "N")]
    step: Option<u64>,
    /// The state's JSON bytes exactly as saved (a checkpoint's: compact), no newline added.
    #[arg(long, conflicts_with = "json")]
    raw: bool,
}

/// Finds the session's checkpoint named by `spec`: its full id, a unique part of one (the
/// random suffix, say), or `step:N` (the newest checkpoint taken at step N). Not found or ambiguous: exit code 1 or 2, naming the candidates.
pub(crate) async fn find_checkpoint(
    opened: &Opened,
    session: &str,
    spec: &str,
) -> Result<CheckpointInfo, CliError> {
    let list = checkpoints(opened, session).await?;
    if let Some(n) = spec.strip_prefix("step:") {
        let step: u64 = n.parse().map_err(|_| {
            CliError::new(Exit::Usage, format!("{spec:?}: `step:` takes a step number"))
        })?;
        return list
            .into_iter()
            .rev()
            .find(|c| c.step == Some(step))
            .ok_or_else(|| not_found(opened, session, spec));
    }
    if let Ok(id) = CheckpointId::parse(spec) {
        return list
            .into_iter()
            .find(|c| c.id == id)
            .ok_or_else(|| not_found(opened, session, spec));
    }
    if spec.len() < 4 {
        return Err(CliError::new(
            Exit::Usage,
            format!(
                "checkpoint {spec:?} is too short to name one; give at least 4 characters of its id"
            ),
        ));
    }
    let mut hits: Vec<CheckpointInfo> =
        list.into_iter().filter(|c| c.id.as_str().contains(spec)).collect();
    match hits.len() {
        0 => Err(not_found(opened, session, spec)),
        1 => Ok(hits.remove(0)),
        n => Err(CliError::new(
            Exit::Usage,
            format!("{n} checkpoints of session {session} match {spec:?}"),
        )
        .hint(format!(
            "give more of the id; candidates: {}",
            hits.iter().take(4).map(|c| c.id.to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The session's checkpoints, oldest first.
pub(crate) async fn checkpoints(
    opened: &Opened,
    session: &str,
) -> Result<Vec<CheckpointInfo>, CliError> {
    opened.manager.list_checkpoints(session).await.map_err(|e| opened.error(e, Some(session)))
}

fn not_found(opened: &Opened, session: &str, spec: &str) -> CliError {
    CliError::new(
        Exit::Damage,
        format!(
            "store {}, session {session}: no checkpoint {spec:?}",
            crate::store::redact(&opened.url)
        ),
    )
    .hint(format!("`mars-state log STORE {session}` lists its checkpoints"))
}

/// The session's state now; not there: exit code 1.
pub(crate) async fn current_state(opened: &Opened, session: &str) -> Result<Value, CliError> {
    match opened.manager.load_session(session).await.map_err(|e| opened.error(e, Some(session)))? {
        Some(v) => Ok(v),
        None if !checkpoints(opened, session).await?.is_empty() => Err(CliError::new(
            Exit::Damage,
            format!(
                "store {}, session {session}: no current state (only checkpoints)",
                crate::store::redact(&opened.url)
            ),
        )
        .hint(format!("name a checkpoint (`mars-state log STORE {session}` lists them)"))),
        None => Err(unknown_session(opened, session)),
    }
}

/// A session with neither state nor checkpoints (exit code 1).
pub(crate) fn unknown_session(opened: &Opened, session: &str) -> CliError {
    CliError::new(
        Exit::Damage,
        format!("store {}: no session {session}", crate::store::redact(&opened.url)),
    )
    .hint("`mars-state ls STORE` lists the sessions")
}

/// The state of checkpoint `info`.
pub(crate) async fn checkpoint_state(
    manager: &StateManager,
    opened: &Opened,
    info: &CheckpointInfo,
) -> Result<Value, CliError> {
    let session = info.session_id.as_str();
    match manager.restore_checkpoint(&info.id).await.map_err(|e| opened.error(e, Some(session)))? {
        Some(cp) => Ok(cp.data),
        None => Err(not_found(opened, session, info.id.as_str())),
    }
}

pub(crate) async fn run(g: &Global, a: ShowArgs) -> Result<ExitCode, CliError> {
    let opened = Opened::read_only(Some(a.store.as_str()), &g.keys).await?;
    if a.raw && a.at.is_none() && a.step.is_none() {
        // The state's bytes exactly as the application saved them.
        let bytes = opened.manager.load_session_bytes(&a.session).await;
        let bytes = bytes.map_err(|e| opened.error(e, Some(&a.session)));
        let missing = matches!(bytes, Ok(None)).then(|| unknown_session(&opened, &a.session));
        opened.close().await?;
        if let Some(e) = missing {
            return Err(e);
        }
        if let Some(b) = bytes? {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(b.as_bytes()).and_then(|()| out.flush());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let result = body(&a, &opened).await;
    opened.close().await?;
    let (checkpoint, step, state) = result?;
    if a.raw {
        let bytes = serde_json::to_vec(&state)
            .map_err(|e| CliError::new(Exit::Failure, format!("cannot print the state: {e}")))?;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&bytes).and_then(|()| out.flush());
    } else if g.json {
        output::print_json(&json!({
            "session_id": a.session,
            "checkpoint": checkpoint,
            "step": step,
            "state": state,
        }))?;
    } else {
        output::print_json(&state)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn body(
    a: &ShowArgs,
    opened: &Opened,
) -> Result<(Option<String>, Option<u64>, Value), CliError> {
    let session = a.session.as_str();
    if let Some(spec) = &a.at {
        let info = find_checkpoint(opened, session, spec).await?;
        let state = checkpoint_state(&opened.manager, opened, &info).await?;
        return Ok((Some(info.id.to_string()), info.step, state));
    }
    if let Some(step) = a.step {
        let list = checkpoints(opened, session).await?;
        let Some(info) = list.iter().rev().find(|c| c.step == Some(step)) else {
            let mut steps: Vec<u64> = list.iter().filter_map(|c| c.step).collect();
            steps.dedup();
            let near = steps.iter().copied().filter(|s| *s < step).max();
            let after = steps.iter().copied().filter(|s| *s > step).min();
            let mut hint = String::from("a step's state is kept only where a checkpoint was taken");
            match (near, after) {
                (None, None) => hint.push_str("; this session has no checkpoint with a step"),
                (b, a) => {
                    let around: Vec<String> =
                        b.into_iter().chain(a).map(|s| s.to_string()).collect();
                    hint.push_str(&format!("; nearest steps with one: {}", around.join(", ")));
                }
            }
            return Err(CliError::new(
                Exit::Damage,
                format!(
                    "store {}, session {session}: no checkpoint at step {step}",
                    crate::store::redact(&opened.url)
                ),
            )
            .hint(hint));
        };
        let state = checkpoint_state(&opened.manager, opened, info).await?;
        return Ok((Some(info.id.to_string()), info.step, state));
    }
    let state = current_state(opened, session).await?;
    let listed = opened.manager.list_sessions().await.map_err(|e| opened.error(e, None))?;
    let step = listed.iter().find(|s| s.session_id.as_str() == session).and_then(|s| s.step);
    Ok((None, step, state))
}
