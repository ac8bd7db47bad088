//! The `docker` executor (the runner's default): every step in its own
//! container, through the Docker Engine API (bollard).
//!
//! Per task: a workspace volume mounted at `/workspace` in every step, and,
//! with `--docker-network internal`, a network made with `internal: true`
//! (no route out). With `none` (the default) steps get no network at all; a
//! named network is for users who need egress and is never created or
//! removed by the runner. The source checkout (and anything else in the
//! attempt's local workspace directory) is copied into the volume through
//! the API into a helper container that is created but never started, so
//! nothing depends on bind mounts of runner paths: it works when the runner
//! itself runs in a container with the Docker socket mounted.
//!
//! Per step: a container with `init` on (so SIGTERM reaches the script),
//! never privileged, every capability dropped except the configured ones,
//! `no-new-privileges`, the configured memory (no swap on top) and CPU
//! limits, no Docker socket. Output is attached before start and streamed
//! into the sink as it arrives. Cancel and timeout stop the container
//! (SIGTERM, SIGKILL after `container::STOP_GRACE_SECS`). A non-zero exit
//! is checked for `State.OOMKilled`.
//!
//! Objects are named after the attempt (`capstan-<attempt>`,
//! `capstan-<attempt>-s<step>`, `capstan-<attempt>-ws`) so destroy calls need
//! no state and are idempotent, and are labelled with runner, run, task and
//! attempt (`capstan.runner`, ...). [`DockerExecutor::reap`] removes whatever
//! a previous process of the same runner (name and work dir) left behind.
//!
//! Images are pulled as the task's pull policy says, and only those the
//! runner's `--docker-allowed-images` match are used at all (`pull`). A
//! task's services run beside its steps on the task's network (`services`).
//!
//! Layout: this file holds the options, the executor and its
//! [`Executor`] implementation (which dispatches the step kinds), object
//! names and labels, and engine errors; `workspace` the task's volume and
//! its helper container; `container` a `run` step's container; `build` and
//! `push` the docker-only step kinds of those names; `registry` what the
//! registry already holds (their `skip-if-exists`) and the registry login;
//! `reap` the removal of what the executor made (per step, per attempt,
//! and at start); `pull` the allowed images, the pull policy and the pull;
//! `services` the task's service containers. The child
//! modules import only from this file, the executor trait and the step
//! vocabulary ([`crate::step`]), and `registry` the image-reference parser;
//! none imports another but for `pull`'s progress writers, which
//! `container`, `build` and `services` use (they share the executor's
//! methods instead).

mod build;
mod container;
mod pull;
mod push;
mod reap;
mod registry;
mod services;
mod workspace;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::NetworkCreateRequest;
use capstan_proto::pipeline::v1::step;

pub use pull::{AllowedImages, PullPolicy};
pub(crate) use reap::runner_key;

// `log`: a `build` or `push` step's own progress lines, for the children.
use super::{Executor, ExecutorError, step_log as log};
use crate::logs::sink::OutputSink;
use crate::secrets::Secrets;
use crate::step::{StepContext, StepEnd, TaskContext, step_kind_name};

/// Where the workspace volume is mounted in every container.
const WORKSPACE: &str = "/workspace";

const LABEL_RUNNER: &str = "capstan.runner";
/// Identifies one runner installation (name and work dir): what reaping
/// matches on, so two runners that share a name on one engine (tests) do
/// not reap each other.
const LABEL_RUNNER_KEY: &str = "capstan.runner-key";
const LABEL_RUN: &str = "capstan.run";
const LABEL_TASK: &str = "capstan.task";
const LABEL_ATTEMPT: &str = "capstan.attempt";
const LABEL_COMMIT: &str = "capstan.commit";

/// The network of step containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkSetting {
    /// No network at all (`NetworkMode: none`), but for a task with
    /// services: its steps join the task's internal network, where only
    /// the services are.
    None,
    /// A per-task network created with `internal: true`: steps of the task
    /// reach each other, nothing else.
    Internal,
    /// An existing network, for steps that need egress. Never created or
    /// removed by the runner.
    Named(String),
}

impl std::str::FromStr for NetworkSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "" => Ok(Self::None),
            "internal" => Ok(Self::Internal),
            "host" => Err("the host network gives steps the runner's network: not allowed".into()),
            s if s.starts_with("container:") => {
                Err("sharing another container's network is not allowed".into())
            }
            s => Ok(Self::Named(s.to_owned())),
        }
    }
}

/// How the docker executor isolates and limits steps: the operator's
/// `--docker-*` settings, as [`crate::RunnerConfig`] holds them.
#[derive(Clone, Debug)]
pub struct DockerSettings {
    pub network: NetworkSetting,
    /// Memory limit of each step in bytes (swap is not added on top).
    pub memory_bytes: Option<i64>,
    /// CPU limit of each step (1.5 = one and a half CPUs).
    pub cpus: Option<f64>,
    /// Capabilities steps keep; every other one is dropped.
    pub cap_add: Vec<String>,
    /// Capabilities a task may add with its pipeline's `capabilities:`.
    pub allow_cap: Vec<String>,
    /// Image of the never-started container that copies files in and out of
    /// the workspace volume when the task has no image of its own.
    pub helper_image: String,
    /// Extra labels on every object (tests put their id here).
    pub labels: BTreeMap<String, String>,
    /// When images are pulled for a task whose `pull:` does not say.
    pub pull: PullPolicy,
    /// The only images steps, services and builds may use (none: any).
    pub allowed_images: AllowedImages,
    /// Registry host -> the runner secret to pull from it with.
    pub pull_credentials: BTreeMap<String, String>,
}

impl Default for DockerSettings {
    fn default() -> Self {
        Self {
            network: NetworkSetting::None,
            memory_bytes: None,
            cpus: None,
            cap_add: Vec::new(),
            allow_cap: Vec::new(),
            helper_image: DEFAULT_HELPER_IMAGE.to_owned(),
            labels: BTreeMap::new(),
            pull: PullPolicy::default(),
            allowed_images: AllowedImages::default(),
            pull_credentials: BTreeMap::new(),
        }
    }
}

/// Everything the docker executor is started with: which runner it works
/// for, where the engine is, and the [`DockerSettings`].
#[derive(Clone, Debug)]
pub struct DockerOptions {
    /// The runner's name (label only).
    pub runner_name: String,
    /// Reaping key: what the `capstan.runner-key` label of every object
    /// says (the runner's name and work dir hashed, `runner_key`).
    pub runner_key: String,
    /// Engine address (`unix:///path`, `tcp://host:port`); `None` reads
    /// `DOCKER_HOST` or uses the default socket.
    pub host: Option<String>,
    pub settings: DockerSettings,
}

impl DockerOptions {
    /// Options with the default settings.
    pub fn new(runner_name: &str, runner_key: &str) -> Self {
        Self {
            runner_name: runner_name.to_owned(),
            runner_key: runner_key.to_owned(),
            host: None,
            settings: DockerSettings::default(),
        }
    }
}

/// Default of `--docker-helper-image`.
pub(crate) const DEFAULT_HELPER_IMAGE: &str = "capstan-test/busybox:1";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "the Docker Engine is unreachable (is dockerd running, and DOCKER_HOST or /var/run/docker.sock right?)"
    )]
    Unreachable {
        #[source]
        source: BollardError,
    },
    #[error("{action}")]
    Api {
        action: String,
        #[source]
        source: BollardError,
    },
}

/// Runs steps in containers. Cheap to share: the engine client is a pool.
pub struct DockerExecutor {
    docker: Docker,
    options: DockerOptions,
    secrets: Arc<Secrets>,
    /// Per service container: how its image was got, for its log section.
    service_notes: Mutex<HashMap<String, Vec<String>>>,
}

impl DockerExecutor {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket),
    /// negotiates the API version and pings it.
    pub async fn connect(
        options: DockerOptions,
        secrets: Arc<Secrets>,
    ) -> Result<Self, DockerError> {
        let docker = match &options.host {
            Some(host) => Docker::connect_with_host(host),
            None => Docker::connect_with_local_defaults(),
        }
        .map_err(|source| DockerError::Unreachable { source })?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|source| DockerError::Unreachable { source })?;
        docker
            .ping()
            .await
            .map_err(|source| DockerError::Unreachable { source })?;
        Ok(Self {
            docker,
            options,
            secrets,
            service_notes: Mutex::default(),
        })
    }

    fn docker(&self) -> &Docker {
        &self.docker
    }

    fn labels(&self, task: &TaskContext) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = self
            .options
            .settings
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_RUNNER.into(), self.options.runner_name.clone());
        labels.insert(LABEL_RUNNER_KEY.into(), self.options.runner_key.clone());
        labels.insert(LABEL_RUN.into(), task.run_id.to_string());
        labels.insert(LABEL_TASK.into(), task.task_name.clone());
        labels.insert(LABEL_ATTEMPT.into(), task.attempt_id.to_string());
        labels
    }

    /// Memory (bytes) and CPU limits of each of the task's containers: the
    /// task's `resources`, else the runner's defaults.
    fn resources(&self, task: &TaskContext) -> (Option<i64>, Option<f64>) {
        let o = &self.options.settings;
        let memory = match task.task.memory_bytes {
            0 => o.memory_bytes,
            n => i64::try_from(n).ok(),
        };
        let cpus = (task.task.cpus > 0.0).then_some(task.task.cpus).or(o.cpus);
        (memory, cpus)
    }

    fn network_mode(&self, task: &TaskContext) -> String {
        match (&self.options.settings.network, self.task_network(task)) {
            (NetworkSetting::Named(name), _) => name.clone(),
            (_, Some(network)) => network,
            (_, None) => "none".into(),
        }
    }

    /// Whether `image` is present on the engine (nothing is pulled).
    async fn image_present(&self, image: &str) -> Result<bool, ExecutorError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(404) => Ok(false),
            Err(e) => Err(api_error(0, &format!("inspecting image {image}"), e)),
        }
    }

    fn secrets(&self) -> &Secrets {
        &self.secrets
    }
}

#[async_trait]
impl Executor for DockerExecutor {
    async fn setup_task(&self, task: &TaskContext) -> Result<(), ExecutorError> {
        let labels = self.labels(task);
        self.create_workspace(task, labels.clone()).await?;
        if let Some(name) = self.task_network(task) {
            let network = NetworkCreateRequest {
                name,
                internal: Some(true),
                labels: Some(labels),
                ..NetworkCreateRequest::default()
            };
            match self.docker.create_network(network).await {
                Ok(_) => {}
                Err(e) if status(&e) == Some(409) => {}
                Err(e) => return Err(setup_error("creating the task network", e)),
            }
        }
        self.upload_workspace(task).await?;
        // A cancel drops a pull or a probe midway; the teardown removes
        // whatever was made by its labels.
        tokio::select! {
            started = self.start_services(task) => started,
            () = task.cancel.cancelled() => Err(ExecutorError::Setup {
                message: "cancelled while starting the task's services".into(),
            }),
        }
    }

    async fn run_step(
        &self,
        task: &TaskContext,
        ctx: StepContext<'_>,
    ) -> Result<StepEnd, ExecutorError> {
        match &ctx.step.kind {
            Some(step::Kind::Run(run)) => {
                let image = if run.image.is_empty() {
                    &task.task.image
                } else {
                    &run.image
                };
                if image.is_empty() {
                    return Ok(StepEnd::Failed {
                        message: "no image for this step: set `image:` on the task or the step"
                            .into(),
                    });
                }
                self.run_container(task, &ctx, image, &run.script).await
            }
            Some(step::Kind::Build(build)) => build::run(self, task, &ctx, build).await,
            Some(step::Kind::Push(push)) => push::run(self, task, &ctx, push).await,
            _ => Ok(StepEnd::Failed {
                message: format!(
                    "step kind `{}` is not supported by this runner yet",
                    step_kind_name(ctx.step)
                ),
            }),
        }
    }

    async fn destroy_step(&self, task: &TaskContext, index: u32) -> Result<(), ExecutorError> {
        let name = step_container_name(task, index);
        reap::remove_container(&self.docker, &name)
            .await
            .map_err(|e| api_error(index, "removing the step container", e))
    }

    async fn read_output_file(&self, task: &TaskContext) -> Result<Option<Vec<u8>>, ExecutorError> {
        self.read_output(task).await
    }

    async fn write_service_logs(
        &self,
        task: &TaskContext,
        out: &dyn OutputSink,
    ) -> Result<(), ExecutorError> {
        self.write_service_sections(task, out)
            .await
            .map_err(|source| ExecutorError::Output {
                index: u32::try_from(task.task.steps.len()).unwrap_or(u32::MAX),
                source,
            })
    }

    async fn destroy_task(&self, task: &TaskContext) -> Result<(), ExecutorError> {
        self.forget_service_notes(task);
        let filter = format!("{LABEL_ATTEMPT}={}", task.attempt_id);
        reap::remove_labelled(&self.docker, &filter)
            .await
            .map(|_| ())
            .map_err(|e| ExecutorError::Setup {
                message: crate::error::chain(&e),
            })
    }
}

/// `capstan-<attempt id>`: the task's volume and network.
fn object_name(task: &TaskContext) -> String {
    let id: String = task
        .attempt_id
        .as_str()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("capstan-{id}")
}

fn step_container_name(task: &TaskContext, index: u32) -> String {
    format!("{}-s{index}", object_name(task))
}

/// The HTTP status of an engine error, if it is one.
pub(super) fn status(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Whether the engine could not be reached at all (as opposed to answering
/// with an error).
pub(super) fn is_unreachable(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::HyperLegacyError { .. }
            | BollardError::IOError { .. }
            | BollardError::RequestTimeoutError
            | BollardError::SocketNotFoundError(_)
    )
}

pub(super) fn api_error(index: u32, action: &str, e: BollardError) -> ExecutorError {
    let message = if is_unreachable(&e) {
        format!("{action}: the Docker Engine is unreachable: {e}")
    } else {
        format!("{action}: {e}")
    };
    ExecutorError::Start { index, message }
}

fn setup_error(action: &str, e: BollardError) -> ExecutorError {
    let message = if is_unreachable(&e) {
        format!("{action}: the Docker Engine is unreachable: {e}")
    } else {
        format!("{action}: {e}")
    };
    ExecutorError::Setup { message }
}

/// Why a docker-only step (`build`, `push`) stopped short of success.
enum Stop {
    /// The step could not do its work; the message is for the user.
    Failed(String),
    /// The runner could not run the step (outcome ERROR).
    Error(ExecutorError),
}

impl From<ExecutorError> for Stop {
    fn from(e: ExecutorError) -> Self {
        Self::Error(e)
    }
}

/// How a docker-only step that ran with `result` ended.
fn step_end(result: Result<(), Stop>) -> Result<StepEnd, ExecutorError> {
    match result {
        Ok(()) => Ok(StepEnd::Exited(0)),
        Err(Stop::Failed(message)) => Ok(StepEnd::Failed { message }),
        Err(Stop::Error(e)) => Err(e),
    }
}
