//! The PostgreSQL backend's writers: a few tokio tasks that take writes from one queue and
//! commit every write queued together in one transaction (group commit). Owns the queue,
//! the tasks, the transaction of a batch and its retries; calls the pool and statements of
//! `super` and the error classification of `super::error`.
//!
//! A writer takes the first queued write, then everything queued behind it (up to
//! [`MAX_BATCH`]), and sends `BEGIN; SET LOCAL synchronous_commit = on; SET LOCAL
//! statement_timeout = …; SELECT txid_current()`, the writes (one statement each) and
//! `COMMIT` pipelined: all at once, answered in order, one round trip plus the flush. Each caller is
//! answered after the COMMIT returned: with synchronous commit, after the WAL record is
//! flushed. Several writers (`PostgresOptions::writers`) run such transactions on their own
//! connections at once, so one's flush overlaps another's statements, and PostgreSQL's own
//! group commit flushes them together.
//!
//! Retries: a failure before COMMIT was sent committed nothing, so a transient one (the
//! connection or server went away, the pool had no connection, a deadlock victim) is retried
//! whatever the writes, up to [`RETRIES`] times on fresh connections. If the connection dies
//! after COMMIT was sent, the writer asks the server on a fresh connection what became of the
//! transaction (`txid_status` of its id, read at BEGIN): committed, the callers get `Ok`;
//! rolled back, the batch goes again like any other. Only if the server cannot tell (it stays
//! unreachable for the connect timeout) is the outcome unknown: puts and deletes are
//! idempotent and are retried (a retried delete may then report that its key did not exist);
//! an append is not (it would be applied twice) and is answered [`StateError::Timeout`].

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Object;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::append::{Appender, Ride};
use super::error::{Failure, MAX_VALUE, outcome_unknown};
use super::{Discard, Shared, real_time};
use tokio_postgres::types::Type;

use crate::backend::{KeyClass, StorageKey};
use crate::error::{Result, StateError};

/// Writes committed in one transaction at most: bounds the time a batch holds its callers.
const MAX_BATCH: usize = 256;
/// Retries of a batch after a transient failure (so at most `RETRIES + 1` attempts).
const RETRIES: u32 = 3;

/// One write.
#[derive(Debug)]
pub(super) enum Op {
    Put(StorageKey, Vec<u8>),
    Delete(StorageKey),
    Append(StorageKey, Vec<u8>),
    /// Pieces appended to one log key, in order (the append flusher's).
    AppendLog(StorageKey, Vec<Vec<u8>>),
}

impl Op {
    fn key(&self) -> &StorageKey {
        match self {
            Op::Put(k, _) | Op::Delete(k) | Op::Append(k, _) | Op::AppendLog(k, _) => k,
        }
    }

    fn size(&self) -> usize {
        match self {
            Op::Put(_, v) | Op::Append(_, v) => v.len(),
            Op::AppendLog(_, pieces) => pieces.iter().map(Vec::len).sum(),
            Op::Delete(_) => 0,
        }
    }

    fn verb(&self) -> &'static str {
        match self {
            Op::Put(..) => "writing",
            Op::Delete(_) => "deleting",
            Op::Append(..) | Op::AppendLog(..) => "appending to",
        }
    }

    /// The statement of this write.
    fn sql<'s>(&self, shared: &'s Shared) -> &'s str {
        let log = self.key().class() == KeyClass::Log;
        let sql = &shared.sql;
        match (self, log) {
            (Op::Put(..), false) => &sql.put,
            (Op::Put(..), true) => &sql.put_log,
            (Op::Delete(_), false) => &sql.delete,
            (Op::Delete(_), true) => &sql.delete_log,
            (Op::Append(..), false) => &sql.append,
            (Op::Append(..), true) => &sql.append_log,
            (Op::AppendLog(..), _) => &sql.append_log_many,
        }
    }

    /// Runs the write on `client` (in its open transaction). `true` when a delete found its
    /// key, and for every put and append.
    async fn apply(&self, shared: &Shared, client: &Object) -> Result<bool, tokio_postgres::Error> {
        use tokio_postgres::types::Type;
        let key = self.key().as_str();
        let kind = kind_name(self.key().class());
        let rows = match self {
            Op::Put(_, bytes) | Op::Append(_, bytes) => {
                let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] =
                    [(&key, Type::TEXT), (bytes, Type::BYTEA), (&kind, Type::TEXT)];
                super::query(client, shared.prepared, self.sql(shared), &params).await?
            }
            Op::Delete(_) => {
                super::query(client, shared.prepared, self.sql(shared), &[(&key, Type::TEXT)])
                    .await?
            }
            Op::AppendLog(_, pieces) => {
                let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] =
                    [(&key, Type::TEXT), (pieces, Type::BYTEA_ARRAY), (&kind, Type::TEXT)];
                super::query(client, shared.prepared, self.sql(shared), &params).await?
            }
        };
        Ok(!matches!(self, Op::Delete(_)) || !rows.is_empty())
    }
}

/// The parameter types of `Sql::put_many`.
const PUT_MANY_TYPES: [Type; 3] = [Type::TEXT_ARRAY, Type::BYTEA_ARRAY, Type::TEXT_ARRAY];

/// The `kind` column of a key's row: its class, for people reading the table.
fn kind_name(class: KeyClass) -> &'static str {
    match class {
        KeyClass::Record => "record",
        KeyClass::Plaintext => "plaintext",
        KeyClass::Log => "log",
        _ => "metadata",
    }
}

struct Req {
    op: Op,
    reply: oneshot::Sender<Result<bool>>,
}

/// The handle of the writer tasks. Dropping it closes the queue: each task finishes the
/// batch it holds and ends.
#[derive(Debug)]
pub(super) struct Writers {
    queue: mpsc::UnboundedSender<Req>,
}

impl Writers {
    /// Starts `count` writer tasks on the current tokio runtime.
    pub(super) fn start(shared: Arc<Shared>, appender: Arc<Appender>, count: usize) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..count.max(1) {
            tokio::spawn(run(shared.clone(), appender.clone(), rx.clone()));
        }
        Writers { queue }
    }

    /// Queues `op` and waits for its answer, given after its transaction committed (or
    /// failed: see the module's retry rules).
    pub(super) async fn submit(&self, op: Op) -> Result<bool> {
        if op.size() > MAX_VALUE {
            return Err(StateError::TooLarge { size: op.size(), limit: MAX_VALUE });
        }
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Req { op, reply }).is_err() {
            return Err(StateError::unavailable("the PostgreSQL writers have stopped"));
        }
        answer.await.map_err(|_| {
            StateError::unavailable(
                "a PostgreSQL writer stopped before answering (its runtime shut down); \
                 outcome unknown",
            )
        })?
    }
}

/// One writer task: takes a batch while holding the queue, commits it without holding it
/// (so the next writer takes the writes that arrive meanwhile), until the queue is closed.
async fn run(
    shared: Arc<Shared>,
    appender: Arc<Appender>,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Req>>>,
) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            batch
        };
        // Queued log appends ride along in this transaction.
        let mut ride = appender.try_take().map(|ride| (appender.as_ref(), ride));
        commit_batch(&shared, batch, true, &mut ride).await;
    }
}

/// How far an attempt got: what a failure means for its writes.
#[derive(Debug)]
pub(super) enum Stage {
    /// Before COMMIT was sent: nothing committed.
    Open,
    /// COMMIT was sent: the outcome is unknown until it answers, or until the server says
    /// what became of transaction `xid` (`txid_status`). `found`: the writes' results.
    CommitSent { xid: Option<i64>, found: Vec<bool> },
}

/// Commits `batch` (retrying as the module says) and answers every caller. With `split`, a
/// statement's own error (not the connection's) makes each write go again alone, so one
/// bad write does not fail the others.
async fn commit_batch(
    shared: &Shared,
    mut batch: Vec<Req>,
    split: bool,
    ride: &mut Option<(&Appender, Ride)>,
) {
    let mut attempt = 0;
    // Set once an attempt's COMMIT went unanswered and the server could not say what became
    // of it: from then on a failure means "outcome unknown", even if a retry fails before
    // its own COMMIT.
    let mut maybe_committed = false;
    loop {
        let mut stage = Stage::Open;
        let bound = shared.attempt_bound();
        let attempt_result = {
            let riding = ride.iter().flat_map(|(_, ride)| ride.ops.iter());
            let ops: Vec<&Op> = batch.iter().map(|r| &r.op).chain(riding).collect();
            match bound {
                Some(bound) => {
                    real_time::within(bound, attempt_once(shared, &shared.begin, &ops, &mut stage))
                        .await
                        .unwrap_or(Err(Failure::Deadline(bound)))
                }
                None => {
                    real_time::hold(attempt_once(shared, &shared.begin, &ops, &mut stage)).await
                }
            }
        };
        let failure = match attempt_result {
            Ok(found) => {
                end_ride(ride, Ok(()));
                return answer(batch, found);
            }
            Err(failure) => failure,
        };
        let unknown_wait = bound.unwrap_or(Duration::ZERO);
        let mut retry = failure.transient();
        if let Stage::CommitSent { xid, found } = stage {
            // The COMMIT went unanswered: ask the server what became of the transaction.
            match resolve(shared, xid).await {
                Some(true) => {
                    end_ride(ride, Ok(()));
                    return answer(batch, found);
                }
                // Rolled back: nothing of it was committed; every write may go again.
                Some(false) => retry = true,
                None => {
                    maybe_committed = true;
                    end_ride(ride, Err(format!("outcome unknown: {}", failure.reason())));
                    // An append may have been applied: going again could apply it twice.
                    let (appends, rest): (Vec<Req>, Vec<Req>) = batch
                        .into_iter()
                        .partition(|r| matches!(r.op, Op::Append(..) | Op::AppendLog(..)));
                    for req in appends {
                        let e = outcome_unknown(req.op.verb(), req.op.key().as_str(), unknown_wait);
                        let _ = req.reply.send(Err(e));
                    }
                    batch = rest;
                    if batch.is_empty() {
                        return;
                    }
                    retry = true;
                }
            }
        }
        if retry && attempt < RETRIES {
            attempt += 1;
            tracing::warn!(
                attempt,
                writes = batch.len(),
                reason = %failure.reason(),
                "PostgreSQL write transaction failed; retrying on a fresh connection"
            );
            real_time::sleep(Duration::from_millis(25 << (2 * attempt))).await;
            continue;
        }
        end_ride(ride, Err(failure.reason()));
        if !maybe_committed && split && batch.len() > 1 && failure.statement_error() {
            for req in batch {
                Box::pin(commit_batch(shared, vec![req], false, &mut None)).await;
            }
            return;
        }
        for req in batch {
            let (verb, key, size) = (req.op.verb(), req.op.key().as_str(), req.op.size());
            let e = if maybe_committed {
                outcome_unknown(verb, key, unknown_wait)
            } else {
                failure.not_committed(verb, key, size)
            };
            let _ = req.reply.send(Err(e));
        }
        return;
    }
}

/// Records the outcome of the log appends that rode along, once known.
fn end_ride(ride: &mut Option<(&Appender, Ride)>, result: Result<(), String>) {
    if let Some((appender, ride)) = ride.take() {
        appender.finish(ride, result);
    }
}

/// Answers each caller of a committed batch.
fn answer(batch: Vec<Req>, found: Vec<bool>) {
    for (req, found) in batch.into_iter().zip(found) {
        // A caller that gave up is not waiting for the answer.
        let _ = req.reply.send(Ok(found));
    }
}

/// What became of transaction `xid` whose COMMIT went unanswered: `Some(true)` committed,
/// `Some(false)` rolled back, `None` unknown (no xid, the server cannot tell any more, or
/// cannot be reached within the connect timeout). A transaction still in progress (its
/// backend has not yet noticed the lost connection) is waited for.
pub(super) async fn resolve(shared: &Shared, xid: Option<i64>) -> Option<bool> {
    use tokio_postgres::types::Type;
    let xid = xid?;
    // Real time, as every wait on the server (`real_time`).
    let deadline = std::time::Instant::now() + shared.connect_timeout;
    loop {
        let status = async {
            let mut conn = Discard::new(shared.connection().await?);
            let rows =
                conn.client().query_typed("SELECT txid_status($1)", &[(&xid, Type::INT8)]).await?;
            conn.keep();
            let status: Option<String> = rows.first().and_then(|r| r.try_get(0).ok());
            Ok::<_, Failure>(status)
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match real_time::within(left, status).await {
            Ok(Ok(Some(s))) if s == "committed" => return Some(true),
            Ok(Ok(Some(s))) if s == "aborted" => return Some(false),
            Ok(Ok(Some(_))) | Ok(Err(_)) => {} // in progress, or the server is away
            Ok(Ok(None)) | Err(_) => return None,
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        real_time::sleep(Duration::from_millis(50)).await;
    }
}

/// One transaction of `ops` on a fresh connection from the pool, pipelined: BEGIN (with the
/// SET LOCALs and the transaction's id), every write, and COMMIT are sent at once and
/// answered in order, one round trip. `stage` says what a failure means. The connection goes
/// back to the pool only after a COMMIT that answered; after any failure it is closed (the
/// server then rolls back whatever was open).
///
/// Why sending COMMIT without waiting is safe: if a write fails, the server aborts the
/// transaction and answers the COMMIT with a rollback; the write's own error tells us so.
pub(super) async fn attempt_once(
    shared: &Shared,
    begin: &str,
    ops: &[&Op],
    stage: &mut Stage,
) -> Result<Vec<bool>, Failure> {
    use std::sync::atomic::{AtomicI64, Ordering};
    let mut conn = Discard::new(shared.connection().await?);
    let client = conn.client();
    // The puts of non-log keys go as one multi-row statement when no key repeats in the
    // batch (so their order against the batch's other writes cannot matter): one statement
    // for the server to run instead of one per put.
    let many: Vec<usize> = (0..ops.len())
        .filter(|&i| matches!(ops[i], Op::Put(k, _) if k.class() != KeyClass::Log))
        .collect();
    let keys: std::collections::HashSet<&str> = ops.iter().map(|op| op.key().as_str()).collect();
    let many = if many.len() > 1 && keys.len() == ops.len() { many } else { Vec::new() };
    let singles: Vec<usize> = (0..ops.len()).filter(|i| !many.contains(i)).collect();
    if shared.prepared {
        // Prepare (or find cached) every statement first, so each write below goes out at
        // its first poll, in the batch's order: a cache miss would otherwise hold it back.
        if !many.is_empty() {
            super::prepare(client, &shared.sql.put_many, &PUT_MANY_TYPES).await?;
        }
        for &i in &singles {
            let types: &[Type] = match ops[i] {
                Op::Delete(_) => &[Type::TEXT],
                Op::AppendLog(..) => &[Type::TEXT, Type::BYTEA_ARRAY, Type::TEXT],
                _ => &[Type::TEXT, Type::BYTEA, Type::TEXT],
            };
            super::prepare(client, ops[i].sql(shared), types).await?;
        }
    }
    // From here COMMIT may be on the wire: a failure that is not a write's own error leaves
    // the outcome to be asked of the server, by the transaction's id (0: not known yet).
    *stage = Stage::CommitSent { xid: None, found: vec![true; ops.len()] };
    let xid = AtomicI64::new(0);
    let begin = async {
        let rows = client.simple_query(begin).await?;
        let id = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).and_then(|x| x.parse().ok()),
            _ => None,
        });
        xid.store(id.unwrap_or(0), Ordering::Relaxed);
        Ok::<_, tokio_postgres::Error>(())
    };
    let put_many = async {
        if many.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = many.iter().map(|&i| ops[i].key().as_str()).collect();
        let values: Vec<&[u8]> = many
            .iter()
            .map(|&i| match ops[i] {
                Op::Put(_, v) => v.as_slice(),
                _ => &[],
            })
            .collect();
        let kinds: Vec<&str> = many.iter().map(|&i| kind_name(ops[i].key().class())).collect();
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
            (&keys, PUT_MANY_TYPES[0].clone()),
            (&values, PUT_MANY_TYPES[1].clone()),
            (&kinds, PUT_MANY_TYPES[2].clone()),
        ];
        super::query(client, shared.prepared, &shared.sql.put_many, &params).await.map(drop)
    };
    let singles_done =
        futures_util::future::join_all(singles.iter().map(|&i| ops[i].apply(shared, client)));
    let writes = async {
        let (many_done, singles_done) = futures_util::future::join(put_many, singles_done).await;
        let mut results: Vec<Result<bool, tokio_postgres::Error>> = Vec::with_capacity(ops.len());
        let mut many_done = Some(many_done);
        let mut singles_done = singles_done.into_iter();
        for i in 0..ops.len() {
            if many.contains(&i) {
                // The multi-row statement's result, reported once (its error counts once).
                results.push(match many_done.take() {
                    Some(r) => r.map(|()| true),
                    None => Ok(true),
                });
            } else if let Some(r) = singles_done.next() {
                results.push(r);
            }
        }
        results
    };
    // With synchronous_commit = on the COMMIT is answered once its record is flushed to
    // disk: the point at which every write of the batch is durable.
    let commit = client.batch_execute("COMMIT");
    // join3 polls in order, so the three go out in order.
    let (begun, results, committed) = futures_util::future::join3(begin, writes, commit).await;
    let xid = Some(xid.load(Ordering::Relaxed)).filter(|x| *x != 0);
    let mut found = Vec::with_capacity(ops.len());
    if matches!(&begun, Err(e) if e.code().is_some()) {
        // The server answered BEGIN (or its SET LOCALs) with an error: no transaction ran
        // (a FATAL one, such as a connection terminated while idle, ended the session before
        // reading the rest; any other leaves the transaction aborted, its COMMIT a
        // rollback).
        *stage = Stage::Open;
    }
    let mut first_error = begun.err();
    for result in results {
        match result {
            Ok(f) => found.push(f),
            Err(e) => {
                if e.code().is_some() {
                    // The server refused a write (BEGIN's own error would come first):
                    // the transaction is aborted, its COMMIT was a rollback.
                    *stage = Stage::Open;
                }
                first_error.get_or_insert(e);
                found.push(true);
            }
        }
    }
    if let Some(e) = first_error {
        if let Stage::CommitSent { .. } = stage {
            *stage = Stage::CommitSent { xid, found };
        }
        return Err(e.into());
    }
    // Every write was applied; a failed COMMIT (even one the server answered with an error:
    // a connection terminated during the flush is told so after the commit) is resolved by
    // the transaction's id.
    *stage = Stage::CommitSent { xid, found: found.clone() };
    committed?;
    conn.keep();
    Ok(found)
}
