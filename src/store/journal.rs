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
/// lines still queued stay, and the next writer appends them. An appender that finishes
/// clears the flag itself, under the queue's lock, when it finds the queue empty.
struct Appending<'a> {
    journal: &'a Journal,
    finished: bool,
}

impl Drop for Appending<'_> {
    fn drop(&mut self) {
        if !self.finished {
            lock(&self.journal.queue).appending = false;
        }
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
        let mut guard = Appending { journal: self, finished: false };
        let _writing = self.writing.lock().await;
        for _ in 0..ROUNDS {
            if !self.append_round().await {
                guard.finished = true;
                return;
            }
        }
        // Still more: a task takes over (the flag stays set for it).
        guard.finished = true;
        let journal = self.clone();
        tokio::spawn(async move {
            let mut guard = Appending { journal: &journal, finished: false };
            let _writing = journal.writing.lock().await;
            while journal.append_round().await {}
            guard.finished = true;
        });
    }

    /// Appends the lines queued now. Returns `false` if there were none, having cleared the
    /// appending flag under the same lock: a line queued after that starts an appender of
    /// its own, and none is left behind.
    async fn append_round(&self) -> bool {
        let lines = {
            let mut q = lock(&self.queue);
            if q.lines.is_empty() {
                q.appending = false;
                return false;
            }
            std::mem::take(&mut q.lines)
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorageBackend;

    async fn journal_text(backend: &Arc<dyn StorageBackend>) -> String {
        let bytes = backend.get(&keys::journal()).await.unwrap().unwrap_or_default();
        String::from_utf8(bytes).unwrap()
    }

    /// Lines queued by many writers at once are all appended, each writer's in its order,
    /// and the flag is clear once they are (the next line starts an appender).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_queued_line_is_appended_in_order() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryStorageBackend::new());
        let journal = Arc::new(Journal::new(backend.clone()));
        let order = Arc::new(tokio::sync::Mutex::new(()));
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..16 {
            let (journal, order) = (journal.clone(), order.clone());
            writers.spawn(async move {
                for i in 0..50 {
                    // As the store does: queued under its lock, appended after it.
                    let appender = {
                        let _lock = order.lock().await;
                        journal.queue(format!("w{w} {i}\n").as_bytes())
                    };
                    if appender {
                        journal.append().await;
                    }
                }
            });
        }
        while writers.join_next().await.transpose().unwrap().is_some() {}
        // A task may still be appending the last lines: wait for the write lock, then look.
        drop(journal.writing.lock().await);
        let text = journal_text(&backend).await;
        for w in 0..16 {
            let mine: Vec<&str> =
                text.lines().filter(|l| l.starts_with(&format!("w{w} "))).collect();
            let expected: Vec<String> = (0..50).map(|i| format!("w{w} {i}")).collect();
            assert_eq!(mine, expected, "writer {w}'s lines");
        }
        assert!(!lock(&journal.queue).appending, "no appender is left marked");
    }

    /// A replacement drops the lines queued before it (its snapshot holds them), and lines
    /// queued after it are appended after it.
    #[tokio::test]
    async fn a_replacement_comes_after_every_line_queued_before_it() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryStorageBackend::new());
        let journal = Arc::new(Journal::new(backend.clone()));
        assert!(journal.queue(b"old 1\n"));
        journal.append().await;
        // Queued, not appended yet (its appender has not run), when the snapshot replaces.
        assert!(journal.queue(b"old 2\n"));
        journal.replace(b"snapshot\n".to_vec()).await.unwrap();
        journal.append().await;
        assert!(journal.queue(b"new 1\n"));
        journal.append().await;
        assert_eq!(journal_text(&backend).await, "snapshot\nnew 1\n");
    }

    /// An appender whose caller gave up before it appended leaves its lines queued and the
    /// flag clear: the next writer appends them with its own.
    #[tokio::test]
    async fn a_cancelled_appender_leaves_its_lines_to_the_next_writer() {
        let backend: Arc<dyn StorageBackend> = Arc::new(MemoryStorageBackend::new());
        let journal = Arc::new(Journal::new(backend.clone()));
        let held = journal.writing.lock().await;
        assert!(journal.queue(b"a\n"));
        let cancelled = journal.append();
        // Polled once (it waits for the write lock), then dropped.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), cancelled).await.is_err()
        );
        drop(held);
        assert!(journal.queue(b"b\n"), "the flag was cleared");
        journal.append().await;
        assert_eq!(journal_text(&backend).await, "a\nb\n");
    }
}
