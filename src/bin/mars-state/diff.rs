//! `mars-state diff`: what changed between two states of a session (checkpoints, or a
//! checkpoint and the current state), as one line per JSON path (RFC 6901 pointers).

use std::process::ExitCode;

use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::Global;
use crate::output::{self, CliError};
use crate::show;
use crate::store::Opened;

#[derive(Debug, Args)]
pub(crate) struct DiffArgs {
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
    /// The session.
    session: String,
    /// The older state: a checkpoint id (or a unique part of one), `step:N`, or `current`.
    a: String,
    /// The newer state: a checkpoint id (or a unique part of one), `step:N`, or `current`.
    b: String,
}

/// One difference between two JSON documents.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Change {
    /// Only in the newer document.
    Added { path: String, value: Value },
    /// Only in the older document.
    Removed { path: String, value: Value },
    /// In both, with different values.
    Changed { path: String, from: Value, to: Value },
}

/// The differences from `a` to `b`, in document order: objects key by key (sorted), arrays
/// index by index (elements past the shorter one added or removed), anything else compared
/// whole.
pub(crate) fn diff(a: &Value, b: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    walk(&mut String::new(), a, b, &mut out);
    out
}

fn walk(path: &mut String, a: &Value, b: &Value, out: &mut Vec<Change>) {
    let len = path.len();
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                path.push('/');
                path.push_str(&k.replace('~', "~0").replace('/', "~1"));
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => walk(path, u, v, out),
                    (Some(u), None) => {
                        out.push(Change::Removed { path: path.clone(), value: u.clone() })
                    }
                    (None, Some(v)) => {
                        out.push(Change::Added { path: path.clone(), value: v.clone() })
                    }
                    (None, None) => {}
                }
                path.truncate(len);
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                path.push_str(&format!("/{i}"));
                match (x.get(i), y.get(i)) {
                    (Some(u), Some(v)) => walk(path, u, v, out),
                    (Some(u), None) => {
                        out.push(Change::Removed { path: path.clone(), value: u.clone() })
                    }
                    (None, Some(v)) => {
                        out.push(Change::Added { path: path.clone(), value: v.clone() })
                    }
                    (None, None) => {}
                }
                path.truncate(len);
            }
        }
        _ if a != b => out.push(Change::Changed {
            path: if path.is_empty() { "/".to_owned() } else { path.clone() },
            from: a.clone(),
            to: b.clone(),
        }),
        _ => {}
    }
}

/// A change as one line of at most 80 columns (long values cut, marked `…`).
pub(crate) fn line(c: &Change) -> String {
    let compact = |v: &Value| v.to_string();
    let text = match c {
        Change::Added { path, value } => format!("+ {path}: {}", compact(value)),
        Change::Removed { path, value } => format!("- {path}: {}", compact(value)),
        Change::Changed { path, from, to } => {
            let room = output::WIDTH.saturating_sub(path.chars().count() + 8) / 2;
            format!(
                "~ {path}: {} -> {}",
                output::truncate(&compact(from), room.max(8)),
                output::truncate(&compact(to), room.max(8))
            )
        }
    };
    output::truncate(&text, output::WIDTH)
}

async fn state(opened: &Opened, session: &str, spec: &str) -> Result<(String, Value), CliError> {
    if spec == "current" {
        return Ok(("current".to_owned(), show::current_state(opened, session).await?));
    }
    let info = show::find_checkpoint(opened, session, spec).await?;
    let value = show::checkpoint_state(&opened.manager, opened, &info).await?;
    Ok((info.id.to_string(), value))
}

pub(crate) async fn run(g: &Global, a: DiffArgs) -> Result<ExitCode, CliError> {
    let opened = Opened::read_only(Some(a.store.as_str()), &g.keys).await?;
    let result = async {
        let x = state(&opened, &a.session, &a.a).await?;
        let y = state(&opened, &a.session, &a.b).await?;
        Ok::<_, CliError>((x, y))
    }
    .await;
    opened.close().await?;
    let ((from, x), (to, y)) = result?;
    let changes = diff(&x, &y);
    if g.json {
        output::print_json(&serde_json::json!({
            "session_id": a.session,
            "from": from,
            "to": to,
            "changes": changes,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut lines = vec![format!("--- {from}"), format!("+++ {to}")];
    if changes.is_empty() {
        lines.push("(no changes)".to_owned());
    }
    lines.extend(changes.iter().map(line));
    output::print_lines(&lines.join("\n"));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_name_every_change() {
        let a = json!({"a": {"b": [1, 2, 3]}, "gone": true, "same": "x", "k/~": 1});
        let b = json!({"a": {"b": [2, 2]}, "new": null, "same": "x", "k/~": 2});
        let lines: Vec<String> = diff(&a, &b).iter().map(line).collect();
        assert_eq!(
            lines,
            [
                "~ /a/b/0: 1 -> 2",
                "- /a/b/2: 3",
                "- /gone: true",
                "~ /k~1~0: 1 -> 2",
                "+ /new: null",
            ]
        );
    }

    #[test]
    fn equal_documents_have_no_changes_and_scalars_compare_whole() {
        assert!(diff(&json!({"a": [1]}), &json!({"a": [1]})).is_empty());
        assert_eq!(
            diff(&json!(1), &json!("1")).iter().map(line).collect::<Vec<_>>(),
            ["~ /: 1 -> \"1\""]
        );
        assert_eq!(
            diff(&json!({"a": 1}), &json!({"a": {"b": 1}})).iter().map(line).collect::<Vec<_>>(),
            ["~ /a: 1 -> {\"b\":1}"]
        );
    }
}
