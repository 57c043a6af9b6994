//! The janitor: on an interval (and on demand) it sweeps staged files of interrupted
//! writes and applies the [`RetentionPolicy`](crate::RetentionPolicy).
//! Owns the pass and its timer. Calls the storage actor (sweep, checkpoint trimming, index
//! check) and the session actors (idle deletes); reads the store's index.
//!
//! It does no I/O itself: sweeping and checkpoint trimming run as storage-actor jobs and
//! idle sessions are deleted through their session actors (which cache state), so
//! stopping the janitor mid-pass can never tear a write. On a shared store a pass runs
//! under the janitor's lease, so one node at a time runs one: a tick while another node
//! holds it is skipped.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::lease::{JANITOR_LEASE, acquire_within};
use super::session::SessionMsg;
use super::supervisor::SupervisorMsg;
use super::{Shared, call_session, storage};
use crate::backend::Lease;
use crate::error::{Operation, Result, StateError};
use crate::store::Trust;
use crate::types::{SessionId, VacuumReport};

/// Messages of the janitor.
pub(crate) enum JanitorMsg {
    /// The interval timer fired.
    Tick,
    /// Run one pass now and reply with its report.
    RunNow { reply: RpcReplyPort<Result<VacuumReport>> },
}

pub(crate) struct JanitorActor;

pub(crate) struct JanitorState {
    shared: Shared,
    supervisor: ActorRef<SupervisorMsg>,
    timer: Option<JoinHandle<()>>,
}

impl Actor for JanitorActor {
    type Msg = JanitorMsg;
    type State = JanitorState;
    type Arguments = (Shared, ActorRef<SupervisorMsg>);

    async fn pre_start(
        &self,
        myself: ActorRef<JanitorMsg>,
        (shared, supervisor): Self::Arguments,
    ) -> Result<JanitorState, ActorProcessingErr> {
        let timer = shared
            .config
            .janitor_interval
            .map(|every| myself.send_interval(every, || JanitorMsg::Tick));
        Ok(JanitorState { shared, supervisor, timer })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<JanitorMsg>,
        st: &mut JanitorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = st.timer.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<JanitorMsg>,
        msg: JanitorMsg,
        st: &mut JanitorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JanitorMsg::Tick => match st.turn(Duration::ZERO).await {
                Ok(turn) => {
                    if let Err(e) = st.pass().await {
                        warn!(error = %e, "janitor pass failed; retrying at the next interval");
                    }
                    st.end_turn(turn).await;
                }
                Err(StateError::OwnedElsewhere { node, .. }) => {
                    debug!(node, "another node runs the janitor now; skipping this pass");
                }
                Err(e) => warn!(error = %e, "janitor pass failed; retrying at the next interval"),
            },
            JanitorMsg::RunNow { reply } => {
                let wait = st.shared.config.lease_wait();
                let r = match st.turn(wait).await {
                    Ok(turn) => {
                        let r = st.pass().await;
                        st.end_turn(turn).await;
                        r
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
        }
        Ok(())
    }
}

impl JanitorState {
    /// On a shared store, takes the janitor's lease, so passes run on one node at a time
    /// (waiting up to `wait` while another node runs one, then
    /// [`StateError::OwnedElsewhere`]). `None` on a store with one writer.
    async fn turn(&self, wait: Duration) -> Result<Option<Lease>> {
        let store = &self.shared.store;
        if !store.shared {
            return Ok(None);
        }
        let config = &self.shared.config;
        let node = &config.node_id;
        let backend = store.backend.as_ref();
        let taken =
            acquire_within(backend, &store.clock, JANITOR_LEASE, node, config.lease_ttl, wait);
        Ok(Some(taken.await?.0))
    }

    /// Gives the janitor's lease up after a pass.
    async fn end_turn(&self, turn: Option<Lease>) {
        if let Some(lease) = turn
            && let Err(e) = self.shared.store.backend.release_lease(&lease).await
        {
            warn!(error = %e, "could not release the janitor's lease; it runs out on its own");
        }
    }

    async fn pass(&self) -> Result<VacuumReport> {
        let mut report = storage::run(&self.shared.storage, |store| async move {
            let swept = store.backend.sweep().await?;
            let (checkpoints, bytes) = store.trim_checkpoints().await?;
            // Verify the index against the records (names and sizes) and repair it; this
            // also keeps the journal near its live size.
            let checked = store.reconcile(Trust::Sizes).await?;
            Ok(VacuumReport {
                temp_files_removed: swept.files_removed,
                temp_bytes_freed: swept.bytes_freed,
                checkpoints_removed: checkpoints,
                bytes_freed: bytes,
                index_entries: checked.entries,
                index_repairs: checked.repaired,
                corrupt_records: checked.corrupt,
                ..Default::default()
            })
        })
        .await?;
        if let Some(idle) = self.shared.config.retention.max_session_idle {
            let cutoff = self.shared.store.clock.now_ms().saturating_sub(idle.as_millis() as u64);
            let (n, bytes) =
                remove_idle_sessions(&self.supervisor, &self.shared, cutoff, 0).await?;
            report.sessions_removed = n;
            report.bytes_freed += bytes;
        }
        info!(
            temp_files = report.temp_files_removed,
            temp_bytes = report.temp_bytes_freed,
            checkpoints = report.checkpoints_removed,
            sessions = report.sessions_removed,
            bytes_freed = report.bytes_freed,
            index_repairs = report.index_repairs,
            corrupt = report.corrupt_records.len(),
            "janitor pass finished"
        );
        Ok(report)
    }
}

/// Deletes, through their session actors, the sessions whose last activity is older than
/// `cutoff_ms`, sparing the `keep_last` most recently active ones. Each actor re-checks
/// the cutoff, so a session saved meanwhile survives. Returns how many went and roughly
/// their bytes (from the index).
pub(crate) async fn remove_idle_sessions(
    supervisor: &ActorRef<SupervisorMsg>,
    shared: &Shared,
    cutoff_ms: u64,
    keep_last: usize,
) -> Result<(usize, u64)> {
    let mut candidates: Vec<(u64, SessionId, u64)> = shared
        .store
        .index()
        .sessions
        .iter()
        .map(|(sid, e)| {
            let bytes = e.bytes();
            (e.last_activity(), sid.clone(), bytes)
        })
        .collect();
    candidates.sort_by(|a, b| b.cmp(a));
    let (mut removed, mut freed) = (0, 0);
    for (last, sid, bytes) in candidates.into_iter().skip(keep_last) {
        if last >= cutoff_ms {
            continue;
        }
        let timeout = shared.config.call_timeout.max(Duration::from_secs(1));
        if call_session(
            supervisor,
            &shared.rt.actors,
            timeout,
            Operation::DeleteIfIdle,
            &sid,
            |reply| SessionMsg::DeleteIfIdle { cutoff_ms, reply },
        )
        .await?
        {
            removed += 1;
            freed += bytes;
        }
    }
    Ok((removed, freed))
}
