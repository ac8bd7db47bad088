//! A single coordinator: always the leader.

use super::*;
use crate::model::EPOCH_KEY;
use crate::store::{Op, Store};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) struct StandaloneElection {
    store: Arc<dyn Store>,
    advertise: String,
    epoch: AtomicU64,
}

impl StandaloneElection {
    pub(crate) fn new(store: Arc<dyn Store>, advertise: String) -> Self {
        Self {
            store,
            advertise,
            epoch: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl Election for StandaloneElection {
    async fn campaign(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Leadership>, ElectionError> {
        if shutdown.is_cancelled() {
            return Ok(None);
        }
        let last = match self.store.get(EPOCH_KEY).await? {
            Some(v) => String::from_utf8_lossy(&v)
                .trim()
                .parse::<u64>()
                .unwrap_or(0),
            None => 0,
        };
        let epoch = last + 1;
        self.store
            .apply(vec![Op::Put {
                key: EPOCH_KEY.into(),
                value: epoch.to_string().into_bytes(),
            }])
            .await?;
        self.epoch.store(epoch, Ordering::Release);
        Ok(Some(Leadership {
            epoch,
            lost: CancellationToken::new(),
        }))
    }

    async fn leader(&self) -> Result<LeaderInfo, ElectionError> {
        Ok(LeaderInfo {
            endpoint: self.advertise.clone(),
            epoch: self.epoch.load(Ordering::Acquire),
        })
    }

    async fn members(&self) -> Result<Vec<String>, ElectionError> {
        Ok(vec![self.advertise.clone()])
    }

    async fn resign(&self) {}
}
