//! Thin tonic handlers. Each unwraps its request, asks the scheduler (or the
//! log store) and maps errors to `tonic::Status` in one place ([`status`]).

pub mod cluster;
pub mod pipeline;
pub mod runner;
pub mod status;

use crate::log_feed::LogFeed;
use crate::logs::LogStore;
use crate::metrics::Metrics;
use crate::scheduler::SchedulerHandle;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What every handler needs.
#[derive(Clone)]
pub struct Shared {
    pub scheduler: SchedulerHandle,
    pub logs: Arc<dyn LogStore>,
    pub feed: Arc<LogFeed>,
    pub metrics: Arc<Metrics>,
    pub registration_token: Arc<str>,
    pub advertise: Arc<str>,
    pub epoch: u64,
    /// Ends long-lived response streams so a graceful shutdown can finish.
    pub shutdown: CancellationToken,
}
