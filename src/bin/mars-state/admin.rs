//! `mars-state stats`, `vacuum` and `janitor`: the manager's reports as tables. `vacuum` and
//! `janitor` write (they remove staged files, finish deletes, apply retention, rewrite the
//! index), so on a store another process holds they stop and name that process.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Args;
use mars_state::VacuumReport;
use serde_json::json;

use crate::Global;
use crate::ls::status_name;
use crate::output::{self, CliError};
use crate::store::Opened;

#[derive(Debug, Args)]
pub(crate) struct StoreOnly {
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
}

pub(crate) async fn stats(g: &Global, a: StoreOnly) -> Result<ExitCode, CliError> {
    let opened = Opened::read_only(Some(a.store.as_str()), &g.keys).await?;
    let result = async {
        let stats = opened.manager.get_storage_stats().await.map_err(|e| opened.error(e, None))?;
        let sessions = opened.manager.list_sessions().await.map_err(|e| opened.error(e, None))?;
        Ok::<_, CliError>((stats, sessions))
    }
    .await;
    opened.close().await?;
    let (stats, sessions) = result?;
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for s in &sessions {
        *by_status.entry(status_name(s.status, false)).or_default() += 1;
    }
    let interrupted = sessions.iter().filter(|s| s.interrupted).count();
    if g.json {
        output::print_json(&json!({
            "session_count": stats.session_count,
            "checkpoint_count": stats.checkpoint_count,
            "total_bytes": stats.total_bytes,
            "sessions_by_status": by_status,
            "interrupted": interrupted,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        ("sessions", stats.session_count.to_string()),
        ("checkpoints", stats.checkpoint_count.to_string()),
        ("stored", format!("{} ({} bytes)", output::size(stats.total_bytes), stats.total_bytes)),
    ];
    let named: Vec<(String, String)> =
        by_status.iter().map(|(k, v)| (format!("  {k}"), v.to_string())).collect();
    rows.extend(named.iter().map(|(k, v)| (k.as_str(), v.clone())));
    if interrupted > 0 {
        rows.push(("  cut off (to recover)", interrupted.to_string()));
    }
    output::print_lines(&output::key_values(&rows));
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn vacuum(g: &Global, a: StoreOnly) -> Result<ExitCode, CliError> {
    let opened = Opened::open(Some(a.store.as_str()), &g.keys).await?;
    let report = opened.manager.vacuum_storage().await.map_err(|e| opened.error(e, None));
    opened.close().await?;
    print_report(g, "vacuum", &report?)
}

pub(crate) async fn janitor(g: &Global, a: StoreOnly) -> Result<ExitCode, CliError> {
    let opened = Opened::open(Some(a.store.as_str()), &g.keys).await?;
    let report = opened.manager.run_janitor_now().await.map_err(|e| opened.error(e, None));
    opened.close().await?;
    print_report(g, "janitor", &report?)
}

/// Prints a vacuum or janitor report; damaged records found make the exit code 1.
fn print_report(g: &Global, what: &str, r: &VacuumReport) -> Result<ExitCode, CliError> {
    let code = if r.corrupt_records.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) };
    if g.json {
        output::print_json(r)?;
        return Ok(code);
    }
    let rows = [
        (
            "staged files removed",
            format!("{} ({})", r.temp_files_removed, output::size(r.temp_bytes_freed)),
        ),
        ("interrupted deletes finished", r.orphans_removed.to_string()),
        ("checkpoints removed (retention)", r.checkpoints_removed.to_string()),
        ("sessions removed (retention)", r.sessions_removed.to_string()),
        ("bytes freed (retention)", output::size(r.bytes_freed)),
        ("index entries corrected", r.index_repairs.to_string()),
        ("index entries", r.index_entries.to_string()),
        ("damaged records", r.corrupt_records.len().to_string()),
    ];
    let mut text = format!("{what}:\n{}", output::key_values(&rows));
    for key in &r.corrupt_records {
        text.push_str(&format!("\n  damaged: {}", output::truncate(key, output::WIDTH - 11)));
    }
    if !r.corrupt_records.is_empty() {
        text.push_str("\ndamaged records are kept and copied to the store's quarantine");
    }
    output::print_lines(&text);
    Ok(code)
}
