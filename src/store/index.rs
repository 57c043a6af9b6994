//! The in-memory index of sessions and checkpoints, with an append-only journal. This file
//! owns [`Index`] (its entries, [`RecordEntry`] and [`CheckpointEntry`], and the listings
//! and totals built from them) and the journal's line format ([`Change`], replay,
//! snapshot). It calls only the codec's `meta` types and does no I/O: the store reads the
//! journal, and its writer (`journal.rs`) appends and replaces it.
//!
//! The index makes listing and stats cheap: no record body is read. It is persisted as a
//! journal (`metadata/index.log`): one line per change, `CRC32HEX JSON`. Each change costs
//! one small append, however many checkpoints exist, queued by the write it describes and
//! appended by the first writer to find no append running, with every line queued
//! meanwhile (the others do not wait for it). The journal is not fsynced: records
//! are the truth, and at every start the index is reconciled against a listing of the
//! records (keys and sizes only), re-reading just the records it disagrees about. A
//! damaged journal is discarded and the index rebuilt from the records. The journal is
//! compacted (rewritten atomically with one line per live entry) when it grows past
//! twice the live entries.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::codec::{CheckpointMeta, SessionMeta};
use crate::types::{
    BranchId, CheckpointId, CheckpointInfo, CheckpointReason, SessionId, SessionInfo,
    SessionStatus, StorageStats,
};

/// One journal line's payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op")]
pub(crate) enum Change {
    /// A session record was written. The journal's short names: `st` is the entry's
    /// `status`, `why` its `reason`, `st_at` its `status_at`.
    #[serde(rename = "s")]
    Saved {
        sid: SessionId,
        at: u64,
        size: u64,
        #[serde(default, rename = "st")]
        status: SessionStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<u64>,
        /// Why the status was set (a pause or failure reason).
        #[serde(default, rename = "why", skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// When the status was set.
        #[serde(default, rename = "st_at", skip_serializing_if = "Option::is_none")]
        status_at: Option<u64>,
    },
    /// A session record was removed.
    #[serde(rename = "sd")]
    SessionDeleted { sid: SessionId },
    /// A checkpoint record was written: a [`CheckpointEntry`] with the same field names.
    /// The journal's short names: `b` is `branch_id`, `ts` is `timestamp`, `size` is
    /// `size_bytes` and `r` is `reason`.
    #[serde(rename = "c")]
    Checkpoint {
        sid: SessionId,
        cid: CheckpointId,
        #[serde(rename = "b")]
        branch_id: BranchId,
        #[serde(rename = "ts")]
        timestamp: u64,
        #[serde(rename = "size")]
        size_bytes: u64,
        #[serde(default, rename = "r")]
        reason: CheckpointReason,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<CheckpointId>,
    },
    /// A checkpoint record was removed.
    #[serde(rename = "cd")]
    CheckpointDeleted { sid: SessionId, cid: CheckpointId },
    /// A session whose run was cut off by a process that died (see `Index::interrupted`),
    /// kept across clean restarts until the session is saved.
    #[serde(rename = "i")]
    Interrupted { sid: SessionId },
    /// First line of a journal written at a clean shutdown: exactly `n` entry lines follow,
    /// whose bytes have CRC-32 `crc`.
    #[serde(rename = "clean")]
    Clean { n: usize, crc: u32 },
}

/// The index's view of a checkpoint record. Its fields have the names of the public
/// [`CheckpointInfo`] (and of the record's envelope, `RecordHead::Checkpoint` and
/// `CheckpointMeta` in the codec), without the ids, which key it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckpointEntry {
    pub(crate) branch_id: BranchId,
    /// Creation time in milliseconds since the Unix epoch.
    pub(crate) timestamp: u64,
    /// Size of the stored record in bytes.
    pub(crate) size_bytes: u64,
    pub(crate) reason: CheckpointReason,
    pub(crate) step: Option<u64>,
    pub(crate) parent: Option<CheckpointId>,
}

impl CheckpointEntry {
    /// The entry of a checkpoint record on `branch_id` taken at `timestamp`, `size_bytes`
    /// stored, with `meta`.
    pub(crate) fn of(
        branch_id: BranchId,
        timestamp: u64,
        size_bytes: u64,
        meta: &CheckpointMeta,
    ) -> Self {
        CheckpointEntry {
            branch_id,
            timestamp,
            size_bytes,
            reason: meta.reason,
            step: meta.step,
            parent: meta.parent.clone(),
        }
    }

    /// The entry that keeps a damaged checkpoint record of `size_bytes` listed (its branch
    /// unknown, its time the one in its id), so loading it reports the damage.
    pub(crate) fn damaged(cid: &CheckpointId, size_bytes: u64) -> Self {
        let meta = CheckpointMeta::default();
        CheckpointEntry::of(BranchId::from_valid("unknown"), cid.timestamp_ms(), size_bytes, &meta)
    }

    /// The public listing of this entry as checkpoint `cid` of `sid`.
    fn info(&self, sid: &SessionId, cid: &CheckpointId) -> CheckpointInfo {
        CheckpointInfo {
            id: cid.clone(),
            session_id: sid.clone(),
            branch_id: self.branch_id.clone(),
            timestamp: self.timestamp,
            size_bytes: self.size_bytes,
            reason: self.reason,
            step: self.step,
            parent: self.parent.clone(),
        }
    }
}

/// The index's view of a session record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordEntry {
    pub(crate) at: u64,
    pub(crate) size: u64,
    pub(crate) status: SessionStatus,
    pub(crate) step: Option<u64>,
    /// Why the status was set, and when.
    pub(crate) reason: Option<String>,
    pub(crate) status_at: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SessionEntry {
    /// The session record, if there is one.
    pub(crate) record: Option<RecordEntry>,
    pub(crate) checkpoints: BTreeMap<CheckpointId, CheckpointEntry>,
}

impl RecordEntry {
    /// The entry of a session record saved at `at`, `size` bytes stored, with `meta`.
    pub(crate) fn of(at: u64, size: u64, meta: &SessionMeta) -> RecordEntry {
        RecordEntry {
            at,
            size,
            status: meta.status,
            step: meta.step,
            reason: meta.reason.clone(),
            status_at: meta.status_at,
        }
    }
}

impl Change {
    /// The line that records `r` as `sid`'s session record.
    pub(crate) fn saved(sid: &SessionId, r: RecordEntry) -> Change {
        let RecordEntry { at, size, status, step, reason, status_at } = r;
        Change::Saved { sid: sid.clone(), at, size, status, step, reason, status_at }
    }

    /// The line that records checkpoint `cid` of `sid`.
    pub(crate) fn checkpoint(sid: &SessionId, cid: &CheckpointId, c: &CheckpointEntry) -> Change {
        let CheckpointEntry { branch_id, timestamp, size_bytes, reason, step, parent } = c.clone();
        Change::Checkpoint {
            sid: sid.clone(),
            cid: cid.clone(),
            branch_id,
            timestamp,
            size_bytes,
            reason,
            step,
            parent,
        }
    }
}

impl SessionEntry {
    fn is_empty(&self) -> bool {
        self.record.is_none() && self.checkpoints.is_empty()
    }
    /// When the session last changed: its save time or its newest checkpoint.
    pub(crate) fn last_activity(&self) -> u64 {
        self.record.as_ref().map_or(0, |r| r.at).max(self.newest_checkpoint_at())
    }

    /// When the newest checkpoint was taken (0 without checkpoints).
    pub(crate) fn newest_checkpoint_at(&self) -> u64 {
        self.checkpoints.values().map(|c| c.timestamp).max().unwrap_or(0)
    }

    /// The bytes of the session's records: its state and its checkpoints.
    pub(crate) fn bytes(&self) -> u64 {
        self.record.as_ref().map_or(0, |r| r.size)
            + self.checkpoints.values().map(|c| c.size_bytes).sum::<u64>()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Index {
    pub(crate) sessions: HashMap<SessionId, SessionEntry>,
    pub(crate) by_checkpoint: HashMap<CheckpointId, SessionId>,
    /// Journal lines written since the last compaction.
    pub(crate) journal_lines: usize,
    /// Bytes of all records, kept up to date by `apply`.
    pub(crate) total_bytes: u64,
    /// Sessions that were running when a process using the store died, and have not been
    /// saved since. Kept in the journal (`Interrupted` lines), so a clean restart in
    /// between does not clear them before anyone has seen them.
    pub(crate) interrupted: HashSet<SessionId>,
}

impl Index {
    pub(crate) fn apply(&mut self, change: &Change) {
        match change {
            Change::Saved { sid, at, size, status, step, reason, status_at } => {
                let entry = RecordEntry {
                    at: *at,
                    size: *size,
                    status: *status,
                    step: *step,
                    reason: reason.clone(),
                    status_at: *status_at,
                };
                let old = self.sessions.entry(sid.clone()).or_default().record.replace(entry);
                self.total_bytes = self.total_bytes + size - old.map_or(0, |o| o.size);
                self.interrupted.remove(sid);
            }
            Change::SessionDeleted { sid } => {
                // A deleted session's run is over; an id used again starts afresh.
                self.interrupted.remove(sid);
                if let Some(e) = self.sessions.get_mut(sid) {
                    self.total_bytes -= e.record.take().map_or(0, |o| o.size);
                    if e.is_empty() {
                        self.sessions.remove(sid);
                    }
                }
            }
            Change::Checkpoint {
                sid,
                cid,
                branch_id,
                timestamp,
                size_bytes,
                reason,
                step,
                parent,
            } => {
                let entry = CheckpointEntry {
                    branch_id: branch_id.clone(),
                    timestamp: *timestamp,
                    size_bytes: *size_bytes,
                    reason: *reason,
                    step: *step,
                    parent: parent.clone(),
                };
                let old = self
                    .sessions
                    .entry(sid.clone())
                    .or_default()
                    .checkpoints
                    .insert(cid.clone(), entry);
                self.total_bytes = self.total_bytes + size_bytes - old.map_or(0, |o| o.size_bytes);
                self.by_checkpoint.insert(cid.clone(), sid.clone());
            }
            Change::Interrupted { sid } => {
                self.interrupted.insert(sid.clone());
            }
            Change::Clean { .. } => {}
            Change::CheckpointDeleted { sid, cid } => {
                if let Some(e) = self.sessions.get_mut(sid) {
                    self.total_bytes -= e.checkpoints.remove(cid).map_or(0, |o| o.size_bytes);
                    if e.is_empty() {
                        self.sessions.remove(sid);
                    }
                }
                self.by_checkpoint.remove(cid);
            }
        }
    }

    /// Encodes one journal line.
    pub(crate) fn line(change: &Change) -> Vec<u8> {
        let json = serde_json::to_string(change).unwrap_or_default();
        format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes())).into_bytes()
    }

    /// Replays a journal. `None` if a line other than a torn last one is damaged.
    /// The flag says whether the journal is exactly what a clean shutdown wrote: only then
    /// are its session entries trusted without reading the records (after a crash the
    /// unsynced tail, and with it a session's latest save time, may be gone).
    pub(crate) fn replay(bytes: &[u8]) -> Option<(Index, bool)> {
        let mut index = Index::default();
        let mut clean_n = None;
        let mut torn = false;
        let mut lines = bytes.split_inclusive(|b| *b == b'\n').peekable();
        while let Some(line) = lines.next() {
            let complete = line.ends_with(b"\n");
            let parsed = std::str::from_utf8(line).ok().and_then(|l| {
                let l = l.trim_end_matches('\n');
                let (crc, json) = l.split_once(' ')?;
                let crc = u32::from_str_radix(crc, 16).ok()?;
                (crc32fast::hash(json.as_bytes()) == crc).then_some(())?;
                serde_json::from_str::<Change>(json).ok()
            });
            match parsed {
                Some(Change::Clean { n, crc })
                    if complete && index.journal_lines == 0 && clean_n.is_none() =>
                {
                    let rest = &bytes[line.len()..];
                    clean_n = (crc32fast::hash(rest) == crc).then_some(n);
                }
                Some(change) if complete => {
                    index.apply(&change);
                    index.journal_lines += 1;
                }
                // A torn tail: the crash the journal's contract allows. Reconcile fixes it.
                _ if lines.peek().is_none() && !complete => {
                    torn = true;
                    break;
                }
                _ => return None,
            }
        }
        let clean = !torn && clean_n == Some(index.journal_lines);
        Some((index, clean))
    }

    /// The journal that recreates this index, one line per live entry, headed by a
    /// clean-shutdown line when `clean`.
    pub(crate) fn snapshot(&self, clean: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let mut n = 0;
        let mut sids: Vec<_> = self.sessions.keys().collect();
        sids.sort();
        for sid in sids {
            let e = &self.sessions[sid];
            if let Some(r) = &e.record {
                out.extend(Self::line(&Change::saved(sid, r.clone())));
                n += 1;
            }
            for (cid, c) in &e.checkpoints {
                out.extend(Self::line(&Change::checkpoint(sid, cid, c)));
                n += 1;
            }
        }
        // After the entries (a `Saved` line clears the flag when replayed).
        let mut cut_off: Vec<_> =
            self.interrupted.iter().filter(|s| self.sessions.contains_key(*s)).collect();
        cut_off.sort();
        for sid in cut_off {
            out.extend(Self::line(&Change::Interrupted { sid: sid.clone() }));
            n += 1;
        }
        if clean {
            let mut head = Self::line(&Change::Clean { n, crc: crc32fast::hash(&out) });
            head.extend(out);
            out = head;
        }
        (out, n)
    }

    pub(crate) fn live_entries(&self) -> usize {
        self.sessions.values().map(|e| usize::from(e.record.is_some()) + e.checkpoints.len()).sum()
    }

    pub(crate) fn session_info(&self, sid: &SessionId, e: &SessionEntry) -> SessionInfo {
        SessionInfo {
            session_id: sid.clone(),
            updated_at: e.record.as_ref().map_or(0, |r| r.at),
            size_bytes: e.record.as_ref().map_or(0, |r| r.size),
            checkpoint_count: e.checkpoints.len(),
            status: e.record.as_ref().map_or(SessionStatus::Running, |r| r.status),
            step: e.record.as_ref().and_then(|r| r.step),
            status_reason: e.record.as_ref().and_then(|r| r.reason.clone()),
            status_at: e.record.as_ref().and_then(|r| r.status_at),
            interrupted: self.interrupted.contains(sid),
            owner: None,
            lease_until: None,
        }
    }

    /// Every session of the index, and `memory_only` ones (states not flushed yet, see
    /// `Store::memory_only_sessions`), sorted by id.
    pub(crate) fn list_sessions(&self, memory_only: Vec<SessionId>) -> Vec<SessionInfo> {
        let mut v: Vec<_> =
            self.sessions.iter().map(|(sid, e)| self.session_info(sid, e)).collect();
        let empty = SessionEntry::default();
        v.extend(
            memory_only
                .iter()
                .filter(|s| !self.sessions.contains_key(*s))
                .map(|sid| self.session_info(sid, &empty)),
        );
        v.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        v
    }

    pub(crate) fn list_checkpoints(&self, sid: &SessionId) -> Vec<CheckpointInfo> {
        self.sessions
            .get(sid)
            .map(|e| e.checkpoints.iter().map(|(cid, c)| c.info(sid, cid)).collect())
            .unwrap_or_default()
    }

    /// Totals over the sessions `include` accepts (`memory_only` ones count as sessions
    /// with no bytes stored yet).
    pub(crate) fn stats_where(
        &self,
        memory_only: Vec<SessionId>,
        include: impl Fn(&SessionId) -> bool,
    ) -> StorageStats {
        let mut s = StorageStats::default();
        s.session_count += memory_only
            .iter()
            .filter(|sid| !self.sessions.contains_key(*sid) && include(sid))
            .count();
        for (sid, e) in &self.sessions {
            if !include(sid) {
                continue;
            }
            s.session_count += 1;
            s.checkpoint_count += e.checkpoints.len();
            s.total_bytes += e.bytes();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal line saving a running session's record at `at` with `size` bytes.
    fn saved(sid: &SessionId, at: u64, size: u64) -> Change {
        let r = RecordEntry {
            at,
            size,
            status: SessionStatus::Running,
            step: None,
            reason: None,
            status_at: None,
        };
        Change::saved(sid, r)
    }

    #[test]
    fn replay_skips_torn_tail_and_rejects_damage() {
        let sid = SessionId::new("s").unwrap();
        let a = Index::line(&saved(&sid, 1, 10));
        let b = Index::line(&saved(&sid, 2, 20));
        let mut j = a.clone();
        j.extend(&b[..b.len() - 3]);
        let (idx, clean) = Index::replay(&j).unwrap();
        assert!(!clean);
        assert_eq!(idx.sessions[&sid].record.as_ref().map(|r| (r.at, r.size)), Some((1, 10)));
        let mut damaged = a.clone();
        damaged[12] ^= 1;
        damaged.extend(&b);
        assert!(Index::replay(&damaged).is_none());
    }

    #[test]
    fn only_an_untouched_clean_snapshot_is_clean() {
        let mut idx = Index::default();
        let sid = SessionId::new("s").unwrap();
        idx.apply(&saved(&sid, 1, 10));
        let (snap, _) = idx.snapshot(true);
        assert!(Index::replay(&snap).unwrap().1);
        let mut more = snap.clone();
        more.extend(Index::line(&saved(&sid, 2, 10)));
        assert!(!Index::replay(&more).unwrap().1, "appends after a clean shutdown make it unclean");
        assert!(!Index::replay(&idx.snapshot(false).0).unwrap().1);
    }
}
