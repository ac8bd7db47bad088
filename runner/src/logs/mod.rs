//! Attempt logs on the runner.
//!
//! Every output byte of an attempt is first masked ([`mask`]: every runner
//! secret, in several spellings), then appended to its [`spool::Spool`],
//! which holds it until the coordinator acknowledged it: in memory (up to a
//! budget), in `<work_dir>/spool/<attempt_id>.log` while the coordinator
//! does not take it, so a coordinator outage loses nothing. The [`shipper`]
//! drains the spool to the coordinator with `PushLogs` and tracks the
//! durable offset the coordinator acknowledges.

pub mod cap;
pub mod mask;
pub mod shipper;
pub mod sink;
pub mod spool;

use capstan_proto::runner::v1::forge_service_client::ForgeServiceClient;
use capstan_proto::runner::v1::runner_service_client::RunnerServiceClient;
use tonic::transport::Channel;

use crate::credentials::Credentials;

/// Where logs go: a connection to the current leader and the credential to
/// present. The agent publishes a new one after every welcome. The forge
/// calls of a `git-push` step (`ForgeService`) use the same connection.
#[derive(Clone, Debug)]
pub struct LogTarget {
    pub client: RunnerServiceClient<Channel>,
    pub forge: ForgeServiceClient<Channel>,
    pub credentials: Credentials,
}

impl LogTarget {
    /// Both services on `channel`.
    pub fn new(channel: Channel, credentials: Credentials) -> Self {
        Self {
            client: RunnerServiceClient::new(channel.clone()),
            forge: ForgeServiceClient::new(channel),
            credentials,
        }
    }
}
