//! The index journal's writer: appends journal lines without making the writes they
//! describe wait for one another. A record's write is answered once the record is durable
//! and its change is in the index; its journal line (which is never synced, see
//! [`index`](super::index)) is queued here in the order of the changes, and appended by the
//! first writer that finds no append running, together with every line queued meanwhile.
//! The other writers go on at once. (On the file backend a small append is one `write` to the page cache, made right
//! on the caller's thread: a hand-off to a task or a thread of its own costs more than the
//! append, see `BENCHMARKS.md`.)
//!
//! This module owns the queue of lines not yet appended and the right to write the journal
//! file. It calls only the backend. Why losing queued lines is safe: the journal is a hint.
//! A start after a crash (the running marker is there) re-reads every session record and
//! lists every checkpoint, so a change whose line never reached the file is found in the
//! records; only a clean shutdown's snapshot (written through [`Journal::replace`], after
//! every line queued before it) is trusted as it stands.

use std::sync::{Arc, Mutex};

use tracing::warn;

use super::keys;
use crate::backend::StorageBackend;
use crate::error::Result;
use crate::sync::lock;

/// Rounds of appends one writer makes before it leaves the rest to a task: a writer is not
/// held up by a stream of others' lines.
const ROUNDS: usize = 2;

/// The journal writer of one store (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct Journal {
    backend: Arc<dyn StorageBackend>,
    queue: Mutex<Queue>,
    /// Held by whoever writes the journal file: an appender, or a replacement. So a line
    /// queued before a snapshot is never appended after it.
    writing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Queue {
    /// Lines queued and not yet handed to the backend, in the order their changes were
    /// applied to the index.
    lines: Vec<u8>,
    /// Whether a writer (or a task) has taken on appending what is queued.
    appending: bool,
}

/// Clears the appending flag if an appender is dropped part way (its caller gave up): the
/// lines stay queued, and the next writer appends them.
struct Appending<'a>(&'a Journal);

impl Drop for Appending<'_> {
    fn drop(&mut self) {
        lock(&self.0.queue).appending = false;
    }
}

impl Journal {
    pub(crate) fn new(backend: Arc<dyn StorageBackend>) -> Journal {
        Journal { backend, queue: Mutex::new(Queue::default()), writing: Default::default() }
    }

    /// Queues `line`. Must be called in the order the lines' changes were applied to the
    /// index (the store calls it under its journal lock). Returns whether the caller is now
    /// the appender and must call [`append`](Self::append) (after letting go of that lock).
    pub(crate) fn queue(&self, line: &[u8]) -> bool {
        let mut q = lock(&self.queue);
        q.lines.extend_from_slice(line);
        !std::mem::replace(&mut q.appending, true)
    }

    /// The appender's part: appends what is queued, a few rounds, then leaves anything
    /// still queued to a task. An append that fails is logged and its lines are dropped:
    /// the records are durable already, and the next start reconciles the index with them
    /// (the running marker says it must).
    pub(crate) async fn append(self: &Arc<Self>) {
        let guard = Appending(self);
        let _writing = self.writing.lock().await;
        for _ in 0..ROUNDS {
            if !self.append_round().await {
                return; // `guard` clears the flag
            }
        }
        // Still more: a task takes over (the flag stays set for it).
        std::mem::forget(guard);
        let journal = self.clone();
        tokio::spawn(async move {
            let _guard = Appending(&journal);
            let _writing = journal.writing.lock().await;
            while journal.append_round().await {}
        });
    }

    /// Appends the lines queued now. Returns `false` if there were none.
    async fn append_round(&self) -> bool {
        let lines = std::mem::take(&mut lock(&self.queue).lines);
        if lines.is_empty() {
            return false;
        }
        if let Err(e) = self.backend.append(&keys::journal(), lines).await {
            warn!(error = %e, "index journal append failed; it will be rebuilt at the next start");
        }
        true
    }

    /// Waits for the append in flight, then replaces the journal with `bytes` (an atomic
    /// put). `bytes` must be a snapshot of the index taken after every queued line's change
    /// was applied (the caller holds the store's journal lock, under which lines are
    /// queued): the lines still queued are dropped, the snapshot holds their changes. On an
    /// error the journal file is as it was (the put is atomic) and the dropped lines are
    /// lost, which the next start's reconcile makes good.
    pub(crate) async fn replace(&self, bytes: Vec<u8>) -> Result<()> {
        let _writing = self.writing.lock().await;
        lock(&self.queue).lines.clear();
        self.backend.put(&keys::journal(), bytes).await
    }
}
