//! Records on disk: a JSON envelope with a CRC-32 over all of its bytes, optionally
//! gzipped. This file owns the record format: [`Codec`] (encode, decode and verify),
//! [`RecordHead`] with the session and checkpoint `meta` objects, and gzip with its
//! integrity field. It calls the key layout (for the record ending of its settings), serde,
//! flate2 and crc32fast, and does no I/O: the store hands it bytes and gets bytes back.
//!
//! A record is one line of JSON that `jq` reads:
//!
//! ```text
//! {"mars_state":2,"crc32":"1a2b3c4d","data_at":"0000000198","data_len":"00000000000000001234","kind":"session","session_id":"s1","saved_at":1764095662123,"meta":{"schema":1,"status":"running"},"data":{...}}
//! ```
//!
//! The envelope starts with a header of fixed layout: the literal `{"mars_state":2,"crc32":"`,
//! eight hex digits, then `","data_at":"`, ten decimal digits, `","data_len":"`, twenty
//! decimal digits and `",`. The checksum is the CRC-32 of every byte after the `",` that
//! closes it (the two numbers included); `data_at` is the offset of the first byte of
//! `data` in the record and `data_len` its length. So a load checks the checksum over the
//! bytes as they were read, parses only the few fields between the header and `"data":`,
//! and hands `data` on as a slice of the same buffer: the state is parsed once, by whoever
//! asked for it, and never copied (issue 15). Every number of the header is checked against
//! the record's own bytes (`data` ends where the record's closing `}` starts, and `"data":`
//! stands right before it), so a header that lies is [`StateError::Corrupt`], never a wrong
//! slice. A change to any byte is detected: in the header's literals (they no longer
//! match), in the checksum (it no longer agrees), or in the rest (the checksum no longer
//! covers it). The `session_id` and `checkpoint_id` inside bind the record to its key, so a
//! record copied over another is refused.
//!
//! Records of format 1 (written before issue 15: `{"mars_state":1,"crc32":"…",` with no
//! `data_at` or `data_len`) still load: the checksum is checked the same way and the whole
//! envelope is parsed to find `data`. An open for writing marks `metadata/store.json`
//! format 2 before it writes a record (see `format.rs`), so versions before format 2 refuse
//! the store rather than take its new records for damaged ones.
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
use crate::error::{Result, StateError, redact};
use crate::types::{
    BranchId, CheckpointId, CheckpointReason, SessionId, SessionStatus, StateBytes,
};

/// The first bytes of a record of format 1 (no `data_at`, `data_len`).
const PREFIX_V1: &[u8] = br#"{"mars_state":1,"crc32":""#;
/// The first bytes of a record of the current format, 2.
const PREFIX: &[u8] = br#"{"mars_state":2,"crc32":""#;
/// Where the bytes the checksum covers start (both formats): after the prefix, 8 hex
/// digits and `",`.
const CRC_FROM: usize = PREFIX.len() + 8 + 2;
const DATA_AT_KEY: &[u8] = br#""data_at":""#;
const DATA_LEN_KEY: &[u8] = br#"","data_len":""#;
/// Digits of `data_at` (the offset of `data` is a few hundred bytes: the header and the
/// record's fields) and of `data_len` (any `u64`).
const DATA_AT_DIGITS: usize = 10;
const DATA_LEN_DIGITS: usize = 20;
const DATA_AT_FROM: usize = CRC_FROM + DATA_AT_KEY.len();
const DATA_LEN_FROM: usize = DATA_AT_FROM + DATA_AT_DIGITS + DATA_LEN_KEY.len();
/// The length of the fixed header of format 2: up to and including the `",` after
/// `data_len`.
const HEADER_LEN: usize = DATA_LEN_FROM + DATA_LEN_DIGITS + 2;
/// The key that stands right before the data.
const DATA_KEY: &[u8] = br#""data":"#;
/// What ends every record, after the data.
const TAIL: &[u8] = b"}\n";

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
    /// The record's `data` (compact JSON), a slice of the bytes as read.
    pub(crate) fn data(&self) -> &[u8] {
        self.bytes.get(self.data.clone()).unwrap_or_default()
    }

    /// The record's `data` as a state that shares the record's buffer: no copy.
    pub(crate) fn state(&self) -> StateBytes {
        StateBytes::shared(Arc::clone(&self.bytes), self.data.clone())
    }

    /// Checks that `data` is JSON. A load leaves that to whoever parses the state (the
    /// checksum vouches for the bytes the codec wrote, and the codec is only given JSON);
    /// `verify` checks it, so that a record no load could parse is reported.
    pub(crate) fn check_data(&self, key: &StorageKey) -> Result<()> {
        serde_json::from_slice::<serde::de::IgnoredAny>(self.data()).map(drop).map_err(|e| {
            StateError::corrupt(key, format!("data is not JSON: {}", redact(&e.to_string())))
        })
    }
}

/// The fields of an envelope between its header and `data`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields<'a> {
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
}

/// A whole envelope of format 1: the header's fields, [`Fields`], and `data`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeV1<'a> {
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

impl<'a> EnvelopeV1<'a> {
    fn split(self) -> (Fields<'a>, &'a RawValue) {
        let EnvelopeV1 {
            kind,
            session_id,
            saved_at,
            checkpoint_id,
            branch_id,
            timestamp,
            meta,
            data,
            ..
        } = self;
        (Fields { kind, session_id, saved_at, checkpoint_id, branch_id, timestamp, meta }, data)
    }
}

impl Fields<'_> {
    /// The record's head, if its fields match its kind.
    fn head(self, key: &StorageKey) -> Result<RecordHead> {
        fn meta<M: Default + serde::de::DeserializeOwned>(
            key: &StorageKey,
            raw: Option<&RawValue>,
        ) -> Result<M> {
            raw.map(|r| serde_json::from_str(r.get()))
                .transpose()
                .map(Option::unwrap_or_default)
                .map_err(|e| {
                    StateError::corrupt(
                        key,
                        format!("meta does not parse: {}", redact(&e.to_string())),
                    )
                })
        }
        Ok(match (self.kind, self.saved_at, self.checkpoint_id, self.branch_id, self.timestamp) {
            ("session", Some(saved_at), None, None, None) => RecordHead::Session {
                session_id: self.session_id,
                saved_at,
                meta: meta(key, self.meta)?,
            },
            ("checkpoint", None, Some(checkpoint_id), Some(branch_id), Some(timestamp)) => {
                RecordHead::Checkpoint {
                    session_id: self.session_id,
                    checkpoint_id,
                    branch_id,
                    timestamp,
                    meta: meta(key, self.meta)?,
                }
            }
            _ => return Err(StateError::corrupt(key, "envelope fields do not match its kind")),
        })
    }
}

fn json_str(s: &str) -> String {
    // Ids are validated to a safe ASCII set, but escape anyway so the envelope stays JSON.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// A number of the header: exactly `digits.len()` decimal digits.
fn decimal(digits: &[u8]) -> Option<usize> {
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse::<u64>().ok()?.try_into().ok()
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
        let data_at = HEADER_LEN + fields.len();
        // Ten digits hold any offset the fields can reach (they are a few hundred bytes:
        // ids of at most 128 bytes and the meta object); refused rather than misframed.
        const MAX_DATA_AT: usize = 9_999_999_999;
        if data_at > MAX_DATA_AT {
            return Err(StateError::TooLarge { size: data_at, limit: MAX_DATA_AT });
        }
        // One buffer, one copy of the state: header with a placeholder checksum, fields,
        // data, then the checksum of everything after it written in place.
        let mut out = Vec::with_capacity(data_at + data.len() + TAIL.len());
        out.extend_from_slice(PREFIX);
        out.extend_from_slice(b"00000000\",");
        out.extend_from_slice(DATA_AT_KEY);
        out.extend_from_slice(format!("{data_at:0DATA_AT_DIGITS$}").as_bytes());
        out.extend_from_slice(DATA_LEN_KEY);
        out.extend_from_slice(format!("{:0DATA_LEN_DIGITS$}", data.len()).as_bytes());
        out.extend_from_slice(b"\",");
        out.extend_from_slice(fields.as_bytes());
        debug_assert_eq!(out.len(), data_at);
        out.extend_from_slice(data);
        out.extend_from_slice(TAIL);
        let crc = crc32fast::hash(&out[CRC_FROM..]);
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
        if bytes.starts_with(PREFIX) {
            Self::parse_v2(key, bytes)
        } else if bytes.starts_with(PREFIX_V1) {
            Self::parse_v1(key, bytes)
        } else {
            Err(StateError::corrupt(key, "not a mars-state record (header missing or damaged)"))
        }
    }

    /// Checks the checksum field (at the same place in both formats) against the bytes
    /// after it.
    fn check_crc(key: &StorageKey, bytes: &[u8]) -> Result<()> {
        let stored = std::str::from_utf8(&bytes[PREFIX.len()..PREFIX.len() + 8])
            .ok()
            .filter(|h| h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| StateError::corrupt(key, "checksum field damaged"))?;
        if crc32fast::hash(&bytes[CRC_FROM..]) != stored {
            return Err(StateError::corrupt(key, "checksum mismatch"));
        }
        Ok(())
    }

    /// A record of the current format: the header says where `data` lies, so only the
    /// fields before it are parsed.
    fn parse_v2(key: &StorageKey, bytes: &[u8]) -> Result<(RecordHead, Range<usize>)> {
        let damaged =
            || StateError::corrupt(key, "not a mars-state record (header missing or damaged)");
        if bytes.len() < HEADER_LEN + DATA_KEY.len() + 1 + TAIL.len()
            || &bytes[CRC_FROM - 2..CRC_FROM] != b"\","
            || &bytes[CRC_FROM..DATA_AT_FROM] != DATA_AT_KEY
            || &bytes[DATA_AT_FROM + DATA_AT_DIGITS..DATA_LEN_FROM] != DATA_LEN_KEY
            || &bytes[HEADER_LEN - 2..HEADER_LEN] != b"\","
        {
            return Err(damaged());
        }
        Self::check_crc(key, bytes)?;
        let data_at = decimal(&bytes[DATA_AT_FROM..DATA_AT_FROM + DATA_AT_DIGITS])
            .ok_or_else(|| StateError::corrupt(key, "data offset field damaged"))?;
        let data_len = decimal(&bytes[DATA_LEN_FROM..DATA_LEN_FROM + DATA_LEN_DIGITS])
            .ok_or_else(|| StateError::corrupt(key, "data length field damaged"))?;
        if !bytes.ends_with(TAIL) {
            return Err(StateError::corrupt(key, "record is truncated"));
        }
        // The header's numbers, checked against the record's own bytes: `data` is not empty,
        // it ends where the closing `}` starts, and `"data":` stands right before it.
        let data_end = bytes.len() - TAIL.len();
        if data_len == 0
            || data_at < HEADER_LEN + DATA_KEY.len()
            || data_at.checked_add(data_len) != Some(data_end)
        {
            return Err(StateError::corrupt(
                key,
                "the header's data offset and length do not match the record",
            ));
        }
        let Some(fields) = bytes[HEADER_LEN..data_at - DATA_KEY.len()]
            .strip_suffix(b",")
            .filter(|_| bytes[..data_at].ends_with(DATA_KEY))
        else {
            return Err(StateError::corrupt(
                key,
                "the header's data offset does not point at data",
            ));
        };
        // The fields as an object of their own: a copy of a few hundred bytes, not of the
        // state.
        let mut object = Vec::with_capacity(fields.len() + 2);
        object.push(b'{');
        object.extend_from_slice(fields);
        object.push(b'}');
        let fields: Fields<'_> = serde_json::from_slice(&object).map_err(|e| {
            StateError::corrupt(key, format!("envelope does not parse: {}", redact(&e.to_string())))
        })?;
        Ok((fields.head(key)?, data_at..data_end))
    }

    /// A record of format 1 (written before issue 15): the whole envelope is parsed to
    /// find `data`.
    fn parse_v1(key: &StorageKey, bytes: &[u8]) -> Result<(RecordHead, Range<usize>)> {
        if bytes.len() < CRC_FROM || &bytes[CRC_FROM - 2..CRC_FROM] != b"\"," {
            return Err(StateError::corrupt(
                key,
                "not a mars-state record (header missing or damaged)",
            ));
        }
        Self::check_crc(key, bytes)?;
        if !bytes.ends_with(TAIL) {
            return Err(StateError::corrupt(key, "record is truncated"));
        }
        let env: EnvelopeV1<'_> = serde_json::from_slice(bytes).map_err(|e| {
            StateError::corrupt(key, format!("envelope does not parse: {}", redact(&e.to_string())))
        })?;
        let (fields, data) = env.split();
        let start = data.get().as_ptr() as usize - bytes.as_ptr() as usize;
        Ok((fields.head(key)?, start..start + data.get().len()))
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
        // Sized from the gzip trailer (the decompressed length, covered by the checksum
        // above): the buffer is not grown and copied on the way, and a state that shares it
        // holds no slack. Bounded by the limit whatever the trailer says.
        let trailer = raw.len() - 4;
        let plain_len = u32::from_le_bytes([
            raw[trailer],
            raw[trailer + 1],
            raw[trailer + 2],
            raw[trailer + 3],
        ]);
        let mut out = Vec::with_capacity((plain_len as usize).min(self.max_record));
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
        assert_eq!(v["mars_state"], 2);
        // The header's numbers say where `data` is, in the record's own bytes.
        let at: usize = v["data_at"].as_str().unwrap().parse().unwrap();
        let len: usize = v["data_len"].as_str().unwrap().parse().unwrap();
        assert_eq!(&enc[at..at + len], br#"{"a":[1,2]}"#);
        assert_eq!(enc.len(), at + len + 2);
    }

    fn plain() -> Codec {
        Codec { compression: Compression::None, encrypted: false, max_record: 1 << 20 }
    }

    fn checkpoint_head() -> RecordHead {
        RecordHead::Checkpoint {
            session_id: SessionId::new("s1").unwrap(),
            checkpoint_id: CheckpointId::parse("0192a3b4c5d60001-1a2b3c4d").unwrap(),
            branch_id: BranchId::new("main").unwrap(),
            timestamp: 9,
            meta: CheckpointMeta { schema: 3, step: Some(4), ..CheckpointMeta::default() },
        }
    }

    /// The checksum of a plain record written again over its bytes (what a writer with a
    /// bug in its header would store).
    fn reseal(bytes: &mut [u8]) {
        let crc = crc32fast::hash(&bytes[CRC_FROM..]);
        bytes[PREFIX.len()..PREFIX.len() + 8].copy_from_slice(format!("{crc:08x}").as_bytes());
    }

    /// A record of format 1, as versions before issue 15 wrote it.
    fn v1_record(fields: &str, data: &str) -> Vec<u8> {
        let mut out =
            format!("{{\"mars_state\":1,\"crc32\":\"00000000\",{fields},\"data\":{data}}}\n")
                .into_bytes();
        reseal(&mut out);
        out
    }

    fn corrupt(r: std::result::Result<Decoded, (StateError, Vec<u8>)>) -> String {
        match r {
            Err((StateError::Corrupt { reason, .. }, _)) => reason,
            Err((e, _)) => panic!("not Corrupt: {e}"),
            Ok(d) => panic!("accepted, data {:?}", String::from_utf8_lossy(d.data())),
        }
    }

    #[test]
    fn a_record_of_format_1_still_loads() {
        // A record of the v1 fixture (tests/fixtures/v1), byte for byte.
        let fixture = br#"{"mars_state":1,"crc32":"e8717655","kind":"session","session_id":"agent-b","saved_at":1795636056239,"meta":{"schema":1,"status":"paused","reason":"waiting for human review","status_at":1795636056239,"step":2},"data":{"msgs":["message 1","message 2"],"step":2}}
"#;
        let key = StorageKey::new("sessions/agent-b.json").unwrap();
        let d = plain().decode(&key, fixture.to_vec()).map_err(|e| e.0).unwrap();
        assert_eq!(d.data(), br#"{"msgs":["message 1","message 2"],"step":2}"#);
        let RecordHead::Session { session_id, saved_at, meta } = &d.head else {
            panic!("not a session: {:?}", d.head)
        };
        assert_eq!((session_id.as_str(), *saved_at), ("agent-b", 1795636056239));
        assert_eq!(meta.status, SessionStatus::Paused);
        assert_eq!(meta.reason.as_deref(), Some("waiting for human review"));
        assert_eq!(meta.step, Some(2));

        // A checkpoint of format 1, plain and gzipped (the gzip frame did not change).
        let v1 = v1_record(
            r#""kind":"checkpoint","session_id":"s1","checkpoint_id":"0192a3b4c5d60001-1a2b3c4d","branch_id":"main","timestamp":9,"meta":{"schema":3,"step":4}"#,
            r#"{"x":[1,"two"]}"#,
        );
        for bytes in [v1.clone(), gzip(&v1, 6).unwrap()] {
            let d = plain().decode(&key, bytes).map_err(|e| e.0).unwrap();
            assert_eq!(d.head, checkpoint_head());
            assert_eq!(d.data(), br#"{"x":[1,"two"]}"#);
        }
        // Still checked as strictly as before: every flipped bit and every cut is Corrupt.
        for i in 0..v1.len() * 8 {
            let mut bad = v1.clone();
            bad[i / 8] ^= 1 << (i % 8);
            corrupt(plain().decode(&key, bad));
        }
        for len in 0..v1.len() {
            corrupt(plain().decode(&key, v1[..len].to_vec()));
        }
    }

    #[test]
    fn the_loaded_state_shares_the_read_buffer() {
        let enc = plain().encode(&head(), br#"{"step":42}"#).unwrap();
        let d = plain().decode(&key(), enc).map_err(|e| e.0).unwrap();
        let state = d.state();
        assert_eq!(state.as_bytes(), br#"{"step":42}"#);
        assert_eq!(state.as_bytes().as_ptr(), d.bytes[d.data.start..].as_ptr(), "copied");
        assert_eq!(state.deserialize::<serde_json::Value>().unwrap()["step"], 42);
    }

    #[test]
    fn check_data_reports_data_that_is_not_json() {
        let good = plain().encode(&head(), br#"{"a":1}"#).unwrap();
        let d = plain().decode(&key(), good).map_err(|e| e.0).unwrap();
        d.check_data(&key()).unwrap();
        // Sealed by a writer that was handed something other than JSON: a load passes it on
        // (whoever parses the state says it does not parse), verify reports it.
        let bad = plain().encode(&head(), br#"{"a":1"#).unwrap();
        let d = plain().decode(&key(), bad).map_err(|e| e.0).unwrap();
        assert_eq!(d.data(), br#"{"a":1"#);
        assert!(d.state().deserialize::<serde_json::Value>().is_err());
        let e = d.check_data(&key()).unwrap_err();
        assert!(
            matches!(&e, StateError::Corrupt { reason, .. } if reason.starts_with("data is not JSON")),
            "{e}"
        );
    }

    /// Every way the numbers of the header can lie, with the checksum made to agree: each is
    /// `Corrupt`, never a panic or a slice that is not the data.
    #[test]
    fn a_header_that_lies_is_corrupt() {
        let data = br#"{"step":42,"msg":"hello"}"#;
        let good = plain().encode(&checkpoint_head(), data).unwrap();
        let at = |b: &[u8]| decimal(&b[DATA_AT_FROM..DATA_AT_FROM + DATA_AT_DIGITS]).unwrap();
        let data_at = at(&good);
        let len = data.len();
        let set = |field: usize, digits: usize, text: String| {
            let mut b = good.clone();
            assert_eq!(text.len(), digits, "{text}");
            b[field..field + digits].copy_from_slice(text.as_bytes());
            reseal(&mut b);
            b
        };
        let offset = |v: usize| set(DATA_AT_FROM, DATA_AT_DIGITS, format!("{v:010}"));
        let length = |v: usize| set(DATA_LEN_FROM, DATA_LEN_DIGITS, format!("{v:020}"));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("offset one early", offset(data_at - 1)),
            ("offset one late", offset(data_at + 1)),
            ("offset 0", offset(0)),
            ("offset into the header", offset(HEADER_LEN - 1)),
            ("offset into the fields", offset(HEADER_LEN + 10)),
            ("offset at the end", offset(good.len())),
            ("offset past the end", offset(good.len() + 100)),
            ("largest offset", offset(9_999_999_999)),
            ("length one short", length(len - 1)),
            ("length one long", length(len + 1)),
            ("length 0", length(0)),
            ("length past the end", length(good.len())),
            ("largest u64 length", length(u64::MAX as usize)),
            ("length beyond u64", set(DATA_LEN_FROM, DATA_LEN_DIGITS, "9".repeat(20))),
            ("offset not digits", set(DATA_AT_FROM, DATA_AT_DIGITS, "00000000x1".into())),
            ("offset with a sign", set(DATA_AT_FROM, DATA_AT_DIGITS, "+000000123".into())),
            ("length not digits", set(DATA_LEN_FROM, DATA_LEN_DIGITS, format!("{:>20}", len))),
            ("both moved by one", {
                let mut b = offset(data_at + 1);
                b[DATA_LEN_FROM..DATA_LEN_FROM + DATA_LEN_DIGITS]
                    .copy_from_slice(format!("{:020}", len - 1).as_bytes());
                reseal(&mut b);
                b
            }),
            ("a data key in the fields", {
                // `"data":` moved into the fields, where the header says data starts.
                let text = String::from_utf8(good.clone()).unwrap();
                let text =
                    text.replacen(r#""kind":"checkpoint""#, r#""data":0,"kind":"checkpoint""#, 1);
                let mut b = text.into_bytes();
                let at = HEADER_LEN + r#""data":"#.len();
                let len = b.len() - 2 - at;
                b[DATA_AT_FROM..DATA_AT_FROM + DATA_AT_DIGITS]
                    .copy_from_slice(format!("{at:010}").as_bytes());
                b[DATA_LEN_FROM..DATA_LEN_FROM + DATA_LEN_DIGITS]
                    .copy_from_slice(format!("{len:020}").as_bytes());
                reseal(&mut b);
                b
            }),
        ];
        for (name, bytes) in cases {
            let reason = corrupt(plain().decode(&key(), bytes.clone()));
            assert!(!reason.is_empty(), "{name}");
            // Not resealed: the checksum catches it first.
            let mut stale = bytes;
            stale[PREFIX.len()..PREFIX.len() + 8]
                .copy_from_slice(&good[PREFIX.len()..PREFIX.len() + 8]);
            if stale != good {
                corrupt(plain().decode(&key(), stale));
            }
        }
        // A damaged checksum field, and a checksum that does not agree.
        for crc in ["0000000g", "ABCDEF01", "        ", "00000000"] {
            let mut b = good.clone();
            b[PREFIX.len()..PREFIX.len() + 8].copy_from_slice(crc.as_bytes());
            corrupt(plain().decode(&key(), b));
        }
        assert_eq!(at(&good), data_at, "the good record is untouched");
        let d = plain().decode(&key(), good).map_err(|e| e.0).unwrap();
        assert_eq!(d.data(), data);
    }

    /// Any byte of the header or fields replaced, checksum made to agree: never a panic, and
    /// a record still accepted (a field's value changed) still gives exactly the data; a
    /// change to the header's numbers or literals is always `Corrupt`.
    #[test]
    fn any_resealed_header_byte_is_corrupt_or_the_same_data() {
        let data = br#"{"step":42,"msg":"hello"}"#;
        let good = plain().encode(&checkpoint_head(), data).unwrap();
        let data_at = good.len() - 2 - data.len();
        let mut rejected = 0;
        for i in 0..data_at {
            for byte in [b'0', b'1', b'9', b'"', b',', b':', b'{', b'}', b' ', b'\\', 0xff, 0] {
                if good[i] == byte || (PREFIX.len()..PREFIX.len() + 8).contains(&i) {
                    continue;
                }
                let mut b = good.clone();
                b[i] = byte;
                reseal(&mut b);
                match plain().decode(&key(), b) {
                    Ok(d) => {
                        assert!(i >= HEADER_LEN, "header byte {i} replaced by {byte} accepted");
                        assert_eq!(d.data(), data, "byte {i} replaced by {byte}");
                    }
                    Err((StateError::Corrupt { .. }, _)) => rejected += 1,
                    Err((e, _)) => panic!("byte {i}: not Corrupt: {e}"),
                }
            }
        }
        assert!(rejected > data_at, "{rejected}");
    }
}
