//! A session's checkpoints: ids and parents (a hybrid logical clock and the head of each
//! branch), taking one, recorded steps and the flush the policy triggers, rollback and
//! cleanup.
//! Owns no state of its own: these are methods of the session actor's state. Calls the
//! store (through `SessionState::io`) and reads the store's index.

use tokio::time::Instant;

use super::{Current, SessionState};
use crate::error::{Result, StateError};
use crate::events::EventKind;
use crate::store::codec::{CheckpointMeta, Fork, RecordHead, SessionMeta};
use crate::types::{BranchId, CheckpointId, CheckpointReason, SessionStatus, StateBytes};

impl SessionState {
    fn next_clock(&mut self) -> u64 {
        let last = *self.last_clock.get_or_insert_with(|| {
            let idx = self.shared.store.index();
            idx.sessions
                .get(&self.sid)
                .and_then(|e| e.checkpoints.keys().next_back())
                .map(|c| c.clock())
                .unwrap_or(0)
        });
        // A hybrid logical clock: wall-clock milliseconds in the high bits, a counter in
        // the low 16, never going backwards: ids stay ordered even within a millisecond.
        let next = (self.shared.store.clock.now_ms() << 16).max(last + 1);
        self.last_clock = Some(next);
        next
    }

    /// The newest checkpoint on `branch` (the parent of the next one there).
    fn head(&mut self, branch: &BranchId) -> Option<CheckpointId> {
        self.heads
            .entry(branch.clone())
            .or_insert_with(|| {
                let idx = self.shared.store.index();
                idx.sessions.get(&self.sid).and_then(|e| {
                    e.checkpoints
                        .iter()
                        .rev()
                        .find(|(_, c)| &c.branch_id == branch)
                        .map(|(id, _)| id.clone())
                })
            })
            .clone()
    }

    pub(super) async fn checkpoint(
        &mut self,
        branch: BranchId,
        state: StateBytes,
        reason: CheckpointReason,
        step: Option<u64>,
    ) -> Result<CheckpointId> {
        self.check_size(&state)?;
        self.settle_delete().await?;
        let clock = self.next_clock();
        let cid = CheckpointId::generate(clock);
        if !self.heads.contains_key(&branch) {
            let fork = match self.current().await {
                Ok(c) => c.meta.fork.clone(),
                Err(_) => None,
            };
            let newest = self.head(&branch);
            let head = match fork {
                Some(f)
                    if f.branch == branch
                        && newest.as_ref().is_none_or(|n| n.clock() < f.clock) =>
                {
                    Some(f.checkpoint)
                }
                _ => newest,
            };
            self.heads.insert(branch.clone(), head);
        }
        let meta = CheckpointMeta {
            schema: self.shared.config.migrations.current,
            reason,
            step,
            parent: self.head(&branch),
        };
        let (sid, id, b) = (self.sid.clone(), cid.clone(), branch.clone());
        self.io(move |store| async move {
            store.put_checkpoint(&sid, &id, &b, clock >> 16, meta, state.as_bytes()).await
        })
        .await?;
        self.heads.insert(branch, Some(cid.clone()));
        self.last_checkpoint_at = Instant::now();
        if step.is_some() {
            self.last_checkpoint_step = step;
        }
        self.shared.rt.emit(&self.sid, EventKind::Checkpointed { id: cid.clone(), reason, step });
        Ok(cid)
    }

    /// Makes recorded steps durable: the session record, then a checkpoint of it.
    pub(super) async fn flush(&mut self, reason: CheckpointReason) -> Result<Option<CheckpointId>> {
        let Some(state) = self.current.as_ref().and_then(|c| c.state.clone()) else {
            return Ok(None);
        };
        let step = self.current.as_ref().and_then(|c| c.meta.step);
        self.save_with(state.clone(), |_| {}).await?;
        let branch = self.policy.branch.clone();
        self.checkpoint(branch, state, reason, step).await.map(Some)
    }

    pub(super) async fn record_step(
        &mut self,
        step: u64,
        state: StateBytes,
    ) -> Result<Option<CheckpointId>> {
        self.check_size(&state)?;
        self.settle_delete().await?;
        let now = self.shared.store.clock.now_ms();
        let current = match self.current().await {
            Ok(c) => c,
            Err(StateError::Corrupt { .. }) => {
                self.set_current(Some(Current {
                    state: None,
                    saved_at: 0,
                    meta: SessionMeta::default(),
                }));
                self.current().await?
            }
            Err(e) => return Err(e),
        };
        let was_paused = current.meta.status == SessionStatus::Paused;
        current.state = Some(state);
        current.meta.step = Some(step);
        if current.meta.status != SessionStatus::Running {
            // Recording a step resumes the run, as resume_session would.
            current.meta.status = SessionStatus::Running;
            current.meta.reason = None;
            current.meta.status_at = Some(now);
        }
        if was_paused {
            // Recording a step resumes a paused run; say so.
            self.shared.rt.emit(&self.sid, EventKind::Resumed);
        }
        self.dirty = true;
        self.publish();
        let due = self.policy.every_steps.is_some_and(|n| match self.last_checkpoint_step {
            // A step below the last checkpoint's: the run was restarted; count from zero.
            Some(last) if step >= last => step >= last.saturating_add(n),
            _ => step >= n,
        });
        if due { self.flush(CheckpointReason::Steps).await } else { Ok(None) }
    }

    pub(super) async fn rollback(&mut self, cid: CheckpointId, truncate: bool) -> Result<()> {
        self.settle_delete().await?;
        let (sid, id) = (self.sid.clone(), cid.clone());
        let cp = self
            .io(move |store| async move { store.load_checkpoint(&sid, &id).await })
            .await?
            .ok_or_else(|| StateError::CheckpointNotFound { id: cid.to_string() })?;
        let RecordHead::Checkpoint { branch_id, meta, .. } = cp.head.clone() else {
            return Err(StateError::corrupt(&cid, "not a checkpoint record"));
        };
        let data = self.shared.config.migrations.state_of(&self.sid, &cp)?.state;
        let fork =
            Fork { branch: branch_id.clone(), checkpoint: cid.clone(), clock: self.next_clock() };
        self.save_with(data, |m| {
            m.step = meta.step;
            m.status = SessionStatus::Running;
            m.fork = Some(fork);
        })
        .await?;
        if truncate {
            let later: Vec<CheckpointId> = {
                let idx = self.shared.store.index();
                idx.sessions
                    .get(&self.sid)
                    .map(|e| {
                        e.checkpoints
                            .range(cid.clone()..)
                            .skip(1)
                            .filter(|(_, c)| c.branch_id == branch_id)
                    })
                    .into_iter()
                    .flatten()
                    .map(|(id, _)| id.clone())
                    .collect()
            };
            let sid = self.sid.clone();
            self.io(move |store| async move {
                // Newest first: a crash midway leaves a shorter branch, never a gap.
                for id in later.iter().rev() {
                    store.delete_checkpoint(&sid, id).await?;
                }
                Ok(())
            })
            .await?;
        }
        // The branch continues (forks) from here.
        self.heads.insert(branch_id, Some(cid.clone()));
        self.last_checkpoint_step = meta.step;
        self.shared.rt.emit(&self.sid, EventKind::RolledBack { to: cid });
        Ok(())
    }

    pub(super) async fn cleanup(&mut self, keep: usize) -> Result<usize> {
        self.own().await?;
        let doomed: Vec<CheckpointId> = {
            let idx = self.shared.store.index();
            idx.sessions
                .get(&self.sid)
                .map(|e| {
                    let n = e.checkpoints.len().saturating_sub(keep);
                    e.checkpoints.keys().take(n).cloned().collect()
                })
                .unwrap_or_default()
        };
        let sid = self.sid.clone();
        self.io(move |store| async move {
            let mut removed = 0;
            for cid in doomed {
                // Each delete is durable before the next; a crash leaves a prefix removed.
                if store.delete_checkpoint(&sid, &cid).await? {
                    removed += 1;
                }
            }
            Ok(removed)
        })
        .await
    }
}
