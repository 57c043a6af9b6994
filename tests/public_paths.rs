//! Pins the crate's public paths as they were before the store, the handle and the actors
//! were split into folders (issue 11): each `use` below must keep resolving, whatever moves
//! behind it. Deprecated items are named too; they stay until a major version drops them.
#![allow(deprecated, unused_imports)]

use mars_state::backend::{
    FileOptions as _, FileStorageBackend as _, KeyClass as _, MemoryStorageBackend as _,
    ObjectMeta as _, StorageBackend as _, StorageKey as _, SweepReport as _,
};
use mars_state::middleware::acl::{Access as _, AccessControlLayer as _, AccessRecord as _};
use mars_state::{
    Access, AccessControlLayer, AccessRecord, BoxError, BranchId, Checkpoint, CheckpointId,
    CheckpointInfo, CheckpointPolicy, CheckpointReason, ErrorKind, EventKind, FileOptions,
    FileStorageBackend, MAX_ID_LEN, MemoryStorageBackend, MigrationFn, MigrationReport, ObjectMeta,
    Principal, Recovery, Result, RetentionPolicy, SessionId, SessionInfo, SessionMsg,
    SessionStatus, SkippedCheckpoint, StateBytes, StateError, StateEvent, StateManager,
    StateManagerBuilder, StorageBackend, StorageKey, StorageStats, SweepReport, UpdateFn,
    VacuumReport, Watch, WatchError,
};

#[cfg(feature = "encryption")]
use mars_state::middleware::crypto::{
    Encrypted, EncryptedFileStorageBackend as _, EncryptionKey as _, EncryptionLayer as _,
    KdfParams, KeySource as _, Passphrase as _, RECORD_OVERHEAD, is_log_key, stored_in_plaintext,
};
#[cfg(feature = "encryption")]
use mars_state::{
    EncryptedFileStorageBackend, EncryptionKey, EncryptionLayer, KeySource, Passphrase,
};

#[cfg(feature = "testing")]
use mars_state::testing::{
    FaultSwitch, Faulty, Fixture, Method,
    conformance::{self, CLAUSES, LOG_KEY, run_all},
};

/// The deprecated key helpers still answer as they did, now through the key's class.
#[cfg(feature = "encryption")]
#[test]
fn deprecated_key_helpers_answer_as_before() {
    let key = |k: &str| StorageKey::new(k).unwrap();
    assert!(stored_in_plaintext(&key("metadata/store.json")));
    assert!(stored_in_plaintext(&key("metadata/crypto.json")));
    assert!(!stored_in_plaintext(&key("sessions/a.json")));
    assert!(is_log_key(&key("metadata/index.log")));
    assert!(!is_log_key(&key("sessions/a.json")));
    assert_eq!(RECORD_OVERHEAD, 48);
}
