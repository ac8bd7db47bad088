//! Executors run the steps of one attempt.
//!
//! # Lifecycle contract
//!
//! For every attempt the runner calls, in this order and never concurrently
//! for the same attempt:
//!
//! 1. [`Executor::setup_task`] once: prepare whatever the task needs
//!    (network, workspace volume). The workspace directory itself already
//!    exists. An error here is an infrastructure failure (outcome ERROR).
//! 2. For each step, until one fails: [`Executor::run_step`] creates and
//!    starts the step, streams its output into the sink as it arrives, and
//!    waits for it to end. It must honour the step's `cancel` token and
//!    `deadline` by stopping the step (processes: SIGTERM to the process
//!    group, SIGKILL 2 s later) and returning [`StepEnd::Cancelled`] or
//!    [`StepEnd::TimedOut`]. It returns only after the step's output is
//!    fully written to the sink. An `Err` means the step could not be run at
//!    all (infrastructure, outcome ERROR); a step that ran and failed is an
//!    `Ok` with a non-success [`StepEnd`].
//!    Then [`Executor::destroy_step`], also after an error.
//! 3. [`Executor::destroy_task`] once, also after a failed setup.
//!
//! Destroy calls are idempotent and safe to call for things that were never
//! created. Different attempts run concurrently on one executor, so an
//! executor keeps per-attempt state keyed by attempt id, if any.

pub mod docker;
pub mod fake;
pub mod shell;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use capstan_shared::proto::pipeline::v1::{Step, TaskSpec, step};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where a step's output goes (the attempt's log spool in the runner).
/// `write` returns once the bytes are stored.
#[async_trait]
pub trait OutputSink: Send + Sync {
    async fn write(&self, data: &[u8]) -> io::Result<()>;

    /// [`OutputSink::write`] of a buffer the caller gives up: a sink that
    /// keeps the bytes (the spool) takes it without a copy.
    async fn write_owned(&self, data: Vec<u8>) -> io::Result<()> {
        self.write(&data).await
    }
}

/// The attempt an executor works on.
#[derive(Clone, Debug)]
pub struct TaskContext {
    pub run_id: String,
    pub task_name: String,
    pub attempt_id: String,
    /// The attempt's workspace directory (exists before `setup_task`).
    pub workspace: PathBuf,
    /// The task with every substitution made.
    pub task: TaskSpec,
    /// The run's source repository and revision (empty when it has none).
    pub repo: String,
    pub rev: String,
    /// What steps produce for the task's report (e.g. `digest` of a push).
    pub outputs: Arc<Mutex<BTreeMap<String, String>>>,
    /// Settings of the `set-image` and `git-push` steps and the write-back
    /// a `set-image` leaves for the task's `git-push`.
    pub gitops: Arc<crate::steps::git_push::GitOps>,
}

impl TaskContext {
    /// Records an output of the task (a later step overwrites an earlier one).
    pub fn set_output(&self, key: &str, value: &str) {
        if let Ok(mut outputs) = self.outputs.lock() {
            outputs.insert(key.to_owned(), value.to_owned());
        }
    }
}

/// One step to run.
pub struct StepContext<'a> {
    /// Index of the step in the task's step list.
    pub index: u32,
    pub step: &'a Step,
    /// Stop the step and return [`StepEnd::Cancelled`] when cancelled.
    pub cancel: CancellationToken,
    /// Stop the step and return [`StepEnd::TimedOut`] at this instant.
    pub deadline: Option<Instant>,
    /// Receives stdout and stderr, raw, as they arrive.
    pub output: &'a dyn OutputSink,
}

/// How a step that ran ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepEnd {
    /// The step's process exited with this code (0 = success).
    Exited(i32),
    /// Killed for exceeding its memory limit.
    OutOfMemory { exit_code: i32 },
    /// The step could not do its work (e.g. a step kind this executor does
    /// not support); the message is for the user.
    Failed { message: String },
    /// Stopped at the deadline.
    TimedOut,
    /// Stopped because the attempt was cancelled.
    Cancelled,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("setting up the task failed: {message}")]
    Setup { message: String },
    #[error("step {index} could not be started: {message}")]
    Start { index: u32, message: String },
    #[error("starting `{program}` for step {index}")]
    Spawn {
        index: u32,
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("waiting for step {index}")]
    Wait {
        index: u32,
        #[source]
        source: io::Error,
    },
    #[error("storing the output of step {index}")]
    Output {
        index: u32,
        #[source]
        source: io::Error,
    },
}

#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Prepares the task (see the lifecycle contract above).
    async fn setup_task(&self, task: &TaskContext) -> Result<(), ExecutorError>;
    /// Runs one step to its end (see the lifecycle contract above).
    async fn run_step(
        &self,
        task: &TaskContext,
        step: StepContext<'_>,
    ) -> Result<StepEnd, ExecutorError>;
    /// Removes what the step left behind. Idempotent.
    async fn destroy_step(&self, task: &TaskContext, index: u32) -> Result<(), ExecutorError>;
    /// Removes what the task left behind. Idempotent, safe after a failed setup.
    async fn destroy_task(&self, task: &TaskContext) -> Result<(), ExecutorError>;
}

/// The environment of a step: the task's env, then the step's env over it,
/// then the `CAPSTAN_*` variables describing the attempt.
pub fn step_env(task: &TaskContext, step: &Step) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = task
        .task
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.extend(step.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.insert("CAPSTAN_RUN_ID".into(), task.run_id.clone());
    env.insert("CAPSTAN_TASK".into(), task.task_name.clone());
    env.insert("CAPSTAN_ATTEMPT_ID".into(), task.attempt_id.clone());
    env.insert(
        "CAPSTAN_WORKSPACE".into(),
        task.workspace.display().to_string(),
    );
    env
}

/// The kind of a step as written in a pipeline file (`run`, `build`, ...).
pub fn step_kind_name(step: &Step) -> &'static str {
    match &step.kind {
        Some(step::Kind::Run(_)) => "run",
        Some(step::Kind::Build(_)) => "build",
        Some(step::Kind::Push(_)) => "push",
        Some(step::Kind::SetImage(_)) => "set-image",
        Some(step::Kind::GitPush(_)) => "git-push",
        None => "unknown",
    }
}

/// Waits until `deadline`, or forever when there is none.
pub(crate) async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory sink and helpers shared by the executor tests.
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub(crate) struct VecSink(pub(crate) Mutex<Vec<u8>>);

    impl VecSink {
        pub(crate) fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
        pub(crate) fn len(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    #[async_trait]
    impl OutputSink for VecSink {
        async fn write(&self, data: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(())
        }
    }

    pub(crate) fn task(workspace: PathBuf, steps: Vec<Step>) -> TaskContext {
        TaskContext {
            run_id: "run-1".into(),
            task_name: "test".into(),
            attempt_id: "att-1".into(),
            workspace,
            task: TaskSpec {
                name: "test".into(),
                steps,
                ..TaskSpec::default()
            },
            repo: String::new(),
            rev: String::new(),
            outputs: Arc::default(),
            gitops: Arc::default(),
        }
    }

    pub(crate) fn run_step(script: &str) -> Step {
        Step {
            name: "script".into(),
            kind: Some(step::Kind::Run(
                capstan_shared::proto::pipeline::v1::RunStep {
                    script: script.into(),
                    image: String::new(),
                },
            )),
            ..Step::default()
        }
    }
}
