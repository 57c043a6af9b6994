//! Random bytes from the operating system: the crate's one source of them. This file owns
//! how the crate draws random bytes and what happens when the OS generator fails. It calls
//! only `getrandom` (and, for the best-effort fallback, the clock and the process id). Two
//! kinds of caller:
//!
//! - keys, salts and nonces ([`fill`], [`array`]): a failure is an error, never a weaker
//!   value. A predictable nonce or key would break encryption silently, so the write or the
//!   key generation fails instead.
//! - names that only need to differ ([`unique_u64`]: staged-file suffixes, the random part
//!   of a checkpoint id): a failure falls back to a value made of the clock, the process id
//!   and a counter. Nothing secret rests on these: a staged file is created with
//!   `create_new` in a store that one process holds locked, so a repeated name fails one
//!   write rather than mixing two, and a checkpoint id is already unique per session through
//!   its clock part. Failing a save because the RNG is unavailable would be worse.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, StateError};

/// Fills `buf` with random bytes, or fails (for key material: nothing weaker is used).
pub(crate) fn fill(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        StateError::io(
            "drawing random bytes for encryption",
            PathBuf::new(),
            std::io::Error::other(e.to_string()),
        )
    })
}

/// `N` random bytes (a nonce, a salt), or an error.
pub(crate) fn array<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0; N];
    fill(&mut out)?;
    Ok(out)
}

/// A random number for a name that must not repeat but need not be secret; if the OS
/// generator fails, a number from the clock, the process id and a counter (see the module
/// docs for why that is enough).
pub(crate) fn unique_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    if let Ok(r) = array::<8>() {
        return u64::from_le_bytes(r);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    nanos ^ u64::from(std::process::id()).rotate_left(40) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_differ() {
        assert_ne!(super::unique_u64(), super::unique_u64());
        assert_ne!(super::array::<24>().unwrap(), super::array::<24>().unwrap());
    }
}
