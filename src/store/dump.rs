//! A portable dump of a store: [`StateManager::export_store`] and
//! [`StateManager::import_store`]. This file owns the dump format (JSON Lines, optionally
//! gzipped), its deterministic order, and the import's checks and writes. It calls the
//! store's record reads and writes (so the codec and the middleware of each side apply:
//! a dump holds decoded states, and an import is compressed and encrypted as its target
//! store is), the index and the key layout.
//!
//! The format is described at [`DUMP_FORMAT_VERSION`].

use std::io::{BufRead, BufReader, Read, Write};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::codec::{CheckpointMeta, RecordHead, SessionMeta};
use super::{Store, keys};
use crate::StateManager;
use crate::access::AccessRecord;
use crate::error::{Operation, Result, StateError, redact};
use crate::types::{BranchId, CheckpointId, SessionId};

/// The dump format version this build writes and the only one it reads.
///
/// # Format (version 1)
///
/// One JSON object per line, `\n`-terminated:
///
/// ```text
/// {"mars_state_dump":1,"crate_version":"0.1.0"}
/// {"type":"session","session":"run-1","saved_at":1764095662123,"meta":{"schema":1,"status":"running","step":12},"state":{...}}
/// {"type":"checkpoint","session":"run-1","id":"0192a3b4c5d60001-1a2b3c4d","branch":"main","timestamp":1764095660000,"meta":{"schema":1,"reason":"manual","step":11},"state":{...}}
/// {"type":"access","session":"run-1","record":{"owner":"alice",...}}
/// ```
///
/// The header comes first. Then, for each session in id order: its session record (if it
/// has one), its checkpoints in id order (ids grow with time), its access record (if it
/// has one). `meta` is the record's own metadata as the store keeps it (schema version,
/// status and its reason and time, step, the fork of a rollback; a checkpoint's reason,
/// step and parent), so an import restores the records exactly; `state` is the state's JSON
/// byte for byte as it was stored (no key reordered, no number rounded, no migration
/// applied). Two dumps of stores holding the same
/// records are byte-identical, whatever their backends, compression or keys.
pub const DUMP_FORMAT_VERSION: u32 = 1;

/// What [`StateManager::export_store`] dumps and how.
///
/// ```
/// let options = mars_state::ExportOptions::new().session("run-1").session("run-2").gzip(true);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    sessions: Vec<String>,
    gzip: bool,
}

impl ExportOptions {
    /// Every session, not gzipped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Dumps `session` (call again for more); without any, every session of the store.
    pub fn session(mut self, session: impl Into<String>) -> Self {
        self.sessions.push(session.into());
        self
    }

    /// Gzips the dump (what `zcat` reads; [`import_store`](StateManager::import_store)
    /// recognises it by itself).
    pub fn gzip(mut self, on: bool) -> Self {
        self.gzip = on;
        self
    }
}

/// What [`StateManager::export_store`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ExportReport {
    /// Sessions dumped (with a session record, checkpoints or an access record).
    pub sessions: usize,
    /// Session records dumped.
    pub session_records: usize,
    /// Checkpoints dumped.
    pub checkpoints: usize,
    /// Access records dumped.
    pub access_records: usize,
    /// Lines written, the header included.
    pub lines: usize,
}

/// What [`StateManager::import_store`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ImportReport {
    /// Session records written.
    pub session_records: usize,
    /// Checkpoints written.
    pub checkpoints: usize,
    /// Access records written.
    pub access_records: usize,
    /// Lines read, the header included.
    pub lines: usize,
}

/// The first line.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    mars_state_dump: u32,
    crate_version: String,
}

/// Every line after the first, as written (`state` is the stored state's JSON, byte for
/// byte: no key is reordered and no number rounded) and as read back.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Session {
        session: SessionId,
        saved_at: u64,
        meta: SessionMeta,
        state: Box<RawValue>,
    },
    Checkpoint {
        session: SessionId,
        id: CheckpointId,
        branch: BranchId,
        timestamp: u64,
        meta: CheckpointMeta,
        state: Box<RawValue>,
    },
    Access {
        session: SessionId,
        record: AccessRecord,
    },
}

impl Line {
    fn session(&self) -> &SessionId {
        match self {
            Line::Session { session, .. }
            | Line::Checkpoint { session, .. }
            | Line::Access { session, .. } => session,
        }
    }
}

/// A line as read: every field of every kind, checked by [`InLine::into_line`]. (serde's
/// tagged enums buffer their fields, which a [`RawValue`] cannot go through, so lines are
/// read into this plain struct first.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InLine {
    #[serde(rename = "type")]
    kind: String,
    session: SessionId,
    #[serde(default)]
    saved_at: Option<u64>,
    #[serde(default)]
    id: Option<CheckpointId>,
    #[serde(default)]
    branch: Option<BranchId>,
    #[serde(default)]
    timestamp: Option<u64>,
    #[serde(default)]
    meta: Option<Value>,
    #[serde(default)]
    state: Option<Box<RawValue>>,
    #[serde(default)]
    record: Option<AccessRecord>,
}

impl InLine {
    fn into_line(self) -> std::result::Result<Line, String> {
        let missing = |what: &str| format!("a {} line needs `{what}`", self.kind);
        let meta_of = |v: Option<Value>| -> std::result::Result<Value, String> {
            v.ok_or_else(|| missing("meta"))
        };
        let extra = |present: bool, field: &str| {
            if present { Err(format!("a {} line has no `{field}`", self.kind)) } else { Ok(()) }
        };
        match self.kind.as_str() {
            "session" => {
                extra(self.id.is_some(), "id")?;
                extra(self.branch.is_some(), "branch")?;
                extra(self.timestamp.is_some(), "timestamp")?;
                extra(self.record.is_some(), "record")?;
                let meta = serde_json::from_value(meta_of(self.meta.clone())?)
                    .map_err(|e| format!("`meta`: {}", redact(&e.to_string())))?;
                Ok(Line::Session {
                    saved_at: self.saved_at.ok_or_else(|| missing("saved_at"))?,
                    state: self.state.ok_or_else(|| missing("state"))?,
                    session: self.session,
                    meta,
                })
            }
            "checkpoint" => {
                extra(self.saved_at.is_some(), "saved_at")?;
                extra(self.record.is_some(), "record")?;
                let meta = serde_json::from_value(meta_of(self.meta.clone())?)
                    .map_err(|e| format!("`meta`: {}", redact(&e.to_string())))?;
                Ok(Line::Checkpoint {
                    id: self.id.ok_or_else(|| missing("id"))?,
                    branch: self.branch.ok_or_else(|| missing("branch"))?,
                    timestamp: self.timestamp.ok_or_else(|| missing("timestamp"))?,
                    state: self.state.ok_or_else(|| missing("state"))?,
                    session: self.session,
                    meta,
                })
            }
            "access" => {
                for (present, field) in [
                    (self.saved_at.is_some(), "saved_at"),
                    (self.id.is_some(), "id"),
                    (self.branch.is_some(), "branch"),
                    (self.timestamp.is_some(), "timestamp"),
                    (self.meta.is_some(), "meta"),
                    (self.state.is_some(), "state"),
                ] {
                    extra(present, field)?;
                }
                Ok(Line::Access {
                    record: self.record.ok_or_else(|| missing("record"))?,
                    session: self.session,
                })
            }
            _ => Err("unknown line type (expected session, checkpoint or access)".to_owned()),
        }
    }
}

impl StateManager {
    /// Writes a portable dump of the store (or of the sessions `options` names) to `out`:
    /// JSON Lines, gzipped if asked, in the format and the deterministic order described at
    /// [`DUMP_FORMAT_VERSION`]. States are decoded (never the stored bytes),
    /// so a dump moves between keys, compression settings and backends; see
    /// [`import_store`](Self::import_store).
    ///
    /// Reads only: safe on a [read-only](crate::StateManagerBuilder::read_only) manager,
    /// beside a running one. `out` is written as the dump goes and flushed at the end; a
    /// failure part way leaves a partial dump, which an import refuses only if a line is
    /// cut (write to a staged file and rename it when this returns `Ok`).
    ///
    /// Errors: [`StateError::Config`] if a session named in `options` is not in the store
    /// (checked before anything is written); [`StateError::Corrupt`] if a record is damaged
    /// ([`verify_store`](Self::verify_store) lists them all); [`StateError::Io`] if `out`
    /// fails; [`StateError::AccessDenied`] for a handle of a principal who is not an
    /// administrator.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> mars_state::Result<()> {
    /// use mars_state::{ExportOptions, MemoryStorageBackend, StateManager};
    /// let from = StateManager::start(MemoryStorageBackend::new()).await?;
    /// from.save_session("run-1", &serde_json::json!({ "step": 1 })).await?;
    /// from.create_checkpoint("run-1", "main", &serde_json::json!({ "step": 1 })).await?;
    ///
    /// let mut dump = Vec::new();
    /// let report = from.export_store(&mut dump, &ExportOptions::new()).await?;
    /// assert_eq!((report.session_records, report.checkpoints), (1, 1));
    ///
    /// let to = StateManager::builder(MemoryStorageBackend::new()).compression(6).start().await?;
    /// to.import_store(&dump[..]).await?;
    /// let state: Option<serde_json::Value> = to.load_session("run-1").await?;
    /// assert_eq!(state, Some(serde_json::json!({ "step": 1 })));
    /// # Ok(()) }
    /// ```
    pub async fn export_store<W: Write + Send>(
        &self,
        out: W,
        options: &ExportOptions,
    ) -> Result<ExportReport> {
        let store = self.store_for(Operation::ExportStore)?;
        if options.gzip {
            let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::new(6));
            let report = store.export(&mut gz, &options.sessions).await?;
            gz.try_finish().map_err(|e| StateError::io("writing the dump", "", e))?;
            Ok(report)
        } else {
            let mut out = out;
            let report = store.export(&mut out, &options.sessions).await?;
            out.flush().map_err(|e| StateError::io("writing the dump", "", e))?;
            Ok(report)
        }
    }

    /// Writes the dump read from `input` (plain or gzipped JSON Lines, as
    /// [`export_store`](Self::export_store) writes it) into this manager's store, through
    /// the store's normal write path: records are compressed and encrypted as this store's
    /// are, the index and its journal are kept up to date. Each record keeps its key, so
    /// importing the same dump twice gives the same store, with no duplicate checkpoints.
    ///
    /// The whole dump is read and checked before anything is written: a dump of another
    /// format version, a line that is not JSON of the format (its line number is named),
    /// or a checkpoint id the store already holds for another session is refused with
    /// [`StateError::Config`], and the store is left as it was. A failure while writing
    /// (I/O) leaves the records written so far; run the import again to finish it.
    ///
    /// Import into a manager that has served no session yet (one started for the import):
    /// records are written below the session actors, which would go on serving a state
    /// they had cached. So if this manager has any live session actor, the import is
    /// refused ([`StateError::Config`]).
    ///
    /// On a shared store (PostgreSQL, Redis) each session is imported under its lease, as
    /// a session actor writes it: the import waits up to the manager's
    /// [`lease_wait`](crate::StateManagerBuilder::lease_wait) while another node holds the
    /// session and then stops with [`StateError::OwnedElsewhere`] (the sessions before it
    /// are imported; run the import again once that node let go), its writes are fenced
    /// (a node granted the session meanwhile makes them fail with [`StateError::Fenced`]
    /// instead of overwriting that node's), and the lease is released when the session's
    /// lines are written.
    ///
    /// Errors besides those: [`StateError::Io`] if `input` fails,
    /// [`StateError::ReadOnly`] on a read-only manager, [`StateError::AccessDenied`] for a
    /// handle of a principal who is not an administrator.
    pub async fn import_store<R: Read + Send>(&self, input: R) -> Result<ImportReport> {
        let store = self.store_for(Operation::ImportStore)?;
        if self.live_session_actors().await? > 0 {
            return Err(StateError::Config {
                message: "import into a manager that has served no session yet (this one has \
                          live session actors, whose cached states the import would bypass): \
                          start a manager for the import"
                    .into(),
            });
        }
        let lines = parse(input)?;
        store.check_import(&lines)?;
        let mut report = ImportReport { lines: lines.len() + 1, ..Default::default() };
        if !store.shared {
            store.import(lines, &mut report, None).await?;
            return Ok(report);
        }
        // Per session, in the dump's order (a dump holds each session's lines together).
        let mut groups: Vec<(SessionId, Vec<Line>)> = Vec::new();
        for line in lines {
            let sid = line.session().clone();
            match groups.last_mut() {
                Some((last, group)) if *last == sid => group.push(line),
                _ => groups.push((sid, vec![line])),
            }
        }
        let config = self.config();
        for (sid, group) in groups {
            let name = crate::actor::lease::lease_name(&sid);
            let (ttl, wait) = (config.lease_ttl, config.lease_wait());
            let (lease, _) = crate::actor::lease::acquire_within(
                store.backend.as_ref(),
                &store.clock,
                &name,
                &config.node_id,
                ttl,
                wait,
            )
            .await?;
            store.set_fence(&sid, Some(lease.fence()));
            let written = store.import(group, &mut report, Some((&lease, ttl))).await;
            store.set_fence(&sid, None);
            // Released even after a failure: what was written is whole records, and the
            // next holder reads them. A release that fails leaves the lease to run out.
            if let Err(e) = store.backend.release_lease(&lease).await {
                tracing::debug!(session = %sid, error = %e, "releasing an import's lease failed; it runs out");
            }
            written?;
        }
        Ok(report)
    }
}

fn write_line(out: &mut dyn Write, value: &impl Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(|e| StateError::json("", &e))?;
    bytes.push(b'\n');
    out.write_all(&bytes).map_err(|e| StateError::io("writing the dump", "", e))
}

impl Store {
    async fn export(&self, out: &mut dyn Write, chosen: &[String]) -> Result<ExportReport> {
        let mut sessions: Vec<SessionId> = {
            let idx = self.index();
            idx.sessions.keys().cloned().collect()
        };
        let owned = self.backend.list(&keys::access_records()).await?;
        sessions.extend(owned.iter().filter_map(|m| keys::access_of(&m.key)));
        sessions.sort();
        sessions.dedup();
        if !chosen.is_empty() {
            let mut picked = Vec::with_capacity(chosen.len());
            for name in chosen {
                let sid = SessionId::new(name.as_str())?;
                if sessions.binary_search(&sid).is_err() {
                    return Err(StateError::Config {
                        message: format!("session {sid} is not in the store: nothing exported"),
                    });
                }
                picked.push(sid);
            }
            picked.sort();
            picked.dedup();
            sessions = picked;
        }
        let mut report = ExportReport::default();
        write_line(
            out,
            &Header {
                mars_state_dump: DUMP_FORMAT_VERSION,
                crate_version: env!("CARGO_PKG_VERSION").to_owned(),
            },
        )?;
        report.lines += 1;
        for sid in sessions {
            let mut any = false;
            if let Some(d) = self.load_session(&sid).await?
                && let RecordHead::Session { saved_at, meta, .. } = &d.head
            {
                let state = state_of(&sid, d.data())?;
                let line = Line::Session {
                    session: sid.clone(),
                    saved_at: *saved_at,
                    meta: meta.clone(),
                    state,
                };
                write_line(out, &line)?;
                report.session_records += 1;
                any = true;
            }
            let checkpoints: Vec<CheckpointId> = self
                .index()
                .sessions
                .get(&sid)
                .map(|e| e.checkpoints.keys().cloned().collect())
                .unwrap_or_default();
            for cid in checkpoints {
                let Some(d) = self.load_checkpoint(&sid, &cid).await? else { continue };
                if let RecordHead::Checkpoint { branch_id, timestamp, meta, .. } = &d.head {
                    let line = Line::Checkpoint {
                        session: sid.clone(),
                        id: cid.clone(),
                        branch: branch_id.clone(),
                        timestamp: *timestamp,
                        meta: meta.clone(),
                        state: state_of(&sid, d.data())?,
                    };
                    write_line(out, &line)?;
                    report.checkpoints += 1;
                    any = true;
                }
            }
            let key = keys::access(&sid);
            if let Some(bytes) = self.backend.get(&key).await? {
                let record: AccessRecord = serde_json::from_slice(&bytes)
                    .map_err(|_| StateError::corrupt(&key, "not an access record"))?;
                write_line(out, &Line::Access { session: sid.clone(), record })?;
                report.access_records += 1;
                any = true;
            }
            if any {
                report.sessions += 1;
            }
        }
        report.lines += report.session_records + report.checkpoints + report.access_records;
        Ok(report)
    }

    /// Refuses a dump that cannot be imported whole, before anything is written: a
    /// checkpoint id names one checkpoint in the whole store, so one the store holds for
    /// another session is refused.
    fn check_import(&self, lines: &[Line]) -> Result<()> {
        {
            let idx = self.index();
            for (n, line) in lines.iter().enumerate() {
                if let Line::Checkpoint { session, id, .. } = line
                    && let Some(other) = idx.by_checkpoint.get(id)
                    && other != session
                {
                    return Err(StateError::Config {
                        message: format!(
                            "dump line {}: checkpoint {id} of session {session} is already in the \
                             store as a checkpoint of session {other}; nothing was imported",
                            n + 2
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes `lines` (checked by [`check_import`](Self::check_import)), counting them in
    /// `report`. `lease` is the lease (and its TTL) the writes are fenced by, on a shared
    /// store: it is renewed once a third of its TTL has passed, and a lease lost meanwhile
    /// stops the import with [`StateError::Fenced`].
    async fn import(
        &self,
        lines: Vec<Line>,
        report: &mut ImportReport,
        lease: Option<(&crate::backend::Lease, std::time::Duration)>,
    ) -> Result<()> {
        let mut renewed = tokio::time::Instant::now();
        for line in lines {
            if let Some((lease, ttl)) = lease
                && renewed.elapsed() >= ttl / 3
            {
                renewed = tokio::time::Instant::now();
                if self.backend.renew_lease(lease, ttl).await?.is_none() {
                    let (backend, name) = (self.backend.as_ref(), lease.name.clone());
                    return Err(crate::actor::lease::fenced(backend, name, lease.token).await);
                }
            }
            match line {
                Line::Session { session, saved_at, meta, state } => {
                    let data = state.get().as_bytes();
                    self.save_session(&session, data, saved_at, meta).await?;
                    report.session_records += 1;
                }
                Line::Checkpoint { session, id, branch, timestamp, meta, state } => {
                    let data = state.get().as_bytes();
                    self.put_checkpoint(&session, &id, &branch, timestamp, meta, data).await?;
                    report.checkpoints += 1;
                }
                Line::Access { session, record } => {
                    self.put_access(&session, &record).await?;
                    self.access.remove(&session);
                    self.access.set(&session, record);
                    report.access_records += 1;
                }
            }
        }
        Ok(())
    }
}

/// A record's stored state, its JSON bytes as they are (compacted only if they span lines,
/// which a JSON Lines dump cannot hold; the manager always stores compact JSON).
fn state_of(sid: &SessionId, data: &[u8]) -> Result<Box<RawValue>> {
    let json = |e: serde_json::Error| StateError::json(sid.as_str(), &e);
    if data.contains(&b'\n') || data.contains(&b'\r') {
        let value: Value = serde_json::from_slice(data).map_err(json)?;
        return serde_json::value::to_raw_value(&value).map_err(json);
    }
    serde_json::from_slice(data).map_err(json)
}

/// Reads and checks a whole dump: the header's version, then every line. Gzip is
/// recognised by its magic bytes.
fn parse(input: impl Read) -> Result<Vec<Line>> {
    let mut reader = BufReader::new(input);
    let gzipped = reader
        .fill_buf()
        .map_err(|e| StateError::io("reading the dump", "", e))?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn BufRead> = if gzipped {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(reader)))
    } else {
        Box::new(reader)
    };
    let bad = |n: usize, why: String| StateError::Config {
        message: format!("dump line {n}: {why}; nothing was imported"),
    };
    let mut lines = Vec::new();
    let mut header_seen = false;
    for (i, text) in reader.split(b'\n').enumerate() {
        let n = i + 1;
        let text = text.map_err(|e| StateError::io("reading the dump", "", e))?;
        if n == 1 {
            let header: Value = serde_json::from_slice(&text)
                .map_err(|_| bad(1, "not a mars-state dump (its first line is not JSON)".into()))?;
            match header.get("mars_state_dump").and_then(Value::as_u64) {
                Some(v) if v == u64::from(DUMP_FORMAT_VERSION) => {
                    header_seen = true;
                    continue;
                }
                Some(v) => {
                    return Err(bad(
                        1,
                        format!(
                            "dump format version {v}, which this build does not read (it reads \
                             version {DUMP_FORMAT_VERSION})"
                        ),
                    ));
                }
                None => {
                    return Err(bad(
                        1,
                        "not a mars-state dump (no `mars_state_dump` header)".into(),
                    ));
                }
            }
        }
        // serde_json's messages quote values, which may be secrets: redacted.
        let line: InLine =
            serde_json::from_slice(&text).map_err(|e| bad(n, redact(&e.to_string())))?;
        lines.push(line.into_line().map_err(|why| bad(n, why))?);
    }
    if !header_seen {
        return Err(bad(1, "the dump is empty (not even a header)".into()));
    }
    Ok(lines)
}
