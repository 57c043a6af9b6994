//! [`ReadOnly`]: a wrapper that lets every read through and refuses every write, whatever
//! the backend below. This file owns that wrapper only; it calls the backend it wraps.
//! [`StateManagerBuilder::read_only`](crate::StateManagerBuilder::read_only) puts it under
//! the whole manager, so a read-only manager cannot write to any backend (a PostgreSQL or
//! Redis store, which has no read-only handle of its own, included).

use std::time::Duration;

use async_trait::async_trait;

use super::{
    Acquired, EventFeed, Fence, Lease, LeaseState, ObjectMeta, RecordMeta, StorageBackend,
    StorageKey, SweepReport,
};
use crate::error::{Result, StateError};

/// Wraps a backend so that reads (`get`, `list`, `read_lease`, `subscribe_events`) go
/// through and every write (`put`, `put_record`, `delete`, `append`, `sweep`, the lease
/// writes, the fenced writes, `publish_events`) answers [`StateError::ReadOnly`] without
/// reaching it.
///
/// It reports itself **not** [`shared`](StorageBackend::shared): a read-only view takes no
/// leases (taking one is a write) and fences nothing, so a manager over it treats the store
/// as one it reads alone, from its records.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> mars_state::Result<()> {
/// use mars_state::{ErrorKind, MemoryStorageBackend, StorageBackend, StorageKey, backend::ReadOnly};
/// let memory = MemoryStorageBackend::new();
/// let key = StorageKey::new("sessions/s1.json")?;
/// memory.put(&key, b"{}".to_vec()).await?;
/// let view = ReadOnly::new(memory, "memory");
/// assert!(view.get(&key).await?.is_some());
/// assert_eq!(view.delete(&key).await.unwrap_err().kind(), ErrorKind::ReadOnly);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ReadOnly<B> {
    inner: B,
    /// How errors name the store.
    name: String,
}

impl<B: StorageBackend> ReadOnly<B> {
    /// A read-only view of `inner`; `name` is how its errors name the store (a path, a
    /// redacted URL).
    pub fn new(inner: B, name: impl Into<String>) -> Self {
        ReadOnly { inner, name: name.into() }
    }

    /// The backend below.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn refuse<T>(&self, operation: &'static str) -> Result<T> {
        Err(StateError::read_only(operation, &self.name))
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<B: StorageBackend> StorageBackend for ReadOnly<B> {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        self.inner.get(key).await
    }
    async fn put(&self, _key: &StorageKey, _value: Vec<u8>) -> Result<()> {
        self.refuse("put")
    }
    async fn put_record(
        &self,
        _key: &StorageKey,
        _value: Vec<u8>,
        _meta: &RecordMeta,
    ) -> Result<()> {
        self.refuse("put")
    }
    async fn delete(&self, _key: &StorageKey) -> Result<bool> {
        self.refuse("delete")
    }
    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn append(&self, _key: &StorageKey, _bytes: Vec<u8>) -> Result<()> {
        self.refuse("append")
    }
    async fn sweep(&self) -> Result<SweepReport> {
        self.refuse("sweep")
    }
    fn shared(&self) -> bool {
        false
    }
    async fn acquire_lease(&self, _name: &str, _node: &str, _ttl: Duration) -> Result<Acquired> {
        self.refuse("acquire_lease")
    }
    async fn renew_lease(&self, _lease: &Lease, _ttl: Duration) -> Result<Option<Lease>> {
        self.refuse("renew_lease")
    }
    async fn renew_leases(&self, _leases: &[Lease], _ttl: Duration) -> Result<Vec<Option<Lease>>> {
        self.refuse("renew_leases")
    }
    async fn read_lease(&self, name: &str) -> Result<Option<LeaseState>> {
        self.inner.read_lease(name).await
    }
    async fn release_lease(&self, _lease: &Lease) -> Result<()> {
        self.refuse("release_lease")
    }
    async fn put_fenced(
        &self,
        _key: &StorageKey,
        _value: Vec<u8>,
        _meta: &RecordMeta,
        _fence: &Fence,
    ) -> Result<()> {
        self.refuse("put")
    }
    async fn delete_fenced(&self, _key: &StorageKey, _fence: &Fence) -> Result<bool> {
        self.refuse("delete")
    }
    async fn publish_events(&self, _payloads: Vec<Vec<u8>>) -> Result<()> {
        self.refuse("publish_events")
    }
    async fn subscribe_events(&self) -> Result<EventFeed> {
        self.inner.subscribe_events().await
    }
}
