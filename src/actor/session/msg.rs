//! The messages of a session actor: the public [`SessionMsg`] an orchestrator may send, and
//! the crate-internal ones wrapped in an opaque [`Internal`].
//! Owns the message types only. Calls [`crate::error`], [`crate::config`] and
//! [`crate::types`] for what the messages carry.

use ractor::RpcReplyPort;

use crate::config::CheckpointPolicy;
use crate::error::Result;
use crate::types::{
    BranchId, CheckpointId, CheckpointReason, MigrationReport, SessionStatus, StateBytes,
};

/// A read-modify-write step run inside the session actor: it receives the current state
/// (JSON) and returns the new one (JSON) or an error, in which case nothing is written.
/// (In no public signature: [`SessionMsg::Update`] carries one, built by
/// [`transactional_update`](crate::StateManager::transactional_update). Kept public so its
/// path keeps working.)
#[doc(hidden)]
pub type UpdateFn = Box<dyn FnOnce(Option<&[u8]>) -> Result<Vec<u8>> + Send>;

/// The messages a session actor handles. An orchestrator that is itself a ractor actor
/// can hold the session's `ActorRef<SessionMsg>` (from
/// [`StateManager::session_actor`](crate::StateManager::session_actor)) and use
/// `ractor::call!` / `ractor::cast!` with these variants. Every reply is a `Result`: domain
/// failures travel back in it and never stop the actor.
///
/// A session actor passivates after its idle timeout; sends to it then fail with
/// `MessagingErr::SendErr` (the message was not queued): ask the manager for the actor
/// again.
#[non_exhaustive]
pub enum SessionMsg {
    /// Save the state (replacing the previous one) durably.
    Save {
        /// The new state.
        state: StateBytes,
        /// Receives `Ok(())` once the state is durable.
        reply: RpcReplyPort<Result<()>>,
    },
    /// Load the latest state; `None` if the session has none.
    Load {
        /// Receives the state.
        reply: RpcReplyPort<Result<Option<StateBytes>>>,
    },
    /// Delete the state and every checkpoint; replies whether anything existed.
    Delete {
        /// Receives whether the session existed.
        reply: RpcReplyPort<Result<bool>>,
    },
    /// Store a checkpoint of `state` on `branch_id`.
    CreateCheckpoint {
        /// The branch.
        branch_id: BranchId,
        /// The state to capture.
        state: StateBytes,
        /// Why (normally [`CheckpointReason::Manual`]).
        reason: CheckpointReason,
        /// Receives the new checkpoint's id once it is durable.
        reply: RpcReplyPort<Result<CheckpointId>>,
    },
    /// Report progress: `state` after `step`. Cheap: the state is kept in memory and made
    /// durable (session record plus a checkpoint) when the session's policy says so, or at
    /// the next save, pause, passivation or shutdown.
    RecordStep {
        /// The orchestrator's step number.
        step: u64,
        /// The state after it.
        state: StateBytes,
        /// Receives the checkpoint taken, if the policy took one.
        reply: RpcReplyPort<Result<Option<CheckpointId>>>,
    },
    /// Replace the session's state with a checkpoint's.
    Rollback {
        /// The checkpoint (of this session).
        checkpoint_id: CheckpointId,
        /// Also delete the checkpoints taken after it on its branch (otherwise they are
        /// kept, and the next checkpoint on the branch forks from this one).
        truncate: bool,
        /// Receives `Ok(())` once the session state is durable.
        reply: RpcReplyPort<Result<()>>,
    },
    /// Delete all but the `keep` newest checkpoints; replies how many were removed.
    CleanupCheckpoints {
        /// How many of the newest to keep.
        keep: usize,
        /// Receives the number removed.
        reply: RpcReplyPort<Result<usize>>,
    },
    /// Read-modify-write the state atomically with respect to every other request.
    Update {
        /// The step to run; a panic in it is caught and reported.
        update: UpdateFn,
        /// Receives the new state once it is durable.
        reply: RpcReplyPort<Result<StateBytes>>,
    },
    /// Save `state` (or keep the current one) with a new status, and for a pause, take a
    /// checkpoint. Replies with the checkpoint of a pause.
    SetStatus {
        /// The new status.
        status: SessionStatus,
        /// Why (a pause or failure reason).
        reason: Option<String>,
        /// The state to save with it; `None` keeps the current state.
        state: Option<StateBytes>,
        /// Receives the pause checkpoint (for [`SessionStatus::Paused`]).
        reply: RpcReplyPort<Result<Option<CheckpointId>>>,
    },
    /// Set this session's checkpoint policy (kept in memory for the process's life).
    SetPolicy {
        /// The policy.
        policy: CheckpointPolicy,
        /// Receives `Ok(())`.
        reply: RpcReplyPort<Result<()>>,
    },
    /// Rewrite this session's records that are at an older schema version.
    Migrate {
        /// Receives what was rewritten.
        reply: RpcReplyPort<Result<MigrationReport>>,
    },
    /// Delete the session if its last activity is older than `cutoff_ms` (Unix ms).
    DeleteIfIdle {
        /// The cutoff.
        cutoff_ms: u64,
        /// Receives whether it was deleted.
        reply: RpcReplyPort<Result<bool>>,
    },
    /// Crate-internal messages (timer ticks, delete and key-rotation passes, retirement).
    /// Their type cannot be built outside the crate, so no holder of a session's
    /// `ActorRef<SessionMsg>` can send one.
    #[doc(hidden)]
    Internal(Internal),
}

/// A crate-internal session message. Public only because [`SessionMsg::Internal`] must name
/// it; it has no public constructor, so code outside the crate cannot make one.
///
/// Why a hidden variant around an opaque type, and not a separate message type: ractor ties
/// an actor to one message type, and
/// [`StateManager::session_actor`](crate::StateManager::session_actor) must keep returning an
/// `ActorRef<SessionMsg>` (callers use it with `ractor::call!`).
///
/// ```compile_fail
/// // Outside the crate an internal message cannot be built: the field is private.
/// let _ = mars_state::SessionMsg::Internal(mars_state::Internal(todo!()));
/// ```
pub struct Internal(pub(crate) InternalMsg);

impl std::fmt::Debug for Internal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Internal")
    }
}

/// The messages only the crate sends to a session actor.
pub(crate) enum InternalMsg {
    /// Rewrite this session's records under the current encryption key; replies how many
    /// records were rewritten.
    // Sent only by key rotation; handled (and so the store's re-encryption compiled) always.
    #[cfg_attr(not(feature = "encryption"), allow(dead_code))]
    Reencrypt { reply: RpcReplyPort<Result<usize>> },
    /// Finish this session's delete if one failed part way; replies whether it did.
    FinishDelete { reply: RpcReplyPort<Result<bool>> },
    /// The session was claimed by a new owner: this actor (whose references may have been
    /// handed out under an earlier owner) flushes and stops, and the next request gets a
    /// fresh one. Replies once the mailbox is closed.
    Retire { reply: RpcReplyPort<Result<()>> },
    /// Take the session's lease (on a shared store; waiting up to the lease wait), as
    /// before a write: recovery on another node takes the session over this way.
    Own { reply: RpcReplyPort<Result<()>> },
    /// The idle timer's tick.
    IdleCheck,
    /// The checkpoint policy's timer tick.
    TimeCheck,
}

impl From<InternalMsg> for SessionMsg {
    fn from(msg: InternalMsg) -> Self {
        SessionMsg::Internal(Internal(msg))
    }
}
