//! An in-memory backend, for tests and for processes that need no durability. Owns one
//! shared map of keys to bytes; calls nothing else in the crate (the trait's types only).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{ObjectMeta, StorageBackend, StorageKey, SweepReport};
use crate::error::Result;

/// Keeps every value in a map in memory. Clones share the same map, so a clone handed to a
/// second [`StateManager`](crate::StateManager) sees the first one's data ("restart" in tests).
/// Nothing survives the process.
#[derive(Debug, Clone, Default)]
pub struct MemoryStorageBackend {
    map: Arc<Mutex<BTreeMap<StorageKey, Vec<u8>>>>,
}

impl MemoryStorageBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<StorageKey, Vec<u8>>> {
        crate::sync::lock(&self.map)
    }
}

#[async_trait]
impl StorageBackend for MemoryStorageBackend {
    async fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>> {
        Ok(self.map().get(key).cloned())
    }
    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> Result<()> {
        self.map().insert(key.clone(), value);
        Ok(())
    }
    async fn delete(&self, key: &StorageKey) -> Result<bool> {
        Ok(self.map().remove(key).is_some())
    }
    async fn list(&self, prefix: &StorageKey) -> Result<Vec<ObjectMeta>> {
        Ok(self
            .map()
            .range(prefix.clone()..)
            .skip_while(|(k, _)| *k == prefix)
            .take_while(|(k, _)| k.as_str().starts_with(prefix.as_str()))
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta { key: k.clone(), size: v.len() as u64 })
            .collect())
    }
    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> Result<()> {
        self.map().entry(key.clone()).or_default().extend_from_slice(&bytes);
        Ok(())
    }
    async fn sweep(&self) -> Result<SweepReport> {
        Ok(SweepReport::default())
    }
}
