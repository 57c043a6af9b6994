//! Helpers for testing storage backends, this crate's and your own (cargo feature `testing`,
//! on by default; it adds no dependencies). This module owns the test kit and calls only
//! the public [`StorageBackend`] trait (the simulator below also calls the file backend's
//! crate-private file-system seam); nothing in the library calls it.
//!
//! - [`conformance`]: the [`StorageBackend`] contract as one `pub async fn` per clause, and
//!   [`conformance_tests!`](crate::conformance_tests), which turns them into one
//!   `#[tokio::test]` per clause for each backend you name, so one failure hides no other.
//! - [`Faulty`]: a wrapper that forwards every call to the backend inside it, except the
//!   calls its rules pick (by method and key), which fail with an I/O error, are
//!   acknowledged without being done, or wait at a [`Hold`] until the test releases them,
//!   while a shared [`FaultSwitch`] is on.
//!
//! In this crate's own test builds (`cfg(test)`, with or without the feature) the module
//! also holds `simfs`, the power-loss simulator under the file backend, and its tests; it
//! is not public, since it plugs into the file backend's crate-private file-system seam.
//!
//! [`StorageBackend`]: crate::StorageBackend

#[cfg(feature = "testing")]
pub mod conformance;
#[cfg(feature = "testing")]
mod faulty;
#[cfg(feature = "testing")]
mod hold;
#[cfg(test)]
pub(crate) mod simfs;

#[cfg(feature = "testing")]
pub use conformance::Fixture;
#[cfg(feature = "testing")]
pub use faulty::{FaultSwitch, Faulty, Method};
#[cfg(feature = "testing")]
pub use hold::Hold;
