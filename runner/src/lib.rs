//! The Capstan runner agent: registers with the coordinator, holds one
//! Control stream to the leader, runs the task attempts it is offered and
//! ships their logs.
//!
//! Layout:
//! - [`config`]: `--flags`, `CAPSTAN_*` environment and the TOML file, layered
//!   into a [`RunnerConfig`].
//! - `credentials`: the runner id and secret from `Register`, cached in the
//!   work dir.
//! - `workdir`: the work dir's layout and its files: `runner.json`,
//!   `attempts/<attempt_id>/workspace` (one per running attempt),
//!   `spool/<attempt_id>.log` (log spool), and the spares the next attempt
//!   starts with. Nothing else joins paths in the work dir.
//! - `agent`: the Control stream: `agent/connect` (connect and reconnect,
//!   leader hints, register, hello/welcome, the leader epoch),
//!   `agent/attempts` (offers, tentative ones waiting for their confirm,
//!   cancels, redelivery of final reports), and in `agent/mod.rs`
//!   heartbeats and drain.
//! - `attempt`: runs one attempt: workspace, steps through the executor,
//!   waits for its log to be acknowledged, builds the final report;
//!   `attempt::steps` the step loop, which runs the built-in step kinds
//!   itself.
//! - [`step`]: what a step runs against, whoever runs it: the task's and
//!   the step's context and how a step ended.
//! - [`executor`]: the [`executor::Executor`] trait and its `docker` (with
//!   the docker-only `build` and `push` step kinds), `shell` and `fake`
//!   implementations.
//! - [`gitops`]: the `set-image` and `git-push` step kinds (the GitOps
//!   write-back), run by the runner itself under every executor.
//! - [`git`]: git2 for everything else: the run's checkout at its exact
//!   commit, the one clone/fetch/push path with credentials and host keys.
//! - [`secrets`]: runner-side secrets from `--secrets-file` and
//!   `CAPSTAN_SECRET_*`.
//! - [`logs`]: secret masking, the spool that holds every output byte until
//!   the coordinator acknowledged it (in memory, spilled to disk while the
//!   coordinator does not take it), and the `PushLogs` shipper that drains
//!   it (`logs/shipper/`: the loop, and one window of streams).
//! - `metrics` and `http`: the Prometheus metrics and the optional
//!   `--http-listen` port serving them with `/healthz`.
//! - `backoff`: jittered exponential delays between reconnects.
//! - `error`: the failures that end the runner, and `chain` (an error and
//!   its sources on one line).
//! - `testing` (tests only): an in-process coordinator for the agent's and
//!   the shipper's tests.

mod agent;
mod attempt;
mod backoff;
pub mod config;
pub(crate) mod credentials;
mod error;
pub mod executor;
pub mod git;
pub mod gitops;
mod http;
pub mod logs;
pub(crate) mod metrics;
mod outputs;
pub mod secrets;
pub mod step;
#[cfg(test)]
mod testing;
mod workdir;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::ExecutorKind;
pub(crate) use error::Error;
pub(crate) use executor::docker::DockerSettings;

/// Everything the agent needs to run. Built by [`config::load`] for the
/// binary, or directly by an embedding process (`capstan dev`, which fills
/// what it does not set with `..Default::default()`).
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
    /// Take one task, then deregister and exit 0 (`--ephemeral`).
    pub ephemeral: bool,
    /// Which executor runs the steps.
    pub executor: ExecutorKind,
    /// Per-attempt work dirs, the log spool and the cached credentials.
    pub work_dir: PathBuf,
    /// Secrets file (see [`secrets`]); `CAPSTAN_SECRET_*` variables add to it.
    pub secrets_file: Option<PathBuf>,
    /// The secret used to fetch run repositories, if they need credentials.
    pub git_credentials: Option<String>,
    /// Who `git-push` steps commit as (`--git-author`).
    pub git_author: gitops::Author,
    /// Isolation and limits of the docker executor.
    pub docker: DockerSettings,
    /// How much of one step's output the log keeps (`--max-step-log`).
    pub step_log_cap: logs::cap::StepLogCap,
    /// What `https://` coordinators are trusted with (`--ca-cert`) and the
    /// client certificate presented under mTLS.
    pub tls: capstan_tls::ClientTls,
    /// Where `/healthz` and `/metrics` are served (`--http-listen`); none: not served.
    pub http_listen: Option<std::net::SocketAddr>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            coordinators: Vec::new(),
            registration_token: String::new(),
            name: String::new(),
            labels: BTreeMap::new(),
            capacity: config::DEFAULT_CAPACITY,
            ephemeral: false,
            executor: config::DEFAULT_EXECUTOR,
            work_dir: PathBuf::from(config::DEFAULT_WORK_DIR),
            secrets_file: None,
            git_credentials: None,
            git_author: gitops::Author::default(),
            docker: DockerSettings::default(),
            step_log_cap: logs::cap::StepLogCap::default(),
            tls: capstan_tls::ClientTls::default(),
            http_listen: None,
        }
    }
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
    if config
        .coordinators
        .iter()
        .any(|u| u.starts_with("https://"))
    {
        // A wrong path fails the start, not the first connection.
        config.tls.tonic_config().map_err(Error::from)?;
    }
    let secrets =
        Arc::new(secrets::Secrets::load(config.secrets_file.as_deref()).map_err(Error::Secrets)?);
    let work_dir = workdir::WorkDir::new(&config.work_dir);
    work_dir.prepare().await?;
    let executor: Arc<dyn executor::Executor> = match config.executor {
        ExecutorKind::Shell => Arc::new(executor::shell::ShellExecutor::new()),
        ExecutorKind::Fake => Arc::new(executor::fake::FakeExecutor::new()),
        ExecutorKind::Docker => Arc::new(docker_executor(&config, Arc::clone(&secrets)).await?),
    };
    let creds = credentials::load(&work_dir.credentials_file()).await?;
    metrics::get().slots(0, config.capacity);
    let _http = match config.http_listen {
        Some(addr) => Some(http::spawn(addr).await?),
        None => None,
    };
    let agent =
        agent::Agent::new(config, work_dir, executor, creds, shutdown).with_secrets(secrets);
    // On a worker thread, not in the caller's future: `#[tokio::main]`
    // polls that on the main thread, outside the worker pool, so every
    // message to or from the agent (offer in, accept out, each attempt
    // spawned) crossed threads with a futex wake-up; on a worker, what it
    // wakes runs next on the same thread. Aborted if this future is dropped.
    let mut agent = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(agent.run()));
    match (&mut agent).await {
        Ok(result) => result?,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => return Err(anyhow::anyhow!("the agent task was cancelled: {e}")),
    }
    Ok(())
}

/// Connects to the engine and reaps what a previous process of this runner
/// (same name and work dir) left behind.
pub(crate) async fn docker_executor(
    config: &RunnerConfig,
    secrets: Arc<secrets::Secrets>,
) -> Result<executor::docker::DockerExecutor, Error> {
    let key = executor::docker::runner_key(&config.name, &config.work_dir);
    let mut options = executor::docker::DockerOptions::new(&config.name, &key);
    options.settings = config.docker.clone();
    let executor = executor::docker::DockerExecutor::connect(options, secrets).await?;
    executor.reap().await?;
    Ok(executor)
}
