//! Key material: the raw [`EncryptionKey`], the [`Passphrase`] and the [`KeySource`] a caller
//! gives, the [`KdfParams`] of a new store, and the Argon2id derivation that turns a
//! passphrase into a key with the salt and costs recorded in `metadata/crypto.json` (a
//! `KdfRecord`). Secrets here are zeroized on drop and redacted from `Debug`. It calls only
//! the crate's random-bytes helper and the parent module's hex helpers, and does no I/O.

use std::fmt;

use argon2::{Algorithm, Argon2, Version};
use chacha20poly1305::{Key, KeyInit, XChaCha20Poly1305};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::unhex;
use crate::error::{Result, StateError};

/// Upper bounds on KDF costs read from `metadata/crypto.json`, so a damaged or hostile file
/// cannot make start-up allocate without limit.
const MAX_M_COST_KIB: u32 = 4 * 1024 * 1024;
const MAX_T_COST: u32 = 64;
const MAX_P_COST: u32 = 64;

// ---------------------------------------------------------------------------------------
// Key material
// ---------------------------------------------------------------------------------------

/// A raw 256-bit encryption key. Zeroized on drop; `Debug` prints `EncryptionKey([redacted])`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct EncryptionKey([u8; 32]);

impl EncryptionKey {
    /// Wraps 32 key bytes. (The caller's array is a copy this type cannot wipe.)
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        EncryptionKey(bytes)
    }

    /// Copies a key from a slice, which must be exactly 32 bytes long; anything else is
    /// [`StateError::Config`] (naming only the length).
    ///
    /// ```
    /// use mars_state::middleware::crypto::EncryptionKey;
    /// assert!(EncryptionKey::try_from_slice(&[7; 32]).is_ok());
    /// assert!(EncryptionKey::try_from_slice(&[7; 16]).is_err());
    /// ```
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != 32 {
            return Err(StateError::Config {
                message: format!("an encryption key must be 32 bytes long, not {}", bytes.len()),
            });
        }
        let mut key = EncryptionKey([0; 32]);
        key.0.copy_from_slice(bytes);
        Ok(key)
    }

    /// A new random key from the operating system's generator.
    pub fn generate() -> Result<Self> {
        let mut key = EncryptionKey([0; 32]);
        crate::random::fill(&mut key.0)?;
        Ok(key)
    }

    pub(super) fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&self.0))
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey([redacted])")
    }
}

/// A passphrase, stretched into a key with Argon2id (its UTF-8 bytes as given, without
/// Unicode normalization). Zeroized on drop; `Debug` prints `Passphrase([redacted])`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Passphrase(String);

impl Passphrase {
    /// Wraps a passphrase. It must not be empty (checked when it is used).
    pub fn new(passphrase: impl Into<String>) -> Self {
        Passphrase(passphrase.into())
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase([redacted])")
    }
}

/// Where an encryption key comes from: given directly, or derived from a passphrase with the
/// store's Argon2id salt and costs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum KeySource {
    /// A raw 32-byte key.
    Key(EncryptionKey),
    /// A passphrase, stretched with Argon2id.
    Passphrase(Passphrase),
}

impl KeySource {
    pub(super) fn describe(&self) -> &'static str {
        match self {
            KeySource::Key(_) => "encryption key",
            KeySource::Passphrase(_) => "passphrase",
        }
    }
}

impl From<EncryptionKey> for KeySource {
    fn from(key: EncryptionKey) -> Self {
        KeySource::Key(key)
    }
}

impl From<Passphrase> for KeySource {
    fn from(passphrase: Passphrase) -> Self {
        KeySource::Passphrase(passphrase)
    }
}

/// Argon2id costs used when a store is created. An existing store always uses the costs
/// recorded in its `metadata/crypto.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes over the memory.
    pub t_cost: u32,
    /// Lanes (parallelism).
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// OWASP's recommendation for Argon2id (also the argon2 crate's default): 19 MiB, 2
    /// passes, 1 lane.
    fn default() -> Self {
        KdfParams { m_cost_kib: 19 * 1024, t_cost: 2, p_cost: 1 }
    }
}

// ---------------------------------------------------------------------------------------
// Key derivation
// ---------------------------------------------------------------------------------------

/// Turns key sources into keys, running Argon2id off the async threads when needed.
pub(super) async fn derive_keys(
    sources: Vec<KeySource>,
    kdf: &KdfRecord,
) -> Result<Vec<EncryptionKey>> {
    if sources.iter().all(|s| matches!(s, KeySource::Key(_))) {
        return sources.into_iter().map(|s| derive_key(s, kdf)).collect();
    }
    let kdf = kdf.clone();
    tokio::task::spawn_blocking(move || sources.into_iter().map(|s| derive_key(s, &kdf)).collect())
        .await
        .map_err(|_| StateError::unavailable("the key derivation task failed"))?
}

fn derive_key(source: KeySource, kdf: &KdfRecord) -> Result<EncryptionKey> {
    match source {
        KeySource::Key(key) => Ok(key),
        KeySource::Passphrase(passphrase) => argon2id(&passphrase, kdf),
    }
}

fn argon2id(passphrase: &Passphrase, kdf: &KdfRecord) -> Result<EncryptionKey> {
    if passphrase.0.is_empty() {
        return Err(StateError::Config { message: "the encryption passphrase is empty".into() });
    }
    let salt = unhex(&kdf.salt)
        .ok_or_else(|| StateError::Config { message: "invalid KDF salt".into() })?;
    let params = kdf_params(kdf.m_cost_kib, kdf.t_cost, kdf.p_cost)?;
    let mut blocks = vec![argon2::Block::default(); params.block_count()];
    let mut key = EncryptionKey([0; 32]);
    let result = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into_with_memory(passphrase.0.as_bytes(), &salt, &mut key.0, &mut blocks);
    // The working memory is derived from the passphrase; wipe it before freeing it.
    for block in &mut blocks {
        block.as_mut().zeroize();
    }
    result.map_err(|e| StateError::Config { message: format!("key derivation failed: {e}") })?;
    Ok(key)
}

pub(super) fn kdf_params(m_cost_kib: u32, t_cost: u32, p_cost: u32) -> Result<argon2::Params> {
    if m_cost_kib > MAX_M_COST_KIB || t_cost > MAX_T_COST || p_cost > MAX_P_COST {
        return Err(StateError::Config {
            message: format!(
                "Argon2id costs m={m_cost_kib} KiB, t={t_cost}, p={p_cost} exceed the limits \
                 ({MAX_M_COST_KIB} KiB, {MAX_T_COST}, {MAX_P_COST})"
            ),
        });
    }
    argon2::Params::new(m_cost_kib, t_cost, p_cost, Some(32))
        .map_err(|e| StateError::Config { message: format!("invalid Argon2id costs: {e}") })
}

/// The `kdf` object of `metadata/crypto.json`: what [`derive_keys`] stretches a passphrase
/// with. The file as a whole is `keyring::CryptoMeta`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct KdfRecord {
    pub(super) algorithm: String,
    pub(super) version: u32,
    pub(super) salt: String,
    pub(super) m_cost_kib: u32,
    pub(super) t_cost: u32,
    pub(super) p_cost: u32,
}
