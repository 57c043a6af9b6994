//! The store's set of keys: `metadata/crypto.json` (the KDF record, the key-id counter and
//! one key-check record per key), opening a store against it (derive the given keys, match
//! each to its key id, record a new store's or a cut-off rotation's key), rotation and
//! retirement, and the `KeyRing` view through which the manager rotates the keys of an
//! encrypted backend it was handed. It calls `keys` (to derive), `seal` (to make and match
//! key-check records) and the inner backend (to read and replace `metadata/crypto.json`).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use chacha20poly1305::XChaCha20Poly1305;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::keys::{EncryptionKey, KdfParams, KdfRecord, KeySource, derive_keys, kdf_params};
use super::seal::{match_check, seal_check};
use super::{CRYPTO_META, Encrypted, Keyring, crypto_meta_key, hex, unhex};
use crate::backend::{FileStorageBackend, StorageBackend};
use crate::error::{Result, StateError};

const CRYPTO_FORMAT: u32 = 1;
const CIPHER_NAME: &str = "XChaCha20-Poly1305";
const KDF_NAME: &str = "argon2id";
const KDF_VERSION: u32 = 0x13;
pub(super) const SALT_LEN: usize = 16;

impl<B: StorageBackend> Encrypted<B> {
    /// Wraps `inner`, writing with `current` and also reading with `previous`; a new store
    /// gets the default KDF costs. Same as
    /// `EncryptionLayer::new(current).previous_key(..)...wrap(inner)`; see
    /// [`EncryptionLayer::wrap`](super::EncryptionLayer::wrap) for the errors.
    pub async fn open(inner: B, current: KeySource, previous: Vec<KeySource>) -> Result<Self> {
        Self::build(inner, current, previous, KdfParams::default()).await
    }

    pub(super) async fn build(
        inner: B,
        current: KeySource,
        previous: Vec<KeySource>,
        kdf: KdfParams,
    ) -> Result<Self> {
        let meta_key = crypto_meta_key();
        let existing = match inner.get(&meta_key).await? {
            Some(bytes) => Some(CryptoMeta::parse(&bytes)?),
            None => None,
        };
        // An encrypted store gets its key metadata before anything else (this layer writes
        // it before the store writes its format descriptor). A store that has a descriptor
        // and no key metadata was created without encryption: wrapping it would seal new
        // records among plaintext ones, so it is refused before anything is written.
        if existing.is_none() && inner.get(&crate::store::keys::store_meta()).await?.is_some() {
            return Err(StateError::Config {
                message: "this store was created without encryption (it has \
                          metadata/store.json and no metadata/crypto.json): open it without \
                          a key"
                    .into(),
            });
        }
        let mut meta = match &existing {
            Some(meta) => meta.clone(),
            None => CryptoMeta::new(kdf)?,
        };
        let what = current.describe();
        let mut sources = vec![current];
        sources.extend(previous);
        let ciphers: Vec<XChaCha20Poly1305> =
            derive_keys(sources, &meta.kdf).await?.iter().map(EncryptionKey::cipher).collect();
        let mut ciphers = ciphers.into_iter();
        let Some(current) = ciphers.next() else {
            return Err(StateError::Config { message: "no encryption key given".into() });
        };

        let mut ring = Keyring { current: 0, ciphers: BTreeMap::new(), next_id: meta.next_key_id };
        if existing.is_none() {
            let id = meta.add_key(&current)?;
            inner.put(&meta_key, meta.to_json()?).await?;
            if ciphers.len() > 0 {
                debug!("a new encrypted store needs no previous keys; they are ignored");
            }
            ring.current = id;
            ring.next_id = meta.next_key_id;
            ring.ciphers.insert(id, Arc::new(current));
        } else {
            let checks = meta.checks()?;
            let ciphers: Vec<XChaCha20Poly1305> = ciphers.collect();
            let id = match match_check(&current, &checks) {
                Some(id) => id,
                // A rotation to `current` cut off before it recorded the new key: a previous
                // key given opens the store, and the caller names `current` as the key to
                // go on with. Record it now, as the rotation would have (one atomic put of
                // the key metadata; until it is durable nothing is sealed with it, and if it
                // fails the open fails and nothing changed).
                None if ciphers.iter().any(|c| match_check(c, &checks).is_some()) => {
                    let id = meta.add_key(&current)?;
                    inner.put(&meta_key, meta.to_json()?).await?;
                    ring.next_id = meta.next_key_id;
                    info!(
                        key_id = id,
                        "recorded the new encryption key of a rotation that was cut off"
                    );
                    id
                }
                None => {
                    let ids: Vec<String> = checks.iter().map(|(id, _)| id.to_string()).collect();
                    return Err(StateError::WrongKey {
                        reason: format!(
                            "the {what} opens none of this store's keys (key ids on record: {}); \
                             check the key, or pass the key the store was created or last rotated with",
                            ids.join(", ")
                        ),
                    });
                }
            };
            ring.current = id;
            ring.ciphers.insert(id, Arc::new(current));
            for (n, cipher) in ciphers.into_iter().enumerate() {
                match match_check(&cipher, &checks) {
                    Some(id) => {
                        ring.ciphers.entry(id).or_insert_with(|| Arc::new(cipher));
                    }
                    None => warn!(
                        previous_key = n + 1,
                        "a previous encryption key opens none of this store's keys (retired already?); ignored"
                    ),
                }
            }
        }
        Ok(Encrypted {
            inner: Arc::new(inner),
            keyring: RwLock::new(ring),
            meta: tokio::sync::Mutex::new(meta),
            torn_logs: Mutex::new(HashSet::new()),
        })
    }

    /// The id of the key new values are sealed with.
    pub fn current_key_id(&self) -> u32 {
        self.ring().current
    }

    /// The ids of every key this handle can decrypt with, ascending.
    pub fn key_ids(&self) -> Vec<u32> {
        self.ring().ciphers.keys().copied().collect()
    }

    /// The ids that have a key-check record in `metadata/crypto.json`, ascending. More than
    /// one means a rotation has not been finished with
    /// [`retire_keys_except_current`](Self::retire_keys_except_current).
    pub async fn recorded_key_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.meta.lock().await.keys.iter().map(|k| k.id).collect();
        ids.sort_unstable();
        ids
    }

    /// Adds `new` to the keyring and makes it the key for writes; returns its key id. Its
    /// key-check record is written to `metadata/crypto.json` (atomically) before it is used,
    /// so a crash at any point leaves every record readable with the keys on record. Older
    /// keys stay readable. Rotating to a key the store already has reuses its id.
    ///
    /// Re-encrypting existing records (get + put through this wrapper, serialized with other
    /// writes to the same key) and then calling
    /// [`retire_keys_except_current`](Self::retire_keys_except_current) is the caller's job.
    pub async fn rotate_to(&self, new: KeySource) -> Result<u32> {
        let mut meta = self.meta.lock().await;
        let cipher = derive_keys(vec![new], &meta.kdf)
            .await?
            .first()
            .map(EncryptionKey::cipher)
            .ok_or_else(|| StateError::Config { message: "no encryption key given".into() })?;
        if let Some(id) = match_check(&cipher, &meta.checks()?) {
            let mut ring = self.ring_mut();
            ring.ciphers.entry(id).or_insert_with(|| Arc::new(cipher));
            ring.current = id;
            debug!(key_id = id, "encryption key rotated to a key already on record");
            return Ok(id);
        }
        let mut next = meta.clone();
        let id = next.add_key(&cipher)?;
        // Recorded durably (one atomic put) before anything is sealed with it.
        self.inner.put(&crypto_meta_key(), next.to_json()?).await?;
        let mut ring = self.ring_mut();
        ring.ciphers.insert(id, Arc::new(cipher));
        ring.current = id;
        ring.next_id = next.next_key_id;
        *meta = next;
        debug!(key_id = id, "encryption key rotated");
        Ok(id)
    }

    /// Removes every key but the current one: their key-check records from
    /// `metadata/crypto.json` (atomically) and their keys from this handle. Call it only
    /// after every record has been re-encrypted under the current key; afterwards a record
    /// still sealed with a removed key reads as [`StateError::WrongKey`].
    pub async fn retire_keys_except_current(&self) -> Result<()> {
        let mut meta = self.meta.lock().await;
        let current = self.current_key_id();
        let mut next = meta.clone();
        next.keys.retain(|k| k.id == current);
        if next.keys.len() != meta.keys.len() {
            self.inner.put(&crypto_meta_key(), next.to_json()?).await?;
            *meta = next;
        }
        self.ring_mut().ciphers.retain(|id, _| *id == current);
        debug!(key_id = current, "retired every encryption key but the current one");
        Ok(())
    }
}

fn bump(id: u32) -> Result<u32> {
    id.checked_add(1)
        .ok_or_else(|| StateError::Config { message: "encryption key ids are exhausted".into() })
}

/// What a [`StateManager`](crate::StateManager) needs of the encryption layer under its
/// store, whatever backend that layer wraps: key rotation.
#[async_trait]
pub(crate) trait KeyRing: Send + Sync + fmt::Debug {
    /// [`Encrypted::rotate_to`].
    async fn rotate_to(&self, new: KeySource) -> Result<u32>;
    /// [`Encrypted::retire_keys_except_current`].
    async fn retire_keys_except_current(&self) -> Result<()>;
}

#[async_trait]
impl<B: StorageBackend> KeyRing for Encrypted<B> {
    async fn rotate_to(&self, new: KeySource) -> Result<u32> {
        Encrypted::rotate_to(self, new).await
    }

    async fn retire_keys_except_current(&self) -> Result<()> {
        Encrypted::retire_keys_except_current(self).await
    }
}

/// An encryption layer found in a backend handed to the manager: its keyring, and the
/// backend below it.
pub(crate) type FoundLayer = (Arc<dyn KeyRing>, Arc<dyn StorageBackend>);

/// If `backend` is one of this crate's encrypted backends ([`EncryptedFileStorageBackend`],
/// or `Encrypted` over the memory, SQLite, PostgreSQL or Redis backend, or over
/// `Arc<dyn StorageBackend>`), its keyring and the backend below it. The manager then treats
/// the store as encrypted, exactly as with its own `encryption_key`. An `Encrypted` over a
/// backend type of your own is recognised once wrapped in an `Arc<dyn StorageBackend>`
/// first (`EncryptionLayer::wrap(Arc::new(mine) as Arc<dyn StorageBackend>)`), or give it
/// to the manager unwrapped, with the key.
pub(crate) fn find_layer(backend: &Arc<dyn std::any::Any + Send + Sync>) -> Option<FoundLayer> {
    fn parts<T: StorageBackend>(
        backend: &Arc<dyn std::any::Any + Send + Sync>,
    ) -> Option<FoundLayer> {
        let layer = backend.clone().downcast::<Encrypted<T>>().ok()?;
        let below: Arc<dyn StorageBackend> = layer.inner.clone();
        Some((layer, below))
    }
    let found = parts::<FileStorageBackend>(backend)
        .or_else(|| parts::<crate::MemoryStorageBackend>(backend))
        .or_else(|| parts::<Arc<dyn StorageBackend>>(backend));
    #[cfg(feature = "sqlite")]
    let found = found.or_else(|| parts::<crate::SqliteStorageBackend>(backend));
    #[cfg(feature = "postgres")]
    let found = found.or_else(|| parts::<crate::PostgresStorageBackend>(backend));
    #[cfg(feature = "redis")]
    let found = found.or_else(|| parts::<crate::RedisStorageBackend>(backend));
    found
}

/// The contents of `metadata/crypto.json` (format in the parent module's docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CryptoMeta {
    mars_state_crypto: u32,
    cipher: String,
    kdf: KdfRecord,
    next_key_id: u32,
    keys: Vec<KeyCheck>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyCheck {
    id: u32,
    check: String,
}

impl CryptoMeta {
    /// Records a key check for `cipher` under the next key id and returns that id (in
    /// memory only: the caller writes the metadata before sealing anything with the key).
    fn add_key(&mut self, cipher: &XChaCha20Poly1305) -> Result<u32> {
        let id = self.next_key_id;
        self.keys.push(KeyCheck { id, check: hex(&seal_check(cipher, id)?) });
        self.next_key_id = bump(id)?;
        Ok(id)
    }

    fn new(kdf: KdfParams) -> Result<Self> {
        kdf_params(kdf.m_cost_kib, kdf.t_cost, kdf.p_cost)?;
        let salt = crate::random::array::<SALT_LEN>()?;
        Ok(CryptoMeta {
            mars_state_crypto: CRYPTO_FORMAT,
            cipher: CIPHER_NAME.into(),
            kdf: KdfRecord {
                algorithm: KDF_NAME.into(),
                version: KDF_VERSION,
                salt: hex(&salt),
                m_cost_kib: kdf.m_cost_kib,
                t_cost: kdf.t_cost,
                p_cost: kdf.p_cost,
            },
            next_key_id: 1,
            keys: Vec::new(),
        })
    }

    pub(super) fn parse(bytes: &[u8]) -> Result<Self> {
        let bad = |reason: String| StateError::corrupt(CRYPTO_META, reason);
        let meta: CryptoMeta = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("encryption metadata does not parse: {e}")))?;
        if meta.mars_state_crypto != CRYPTO_FORMAT {
            return Err(StateError::Config {
                message: format!(
                    "unsupported encryption metadata format {}",
                    meta.mars_state_crypto
                ),
            });
        }
        if meta.cipher != CIPHER_NAME
            || meta.kdf.algorithm != KDF_NAME
            || meta.kdf.version != KDF_VERSION
        {
            return Err(StateError::Config {
                message: format!(
                    "unsupported cipher or KDF in {CRYPTO_META}: {:?}, {:?} version {}",
                    meta.cipher, meta.kdf.algorithm, meta.kdf.version
                ),
            });
        }
        if unhex(&meta.kdf.salt).is_none_or(|s| !(8..=64).contains(&s.len())) {
            return Err(bad("the KDF salt is damaged".into()));
        }
        kdf_params(meta.kdf.m_cost_kib, meta.kdf.t_cost, meta.kdf.p_cost)
            .map_err(|e| bad(e.to_string()))?;
        if meta.keys.is_empty() {
            return Err(bad("no key-check record".into()));
        }
        let mut seen = HashSet::new();
        for k in &meta.keys {
            if k.id == 0 || k.id >= meta.next_key_id || !seen.insert(k.id) {
                return Err(bad(format!("key id {} is out of range or repeated", k.id)));
            }
        }
        meta.checks()?;
        Ok(meta)
    }

    pub(super) fn checks(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        self.keys
            .iter()
            .map(|k| {
                unhex(&k.check).map(|c| (k.id, c)).ok_or_else(|| {
                    StateError::corrupt(
                        CRYPTO_META,
                        format!("the key-check record of key id {} is damaged", k.id),
                    )
                })
            })
            .collect()
    }

    fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|e| StateError::Config { message: e.to_string() })
    }
}
