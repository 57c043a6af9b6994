//! The file backend's write-ahead log writer (log mode).
//!
//! This module owns which keys go through the log, the queue of writes waiting for a group
//! commit, the leader that appends and `fdatasync`s a batch of frames (cutting a failed
//! batch off again), materializing the overlay into the record files, and the recovery at
//! open of a log that a crash left behind. It calls `frame.rs` for the bytes of frames and
//! their replay, `Core` (`direct.rs`) for directories and for writing record files
//! (`write_records`), and the file-system seam only for the log file itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::direct::Core;
use super::frame;
use super::fs::FsFile;
use crate::backend::{KeyClass, StorageKey};
use crate::error::{Result, StateError};
// The log's file, `metadata/.wal`: hidden, so listings never show it and a sweep (which
// removes only `.tmp-` names) never touches it.
use crate::store::keys::{METADATA, WAL_FILE as WAL};
use crate::sync::lock;

/// Whether writes of `key` go through the log in log mode: the records
/// ([`KeyClass::Record`]: sessions and checkpoints), written on every step. Every other
/// class (the store's metadata, the index journal that is also appended to, quarantine
/// copies) is written rarely and directly, so every name that is appended to is also
/// replaced in one place, and the files a person or the store reads first at open are
/// always current.
pub(super) fn through_log(key: &StorageKey) -> bool {
    key.class() == KeyClass::Record
}

/// Bring the record files up to date once the log is this long...
const MATERIALIZE_AT: u64 = 8 << 20;
/// At most this many bytes of frames in one batch (one write, one `fdatasync`).
const MAX_BATCH: usize = 16 << 20;

pub(super) type Reply = tokio::sync::oneshot::Sender<Result<()>>;

/// A write for the log writer.
pub(super) enum LogReq {
    Put { key: StorageKey, value: Vec<u8>, reply: Reply },
    Delete { key: StorageKey, reply: Reply },
}

impl LogReq {
    fn key(&self) -> &StorageKey {
        match self {
            LogReq::Put { key, .. } | LogReq::Delete { key, .. } => key,
        }
    }
    /// The new value of a put, `None` for a delete.
    fn value(&self) -> Option<&[u8]> {
        match self {
            LogReq::Put { value, .. } => Some(value),
            LogReq::Delete { .. } => None,
        }
    }
    fn size(&self) -> usize {
        self.key().as_str().len()
            + if let LogReq::Put { value, .. } = self { value.len() } else { 0 }
    }
    fn answer(self, r: Result<()>) {
        match self {
            LogReq::Put { reply, .. } | LogReq::Delete { reply, .. } => {
                let _ = reply.send(r);
            }
        }
    }
}

/// The log: writes waiting for the next group commit, and the writer that makes them.
///
/// There is no thread of its own: the first writer to find no commit running becomes the
/// leader and runs commits on tokio's blocking pool until the queue is empty; everyone who
/// queues meanwhile is answered by those commits. (A blocking-pool task, unlike a thread of
/// our own, also keeps a paused test clock from jumping ahead while a commit runs.)
pub(super) struct Log {
    queue: Mutex<Queue>,
    writer: Mutex<LogWriter>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<LogReq>,
    leading: bool,
    /// The backend is gone: nothing more is written.
    closed: bool,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Log")
    }
}

impl Log {
    /// `kept`: a log recovery could not replay yet (full disk), to go on appending to.
    pub(super) fn new(core: Arc<Core>, kept: Option<(Box<dyn FsFile>, u64)>) -> Log {
        let (file, len) = match kept {
            Some((f, len)) => (Some(f), len),
            None => (None, 0),
        };
        let writer = LogWriter { core, file, len, cut_failed: false };
        Log { queue: Mutex::new(Queue::default()), writer: Mutex::new(writer) }
    }

    /// Queues `req`; returns whether the caller must start a leader.
    pub(super) fn enqueue(&self, req: LogReq) -> bool {
        let mut q = lock(&self.queue);
        q.waiting.push(req);
        !std::mem::replace(&mut q.leading, true)
    }

    /// The leader: commits what is queued, batch after batch, until nothing is.
    pub(super) fn lead(&self) {
        let mut writer = lock(&self.writer);
        loop {
            let batch = {
                let mut q = lock(&self.queue);
                if q.closed {
                    // Only requests whose callers gave up can be left when the last handle
                    // is dropped: refuse them, the files are final.
                    for req in q.waiting.drain(..) {
                        req.answer(Err(StateError::unavailable("the file backend was dropped")));
                    }
                    q.leading = false;
                    return;
                }
                if q.waiting.is_empty() {
                    // Decided under the queue lock: a writer queueing after this starts a
                    // new leader.
                    q.leading = false;
                    return;
                }
                let mut bytes = 0;
                let n = q
                    .waiting
                    .iter()
                    .take_while(|r| {
                        let fits = bytes < MAX_BATCH;
                        bytes += r.size();
                        fits
                    })
                    .count();
                q.waiting.drain(..n).collect::<Vec<_>>()
            };
            writer.commit(batch);
            if writer.len >= MATERIALIZE_AT {
                writer.materialize_logged();
            }
        }
    }

    /// Closes the log for good (the backend's last handle is gone): a leader that starts
    /// later writes nothing. Waits for a running commit (the writer lock), then brings the
    /// record files up to date and removes the log.
    pub(super) fn close(&self) {
        lock(&self.queue).closed = true;
        lock(&self.writer).materialize_logged();
    }
}

/// What the leader commits with.
struct LogWriter {
    core: Arc<Core>,
    /// The open log, once this writer has created it.
    file: Option<Box<dyn FsFile>>,
    /// Bytes of whole, durable frames in it.
    len: u64,
    /// A failed write could not be cut off the log: nothing may be appended after it.
    cut_failed: bool,
}

impl LogWriter {
    fn materialize_logged(&mut self) {
        if let Err(e) = self.materialize() {
            // Nothing is lost: the log still holds every write and is replayed at the next
            // open; until then reads are served from the overlay.
            tracing::warn!(error = %e, "bringing record files up to date from the log failed; will retry");
        }
    }

    /// Appends the batch's frames, makes them durable, then publishes them to the overlay
    /// and answers every caller.
    fn commit(&mut self, batch: Vec<LogReq>) {
        let mut accepted = Vec::with_capacity(batch.len());
        for req in batch {
            // The same checks a direct write makes (no symbolic link on the way), before
            // anything is promised; the directory is created (durably) now so that bringing
            // the record file up to date later cannot fail for want of it.
            let path = self.core.path_of(req.key());
            let dir = path.parent().unwrap_or(&self.core.root);
            if let Err(e) = self.core.ensure_dir(dir) {
                req.answer(Err(e));
                continue;
            }
            match frame::check(req.key(), req.value()) {
                Ok(()) => accepted.push(req),
                Err(why) => req.answer(Err(StateError::Config { message: why.to_owned() })),
            }
        }
        if accepted.is_empty() {
            return;
        }
        match self.append(&accepted) {
            Ok(()) => {
                let mut overlay = lock(&self.core.overlay);
                let mut answers = Vec::with_capacity(accepted.len());
                for req in accepted {
                    match req {
                        LogReq::Put { key, value, reply } => {
                            overlay.insert(key, Some(Arc::new(value)));
                            answers.push(reply);
                        }
                        LogReq::Delete { key, reply } => {
                            overlay.insert(key, None);
                            answers.push(reply);
                        }
                    }
                }
                drop(overlay);
                for reply in answers {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                let (kind, code, op) = match &e {
                    StateError::Io { source, operation, .. } => {
                        (source.kind(), source.raw_os_error(), *operation)
                    }
                    StateError::StorageFull { operation, .. } => {
                        (std::io::ErrorKind::StorageFull, Some(libc::ENOSPC), *operation)
                    }
                    _ => (std::io::ErrorKind::Other, None, "appending to the log"),
                };
                let path = self.core.wal_path();
                for req in accepted {
                    let source = match code {
                        Some(c) => std::io::Error::from_raw_os_error(c),
                        None => std::io::Error::from(kind),
                    };
                    req.answer(Err(StateError::io(op, &path, source)));
                }
            }
        }
    }

    /// Appends the frames of `reqs` as one batch and makes them durable. On failure the log
    /// is cut back to its last durable length (through a fresh descriptor: one whose sync
    /// failed is never synced again), so a failed write leaves nothing that a replay would
    /// apply, and the next batch is written in its place.
    fn append(&mut self, reqs: &[LogReq]) -> Result<()> {
        if self.cut_failed {
            // Nothing is appended after an uncut failed write (a replay would stop at it):
            // first the files are brought up to date and the log is gone.
            self.materialize()?;
        }
        let path = self.core.wal_path();
        let fs = &self.core.fs;
        let created = self.file.is_none();
        if created {
            // The writer starts a log only where none is left over (recovery removed it or
            // handed it over, and so does `materialize`); if removing one failed, the new
            // frames go after what it holds (values already in their record files).
            let mut file =
                fs.open_append(&path).map_err(|e| StateError::io("opening the log", &path, e))?;
            self.len = file.len().map_err(|e| StateError::io("opening the log", &path, e))?;
            self.file = Some(file);
        }
        // Every frame names the offset where its batch starts (the log's length before the
        // batch): what tells a torn last batch from damage to an earlier one at replay
        // (`frame.rs`). A failed batch is cut off, and the next one starts at the same place.
        let mut frames = Vec::new();
        for req in reqs {
            frame::encode(&mut frames, req.key(), req.value(), self.len)
                .map_err(|why| StateError::Config { message: why.to_owned() })?;
        }
        let frames = frames.as_slice();
        let Some(file) = self.file.as_mut() else {
            return Err(StateError::unavailable("log not open"));
        };
        let result = file
            .write_all(frames)
            .map_err(|e| StateError::io("appending to the log", &path, e))
            // The frames must be on disk before any caller hears Ok.
            .and_then(|()| {
                file.sync_data().map_err(|e| StateError::io("syncing the log", &path, e))
            })
            // A new log's name must be durable too, or a power loss takes the whole log.
            .and_then(|()| {
                if created {
                    let dir = self.core.root.join(METADATA);
                    fs.sync_dir(&dir).map_err(|e| StateError::io("syncing directory", &dir, e))
                } else {
                    Ok(())
                }
            });
        match result {
            Ok(()) => {
                self.len += frames.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.file = None;
                let cut = fs.open_append(&path).and_then(|mut f| {
                    f.set_len(self.len)?;
                    f.sync_data()?;
                    Ok(f)
                });
                match cut {
                    Ok(f) if !created => self.file = Some(f),
                    Ok(_) => {
                        // A log this writer had only just created: remove it again.
                        let _ = self.core.remove_log();
                    }
                    Err(cut_err) => {
                        // The tail could not be cut: bring the files up to date from the
                        // overlay and drop the whole log before the next write.
                        tracing::warn!(error = %cut_err, "could not cut a failed write off the log");
                        self.cut_failed = true;
                    }
                }
                Err(e)
            }
        }
    }

    /// Writes every overlay entry to its record file, durably, then removes the log.
    fn materialize(&mut self) -> Result<()> {
        let entries: Vec<(StorageKey, Option<Arc<Vec<u8>>>)> =
            lock(&self.core.overlay).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if entries.is_empty() && self.file.is_none() && self.len == 0 && !self.cut_failed {
            return Ok(());
        }
        self.core
            .write_records(entries.iter().map(|(k, v)| (k, v.as_ref().map(|v| v.as_slice()))))?;
        // Every entry is durable in its own file now: the log may go.
        self.file = None;
        self.core.remove_log()?;
        self.len = 0;
        self.cut_failed = false;
        // Only the writer (whose lock the caller holds) adds to the overlay, so it holds
        // exactly the entries just written.
        lock(&self.core.overlay).clear();
        Ok(())
    }
}

impl Core {
    fn wal_path(&self) -> PathBuf {
        self.root.join(METADATA).join(WAL)
    }

    /// Removes the log, durably. Called only when nothing in it is needed any more: every
    /// value it holds is durable in its record file, or (a log just created whose first
    /// append failed) it holds nothing acknowledged. If a crash comes before the removal is
    /// durable, the next open replays the log and rewrites the same values.
    fn remove_log(&self) -> Result<()> {
        let path = self.wal_path();
        self.fs.remove_file(&path).map_err(|e| StateError::io("removing the log", &path, e))?;
        let dir = self.root.join(METADATA);
        self.fs.sync_dir(&dir).map_err(|e| StateError::io("syncing directory", &dir, e))
    }

    /// At open, with the lock held: replays a log a crash left behind into the record
    /// files, then removes it. A torn tail (a write that was never acknowledged) is ignored.
    ///
    /// Damage followed by whole frames of a later batch is not a torn tail: it hit writes
    /// that were acknowledged (see `frame.rs`). Then the open fails with
    /// [`StateError::Corrupt`] naming the log, before anything is written: the log stays in
    /// place byte for byte and no record file is touched, so nothing is lost and it can be
    /// inspected, cut or moved aside by hand (the message says how). Replaying the frames
    /// before the damage alone would give back older values than were acknowledged, as if
    /// nothing were wrong.
    ///
    /// With `keep_if_full` (log mode), a disk too full for the second copy does not stop
    /// the open: the log's values go to the overlay, the log is cut to its whole frames and
    /// kept, and its handle and length are returned for the writer to go on appending; the
    /// files are brought up to date later, once there is room.
    pub(super) fn recover_log(&self, keep_if_full: bool) -> Result<Option<(Box<dyn FsFile>, u64)>> {
        let path = self.wal_path();
        let Some(bytes) =
            self.fs.read(&path).map_err(|e| StateError::io("reading the log", &path, e))?
        else {
            return Ok(None);
        };
        let replayed = frame::replay(&bytes).map_err(|d| {
            tracing::error!(
                damaged_at = d.at,
                next_frame = d.next_frame,
                len = bytes.len(),
                "the write-ahead log is damaged before frames that were acknowledged; not opening the store"
            );
            StateError::corrupt(
                format!("{METADATA}/{WAL}"),
                format!(
                    "the write-ahead log is damaged at byte {} of {}, and whole frames written after that part \
                     was made durable follow at byte {}: acknowledged writes cannot be read back. Nothing was \
                     changed and the log is kept at {}. To open the store anyway, keep a copy of the log, then \
                     either cut it to its first {} bytes (the writes from the damage on are lost) or move it out \
                     of the store (every write it holds is lost; the record files keep their older values)",
                    d.at,
                    bytes.len(),
                    d.next_frame,
                    path.display(),
                    d.at
                ),
            )
        })?;
        if replayed.valid_len < bytes.len() {
            tracing::info!(
                ignored_bytes = bytes.len() - replayed.valid_len,
                "the write-ahead log ends in an unacknowledged, torn write; ignoring it"
            );
        }
        let mut latest: HashMap<StorageKey, Option<Vec<u8>>> = HashMap::new();
        let frames = replayed.frames.len();
        for (k, v) in replayed.frames {
            latest.insert(k, v);
        }
        match self.write_records(latest.iter().map(|(k, v)| (k, v.as_deref()))) {
            Ok(()) => {}
            Err(e @ StateError::StorageFull { .. }) if keep_if_full => {
                tracing::warn!(error = %e, "no room to replay the write-ahead log into the record files; serving it from memory");
                let valid = replayed.valid_len as u64;
                let mut file = self
                    .fs
                    .open_append(&path)
                    .map_err(|e| StateError::io("opening the log", &path, e))?;
                // Appends must follow the last whole frame, or a replay would stop at the
                // torn one and never reach them.
                file.set_len(valid).map_err(|e| StateError::io("cutting the log", &path, e))?;
                file.sync_data().map_err(|e| StateError::io("syncing the log", &path, e))?;
                lock(&self.overlay).extend(latest.into_iter().map(|(k, v)| (k, v.map(Arc::new))));
                return Ok(Some((file, valid)));
            }
            Err(e) => return Err(e),
        }
        self.remove_log()?;
        if frames > 0 {
            tracing::info!(
                frames,
                records = latest.len(),
                "replayed the write-ahead log into the record files"
            );
        }
        Ok(None)
    }

    /// What the overlay says of `key`: `Some(Some(v))` written, `Some(None)` deleted,
    /// `None` nothing pending (the record file is current).
    pub(super) fn pending(&self, key: &StorageKey) -> Option<Option<Arc<Vec<u8>>>> {
        lock(&self.overlay).get(key).cloned()
    }
}
