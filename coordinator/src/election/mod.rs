//! Who leads: exactly one coordinator replica schedules at a time.
//!
//! A replica calls [`Election::campaign`]; it returns once this replica
//! leads, with a [`Leadership`]: the leader epoch (carried in every offer)
//! and a token cancelled the moment leadership is lost. Leader-only work (the
//! scheduler loop, runner streams) runs under that token and stops with it.
//!
//! Implementations: [`standalone::StandaloneElection`] (always leader; the
//! epoch is a counter in the store, bumped on every start) and
//! [`etcd::EtcdElection`] (campaign with a lease; leader only after the first
//! successful keep-alive; any keep-alive miss steps down).
//!
//! # Contract
//! - Between a `campaign` returning and its `lost` token being cancelled,
//!   no other replica's `campaign` returns a [`Leadership`] whose writes
//!   succeed: writes are fenced by the epoch (see `store::etcd`).
//! - Epochs strictly increase across leaderships.
//! - [`Election::resign`] gives leadership up at once (graceful shutdown);
//!   it is safe to call when not leading.

mod candidates;
pub(crate) mod etcd;
pub(crate) mod standalone;
mod watch;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

/// This replica leads until `lost` is cancelled.
#[derive(Clone, Debug)]
pub(crate) struct Leadership {
    pub(crate) epoch: u64,
    pub(crate) lost: CancellationToken,
}

/// Who leads now, as any replica sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LeaderInfo {
    /// gRPC URL of the leader; empty while there is none.
    pub(crate) endpoint: String,
    pub(crate) epoch: u64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ElectionError {
    #[error("election backend unavailable: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

#[async_trait]
pub(crate) trait Election: Send + Sync + 'static {
    /// Waits until this replica leads (or `shutdown`, then `None`).
    async fn campaign(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Leadership>, ElectionError>;
    /// The current leader, if any.
    async fn leader(&self) -> Result<LeaderInfo, ElectionError>;
    /// Every replica taking part (advertised URLs).
    async fn members(&self) -> Result<Vec<String>, ElectionError>;
    /// Gives up leadership now.
    async fn resign(&self);
}
