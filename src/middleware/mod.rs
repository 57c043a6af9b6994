//! Middleware: wrappers that sit between the session actors and the storage, each a
//! `XxxLayer` (its configuration) that wraps a backend into an `Xxx<B>` implementing the
//! same [`StorageBackend`](crate::StorageBackend) trait, so every backend gets them.

pub mod acl;
#[cfg(feature = "encryption")]
pub mod crypto;
