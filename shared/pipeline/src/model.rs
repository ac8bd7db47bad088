//! The pipeline model: what a valid pipeline file means.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// A parsed and validated pipeline file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub name: String,
    /// Declared params and their default values (scalars stringified).
    pub params: BTreeMap<String, String>,
    /// Tasks in file order.
    pub tasks: Vec<TaskDef>,
    /// `concurrency:`: runs of one group run one at a time.
    #[serde(default)]
    pub concurrency: Option<Concurrency>,
    /// `schedules: [{cron: "0 3 * * *"}]`: cron expressions (5 fields, or 6-7
    /// with seconds first) that start runs of the registered repository's
    /// branch (the coordinator reads them from the file at each push).
    #[serde(default)]
    pub schedules: Vec<String>,
    /// Where the substitutions of this pipeline were written, so [`resolve`]
    /// can point at them. Filled in by [`parse`]; not part of the pipeline's
    /// value (ignored by `PartialEq`, not serialized). Leave it at its default
    /// when building a `Pipeline` by hand.
    ///
    /// [`parse`]: super::parse
    /// [`resolve`]: super::resolve
    #[serde(skip)]
    pub source_map: SourceMap,
}

/// `concurrency: {group, cancel-in-progress}`: at most one run of a group
/// runs at a time. A new run either waits for the one in progress
/// (`cancel-in-progress: false`, the default) or cancels it (`true`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concurrency {
    /// May hold substitutions (`deploy-${{ git.ref }}`).
    pub group: String,
    pub cancel_in_progress: bool,
}

/// One task: steps run in order on one runner.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskDef {
    pub name: String,
    /// Default image of the task's `run` steps.
    pub image: Option<String>,
    /// Labels a runner must have.
    pub runs_on: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    /// Names of tasks that must succeed first.
    pub needs: Vec<String>,
    pub timeout: Option<Duration>,
    /// How many times a script failure is retried (0..=10).
    pub retries: u32,
    /// Linux capabilities the task's containers ask for (upper case, no
    /// `CAP_` prefix); a runner grants only those its operator allows.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// CPU limit of each step container (docker executor); runner default if None.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory limit of each step container in bytes; runner default if None.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    pub steps: Vec<StepDef>,
    /// `matrix:` as parsed; `resolve` expands the task into one per
    /// combination and clears it.
    #[serde(default)]
    pub matrix: Option<Matrix>,
    /// In an expansion: the task of the file it came from (`test` for
    /// `test[shard=1]`), whose fields' positions it shares.
    #[serde(default)]
    pub expanded_from: Option<String>,
    /// In an expansion: its `${{ matrix.KEY }}` values.
    #[serde(default)]
    pub matrix_values: BTreeMap<String, String>,
    /// `approval:`: a person decides before the task is queued.
    #[serde(default)]
    pub approval: Option<Approval>,
    /// `if:` as written; after `resolve`, with every value known at
    /// submit folded in (`crate::cond`), so only task states are left.
    #[serde(default)]
    pub condition: Option<String>,
    /// `finally: true`: runs once its needs have ended, however they
    /// ended; the run's state is decided by the other tasks.
    #[serde(default)]
    pub finally: bool,
    /// `services:`, in file order: containers started before the steps
    /// on the task's private network (docker executor).
    #[serde(default)]
    pub services: Vec<ServiceDef>,
    /// `pull:`: when images are pulled (`always`, `if-not-present`,
    /// `never`); the runner's `--docker-pull` if None.
    #[serde(default)]
    pub pull: Option<String>,
    /// `pull-credentials:`: the runner-side secret images are pulled with;
    /// the runner's `--docker-pull-credentials` if None.
    #[serde(default)]
    pub pull_credentials: Option<String>,
}

/// One of a task's `services:`: a container started before the task's
/// steps on its private network, reachable from them by `name`, removed
/// with the task.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDef {
    /// Its host name on the task's network: a DNS label (`db`, `redis-1`).
    pub name: String,
    /// May hold substitutions.
    pub image: String,
    /// Replaces the image's CMD when not empty; each entry may hold
    /// substitutions (each goes in as it is, one argument).
    #[serde(default)]
    pub command: Vec<String>,
    /// The service container's environment; values may hold substitutions.
    /// After `resolve`, also the variables `ready` refers to.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A shell command run inside the service until it exits 0; None:
    /// ready once started. Its substitutions are made like a `run`
    /// script's (references to variables of `env`).
    #[serde(default)]
    pub ready: Option<String>,
    /// How long `ready` may take; the runner's default (60 s) if None.
    #[serde(default)]
    pub ready_timeout: Option<Duration>,
}

/// A task's `approval:` gate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// What the approver is asked.
    pub prompt: String,
    /// The token scopes that may decide (`read`, `submit`, `admin`); an
    /// admin token always may.
    pub by: Vec<String>,
    /// Undecided this long after the task could start: rejected.
    pub timeout: Option<Duration>,
}

/// A task's `matrix:`: every combination of the axes' values, less those
/// matching an `exclude` entry, plus the `include` entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matrix {
    /// Key -> its values, in file order.
    pub axes: BTreeMap<String, Vec<String>>,
    /// Combinations removed: each names some of the keys.
    pub exclude: Vec<BTreeMap<String, String>>,
    /// Combinations added: each names every key.
    pub include: Vec<BTreeMap<String, String>>,
}

/// One step of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepDef {
    pub name: Option<String>,
    pub env: BTreeMap<String, String>,
    pub timeout: Option<Duration>,
    pub kind: StepKind,
}

/// What a step does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// Run a shell script (in `image`, else the task's image).
    Run {
        script: String,
        image: Option<String>,
    },
    /// Build an image from a Dockerfile in the workspace.
    Build {
        context: String,
        dockerfile: String,
        tag: String,
        /// Skip the build when the registry already has `tag`; None: only
        /// for a commit-like tag (see `skip_by_default`).
        skip_if_exists: Option<bool>,
        /// The secret to ask the registry with (default: that of the
        /// task's push of `tag`).
        credentials: Option<String>,
        /// Build arguments (`ARG`s of the Dockerfile).
        #[serde(default)]
        args: BTreeMap<String, String>,
    },
    /// Push an image; `credentials` names a runner-side secret.
    Push {
        image: String,
        credentials: Option<String>,
        /// Skip the push when the registry already has the image; None:
        /// only for a commit-like tag.
        skip_if_exists: Option<bool>,
    },
    /// Set the image in Kubernetes YAML files of a repository.
    SetImage {
        /// The manifests repository's URL; empty: the run's own repository.
        #[serde(default)]
        repo: String,
        files: Vec<String>,
        image: String,
        /// Succeed when no file references the image's repository.
        #[serde(default)]
        allow_no_match: bool,
        /// `pin: digest`: write `image@<digest>`, the digest from this
        /// run's push of `image` unless `digest` names one.
        #[serde(default)]
        pin_digest: bool,
        #[serde(default)]
        digest: Option<String>,
        /// `order: monotonic`: never replace a newer image (one built from
        /// a descendant of the run's commit).
        #[serde(default)]
        monotonic: bool,
    },
    /// Commit the workspace's changes and push them; `credentials` names a
    /// runner-side secret.
    GitPush {
        message: String,
        credentials: Option<String>,
        /// The branch pushed to (direct) or the pull request's base; the
        /// checkout's branch when absent.
        #[serde(default)]
        branch: Option<String>,
        /// `mode: pull-request`: push `capstan/<pipeline>/<sha>` and open a
        /// pull request into `branch` instead of pushing to it.
        #[serde(default)]
        pull_request: bool,
    },
}

impl StepKind {
    /// The step's key in the file: `run`, `build`, `push`, `set-image`, `git-push`.
    pub fn key(&self) -> &'static str {
        match self {
            StepKind::Run { .. } => "run",
            StepKind::Build { .. } => "build",
            StepKind::Push { .. } => "push",
            StepKind::SetImage { .. } => "set-image",
            StepKind::GitPush { .. } => "git-push",
        }
    }
}

/// Locations of the strings of a pipeline that hold `${{ ... }}`
/// substitutions, keyed by a field path such as `tasks.image.steps[0].build.tag`.
///
/// Every `SourceMap` equals every other: locations are not part of a
/// pipeline's value.
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    pub(crate) positions: BTreeMap<String, (usize, usize)>,
}

impl SourceMap {
    /// 1-based line and column of a field, if known.
    pub fn position(&self, path: &str) -> Option<(usize, usize)> {
        self.positions.get(path).copied()
    }
}

impl PartialEq for SourceMap {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
