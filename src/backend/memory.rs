//! An in-memory backend, for tests and for processes that need no durability. Owns one
//! shared map of keys to bytes and the leases beside it; calls nothing else in the crate
//! (the trait's types only).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{
    Acquired, EventFeed, Fence, Lease, LeaseState, ObjectMeta, RecordMeta, StorageBackend,
    StorageKey, SweepReport, ttl_ms,
};
use crate::error::{Result, StateError};

/// Keeps every value in a map in memory. Clones share the same map, so a clone handed to a
/// second [`StateManager`](crate::StateManager) sees the first one's data ("restart" in tests).
/// Nothing survives the process.
///
/// It is [`shared`](StorageBackend::shared): clones may be used by several writers at once
/// (several managers of one process, or simulated nodes in a test), so it keeps leases and
/// checks fences like the server backends, and is the reference they are tested against.
/// Its "server clock" is the process's monotonic clock (tokio's, so a test with paused
/// time controls lease expiry).
#[derive(Debug, Clone, Default)]
pub struct MemoryStorageBackend {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    map: BTreeMap<StorageKey, Vec<u8>>,
    /// Leases by name. Never removed: the token must never go back.
    leases: HashMap<String, LeaseRow>,
    /// The change events published to this store, for every subscribed clone.
    events: Bus,
}

/// The in-process channel that carries published events to subscribers.
#[derive(Debug)]
struct Bus(broadcast::Sender<Vec<u8>>);

impl Default for Bus {
    fn default() -> Self {
        // As many as a watcher may fall behind locally; a subscriber further behind skips
        // payloads, and the store reports them as missed.
        Bus(broadcast::channel(4096).0)
    }
}

#[derive(Debug)]
struct LeaseRow {
    node: String,
    token: u64,
    expires_at: Instant,
    /// Whether its holder released it (rather than letting it expire).
    released: bool,
}

impl Inner {
    /// Refuses `fence` unless it is its lease's current token.
    fn check(&self, fence: &Fence) -> Result<()> {
        let current = self.leases.get(&fence.name).map_or(0, |row| row.token);
        if current == fence.token {
            return Ok(());
        }
        Err(StateError::Fenced { name: fence.name.clone(), token: fence.token, current })
    }
}

impl MemoryStorageBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends every feed of [`subscribe_events`](StorageBackend::subscribe_events) made so
    /// far, as a lost connection ends a server backend's: for tests of what a subscriber
    /// does then. Later subscriptions work as before.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mars_state::Result<()> {
    /// use mars_state::{MemoryStorageBackend, StorageBackend};
    /// let store = MemoryStorageBackend::new();
    /// let mut feed = store.subscribe_events().await?;
    /// store.interrupt_events();
    /// assert_eq!(feed.recv().await, None);
    /// # Ok(()) }
    /// ```
    pub fn interrupt_events(&self) {
        self.lock().events = Bus::default();
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }
}

#[async_trait]
impl StorageBackend for MemoryStorageBackend {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().map.get(key).cloned())
    }
    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        self.lock().map.insert(key.clone(), value);
        Ok(())
    }
    async fn delete(&self, key: &StorageKey) -> Result<bool> {
        Ok(self.lock().map.remove(key).is_some())
    }
    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        Ok(self
            .lock()
            .map
            .range(prefix.clone()..)
            .skip_while(|(k, _)| *k == prefix)
            .take_while(|(k, _)| k.as_str().starts_with(prefix.as_str()))
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta { key: k.clone(), size: v.len() as u64 })
            .collect())
    }
    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        self.lock().map.entry(key.clone()).or_default().extend_from_slice(&bytes);
        Ok(())
    }
    async fn sweep(&self) -> Result<SweepReport> {
        Ok(SweepReport::default())
    }

    /// Clones share one map: several writers may use it at once.
    fn shared(&self) -> bool {
        true
    }

    async fn acquire_lease(&self, name: &str, node: &str, ttl: Duration) -> Result<Acquired> {
        let ttl = Duration::from_millis(ttl_ms(ttl));
        let now = Instant::now();
        let mut inner = self.lock();
        let (token, taken_from) = match inner.leases.get(name) {
            Some(row) if row.expires_at > now && row.node != node => {
                return Ok(Acquired::Held {
                    node: row.node.clone(),
                    expires_in: row.expires_at - now,
                });
            }
            // Held live by `node` already: the same holder, the same token.
            Some(row) if row.expires_at > now => (row.token, None),
            Some(row) => {
                let from = (!row.released && row.node != node).then(|| row.node.clone());
                (row.token + 1, from)
            }
            None => (1, None),
        };
        let row = LeaseRow { node: node.to_owned(), token, expires_at: now + ttl, released: false };
        inner.leases.insert(name.to_owned(), row);
        let lease = Lease {
            name: name.to_owned(),
            node: node.to_owned(),
            token,
            expires_in: ttl,
            taken_from,
        };
        Ok(Acquired::Granted(lease))
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>> {
        let ttl = Duration::from_millis(ttl_ms(ttl));
        let mut inner = self.lock();
        match inner.leases.get_mut(&lease.name) {
            Some(row) if row.token == lease.token && row.node == lease.node => {
                row.expires_at = Instant::now() + ttl;
                row.released = false;
                Ok(Some(Lease { expires_in: ttl, taken_from: None, ..lease.clone() }))
            }
            _ => Ok(None),
        }
    }

    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(row) = inner.leases.get_mut(&lease.name)
            && row.token == lease.token
            && row.node == lease.node
        {
            row.expires_at = row.expires_at.min(now);
            row.released = true;
        }
        Ok(())
    }

    async fn read_lease(&self, name: &str) -> Result<Option<LeaseState>> {
        let now = Instant::now();
        let inner = self.lock();
        Ok(inner.leases.get(name).map(|row| LeaseState {
            node: row.node.clone(),
            token: row.token,
            expires_in: (row.expires_at > now).then(|| row.expires_at - now),
            released: row.released,
        }))
    }

    /// Checks the fence and writes under one lock.
    async fn put_fenced(
        &self,
        key: &StorageKey,
        value: Vec<u8>,
        _meta: &RecordMeta,
        fence: &Fence,
    ) -> Result<()> {
        let mut inner = self.lock();
        inner.check(fence)?;
        inner.map.insert(key.clone(), value);
        Ok(())
    }

    /// Checks the fence and deletes under one lock.
    async fn delete_fenced(&self, key: &StorageKey, fence: &Fence) -> Result<bool> {
        let mut inner = self.lock();
        inner.check(fence)?;
        Ok(inner.map.remove(key).is_some())
    }

    /// Sent in order under the store's lock, so payloads of all clones reach every
    /// subscriber in one order.
    async fn publish_events(&self, payloads: Vec<Vec<u8>>) -> Result<()> {
        let inner = self.lock();
        for payload in payloads {
            // No subscriber is fine.
            let _ = inner.events.0.send(payload);
        }
        Ok(())
    }

    async fn subscribe_events(&self) -> Result<EventFeed> {
        Ok(EventFeed::broadcast(self.lock().events.0.subscribe()))
    }
}
