//! What one step runs against, whoever runs it (an executor for `run`,
//! `build` and `push`; the runner itself for `set-image` and `git-push`):
//! the attempt's [`TaskContext`], the step's [`StepContext`], and how it
//! ended ([`StepEnd`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use capstan_proto::ids::{AttemptId, RunId};
use capstan_proto::pipeline::v1::{Step, TaskSpec, step};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::logs::sink::OutputSink;

/// The file in the workspace a task's steps write their outputs to
/// (`$CAPSTAN_OUTPUT`, [`crate::outputs`]).
pub const OUTPUT_FILE: &str = ".capstan-output";
/// What of that file is read: outputs travel in every later offer of the
/// run, so they stay small.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// The attempt a step runs in: what executors and the built-in steps work on.
#[derive(Clone, Debug)]
pub struct TaskContext {
    pub run_id: RunId,
    pub task_name: String,
    pub attempt_id: AttemptId,
    /// The attempt's workspace directory (exists before `setup_task`).
    pub workspace: PathBuf,
    /// The task with every substitution made.
    pub task: TaskSpec,
    /// The run's source repository and revision (empty when it has none).
    pub repo: String,
    pub rev: String,
    /// What steps produce for the task's report (e.g. `digest` of a push).
    pub outputs: Arc<Mutex<BTreeMap<String, String>>>,
    /// What the run's finished tasks pushed: image reference -> digest.
    pub pushed: BTreeMap<String, String>,
    /// The attempt's cancel: what a long setup (a service's `ready`
    /// probes) gives up on. Each step has its own in [`StepContext`].
    pub cancel: CancellationToken,
}

impl TaskContext {
    /// Records an output of the task (a later step overwrites an earlier one).
    pub(crate) fn set_output(&self, key: &str, value: &str) {
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

/// The kind of a step as written in a pipeline file (`run`, `build`, ...).
pub(crate) fn step_kind_name(step: &Step) -> &'static str {
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
    //! Contexts for the tests of executors and steps.
    use super::*;

    pub(crate) fn task(workspace: PathBuf, steps: Vec<Step>) -> TaskContext {
        TaskContext {
            run_id: RunId::from_string("run-1"),
            task_name: "test".into(),
            attempt_id: AttemptId::from_string("att-1"),
            workspace,
            task: TaskSpec {
                name: "test".into(),
                steps,
                ..TaskSpec::default()
            },
            repo: String::new(),
            rev: String::new(),
            outputs: Arc::default(),
            pushed: BTreeMap::new(),
            cancel: CancellationToken::new(),
        }
    }

    pub(crate) fn run_step(script: &str) -> Step {
        Step {
            name: "script".into(),
            kind: Some(step::Kind::Run(capstan_proto::pipeline::v1::RunStep {
                script: script.into(),
                image: String::new(),
            })),
            ..Step::default()
        }
    }
}
