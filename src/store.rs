//! The store: backend + codec + index. Every record operation of the crate goes through
//! here, called from the storage actor's tasks (and once from start-up).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::backend::{StorageBackend, StorageKey};
use crate::codec::{CheckpointMeta, Codec, Compression, Decoded, RecordHead, SessionMeta};
use crate::error::{Result, StateError};
use crate::index::{Change, CpEntry, Index, RecordEntry};
use crate::lifecycle::{CheckpointPolicy, Envelope, EventKind, StateEvent};
use crate::middleware::acl::{AccessControlLayer, AccessRecord, AccessTable};
use crate::sync::lock;
use crate::types::{
    BranchId, CheckpointId, CheckpointReason, Clock, SessionId, SessionStatus, StateBytes, VacuumReport,
};
use std::collections::HashMap;

const JOURNAL: &str = "metadata/index.log";
const STORE_META: &str = "metadata/store.json";
const PENDING: &str = "metadata/pending";
const ACCESS: &str = "metadata/access";
/// Present while a manager has the store open; left behind by a process that died.
const RUNNING: &str = "metadata/running";

/// What `reconcile` found.
#[derive(Debug, Default)]
pub(crate) struct Reconciled {
    /// Entries in the index afterwards.
    pub(crate) entries: usize,
    /// Entries that had to be corrected (read from their record, or dropped).
    pub(crate) repaired: usize,
    /// Keys of records that failed verification.
    pub(crate) corrupt: Vec<String>,
}

/// How much of the journal's index `reconcile` may take on trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trust {
    /// Entries whose record exists with the same size (after a clean shutdown).
    Sizes,
    /// Only checkpoint entries (their records never change); session records are re-read,
    /// since a crash may have dropped the journal line of their latest save.
    Checkpoints,
    /// Nothing: every record is read (vacuum, or a damaged journal).
    Nothing,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoreMeta {
    mars_state: u32,
    compression: String,
    #[serde(default)]
    encrypted: bool,
}

impl StoreMeta {
    fn of(codec: &Codec) -> StoreMeta {
        StoreMeta { mars_state: 1, compression: codec.compression.name().to_owned(), encrypted: codec.encrypted }
    }

    /// Whether the store was created encrypted.
    #[cfg(feature = "encryption")]
    pub(crate) fn encrypted(&self) -> bool {
        self.encrypted
    }

    /// Refuses to open a store with an encryption setting other than the one it was
    /// created with (an encrypted store needs its key; a plain one must not get one), or in
    /// a format this version does not know. Compression is not checked: see
    /// [`adopt_format`](Self::adopt_format).
    pub(crate) fn check(&self, codec: &Codec) -> Result<()> {
        if self.mars_state != 1 {
            return Err(StateError::Config { message: format!("unsupported store format {}", self.mars_state) });
        }
        if !matches!(self.compression.as_str(), "none" | "gzip") {
            return Err(StateError::Config {
                message: format!(
                    "the store was created with compression {:?}, which this version does not know",
                    self.compression
                ),
            });
        }
        let on_off = |b: bool| if b { "on" } else { "off" };
        if self.encrypted != codec.encrypted {
            return Err(StateError::Config {
                message: format!(
                    "the store was created with encryption {} but the manager is configured with {}",
                    on_off(self.encrypted),
                    on_off(codec.encrypted)
                ),
            });
        }
        Ok(())
    }

    /// Makes `codec` write the record format the store was created with, so every record
    /// of a store has one format and one file-name ending (`.json`, or `.json.gz` that
    /// `zcat | jq` reads), whatever the manager is configured with now: a gzip store
    /// opened without `compression` keeps gzipping (at level 6), one opened at another
    /// level uses that level, and a plain store stays plain. (Reads do not depend on it:
    /// each record is recognised by its own bytes.)
    fn adopt_format(&self, codec: &mut Codec) {
        let stored = match (self.compression.as_str(), codec.compression) {
            ("gzip", Compression::None) => {
                info!("the store was created with gzip; new records are gzipped at level 6");
                Compression::Gzip(6)
            }
            ("none", Compression::Gzip(_)) => {
                info!("the store was created uncompressed; new records stay plain JSON");
                Compression::None
            }
            (_, configured) => configured,
        };
        codec.compression = stored;
    }
}

/// The store's format metadata, if the store has been created. Read before any middleware
/// (it is kept in plaintext), so settings are checked before a key touches the store.
pub(crate) async fn read_store_meta(backend: &dyn StorageBackend) -> Result<Option<StoreMeta>> {
    let key = fixed(STORE_META);
    match backend.get(&key).await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::corrupt(&key, format!("store metadata does not parse: {e}"))),
    }
}

/// Retention rules, applied by the janitor on its interval, by
/// [`run_janitor_now`](crate::StateManager::run_janitor_now), and by the emergency pass on
/// a full disk. The byte cap is also enforced after every write.
///
/// ```
/// use std::time::Duration;
/// use mars_state::RetentionPolicy;
/// let policy = RetentionPolicy {
///     keep_checkpoints: Some(20),
///     max_checkpoint_age: Some(Duration::from_secs(7 * 86_400)),
///     max_session_idle: Some(Duration::from_secs(30 * 86_400)),
///     max_total_bytes: Some(10 << 30),
/// };
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep at most this many checkpoints per session (the newest ones).
    pub keep_checkpoints: Option<usize>,
    /// Remove checkpoints older than this, except the newest one of each session.
    pub max_checkpoint_age: Option<std::time::Duration>,
    /// Remove sessions (state and checkpoints) whose last save or checkpoint is older
    /// than this.
    pub max_session_idle: Option<std::time::Duration>,
    /// Keep the bytes of all records at or under this, evicting the oldest checkpoints
    /// first (across sessions; the newest checkpoint of each session is spared). Checked
    /// after every save and checkpoint, so a write returns once the store is back under
    /// the cap (or has nothing left to evict).
    pub max_total_bytes: Option<u64>,
}

#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) backend: Arc<dyn StorageBackend>,
    /// The backend under the middleware (for quarantine copies of records the middleware
    /// refused), when there is middleware.
    below: Option<Arc<dyn StorageBackend>>,
    pub(crate) codec: Codec,
    index: Mutex<Index>,
    /// Serializes journal appends with compaction.
    journal: tokio::sync::Mutex<()>,
    quarantined: Mutex<HashSet<StorageKey>>,
    pub(crate) retention: RetentionPolicy,
    pub(crate) clock: Clock,
    pub(crate) access: AccessTable,
    /// One eviction pass at a time (passes triggered by concurrent writes would otherwise
    /// pick the same victims and overshoot).
    evicting: tokio::sync::Mutex<()>,
    /// Live change events for watchers, each with the access record it was made under.
    pub(crate) events: tokio::sync::broadcast::Sender<Envelope>,
    /// Sessions whose delete failed part way (its pending marker is still on disk). The
    /// session actor finishes the delete before the session's next write, so an old
    /// marker can never be replayed over a newer save.
    deleting: Mutex<HashSet<SessionId>>,
    /// The current state of every live session, published by its session actor: loads are
    /// served from here without a message. `Some(None)`: known to have no state. Sharded to
    /// keep concurrent loads of different sessions from contending.
    hot: crate::sync::Sharded<Option<StateBytes>>,
    /// Per-session checkpoint policies set at run time (in memory: an orchestrator sets
    /// them again when it resumes a run).
    pub(crate) policies: Mutex<HashMap<SessionId, CheckpointPolicy>>,
    /// The live session actors (kept by the supervisor), for requests that skip it.
    pub(crate) actors: crate::actor::Directory,
    /// Serializes access-record writes with their re-encryption (a get and a put), so a
    /// grant made meanwhile is not overwritten by the older record.
    access_writes: tokio::sync::Mutex<()>,
}

pub(crate) fn session_key(codec: &Codec, sid: &SessionId) -> StorageKey {
    StorageKey::from_valid(format!("sessions/{sid}{}", codec.extension()))
}

pub(crate) fn checkpoint_key(codec: &Codec, sid: &SessionId, cid: &CheckpointId) -> StorageKey {
    StorageKey::from_valid(format!("checkpoints/{sid}/{cid}{}", codec.extension()))
}

fn access_key(sid: &SessionId) -> StorageKey {
    StorageKey::from_valid(format!("{ACCESS}/{sid}.json"))
}

fn pending_key(sid: &SessionId) -> StorageKey {
    StorageKey::from_valid(format!("{PENDING}/{sid}"))
}

fn fixed(k: &str) -> StorageKey {
    StorageKey::from_valid(k.to_owned())
}

impl Store {
    /// Opens the store: checks its format, sweeps staged files, loads and reconciles the
    /// index, and finishes deletes a crash interrupted.
    pub(crate) async fn open(
        backend: Arc<dyn StorageBackend>,
        mut codec: Codec,
        retention: RetentionPolicy,
        access: AccessControlLayer,
        below: Option<Arc<dyn StorageBackend>>,
    ) -> Result<Store> {
        match read_store_meta(backend.as_ref()).await? {
            Some(meta) => {
                meta.check(&codec)?;
                meta.adopt_format(&mut codec);
            }
            None => {
                let meta = StoreMeta::of(&codec);
                let bytes = serde_json::to_vec(&meta).map_err(|e| StateError::Config { message: e.to_string() })?;
                backend.put(&fixed(STORE_META), bytes).await?;
            }
        }
        let swept = backend.sweep().await?;
        if swept.files_removed > 0 {
            info!(files = swept.files_removed, bytes = swept.bytes_freed, "removed staged files of interrupted writes");
        }
        let store = Store {
            backend,
            below,
            codec,
            index: Mutex::new(Index::default()),
            journal: tokio::sync::Mutex::new(()),
            quarantined: Mutex::new(HashSet::new()),
            retention,
            clock: Clock::new(),
            access: AccessTable::default(),
            evicting: tokio::sync::Mutex::new(()),
            events: tokio::sync::broadcast::channel(4096).0,
            policies: Mutex::new(HashMap::new()),
            hot: Default::default(),
            actors: crate::actor::Directory::default(),
            deleting: Mutex::new(HashSet::new()),
            access_writes: tokio::sync::Mutex::new(()),
        };
        let access = store.load_access(access).await?;
        let store = Store { access, ..store };
        let replayed = match store.backend.get(&fixed(JOURNAL)).await {
            Ok(journal) => Index::replay(&journal.unwrap_or_default()),
            // Damage the encryption layer detects: rebuilt from the records like any other.
            Err(StateError::Corrupt { .. }) => None,
            Err(e) => return Err(e),
        };
        let (loaded, clean) = replayed.unwrap_or_else(|| {
            warn!("index journal is damaged; rebuilding it from the records");
            (Index::default(), false)
        });
        let fresh_store = loaded.journal_lines == 0 && !clean;
        *store.index() = loaded;
        // A delete that fails again here (the obstacle is still there) does not keep the
        // store from opening: its session stays marked, and its next write finishes it.
        store.finish_pending_deletes(false).await?;
        if !clean && !fresh_store {
            info!("the store was not shut down cleanly; re-reading session records for the index");
        }
        store.reconcile(if clean { Trust::Sizes } else { Trust::Checkpoints }).await?;
        // The marker exists from start to clean shutdown: found now, the last process
        // using the store died, and sessions it left running were cut off.
        let running_key = fixed(RUNNING);
        let died = store.backend.get(&running_key).await.map(|m| m.is_some()).unwrap_or(true);
        store.backend.put(&running_key, Vec::new()).await?;
        if died {
            let mut idx = store.index();
            let running: HashSet<SessionId> = idx
                .sessions
                .iter()
                .filter(|(_, e)| e.record.as_ref().is_some_and(|r| r.status == SessionStatus::Running))
                .map(|(s, _)| s.clone())
                .collect();
            // With those a clean restart kept from an earlier crash (still not saved since).
            idx.interrupted.extend(running);
        }
        Ok(store)
    }

    /// Reads every session's access record. An unreadable one (damaged, or sealed under a
    /// key this handle lacks) does not stop the open: its session is left to administrators
    /// and the system principal (fail closed: no one may claim it as new either), with a
    /// warning. A wrong key for the whole store never gets here: the encryption layer
    /// refuses it at once against its key-check records.
    async fn load_access(&self, layer: AccessControlLayer) -> Result<AccessTable> {
        let mut records = HashMap::new();
        let mut unreadable = Vec::new();
        for (sid, key) in self.access_keys().await? {
            let parsed = match self.backend.get(&key).await {
                Ok(Some(bytes)) => serde_json::from_slice::<AccessRecord>(&bytes).map_err(|e| e.to_string()),
                Ok(None) => continue,
                Err(e @ (StateError::Corrupt { .. } | StateError::WrongKey { .. })) => Err(e.to_string()),
                Err(e) => return Err(e),
            };
            match parsed {
                Ok(r) => {
                    records.insert(sid, r);
                }
                Err(error) => {
                    warn!(key = %key, error, "unreadable access record; the session is left to administrators");
                    unreadable.push(sid);
                }
            }
        }
        Ok(AccessTable::new(layer, records, unreadable))
    }

    /// The access records on disk: every session that has an owner, whether or not it has
    /// a state (a session claimed by a first write that then failed has only this).
    async fn access_keys(&self) -> Result<Vec<(SessionId, StorageKey)>> {
        Ok(self
            .backend
            .list(&fixed(ACCESS))
            .await?
            .into_iter()
            .filter_map(|meta| {
                let sid = meta.key.file_name().strip_suffix(".json").and_then(|s| SessionId::new(s).ok())?;
                Some((sid, meta.key))
            })
            .collect())
    }

    /// Every session a full-store pass must visit: those in the index and those with only
    /// an access record.
    #[cfg(feature = "encryption")]
    pub(crate) async fn reencrypt_sessions(&self) -> Result<Vec<SessionId>> {
        let mut sessions: std::collections::BTreeSet<SessionId> = self.index().sessions.keys().cloned().collect();
        sessions.extend(self.access_keys().await?.into_iter().map(|(sid, _)| sid));
        Ok(sessions.into_iter().collect())
    }

    /// Rewrites a record as it is (decrypted with whichever key sealed it, sealed again
    /// with the current one). Returns whether it was rewritten. A damaged record reads as
    /// damaged under every key, so it is left as it is (with a warning) rather than
    /// stopping the pass; a record sealed under a key this handle lacks stops it
    /// (`WrongKey`), so no key it needs is retired. Crash-safe: one atomic put, and the
    /// record reads the same before and after it.
    async fn rewrite(&self, key: &StorageKey) -> Result<bool> {
        match self.backend.get(key).await {
            Ok(Some(bytes)) => {
                self.backend.put(key, bytes).await?;
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e @ StateError::Corrupt { .. }) => {
                warn!(key = %key, error = %e, "damaged record left as it is by re-encryption");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Re-encrypts one session's records: its state, checkpoints and access record. Called
    /// by its session actor, so no write of the session interleaves; the access record is
    /// rewritten under the lock its writers take.
    pub(crate) async fn reencrypt_session(&self, sid: &SessionId) -> Result<usize> {
        let mut n = usize::from(self.rewrite(&session_key(&self.codec, sid)).await?);
        {
            let _access = self.access_writes.lock().await;
            n += usize::from(self.rewrite(&access_key(sid)).await?);
        }
        let prefix = StorageKey::from_valid(format!("checkpoints/{sid}"));
        for meta in self.backend.list(&prefix).await? {
            n += usize::from(self.rewrite(&meta.key).await?);
        }
        Ok(n)
    }

    /// Re-encrypts what belongs to no session: quarantine copies, the running marker and
    /// the index journal. (`metadata/store.json`, `metadata/crypto.json` and the pending
    /// markers are plaintext; see `middleware::crypto::stored_in_plaintext`.)
    #[cfg(feature = "encryption")]
    pub(crate) async fn reencrypt_rest(&self) -> Result<usize> {
        let mut n = 0;
        for meta in self.backend.list(&fixed("quarantine")).await? {
            n += usize::from(self.rewrite(&meta.key).await?);
        }
        // Written at start and deleted at a clean shutdown; rewritten so a crash after the
        // rotation does not leave it sealed under a retired key.
        n += usize::from(self.rewrite(&fixed(RUNNING)).await?);
        let _guard = self.journal.lock().await;
        self.compact_locked(true).await?;
        Ok(n + 1)
    }

    /// Publishes a live session's state (`None`: unknown, loads go to the actor).
    pub(crate) fn publish(&self, sid: &SessionId, state: Option<Option<StateBytes>>) {
        let mut shard = self.hot.shard(sid);
        match state {
            // The usual case, a save of a live session: no new key.
            Some(s) => match shard.get_mut(sid) {
                Some(slot) => *slot = s,
                None => {
                    shard.insert(sid.clone(), s);
                }
            },
            None => {
                shard.remove(sid);
            }
        }
    }

    /// Sessions whose state lives only in their actor's memory so far (recorded steps not
    /// yet flushed, and no record or checkpoint yet): they exist, but the index has not
    /// caught up with them.
    pub(crate) fn memory_only_sessions(&self) -> Vec<SessionId> {
        let mut live = self.hot.ids_where(|s| s.is_some());
        let idx = self.index();
        live.retain(|sid| !idx.sessions.contains_key(sid));
        live
    }

    /// A live session's state, if its actor has published one.
    pub(crate) fn hot(&self, sid: &SessionId) -> Option<Option<StateBytes>> {
        self.hot.shard(sid).get(sid).cloned()
    }

    /// Tells watchers about a change (no one listening is fine), with the session's access
    /// record as it is now: a watcher sees the event only if that record lets it read.
    pub(crate) fn emit(&self, sid: &SessionId, kind: EventKind) {
        // Every save emits: with no watcher, skip the access lookup (the event would be
        // dropped anyway).
        if self.events.receiver_count() > 0 {
            self.emit_as(sid, kind, self.access.shared(sid));
        }
    }

    /// Like [`emit`](Self::emit), under an access record taken earlier (a delete's event
    /// goes to those who could read the session before it was deleted).
    pub(crate) fn emit_as(&self, sid: &SessionId, kind: EventKind, access: Option<Arc<AccessRecord>>) {
        let event = StateEvent { session_id: sid.clone(), kind, at: self.clock.now_ms() };
        let _ = self.events.send(Envelope { event, access });
    }

    /// Whether anything of `sid` is kept, for access control's "may a first write claim
    /// it": records (the index), a state only in its actor's memory (recorded steps not
    /// flushed yet), or a delete that failed part way. Not only what the index has caught
    /// up with.
    pub(crate) fn exists(&self, sid: &SessionId) -> bool {
        self.index().sessions.contains_key(sid) || matches!(self.hot(sid), Some(Some(_))) || self.is_deleting(sid)
    }

    /// Persists a session's access record (durably, before the request it guards goes on).
    pub(crate) async fn put_access(&self, sid: &SessionId, record: &AccessRecord) -> Result<()> {
        let bytes = serde_json::to_vec(record).map_err(|e| StateError::json(sid.as_str(), &e))?;
        let _access = self.access_writes.lock().await;
        self.backend.put(&access_key(sid), bytes).await
    }

    /// Writes the journal as a clean snapshot. Called at shutdown, after every write has
    /// finished; the next start then trusts it without reading any record.
    pub(crate) async fn close(&self) -> Result<()> {
        let _guard = self.journal.lock().await;
        let (bytes, n) = self.index().snapshot(true);
        // The clean snapshot first, durably (an atomic put), the marker second: a crash in
        // between leaves the marker, so the next start treats the run as cut off and
        // re-reads session records rather than trusting a journal it cannot vouch for.
        self.backend.put(&fixed(JOURNAL), bytes).await?;
        self.index().journal_lines = n;
        self.backend.delete(&fixed(RUNNING)).await?;
        Ok(())
    }

    pub(crate) fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    async fn record(&self, change: Change) -> Result<()> {
        let _guard = self.journal.lock().await;
        self.index().apply(&change);
        // The journal write is best effort: the record is already durable and the index
        // is reconciled against the records at the next start.
        if let Err(e) = self.backend.append(&fixed(JOURNAL), Index::line(&change)).await {
            warn!(error = %e, "index journal append failed; it will be rebuilt at the next start");
        }
        self.index().journal_lines += 1;
        Ok(())
    }

    /// Rewrites the journal as one line per live entry (atomic put), if it has grown past
    /// twice the live entries, or always when `force`.
    async fn compact_locked(&self, force: bool) -> Result<()> {
        let (bytes, n) = {
            let idx = self.index();
            if !force && idx.journal_lines <= 2 * idx.live_entries() + 64 {
                return Ok(());
            }
            idx.snapshot(false)
        };
        self.backend.put(&fixed(JOURNAL), bytes).await?;
        self.index().journal_lines = n;
        debug!(entries = n, "index journal compacted");
        Ok(())
    }

    /// Encodes and puts a record with the disk-full rule: on ENOSPC, sweep staged files and
    /// trim checkpoints past the retention limit once, then retry. Returns the stored size.
    /// (The retry encodes again rather than keeping a copy of every record just in case.)
    async fn put(&self, key: &StorageKey, head: &RecordHead, data: &[u8]) -> Result<u64> {
        let bytes = self.codec.encode(head, data)?;
        let size = bytes.len() as u64;
        match self.backend.put(key, bytes).await {
            Err(StateError::StorageFull { .. }) => {
                warn!(key = %key, "disk full; running an emergency cleanup and retrying once");
                let _ = self.backend.sweep().await;
                let _ = self.trim_checkpoints().await;
                self.backend.put(key, self.codec.encode(head, data)?).await?;
            }
            other => other?,
        }
        Ok(size)
    }

    fn quarantine_later(&self, key: &StorageKey, raw: &[u8]) -> Option<(StorageKey, Vec<u8>)> {
        let mut q = lock(&self.quarantined);
        if !q.insert(key.clone()) {
            return None;
        }
        let name = format!("quarantine/{}-{}", self.clock.now_ms(), key.as_str().replace('/', "~"));
        Some((StorageKey::from_valid(name), raw.to_vec()))
    }

    /// Reads and verifies a record. Damage is an error naming the key; a copy of the damaged
    /// bytes goes to `quarantine/` (the record itself stays in place for inspection).
    async fn read(&self, key: &StorageKey, belongs: impl Fn(&RecordHead) -> bool) -> Result<Option<Decoded>> {
        let raw = match self.backend.get(key).await {
            Ok(Some(raw)) => raw,
            Ok(None) => return Ok(None),
            // Damage found below the codec (by the encryption layer): copy the stored bytes
            // from the backend under that layer.
            Err(e @ StateError::Corrupt { .. }) => {
                warn!(key = %key, error = %e, "damaged record");
                if let Some(below) = &self.below
                    && let Ok(Some(stored)) = below.get(key).await
                {
                    self.quarantine(below.as_ref(), key, stored).await;
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let (e, raw) = match self.codec.decode(key, raw) {
            Ok(d) if belongs(&d.head) => return Ok(Some(d)),
            // Intact, but another key's record (copied or swapped over this one). Quarantine
            // the stored bytes as they are (compressed or not).
            Ok(_) => {
                let raw = self.backend.get(key).await?.unwrap_or_default();
                (StateError::corrupt(key, "record belongs to another key"), raw)
            }
            Err(failed) => failed,
        };
        warn!(key = %key, error = %e, "damaged record");
        self.quarantine(self.backend.as_ref(), key, raw).await;
        Err(e)
    }

    /// Keeps a copy of a damaged record in `quarantine/` (once per key and process).
    async fn quarantine(&self, backend: &dyn StorageBackend, key: &StorageKey, bytes: Vec<u8>) {
        if let Some((qk, bytes)) = self.quarantine_later(key, &bytes)
            && let Err(qe) = backend.put(&qk, bytes).await
        {
            warn!(key = %qk, error = %qe, "could not write quarantine copy");
        }
    }

    pub(crate) async fn load_session(&self, sid: &SessionId) -> Result<Option<Decoded>> {
        let key = session_key(&self.codec, sid);
        self.read(&key, |h| matches!(h, RecordHead::Session { session_id, .. } if session_id == sid)).await
    }

    pub(crate) async fn save_session(
        &self,
        sid: &SessionId,
        data: &[u8],
        saved_at: u64,
        meta: SessionMeta,
    ) -> Result<()> {
        let key = session_key(&self.codec, sid);
        let mut entry = RecordEntry::of(saved_at, 0, &meta);
        let head = RecordHead::Session { session_id: sid.clone(), saved_at, meta };
        entry.size = self.put(&key, &head, data).await?;
        lock(&self.quarantined).remove(&key);
        self.record(Change::saved(sid, entry)).await?;
        self.enforce_cap().await
    }

    pub(crate) async fn put_checkpoint(
        &self,
        sid: &SessionId,
        cid: &CheckpointId,
        branch: &BranchId,
        timestamp: u64,
        meta: CheckpointMeta,
        data: &[u8],
    ) -> Result<()> {
        let (r, step, parent) = (meta.reason, meta.step, meta.parent.clone());
        let head = RecordHead::Checkpoint {
            session_id: sid.clone(),
            checkpoint_id: cid.clone(),
            branch_id: branch.clone(),
            timestamp,
            meta,
        };
        let size = self.put(&checkpoint_key(&self.codec, sid, cid), &head, data).await?;
        self.record(Change::Checkpoint {
            sid: sid.clone(),
            cid: cid.clone(),
            b: branch.clone(),
            ts: timestamp,
            size,
            r,
            step,
            parent,
        })
        .await?;
        self.enforce_cap().await
    }

    pub(crate) async fn load_checkpoint(&self, sid: &SessionId, cid: &CheckpointId) -> Result<Option<Decoded>> {
        let key = checkpoint_key(&self.codec, sid, cid);
        self.read(&key, |h| {
            matches!(h, RecordHead::Checkpoint { session_id, checkpoint_id, .. } if session_id == sid && checkpoint_id == cid)
        })
        .await
    }

    pub(crate) async fn delete_checkpoint(&self, sid: &SessionId, cid: &CheckpointId) -> Result<bool> {
        let existed = self.backend.delete(&checkpoint_key(&self.codec, sid, cid)).await?;
        self.record(Change::CheckpointDeleted { sid: sid.clone(), cid: cid.clone() }).await?;
        Ok(existed)
    }

    /// Deletes a session's record and all its checkpoints. Crash-safe through a durable
    /// pending-delete marker written first and removed last: a delete interrupted by a crash
    /// is finished at the next start, so a session never comes back half-deleted.
    ///
    /// A delete that fails part way (an error, no crash) leaves the marker and some
    /// records, and the session in [`deleting`](Self::is_deleting): the session actor
    /// finishes the delete before the session's next write (or the write fails with the
    /// delete's error), vacuum and the next start finish it too. The owner's access record
    /// is still there, so the owner can retry.
    pub(crate) async fn delete_session(&self, sid: &SessionId) -> Result<bool> {
        // Nothing is deleted before the marker is durable; if it cannot be written, nothing
        // changed.
        self.backend.put(&pending_key(sid), Vec::new()).await?;
        self.finish_delete(sid).await
    }

    /// The part of a delete after its marker is durable: the records, the access record,
    /// then the marker. The session is `deleting` from here until the marker is gone; on an
    /// error it stays so (and the marker stays on disk), to be finished later.
    async fn finish_delete(&self, sid: &SessionId) -> Result<bool> {
        lock(&self.deleting).insert(sid.clone());
        let existed = self.delete_session_records(sid).await?;
        // Last: a crash before this unlink is durable finishes the delete at the next start.
        self.backend.delete(&pending_key(sid)).await?;
        lock(&self.deleting).remove(sid);
        Ok(existed)
    }

    /// Whether `sid` has a delete that failed part way and is not finished yet.
    pub(crate) fn is_deleting(&self, sid: &SessionId) -> bool {
        lock(&self.deleting).contains(sid)
    }

    /// The sessions with a delete that failed part way.
    pub(crate) fn deleting(&self) -> Vec<SessionId> {
        lock(&self.deleting).iter().cloned().collect()
    }

    async fn delete_session_records(&self, sid: &SessionId) -> Result<bool> {
        // The access record goes last: while records remain, the session exists, and its
        // owner must keep it (to retry a delete that failed), and no one else may claim it.
        // A crash in between is finished by the pending marker at the next start.
        let mut existed = self.backend.delete(&session_key(&self.codec, sid)).await?;
        self.record(Change::SessionDeleted { sid: sid.clone() }).await?;
        let prefix = StorageKey::from_valid(format!("checkpoints/{sid}"));
        for meta in self.backend.list(&prefix).await? {
            existed |= self.backend.delete(&meta.key).await?;
            if let Some(cid) = cid_from_name(meta.key.file_name(), &self.codec) {
                self.record(Change::CheckpointDeleted { sid: sid.clone(), cid }).await?;
            }
        }
        // Index entries whose files were already gone.
        let leftover: Vec<CheckpointId> =
            self.index().sessions.get(sid).map(|e| e.checkpoints.keys().cloned().collect()).unwrap_or_default();
        for cid in leftover {
            self.record(Change::CheckpointDeleted { sid: sid.clone(), cid }).await?;
        }
        {
            // Under the lock of access-record writers, so a re-encryption in flight cannot
            // put the record back.
            let _access = self.access_writes.lock().await;
            self.backend.delete(&access_key(sid)).await?;
        }
        self.access.remove(sid);
        Ok(existed)
    }

    /// Finishes the deletes whose pending markers are on disk (cut off by a crash, or
    /// failed part way). With `strict`, the first that fails again is the error; without,
    /// it is logged and its session stays marked (see [`delete_session`](Self::delete_session)).
    /// Returns how many were finished.
    async fn finish_pending_deletes(&self, strict: bool) -> Result<usize> {
        let pending = self.backend.list(&fixed(PENDING)).await?;
        let mut finished = 0;
        for meta in &pending {
            let Ok(sid) = SessionId::new(meta.key.file_name()) else {
                // Not a marker this crate writes: nothing to finish.
                self.backend.delete(&meta.key).await?;
                continue;
            };
            info!(session = %sid, "finishing an interrupted delete");
            match self.finish_delete(&sid).await {
                Ok(_) => finished += 1,
                Err(e) if strict => return Err(e),
                Err(e) => {
                    warn!(session = %sid, error = %e, "could not finish an interrupted delete; it is retried before the session's next write")
                }
            }
        }
        Ok(finished)
    }

    /// Brings the index in line with the records: drops entries whose record is gone,
    /// reads records it lacks or whose size differs. With `full`, reads every record.
    ///
    /// Holds the journal lock throughout, so writes finishing meanwhile record their change
    /// after the new index is in place (changes are idempotent, so none is lost or undone).
    pub(crate) async fn reconcile(&self, trust: Trust) -> Result<Reconciled> {
        let _guard = self.journal.lock().await;
        let full = trust == Trust::Nothing;
        let ext = self.codec.extension();
        let mut corrupt = Vec::new();
        let mut fresh = Index::default();
        let old = if full { Index::default() } else { self.index().clone() };
        // Anything short of full trust rewrites the journal, which also ends a torn tail.
        let mut changed = trust != Trust::Sizes;
        let mut reads = 0;

        for meta in self.backend.list(&fixed("sessions")).await? {
            let Some(sid) = meta.key.file_name().strip_suffix(ext).and_then(|s| SessionId::new(s).ok()) else {
                continue;
            };
            if let Some(r) = old.sessions.get(&sid).and_then(|e| e.record.clone())
                && r.size == meta.size
                && trust == Trust::Sizes
            {
                fresh.apply(&Change::saved(&sid, r));
                continue;
            }
            changed = true;
            reads += 1;
            match self.load_session(&sid).await {
                Ok(Some(d)) => {
                    if let RecordHead::Session { saved_at, meta: m, .. } = d.head {
                        fresh.apply(&Change::saved(&sid, RecordEntry::of(saved_at, meta.size, &m)));
                    }
                }
                Ok(None) => {}
                Err(StateError::Corrupt { key, .. }) => {
                    // Keep it listed: loading it reports the damage rather than "missing".
                    corrupt.push(key);
                    let r = RecordEntry::of(0, meta.size, &SessionMeta::default());
                    fresh.apply(&Change::saved(&sid, r));
                }
                Err(e) => return Err(e),
            }
        }
        for meta in self.backend.list(&fixed("checkpoints")).await? {
            let mut segs = meta.key.segments().skip(1);
            let (Some(s), Some(name), None) = (segs.next(), segs.next(), segs.next()) else { continue };
            let (Ok(sid), Some(cid)) = (SessionId::new(s), cid_from_name(name, &self.codec)) else { continue };
            if let Some(c) = old.sessions.get(&sid).and_then(|e| e.checkpoints.get(&cid))
                && c.size == meta.size
            {
                fresh.apply(&Change::checkpoint(&sid, &cid, c));
                continue;
            }
            changed = true;
            reads += 1;
            match self.load_checkpoint(&sid, &cid).await {
                Ok(Some(d)) => {
                    if let RecordHead::Checkpoint { branch_id, timestamp, meta: m, .. } = d.head {
                        let c = CpEntry {
                            branch: branch_id,
                            ts: timestamp,
                            size: meta.size,
                            reason: m.reason,
                            step: m.step,
                            parent: m.parent,
                        };
                        fresh.apply(&Change::checkpoint(&sid, &cid, &c));
                    }
                }
                Ok(None) => {}
                Err(StateError::Corrupt { key, .. }) => {
                    corrupt.push(key);
                    let c = CpEntry {
                        branch: BranchId::from_valid("unknown"),
                        ts: cid.timestamp_ms(),
                        size: meta.size,
                        reason: CheckpointReason::default(),
                        step: None,
                        parent: None,
                    };
                    fresh.apply(&Change::checkpoint(&sid, &cid, &c));
                }
                Err(e) => return Err(e),
            }
        }
        let entries = fresh.live_entries();
        // Entries read from records, plus entries dropped because their record is gone.
        let kept = entries - reads.min(entries);
        let repaired = if full { 0 } else { reads + old.live_entries().saturating_sub(kept) };
        if fresh.sessions != old.sessions {
            changed = true;
        }
        {
            let mut idx = self.index();
            fresh.journal_lines = idx.journal_lines;
            fresh.interrupted = std::mem::take(&mut idx.interrupted);
            *idx = fresh;
        }
        if changed {
            info!(entries, corrupt = corrupt.len(), "index reconciled with the records");
        }
        self.compact_locked(changed).await?;
        Ok(Reconciled { entries, repaired, corrupt })
    }

    /// Removes the checkpoints the retention policy condemns: beyond the per-session limit,
    /// older than the age limit (sparing each session's newest), and, while the store is
    /// over its byte cap, the oldest across sessions (again sparing each newest). Safe
    /// without the session actors: they never cache checkpoints, and deleting is
    /// idempotent. (Idle sessions are removed by the janitor through the session actors,
    /// which cache.) Returns how many checkpoints went and their bytes.
    pub(crate) async fn trim_checkpoints(&self) -> Result<(usize, u64)> {
        let _one = self.evicting.lock().await;
        let policy = &self.retention;
        let now = self.clock.now_ms();
        let age_cutoff = policy.max_checkpoint_age.map(|a| now.saturating_sub(a.as_millis() as u64));
        let doomed: Vec<(SessionId, CheckpointId, u64)> = {
            let idx = self.index();
            let mut doomed = Vec::new();
            let mut spare = Vec::new();
            for (sid, e) in &idx.sessions {
                let excess = policy.keep_checkpoints.map_or(0, |k| e.checkpoints.len().saturating_sub(k));
                let newest = e.checkpoints.keys().next_back();
                for (i, (cid, c)) in e.checkpoints.iter().enumerate() {
                    let is_newest = Some(cid) == newest;
                    let too_old = age_cutoff.is_some_and(|cut| c.ts < cut) && !is_newest;
                    if i < excess || too_old {
                        doomed.push((sid.clone(), cid.clone(), c.size));
                    } else if !is_newest {
                        spare.push((c.ts, cid.clone(), sid.clone(), c.size));
                    }
                }
            }
            if let Some(cap) = policy.max_total_bytes {
                let mut total = idx.total_bytes - doomed.iter().map(|d| d.2).sum::<u64>();
                spare.sort();
                for (_, cid, sid, size) in spare {
                    if total <= cap {
                        break;
                    }
                    total -= size;
                    doomed.push((sid, cid, size));
                }
            }
            doomed
        };
        let (mut n, mut bytes) = (0, 0);
        for (sid, cid, size) in doomed {
            if self.delete_checkpoint(&sid, &cid).await? {
                n += 1;
                bytes += size;
            }
        }
        if n > 0 {
            debug!(checkpoints = n, bytes, "retention removed checkpoints");
        }
        Ok((n, bytes))
    }

    /// After a write: if the store is over its byte cap, evict now.
    async fn enforce_cap(&self) -> Result<()> {
        if self.retention.max_total_bytes.is_some_and(|cap| self.index().total_bytes > cap) {
            self.trim_checkpoints().await?;
        }
        Ok(())
    }

    /// Sweeps staged files, finishes interrupted deletes and rebuilds the index from every
    /// record.
    pub(crate) async fn vacuum(&self) -> Result<VacuumReport> {
        let swept = self.backend.sweep().await?;
        let orphans = self.finish_pending_deletes(true).await?;
        let r = self.reconcile(Trust::Nothing).await?;
        Ok(VacuumReport {
            temp_files_removed: swept.files_removed,
            temp_bytes_freed: swept.bytes_freed,
            orphans_removed: orphans,
            index_entries: r.entries,
            corrupt_records: r.corrupt,
            ..Default::default()
        })
    }
}

pub(crate) fn cid_from_name(name: &str, codec: &Codec) -> Option<CheckpointId> {
    name.strip_suffix(codec.extension()).and_then(|s| CheckpointId::parse(s).ok())
}

impl Compression {
    /// Checks a gzip level from the builder.
    pub(crate) fn gzip(level: u32) -> Result<Compression> {
        if (1..=9).contains(&level) {
            Ok(Compression::Gzip(level))
        } else {
            Err(StateError::Config { message: format!("compression level {level} is not in 1..=9") })
        }
    }
}
