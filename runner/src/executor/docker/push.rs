//! The `push` step: push a local image to its registry with credentials from
//! a runner secret, and record the pushed digest on the task (`image`,
//! `digest` outputs). An image the registry already has is not pushed again
//! (`skip-if-exists`, `registry.rs`); its digest is recorded instead.

use bollard::errors::Error as BollardError;
use bollard::models::PushImageInfo;
use bollard::query_parameters::PushImageOptionsBuilder;
use capstan_proto::pipeline::v1::PushStep;
use futures::{Stream, StreamExt as _};

use super::{DockerExecutor, Stop, api_error, log, step_end};
use crate::executor::ExecutorError;
use crate::step::{StepContext, StepEnd, TaskContext};
use capstan_manifest::image_ref::{registry_host, split_reference};

/// Runs the `push` step (see the module docs).
pub(super) async fn run(
    ex: &DockerExecutor,
    task: &TaskContext,
    ctx: &StepContext<'_>,
    push: &PushStep,
) -> Result<StepEnd, ExecutorError> {
    step_end(push_image(ex, task, ctx, push).await)
}

async fn push_image(
    ex: &DockerExecutor,
    task: &TaskContext,
    ctx: &StepContext<'_>,
    push: &PushStep,
) -> Result<(), Stop> {
    let image = push.image.as_str();
    if image.is_empty() {
        return Err(Stop::Failed("push needs an `image`".into()));
    }
    if !push.force
        && let Some(digest) = ex
            .already_pushed(ctx, image, &push.credentials, "push")
            .await?
    {
        task.set_output("image", image);
        task.set_output("digest", &digest);
        return Ok(());
    }
    let (repository, tag) = split_reference(image);
    let registry = registry_host(repository).unwrap_or("docker.io");
    let credentials = ex.registry_login(&push.credentials, registry)?;
    if !ex.image_present(image).await? {
        return Err(Stop::Failed(format!(
            "image `{image}` is not present on this runner's Docker Engine: build it in an earlier step of this task"
        )));
    }
    log(ctx, &format!("pushing {image} to {registry}\n")).await?;
    let options = PushImageOptionsBuilder::new().tag(tag).build();
    let stream = ex
        .docker()
        .push_image(repository, Some(options), credentials);
    let digest = stream_push(ctx, push, registry, stream).await?;
    log(ctx, &format!("pushed {image}@{digest}\n")).await?;
    task.set_output("image", image);
    task.set_output("digest", &digest);
    Ok(())
}

/// Follows the engine's push progress into the step's log (without the
/// byte-level lines) and returns the digest the registry reported.
async fn stream_push(
    ctx: &StepContext<'_>,
    push: &PushStep,
    registry: &str,
    mut stream: impl Stream<Item = Result<PushImageInfo, BollardError>> + Unpin,
) -> Result<String, Stop> {
    let image = push.image.as_str();
    let mut digest = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                let Some(status) = info.status else { continue };
                // Byte-level progress lines are noise in a CI log.
                if matches!(status.as_str(), "Pushing" | "Waiting" | "Preparing") {
                    continue;
                }
                if let Some(d) = status
                    .split_whitespace()
                    .skip_while(|w| *w != "digest:")
                    .nth(1)
                {
                    digest = Some(d.to_owned());
                }
                log(ctx, &format!("{status}\n")).await?;
            }
            Err(BollardError::DockerStreamError { error }) => {
                log(ctx, &format!("error: {error}\n")).await?;
                return Err(Stop::Failed(explain(
                    image,
                    registry,
                    &push.credentials,
                    &error,
                )));
            }
            Err(BollardError::DockerResponseServerError { message, .. }) => {
                log(ctx, &format!("error: {message}\n")).await?;
                return Err(Stop::Failed(explain(
                    image,
                    registry,
                    &push.credentials,
                    &message,
                )));
            }
            Err(e) => return Err(api_error(ctx.index, "pushing the image", e).into()),
        }
    }
    digest.ok_or_else(|| {
        Stop::Failed(format!(
            "push of {image} ended without the registry reporting a digest"
        ))
    })
}

/// A clear message for a failed push. The engine reports registry failures
/// only as text, so this reads the text.
fn explain(image: &str, registry: &str, credentials: &str, error: &str) -> String {
    let lower = error.to_ascii_lowercase();
    if lower.contains("unauthorized")
        || lower.contains("authentication required")
        || lower.contains("no basic auth credentials")
        || lower.contains("incorrect username or password")
    {
        if credentials.is_empty() {
            format!(
                "registry {registry} requires credentials: name a secret with `credentials:` ({error})"
            )
        } else {
            format!(
                "registry {registry} rejected the credentials of secret `{credentials}`: wrong username or password ({error})"
            )
        }
    } else if lower.contains("connection refused")
        || lower.contains("dial tcp")
        || lower.contains("no such host")
        || lower.contains("i/o timeout")
        || lower.contains("no route to host")
    {
        format!("registry {registry} is unreachable: {error}")
    } else {
        format!("push of {image} rejected by {registry}: {error}")
    }
}
