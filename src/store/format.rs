//! The store's format descriptor, `metadata/store.json`: which record format and
//! compression a store was created with and whether it is encrypted. This file owns
//! [`StoreMeta`] (reading it, checking a manager's settings against it, and making the
//! codec write the store's format) and the builder's check of a gzip level. It calls the
//! backend it is given (a `get`, and a `put` for a new store), the key layout and the
//! codec's settings.

use serde::{Deserialize, Serialize};
use tracing::info;

use super::codec::{Codec, Compression};
use super::keys;
use crate::backend::StorageBackend;
use crate::error::{Result, StateError};

/// The store format this version writes: 2 since records say where their `data` starts
/// (issue 15). It reads stores of format 1 too, and marks one format 2 when it opens it
/// for writing, before it writes any record: versions before format 2 then refuse the
/// store ("unsupported store format 2") instead of taking its new records for damaged ones.
pub(crate) const STORE_FORMAT: u32 = 2;

/// The contents of `metadata/store.json`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoreMeta {
    mars_state: u32,
    compression: String,
    #[serde(default)]
    encrypted: bool,
}

impl StoreMeta {
    fn of(codec: &Codec) -> StoreMeta {
        StoreMeta {
            mars_state: STORE_FORMAT,
            compression: codec.compression.name().to_owned(),
            encrypted: codec.encrypted,
        }
    }

    /// Whether the store was created encrypted.
    #[cfg(feature = "encryption")]
    pub(crate) fn encrypted(&self) -> bool {
        self.encrypted
    }

    /// Refuses to open a store with an encryption setting other than the one it was
    /// created with (an encrypted store needs its key: `WrongKey`; a plain one must not get
    /// one: `Config`), or in
    /// a format this version does not know. Compression is not checked: see
    /// [`adopt_format`](Self::adopt_format).
    pub(crate) fn check(&self, codec: &Codec) -> Result<()> {
        if !(1..=STORE_FORMAT).contains(&self.mars_state) {
            return Err(StateError::Config {
                message: format!("unsupported store format {}", self.mars_state),
            });
        }
        if !matches!(self.compression.as_str(), "none" | "gzip") {
            return Err(StateError::Config {
                message: format!(
                    "the store was created with compression {:?}, which this version does not know",
                    self.compression
                ),
            });
        }
        if self.encrypted && !codec.encrypted {
            return Err(StateError::WrongKey {
                reason: "the store is encrypted and no key was given (give the manager the \
                         store's key: StateManagerBuilder::encryption_key or \
                         encryption_passphrase)"
                    .into(),
            });
        }
        let on_off = |b: bool| if b { "on" } else { "off" };
        if self.encrypted != codec.encrypted {
            return Err(StateError::Config {
                message: format!(
                    "the store was created with encryption {} but the manager is configured with {}",
                    on_off(self.encrypted),
                    on_off(codec.encrypted)
                ),
            });
        }
        Ok(())
    }

    /// Makes `codec` write the record format the store was created with, so every record
    /// of a store has one format and one file-name ending (`.json`, or `.json.gz` that
    /// `zcat | jq` reads), whatever the manager is configured with now: a gzip store
    /// opened without `compression` keeps gzipping (at level 6), one opened at another
    /// level uses that level, and a plain store stays plain. (Reads do not depend on it:
    /// each record is recognised by its own bytes.)
    pub(super) fn adopt_format(&self, codec: &mut Codec) {
        let stored = match (self.compression.as_str(), codec.compression) {
            ("gzip", Compression::None) => {
                info!("the store was created with gzip; new records are gzipped at level 6");
                Compression::Gzip(6)
            }
            ("none", Compression::Gzip(_)) => {
                info!("the store was created uncompressed; new records stay plain JSON");
                Compression::None
            }
            (_, configured) => configured,
        };
        codec.compression = stored;
    }
}

/// Checks the store's format against `codec` and makes `codec` write it, or, for a new
/// store, writes `metadata/store.json` from `codec`'s settings.
pub(super) async fn check_or_create(backend: &dyn StorageBackend, codec: &mut Codec) -> Result<()> {
    match read_store_meta(backend).await? {
        Some(mut meta) => {
            meta.check(codec)?;
            meta.adopt_format(codec);
            if meta.mars_state < STORE_FORMAT {
                // Before any record of the new format is written (the open comes first).
                info!(
                    from = meta.mars_state,
                    to = STORE_FORMAT,
                    "marking the store with this version's format; earlier versions will \
                     refuse it"
                );
                meta.mars_state = STORE_FORMAT;
                write_store_meta(backend, &meta).await?;
            }
        }
        None => write_store_meta(backend, &StoreMeta::of(codec)).await?,
    }
    Ok(())
}

/// Writes `metadata/store.json` (an atomic, durable put).
async fn write_store_meta(backend: &dyn StorageBackend, meta: &StoreMeta) -> Result<()> {
    let bytes =
        serde_json::to_vec(meta).map_err(|e| StateError::Config { message: e.to_string() })?;
    backend.put(&keys::store_meta(), bytes).await
}

/// The store's format metadata, if the store has been created. Read before any middleware
/// (it is kept in plaintext), so settings are checked before a key touches the store.
pub(crate) async fn read_store_meta(backend: &dyn StorageBackend) -> Result<Option<StoreMeta>> {
    let key = keys::store_meta();
    match backend.get(&key).await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::corrupt(&key, format!("store metadata does not parse: {e}"))),
    }
}

impl Compression {
    /// Checks a gzip level from the builder.
    pub(crate) fn gzip(level: u32) -> Result<Compression> {
        if (1..=9).contains(&level) {
            Ok(Compression::Gzip(level))
        } else {
            Err(StateError::Config {
                message: format!("compression level {level} is not in 1..=9"),
            })
        }
    }
}
