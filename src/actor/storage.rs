//! The storage actor: runs the record I/O that no session actor owns (restores and
//! listings for the handle, vacuum, the janitor's passes) against the [`Store`], several
//! jobs at once. Owns the running jobs. Calls only the store (whose codec, middleware and
//! backend do the I/O); such jobs go through [`run`]. (A session actor does its own
//! session's I/O in its own task: it awaits each write anyway, and a hop through here
//! would cost two thread hand-offs per save.)
//!
//! Each job runs in its own task, so slow I/O on one key never holds up another.
//! Stopping the actor (drain) waits for every job still running.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinSet;

use crate::error::{Result, StateError};
use crate::store::Store;

type Job = Box<dyn FnOnce(Arc<Store>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Messages of the storage actor.
pub(crate) enum StorageMsg {
    /// Run one I/O job; the job carries its own reply channel.
    Run(Job),
}

pub(crate) struct StorageActor;

pub(crate) struct StorageState {
    store: Arc<Store>,
    running: JoinSet<()>,
}

impl Actor for StorageActor {
    type Msg = StorageMsg;
    type State = StorageState;
    type Arguments = Arc<Store>;

    async fn pre_start(
        &self,
        _myself: ActorRef<StorageMsg>,
        store: Arc<Store>,
    ) -> Result<StorageState, ActorProcessingErr> {
        Ok(StorageState { store, running: JoinSet::new() })
    }

    async fn handle(
        &self,
        _myself: ActorRef<StorageMsg>,
        msg: StorageMsg,
        state: &mut StorageState,
    ) -> Result<(), ActorProcessingErr> {
        while state.running.try_join_next().is_some() {}
        let StorageMsg::Run(job) = msg;
        state.running.spawn(job(state.store.clone()));
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<StorageMsg>,
        state: &mut StorageState,
    ) -> Result<(), ActorProcessingErr> {
        // Drain: every accepted job finishes (and so every acknowledged write is durable).
        while state.running.join_next().await.is_some() {}
        Ok(())
    }
}

/// Runs `f` on the storage actor and waits for its result. There is deliberately no
/// timeout: a caller must not start a write that depends on this one while it may still be
/// running.
pub(crate) async fn run<T, F, Fut>(storage: &ActorRef<StorageMsg>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Arc<Store>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move |store| {
        Box::pin(async move {
            let _ = tx.send(crate::sync::in_own_task(f(store)).await);
        })
    });
    storage
        .send_message(StorageMsg::Run(job))
        .map_err(|_| StateError::unavailable("the storage actor has stopped"))?;
    rx.await.map_err(|_| {
        StateError::unavailable("a storage task failed before replying; outcome unknown")
    })?
}
