//! The task's workspace volume, mounted at [`WORKSPACE`] in every step: its
//! creation, the never-started helper container that mounts it so files can
//! be copied in and out through the API (no bind mount of a runner path, so
//! it works when the runner itself runs in a container), and the copy of
//! the attempt's local workspace (the checkout) into it.

use std::collections::HashMap;
use std::io::Read as _;

use futures::StreamExt as _;

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use capstan_proto::pipeline::v1::step;

use super::{DockerExecutor, WORKSPACE, object_name, setup_error, status};
use crate::executor::ExecutorError;
use crate::step::{MAX_OUTPUT_BYTES, OUTPUT_FILE, TaskContext};

impl DockerExecutor {
    /// Creates the task's workspace volume, `capstan-<attempt>`.
    pub(super) async fn create_workspace(
        &self,
        task: &TaskContext,
        labels: HashMap<String, String>,
    ) -> Result<(), ExecutorError> {
        let volume = VolumeCreateRequest {
            name: Some(object_name(task)),
            labels: Some(labels),
            ..VolumeCreateRequest::default()
        };
        self.docker
            .create_volume(volume)
            .await
            .map(|_| ())
            .map_err(|e| setup_error("creating the workspace volume", e))
    }

    /// The workspace volume's mount in a container.
    pub(super) fn workspace_mount(task: &TaskContext) -> Mount {
        Mount {
            target: Some(WORKSPACE.into()),
            source: Some(object_name(task)),
            typ: Some(MountType::VOLUME),
            ..Mount::default()
        }
    }

    /// The never-started container that mounts the workspace volume, for
    /// copying files in and out. Created on first use.
    pub(super) async fn ensure_helper(&self, task: &TaskContext) -> Result<String, ExecutorError> {
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
            self.options.settings.helper_image.clone(),
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
                    self.options.settings.helper_image
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
    pub(super) async fn upload_workspace(&self, task: &TaskContext) -> Result<(), ExecutorError> {
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

    /// The start (at most [`MAX_OUTPUT_BYTES`] and one byte, which tells a
    /// file over the limit) of the task's `$CAPSTAN_OUTPUT` file in the
    /// volume, if a step wrote one.
    pub(super) async fn read_output(
        &self,
        task: &TaskContext,
    ) -> Result<Option<Vec<u8>>, ExecutorError> {
        let helper = self.ensure_helper(task).await?;
        let options = DownloadFromContainerOptionsBuilder::new()
            .path(&format!("{WORKSPACE}/{OUTPUT_FILE}"))
            .build();
        let mut download = self.docker.download_from_container(&helper, Some(options));
        // The tar header and the part of the file that is read.
        let enough = MAX_OUTPUT_BYTES + 4096;
        let mut archive = Vec::new();
        while let Some(chunk) = download.next().await {
            match chunk {
                Ok(bytes) => archive.extend_from_slice(&bytes),
                Err(e) if status(&e) == Some(404) => return Ok(None),
                Err(e) => return Err(setup_error("reading $CAPSTAN_OUTPUT", e)),
            }
            if archive.len() >= enough {
                break;
            }
        }
        let unreadable = |e: std::io::Error| ExecutorError::Setup {
            message: format!("reading $CAPSTAN_OUTPUT out of the workspace: {e}"),
        };
        let mut tar = tar::Archive::new(archive.as_slice());
        let mut entries = tar.entries().map_err(unreadable)?;
        let Some(entry) = entries.next() else {
            return Ok(None);
        };
        let mut text = Vec::new();
        entry
            .map_err(unreadable)?
            .take(MAX_OUTPUT_BYTES as u64 + 1)
            .read_to_end(&mut text)
            .map_err(unreadable)?;
        Ok(Some(text))
    }
}
