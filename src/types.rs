//! Validated ids and the records and reports the manager returns. Owns their validation
//! and formats; calls only the error module.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, StateError};

/// Longest accepted session or branch id, in bytes.
pub const MAX_ID_LEN: usize = 128;

fn escaped(id: &str) -> String {
    let mut s: String = id.chars().take(80).flat_map(char::escape_debug).collect();
    if id.chars().count() > 80 {
        s.push('…');
    }
    s
}

/// Checks a session or branch id: 1 to 128 bytes of `A-Z a-z 0-9 _ - . : @`, starting with
/// a letter, digit or `_`. This rules out empty ids, `.`, `..`, path separators, absolute
/// paths, NUL, control, bidi and other invisible characters, and percent-encodings.
fn validate(what: &'static str, id: &str) -> Result<()> {
    let reject = |reason| Err(StateError::InvalidId { what, id: escaped(id), reason });
    if id.is_empty() {
        return reject("it is empty");
    }
    if id.len() > MAX_ID_LEN {
        return reject("it is longer than 128 bytes");
    }
    let first = id.as_bytes()[0];
    if !(first.is_ascii_alphanumeric() || first == b'_') {
        return reject("it must start with an ASCII letter, digit or '_'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
    {
        return reject("only ASCII letters, digits and _ - . : @ are allowed");
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `id`; see the type's docs for the accepted form.
            pub fn new(id: impl AsRef<str>) -> Result<Self> {
                let id = id.as_ref();
                validate($what, id)?;
                Ok(Self(id.to_owned()))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Wraps a string the crate knows to be valid.
            #[allow(dead_code)]
            pub(crate) fn from_valid(id: &str) -> Self {
                debug_assert!(validate($what, id).is_ok());
                Self(id.to_owned())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// A validated session id: 1 to 128 bytes of ASCII letters, digits and `_ - . : @`,
    /// starting with a letter, digit or `_`.
    ///
    /// ```
    /// use mars_state::SessionId;
    /// assert!(SessionId::new("session_123").is_ok());
    /// assert!(SessionId::new("../etc/passwd").is_err());
    /// ```
    SessionId,
    "session id"
);

string_id!(
    /// A validated branch id (same rules as [`SessionId`]).
    BranchId,
    "branch id"
);

string_id!(
    /// Who makes a request through a handle from
    /// [`StateManager::for_principal`](crate::StateManager::for_principal) (same rules as
    /// [`SessionId`]).
    ///
    /// ```
    /// let alice = mars_state::Principal::new("alice@example.com").unwrap();
    /// assert_eq!(alice.as_str(), "alice@example.com");
    /// ```
    Principal,
    "principal"
);

/// A checkpoint id: unique across the store, strictly increasing in creation order within
/// a session (many per millisecond included), safe as a file name, and enough on its own
/// to find the checkpoint after a restart.
///
/// Its text form is 16 lowercase hex digits of a hybrid logical clock (milliseconds since
/// the Unix epoch shifted left 16 bits, plus a counter), a `-`, and 8 random hex digits.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct CheckpointId(String);

impl CheckpointId {
    pub(crate) fn generate(clock: u64) -> Self {
        // Uniqueness across sessions comes from the random suffix; ordering from the clock.
        // If the OS RNG fails we still have a unique-per-session clock value.
        let r = crate::random::unique_u64() as u32;
        CheckpointId(format!("{clock:016x}-{r:08x}"))
    }

    /// Parses and validates the text form of an id.
    ///
    /// ```
    /// use mars_state::CheckpointId;
    /// assert!(CheckpointId::parse("0192a3b4c5d60001-1a2b3c4d").is_ok());
    /// assert!(CheckpointId::parse("../../x").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        let ok = s.len() == 25
            && s.as_bytes()[16] == b'-'
            && s.bytes()
                .enumerate()
                .all(|(i, b)| i == 16 || matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !ok {
            return Err(StateError::InvalidId {
                what: "checkpoint id",
                id: escaped(s),
                reason: "expected 16 hex digits, '-', 8 hex digits",
            });
        }
        Ok(CheckpointId(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The clock value that orders checkpoints within a session.
    pub(crate) fn clock(&self) -> u64 {
        u64::from_str_radix(&self.0[..16], 16).unwrap_or(0)
    }

    /// Creation time in milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        self.clock() >> 16
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for CheckpointId {
    type Err = StateError;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for CheckpointId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Milliseconds since the Unix epoch by the system clock.
fn system_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The manager's clock: wall-clock milliseconds that also follow tokio's clock, so that
/// tests with paused time (`tokio::time::advance`) move timestamps, idleness and retention
/// forward. It reads the later of the system clock and (system clock at start + tokio time
/// elapsed since), so it never runs behind the system clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    wall_at_start: u64,
    at_start: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock { wall_at_start: system_ms(), at_start: tokio::time::Instant::now() }
    }

    /// Milliseconds since the Unix epoch, now.
    pub(crate) fn now_ms(&self) -> u64 {
        system_ms().max(self.wall_at_start + self.at_start.elapsed().as_millis() as u64)
    }
}

/// Where a session's run stands, stored with its state and listed by
/// [`list_sessions`](crate::StateManager::list_sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Being worked on (the status of any session saved without one).
    #[default]
    Running,
    /// Paused by [`pause_session`](crate::StateManager::pause_session), waiting to resume.
    Paused,
    /// Finished (see [`complete_session`](crate::StateManager::complete_session)).
    Completed,
    /// Given up on (see [`fail_session`](crate::StateManager::fail_session)).
    Failed,
}

/// Why a checkpoint was taken, stored with it and listed by
/// [`list_checkpoints`](crate::StateManager::list_checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointReason {
    /// Asked for explicitly ([`create_checkpoint`](crate::StateManager::create_checkpoint)).
    #[default]
    Manual,
    /// The session's policy: every N steps.
    Steps,
    /// The session's policy: every so much time.
    Time,
    /// Taken by [`pause_session`](crate::StateManager::pause_session).
    Pause,
    /// Taken before a risky operation
    /// ([`checkpoint_before_risky`](crate::StateManager::checkpoint_before_risky)).
    BeforeRisky,
    /// Recorded steps not yet checkpointed, flushed when the session actor went idle or
    /// the manager shut down.
    Flush,
}

/// One session as listed by [`list_sessions`](crate::StateManager::list_sessions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session's id.
    pub session_id: SessionId,
    /// When its state was last saved, in milliseconds since the Unix epoch
    /// (0 when the session has checkpoints but no saved state).
    pub updated_at: u64,
    /// Size of the stored session record in bytes (0 when there is none).
    pub size_bytes: u64,
    /// How many checkpoints the session has.
    pub checkpoint_count: usize,
    /// Where its run stands.
    pub status: SessionStatus,
    /// The orchestrator's step of the stored state, if known: the step last given to
    /// [`record_step`](crate::StateManager::record_step) once it is durable (`None` for a
    /// session whose state never had a step, and for one with no stored state).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// use mars_state::{CheckpointPolicy, MemoryStorageBackend, StateManager};
    /// let manager = StateManager::builder(MemoryStorageBackend::new())
    ///     .checkpoint_policy(CheckpointPolicy::every_steps(1)) // every step made durable
    ///     .start()
    ///     .await?;
    /// manager.record_step("run", 7, &serde_json::json!({"done": 7})).await?;
    /// manager.save_session("other", &serde_json::json!({})).await?;
    /// let sessions = manager.list_sessions().await?; // sorted by id
    /// assert_eq!((sessions[0].session_id.as_str(), sessions[0].step), ("other", None));
    /// assert_eq!((sessions[1].session_id.as_str(), sessions[1].step), ("run", Some(7)));
    /// # Ok(()) }
    /// ```
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Why that status was set: the reason given to
    /// [`pause_session`](crate::StateManager::pause_session) or
    /// [`fail_session`](crate::StateManager::fail_session), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// When that status was set (milliseconds since the Unix epoch), if it was set by a
    /// pause, resume, completion or failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_at: Option<u64>,
    /// True when the session was [`Running`](SessionStatus::Running) when a process using
    /// the store died without shutting down, and has not been saved since: its run was cut
    /// off and needs [`recover_session`](crate::StateManager::recover_session). It stays
    /// set across later clean restarts until the session is saved (or resumed, paused,
    /// completed, failed, rolled back or deleted), so no process opening the store misses
    /// it.
    ///
    /// On a shared store (several nodes, see
    /// [`node_id`](crate::StateManagerBuilder::node_id)) it is also set for a session that
    /// is running while no node holds it and its last holder let its lease run out (the
    /// node died or hung) rather than giving it up.
    pub interrupted: bool,
    /// On a shared store: the node holding the session's lease (its writer) now, if any.
    /// Always `None` on a store one process holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// On a shared store: when the owner's lease runs out unless renewed, in milliseconds
    /// since the Unix epoch (by this node's clock: the server's time left added to now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<u64>,
}

/// A checkpoint with its state, as returned by
/// [`restore_checkpoint`](crate::StateManager::restore_checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint<T = serde_json::Value> {
    /// The checkpoint's id.
    pub id: CheckpointId,
    /// The session it belongs to.
    pub session_id: SessionId,
    /// The branch it was taken on.
    pub branch_id: BranchId,
    /// Creation time in milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// Why it was taken.
    pub reason: CheckpointReason,
    /// The orchestrator's step it captures, if known.
    pub step: Option<u64>,
    /// The previous checkpoint on the same branch (its lineage).
    pub parent: Option<CheckpointId>,
    /// The state captured.
    pub data: T,
}

/// A checkpoint's metadata, as listed by
/// [`list_checkpoints`](crate::StateManager::list_checkpoints) without reading its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// The checkpoint's id.
    pub id: CheckpointId,
    /// The session it belongs to.
    pub session_id: SessionId,
    /// The branch it was taken on.
    pub branch_id: BranchId,
    /// Creation time in milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// Size of the stored record in bytes.
    pub size_bytes: u64,
    /// Why it was taken.
    pub reason: CheckpointReason,
    /// The orchestrator's step it captures, if known.
    pub step: Option<u64>,
    /// The previous checkpoint on the same branch of the same session (its lineage).
    pub parent: Option<CheckpointId>,
}

/// Totals over the whole store, from the index (no record is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StorageStats {
    /// Sessions with a saved state or at least one checkpoint.
    pub session_count: usize,
    /// Checkpoints over all sessions.
    pub checkpoint_count: usize,
    /// Bytes of all session and checkpoint records.
    pub total_bytes: u64,
}

impl StorageStats {
    /// [`total_bytes`](Self::total_bytes) in MiB.
    pub fn total_size_mb(&self) -> f64 {
        self.total_bytes as f64 / (1024.0 * 1024.0)
    }
}

/// What [`vacuum_storage`](crate::StateManager::vacuum_storage) or a janitor pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VacuumReport {
    /// Staged files of interrupted writes that were removed.
    pub temp_files_removed: usize,
    /// Bytes those staged files held.
    pub temp_bytes_freed: u64,
    /// Records of interrupted deletes that were finished off.
    pub orphans_removed: usize,
    /// Checkpoints removed by the retention policy.
    pub checkpoints_removed: usize,
    /// Sessions removed by the retention policy.
    pub sessions_removed: usize,
    /// Bytes of the records removed by the retention policy.
    pub bytes_freed: u64,
    /// Index entries the janitor found wrong and corrected from the records.
    pub index_repairs: usize,
    /// Entries in the index after it was rebuilt from the records.
    pub index_entries: usize,
    /// Records that failed verification while the index was rebuilt (kept and quarantined).
    pub corrupt_records: Vec<String>,
}

/// A state serialized as compact JSON, cheap to clone. This is what travels in
/// [`SessionMsg`](crate::SessionMsg)s and what session actors cache.
#[derive(Clone)]
// A range of an `Arc<Vec<u8>>` rather than an `Arc<[u8]>`: the serializer's buffer is
// shared as it is, without a copy on every save, and a loaded state is the `data` of the
// record's buffer as it was read, without a copy on every load.
pub struct StateBytes {
    buf: std::sync::Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
}

impl StateBytes {
    /// Serializes `state` to compact JSON.
    ///
    /// ```
    /// let b = mars_state::StateBytes::from_serialize(&serde_json::json!({"step": 1})).unwrap();
    /// assert_eq!(b.as_bytes(), br#"{"step":1}"#);
    /// ```
    pub fn from_serialize<T: Serialize + ?Sized>(state: &T) -> Result<Self> {
        serde_json::to_vec(state).map(StateBytes::from_vec).map_err(|e| StateError::json("", &e))
    }

    /// Deserializes the state into `T`.
    pub fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(self.as_bytes()).map_err(|e| StateError::json("", &e))
    }

    /// The JSON bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(self.range.clone()).unwrap_or_default()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether there are no bytes (never true for a valid state).
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }

    pub(crate) fn from_vec(v: Vec<u8>) -> Self {
        StateBytes { range: 0..v.len(), buf: std::sync::Arc::new(v) }
    }

    /// The bytes at `range` of `buf`, sharing it (a record's `data` in the buffer it was
    /// read into). A range outside `buf` reads as empty.
    pub(crate) fn shared(buf: std::sync::Arc<Vec<u8>>, range: std::ops::Range<usize>) -> Self {
        debug_assert!(buf.get(range.clone()).is_some());
        StateBytes { buf, range }
    }
}

impl PartialEq for StateBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for StateBytes {}

impl fmt::Debug for StateBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print state contents: they may hold user data or credentials.
        write!(f, "StateBytes({} bytes)", self.len())
    }
}

/// What [`recover_session`](crate::StateManager::recover_session) found.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The session's last saved state.
    pub state: Option<Value>,
    /// Its stored status.
    pub status: SessionStatus,
    /// Why that status was set: the reason given to
    /// [`pause_session`](crate::StateManager::pause_session) or
    /// [`fail_session`](crate::StateManager::fail_session), if any.
    pub status_reason: Option<String>,
    /// When that status was set (milliseconds since the Unix epoch), if it was set by a
    /// pause, resume, completion or failure.
    pub status_at: Option<u64>,
    /// Whether its run was cut off: it was running when a process using the store died, and
    /// it has not been saved since (see [`SessionInfo::interrupted`](crate::SessionInfo)).
    pub interrupted: bool,
    /// The newest checkpoint that verified.
    pub checkpoint: Option<Checkpoint>,
    /// Newer checkpoints that were damaged and skipped, newest first.
    pub skipped: Vec<SkippedCheckpoint>,
}

/// A checkpoint recovery passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedCheckpoint {
    /// Its id.
    pub id: CheckpointId,
    /// What was wrong with it.
    pub reason: String,
}

/// What [`migrate_store`](crate::StateManager::migrate_store) rewrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Session records rewritten at the current schema version.
    pub sessions: usize,
    /// Checkpoint records rewritten.
    pub checkpoints: usize,
}
