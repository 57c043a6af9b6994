//! One way to name a store: [`open`] turns a URL or a path into a backend. This file owns
//! the URL forms and their parsing; it calls each backend's own constructor and nothing
//! else.

use std::path::PathBuf;
use std::sync::Arc;

use super::{FileStorageBackend, MemoryStorageBackend, StorageBackend};
use crate::error::{Result, StateError};

/// The schemes [`open`] knows, for error messages.
const SCHEMES: &str = "file://, sqlite://, postgres://, redis://, memory:, or a bare path";

/// Opens the store named by `url`, for [`StateManager::builder`](crate::StateManager::builder)
/// to take as it is:
///
/// | form | backend |
/// |---|---|
/// | `./state`, `/var/lib/app/state` (a bare path) | [`FileStorageBackend`] on that directory |
/// | `file:///var/lib/app/state` (absolute), `file:state` (relative) | the same |
/// | `sqlite:///var/lib/app/state.db` (absolute), `sqlite://state.db` or `sqlite:state.db` (relative) | `SqliteStorageBackend` (feature `sqlite`) |
/// | `postgres://user@host/db`, `postgresql://…` | `PostgresStorageBackend` (feature `postgres`) |
/// | `redis://host:6379/0`, `rediss://…` | `RedisStorageBackend` (feature `redis`) |
/// | `memory:` | a new, empty [`MemoryStorageBackend`] (nothing survives the process) |
///
/// In `file:` and `sqlite:` URLs, `%XX` escapes are decoded (`%20` is a space); a bare path
/// is taken as it is. Each backend opens with its defaults: the file and SQLite backends do
/// not wait for a store another process holds ([`StateError::Locked`]); the server
/// backends refuse a server that cannot promise durability (see each one).
///
/// Errors: [`StateError::Config`] for a malformed URL, an unknown scheme, or a scheme whose
/// cargo feature this build lacks (the message names the feature); otherwise whatever the
/// backend's constructor returns.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mars_state::StateError> {
/// use mars_state::{StateManager, backend};
/// # let dir = tempfile::tempdir().unwrap();
/// # let url = format!("file://{}", dir.path().display());
/// // `url` is, say, "file:///var/lib/app/state" or "postgres://app@db/agents".
/// let manager = StateManager::builder(backend::open(&url).await?).start().await?;
/// manager.save_session("s1", &serde_json::json!({ "step": 1 })).await?;
/// # manager.shutdown().await?;
/// # Ok(()) }
/// ```
pub async fn open(url: &str) -> Result<Arc<dyn StorageBackend>> {
    let Some((scheme, rest)) = split_scheme(url) else {
        if url.is_empty() {
            return Err(bad(url, "it is empty"));
        }
        return Ok(Arc::new(FileStorageBackend::new(url)?));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "file" => Ok(Arc::new(FileStorageBackend::new(local_path(url, rest)?)?)),
        "sqlite" => sqlite(url, rest),
        "memory" if rest.is_empty() || rest == "//" => Ok(Arc::new(MemoryStorageBackend::new())),
        "memory" => Err(bad(url, "a memory store takes no path (`memory:`)")),
        "postgres" | "postgresql" => postgres(url).await,
        "redis" | "rediss" => redis(url).await,
        other => Err(bad(url, &format!("unknown scheme {other:?}; expected {SCHEMES}"))),
    }
}

/// Opens the store named by `url` (the forms of [`open`]) for reading only, beside a
/// process that may hold it, without taking its lock and without writing anything:
///
/// - a file store is opened with [`FileOptions::read_only`](super::FileOptions::read_only):
///   no lock, its write-ahead log replayed in memory only;
/// - an SQLite store with `SqliteOptions::read_only` (feature `sqlite`): no lock,
///   read-only connections (see there for the `-shm` file of WAL mode);
/// - a PostgreSQL store with `PostgresOptions::read_only` (feature `postgres`): it creates
///   and migrates nothing (a database without the store's schema, or with an older
///   version of it, is refused);
/// - a Redis store is opened as [`open`] does: it has no lock and no schema;
/// - the PostgreSQL and Redis handles can still write; start the manager with
///   [`StateManagerBuilder::read_only`](crate::StateManagerBuilder::read_only), which
///   refuses every write of any backend;
/// - `memory:` is refused ([`StateError::Config`]): a new memory store is empty, so there
///   is nothing to read.
///
/// The file and SQLite handles answer every write with [`StateError::ReadOnly`]. The
/// store must exist: a missing directory or database file is an error, never created.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mars_state::StateError> {
/// use mars_state::{StateManager, backend};
/// # let dir = tempfile::tempdir().unwrap();
/// # let url = format!("file://{}", dir.path().display());
/// let manager = StateManager::start(backend::open(&url).await?).await?;
/// manager.save_session("s1", &serde_json::json!({ "step": 1 })).await?;
///
/// // While `manager` holds the store:
/// let reader = StateManager::builder(backend::open_read_only(&url).await?)
///     .read_only()
///     .start()
///     .await?;
/// let state: Option<serde_json::Value> = reader.load_session("s1").await?;
/// assert_eq!(state, Some(serde_json::json!({ "step": 1 })));
/// # reader.shutdown().await?;
/// # manager.shutdown().await?;
/// # Ok(()) }
/// ```
pub async fn open_read_only(url: &str) -> Result<Arc<dyn StorageBackend>> {
    let read_only_file = |path: PathBuf| -> Result<Arc<dyn StorageBackend>> {
        Ok(Arc::new(FileStorageBackend::options().read_only(true).open(path)?))
    };
    let Some((scheme, rest)) = split_scheme(url) else {
        if url.is_empty() {
            return Err(bad(url, "it is empty"));
        }
        return read_only_file(PathBuf::from(url));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "file" => read_only_file(local_path(url, rest)?),
        "sqlite" => sqlite_read_only(url, rest),
        "postgres" | "postgresql" => postgres_read_only(url).await,
        "memory" => {
            Err(bad(url, "a new memory store is empty: there is nothing to open read-only"))
        }
        _ => open(url).await,
    }
}

#[cfg(feature = "sqlite")]
fn sqlite(url: &str, rest: &str) -> Result<Arc<dyn StorageBackend>> {
    Ok(Arc::new(super::SqliteStorageBackend::open(local_path(url, rest)?)?))
}

#[cfg(not(feature = "sqlite"))]
fn sqlite(url: &str, _rest: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature(url, "sqlite"))
}

#[cfg(feature = "sqlite")]
fn sqlite_read_only(url: &str, rest: &str) -> Result<Arc<dyn StorageBackend>> {
    let path = local_path(url, rest)?;
    Ok(Arc::new(super::SqliteStorageBackend::options().read_only(true).open(path)?))
}

#[cfg(not(feature = "sqlite"))]
fn sqlite_read_only(url: &str, _rest: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature(url, "sqlite"))
}

#[cfg(feature = "postgres")]
async fn postgres(url: &str) -> Result<Arc<dyn StorageBackend>> {
    Ok(Arc::new(super::PostgresStorageBackend::connect(url).await?))
}

#[cfg(feature = "postgres")]
async fn postgres_read_only(url: &str) -> Result<Arc<dyn StorageBackend>> {
    let options = super::PostgresStorageBackend::options().read_only(true);
    Ok(Arc::new(options.connect(url).await?))
}

#[cfg(not(feature = "postgres"))]
async fn postgres_read_only(url: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature(url, "postgres"))
}

#[cfg(not(feature = "postgres"))]
async fn postgres(url: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature(url, "postgres"))
}

#[cfg(feature = "redis")]
async fn redis(url: &str) -> Result<Arc<dyn StorageBackend>> {
    Ok(Arc::new(super::RedisStorageBackend::connect(url).await?))
}

#[cfg(not(feature = "redis"))]
async fn redis(url: &str) -> Result<Arc<dyn StorageBackend>> {
    Err(missing_feature(url, "redis"))
}

#[cfg_attr(all(feature = "sqlite", feature = "postgres", feature = "redis"), allow(dead_code))]
fn missing_feature(url: &str, feature: &str) -> StateError {
    StateError::Config {
        message: format!(
            "store {}: this build of mars-state lacks the `{feature}` backend; enable the cargo \
             feature `{feature}`",
            redacted(url)
        ),
    }
}

/// `scheme` and the rest of `url`, if it starts with a URL scheme (`letter (letter | digit |
/// + | - | .)* :`); a bare path does not (a path that does must be written `./…`).
fn split_scheme(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some((scheme, rest))
}

/// The path of a `file:` or `sqlite:` URL: `///abs` or `//localhost/abs` is absolute,
/// `//rel` and `rel` are relative to the working directory; `%XX` decoded.
fn local_path(url: &str, rest: &str) -> Result<PathBuf> {
    let path = match rest.strip_prefix("//") {
        Some(after) => {
            after.strip_prefix("localhost/").map_or(after.to_owned(), |p| format!("/{p}"))
        }
        None => rest.to_owned(),
    };
    if path.contains(['?', '#']) {
        return Err(bad(url, "a file or SQLite URL takes no query or fragment (write `?` as %3F)"));
    }
    let path = percent_decode(&path).ok_or_else(|| bad(url, "a `%` escape is malformed"))?;
    if path.is_empty() {
        return Err(bad(url, "it names no path"));
    }
    Ok(PathBuf::from(path))
}

/// Decodes `%XX` escapes; `None` if one is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn bad(url: &str, why: &str) -> StateError {
    StateError::Config { message: format!("cannot open store {:?}: {why}", redacted(url)) }
}

/// `url` without a password (`postgres://app:secret@db/x` → `postgres://app:***@db/x`), for
/// error messages and logs.
pub(crate) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_file_urls() {
        let p = |u: &str| {
            let (_, rest) = split_scheme(u).unwrap();
            local_path(u, rest)
        };
        assert_eq!(p("file:///var/lib/state").unwrap(), PathBuf::from("/var/lib/state"));
        assert_eq!(p("file://localhost/var/x").unwrap(), PathBuf::from("/var/x"));
        assert_eq!(p("file:state").unwrap(), PathBuf::from("state"));
        assert_eq!(p("sqlite://state.db").unwrap(), PathBuf::from("state.db"));
        assert_eq!(p("sqlite:///a%20b/s.db").unwrap(), PathBuf::from("/a b/s.db"));
        assert!(p("file:///a%2").is_err());
        assert!(p("file:///a%zz").is_err());
        assert!(p("file:///a?mode=x").is_err());
        assert!(p("file://").is_err());
    }

    #[test]
    fn bare_paths_have_no_scheme() {
        assert_eq!(split_scheme("./state"), None);
        assert_eq!(split_scheme("/abs/state"), None);
        assert_eq!(split_scheme("relative/dir"), None);
        assert_eq!(split_scheme("1x:/y"), None);
        assert_eq!(split_scheme("postgres://h/db"), Some(("postgres", "//h/db")));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redacted("postgres://app:secret@db:5432/x"), "postgres://app:***@db:5432/x");
        assert_eq!(redacted("redis://:pw@h/0"), "redis://:***@h/0");
        assert_eq!(redacted("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redacted("./state"), "./state");
    }
}
