//! What the registry already holds. `build` and `push` skip an image the
//! registry has under the same reference (`skip-if-exists`, the default),
//! so a commit's `:<sha>` tag keeps the digest its first run pushed, and a
//! rerun changes nothing a restarted pod would pull. Asked through the
//! engine's distribution endpoint (the engine reaches the registry for
//! pushes anyway), with the login of a runner secret.

use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use capstan_manifest::image_ref::{registry_host, split_reference};

use super::{DockerExecutor, Stop, log};
use crate::step::StepContext;

impl DockerExecutor {
    /// The registry login in the secret `name` (none if empty), for
    /// `registry`.
    pub(super) fn registry_login(
        &self,
        name: &str,
        registry: &str,
    ) -> Result<Option<DockerCredentials>, Stop> {
        if name.is_empty() {
            return Ok(None);
        }
        let secret = self
            .secrets()
            .get(name)
            .map_err(|e| Stop::Failed(e.to_string()))?;
        let Some((username, password)) = secret.login() else {
            return Err(Stop::Failed(format!(
                "secret `{name}` is an SSH key; a registry needs {{ username, password }} or a token"
            )));
        };
        Ok(Some(DockerCredentials {
            username: Some(username),
            password: Some(password),
            serveraddress: Some(registry.to_owned()),
            ..DockerCredentials::default()
        }))
    }

    /// The digest of `image` if its registry already has it, asked with
    /// the secret `credentials`; says so in the step's log either way.
    /// `verb` is what is skipped ("build", "push"). A registry that cannot
    /// say (unreachable, refusing the login) counts as not having it: the
    /// step goes on, and a push then fails with the registry's reason.
    pub(super) async fn already_pushed(
        &self,
        ctx: &StepContext<'_>,
        image: &str,
        credentials: &str,
        verb: &str,
    ) -> Result<Option<String>, Stop> {
        let (repository, _) = split_reference(image);
        let registry = registry_host(repository).unwrap_or("docker.io");
        let login = self.registry_login(credentials, registry)?;
        let found = self.docker().inspect_registry_image(image, login).await;
        let digest = match found {
            Ok(d) => d.descriptor.digest.filter(|d| !d.is_empty()),
            Err(e) if super::is_unreachable(&e) => {
                return Err(super::api_error(ctx.index, "asking the registry", e).into());
            }
            Err(e) => {
                let why = match e {
                    BollardError::DockerResponseServerError { message, .. } => message,
                    e => e.to_string(),
                };
                log(
                    ctx,
                    &format!("{image} is not in {registry} yet ({why}): {verb}ing\n"),
                )
                .await?;
                return Ok(None);
            }
        };
        if let Some(digest) = &digest {
            log(
                ctx,
                &format!(
                    "{image} is already in {registry} as {digest}: {verb} skipped \
                     (skip-if-exists; `skip-if-exists: false` would {verb} again)\n"
                ),
            )
            .await?;
        }
        Ok(digest)
    }
}
