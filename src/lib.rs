#![doc = include_str!("../README.md")]
#![warn(missing_docs, unreachable_pub)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr)]

mod actor;
pub mod backend;
mod error;
mod lifecycle;
mod manager;
mod memory;
pub mod middleware;
mod random;
mod store;
mod sync;
// Public with the `testing` feature; test builds always compile it, since the power-loss
// simulator's tests live in it (`testing::simfs`, `cfg(test)`).
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod types;

pub use actor::SessionMsg;
pub use actor::session::UpdateFn;
pub use backend::{
    FileOptions, FileStorageBackend, KeyClass, MemoryStorageBackend, ObjectMeta, StorageBackend, StorageKey,
    SweepReport,
};
pub use error::{BoxError, ErrorKind, Result, StateError};
pub use lifecycle::{
    CheckpointPolicy, EventKind, MigrationFn, MigrationReport, Recovery, SkippedCheckpoint, StateEvent, Watch,
    WatchError,
};
pub use manager::{StateManager, StateManagerBuilder};
pub use middleware::acl::{Access, AccessControlLayer, AccessRecord};
#[cfg(feature = "encryption")]
pub use middleware::crypto::{EncryptedFileStorageBackend, EncryptionKey, EncryptionLayer, KeySource, Passphrase};
pub use store::RetentionPolicy;
pub use types::{
    BranchId, Checkpoint, CheckpointId, CheckpointInfo, CheckpointReason, MAX_ID_LEN, Principal, SessionId,
    SessionInfo, SessionStatus, StateBytes, StorageStats, VacuumReport,
};
