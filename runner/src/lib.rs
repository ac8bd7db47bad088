//! The Capstan runner agent: registers with the coordinator, holds one
//! Control stream to the leader, runs the task attempts it is offered and
//! ships their logs.
//!
//! Layout:
//! - [`config`]: `--flags`, `CAPSTAN_*` environment and the TOML file, layered
//!   into a [`RunnerConfig`].
//! - [`credentials`]: the runner id and secret cached in `<work_dir>/runner.json`.
//! - `agent`: the Control stream: connect and reconnect, hello/welcome,
//!   offers, cancels, heartbeats, drain, redelivery of final reports.
//! - `attempt`: runs one attempt: workspace, steps through the executor,
//!   waits for its log to be acknowledged, builds the final report.
//! - [`executor`]: the [`executor::Executor`] trait and its `shell` and `fake`
//!   implementations.
//! - [`logs`]: the on-disk spool every output byte goes to first, and the
//!   `PushLogs` shipper that drains it.
//! - `backoff`: jittered exponential delays between reconnects.
//!
//! Work dir layout: `runner.json` (credentials), `attempts/<attempt_id>/workspace`
//! (one per running attempt), `spool/<attempt_id>.log` (log spool).

mod agent;
mod attempt;
mod backoff;
pub mod config;
pub mod credentials;
pub mod executor;
pub mod logs;
#[cfg(test)]
mod testing;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::ExecutorKind;

/// Everything the agent needs to run. Built by [`config::load`] for the
/// binary, or directly by an embedding process (`capstan dev`).
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// gRPC URLs of the coordinators, e.g. `http://127.0.0.1:7700`; tried in
    /// order, and `capstan-leader` hints are followed.
    pub coordinators: Vec<String>,
    /// The fleet's shared registration token.
    pub registration_token: String,
    /// This runner's unique name.
    pub name: String,
    /// Labels tasks select on with `runs-on`.
    pub labels: BTreeMap<String, String>,
    /// Attempts run at once (default 1).
    pub capacity: u32,
    /// Which executor runs the steps.
    pub executor: ExecutorKind,
    /// Per-attempt work dirs, the log spool and the cached credentials.
    pub work_dir: PathBuf,
}

/// Failures that end the runner. A coordinator that cannot be reached is not
/// one of them: the agent keeps retrying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the docker executor is not available in this build yet; use --executor shell or fake")]
    DockerUnavailable,
    #[error("no coordinator URL given: pass --coordinator URL")]
    NoCoordinator,
    #[error("invalid coordinator URL `{url}`: expected e.g. http://127.0.0.1:7700")]
    InvalidCoordinatorUrl { url: String },
    #[error("capacity must be at least 1")]
    ZeroCapacity,
    #[error("registration token rejected by the coordinator: check --registration-token")]
    RegistrationRejected,
    #[error(
        "the coordinator rejected this runner's credentials even after registering again: {message}"
    )]
    CredentialsRejected { message: String },
    #[error("the coordinator refused this runner's protocol version: {message}")]
    ProtocolRejected { message: String },
    #[error("preparing work dir {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Credentials(#[from] credentials::CredentialsError),
}

/// Runs the agent until `shutdown` is cancelled and the drain completes (or
/// the coordinator's `Drain` completes), or a fatal error such as a rejected
/// registration token.
///
/// Drain: new offers are rejected with reason "draining", running attempts
/// finish and have their logs and final reports delivered, then the runner
/// sends `GoingAway` and returns `Ok`.
pub async fn run(config: RunnerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    if config.coordinators.is_empty() {
        return Err(Error::NoCoordinator.into());
    }
    for url in &config.coordinators {
        if tonic::transport::Endpoint::from_shared(url.clone()).is_err() {
            return Err(Error::InvalidCoordinatorUrl { url: url.clone() }.into());
        }
    }
    if config.capacity == 0 {
        return Err(Error::ZeroCapacity.into());
    }
    let executor: Arc<dyn executor::Executor> = match config.executor {
        ExecutorKind::Shell => Arc::new(executor::shell::ShellExecutor::new()),
        ExecutorKind::Fake => Arc::new(executor::fake::FakeExecutor::new()),
        ExecutorKind::Docker => return Err(Error::DockerUnavailable.into()),
    };
    agent::prepare_work_dir(&config.work_dir).await?;
    let creds = credentials::load(&config.work_dir).await?;
    agent::Agent::new(config, executor, creds, shutdown)
        .run()
        .await?;
    Ok(())
}
