//! [`MemoryLogStore`]: the [`LogStore`] of unit tests. Nothing survives the
//! process.

use super::{LogError, LogStore, check_id, plan_append};
use async_trait::async_trait;
use bytes::Bytes;
use capstan_proto::ids::AttemptId;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// Logs kept in memory, one `Vec<u8>` per attempt behind one mutex (every
/// call is atomic). `sync` does nothing.
#[derive(Debug, Default)]
pub(crate) struct MemoryLogStore {
    logs: Mutex<HashMap<String, Vec<u8>>>,
}

impl MemoryLogStore {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn logs(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // Every change below is a single `extend_from_slice`: a poisoned map
        // is still consistent.
        self.logs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl LogStore for MemoryLogStore {
    async fn append(&self, attempt: &AttemptId, offset: u64, data: &[u8]) -> Result<u64, LogError> {
        check_id(attempt)?;
        let mut logs = self.logs();
        let len = logs.get(attempt.as_str()).map_or(0, Vec::len) as u64;
        let skip = plan_append(attempt, len, offset, data.len())?;
        if skip == data.len() {
            return Ok(len);
        }
        let log = logs.entry(attempt.as_str().to_string()).or_default();
        log.extend_from_slice(&data[skip..]);
        Ok(log.len() as u64)
    }

    async fn delete(&self, attempt: &AttemptId) -> Result<(), LogError> {
        check_id(attempt)?;
        self.logs().remove(attempt.as_str());
        Ok(())
    }

    async fn list(&self) -> Result<Vec<AttemptId>, LogError> {
        Ok(self
            .logs()
            .keys()
            .map(|k| AttemptId::from_string(k.clone()))
            .collect())
    }

    async fn len(&self, attempt: &AttemptId) -> Result<u64, LogError> {
        check_id(attempt)?;
        Ok(self.logs().get(attempt.as_str()).map_or(0, Vec::len) as u64)
    }

    async fn read(&self, attempt: &AttemptId, offset: u64, max: usize) -> Result<Bytes, LogError> {
        check_id(attempt)?;
        let logs = self.logs();
        let Some(log) = logs.get(attempt.as_str()) else {
            return Ok(Bytes::new());
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(log.len());
        let end = start.saturating_add(max).min(log.len());
        Ok(Bytes::copy_from_slice(&log[start..end]))
    }

    async fn sync(&self, attempt: &AttemptId) -> Result<(), LogError> {
        check_id(attempt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn memory_log_store_passes_conformance() {
        super::super::conformance::run_all(Arc::new(MemoryLogStore::new())).await;
    }
}
