//! The crate's one public error type, [`StateError`], and the one vocabulary of
//! operations, [`Operation`], that access control, timeouts, tracing spans and error
//! messages all name requests by.
//! Owns: the error enum and its kinds, the mapping of OS errors to it, and `Operation`.
//! Calls nothing else in the crate.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = StateError> = std::result::Result<T, E>;

/// A boxed error from user code (a closure passed to
/// [`transactional_update`](crate::StateManager::transactional_update)).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Every failure mars-state reports.
///
/// Missing data is never an error (loads return `Ok(None)`); damaged data always is.
/// Messages name ids, keys and paths but never contain state payloads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// An id (session, branch or checkpoint) was rejected before anything was touched.
    #[error("invalid {what} {id:?}: {reason}")]
    InvalidId {
        /// Which kind of id: `"session id"`, `"branch id"`, `"checkpoint id"`.
        what: &'static str,
        /// The offending id, escaped and cut to 80 characters.
        id: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A stored record failed its integrity check or could not be decoded.
    /// The record is kept and a copy is placed in the store's quarantine.
    #[error("corrupt record {key}: {reason}")]
    Corrupt {
        /// The storage key of the damaged record.
        key: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A checkpoint named in a rollback does not exist.
    #[error("checkpoint {id} not found")]
    CheckpointNotFound {
        /// The id that was asked for.
        id: String,
    },
    /// Another process (or another backend in this one) holds the store's lock.
    #[error("the store at {} is locked by another process", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The operating system refused access to a path.
    #[error("permission denied: {operation} {}", path.display())]
    PermissionDenied {
        /// What was being done.
        operation: &'static str,
        /// The path the OS refused.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The disk is full. Cleanup ran and the save was retried once; the previous
    /// version of the record is intact.
    #[error("no space left on device while {operation} {}", path.display())]
    StorageFull {
        /// What was being done.
        operation: &'static str,
        /// The path being written.
        path: PathBuf,
    },
    /// Any other I/O failure. The previous version of the record is intact.
    #[error("I/O error while {operation} {}: {source}", path.display())]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A state could not be serialized to, or deserialized from, JSON (for example it
    /// does not match the type asked for).
    #[error("state of session {session} could not be (de)serialized: {detail}")]
    Serialization {
        /// The session involved.
        session: String,
        /// serde_json's message with every quoted value replaced by `…` (so no part of the
        /// state leaks into logs), and the line and column.
        detail: String,
    },
    /// A state is larger than the configured limit.
    #[error("state of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the serialized state.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The closure given to `transactional_update` returned an error; nothing was written.
    #[error("update of session {session} rejected by the caller's closure: {source}")]
    UpdateRejected {
        /// The session involved.
        session: String,
        /// The closure's error.
        #[source]
        source: BoxError,
    },
    /// Code running inside a session actor panicked (for example a user closure).
    /// Nothing was written; the session actor was restarted.
    #[error("a panic in session {session} was contained: {message}")]
    Panicked {
        /// The session involved.
        session: String,
        /// The panic message.
        message: String,
    },
    /// An actor did not answer in time. The outcome of the operation is **unknown**:
    /// it may or may not have been applied.
    #[error("{operation} on session {session} timed out after {timeout_ms} ms; outcome unknown")]
    Timeout {
        /// The operation.
        operation: &'static str,
        /// The session involved.
        session: String,
        /// The timeout that expired.
        timeout_ms: u64,
    },
    /// The manager is shut down or one of its actors is gone.
    #[error("state manager unavailable: {reason}")]
    Unavailable {
        /// What happened.
        reason: String,
    },
    /// The encryption key or passphrase does not open this store (checked once, at start,
    /// against the store's key-check record), or the store needs a key it was not given.
    #[error("encryption key rejected: {reason}")]
    WrongKey {
        /// What is wrong (never any key material).
        reason: String,
    },
    /// The principal may not perform this operation on this session. Nothing was changed
    /// and no storage was touched.
    #[error("access denied: principal {principal} may not {operation} session {session}")]
    AccessDenied {
        /// Who asked.
        principal: String,
        /// What they asked to do.
        operation: &'static str,
        /// The session.
        session: String,
    },
    /// A record could not be brought to the application's schema version: it is newer than
    /// the application, a migration step is missing, or a step failed. Nothing was written.
    #[error("state of session {session} cannot be migrated from schema {from} to {to}: {reason}")]
    Migration {
        /// The session involved.
        session: String,
        /// The record's schema version.
        from: u32,
        /// The application's schema version.
        to: u32,
        /// What went wrong (no payload).
        reason: String,
    },
    /// The builder or the store's metadata holds an invalid or conflicting setting.
    #[error("configuration error: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// A fenced write ([`StorageBackend::put_fenced`](crate::StorageBackend::put_fenced),
    /// [`delete_fenced`](crate::StorageBackend::delete_fenced)) carried a token that is no
    /// longer its lease's: another node was granted the lease since. Nothing of the write
    /// was stored. The writer no longer owns what the lease guards and must stop writing it.
    #[error(
        "write refused: lease {name} is at fencing token {current}, the write carried {token} \
         (another node holds or held the lease since); nothing was written"
    )]
    Fenced {
        /// The lease.
        name: String,
        /// The token the write carried.
        token: u64,
        /// The lease's current token (0: it was never granted).
        current: u64,
    },

    /// A write to a session that another node of a shared store holds: its lease did not
    /// come free within the manager's
    /// [`lease_wait`](crate::StateManagerBuilder::lease_wait). Nothing was written. The
    /// session is served by `node`; retry later, or send the request to that node.
    #[error(
        "the session is owned by node {node} (its lease runs until {until} ms since the Unix \
         epoch unless renewed); nothing was written"
    )]
    OwnedElsewhere {
        /// The node holding the session's lease.
        node: String,
        /// When its lease runs out unless renewed, in milliseconds since the Unix epoch (by
        /// this node's clock: the store server's time left added to now).
        until: u64,
    },

    /// A write to a store opened read-only (a file store another process holds, opened
    /// beside it with [`FileOptions::read_only`](crate::FileOptions::read_only); a manager
    /// started with [`StateManagerBuilder::read_only`](crate::StateManagerBuilder::read_only)).
    /// Nothing was written. Open the store normally (once its holder let go) to write to it.
    #[error("{operation} refused: the store {store} is open read-only; nothing was written")]
    ReadOnly {
        /// What was refused (`"put"`, `"delete"`, `"append"`, ...).
        operation: &'static str,
        /// The store: its path, or a description of the backend.
        store: String,
    },
}

/// A coarse classification of [`StateError`], for matching without caring about fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`StateError::InvalidId`].
    InvalidId,
    /// [`StateError::Corrupt`].
    Corrupt,
    /// [`StateError::CheckpointNotFound`].
    NotFound,
    /// [`StateError::Locked`].
    Locked,
    /// [`StateError::PermissionDenied`].
    PermissionDenied,
    /// [`StateError::StorageFull`].
    StorageFull,
    /// [`StateError::Io`].
    Io,
    /// [`StateError::Serialization`].
    Serialization,
    /// [`StateError::TooLarge`].
    TooLarge,
    /// [`StateError::UpdateRejected`].
    UpdateRejected,
    /// [`StateError::Panicked`].
    Panicked,
    /// [`StateError::Timeout`].
    Timeout,
    /// [`StateError::Unavailable`].
    Unavailable,
    /// [`StateError::WrongKey`].
    WrongKey,
    /// [`StateError::AccessDenied`].
    AccessDenied,
    /// [`StateError::Migration`].
    Migration,
    /// [`StateError::Config`].
    Config,
    /// [`StateError::Fenced`].
    Fenced,
    /// [`StateError::OwnedElsewhere`].
    OwnedElsewhere,
    /// [`StateError::ReadOnly`].
    ReadOnly,
}

impl StateError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StateError::InvalidId { .. } => ErrorKind::InvalidId,
            StateError::Corrupt { .. } => ErrorKind::Corrupt,
            StateError::CheckpointNotFound { .. } => ErrorKind::NotFound,
            StateError::Locked { .. } => ErrorKind::Locked,
            StateError::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            StateError::StorageFull { .. } => ErrorKind::StorageFull,
            StateError::Io { .. } => ErrorKind::Io,
            StateError::Serialization { .. } => ErrorKind::Serialization,
            StateError::TooLarge { .. } => ErrorKind::TooLarge,
            StateError::UpdateRejected { .. } => ErrorKind::UpdateRejected,
            StateError::Panicked { .. } => ErrorKind::Panicked,
            StateError::Timeout { .. } => ErrorKind::Timeout,
            StateError::Unavailable { .. } => ErrorKind::Unavailable,
            StateError::WrongKey { .. } => ErrorKind::WrongKey,
            StateError::AccessDenied { .. } => ErrorKind::AccessDenied,
            StateError::Migration { .. } => ErrorKind::Migration,
            StateError::Config { .. } => ErrorKind::Config,
            StateError::Fenced { .. } => ErrorKind::Fenced,
            StateError::OwnedElsewhere { .. } => ErrorKind::OwnedElsewhere,
            StateError::ReadOnly { .. } => ErrorKind::ReadOnly,
        }
    }

    /// Maps an OS error on `path` to the matching variant (disk full, permission, other).
    pub(crate) fn io(
        operation: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        let path = path.into();
        match source.kind() {
            std::io::ErrorKind::StorageFull => StateError::StorageFull { operation, path },
            std::io::ErrorKind::PermissionDenied => {
                StateError::PermissionDenied { operation, path, source }
            }
            _ if source.raw_os_error() == Some(libc::ENOSPC)
                || source.raw_os_error() == Some(libc::EDQUOT) =>
            {
                StateError::StorageFull { operation, path }
            }
            _ => StateError::Io { operation, path, source },
        }
    }

    /// A serde_json error, with the values it quotes redacted.
    pub(crate) fn json(session: impl Into<String>, e: &serde_json::Error) -> Self {
        StateError::Serialization { session: session.into(), detail: redact(&e.to_string()) }
    }

    pub(crate) fn corrupt(key: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        StateError::Corrupt { key: key.to_string(), reason: reason.into() }
    }

    pub(crate) fn unavailable(reason: impl Into<String>) -> Self {
        StateError::Unavailable { reason: reason.into() }
    }

    pub(crate) fn read_only(operation: &'static str, store: impl std::fmt::Display) -> Self {
        StateError::ReadOnly { operation, store: store.to_string() }
    }
}

/// Every request the [`StateManager`](crate::StateManager) handle makes, named after its
/// public method (plus the few the crate makes on its own). The one vocabulary for access
/// control (what access a request needs), timeouts and panics ([`StateError::Timeout`]'s
/// `operation`), tracing spans, and [`StateError::AccessDenied`]'s message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    SaveSession,
    LoadSession,
    LoadSessionAs,
    LoadSessionBytes,
    DeleteSession,
    CreateCheckpoint,
    CheckpointBeforeRisky,
    RestoreCheckpoint,
    RestoreCheckpointAs,
    RollbackToCheckpoint,
    RollbackAndTruncate,
    ListCheckpoints,
    CleanupCheckpoints,
    TransactionalUpdate,
    RecordStep,
    SetCheckpointPolicy,
    PauseSession,
    ResumeSession,
    ResumeSessionAs,
    CompleteSession,
    FailSession,
    RecoverSession,
    Watch,
    AccessRecord,
    GrantAccess,
    RevokeAccess,
    SessionActor,
    WatchAll,
    CleanupOldSessions,
    VacuumStorage,
    RunJanitorNow,
    MigrateStore,
    VerifyStore,
    ExportStore,
    ImportStore,
    #[cfg(feature = "encryption")]
    RotateKey,
    #[cfg(feature = "encryption")]
    FinishKeyRotation,
    Shutdown,
    /// A first write claimed the session: its live actor is retired (not a public method).
    Claim,
    /// The janitor deletes an idle session (not a public method).
    DeleteIfIdle,
}

/// What an [`Operation`] needs of the principal making it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Needs {
    /// Read access to the session.
    Read,
    /// Write access to the session.
    Write,
    /// Ownership of the session (or administrator).
    Owner,
    /// Store-wide: administrators (and the unscoped manager) only.
    Admin,
}

impl Operation {
    /// The public method's name (for timeouts, panics and tracing spans).
    pub(crate) fn name(self) -> &'static str {
        use Operation::*;
        match self {
            SaveSession => "save_session",
            LoadSession => "load_session",
            LoadSessionAs => "load_session_as",
            LoadSessionBytes => "load_session_bytes",
            DeleteSession => "delete_session",
            CreateCheckpoint => "create_checkpoint",
            CheckpointBeforeRisky => "checkpoint_before_risky",
            RestoreCheckpoint => "restore_checkpoint",
            RestoreCheckpointAs => "restore_checkpoint_as",
            RollbackToCheckpoint => "rollback_to_checkpoint",
            RollbackAndTruncate => "rollback_and_truncate",
            ListCheckpoints => "list_checkpoints",
            CleanupCheckpoints => "cleanup_checkpoints",
            TransactionalUpdate => "transactional_update",
            RecordStep => "record_step",
            SetCheckpointPolicy => "set_checkpoint_policy",
            PauseSession => "pause_session",
            ResumeSession => "resume_session",
            ResumeSessionAs => "resume_session_as",
            CompleteSession => "complete_session",
            FailSession => "fail_session",
            RecoverSession => "recover_session",
            Watch => "watch",
            AccessRecord => "access_record",
            GrantAccess => "grant_access",
            RevokeAccess => "revoke_access",
            SessionActor => "session_actor",
            WatchAll => "watch_all",
            CleanupOldSessions => "cleanup_old_sessions",
            VacuumStorage => "vacuum_storage",
            RunJanitorNow => "run_janitor_now",
            MigrateStore => "migrate_store",
            VerifyStore => "verify_store",
            ExportStore => "export_store",
            ImportStore => "import_store",
            #[cfg(feature = "encryption")]
            RotateKey => "rotate_key",
            #[cfg(feature = "encryption")]
            FinishKeyRotation => "finish_key_rotation",
            Shutdown => "shutdown",
            Claim => "claim",
            DeleteIfIdle => "delete_if_idle",
        }
    }

    /// The operation as a verb phrase, for "principal P may not {verb} session S".
    pub(crate) fn verb(self) -> &'static str {
        use Operation::*;
        match self {
            LoadSession | LoadSessionAs | LoadSessionBytes => "load",
            SaveSession => "save",
            DeleteSession | DeleteIfIdle => "delete",
            CreateCheckpoint | CheckpointBeforeRisky => "create a checkpoint of",
            RestoreCheckpoint | RestoreCheckpointAs => "restore a checkpoint of",
            RollbackToCheckpoint | RollbackAndTruncate => "roll back",
            ListCheckpoints => "list checkpoints of",
            CleanupCheckpoints => "clean up checkpoints of",
            TransactionalUpdate => "update",
            RecordStep => "record a step of",
            SetCheckpointPolicy => "set the checkpoint policy of",
            PauseSession => "pause",
            ResumeSession | ResumeSessionAs => "resume",
            CompleteSession => "complete",
            FailSession => "fail",
            RecoverSession => "recover",
            Watch => "watch",
            AccessRecord => "read the access record of",
            GrantAccess => "grant access to",
            RevokeAccess => "revoke access to",
            SessionActor => "message the actor of",
            WatchAll => "watch all sessions of",
            CleanupOldSessions => "clean up old sessions of",
            VacuumStorage => "vacuum",
            RunJanitorNow => "run the janitor on",
            MigrateStore => "migrate",
            VerifyStore => "verify",
            ExportStore => "export",
            ImportStore => "import into",
            #[cfg(feature = "encryption")]
            RotateKey | FinishKeyRotation => "rotate the key of",
            Shutdown => "shut down",
            Claim => "claim",
        }
    }

    /// What the principal needs for this operation.
    pub(crate) fn needs(self) -> Needs {
        use Operation::*;
        match self {
            LoadSession | LoadSessionAs | LoadSessionBytes | RestoreCheckpoint
            | RestoreCheckpointAs | ListCheckpoints | RecoverSession | Watch | AccessRecord => {
                Needs::Read
            }
            SaveSession
            | CreateCheckpoint
            | CheckpointBeforeRisky
            | TransactionalUpdate
            | RecordStep
            | SetCheckpointPolicy
            | PauseSession
            | ResumeSession
            | ResumeSessionAs
            | CompleteSession
            | FailSession
            | RollbackToCheckpoint
            | RollbackAndTruncate
            | CleanupCheckpoints => Needs::Write,
            DeleteSession | GrantAccess | RevokeAccess | SessionActor | Claim => Needs::Owner,
            WatchAll | CleanupOldSessions | VacuumStorage | RunJanitorNow | MigrateStore
            | VerifyStore | ExportStore | ImportStore | Shutdown | DeleteIfIdle => Needs::Admin,
            #[cfg(feature = "encryption")]
            RotateKey | FinishKeyRotation => Needs::Admin,
        }
    }

    /// Whether this operation may create the session (and so claim it for its principal):
    /// the writes that store a state.
    pub(crate) fn creates(self) -> bool {
        use Operation::*;
        self.needs() == Needs::Write
            && !matches!(
                self,
                RollbackToCheckpoint
                    | RollbackAndTruncate
                    | CleanupCheckpoints
                    | ResumeSession
                    | ResumeSessionAs
            )
    }

    /// Whether this operation is allowed on a session that does not exist and has no owner,
    /// without claiming it: it finds nothing there (the reads, and a resume, which returns
    /// `None`).
    pub(crate) fn finds_nothing_when_absent(self) -> bool {
        self.needs() == Needs::Read
            || matches!(self, Operation::ResumeSession | Operation::ResumeSessionAs)
    }
}

/// Replaces the contents of every `"…"` and `` `…` `` span in a serde message: serde quotes
/// the offending value ("invalid type: string \"secret\"") and values may be secrets.
pub(crate) fn redact(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut quote: Option<char> = None;
    for c in msg.chars() {
        match quote {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '"' || c == '`' {
                    quote = Some(c);
                }
            }
        }
    }
    if quote.is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Operation::*;

    #[test]
    fn each_method_reports_its_own_name() {
        assert_eq!(CheckpointBeforeRisky.name(), "checkpoint_before_risky");
        assert_eq!(RollbackAndTruncate.name(), "rollback_and_truncate");
        assert_ne!(CreateCheckpoint.name(), CheckpointBeforeRisky.name());
        assert_ne!(RollbackToCheckpoint.name(), RollbackAndTruncate.name());
        // Only writes that store a state claim a new session.
        assert!(
            SaveSession.creates() && !RollbackAndTruncate.creates() && !ResumeSession.creates()
        );
        assert!(
            ResumeSession.finds_nothing_when_absent() && !DeleteSession.finds_nothing_when_absent()
        );
    }

    #[test]
    fn serde_messages_are_redacted() {
        let e = serde_json::from_str::<u64>(r#""SECRET""#).unwrap_err();
        let msg = super::StateError::json("s", &e).to_string();
        assert!(!msg.contains("SECRET"), "{msg}");
        assert!(msg.contains("expected u64"), "{msg}");
    }
}
