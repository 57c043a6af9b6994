//! Checking a whole store: [`StateManager::verify_store`] and its [`VerifyReport`]. This
//! file owns the pass that reads every key of a store once, through the manager's
//! middleware (so encrypted values are opened with its key) and the codec (checksums,
//! gzip integrity, decoding), and says of each damaged key what it is and what is wrong.
//! It calls the backend's `get` and `list`, the codec's `decode`, the index journal's
//! replay and the key layout. It never writes: no quarantine copy (the load path makes
//! one; this pass does not go through it), no repair, no journal line.

use serde::Serialize;

use super::codec::RecordHead;
use super::index::Index;
use super::{Store, keys};
use crate::StateManager;
use crate::access::AccessRecord;
use crate::backend::StorageKey;
use crate::error::{Operation, Result, StateError};

/// What a key of a store holds, as [`DamagedRecord::what`] names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecordKind {
    /// A session's current state (`sessions/<session>…`).
    Session {
        /// The session.
        session: String,
    },
    /// A checkpoint of a session (`checkpoints/<session>/<checkpoint>…`).
    Checkpoint {
        /// The session.
        session: String,
        /// The checkpoint.
        checkpoint: String,
    },
    /// A session's access record (`metadata/access/<session>.json`).
    Access {
        /// The session.
        session: String,
    },
    /// The index journal (`metadata/index.log`): rebuilt from the records when damaged.
    IndexJournal,
    /// The store's format or encryption descriptor (`metadata/store.json`,
    /// `metadata/crypto.json`).
    StoreMetadata,
    /// A marker (pending delete, interrupted run, running, copy in progress).
    Marker,
    /// A key the store's layout does not name (left by another version, or planted).
    Unknown,
}

impl std::fmt::Display for RecordKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordKind::Session { session } => write!(f, "session record of {session}"),
            RecordKind::Checkpoint { session, checkpoint } => {
                write!(f, "checkpoint {checkpoint} of session {session}")
            }
            RecordKind::Access { session } => write!(f, "access record of session {session}"),
            RecordKind::IndexJournal => f.write_str("index journal"),
            RecordKind::StoreMetadata => f.write_str("store metadata"),
            RecordKind::Marker => f.write_str("marker"),
            RecordKind::Unknown => f.write_str("unknown key"),
        }
    }
}

/// One damaged key found by [`StateManager::verify_store`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DamagedRecord {
    /// The storage key (`sessions/run-1.json.gz`, ...).
    pub key: String,
    /// What it holds.
    pub what: RecordKind,
    /// What is wrong with it (no payload is ever quoted).
    pub problem: String,
}

/// What [`StateManager::verify_store`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Keys read and checked (quarantine copies are not checked, only counted).
    pub records_checked: u64,
    /// Bytes read, as stored.
    pub bytes_checked: u64,
    /// Copies of damaged records already in `quarantine/` (from earlier loads).
    pub quarantine_copies: u64,
    /// Every damaged key, in key order.
    pub damaged: Vec<DamagedRecord>,
}

impl VerifyReport {
    /// Whether nothing is damaged.
    pub fn is_healthy(&self) -> bool {
        self.damaged.is_empty()
    }
}

impl StateManager {
    /// Reads every key of the store once and checks it: session and checkpoint records
    /// against their checksums (and, gzipped, the gzip integrity field), decoded and bound
    /// to their key; every sealed value opened with this manager's key (a value sealed
    /// under another key, or altered, is reported); access records, the index journal and
    /// the store's descriptors parsed. Returns how many keys and bytes were checked and
    /// every damaged key with what it holds and what is wrong.
    ///
    /// Never writes: unlike a load, a damaged record gets no quarantine copy, and nothing
    /// is repaired. Safe beside the manager's own work (each key is read once, as it is at
    /// that moment) and on a [read-only](crate::StateManagerBuilder::read_only) manager.
    ///
    /// `progress(done, total)` is called after each key (`total` is the number of keys
    /// listed at the start), for a progress bar.
    ///
    /// Errors: [`StateError::AccessDenied`] for a handle of a principal who is not an
    /// administrator; an error of the backend that is not damage (I/O, unavailable). Damage
    /// is never an error: it is in the report.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// use mars_state::{MemoryStorageBackend, StateManager};
    /// let manager = StateManager::start(MemoryStorageBackend::new()).await?;
    /// manager.save_session("run-1", &serde_json::json!({ "step": 1 })).await?;
    /// let report = manager.verify_store(|_done, _total| {}).await?;
    /// assert!(report.is_healthy());
    /// assert!(report.records_checked >= 2); // the session and the store's descriptor
    /// # Ok(()) }
    /// ```
    pub async fn verify_store(
        &self,
        mut progress: impl FnMut(u64, u64) + Send,
    ) -> Result<VerifyReport> {
        let store = self.store_for(Operation::VerifyStore)?;
        store.verify(&mut progress).await
    }
}

impl Store {
    async fn verify(&self, progress: &mut (dyn FnMut(u64, u64) + Send)) -> Result<VerifyReport> {
        let mut all = Vec::new();
        for folder in keys::FOLDERS {
            for meta in self.backend.list(&StorageKey::from_valid(folder.to_owned())).await? {
                if !keys::is_lock(&meta.key) {
                    all.push(meta.key);
                }
            }
        }
        all.sort();
        let mut report = VerifyReport::default();
        let total = all.len() as u64;
        for (n, key) in all.iter().enumerate() {
            if key.starts_with(&keys::quarantine()) {
                report.quarantine_copies += 1;
            } else {
                report.records_checked += 1;
                let what = self.kind_of(key);
                if let Some(problem) = self.check(key, &what, &mut report.bytes_checked).await? {
                    report.damaged.push(DamagedRecord { key: key.to_string(), what, problem });
                }
            }
            progress(n as u64 + 1, total);
        }
        Ok(report)
    }

    /// What `key` holds, from its name.
    fn kind_of(&self, key: &StorageKey) -> RecordKind {
        let ext = self.codec.extension();
        if key.starts_with(&keys::sessions()) {
            if let Some(sid) = keys::session_of(key, ext) {
                return RecordKind::Session { session: sid.to_string() };
            }
        } else if key.starts_with(&keys::checkpoints()) {
            if let Some((sid, cid)) = keys::checkpoint_of(key, ext) {
                return RecordKind::Checkpoint {
                    session: sid.to_string(),
                    checkpoint: cid.to_string(),
                };
            }
        } else if key.starts_with(&keys::access_records()) {
            if let Some(sid) = keys::access_of(key) {
                return RecordKind::Access { session: sid.to_string() };
            }
        } else if *key == keys::journal() {
            return RecordKind::IndexJournal;
        } else if *key == keys::store_meta() || key.as_str() == keys::CRYPTO_META {
            return RecordKind::StoreMetadata;
        } else if key.starts_with(&keys::pending_markers())
            || key.starts_with(&keys::interrupted_marks())
            || *key == keys::running()
            || *key == keys::copying()
        {
            return RecordKind::Marker;
        }
        RecordKind::Unknown
    }

    /// Reads and checks one key; `Some(problem)` if it is damaged. Adds the bytes read to
    /// `bytes`.
    async fn check(
        &self,
        key: &StorageKey,
        what: &RecordKind,
        bytes: &mut u64,
    ) -> Result<Option<String>> {
        let raw = match self.backend.get(key).await {
            Ok(Some(raw)) => raw,
            // Removed since the listing (the manager's own work): nothing to check.
            Ok(None) => return Ok(None),
            Err(StateError::Corrupt { reason, .. }) => return Ok(Some(reason)),
            Err(StateError::WrongKey { reason }) => {
                return Ok(Some(format!("cannot be opened with this key: {reason}")));
            }
            Err(e) => return Err(e),
        };
        *bytes += raw.len() as u64;
        let problem = match what {
            RecordKind::Session { session } => match self.codec.decode(key, raw) {
                Ok(d) => match &d.head {
                    RecordHead::Session { session_id, .. } if session_id.as_str() == session => {
                        d.check_data(key).err().map(reason_of)
                    }
                    _ => Some("the record belongs to another key".to_owned()),
                },
                Err((e, _)) => Some(reason_of(e)),
            },
            RecordKind::Checkpoint { session, checkpoint } => match self.codec.decode(key, raw) {
                Ok(d) => match &d.head {
                    RecordHead::Checkpoint { session_id, checkpoint_id, .. }
                        if session_id.as_str() == session
                            && checkpoint_id.as_str() == checkpoint =>
                    {
                        d.check_data(key).err().map(reason_of)
                    }
                    _ => Some("the record belongs to another key".to_owned()),
                },
                Err((e, _)) => Some(reason_of(e)),
            },
            RecordKind::Access { .. } => serde_json::from_slice::<AccessRecord>(&raw)
                .err()
                .map(|e| format!("not an access record: {}", StateError::json("", &e))),
            RecordKind::IndexJournal => Index::replay(&raw).is_none().then(|| {
                "damaged before its last line (the next full start rebuilds it from the records)"
                    .to_owned()
            }),
            RecordKind::StoreMetadata => serde_json::from_slice::<serde_json::Value>(&raw)
                .err()
                .map(|_| "not JSON: the store cannot be opened without it".to_owned()),
            RecordKind::Marker => None,
            RecordKind::Unknown if key.starts_with(&keys::sessions()) => Some(format!(
                "not a session record name of this store (records here end in {})",
                self.codec.extension()
            )),
            RecordKind::Unknown if key.starts_with(&keys::checkpoints()) => Some(format!(
                "not a checkpoint record name of this store (records here end in {})",
                self.codec.extension()
            )),
            RecordKind::Unknown => None,
        };
        Ok(problem)
    }
}

/// The reason of a decoding error, without the key (the report names it already).
fn reason_of(e: StateError) -> String {
    match e {
        StateError::Corrupt { reason, .. } => reason,
        other => other.to_string(),
    }
}
