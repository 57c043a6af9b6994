//! The file backend's write-ahead log writer (log mode).
//!
//! This module owns which keys go through the log, the queue of writes waiting for a group
//! commit, the leader that writes and `fdatasync`s a batch of frames (zeroing a failed
//! batch again), materializing the overlay into the record files and starting the log's
//! next generation in place, and the recovery at open of a log that a crash left behind.
//! It calls `frame.rs` for the bytes of headers and frames and their replay, `Core`
//! (`direct.rs`) for directories and for writing record files (`write_records`), and the
//! file-system seam only for the log file itself.
//!
//! # The log's life, and why each step keeps it crash-safe
//!
//! The log (`metadata/.wal`) is one file, zero-filled ahead of its frames and reused in
//! place, so that a batch's `fdatasync` writes data into blocks that already exist and
//! need not change the file's size (see `BENCHMARKS.md`). A new log is filled to 256 KiB;
//! a batch that would run past the filled part first doubles it, up to 9 MiB (the
//! materializing threshold and room for the batch that crosses it): a store that writes
//! little keeps a small log, a busy one reaches the full size in its first generation. Its format is in `frame.rs`: a header
//! naming the live generation's salt, then that generation's frames; a replay takes only
//! whole frames carrying the header's salt.
//!
//! - **Starting a generation** (`begin_generation`): only when every value of the one
//!   before is durable in its record file (or there was none). The new header (a fresh
//!   salt) is written over the old one at offset 0, the file is zero-filled up to its
//!   preallocated size if it is shorter, then one `fdatasync` makes both durable; the
//!   first time this writer uses the file, its directory is `fsync`ed too, so that its
//!   name survives a power loss. No frame is written before that sync: a crash in the
//!   middle leaves the old header (whose frames are all in their record files, so
//!   replaying them again rewrites the same values) or a header whose CRC fails (nothing
//!   is replayed: nothing needs to be).
//! - **A batch** (`append`): its frames are written at the end of the generation's whole
//!   frames, over zeros or older generations' frames, then `fdatasync`ed; only then is any
//!   caller answered. A torn batch is only ever the last one (see `frame.rs`).
//! - **A failed batch**: whatever part of it reached the file is zeroed again through a
//!   fresh descriptor and synced (a descriptor whose sync failed is never synced again;
//!   the file is cut back where the batch grew it), so that no frame of it is left for a
//!   replay to take after the next batch. If that fails too, nothing more is written to
//!   this generation: the record files are brought up to date and a new one begins.
//! - **Materializing** (at the size threshold and when the backend is dropped): every
//!   overlay entry is written to its record file (staged, `fdatasync`, rename, directory
//!   `fsync`), then a new generation begins, and only then is the overlay cleared. Until
//!   the new header is durable, a direct delete can never touch a key of the old
//!   generation (the overlay still holds its keys, so their deletes go through the log):
//!   a replay of the old generation could otherwise bring such a record back.
//! - **At open** (`recover_log`): the live generation is replayed into the record files,
//!   then disowned (a new header, synced) before the store is used, for the same reason.
//!   A log in an older format is replayed and then removed, and a format-3 one is started
//!   in its place.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::direct::Core;
use super::frame::{self, Format, HEADER_LEN};
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
/// ...and let the log's zero-filled part grow to this: the threshold and room for the
/// batch that crosses it, so that a busy store's batches seldom have to grow the file.
const PREALLOCATE: u64 = MATERIALIZE_AT + (1 << 20);
/// The zero-filled part of a new log: a store that writes little keeps a small log. A
/// batch that would run past the filled part first fills it further, to twice its size
/// (up to [`PREALLOCATE`]), so a busy store's log reaches its full size within its first
/// generation and stays there.
const PREALLOCATE_FIRST: u64 = 256 << 10;

/// The log's sizes: the defaults above, smaller in the power-loss simulator's tests (so a
/// short workload crosses several generations and grows past the preallocated part).
#[derive(Debug, Clone, Copy)]
pub(super) struct LogSizes {
    /// The log is zero-filled to this size when a generation starts on a shorter file.
    pub(super) prealloc: u64,
    /// A batch that would run past the zero-filled part first fills the file to twice its
    /// size, up to this.
    pub(super) prealloc_max: u64,
    /// The record files are brought up to date once the frames reach this offset.
    pub(super) materialize_at: u64,
    /// A deliberately broken writer for the power-loss oracle's tests: every generation
    /// keeps the first one's salt, so older generations' frames stay valid.
    #[cfg(test)]
    pub(super) broken_reuse_salt: bool,
}

impl Default for LogSizes {
    fn default() -> Self {
        LogSizes {
            prealloc: PREALLOCATE_FIRST,
            prealloc_max: PREALLOCATE,
            materialize_at: MATERIALIZE_AT,
            #[cfg(test)]
            broken_reuse_salt: false,
        }
    }
}

/// A log that recovery kept going (full disk): its open file, its generation's salt, where
/// its whole frames end and its size.
pub(super) struct Kept {
    file: Box<dyn FsFile>,
    salt: u64,
    len: u64,
    size: u64,
}
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
/// leader; everyone who queues meanwhile is answered by its commits. The leader commits one
/// batch on its own thread where it may block (`lead_once` under `block_in_place`, on a
/// multi-thread runtime), and leaves the rest of the queue to a leader on tokio's blocking
/// pool (`lead`), which commits until the queue is empty. (A blocking-pool task, unlike a
/// thread of our own, also keeps a paused test clock, which needs a current-thread runtime,
/// from jumping ahead while a commit runs.)
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
    /// `kept`: a log recovery could not replay yet (full disk), to go on writing to.
    pub(super) fn new(core: Arc<Core>, kept: Option<Kept>, sizes: LogSizes) -> Log {
        let mut writer = LogWriter {
            core,
            sizes,
            file: None,
            salt: None,
            last_salt: 0,
            len: HEADER_LEN,
            size: 0,
            named: false,
            prealloc_failed: false,
            cut_failed: false,
        };
        if let Some(k) = kept {
            writer.file = Some(k.file);
            writer.salt = Some(k.salt);
            writer.last_salt = k.salt;
            writer.len = k.len;
            writer.size = k.size;
            // It held acknowledged frames, so the writer that made it synced its name.
            writer.named = true;
        }
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
        while self.lead_once() {}
    }

    /// The leader's step: commits one batch of what is queued. Returns whether the caller
    /// is still the leader (more was queued meanwhile); once it returns `false`, nothing is
    /// queued and a writer queueing later starts a new leader.
    pub(super) fn lead_once(&self) -> bool {
        let mut writer = lock(&self.writer);
        let batch = {
            let mut q = lock(&self.queue);
            if q.closed {
                // Only requests whose callers gave up can be left when the last handle
                // is dropped: refuse them, the files are final.
                for req in q.waiting.drain(..) {
                    req.answer(Err(StateError::unavailable("the file backend was dropped")));
                }
                q.leading = false;
                return false;
            }
            if q.waiting.is_empty() {
                // Decided under the queue lock: a writer queueing after this starts a
                // new leader.
                q.leading = false;
                return false;
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
        if writer.len >= writer.sizes.materialize_at {
            writer.materialize_logged();
        }
        let mut q = lock(&self.queue);
        if q.waiting.is_empty() && !q.closed {
            q.leading = false;
            return false;
        }
        true
    }

    /// Closes the log for good (the backend's last handle is gone): a leader that starts
    /// later writes nothing. Waits for a running commit (the writer lock), then brings the
    /// record files up to date and starts an empty generation (the file stays, for the
    /// next open to reuse).
    pub(super) fn close(&self) {
        lock(&self.queue).closed = true;
        lock(&self.writer).materialize_logged();
    }
}

/// What the leader commits with.
struct LogWriter {
    core: Arc<Core>,
    sizes: LogSizes,
    /// The log, open for writing in place, once this writer has opened it (or recovery
    /// handed it over).
    file: Option<Box<dyn FsFile>>,
    /// The live generation's salt, once its header is durable: frames may be written at
    /// `len`. `None`: a generation must begin before the next frame.
    salt: Option<u64>,
    /// The salt of the last generation begun (a new one must differ).
    last_salt: u64,
    /// Where the next batch goes: the end of the live generation's whole, durable frames.
    len: u64,
    /// The log file's durable size.
    size: u64,
    /// The log's name is durable in its directory (synced by this writer).
    named: bool,
    /// Preallocating failed for want of room: the log grows with its frames instead.
    prealloc_failed: bool,
    /// A failed write could not be zeroed again: nothing may be written after it.
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

    /// Writes the batch's frames, makes them durable, then publishes them to the overlay
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
                    _ => (std::io::ErrorKind::Other, None, "writing to the log"),
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

    /// Writes the frames of `reqs` as one batch after the live generation's last frame and
    /// makes them durable. On failure what the batch may have left is zeroed again (see
    /// [`zero_failed`](Self::zero_failed)), so a failed write leaves nothing that a replay
    /// would apply, and the next batch is written in its place.
    fn append(&mut self, reqs: &[LogReq]) -> Result<()> {
        if self.cut_failed || self.salt.is_none() {
            // Frames go only into a generation whose header is durable, and never after a
            // failed write that could not be zeroed (a replay would stop at it, or take
            // it): first the files are brought up to date and a new generation begins.
            self.restart()?;
        }
        let path = self.core.wal_path();
        let (Some(salt), Some(file)) = (self.salt, self.file.as_mut()) else {
            return Err(StateError::unavailable("log not open"));
        };
        // Every frame names the offset where its batch starts: what tells a torn last batch
        // from damage to an earlier one at replay (`frame.rs`). A failed batch is zeroed,
        // and the next one starts at the same place.
        let start = self.len;
        let mut frames = Vec::new();
        for req in reqs {
            frame::encode(&mut frames, req.key(), req.value(), start, salt)
                .map_err(|why| StateError::Config { message: why.to_owned() })?;
        }
        let end = start + frames.len() as u64;
        // Growing ahead: a batch that would run past the zero-filled part first fills the
        // file to twice its size (up to `prealloc_max`), so that later batches, also of
        // later generations, write into blocks that exist. The fill and the frames reach
        // the disk with the batch's one `fdatasync`; until then the file's durable size is
        // `self.size`, which a failed batch cuts the file back to (`zero_failed`). A crash
        // before the sync leaves zeros or nothing past the whole frames: a torn tail.
        let mut grown = Ok(self.size);
        if end > self.size && self.size < self.sizes.prealloc_max {
            let cap = self.sizes.prealloc_max.max(end);
            let target = self.size.saturating_mul(2).max(end).min(cap);
            grown = fill_ahead(file.as_mut(), &mut self.prealloc_failed, self.size, target);
        }
        let result = grown
            .and_then(|grown| file.write_at(&frames, start).map(|()| grown))
            .map_err(|e| StateError::io("writing to the log", &path, e))
            // The frames must be on disk before any caller hears Ok.
            .and_then(|grown| {
                file.sync_data().map_err(|e| StateError::io("syncing the log", &path, e))?;
                Ok(grown)
            });
        match result {
            Ok(grown) => {
                self.len = end;
                self.size = grown.max(end);
                Ok(())
            }
            Err(e) => {
                self.file = None;
                match self.zero_failed(start, end) {
                    Ok(f) => self.file = Some(f),
                    Err(cut_err) => {
                        // Not zeroed: bring the files up to date from the overlay and begin
                        // a new generation before the next write.
                        tracing::warn!(error = %cut_err, "could not zero a failed write in the log");
                        self.cut_failed = true;
                    }
                }
                Err(e)
            }
        }
    }

    /// Zeroes what a failed batch may have left between `start` and `end` and cuts the
    /// file back to its durable size where the batch grew it, through a fresh descriptor
    /// (one whose sync failed is never synced again), then syncs. Returns that descriptor
    /// for the next batch.
    fn zero_failed(&self, start: u64, end: u64) -> std::io::Result<Box<dyn FsFile>> {
        let mut f = self.core.fs.open_in_place(&self.core.wal_path())?;
        let within = end.min(self.size);
        if start < within {
            zero_fill(f.as_mut(), start, within)?;
        }
        if f.len()? > self.size {
            f.set_len(self.size)?;
        }
        f.sync_data()?;
        Ok(f)
    }

    /// Brings the record files up to date, unless there is nothing to bring (the live
    /// generation holds no frame and nothing failed).
    fn materialize(&mut self) -> Result<()> {
        let idle = lock(&self.core.overlay).is_empty()
            && !self.cut_failed
            && (self.salt.is_none() || self.len == HEADER_LEN);
        if idle {
            return Ok(());
        }
        self.restart()
    }

    /// Writes every overlay entry to its record file, durably, then begins a new generation
    /// of the log (which disowns every frame in the file) and only then clears the overlay.
    fn restart(&mut self) -> Result<()> {
        let entries: Vec<(StorageKey, Option<Arc<Vec<u8>>>)> =
            lock(&self.core.overlay).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if !entries.is_empty() {
            self.core.write_records(
                entries.iter().map(|(k, v)| (k, v.as_ref().map(|v| v.as_slice()))),
            )?;
        }
        // Every entry is durable in its own file now: the live generation may be disowned.
        // Until the new header is durable, the overlay keeps the old generation's keys, so
        // their deletes still go through the log and none is unlinked directly under a
        // frame a replay could take again.
        self.begin_generation()?;
        self.cut_failed = false;
        // Only the writer (whose lock the caller holds) adds to the overlay, so it holds
        // exactly the entries just written.
        lock(&self.core.overlay).clear();
        Ok(())
    }

    /// Starts a new generation in place: a header with a fresh salt at offset 0, zeros up
    /// to the preallocated size if the file is shorter, one `fdatasync` for both, and the
    /// first time, an `fsync` of the directory for the log's name. Frames of every earlier
    /// generation left in the file are never replayed again once the header is on disk; the
    /// caller makes sure they are all durable in their record files first.
    fn begin_generation(&mut self) -> Result<()> {
        self.salt = None;
        let path = self.core.wal_path();
        let fs = self.core.fs.clone();
        let io = |op: &'static str| {
            let path = path.clone();
            move |e| StateError::io(op, &path, e)
        };
        if self.file.is_none() {
            // Created here if there is none (the first write of a new store, or recovery
            // removed a log of an older format); an existing one is reused as it is.
            let mut f = fs.open_in_place(&path).map_err(io("opening the log"))?;
            self.size = f.len().map_err(io("opening the log"))?;
            self.file = Some(f);
        }
        let mut salt = crate::random::unique_u64();
        while salt == self.last_salt {
            salt = crate::random::unique_u64();
        }
        #[cfg(test)]
        if self.sizes.broken_reuse_salt && self.last_salt != 0 {
            salt = self.last_salt;
        }
        let prealloc = self.sizes.prealloc.max(HEADER_LEN);
        let size = self.size;
        let Some(file) = self.file.as_mut() else {
            return Err(StateError::unavailable("log not open"));
        };
        let mut new_size = size;
        let written = file
            .write_at(&frame::header(salt), 0)
            .and_then(|()| {
                new_size = size.max(HEADER_LEN);
                if size < prealloc {
                    new_size =
                        fill_ahead(file.as_mut(), &mut self.prealloc_failed, new_size, prealloc)?;
                }
                Ok(())
            })
            // The header (and the file's new size) must be on disk before any frame of the
            // new generation is written after it.
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            // A fresh descriptor next time: one whose sync failed is never synced again.
            self.file = None;
            return Err(StateError::io("starting a new generation of the log", &path, e));
        }
        self.size = new_size;
        if !self.named {
            // A new log's name must be durable too, or a power loss takes the whole log
            // with the frames acknowledged in it. Synced once per writer: the name may also
            // be new from a process that crashed before syncing it.
            let dir = self.core.root.join(METADATA);
            fs.sync_dir(&dir).map_err(|e| StateError::io("syncing directory", &dir, e))?;
            self.named = true;
        }
        self.salt = Some(salt);
        self.last_salt = salt;
        self.len = HEADER_LEN;
        Ok(())
    }
}

/// Fills the log with zeros from its size `from` up to `to`, so that frames are later
/// written into blocks that exist; returns the size it has then. The caller's next
/// `fdatasync` makes the fill durable (until then a crash leaves zeros or nothing there,
/// which a replay treats as the end of the frames). Without room (`ENOSPC`) the fill is
/// cut back to `from` (that is room for the frames and the record files), `failed` is set
/// and `from` returned: the log grows with its frames from then on, and this writer does
/// not try again (each try fills the disk for a moment). Once `failed`, nothing is filled.
fn fill_ahead(
    file: &mut dyn FsFile,
    failed: &mut bool,
    from: u64,
    to: u64,
) -> std::io::Result<u64> {
    if *failed || to <= from {
        return Ok(from);
    }
    match zero_fill(file, from, to) {
        Ok(()) => Ok(to),
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
            tracing::info!(
                to,
                "no room to fill the write-ahead log ahead; it grows with its frames"
            );
            *failed = true;
            file.set_len(from).map(|()| from)
        }
        Err(e) => Err(e),
    }
}

/// Writes zeros over `from..to` of `file`, a megabyte at a time.
fn zero_fill(file: &mut dyn FsFile, from: u64, to: u64) -> std::io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(to.saturating_sub(from)) as usize];
    let mut at = from;
    while at < to {
        let n = CHUNK.min(to - at) as usize;
        file.write_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

impl Core {
    fn wal_path(&self) -> PathBuf {
        self.root.join(METADATA).join(WAL)
    }

    /// Removes the log, durably (a log of an older format once replayed, and any log in
    /// direct mode, which keeps none). Called only when nothing in it is needed any more:
    /// every value it holds is durable in its record file. If a crash comes before the
    /// removal is durable, the next open replays the log and rewrites the same values.
    fn remove_log(&self) -> Result<()> {
        let path = self.wal_path();
        self.fs.remove_file(&path).map_err(|e| StateError::io("removing the log", &path, e))?;
        let dir = self.root.join(METADATA);
        self.fs.sync_dir(&dir).map_err(|e| StateError::io("syncing directory", &dir, e))
    }

    /// At open, with the lock held: replays the live generation of a log a crash left
    /// behind into the record files, then disowns it (log mode: a new header, synced; the
    /// file stays to be reused) or removes it (direct mode, and a log of an older format).
    /// A torn tail (a write that was never acknowledged) is ignored.
    ///
    /// The replayed generation must be disowned before the store is used: a record it held
    /// may be deleted directly next (its key is in no overlay any more), and a replay of
    /// the same frames after the next crash would bring it back.
    ///
    /// Damage followed by whole frames of a later batch is not a torn tail: it hit writes
    /// that were acknowledged (see `frame.rs`). Then the open fails with
    /// [`StateError::Corrupt`] naming the log, before anything is written: the log stays in
    /// place byte for byte and no record file is touched, so nothing is lost and it can be
    /// inspected, cut or moved aside by hand (the message says how). Replaying the frames
    /// before the damage alone would give back older values than were acknowledged, as if
    /// nothing were wrong.
    ///
    /// In log mode, a disk too full for the second copy does not stop the open of a
    /// format-3 log: the log's values go to the overlay, everything after its whole frames
    /// is zeroed (in place: no new blocks) and the generation is kept, and its handle is
    /// returned for the writer to go on writing; the files are brought up to date later,
    /// once there is room. (A log of an older format on a full disk fails the open with
    /// [`StateError::StorageFull`], touching nothing.)
    pub(super) fn recover_log(&self, log_mode: bool) -> Result<Option<Kept>> {
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
                     either overwrite it with zeros from byte {} on (the writes from the damage on are lost) or \
                     move it out of the store (every write it holds is lost; the record files keep their older \
                     values)",
                    d.at,
                    bytes.len(),
                    d.next_frame,
                    path.display(),
                    d.at
                ),
            )
        })?;
        let salted = match replayed.format {
            Format::Salted(salt) => Some(salt),
            Format::Older | Format::BadHeader => None,
        };
        if salted.is_none() && replayed.valid_len < bytes.len() {
            tracing::info!(
                ignored_bytes = bytes.len() - replayed.valid_len,
                "the write-ahead log ends in an unacknowledged, torn write; ignoring it"
            );
        }
        // A format-3 log (even one whose header does not check) is reused in log mode.
        let reuse = log_mode && replayed.format != Format::Older;
        let frames = replayed.frames.len();
        if frames == 0 {
            // Nothing to replay, so nothing to disown: the writer begins a new generation
            // before its first frame anyway.
            if !reuse {
                self.remove_log()?;
            }
            return Ok(None);
        }
        let mut latest: HashMap<StorageKey, Option<Vec<u8>>> = HashMap::new();
        for (k, v) in replayed.frames {
            latest.insert(k, v);
        }
        match self.write_records(latest.iter().map(|(k, v)| (k, v.as_deref()))) {
            Ok(()) => {}
            Err(e @ StateError::StorageFull { .. }) if reuse => {
                let Some(salt) = salted else { return Err(e) };
                tracing::warn!(error = %e, "no room to replay the write-ahead log into the record files; serving it from memory");
                let valid = replayed.valid_len as u64;
                let size = bytes.len() as u64;
                let mut file = self
                    .fs
                    .open_in_place(&path)
                    .map_err(|e| StateError::io("opening the log", &path, e))?;
                // The writer goes on after the last whole frame. A torn batch after it may
                // hold whole frames of this generation: they must be gone before the next
                // batch is written, or a replay after it could take one.
                zero_fill(file.as_mut(), valid, size)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| StateError::io("zeroing the log's torn tail", &path, e))?;
                lock(&self.overlay).extend(latest.into_iter().map(|(k, v)| (k, v.map(Arc::new))));
                return Ok(Some(Kept { file, salt, len: valid, size }));
            }
            Err(e) => return Err(e),
        }
        if reuse {
            // Every value of the replayed generation is durable in its record file: disown
            // it before anything else is written (see above). A crash before this header
            // is durable replays the same frames into the same files again.
            let salt = loop {
                let s = crate::random::unique_u64();
                if Some(s) != salted {
                    break s;
                }
            };
            let mut file = self
                .fs
                .open_in_place(&path)
                .map_err(|e| StateError::io("opening the log", &path, e))?;
            file.write_at(&frame::header(salt), 0)
                .and_then(|()| file.sync_data())
                .map_err(|e| StateError::io("starting a new generation of the log", &path, e))?;
        } else {
            self.remove_log()?;
        }
        tracing::info!(
            frames,
            records = latest.len(),
            "replayed the write-ahead log into the record files"
        );
        Ok(None)
    }

    /// What the overlay says of `key`: `Some(Some(v))` written, `Some(None)` deleted,
    /// `None` nothing pending (the record file is current).
    pub(super) fn pending(&self, key: &StorageKey) -> Option<Option<Arc<Vec<u8>>>> {
        lock(&self.overlay).get(key).cloned()
    }
}
