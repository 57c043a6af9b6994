//! `mars-state ls`: the sessions of a store, from its index (no state is read).

use std::process::ExitCode;

use clap::Args;
use mars_state::SessionStatus;

use crate::Global;
use crate::output::{self, CliError, Exit};
use crate::store::Opened;

#[derive(Debug, Args)]
pub(crate) struct LsArgs {
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
    /// Only sessions with this status: running, paused, completed or failed.
    #[arg(long, value_name = "S")]
    status: Option<String>,
}

pub(crate) fn parse_status(s: &str) -> Result<SessionStatus, CliError> {
    match s.to_ascii_lowercase().as_str() {
        "running" => Ok(SessionStatus::Running),
        "paused" => Ok(SessionStatus::Paused),
        "completed" => Ok(SessionStatus::Completed),
        "failed" => Ok(SessionStatus::Failed),
        _ => Err(CliError::new(Exit::Usage, format!("unknown status {s:?}"))
            .hint("use one of running, paused, completed, failed")),
    }
}

/// The status as `ls` prints it; an interrupted run is marked.
pub(crate) fn status_name(status: SessionStatus, interrupted: bool) -> String {
    let name = match status {
        SessionStatus::Running => "running",
        SessionStatus::Paused => "paused",
        SessionStatus::Completed => "completed",
        SessionStatus::Failed => "failed",
    };
    if interrupted { format!("{name}*") } else { name.to_owned() }
}

pub(crate) async fn run(g: &Global, a: LsArgs) -> Result<ExitCode, CliError> {
    let status = a.status.as_deref().map(parse_status).transpose()?;
    let opened = Opened::read_only(Some(a.store.as_str()), &g.keys).await?;
    let listed = opened.manager.list_sessions().await.map_err(|e| opened.error(e, None));
    let url = opened.url.clone();
    opened.close().await?;
    let mut sessions = listed?;
    if let Some(s) = status {
        sessions.retain(|i| i.status == s);
    }
    if g.json {
        output::print_json(&sessions)?;
        return Ok(ExitCode::SUCCESS);
    }
    if sessions.is_empty() {
        let what = a.status.map_or_else(String::new, |s| format!(" with status {s}"));
        output::print_lines(&format!("no sessions{what} in {}", crate::store::redact(&url)));
        return Ok(ExitCode::SUCCESS);
    }
    let shared = sessions.iter().any(|s| s.owner.is_some());
    let interrupted = sessions.iter().any(|s| s.interrupted);
    let mut header = vec!["SESSION", "STATUS", "STEP", "UPDATED (UTC)", "SIZE", "CKPTS"];
    if shared {
        header.push("OWNER");
    }
    let rows = sessions
        .iter()
        .map(|s| {
            let mut row = vec![
                s.session_id.to_string(),
                status_name(s.status, s.interrupted),
                s.step.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                output::time_short(s.updated_at),
                output::size(s.size_bytes),
                s.checkpoint_count.to_string(),
            ];
            if shared {
                row.push(s.owner.clone().unwrap_or_else(|| "-".to_owned()));
            }
            row
        })
        .collect();
    output::print_lines(&output::table(&header, rows, &[2, 4, 5]));
    if interrupted {
        output::print_lines("* run cut off by a process that died; the application recovers it");
    }
    Ok(ExitCode::SUCCESS)
}
