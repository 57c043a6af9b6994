//! `mars-state verify STORE`: every record of a store read and checked (checksums, gzip
//! integrity, decryption with the given key, decoding) through the library's
//! `StateManager::verify_store`; each damaged record printed with what it is and what is
//! wrong; exit code 1 if anything is damaged. It never writes, and works on a file or
//! SQLite store another process holds (opened read-only, without its lock: `Opened::read_only`).

use std::process::ExitCode;

use clap::Args;
use mars_state::VerifyReport;
use serde_json::json;

use crate::Global;
use crate::output::{self, CliError, Exit};
use crate::store::{self, Opened};

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
}

pub(crate) async fn run(g: &Global, a: VerifyArgs) -> Result<ExitCode, CliError> {
    let opened = Opened::read_only(Some(a.store.as_str()), &g.keys).await?;
    let bar = output::progress_bar("verifying {wide_bar} {pos}/{len} ({eta})");
    let result = {
        let bar = bar.clone();
        opened
            .manager
            .verify_store(move |done, total| {
                if bar.length() != Some(total) {
                    bar.set_length(total);
                }
                bar.set_position(done);
            })
            .await
    };
    bar.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let err = opened.error(e, None);
            opened.close().await?;
            return Err(err);
        }
    };
    let url = opened.url.clone();
    opened.close().await?;
    print(g.json, &url, &report)?;
    Ok(if report.is_healthy() { ExitCode::SUCCESS } else { ExitCode::from(Exit::Damage.code()) })
}

fn print(json: bool, url: &str, report: &VerifyReport) -> Result<(), CliError> {
    if json {
        return output::print_json(&json!({
            "store": store::redact(url),
            "healthy": report.is_healthy(),
            "records_checked": report.records_checked,
            "bytes_checked": report.bytes_checked,
            "quarantine_copies": report.quarantine_copies,
            "damaged": report.damaged,
        }));
    }
    let mut text = String::new();
    if !report.damaged.is_empty() {
        let rows = report
            .damaged
            .iter()
            .map(|d| vec![d.key.clone(), d.what.to_string(), d.problem.clone()])
            .collect();
        text.push_str(&output::table(&["DAMAGED KEY", "WHAT", "PROBLEM"], rows, &[]));
        text.push_str("\n\n");
    }
    text.push_str(&format!(
        "{}: {} records checked ({}), {} damaged",
        store::redact(url),
        report.records_checked,
        output::size(report.bytes_checked),
        report.damaged.len()
    ));
    if report.quarantine_copies > 0 {
        text.push_str(&format!(
            "; {} quarantine copies of records damaged earlier",
            report.quarantine_copies
        ));
    }
    output::print_lines(&text);
    Ok(())
}
