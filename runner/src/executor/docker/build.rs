//! The `build` step: an image from a Dockerfile and context in the task's
//! workspace volume, through the engine's (classic) build API.
//!
//! The context is read out of the volume through the API (so it includes
//! what earlier steps produced), the Dockerfile's base images are got
//! first as the task's pull policy says (the classic builder would pull a
//! missing base image itself, past the runner's allowed images, its
//! credentials and the policy), `RUN` instructions get no
//! network, and the image is labelled with its commit (nothing per run, so
//! the label does not make two builds of a commit differ). A tag the
//! registry already has is not built again (`skip-if-exists`,
//! `registry.rs`): its digest is recorded instead, and no image is left on
//! this engine.
//! `dockerfile` is relative to `context`.

use std::collections::HashMap;
use std::io::Read as _;

use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, BuilderVersion, DownloadFromContainerOptionsBuilder,
};
use capstan_proto::pipeline::v1::BuildStep;
use futures::StreamExt as _;

use super::pull::StepProgress;
use super::{DockerExecutor, LABEL_COMMIT, Stop, WORKSPACE, api_error, log, status, step_end};
use crate::executor::ExecutorError;
use crate::step::{StepContext, StepEnd, TaskContext};

/// `a/./b/` -> `a/b`; `None` if it leaves the workspace.
fn clean_relative(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Runs the `build` step (see the module docs); the image's tag becomes the
/// task's `image` output.
pub(super) async fn run(
    ex: &DockerExecutor,
    task: &TaskContext,
    ctx: &StepContext<'_>,
    build: &BuildStep,
) -> Result<StepEnd, ExecutorError> {
    if !build.tag.is_empty() && !build.force {
        let found = ex
            .already_pushed(ctx, &build.tag, &build.credentials, "build")
            .await;
        match found {
            Ok(Some(digest)) => {
                task.set_output("image", &build.tag);
                task.set_output("digest", &digest);
                return step_end(Ok(()));
            }
            Ok(None) => {}
            Err(stop) => return step_end(Err(stop)),
        }
    }
    let built = build_image(ex, task, ctx, build).await;
    if built.is_ok() {
        task.set_output("image", &build.tag);
    }
    step_end(built)
}

/// Where the build reads from: the context in the workspace and the
/// Dockerfile in it, both cleaned relative paths.
struct Paths {
    context: String,
    dockerfile: String,
}

impl Paths {
    fn of(build: &BuildStep) -> Result<Self, Stop> {
        if build.tag.is_empty() {
            return Err(Stop::Failed("build needs a `tag`".into()));
        }
        let Some(context) = clean_relative(&build.context) else {
            return Err(Stop::Failed(format!(
                "build context `{}` is outside the workspace",
                build.context
            )));
        };
        let dockerfile_name = if build.dockerfile.is_empty() {
            "Dockerfile"
        } else {
            &build.dockerfile
        };
        let Some(dockerfile) = clean_relative(dockerfile_name) else {
            return Err(Stop::Failed(format!(
                "Dockerfile `{dockerfile_name}` is outside the build context"
            )));
        };
        Ok(Self {
            context,
            dockerfile,
        })
    }

    /// The context as the log shows it.
    fn shown_context(&self) -> &str {
        if self.context.is_empty() {
            "."
        } else {
            &self.context
        }
    }
}

async fn build_image(
    ex: &DockerExecutor,
    task: &TaskContext,
    ctx: &StepContext<'_>,
    build: &BuildStep,
) -> Result<(), Stop> {
    let paths = Paths::of(build)?;
    let (shown_context, dockerfile) = (paths.shown_context(), &paths.dockerfile);
    log(
        ctx,
        &format!(
            "building {} from {shown_context}/{dockerfile} (no network)\n",
            build.tag
        ),
    )
    .await?;
    let archive = read_context(ex, task, ctx.index, &paths).await?;
    let Some(text) = find_file(&archive, dockerfile) else {
        return Err(Stop::Failed(format!(
            "Dockerfile `{dockerfile}` not found in build context `{shown_context}`"
        )));
    };
    check_base_images(ex, task, ctx, dockerfile, &text, &build.args).await?;
    stream_build(ex, task, ctx, build, dockerfile, archive).await
}

/// The build context, as a tar archive read out of the workspace volume.
async fn read_context(
    ex: &DockerExecutor,
    task: &TaskContext,
    index: u32,
    paths: &Paths,
) -> Result<Vec<u8>, Stop> {
    let helper = ex.ensure_helper(task).await?;
    let path = if paths.context.is_empty() {
        format!("{WORKSPACE}/.")
    } else {
        format!("{WORKSPACE}/{}/.", paths.context)
    };
    let options = DownloadFromContainerOptionsBuilder::new()
        .path(&path)
        .build();
    let mut download = ex.docker().download_from_container(&helper, Some(options));
    let mut archive = Vec::new();
    while let Some(chunk) = download.next().await {
        match chunk {
            Ok(bytes) => archive.extend_from_slice(&bytes),
            Err(e) if status(&e) == Some(404) => {
                return Err(Stop::Failed(format!(
                    "build context `{}` does not exist in the workspace",
                    paths.shown_context()
                )));
            }
            Err(e) => return Err(api_error(index, "reading the build context", e).into()),
        }
    }
    Ok(archive)
}

/// Fails the step unless every base image of the Dockerfile is named,
/// allowed and present (pulled if the policy says so).
async fn check_base_images(
    ex: &DockerExecutor,
    task: &TaskContext,
    ctx: &StepContext<'_>,
    dockerfile: &str,
    text: &str,
    args: &HashMap<String, String>,
) -> Result<(), Stop> {
    let vars = global_args(text, args);
    for base in base_images(text) {
        let BaseImage { image, line } = base;
        let image = expand(&image, &vars).map_err(|name| {
            Stop::Failed(format!(
                "{dockerfile}:{line}: `FROM {image}` uses ${name}, which no `args:` of the step \
                 and no `ARG {name}=...` before the first FROM sets; base images must be known \
                 so the runner can check and get them first"
            ))
        })?;
        if image == "scratch" {
            continue;
        }
        match ex.ensure_image(task, &StepProgress(ctx), &image).await {
            Ok(_) => {}
            Err(Stop::Failed(why)) => {
                let message = format!("{dockerfile}:{line}: base image: {why}");
                log(ctx, &format!("error: {message}\n")).await?;
                return Err(Stop::Failed(message));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Builds the image from the context `archive`, streaming the builder's
/// output into the step's log.
async fn stream_build(
    ex: &DockerExecutor,
    task: &TaskContext,
    ctx: &StepContext<'_>,
    build: &BuildStep,
    dockerfile: &str,
    archive: Vec<u8>,
) -> Result<(), Stop> {
    // Only the commit: per-run metadata (run, task) would make every
    // build of one commit a different image; the run record has it.
    let labels: HashMap<String, String> =
        HashMap::from([(LABEL_COMMIT.to_owned(), task.rev.clone())]);
    let options = BuildImageOptionsBuilder::new()
        .buildargs(&build.args)
        .dockerfile(dockerfile)
        .t(&build.tag)
        .rm(true)
        .forcerm(true)
        .networkmode("none")
        .labels(&labels)
        .version(BuilderVersion::BuilderV1)
        .build();
    let mut stream = ex.docker().build_image(
        options,
        None,
        Some(bollard::body_full(bytes::Bytes::from(archive))),
    );
    let mut last_step = String::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(text) = info.stream {
                    if let Some(line) = text.lines().find(|l| l.starts_with("Step ")) {
                        last_step = line.to_owned();
                    }
                    log(ctx, &text).await?;
                } else if let Some(status) = info.status {
                    log(ctx, &format!("{status}\n")).await?;
                }
            }
            Err(BollardError::DockerStreamError { error }) => {
                log(ctx, &format!("error: {error}\n")).await?;
                let at = if last_step.is_empty() {
                    String::new()
                } else {
                    format!(" at `{last_step}`")
                };
                return Err(Stop::Failed(format!("image build failed{at}: {error}")));
            }
            Err(e) => return Err(api_error(ctx.index, "building the image", e).into()),
        }
    }
    Ok(())
}

/// The text of `name` in a tar archive whose entries are `./`-relative.
fn find_file(archive: &[u8], name: &str) -> Option<String> {
    let mut tar = tar::Archive::new(archive);
    for entry in tar.entries().ok()? {
        let mut entry = entry.ok()?;
        let path = entry.path().ok()?.to_string_lossy().into_owned();
        if clean_relative(&path).as_deref() == Some(name) {
            let mut text = String::new();
            entry.read_to_string(&mut text).ok()?;
            return Some(text);
        }
    }
    None
}

/// The values `FROM` lines may use: the `ARG NAME=default`s before the
/// first `FROM`, overridden by the step's `args`.
fn global_args(dockerfile: &str, args: &HashMap<String, String>) -> HashMap<String, String> {
    let mut vars = HashMap::new();
    for line in dockerfile.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some(w) if w.eq_ignore_ascii_case("from") => break,
            Some(w) if w.eq_ignore_ascii_case("arg") => {
                for decl in words {
                    if let Some((name, value)) = decl.split_once('=') {
                        vars.insert(name.to_owned(), value.trim_matches('"').to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    vars.extend(args.iter().map(|(k, v)| (k.clone(), v.clone())));
    vars
}

/// `text` with `$NAME`, `${NAME}` and `${NAME:-default}` (or `-default`)
/// replaced from `vars`; the name of the first one `vars` lacks with no
/// default.
fn expand(text: &str, vars: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, default, len) = match after.strip_prefix('{') {
            Some(inner) => match inner.find('}') {
                Some(end) => {
                    let body = &inner[..end];
                    let (name, default) =
                        match body.split_once(":-").or_else(|| body.split_once('-')) {
                            Some((name, default)) => (name, Some(default)),
                            None => (body, None),
                        };
                    (name, default, end + 2)
                }
                None => return Err(inner.to_owned()),
            },
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], None, end)
            }
        };
        match (vars.get(name), default) {
            (Some(value), _) if !name.is_empty() => out.push_str(value),
            (_, Some(default)) if !name.is_empty() => out.push_str(default),
            _ => return Err(name.to_owned()),
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Debug, PartialEq, Eq)]
struct BaseImage {
    image: String,
    /// 1-based line of the `FROM` in the Dockerfile.
    line: usize,
}

/// The images a Dockerfile's `FROM` lines and `COPY --from=` flags name,
/// minus `scratch` and earlier stages (by name or index): everything the
/// builder would otherwise pull itself. Continuation lines (`\` at the
/// end) are read as one instruction, at the line it starts on.
fn base_images(dockerfile: &str) -> Vec<BaseImage> {
    let mut stages: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for (line, text) in instructions(dockerfile) {
        let mut words = text.split_whitespace();
        let Some(keyword) = words.next().map(str::to_ascii_lowercase) else {
            continue;
        };
        if keyword == "copy" || keyword == "add" {
            for flag in words.take_while(|w| w.starts_with("--")) {
                let Some(from) = flag.strip_prefix("--from=") else {
                    continue;
                };
                let is_stage = stages.contains(&from.to_ascii_lowercase())
                    || from.bytes().all(|b| b.is_ascii_digit());
                if !is_stage && from != "scratch" {
                    out.push(BaseImage {
                        image: from.to_owned(),
                        line,
                    });
                }
            }
            continue;
        }
        if keyword != "from" {
            continue;
        }
        let mut words = words.skip_while(|w| w.starts_with("--"));
        let Some(image) = words.next() else { continue };
        let is_stage = stages.contains(&image.to_ascii_lowercase());
        if words.next().is_some_and(|w| w.eq_ignore_ascii_case("as"))
            && let Some(stage) = words.next()
        {
            stages.push(stage.to_ascii_lowercase());
        }
        if image == "scratch" || is_stage {
            continue;
        }
        out.push(BaseImage {
            image: image.to_owned(),
            line,
        });
    }
    out
}

/// The Dockerfile's instructions with their continuation lines joined,
/// each with the 1-based line it starts on; comments and blank lines
/// (also inside a continuation) left out.
fn instructions(dockerfile: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, raw) in dockerfile.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && open.is_none()) {
            continue;
        }
        let (text, continues) = match trimmed.strip_suffix('\\') {
            Some(text) => (text, true),
            None => (trimmed, false),
        };
        let (start, mut joined) = open.take().unwrap_or((i + 1, String::new()));
        joined.push(' ');
        joined.push_str(text);
        if continues {
            open = Some((start, joined));
        } else {
            out.push((start, joined));
        }
    }
    out.extend(open);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_variables_come_from_global_args_and_the_steps_args() {
        let dockerfile = "ARG BASE=capstan-test/busybox:1\nARG TAG\nFROM ${BASE}\nARG LATE=x\nFROM $OTHER:$TAG AS b\n";
        let args = HashMap::from([("OTHER".to_owned(), "reg/app".to_owned())]);
        let vars = global_args(dockerfile, &args);
        assert_eq!(expand("${BASE}", &vars).unwrap(), "capstan-test/busybox:1");
        assert_eq!(expand("$OTHER:$TAG", &vars), Err("TAG".to_owned()));
        assert!(
            !vars.contains_key("LATE"),
            "an ARG after the first FROM is the stage's"
        );
        let args = HashMap::from([("BASE".to_owned(), "mine:2".to_owned())]);
        let vars = global_args(dockerfile, &args);
        assert_eq!(expand("${BASE}", &vars).unwrap(), "mine:2");
        assert_eq!(expand("plain:1", &vars).unwrap(), "plain:1");
        assert_eq!(expand("${BASE", &vars), Err("BASE".to_owned()));
        assert_eq!(expand("${NOPE:-alpine:3}", &vars).unwrap(), "alpine:3");
        assert_eq!(expand("${BASE:-alpine:3}", &vars).unwrap(), "mine:2");
        assert_eq!(expand("${NOPE-x}", &vars).unwrap(), "x");
    }

    #[test]
    fn finds_images_behind_continuations_and_copy_from() {
        let text = "FROM \\\n  # a comment inside\n  capstan-test/busybox:1 AS base\nFROM base\nCOPY --chown=1:1 --from=other/image:2 /a /b\nCOPY --from=base /x /y\nCOPY --from=0 /x /y\nADD --from=third:3 a b\n";
        let found: Vec<(String, usize)> = base_images(text)
            .into_iter()
            .map(|b| (b.image, b.line))
            .collect();
        assert_eq!(
            found,
            [
                ("capstan-test/busybox:1".to_owned(), 1),
                ("other/image:2".to_owned(), 5),
                ("third:3".to_owned(), 8),
            ]
        );
    }

    #[test]
    fn finds_base_images() {
        let text = "# comment\nFROM --platform=linux/amd64 golang:1 AS build\nRUN x\nFROM build\nfrom scratch\nFROM capstan-test/busybox:1\n";
        assert_eq!(
            base_images(text),
            vec![
                BaseImage {
                    image: "golang:1".into(),
                    line: 2
                },
                BaseImage {
                    image: "capstan-test/busybox:1".into(),
                    line: 6
                },
            ]
        );
    }

    #[test]
    fn cleans_paths() {
        assert_eq!(clean_relative("./a//b/").as_deref(), Some("a/b"));
        assert_eq!(clean_relative(".").as_deref(), Some(""));
        assert_eq!(clean_relative("../x"), None);
    }
}
