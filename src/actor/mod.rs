//! The actor topology: a supervisor, one actor per session, a storage actor and a janitor.
//! Owns the actors, their messages, the runtime's live state ([`Runtime`]: hot map, events,
//! run-time policies, the directory of live session actors), the malloc-trim policy
//! (`trim.rs`), and the one mapping of ractor's errors to [`StateError`] ([`ask`],
//! [`call_session`]). The actors call the store for records (only through the storage
//! actor) and the index; they never call the handle.
//!
//! ```text
//! StateManager ──Get──▶ SupervisorActor ──spawns/links──▶ SessionActor (one per session id)
//!      │                      │                                  │ storage jobs (awaited:
//!      └──SessionMsg──────────┼─────────────────────────────────▶│  one at a time per session)
//!                             ├──spawns/links──▶ StorageActor ◀──┘ runs jobs concurrently
//!                             └──spawns/links──▶ JanitorActor (interval timer)
//! ```

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorId, ActorRef, Message, MessagingErr, RpcReplyPort};

use crate::config::{CheckpointPolicy, Migrations, RetentionPolicy};
use crate::error::{Operation, Result, StateError};
use crate::store::Store;
use crate::types::SessionId;

pub(crate) mod janitor;
pub(crate) mod lease;
pub(crate) mod remote;
mod runtime;
pub(crate) mod session;
pub(crate) mod storage;
pub(crate) mod supervisor;
mod trim;

pub(crate) use runtime::Runtime;
use session::SessionMsg;

/// Settings shared by the actors.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) idle_timeout: Duration,
    pub(crate) call_timeout: Duration,
    pub(crate) max_state_bytes: usize,
    pub(crate) janitor_interval: Option<Duration>,
    pub(crate) retention: RetentionPolicy,
    pub(crate) migrations: Migrations,
    pub(crate) checkpoint_policy: CheckpointPolicy,
    /// This node's name in leases (see `StateManagerBuilder::node_id`).
    pub(crate) node_id: String,
    /// How long a session lease lasts unless renewed.
    pub(crate) lease_ttl: Duration,
    /// How long a write waits for a lease another node holds (`None`: the TTL and 1 s).
    pub(crate) lease_wait: Option<Duration>,
}

impl Config {
    /// How long a write waits for a lease another node holds.
    pub(crate) fn lease_wait(&self) -> Duration {
        self.lease_wait.unwrap_or(self.lease_ttl + Duration::from_secs(1))
    }
}

/// What every actor needs to reach the rest.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) store: Arc<Store>,
    /// The live state (hot map, events, policies, directory) over the same store.
    pub(crate) rt: Arc<Runtime>,
    pub(crate) storage: ActorRef<storage::StorageMsg>,
    pub(crate) config: Arc<Config>,
}

/// The live session actors, kept by the supervisor (added when it spawns one, removed
/// when it sees one end), so a request to a live session goes straight to its actor
/// instead of asking the supervisor first. Only a shortcut: a stale entry's actor refuses
/// the message (it is draining or gone), and the caller then asks the supervisor.
#[derive(Debug, Default)]
pub(crate) struct Directory(crate::sync::Sharded<ActorRef<SessionMsg>>);

impl Directory {
    pub(crate) fn get(&self, sid: &SessionId) -> Option<ActorRef<SessionMsg>> {
        self.0.shard(sid).get(sid).cloned()
    }

    pub(crate) fn insert(&self, sid: &SessionId, actor: &ActorRef<SessionMsg>) {
        self.0.shard(sid).insert(sid.clone(), actor.clone());
    }

    /// Removes `sid`'s entry if it is the actor `id` (not a newer one).
    pub(crate) fn remove(&self, sid: &SessionId, id: ActorId) {
        let mut shard = self.0.shard(sid);
        if shard.get(sid).is_some_and(|a| a.get_id() == id) {
            shard.remove(sid);
        }
    }
}

/// Sends a request to `sid`'s session actor (spawned on demand by the supervisor) and
/// waits for the reply.
///
/// If the actor was passivating, the send is refused before the message was queued, so
/// resending to a fresh actor cannot apply it twice. A reply that does not come within
/// the call timeout is [`StateError::Timeout`]: the outcome is unknown.
pub(crate) async fn call_session<R: Send + 'static>(
    supervisor: &ActorRef<supervisor::SupervisorMsg>,
    directory: &Directory,
    timeout: Duration,
    operation: Operation,
    sid: &SessionId,
    build: impl FnOnce(RpcReplyPort<Result<R>>) -> SessionMsg,
) -> Result<R> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut msg = build(RpcReplyPort::from(tx));
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || StateError::Timeout {
        operation: operation.name(),
        session: sid.to_string(),
        timeout_ms: timeout.as_millis() as u64,
    };
    let mut attempts = 0;
    loop {
        let known = if attempts == 0 { directory.get(sid) } else { None };
        let actor = match known {
            Some(actor) => actor,
            None => tokio::time::timeout_at(deadline, supervisor::get_session(supervisor, sid))
                .await
                .map_err(|_| timed_out())??,
        };
        match actor.send_message(msg) {
            Ok(()) => break,
            Err(MessagingErr::SendErr(back)) if attempts < 100 => {
                // The actor is draining after an idle timeout: it never saw this message.
                msg = back;
                attempts += 1;
                tokio::task::yield_now().await;
            }
            Err(_) => return Err(StateError::unavailable("session actor refused the request")),
        }
    }
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(StateError::Panicked {
            session: sid.to_string(),
            message: format!(
                "the session actor stopped while handling {}; outcome unknown",
                operation.name()
            ),
        }),
        Err(_) => Err(timed_out()),
    }
}

/// Calls `actor` and waits for its reply (no timeout: for the supervisor and janitor, which
/// answer at once or are gone). Any failure of the call is [`StateError::Unavailable`] with
/// `gone` as its reason: the one mapping of ractor's call errors in the crate.
pub(crate) async fn ask<M: Message, T: Send + 'static>(
    actor: &ActorRef<M>,
    gone: &'static str,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<T> {
    match actor.call(build, None).await {
        Ok(CallResult::Success(r)) => Ok(r),
        Ok(CallResult::Timeout | CallResult::SenderError) | Err(_) => {
            Err(StateError::unavailable(gone))
        }
    }
}
