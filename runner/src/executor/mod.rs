//! Executors run the steps of one attempt: processes (`shell`) or
//! containers ([`docker`], with its docker-only `build` and `push` step
//! kinds), or nothing at all (`fake`, fault injection for tests). The
//! runner's built-in step kinds (`set-image`, `git-push`) are not theirs:
//! the attempt runs them (see [`Executor::simulates_builtin_steps`]).
//! Executors import only the step vocabulary ([`crate::step`]), the log
//! sink trait, the runner's secrets and `crate::error`.
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
//! 3. For a task with services, [`Executor::write_service_logs`] once,
//!    also after a failed setup.
//! 4. [`Executor::destroy_task`] once, also after a failed setup.
//!
//! Destroy calls are idempotent and safe to call for things that were never
//! created. Different attempts run concurrently on one executor, so an
//! executor keeps per-attempt state keyed by attempt id, if any.

pub mod docker;
pub(crate) mod fake;
pub(crate) mod host_env;
pub(crate) mod shell;

use std::collections::BTreeMap;
use std::io;

use async_trait::async_trait;
use capstan_proto::pipeline::v1::Step;

use crate::step::{MAX_OUTPUT_BYTES, OUTPUT_FILE, StepContext, StepEnd, TaskContext};

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

/// Writes text of the runner's own (a built-in step's progress or result)
/// into the step's log.
pub(crate) async fn step_log(ctx: &StepContext<'_>, text: &str) -> Result<(), ExecutorError> {
    ctx.output
        .write(text.as_bytes())
        .await
        .map_err(|source| ExecutorError::Output {
            index: ctx.index,
            source,
        })
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

    /// Writes what the task's service containers (`services:`) printed
    /// into `out`, one section per service. Called once, after the steps
    /// (or a failed setup) and before [`Executor::destroy_task`], only for
    /// a task with services; executors that run none write nothing.
    async fn write_service_logs(
        &self,
        _task: &TaskContext,
        _out: &dyn crate::logs::sink::OutputSink,
    ) -> Result<(), ExecutorError> {
        Ok(())
    }

    /// The start (at most [`MAX_OUTPUT_BYTES`] and one byte, which tells a
    /// file over the limit: [`crate::outputs::read`]) of the file the
    /// task's `run` steps wrote their outputs to (`$CAPSTAN_OUTPUT`), if
    /// they wrote one; read after the last step succeeded, before the
    /// teardown. By default from the local workspace.
    async fn read_output_file(&self, task: &TaskContext) -> Result<Option<Vec<u8>>, ExecutorError> {
        use tokio::io::AsyncReadExt as _;
        let path = task.workspace.join(OUTPUT_FILE);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ExecutorError::Setup {
                    message: format!("reading {}: {e}", path.display()),
                });
            }
        };
        let mut text = Vec::new();
        file.take(MAX_OUTPUT_BYTES as u64 + 1)
            .read_to_end(&mut text)
            .await
            .map_err(|e| ExecutorError::Setup {
                message: format!("reading {}: {e}", path.display()),
            })?;
        Ok(Some(text))
    }

    /// Whether the runner's built-in step kinds (`set-image`, `git-push`)
    /// go to [`Executor::run_step`] too. The attempt runs them itself
    /// otherwise; only the fake executor, which simulates every kind, says
    /// yes.
    fn simulates_builtin_steps(&self) -> bool {
        false
    }
}

/// The environment of a step: the task's env, then the step's env over it,
/// then the `CAPSTAN_*` variables describing the attempt.
pub(crate) fn step_env(task: &TaskContext, step: &Step) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = task
        .task
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.extend(step.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.insert("CAPSTAN_RUN_ID".into(), task.run_id.to_string());
    env.insert("CAPSTAN_TASK".into(), task.task_name.clone());
    env.insert("CAPSTAN_ATTEMPT_ID".into(), task.attempt_id.to_string());
    env.insert(
        "CAPSTAN_WORKSPACE".into(),
        task.workspace.display().to_string(),
    );
    env.insert(
        "CAPSTAN_OUTPUT".into(),
        task.workspace.join(OUTPUT_FILE).display().to_string(),
    );
    env
}
