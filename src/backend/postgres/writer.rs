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
//!
//! Fenced writes are statements like the others: one refused by its fence changes nothing,
//! does not abort the transaction, and is answered [`StateError::Fenced`] once the batch
//! committed. Refused on a retry after an attempt whose outcome was unknown, it is answered
//! [`StateError::Timeout`] instead: the earlier attempt may have been applied before the
//! lease changed hands.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Object;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::append::{Appender, Ride};
use super::error::{Failure, MAX_VALUE, outcome_unknown};
use super::{Discard, Shared, real_time};
use tokio_postgres::types::Type;

use crate::backend::{Fence, KeyClass, RecordMeta, StorageKey};
use crate::error::{Result, StateError};

/// Writes committed in one transaction at most: bounds the time a batch holds its callers.
const MAX_BATCH: usize = 256;
/// Retries of a batch after a transient failure (so at most `RETRIES + 1` attempts).
const RETRIES: u32 = 3;

/// One write.
#[derive(Debug)]
pub(super) enum Op {
    Put(StorageKey, Vec<u8>),
    /// A record with its facts, kept in the row's plain columns.
    PutRecord(StorageKey, Vec<u8>, Box<RecordMeta>),
    Delete(StorageKey),
    Append(StorageKey, Vec<u8>),
    /// Pieces appended to one log key, in order (the append flusher's).
    AppendLog(StorageKey, Vec<Vec<u8>>),
    /// A record with its facts, written only if the fence holds.
    PutFenced(StorageKey, Vec<u8>, Box<(RecordMeta, Fence)>),
    /// A delete, done only if the fence holds.
    DeleteFenced(StorageKey, Box<Fence>),
}

/// What one write did, once its transaction committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Done {
    /// Applied; `true` when a delete found its key, and for every put and append.
    Found(bool),
    /// A fenced write not applied: its lease's token is `current` (0: no such lease).
    Fenced { current: u64 },
}

impl Op {
    fn key(&self) -> &StorageKey {
        match self {
            Op::Put(k, _)
            | Op::PutRecord(k, ..)
            | Op::Delete(k)
            | Op::Append(k, _)
            | Op::AppendLog(k, _)
            | Op::PutFenced(k, ..)
            | Op::DeleteFenced(k, _) => k,
        }
    }

    fn size(&self) -> usize {
        match self {
            Op::Put(_, v) | Op::PutRecord(_, v, _) | Op::Append(_, v) | Op::PutFenced(_, v, _) => {
                v.len()
            }
            Op::AppendLog(_, pieces) => pieces.iter().map(Vec::len).sum(),
            Op::Delete(_) | Op::DeleteFenced(..) => 0,
        }
    }

    fn verb(&self) -> &'static str {
        match self {
            Op::Put(..) | Op::PutRecord(..) | Op::PutFenced(..) => "writing",
            Op::Delete(_) | Op::DeleteFenced(..) => "deleting",
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
            // A record is never a log.
            (Op::PutRecord(..), _) => &sql.put_record,
            (Op::Delete(_), false) => &sql.delete,
            (Op::Delete(_), true) => &sql.delete_log,
            (Op::Append(..), false) => &sql.append,
            (Op::Append(..), true) => &sql.append_log,
            (Op::AppendLog(..), _) => &sql.append_log_many,
            (Op::PutFenced(..), false) => &sql.put_fenced,
            (Op::PutFenced(..), true) => &sql.put_fenced_log,
            (Op::DeleteFenced(..), false) => &sql.delete_fenced,
            (Op::DeleteFenced(..), true) => &sql.delete_fenced_log,
        }
    }

    /// The fence of a fenced write.
    fn fence(&self) -> Option<&Fence> {
        match self {
            Op::PutFenced(_, _, facts) => Some(&facts.1),
            Op::DeleteFenced(_, fence) => Some(fence),
            _ => None,
        }
    }

    /// Runs the write on `client` (in its open transaction): what it did.
    async fn apply(&self, shared: &Shared, client: &Object) -> Result<Done, tokio_postgres::Error> {
        use tokio_postgres::types::Type;
        let key = self.key().as_str();
        let kind = kind_name(self.key().class());
        let rows = match self {
            Op::Put(_, bytes) | Op::Append(_, bytes) => {
                let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] =
                    [(&key, Type::TEXT), (bytes, Type::BYTEA), (&kind, Type::TEXT)];
                super::query(client, shared.prepared, self.sql(shared), &params).await?
            }
            Op::PutRecord(_, bytes, meta) => {
                let facts = Facts::of(meta);
                let mut params: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> =
                    vec![(&key, Type::TEXT), (bytes, Type::BYTEA), (&kind, Type::TEXT)];
                params.extend(facts.params());
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
            Op::PutFenced(_, bytes, facts) => {
                let (meta, fence) = facts.as_ref();
                let f = Facts::of(meta);
                let token = token_param(fence.token);
                let mut params: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> =
                    vec![(&key, Type::TEXT), (bytes, Type::BYTEA), (&kind, Type::TEXT)];
                params.extend(f.params());
                params.extend([
                    (&fence.name as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT),
                    (&token, Type::INT8),
                ]);
                let rows = super::query(client, shared.prepared, self.sql(shared), &params).await?;
                return fenced_outcome(&rows, fence);
            }
            Op::DeleteFenced(_, fence) => {
                let token = token_param(fence.token);
                let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] =
                    [(&key, Type::TEXT), (&fence.name, Type::TEXT), (&token, Type::INT8)];
                let rows = super::query(client, shared.prepared, self.sql(shared), &params).await?;
                return fenced_outcome(&rows, fence);
            }
        };
        Ok(Done::Found(!matches!(self, Op::Delete(_)) || !rows.is_empty()))
    }
}

/// A fence's token as the `bigint` it is stored as. Tokens start at 1 and grow by one, so
/// one past `i64::MAX` cannot be any lease's: it is sent as -1, which no row holds.
pub(super) fn token_param(token: u64) -> i64 {
    i64::try_from(token).unwrap_or(-1)
}

/// What a fenced statement's answer row (the lease's current token, rows changed) says.
fn fenced_outcome(
    rows: &[tokio_postgres::Row],
    fence: &Fence,
) -> Result<Done, tokio_postgres::Error> {
    let Some(row) = rows.first() else { return Ok(Done::Fenced { current: 0 }) };
    let current: Option<i64> = row.try_get(0)?;
    let changed: i64 = row.try_get(1)?;
    let current = current.and_then(|t| u64::try_from(t).ok()).unwrap_or(0);
    if current != fence.token {
        return Ok(Done::Fenced { current });
    }
    Ok(Done::Found(changed > 0))
}

impl Op {
    /// The caller's answer to this write, given what it did. `maybe_committed`: an earlier
    /// attempt of it may have been applied, so a refusal now does not mean "not written".
    fn answer(&self, done: Done, maybe_committed: bool, unknown_wait: Duration) -> Result<bool> {
        match (done, self.fence()) {
            (Done::Found(found), _) => Ok(found),
            (Done::Fenced { .. }, _) if maybe_committed => {
                Err(outcome_unknown(self.verb(), self.key().as_str(), unknown_wait))
            }
            (Done::Fenced { current }, Some(fence)) => {
                Err(StateError::Fenced { name: fence.name.clone(), token: fence.token, current })
            }
            (Done::Fenced { .. }, None) => Ok(true),
        }
    }
}

/// A record's facts as the parameters `$4`..`$11` of `Sql::put_record`
/// (`schema::RECORD_COLUMNS`).
struct Facts<'a> {
    session: &'a str,
    checkpoint: Option<&'a str>,
    branch: Option<&'a str>,
    parent: Option<&'a str>,
    step: Option<i64>,
    reason: Option<&'a str>,
    status: Option<&'a str>,
    saved_at: i64,
}

impl<'a> Facts<'a> {
    fn of(meta: &'a RecordMeta) -> Self {
        Facts {
            session: &meta.session,
            checkpoint: meta.checkpoint.as_deref(),
            branch: meta.branch.as_deref(),
            parent: meta.parent.as_deref(),
            // Steps and times past i64::MAX are stored as NULL / the largest time.
            step: meta.step.and_then(|s| i64::try_from(s).ok()),
            reason: meta.reason.as_deref(),
            status: meta.status.as_deref(),
            saved_at: i64::try_from(meta.saved_at_ms).unwrap_or(i64::MAX),
        }
    }

    fn params(&self) -> [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 8] {
        [
            (&self.session, Type::TEXT),
            (&self.checkpoint, Type::TEXT),
            (&self.branch, Type::TEXT),
            (&self.parent, Type::TEXT),
            (&self.step, Type::INT8),
            (&self.reason, Type::TEXT),
            (&self.status, Type::TEXT),
            (&self.saved_at, Type::INT8),
        ]
    }
}

/// The parameter types of `Sql::put_record`.
const PUT_RECORD_TYPES: [Type; 11] = [
    Type::TEXT,
    Type::BYTEA,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
];

/// The parameter types of `Sql::put_records` (arrays of `PUT_RECORD_TYPES`).
const PUT_RECORDS_TYPES: [Type; 11] = [
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
];

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
    CommitSent { xid: Option<i64>, found: Vec<Done> },
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
                return answer(batch, found, maybe_committed, bound);
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
                    return answer(batch, found, maybe_committed, bound);
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

/// Answers each caller of a committed batch (`bound`: the attempt bound, for "outcome
/// unknown").
fn answer(batch: Vec<Req>, found: Vec<Done>, maybe_committed: bool, bound: Option<Duration>) {
    let unknown_wait = bound.unwrap_or(Duration::ZERO);
    for (req, done) in batch.into_iter().zip(found) {
        let reply = req.op.answer(done, maybe_committed, unknown_wait);
        // A caller that gave up is not waiting for the answer.
        let _ = req.reply.send(reply);
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
) -> Result<Vec<Done>, Failure> {
    use std::sync::atomic::{AtomicI64, Ordering};
    let mut conn = Discard::new(shared.connection().await?);
    let client = conn.client();
    // The puts of non-log keys go as one multi-row statement when no key repeats in the
    // batch (so their order against the batch's other writes cannot matter): one statement
    // for the server to run instead of one per put.
    let many: Vec<usize> = (0..ops.len())
        .filter(|&i| matches!(ops[i], Op::Put(k, _) if k.class() != KeyClass::Log))
        .collect();
    let records: Vec<usize> =
        (0..ops.len()).filter(|&i| matches!(ops[i], Op::PutRecord(..))).collect();
    let keys: std::collections::HashSet<&str> = ops.iter().map(|op| op.key().as_str()).collect();
    let unique = keys.len() == ops.len();
    let many = if many.len() > 1 && unique { many } else { Vec::new() };
    let records = if records.len() > 1 && unique { records } else { Vec::new() };
    let singles: Vec<usize> =
        (0..ops.len()).filter(|i| !many.contains(i) && !records.contains(i)).collect();
    if shared.prepared {
        // Prepare (or find cached) every statement first, so each write below goes out at
        // its first poll, in the batch's order: a cache miss would otherwise hold it back.
        if !many.is_empty() {
            super::prepare(client, &shared.sql.put_many, &PUT_MANY_TYPES).await?;
        }
        if !records.is_empty() {
            super::prepare(client, &shared.sql.put_records, &PUT_RECORDS_TYPES).await?;
        }
        // `Sql::put_fenced`: a record's parameters, then the lease's name and the token.
        let put_fenced_types: Vec<Type> =
            PUT_RECORD_TYPES.iter().cloned().chain([Type::TEXT, Type::INT8]).collect();
        for &i in &singles {
            let types: &[Type] = match ops[i] {
                Op::Delete(_) => &[Type::TEXT],
                Op::PutRecord(..) => &PUT_RECORD_TYPES,
                Op::PutFenced(..) => &put_fenced_types,
                Op::DeleteFenced(..) => &[Type::TEXT, Type::TEXT, Type::INT8],
                Op::AppendLog(..) => &[Type::TEXT, Type::BYTEA_ARRAY, Type::TEXT],
                _ => &[Type::TEXT, Type::BYTEA, Type::TEXT],
            };
            super::prepare(client, ops[i].sql(shared), types).await?;
        }
    }
    // From here COMMIT may be on the wire: a failure that is not a write's own error leaves
    // the outcome to be asked of the server, by the transaction's id (0: not known yet).
    *stage = Stage::CommitSent { xid: None, found: vec![Done::Found(true); ops.len()] };
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
    let put_records = async {
        if records.is_empty() {
            return Ok(());
        }
        let mut keys = Vec::with_capacity(records.len());
        let mut values = Vec::with_capacity(records.len());
        let mut kinds = Vec::with_capacity(records.len());
        let mut facts = Vec::with_capacity(records.len());
        for &i in &records {
            if let Op::PutRecord(k, v, meta) = ops[i] {
                keys.push(k.as_str());
                values.push(v.as_slice());
                kinds.push(kind_name(k.class()));
                facts.push(Facts::of(meta));
            }
        }
        let session: Vec<&str> = facts.iter().map(|f| f.session).collect();
        let checkpoint: Vec<Option<&str>> = facts.iter().map(|f| f.checkpoint).collect();
        let branch: Vec<Option<&str>> = facts.iter().map(|f| f.branch).collect();
        let parent: Vec<Option<&str>> = facts.iter().map(|f| f.parent).collect();
        let reason: Vec<Option<&str>> = facts.iter().map(|f| f.reason).collect();
        let status: Vec<Option<&str>> = facts.iter().map(|f| f.status).collect();
        let step: Vec<Option<i64>> = facts.iter().map(|f| f.step).collect();
        let saved_at: Vec<i64> = facts.iter().map(|f| f.saved_at).collect();
        let t = &PUT_RECORDS_TYPES;
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 11] = [
            (&keys, t[0].clone()),
            (&values, t[1].clone()),
            (&kinds, t[2].clone()),
            (&session, t[3].clone()),
            (&checkpoint, t[4].clone()),
            (&branch, t[5].clone()),
            (&parent, t[6].clone()),
            (&step, t[7].clone()),
            (&reason, t[8].clone()),
            (&status, t[9].clone()),
            (&saved_at, t[10].clone()),
        ];
        super::query(client, shared.prepared, &shared.sql.put_records, &params).await.map(drop)
    };
    let singles_done =
        futures_util::future::join_all(singles.iter().map(|&i| ops[i].apply(shared, client)));
    let writes = async {
        let (many_done, records_done, singles_done) =
            futures_util::future::join3(put_many, put_records, singles_done).await;
        let mut results: Vec<Result<Done, tokio_postgres::Error>> = Vec::with_capacity(ops.len());
        let mut many_done = Some(many_done);
        let mut records_done = Some(records_done);
        let mut singles_done = singles_done.into_iter();
        for i in 0..ops.len() {
            if many.contains(&i) {
                // The multi-row statement's result, reported once (its error counts once).
                results.push(match many_done.take() {
                    Some(r) => r.map(|()| Done::Found(true)),
                    None => Ok(Done::Found(true)),
                });
            } else if records.contains(&i) {
                results.push(match records_done.take() {
                    Some(r) => r.map(|()| Done::Found(true)),
                    None => Ok(Done::Found(true)),
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
                found.push(Done::Found(true));
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
