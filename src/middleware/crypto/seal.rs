//! The byte formats of the [module docs](super): encrypted records, key-check records and
//! log frames. It seals and opens them with the cipher of a key id (the wrapper's
//! per-value path), scans a log into frames, and drops and later cuts a log's torn tail. It
//! calls the parent's keyring and the crate's random-bytes helper; its only I/O is cutting
//! a torn tail through the inner backend.

use std::fmt;
use std::sync::Arc;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use tracing::debug;
use zeroize::Zeroize;

use super::{Encrypted, crypto_meta_key};
use crate::backend::{StorageBackend, StorageKey};
use crate::error::{Result, StateError};
use crate::random;

/// Magic of an encrypted record.
const RECORD_MAGIC: &[u8; 4] = b"MSE1";
/// Magic of an encrypted log frame.
const FRAME_MAGIC: &[u8; 4] = b"MSL1";
const NONCE_LEN: usize = 24;
pub(super) const TAG_LEN: usize = 16;
/// Magic, key id, nonce.
const RECORD_HEADER: usize = 4 + 4 + NONCE_LEN;
/// Bytes an encrypted record adds to its plaintext (header and tag). [`Encrypted`]'s `list`
/// subtracts it, so listed sizes are the sizes `get` returns.
pub(super) const SEAL_OVERHEAD: usize = RECORD_HEADER + TAG_LEN;
/// Magic, length, key id, header CRC.
const FRAME_FIXED: usize = 16;
/// The fixed part and the nonce.
pub(super) const FRAME_HEADER: usize = FRAME_FIXED + NONCE_LEN;
/// Largest plaintext sealed into one log frame; longer values become several frames.
pub(super) const FRAME_MAX_PLAIN: usize = 1 << 20;
const RECORD_AAD: &[u8] = b"mars-state/enc/1\0";
const FRAME_AAD: &[u8] = b"mars-state/log/1\0";
/// The name change events are sealed under (in their AAD, beside [`RECORD_AAD`]): no
/// [`StorageKey`] can have it, so a sealed event cannot be passed off as a record or back.
const EVENT_NAME: &str = ".event";
/// The storage-key name in a key-check record's AAD. It starts with a dot, so it is not a
/// valid [`StorageKey`] and no stored record can be swapped for a key-check record.
const CHECK_NAME: &str = ".key-check";
const CHECK_PLAINTEXT: &[u8] = b"mars-state key check, format 1";

impl<B: StorageBackend> Encrypted<B> {
    /// The key id of stored bytes as the inner backend holds them: for a record its key id;
    /// for a log the key id all its frames share. `None` for plaintext, unrecognised bytes,
    /// an empty log, or a log whose frames use several keys (so `!= Some(current)` means
    /// "needs re-encryption").
    pub fn key_id_of(&self, stored: &[u8]) -> Option<u32> {
        if stored.len() >= SEAL_OVERHEAD && stored.starts_with(RECORD_MAGIC) {
            return Some(le_u32(stored, 4));
        }
        if !stored.starts_with(FRAME_MAGIC) {
            return None;
        }
        let scan = scan_frames(&crypto_meta_key(), stored).ok()?;
        let first = scan.frames.first()?.id;
        scan.frames.iter().all(|f| f.id == first).then_some(first)
    }

    /// The current key id and its cipher.
    fn current(&self) -> Result<(u32, Arc<XChaCha20Poly1305>)> {
        let ring = self.ring();
        let cipher =
            ring.ciphers.get(&ring.current).cloned().ok_or_else(|| StateError::WrongKey {
                reason: "no current encryption key".into(),
            })?;
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
                    "{key} is sealed with key id {id}, which was not supplied (pass it as a previous \
                     key) or has been retired"
                ),
            })
        } else {
            Err(StateError::corrupt(
                key,
                format!("sealed with key id {id}, which this store never issued"),
            ))
        }
    }

    pub(super) fn seal_record(&self, key: &StorageKey, plain: Vec<u8>) -> Result<Vec<u8>> {
        let (id, cipher) = self.current()?;
        seal_record(&cipher, id, key.as_str(), plain)
    }

    pub(super) fn open_record(&self, key: &StorageKey, mut raw: Vec<u8>) -> Result<Vec<u8>> {
        if !raw.starts_with(RECORD_MAGIC) {
            let reason = if raw.len() < RECORD_MAGIC.len() && RECORD_MAGIC.starts_with(&raw) {
                "truncated encrypted record"
            } else {
                "not encrypted (no MSE1 header): a plaintext or foreign record in an encrypted store"
            };
            return Err(StateError::corrupt(key, reason));
        }
        if raw.len() < SEAL_OVERHEAD {
            return Err(StateError::corrupt(key, "truncated encrypted record"));
        }
        let id = le_u32(&raw, 4);
        let cipher = self.cipher_for(key, id)?;
        let len = raw.len();
        let (head, body) = raw.split_at_mut(RECORD_HEADER);
        let (ct, tag) = body.split_at_mut(len - SEAL_OVERHEAD);
        let aad = aad(RECORD_AAD, key.as_str(), id);
        cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(&head[8..]),
                &aad,
                ct,
                Tag::from_slice(tag),
            )
            .map_err(|_| {
                StateError::corrupt(
                    key,
                    "authentication failed: damaged, truncated, or moved from another key",
                )
            })?;
        raw.truncate(len - TAG_LEN);
        raw.drain(..RECORD_HEADER);
        Ok(raw)
    }

    /// Seals a change-event payload like a record, under [`EVENT_NAME`].
    pub(super) fn seal_event(&self, plain: Vec<u8>) -> Result<Vec<u8>> {
        let (id, cipher) = self.current()?;
        seal_record(&cipher, id, EVENT_NAME, plain)
    }

    /// Opens sealed change-event payloads with the keys this handle has now: `None` for a
    /// payload that does not open (damaged, foreign, or sealed under a key added later).
    pub(super) fn event_opener(&self) -> impl FnMut(Vec<u8>) -> Option<Vec<u8>> + Send + 'static {
        let ciphers = self.ring().ciphers.clone();
        move |mut raw: Vec<u8>| {
            if raw.len() < SEAL_OVERHEAD || !raw.starts_with(RECORD_MAGIC) {
                return None;
            }
            let id = le_u32(&raw, 4);
            let cipher = ciphers.get(&id)?;
            let len = raw.len();
            let (head, body) = raw.split_at_mut(RECORD_HEADER);
            let (ct, tag) = body.split_at_mut(len - SEAL_OVERHEAD);
            cipher
                .decrypt_in_place_detached(
                    XNonce::from_slice(&head[8..]),
                    &aad(RECORD_AAD, EVENT_NAME, id),
                    ct,
                    Tag::from_slice(tag),
                )
                .ok()?;
            raw.truncate(len - TAG_LEN);
            raw.drain(..RECORD_HEADER);
            Some(raw)
        }
    }

    /// Seals `plain` as log frames under the current key.
    pub(super) fn seal_frames(&self, key: &StorageKey, mut plain: Vec<u8>) -> Result<Vec<u8>> {
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
            let nonce = random::array::<NONCE_LEN>()?;
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
    pub(super) fn open_frames(&self, key: &StorageKey, raw: &[u8]) -> Result<Vec<u8>> {
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
                    format!(
                        "log frame at byte {} failed authentication (damaged, or from another log)",
                        frame.start
                    ),
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
    pub(super) async fn cut_torn_tail(&self, key: &StorageKey) -> Result<()> {
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

fn too_large(key: impl fmt::Display) -> StateError {
    StateError::Config { message: format!("the value for {key} is too large to encrypt") }
}

/// Seals `plain` (encrypted in place, so no plaintext copy is left) as a record.
fn seal_record(
    cipher: &XChaCha20Poly1305,
    id: u32,
    name: &str,
    mut plain: Vec<u8>,
) -> Result<Vec<u8>> {
    let nonce = random::array::<NONCE_LEN>()?;
    let tag = cipher
        .encrypt_in_place_detached(
            XNonce::from_slice(&nonce),
            &aad(RECORD_AAD, name, id),
            &mut plain,
        )
        .map_err(|_| too_large(name))?;
    let mut out = Vec::with_capacity(SEAL_OVERHEAD + plain.len());
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&plain);
    out.extend_from_slice(&tag);
    Ok(out)
}

pub(super) fn seal_check(cipher: &XChaCha20Poly1305, id: u32) -> Result<Vec<u8>> {
    seal_record(cipher, id, CHECK_NAME, CHECK_PLAINTEXT.to_vec())
}

/// Whether `check` is a key-check record for key id `id` sealed with `cipher`.
fn opens_check(cipher: &XChaCha20Poly1305, id: u32, check: &[u8]) -> bool {
    if check.len() != SEAL_OVERHEAD + CHECK_PLAINTEXT.len()
        || !check.starts_with(RECORD_MAGIC)
        || le_u32(check, 4) != id
    {
        return false;
    }
    let mut body = check[RECORD_HEADER..check.len() - TAG_LEN].to_vec();
    let tag = Tag::from_slice(&check[check.len() - TAG_LEN..]);
    let nonce = XNonce::from_slice(&check[8..RECORD_HEADER]);
    cipher
        .decrypt_in_place_detached(nonce, &aad(RECORD_AAD, CHECK_NAME, id), &mut body, tag)
        .is_ok()
        && body == CHECK_PLAINTEXT
}

/// The key id whose key-check record `cipher` opens.
pub(super) fn match_check(cipher: &XChaCha20Poly1305, checks: &[(u32, Vec<u8>)]) -> Option<u32> {
    checks.iter().find(|(id, check)| opens_check(cipher, *id, check)).map(|(id, _)| *id)
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
            return Err(StateError::corrupt(
                key,
                format!("log frame header at byte {pos} is damaged"),
            ));
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
