//! `mars-state`: look inside any mars-state store, move it between backends, rotate its key.
//!
//! This file owns the command line (clap's `Cli` and `Command`), the dispatch to one file
//! per command, and the exit codes. Opening a store and its keys is `store.rs`; tables,
//! `--json`, times, sizes and error printing are `output.rs`. Every command works through
//! the library's public API (`backend::open`, `StateManager`, `copy_store`) and nothing
//! else.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod admin;
mod analytics;
mod copy;
mod diff;
mod dump;
mod log;
mod ls;
mod output;
mod rotate;
mod show;
mod store;
mod verify;
mod watch;

use output::CliError;

/// The exit codes, as `--help` shows them (README "Command-line tool" lists the same).
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  damage found, or the session or checkpoint asked for does not exist
  2  usage error (bad arguments, a key given on the command line)
  3  the store cannot be opened (no store there, bad URL, unreachable server)
  4  the key is missing or does not open the store
  5  the store is in use by another process (which one is named)
  6  any other failure (I/O error, time-out); the message says what

The store is the first argument of every command: a path, or a URL (file://, sqlite://,
postgres://, redis://). Without it (or given as `-`) it is read from MARS_STATE_URL.
Keys are never given on the command line: use --key-file / MARS_STATE_KEY_FILE (64 hex
digits or 32 raw bytes), --passphrase-file / MARS_STATE_PASSPHRASE_FILE, or the
variables MARS_STATE_KEY (64 hex digits) or MARS_STATE_PASSPHRASE.";

/// Look inside a mars-state store (any backend, plain, gzipped or encrypted), copy it
/// between backends, rotate its key.
#[derive(Debug, Parser)]
#[command(name = "mars-state", version, after_help = EXIT_CODES)]
pub(crate) struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub(crate) struct Global {
    /// Print data as JSON (one document, or one line per event for `watch`), for scripts.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) keys: store::KeyArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the sessions: status, step, last update, size, checkpoints, owner node.
    #[command(after_help = "Example:\n  mars-state ls ./state --status paused")]
    Ls(ls::LsArgs),
    /// Print a session's state (or a checkpoint's) as pretty JSON.
    #[command(after_help = "Examples:\n  mars-state show ./state run-1\n  \
                            mars-state show ./state run-1 --step 12\n  \
                            mars-state show sqlite:///var/lib/app/state.db run-1 --at 0192a3b4c5d60001-1a2b3c4d")]
    Show(show::ShowArgs),
    /// Draw a session's checkpoint timeline (branches, parents, reasons, steps), newest first.
    #[command(after_help = "Example:\n  mars-state log ./state run-1")]
    Log(log::LogArgs),
    /// What changed between two checkpoints, or a checkpoint and the current state.
    #[command(
        after_help = "Examples:\n  mars-state diff ./state run-1 0192a3b4c5d60001-1a2b3c4d current\n  \
                            mars-state diff ./state run-1 1a2b3c4d 5e6f7a8b   (unique parts of ids)\n  \
                            mars-state diff ./state run-1 step:10 current"
    )]
    Diff(diff::DiffArgs),
    /// Read every record and check it (checksums, decryption, decoding); each damaged record
    /// is printed with what it is and what is wrong (exit code 1). Never writes; works on a
    /// store another process holds.
    #[command(after_help = "Examples:\n  mars-state verify ./state\n  \
                            MARS_STATE_KEY_FILE=state.key mars-state verify sqlite:///var/lib/app/state.db --json")]
    Verify(verify::VerifyArgs),
    /// Write a portable dump of the store (or of chosen sessions): JSON Lines, gzipped if
    /// the file name ends in `.gz`. States are decoded, so a dump moves between keys and
    /// backends; equal stores give byte-identical dumps.
    #[command(after_help = "Examples:\n  mars-state export ./state --out dump.jsonl.gz\n  \
                            mars-state export postgres://app@db/agents --out run-1.jsonl --session run-1")]
    Export(dump::ExportArgs),
    /// Load a dump made by `export` into a store (created if missing), through the store's
    /// own compression and key; importing the same dump twice changes nothing.
    #[command(after_help = "Example:\n  mars-state import ./copy dump.jsonl.gz")]
    Import(dump::ImportArgs),
    /// Totals of the store: sessions (by status), checkpoints, bytes.
    #[command(after_help = "Example:\n  mars-state stats postgres://app@db/agents")]
    Stats(admin::StoreOnly),
    /// Remove staged files of interrupted writes, finish interrupted deletes, rebuild the
    /// index from every record (damaged records are reported: exit code 1).
    #[command(after_help = "Example:\n  mars-state vacuum ./state")]
    Vacuum(admin::StoreOnly),
    /// Run one janitor pass now (sweep and the store's retention) and print what it did.
    #[command(after_help = "Example:\n  mars-state janitor ./state")]
    Janitor(admin::StoreOnly),
    /// Print live change events, one line each, until interrupted (Ctrl-C).
    #[command(after_help = "Examples:\n  mars-state watch redis://cache:6379/0\n  \
                            mars-state watch postgres://app@db/agents run-1 --json\n  \
                            mars-state watch ./state --interval 250")]
    Watch(watch::WatchArgs),
    /// Copy a whole store between any two backends, verified, resumable.
    #[command(
        after_help = "Example:\n  mars-state copy --from postgres://app@db/agents --to ./laptop-copy\n\n\
                            Run it again after an interruption: it finishes the copy without duplicates."
    )]
    Copy(copy::CopyArgs),
    /// Re-encrypt a store under a new key (resumable: run it again after an interruption).
    #[command(
        after_help = "Example:\n  MARS_STATE_KEY_FILE=old.key MARS_STATE_NEW_KEY_FILE=new.key \\\n    \
                            mars-state rotate-key ./state"
    )]
    RotateKey(rotate::RotateArgs),
    /// State analytics: steps over time, checkpoint cadence and reasons, size growth, pauses
    /// and failures; across the store, sessions by status and storage growth.
    #[command(after_help = "Examples:\n  mars-state analytics ./state\n  \
                            mars-state analytics ./state run-1 --svg run-1.svg")]
    Analytics(analytics::AnalyticsArgs),
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help and version to stdout with exit code 0, errors to stderr with 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("mars-state: cannot start the async runtime: {e}");
                return ExitCode::from(6);
            }
        };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => e.report(),
    }
}

/// Parses the command line. With `MARS_STATE_URL` set, the store argument may be left out:
/// a line that does not parse as given is parsed again with the store from the variable
/// inserted after the command's name (so `mars-state show run-1` means
/// `mars-state show $MARS_STATE_URL run-1`; an explicit store always wins).
fn parse() -> Result<Cli, clap::Error> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let first = Cli::try_parse_from(&args);
    let Err(error) = &first else { return first };
    let Some(url) = std::env::var_os(store::URL_ENV).filter(|u| !u.is_empty()) else {
        return first;
    };
    use clap::error::ErrorKind;
    if !matches!(error.kind(), ErrorKind::MissingRequiredArgument | ErrorKind::UnknownArgument) {
        return first;
    }
    // The command name is the first argument that is not an option (global options take
    // values only as `--key-file PATH`, which is skipped with its value).
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if store::GLOBAL_VALUE_OPTIONS.contains(&a.as_ref()) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            break;
        }
    }
    if i >= args.len() {
        return first;
    }
    let mut with_url = args.clone();
    with_url.insert(i + 1, url);
    Cli::try_parse_from(&with_url).or(first)
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let g = &cli.global;
    store::refuse_keys_in_arguments(&g.keys)?;
    match cli.command {
        Command::Ls(a) => ls::run(g, a).await,
        Command::Show(a) => show::run(g, a).await,
        Command::Log(a) => log::run(g, a).await,
        Command::Diff(a) => diff::run(g, a).await,
        Command::Verify(a) => verify::run(g, a).await,
        Command::Export(a) => dump::export(g, a).await,
        Command::Import(a) => dump::import(g, a).await,
        Command::Stats(a) => admin::stats(g, a).await,
        Command::Vacuum(a) => admin::vacuum(g, a).await,
        Command::Janitor(a) => admin::janitor(g, a).await,
        Command::Watch(a) => watch::run(g, a).await,
        Command::Copy(a) => copy::run(g, a).await,
        Command::RotateKey(a) => rotate::run(g, a).await,
        Command::Analytics(a) => analytics::run(g, a).await,
    }
}
