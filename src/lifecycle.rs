//! What orchestrators need beyond saving: automatic checkpoint policies, live change
//! events, crash recovery reports, and schema migrations.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast;

use crate::error::{BoxError, Result, StateError};
use crate::middleware::acl::AccessRecord;
use crate::types::{BranchId, Checkpoint, CheckpointId, CheckpointReason, Principal, SessionId, SessionStatus};

/// When a session's actor takes checkpoints by itself, as the orchestrator reports steps
/// with [`record_step`](crate::StateManager::record_step). Both rules may be set; either
/// one firing takes a checkpoint. With neither, checkpoints are on demand only.
///
/// ```
/// use std::time::Duration;
/// use mars_state::CheckpointPolicy;
/// let every_10_steps = CheckpointPolicy::every_steps(10);
/// let both = CheckpointPolicy::every_steps(10).and_every(Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Checkpoint when the step reported is at least this many past the last checkpoint's.
    pub every_steps: Option<u64>,
    /// Checkpoint when steps were recorded and this much time passed since the last
    /// checkpoint (checked on the session actor's own timer).
    pub every: Option<Duration>,
    /// The branch automatic checkpoints go on (default `main`).
    pub branch: BranchId,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy { every_steps: None, every: None, branch: BranchId::from_valid("main") }
    }
}

impl CheckpointPolicy {
    /// On demand only: recorded steps become durable at the next checkpoint, pause, save,
    /// passivation or shutdown.
    pub fn on_demand() -> Self {
        Self::default()
    }

    /// Every `n` steps.
    pub fn every_steps(n: u64) -> Self {
        CheckpointPolicy { every_steps: Some(n.max(1)), ..Self::default() }
    }

    /// Every `period` of time (while steps are being recorded).
    pub fn every(period: Duration) -> Self {
        CheckpointPolicy { every: Some(period), ..Self::default() }
    }

    /// Adds a time rule to a step rule (or the reverse).
    pub fn and_every(mut self, period: Duration) -> Self {
        self.every = Some(period);
        self
    }

    /// Puts automatic checkpoints on `branch`.
    pub fn on_branch(mut self, branch: BranchId) -> Self {
        self.branch = branch;
        self
    }
}

/// A change to a session, as delivered by [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEvent {
    /// The session that changed.
    pub session_id: SessionId,
    /// What happened.
    pub kind: EventKind,
    /// When, in milliseconds since the Unix epoch.
    pub at: u64,
}

/// What happened to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// Its state was saved durably (save, update, rollback, flush of recorded steps).
    Saved,
    /// A checkpoint was taken.
    Checkpointed {
        /// The checkpoint.
        id: CheckpointId,
        /// Why.
        reason: CheckpointReason,
        /// The step it captures, if known.
        step: Option<u64>,
    },
    /// It was rolled back to a checkpoint.
    RolledBack {
        /// The checkpoint.
        to: CheckpointId,
    },
    /// It was paused.
    Paused {
        /// The reason given.
        reason: String,
    },
    /// It was resumed.
    Resumed,
    /// It was marked completed.
    Completed,
    /// It was marked failed.
    Failed {
        /// The reason given.
        reason: String,
    },
    /// It was deleted.
    Deleted,
}

/// A change event as the crate broadcasts it: the event, and the session's access record
/// at the moment the change was applied, which decides who may see it.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    pub(crate) event: StateEvent,
    /// `None`: the session has no owner (only administrators and the unscoped manager may
    /// see its events).
    pub(crate) access: Option<Arc<AccessRecord>>,
}

/// A live feed of [`StateEvent`]s from [`watch`](crate::StateManager::watch), without
/// polling. Events arrive in the order the session actor applied them.
///
/// A watch taken by a principal (a handle from
/// [`for_principal`](crate::StateManager::for_principal)) is checked at every event, not
/// only when it was taken: an event of a change made while the principal could not read
/// the session (its access was revoked, or the session was created and is owned by someone
/// else) is never delivered; [`recv`](Watch::recv) returns [`WatchError::AccessDenied`]
/// instead, and the watch ends.
#[derive(Debug)]
pub struct Watch {
    pub(crate) rx: broadcast::Receiver<Envelope>,
    pub(crate) session: Option<SessionId>,
    /// Checked at every event; `None` for the unscoped manager and administrators.
    pub(crate) reader: Option<Principal>,
    /// Set once an event was refused: the watch has ended.
    pub(crate) denied: bool,
}

/// Why [`Watch::recv`] returned no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The watcher fell more than the buffer (4,096 events) behind; this many were lost.
    /// The watch goes on with the newest events.
    #[error("the watcher fell behind and missed {0} events")]
    Lagged(u64),
    /// The manager has shut down.
    #[error("the state manager has shut down")]
    Closed,
    /// The watching principal may no longer read the session (its access was revoked, or
    /// the session now belongs to someone else). The watch has ended: every later call
    /// returns this too; take a new watch once access is granted again.
    #[error("the watching principal may not read this session")]
    AccessDenied,
}

impl Watch {
    /// The next event (of the watched session, or of any session).
    pub async fn recv(&mut self) -> std::result::Result<StateEvent, WatchError> {
        loop {
            if self.denied {
                return Err(WatchError::AccessDenied);
            }
            match self.rx.recv().await {
                Ok(e) if self.session.as_ref().is_none_or(|s| *s == e.event.session_id) => {
                    if let Some(p) = &self.reader
                        && !e.access.as_deref().is_some_and(|r| r.readable_by(p))
                    {
                        self.denied = true;
                        continue;
                    }
                    return Ok(e.event);
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(WatchError::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return Err(WatchError::Closed),
            }
        }
    }
}

/// What [`recover_session`](crate::StateManager::recover_session) found.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The session's last saved state.
    pub state: Option<Value>,
    /// Its stored status.
    pub status: SessionStatus,
    /// Why that status was set: the reason given to
    /// [`pause_session`](crate::StateManager::pause_session) or
    /// [`fail_session`](crate::StateManager::fail_session), if any.
    pub status_reason: Option<String>,
    /// When that status was set (milliseconds since the Unix epoch), if it was set by a
    /// pause, resume, completion or failure.
    pub status_at: Option<u64>,
    /// Whether its run was cut off: it was running when a process using the store died, and
    /// it has not been saved since (see [`SessionInfo::interrupted`](crate::SessionInfo)).
    pub interrupted: bool,
    /// The newest checkpoint that verified.
    pub checkpoint: Option<Checkpoint>,
    /// Newer checkpoints that were damaged and skipped, newest first.
    pub skipped: Vec<SkippedCheckpoint>,
}

/// A checkpoint recovery passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedCheckpoint {
    /// Its id.
    pub id: CheckpointId,
    /// What was wrong with it.
    pub reason: String,
}

/// What [`migrate_store`](crate::StateManager::migrate_store) rewrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Session records rewritten at the current schema version.
    pub sessions: usize,
    /// Checkpoint records rewritten.
    pub checkpoints: usize,
}

/// A migration step: the state at version `v` in, the state at `v + 1` out.
pub type MigrationFn = Arc<dyn Fn(Value) -> std::result::Result<Value, BoxError> + Send + Sync>;

/// The application's schema version and the steps that bring older records up to it.
#[derive(Clone, Default)]
pub(crate) struct Migrations {
    pub(crate) current: u32,
    pub(crate) steps: BTreeMap<u32, MigrationFn>,
}

impl std::fmt::Debug for Migrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrations").field("current", &self.current).field("steps", &self.steps.keys()).finish()
    }
}

impl Migrations {
    /// Brings `data` (JSON) stored at version `from` up to the current version. `None`
    /// when it is current already.
    pub(crate) fn upgrade(&self, session: &SessionId, from: u32, data: &[u8]) -> Result<Option<Vec<u8>>> {
        if from == self.current {
            return Ok(None);
        }
        let fail =
            |reason: String| StateError::Migration { session: session.to_string(), from, to: self.current, reason };
        if from > self.current {
            return Err(fail("the record is newer than this application's schema".into()));
        }
        let mut value: Value = serde_json::from_slice(data).map_err(|e| StateError::json(session.as_str(), &e))?;
        for v in from..self.current {
            let step = self.steps.get(&v).ok_or_else(|| fail(format!("no migration registered from version {v}")))?;
            value = step(value).map_err(|e| fail(format!("migration from version {v} failed: {e}")))?;
        }
        serde_json::to_vec(&value).map(Some).map_err(|e| StateError::json(session.as_str(), &e))
    }
}
