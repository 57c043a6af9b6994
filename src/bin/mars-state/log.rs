//! `mars-state log`: a session's checkpoint timeline drawn like `git log --graph`: newest
//! first, one lane per branch line, a fork drawn where a lane joins its parent's.

use std::process::ExitCode;

use clap::Args;
use mars_state::{CheckpointId, CheckpointInfo, CheckpointReason};

use crate::Global;
use crate::output::{self, CliError};
use crate::store::Opened;

#[derive(Debug, Args)]
pub(crate) struct LogArgs {
    /// The store: a path or a URL (`-`: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: Option<String>,
    /// The session.
    session: String,
}

pub(crate) fn reason_name(r: CheckpointReason) -> &'static str {
    match r {
        CheckpointReason::Manual => "manual",
        CheckpointReason::Steps => "steps",
        CheckpointReason::Time => "time",
        CheckpointReason::Pause => "pause",
        CheckpointReason::BeforeRisky => "before-risky",
        CheckpointReason::Flush => "flush",
    }
}

pub(crate) async fn run(g: &Global, a: LogArgs) -> Result<ExitCode, CliError> {
    let opened = Opened::open(a.store.as_deref(), &g.keys).await?;
    let listed = crate::show::checkpoints(&opened, &a.session).await;
    let known = match &listed {
        Ok(l) if l.is_empty() => {
            let state = opened.manager.load_session(&a.session).await;
            matches!(state, Ok(Some(_)))
        }
        _ => true,
    };
    let missing = (!known).then(|| crate::show::unknown_session(&opened, &a.session));
    opened.close().await?;
    if let Some(e) = missing {
        return Err(e);
    }
    let list = listed?;
    if g.json {
        output::print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        output::print_lines(&format!("session {} has no checkpoints", a.session));
        return Ok(ExitCode::SUCCESS);
    }
    output::print_lines(&graph(&list).join("\n"));
    Ok(ExitCode::SUCCESS)
}

/// The timeline of `list` (oldest first, as listed), newest first, as lines of at most 80
/// columns: the lanes, then id, step, reason, branch and time.
pub(crate) fn graph(list: &[CheckpointInfo]) -> Vec<String> {
    let mut lines = Vec::new();
    // Each lane waits for the checkpoint it will reach next going back in time (the parent
    // of the one it last drew); `None` is a free lane.
    let mut lanes: Vec<Option<CheckpointId>> = Vec::new();
    let mut prev_branch: Option<&str> = None;
    for c in list.iter().rev() {
        let waiting: Vec<usize> =
            (0..lanes.len()).filter(|&i| lanes[i].as_ref() == Some(&c.id)).collect();
        let col = match waiting.first() {
            Some(&i) => i,
            None => match lanes.iter().position(Option::is_none) {
                Some(free) => free,
                None => {
                    lanes.push(None);
                    lanes.len() - 1
                }
            },
        };
        // The checkpoint's own row.
        let mut g = String::new();
        for (i, lane) in lanes.iter().enumerate() {
            g.push(if i == col {
                '*'
            } else if lane.is_some() {
                '|'
            } else {
                ' '
            });
            g.push(' ');
        }
        let label = if prev_branch == Some(c.branch_id.as_str()) {
            String::new()
        } else {
            format!("  ({})", c.branch_id)
        };
        prev_branch = Some(c.branch_id.as_str());
        let step = c.step.map_or_else(|| "step -".to_owned(), |s| format!("step {s}"));
        let text =
            format!("{}  {step}  {}  {}", c.id, reason_name(c.reason), output::time(c.timestamp));
        let line = format!("{g}{text}{label}");
        lines.push(output::truncate(line.trim_end(), output::WIDTH));
        // Lanes that waited for this checkpoint too end here: their branches forked from it.
        let joining = &waiting[waiting.len().min(1)..];
        if !joining.is_empty() {
            let mut row = vec![' '; 2 * lanes.len()];
            for (i, lane) in lanes.iter().enumerate() {
                if joining.contains(&i) {
                    // One column left of its lane: a line coming down to the fork (i > col).
                    row[2 * i - 1] = '/';
                } else if lane.is_some() || i == col {
                    row[2 * i] = '|';
                }
            }
            // A lane joining from further right passes under the lanes between.
            for &j in joining.iter().filter(|&&j| j > col + 1) {
                for ch in &mut row[2 * col + 1..2 * j - 1] {
                    if *ch == ' ' {
                        *ch = '_';
                    }
                }
            }
            let row: String = row.into_iter().collect();
            lines.push(row.trim_end().to_owned());
            for &j in joining {
                lanes[j] = None;
            }
        }
        lanes[col] = c.parent.clone();
        while lanes.last().is_some_and(Option::is_none) {
            lanes.pop();
        }
    }
    lines
}
