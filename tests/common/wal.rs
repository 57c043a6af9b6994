//! The write-ahead log's file (`metadata/.wal`, format 3: see `src/backend/file/frame.rs`),
//! read independently of the crate's code, so that the tests pin the format: a header
//! `MSWH`, version 3, a generation salt and a CRC, then frames that carry the same salt.

pub const HEADER_LEN: usize = 32;

/// The generation salt a format-3 log's header names (the header checked byte for byte).
pub fn header_salt(log: &[u8]) -> u64 {
    assert_eq!(&log[..4], b"MSWH", "not a format-3 log");
    assert_eq!(u32::from_le_bytes(log[4..8].try_into().unwrap()), 3, "version");
    let crc = u32::from_le_bytes(log[16..20].try_into().unwrap());
    assert_eq!(crc32fast::hash(&log[..16]), crc, "header CRC");
    assert_eq!(&log[20..HEADER_LEN], &[0; 12]);
    u64::from_le_bytes(log[8..16].try_into().unwrap())
}

/// The spans of the live generation's whole frames in a format-3 log: from the header on,
/// every frame whose magic, kind, CRC and salt check, up to the first that does not.
pub fn live_frames(log: &[u8]) -> Vec<(usize, usize)> {
    let salt = header_salt(log);
    let mut out = Vec::new();
    let mut at = HEADER_LEN;
    loop {
        let b = &log[at..];
        if b.len() < 31 || &b[..4] != b"MSWL" || !matches!(b[8], 5 | 6) {
            return out;
        }
        let klen = u16::from_le_bytes(b[9..11].try_into().unwrap()) as usize;
        let vlen = u32::from_le_bytes(b[11..15].try_into().unwrap()) as usize;
        let len = 31 + klen + vlen;
        let crc = u32::from_le_bytes(b[4..8].try_into().unwrap());
        if b.len() < len
            || crc32fast::hash(&b[8..len]) != crc
            || u64::from_le_bytes(b[23..31].try_into().unwrap()) != salt
        {
            return out;
        }
        out.push((at, at + len));
        at += len;
    }
}

/// Where the live generation's whole frames end.
pub fn frames_end(log: &[u8]) -> usize {
    live_frames(log).last().map_or(HEADER_LEN, |&(_, end)| end)
}

/// A new log's zero-filled part, and the most it is filled ahead of its frames to.
pub const FIRST_SIZE: u64 = 256 << 10;
pub const FULL_SIZE: u64 = 9 << 20;

/// The log's size is one the writer fills it to: at least a new log's filled part, and
/// (for writes smaller than a megabyte) at most the full size.
pub fn assert_filled_size(len: u64, what: &str) {
    assert!(
        (FIRST_SIZE..=FULL_SIZE).contains(&len),
        "{what}: the log is {len} bytes, not between {FIRST_SIZE} and {FULL_SIZE}"
    );
}
