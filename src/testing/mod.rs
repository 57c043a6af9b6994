//! Helpers for testing storage backends, this crate's and your own (cargo feature `testing`,
//! on by default; it adds no dependencies).
//!
//! - [`conformance`]: the [`StorageBackend`] contract as one `pub async fn` per clause, and
//!   [`conformance_tests!`](crate::conformance_tests), which turns them into one
//!   `#[tokio::test]` per clause for each backend you name, so one failure hides no other.
//! - [`Faulty`]: a wrapper that forwards every call to the backend inside it, except the
//!   calls its rules pick (by method and key), which fail with an I/O error or are
//!   acknowledged without being done, while a shared [`FaultSwitch`] is on.
//!
//! This module calls only the public [`StorageBackend`] trait; nothing in the library
//! calls it.

use crate::backend::StorageBackend;

pub mod conformance;
mod faulty;

pub use faulty::{FaultSwitch, Faulty, Method};

/// What a constructor given to [`conformance_tests!`](crate::conformance_tests) or
/// [`conformance::run_all`] returns: a backend, or a pair of a backend and a guard that must
/// outlive it (a temporary directory, a server). The pair is dropped backend first.
pub trait Fixture: Send {
    /// The backend under test.
    fn backend(&self) -> &dyn StorageBackend;
}

impl<B: StorageBackend> Fixture for B {
    fn backend(&self) -> &dyn StorageBackend {
        self
    }
}

impl<B: StorageBackend, G: Send> Fixture for (B, G) {
    fn backend(&self) -> &dyn StorageBackend {
        &self.0
    }
}
