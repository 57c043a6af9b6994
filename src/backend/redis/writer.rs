//! The Redis backend's one writer: a task that owns the write connection and sends every
//! write queued while the previous round trip was in flight as one pipeline (group commit).
//! Owns the queue, the task, the batching and the retry rule; calls redis-rs, the layout's
//! names and the error mapping of `super`.
//!
//! A caller queues its write with a reply channel and awaits the answer. The task takes the
//! first write, then everything queued behind it (up to [`MAX_BATCH`] writes or
//! [`MAX_BATCH_BYTES`]), sends them as one pipeline of `EVALSHA`s, and answers each caller
//! from its own reply. Redis runs the pipeline's scripts in one pass of its event loop and,
//! with `appendfsync always`, writes and fsyncs the AOF once before sending the replies: many
//! sessions saving at once share one fsync.
//!
//! Appends are acknowledged when queued, not when Redis answers. The store appends to its
//! index journal under one lock, one append at a time, after each save: waiting for each
//! append's fsync would put one round trip and one fsync per save in series, whatever the
//! batching. The contract does not make an append durable (a crash may cut a log's tail),
//! and a queued append is sent before any later write or read of this backend (reads of a
//! store with appends in flight go through the queue behind them, see [`Writer::barrier`]),
//! so the caller sees its append. If an acknowledged append then fails, its log is
//! *poisoned*: every later append to it fails with [`StateError::Unavailable`] until a put
//! or delete replaces it, so the log never has a gap, only a missing tail.
//!
//! Retries: a write whose round trip failed without an answer (the connection dropped) has
//! an unknown outcome. A put or a delete is sent once more on the reconnected connection:
//! both are idempotent, and the session actor never has two writes to one key in flight, so
//! the retry cannot overwrite a newer value. (A retried delete that had been applied reports
//! `false`.) Fenced puts and deletes are retried too; a retry refused by its fence
//! (another node took the lease meanwhile) is answered "outcome unknown", not `Fenced`, since
//! the first copy may have been applied before the takeover. An append is never retried: a
//! second copy would be appended twice. A write that
//! Redis refused (`NOSCRIPT` after a restart flushed the scripts) was not applied and is sent
//! again after the scripts are loaded.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::{RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

use super::layout::Layout;
use super::{Scripts, error_of, unknown_outcome};
use crate::backend::{Fence, StorageKey};
use crate::error::{Result, StateError};

/// Writes sent in one pipeline at most: bounds the time a batch holds its callers.
const MAX_BATCH: usize = 256;
/// Bytes of values sent in one pipeline at most (one larger value goes alone).
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Round trips one batch may take: a first try, one retry after a dropped connection, and
/// two after `NOSCRIPT`.
const MAX_ROUNDS: usize = 4;

/// One write.
pub(super) enum Op {
    Put(StorageKey, Vec<u8>),
    Delete(StorageKey),
    Append(StorageKey, Vec<u8>),
    /// Not a write: a `PING` queued behind the writes before it, answered once they are.
    Barrier(StorageKey),
    /// A put done only if the fence holds (its reply: 1, or `-1 - current` if refused).
    PutFenced(StorageKey, Vec<u8>, Fence),
    /// A delete done only if the fence holds (its reply: whether the key existed, or
    /// `-1 - current` if refused).
    DeleteFenced(StorageKey, Fence),
}

/// The lease's current token if `reply` is a fenced script's refusal (`-1 - current`).
pub(super) fn refused(reply: &Value) -> Option<u64> {
    match reply {
        Value::Int(n) if *n < 0 => u64::try_from(-1 - *n).ok(),
        _ => None,
    }
}

impl Op {
    pub(super) fn key(&self) -> &StorageKey {
        match self {
            Op::Put(k, _)
            | Op::Delete(k)
            | Op::Append(k, _)
            | Op::Barrier(k)
            | Op::PutFenced(k, ..)
            | Op::DeleteFenced(k, _) => k,
        }
    }

    pub(super) fn size(&self) -> usize {
        match self {
            Op::Put(_, v) | Op::Append(_, v) | Op::PutFenced(_, v, _) => v.len(),
            Op::Delete(_) | Op::Barrier(_) | Op::DeleteFenced(..) => 0,
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Op::Put(..) | Op::PutFenced(..) => "redis put",
            Op::Delete(_) | Op::DeleteFenced(..) => "redis delete",
            Op::Append(..) => "redis append",
            Op::Barrier(_) => "redis read",
        }
    }

    /// Whether sending it twice leaves what sending it once does.
    fn idempotent(&self) -> bool {
        !matches!(self, Op::Append(..))
    }

    /// Adds this write to `pipe`: its script, or for a put or append of a key in `listed`
    /// (outside any session group), the bare `SET` or `APPEND`.
    fn push(&self, pipe: &mut redis::Pipeline, config: &Config, listed: &mut HashSet<StorageKey>) {
        let (layout, scripts, ttl_ms) = (&config.layout, &config.scripts, config.ttl_ms);
        let names = layout.names(self.key(), ttl_ms > 0);
        let script = match self {
            Op::Barrier(_) => {
                pipe.cmd("PING");
                return;
            }
            Op::Append(key, bytes) if names.group.is_empty() && listed.contains(key) => {
                // An earlier script of this backend made the log's listing entries and no
                // delete has been sent since: only the value grows, in one (atomic) command,
                // which costs Redis a tenth of a script. (Puts always run the script: other
                // nodes share the prefix, and a delete by one of them would not be seen here,
                // so a bare SET could leave a key stored but not listed.)
                pipe.cmd("APPEND").arg(&names.value).arg(bytes.as_slice());
                return;
            }
            Op::Put(..) => &scripts.put,
            Op::PutFenced(..) => &scripts.put_fenced,
            Op::Append(..) => &scripts.append,
            Op::Delete(key) | Op::DeleteFenced(key, _) => {
                // Later writes of this key (in this batch too) make its entries again.
                listed.remove(key);
                if matches!(self, Op::Delete(_)) { &scripts.delete } else { &scripts.delete_fenced }
            }
        };
        let fence = self.fence();
        let keys = 2 + names.folders.len() + usize::from(fence.is_some());
        let cmd = pipe.cmd("EVALSHA").arg(script.get_hash()).arg(keys);
        cmd.arg(&names.value).arg(&names.group);
        for (folder, _) in &names.folders {
            cmd.arg(folder);
        }
        if let Some(fence) = fence {
            cmd.arg(layout.lease(&fence.name));
        }
        if let Op::Put(_, bytes) | Op::Append(_, bytes) | Op::PutFenced(_, bytes, _) = self {
            cmd.arg(ttl_ms).arg(names.owned_folders).arg(bytes.as_slice());
        }
        for (_, member) in &names.folders {
            cmd.arg(member);
        }
        if let Some(fence) = fence {
            cmd.arg(fence.token.to_string());
        }
    }

    /// The fence of a fenced write.
    pub(super) fn fence(&self) -> Option<&Fence> {
        match self {
            Op::PutFenced(_, _, fence) | Op::DeleteFenced(_, fence) => Some(fence),
            _ => None,
        }
    }
}

struct Req {
    op: Op,
    reply: oneshot::Sender<Result<Value>>,
    /// An earlier round trip of this write ended without an answer: it may have been
    /// applied, so a failure now is "outcome unknown", not "not applied".
    uncertain: bool,
    /// An append already acknowledged to its caller (see the module docs).
    early: bool,
    since: Instant,
}

/// Keys remembered as listed at most (a bound on memory; forgetting only costs a script).
const MAX_LISTED: usize = 100_000;

/// What the task and the handles share.
#[derive(Default)]
struct Shared {
    /// Keys whose listing entries an acknowledged script of this backend made, with no delete
    /// sent since: a put or append of them needs no script. Emptied whenever a round trip
    /// fails (the server may have restarted from an older state, or failed over).
    listed: Mutex<HashSet<StorageKey>>,
    /// Appends acknowledged but not yet answered by Redis.
    in_flight: AtomicUsize,
    /// Logs with a lost acknowledged append: they take no appends until replaced.
    poisoned: Mutex<HashSet<StorageKey>>,
}

/// Gives `req` its result: to its caller, or for an early append, to the poison set.
fn answer(shared: &Shared, req: Req, result: Result<Value>) {
    // A refused fenced write changed nothing: nothing to remember of it. Refused after an
    // earlier round that may have been applied, its outcome is unknown.
    if let Ok(reply) = &result
        && req.op.fence().is_some()
        && refused(reply).is_some()
    {
        if req.uncertain {
            let e = unknown_outcome(req.op.name(), req.op.key().to_string(), req.since.elapsed());
            let _ = req.reply.send(Err(e));
        } else {
            let _ = req.reply.send(result);
        }
        return;
    }
    match (&req.op, &result) {
        (Op::Put(key, _) | Op::Append(key, _) | Op::PutFenced(key, ..), Ok(_)) => {
            if matches!(req.op, Op::Put(..) | Op::PutFenced(..)) {
                crate::sync::lock(&shared.poisoned).remove(key);
            }
            let mut listed = crate::sync::lock(&shared.listed);
            if listed.len() >= MAX_LISTED {
                listed.clear();
            }
            listed.insert(key.clone());
        }
        (Op::Delete(key) | Op::DeleteFenced(key, _), Ok(_)) => {
            crate::sync::lock(&shared.poisoned).remove(key);
            crate::sync::lock(&shared.listed).remove(key);
        }
        (Op::Append(key, _), Err(e)) if req.early => {
            let first_loss = crate::sync::lock(&shared.poisoned).insert(key.clone());
            if first_loss {
                tracing::warn!(
                    key = %key, error = %e,
                    "an acknowledged append was lost; the log takes no appends until replaced"
                );
            }
        }
        _ => {}
    }
    if req.early {
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
    // A caller that gave up (or an early append's) is not waiting for the answer.
    let _ = req.reply.send(result);
}

/// The writer's settings, fixed at connect.
pub(super) struct Config {
    pub(super) layout: Layout,
    pub(super) scripts: Scripts,
    pub(super) ttl_ms: u64,
    pub(super) timeout: Duration,
}

/// The handle of the writer task. Dropping it lets the task send what is queued and end.
pub(super) struct Writer {
    queue: mpsc::UnboundedSender<Req>,
    timeout: Duration,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("open", &!self.queue.is_closed()).finish()
    }
}

impl Writer {
    /// Starts the writer task on `conn` (a connection of its own).
    pub(super) fn start(conn: ConnectionManager, config: Config) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let timeout = config.timeout;
        let shared = Arc::new(Shared::default());
        tokio::spawn(run(conn, rx, config, shared.clone()));
        Writer { queue, timeout, shared }
    }

    /// Queues an append and returns once it is queued (see the module docs), or fails if an
    /// earlier acknowledged append to the same log was lost.
    pub(super) fn append(&self, key: StorageKey, bytes: Vec<u8>) -> Result<()> {
        if crate::sync::lock(&self.shared.poisoned).contains(&key) {
            return Err(StateError::unavailable(format!(
                "an earlier append to {key} was lost; the log takes no more appends until a \
                 put or delete replaces it"
            )));
        }
        let (reply, _) = oneshot::channel();
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        let op = Op::Append(key, bytes);
        let req = Req { op, reply, uncertain: false, early: true, since: Instant::now() };
        if self.queue.send(req).is_err() {
            self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(StateError::unavailable("the Redis writer has stopped"));
        }
        Ok(())
    }

    /// Before a read of `key`: if appends are in flight, waits until Redis has answered
    /// them (a `PING` queued behind them), so the read sees them.
    pub(super) async fn barrier(&self, key: &StorageKey) -> Result<()> {
        if self.shared.in_flight.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        self.submit(Op::Barrier(key.clone())).await.map(drop)
    }

    /// Queues `op` and waits for its reply: after Redis answered (and, with `appendfsync
    /// always`, after the AOF holding it was fsynced), or failed.
    pub(super) async fn submit(&self, op: Op) -> Result<Value> {
        let (reply, answer) = oneshot::channel();
        let (name, key) = (op.name(), op.key().to_string());
        let req = Req { op, reply, uncertain: false, early: false, since: Instant::now() };
        if self.queue.send(req).is_err() {
            return Err(StateError::unavailable("the Redis writer has stopped"));
        }
        // Bounded here too, so no caller waits forever on a stuck task: the task bounds each
        // round trip by the timeout, and a batch makes at most MAX_ROUNDS of them.
        let limit = self.timeout * (MAX_ROUNDS as u32 + 1);
        match tokio::time::timeout(limit, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StateError::unavailable(
                "the Redis writer stopped before answering; outcome unknown",
            )),
            Err(_) => Err(unknown_outcome(name, key, limit)),
        }
    }
}

/// The task: batches until the queue is closed and empty.
async fn run(
    mut conn: ConnectionManager,
    mut rx: mpsc::UnboundedReceiver<Req>,
    config: Config,
    shared: Arc<Shared>,
) {
    while let Some(first) = rx.recv().await {
        let mut bytes = first.op.size();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(req) => {
                    bytes += req.op.size();
                    batch.push(req);
                }
                Err(_) => break,
            }
        }
        send(&mut conn, &config, &shared, batch).await;
    }
}

/// Sends `batch` as one pipeline and answers every caller; resends what may be resent.
async fn send(conn: &mut ConnectionManager, config: &Config, shared: &Shared, batch: Vec<Req>) {
    // Appends queued behind a lost one are dropped, so a log never has a gap.
    let (mut batch, dropped): (Vec<Req>, Vec<Req>) = batch.into_iter().partition(|req| {
        !(req.early && crate::sync::lock(&shared.poisoned).contains(req.op.key()))
    });
    for req in dropped {
        answer(shared, req, Err(StateError::unavailable("an earlier append to this log was lost")));
    }
    if batch.is_empty() {
        return;
    }
    for round in 0..MAX_ROUNDS {
        let last = round + 1 == MAX_ROUNDS;
        // A write whose caller stopped waiting (it was answered "outcome unknown" by its own
        // time limit) is not sent, nor sent again: sent after its caller has read the store
        // to learn what became of it, it would land after that read, and the caller would
        // act on an answer the store no longer gives. (Early appends have no caller waiting.)
        batch.retain(|req| req.early || !req.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        {
            let mut listed = crate::sync::lock(&shared.listed);
            for req in &batch {
                req.op.push(&mut pipe, config, &mut listed);
            }
        }
        let sent =
            tokio::time::timeout(config.timeout, pipe.query_async::<Vec<RedisResult<Value>>>(conn))
                .await;
        if !matches!(&sent, Ok(Ok(replies)) if replies.len() == batch.len()) {
            crate::sync::lock(&shared.listed).clear();
        }
        let replies = match sent {
            Ok(Ok(replies)) if replies.len() == batch.len() => replies,
            Ok(Ok(_)) => {
                // Not the pipeline's shape: nothing is known of any write in it.
                let e = StateError::unavailable("Redis answered a pipeline with a wrong count");
                return fail_all(shared, batch, &e, config.timeout);
            }
            Err(_) => {
                // No answer in time: the writes may still run. No retry (the first copies may
                // still be queued on the server, and a retry would only wait longer).
                for req in batch {
                    let e =
                        unknown_outcome(req.op.name(), req.op.key().to_string(), config.timeout);
                    answer(shared, req, Err(e));
                }
                return;
            }
            Ok(Err(e)) if e.is_connection_refusal() => {
                // No connection: this round sent nothing.
                return fail_all(shared, batch, &error_of(&e, None, 0), config.timeout);
            }
            Ok(Err(e)) => {
                // The connection failed with the writes sent or half sent: outcomes unknown.
                // The manager reconnects; idempotent writes go again, appends are answered.
                tracing::warn!(error = %e, writes = batch.len(), "Redis write pipeline failed");
                let mut again = Vec::new();
                for mut req in batch {
                    if req.op.idempotent() && !req.uncertain && !last {
                        req.uncertain = true;
                        again.push(req);
                    } else {
                        let e = unknown_outcome(
                            req.op.name(),
                            req.op.key().to_string(),
                            req.since.elapsed(),
                        );
                        answer(shared, req, Err(e));
                    }
                }
                if again.is_empty() {
                    return;
                }
                batch = again;
                continue;
            }
        };
        let mut again = Vec::new();
        let mut no_script = false;
        for (req, reply) in batch.into_iter().zip(replies) {
            match reply {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                        && !last =>
                {
                    no_script = true;
                    again.push(req);
                }
                Ok(v) => answer(shared, req, Ok(v)),
                Err(e) => {
                    let err = if req.uncertain {
                        unknown_outcome(
                            req.op.name(),
                            req.op.key().to_string(),
                            req.since.elapsed(),
                        )
                    } else {
                        error_of(&e, Some(req.op.key()), req.op.size())
                    };
                    answer(shared, req, Err(err));
                }
            }
        }
        if again.is_empty() {
            return;
        }
        if no_script {
            // A restarted server (or SCRIPT FLUSH) forgot the scripts: load them, resend.
            if let Err(e) = config.scripts.load(conn, config.timeout).await {
                return fail_all(shared, again, &e, config.timeout);
            }
        }
        batch = again;
    }
}

/// Answers every write of `batch` with `e`, or "outcome unknown" for those that may have
/// been applied by an earlier round.
fn fail_all(shared: &Shared, batch: Vec<Req>, e: &StateError, timeout: Duration) {
    for req in batch {
        let err = if req.uncertain {
            unknown_outcome(
                req.op.name(),
                req.op.key().to_string(),
                req.since.elapsed().max(timeout),
            )
        } else {
            super::copy_error(e)
        };
        answer(shared, req, Err(err));
    }
}
