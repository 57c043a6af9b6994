//! `mars-state export STORE --out FILE.jsonl[.gz] [--session S]...` and `mars-state import
//! STORE FILE`: a portable dump of a store (decoded states as JSON Lines, gzipped when the
//! file name ends in `.gz`) and its restore, through the library's
//! `StateManager::export_store` and `import_store`. Export reads only (a file or SQLite
//! store another process holds is opened read-only); import writes through the target
//! store's own write path (its compression and key apply) and is idempotent.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use mars_state::{ExportOptions, StateManager};
use serde_json::json;

use crate::Global;
use crate::output::{self, CliError, Exit};
use crate::store::{self, Key};

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
    /// The dump to write (replaced if it exists); gzipped if the name ends in `.gz`.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Dump only this session (repeat for more); default: every session.
    #[arg(long = "session", value_name = "SESSION")]
    sessions: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// The store to import into: a path or a URL; created if there is none.
    #[arg(value_name = "STORE")]
    store: String,
    /// The dump (`.jsonl` or `.jsonl.gz`, recognised by its bytes).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Gzip level (1-9) of the records of a store the import creates (an existing store
    /// keeps its own format).
    #[arg(long, value_name = "LEVEL")]
    compression: Option<u32>,
}

pub(crate) async fn export(g: &Global, a: ExportArgs) -> Result<ExitCode, CliError> {
    let opened = crate::store::Opened::read_only(Some(a.store.as_str()), &g.keys).await?;
    let gzip = a.out.extension().is_some_and(|e| e == "gz");
    let options = a.sessions.iter().fold(ExportOptions::new().gzip(gzip), |o, s| o.session(s));
    let result = write_dump(&opened.manager, &a.out, &options).await;
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let session = a.sessions.first().map(String::as_str);
            let err = match e {
                Failed::State(e) => opened.error(e, session),
                Failed::Cli(e) => e,
            };
            opened.close().await?;
            return Err(err);
        }
    };
    let url = opened.url.clone();
    opened.close().await?;
    if g.json {
        output::print_json(&json!({
            "store": store::redact(&url),
            "out": a.out,
            "gzip": gzip,
            "sessions": report.sessions,
            "session_records": report.session_records,
            "checkpoints": report.checkpoints,
            "access_records": report.access_records,
            "lines": report.lines,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    output::print_lines(&format!(
        "exported {} to {}\n{}",
        store::redact(&url),
        a.out.display(),
        output::key_values(&[
            ("sessions", report.sessions.to_string()),
            ("session records", report.session_records.to_string()),
            ("checkpoints", report.checkpoints.to_string()),
            ("access records", report.access_records.to_string()),
        ])
    ));
    Ok(ExitCode::SUCCESS)
}

enum Failed {
    State(mars_state::StateError),
    Cli(CliError),
}

/// Writes the dump to a staged file beside `out` (`create_new`, owner-only), fsyncs it,
/// renames it over `out` and fsyncs the directory: `out` is the old file or the whole new
/// dump, never a part of one. On any error the staged file is removed.
async fn write_dump(
    manager: &StateManager,
    out: &Path,
    options: &ExportOptions,
) -> Result<mars_state::ExportReport, Failed> {
    let io = |what: &str, path: &Path, e: std::io::Error| {
        Failed::Cli(CliError::new(Exit::Failure, format!("{what} {}: {e}", path.display())))
    };
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staged = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staged)
        .map_err(|e| io("cannot create", &staged, e))?;
    let result = async {
        let mut writer = BufWriter::new(file);
        let report = manager.export_store(&mut writer, options).await.map_err(Failed::State)?;
        let file = writer.into_inner().map_err(|e| io("cannot write", &staged, e.into_error()))?;
        // The dump must be on disk before its name replaces the old file.
        file.sync_all().map_err(|e| io("cannot sync", &staged, e))?;
        drop(file);
        // Atomic: a reader (or a crash) sees the old file or the whole new dump.
        std::fs::rename(&staged, out).map_err(|e| io("cannot rename into place", out, e))?;
        // The rename itself must survive a power loss.
        File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io("cannot sync", &dir, e))?;
        Ok(report)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    result
}

pub(crate) async fn import(g: &Global, a: ImportArgs) -> Result<ExitCode, CliError> {
    let url = store::resolve(Some(a.store.as_str()))?;
    let key = Key::from_args(&g.keys)?;
    // Checked before the store is opened (which would create it): an unreadable dump
    // changes nothing.
    let file = File::open(&a.file).map_err(|e| {
        CliError::new(Exit::Usage, format!("cannot read the dump {}: {e}", a.file.display()))
    })?;
    let backend =
        mars_state::backend::open(&url).await.map_err(|e| CliError::from_state(e, &url, None))?;
    let manager = store::start(backend, key, &url, store::Access::Write, a.compression).await?;
    let result = manager.import_store(BufReader::new(file)).await;
    let closed = manager.shutdown().await;
    let report = result.map_err(|e| {
        if e.kind() == mars_state::ErrorKind::Config {
            // A dump that does not parse, or does not fit this store: checked before
            // anything was written.
            CliError::new(
                Exit::Usage,
                format!("{} into store {}: {e}", a.file.display(), store::redact(&url)),
            )
            .hint("the store was left as it was")
        } else {
            CliError::from_state(e, &url, None)
                .hint("run the same import again to finish it (it is idempotent)")
        }
    })?;
    closed.map_err(|e| CliError::from_state(e, &url, None))?;
    if g.json {
        output::print_json(&json!({
            "store": store::redact(&url),
            "file": a.file,
            "session_records": report.session_records,
            "checkpoints": report.checkpoints,
            "access_records": report.access_records,
            "lines": report.lines,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    output::print_lines(&format!(
        "imported {} into {}\n{}",
        a.file.display(),
        store::redact(&url),
        output::key_values(&[
            ("session records", report.session_records.to_string()),
            ("checkpoints", report.checkpoints.to_string()),
            ("access records", report.access_records.to_string()),
        ])
    ));
    Ok(ExitCode::SUCCESS)
}
