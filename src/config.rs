//! The policies a manager runs by: [`CheckpointPolicy`], schema migrations, and (kept by
//! the store, re-exported here) [`RetentionPolicy`].
//! Owns the checkpoint policy type, the migration steps and the one function that brings
//! a decoded record's state to the current schema version (every load, restore, rollback
//! and migration pass uses it). Calls [`crate::error`], [`crate::types`] and the codec's
//! decoded record type; nothing here does I/O.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::error::{BoxError, Result, StateError};
use crate::store::codec::{Decoded, RecordHead};
use crate::types::{BranchId, SessionId, StateBytes};

pub use crate::store::RetentionPolicy;

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

/// A migration step: the state at version `v` in, the state at `v + 1` out. (In no public
/// signature: [`migration`](crate::StateManagerBuilder::migration) takes any such closure.
/// Kept public so that its path keeps working.)
#[doc(hidden)]
pub type MigrationFn = Arc<dyn Fn(Value) -> std::result::Result<Value, BoxError> + Send + Sync>;

/// The application's schema version and the steps that bring older records up to it.
#[derive(Clone, Default)]
pub(crate) struct Migrations {
    pub(crate) current: u32,
    pub(crate) steps: BTreeMap<u32, MigrationFn>,
}

impl std::fmt::Debug for Migrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrations")
            .field("current", &self.current)
            .field("steps", &self.steps.keys())
            .finish()
    }
}

impl Migrations {
    /// The state of a decoded record (session record or checkpoint), brought up to the
    /// current schema version: the one decode + migrate of the crate. Runs the user's
    /// migration steps, so [`StateError::Migration`] or [`StateError::Serialization`] when
    /// they fail; nothing is written.
    pub(crate) fn state_of(&self, session: &SessionId, record: &Decoded) -> Result<Migrated> {
        let schema = match &record.head {
            RecordHead::Session { meta, .. } => meta.schema,
            RecordHead::Checkpoint { meta, .. } => meta.schema,
        };
        Ok(match self.upgrade(session, schema, record.data())? {
            Some(bytes) => Migrated { state: StateBytes::from_vec(bytes), migrated: true },
            None => Migrated { state: record.state(), migrated: false },
        })
    }

    /// Brings `data` (JSON) stored at version `from` up to the current version. `None`
    /// when it is current already.
    fn upgrade(&self, session: &SessionId, from: u32, data: &[u8]) -> Result<Option<Vec<u8>>> {
        if from == self.current {
            return Ok(None);
        }
        let fail = |reason: String| StateError::Migration {
            session: session.to_string(),
            from,
            to: self.current,
            reason,
        };
        if from > self.current {
            return Err(fail("the record is newer than this application's schema".into()));
        }
        let mut value: Value =
            serde_json::from_slice(data).map_err(|e| StateError::json(session.as_str(), &e))?;
        for v in from..self.current {
            let step = self
                .steps
                .get(&v)
                .ok_or_else(|| fail(format!("no migration registered from version {v}")))?;
            value =
                step(value).map_err(|e| fail(format!("migration from version {v} failed: {e}")))?;
        }
        serde_json::to_vec(&value).map(Some).map_err(|e| StateError::json(session.as_str(), &e))
    }
}

/// A record's state at the current schema version (see [`Migrations::state_of`]).
#[derive(Debug, Clone)]
pub(crate) struct Migrated {
    /// The state (JSON).
    pub(crate) state: StateBytes,
    /// Whether it was stored at an older version (and so differs from the record's bytes).
    pub(crate) migrated: bool,
}
