//! The PostgreSQL backend's appends to log keys (the index journal): acknowledged once
//! queued in memory, committed in order by one flusher task. Owns the queue, the flusher and
//! the "poisoned" logs; calls the writer's transaction (`writer::attempt_once`) and its
//! outcome check (`writer::resolve`).
//!
//! Why not wait for a commit: the contract does not make an append durable by itself (after
//! a crash a log may lack its tail; the store rebuilds its journal from the records), and the
//! store sends its journal lines one at a time, under a lock, after each save: a round trip
//! per line would cap the saves of all sessions together at one line per round trip. So
//! `append` queues the piece and returns. The next writer transaction takes the queued pieces
//! along (no extra commit, no extra WAL flush); pieces no writer took within
//! [`PIGGYBACK_WAIT`] are committed by the flusher, in one transaction with
//! `synchronous_commit = off` (the WAL is sequential, so the next durable commit flushes it
//! too). One batch of pieces is committed at a time (`committer`), so they land in order.
//!
//! What stays true:
//! - order: pieces are committed in the order they were queued, a batch all or nothing;
//! - read your appends: `get` and `list` of a log, and `put` and `delete` of one (which
//!   replace it), first wait until every piece queued before them is committed or dropped
//!   ([`Appender::settle`]);
//! - only a tail is ever lost: if a batch fails for good (refused, or its outcome unknown
//!   after the retries), its logs are *poisoned*: their pieces still queued are dropped and
//!   every later append to them fails with [`StateError::Unavailable`] until a put or delete
//!   replaces the log. So a log never has a hole followed by later pieces.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedMutexGuard, watch};

use super::error::{Failure, MAX_VALUE};
use super::writer::{Op, Stage, attempt_once, resolve};
use super::{Shared, real_time};
use crate::backend::StorageKey;
use crate::error::{Result, StateError};
use crate::sync::lock;

/// Pieces committed in one transaction at most.
const MAX_BATCH: usize = 1024;
/// Queued pieces beyond which `append` waits for the flusher (back-pressure: a caller
/// appending faster than the server commits must not grow the queue without bound).
const MAX_QUEUED: usize = 16 * 1024;
/// How long the flusher leaves queued pieces for a writer to take along.
const PIGGYBACK_WAIT: Duration = Duration::from_millis(2);
/// Retries of a batch after a transient failure. More than a write's: nobody waits on the
/// flusher, and giving up loses the logs' tails.
const RETRIES: u32 = 8;

/// The queue of appends and its flusher task.
#[derive(Debug)]
pub(super) struct Appender {
    state: Mutex<State>,
    /// Wakes the flusher: a piece was queued, or the backend is closing.
    wake: Notify,
    /// The sequence number below which every piece is settled (committed or dropped).
    settled: watch::Sender<u64>,
    /// Held by whoever commits pieces (the flusher, or a writer taking them along), so
    /// batches of pieces commit one at a time, in order.
    committer: Arc<tokio::sync::Mutex<()>>,
}

/// Pieces a writer took along into its transaction, and the right to commit them.
#[derive(Debug)]
pub(super) struct Ride {
    _turn: OwnedMutexGuard<()>,
    pub(super) ops: Vec<Op>,
}

#[derive(Debug, Default)]
struct State {
    /// Queued pieces, oldest first, numbered from `first`; `None`: dropped (its log was
    /// poisoned), kept so the numbering does not shift.
    queue: Vec<(StorageKey, Option<Vec<u8>>)>,
    first: u64,
    /// Logs whose appends failed: the reason.
    poisoned: HashMap<StorageKey, String>,
    closed: bool,
}

impl Appender {
    /// Starts the flusher on the current tokio runtime.
    pub(super) fn start(shared: Arc<Shared>) -> Arc<Self> {
        let appender = Arc::new(Appender {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            settled: watch::channel(0).0,
            committer: Arc::new(tokio::sync::Mutex::new(())),
        });
        tokio::spawn(flusher(shared, appender.clone()));
        appender
    }

    /// Queues `bytes` for the log `key`; waits for the flusher only when the queue is full.
    pub(super) async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        if self.queue(key, bytes)? >= MAX_QUEUED {
            self.settle().await;
        }
        Ok(())
    }

    /// Queues `bytes` for the log `key`; returns the length of the queue.
    fn queue(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<usize> {
        if bytes.len() > MAX_VALUE {
            return Err(StateError::TooLarge { size: bytes.len(), limit: MAX_VALUE });
        }
        let mut state = lock(&self.state);
        if state.closed {
            return Err(StateError::unavailable("the PostgreSQL backend is closed"));
        }
        if let Some(why) = state.poisoned.get(key) {
            return Err(StateError::unavailable(format!(
                "an earlier append to {key} failed ({why}); the log lacks its tail until a put \
                 or delete replaces it"
            )));
        }
        state.queue.push((key.clone(), Some(bytes)));
        let queued = state.queue.len();
        drop(state);
        self.wake.notify_one();
        Ok(queued)
    }

    /// Waits until every piece queued so far is committed or dropped.
    pub(super) async fn settle(&self) {
        let target = {
            let state = lock(&self.state);
            state.first + state.queue.len() as u64
        };
        let mut settled = self.settled.subscribe();
        // An error means the flusher is gone (its runtime ended): nothing more will settle.
        let _ = settled.wait_for(|done| *done >= target).await;
    }

    /// The queued pieces, for a writer to commit in its own transaction, if no other batch
    /// of pieces is being committed (then the writer does not wait: the flusher has them).
    pub(super) fn try_take(&self) -> Option<Ride> {
        let turn = self.committer.clone().try_lock_owned().ok()?;
        let ops = take(self)?;
        Some(Ride { _turn: turn, ops })
    }

    /// Records the outcome of the pieces a writer took along (`Err`: they may be missing).
    pub(super) fn finish(&self, ride: Ride, result: Result<(), String>) {
        settle_batch(self, ride.ops, result);
    }

    /// After a put or delete of `key` replaced the log: appends to it work again.
    pub(super) fn replaced(&self, key: &StorageKey) {
        lock(&self.state).poisoned.remove(key);
    }

    /// Lets the flusher commit what is queued and end.
    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.wake.notify_one();
    }
}

/// The flusher: commits queued pieces in order until the appender is closed and empty.
async fn flusher(shared: Arc<Shared>, appender: Arc<Appender>) {
    // One transaction, no flush wait: see the module doc.
    let begin = {
        let mut begin = "BEGIN; SET LOCAL synchronous_commit = off".to_owned();
        if let Some(t) = shared.statement_timeout {
            begin.push_str(&format!("; SET LOCAL statement_timeout = {}", t.as_millis()));
        }
        begin.push_str("; SELECT txid_current()");
        begin
    };
    loop {
        // Register for a wake-up before looking at the queue, so a piece queued in between
        // is not missed.
        let woken = appender.wake.notified();
        if !lock(&appender.state).queue.is_empty() {
            // Give a writer's transaction, if one is starting, the chance to take the pieces
            // along (one WAL flush instead of two).
            real_time::sleep(PIGGYBACK_WAIT).await;
        }
        let _turn = appender.committer.lock().await;
        let taken = take(&appender);
        let batch = match taken {
            Some(batch) => batch,
            None if lock(&appender.state).closed => return,
            None => {
                woken.await;
                continue;
            }
        };
        let failed = match batch.is_empty() {
            true => Ok(()),
            false => commit(&shared, &begin, &batch).await,
        };
        settle_batch(&appender, batch, failed);
    }
}

/// Records the outcome of a batch: on failure poisons its logs and drops what is queued for
/// them; then everything taken so far counts as settled.
fn settle_batch(appender: &Appender, batch: Vec<Op>, failed: Result<(), String>) {
    {
        let mut state = lock(&appender.state);
        if let Err(why) = failed {
            tracing::warn!(reason = %why, "PostgreSQL log append failed; the log lacks its tail");
            let keys: Vec<StorageKey> = batch
                .into_iter()
                .filter_map(|op| match op {
                    Op::Append(key, _) | Op::AppendLog(key, _) => Some(key),
                    _ => None,
                })
                .collect();
            // Drop what is queued for these logs after the failed batch: a hole must not be
            // followed by later pieces.
            for (key, bytes) in state.queue.iter_mut() {
                if keys.contains(key) {
                    *bytes = None;
                }
            }
            for key in keys {
                state.poisoned.insert(key, why.clone());
            }
        }
        // Every piece numbered below `first` is committed or dropped.
        let first = state.first;
        drop(state);
        appender.settled.send_replace(first);
    }
}

/// Takes up to [`MAX_BATCH`] queued pieces (the dropped ones left out); `None` if none.
fn take(appender: &Appender) -> Option<Vec<Op>> {
    let mut state = lock(&appender.state);
    if state.queue.is_empty() {
        return None;
    }
    let n = state.queue.len().min(MAX_BATCH);
    state.first += n as u64;
    // One statement per log, its pieces in order: one update of the log's head row rather
    // than one per piece.
    let mut ops: Vec<Op> = Vec::new();
    for (key, bytes) in state.queue.drain(..n) {
        let Some(bytes) = bytes else { continue };
        match ops.iter_mut().find(|op| matches!(op, Op::AppendLog(k, _) if *k == key)) {
            Some(Op::AppendLog(_, pieces)) => pieces.push(bytes),
            _ => ops.push(Op::AppendLog(key, vec![bytes])),
        }
    }
    Some(ops)
}

/// Commits `batch` in one transaction, retrying transient failures; a lost COMMIT is
/// resolved by the transaction's id. `Err`: the batch may be missing (a tail of its logs).
async fn commit(shared: &Shared, begin: &str, batch: &[Op]) -> Result<(), String> {
    let ops: Vec<&Op> = batch.iter().collect();
    let mut attempt = 0;
    loop {
        let mut stage = Stage::Open;
        let bound = shared.attempt_bound();
        let result = match bound {
            Some(bound) => real_time::within(bound, attempt_once(shared, begin, &ops, &mut stage))
                .await
                .unwrap_or(Err(Failure::Deadline(bound))),
            None => real_time::hold(attempt_once(shared, begin, &ops, &mut stage)).await,
        };
        let failure = match result {
            Ok(_) => return Ok(()),
            Err(failure) => failure,
        };
        let retry = match stage {
            Stage::Open => failure.transient(),
            Stage::CommitSent { xid, .. } => match resolve(shared, xid).await {
                Some(true) => return Ok(()),
                Some(false) => true,
                // Going again could commit the pieces twice.
                None => return Err(format!("outcome unknown: {}", failure.reason())),
            },
        };
        if !retry || attempt >= RETRIES {
            return Err(failure.reason());
        }
        attempt += 1;
        real_time::sleep(Duration::from_millis((25 << (2 * attempt)).min(1000))).await;
    }
}
