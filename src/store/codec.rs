//! Records on disk: a JSON envelope with a CRC-32 over all of its bytes, optionally
//! gzipped. This file owns the record format: [`Codec`] (encode, decode and verify),
//! [`RecordHead`] with the session and checkpoint `meta` objects, and gzip with its
//! integrity field. It calls the key layout (for the record ending of its settings), serde,
//! flate2 and crc32fast, and does no I/O: the store hands it bytes and gets bytes back.
//!
//! A record is one line of JSON that `jq` reads:
//!
//! ```text
//! {"mars_state":1,"crc32":"1a2b3c4d","kind":"session","session_id":"s1","saved_at":1764095662123,"meta":{"schema":1,"status":"running"},"data":{...}}
//! ```
//!
//! The envelope always starts with the literal `{"mars_state":1,"crc32":"`; the eight hex
//! digits that follow are the CRC-32 of every byte after the `",` that closes them. So a
//! change to any byte is detected: in the literal prefix (it no longer matches), in the
//! checksum (it no longer agrees), or in the rest (the checksum no longer covers it). The
//! `session_id` and `checkpoint_id` inside bind the record to its key, so a record copied
//! over another is refused.
//!
//! Compressed stores gzip the whole line (`zcat | jq` reads it). Because a deflate stream
//! has bits a decoder ignores, the gzip header carries an extra field (`MS`, 4 bytes) with
//! the CRC-32 of every byte after the 20-byte header, and the header itself must match a
//! fixed layout: a flipped bit anywhere in a compressed record is detected too.
//! Decompression is bounded and must consume every input byte.

use std::io::Read;
use std::ops::Range;
use std::sync::Arc;

use flate2::Compression as GzLevel;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::backend::{RecordMeta, StorageKey};
use crate::error::{Result, StateError};
use crate::types::{BranchId, CheckpointId, CheckpointReason, SessionId, SessionStatus};

const PREFIX: &[u8] = br#"{"mars_state":1,"crc32":""#;
const HEADER_LEN: usize = PREFIX.len() + 8 + 2; // prefix, 8 hex digits, `",`

/// How records are stored: plain JSON, or gzip at a level from 1 to 9.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip(u32),
}

impl Compression {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip(_) => "gzip",
        }
    }
}

/// Encodes and decodes records for one store.
#[derive(Debug, Clone)]
pub(crate) struct Codec {
    pub(crate) compression: Compression,
    /// Whether an encryption layer sits below (records are then named `….enc`).
    pub(crate) encrypted: bool,
    /// Largest decoded record accepted (bounds memory on a hostile or corrupt file).
    pub(crate) max_record: usize,
}

/// What a record says about itself besides its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RecordHead {
    Session {
        session_id: SessionId,
        saved_at: u64,
        meta: SessionMeta,
    },
    Checkpoint {
        session_id: SessionId,
        checkpoint_id: CheckpointId,
        branch_id: BranchId,
        timestamp: u64,
        meta: CheckpointMeta,
    },
}

/// A value's serde name (`"paused"`, `"before_risky"`), for the plain columns of
/// [`RecordMeta`].
fn serde_name<T: Serialize>(value: &T) -> Option<String> {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned))
}

impl RecordHead {
    /// What a backend may keep beside the record (see [`RecordMeta`]).
    pub(crate) fn facts(&self) -> RecordMeta {
        let mut facts = RecordMeta::default();
        match self {
            RecordHead::Session { session_id, saved_at, meta } => {
                facts.session = session_id.to_string();
                facts.step = meta.step;
                facts.status = serde_name(&meta.status);
                facts.saved_at_ms = *saved_at;
            }
            RecordHead::Checkpoint { session_id, checkpoint_id, branch_id, timestamp, meta } => {
                facts.session = session_id.to_string();
                facts.checkpoint = Some(checkpoint_id.to_string());
                facts.branch = Some(branch_id.to_string());
                facts.parent = meta.parent.as_ref().map(ToString::to_string);
                facts.step = meta.step;
                facts.reason = serde_name(&meta.reason);
                facts.saved_at_ms = *timestamp;
            }
        }
        facts
    }
}

/// The `meta` object of a session record. Records written before a field existed read
/// as its default; unknown fields (from later versions) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionMeta {
    /// The application's schema version of `data` (see the builder's `schema_version`).
    #[serde(default)]
    pub(crate) schema: u32,
    #[serde(default)]
    pub(crate) status: SessionStatus,
    /// Why the status was set (a pause or failure reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    /// When the status was set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) status_at: Option<u64>,
    /// The orchestrator's step of this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) step: Option<u64>,
    /// The checkpoint this state was last rolled back to: the next checkpoint on its
    /// branch forks from it unless a newer one was taken there since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fork: Option<Fork>,
}

/// Where a rollback left a branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fork {
    pub(crate) branch: BranchId,
    pub(crate) checkpoint: CheckpointId,
    /// A clock value taken at the rollback: checkpoints with a greater one came after it.
    pub(crate) clock: u64,
}

/// The `meta` object of a checkpoint record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CheckpointMeta {
    #[serde(default)]
    pub(crate) schema: u32,
    #[serde(default)]
    pub(crate) reason: CheckpointReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) parent: Option<CheckpointId>,
}

/// A verified record: its envelope bytes and where its `data` lies in them.
#[derive(Debug, Clone)]
pub(crate) struct Decoded {
    pub(crate) head: RecordHead,
    pub(crate) bytes: Arc<Vec<u8>>,
    pub(crate) data: Range<usize>,
}

impl Decoded {
    pub(crate) fn data(&self) -> &[u8] {
        &self.bytes[self.data.clone()]
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[allow(dead_code)]
    mars_state: u32,
    #[allow(dead_code)]
    crc32: &'a str,
    kind: &'a str,
    session_id: SessionId,
    #[serde(default)]
    saved_at: Option<u64>,
    #[serde(default)]
    checkpoint_id: Option<CheckpointId>,
    #[serde(default)]
    branch_id: Option<BranchId>,
    #[serde(default)]
    timestamp: Option<u64>,
    #[serde(default, borrow)]
    meta: Option<&'a RawValue>,
    #[serde(borrow)]
    data: &'a RawValue,
}

fn json_str(s: &str) -> String {
    // Ids are validated to a safe ASCII set, but escape anyway so the envelope stays JSON.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

impl Codec {
    /// The file-name ending of the records this codec writes (see
    /// [`keys::record_ending`](super::keys::record_ending)).
    pub(crate) fn extension(&self) -> &'static str {
        super::keys::record_ending(self.compression != Compression::None, self.encrypted)
    }

    /// Builds the envelope around `data` (compact JSON) and compresses it if configured.
    pub(crate) fn encode(&self, head: &RecordHead, data: &[u8]) -> Result<Vec<u8>> {
        let meta_json =
            |m: Result<String, serde_json::Error>| m.map_err(|e| StateError::json("", &e));
        let fields = match head {
            RecordHead::Session { session_id, saved_at, meta } => format!(
                r#""kind":"session","session_id":{},"saved_at":{saved_at},"meta":{},"data":"#,
                json_str(session_id.as_str()),
                meta_json(serde_json::to_string(meta))?,
            ),
            RecordHead::Checkpoint { session_id, checkpoint_id, branch_id, timestamp, meta } => {
                format!(
                    r#""kind":"checkpoint","session_id":{},"checkpoint_id":{},"branch_id":{},"timestamp":{timestamp},"meta":{},"data":"#,
                    json_str(session_id.as_str()),
                    json_str(checkpoint_id.as_str()),
                    json_str(branch_id.as_str()),
                    meta_json(serde_json::to_string(meta))?,
                )
            }
        };
        // One buffer, one copy of the state: header with a placeholder checksum, fields,
        // data, then the checksum of everything after the header written in place.
        let mut out = Vec::with_capacity(HEADER_LEN + fields.len() + data.len() + 2);
        out.extend_from_slice(PREFIX);
        out.extend_from_slice(b"00000000\",");
        out.extend_from_slice(fields.as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"}\n");
        let crc = crc32fast::hash(&out[HEADER_LEN..]);
        out[PREFIX.len()..PREFIX.len() + 8].copy_from_slice(format!("{crc:08x}").as_bytes());
        match self.compression {
            Compression::None => Ok(out),
            Compression::Gzip(level) => gzip(&out, level),
        }
    }

    /// Verifies and decodes the bytes stored at `key`. Any damage is [`StateError::Corrupt`],
    /// returned with the raw bytes (for the quarantine copy).
    pub(crate) fn decode(
        &self,
        key: &StorageKey,
        raw: Vec<u8>,
    ) -> std::result::Result<Decoded, (StateError, Vec<u8>)> {
        if raw.starts_with(&[0x1f, 0x8b]) {
            match self
                .gunzip(key, &raw)
                .and_then(|plain| self.decode_plain(key, plain).map_err(|(e, _)| e))
            {
                Ok(d) => Ok(d),
                Err(e) => Err((e, raw)),
            }
        } else {
            self.decode_plain(key, raw)
        }
    }

    fn decode_plain(
        &self,
        key: &StorageKey,
        bytes: Vec<u8>,
    ) -> std::result::Result<Decoded, (StateError, Vec<u8>)> {
        match Self::parse(key, &bytes, self.max_record) {
            Ok((head, data)) => Ok(Decoded { head, bytes: Arc::new(bytes), data }),
            Err(e) => Err((e, bytes)),
        }
    }

    /// Checks the header, checksum and envelope; returns the head and where `data` lies.
    fn parse(
        key: &StorageKey,
        bytes: &[u8],
        max_record: usize,
    ) -> Result<(RecordHead, Range<usize>)> {
        if bytes.len() > max_record {
            return Err(StateError::corrupt(
                key,
                format!("record of {} bytes exceeds the limit", bytes.len()),
            ));
        }
        if bytes.len() < HEADER_LEN
            || !bytes.starts_with(PREFIX)
            || &bytes[HEADER_LEN - 2..HEADER_LEN] != b"\","
        {
            return Err(StateError::corrupt(
                key,
                "not a mars-state record (header missing or damaged)",
            ));
        }
        let hex = std::str::from_utf8(&bytes[PREFIX.len()..PREFIX.len() + 8])
            .ok()
            .filter(|h| h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| StateError::corrupt(key, "checksum field damaged"))?;
        if crc32fast::hash(&bytes[HEADER_LEN..]) != hex {
            return Err(StateError::corrupt(key, "checksum mismatch"));
        }
        if !bytes.ends_with(b"}\n") {
            return Err(StateError::corrupt(key, "record is truncated"));
        }
        let env: Envelope<'_> = serde_json::from_slice(bytes)
            .map_err(|e| StateError::corrupt(key, format!("envelope does not parse: {e}")))?;
        fn meta<M: Default + serde::de::DeserializeOwned>(
            key: &StorageKey,
            raw: Option<&RawValue>,
        ) -> Result<M> {
            raw.map(|r| serde_json::from_str(r.get()))
                .transpose()
                .map(Option::unwrap_or_default)
                .map_err(|e| StateError::corrupt(key, format!("meta does not parse: {e}")))
        }
        let head = match (env.kind, env.saved_at, env.checkpoint_id, env.branch_id, env.timestamp) {
            ("session", Some(saved_at), None, None, None) => RecordHead::Session {
                session_id: env.session_id,
                saved_at,
                meta: meta(key, env.meta)?,
            },
            ("checkpoint", None, Some(checkpoint_id), Some(branch_id), Some(timestamp)) => {
                RecordHead::Checkpoint {
                    session_id: env.session_id,
                    checkpoint_id,
                    branch_id,
                    timestamp,
                    meta: meta(key, env.meta)?,
                }
            }
            _ => return Err(StateError::corrupt(key, "envelope fields do not match its kind")),
        };
        let start = env.data.get().as_ptr() as usize - bytes.as_ptr() as usize;
        Ok((head, start..start + env.data.get().len()))
    }

    fn gunzip(&self, key: &StorageKey, raw: &[u8]) -> Result<Vec<u8>> {
        if raw.len() < GZ_HEADER_LEN + 8 || raw[..16] != gz_header_template()[..16] {
            return Err(StateError::corrupt(key, "gzip header damaged"));
        }
        let outer = u32::from_le_bytes([raw[16], raw[17], raw[18], raw[19]]);
        if crc32fast::hash(&raw[GZ_HEADER_LEN..]) != outer {
            return Err(StateError::corrupt(key, "compressed checksum mismatch"));
        }
        let mut dec = flate2::bufread::GzDecoder::new(raw);
        let mut out = Vec::new();
        (&mut dec)
            .take(self.max_record as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| StateError::corrupt(key, format!("gzip stream damaged: {e}")))?;
        if out.len() > self.max_record {
            return Err(StateError::corrupt(key, "decompressed record exceeds the limit"));
        }
        if !dec.into_inner().is_empty() {
            return Err(StateError::corrupt(key, "trailing bytes after the gzip stream"));
        }
        Ok(out)
    }
}

/// Gzip header: magic, deflate, FEXTRA, mtime 0, XFL 0, OS unknown, XLEN 8, subfield `MS`
/// of length 4 holding the CRC-32 of everything after the header.
const GZ_HEADER_LEN: usize = 20;

fn gz_header_template() -> [u8; GZ_HEADER_LEN] {
    [0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 8, 0, b'M', b'S', 4, 0, 0, 0, 0, 0]
}

fn gzip(data: &[u8], level: u32) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() / 3 + 64);
    out.extend_from_slice(&gz_header_template());
    let mut enc = flate2::write::DeflateEncoder::new(out, GzLevel::new(level));
    let mut out = std::io::Write::write_all(&mut enc, data)
        .and_then(|_| enc.finish())
        .map_err(|e| StateError::io("compressing", "", e))?;
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let outer = crc32fast::hash(&out[GZ_HEADER_LEN..]);
    out[16..20].copy_from_slice(&outer.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StorageKey {
        StorageKey::new("sessions/s1.json").unwrap()
    }

    fn head() -> RecordHead {
        RecordHead::Session {
            session_id: SessionId::new("s1").unwrap(),
            saved_at: 7,
            meta: SessionMeta::default(),
        }
    }

    #[test]
    fn round_trip_and_every_bit_flip_detected() {
        for compression in [Compression::None, Compression::Gzip(6)] {
            let codec = Codec { compression, encrypted: false, max_record: 1 << 20 };
            let enc = codec.encode(&head(), br#"{"step":42,"msg":"hello"}"#).unwrap();
            let dec = codec.decode(&key(), enc.clone()).map_err(|e| e.0).unwrap();
            assert_eq!(dec.data(), br#"{"step":42,"msg":"hello"}"#);
            assert_eq!(dec.head, head());
            for i in 0..enc.len() * 8 {
                let mut bad = enc.clone();
                bad[i / 8] ^= 1 << (i % 8);
                let r = codec.decode(&key(), bad);
                assert!(
                    matches!(r, Err((StateError::Corrupt { .. }, _))),
                    "flip {i} not detected ({compression:?})"
                );
            }
            for len in 0..enc.len() {
                let r = codec.decode(&key(), enc[..len].to_vec());
                assert!(
                    matches!(r, Err((StateError::Corrupt { .. }, _))),
                    "truncation {len} not detected"
                );
            }
        }
    }

    #[test]
    fn plain_record_is_json() {
        let codec = Codec { compression: Compression::None, encrypted: false, max_record: 1 << 20 };
        let enc = codec.encode(&head(), br#"{"a":[1,2]}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&enc).unwrap();
        assert_eq!(v["data"]["a"][1], 2);
        assert_eq!(v["session_id"], "s1");
    }
}
