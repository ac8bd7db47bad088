//! The pipeline file (YAML, version 1): model, parser, validator and
//! `${{ ... }}` substitution.
//!
//! ```text
//! version: 1
//! name: go-sampleapp
//! params:
//!   image: 127.0.0.1:5000/demo-ns/go-sampleapp
//! tasks:
//!   unit-test:
//!     image: capstan-test/golang
//!     steps:
//!       - run: go test ./...
//!   image:
//!     needs: [unit-test]
//!     steps:
//!       - build: { tag: "${{ params.image }}:${{ git.sha }}" }
//! ```
//!
//! [`parse`] reads and validates a file, reporting every problem with its
//! line and column; [`resolve`] applies the substitutions for one run; a
//! resolved [`TaskDef`] converts into the wire type
//! [`TaskSpec`](capstan_proto::pipeline::v1::TaskSpec).
//!
//! Decisions where the format leaves room:
//! - Scalars YAML reads as numbers or booleans are kept as written when a
//!   string is expected (`VERSION: 1.10` is `"1.10"`); only `true`/`false` are
//!   booleans. A null `env` value or param default is the empty string.
//! - `needs` may be a single task name instead of a list.
//! - Timeouts are whole seconds, from 1 second to 7 days.
//! - Substitutions apply to images, env values, step names, scripts, every
//!   field of the other step kinds and a service's image, command, env
//!   values and `ready`; not to names, `needs`, `runs-on`, `pull`,
//!   `pull-credentials` or param values (which are plain text). A `ready`
//!   command is shell: its substitutions are made like a `run` script's.

pub mod cond;
mod error;
mod expr;
mod matrix;
mod model;
mod names;
pub mod outputs;
mod parse;
mod script;
mod substitute;
mod validate;
mod yaml;

#[cfg(test)]
mod matrix_tests;
#[cfg(test)]
mod outputs_tests;
#[cfg(test)]
mod services_tests;
#[cfg(test)]
mod tests;

pub use error::{ValidationError, ValidationErrors};
pub use matrix::{MAX_MATRIX, expanded_name};
pub use model::{
    Approval, Concurrency, Matrix, Pipeline, ServiceDef, SourceMap, StepDef, StepKind, TaskDef,
};
pub use names::{
    MAX_NAME_LEN, MAX_OUTPUT_KEY_LEN, is_env_name, is_output_key, is_param_name, is_pipeline_name,
    is_task_name,
};
pub use parse::{MAX_LISTED_ERRORS, MAX_RETRIES, parse};
pub use substitute::{Context, resolve};

use capstan_proto::pipeline::v1 as pb;

/// Larger files are refused before parsing.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;

/// Whole seconds, rounded up; 0 for none.
fn seconds(d: Option<std::time::Duration>) -> u64 {
    d.map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// Converts a resolved task of the pipeline named `pipeline`. Steps
/// without a name are named after their kind and 1-based index (`run-1`,
/// `build-2`).
pub fn task_spec(pipeline: &str, task: &TaskDef) -> pb::TaskSpec {
    {
        pb::TaskSpec {
            name: task.name.clone(),
            image: task.image.clone().unwrap_or_default(),
            env: task.env.clone().into_iter().collect(),
            steps: task
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| step_spec(pipeline, task, i, s))
                .collect(),
            timeout_seconds: seconds(task.timeout),
            runs_on: task.runs_on.clone().into_iter().collect(),
            capabilities: task.capabilities.clone(),
            cpus: task.cpus.unwrap_or_default(),
            memory_bytes: task.memory_bytes.unwrap_or_default(),
            services: task.services.iter().map(service_spec).collect(),
            pull: task.pull.clone().unwrap_or_default(),
            pull_credentials: task.pull_credentials.clone().unwrap_or_default(),
        }
    }
}

fn service_spec(s: &ServiceDef) -> pb::Service {
    pb::Service {
        name: s.name.clone(),
        image: s.image.clone(),
        command: s.command.clone(),
        env: s.env.clone().into_iter().collect(),
        ready: s.ready.clone().unwrap_or_default(),
        ready_timeout_seconds: seconds(s.ready_timeout),
    }
}

/// Whether `build`/`push` of `image` skip a reference the registry has
/// when the step does not say: only for a tag that names a commit (7 to 40
/// hex digits, as `${{ git.sha }}` gives), which no later commit reuses. A
/// branch or `latest` tag moves on purpose and is built and pushed again.
fn skip_by_default(image: &str) -> bool {
    let rest = image.split('@').next().unwrap_or(image);
    let tag = match rest.rfind(':') {
        Some(colon) if !rest[colon..].contains('/') => &rest[colon + 1..],
        _ => return false,
    };
    (7..=40).contains(&tag.len()) && tag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The credentials of `task`'s push of `image`, if it has one: what its
/// build asks the registry with before building.
fn push_credentials(task: &TaskDef, image: &str) -> Option<String> {
    task.steps.iter().find_map(|s| match &s.kind {
        StepKind::Push {
            image: pushed,
            credentials,
            ..
        } if pushed == image => credentials.clone(),
        _ => None,
    })
}

fn step_spec(pipeline: &str, task: &TaskDef, index: usize, step: &StepDef) -> pb::Step {
    use pb::step::Kind;
    let kind = match &step.kind {
        StepKind::Run { script, image } => Kind::Run(pb::RunStep {
            script: script.clone(),
            image: image.clone().unwrap_or_default(),
        }),
        StepKind::Build {
            context,
            dockerfile,
            tag,
            skip_if_exists,
            credentials,
            args,
        } => Kind::Build(pb::BuildStep {
            context: context.clone(),
            dockerfile: dockerfile.clone(),
            tag: tag.clone(),
            force: !skip_if_exists.unwrap_or_else(|| skip_by_default(tag)),
            credentials: credentials
                .clone()
                .or_else(|| push_credentials(task, tag))
                .unwrap_or_default(),
            args: args.clone().into_iter().collect(),
        }),
        StepKind::Push {
            image,
            credentials,
            skip_if_exists,
        } => Kind::Push(pb::PushStep {
            image: image.clone(),
            credentials: credentials.clone().unwrap_or_default(),
            force: !skip_if_exists.unwrap_or_else(|| skip_by_default(image)),
        }),
        StepKind::SetImage {
            repo,
            files,
            image,
            allow_no_match,
            pin_digest,
            digest,
            monotonic,
        } => Kind::SetImage(pb::SetImageStep {
            allow_no_match: *allow_no_match,
            repo: repo.clone(),
            files: files.clone(),
            image: image.clone(),
            pin: if *pin_digest { "digest" } else { "" }.to_owned(),
            digest: digest.clone().unwrap_or_default(),
            order: if *monotonic { "monotonic" } else { "" }.to_owned(),
        }),
        StepKind::GitPush {
            message,
            credentials,
            branch,
            pull_request,
        } => Kind::GitPush(pb::GitPushStep {
            message: message.clone(),
            credentials: credentials.clone().unwrap_or_default(),
            branch: branch.clone().unwrap_or_default(),
            mode: if *pull_request {
                "pull-request"
            } else {
                "direct"
            }
            .to_owned(),
            pipeline: pipeline.to_owned(),
        }),
    };
    pb::Step {
        name: step
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", step.kind.key(), index + 1)),
        env: step.env.clone().into_iter().collect(),
        timeout_seconds: seconds(step.timeout),
        kind: Some(kind),
    }
}
