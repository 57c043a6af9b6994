//! Keeping the store in line with its records: reconcile, retention, vacuum, quarantine and
//! re-encryption. This file owns the passes that run over the whole store rather than one
//! write: reconciling the index with a listing of the records (the session pass, the
//! checkpoint pass, then putting the new index in place), finishing interrupted deletes,
//! the retention policy ([`RetentionPolicy`]: `trim_checkpoints`, and `enforce_cap` after a
//! write), vacuum, quarantine copies of damaged records, and the re-encryption passes. It
//! calls the [`Store`]'s backend, its record reads and deletes, the index and the key
//! layout.

use tracing::{debug, info, warn};

use super::codec::{RecordHead, SessionMeta};
use super::index::{Change, CheckpointEntry, Index, RecordEntry};
use super::{Store, keys};
use crate::backend::{ObjectMeta, StorageBackend, StorageKey};
use crate::error::{Result, StateError};
use crate::sync::lock;
use crate::types::{CheckpointId, SessionId, VacuumReport};

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

/// A reconcile in progress: the index being built and what was found on the way.
struct Pass {
    trust: Trust,
    /// The index before (empty when nothing is trusted).
    old: Index,
    fresh: Index,
    corrupt: Vec<String>,
    /// Records read (rather than taken from `old`).
    reads: usize,
    /// Whether the journal must be rewritten.
    changed: bool,
}

impl Pass {
    /// A record not taken on trust: it is read.
    fn read_one(&mut self) {
        self.changed = true;
        self.reads += 1;
    }
}

impl Store {
    /// Brings the index in line with the records: drops entries whose record is gone,
    /// reads records it lacks or whose size differs, or (as `trust` says) every record.
    ///
    /// Holds the journal lock throughout, so writes finishing meanwhile record their change
    /// after the new index is in place (changes are idempotent, so none is lost or undone).
    pub(crate) async fn reconcile(&self, trust: Trust) -> Result<Reconciled> {
        let _guard = self.journal.lock().await;
        let old = if trust == Trust::Nothing { Index::default() } else { self.index().clone() };
        let mut pass = Pass {
            trust,
            old,
            fresh: Index::default(),
            corrupt: Vec::new(),
            reads: 0,
            // Anything short of full trust rewrites the journal, which also ends a torn tail.
            changed: trust != Trust::Sizes,
        };
        for meta in self.backend.list(&keys::sessions()).await? {
            self.reconcile_session(&mut pass, meta).await?;
        }
        for meta in self.backend.list(&keys::checkpoints()).await? {
            self.reconcile_checkpoint(&mut pass, meta).await?;
        }
        self.install(pass).await
    }

    /// On a shared store, brings this node's whole index up to date with the records other
    /// nodes wrote (session records read again, checkpoints read where new). A no-op on a
    /// store with one writer, whose index is always current.
    pub(crate) async fn refresh_all(&self) -> Result<()> {
        if self.shared {
            self.reconcile(Trust::Checkpoints).await?;
            self.load_interrupted_marks().await?;
        }
        Ok(())
    }

    /// The session pass: one listed session record into the new index, from the old entry
    /// when trusted and of the same size, else read from the record. A damaged record stays
    /// listed, so loading it reports the damage rather than "missing".
    async fn reconcile_session(&self, pass: &mut Pass, meta: ObjectMeta) -> Result<()> {
        let Some(sid) = keys::session_of(&meta.key, self.codec.extension()) else { return Ok(()) };
        if let Some(r) = pass.old.sessions.get(&sid).and_then(|e| e.record.clone())
            && r.size == meta.size
            && pass.trust == Trust::Sizes
        {
            pass.fresh.apply(&Change::saved(&sid, r));
            return Ok(());
        }
        pass.read_one();
        let entry = match self.load_session(&sid).await {
            Ok(Some(d)) => match d.head {
                RecordHead::Session { saved_at, meta: m, .. } => {
                    RecordEntry::of(saved_at, meta.size, &m)
                }
                RecordHead::Checkpoint { .. } => return Ok(()),
            },
            Ok(None) => return Ok(()),
            Err(StateError::Corrupt { key, .. }) => {
                pass.corrupt.push(key);
                RecordEntry::of(0, meta.size, &SessionMeta::default())
            }
            Err(e) => return Err(e),
        };
        pass.fresh.apply(&Change::saved(&sid, entry));
        Ok(())
    }

    /// The checkpoint pass: one listed checkpoint record into the new index (checkpoint
    /// records never change, so an old entry of the same size is always trusted).
    async fn reconcile_checkpoint(&self, pass: &mut Pass, meta: ObjectMeta) -> Result<()> {
        let Some((sid, cid)) = keys::checkpoint_of(&meta.key, self.codec.extension()) else {
            return Ok(());
        };
        if let Some(c) = pass.old.sessions.get(&sid).and_then(|e| e.checkpoints.get(&cid))
            && c.size_bytes == meta.size
        {
            pass.fresh.apply(&Change::checkpoint(&sid, &cid, c));
            return Ok(());
        }
        pass.read_one();
        let entry = match self.load_checkpoint(&sid, &cid).await {
            Ok(Some(d)) => match d.head {
                RecordHead::Checkpoint { branch_id, timestamp, meta: m, .. } => {
                    CheckpointEntry::of(branch_id, timestamp, meta.size, &m)
                }
                RecordHead::Session { .. } => return Ok(()),
            },
            Ok(None) => return Ok(()),
            Err(StateError::Corrupt { key, .. }) => {
                pass.corrupt.push(key);
                CheckpointEntry::damaged(&cid, meta.size)
            }
            Err(e) => return Err(e),
        };
        pass.fresh.apply(&Change::checkpoint(&sid, &cid, &entry));
        Ok(())
    }

    /// The last step: the new index replaces the old one (keeping the journal's line count
    /// and the interrupted sessions), and the journal is rewritten if anything changed.
    async fn install(&self, pass: Pass) -> Result<Reconciled> {
        let Pass { trust, old, mut fresh, corrupt, reads, mut changed } = pass;
        let entries = fresh.live_entries();
        // Entries read from records, plus entries dropped because their record is gone.
        let kept = entries - reads.min(entries);
        let repaired = if trust == Trust::Nothing {
            0
        } else {
            reads + old.live_entries().saturating_sub(kept)
        };
        changed |= fresh.sessions != old.sessions;
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

    /// Finishes the deletes whose pending markers are on disk (cut off by a crash, or
    /// failed part way). With `strict`, the first that fails again is the error; without,
    /// it is logged and its session stays marked (see [`delete_session`](Self::delete_session)).
    /// Returns how many were finished.
    pub(super) async fn finish_pending_deletes(&self, strict: bool) -> Result<usize> {
        let pending = self.backend.list(&keys::pending_markers()).await?;
        let mut finished = 0;
        for meta in &pending {
            let Ok(sid) = SessionId::new(meta.key.file_name()) else {
                // Not a marker this crate writes: nothing to finish.
                self.backend.delete(&meta.key).await?;
                continue;
            };
            info!(session = %sid, "finishing an interrupted delete");
            match self.finish_delete(&sid, super::AccessRule::Remove).await {
                Ok(_) => finished += 1,
                Err(e) if strict => return Err(e),
                Err(e) => {
                    warn!(session = %sid, error = %e, "could not finish an interrupted delete; it is retried before the session's next write")
                }
            }
        }
        Ok(finished)
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
        let age_cutoff =
            policy.max_checkpoint_age.map(|a| now.saturating_sub(a.as_millis() as u64));
        let doomed: Vec<(SessionId, CheckpointId, u64)> = {
            let idx = self.index();
            let mut doomed = Vec::new();
            let mut spare = Vec::new();
            for (sid, e) in &idx.sessions {
                let excess =
                    policy.keep_checkpoints.map_or(0, |k| e.checkpoints.len().saturating_sub(k));
                let newest = e.checkpoints.keys().next_back();
                for (i, (cid, c)) in e.checkpoints.iter().enumerate() {
                    let is_newest = Some(cid) == newest;
                    let too_old = age_cutoff.is_some_and(|cut| c.timestamp < cut) && !is_newest;
                    if i < excess || too_old {
                        doomed.push((sid.clone(), cid.clone(), c.size_bytes));
                    } else if !is_newest {
                        spare.push((c.timestamp, cid.clone(), sid.clone(), c.size_bytes));
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
    pub(super) async fn enforce_cap(&self) -> Result<()> {
        if self.retention.max_total_bytes.is_some_and(|cap| self.index().total_bytes > cap) {
            self.trim_checkpoints().await?;
        }
        Ok(())
    }

    /// Sweeps staged files, finishes interrupted deletes and rebuilds the index from every
    /// record.
    pub(crate) async fn vacuum(&self) -> Result<VacuumReport> {
        let swept = self.backend.sweep().await?;
        // On a shared store a marker may be a delete in progress on another node: only the
        // holder of the session's lease finishes it (through its session actor, fenced).
        let orphans = if self.shared { 0 } else { self.finish_pending_deletes(true).await? };
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

    /// Keeps a copy of the damaged record at `key` in `quarantine/`, written through
    /// `backend` (once per key and process: a record read again and again is copied once).
    pub(super) async fn quarantine(
        &self,
        backend: &dyn StorageBackend,
        key: &StorageKey,
        bytes: Vec<u8>,
    ) {
        // A read-only store writes no copy: the damage is reported all the same.
        if self.read_only || !lock(&self.quarantined).insert(key.clone()) {
            return;
        }
        let copy = keys::quarantine_copy(key, self.clock.now_ms());
        if let Err(e) = backend.put(&copy, bytes).await {
            warn!(key = %copy, error = %e, "could not write quarantine copy");
        }
    }

    /// Every session a full-store pass must visit: those in the index and those with only
    /// an access record.
    #[cfg(feature = "encryption")]
    pub(crate) async fn reencrypt_sessions(&self) -> Result<Vec<SessionId>> {
        let mut sessions: std::collections::BTreeSet<SessionId> =
            self.index().sessions.keys().cloned().collect();
        sessions.extend(self.access_keys().await?.into_iter().map(|(sid, _)| sid));
        Ok(sessions.into_iter().collect())
    }

    /// Rewrites a record as it is (decrypted with whichever key sealed it, sealed again
    /// with the current one). Returns whether it was rewritten. A damaged record reads as
    /// damaged under every key, so it is left as it is (with a warning) rather than
    /// stopping the pass; a record sealed under a key this handle lacks stops it
    /// (`WrongKey`), so no key it needs is retired. Crash-safe: one atomic put, and the
    /// record reads the same before and after it.
    #[cfg(feature = "encryption")]
    async fn rewrite(&self, key: &StorageKey) -> Result<bool> {
        self.rewrite_as(None, key).await
    }

    /// [`rewrite`](Self::rewrite) of a key of session `sid` (fenced while this node holds
    /// its lease).
    async fn rewrite_as(&self, sid: Option<&SessionId>, key: &StorageKey) -> Result<bool> {
        match self.backend.get(key).await {
            Ok(Some(bytes)) => {
                match sid {
                    Some(sid) => self.put_as(sid, key, bytes, None).await?,
                    None => self.backend.put(key, bytes).await?,
                }
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
        let mut n = usize::from(
            self.rewrite_as(Some(sid), &keys::session(sid, self.codec.extension())).await?,
        );
        {
            let _access = self.access_writes.lock().await;
            n += usize::from(self.rewrite_as(Some(sid), &keys::access(sid)).await?);
        }
        for meta in self.backend.list(&keys::checkpoints_of(sid)).await? {
            n += usize::from(self.rewrite_as(Some(sid), &meta.key).await?);
        }
        Ok(n)
    }

    /// Re-encrypts what belongs to no session: quarantine copies, the running marker and
    /// the index journal. (The keys of class [`KeyClass::Plaintext`](crate::KeyClass), such
    /// as `metadata/store.json` and the pending markers, are not encrypted.)
    #[cfg(feature = "encryption")]
    pub(crate) async fn reencrypt_rest(&self) -> Result<usize> {
        let mut n = 0;
        for meta in self.backend.list(&keys::quarantine()).await? {
            n += usize::from(self.rewrite(&meta.key).await?);
        }
        // Written at start and deleted at a clean shutdown; rewritten so a crash after the
        // rotation does not leave it sealed under a retired key.
        n += usize::from(self.rewrite(&keys::running()).await?);
        let _guard = self.journal.lock().await;
        self.compact_locked(true).await?;
        Ok(n + 1)
    }
}
