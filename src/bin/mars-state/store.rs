//! Naming and opening a store for a command: the store argument (or `MARS_STATE_URL`), the
//! check that a store is there before anything is opened for writing, the keys (from a key
//! file or an environment variable, never from the command line), and the manager every
//! command works through. Errors are turned into [`CliError`]s that name the store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
#[cfg(feature = "encryption")]
use mars_state::{EncryptionKey, KeySource, Passphrase};
use mars_state::{StateError, StateManager, StorageBackend, StorageKey, backend};

use crate::output::{CliError, Exit};

/// The variable that names the store when the argument is left out (or given as `-`).
pub(crate) const URL_ENV: &str = "MARS_STATE_URL";

/// Global options that take a value as the next argument (for `main::parse`).
pub(crate) const GLOBAL_VALUE_OPTIONS: &[&str] = &["--key-file", "--passphrase-file"];

/// The store's format descriptor, present in every store a manager has opened.
const STORE_META: &str = "metadata/store.json";

/// Where a command's encryption key comes from. At most one source may be given; the key
/// itself is never an argument (it would be in the shell's history and in `ps`).
#[derive(Debug, Args, Default)]
pub(crate) struct KeyArgs {
    /// File holding the store's raw key: 64 hex digits, or exactly 32 bytes.
    #[arg(long, global = true, env = "MARS_STATE_KEY_FILE", value_name = "PATH")]
    pub(crate) key_file: Option<PathBuf>,
    /// File holding the store's passphrase (its first line; a trailing newline is dropped).
    #[arg(long, global = true, env = "MARS_STATE_PASSPHRASE_FILE", value_name = "PATH")]
    pub(crate) passphrase_file: Option<PathBuf>,
    /// Refused: a key on the command line. Kept only to say so clearly.
    #[arg(long = "key", global = true, hide = true, value_name = "KEY")]
    pub(crate) key_argument: Option<String>,
    /// Refused: a passphrase on the command line.
    #[arg(long = "passphrase", global = true, hide = true, value_name = "PASSPHRASE")]
    pub(crate) passphrase_argument: Option<String>,
}

/// Refuses `--key VALUE` and `--passphrase VALUE` (exit code 2), naming the safe ways.
pub(crate) fn refuse_keys_in_arguments(keys: &KeyArgs) -> Result<(), CliError> {
    if keys.key_argument.is_some() || keys.passphrase_argument.is_some() {
        return Err(CliError::new(
            Exit::Usage,
            "a key or passphrase given on the command line is refused (it would stay in the \
             shell history and be visible to every user in `ps`)",
        )
        .hint(
            "put it in a file readable only by you and pass --key-file PATH or \
             --passphrase-file PATH, or set MARS_STATE_KEY / MARS_STATE_PASSPHRASE",
        ));
    }
    Ok(())
}

/// Where a key comes from, read and checked but not yet used.
#[derive(Debug, Clone)]
pub(crate) enum Key {
    /// No key: the store must be unencrypted.
    None,
    /// A raw 256-bit key.
    #[cfg(feature = "encryption")]
    Raw(EncryptionKey),
    /// A passphrase (zeroized when dropped).
    #[cfg(feature = "encryption")]
    Passphrase(zeroize::Zeroizing<String>),
}

impl Key {
    /// The key of a command: from `--key-file`, `--passphrase-file` (or their variables),
    /// `MARS_STATE_KEY` or `MARS_STATE_PASSPHRASE`; more than one is a usage error.
    pub(crate) fn from_args(keys: &KeyArgs) -> Result<Key, CliError> {
        Key::read(
            keys.key_file.as_deref(),
            keys.passphrase_file.as_deref(),
            "MARS_STATE_KEY",
            "MARS_STATE_PASSPHRASE",
            "--key-file, --passphrase-file, MARS_STATE_KEY, MARS_STATE_PASSPHRASE",
        )
    }

    /// A key from the given files and variables (see [`Key::from_args`]).
    pub(crate) fn read(
        key_file: Option<&Path>,
        passphrase_file: Option<&Path>,
        key_env: &str,
        passphrase_env: &str,
        names: &str,
    ) -> Result<Key, CliError> {
        let key_var = std::env::var(key_env).ok().filter(|v| !v.is_empty());
        let pass_var = std::env::var(passphrase_env).ok().filter(|v| !v.is_empty());
        let given =
            [key_file.is_some(), passphrase_file.is_some(), key_var.is_some(), pass_var.is_some()]
                .iter()
                .filter(|b| **b)
                .count();
        if given == 0 {
            return Ok(Key::None);
        }
        if given > 1 {
            return Err(CliError::new(
                Exit::Usage,
                format!("more than one key was given ({names})"),
            )
            .hint("give exactly one"));
        }
        Key::build(key_file, passphrase_file, key_var, pass_var, key_env)
    }

    #[cfg(feature = "encryption")]
    fn build(
        key_file: Option<&Path>,
        passphrase_file: Option<&Path>,
        key_var: Option<String>,
        pass_var: Option<String>,
        key_env: &str,
    ) -> Result<Key, CliError> {
        let key = if let Some(path) = key_file {
            let bytes = std::fs::read(path).map_err(|e| {
                CliError::new(
                    Exit::Key,
                    format!("cannot read the key file {}: {e}", path.display()),
                )
            })?;
            let key = raw_key(&bytes).ok_or_else(|| {
                CliError::new(
                    Exit::Key,
                    format!(
                        "the key file {} holds neither 64 hex digits nor exactly 32 bytes",
                        path.display()
                    ),
                )
                .hint("a passphrase in a file is given with --passphrase-file")
            })?;
            Key::Raw(key)
        } else if let Some(path) = passphrase_file {
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                CliError::new(
                    Exit::Key,
                    format!("cannot read the passphrase file {}: {e}", path.display()),
                )
            })?);
            let line = text.lines().next().unwrap_or_default();
            if line.is_empty() {
                return Err(CliError::new(
                    Exit::Key,
                    format!("the passphrase file {} is empty", path.display()),
                ));
            }
            Key::Passphrase(zeroize::Zeroizing::new(line.to_owned()))
        } else if let Some(hex) = key_var.map(zeroize::Zeroizing::new) {
            Key::Raw(raw_key(hex.as_bytes()).filter(|_| hex.trim().len() == 64).ok_or_else(
                || CliError::new(Exit::Key, format!("{key_env} must hold 64 hex digits")),
            )?)
        } else if let Some(pass) = pass_var {
            Key::Passphrase(zeroize::Zeroizing::new(pass))
        } else {
            Key::None
        };
        Ok(key)
    }

    #[cfg(not(feature = "encryption"))]
    fn build(
        _: Option<&Path>,
        _: Option<&Path>,
        _: Option<String>,
        _: Option<String>,
        _: &str,
    ) -> Result<Key, CliError> {
        Err(CliError::new(
            Exit::Key,
            "a key was given, but this build of mars-state has no encryption (cargo feature \
             `encryption`)",
        ))
    }

    pub(crate) fn is_some(&self) -> bool {
        !matches!(self, Key::None)
    }

    /// The key as the library takes it; `None` for no key.
    #[cfg(feature = "encryption")]
    pub(crate) fn source(&self) -> Option<KeySource> {
        match self {
            Key::None => None,
            Key::Raw(k) => Some(k.clone().into()),
            Key::Passphrase(p) => Some(Passphrase::new(p.as_str()).into()),
        }
    }
}

/// 64 hex digits (surrounding whitespace ignored) or exactly 32 bytes, as a key.
#[cfg(feature = "encryption")]
fn raw_key(bytes: &[u8]) -> Option<EncryptionKey> {
    let text = std::str::from_utf8(bytes).ok().map(str::trim);
    if let Some(hex) = text.filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit())) {
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        let k = EncryptionKey::from_bytes(key);
        // The local copy is wiped; the key lives on in `k`, which zeroizes itself.
        key.fill(0);
        return Some(k);
    }
    (bytes.len() == 32).then(|| EncryptionKey::try_from_slice(bytes).ok()).flatten()
}

/// The store a command names: its argument, `-` or nothing for `MARS_STATE_URL`.
pub(crate) fn resolve(arg: Option<&str>) -> Result<String, CliError> {
    match arg.filter(|a| *a != "-") {
        Some(a) => Ok(a.to_owned()),
        None => std::env::var(URL_ENV).ok().filter(|u| !u.is_empty()).ok_or_else(|| {
            CliError::new(Exit::Usage, "no store given")
                .hint("name it as the first argument (a path or a URL), or set MARS_STATE_URL")
        }),
    }
}

/// `url` with any password replaced by `***`, for messages.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((user, host)) if user.contains(':') => {
            format!("{scheme}://{}:***@{host}{tail}", user.split(':').next().unwrap_or_default())
        }
        _ => url.to_owned(),
    }
}

/// Whether `url` names a file or SQLite store (held by one process at a time), not a
/// server's.
pub(crate) fn is_local(url: &str) -> bool {
    local_path(url).is_some()
}

/// The local path a file or SQLite store is at, if `url` names one (for the check that it
/// exists before opening, which would create it).
fn local_path(url: &str) -> Option<(PathBuf, bool)> {
    let lower = url.to_ascii_lowercase();
    let strip = |rest: &str| {
        let p = match rest.strip_prefix("//") {
            Some(after) => {
                after.strip_prefix("localhost/").map_or(after.to_owned(), |p| format!("/{p}"))
            }
            None => rest.to_owned(),
        };
        PathBuf::from(p)
    };
    if lower.starts_with("file:") {
        return Some((strip(&url[5..]), true));
    }
    if lower.starts_with("sqlite:") {
        return Some((strip(&url[7..]), false));
    }
    let scheme = url.split_once(':').map(|(s, _)| s).filter(|s| {
        let mut c = s.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic())
            && c.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    scheme.is_none().then(|| (PathBuf::from(url), true))
}

/// Opens the backend of an existing store: a missing directory or database file, or a
/// server store without its format descriptor, is "no store here" (exit code 3), and
/// nothing is created.
/// Whether a command writes to the store.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads only: a file or SQLite store is opened beside the process that holds it,
    /// without its lock, and nothing is written (`backend::open_read_only`).
    Read,
    /// Writes: the store is opened as an application opens it (a file or SQLite store
    /// held by another process is refused, naming it).
    Write,
}

/// Opens the backend of an existing store, read-only or not: a missing directory or
/// database file, or a server store without its format descriptor, is "no store here" (exit
/// code 3), and nothing is created.
pub(crate) async fn open_existing(
    url: &str,
    access: Access,
) -> Result<Arc<dyn StorageBackend>, CliError> {
    if let Some((path, dir)) = local_path(url) {
        // Every file store has its `metadata` directory from its first open on; without
        // it the directory is no store, and opening it would start making one.
        let ok = if dir { path.join("metadata").is_dir() } else { path.is_file() };
        if !ok {
            return Err(no_store(url));
        }
    }
    let opened = match access {
        Access::Read => backend::open_read_only(url).await,
        Access::Write => backend::open(url).await,
    };
    let backend = opened.map_err(|e| CliError::from_state(e, url, None))?;
    let meta = StorageKey::new(STORE_META).map_err(|e| CliError::from_state(e, url, None))?;
    match backend.get(&meta).await {
        Ok(Some(_)) => Ok(backend),
        Ok(None) => Err(no_store(url)),
        Err(e) => Err(CliError::from_state(e, url, None)),
    }
}

fn no_store(url: &str) -> CliError {
    CliError::new(Exit::Open, format!("no mars-state store at {}", redact(url)))
        .hint("check the path or URL (a store is created by the application that writes it)")
}

/// A manager over an existing store, with the command's key.
pub(crate) struct Opened {
    pub(crate) manager: StateManager,
    pub(crate) url: String,
}

impl Opened {
    /// Opens the store named by `arg` (see [`resolve`]) with `key`.
    pub(crate) async fn open(arg: Option<&str>, keys: &KeyArgs) -> Result<Opened, CliError> {
        Self::open_as(arg, keys, Access::Write).await
    }

    /// Opens the store named by `arg` for reading only, beside any process that holds it
    /// (a file or SQLite store is read without its lock; the write-ahead log is replayed in
    /// memory): the manager is started with `StateManagerBuilder::read_only` and writes
    /// nothing.
    pub(crate) async fn read_only(arg: Option<&str>, keys: &KeyArgs) -> Result<Opened, CliError> {
        Self::open_as(arg, keys, Access::Read).await
    }

    async fn open_as(
        arg: Option<&str>,
        keys: &KeyArgs,
        access: Access,
    ) -> Result<Opened, CliError> {
        let url = resolve(arg)?;
        Self::with_key(&url, Key::from_args(keys)?, access).await
    }

    /// Opens the existing store at `url` (resolved) with `key` read already, as
    /// [`open`](Self::open) or [`read_only`](Self::read_only) do, by `access`.
    pub(crate) async fn with_key(url: &str, key: Key, access: Access) -> Result<Opened, CliError> {
        let backend = open_existing(url, access).await?;
        let manager = start(backend, key, url, access, None).await?;
        Ok(Opened { manager, url: url.to_owned() })
    }

    /// Shuts the manager down, releasing the store (and its lock).
    pub(crate) async fn close(self) -> Result<(), CliError> {
        self.manager.shutdown().await.map_err(|e| CliError::from_state(e, &self.url, None))
    }

    /// A [`CliError`] for `e`, naming this store and `session`.
    pub(crate) fn error(&self, e: StateError, session: Option<&str>) -> CliError {
        CliError::from_state(e, &self.url, session)
    }
}

/// Starts a manager over `backend` for a command: no periodic janitor (a command runs
/// one pass only when asked to), read-only or not, and the key if one was given;
/// `compression` applies to a store this open creates (an existing store keeps its own).
pub(crate) async fn start(
    backend: Arc<dyn StorageBackend>,
    key: Key,
    url: &str,
    access: Access,
    compression: Option<u32>,
) -> Result<StateManager, CliError> {
    let mut builder =
        StateManager::builder(backend).node_id(format!("mars-state-cli-{}", std::process::id()));
    if let Some(level) = compression {
        builder = builder.compression(level);
    }
    let builder = match access {
        Access::Read => builder.read_only(),
        Access::Write => builder.janitor_interval(Duration::from_secs(365 * 24 * 3600)),
    };
    let had_key = key.is_some();
    let builder = match key {
        Key::None => builder,
        #[cfg(feature = "encryption")]
        Key::Raw(k) => builder.encryption_key(k),
        #[cfg(feature = "encryption")]
        Key::Passphrase(p) => builder.encryption_passphrase(p.as_str()),
    };
    builder.start().await.map_err(|e| {
        let err = CliError::from_state(e, url, None);
        if had_key { err } else { err.when_no_key() }
    })
}
