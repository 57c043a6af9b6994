//! Access control: who may do what to which session.
//! Owns the access rules, the [`AccessRecord`]s in memory and their configuration
//! ([`AccessControlLayer`]). Calls only the crate's error module (each request is an
//! `Operation` that says what access it needs), its ids and its lock helper; the store
//! persists the records, the handle consults the table.
//!
//! This is not a wrapper around a backend: it is a table the
//! [`StateManager`](crate::StateManager) handle consults. A handle from
//! [`StateManager::for_principal`](crate::StateManager::for_principal) carries its
//! [`Principal`] on every request; before the request reaches any actor, the handle checks
//! it against the session's [`AccessRecord`] (kept in memory, persisted as
//! `metadata/access/<session>.json` through the same codec, middleware and backend as
//! records, so it is encrypted when the store is). A denied request changes nothing and
//! reaches no storage. (It is also reachable as `middleware::acl`, its former home.)
//!
//! The rules:
//! - the first write (save, checkpoint, update) of a session that does not exist records
//!   the principal as its owner, with the time;
//! - the owner may do everything, including delete, grant and revoke;
//! - a principal granted [`Access::Write`] may read and write (not delete, grant or revoke);
//!   one granted [`Access::Read`] may load, list and restore;
//! - an administrator (see [`AccessControlLayer::admin`]) may do everything everywhere
//!   (and, like anyone, becomes the owner of a session its first write creates);
//! - anyone else is denied with [`StateError::AccessDenied`], and listings leave out what
//!   they may not read;
//! - store-wide maintenance (`cleanup_old_sessions`, `vacuum_storage`, `run_janitor_now`,
//!   `migrate_store`, key rotation, `watch_all`, `shutdown`) is for administrators and the
//!   unscoped manager only.
//!
//! The unscoped [`StateManager`](crate::StateManager) is the trusted in-process system
//! principal: it is never checked. Sessions it creates have no owner, so only it and
//! administrators may touch them.
//!
//! Order in which a request sees each stage: access control (in the handle, before the
//! session actor and its cache) → session actor → store (codec: JSON, gzip, CRC) →
//! encryption → backend.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::error::{Needs, Operation, Result, StateError};
use crate::types::{Principal, SessionId};

/// A level of access granted to a principal on one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Load, list checkpoints, restore checkpoints.
    Read,
    /// Everything `Read` allows, plus save, checkpoint, update, roll back and clean up
    /// checkpoints.
    Write,
}

/// Who owns a session and who else may use it (the design document's `_access` metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRecord {
    /// The principal whose first write created the session.
    pub owner: Principal,
    /// When that was, in milliseconds since the Unix epoch.
    pub created_at: u64,
    /// Access granted to other principals.
    #[serde(default)]
    pub grants: BTreeMap<Principal, Access>,
}

impl AccessRecord {
    /// Whether `p` is the owner or was granted any access (administrators aside).
    pub(crate) fn readable_by(&self, p: &Principal) -> bool {
        &self.owner == p || self.grants.contains_key(p)
    }
}

/// Configures access control: which principals are administrators.
///
/// ```
/// use mars_state::{AccessControlLayer, Principal};
/// let layer = AccessControlLayer::new().admin(Principal::new("ops").unwrap());
/// ```
#[derive(Debug, Clone, Default)]
pub struct AccessControlLayer {
    admins: BTreeSet<Principal>,
}

impl AccessControlLayer {
    /// No administrators.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `principal` an administrator: it may do everything to every session.
    pub fn admin(mut self, principal: Principal) -> Self {
        self.admins.insert(principal);
        self
    }
}

/// The access `op` needs; `None` means the owner (or an administrator) only.
fn needed(op: Operation) -> Option<Access> {
    match op.needs() {
        Needs::Read => Some(Access::Read),
        Needs::Write => Some(Access::Write),
        Needs::Owner | Needs::Admin => None,
    }
}

/// What the check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    Allow,
    /// Allowed, and the principal becomes the owner of this new session: persist the record
    /// before going on.
    Claim(AccessRecord),
}

/// The access records of every session, in memory.
#[derive(Debug, Default)]
pub(crate) struct AccessTable {
    layer: AccessControlLayer,
    /// Shared, so a change event can carry the record it was made under (see
    /// [`shared`](Self::shared)) without copying it.
    records: Mutex<HashMap<SessionId, Arc<AccessRecord>>>,
    /// Sessions whose stored access record could not be read: left to administrators.
    unreadable: Mutex<HashSet<SessionId>>,
}

impl AccessTable {
    /// The table of `records`; the sessions in `unreadable` (whose stored access record
    /// could not be read) are left to administrators: no one else may use them, nor claim
    /// them as new, until they are deleted.
    pub(crate) fn new(
        layer: AccessControlLayer,
        records: HashMap<SessionId, AccessRecord>,
        unreadable: Vec<SessionId>,
    ) -> Self {
        let records = records.into_iter().map(|(s, r)| (s, Arc::new(r))).collect();
        AccessTable {
            layer,
            records: Mutex::new(records),
            unreadable: Mutex::new(unreadable.into_iter().collect()),
        }
    }

    fn records(&self) -> MutexGuard<'_, HashMap<SessionId, Arc<AccessRecord>>> {
        crate::sync::lock(&self.records)
    }

    pub(crate) fn is_admin(&self, p: &Principal) -> bool {
        self.layer.admins.contains(p)
    }

    fn denied(p: &Principal, op: Operation, session: &str) -> StateError {
        StateError::AccessDenied {
            principal: p.to_string(),
            operation: op.verb(),
            session: session.to_owned(),
        }
    }

    /// Store-wide operations: administrators only.
    pub(crate) fn check_maintenance(&self, p: &Principal, op: Operation) -> Result<()> {
        if self.is_admin(p) { Ok(()) } else { Err(Self::denied(p, op, "*")) }
    }

    /// Decides whether `p` may do `op` to `sid`. `exists` says whether the session has a
    /// state or checkpoints. A claim is reserved in memory at once, so two principals racing
    /// to create one session cannot both own it.
    pub(crate) fn check(
        &self,
        p: &Principal,
        op: Operation,
        sid: &SessionId,
        exists: bool,
        now: u64,
    ) -> Result<Decision> {
        let admin = self.is_admin(p);
        let mut records = self.records();
        match records.get(sid) {
            // An administrator may do everything; its first write of a new session makes it
            // the owner like anyone's (so it can grant), below.
            Some(_) if admin => Ok(Decision::Allow),
            None if admin && (exists || !op.creates()) => Ok(Decision::Allow),
            Some(r) if &r.owner == p => Ok(Decision::Allow),
            Some(r) => match (needed(op), r.grants.get(p)) {
                (Some(need), Some(have)) if *have >= need => Ok(Decision::Allow),
                _ => Err(Self::denied(p, op, sid.as_str())),
            },
            // Unowned and absent: the first write claims it; reads find nothing anyway.
            None if !exists && !crate::sync::lock(&self.unreadable).contains(sid) => {
                if op.creates() {
                    let record =
                        AccessRecord { owner: p.clone(), created_at: now, grants: BTreeMap::new() };
                    records.insert(sid.clone(), Arc::new(record.clone()));
                    Ok(Decision::Claim(record))
                } else if op.finds_nothing_when_absent() {
                    Ok(Decision::Allow)
                } else {
                    Err(Self::denied(p, op, sid.as_str()))
                }
            }
            // Created by the system principal (or its access record is unreadable).
            None if admin => Ok(Decision::Allow),
            None => Err(Self::denied(p, op, sid.as_str())),
        }
    }

    /// Undoes a claim whose record could not be persisted.
    pub(crate) fn unclaim(&self, sid: &SessionId, owner: &Principal) {
        let mut records = self.records();
        if records.get(sid).is_some_and(|r| &r.owner == owner) {
            records.remove(sid);
        }
    }

    /// Whether `p` may read `sid` (for filtering listings).
    pub(crate) fn can_read(&self, p: &Principal, sid: &SessionId) -> bool {
        self.may_read(p, self.records().get(sid).map(|r| &**r))
    }

    /// Whether `p` may read a session whose access record is `record` (`None`: it has no
    /// owner, so only administrators may).
    pub(crate) fn may_read(&self, p: &Principal, record: Option<&AccessRecord>) -> bool {
        self.is_admin(p) || record.is_some_and(|r| r.readable_by(p))
    }

    pub(crate) fn get(&self, sid: &SessionId) -> Option<AccessRecord> {
        self.records().get(sid).map(|r| (**r).clone())
    }

    /// The session's access record as it is now, shared (for change events).
    pub(crate) fn shared(&self, sid: &SessionId) -> Option<Arc<AccessRecord>> {
        self.records().get(sid).cloned()
    }

    pub(crate) fn set(&self, sid: &SessionId, record: AccessRecord) {
        self.records().insert(sid.clone(), Arc::new(record));
    }

    pub(crate) fn remove(&self, sid: &SessionId) {
        self.records().remove(sid);
        crate::sync::lock(&self.unreadable).remove(sid);
    }

    /// The session's stored access record could not be read: it is left to administrators
    /// and the system principal, and no one may claim it (as for such a record at open).
    pub(crate) fn set_unreadable(&self, sid: &SessionId) {
        self.records().remove(sid);
        crate::sync::lock(&self.unreadable).insert(sid.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Principal {
        Principal::new(s).unwrap()
    }

    #[test]
    fn first_writer_owns_and_others_are_denied() {
        let t = AccessTable::new(
            AccessControlLayer::new().admin(p("root")),
            HashMap::new(),
            Vec::new(),
        );
        let s = SessionId::new("s").unwrap();
        assert!(matches!(
            t.check(&p("alice"), Operation::SaveSession, &s, false, 1).unwrap(),
            Decision::Claim(_)
        ));
        assert_eq!(
            t.check(&p("alice"), Operation::DeleteSession, &s, true, 2).unwrap(),
            Decision::Allow
        );
        assert!(t.check(&p("bob"), Operation::LoadSession, &s, true, 2).is_err());
        assert!(t.check(&p("bob"), Operation::SaveSession, &s, true, 2).is_err());
        assert_eq!(
            t.check(&p("root"), Operation::DeleteSession, &s, true, 2).unwrap(),
            Decision::Allow
        );
        let mut r = t.get(&s).unwrap();
        r.grants.insert(p("bob"), Access::Read);
        t.set(&s, r);
        assert_eq!(
            t.check(&p("bob"), Operation::LoadSession, &s, true, 2).unwrap(),
            Decision::Allow
        );
        assert!(t.check(&p("bob"), Operation::SaveSession, &s, true, 2).is_err());
        assert!(t.check(&p("carol"), Operation::LoadSession, &s, true, 2).is_err());
    }
}
