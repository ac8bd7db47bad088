//! A task's service containers (`services:`): one container per service on
//! the task's network, reachable from every step by the service's name,
//! started in setup before the first step and probed with its `ready`
//! command until that exits 0; after the steps, each service's output goes
//! into the task's log as its own section. Removal is the attempt's
//! ([`super::reap`]: service containers carry the attempt's labels).
//!
//! Services drop every capability but [`SERVICE_CAPS`] (steps keep none
//! but the operator's): database images chown their data dir and drop to
//! their own user at start. They never get the workspace, the Docker
//! socket, privileges or a route out (the task's network is `internal`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, NetworkConnectRequest, NetworkingConfig,
};
use bollard::query_parameters::{CreateContainerOptionsBuilder, LogsOptionsBuilder};
use capstan_proto::pipeline::v1::Service;
use futures::StreamExt as _;
use tokio::time::Instant;

use super::pull::Progress;
use super::{DockerExecutor, NetworkSetting, Stop, object_name, setup_error};
use crate::executor::ExecutorError;
use crate::logs::sink::OutputSink;
use crate::step::TaskContext;

/// How long `ready` may take when the service does not say.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two `ready` probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How much of a failed probe's output its service's log section keeps.
const QUOTED_BYTES: usize = 2048;
const LABEL_SERVICE: &str = "capstan.service";
/// What a service keeps of the capabilities: what database images need
/// to chown their data and drop to their own user at start.
const SERVICE_CAPS: &[&str] = &["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"];

/// Lines about getting a service's image, kept for its log section.
#[derive(Default)]
pub(super) struct Notes(Mutex<Vec<String>>);

impl Progress for Notes {
    async fn line(&self, text: &str) -> Result<(), ExecutorError> {
        if let Ok(mut lines) = self.0.lock() {
            lines.push(text.to_owned());
        }
        Ok(())
    }
}

/// `capstan-<attempt>-svc-<name>`.
fn container_name(task: &TaskContext, service: &str) -> String {
    format!("{}-svc-{service}", object_name(task))
}

impl DockerExecutor {
    /// The task's own network, when it needs one: with `--docker-network
    /// internal`, and for the services of a task under any setting.
    pub(super) fn task_network(&self, task: &TaskContext) -> Option<String> {
        let wanted = self.options.settings.network == NetworkSetting::Internal
            || !task.task.services.is_empty();
        wanted.then(|| object_name(task))
    }

    /// Starts every service of the task and waits until each is ready; an
    /// error (outcome ERROR) names the service and says why.
    pub(super) async fn start_services(&self, task: &TaskContext) -> Result<(), ExecutorError> {
        for service in &task.task.services {
            let notes = Notes::default();
            let started = self.start_service(task, service, &notes).await;
            let lines = notes.0.into_inner().unwrap_or_default();
            if let Ok(mut kept) = self.service_notes.lock() {
                kept.insert(container_name(task, &service.name), lines);
            }
            started?;
            self.wait_ready(task, service).await?;
        }
        Ok(())
    }

    async fn start_service(
        &self,
        task: &TaskContext,
        service: &Service,
        notes: &Notes,
    ) -> Result<(), ExecutorError> {
        let what = format!("service `{}`", service.name);
        let failed = |message: String| ExecutorError::Setup {
            message: format!("{what}: {message}"),
        };
        match self.ensure_image(task, notes, &service.image).await {
            Ok(_) => {}
            Err(Stop::Failed(message)) => return Err(failed(message)),
            Err(Stop::Error(e)) => return Err(e),
        }
        let name = container_name(task, &service.name);
        let body = self.service_container(task, service);
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        self.docker()
            .create_container(Some(options), body)
            .await
            .map_err(|e| setup_error(&format!("creating the container of {what}"), e))?;
        self.docker()
            .start_container(&name, None)
            .await
            .map_err(|e| setup_error(&format!("starting {what}"), e))
    }

    fn service_container(&self, task: &TaskContext, service: &Service) -> ContainerCreateBody {
        let network = object_name(task);
        let mut labels = self.labels(task);
        labels.insert(LABEL_SERVICE.into(), service.name.clone());
        let (memory, cpus) = self.resources(task);
        ContainerCreateBody {
            image: Some(service.image.clone()),
            cmd: (!service.command.is_empty()).then(|| service.command.clone()),
            env: Some(
                service
                    .env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            hostname: Some(service.name.clone()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                init: Some(true),
                privileged: Some(false),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(SERVICE_CAPS.iter().map(|c| (*c).to_owned()).collect()),
                security_opt: Some(vec!["no-new-privileges".into()]),
                network_mode: Some(network.clone()),
                memory,
                memory_swap: memory,
                nano_cpus: cpus.map(|c| (c * 1e9) as i64),
                ..HostConfig::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    network,
                    EndpointSettings {
                        aliases: Some(vec![service.name.clone()]),
                        ..EndpointSettings::default()
                    },
                )])),
            }),
            ..ContainerCreateBody::default()
        }
    }

    /// Runs the service's `ready` command in it until it exits 0, the
    /// service dies, or the timeout passes. Without `ready`, the service
    /// only has to be running. Errors name the service and say why, but
    /// quote nothing it or the probe printed: that goes to the service's
    /// section of the task's log, which is masked (the error message is
    /// not).
    async fn wait_ready(&self, task: &TaskContext, service: &Service) -> Result<(), ExecutorError> {
        let name = container_name(task, &service.name);
        let timeout = match service.ready_timeout_seconds {
            0 => DEFAULT_READY_TIMEOUT,
            s => Duration::from_secs(s),
        };
        let deadline = Instant::now() + timeout;
        let failed = |why: String| ExecutorError::Setup {
            message: format!(
                "service `{}` {why} (its output is in the task's log, under `--- service {}`)",
                service.name, service.name
            ),
        };
        let cancelled = || failed("was being probed when the attempt was cancelled".into());
        // What the last probe that finished said, for the error and the
        // log, even when the deadline cuts a later probe short.
        let mut last: Option<(i64, String)> = None;
        loop {
            if let Some(code) = self.exited(&name).await? {
                return Err(failed(format!(
                    "exited with code {code} before it was ready"
                )));
            }
            if service.ready.is_empty() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let probe = tokio::select! {
                p = tokio::time::timeout(left, self.probe(&name, &service.ready)) => p,
                () = task.cancel.cancelled() => return Err(cancelled()),
            };
            match probe {
                // Ready, unless it died just after (`exec` can win a race
                // against a service's exit).
                Ok(Ok((0, _))) if self.exited(&name).await?.is_none() => return Ok(()),
                Ok(Ok((0, _))) => continue,
                Ok(Ok(result)) => last = Some(result),
                // It died between the check and the probe: the check
                // above says so on the next round.
                Ok(Err(_)) if self.exited(&name).await?.is_some() => continue,
                Ok(Err(e)) => return Err(setup_error("probing the service", e)),
                Err(_) => {}
            }
            if Instant::now() + PROBE_INTERVAL >= deadline {
                let said = match last {
                    Some((code, output)) => {
                        self.note(
                            task,
                            service,
                            &format!("`ready` last exited {code}{}", quoted(&output)),
                        );
                        format!("last exited {code}")
                    }
                    None => "did not finish in time".to_owned(),
                };
                return Err(failed(format!(
                    "was not ready within {}s: `ready` ({}) {said}; raise `ready-timeout` if it needs longer",
                    timeout.as_secs(),
                    service.ready
                )));
            }
            tokio::select! {
                () = tokio::time::sleep(PROBE_INTERVAL) => {}
                () = task.cancel.cancelled() => return Err(cancelled()),
            }
        }
    }

    /// Adds a line to the service's log section.
    fn note(&self, task: &TaskContext, service: &Service, line: &str) {
        if let Ok(mut notes) = self.service_notes.lock() {
            notes
                .entry(container_name(task, &service.name))
                .or_default()
                .push(line.to_owned());
        }
    }

    /// The exit code of the container if it is no longer running.
    async fn exited(&self, name: &str) -> Result<Option<i64>, ExecutorError> {
        let state = self
            .docker()
            .inspect_container(name, None)
            .await
            .map_err(|e| setup_error("inspecting the service", e))?
            .state
            .unwrap_or_default();
        Ok((!state.running.unwrap_or(false)).then(|| state.exit_code.unwrap_or(-1)))
    }

    /// Runs `command` with `/bin/sh -c` in the container: its exit code and
    /// the start of its output.
    async fn probe(&self, name: &str, command: &str) -> Result<(i64, String), BollardError> {
        let exec = self
            .docker()
            .create_exec(
                name,
                CreateExecOptions {
                    cmd: Some(vec!["/bin/sh", "-c", command]),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..CreateExecOptions::default()
                },
            )
            .await?;
        let mut output = Vec::new();
        if let StartExecResults::Attached {
            output: mut stream, ..
        } = self.docker().start_exec(&exec.id, None).await?
        {
            while let Some(Ok(chunk)) = stream.next().await {
                let bytes = chunk.into_bytes();
                let room = QUOTED_BYTES.saturating_sub(output.len());
                output.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
        }
        let code = self
            .docker()
            .inspect_exec(&exec.id)
            .await?
            .exit_code
            .unwrap_or(-1);
        Ok((code, String::from_utf8_lossy(&output).into_owned()))
    }

    /// A step container on a named network also joins the task's network,
    /// where its services are (the engine takes one network at create).
    pub(super) async fn join_services_network(
        &self,
        task: &TaskContext,
        container: &str,
    ) -> Result<(), BollardError> {
        if task.task.services.is_empty()
            || !matches!(self.options.settings.network, NetworkSetting::Named(_))
        {
            return Ok(());
        }
        let request = NetworkConnectRequest {
            container: container.to_owned(),
            endpoint_config: None,
        };
        self.docker()
            .connect_network(&object_name(task), request)
            .await
    }

    /// Writes each service's section into `out`: a heading, how its image
    /// was got, and everything it printed so far, streamed.
    pub(super) async fn write_service_sections(
        &self,
        task: &TaskContext,
        out: &dyn OutputSink,
    ) -> std::io::Result<()> {
        for service in &task.task.services {
            let name = container_name(task, &service.name);
            let notes = self
                .service_notes
                .lock()
                .ok()
                .and_then(|mut n| n.remove(&name))
                .unwrap_or_default();
            let mut head = format!("\n--- service {} ({}) ---\n", service.name, service.image);
            for line in notes {
                head.push_str(&line);
                head.push('\n');
            }
            out.write(head.as_bytes()).await?;
            let options = LogsOptionsBuilder::new().stdout(true).stderr(true).build();
            let mut stream = self.docker().logs(&name, Some(options));
            // A service that was never created has no logs: its heading
            // and notes say what happened.
            while let Some(Ok(chunk)) = stream.next().await {
                out.write(&chunk.into_bytes()).await?;
            }
        }
        Ok(())
    }

    /// Forgets the notes of an attempt's services (after its teardown).
    pub(super) fn forget_service_notes(&self, task: &TaskContext) {
        if let Ok(mut notes) = self.service_notes.lock() {
            for service in &task.task.services {
                notes.remove(&container_name(task, &service.name));
            }
        }
    }
}

/// `: <output>` of a failed probe, or nothing.
fn quoted(output: &str) -> String {
    let output = output.trim();
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}
