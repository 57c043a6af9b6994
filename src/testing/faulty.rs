//! [`Faulty`]: a forwarding backend that fails, drops or holds the calls its rules pick.
//! This module owns the wrapper, its rules and [`FaultSwitch`]; it calls only the public
//! [`StorageBackend`] trait of the backend inside and [`Hold`].

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::Hold;
use crate::backend::{
    Acquired, EventFeed, Fence, Lease, LeaseState, ObjectMeta, RecordMeta, StorageBackend,
    StorageKey, SweepReport,
};
use crate::error::{Result, StateError};

/// The [`StorageBackend`] method a [`Faulty`] rule applies to. (`sweep`, `shared`, the
/// lease methods and the event methods have no key and are always forwarded.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Method {
    /// [`StorageBackend::get`].
    Get,
    /// [`StorageBackend::put`], [`StorageBackend::put_record`] and
    /// [`StorageBackend::put_fenced`].
    Put,
    /// [`StorageBackend::delete`] and [`StorageBackend::delete_fenced`].
    Delete,
    /// [`StorageBackend::list`] (the rule sees the prefix).
    List,
    /// [`StorageBackend::append`].
    Append,
}

impl Method {
    /// What the call was doing, for the injected error.
    fn doing(self) -> &'static str {
        match self {
            Method::Get => "reading (injected fault)",
            Method::Put => "writing (injected fault)",
            Method::Delete => "deleting (injected fault)",
            Method::List => "listing (injected fault)",
            Method::Append => "appending (injected fault)",
        }
    }
}

/// Turns the rules of one or more [`Faulty`] backends on and off. Clones share the state,
/// so a test keeps one and hands another to the backend (and to the backend it reopens).
#[derive(Clone)]
pub struct FaultSwitch(Arc<AtomicBool>);

impl FaultSwitch {
    /// A switch that starts on: the rules apply.
    pub fn on() -> Self {
        FaultSwitch(Arc::new(AtomicBool::new(true)))
    }

    /// A switch that starts off: every call is forwarded until [`set`](Self::set)`(true)`.
    pub fn off() -> Self {
        FaultSwitch(Arc::new(AtomicBool::new(false)))
    }

    /// Turns the rules on (`true`) or off.
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::SeqCst);
    }

    /// Whether the rules apply now.
    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for FaultSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FaultSwitch").field(&self.is_on()).finish()
    }
}

type Matcher = Box<dyn Fn(&StorageKey) -> bool + Send + Sync>;

enum Effect {
    /// Return an I/O error of this kind, doing nothing.
    Fail(io::ErrorKind),
    /// Return success, doing nothing (a lost write; for `get`, a value not found).
    Lose,
}

struct Rule {
    op: Method,
    matches: Matcher,
    effect: Effect,
}

/// Where in a call a [`Hold`] stops it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before anything is done.
    Before,
    /// After the call is done (forwarded, failed or lost), before its reply.
    After,
}

struct HoldRule {
    op: Method,
    stage: Stage,
    matches: Matcher,
    hold: Hold,
}

/// Forwards every call to the backend inside it, except that while its [`FaultSwitch`] is
/// on, a call that a rule picks (by [`Method`] and a predicate on the key) fails or is lost,
/// or waits at an armed [`Hold`] before or after it is done. Of the fail and lose rules the
/// first matching one applies; a predicate may keep state (count calls) to pick, say, every
/// fifth write. Every matching hold applies, before the fault rules are consulted (or after
/// the call, for [`hold_after`](Self::hold_after)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> mars_state::Result<()> {
/// use std::io::ErrorKind;
/// use mars_state::testing::{FaultSwitch, Faulty, Method};
/// use mars_state::{MemoryStorageBackend, StorageBackend, StorageKey};
///
/// let stuck = FaultSwitch::off();
/// let backend = Faulty::new(MemoryStorageBackend::new())
///     .controlled_by(stuck.clone())
///     .fail(Method::Delete, ErrorKind::PermissionDenied, |key| {
///         key.as_str().starts_with("checkpoints/")
///     });
/// let key = StorageKey::new("checkpoints/s1/c1.json")?;
/// backend.put(&key, b"{}".to_vec()).await?;
/// stuck.set(true);
/// assert!(backend.delete(&key).await.is_err());
/// stuck.set(false);
/// assert!(backend.delete(&key).await?);
/// # Ok(()) }
/// ```
pub struct Faulty<B> {
    inner: B,
    switch: FaultSwitch,
    rules: Vec<Rule>,
    holds: Vec<HoldRule>,
}

impl<B> Faulty<B> {
    /// Wraps `inner` with no rules, under a switch that is on.
    pub fn new(inner: B) -> Self {
        Faulty { inner, switch: FaultSwitch::on(), rules: Vec::new(), holds: Vec::new() }
    }

    /// Puts the rules under `switch` (shared with the caller) instead of their own.
    pub fn controlled_by(mut self, switch: FaultSwitch) -> Self {
        self.switch = switch;
        self
    }

    /// Adds a rule: `op` on a key for which `when` is true fails with an I/O error of
    /// `kind` (which decides the [`ErrorKind`](crate::ErrorKind): `PermissionDenied`,
    /// `StorageFull`, else `Io`) and does nothing.
    pub fn fail(
        mut self,
        op: Method,
        kind: io::ErrorKind,
        when: impl Fn(&StorageKey) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.rules.push(Rule { op, matches: Box::new(when), effect: Effect::Fail(kind) });
        self
    }

    /// Adds a rule: `op` on a key for which `when` is true succeeds without doing anything
    /// (a put, delete or append acknowledged and lost, a delete reporting that the key
    /// existed; a get that finds nothing; a list that lists nothing).
    pub fn lose(
        mut self,
        op: Method,
        when: impl Fn(&StorageKey) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.rules.push(Rule { op, matches: Box::new(when), effect: Effect::Lose });
        self
    }

    /// Adds a hold: `op` on a key for which `when` is true waits, before anything is done,
    /// while `hold` is armed, until it is released (see [`Hold`]).
    pub fn hold(
        self,
        op: Method,
        hold: &Hold,
        when: impl Fn(&StorageKey) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.add_hold(op, Stage::Before, hold, when)
    }

    /// Adds a hold after the call: `op` on a key for which `when` is true is done (forwarded,
    /// or failed or lost by a rule), then, while `hold` is armed, waits until it is released
    /// before it replies: a write that is stored but not yet acknowledged.
    pub fn hold_after(
        self,
        op: Method,
        hold: &Hold,
        when: impl Fn(&StorageKey) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.add_hold(op, Stage::After, hold, when)
    }

    fn add_hold(
        mut self,
        op: Method,
        stage: Stage,
        hold: &Hold,
        when: impl Fn(&StorageKey) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.holds.push(HoldRule { op, stage, matches: Box::new(when), hold: hold.clone() });
        self
    }

    /// The switch the rules are under.
    pub fn switch(&self) -> &FaultSwitch {
        &self.switch
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The effect of the first rule that picks `op` on `key`, if the switch is on.
    fn fault(&self, op: Method, key: &StorageKey) -> Option<&Effect> {
        if !self.switch.is_on() {
            return None;
        }
        self.rules.iter().find(|r| r.op == op && (r.matches)(key)).map(|r| &r.effect)
    }

    /// Passes every hold of `stage` that picks `op` on `key`, if the switch is on.
    async fn pass(&self, op: Method, stage: Stage, key: &StorageKey) {
        if !self.switch.is_on() {
            return;
        }
        for h in self.holds.iter().filter(|h| h.op == op && h.stage == stage && (h.matches)(key)) {
            h.hold.pass().await;
        }
    }

    /// One call: the holds before it, then a failing rule's error, a losing rule's `lost`,
    /// or the forwarded call, then the holds after it.
    async fn call<T, F>(
        &self,
        op: Method,
        key: &StorageKey,
        lost: T,
        forward: impl FnOnce() -> F,
    ) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        self.pass(op, Stage::Before, key).await;
        let reply = match self.fault(op, key) {
            None => forward().await,
            Some(Effect::Lose) => Ok(lost),
            Some(Effect::Fail(kind)) => Err(StateError::io(
                op.doing(),
                key.as_str(),
                io::Error::new(*kind, "injected by Faulty"),
            )),
        };
        self.pass(op, Stage::After, key).await;
        reply
    }
}

impl<B: fmt::Debug> fmt::Debug for Faulty<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops: Vec<Method> = self.rules.iter().map(|r| r.op).collect();
        let holds: Vec<Method> = self.holds.iter().map(|h| h.op).collect();
        f.debug_struct("Faulty")
            .field("inner", &self.inner)
            .field("switch", &self.switch)
            .field("rules", &ops)
            .field("holds", &holds)
            .finish()
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<B: StorageBackend> StorageBackend for Faulty<B> {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        self.call(Method::Get, key, None, || self.inner.get(key)).await
    }

    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        self.call(Method::Put, key, (), || self.inner.put(key, value)).await
    }

    /// Faults as `put` ([`Method::Put`]).
    async fn put_record(&self, key: &StorageKey, value: Vec<u8>, meta: &RecordMeta) -> Result<()> {
        self.call(Method::Put, key, (), || self.inner.put_record(key, value, meta)).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<bool> {
        self.call(Method::Delete, key, true, || self.inner.delete(key)).await
    }

    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        self.call(Method::List, prefix, Vec::new(), || self.inner.list(prefix)).await
    }

    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        self.call(Method::Append, key, (), || self.inner.append(key, bytes)).await
    }

    async fn sweep(&self) -> Result<SweepReport> {
        self.inner.sweep().await
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    async fn acquire_lease(&self, name: &str, node: &str, ttl: Duration) -> Result<Acquired> {
        self.inner.acquire_lease(name, node, ttl).await
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>> {
        self.inner.renew_lease(lease, ttl).await
    }

    async fn renew_leases(&self, leases: &[Lease], ttl: Duration) -> Result<Vec<Option<Lease>>> {
        self.inner.renew_leases(leases, ttl).await
    }

    async fn read_lease(&self, name: &str) -> Result<Option<LeaseState>> {
        self.inner.read_lease(name).await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        self.inner.release_lease(lease).await
    }

    /// Faults as `put` ([`Method::Put`]).
    async fn put_fenced(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        meta: &RecordMeta,
        fence: &Fence,
    ) -> Result<()> {
        self.call(Method::Put, key, (), || self.inner.put_fenced(key, value, meta, fence)).await
    }

    /// Faults as `delete` ([`Method::Delete`]).
    async fn delete_fenced(&self, key: &StorageKey, fence: &Fence) -> Result<bool> {
        self.call(Method::Delete, key, true, || self.inner.delete_fenced(key, fence)).await
    }

    async fn publish_events(&self, payloads: Vec<Vec<u8>>) -> Result<()> {
        self.inner.publish_events(payloads).await
    }

    async fn subscribe_events(&self) -> Result<EventFeed> {
        self.inner.subscribe_events().await
    }
}
