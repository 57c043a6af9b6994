//! The SQLite backend's one writer: a thread that owns the read-write connection and commits
//! every queued write together (group commit). Owns the queue, the thread and the SQL of the
//! three writes; calls only rusqlite and the error mapping of `super`.
//!
//! A caller queues its write with a reply channel and awaits the answer, so no tokio worker
//! ever blocks on SQLite. The thread takes the first write, then everything queued behind it
//! (up to [`MAX_BATCH`]), runs them in one `BEGIN IMMEDIATE` … `COMMIT`, and answers each
//! caller only after the commit returned (with `synchronous=FULL`: after the WAL's fsync).
//! Writes that arrive while a commit runs form the next batch, so many sessions saving at
//! once share one fsync.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;

use super::{MAX_VALUE, sql_error};
use crate::backend::StorageKey;
use crate::error::{Result, StateError};

/// Writes committed in one transaction at most: bounds the time a batch holds its callers.
const MAX_BATCH: usize = 256;

/// One write.
pub(super) enum Op {
    Put(StorageKey, Vec<u8>),
    Delete(StorageKey),
    Append(StorageKey, Vec<u8>),
}

impl Op {
    fn key(&self) -> &StorageKey {
        match self {
            Op::Put(k, _) | Op::Delete(k) | Op::Append(k, _) => k,
        }
    }

    fn size(&self) -> usize {
        match self {
            Op::Put(_, v) | Op::Append(_, v) => v.len(),
            Op::Delete(_) => 0,
        }
    }

    fn verb(&self) -> &'static str {
        match self {
            Op::Put(..) => "writing",
            Op::Delete(_) => "deleting",
            Op::Append(..) => "appending to",
        }
    }

    /// Runs the write in the open transaction. `Ok(true)` when a delete found its key (and
    /// for every put and append).
    fn apply(&self, conn: &Connection) -> rusqlite::Result<bool> {
        match self {
            Op::Put(key, value) => {
                let mut st = conn.prepare_cached(
                    "INSERT INTO kv (key, value) VALUES (?1, ?2) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )?;
                st.execute((key.as_str(), value.as_slice()))?;
                // A put replaces a log's appended pieces too.
                conn.prepare_cached("DELETE FROM tail WHERE key = ?1")?.execute([key.as_str()])?;
                Ok(true)
            }
            Op::Delete(key) => {
                let mut st = conn.prepare_cached("DELETE FROM kv WHERE key = ?1")?;
                let existed = st.execute([key.as_str()])? > 0;
                conn.prepare_cached("DELETE FROM tail WHERE key = ?1")?.execute([key.as_str()])?;
                Ok(existed)
            }
            Op::Append(key, bytes) => {
                // One new row per append, after the key's last piece: the cost of an append
                // does not grow with the log (concatenating into the value would rewrite all
                // of it each time). The key's row in `kv` (empty if the log is new) is the
                // head that `get` and `list` start from.
                conn.prepare_cached(
                    "INSERT INTO kv (key, value) VALUES (?1, x'') ON CONFLICT (key) DO NOTHING",
                )?
                .execute([key.as_str()])?;
                conn.prepare_cached(
                    "INSERT INTO tail (key, seq, bytes) \
                     SELECT ?1, coalesce(max(seq), 0) + 1, ?2 FROM tail WHERE key = ?1",
                )?
                .execute((key.as_str(), bytes.as_slice()))?;
                Ok(true)
            }
        }
    }
}

struct Req {
    op: Op,
    reply: oneshot::Sender<Result<bool>>,
}

/// The handle of the writer thread. Dropping it (or [`close`](Self::close)) lets the thread
/// finish what is queued, close the connection and end.
pub(super) struct Writer {
    queue: Option<mpsc::Sender<Req>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("open", &self.queue.is_some()).finish()
    }
}

impl Writer {
    /// Starts the writer thread over `conn` (read-write, schema in place).
    pub(super) fn start(conn: Connection, path: Arc<Path>) -> Result<Self> {
        let (queue, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("mars-state-sqlite-writer".into())
            .spawn(move || run(conn, &rx, &path))
            .map_err(|e| StateError::unavailable(format!("cannot start the SQLite writer: {e}")))?;
        Ok(Writer { queue: Some(queue), thread: Some(thread) })
    }

    /// Queues `op` and waits for its answer, given after its transaction committed (or
    /// failed and left the old values).
    pub(super) async fn submit(&self, op: Op) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        let sent = self.queue.as_ref().map(|q| q.send(Req { op, reply }).is_ok());
        if sent != Some(true) {
            return Err(StateError::unavailable("the SQLite writer has stopped"));
        }
        answer.await.map_err(|_| {
            StateError::unavailable("the SQLite writer stopped before answering; outcome unknown")
        })?
    }

    /// Closes the queue and waits for the thread to commit what was queued and close the
    /// database (blocks the calling thread for at most one commit).
    pub(super) fn close(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            // A panic in the thread was already reported to its callers as "outcome unknown".
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.close();
    }
}

/// The thread: batches until the queue is closed and empty. The connection is dropped (and
/// so closed, which checkpoints the WAL into the database file) when it returns.
fn run(mut conn: Connection, rx: &mpsc::Receiver<Req>, path: &Path) {
    // After a commit failed with an I/O error (a failed write or fsync of the WAL), refuse
    // every later write until the store is reopened: the OS may have dropped the pages it
    // could not write, so what the file holds is no longer known.
    let mut failed: Option<String> = None;
    // Whether the connection is at synchronous=FULL (as opened) or NORMAL (the last batch
    // was appends only).
    let mut full = true;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(MAX_BATCH - 1));
        if let Some(why) = &failed {
            for req in batch {
                let _ = req.reply.send(Err(StateError::unavailable(format!(
                    "an earlier commit to {} failed ({why}); reopen the store",
                    path.display()
                ))));
            }
            continue;
        }
        // Appends (the index journal) need not be durable by themselves (the contract: a
        // crash may cut a log's tail), and the store sends them one at a time: a batch of
        // appends only commits at NORMAL, without waiting for an fsync. No write answered as
        // durable loses by it: the WAL is sequential, so the next FULL commit's fsync covers
        // these frames too. A batch with any put or delete commits at FULL.
        let want_full = batch.iter().any(|r| !matches!(r.op, Op::Append(..)));
        if want_full != full {
            let level = if want_full { "FULL" } else { "NORMAL" };
            if let Err(e) = conn.pragma_update(None, "synchronous", level) {
                for req in batch {
                    let _ = req.reply.send(Err(error_of(&e, &req.op, path)));
                }
                continue;
            }
            full = want_full;
        }
        let (reqs, results): (Vec<Req>, Vec<Result<bool>>) = match commit(&mut conn, batch) {
            Ok((reqs, results)) => {
                let results = reqs
                    .iter()
                    .zip(results)
                    .map(|(r, result)| result.map_err(|e| error_of(&e, &r.op, path)))
                    .collect();
                (reqs, results)
            }
            Err((reqs, e)) => {
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::SystemIoFailure) {
                    failed = Some(e.to_string());
                }
                let results = reqs.iter().map(|r| Err(error_of(&e, &r.op, path))).collect();
                (reqs, results)
            }
        };
        for (req, result) in reqs.into_iter().zip(results) {
            // A caller that gave up is not waiting for the answer.
            let _ = req.reply.send(result);
        }
    }
}

type Committed = (Vec<Req>, Vec<rusqlite::Result<bool>>);

/// Runs `batch` in one transaction. `Ok` holds each write's own result (a write that failed
/// alone, such as a value over SQLite's limit, was undone by itself); `Err` means the whole
/// transaction failed and was rolled back: no write of the batch happened.
fn commit(
    conn: &mut Connection,
    batch: Vec<Req>,
) -> Result<Committed, (Vec<Req>, rusqlite::Error)> {
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return Err((batch, e)),
    };
    let mut results = Vec::with_capacity(batch.len());
    let mut ended = None;
    for req in &batch {
        let result = if req.op.size() > MAX_VALUE {
            Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_TOOBIG),
                None,
            ))
        } else {
            req.op.apply(&tx)
        };
        match result {
            // A failed statement is undone alone, unless the error ended the transaction
            // (disk full, I/O): then nothing of the batch is written.
            Err(e) if tx.is_autocommit() => {
                ended = Some(e);
                break;
            }
            result => results.push(result),
        }
    }
    if let Some(e) = ended {
        drop(tx);
        return Err((batch, e));
    }
    // With synchronous=FULL this returns once the WAL (and the commit record in it) is
    // fsynced: the point at which every write of the batch is durable.
    match tx.commit() {
        Ok(()) => Ok((batch, results)),
        Err(e) => Err((batch, e)),
    }
}

/// The typed error for `op` failing with `e`.
fn error_of(e: &rusqlite::Error, op: &Op, path: &Path) -> StateError {
    sql_error(e, op.verb(), path, Some(op.key()), op.size())
}
