//! The frame format of the file backend's write-ahead log (`metadata/.wal`), and how a log
//! left by a crash is read back.
//!
//! This module owns the bytes of a frame: checking, encoding and replaying them. It does no
//! I/O and calls nothing but [`StorageKey`] and the CRC; the log writer (`log.rs`) calls it.
//!
//! In log mode a put or delete is made durable by appending one frame to the log and
//! `fdatasync`ing it, many callers' frames at once (group commit: a *batch*, one `write`
//! and one `fdatasync`); the record files are brought up to date later, in batches (see
//! `log.rs`). A frame:
//!
//! ```text
//! magic u32 LE  "MSWL"
//! crc   u32 LE  CRC-32 of every byte after this field (kind .. value)
//! kind  u8      3 = put, 4 = delete (1 = put, 2 = delete: the older format, without `batch`)
//! klen  u16 LE  key length
//! vlen  u32 LE  value length (0 for a delete)
//! batch u64 LE  (kinds 3 and 4 only) the offset in the log of the first frame of this
//!               frame's batch
//! key   klen bytes, a valid StorageKey
//! value vlen bytes
//! ```
//!
//! Logs written before `batch` existed (kinds 1 and 2) are still read; they only lack the
//! evidence described below, so damage in them is judged more cautiously.
//!
//! # Torn tail or damage
//!
//! Reading stops at the first frame that is short, fails its CRC or holds an invalid key.
//! What comes after it decides what that means:
//!
//! - A crash can only tear the **last batch**: a caller is answered only after the
//!   `fdatasync` that covers its frame and every frame before it, and a batch is written
//!   only after the one before it was synced. Within that unsynced batch a power loss may
//!   keep any subset of its pages, so a damaged frame of the last batch may be followed by
//!   whole frames of the *same* batch. None of them was acknowledged: the damaged frame and
//!   everything after it are a torn tail, ignored.
//! - Any other damage hit frames that were synced and acknowledged (a bad sector, a bit
//!   flip, a stray write). Dropping it would silently give back older values, so it is
//!   reported ([`MidLogDamage`]) and the log is left as it is.
//!
//! The two are told apart by the `batch` field. Every whole frame found after the damage
//! (scanning for the magic and a CRC that checks) must belong to the batch the damage lies
//! in: its batch must start at or before the damaged offset. A frame whose batch starts
//! after the damage was written after the damaged bytes had been synced, so they were
//! acknowledged: mid-log damage. (Batch offsets, unlike sequence numbers, stay right when a
//! failed batch is cut off the log and the next one is written in its place.) Whole frames
//! after damage that carry no `batch` (the older format) cannot be placed, so they are
//! reported as damage too: failing closed costs a false alarm after a power loss in the
//! middle of a batch written by an older version, never an acknowledged write.
//!
//! What remains undetectable: damage in the last batch itself, or damage after which no
//! whole frame survives, looks exactly like a torn append and is dropped. Whole frames
//! appearing after the damage that the writer never put there (file-system bugs exposing
//! stale blocks, or a stored value that embeds a frame of this log verbatim) can only turn
//! a torn tail into a false `Corrupt`, never hide damage.

use crate::backend::StorageKey;

const MAGIC: [u8; 4] = *b"MSWL";
/// Header of the older frames (kinds 1, 2): magic, crc, kind, klen, vlen.
const HEAD_V1: usize = 4 + 4 + 1 + 2 + 4;
/// Header of the current frames (kinds 3, 4): the same, then the batch offset.
const HEAD: usize = HEAD_V1 + 8;
const PUT_V1: u8 = 1;
const DELETE_V1: u8 = 2;
const PUT: u8 = 3;
const DELETE: u8 = 4;

/// Fails if `key` or `value` is too long to frame; [`encode`] accepts whatever passes.
pub(crate) fn check(key: &StorageKey, value: Option<&[u8]>) -> Result<(), &'static str> {
    u16::try_from(key.as_str().len()).map_err(|_| "key too long for the log")?;
    u32::try_from(value.map_or(0, <[u8]>::len))
        .map_err(|_| "value too large for the log (4 GiB at most)")?;
    Ok(())
}

/// Appends the frame of a put (`Some`) or a delete (`None`) of `key` to `out`, as part of
/// the batch whose first frame starts at offset `batch` of the log. Fails if the key or
/// the value is too long to frame (see [`check`]).
pub(crate) fn encode(
    out: &mut Vec<u8>,
    key: &StorageKey,
    value: Option<&[u8]>,
    batch: u64,
) -> Result<(), &'static str> {
    let k = key.as_str().as_bytes();
    let klen = u16::try_from(k.len()).map_err(|_| "key too long for the log")?;
    let v = value.unwrap_or_default();
    let vlen = u32::try_from(v.len()).map_err(|_| "value too large for the log (4 GiB at most)")?;
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 4]);
    out.push(if value.is_some() { PUT } else { DELETE });
    out.extend_from_slice(&klen.to_le_bytes());
    out.extend_from_slice(&vlen.to_le_bytes());
    out.extend_from_slice(&batch.to_le_bytes());
    out.extend_from_slice(k);
    out.extend_from_slice(v);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// One frame: a key and its new value (`None`: deleted).
pub(crate) type Frame = (StorageKey, Option<Vec<u8>>);

/// What a log holds: each frame in order, and how many bytes of it were whole frames
/// (anything after them is a torn tail).
pub(crate) struct Replayed {
    pub(crate) frames: Vec<Frame>,
    pub(crate) valid_len: usize,
}

/// Damage that is not a torn tail: whole frames follow it that prove (or, in the older
/// format, may mean) that it hit acknowledged writes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MidLogDamage {
    /// Offset of the first frame that could not be read.
    pub(crate) at: usize,
    /// Offset of the first whole frame after it that a torn tail cannot explain.
    pub(crate) next_frame: usize,
}

/// Reads the whole frames at the start of `log`. Damage after them is a torn tail (ignored)
/// or, when whole frames of a later batch follow it, [`MidLogDamage`]; see the module docs.
pub(crate) fn replay(log: &[u8]) -> Result<Replayed, MidLogDamage> {
    let mut frames = Vec::new();
    let mut at = 0;
    // Where the batch of the last whole frame starts (`None`: no frame, or an older one).
    let mut last_batch = None;
    while let Some(parsed) = frame_at(&log[at..]) {
        frames.push(parsed.frame);
        last_batch = parsed.batch;
        at += parsed.len;
    }
    if at < log.len() {
        check_tail(log, at, last_batch)?;
    }
    Ok(Replayed { frames, valid_len: at })
}

/// Checks that every whole frame after the damage at `damaged` belongs to the batch the
/// damage lies in: the one starting at `damaged` (it tore at its first frame) or the batch
/// of the last whole frame before it, starting at `last_batch` (it tore part-way).
fn check_tail(log: &[u8], damaged: usize, last_batch: Option<u64>) -> Result<(), MidLogDamage> {
    let torn_batch_may_start = |b: u64| b == damaged as u64 || Some(b) == last_batch;
    let mut from = damaged + 1;
    while let Some(found) = find_magic(&log[from..]) {
        let p = from + found;
        match frame_at(&log[p..]) {
            Some(f) if f.batch.is_some_and(torn_batch_may_start) => {
                // A surviving frame of the torn batch: skip it whole.
                from = p + f.len;
            }
            Some(_) => return Err(MidLogDamage { at: damaged, next_frame: p }),
            None => from = p + 1,
        }
    }
    Ok(())
}

fn find_magic(b: &[u8]) -> Option<usize> {
    b.windows(MAGIC.len()).position(|w| w == MAGIC)
}

/// A whole frame read from the log.
struct Parsed {
    frame: Frame,
    /// Its batch's start (`None`: an older frame, without one).
    batch: Option<u64>,
    /// Its length in bytes.
    len: usize,
}

fn frame_at(b: &[u8]) -> Option<Parsed> {
    if b.len() < HEAD_V1 || b[..4] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
    let kind = b[8];
    let klen = usize::from(u16::from_le_bytes(b[9..11].try_into().ok()?));
    let vlen = usize::try_from(u32::from_le_bytes(b[11..15].try_into().ok()?)).ok()?;
    let head = match kind {
        PUT | DELETE => HEAD,
        PUT_V1 | DELETE_V1 => HEAD_V1,
        _ => return None,
    };
    let len = head.checked_add(klen)?.checked_add(vlen)?;
    if b.len() < len || crc32fast::hash(&b[8..len]) != crc {
        return None;
    }
    let batch = if head == HEAD {
        Some(u64::from_le_bytes(b[HEAD_V1..HEAD].try_into().ok()?))
    } else {
        None
    };
    let key = StorageKey::new(std::str::from_utf8(&b[head..head + klen]).ok()?).ok()?;
    let value = match kind {
        PUT | PUT_V1 => Some(b[head + klen..len].to_vec()),
        _ if vlen == 0 => None,
        _ => return None,
    };
    Some(Parsed { frame: (key, value), batch, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> StorageKey {
        StorageKey::new(s).unwrap()
    }

    /// Appends a batch of puts (`Some`) and deletes (`None`) the way the log writer does:
    /// every frame carries the offset where the batch starts. Returns each frame's end.
    fn batch(log: &mut Vec<u8>, writes: &[(&str, Option<&[u8]>)]) -> Vec<usize> {
        let start = log.len() as u64;
        writes
            .iter()
            .map(|(k, v)| {
                encode(log, &key(k), *v, start).unwrap();
                log.len()
            })
            .collect()
    }

    /// A frame in the older format (kinds 1 and 2, no batch offset).
    fn encode_v1(out: &mut Vec<u8>, key: &str, value: Option<&[u8]>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[0; 4]);
        out.push(if value.is_some() { PUT_V1 } else { DELETE_V1 });
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(&(value.unwrap_or_default().len() as u32).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(value.unwrap_or_default());
        let crc = crc32fast::hash(&out[start + 8..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn frames_round_trip_in_order() {
        let mut log = Vec::new();
        batch(&mut log, &[("sessions/a.json", Some(b"one")), ("sessions/b.json", None)]);
        batch(&mut log, &[("sessions/a.json", Some(b""))]);
        let r = replay(&log).unwrap();
        assert_eq!(r.valid_len, log.len());
        assert_eq!(
            r.frames,
            vec![
                (key("sessions/a.json"), Some(b"one".to_vec())),
                (key("sessions/b.json"), None),
                (key("sessions/a.json"), Some(Vec::new())),
            ]
        );
    }

    #[test]
    fn logs_in_the_older_format_still_replay() {
        let mut log = Vec::new();
        encode_v1(&mut log, "sessions/a.json", Some(b"one"));
        let first = log.len();
        encode_v1(&mut log, "sessions/b.json", None);
        let old = log.len();
        // A log an older version left, kept at open (full disk) and appended to since.
        batch(&mut log, &[("sessions/c.json", Some(b"three"))]);
        let r = replay(&log).unwrap();
        assert_eq!(r.valid_len, log.len());
        assert_eq!(
            r.frames,
            vec![
                (key("sessions/a.json"), Some(b"one".to_vec())),
                (key("sessions/b.json"), None),
                (key("sessions/c.json"), Some(b"three".to_vec())),
            ]
        );
        // Torn in the older frames: their prefix stays, nothing after it follows.
        let r = replay(&log[..old - 3]).unwrap();
        assert_eq!((r.frames.len(), r.valid_len), (1, first));
    }

    #[test]
    fn every_truncation_keeps_exactly_the_whole_frames_before_it() {
        let mut log = Vec::new();
        let mut ends = Vec::new();
        for i in 0..3 {
            ends.extend(batch(
                &mut log,
                &[(&format!("checkpoints/s/{i}.json"), Some(&[i as u8; 40]))],
            ));
        }
        ends.extend(batch(&mut log, &[("sessions/x.json", Some(b"x")), ("sessions/y.json", None)]));
        for cut in 0..=log.len() {
            let r = replay(&log[..cut]).unwrap_or_else(|e| panic!("cut at {cut}: {e:?}"));
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(r.frames.len(), whole, "cut at {cut}");
            assert_eq!(r.valid_len, if whole == 0 { 0 } else { ends[whole - 1] });
        }
    }

    /// A flipped bit in the last batch is indistinguishable from a torn append and ends
    /// the replay there; a flipped bit in any earlier batch is followed by whole frames of
    /// a later batch, which prove it hit acknowledged writes.
    #[test]
    fn a_flipped_bit_in_the_last_batch_is_a_torn_tail_and_in_an_earlier_one_is_damage() {
        let mut log = Vec::new();
        let mut starts = vec![0];
        for (k, v) in [
            ("sessions/a.json", &b"first"[..]),
            ("sessions/b.json", b"second"),
            ("sessions/c.json", b"3"),
        ] {
            starts.extend(batch(&mut log, &[(k, Some(v))]));
        }
        for byte in 0..log.len() {
            let frame = starts.iter().rposition(|&s| s <= byte).unwrap();
            for bit in 0..8 {
                let mut bad = log.clone();
                bad[byte] ^= 1 << bit;
                let r = replay(&bad);
                if frame == 2 {
                    let r = r.unwrap_or_else(|e| {
                        panic!("flip at {byte}.{bit} in the last frame: {e:?}")
                    });
                    assert_eq!(
                        (r.frames.len(), r.valid_len),
                        (2, starts[2]),
                        "flip at {byte}.{bit}"
                    );
                } else {
                    let e = r.err().unwrap_or_else(|| {
                        panic!("flip at {byte}.{bit} in frame {frame} was not caught")
                    });
                    assert_eq!(
                        e,
                        MidLogDamage { at: starts[frame], next_frame: starts[frame + 1] }
                    );
                }
            }
        }
    }

    /// A power loss may keep any pages of the last, unsynced batch: a frame of it may be
    /// damaged while later frames of the same batch are whole. None of them was
    /// acknowledged; the batch is a torn tail. A whole frame of a later batch is not.
    #[test]
    fn whole_frames_of_the_torn_batch_after_its_damage_are_a_torn_tail() {
        let mut log = Vec::new();
        let first = batch(&mut log, &[("sessions/a.json", Some(b"acknowledged"))])[0];
        let ends = batch(
            &mut log,
            &[
                ("sessions/a.json", Some(b"unsynced 1")),
                ("sessions/b.json", Some(b"2")),
                ("sessions/c.json", None),
            ],
        );
        // The batch's first frame lost (zeros, as an unwritten page reads), the others kept.
        let mut torn = log.clone();
        torn[first..ends[0]].fill(0);
        let r = replay(&torn).unwrap();
        assert_eq!((r.frames.len(), r.valid_len), (1, first));
        // Its middle frame lost: the frame before it is replayed, the one after it ignored.
        let mut torn = log.clone();
        torn[ends[0] + 3] ^= 0xFF;
        let r = replay(&torn).unwrap();
        assert_eq!((r.frames.len(), r.valid_len), (2, ends[0]));
        // The same damage, but a later batch follows: the torn batch was synced after all.
        batch(&mut torn, &[("sessions/d.json", Some(b"later"))]);
        assert_eq!(replay(&torn).err(), Some(MidLogDamage { at: ends[0], next_frame: ends[2] }));
        // Damage to the acknowledged first batch, the second batch intact: damage.
        let mut bad = log.clone();
        bad[5] ^= 1;
        assert_eq!(replay(&bad).err(), Some(MidLogDamage { at: 0, next_frame: first }));
    }

    /// Whole older-format frames after damage carry no batch to place them: failing closed,
    /// that is reported as damage.
    #[test]
    fn older_frames_after_damage_are_reported() {
        let mut log = Vec::new();
        encode_v1(&mut log, "sessions/a.json", Some(b"one"));
        let second = log.len();
        encode_v1(&mut log, "sessions/b.json", Some(b"two"));
        log[3] ^= 1;
        assert_eq!(replay(&log).err(), Some(MidLogDamage { at: 0, next_frame: second }));
    }

    #[test]
    fn a_frame_naming_an_invalid_key_is_damage() {
        let mut log = Vec::new();
        encode(&mut log, &StorageKey::from_valid("../escape".into()), Some(b"x"), 0).unwrap();
        assert!(replay(&log).unwrap().frames.is_empty());
        let next = log.len();
        batch(&mut log, &[("sessions/a.json", Some(b"y"))]);
        assert_eq!(replay(&log).err(), Some(MidLogDamage { at: 0, next_frame: next }));
    }

    #[test]
    fn too_long_keys_and_values_are_refused_before_framing() {
        let long = "k".repeat(70_000);
        assert!(check(&StorageKey::from_valid(format!("sessions/{long}")), None).is_err());
        assert!(check(&key("sessions/a.json"), Some(b"v")).is_ok());
    }
}
