//! Encryption at rest: [`EncryptionLayer`] wraps any [`StorageBackend`] into an
//! [`Encrypted`] backend that seals every value with XChaCha20-Poly1305 before it reaches
//! the inner backend, and opens (and authenticates) it on the way back.
//!
//! # Where it sits
//!
//! A save goes: session actor → codec (JSON envelope, CRC, optional gzip) → other middleware
//! → **`Encrypted`** → backend. So the layer sees finished, possibly compressed records and
//! compression keeps working (ciphertext does not compress). It is a plain
//! [`StorageBackend`], so it wraps every backend and forwards every method.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> mars_state::Result<()> {
//! use mars_state::middleware::crypto::{EncryptionKey, EncryptionLayer};
//! use mars_state::{MemoryStorageBackend, StorageBackend, StorageKey};
//!
//! let store = EncryptionLayer::new(EncryptionKey::generate()?).wrap(MemoryStorageBackend::new()).await?;
//! let key = StorageKey::new("sessions/s1.json")?;
//! store.put(&key, b"{\"secret\":1}".to_vec()).await?;
//! assert_eq!(store.get(&key).await?.as_deref(), Some(&b"{\"secret\":1}"[..]));
//! // The inner backend only ever holds ciphertext.
//! assert!(!store.inner().get(&key).await?.unwrap_or_default().windows(6).any(|w| w == b"secret"));
//! # Ok(()) }
//! ```
//!
//! # Keys
//!
//! A key is a raw 32-byte [`EncryptionKey`] or a [`Passphrase`] stretched with Argon2id
//! (v1.3, 32-byte output) using the salt and costs kept in `metadata/crypto.json`. Each key
//! the store has seen gets a small number, its *key id* (1, 2, ... from a counter in
//! `metadata/crypto.json`, never reused), and a *key-check record*: a fixed plaintext sealed
//! under the key with the record scheme below (storage-key name `.key-check`, which no real
//! key can have). Opening with a key or passphrase that opens no key-check record fails at
//! once with [`StateError::WrongKey`]; reads never have to guess. Rotation
//! ([`Encrypted::rotate_to`]) adds a key and makes it the one used for writes; older keys
//! stay readable until [`Encrypted::retire_keys_except_current`] drops them.
//!
//! # On-disk formats
//!
//! **Records** (every key except the plaintext and log keys below):
//!
//! ```text
//! "MSE1" | key id: u32 LE | nonce: 24 random bytes | ciphertext | Poly1305 tag: 16 bytes
//! AAD = "mars-state/enc/1\0" ‖ storage key ‖ "\0" ‖ key id (u32 LE)
//! ```
//!
//! A record is exactly [`RECORD_OVERHEAD`] (48) bytes longer than its plaintext. The AAD
//! binds it to its storage key (so to its session and checkpoint ids) and to the format
//! version: a record copied over another key, a flipped bit anywhere, a truncation, or a
//! plaintext record planted in the store are all [`StateError::Corrupt`]. A record sealed
//! under a key id this store issued but that was not supplied (or was retired) is
//! [`StateError::WrongKey`] naming the id; an id the store never issued is `Corrupt`.
//!
//! **Logs** (keys under `metadata/` ending in `.log`: the index journal), which grow by
//! `append`, are a sequence of self-delimiting frames, one per append (and one per MiB of a
//! `put`, which compaction uses to rewrite the whole log):
//!
//! ```text
//! "MSL1" | len: u32 LE | key id: u32 LE | CRC-32 of the 12 bytes before: u32 LE
//!        | nonce: 24 random bytes | ciphertext + tag: len bytes
//! AAD = "mars-state/log/1\0" ‖ storage key ‖ "\0" ‖ key id (u32 LE)
//! ```
//!
//! `get` returns the concatenated plaintext of the frames. The end of a log may be torn by a
//! crash during an append (the storage contract allows it): a last frame with fewer bytes
//! than its length, or a tail of zero bytes, is dropped silently, and the next `append`
//! first rewrites the log without it, so a torn frame never ends up in the middle. Any other
//! damage (a bad header checksum, a frame failing authentication, foreign bytes) is
//! `Corrupt`. Frames are bound to their log's key, not to their position: someone who can
//! write the store can drop, reorder or repeat whole frames of the same log undetected. The
//! journal only caches what the records say and is reconciled against them at start.
//!
//! **Plaintext keys**, passed through untouched because they must be readable before a key
//! exists or hold nothing: `metadata/store.json` (format version and compression),
//! `metadata/crypto.json` (this layer's metadata, below; callers may read it but not write or
//! delete it), `metadata/LOCK`, and the empty delete markers under `metadata/pending/`.
//!
//! `metadata/crypto.json`:
//!
//! ```text
//! {"mars_state_crypto":1,"cipher":"XChaCha20-Poly1305",
//!  "kdf":{"algorithm":"argon2id","version":19,"salt":"<16 random bytes, hex>",
//!         "m_cost_kib":19456,"t_cost":2,"p_cost":1},
//!  "next_key_id":2,"keys":[{"id":1,"check":"<key-check record, hex>"}]}
//! ```
//!
//! It is replaced atomically (`put`) whenever a key is added or retired.
//!
//! # What stays visible on disk
//!
//! Encrypted: the whole content of every session record and checkpoint (state data, and the
//! envelope's `saved_at`, `branch_id`, `timestamp`), the index journal's content (sizes,
//! save times, branch ids), and quarantined copies.
//!
//! Visible to anyone who can list the store:
//! - file names: session ids, checkpoint ids (which embed their creation time in ms), the
//!   compression extension, and so the number of sessions and of checkpoints per session;
//!   quarantine names (time and key of the damaged record); pending-delete markers (which
//!   session is being deleted);
//! - sizes: every record's plaintext size plus 48 bytes, which for gzip-compressed stores
//!   also hints at how compressible a state is; the journal's size and frame boundaries
//!   (how many index changes and how big);
//! - times: file modification and creation times, so when each session was saved;
//! - which key id sealed each record (so how far a rotation has come), the KDF salt and
//!   costs, and the store's compression setting.
//!
//! Not protected: rolling a record back to an older version of itself under the same key
//! (AEAD alone cannot tell versions apart), deleting files, and the journal frame games above.
//!
//! # Secrets
//!
//! Keys, passphrases and derived keys are zeroized on drop and print as `[redacted]`; the
//! Argon2 working memory is wiped after use. No error or log line of this module contains
//! key material, a passphrase or plaintext: errors name storage keys and key ids only.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use argon2::{Algorithm, Argon2, Version};
use async_trait::async_trait;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Key, KeyInit, Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::backend::{FileStorageBackend, ObjectMeta, StorageBackend, StorageKey, SweepReport};
use crate::error::{Result, StateError};

/// Magic of an encrypted record.
const RECORD_MAGIC: &[u8; 4] = b"MSE1";
/// Magic of an encrypted log frame.
const FRAME_MAGIC: &[u8; 4] = b"MSL1";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Magic, key id, nonce.
const RECORD_HEADER: usize = 4 + 4 + NONCE_LEN;
/// Bytes an encrypted record adds to its plaintext (header and tag). [`Encrypted`]'s `list`
/// subtracts it, so listed sizes are the sizes `get` returns.
pub const RECORD_OVERHEAD: usize = RECORD_HEADER + TAG_LEN;
/// Magic, length, key id, header CRC.
const FRAME_FIXED: usize = 16;
/// The fixed part and the nonce.
const FRAME_HEADER: usize = FRAME_FIXED + NONCE_LEN;
/// Largest plaintext sealed into one log frame; longer values become several frames.
const FRAME_MAX_PLAIN: usize = 1 << 20;
const RECORD_AAD: &[u8] = b"mars-state/enc/1\0";
const FRAME_AAD: &[u8] = b"mars-state/log/1\0";
/// The storage-key name in a key-check record's AAD. It starts with a dot, so it is not a
/// valid [`StorageKey`] and no stored record can be swapped for a key-check record.
const CHECK_NAME: &str = ".key-check";
const CHECK_PLAINTEXT: &[u8] = b"mars-state key check, format 1";

const CRYPTO_META: &str = "metadata/crypto.json";
const CRYPTO_FORMAT: u32 = 1;
const CIPHER_NAME: &str = "XChaCha20-Poly1305";
const KDF_NAME: &str = "argon2id";
const KDF_VERSION: u32 = 0x13;
const SALT_LEN: usize = 16;
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
        fill_random(&mut key.0)?;
        Ok(key)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
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
    fn describe(&self) -> &'static str {
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
// The layer
// ---------------------------------------------------------------------------------------

/// Configuration of encryption at rest: the key to write with, older keys to read with, and
/// the KDF costs for a new store. [`wrap`](Self::wrap) turns a backend into an
/// [`Encrypted`] one. Key material in it is redacted from `Debug`.
#[derive(Clone, Debug)]
pub struct EncryptionLayer {
    current: KeySource,
    previous: Vec<KeySource>,
    kdf: KdfParams,
}

impl EncryptionLayer {
    /// Encrypts with `current` (a key or a passphrase).
    pub fn new(current: impl Into<KeySource>) -> Self {
        EncryptionLayer { current: current.into(), previous: Vec::new(), kdf: KdfParams::default() }
    }

    /// Adds an older key that records may still be sealed with (during or after an
    /// interrupted rotation). A previous key that opens none of the store's key-check
    /// records is ignored with a warning (it may have been retired already).
    pub fn previous_key(mut self, key: impl Into<KeySource>) -> Self {
        self.previous.push(key.into());
        self
    }

    /// Argon2id costs for a store created by this layer (default: [`KdfParams::default`]).
    pub fn kdf_params(mut self, params: KdfParams) -> Self {
        self.kdf = params;
        self
    }

    /// Reads (or, for a new store, creates) `metadata/crypto.json` through `inner`, derives
    /// and checks the keys, and returns the wrapped backend.
    ///
    /// Errors: [`StateError::WrongKey`] if the current key or passphrase opens none of the
    /// store's key-check records; [`StateError::Corrupt`] if `metadata/crypto.json` is
    /// damaged; [`StateError::Config`] for an empty passphrase or invalid KDF costs; the
    /// inner backend's errors.
    ///
    /// Do not open one fresh store from two places at once: both would create its metadata.
    pub async fn wrap<B: StorageBackend>(&self, inner: B) -> Result<Encrypted<B>> {
        Encrypted::build(inner, self.current.clone(), self.previous.clone(), self.kdf).await
    }
}

// ---------------------------------------------------------------------------------------
// The wrapper
// ---------------------------------------------------------------------------------------

/// The keys a handle can use.
struct Keyring {
    /// Key id used for writes.
    current: u32,
    ciphers: BTreeMap<u32, Arc<XChaCha20Poly1305>>,
    /// Every id below this was issued by the store at some time.
    next_id: u32,
}

/// A backend whose values are encrypted at rest (see the [module docs](self) for the format
/// and for what stays visible). Built by [`EncryptionLayer::wrap`] or [`Encrypted::open`].
pub struct Encrypted<B> {
    /// Shared so a manager given this wrapper can reach the backend below it (for
    /// quarantine copies of records this layer refuses).
    inner: Arc<B>,
    keyring: RwLock<Keyring>,
    /// The contents of `metadata/crypto.json`; held while it is rewritten.
    meta: tokio::sync::Mutex<CryptoMeta>,
    /// Logs whose last `get` found a torn tail, to be cut before the next append.
    torn_logs: Mutex<HashSet<StorageKey>>,
}

/// The file backend with encryption at rest (see [`Encrypted::open_path`]). Handed to
/// [`StateManager::builder`](crate::StateManager::builder) it gives the same encrypted
/// store as a [`FileStorageBackend`] with
/// [`encryption_key`](crate::StateManagerBuilder::encryption_key) (records named `.enc`,
/// key rotation, quarantine copies): a store made either way opens the other way too.
pub type EncryptedFileStorageBackend = Encrypted<FileStorageBackend>;

impl Encrypted<FileStorageBackend> {
    /// Opens, or creates, an encrypted file store at `path`: a [`FileStorageBackend`]
    /// (which takes the store's lock) wrapped by an [`EncryptionLayer`] writing with `key`.
    /// A new store gets the default KDF costs. Errors as [`FileStorageBackend::new`] and
    /// [`EncryptionLayer::wrap`].
    ///
    /// ```no_run
    /// # async fn demo() -> mars_state::Result<()> {
    /// use mars_state::middleware::crypto::{EncryptedFileStorageBackend, Passphrase};
    /// let backend = EncryptedFileStorageBackend::open_path("./state_storage", Passphrase::new("correct horse")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn open_path(path: impl AsRef<Path>, key: impl Into<KeySource>) -> Result<Self> {
        EncryptionLayer::new(key).wrap(FileStorageBackend::new(path)?).await
    }
}

impl<B: fmt::Debug> fmt::Debug for Encrypted<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ring = self.ring();
        f.debug_struct("Encrypted")
            .field("inner", &self.inner)
            .field("current_key_id", &ring.current)
            .field("key_ids", &ring.ciphers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<B> Encrypted<B> {
    fn ring(&self) -> RwLockReadGuard<'_, Keyring> {
        // Keyring updates are single assignments/inserts; a panic cannot tear one.
        self.keyring.read().unwrap_or_else(|p| p.into_inner())
    }

    fn ring_mut(&self) -> RwLockWriteGuard<'_, Keyring> {
        self.keyring.write().unwrap_or_else(|p| p.into_inner())
    }

    fn torn(&self) -> MutexGuard<'_, HashSet<StorageKey>> {
        self.torn_logs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<B: StorageBackend> Encrypted<B> {
    /// Wraps `inner`, writing with `current` and also reading with `previous`; a new store
    /// gets the default KDF costs. Same as
    /// `EncryptionLayer::new(current).previous_key(..)...wrap(inner)`; see
    /// [`EncryptionLayer::wrap`] for the errors.
    pub async fn open(inner: B, current: KeySource, previous: Vec<KeySource>) -> Result<Self> {
        Self::build(inner, current, previous, KdfParams::default()).await
    }

    async fn build(inner: B, current: KeySource, previous: Vec<KeySource>, kdf: KdfParams) -> Result<Self> {
        let meta_key = crypto_meta_key();
        let existing = match inner.get(&meta_key).await? {
            Some(bytes) => Some(CryptoMeta::parse(&bytes)?),
            None => None,
        };
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
            let id = meta.next_key_id;
            meta.keys.push(KeyCheck { id, check: hex(&seal_check(&current, id)?) });
            meta.next_key_id = bump(id)?;
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
                    let id = meta.next_key_id;
                    meta.keys.push(KeyCheck { id, check: hex(&seal_check(&current, id)?) });
                    meta.next_key_id = bump(id)?;
                    inner.put(&meta_key, meta.to_json()?).await?;
                    ring.next_id = meta.next_key_id;
                    info!(key_id = id, "recorded the new encryption key of a rotation that was cut off");
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

    /// The wrapped backend (which holds ciphertext).
    pub fn inner(&self) -> &B {
        self.inner.as_ref()
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

    /// The key id of stored bytes as the inner backend holds them: for a record its key id;
    /// for a log the key id all its frames share. `None` for plaintext, unrecognised bytes,
    /// an empty log, or a log whose frames use several keys (so `!= Some(current)` means
    /// "needs re-encryption").
    pub fn key_id_of(&self, stored: &[u8]) -> Option<u32> {
        if stored.len() >= RECORD_OVERHEAD && stored.starts_with(RECORD_MAGIC) {
            return Some(le_u32(stored, 4));
        }
        if !stored.starts_with(FRAME_MAGIC) {
            return None;
        }
        let scan = scan_frames(&crypto_meta_key(), stored).ok()?;
        let first = scan.frames.first()?.id;
        scan.frames.iter().all(|f| f.id == first).then_some(first)
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
        let id = meta.next_key_id;
        let mut next = meta.clone();
        next.keys.push(KeyCheck { id, check: hex(&seal_check(&cipher, id)?) });
        next.next_key_id = bump(id)?;
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

    /// The current key id and its cipher.
    fn current(&self) -> Result<(u32, Arc<XChaCha20Poly1305>)> {
        let ring = self.ring();
        let cipher = ring
            .ciphers
            .get(&ring.current)
            .cloned()
            .ok_or_else(|| StateError::WrongKey { reason: "no current encryption key".into() })?;
        Ok((ring.current, cipher))
    }

    /// The cipher for key id `id`, found in `key`'s stored bytes.
    fn cipher_for(&self, key: &StorageKey, id: u32) -> Result<Arc<XChaCha20Poly1305>> {
        let ring = self.ring();
        if let Some(cipher) = ring.ciphers.get(&id) {
            return Ok(cipher.clone());
        }
        if id >= 1 && id < ring.next_id {
            Err(StateError::WrongKey {
                reason: format!(
                    "{key} is sealed with key id {id}, which was not supplied (pass it as a previous key) or has been retired"
                ),
            })
        } else {
            Err(StateError::corrupt(key, format!("sealed with key id {id}, which this store never issued")))
        }
    }

    fn seal_record(&self, key: &StorageKey, plain: Vec<u8>) -> Result<Vec<u8>> {
        let (id, cipher) = self.current()?;
        seal_record(&cipher, id, key.as_str(), plain)
    }

    fn open_record(&self, key: &StorageKey, mut raw: Vec<u8>) -> Result<Vec<u8>> {
        if !raw.starts_with(RECORD_MAGIC) {
            let reason = if raw.len() < RECORD_MAGIC.len() && RECORD_MAGIC.starts_with(&raw) {
                "truncated encrypted record"
            } else {
                "not encrypted (no MSE1 header): a plaintext or foreign record in an encrypted store"
            };
            return Err(StateError::corrupt(key, reason));
        }
        if raw.len() < RECORD_OVERHEAD {
            return Err(StateError::corrupt(key, "truncated encrypted record"));
        }
        let id = le_u32(&raw, 4);
        let cipher = self.cipher_for(key, id)?;
        let len = raw.len();
        let (head, body) = raw.split_at_mut(RECORD_HEADER);
        let (ct, tag) = body.split_at_mut(len - RECORD_OVERHEAD);
        let aad = aad(RECORD_AAD, key.as_str(), id);
        cipher.decrypt_in_place_detached(XNonce::from_slice(&head[8..]), &aad, ct, Tag::from_slice(tag)).map_err(
            |_| StateError::corrupt(key, "authentication failed: damaged, truncated, or moved from another key"),
        )?;
        raw.truncate(len - TAG_LEN);
        raw.drain(..RECORD_HEADER);
        Ok(raw)
    }

    /// Seals `plain` as log frames under the current key.
    fn seal_frames(&self, key: &StorageKey, mut plain: Vec<u8>) -> Result<Vec<u8>> {
        let (id, cipher) = self.current()?;
        let frames = plain.len().div_ceil(FRAME_MAX_PLAIN);
        let mut out = Vec::with_capacity(plain.len() + frames * (FRAME_HEADER + TAG_LEN));
        let aad = aad(FRAME_AAD, key.as_str(), id);
        for chunk in plain.chunks(FRAME_MAX_PLAIN) {
            let start = out.len();
            out.extend_from_slice(FRAME_MAGIC);
            out.extend_from_slice(&((chunk.len() + TAG_LEN) as u32).to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
            let crc = crc32fast::hash(&out[start..start + 12]);
            out.extend_from_slice(&crc.to_le_bytes());
            let nonce = random_nonce()?;
            out.extend_from_slice(&nonce);
            let body = out.len();
            out.extend_from_slice(chunk);
            let tag = cipher
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, &mut out[body..])
                .map_err(|_| too_large(key))?;
            out.extend_from_slice(&tag);
        }
        // The frames hold their own copy; do not leave the journal's plaintext behind.
        plain.zeroize();
        Ok(out)
    }

    /// Decrypts a log's frames; drops (and remembers) a torn tail.
    fn open_frames(&self, key: &StorageKey, raw: &[u8]) -> Result<Vec<u8>> {
        let scan = scan_frames(key, raw)?;
        let mut out = Vec::with_capacity(raw.len());
        for frame in &scan.frames {
            let cipher = self.cipher_for(key, frame.id)?;
            let aad = aad(FRAME_AAD, key.as_str(), frame.id);
            let body = frame.start + FRAME_HEADER;
            let end = body + frame.len;
            let nonce = XNonce::from_slice(&raw[body - NONCE_LEN..body]);
            let at = out.len();
            out.extend_from_slice(&raw[body..end - TAG_LEN]);
            let tag = Tag::from_slice(&raw[end - TAG_LEN..end]);
            if cipher.decrypt_in_place_detached(nonce, &aad, &mut out[at..], tag).is_err() {
                out.zeroize();
                return Err(StateError::corrupt(
                    key,
                    format!("log frame at byte {} failed authentication (damaged, or from another log)", frame.start),
                ));
            }
        }
        if scan.torn {
            debug!(key = %key, valid_bytes = scan.valid_len, "dropped the torn tail of an encrypted log");
            self.torn().insert(key.clone());
        }
        Ok(out)
    }

    /// Cuts a torn tail found by an earlier `get` off the log, so the next frame does not
    /// land behind it.
    async fn cut_torn_tail(&self, key: &StorageKey) -> Result<()> {
        if !self.torn().contains(key) {
            return Ok(());
        }
        if let Some(raw) = self.inner.get(key).await?
            && let Ok(scan) = scan_frames(key, &raw)
            && scan.torn
        {
            let mut raw = raw;
            raw.truncate(scan.valid_len);
            // An atomic replace: a crash leaves the torn log or the cut one, both readable.
            self.inner.put(key, raw).await?;
            debug!(key = %key, "cut the torn tail of an encrypted log before appending");
        }
        self.torn().remove(key);
        Ok(())
    }
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
/// or `Encrypted` over the memory backend or over `Arc<dyn StorageBackend>`), its keyring
/// and the backend below it. The manager then treats the store as encrypted, exactly as
/// with its own `encryption_key`. An `Encrypted` over another backend type cannot be
/// recognised here; give such a backend to the manager unwrapped, with the key.
pub(crate) fn find_layer(backend: &Arc<dyn std::any::Any + Send + Sync>) -> Option<FoundLayer> {
    fn parts<T: StorageBackend>(backend: &Arc<dyn std::any::Any + Send + Sync>) -> Option<FoundLayer> {
        let layer = backend.clone().downcast::<Encrypted<T>>().ok()?;
        let below: Arc<dyn StorageBackend> = layer.inner.clone();
        Some((layer, below))
    }
    parts::<FileStorageBackend>(backend)
        .or_else(|| parts::<crate::MemoryStorageBackend>(backend))
        .or_else(|| parts::<Arc<dyn StorageBackend>>(backend))
}

/// Whether values at `key` are stored as they are, unencrypted: `metadata/store.json`,
/// `metadata/crypto.json`, `metadata/LOCK`, and the markers under `metadata/pending/`.
pub fn stored_in_plaintext(key: &StorageKey) -> bool {
    matches!(key.as_str(), "metadata/store.json" | CRYPTO_META | "metadata/LOCK")
        || key.as_str().starts_with("metadata/pending/")
}

/// Whether `key` is an append-only log stored as encrypted frames: any key under
/// `metadata/` whose name ends in `.log` (the index journal is `metadata/index.log`).
pub fn is_log_key(key: &StorageKey) -> bool {
    let k = key.as_str();
    k.starts_with("metadata/") && k.ends_with(".log") && !stored_in_plaintext(key)
}

fn crypto_meta_key() -> StorageKey {
    StorageKey::from_valid(CRYPTO_META.to_owned())
}

fn refuse_reserved(key: &StorageKey) -> Result<()> {
    if key.as_str() == CRYPTO_META {
        return Err(StateError::Config {
            message: format!("{CRYPTO_META} is managed by the encryption layer and cannot be written or deleted"),
        });
    }
    Ok(())
}

/// Forwards every method; `get`/`put`/`append` decrypt/encrypt, `list` reports the sizes
/// `get` would return (for logs, the stored size: it cannot be known without reading).
#[async_trait]
impl<B: StorageBackend> StorageBackend for Encrypted<B> {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        let Some(raw) = self.inner.get(key).await? else { return Ok(None) };
        if stored_in_plaintext(key) {
            Ok(Some(raw))
        } else if is_log_key(key) {
            self.open_frames(key, &raw).map(Some)
        } else {
            self.open_record(key, raw).map(Some)
        }
    }

    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        refuse_reserved(key)?;
        if stored_in_plaintext(key) {
            return self.inner.put(key, value).await;
        }
        let log = is_log_key(key);
        let sealed = if log { self.seal_frames(key, value)? } else { self.seal_record(key, value)? };
        self.inner.put(key, sealed).await?;
        if log {
            self.torn().remove(key);
        }
        Ok(())
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool> {
        refuse_reserved(key)?;
        let existed = self.inner.delete(key).await?;
        self.torn().remove(key);
        Ok(existed)
    }

    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        let mut metas = self.inner.list(prefix).await?;
        for meta in &mut metas {
            if !stored_in_plaintext(&meta.key) && !is_log_key(&meta.key) {
                meta.size = meta.size.saturating_sub(RECORD_OVERHEAD as u64);
            }
        }
        Ok(metas)
    }

    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        refuse_reserved(key)?;
        if stored_in_plaintext(key) {
            return self.inner.append(key, bytes).await;
        }
        if !is_log_key(key) {
            return Err(StateError::Config {
                message: format!("{key} is not a log (metadata/*.log); an encrypted store appends only to logs"),
            });
        }
        self.cut_torn_tail(key).await?;
        let frames = self.seal_frames(key, bytes)?;
        self.inner.append(key, frames).await
    }

    async fn sweep(&self) -> Result<SweepReport> {
        self.inner.sweep().await
    }
}

// ---------------------------------------------------------------------------------------
// Sealing helpers
// ---------------------------------------------------------------------------------------

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn aad(domain: &[u8], name: &str, id: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(domain.len() + name.len() + 5);
    aad.extend_from_slice(domain);
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&id.to_le_bytes());
    aad
}

fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        StateError::io("drawing random bytes for encryption", PathBuf::new(), std::io::Error::other(e.to_string()))
    })
}

fn random_nonce() -> Result<[u8; NONCE_LEN]> {
    let mut nonce = [0; NONCE_LEN];
    fill_random(&mut nonce)?;
    Ok(nonce)
}

fn too_large(key: impl fmt::Display) -> StateError {
    StateError::Config { message: format!("the value for {key} is too large to encrypt") }
}

/// Seals `plain` (encrypted in place, so no plaintext copy is left) as a record.
fn seal_record(cipher: &XChaCha20Poly1305, id: u32, name: &str, mut plain: Vec<u8>) -> Result<Vec<u8>> {
    let nonce = random_nonce()?;
    let tag = cipher
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad(RECORD_AAD, name, id), &mut plain)
        .map_err(|_| too_large(name))?;
    let mut out = Vec::with_capacity(RECORD_OVERHEAD + plain.len());
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&plain);
    out.extend_from_slice(&tag);
    Ok(out)
}

fn seal_check(cipher: &XChaCha20Poly1305, id: u32) -> Result<Vec<u8>> {
    seal_record(cipher, id, CHECK_NAME, CHECK_PLAINTEXT.to_vec())
}

/// Whether `check` is a key-check record for key id `id` sealed with `cipher`.
fn opens_check(cipher: &XChaCha20Poly1305, id: u32, check: &[u8]) -> bool {
    if check.len() != RECORD_OVERHEAD + CHECK_PLAINTEXT.len()
        || !check.starts_with(RECORD_MAGIC)
        || le_u32(check, 4) != id
    {
        return false;
    }
    let mut body = check[RECORD_HEADER..check.len() - TAG_LEN].to_vec();
    let tag = Tag::from_slice(&check[check.len() - TAG_LEN..]);
    let nonce = XNonce::from_slice(&check[8..RECORD_HEADER]);
    cipher.decrypt_in_place_detached(nonce, &aad(RECORD_AAD, CHECK_NAME, id), &mut body, tag).is_ok()
        && body == CHECK_PLAINTEXT
}

/// The key id whose key-check record `cipher` opens.
fn match_check(cipher: &XChaCha20Poly1305, checks: &[(u32, Vec<u8>)]) -> Option<u32> {
    checks.iter().find(|(id, check)| opens_check(cipher, *id, check)).map(|(id, _)| *id)
}

fn bump(id: u32) -> Result<u32> {
    id.checked_add(1).ok_or_else(|| StateError::Config { message: "encryption key ids are exhausted".into() })
}

/// One frame found by [`scan_frames`]: where it starts and its ciphertext+tag length.
struct FrameRef {
    id: u32,
    start: usize,
    len: usize,
}

struct FrameScan {
    frames: Vec<FrameRef>,
    /// Bytes up to the end of the last complete frame.
    valid_len: usize,
    /// Whether bytes after it were a torn frame (or a zero-filled tail) and were dropped.
    torn: bool,
}

/// Splits a log into frames, checking each header's CRC; does not decrypt.
fn scan_frames(key: &StorageKey, raw: &[u8]) -> Result<FrameScan> {
    let mut frames = Vec::new();
    let mut pos = 0;
    let mut torn = false;
    while pos < raw.len() {
        let rest = &raw[pos..];
        // A crash can leave a log extended by zeros (size updated, data never written).
        if rest.iter().all(|b| *b == 0) {
            torn = true;
            break;
        }
        if rest.len() < FRAME_FIXED {
            if FRAME_MAGIC.starts_with(&rest[..rest.len().min(4)]) {
                torn = true;
                break;
            }
            return Err(StateError::corrupt(key, format!("log damaged at byte {pos}")));
        }
        if !rest.starts_with(FRAME_MAGIC) {
            let reason = if pos == 0 {
                "not encrypted (no MSL1 frame header): a plaintext or foreign log in an encrypted store".to_owned()
            } else {
                format!("log damaged at byte {pos} (no frame header)")
            };
            return Err(StateError::corrupt(key, reason));
        }
        if crc32fast::hash(&rest[..12]) != le_u32(rest, 12) {
            return Err(StateError::corrupt(key, format!("log frame header at byte {pos} is damaged")));
        }
        let len = le_u32(rest, 4) as usize;
        if len < TAG_LEN {
            return Err(StateError::corrupt(key, format!("log frame at byte {pos} is too short")));
        }
        if rest.len() < FRAME_HEADER + len {
            torn = true;
            break;
        }
        frames.push(FrameRef { id: le_u32(rest, 8), start: pos, len });
        pos += FRAME_HEADER + len;
    }
    Ok(FrameScan { frames, valid_len: pos, torn })
}

// ---------------------------------------------------------------------------------------
// Key derivation and metadata
// ---------------------------------------------------------------------------------------

/// Turns key sources into keys, running Argon2id off the async threads when needed.
async fn derive_keys(sources: Vec<KeySource>, kdf: &KdfRecord) -> Result<Vec<EncryptionKey>> {
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
    let salt = unhex(&kdf.salt).ok_or_else(|| StateError::Config { message: "invalid KDF salt".into() })?;
    let params = kdf_params(kdf.m_cost_kib, kdf.t_cost, kdf.p_cost)?;
    let mut blocks = vec![argon2::Block::default(); params.block_count()];
    let mut key = EncryptionKey([0; 32]);
    let result = Argon2::new(Algorithm::Argon2id, Version::V0x13, params).hash_password_into_with_memory(
        passphrase.0.as_bytes(),
        &salt,
        &mut key.0,
        &mut blocks,
    );
    // The working memory is derived from the passphrase; wipe it before freeing it.
    for block in &mut blocks {
        block.as_mut().zeroize();
    }
    result.map_err(|e| StateError::Config { message: format!("key derivation failed: {e}") })?;
    Ok(key)
}

fn kdf_params(m_cost_kib: u32, t_cost: u32, p_cost: u32) -> Result<argon2::Params> {
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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CryptoMeta {
    mars_state_crypto: u32,
    cipher: String,
    kdf: KdfRecord,
    next_key_id: u32,
    keys: Vec<KeyCheck>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KdfRecord {
    algorithm: String,
    version: u32,
    salt: String,
    m_cost_kib: u32,
    t_cost: u32,
    p_cost: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyCheck {
    id: u32,
    check: String,
}

impl CryptoMeta {
    fn new(kdf: KdfParams) -> Result<Self> {
        kdf_params(kdf.m_cost_kib, kdf.t_cost, kdf.p_cost)?;
        let mut salt = [0; SALT_LEN];
        fill_random(&mut salt)?;
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

    fn parse(bytes: &[u8]) -> Result<Self> {
        let bad = |reason: String| StateError::corrupt(CRYPTO_META, reason);
        let meta: CryptoMeta =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("encryption metadata does not parse: {e}")))?;
        if meta.mars_state_crypto != CRYPTO_FORMAT {
            return Err(StateError::Config {
                message: format!("unsupported encryption metadata format {}", meta.mars_state_crypto),
            });
        }
        if meta.cipher != CIPHER_NAME || meta.kdf.algorithm != KDF_NAME || meta.kdf.version != KDF_VERSION {
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
        kdf_params(meta.kdf.m_cost_kib, meta.kdf.t_cost, meta.kdf.p_cost).map_err(|e| bad(e.to_string()))?;
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

    fn checks(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        self.keys
            .iter()
            .map(|k| {
                unhex(&k.check).map(|c| (k.id, c)).ok_or_else(|| {
                    StateError::corrupt(CRYPTO_META, format!("the key-check record of key id {} is damaged", k.id))
                })
            })
            .collect()
    }

    fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|e| StateError::Config { message: e.to_string() })
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [DIGITS[(b >> 4) as usize] as char, DIGITS[(b & 15) as usize] as char]).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    s.as_bytes().chunks(2).map(|d| Some(nibble(d[0])? << 4 | nibble(d[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorageBackend;

    type Enc = Encrypted<MemoryStorageBackend>;

    const MARKER: &[u8] = b"PLAINTEXT-MARKER-7f3a";

    fn k(s: &str) -> StorageKey {
        StorageKey::new(s).unwrap()
    }

    fn key(n: u8) -> EncryptionKey {
        EncryptionKey::from_bytes([n; 32])
    }

    /// Cheap Argon2id costs so passphrase tests run fast in debug builds.
    fn fast() -> KdfParams {
        KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 }
    }

    async fn open(mem: &MemoryStorageBackend, current: impl Into<KeySource>) -> Result<Enc> {
        EncryptionLayer::new(current).kdf_params(fast()).wrap(mem.clone()).await
    }

    async fn open_with(
        mem: &MemoryStorageBackend,
        current: impl Into<KeySource>,
        previous: Vec<KeySource>,
    ) -> Result<Enc> {
        let mut layer = EncryptionLayer::new(current).kdf_params(fast());
        for p in previous {
            layer = layer.previous_key(p);
        }
        layer.wrap(mem.clone()).await
    }

    fn record(n: usize) -> Vec<u8> {
        let mut v = format!(r#"{{"mars_state":1,"n":{n},"secret":""#).into_bytes();
        v.extend_from_slice(MARKER);
        v.extend_from_slice(b"\"}\n");
        v
    }

    #[track_caller]
    fn assert_corrupt<T: fmt::Debug>(r: Result<T>, what: &str) {
        assert!(matches!(r, Err(StateError::Corrupt { .. })), "{what}: expected Corrupt, got {r:?}");
    }

    #[track_caller]
    fn assert_wrong_key<T: fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(e @ StateError::WrongKey { .. }) => e.to_string(),
            other => panic!("expected WrongKey, got {other:?}"),
        }
    }

    async fn all_stored(mem: &MemoryStorageBackend) -> Vec<(StorageKey, Vec<u8>)> {
        let mut out = Vec::new();
        for prefix in ["sessions", "checkpoints", "metadata", "quarantine"] {
            for meta in mem.list(&k(prefix)).await.unwrap() {
                let bytes = mem.get(&meta.key).await.unwrap().unwrap();
                out.push((meta.key, bytes));
            }
        }
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn round_trip_and_contract() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, key(1)).await.unwrap();
        let s1 = k("sessions/s1.json");
        let c1 = k("checkpoints/s1/c1.json.gz");
        assert_eq!(enc.get(&s1).await.unwrap(), None);
        enc.put(&s1, record(1)).await.unwrap();
        enc.put(&c1, Vec::new()).await.unwrap();
        assert_eq!(enc.get(&s1).await.unwrap(), Some(record(1)));
        assert_eq!(enc.get(&c1).await.unwrap(), Some(Vec::new()));
        // Stored with exactly the documented overhead; list reports what get returns.
        assert_eq!(mem.get(&s1).await.unwrap().unwrap().len(), record(1).len() + RECORD_OVERHEAD);
        let listed = enc.list(&k("sessions")).await.unwrap();
        assert_eq!(listed, [ObjectMeta { key: s1.clone(), size: record(1).len() as u64 }]);
        assert_eq!(enc.list(&k("checkpoints/s1")).await.unwrap()[0].size, 0);
        // Overwrite, delete.
        enc.put(&s1, record(2)).await.unwrap();
        assert_eq!(enc.get(&s1).await.unwrap(), Some(record(2)));
        assert!(enc.delete(&s1).await.unwrap());
        assert!(!enc.delete(&s1).await.unwrap());
        assert_eq!(enc.get(&s1).await.unwrap(), None);
        assert_eq!(enc.sweep().await.unwrap(), SweepReport::default());
        // Plaintext pass-through keys are stored as they are.
        let store_meta = k("metadata/store.json");
        enc.put(&store_meta, br#"{"mars_state":1}"#.to_vec()).await.unwrap();
        assert_eq!(mem.get(&store_meta).await.unwrap().as_deref(), Some(&br#"{"mars_state":1}"#[..]));
        let pending = k("metadata/pending/s1");
        enc.put(&pending, Vec::new()).await.unwrap();
        assert_eq!(mem.get(&pending).await.unwrap(), Some(Vec::new()));
        assert_eq!(enc.list(&k("metadata/pending")).await.unwrap()[0].size, 0);
        // Appending to something that is not a log is refused rather than half-supported.
        assert!(matches!(enc.append(&k("sessions/s2.json"), b"x".to_vec()).await, Err(StateError::Config { .. })));
    }

    #[tokio::test]
    async fn crypto_metadata_is_plaintext_and_reserved() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, Passphrase::new("correct horse battery staple")).await.unwrap();
        let meta_key = k(CRYPTO_META);
        let raw = mem.get(&meta_key).await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(v["mars_state_crypto"], 1);
        assert_eq!(v["kdf"]["algorithm"], "argon2id");
        assert_eq!(v["kdf"]["salt"].as_str().unwrap().len(), 2 * SALT_LEN);
        assert_eq!(v["kdf"]["m_cost_kib"], 64);
        assert_eq!(v["keys"][0]["id"], 1);
        assert!(!contains(&raw, b"correct horse"));
        // Readable through the wrapper, but not writable.
        assert_eq!(enc.get(&meta_key).await.unwrap(), Some(raw.clone()));
        for r in [
            enc.put(&meta_key, b"{}".to_vec()).await,
            enc.append(&meta_key, b"{}".to_vec()).await,
            enc.delete(&meta_key).await.map(|_| ()),
        ] {
            assert!(matches!(r, Err(StateError::Config { .. })), "{r:?}");
        }
        assert_eq!(mem.get(&meta_key).await.unwrap(), Some(raw));
        // Two stores get different salts.
        let other = MemoryStorageBackend::new();
        open(&other, Passphrase::new("x")).await.unwrap();
        let v2: serde_json::Value = serde_json::from_slice(&other.get(&meta_key).await.unwrap().unwrap()).unwrap();
        assert_ne!(v["kdf"]["salt"], v2["kdf"]["salt"]);
    }

    #[tokio::test]
    async fn default_kdf_costs_are_owasp() {
        assert_eq!(KdfParams::default(), KdfParams { m_cost_kib: 19456, t_cost: 2, p_cost: 1 });
        let mem = MemoryStorageBackend::new();
        // A raw key needs no derivation, so the default costs are cheap to record here.
        Encrypted::open(mem.clone(), key(1).into(), Vec::new()).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&mem.get(&k(CRYPTO_META)).await.unwrap().unwrap()).unwrap();
        assert_eq!((v["kdf"]["m_cost_kib"].as_u64(), v["kdf"]["t_cost"].as_u64()), (Some(19456), Some(2)));
    }

    #[tokio::test]
    async fn wrong_key_is_reported_once_at_open() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, EncryptionKey::from_bytes([0xab; 32])).await.unwrap();
        enc.put(&k("sessions/s1.json"), record(1)).await.unwrap();
        let msg = assert_wrong_key(open(&mem, EncryptionKey::from_bytes([0xcd; 32])).await);
        assert!(msg.contains("encryption key"), "{msg}");
        assert!(!msg.contains("171") && !msg.contains("ab, ab") && !msg.contains("205"), "{msg}");
        // The right key still opens it and reads the record.
        let enc = open(&mem, EncryptionKey::from_bytes([0xab; 32])).await.unwrap();
        assert_eq!(enc.get(&k("sessions/s1.json")).await.unwrap(), Some(record(1)));
    }

    #[tokio::test]
    async fn passphrases_wrong_rejected_right_reopens() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, Passphrase::new("open sesame")).await.unwrap();
        enc.put(&k("sessions/s1.json"), record(1)).await.unwrap();
        enc.append(&k("metadata/index.log"), record(2)).await.unwrap();
        drop(enc);
        let msg = assert_wrong_key(open(&mem, Passphrase::new("open sesame!")).await);
        assert!(msg.contains("passphrase") && !msg.contains("sesame"), "{msg}");
        // A raw key is not the passphrase either.
        assert_wrong_key(open(&mem, key(0)).await);
        let enc = open(&mem, Passphrase::new("open sesame")).await.unwrap();
        assert_eq!(enc.get(&k("sessions/s1.json")).await.unwrap(), Some(record(1)));
        assert_eq!(enc.get(&k("metadata/index.log")).await.unwrap(), Some(record(2)));
        // The costs recorded at creation are used, whatever the layer asks for now.
        let layer = EncryptionLayer::new(Passphrase::new("open sesame")).kdf_params(KdfParams {
            m_cost_kib: 128,
            t_cost: 2,
            p_cost: 1,
        });
        layer.wrap(mem.clone()).await.unwrap();
        // An empty passphrase is a configuration error, not a weak key.
        let fresh = MemoryStorageBackend::new();
        assert!(matches!(open(&fresh, Passphrase::new("")).await, Err(StateError::Config { .. })));
        assert_eq!(fresh.get(&k(CRYPTO_META)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn every_flipped_bit_is_corrupt() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, key(1)).await.unwrap();
        let s1 = k("sessions/s1.json");
        enc.put(&s1, record(1)).await.unwrap();
        let good = mem.get(&s1).await.unwrap().unwrap();
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            mem.put(&s1, bad).await.unwrap();
            assert_corrupt(enc.get(&s1).await, &format!("bit {bit}"));
        }
    }

    #[tokio::test]
    async fn every_truncation_and_extension_is_corrupt() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, key(1)).await.unwrap();
        let s1 = k("sessions/s1.json");
        enc.put(&s1, record(1)).await.unwrap();
        let good = mem.get(&s1).await.unwrap().unwrap();
        for len in 0..good.len() {
            mem.put(&s1, good[..len].to_vec()).await.unwrap();
            assert_corrupt(enc.get(&s1).await, &format!("truncated to {len}"));
        }
        let mut longer = good.clone();
        longer.push(0);
        mem.put(&s1, longer).await.unwrap();
        assert_corrupt(enc.get(&s1).await, "extended");
    }

    #[tokio::test]
    async fn records_moved_between_keys_are_corrupt() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, key(1)).await.unwrap();
        let (a, b) = (k("sessions/a.json"), k("sessions/b.json"));
        let cp = k("checkpoints/a/c1.json");
        enc.put(&a, record(1)).await.unwrap();
        enc.put(&b, record(2)).await.unwrap();
        let raw_a = mem.get(&a).await.unwrap().unwrap();
        for target in [&b, &cp] {
            mem.put(target, raw_a.clone()).await.unwrap();
            assert_corrupt(enc.get(target).await, &format!("a copied to {target}"));
        }
        // A record planted as a log, a log planted as a record, a key-check record planted
        // as a record.
        let log = k("metadata/index.log");
        mem.put(&log, raw_a.clone()).await.unwrap();
        assert_corrupt(enc.get(&log).await, "record as log");
        enc.put(&log, record(3)).await.unwrap();
        mem.put(&a, mem.get(&log).await.unwrap().unwrap()).await.unwrap();
        assert_corrupt(enc.get(&a).await, "log as record");
        let meta = CryptoMeta::parse(&mem.get(&k(CRYPTO_META)).await.unwrap().unwrap()).unwrap();
        mem.put(&a, meta.checks().unwrap()[0].1.clone()).await.unwrap();
        assert_corrupt(enc.get(&a).await, "key check as record");
        // The same log frames under another log's name.
        let other_log = k("metadata/other.log");
        mem.put(&other_log, mem.get(&log).await.unwrap().unwrap()).await.unwrap();
        assert_corrupt(enc.get(&other_log).await, "log under another name");
    }

    #[tokio::test]
    async fn planted_plaintext_is_refused() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, key(1)).await.unwrap();
        let s1 = k("sessions/s1.json");
        mem.put(&s1, record(1)).await.unwrap();
        match enc.get(&s1).await {
            Err(StateError::Corrupt { key, reason }) => {
                assert_eq!(key, "sessions/s1.json");
                assert!(reason.contains("not encrypted"), "{reason}");
                assert!(!reason.contains("PLAINTEXT"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Gzip bytes, and an empty file, are refused too.
        mem.put(&s1, vec![0x1f, 0x8b, 8, 0]).await.unwrap();
        assert_corrupt(enc.get(&s1).await, "gzip");
        mem.put(&s1, Vec::new()).await.unwrap();
        assert_corrupt(enc.get(&s1).await, "empty");
        // A plaintext journal.
        let log = k("metadata/index.log");
        mem.put(&log, b"1a2b3c4d {\"op\":\"saved\"}\n".to_vec()).await.unwrap();
        assert_corrupt(enc.get(&log).await, "plaintext journal");
        // Plaintext appended after encrypted frames.
        enc.put(&log, record(1)).await.unwrap();
        mem.append(&log, b"1a2b3c4d {\"op\":\"saved\"}\n".to_vec()).await.unwrap();
        assert_corrupt(enc.get(&log).await, "plaintext after frames");
    }

    #[tokio::test]
    async fn log_frames_torn_tail_and_compaction() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, key(1)).await.unwrap();
        let log = k("metadata/index.log");
        let lines: Vec<Vec<u8>> = (0..3).map(|i| format!("line {i}\n").into_bytes()).collect();
        enc.append(&log, Vec::new()).await.unwrap();
        assert_eq!(enc.get(&log).await.unwrap(), Some(Vec::new()), "an empty append creates the log");
        for l in &lines {
            enc.append(&log, l.clone()).await.unwrap();
        }
        assert_eq!(enc.get(&log).await.unwrap(), Some(lines.concat()));
        let good = mem.get(&log).await.unwrap().unwrap();
        let frame_ends: Vec<usize> =
            (1..=3).map(|n| lines[..n].iter().map(|l| FRAME_HEADER + l.len() + TAG_LEN).sum()).collect();
        assert_eq!(*frame_ends.last().unwrap(), good.len());

        // A crash may cut the log anywhere: every cut reads as the complete frames before it.
        for len in 0..good.len() {
            mem.put(&log, good[..len].to_vec()).await.unwrap();
            let complete = frame_ends.iter().filter(|e| **e <= len).count();
            assert_eq!(enc.get(&log).await.unwrap(), Some(lines[..complete].concat()), "cut at {len}");
        }
        // ... or extend it with zeros.
        let mut zeros = good.clone();
        zeros.extend([0; 100]);
        mem.put(&log, zeros).await.unwrap();
        assert_eq!(enc.get(&log).await.unwrap(), Some(lines.concat()));

        // After a torn tail was read, the next append cuts it first, so it never ends up in
        // the middle of the log.
        mem.put(&log, good[..frame_ends[1] + 30].to_vec()).await.unwrap();
        assert_eq!(enc.get(&log).await.unwrap(), Some(lines[..2].concat()));
        enc.append(&log, b"line 3\n".to_vec()).await.unwrap();
        let mut want = lines[..2].concat();
        want.extend(b"line 3\n");
        assert_eq!(enc.get(&log).await.unwrap(), Some(want.clone()));

        // Compaction rewrites the log with put, in the same framed format; appends continue.
        enc.put(&log, b"snapshot\n".to_vec()).await.unwrap();
        enc.append(&log, b"after\n".to_vec()).await.unwrap();
        assert_eq!(enc.get(&log).await.unwrap(), Some(b"snapshot\nafter\n".to_vec()));
        enc.put(&log, Vec::new()).await.unwrap();
        assert_eq!(enc.get(&log).await.unwrap(), Some(Vec::new()));

        // A large put is split into frames of at most 1 MiB and reads back whole.
        let big: Vec<u8> = (0..FRAME_MAX_PLAIN * 2 + 10).map(|i| (i % 251) as u8).collect();
        enc.put(&log, big.clone()).await.unwrap();
        let stored = mem.get(&log).await.unwrap().unwrap();
        assert_eq!(stored.len(), big.len() + 3 * (FRAME_HEADER + TAG_LEN));
        assert_eq!(enc.get(&log).await.unwrap(), Some(big));
    }

    #[tokio::test]
    async fn every_flipped_bit_in_a_log_is_corrupt() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, key(1)).await.unwrap();
        let log = k("metadata/index.log");
        enc.append(&log, b"one\n".to_vec()).await.unwrap();
        enc.append(&log, b"two\n".to_vec()).await.unwrap();
        let good = mem.get(&log).await.unwrap().unwrap();
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            mem.put(&log, bad).await.unwrap();
            assert_corrupt(enc.get(&log).await, &format!("log bit {bit}"));
        }
    }

    #[tokio::test]
    async fn rotation_keeps_old_records_readable() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, key(1)).await.unwrap();
        let (a, b) = (k("sessions/a.json"), k("sessions/b.json"));
        let log = k("metadata/index.log");
        enc.put(&a, record(1)).await.unwrap();
        enc.append(&log, b"one\n".to_vec()).await.unwrap();
        assert_eq!(enc.current_key_id(), 1);

        assert_eq!(enc.rotate_to(key(2).into()).await.unwrap(), 2);
        assert_eq!(enc.current_key_id(), 2);
        assert_eq!(enc.key_ids(), [1, 2]);
        assert_eq!(enc.recorded_key_ids().await, [1, 2]);
        enc.put(&b, record(2)).await.unwrap();
        enc.append(&log, b"two\n".to_vec()).await.unwrap();
        assert_eq!(enc.key_id_of(&mem.get(&a).await.unwrap().unwrap()), Some(1));
        assert_eq!(enc.key_id_of(&mem.get(&b).await.unwrap().unwrap()), Some(2));
        assert_eq!(enc.key_id_of(&mem.get(&log).await.unwrap().unwrap()), None, "mixed log");
        assert_eq!(enc.get(&a).await.unwrap(), Some(record(1)));
        assert_eq!(enc.get(&b).await.unwrap(), Some(record(2)));
        assert_eq!(enc.get(&log).await.unwrap(), Some(b"one\ntwo\n".to_vec()));
        // Rotating to a key already on record reuses its id.
        assert_eq!(enc.rotate_to(key(2).into()).await.unwrap(), 2);
        assert_eq!(enc.recorded_key_ids().await, [1, 2]);
        drop(enc);

        // New key plus the previous one: both readable, writes use the new one.
        let enc = open_with(&mem, key(2), vec![key(1).into()]).await.unwrap();
        assert_eq!((enc.current_key_id(), enc.key_ids()), (2, vec![1, 2]));
        assert_eq!(enc.get(&a).await.unwrap(), Some(record(1)));
        assert_eq!(enc.get(&b).await.unwrap(), Some(record(2)));
        drop(enc);

        // Only the new key: the old record is a clear WrongKey naming the key id.
        let enc = open(&mem, key(2)).await.unwrap();
        let msg = assert_wrong_key(enc.get(&a).await);
        assert!(msg.contains("key id 1"), "{msg}");
        assert_wrong_key(enc.get(&log).await);
        assert_eq!(enc.get(&b).await.unwrap(), Some(record(2)));
        drop(enc);
        // The old key alone still opens the store (it is still on record).
        assert_eq!(open(&mem, key(1)).await.unwrap().current_key_id(), 1);

        // Re-encrypt everything, then retire the old key.
        let enc = open_with(&mem, key(2), vec![key(1).into()]).await.unwrap();
        for kk in [&a, &b, &log] {
            let v = enc.get(kk).await.unwrap().unwrap();
            enc.put(kk, v).await.unwrap();
            assert_eq!(enc.key_id_of(&mem.get(kk).await.unwrap().unwrap()), Some(2));
        }
        enc.retire_keys_except_current().await.unwrap();
        assert_eq!(enc.recorded_key_ids().await, [2]);
        assert_eq!(enc.key_ids(), [2]);
        assert_eq!(enc.get(&a).await.unwrap(), Some(record(1)));
        drop(enc);
        assert_wrong_key(open(&mem, key(1)).await);
        // A stale previous key in the configuration is ignored, not fatal.
        let enc = open_with(&mem, key(2), vec![key(1).into()]).await.unwrap();
        assert_eq!(enc.key_ids(), [2]);
        assert_eq!(enc.get(&log).await.unwrap(), Some(b"one\ntwo\n".to_vec()));
        // Ids are never reused, even after retiring, and passphrases rotate in too.
        assert_eq!(enc.rotate_to(Passphrase::new("next").into()).await.unwrap(), 3);
        enc.put(&a, record(3)).await.unwrap();
        drop(enc);
        let enc = open_with(&mem, Passphrase::new("next"), vec![key(2).into()]).await.unwrap();
        assert_eq!(enc.get(&a).await.unwrap(), Some(record(3)));
        assert_eq!(enc.get(&b).await.unwrap(), Some(record(2)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotation_while_in_use() {
        let mem = MemoryStorageBackend::new();
        let enc = Arc::new(open(&mem, key(1)).await.unwrap());
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let enc = enc.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        let kk = k(&format!("sessions/w{w}-{i}.json"));
                        enc.put(&kk, record(i)).await.unwrap();
                        assert_eq!(enc.get(&kk).await.unwrap(), Some(record(i)));
                    }
                })
            })
            .collect();
        for n in 2..6 {
            enc.rotate_to(key(n).into()).await.unwrap();
            tokio::task::yield_now().await;
        }
        for w in writers {
            w.await.unwrap();
        }
        let reopened = open_with(&mem, key(5), (1..5).map(|n| key(n).into()).collect()).await.unwrap();
        for w in 0..8 {
            for i in 0..50 {
                assert_eq!(reopened.get(&k(&format!("sessions/w{w}-{i}.json"))).await.unwrap(), Some(record(i)));
            }
        }
    }

    #[tokio::test]
    async fn no_plaintext_anywhere_in_the_store() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, Passphrase::new("PLAINTEXT-MARKER-7f3a")).await.unwrap();
        enc.put(&k("sessions/s1.json"), record(1)).await.unwrap();
        enc.put(&k("checkpoints/s1/c1.json"), record(2)).await.unwrap();
        enc.put(&k("quarantine/1-sessions~s1.json"), record(3)).await.unwrap();
        enc.append(&k("metadata/index.log"), record(4)).await.unwrap();
        enc.append(&k("metadata/index.log"), record(5)).await.unwrap();
        enc.rotate_to(Passphrase::new("PLAINTEXT-MARKER-7f3a two").into()).await.unwrap();
        enc.put(&k("sessions/s2.json"), record(6)).await.unwrap();
        enc.put(&k("metadata/other.log"), record(7)).await.unwrap();
        let stored = all_stored(&mem).await;
        assert!(stored.len() >= 7, "{stored:?}");
        for (key, bytes) in &stored {
            assert!(!contains(bytes, MARKER), "{key} holds plaintext");
            assert!(!contains(bytes, b"secret"), "{key} holds plaintext");
        }
    }

    #[tokio::test]
    async fn key_material_is_redacted() {
        let raw = EncryptionKey::from_bytes([0xab; 32]);
        assert_eq!(format!("{raw:?}"), "EncryptionKey([redacted])");
        let pass = Passphrase::new("hunter2");
        assert_eq!(format!("{pass:?}"), "Passphrase([redacted])");
        let layer = EncryptionLayer::new(raw.clone()).previous_key(pass.clone());
        let dbg = format!("{layer:?} {:?} {:?}", KeySource::from(raw.clone()), KeySource::from(pass));
        assert!(!dbg.contains("hunter2") && !dbg.contains("171") && !dbg.contains("ab"), "{dbg}");
        let enc = layer.wrap(MemoryStorageBackend::new()).await.unwrap();
        let dbg = format!("{enc:?}");
        assert!(dbg.contains("current_key_id: 1") && !dbg.contains("171"), "{dbg}");
        // A wrong-length key names only its length.
        let err = EncryptionKey::try_from_slice(&[0xab; 31]).unwrap_err().to_string();
        assert!(err.contains("31") && !err.contains("171") && !err.contains("ab, "), "{err}");
        assert!(EncryptionKey::generate().is_ok());
    }

    #[tokio::test]
    async fn key_id_of_stored_bytes() {
        let mem = MemoryStorageBackend::new();
        let enc = open(&mem, key(1)).await.unwrap();
        let s1 = k("sessions/s1.json");
        enc.put(&s1, record(1)).await.unwrap();
        assert_eq!(enc.key_id_of(&mem.get(&s1).await.unwrap().unwrap()), Some(1));
        enc.append(&k("metadata/index.log"), b"x".to_vec()).await.unwrap();
        assert_eq!(enc.key_id_of(&mem.get(&k("metadata/index.log")).await.unwrap().unwrap()), Some(1));
        assert_eq!(enc.key_id_of(&record(1)), None);
        assert_eq!(enc.key_id_of(b""), None);
        assert_eq!(enc.key_id_of(b"MSE1"), None);
    }

    #[tokio::test]
    async fn damaged_metadata_is_reported() {
        let mem = MemoryStorageBackend::new();
        open(&mem, key(1)).await.unwrap();
        let meta_key = k(CRYPTO_META);
        let good: serde_json::Value = serde_json::from_slice(&mem.get(&meta_key).await.unwrap().unwrap()).unwrap();
        let put = |v: serde_json::Value| {
            let mem = mem.clone();
            let meta_key = meta_key.clone();
            async move { mem.put(&meta_key, serde_json::to_vec(&v).unwrap()).await.unwrap() }
        };
        put(serde_json::json!("garbage")).await;
        assert_corrupt(open(&mem, key(1)).await, "garbage");
        let mut v = good.clone();
        v["keys"] = serde_json::json!([]);
        put(v).await;
        assert_corrupt(open(&mem, key(1)).await, "no keys");
        let mut v = good.clone();
        v["keys"][0]["check"] = serde_json::json!("zz");
        put(v).await;
        assert_corrupt(open(&mem, key(1)).await, "bad hex");
        let mut v = good.clone();
        v["kdf"]["m_cost_kib"] = serde_json::json!(u32::MAX);
        put(v).await;
        assert_corrupt(open(&mem, key(1)).await, "huge costs");
        let mut v = good.clone();
        v["mars_state_crypto"] = serde_json::json!(2);
        put(v).await;
        assert!(matches!(open(&mem, key(1)).await, Err(StateError::Config { .. })));
        // A check record relabelled with another id does not open.
        let mut v = good.clone();
        v["keys"][0]["id"] = serde_json::json!(2);
        v["next_key_id"] = serde_json::json!(3);
        put(v).await;
        assert_wrong_key(open(&mem, key(1)).await);
        put(good).await;
        open(&mem, key(1)).await.unwrap();
    }

    #[tokio::test]
    async fn no_plaintext_in_any_file_of_a_file_store() {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() { walk(&path, out) } else { out.push(path) }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let layer = EncryptionLayer::new(Passphrase::new("file store pass")).kdf_params(fast());
        let enc = layer.wrap(FileStorageBackend::new(dir.path()).unwrap()).await.unwrap();
        enc.put(&k("sessions/s1.json"), record(1)).await.unwrap();
        enc.put(&k("checkpoints/s1/c1.json"), record(2)).await.unwrap();
        enc.append(&k("metadata/index.log"), record(3)).await.unwrap();
        enc.append(&k("metadata/index.log"), record(4)).await.unwrap();
        assert_eq!(enc.get(&k("metadata/index.log")).await.unwrap(), Some([record(3), record(4)].concat()));
        drop(enc);
        let mut files = Vec::new();
        walk(dir.path(), &mut files);
        assert!(files.len() >= 4, "{files:?}");
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            assert!(
                !contains(&bytes, MARKER) && !contains(&bytes, b"file store pass"),
                "{} holds plaintext",
                f.display()
            );
        }
        assert_wrong_key(Encrypted::open_path(dir.path(), Passphrase::new("wrong")).await);
        let enc = layer.wrap(FileStorageBackend::new(dir.path()).unwrap()).await.unwrap();
        assert_eq!(enc.get(&k("sessions/s1.json")).await.unwrap(), Some(record(1)));
    }

    #[tokio::test]
    async fn new_store_records_only_the_current_key() {
        let mem = MemoryStorageBackend::new();
        let enc = open_with(&mem, key(1), vec![key(2).into()]).await.unwrap();
        assert_eq!(enc.key_ids(), [1]);
        assert_eq!(enc.recorded_key_ids().await, [1]);
        assert_wrong_key(open(&mem, key(2)).await);
    }
}
