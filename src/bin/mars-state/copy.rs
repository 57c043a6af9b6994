//! `mars-state copy --from URL --to URL`: a whole store moved between any two backends
//! through the library's `copy_store` (byte for byte, every key read back and compared;
//! resumable: run again after an interruption, it skips what is there and finishes without
//! duplicates). A gzipped or encrypted store stays so, and needs no key to be copied.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use crate::Global;
use crate::output::{self, CliError, Exit};
use crate::store;

#[derive(Debug, Args)]
pub(crate) struct CopyArgs {
    /// The store to copy (default: MARS_STATE_URL). It must not be in use.
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    /// Where to copy it: an empty store, or one an interrupted copy left.
    #[arg(long, value_name = "URL")]
    to: String,
}

pub(crate) async fn run(g: &Global, a: CopyArgs) -> Result<ExitCode, CliError> {
    let from_url = store::resolve(a.from.as_deref())?;
    if from_url == a.to {
        return Err(CliError::new(Exit::Usage, "--from and --to name the same store"));
    }
    let from = store::open_existing(&from_url, store::Access::Read).await?;
    let to =
        mars_state::backend::open(&a.to).await.map_err(|e| CliError::from_state(e, &a.to, None))?;
    let bar = output::progress_bar("copying {wide_bar} {pos}/{len} keys ({eta})");
    let result = {
        let bar = bar.clone();
        mars_state::copy_store_with_progress(from.as_ref(), to.as_ref(), move |done, total| {
            if bar.length() != Some(total) {
                bar.set_length(total);
            }
            bar.set_position(done);
        })
        .await
    };
    bar.finish_and_clear();
    let report = result.map_err(|e| {
        let err = CliError::from_state(e, &from_url, None);
        err.hint(format!(
            "nothing in {} was changed; run the same command again to finish the copy into {}",
            store::redact(&from_url),
            store::redact(&a.to)
        ))
    })?;
    if g.json {
        output::print_json(&json!({
            "from": store::redact(&from_url),
            "to": store::redact(&a.to),
            "copied": report.copied,
            "already_there": report.already_there,
            "removed": report.removed,
            "bytes_copied": report.bytes_copied,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows = [
        ("keys copied and verified", report.copied.to_string()),
        ("already there (earlier run)", report.already_there.to_string()),
        ("stale keys removed", report.removed.to_string()),
        ("bytes copied", output::size(report.bytes_copied)),
    ];
    output::print_lines(&format!(
        "copied {} -> {}\n{}",
        store::redact(&from_url),
        store::redact(&a.to),
        output::key_values(&rows)
    ));
    Ok(ExitCode::SUCCESS)
}
