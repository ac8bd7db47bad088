//! Removing what the docker executor made: one step's container, one
//! attempt's objects ([`remove_labelled`]), and at start whatever a previous
//! process of the same runner left behind ([`DockerExecutor::reap`]), found
//! by the runner's key ([`runner_key`], [`LABEL_RUNNER_KEY`]).

use std::collections::HashMap;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, ListVolumesOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder,
};

use super::{DockerError, DockerExecutor, LABEL_RUNNER_KEY, status};

impl DockerExecutor {
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
}

/// Removes a container (and its anonymous volumes), running or not; one
/// that is gone already, or being removed, is no error.
pub(super) async fn remove_container(docker: &Docker, name: &str) -> Result<(), BollardError> {
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
pub(super) async fn remove_labelled(
    docker: &Docker,
    label_filter: &str,
) -> Result<usize, DockerError> {
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
pub(crate) fn runner_key(name: &str, work_dir: &std::path::Path) -> String {
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
