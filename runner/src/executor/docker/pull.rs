//! Getting an image onto the engine before a container or a build uses
//! it: the runner's `--docker-allowed-images` ([`AllowedImages`]), the pull
//! policy (the task's `pull:` over the runner's `--docker-pull`,
//! [`PullPolicy`]), the registry login to pull with (the task's
//! `pull-credentials:` secret, else the runner's
//! `--docker-pull-credentials` entry for the image's registry), the pull
//! itself with its progress in the log, and the digest the image resolved
//! to.

use std::collections::BTreeMap;
use std::fmt;

use bollard::errors::Error as BollardError;
use bollard::models::ImageInspect;
use bollard::query_parameters::CreateImageOptionsBuilder;
use capstan_manifest::image_ref::{ImageRef, registry_host, split_reference};
use futures::StreamExt as _;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::{DockerExecutor, Stop, api_error, status};
use crate::executor::ExecutorError;
use crate::step::{StepContext, TaskContext};

/// When an image is pulled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Before every use, so a moved tag is seen.
    Always,
    /// Only when the engine does not have it.
    #[default]
    IfNotPresent,
    /// Never: a missing image fails the step.
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::IfNotPresent => "if-not-present",
            Self::Never => "never",
        }
    }
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Self::Always),
            "if-not-present" => Ok(Self::IfNotPresent),
            "never" => Ok(Self::Never),
            other => Err(format!(
                "unknown pull policy `{other}`: use always, if-not-present or never"
            )),
        }
    }
}

/// The images a runner's operator allows (`--docker-allowed-images`):
/// globs over the reference as the pipeline writes it, `*` within one
/// path segment, `**` across them (GitLab Runner's `allowed_images`).
/// No pattern: every image is allowed.
#[derive(Clone, Debug, Default)]
pub struct AllowedImages {
    patterns: Vec<String>,
    set: GlobSet,
}

impl AllowedImages {
    /// Compiles the patterns; the error names the one that is not a glob.
    pub fn new(patterns: Vec<String>) -> Result<Self, String> {
        let mut set = GlobSetBuilder::new();
        for p in &patterns {
            let glob = GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("`{p}` is not a glob: {e}"))?;
            set.add(glob);
        }
        let set = set.build().map_err(|e| e.to_string())?;
        Ok(Self { patterns, set })
    }

    pub fn allows(&self, image: &str) -> bool {
        self.patterns.is_empty() || self.set.is_match(image)
    }

    /// Why `image` is refused, for the user.
    fn refusal(&self, image: &str, runner: &str) -> String {
        format!(
            "image `{image}` is not allowed on runner `{runner}`: its --docker-allowed-images are {}; \
             use a matching image or ask the runner's operator to allow it",
            self.patterns.join(", ")
        )
    }
}

/// Where the progress of getting an image is written: the step's log, or
/// lines kept for a service's log section.
pub(super) trait Progress: Send + Sync {
    /// Writes one line (without its newline).
    async fn line(&self, text: &str) -> Result<(), ExecutorError>;
}

/// Progress into a step's log.
pub(super) struct StepProgress<'a, 'b>(pub &'a StepContext<'b>);

impl Progress for StepProgress<'_, '_> {
    async fn line(&self, text: &str) -> Result<(), ExecutorError> {
        super::log(self.0, &format!("{text}\n")).await
    }
}

/// An image on the engine, ready to use.
pub(super) struct Resolved {
    /// `repository@sha256:...` from the registry, or the engine's image id
    /// for an image no registry has seen (built or loaded locally).
    pub digest: String,
    /// The engine's image id: what a container is made from.
    pub id: String,
}

impl DockerExecutor {
    /// Makes `image` present as the task's pull policy says, with its
    /// progress and resolved digest in `out`. `Err(Stop::Failed)` is a
    /// failure for the user (disallowed, missing under `never`, the pull
    /// refused); `Err(Stop::Error)` the engine's.
    pub(super) async fn ensure_image(
        &self,
        task: &TaskContext,
        out: &impl Progress,
        image: &str,
    ) -> Result<Resolved, Stop> {
        let settings = &self.options.settings;
        if !settings.allowed_images.allows(image) {
            return Err(Stop::Failed(
                settings
                    .allowed_images
                    .refusal(image, &self.options.runner_name),
            ));
        }
        let policy = match task.task.pull.as_str() {
            "" => settings.pull,
            text => text.parse().map_err(Stop::Failed)?,
        };
        let found = match (policy, self.inspect(image).await?) {
            (PullPolicy::Always, _) => None,
            (_, Some(found)) => Some(found),
            (PullPolicy::Never, None) => {
                return Err(Stop::Failed(format!(
                    "image `{image}` is not present on this runner's Docker Engine and the pull policy is `never`: \
                     build or load it first, or set `pull: if-not-present`"
                )));
            }
            (PullPolicy::IfNotPresent, None) => None,
        };
        let found = match found {
            Some(found) => found,
            None => {
                self.pull(task, out, image).await?;
                self.inspect(image).await?.ok_or_else(|| {
                    Stop::Failed(format!(
                        "image `{image}` is still not on the engine after the pull"
                    ))
                })?
            }
        };
        let resolved = resolved(image, found);
        out.line(&format!("image {image} is {}", resolved.digest))
            .await?;
        Ok(resolved)
    }

    /// The engine's record of `image`, if it has it.
    async fn inspect(&self, image: &str) -> Result<Option<ImageInspect>, ExecutorError> {
        match self.docker().inspect_image(image).await {
            Ok(i) => Ok(Some(i)),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(api_error(0, &format!("inspecting image {image}"), e)),
        }
    }

    /// Pulls `image` (its tag, `latest` when it names none), writing each
    /// layer's changes of status, not every progress tick.
    async fn pull(&self, task: &TaskContext, out: &impl Progress, image: &str) -> Result<(), Stop> {
        let (repository, tag) = split_reference(image);
        let registry = registry_host(repository).unwrap_or("docker.io");
        let secret = self.pull_secret(task, registry);
        let login = self.registry_login(&secret, registry)?;
        let via = if secret.is_empty() {
            String::new()
        } else {
            format!(" with secret `{secret}`")
        };
        out.line(&format!("pulling {image} from {registry}{via}"))
            .await?;
        // A digest reference is pulled by its digest: `fromImage` takes it
        // whole; a tag goes separately so no other tag is pulled.
        let options = if ImageRef::split(image).digest.is_some() {
            CreateImageOptionsBuilder::new().from_image(image).build()
        } else {
            CreateImageOptionsBuilder::new()
                .from_image(repository)
                .tag(tag)
                .build()
        };
        let mut stream = self.docker().create_image(Some(options), None, login);
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        while let Some(item) = stream.next().await {
            let info = match item {
                Ok(info) => info,
                Err(e) => return Err(self.pull_failed(image, registry, &secret, e)),
            };
            let Some(state) = info.status else { continue };
            let layer = info.id.unwrap_or_default();
            // "Downloading"/"Extracting" repeat with every tick.
            if matches!(state.as_str(), "Downloading" | "Extracting" | "Waiting") {
                continue;
            }
            if seen.get(&layer) == Some(&state) {
                continue;
            }
            let text = if layer.is_empty() || layer == tag {
                state.clone()
            } else {
                format!("{layer}: {state}")
            };
            seen.insert(layer, state);
            out.line(&format!("  {text}")).await?;
        }
        Ok(())
    }

    /// The secret to pull from `registry` with ([`pull_secret`]).
    fn pull_secret(&self, task: &TaskContext, registry: &str) -> String {
        pull_secret(
            &task.task.image,
            &task.task.pull_credentials,
            &self.options.settings.pull_credentials,
            registry,
        )
    }

    /// What a failed pull tells the user: the registry's answer, and what
    /// to check.
    fn pull_failed(&self, image: &str, registry: &str, secret: &str, e: BollardError) -> Stop {
        if super::is_unreachable(&e) {
            return Stop::Error(api_error(0, &format!("pulling {image}"), e));
        }
        let why = match e {
            BollardError::DockerResponseServerError { message, .. } => message,
            BollardError::DockerStreamError { error } => error,
            e => e.to_string(),
        };
        let lower = why.to_ascii_lowercase();
        // "unauthorized: ...", "no basic auth credentials", "denied: ...",
        // but not Docker Hub's "pull access denied ... does not exist".
        let missing = lower.contains("does not exist") || lower.contains("not found");
        let hint = if !missing
            && (lower.contains("unauthorized")
                || lower.contains("auth")
                || lower.contains("denied"))
        {
            if secret.is_empty() {
                format!(
                    "; the registry wants a login: set `pull-credentials:` on the task or map {registry} with the runner's --docker-pull-credentials"
                )
            } else {
                format!("; check the login in secret `{secret}`")
            }
        } else {
            String::new()
        };
        Stop::Failed(format!(
            "pulling image `{image}` from {registry} failed: {why}{hint}"
        ))
    }
}

/// The secret to pull from `registry` with: the task's `pull-credentials`
/// for the registry of the task's `image:`, else the runner's map entry
/// for `registry`, else none (empty).
///
/// The task's secret goes only to the registry of its `image:` (GitHub
/// Actions' `container.credentials` is the container image's alone): a
/// public service image elsewhere is pulled without it, and the secret is
/// not offered to every registry a task names.
fn pull_secret(
    task_image: &str,
    task_secret: &str,
    map: &BTreeMap<String, String>,
    registry: &str,
) -> String {
    let task_registry = registry_host(split_reference(task_image).0).unwrap_or("docker.io");
    if !task_secret.is_empty() && !task_image.is_empty() && task_registry == registry {
        return task_secret.to_owned();
    }
    map.get(registry).cloned().unwrap_or_default()
}

/// The digest `image` resolved to: the registry's digest for its
/// repository, or the engine's id for an image no registry has seen.
fn resolved(image: &str, found: ImageInspect) -> Resolved {
    let canonical = ImageRef::split(image).canonical_repository();
    let from_registry = found
        .repo_digests
        .unwrap_or_default()
        .into_iter()
        .find(|d| ImageRef::split(d).canonical_repository() == canonical);
    let id = found.id.unwrap_or_default();
    let digest = from_registry.unwrap_or_else(|| id.clone());
    Resolved { digest, id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_read_back() {
        for p in [
            PullPolicy::Always,
            PullPolicy::IfNotPresent,
            PullPolicy::Never,
        ] {
            assert_eq!(p.as_str().parse::<PullPolicy>(), Ok(p));
        }
        let e = "sometimes".parse::<PullPolicy>().unwrap_err();
        assert!(e.contains("always, if-not-present or never"), "{e}");
    }

    #[test]
    fn allowed_images_match_within_segments() {
        let any = AllowedImages::new(vec![]).unwrap();
        assert!(any.allows("anything:1"));
        let some =
            AllowedImages::new(vec!["127.0.0.1:*/ci/*".into(), "capstan-test/**".into()]).unwrap();
        assert!(some.allows("127.0.0.1:5000/ci/busybox:1"));
        assert!(!some.allows("127.0.0.1:5000/other/busybox:1"));
        assert!(
            !some.allows("127.0.0.1:5000/ci/deep/busybox:1"),
            "* stays in a segment"
        );
        assert!(some.allows("capstan-test/a/b:1"), "** crosses segments");
        assert!(!some.allows("docker.io/library/busybox:1"));
        let refusal = some.refusal("evil:1", "r1");
        assert!(
            refusal.contains("`evil:1` is not allowed on runner `r1`"),
            "{refusal}"
        );
        assert!(
            refusal.contains("127.0.0.1:*/ci/*, capstan-test/**"),
            "{refusal}"
        );
    }

    #[test]
    fn the_tasks_secret_goes_only_to_the_registry_of_its_image() {
        let map = BTreeMap::from([("mirror:5000".to_owned(), "mirror-login".to_owned())]);
        let image = "private:5000/ci/rust:1";
        assert_eq!(pull_secret(image, "ci", &map, "private:5000"), "ci");
        assert_eq!(
            pull_secret(image, "ci", &map, "docker.io"),
            "",
            "a public service image"
        );
        assert_eq!(
            pull_secret(image, "ci", &map, "mirror:5000"),
            "mirror-login"
        );
        assert_eq!(pull_secret(image, "", &map, "private:5000"), "");
        assert_eq!(
            pull_secret("postgres:16", "hub", &map, "docker.io"),
            "hub",
            "Docker Hub is the registry of a short name"
        );
        assert_eq!(pull_secret("", "ci", &map, "private:5000"), "");
    }

    #[test]
    fn a_bad_glob_is_named() {
        let e = AllowedImages::new(vec!["ok/*".into(), "bad[".into()]).unwrap_err();
        assert!(e.contains("`bad[` is not a glob"), "{e}");
    }
}
