//! The frame format of the file backend's write-ahead log (`metadata/.wal`), and how a log
//! left by a crash is read back.
//!
//! This module owns the bytes of a frame: checking, encoding and replaying them. It does no
//! I/O and calls nothing but [`StorageKey`] and the CRC; the log writer (`log.rs`) calls it.
//!
//! In log mode a put or delete is made durable by writing one frame into the log and
//! `fdatasync`ing it, many callers' frames at once (group commit: a *batch*, one `write`
//! and one `fdatasync`); the record files are brought up to date later, in batches (see
//! `log.rs`).
//!
//! # The log file (format 3): a header, then frames, in blocks that already exist
//!
//! The log is preallocated (zero-filled) once and then reused in place: it is never cut or
//! removed once the record files are up to date, only started again from its beginning
//! under a new *generation*. A `write` + `fdatasync` into blocks that already exist does
//! not have to change the file's size, which is what makes it cheap. So the bytes after the
//! last frame of the live generation are not nothing: zeros, frames of older generations
//! (already in their record files), or a batch whose write failed (zeroed again). Every
//! frame therefore names its generation, as SQLite's WAL does with the salts of its header,
//! and a replay takes only frames of the generation the header names:
//!
//! ```text
//! header, at offset 0, HEADER_LEN = 32 bytes:
//!   magic   4 bytes  "MSWH"
//!   version u32 LE   3
//!   salt    u64 LE   this generation's salt: random, never the previous one
//!   crc     u32 LE   CRC-32 of magic, version, salt
//!   zero    12 bytes
//! frames, from offset HEADER_LEN:
//!   magic u32 LE  "MSWL"
//!   crc   u32 LE  CRC-32 of every byte after this field (kind .. value)
//!   kind  u8      5 = put, 6 = delete
//!   klen  u16 LE  key length
//!   vlen  u32 LE  value length (0 for a delete)
//!   batch u64 LE  the offset in the file of the first frame of this frame's batch
//!   salt  u64 LE  the generation's salt, as in the header
//!   key   klen bytes, a valid StorageKey
//!   value vlen bytes
//! ```
//!
//! A frame is taken only if its CRC checks and its salt is the header's, so neither a torn
//! frame nor a whole frame of an older generation is ever replayed. A header whose CRC
//! fails (a crash while it was rewritten) makes the whole file nothing to replay: the
//! writer rewrites the header only once every frame of the generation before is durable in
//! its record file, and writes no frame of the new one before the header is durable.
//!
//! # Older logs (formats 1 and 2)
//!
//! A log left by an older version (a crash before it brought its files up to date) has no
//! header: frames from offset 0, appended and cut, kinds 1 and 2 (no `batch`) or 3 and 4
//! (`batch`, no `salt`):
//!
//! ```text
//! magic u32 LE  "MSWL"
//! crc   u32 LE  CRC-32 of every byte after this field (kind .. value)
//! kind  u8      3 = put, 4 = delete (1 = put, 2 = delete: without `batch`)
//! klen  u16 LE  key length
//! vlen  u32 LE  value length (0 for a delete)
//! batch u64 LE  (kinds 3 and 4 only) the offset of the first frame of this frame's batch
//! key   klen bytes
//! value vlen bytes
//! ```
//!
//! They are told apart by the first four bytes (`MSWH`: format 3; anything else: the older
//! formats) and still replayed at open; the store then removes such a log and starts a
//! format-3 one. Older kinds inside a format-3 log, and format-3 kinds in an older log, are
//! not frames.
//!
//! # Torn tail or damage
//!
//! Reading stops at the first frame that is short, fails its CRC, holds an invalid key or
//! (format 3) carries another salt. What comes after it decides what that means:
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
//! The two are told apart by the `batch` field. Every whole frame of the same generation
//! found after the damage (scanning for the magic and a CRC that checks) must belong to the
//! batch the damage lies in: its batch must start at or before the damaged offset. A frame
//! whose batch starts after the damage was written after the damaged bytes had been synced,
//! so they were acknowledged: mid-log damage. (Batch offsets, unlike sequence numbers, stay
//! right when a failed batch is zeroed and the next one is written in its place.) Frames of
//! other generations are not evidence either way and are skipped; so the writer makes sure
//! that no frame of the live generation lies after its end other than the last batch's: a
//! failed batch is zeroed (and synced) before the next is written, and a recovery that
//! keeps a generation going zeroes everything after its last whole frame. Whole frames
//! after damage that carry no `batch` (format 1) cannot be placed, so they are reported as
//! damage too: failing closed costs a false alarm after a power loss in the middle of a
//! batch written by an older version, never an acknowledged write.
//!
//! What remains undetectable: damage in the last batch itself, damage after which no whole
//! frame survives, and damage to the header (then no frame of its generation is taken) look
//! exactly like a torn write and are dropped. Whole frames appearing after the damage that
//! the writer never put there (file-system bugs exposing stale blocks, or a stored value
//! that embeds a frame of this log verbatim) can only turn a torn tail into a false
//! `Corrupt`, never hide damage.

use crate::backend::StorageKey;

const MAGIC: [u8; 4] = *b"MSWL";
const HEADER_MAGIC: [u8; 4] = *b"MSWH";
const VERSION: u32 = 3;
/// Bytes of the header of a format-3 log; its first frame starts here.
pub(crate) const HEADER_LEN: u64 = 32;
/// Header of the oldest frames (kinds 1, 2): magic, crc, kind, klen, vlen.
const HEAD_V1: usize = 4 + 4 + 1 + 2 + 4;
/// Header of format-2 frames (kinds 3, 4): the same, then the batch offset.
const HEAD_V2: usize = HEAD_V1 + 8;
/// Header of format-3 frames (kinds 5, 6): the same, then the generation's salt.
const HEAD: usize = HEAD_V2 + 8;
const PUT_V1: u8 = 1;
const DELETE_V1: u8 = 2;
const PUT_V2: u8 = 3;
const DELETE_V2: u8 = 4;
const PUT: u8 = 5;
const DELETE: u8 = 6;

/// Fails if `key` or `value` is too long to frame; [`encode`] accepts whatever passes.
pub(crate) fn check(key: &StorageKey, value: Option<&[u8]>) -> Result<(), &'static str> {
    u16::try_from(key.as_str().len()).map_err(|_| "key too long for the log")?;
    u32::try_from(value.map_or(0, <[u8]>::len))
        .map_err(|_| "value too large for the log (4 GiB at most)")?;
    Ok(())
}

/// The header that starts a generation whose frames carry `salt`.
pub(crate) fn header(salt: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0; HEADER_LEN as usize];
    h[..4].copy_from_slice(&HEADER_MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&salt.to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What the start of a log file says about its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// No header: frames of formats 1 and 2 from offset 0 (or an empty file).
    Older,
    /// A format-3 header whose CRC checks: the live generation's salt.
    Salted(u64),
    /// A format-3 header that does not check (torn while it was rewritten): nothing in the
    /// file is to be replayed.
    BadHeader,
}

/// Reads the format of a log from its first bytes (at least [`HEADER_LEN`] of them when
/// there are that many).
pub(crate) fn format_of(log: &[u8]) -> Format {
    if log.len() < 4 || log[..4] != HEADER_MAGIC {
        // A header cut short by a crash while the file was first filled starts like one.
        return if !log.is_empty() && HEADER_MAGIC.starts_with(&log[..log.len().min(4)]) {
            Format::BadHeader
        } else {
            Format::Older
        };
    }
    let h = &log[..log.len().min(HEADER_LEN as usize)];
    if h.len() < 20 || h[4..8] != VERSION.to_le_bytes() {
        return Format::BadHeader;
    }
    let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    if crc32fast::hash(&h[..16]) != crc {
        return Format::BadHeader;
    }
    let mut salt = [0; 8];
    salt.copy_from_slice(&h[8..16]);
    Format::Salted(u64::from_le_bytes(salt))
}

/// Appends the frame of a put (`Some`) or a delete (`None`) of `key` to `out`, as part of
/// the batch whose first frame starts at offset `batch` of the log, in the generation of
/// `salt`. Fails if the key or the value is too long to frame (see [`check`]).
pub(crate) fn encode(
    out: &mut Vec<u8>,
    key: &StorageKey,
    value: Option<&[u8]>,
    batch: u64,
    salt: u64,
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
    out.extend_from_slice(&salt.to_le_bytes());
    out.extend_from_slice(k);
    out.extend_from_slice(v);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// One frame: a key and its new value (`None`: deleted).
pub(crate) type Frame = (StorageKey, Option<Vec<u8>>);

/// What a log holds: each frame in order, and where its whole frames end (anything after
/// them is a torn tail, or in format 3 also zeros and older generations).
pub(crate) struct Replayed {
    pub(crate) frames: Vec<Frame>,
    /// The offset in the file just after the last whole frame (for a format-3 log with no
    /// frame: [`HEADER_LEN`]; for a header that does not check: 0).
    pub(crate) valid_len: usize,
    pub(crate) format: Format,
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

/// Reads the whole frames of the live generation (format 3) or at the start of an older
/// log. Damage after them is a torn tail (ignored) or, when whole frames of a later batch
/// follow it, [`MidLogDamage`]; see the module docs.
pub(crate) fn replay(log: &[u8]) -> Result<Replayed, MidLogDamage> {
    let format = format_of(log);
    let (mut at, salt) = match format {
        Format::Older => (0, None),
        Format::Salted(salt) => (HEADER_LEN as usize, Some(salt)),
        Format::BadHeader => return Ok(Replayed { frames: Vec::new(), valid_len: 0, format }),
    };
    let mut frames = Vec::new();
    // Where the batch of the last whole frame starts (`None`: no frame, or an older one).
    let mut last_batch = None;
    while let Some(parsed) = log.get(at..).and_then(|b| frame_at(b, salt)) {
        frames.push(parsed.frame);
        last_batch = parsed.batch;
        at += parsed.len;
    }
    if at < log.len() {
        check_tail(log, at, last_batch, salt)?;
    }
    Ok(Replayed { frames, valid_len: at.min(log.len()), format })
}

/// Checks that every whole frame (of the generation of `salt`, in format 3) after the
/// damage at `damaged` belongs to the batch the damage lies in: the one starting at
/// `damaged` (it tore at its first frame) or the batch of the last whole frame before it,
/// starting at `last_batch` (it tore part-way).
fn check_tail(
    log: &[u8],
    damaged: usize,
    last_batch: Option<u64>,
    salt: Option<u64>,
) -> Result<(), MidLogDamage> {
    let torn_batch_may_start = |b: u64| b == damaged as u64 || Some(b) == last_batch;
    let mut from = damaged + 1;
    while let Some(found) = log.get(from..).and_then(find_magic) {
        let p = from + found;
        match frame_at(&log[p..], salt) {
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
    /// Its batch's start (`None`: a format-1 frame, without one).
    batch: Option<u64>,
    /// Its length in bytes.
    len: usize,
}

/// The whole frame at the start of `b`, if there is one: with `salt`, a format-3 frame of
/// that generation; without, a frame of the older formats.
fn frame_at(b: &[u8], salt: Option<u64>) -> Option<Parsed> {
    if b.len() < HEAD_V1 || b[..4] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
    let kind = b[8];
    let klen = usize::from(u16::from_le_bytes(b[9..11].try_into().ok()?));
    let vlen = usize::try_from(u32::from_le_bytes(b[11..15].try_into().ok()?)).ok()?;
    let head = match (kind, salt) {
        (PUT | DELETE, Some(_)) => HEAD,
        (PUT_V2 | DELETE_V2, None) => HEAD_V2,
        (PUT_V1 | DELETE_V1, None) => HEAD_V1,
        _ => return None,
    };
    let len = head.checked_add(klen)?.checked_add(vlen)?;
    if b.len() < len || crc32fast::hash(&b[8..len]) != crc {
        return None;
    }
    if let Some(salt) = salt
        && b[HEAD_V2..HEAD] != salt.to_le_bytes()
    {
        // Whole, but of another generation: not a frame of this log.
        return None;
    }
    let batch = if head >= HEAD_V2 {
        Some(u64::from_le_bytes(b[HEAD_V1..HEAD_V2].try_into().ok()?))
    } else {
        None
    };
    let key = StorageKey::new(std::str::from_utf8(&b[head..head + klen]).ok()?).ok()?;
    let value = match kind {
        PUT | PUT_V2 | PUT_V1 => Some(b[head + klen..len].to_vec()),
        _ if vlen == 0 => None,
        _ => return None,
    };
    Some(Parsed { frame: (key, value), batch, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: u64 = 0x5a17_0000_0000_0001;

    fn key(s: &str) -> StorageKey {
        StorageKey::new(s).unwrap()
    }

    /// An empty format-3 log of the generation `salt`.
    fn log_of(salt: u64) -> Vec<u8> {
        header(salt).to_vec()
    }

    /// Appends a batch of puts (`Some`) and deletes (`None`) the way the log writer does:
    /// every frame carries the offset where the batch starts and the generation's salt.
    /// Returns each frame's end.
    fn batch(log: &mut Vec<u8>, writes: &[(&str, Option<&[u8]>)]) -> Vec<usize> {
        batch_of(log, SALT, writes)
    }

    fn batch_of(log: &mut Vec<u8>, salt: u64, writes: &[(&str, Option<&[u8]>)]) -> Vec<usize> {
        let start = log.len() as u64;
        writes
            .iter()
            .map(|(k, v)| {
                encode(log, &key(k), *v, start, salt).unwrap();
                log.len()
            })
            .collect()
    }

    /// A frame of the older formats: kinds 1 and 2 (`batch: None`) or 3 and 4.
    fn encode_old(out: &mut Vec<u8>, key: &str, value: Option<&[u8]>, batch: Option<u64>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[0; 4]);
        out.push(match (value.is_some(), batch.is_some()) {
            (true, false) => PUT_V1,
            (false, false) => DELETE_V1,
            (true, true) => PUT_V2,
            (false, true) => DELETE_V2,
        });
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(&(value.unwrap_or_default().len() as u32).to_le_bytes());
        if let Some(b) = batch {
            out.extend_from_slice(&b.to_le_bytes());
        }
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(value.unwrap_or_default());
        let crc = crc32fast::hash(&out[start + 8..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn frames_round_trip_in_order() {
        let mut log = log_of(SALT);
        batch(&mut log, &[("sessions/a.json", Some(b"one")), ("sessions/b.json", None)]);
        batch(&mut log, &[("sessions/a.json", Some(b""))]);
        let r = replay(&log).unwrap();
        assert_eq!((r.valid_len, r.format), (log.len(), Format::Salted(SALT)));
        assert_eq!(
            r.frames,
            vec![
                (key("sessions/a.json"), Some(b"one".to_vec())),
                (key("sessions/b.json"), None),
                (key("sessions/a.json"), Some(Vec::new())),
            ]
        );
        // The zeros of a preallocated file after the last frame end the generation.
        let frames_end = log.len();
        log.resize(frames_end + 4096, 0);
        let r = replay(&log).unwrap();
        assert_eq!((r.frames.len(), r.valid_len), (3, frames_end));
    }

    #[test]
    fn logs_in_the_older_formats_still_replay() {
        let mut log = Vec::new();
        encode_old(&mut log, "sessions/a.json", Some(b"one"), None);
        let first = log.len();
        encode_old(&mut log, "sessions/b.json", None, None);
        let old = log.len();
        // A log of format 1, kept at open (full disk) by a format-2 version and appended to.
        encode_old(&mut log, "sessions/c.json", Some(b"three"), Some(old as u64));
        let r = replay(&log).unwrap();
        assert_eq!((r.valid_len, r.format), (log.len(), Format::Older));
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
        // Format-3 frames are no frames of an older log, nor older ones of a format-3 log.
        let mut mixed = Vec::new();
        encode(&mut mixed, &key("sessions/d.json"), Some(b"4"), 0, SALT).unwrap();
        assert!(replay(&mixed).unwrap().frames.is_empty());
        let mut mixed = log_of(SALT);
        encode_old(&mut mixed, "sessions/e.json", Some(b"5"), Some(HEADER_LEN));
        assert!(replay(&mixed).unwrap().frames.is_empty());
    }

    #[test]
    fn every_truncation_keeps_exactly_the_whole_frames_before_it() {
        let mut log = log_of(SALT);
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
            let expected = match whole {
                _ if cut < HEADER_LEN as usize => r.valid_len,
                0 => HEADER_LEN as usize,
                n => ends[n - 1],
            };
            assert_eq!(r.valid_len, expected, "cut at {cut}");
        }
    }

    /// The log is reused in place: after a new header, the older generation's frames are
    /// still in the file, after (and under) the new ones. None of them is ever taken, and
    /// being whole frames of another generation they are no evidence of damage either.
    #[test]
    fn frames_of_an_older_generation_are_never_replayed() {
        let mut old = log_of(1);
        batch_of(
            &mut old,
            1,
            &[("sessions/a.json", Some(b"old a")), ("sessions/b.json", Some(b"old b"))],
        );
        batch_of(&mut old, 1, &[("sessions/c.json", Some(&[b'c'; 300]))]);
        // The new generation overwrites the start: its header, then one short batch.
        let mut new = log_of(2);
        let end = batch_of(&mut new, 2, &[("sessions/a.json", None)])[0];
        let mut log = old.clone();
        log[..new.len()].copy_from_slice(&new);
        let r = replay(&log).unwrap();
        assert_eq!(r.format, Format::Salted(2));
        assert_eq!((r.frames, r.valid_len), (vec![(key("sessions/a.json"), None)], end));
        // Only the new header made durable (a crash before any new frame): nothing at all,
        // although whole frames of generation 1 sit right after the header.
        let mut log = old.clone();
        log[..HEADER_LEN as usize].copy_from_slice(&header(2));
        let r = replay(&log).unwrap();
        assert_eq!((r.frames.len(), r.valid_len), (0, HEADER_LEN as usize));
        // The header torn while it was rewritten: nothing of either generation.
        for at in 0..20 {
            let mut log = old.clone();
            log[at] ^= 0x40;
            let r = replay(&log).unwrap();
            assert!(r.frames.is_empty(), "header byte {at} flipped");
            assert_eq!(r.format, if at < 4 { Format::Older } else { Format::BadHeader });
        }
    }

    /// A flipped bit in the last batch is indistinguishable from a torn append and ends
    /// the replay there; a flipped bit in any earlier batch is followed by whole frames of
    /// a later batch, which prove it hit acknowledged writes.
    #[test]
    fn a_flipped_bit_in_the_last_batch_is_a_torn_tail_and_in_an_earlier_one_is_damage() {
        let mut log = log_of(SALT);
        let mut starts = vec![HEADER_LEN as usize];
        for (k, v) in [
            ("sessions/a.json", &b"first"[..]),
            ("sessions/b.json", b"second"),
            ("sessions/c.json", b"3"),
        ] {
            starts.extend(batch(&mut log, &[(k, Some(v))]));
        }
        for byte in starts[0]..log.len() {
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
        let mut log = log_of(SALT);
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
        bad[HEADER_LEN as usize + 5] ^= 1;
        assert_eq!(
            replay(&bad).err(),
            Some(MidLogDamage { at: HEADER_LEN as usize, next_frame: first })
        );
        // The first frame of a batch lost, where an older generation's whole frame
        // reappears (the block was never overwritten): still a torn tail.
        let mut torn = log.clone();
        let mut older = Vec::new();
        encode(&mut older, &key("sessions/z.json"), Some(b"z"), 999, SALT ^ 1).unwrap();
        torn[first..first + older.len()].copy_from_slice(&older);
        let r = replay(&torn).unwrap();
        assert_eq!((r.frames.len(), r.valid_len), (1, first));
    }

    /// Whole format-1 frames after damage carry no batch to place them: failing closed,
    /// that is reported as damage.
    #[test]
    fn older_frames_after_damage_are_reported() {
        let mut log = Vec::new();
        encode_old(&mut log, "sessions/a.json", Some(b"one"), None);
        let second = log.len();
        encode_old(&mut log, "sessions/b.json", Some(b"two"), None);
        log[3] ^= 1;
        assert_eq!(replay(&log).err(), Some(MidLogDamage { at: 0, next_frame: second }));
    }

    #[test]
    fn a_frame_naming_an_invalid_key_is_damage() {
        let mut log = log_of(SALT);
        let h = HEADER_LEN as usize;
        encode(&mut log, &StorageKey::from_valid("../escape".into()), Some(b"x"), h as u64, SALT)
            .unwrap();
        assert!(replay(&log).unwrap().frames.is_empty());
        let next = log.len();
        batch(&mut log, &[("sessions/a.json", Some(b"y"))]);
        assert_eq!(replay(&log).err(), Some(MidLogDamage { at: h, next_frame: next }));
    }

    #[test]
    fn too_long_keys_and_values_are_refused_before_framing() {
        let long = "k".repeat(70_000);
        assert!(check(&StorageKey::from_valid(format!("sessions/{long}")), None).is_err());
        assert!(check(&key("sessions/a.json"), Some(b"v")).is_ok());
    }
}
