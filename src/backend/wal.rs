//! The frame format of the file backend's write-ahead log (`metadata/.wal`).
//!
//! In log mode a put or delete is made durable by appending one frame to the log and
//! `fdatasync`ing it, many callers' frames at once (group commit); the record files are
//! brought up to date later, in batches (see `file.rs`). A frame:
//!
//! ```text
//! magic u32 LE  "MSWL"
//! crc   u32 LE  CRC-32 of every byte after this field (kind .. value)
//! kind  u8      1 = put, 2 = delete
//! klen  u16 LE  key length
//! vlen  u32 LE  value length (0 for a delete)
//! key   klen bytes, a valid StorageKey
//! value vlen bytes
//! ```
//!
//! Reading stops at the first frame that is short, fails its CRC or holds an invalid key:
//! a crash can only tear the tail (frames are appended, and a caller is answered only after
//! the `fdatasync` that covers its frame and every frame before it).

use super::StorageKey;

const MAGIC: [u8; 4] = *b"MSWL";
const HEAD: usize = 4 + 4 + 1 + 2 + 4;
const PUT: u8 = 1;
const DELETE: u8 = 2;

/// Appends the frame of a put (`Some`) or a delete (`None`) of `key` to `out`. Fails if the
/// key or the value is too long to frame.
pub(crate) fn encode(out: &mut Vec<u8>, key: &StorageKey, value: Option<&[u8]>) -> Result<(), &'static str> {
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
    out.extend_from_slice(k);
    out.extend_from_slice(v);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// One frame: a key and its new value (`None`: deleted).
pub(crate) type Frame = (StorageKey, Option<Vec<u8>>);

/// What a log holds: each frame in order, and how many bytes of it were whole frames.
pub(crate) struct Replayed {
    pub(crate) frames: Vec<Frame>,
    pub(crate) valid_len: usize,
}

/// Reads the whole frames at the start of `log`; anything after the first damaged or
/// short frame is a torn tail and ignored.
pub(crate) fn replay(log: &[u8]) -> Replayed {
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some((frame, len)) = frame_at(&log[at..]) {
        frames.push(frame);
        at += len;
    }
    Replayed { frames, valid_len: at }
}

fn frame_at(b: &[u8]) -> Option<(Frame, usize)> {
    if b.len() < HEAD || b[..4] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
    let kind = b[8];
    let klen = usize::from(u16::from_le_bytes(b[9..11].try_into().ok()?));
    let vlen = usize::try_from(u32::from_le_bytes(b[11..15].try_into().ok()?)).ok()?;
    let len = HEAD.checked_add(klen)?.checked_add(vlen)?;
    if b.len() < len || crc32fast::hash(&b[8..len]) != crc {
        return None;
    }
    let key = StorageKey::new(std::str::from_utf8(&b[HEAD..HEAD + klen]).ok()?).ok()?;
    let value = match kind {
        PUT => Some(b[HEAD + klen..len].to_vec()),
        DELETE if vlen == 0 => None,
        _ => return None,
    };
    Some(((key, value), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> StorageKey {
        StorageKey::new(s).unwrap()
    }

    #[test]
    fn frames_round_trip_in_order() {
        let mut log = Vec::new();
        encode(&mut log, &key("sessions/a.json"), Some(b"one")).unwrap();
        encode(&mut log, &key("sessions/b.json"), None).unwrap();
        encode(&mut log, &key("sessions/a.json"), Some(b"")).unwrap();
        let r = replay(&log);
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
    fn every_truncation_keeps_exactly_the_whole_frames_before_it() {
        let mut log = Vec::new();
        let mut ends = Vec::new();
        for i in 0..3 {
            encode(&mut log, &key(&format!("checkpoints/s/{i}.json")), Some(&[i as u8; 40])).unwrap();
            ends.push(log.len());
        }
        for cut in 0..=log.len() {
            let r = replay(&log[..cut]);
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(r.frames.len(), whole, "cut at {cut}");
            assert_eq!(r.valid_len, if whole == 0 { 0 } else { ends[whole - 1] });
        }
    }

    #[test]
    fn every_flipped_bit_stops_the_replay_at_that_frame() {
        let mut log = Vec::new();
        encode(&mut log, &key("sessions/a.json"), Some(b"first")).unwrap();
        let first = log.len();
        encode(&mut log, &key("sessions/b.json"), Some(b"second")).unwrap();
        for byte in first..log.len() {
            for bit in 0..8 {
                let mut bad = log.clone();
                bad[byte] ^= 1 << bit;
                let r = replay(&bad);
                assert_eq!(r.frames.len(), 1, "flip at {byte}.{bit} was not caught");
                assert_eq!(r.valid_len, first);
            }
        }
    }

    #[test]
    fn a_frame_naming_an_invalid_key_is_damage() {
        let mut log = Vec::new();
        encode(&mut log, &StorageKey::from_valid("../escape".into()), Some(b"x")).unwrap();
        assert!(replay(&log).frames.is_empty());
    }
}
