//! One `run` step in its own container: the container's isolation and
//! limits, its output streamed into the step's sink, its stop on cancel or
//! timeout, and how it ended (exit code, or killed for memory).

use std::pin::Pin;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures::{Stream, StreamExt as _};

use super::pull::StepProgress;
use super::{DockerExecutor, Stop, WORKSPACE, api_error, status, step_container_name};
use crate::executor::{ExecutorError, step_env};
use crate::step::{OUTPUT_FILE, StepContext, StepEnd, TaskContext, sleep_until_deadline};

/// Seconds between SIGTERM and SIGKILL when a step container is stopped;
/// with the engine's own latency a stop completes within 2 s.
pub(super) const STOP_GRACE_SECS: i32 = 1;
/// How often, and how far apart, a step that died of SIGKILL is asked again
/// whether the OOM killer did it ([`DockerExecutor::oom_killed`]): up to
/// 200 ms in all, paid only by steps that exit 137 without the flag.
const OOM_RECHECKS: u32 = 10;
const OOM_RECHECK_DELAY: Duration = Duration::from_millis(20);

/// What one task's step containers get.
struct StepLimits {
    cap_add: Vec<String>,
    memory_bytes: Option<i64>,
    cpus: Option<f64>,
}

/// A step container's stdout and stderr, as the engine streams them.
type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, BollardError>> + Send>>;

impl DockerExecutor {
    /// The limits of the task's step containers: the runner's defaults,
    /// overridden by the task's `resources`, and the runner's capabilities
    /// plus those the task asks for, each of which the runner must allow.
    fn limits(&self, task: &TaskContext) -> Result<StepLimits, String> {
        let o = &self.options.settings;
        let mut cap_add = o.cap_add.clone();
        for cap in &task.task.capabilities {
            if !o.allow_cap.contains(cap) {
                return Err(format!(
                    "task `{}` asks for capability {cap}, which runner `{}` does not allow \
                     (its operator can allow it with --docker-allow-cap {cap})",
                    task.task_name, self.options.runner_name
                ));
            }
            if !cap_add.contains(cap) {
                cap_add.push(cap.clone());
            }
        }
        let (memory_bytes, cpus) = self.resources(task);
        Ok(StepLimits {
            cap_add,
            memory_bytes,
            cpus,
        })
    }

    /// Runs `script` in `image` as the step `ctx` (see the module docs).
    pub(super) async fn run_container(
        &self,
        task: &TaskContext,
        ctx: &StepContext<'_>,
        image: &str,
        script: &str,
    ) -> Result<StepEnd, ExecutorError> {
        let index = ctx.index;
        // A pull can hang on a registry: the step's cancel and deadline
        // bound it like the step itself.
        let progress = StepProgress(ctx);
        let got = tokio::select! {
            got = self.ensure_image(task, &progress, image) => got,
            () = ctx.cancel.cancelled() => return Ok(StepEnd::Cancelled),
            () = sleep_until_deadline(ctx.deadline) => return Ok(StepEnd::TimedOut),
        };
        // The container is made from the image that was inspected, so a
        // tag moved meanwhile (another attempt's `pull: always`) does not
        // make the recorded digest a lie.
        let image = match got {
            Ok(resolved) => {
                task.set_output(&format!("steps.{}.image", index + 1), &resolved.digest);
                resolved.id
            }
            Err(Stop::Failed(message)) => return Ok(StepEnd::Failed { message }),
            Err(Stop::Error(e)) => return Err(e),
        };
        let image = image.as_str();
        let name = step_container_name(task, index);
        let body = match self.limits(task) {
            Ok(limits) => self.step_container(task, ctx, image, script, &limits),
            Err(message) => return Ok(StepEnd::Failed { message }),
        };
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let starting = tokio::time::Instant::now();
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| api_error(index, "creating the step container", e))?;
        self.join_services_network(task, &name)
            .await
            .map_err(|e| api_error(index, "connecting the step to the services' network", e))?;
        let output = self.attach_and_start(&name, index).await?;
        crate::metrics::get()
            .container_start_seconds
            .observe(starting.elapsed().as_secs_f64());
        let (pumped, ended) = tokio::join!(pump(output, ctx), self.supervise(&name, ctx));
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

    /// The step's container: `/bin/sh -ec SCRIPT` in the workspace, `init`
    /// on, never privileged, every capability dropped but the allowed ones,
    /// `no-new-privileges`, the limits (no swap on top).
    fn step_container(
        &self,
        task: &TaskContext,
        ctx: &StepContext<'_>,
        image: &str,
        script: &str,
        limits: &StepLimits,
    ) -> ContainerCreateBody {
        let mut env = step_env(task, ctx.step);
        env.insert("CAPSTAN_WORKSPACE".into(), WORKSPACE.into());
        env.insert(
            "CAPSTAN_OUTPUT".into(),
            format!("{WORKSPACE}/{OUTPUT_FILE}"),
        );
        ContainerCreateBody {
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
        }
    }

    /// Attaches to the created container's output, then starts it, so no
    /// output is missed.
    async fn attach_and_start(&self, name: &str, index: u32) -> Result<Output, ExecutorError> {
        let attach = AttachContainerOptionsBuilder::new()
            .stream(true)
            .stdout(true)
            .stderr(true)
            .build();
        let output = self
            .docker
            .attach_container(name, Some(attach))
            .await
            .map_err(|e| api_error(index, "attaching to the step container", e))?
            .output;
        self.docker
            .start_container(name, None)
            .await
            .map_err(|e| api_error(index, "starting the step container", e))?;
        Ok(output)
    }

    /// Waits for the container's exit, or stops it on cancel or at the
    /// deadline: `Ok(Ok(exit code))` when the step ended, `Ok(Err(end))`
    /// when it was stopped.
    async fn supervise(
        &self,
        name: &str,
        ctx: &StepContext<'_>,
    ) -> Result<Result<i64, StepEnd>, ExecutorError> {
        let index = ctx.index;
        let stopped = tokio::select! {
            code = wait_exit(&self.docker, name) => {
                let code = code.map_err(|e| api_error(index, "waiting for the step container", e))?;
                return Ok(Ok(code));
            }
            () = ctx.cancel.cancelled() => StepEnd::Cancelled,
            () = sleep_until_deadline(ctx.deadline) => StepEnd::TimedOut,
        };
        let stop = StopContainerOptionsBuilder::new()
            .t(STOP_GRACE_SECS)
            .build();
        match self.docker.stop_container(name, Some(stop)).await {
            Ok(()) => {}
            Err(e) if matches!(status(&e), Some(304 | 404)) => {}
            Err(e) => return Err(api_error(index, "stopping the step container", e)),
        }
        Ok(Err(stopped))
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
    /// (containerd#8180): such a step is a plain exit 137.
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
}

/// Writes the container's output into the step's sink until the stream
/// ends.
async fn pump(mut output: Output, ctx: &StepContext<'_>) -> Result<(), ExecutorError> {
    let index = ctx.index;
    while let Some(item) = output.next().await {
        match item {
            Ok(chunk) => {
                ctx.output
                    .write(&chunk.into_bytes())
                    .await
                    .map_err(|source| ExecutorError::Output { index, source })?;
            }
            // The stream ends with an error when the container is
            // removed under it; the wait tells what happened.
            Err(_) => break,
        }
    }
    Ok(())
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
