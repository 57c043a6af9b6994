//! The PostgreSQL backend's writers: a few tokio tasks that take writes from one queue and
//! commit every write queued together in one transaction (group commit). Owns the queue,
//! the tasks, the transaction of a batch and its retries; calls the pool and statements of
//! `super` and the error classification of `super::error`.
//!
//! A writer takes the first queued write, then everything queued behind it (up to
//! [`MAX_BATCH`]), and sends `BEGIN; SET LOCAL synchronous_commit = on; SET LOCAL
//! statement_timeout = …; SELECT txid_current()`, the writes and `COMMIT` pipelined: all at
//! once, answered in order, one round trip plus the flush. Several writes of one kind (puts,
//! records, fenced records, fenced deletes; no log key, and no key twice in the batch) go as
//! one multi-row statement, the others as a statement each. Each caller is
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
//! committed. In a multi-row fenced statement each row is checked against its own lease and
//! answered on its own, exactly as its single statement would be; the statement locks its
//! lease rows in name order and writes its rows in key order, so two such statements of
//! different writers take their locks in one order. A fenced write refused on a retry after
//! an attempt whose outcome was unknown is answered [`StateError::Timeout`] instead: the
//! earlier attempt may have been applied before the lease changed hands.

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
static PUT_RECORD_TYPES: [Type; 11] = [
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
static PUT_RECORDS_TYPES: [Type; 11] = [
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
static PUT_MANY_TYPES: [Type; 3] = [Type::TEXT_ARRAY, Type::BYTEA_ARRAY, Type::TEXT_ARRAY];

/// The parameter types of `Sql::put_fenced_many`: `PUT_RECORDS_TYPES`, then the lease names
/// and the tokens.
static PUT_FENCED_MANY_TYPES: [Type; 13] = [
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
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
];

/// The parameter types of `Sql::delete_fenced_many`: keys, lease names, tokens.
static DELETE_FENCED_MANY_TYPES: [Type; 3] = [Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::INT8_ARRAY];

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

/// The multi-row statements a batch's writes may go in, each at most once per transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// Puts of non-log keys: `Sql::put_many`.
    Puts,
    /// Records with their facts: `Sql::put_records`.
    Records,
    /// Fenced records of non-log keys: `Sql::put_fenced_many`.
    FencedPuts,
    /// Fenced deletes of non-log keys: `Sql::delete_fenced_many`.
    FencedDeletes,
}

impl Group {
    const ALL: [Group; 4] = [Group::Puts, Group::Records, Group::FencedPuts, Group::FencedDeletes];

    /// The group `op` may go in, if any.
    fn of(op: &Op) -> Option<Group> {
        let log = op.key().class() == KeyClass::Log;
        match op {
            Op::Put(..) if !log => Some(Group::Puts),
            // A record is never a log (`put_record` sends a log key as a plain put).
            Op::PutRecord(..) => Some(Group::Records),
            Op::PutFenced(..) if !log => Some(Group::FencedPuts),
            Op::DeleteFenced(..) if !log => Some(Group::FencedDeletes),
            _ => None,
        }
    }

    fn sql(self, shared: &Shared) -> &str {
        let sql = &shared.sql;
        match self {
            Group::Puts => &sql.put_many,
            Group::Records => &sql.put_records,
            Group::FencedPuts => &sql.put_fenced_many,
            Group::FencedDeletes => &sql.delete_fenced_many,
        }
    }

    fn types(self) -> &'static [Type] {
        match self {
            Group::Puts => &PUT_MANY_TYPES,
            Group::Records => &PUT_RECORDS_TYPES,
            Group::FencedPuts => &PUT_FENCED_MANY_TYPES,
            Group::FencedDeletes => &DELETE_FENCED_MANY_TYPES,
        }
    }

    /// Runs this group's statement over `ops` (all of this group, none repeating a key):
    /// what each write did, in the order of `ops`.
    async fn apply(
        self,
        shared: &Shared,
        client: &Object,
        ops: &[&Op],
    ) -> Result<Vec<Done>, tokio_postgres::Error> {
        use tokio_postgres::types::ToSql;
        let sql = self.sql(shared);
        let types = self.types();
        let fences: Vec<&Fence> = ops.iter().filter_map(|op| op.fence()).collect();
        let names: Vec<&str> = fences.iter().map(|f| f.name.as_str()).collect();
        let tokens: Vec<i64> = fences.iter().map(|f| token_param(f.token)).collect();
        let rows = match self {
            Group::Puts => {
                let keys: Vec<&str> = ops.iter().map(|op| op.key().as_str()).collect();
                let values: Vec<&[u8]> = ops
                    .iter()
                    .map(|op| match op {
                        Op::Put(_, v) => v.as_slice(),
                        _ => &[],
                    })
                    .collect();
                let kinds: Vec<&str> = ops.iter().map(|op| kind_name(op.key().class())).collect();
                let params: [(&(dyn ToSql + Sync), Type); 3] = [
                    (&keys, types[0].clone()),
                    (&values, types[1].clone()),
                    (&kinds, types[2].clone()),
                ];
                super::query(client, shared.prepared, sql, &params).await?;
                return Ok(vec![Done::Found(true); ops.len()]);
            }
            Group::Records | Group::FencedPuts => {
                let columns = RecordColumns::of(ops);
                let mut params = columns.params();
                if self == Group::FencedPuts {
                    params.extend([
                        (&names as &(dyn ToSql + Sync), types[11].clone()),
                        (&tokens, types[12].clone()),
                    ]);
                }
                let rows = super::query(client, shared.prepared, sql, &params).await?;
                if self == Group::Records {
                    return Ok(vec![Done::Found(true); ops.len()]);
                }
                rows
            }
            Group::FencedDeletes => {
                let keys: Vec<&str> = ops.iter().map(|op| op.key().as_str()).collect();
                let params: [(&(dyn ToSql + Sync), Type); 3] = [
                    (&keys, types[0].clone()),
                    (&names, types[1].clone()),
                    (&tokens, types[2].clone()),
                ];
                super::query(client, shared.prepared, sql, &params).await?
            }
        };
        fenced_outcomes(&rows, &fences)
    }
}

/// What the answer rows of a multi-row fenced statement (position from 1, the lease's
/// current token, whether the row was written or deleted) say of each of `fences`' writes,
/// as [`fenced_outcome`] says of one: an entry with no answer row was not applied.
fn fenced_outcomes(
    rows: &[tokio_postgres::Row],
    fences: &[&Fence],
) -> Result<Vec<Done>, tokio_postgres::Error> {
    let mut done = vec![Done::Fenced { current: 0 }; fences.len()];
    for row in rows {
        let n: i64 = row.try_get(0)?;
        let current: Option<i64> = row.try_get(1)?;
        let changed: bool = row.try_get(2)?;
        let current = current.and_then(|t| u64::try_from(t).ok()).unwrap_or(0);
        let at = usize::try_from(n).ok().and_then(|n| n.checked_sub(1));
        let (Some(slot), Some(fence)) =
            (at.and_then(|i| done.get_mut(i)), at.and_then(|i| fences.get(i)))
        else {
            continue;
        };
        *slot =
            if current == fence.token { Done::Found(changed) } else { Done::Fenced { current } };
    }
    Ok(done)
}

/// The facts of records as the array parameters `$1`..`$11` of `Sql::put_records` (and of
/// `Sql::put_fenced_many`).
struct RecordColumns<'a> {
    keys: Vec<&'a str>,
    values: Vec<&'a [u8]>,
    kinds: Vec<&'static str>,
    session: Vec<&'a str>,
    checkpoint: Vec<Option<&'a str>>,
    branch: Vec<Option<&'a str>>,
    parent: Vec<Option<&'a str>>,
    step: Vec<Option<i64>>,
    reason: Vec<Option<&'a str>>,
    status: Vec<Option<&'a str>>,
    saved_at: Vec<i64>,
}

impl<'a> RecordColumns<'a> {
    /// The columns of the records among `ops` (`PutRecord`, `PutFenced`), in order.
    fn of(ops: &[&'a Op]) -> Self {
        let mut c = RecordColumns {
            keys: Vec::with_capacity(ops.len()),
            values: Vec::with_capacity(ops.len()),
            kinds: Vec::with_capacity(ops.len()),
            session: Vec::with_capacity(ops.len()),
            checkpoint: Vec::with_capacity(ops.len()),
            branch: Vec::with_capacity(ops.len()),
            parent: Vec::with_capacity(ops.len()),
            step: Vec::with_capacity(ops.len()),
            reason: Vec::with_capacity(ops.len()),
            status: Vec::with_capacity(ops.len()),
            saved_at: Vec::with_capacity(ops.len()),
        };
        for op in ops {
            let (key, value, meta) = match op {
                Op::PutRecord(k, v, meta) => (k, v, meta.as_ref()),
                Op::PutFenced(k, v, facts) => (k, v, &facts.0),
                _ => continue,
            };
            let f = Facts::of(meta);
            c.keys.push(key.as_str());
            c.values.push(value.as_slice());
            c.kinds.push(kind_name(key.class()));
            c.session.push(f.session);
            c.checkpoint.push(f.checkpoint);
            c.branch.push(f.branch);
            c.parent.push(f.parent);
            c.step.push(f.step);
            c.reason.push(f.reason);
            c.status.push(f.status);
            c.saved_at.push(f.saved_at);
        }
        c
    }

    fn params(&self) -> Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> {
        let t = &PUT_RECORDS_TYPES;
        vec![
            (&self.keys, t[0].clone()),
            (&self.values, t[1].clone()),
            (&self.kinds, t[2].clone()),
            (&self.session, t[3].clone()),
            (&self.checkpoint, t[4].clone()),
            (&self.branch, t[5].clone()),
            (&self.parent, t[6].clone()),
            (&self.step, t[7].clone()),
            (&self.reason, t[8].clone()),
            (&self.status, t[9].clone()),
            (&self.saved_at, t[10].clone()),
        ]
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
    // The writes of one kind (puts, records, fenced records, fenced deletes of non-log
    // keys) go as one multi-row statement when there are several and no key repeats in the
    // batch (so their order against the batch's other writes cannot matter): one statement
    // for the server to run instead of one per write. Each fenced write is still checked
    // against its own lease and answered on its own.
    let keys: std::collections::HashSet<&str> = ops.iter().map(|op| op.key().as_str()).collect();
    let unique = keys.len() == ops.len();
    let mut route: Vec<Option<Group>> = ops.iter().map(|op| Group::of(op)).collect();
    let groups: Vec<(Group, Vec<&Op>)> = Group::ALL
        .iter()
        .filter_map(|&g| {
            let members: Vec<&Op> =
                (0..ops.len()).filter(|&i| route[i] == Some(g)).map(|i| ops[i]).collect();
            (members.len() > 1 && unique).then_some((g, members))
        })
        .collect();
    for r in route.iter_mut() {
        if !groups.iter().any(|(g, _)| Some(*g) == *r) {
            *r = None;
        }
    }
    let singles: Vec<usize> = (0..ops.len()).filter(|&i| route[i].is_none()).collect();
    if shared.prepared {
        // Prepare (or find cached) every statement first, so each write below goes out at
        // its first poll, in the batch's order: a cache miss would otherwise hold it back.
        for (group, _) in &groups {
            super::prepare(client, group.sql(shared), group.types()).await?;
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
    // join_all polls in order, so the statements go out in order: the groups', then the
    // singles'.
    let groups_done = futures_util::future::join_all(
        groups.iter().map(|(group, members)| group.apply(shared, client, members)),
    );
    let singles_done =
        futures_util::future::join_all(singles.iter().map(|&i| ops[i].apply(shared, client)));
    let writes = async {
        let (groups_done, singles_done) =
            futures_util::future::join(groups_done, singles_done).await;
        // Each group's answers, in its members' order; a failed statement's error is
        // reported once, by its first member (the others count as done: the transaction is
        // aborted anyway).
        let mut answers: Vec<std::vec::IntoIter<Result<Done, tokio_postgres::Error>>> = groups
            .iter()
            .zip(groups_done)
            .map(|((_, members), done)| {
                let spread: Vec<_> = match done {
                    Ok(done) => done.into_iter().map(Ok).collect(),
                    Err(e) => std::iter::once(Err(e))
                        .chain((1..members.len()).map(|_| Ok(Done::Found(true))))
                        .collect(),
                };
                spread.into_iter()
            })
            .collect();
        let mut singles_done = singles_done.into_iter();
        let mut results: Vec<Result<Done, tokio_postgres::Error>> = Vec::with_capacity(ops.len());
        for r in &route {
            let next = match r {
                Some(g) => groups
                    .iter()
                    .position(|(group, _)| group == g)
                    .and_then(|at| answers.get_mut(at))
                    .and_then(Iterator::next),
                None => singles_done.next(),
            };
            // Every group answers each of its members, so `next` is always there; were one
            // missing, a fenced write would count as not applied, as a fenced statement
            // with no answer row does (`fenced_outcome`).
            let missing = match ops[results.len()].fence() {
                Some(_) => Done::Fenced { current: 0 },
                None => Done::Found(true),
            };
            results.push(next.unwrap_or(Ok(missing)));
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
