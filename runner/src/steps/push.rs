//! The `push` step: push a local image to its registry with credentials from
//! a runner secret, and record the pushed digest on the task (`image`,
//! `digest` outputs).

use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::PushImageOptionsBuilder;
use capstan_shared::proto::pipeline::v1::PushStep;
use futures::StreamExt as _;

use crate::executor::ExecutorError;
use crate::executor::docker::{DockerExecutor, api_error};
use crate::image_ref::{registry_host, split_reference};
use crate::step::{StepContext, StepEnd, TaskContext};

fn failed(message: impl Into<String>) -> Result<StepEnd, ExecutorError> {
    Ok(StepEnd::Failed {
        message: message.into(),
    })
}

pub async fn run(
    ex: &DockerExecutor,
    task: &TaskContext,
    ctx: &StepContext<'_>,
    push: &PushStep,
) -> Result<StepEnd, ExecutorError> {
    let index = ctx.index;
    let image = push.image.as_str();
    if image.is_empty() {
        return failed("push needs an `image`");
    }
    let (repository, tag) = split_reference(image);
    let registry = registry_host(repository).unwrap_or("docker.io");
    let credentials = if push.credentials.is_empty() {
        None
    } else {
        match ex.secrets().get(&push.credentials) {
            Ok(secret) => {
                let Some((username, password)) = secret.login() else {
                    return failed(format!(
                        "secret `{}` is an SSH key; a registry needs {{ username, password }} or a token",
                        push.credentials
                    ));
                };
                Some(DockerCredentials {
                    username: Some(username),
                    password: Some(password),
                    serveraddress: Some(registry.to_owned()),
                    ..DockerCredentials::default()
                })
            }
            Err(e) => return failed(e.to_string()),
        }
    };
    if !ex.image_present(image).await? {
        return failed(format!(
            "image `{image}` is not present on this runner's Docker Engine: build it in an earlier step of this task"
        ));
    }
    log(ctx, &format!("pushing {image} to {registry}\n")).await?;
    let options = PushImageOptionsBuilder::new().tag(tag).build();
    let mut stream = ex
        .docker()
        .push_image(repository, Some(options), credentials);
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
                return failed(explain(image, registry, &push.credentials, &error));
            }
            Err(BollardError::DockerResponseServerError { message, .. }) => {
                log(ctx, &format!("error: {message}\n")).await?;
                return failed(explain(image, registry, &push.credentials, &message));
            }
            Err(e) => return Err(api_error(index, "pushing the image", e)),
        }
    }
    let Some(digest) = digest else {
        return failed(format!(
            "push of {image} ended without the registry reporting a digest"
        ));
    };
    log(ctx, &format!("pushed {image}@{digest}\n")).await?;
    task.set_output("image", image);
    task.set_output("digest", &digest);
    Ok(StepEnd::Exited(0))
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

async fn log(ctx: &StepContext<'_>, text: &str) -> Result<(), ExecutorError> {
    ctx.output
        .write(text.as_bytes())
        .await
        .map_err(|source| ExecutorError::Output {
            index: ctx.index,
            source,
        })
}
