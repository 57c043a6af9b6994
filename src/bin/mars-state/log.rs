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
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
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
    let opened = Opened::read_only(Some(a.store.as_str()), &g.keys).await?;
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
    // A lane whose line ended at a root (a checkpoint without parent) on the row above: not
    // reused at once, so the next line does not look like its continuation.
    let mut just_ended: Option<usize> = None;
    let mut prev_branch: Option<&str> = None;
    for c in list.iter().rev() {
        let waiting: Vec<usize> =
            (0..lanes.len()).filter(|&i| lanes[i].as_ref() == Some(&c.id)).collect();
        let col = match waiting.first() {
            Some(&i) => i,
            None => {
                // A new line starts right of every line still open, so it is never drawn
                // as the continuation of one.
                let right_of = lanes.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
                let free = (right_of..lanes.len()).find(|&i| Some(i) != just_ended);
                free.unwrap_or_else(|| {
                    lanes.push(None);
                    lanes.len() - 1
                })
            }
        };
        // Lanes that also wait for this checkpoint end here: their lines forked from it.
        // They join its lane on a row above it, as in `git log --graph`.
        let joining = &waiting[waiting.len().min(1)..];
        if !joining.is_empty() {
            let mut row = vec![' '; 2 * lanes.len()];
            for (i, lane) in lanes.iter().enumerate() {
                if joining.contains(&i) {
                    // One column left of its lane: a line coming down to the fork (i > col).
                    row[2 * i - 1] = '/';
                } else if lane.is_some() {
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
        // The checkpoint's own row.
        let mut g = String::new();
        let last = lanes.iter().rposition(Option::is_some).map_or(col, |i| i.max(col));
        for (i, lane) in lanes.iter().enumerate().take(last + 1) {
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
        lanes[col] = c.parent.clone();
        just_ended = c.parent.is_none().then_some(col);
        while lanes.len() > just_ended.map_or(0, |i| i + 1)
            && lanes.last().is_some_and(Option::is_none)
        {
            lanes.pop();
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use mars_state::{BranchId, SessionId};

    fn cp(n: u64, branch: &str, parent: Option<u64>) -> CheckpointInfo {
        let id = |n: u64| CheckpointId::parse(&format!("{:016x}-0000000{n}", n << 16)).unwrap();
        CheckpointInfo {
            id: id(n),
            session_id: SessionId::new("s").unwrap(),
            branch_id: BranchId::new(branch).unwrap(),
            timestamp: 0,
            size_bytes: 1,
            reason: CheckpointReason::Manual,
            step: Some(n),
            parent: parent.map(id),
        }
    }

    /// Cuts each line after the graph and the id's last digit, to compare shapes.
    fn shapes(lines: Vec<String>) -> Vec<String> {
        lines
            .iter()
            .map(|l| l.split("  step").next().unwrap_or(l).replace("0000000000", ""))
            .collect()
    }

    #[test]
    fn three_lines_forking_from_one_checkpoint_join_it() {
        let list =
            [cp(1, "main", None), cp(2, "main", Some(1)), cp(3, "x", Some(1)), cp(4, "y", Some(1))];
        assert_eq!(
            shapes(graph(&list)),
            [
                "* 040000-00000004",
                "| * 030000-00000003",
                "| | * 020000-00000002",
                "|/_/",
                "* 010000-00000001",
            ]
        );
    }

    #[test]
    fn a_line_of_its_own_is_not_drawn_under_another() {
        let list = [cp(1, "main", None), cp(2, "main", Some(1)), cp(3, "other", None)];
        assert_eq!(
            shapes(graph(&list)),
            ["* 030000-00000003", "  * 020000-00000002", "  * 010000-00000001"]
        );
    }
}
