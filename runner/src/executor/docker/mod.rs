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
//! (SIGTERM, SIGKILL after [`STOP_GRACE_SECS`]). A non-zero exit is checked
//! for `State.OOMKilled`.
//!
//! Objects are named after the attempt (`capstan-<attempt>`,
//! `capstan-<attempt>-s<step>`, `capstan-<attempt>-ws`) so destroy calls need
//! no state and are idempotent, and are labelled with runner, run, task and
//! attempt ([`LABEL_RUNNER`] ...). [`DockerExecutor::reap`] removes whatever
//! a previous process of the same runner (name and work dir) left behind.
//!
//! Nothing is ever pulled: a missing image is a step failure naming it.

mod build;
mod push;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, HostConfig, Mount, MountType, NetworkCreateRequest, VolumeCreateRequest,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveVolumeOptionsBuilder, StopContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use capstan_shared::proto::pipeline::v1::step;
use futures::StreamExt as _;

use super::{Executor, ExecutorError, step_env};
use crate::secrets::Secrets;
use crate::step::{StepContext, StepEnd, TaskContext, sleep_until_deadline, step_kind_name};

/// Seconds between SIGTERM and SIGKILL when a step container is stopped;
/// with the engine's own latency a stop completes within 2 s.
pub const STOP_GRACE_SECS: i32 = 1;
/// How often, and how far apart, a step that died of SIGKILL is asked again
/// whether the OOM killer did it ([`DockerExecutor::oom_killed`]): up to
/// 200 ms in all, paid only by steps that exit 137 without the flag.
const OOM_RECHECKS: u32 = 10;
const OOM_RECHECK_DELAY: Duration = Duration::from_millis(20);
/// Where the workspace volume is mounted in every container.
pub const WORKSPACE: &str = "/workspace";

pub const LABEL_RUNNER: &str = "capstan.runner";
/// Identifies one runner installation (name and work dir): what reaping
/// matches on, so two runners that share a name on one engine (tests) do
/// not reap each other.
pub const LABEL_RUNNER_KEY: &str = "capstan.runner-key";
pub const LABEL_RUN: &str = "capstan.run";
pub const LABEL_TASK: &str = "capstan.task";
pub const LABEL_ATTEMPT: &str = "capstan.attempt";
pub const LABEL_COMMIT: &str = "capstan.commit";

/// The network of step containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkSetting {
    /// No network at all (`NetworkMode: none`).
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

/// What one task's step containers get.
struct StepLimits {
    cap_add: Vec<String>,
    memory_bytes: Option<i64>,
    cpus: Option<f64>,
}

/// How the docker executor isolates and limits steps.
#[derive(Clone, Debug)]
pub struct DockerOptions {
    /// The runner's name (label only).
    pub runner_name: String,
    /// Reaping key: see [`LABEL_RUNNER_KEY`].
    pub runner_key: String,
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
    pub extra_labels: BTreeMap<String, String>,
    /// Engine address (`unix:///path`, `tcp://host:port`); `None` reads
    /// `DOCKER_HOST` or uses the default socket.
    pub host: Option<String>,
}

impl DockerOptions {
    pub fn new(runner_name: &str, runner_key: &str) -> Self {
        Self {
            runner_name: runner_name.to_owned(),
            runner_key: runner_key.to_owned(),
            network: NetworkSetting::None,
            memory_bytes: None,
            cpus: None,
            cap_add: Vec::new(),
            allow_cap: Vec::new(),
            helper_image: DEFAULT_HELPER_IMAGE.to_owned(),
            extra_labels: BTreeMap::new(),
            host: None,
        }
    }
}

/// Default of `--docker-helper-image`.
pub const DEFAULT_HELPER_IMAGE: &str = "capstan-test/busybox:1";

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
        })
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Removes every container, volume and network labelled with this
    /// runner's key: what a previous process of this runner left when it
    /// crashed. Call before accepting work. Returns how many objects went.
    pub async fn reap(&self) -> Result<usize, DockerError> {
        let filter = format!("{LABEL_RUNNER_KEY}={}", self.options.runner_key);
        let removed = remove_labelled(&self.docker, &filter).await?;
        if removed > 0 {
            tracing::warn!(
                removed,
                "removed containers, volumes and networks left by a previous run of this runner"
            );
        }
        Ok(removed)
    }

    fn labels(&self, task: &TaskContext) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = self
            .options
            .extra_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_RUNNER.into(), self.options.runner_name.clone());
        labels.insert(LABEL_RUNNER_KEY.into(), self.options.runner_key.clone());
        labels.insert(LABEL_RUN.into(), task.run_id.clone());
        labels.insert(LABEL_TASK.into(), task.task_name.clone());
        labels.insert(LABEL_ATTEMPT.into(), task.attempt_id.clone());
        labels
    }

    fn network_mode(&self, task: &TaskContext) -> String {
        match &self.options.network {
            NetworkSetting::None => "none".into(),
            NetworkSetting::Internal => object_name(task),
            NetworkSetting::Named(name) => name.clone(),
        }
    }

    fn workspace_mount(task: &TaskContext) -> Mount {
        Mount {
            target: Some(WORKSPACE.into()),
            source: Some(object_name(task)),
            typ: Some(MountType::VOLUME),
            ..Mount::default()
        }
    }

    /// Whether `image` is present on the engine (never pulled).
    pub(crate) async fn image_present(&self, image: &str) -> Result<bool, ExecutorError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(404) => Ok(false),
            Err(e) => Err(api_error(0, &format!("inspecting image {image}"), e)),
        }
    }

    /// The never-started container that mounts the workspace volume, for
    /// copying files in and out. Created on first use.
    pub(crate) async fn ensure_helper(&self, task: &TaskContext) -> Result<String, ExecutorError> {
        let name = format!("{}-ws", object_name(task));
        let candidates = [
            task.task.image.clone(),
            task.task
                .steps
                .iter()
                .find_map(|s| match &s.kind {
                    Some(step::Kind::Run(r)) if !r.image.is_empty() => Some(r.image.clone()),
                    _ => None,
                })
                .unwrap_or_default(),
            self.options.helper_image.clone(),
        ];
        let mut image = None;
        for c in candidates.iter().filter(|c| !c.is_empty()) {
            if self.image_present(c).await? {
                image = Some(c.clone());
                break;
            }
        }
        let Some(image) = image else {
            return Err(ExecutorError::Setup {
                message: format!(
                    "no image to copy the workspace with: neither the task's image nor the helper image `{}` is present on the engine (nothing is pulled)",
                    self.options.helper_image
                ),
            });
        };
        let body = ContainerCreateBody {
            image: Some(image),
            entrypoint: Some(vec!["/bin/true".into()]),
            cmd: Some(Vec::new()),
            labels: Some(self.labels(task)),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                mounts: Some(vec![Self::workspace_mount(task)]),
                network_mode: Some("none".into()),
                cap_drop: Some(vec!["ALL".into()]),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        match self.docker.create_container(Some(options), body).await {
            Ok(_) => Ok(name),
            Err(e) if status(&e) == Some(409) => Ok(name),
            Err(e) => Err(setup_error("creating the workspace helper container", e)),
        }
    }

    /// Copies the attempt's local workspace directory into the volume.
    async fn upload_workspace(&self, task: &TaskContext) -> Result<(), ExecutorError> {
        let dir = task.workspace.clone();
        let has_files = std::fs::read_dir(&dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if !has_files {
            return Ok(());
        }
        let archive = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut builder = tar::Builder::new(Vec::new());
            builder.follow_symlinks(false);
            builder.append_dir_all(".", &dir)?;
            builder.into_inner()
        })
        .await
        .map_err(|e| ExecutorError::Setup {
            message: format!("archiving the workspace: {e}"),
        })?
        .map_err(|e| ExecutorError::Setup {
            message: format!("archiving the workspace: {e}"),
        })?;
        let helper = self.ensure_helper(task).await?;
        let options = UploadToContainerOptionsBuilder::new()
            .path(WORKSPACE)
            .build();
        self.docker
            .upload_to_container(
                &helper,
                Some(options),
                bollard::body_full(bytes::Bytes::from(archive)),
            )
            .await
            .map_err(|e| setup_error("copying the checkout into the workspace volume", e))
    }

    /// The limits of the task's step containers: the runner's defaults,
    /// overridden by the task's `resources`, and the runner's capabilities
    /// plus those the task asks for, each of which the runner must allow.
    fn limits(&self, task: &TaskContext) -> Result<StepLimits, String> {
        let o = &self.options;
        let mut cap_add = o.cap_add.clone();
        for cap in &task.task.capabilities {
            if !o.allow_cap.contains(cap) {
                return Err(format!(
                    "task `{}` asks for capability {cap}, which runner `{}` does not allow \
                     (its operator can allow it with --docker-allow-cap {cap})",
                    task.task_name, o.runner_name
                ));
            }
            if !cap_add.contains(cap) {
                cap_add.push(cap.clone());
            }
        }
        Ok(StepLimits {
            cap_add,
            memory_bytes: match task.task.memory_bytes {
                0 => o.memory_bytes,
                n => i64::try_from(n).ok(),
            },
            cpus: (task.task.cpus > 0.0).then_some(task.task.cpus).or(o.cpus),
        })
    }

    async fn run_container(
        &self,
        task: &TaskContext,
        ctx: &StepContext<'_>,
        image: &str,
        script: &str,
    ) -> Result<StepEnd, ExecutorError> {
        let index = ctx.index;
        if !self.image_present(image).await? {
            return Ok(StepEnd::Failed {
                message: format!(
                    "image `{image}` is not present on this runner's Docker Engine (nothing is pulled: build or load it first)"
                ),
            });
        }
        let name = step_container_name(task, index);
        let mut env = step_env(task, ctx.step);
        env.insert("CAPSTAN_WORKSPACE".into(), WORKSPACE.into());
        let limits = match self.limits(task) {
            Ok(l) => l,
            Err(message) => return Ok(StepEnd::Failed { message }),
        };
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            entrypoint: Some(vec!["/bin/sh".into(), "-ec".into()]),
            cmd: Some(vec![script.to_owned()]),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: Some(WORKSPACE.into()),
            labels: Some(self.labels(task)),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            open_stdin: Some(false),
            host_config: Some(HostConfig {
                init: Some(true),
                privileged: Some(false),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: (!limits.cap_add.is_empty()).then(|| limits.cap_add.clone()),
                security_opt: Some(vec!["no-new-privileges".into()]),
                mounts: Some(vec![Self::workspace_mount(task)]),
                network_mode: Some(self.network_mode(task)),
                memory: limits.memory_bytes,
                memory_swap: limits.memory_bytes,
                nano_cpus: limits.cpus.map(|c| (c * 1e9) as i64),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| api_error(index, "creating the step container", e))?;
        let attach = AttachContainerOptionsBuilder::new()
            .stream(true)
            .stdout(true)
            .stderr(true)
            .build();
        let mut output = self
            .docker
            .attach_container(&name, Some(attach))
            .await
            .map_err(|e| api_error(index, "attaching to the step container", e))?
            .output;
        self.docker
            .start_container(&name, None)
            .await
            .map_err(|e| api_error(index, "starting the step container", e))?;
        let pump = async {
            while let Some(item) = output.next().await {
                match item {
                    Ok(chunk) => {
                        ctx.output
                            .write(&chunk.into_bytes())
                            .await
                            .map_err(|source| ExecutorError::Output { index, source })?;
                    }
                    // The stream ends with an error when the container is
                    // removed under it; the wait below tells what happened.
                    Err(_) => break,
                }
            }
            Ok::<_, ExecutorError>(())
        };
        // Ok(Ok(exit code)) when the step ended, Ok(Err(end)) when stopped.
        let supervise = async {
            let stopped = tokio::select! {
                code = wait_exit(&self.docker, &name) => {
                    let code = code.map_err(|e| api_error(index, "waiting for the step container", e))?;
                    return Ok(Ok(code));
                }
                () = ctx.cancel.cancelled() => StepEnd::Cancelled,
                () = sleep_until_deadline(ctx.deadline) => StepEnd::TimedOut,
            };
            let stop = StopContainerOptionsBuilder::new()
                .t(STOP_GRACE_SECS)
                .build();
            match self.docker.stop_container(&name, Some(stop)).await {
                Ok(()) => {}
                Err(e) if matches!(status(&e), Some(304 | 404)) => {}
                Err(e) => return Err(api_error(index, "stopping the step container", e)),
            }
            Ok(Err(stopped))
        };
        let (pumped, ended) = tokio::join!(pump, supervise);
        pumped?;
        let code = match ended? {
            Ok(code) => code,
            Err(stopped) => return Ok(stopped),
        };
        let code = i32::try_from(code).unwrap_or(-1);
        if code != 0 && self.oom_killed(&name, code).await {
            return Ok(StepEnd::OutOfMemory { exit_code: code });
        }
        Ok(StepEnd::Exited(code))
    }

    /// Whether the step container `name`, which exited with `code`, was
    /// killed for memory (`State.OOMKilled`).
    ///
    /// containerd can report a container's exit before its OOM event
    /// (upstream now sends the OOM event first, containerd#12714, not yet in
    /// the engine these machines run), so just after the exit of a step the
    /// OOM killer stopped, the flag may still be false. A step that died of
    /// SIGKILL (137) is therefore asked about again, a few times, before it
    /// counts as a plain exit; any other code is asked once.
    ///
    /// Not covered: an OOM kill in the first milliseconds of a container,
    /// before containerd's shim watches its cgroup, is never reported
    /// (containerd#8180): such a step is a plain exit 137. Seen here with a
    /// step that allocated 128 MiB at once against a 16 MiB limit, about
    /// once in 12 runs.
    async fn oom_killed(&self, name: &str, code: i32) -> bool {
        const SIGKILLED: i32 = 128 + 9;
        for check in 0..=OOM_RECHECKS {
            if check > 0 {
                tokio::time::sleep(OOM_RECHECK_DELAY).await;
            }
            let oom = self
                .docker
                .inspect_container(name, None)
                .await
                .ok()
                .and_then(|c| c.state)
                .and_then(|s| s.oom_killed)
                .unwrap_or(false);
            if oom || code != SIGKILLED {
                return oom;
            }
        }
        false
    }

    pub(crate) fn secrets(&self) -> &Secrets {
        &self.secrets
    }
}

#[async_trait]
impl Executor for DockerExecutor {
    async fn setup_task(&self, task: &TaskContext) -> Result<(), ExecutorError> {
        let labels = self.labels(task);
        let name = object_name(task);
        let volume = VolumeCreateRequest {
            name: Some(name.clone()),
            labels: Some(labels.clone()),
            ..VolumeCreateRequest::default()
        };
        self.docker
            .create_volume(volume)
            .await
            .map_err(|e| setup_error("creating the workspace volume", e))?;
        if self.options.network == NetworkSetting::Internal {
            let network = NetworkCreateRequest {
                name: name.clone(),
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
        self.upload_workspace(task).await
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
        remove_container(&self.docker, &name)
            .await
            .map_err(|e| api_error(index, "removing the step container", e))
    }

    async fn destroy_task(&self, task: &TaskContext) -> Result<(), ExecutorError> {
        let filter = format!("{LABEL_ATTEMPT}={}", task.attempt_id);
        remove_labelled(&self.docker, &filter)
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
pub(crate) fn status(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Whether the engine could not be reached at all (as opposed to answering
/// with an error).
pub(crate) fn is_unreachable(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::HyperLegacyError { .. }
            | BollardError::IOError { .. }
            | BollardError::RequestTimeoutError
            | BollardError::SocketNotFoundError(_)
    )
}

pub(crate) fn api_error(index: u32, action: &str, e: BollardError) -> ExecutorError {
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

/// Waits for the container to exit and returns its exit code.
async fn wait_exit(docker: &Docker, name: &str) -> Result<i64, BollardError> {
    let mut wait = docker.wait_container(name, None);
    match wait.next().await {
        Some(Ok(r)) => Ok(r.status_code),
        // bollard reports a non-zero exit as an error; it is a normal end.
        Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(e)) => Err(e),
        None => Err(BollardError::DockerContainerWaitError {
            error: "the wait stream ended without an exit code".into(),
            code: -1,
        }),
    }
}

async fn remove_container(docker: &Docker, name: &str) -> Result<(), BollardError> {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(name, Some(options)).await {
        Ok(()) => Ok(()),
        Err(e) if matches!(status(&e), Some(404 | 409)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes containers, then volumes, then networks matching a label filter.
pub async fn remove_labelled(docker: &Docker, label_filter: &str) -> Result<usize, DockerError> {
    let api = |action: &str| {
        let action = action.to_owned();
        move |source| DockerError::Api { action, source }
    };
    let filters: HashMap<String, Vec<String>> =
        HashMap::from([("label".to_owned(), vec![label_filter.to_owned()])]);
    let mut removed = 0;
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .map_err(api("listing containers"))?;
    for c in containers {
        if let Some(id) = c.id {
            remove_container(docker, &id)
                .await
                .map_err(api("removing a container"))?;
            removed += 1;
        }
    }
    let volumes = docker
        .list_volumes(Some(
            ListVolumesOptionsBuilder::new().filters(&filters).build(),
        ))
        .await
        .map_err(api("listing volumes"))?;
    for v in volumes.volumes.unwrap_or_default() {
        let options = RemoveVolumeOptionsBuilder::new().force(true).build();
        match docker.remove_volume(&v.name, Some(options)).await {
            Ok(()) => removed += 1,
            Err(e) if status(&e) == Some(404) => {}
            Err(e) => return Err(api("removing a volume")(e)),
        }
    }
    let networks = docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::new().filters(&filters).build(),
        ))
        .await
        .map_err(api("listing networks"))?;
    for n in networks {
        if let Some(id) = n.id {
            match docker.remove_network(&id).await {
                Ok(()) => removed += 1,
                Err(e) if status(&e) == Some(404) => {}
                Err(e) => return Err(api("removing a network")(e)),
            }
        }
    }
    Ok(removed)
}

/// A stable key for a runner installation: FNV-1a of its name and work dir.
pub fn runner_key(name: &str, work_dir: &std::path::Path) -> String {
    let dir = work_dir
        .canonicalize()
        .unwrap_or_else(|_| work_dir.to_owned());
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name
        .bytes()
        .chain([0u8])
        .chain(dir.display().to_string().bytes())
    {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}
