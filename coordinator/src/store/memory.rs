//! [`MemoryStore`]: the [`Store`] of unit tests. Nothing survives the process.

use super::redb::page_range;
use super::{Op, Order, Page, Store, StoreError};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// A [`Store`] kept in a `BTreeMap` behind a mutex. Every call holds the
/// mutex for its whole duration, which makes each batch atomic and every call
/// linearizable. "Durable" means for the life of the value only.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // A panic while holding the lock cannot leave a half-applied batch
        // (see `apply`), so a poisoned map is still consistent.
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map().get(key).cloned())
    }

    async fn scan_page(&self, page: Page<'_>) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let Some(range) = page_range(&page) else {
            return Ok(Vec::new());
        };
        let map = self.map();
        let entries = map.range::<String, _>(range);
        let clone = |(key, value): (&String, &Vec<u8>)| (key.clone(), value.clone());
        Ok(match page.order {
            Order::Ascending => entries.take(page.limit).map(clone).collect(),
            Order::Descending => entries.rev().take(page.limit).map(clone).collect(),
        })
    }

    async fn apply(&self, batch: Vec<Op>) -> Result<(), StoreError> {
        let mut map = self.map();
        // Nothing below can fail or panic halfway (short of an allocation
        // failure, which aborts), so the batch applies entirely.
        for op in batch {
            match op {
                Op::Put { key, value } => {
                    map.insert(key, value);
                }
                Op::Delete { key } => {
                    map.remove(&key);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn memory_store_passes_conformance() {
        super::super::conformance::run_all(Arc::new(MemoryStore::new())).await;
    }
}
