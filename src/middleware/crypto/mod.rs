//! Encryption at rest: [`EncryptionLayer`] wraps any [`StorageBackend`] into an
//! [`Encrypted`] backend that seals every value with XChaCha20-Poly1305 before it reaches
//! the inner backend, and opens (and authenticates) it on the way back. This file owns the
//! layer and the wrapper with its `StorageBackend` impl, which treats each key as its
//! [`KeyClass`] says; it may call its submodules, the backend it wraps, the store's key
//! layout (for the name of its own metadata) and (for [`Encrypted::open_path`])
//! [`FileStorageBackend::new`]. The submodules: `keys` (key
//! material, Argon2id), `seal` (the byte formats below and the per-value sealing path),
//! `keyring` (`metadata/crypto.json`, opening a store, rotation).
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
//! let store =
//!     EncryptionLayer::new(EncryptionKey::generate()?).wrap(MemoryStorageBackend::new()).await?;
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
//! **Records** (keys of class [`KeyClass::Record`] and [`KeyClass::Metadata`]):
//!
//! ```text
//! "MSE1" | key id: u32 LE | nonce: 24 random bytes | ciphertext | Poly1305 tag: 16 bytes
//! AAD = "mars-state/enc/1\0" ‖ storage key ‖ "\0" ‖ key id (u32 LE)
//! ```
//!
//! A record is exactly 48 bytes longer than its plaintext. The AAD
//! binds it to its storage key (so to its session and checkpoint ids) and to the format
//! version: a record copied over another key, a flipped bit anywhere, a truncation, or a
//! plaintext record planted in the store are all [`StateError::Corrupt`]. A record sealed
//! under a key id this store issued but that was not supplied (or was retired) is
//! [`StateError::WrongKey`] naming the id; an id the store never issued is `Corrupt`.
//!
//! **Logs** ([`KeyClass::Log`]: keys under `metadata/` ending in `.log`, such as the index
//! journal), which grow by
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
//! **Plaintext keys** ([`KeyClass::Plaintext`]), passed through untouched because they must
//! be readable before a key exists or hold nothing: `metadata/store.json` (format version and
//! compression), `metadata/crypto.json` (this layer's metadata, below; callers may read it but not
//! write or delete it), `metadata/LOCK`, and the empty delete markers under `metadata/pending/`.
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
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use async_trait::async_trait;
use chacha20poly1305::XChaCha20Poly1305;

use crate::backend::{
    Acquired, EventFeed, Fence, FileStorageBackend, KeyClass, Lease, LeaseState, ObjectMeta,
    RecordMeta, StorageBackend, StorageKey, SweepReport,
};
use crate::error::{Result, StateError};
use crate::store::keys::{CRYPTO_META, crypto_meta as crypto_meta_key};

mod keyring;
mod keys;
mod seal;
#[cfg(test)]
mod tests;

use keyring::CryptoMeta;
pub(crate) use keyring::{FoundLayer, KeyRing, find_layer};
pub use keys::{EncryptionKey, KdfParams, KeySource, Passphrase};

/// Bytes an encrypted record adds to its plaintext (header and tag).
#[doc(hidden)]
#[deprecated(
    note = "an implementation detail of the sealed format; the listed size through `Encrypted` \
                     is already the plaintext size"
)]
pub const RECORD_OVERHEAD: usize = seal::SEAL_OVERHEAD;

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
    /// Given to a manager, the wrapped backend makes an encrypted store, the same store as
    /// the builder's `encryption_key` makes (rotation included), when `inner` is one of
    /// this crate's backends or an `Arc<dyn StorageBackend>`; wrap a backend type of your
    /// own as `Arc<dyn StorageBackend>` first, or the manager does not recognise the layer.
    /// A store created without encryption is refused with [`StateError::Config`], untouched.
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
    /// let passphrase = Passphrase::new("correct horse");
    /// let backend = EncryptedFileStorageBackend::open_path("./state_storage", passphrase).await?;
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
        crate::sync::read(&self.keyring)
    }

    fn ring_mut(&self) -> RwLockWriteGuard<'_, Keyring> {
        crate::sync::write(&self.keyring)
    }

    fn torn(&self) -> MutexGuard<'_, HashSet<StorageKey>> {
        crate::sync::lock(&self.torn_logs)
    }
}

impl<B: StorageBackend> Encrypted<B> {
    /// The wrapped backend (which holds ciphertext).
    pub fn inner(&self) -> &B {
        self.inner.as_ref()
    }
}

/// Whether values at `key` are stored as they are, unencrypted.
#[doc(hidden)]
#[deprecated(note = "use `key.class() == KeyClass::Plaintext`")]
pub fn stored_in_plaintext(key: &StorageKey) -> bool {
    key.class() == KeyClass::Plaintext
}

/// Whether `key` is an append-only log stored as encrypted frames.
#[doc(hidden)]
#[deprecated(note = "use `key.class() == KeyClass::Log`")]
pub fn is_log_key(key: &StorageKey) -> bool {
    key.class() == KeyClass::Log
}

/// How this layer stores a value of each key class.
enum Sealing {
    /// As it is ([`KeyClass::Plaintext`]).
    None,
    /// One sealed record per value.
    Record,
    /// A log of sealed frames, one per append ([`KeyClass::Log`]).
    Frames,
}

fn sealing(key: &StorageKey) -> Sealing {
    match key.class() {
        KeyClass::Plaintext => Sealing::None,
        KeyClass::Log => Sealing::Frames,
        // Records, other metadata, and any class added later: sealed.
        _ => Sealing::Record,
    }
}

fn refuse_reserved(key: &StorageKey) -> Result<()> {
    if key.as_str() == CRYPTO_META {
        return Err(StateError::Config {
            message: format!(
                "{CRYPTO_META} is managed by the encryption layer and cannot be written or deleted"
            ),
        });
    }
    Ok(())
}

/// Forwards every method; `get`/`put`/`append` decrypt/encrypt, `list` reports the sizes
/// `get` would return (for logs, the stored size: it cannot be known without reading).
#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<B: StorageBackend> StorageBackend for Encrypted<B> {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        let Some(raw) = self.inner.get(key).await? else { return Ok(None) };
        match sealing(key) {
            Sealing::None => Ok(Some(raw)),
            Sealing::Frames => self.open_frames(key, &raw).map(Some),
            Sealing::Record => self.open_record(key, raw).map(Some),
        }
    }

    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        refuse_reserved(key)?;
        match sealing(key) {
            Sealing::None => self.inner.put(key, value).await,
            Sealing::Record => self.inner.put(key, self.seal_record(key, value)?).await,
            Sealing::Frames => {
                self.inner.put(key, self.seal_frames(key, value)?).await?;
                self.torn().remove(key);
                Ok(())
            }
        }
    }

    /// Seals like `put`, and passes `meta` on without the branch name (see
    /// [`RecordMeta`]).
    async fn put_record(&self, key: &StorageKey, value: Vec<u8>, meta: &RecordMeta) -> Result<()> {
        refuse_reserved(key)?;
        let meta = RecordMeta { branch: None, ..meta.clone() };
        match sealing(key) {
            Sealing::Record => {
                self.inner.put_record(key, self.seal_record(key, value)?, &meta).await
            }
            // Not a record key: no facts to pass on.
            _ => self.put(key, value).await,
        }
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
            if let Sealing::Record = sealing(&meta.key) {
                meta.size = meta.size.saturating_sub(seal::SEAL_OVERHEAD as u64);
            }
        }
        Ok(metas)
    }

    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        refuse_reserved(key)?;
        match sealing(key) {
            Sealing::None => return self.inner.append(key, bytes).await,
            Sealing::Frames => {}
            Sealing::Record => {
                return Err(StateError::Config {
                    message: format!(
                        "{key} is not a log (metadata/*.log); an encrypted store appends only to logs"
                    ),
                });
            }
        }
        self.cut_torn_tail(key).await?;
        let frames = self.seal_frames(key, bytes)?;
        self.inner.append(key, frames).await
    }

    async fn sweep(&self) -> Result<SweepReport> {
        self.inner.sweep().await
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    async fn acquire_lease(&self, name: &str, node: &str, ttl: Duration) -> Result<Acquired> {
        self.inner.acquire_lease(name, node, ttl).await
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>> {
        self.inner.renew_lease(lease, ttl).await
    }

    async fn renew_leases(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<Option<Lease>>> {
        self.inner.renew_leases(leases, ttl).await
    }

    async fn read_lease(&self, name: &str) -> Result<Option<LeaseState>> {
        self.inner.read_lease(name).await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        self.inner.release_lease(lease).await
    }

    /// Seals like `put_record` (`meta` without the branch name) and passes the fence on.
    async fn put_fenced(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        meta: &RecordMeta,
        fence: &Fence,
    ) -> Result<()> {
        refuse_reserved(key)?;
        let meta = RecordMeta { branch: None, ..meta.clone() };
        let sealing = sealing(key);
        let stored = match sealing {
            Sealing::None => value,
            Sealing::Record => self.seal_record(key, value)?,
            Sealing::Frames => self.seal_frames(key, value)?,
        };
        self.inner.put_fenced(key, stored, &meta, fence).await?;
        if let Sealing::Frames = sealing {
            self.torn().remove(key);
        }
        Ok(())
    }

    async fn delete_fenced(&self, key: &StorageKey, fence: &Fence) -> Result<bool> {
        refuse_reserved(key)?;
        let existed = self.inner.delete_fenced(key, fence).await?;
        self.torn().remove(key);
        Ok(existed)
    }

    /// Seals each payload like a record, under a name no key can have. The store's
    /// payloads hold session ids (already visible in the keys below this layer) but also
    /// pause and failure reasons and checkpoint ids, which stay sealed: a subscriber without
    /// the key, or any listener on the server's channel, learns only that something
    /// changed, and when.
    async fn publish_events(&self, payloads: Vec<Vec<u8>>) -> Result<()> {
        let sealed = payloads.into_iter().map(|p| self.seal_event(p)).collect::<Result<_>>()?;
        self.inner.publish_events(sealed).await
    }

    /// Opens each payload with the keys this handle holds when it subscribes; one that
    /// does not open (sealed under another key, damaged) is dropped, and the store counts
    /// it as missed.
    async fn subscribe_events(&self) -> Result<EventFeed> {
        Ok(self.inner.subscribe_events().await?.map(self.event_opener()))
    }
}

// ---------------------------------------------------------------------------------------
// Helpers shared by the submodules
// ---------------------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[(b >> 4) as usize] as char, DIGITS[(b & 15) as usize] as char])
        .collect()
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
