//! The store: typed loads and saves of session records and checkpoints over a backend,
//! with the codec and the index. Every record operation of the crate goes through here,
//! called from the session actors, the storage actor's tasks and the manager (and once from
//! start-up).
//!
//! This module owns [`Store`]: opening a store (format check, journal replay, interrupted
//! deletes, reconcile, the running marker) and closing it, reading and writing records
//! (encode, put with the disk-full rule, decode and verify), deleting sessions crash-safely,
//! the access records' persistence and the index journal. It may call the backend (through
//! the middleware it was given), its submodules, the access table and the lock helper. The
//! submodules: [`keys`] (every key name, and the key classes), [`codec`] (record bytes),
//! [`index`] (the index and its journal), `format` (`metadata/store.json`) and
//! `maintenance` (reconcile, retention, vacuum, quarantine, re-encryption).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, info, warn};

use crate::access::{AccessControlLayer, AccessRecord, AccessTable};
use crate::backend::{Fence, RecordMeta, StorageBackend, StorageKey};
use crate::error::{Result, StateError};

use crate::sync::lock;
use crate::types::{BranchId, CheckpointId, Clock, SessionId, SessionStatus};

pub(crate) mod codec;
mod copy;
mod dump;
mod format;
pub(crate) mod index;
mod journal;
pub(crate) mod keys;
mod maintenance;
mod verify;

use codec::{CheckpointMeta, Codec, Decoded, RecordHead, SessionMeta};
pub use copy::{CopyReport, copy_store, copy_store_with_progress};
pub use dump::{DUMP_FORMAT_VERSION, ExportOptions, ExportReport, ImportReport};
#[cfg(feature = "encryption")]
pub(crate) use format::read_store_meta;
use index::{Change, CheckpointEntry, Index, RecordEntry};
pub use maintenance::RetentionPolicy;
pub(crate) use maintenance::Trust;
pub use verify::{DamagedRecord, RecordKind, VerifyReport};

/// The store of one manager (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) backend: Arc<dyn StorageBackend>,
    /// The backend under the middleware (for quarantine copies of records the middleware
    /// refused), when there is middleware.
    below: Option<Arc<dyn StorageBackend>>,
    pub(crate) codec: Codec,
    index: Mutex<Index>,
    /// Serializes index changes (and the queueing of their journal lines) with journal
    /// snapshots.
    journal: tokio::sync::Mutex<()>,
    /// Appends journal lines off the writes' path.
    journal_writer: Arc<journal::Journal>,
    quarantined: Mutex<HashSet<StorageKey>>,
    pub(crate) retention: RetentionPolicy,
    pub(crate) clock: Clock,
    pub(crate) access: AccessTable,
    /// One eviction pass at a time (passes triggered by concurrent writes would otherwise
    /// pick the same victims and overshoot).
    evicting: tokio::sync::Mutex<()>,
    /// Sessions whose delete failed part way (its pending marker is still on disk). The
    /// session actor finishes the delete before the session's next write, so an old
    /// marker can never be replayed over a newer save.
    deleting: Mutex<HashSet<SessionId>>,
    /// Serializes access-record writes with their re-encryption (a get and a put), so a
    /// grant made meanwhile is not overwritten by the older record.
    access_writes: tokio::sync::Mutex<()>,
    /// Whether other nodes may write to this store ([`StorageBackend::shared`]): then there
    /// is no index journal and no running marker (each node's index is its own view,
    /// refreshed from the records), and every write of a session carries its lease's fence.
    pub(crate) shared: bool,
    /// The fence of every session whose lease this node's session actor holds (set and
    /// removed by that actor only). Every write of the session's keys carries it, so once
    /// another node was granted the lease, this node's writes are refused by the backend.
    fences: Mutex<HashMap<SessionId, Fence>>,
    /// Sessions (of a shared store) a write of which timed out: it may or may not have been
    /// stored, so what this node knows of them is read again from the records before its
    /// next use ([`refresh_session`](Self::refresh_session) clears the mark).
    unsure: Mutex<HashSet<SessionId>>,
    /// Opened read-only ([`StateManagerBuilder::read_only`](crate::StateManagerBuilder::read_only)):
    /// the open writes nothing (no format descriptor, sweep, finished deletes, journal
    /// rewrite or running marker), nor does anything after it that would on its own (journal
    /// appends and compaction, quarantine copies, the clean snapshot at close). The backend
    /// below refuses every other write.
    pub(crate) read_only: bool,
}

/// What becomes of a session's access record: in a delete, and in a refresh that finds no
/// record on the store ([`Store::refresh_access`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AccessRule {
    /// Removed (a delete asked for; a refresh under the session's lease).
    Remove,
    /// Kept (a write finishing a delete that failed part way; a refresh before an access
    /// check, which may race this node's own claim being written).
    Keep,
}

impl Store {
    /// Opens the store: checks its format, sweeps staged files, loads and reconciles the
    /// index, and finishes deletes a crash interrupted.
    ///
    /// With `read_only`, nothing is written: the format descriptor must be there already,
    /// nothing is swept, deletes left part way are only noted (as on a shared store), the
    /// journal is not rewritten, the running marker is neither written nor read (a holder
    /// that is running has it; its sessions are not cut off), so no session is marked
    /// interrupted. Either way, a store holding the marker of an unfinished copy is refused.
    pub(crate) async fn open(
        backend: Arc<dyn StorageBackend>,
        mut codec: Codec,
        retention: RetentionPolicy,
        access: AccessControlLayer,
        below: Option<Arc<dyn StorageBackend>>,
        read_only: bool,
    ) -> Result<Store> {
        // A half copy is no store, for a reader as much as for a writer: read, it would
        // show some sessions and checkpoints and silently miss others.
        if backend.get(&keys::copying()).await?.is_some() {
            return Err(StateError::Config {
                message: "the store is the destination of a copy that did not finish \
                          (metadata/copying is there): run copy_store again to finish it"
                    .into(),
            });
        }
        if read_only {
            return Store::open_read_only(backend, codec, retention, access, below).await;
        }
        format::check_or_create(backend.as_ref(), &mut codec).await?;
        let swept = backend.sweep().await?;
        if swept.files_removed > 0 {
            info!(
                files = swept.files_removed,
                bytes = swept.bytes_freed,
                "removed staged files of interrupted writes"
            );
        }
        let store = Store::new(backend, codec, retention, below, false);
        let access = store.load_access(access).await?;
        let store = Store { access, ..store };
        if store.shared {
            store.open_shared().await?;
            return Ok(store);
        }
        let replayed = match store.backend.get(&keys::journal()).await {
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
        let running_key = keys::running();
        let died = store.backend.get(&running_key).await.map(|m| m.is_some()).unwrap_or(true);
        store.backend.put(&running_key, Vec::new()).await?;
        if died {
            let mut idx = store.index();
            let running: HashSet<SessionId> = idx
                .sessions
                .iter()
                .filter(|(_, e)| {
                    e.record.as_ref().is_some_and(|r| r.status == SessionStatus::Running)
                })
                .map(|(s, _)| s.clone())
                .collect();
            // With those a clean restart kept from an earlier crash (still not saved since).
            idx.interrupted.extend(running);
        }
        Ok(store)
    }

    /// A store over `backend` with an empty index, before anything is read.
    fn new(
        backend: Arc<dyn StorageBackend>,
        codec: Codec,
        retention: RetentionPolicy,
        below: Option<Arc<dyn StorageBackend>>,
        read_only: bool,
    ) -> Store {
        Store {
            shared: backend.shared() && !read_only,
            fences: Mutex::new(HashMap::new()),
            unsure: Mutex::new(HashSet::new()),
            journal_writer: Arc::new(journal::Journal::new(backend.clone())),
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
            deleting: Mutex::new(HashSet::new()),
            access_writes: tokio::sync::Mutex::new(()),
            read_only,
        }
    }

    /// [`open`](Self::open) with `read_only`: reads the format descriptor, the access
    /// records, the journal (on a store with one writer) and the records, and writes
    /// nothing.
    async fn open_read_only(
        backend: Arc<dyn StorageBackend>,
        mut codec: Codec,
        retention: RetentionPolicy,
        access: AccessControlLayer,
        below: Option<Arc<dyn StorageBackend>>,
    ) -> Result<Store> {
        match format::read_store_meta(backend.as_ref()).await? {
            Some(meta) => {
                meta.check(&codec)?;
                meta.adopt_format(&mut codec);
            }
            None => {
                return Err(StateError::Config {
                    message: "no mars-state store there (metadata/store.json is missing); a \
                              read-only open creates nothing"
                        .into(),
                });
            }
        }
        let store = Store::new(backend, codec, retention, below, true);
        let access = store.load_access(access).await?;
        let store = Store { access, ..store };
        // A journal that says it is clean (its holder shut down) is taken on the sizes of
        // the records; otherwise every session record is read. Checkpoint records never
        // change, so their journal entries are trusted when the sizes agree.
        let (loaded, clean) = match store.backend.get(&keys::journal()).await {
            Ok(journal) => Index::replay(&journal.unwrap_or_default()),
            Err(StateError::Corrupt { .. }) => None,
            Err(e) => return Err(e),
        }
        .unwrap_or_default();
        *store.index() = loaded;
        store.reconcile(if clean { Trust::Sizes } else { Trust::Checkpoints }).await?;
        let pending = store.backend.list(&keys::pending_markers()).await?;
        lock(&store.deleting)
            .extend(pending.iter().filter_map(|m| SessionId::new(m.key.file_name()).ok()));
        Ok(store)
    }

    /// The rest of [`open`](Self::open) on a shared store: the index is read from the
    /// records (other nodes write them; no journal is kept), and deletes other nodes left
    /// part way are only noted: the session actor that next takes the session's lease
    /// finishes them (finishing one here could race its owner's writes).
    async fn open_shared(&self) -> Result<()> {
        self.reconcile(Trust::Nothing).await?;
        self.load_interrupted_marks().await?;
        self.note_pending_deletes().await
    }

    /// On a shared store, notes the sessions whose pending-delete markers are on the store
    /// (deletes left part way by any node) as `deleting`: the node that next holds such a
    /// session's lease finishes the delete before it writes. A no-op on a store with one
    /// writer, which finishes them itself.
    pub(crate) async fn note_pending_deletes(&self) -> Result<()> {
        if !self.shared {
            return Ok(());
        }
        let pending = self.backend.list(&keys::pending_markers()).await?;
        let mut deleting = lock(&self.deleting);
        for meta in pending {
            if let Ok(sid) = SessionId::new(meta.key.file_name()) {
                deleting.insert(sid);
            }
        }
        Ok(())
    }

    /// On a shared store, the sessions marked interrupted are those with a mark on the
    /// store (written by the node that took a session over from a lapsed holder, removed by
    /// the session's next save or its delete): read them into the index.
    pub(crate) async fn load_interrupted_marks(&self) -> Result<()> {
        let marks = self.backend.list(&keys::interrupted_marks()).await?;
        let marked: HashSet<SessionId> =
            marks.iter().filter_map(|m| SessionId::new(m.key.file_name()).ok()).collect();
        self.index().interrupted = marked;
        Ok(())
    }

    /// Sets (`Some`) or removes the fence this node's writes of `sid` carry (by the session
    /// actor that holds, or gave up, the session's lease).
    pub(crate) fn set_fence(&self, sid: &SessionId, fence: Option<Fence>) {
        let mut fences = lock(&self.fences);
        match fence {
            Some(f) => {
                fences.insert(sid.clone(), f);
            }
            None => {
                fences.remove(sid);
            }
        }
    }

    fn fence(&self, sid: &SessionId) -> Option<Fence> {
        lock(&self.fences).get(sid).cloned()
    }

    /// Writes a key of session `sid`: under the session's fence while this node holds its
    /// lease, else a plain write (a store with one writer, or maintenance of a session no
    /// actor of this node holds).
    async fn put_as(
        &self,
        sid: &SessionId,
        key: &StorageKey,
        bytes: Vec<u8>,
        meta: Option<&RecordMeta>,
    ) -> Result<()> {
        let r = match (self.fence(sid), meta) {
            (Some(f), Some(m)) => self.backend.put_fenced(key, bytes, m, &f).await,
            (Some(f), None) => {
                self.backend.put_fenced(key, bytes, &RecordMeta::default(), &f).await
            }
            (None, Some(m)) => self.backend.put_record(key, bytes, m).await,
            (None, None) => self.backend.put(key, bytes).await,
        };
        self.note_outcome(sid, &r);
        r
    }

    /// Deletes a key of session `sid`, fenced as [`put_as`](Self::put_as) writes.
    async fn delete_as(&self, sid: &SessionId, key: &StorageKey) -> Result<bool> {
        let r = match self.fence(sid) {
            Some(f) => self.backend.delete_fenced(key, &f).await,
            None => self.backend.delete(key).await,
        };
        self.note_outcome(sid, &r);
        r
    }

    /// On a shared store, a write of `sid` whose outcome is unknown (it timed out) makes
    /// this node's view of the session unsure until it is read again.
    fn note_outcome<T>(&self, sid: &SessionId, r: &Result<T>) {
        if self.shared && matches!(r, Err(StateError::Timeout { .. })) {
            lock(&self.unsure).insert(sid.clone());
        }
    }

    /// Whether a write of `sid` timed out since this node last read it (see `unsure`).
    pub(crate) fn is_unsure(&self, sid: &SessionId) -> bool {
        lock(&self.unsure).contains(sid)
    }

    /// On a shared store, brings this node's view of `sid` up to date with the records
    /// (other nodes may have written it): its index entry (the session record read again,
    /// checkpoints read where new or changed, entries of removed ones dropped), its access
    /// record, and whether a delete of it was left part way. With `taken_over`, the node
    /// that held the session's lease let it expire: a session it left running was cut off
    /// and is marked interrupted. A no-op on a store with one writer.
    pub(crate) async fn refresh_session(&self, sid: &SessionId, taken_over: bool) -> Result<()> {
        if !self.shared {
            return Ok(());
        }
        let _guard = self.journal.lock().await;
        // Cleared first: a write that times out while this runs marks it again.
        lock(&self.unsure).remove(sid);
        let record = match self.load_session(sid).await {
            Ok(Some(d)) => match &d.head {
                RecordHead::Session { saved_at, meta, .. } => {
                    Some(RecordEntry::of(*saved_at, d.bytes.len() as u64, meta))
                }
                RecordHead::Checkpoint { .. } => None,
            },
            Ok(None) => None,
            Err(StateError::Corrupt { .. }) => Some(RecordEntry::of(0, 0, &SessionMeta::default())),
            Err(e) => return Err(e),
        };
        let listed = self.backend.list(&keys::checkpoints_of(sid)).await?;
        let known: HashMap<CheckpointId, u64> = self
            .index()
            .sessions
            .get(sid)
            .map(|e| e.checkpoints.iter().map(|(c, e)| (c.clone(), e.size_bytes)).collect())
            .unwrap_or_default();
        let mut changes = Vec::new();
        let mut present = HashSet::new();
        for meta in listed {
            let Some((_, cid)) = keys::checkpoint_of(&meta.key, self.codec.extension()) else {
                continue;
            };
            present.insert(cid.clone());
            if known.get(&cid) == Some(&meta.size) {
                continue;
            }
            let entry = match self.load_checkpoint(sid, &cid).await {
                Ok(Some(d)) => match d.head {
                    RecordHead::Checkpoint { branch_id, timestamp, meta: m, .. } => {
                        CheckpointEntry::of(branch_id, timestamp, meta.size, &m)
                    }
                    RecordHead::Session { .. } => continue,
                },
                Ok(None) => continue,
                Err(StateError::Corrupt { .. }) => CheckpointEntry::damaged(&cid, meta.size),
                Err(e) => return Err(e),
            };
            changes.push(Change::checkpoint(sid, &cid, &entry));
        }
        for cid in known.keys().filter(|c| !present.contains(*c)) {
            changes.push(Change::CheckpointDeleted { sid: sid.clone(), cid: cid.clone() });
        }
        self.refresh_access(sid, AccessRule::Remove).await?;
        let pending = self.backend.get(&keys::pending(sid)).await?.is_some();
        let running = record.as_ref().is_some_and(|r| r.status == SessionStatus::Running);
        let cut_off = if taken_over && running {
            // Durable, so the mark outlives this node: until the session is saved again,
            // every node's listing and recovery say its run was cut off.
            self.put_as(sid, &keys::interrupted(sid), Vec::new(), None).await?;
            true
        } else {
            self.backend.get(&keys::interrupted(sid)).await?.is_some()
        };
        let mut idx = self.index();
        match record {
            Some(r) => idx.apply(&Change::saved(sid, r)),
            None => idx.apply(&Change::SessionDeleted { sid: sid.clone() }),
        }
        for change in &changes {
            idx.apply(change);
        }
        if cut_off {
            idx.interrupted.insert(sid.clone());
        } else {
            idx.interrupted.remove(sid);
        }
        drop(idx);
        if pending {
            lock(&self.deleting).insert(sid.clone());
        } else {
            lock(&self.deleting).remove(sid);
        }
        Ok(())
    }

    /// On a shared store, reads `sid`'s access record again (another node may have claimed
    /// the session, or granted or revoked access). A record this node cannot read leaves
    /// the session to administrators, as at open. With `Keep`, a record this node has but
    /// the store does not stays (it may be a claim of this node being written; a session
    /// deleted elsewhere is then refused to others until this node takes its lease, which
    /// reads again with `Remove`). A no-op on a store with one writer.
    pub(crate) async fn refresh_access(&self, sid: &SessionId, missing: AccessRule) -> Result<()> {
        if !self.shared {
            return Ok(());
        }
        let parsed = match self.backend.get(&keys::access(sid)).await {
            Ok(None) => None,
            Ok(Some(bytes)) => Some(serde_json::from_slice::<AccessRecord>(&bytes).ok()),
            Err(StateError::Corrupt { .. } | StateError::WrongKey { .. }) => Some(None),
            Err(e) => return Err(e),
        };
        match parsed {
            Some(Some(record)) => {
                self.access.remove(sid);
                self.access.set(sid, record);
            }
            Some(None) => self.access.set_unreadable(sid),
            None if missing == AccessRule::Remove => self.access.remove(sid),
            None => {}
        }
        Ok(())
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
                Ok(Some(bytes)) => {
                    serde_json::from_slice::<AccessRecord>(&bytes).map_err(|e| e.to_string())
                }
                Ok(None) => continue,
                Err(e @ (StateError::Corrupt { .. } | StateError::WrongKey { .. })) => {
                    Err(e.to_string())
                }
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
            .list(&keys::access_records())
            .await?
            .into_iter()
            .filter_map(|meta| Some((keys::access_of(&meta.key)?, meta.key)))
            .collect())
    }

    /// `sessions/<sid><ext>` in this store's record format.
    fn session_key(&self, sid: &SessionId) -> StorageKey {
        keys::session(sid, self.codec.extension())
    }

    /// `checkpoints/<sid>/<cid><ext>` in this store's record format.
    fn checkpoint_key(&self, sid: &SessionId, cid: &CheckpointId) -> StorageKey {
        keys::checkpoint(sid, cid, self.codec.extension())
    }

    /// Persists a session's access record (durably, before the request it guards goes on).
    pub(crate) async fn put_access(&self, sid: &SessionId, record: &AccessRecord) -> Result<()> {
        let bytes = serde_json::to_vec(record).map_err(|e| StateError::json(sid.as_str(), &e))?;
        let _access = self.access_writes.lock().await;
        self.put_as(sid, &keys::access(sid), bytes, None).await
    }

    /// Writes the journal as a clean snapshot. Called at shutdown, after every write has
    /// finished; the next start then trusts it without reading any record.
    pub(crate) async fn close(&self) -> Result<()> {
        if self.shared || self.read_only {
            // No journal and no marker on a shared store: other nodes go on using it. A
            // read-only store writes nothing, and its holder keeps the journal.
            return Ok(());
        }
        let _guard = self.journal.lock().await;
        let (bytes, n) = self.index().snapshot(true);
        // The clean snapshot first, durably (an atomic put), the marker second: a crash in
        // between leaves the marker, so the next start treats the run as cut off and
        // re-reads session records rather than trusting a journal it cannot vouch for.
        self.journal_writer.replace(bytes).await?;
        self.index().journal_lines = n;
        self.backend.delete(&keys::running()).await?;
        Ok(())
    }

    pub(crate) fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    pub(super) async fn record(&self, change: Change) -> Result<()> {
        let appender = {
            let _guard = self.journal.lock().await;
            self.index().apply(&change);
            if self.shared || self.read_only {
                return Ok(());
            }
            self.index().journal_lines += 1;
            // Queued in the order of the changes, under the lock; appended after it.
            self.journal_writer.queue(&Index::line(&change))
        };
        // The journal write is best effort: the record is already durable, and the index
        // is reconciled against the records at the next start if the line is lost.
        if appender {
            self.journal_writer.append().await;
        }
        Ok(())
    }

    /// Rewrites the journal as one line per live entry (atomic put), if it has grown past
    /// twice the live entries, or always when `force`.
    pub(super) async fn compact_locked(&self, force: bool) -> Result<()> {
        if self.shared || self.read_only {
            return Ok(());
        }
        let (bytes, n) = {
            let idx = self.index();
            if !force && idx.journal_lines <= 2 * idx.live_entries() + 64 {
                return Ok(());
            }
            idx.snapshot(false)
        };
        self.journal_writer.replace(bytes).await?;
        self.index().journal_lines = n;
        debug!(entries = n, "index journal compacted");
        Ok(())
    }

    /// Encodes and puts a record with the disk-full rule: on ENOSPC, sweep staged files and
    /// trim checkpoints past the retention limit once, then retry. Returns the stored size.
    /// (The retry encodes again rather than keeping a copy of every record just in case.)
    async fn put(
        &self,
        sid: &SessionId,
        key: &StorageKey,
        head: &RecordHead,
        data: &[u8],
    ) -> Result<u64> {
        let bytes = self.codec.encode(head, data)?;
        let size = bytes.len() as u64;
        let facts = head.facts();
        match self.put_as(sid, key, bytes, Some(&facts)).await {
            Err(StateError::StorageFull { .. }) => {
                warn!(key = %key, "disk full; running an emergency cleanup and retrying once");
                let _ = self.backend.sweep().await;
                let _ = self.trim_checkpoints().await;
                self.put_as(sid, key, self.codec.encode(head, data)?, Some(&facts)).await?;
            }
            other => other?,
        }
        Ok(size)
    }

    /// Reads and verifies a record. Damage is an error naming the key; a copy of the damaged
    /// bytes goes to `quarantine/` (the record itself stays in place for inspection).
    async fn read(
        &self,
        key: &StorageKey,
        belongs: impl Fn(&RecordHead) -> bool,
    ) -> Result<Option<Decoded>> {
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

    pub(crate) async fn load_session(&self, sid: &SessionId) -> Result<Option<Decoded>> {
        let key = self.session_key(sid);
        self.read(
            &key,
            |h| matches!(h, RecordHead::Session { session_id, .. } if session_id == sid),
        )
        .await
    }

    pub(crate) async fn save_session(
        &self,
        sid: &SessionId,
        data: &[u8],
        saved_at: u64,
        meta: SessionMeta,
    ) -> Result<()> {
        let key = self.session_key(sid);
        let mut entry = RecordEntry::of(saved_at, 0, &meta);
        let head = RecordHead::Session { session_id: sid.clone(), saved_at, meta };
        entry.size = self.put(sid, &key, &head, data).await?;
        lock(&self.quarantined).remove(&key);
        let marked = self.shared && self.index().interrupted.contains(sid);
        self.record(Change::saved(sid, entry)).await?;
        if marked {
            // After the save: a crash in between leaves the mark (the run is reported cut
            // off once more), never a cut-off run without one.
            self.delete_as(sid, &keys::interrupted(sid)).await?;
        }
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
        let mut entry = CheckpointEntry::of(branch.clone(), timestamp, 0, &meta);
        let head = RecordHead::Checkpoint {
            session_id: sid.clone(),
            checkpoint_id: cid.clone(),
            branch_id: branch.clone(),
            timestamp,
            meta,
        };
        entry.size_bytes = self.put(sid, &self.checkpoint_key(sid, cid), &head, data).await?;
        self.record(Change::checkpoint(sid, cid, &entry)).await?;
        self.enforce_cap().await
    }

    pub(crate) async fn load_checkpoint(
        &self,
        sid: &SessionId,
        cid: &CheckpointId,
    ) -> Result<Option<Decoded>> {
        let key = self.checkpoint_key(sid, cid);
        self.read(&key, |h| {
            matches!(h, RecordHead::Checkpoint { session_id, checkpoint_id, .. } if session_id == sid && checkpoint_id == cid)
        })
        .await
    }

    pub(crate) async fn delete_checkpoint(
        &self,
        sid: &SessionId,
        cid: &CheckpointId,
    ) -> Result<bool> {
        let existed = self.delete_as(sid, &self.checkpoint_key(sid, cid)).await?;
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
    /// Deletes the session's records and its access record. `Access::Keep` keeps the
    /// access record: a write authorized against it finishes an earlier delete that failed
    /// part way, and the session stays its owner's (a crash before the marker is gone
    /// finishes the delete at the next start, access record included, as it was asked).
    pub(crate) async fn delete_session(&self, sid: &SessionId, access: AccessRule) -> Result<bool> {
        // Nothing is deleted before the marker is durable; if it cannot be written, nothing
        // changed.
        self.put_as(sid, &keys::pending(sid), Vec::new(), None).await?;
        self.finish_delete(sid, access).await
    }

    /// The part of a delete after its marker is durable: the records, the access record
    /// (unless kept), then the marker. The session is `deleting` from here until the marker
    /// is gone; on an error it stays so (and the marker stays on disk), to be finished later.
    async fn finish_delete(&self, sid: &SessionId, access: AccessRule) -> Result<bool> {
        lock(&self.deleting).insert(sid.clone());
        let existed = self.delete_session_records(sid, access).await?;
        // Last: a crash before this unlink is durable finishes the delete at the next start.
        self.delete_as(sid, &keys::pending(sid)).await?;
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

    async fn delete_session_records(&self, sid: &SessionId, access: AccessRule) -> Result<bool> {
        // The access record goes last: while records remain, the session exists, and its
        // owner must keep it (to retry a delete that failed), and no one else may claim it.
        // A crash in between is finished by the pending marker at the next start.
        let mut existed = self.delete_as(sid, &self.session_key(sid)).await?;
        self.record(Change::SessionDeleted { sid: sid.clone() }).await?;
        if self.shared {
            self.delete_as(sid, &keys::interrupted(sid)).await?;
        }
        for meta in self.backend.list(&keys::checkpoints_of(sid)).await? {
            existed |= self.delete_as(sid, &meta.key).await?;
            if let Some(cid) = keys::checkpoint_id_of(meta.key.file_name(), self.codec.extension())
            {
                self.record(Change::CheckpointDeleted { sid: sid.clone(), cid }).await?;
            }
        }
        // Index entries whose files were already gone.
        let leftover: Vec<CheckpointId> = self
            .index()
            .sessions
            .get(sid)
            .map(|e| e.checkpoints.keys().cloned().collect())
            .unwrap_or_default();
        for cid in leftover {
            self.record(Change::CheckpointDeleted { sid: sid.clone(), cid }).await?;
        }
        if access == AccessRule::Remove {
            // Under the lock of access-record writers, so a re-encryption in flight cannot
            // put the record back.
            let _access = self.access_writes.lock().await;
            self.delete_as(sid, &keys::access(sid)).await?;
            drop(_access);
            self.access.remove(sid);
        }
        Ok(existed)
    }
}
