//! `mars-state rotate-key`: re-encrypts every record of a store under a new key and retires
//! the old one, through `StateManager::rotate_key` (each record rewritten atomically; reads
//! with the old key keep working until the end). Interrupted, the same command run again
//! finishes the job: the old key still opens the store until the rotation completes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use crate::Global;
use crate::output::{self, CliError, Exit};
use crate::store::{self, Key};

#[derive(Debug, Args)]
pub(crate) struct RotateArgs {
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
    /// File holding the new raw key (64 hex digits or 32 bytes).
    #[arg(long, env = "MARS_STATE_NEW_KEY_FILE", value_name = "PATH")]
    new_key_file: Option<PathBuf>,
    /// File holding the new passphrase.
    #[arg(long, env = "MARS_STATE_NEW_PASSPHRASE_FILE", value_name = "PATH")]
    new_passphrase_file: Option<PathBuf>,
}

#[cfg(feature = "encryption")]
pub(crate) async fn run(g: &Global, a: RotateArgs) -> Result<ExitCode, CliError> {
    let new = Key::read(
        a.new_key_file.as_deref(),
        a.new_passphrase_file.as_deref(),
        "MARS_STATE_NEW_KEY",
        "MARS_STATE_NEW_PASSPHRASE",
        "--new-key-file, --new-passphrase-file, MARS_STATE_NEW_KEY, MARS_STATE_NEW_PASSPHRASE",
    )?;
    let Some(new) = new.source() else {
        return Err(CliError::new(Exit::Usage, "no new key given").hint(
            "give it with --new-key-file PATH or --new-passphrase-file PATH (or \
             MARS_STATE_NEW_KEY / MARS_STATE_NEW_PASSPHRASE); the current key as usual",
        ));
    };
    if !Key::from_args(&g.keys)?.is_some() {
        return Err(CliError::new(Exit::Key, "no current key given").hint(
            "the store's current key comes from --key-file / --passphrase-file (or \
             MARS_STATE_KEY / MARS_STATE_PASSPHRASE)",
        ));
    }
    let opened = store::Opened::open(Some(a.store.as_str()), &g.keys).await.map_err(|e| {
        e.hint("if an earlier rotation finished, the old key no longer opens the store: use the new one")
    })?;
    let rewritten = opened.manager.rotate_key(new).await.map_err(|e| {
        opened.error(e, None).hint("run the same command again: it picks up where it stopped")
    });
    opened.close().await?;
    let rewritten = rewritten?;
    if g.json {
        output::print_json(&json!({"records_rewritten": rewritten}))?;
    } else {
        output::print_lines(&format!(
            "re-encrypted {rewritten} records under the new key; the old key no longer opens the store"
        ));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "encryption"))]
pub(crate) async fn run(_g: &Global, _a: RotateArgs) -> Result<ExitCode, CliError> {
    Err(CliError::new(
        Exit::Key,
        "this build of mars-state has no encryption (cargo feature `encryption`)",
    ))
}
