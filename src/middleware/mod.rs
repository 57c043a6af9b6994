//! Middleware: wrappers that sit between the store and the backend, each a `XxxLayer` (its
//! configuration) that wraps a backend into an `Xxx<B>` implementing the same
//! [`StorageBackend`](crate::StorageBackend) trait, so every backend gets them.
//! Owns the wrappers (today: encryption). Access control is not one of them: it is a table
//! the handle consults, in [`crate::access`]; `middleware::acl` keeps its old path working.
//! A wrapper calls the backend it wraps and the key's class; never the store or the actors.

#[cfg(feature = "encryption")]
pub mod crypto;

/// Access control at its former path: the same items as [`crate::access`], which is not
/// middleware (it wraps no backend: the handle consults it).
pub mod acl {
    pub use crate::access::{Access, AccessControlLayer, AccessRecord};
    #[allow(unused_imports)]
    pub(crate) use crate::access::{AccessTable, Decision};
}
