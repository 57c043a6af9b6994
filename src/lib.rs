#![doc = include_str!("../README.md")]
#![warn(missing_docs, unreachable_pub)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr)]

// The layers, each calling only the ones below it (docs/design.md has the order a request
// sees them): `manager` (the handle) → `access` (a table it consults) → `actor` (supervisor,
// session, storage and janitor actors, and their runtime state) → `store` (keys, codec,
// index, maintenance) → `middleware` (wrappers of a backend) → `backend` (the trait and
// its implementations). Beside them: `error`, `types`, `config`, `events`, and the helpers
// `sync` (locks) and `random` (the one source of random bytes); `testing` is the kit for
// backend authors.
pub mod access;
mod actor;
pub mod backend;
mod config;
mod error;
mod events;
mod manager;
pub mod middleware;
mod random;
mod store;
mod sync;
// Public with the `testing` feature; test builds always compile it, since the power-loss
// simulator's tests live in it (`testing::simfs`, `cfg(test)`).
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod types;

pub use access::{Access, AccessControlLayer, AccessRecord};
#[doc(hidden)]
pub use actor::session::Internal;
pub use actor::session::{SessionMsg, UpdateFn};
pub use backend::{
    Acquired, EventFeed, Fence, FileOptions, FileStorageBackend, KeyClass, Lease, LeaseState,
    MAX_EVENT_PAYLOAD, MemoryStorageBackend, ObjectMeta, RecordMeta, StorageBackend, StorageKey,
    SweepReport,
};
#[cfg(feature = "postgres")]
pub use backend::{PostgresOptions, PostgresStorageBackend};
#[cfg(feature = "redis")]
pub use backend::{RedisOptions, RedisStorageBackend};
#[cfg(feature = "sqlite")]
pub use backend::{SqliteOptions, SqliteStorageBackend};
pub use config::RetentionPolicy;
pub use config::{CheckpointPolicy, MigrationFn};
pub use error::{BoxError, ErrorKind, Result, StateError};
pub use events::{EventKind, StateEvent, Watch, WatchError};
pub use manager::{StateManager, StateManagerBuilder};
#[cfg(feature = "encryption")]
pub use middleware::crypto::{
    EncryptedFileStorageBackend, EncryptionKey, EncryptionLayer, KeySource, Passphrase,
};
pub use store::{
    CopyReport, DUMP_FORMAT_VERSION, DamagedRecord, ExportOptions, ExportReport, ImportReport,
    RecordKind, VerifyReport, copy_store, copy_store_with_progress,
};
pub use types::{
    BranchId, Checkpoint, CheckpointId, CheckpointInfo, CheckpointReason, MAX_ID_LEN,
    MigrationReport, Principal, Recovery, SessionId, SessionInfo, SessionStatus, SkippedCheckpoint,
    StateBytes, StorageStats, VacuumReport,
};
