//! The steps of one attempt, in order, until one does not succeed (step 2
//! of the attempt's order of events, [`super`]): for each step, its span
//! and its `StepStateChanged` reports ([`StepReport`]), its deadline (its
//! own timeout or the task's, whichever comes first: [`Deadline`]), its
//! log chain (the spool's writer, the cap, secret masking and the `$
//! command` header: [`run_logged`]), the built-in step kinds the runner
//! runs itself ([`run_step`]), and what its end means for the attempt
//! ([`conclude`]).

use std::sync::Arc;
use std::time::Duration;

use capstan_proto::pipeline::v1::{Step, StepState, step};
use capstan_proto::runner::v1::{AttemptOutcome, StepStateChanged};
use tokio::time::Instant;
use tracing::{Instrument as _, info_span, warn};

use super::{AttemptEvent, AttemptSpec, Outcome, mark_span};
use crate::error::chain;
use crate::executor::ExecutorError;
use crate::gitops::{self, GitOps};
use crate::logs::cap::CappedSink;
use crate::logs::mask::MaskingSink;
use crate::logs::sink::OutputSink;
use crate::logs::spool::Spool;
use crate::step::{StepContext, StepEnd, TaskContext, step_kind_name};

/// Runs the task's steps until one does not succeed; the attempt's outcome.
pub(super) async fn run_steps(
    spec: &AttemptSpec,
    task: &TaskContext,
    gitops: &Arc<GitOps>,
    spool: &Arc<Spool>,
    task_deadline: Option<Instant>,
) -> Outcome {
    for (i, step) in task.task.steps.iter().enumerate() {
        if spec.cancel.is_cancelled() {
            return Outcome::new(AttemptOutcome::Cancelled, None, "cancelled");
        }
        if task_deadline.is_some_and(|d| Instant::now() >= d) {
            return Outcome::new(AttemptOutcome::Failed, None, task_timed_out(task));
        }
        let ran = StepRunner {
            spec,
            task,
            gitops,
            spool,
        };
        if let Some(outcome) = ran.step(i, step, task_deadline).await {
            return outcome;
        }
    }
    if let Err(e) = record_outputs(spec, task, spool).await {
        return Outcome::new(AttemptOutcome::Error, None, chain(&e));
    }
    // The coordinator keeps no message for a succeeded task today; the
    // digest reaches the API through `outputs` (see `execute`).
    let message = task
        .outputs
        .lock()
        .ok()
        .and_then(|o| Some(format!("pushed {}@{}", o.get("image")?, o.get("digest")?)))
        .unwrap_or_default();
    Outcome::new(AttemptOutcome::Succeeded, None, message)
}

/// Records the outputs the `run` steps wrote to `$CAPSTAN_OUTPUT` (a task
/// without one has none, and its file is not read); what was not taken is
/// said in the log, after the last step.
///
/// A file that cannot be read (an I/O error, the container gone) is a
/// warning in the log, and the task keeps its success without outputs of
/// its own: as an infrastructure error it would be retried, and its steps,
/// which may have pushed images or commits, would run again. `Err` only
/// when the log could not be stored.
async fn record_outputs(
    spec: &AttemptSpec,
    task: &TaskContext,
    spool: &Arc<Spool>,
) -> Result<(), ExecutorError> {
    let runs = (task.task.steps.iter()).any(|s| matches!(s.kind, Some(step::Kind::Run(_))));
    if !runs {
        return Ok(());
    }
    let notes = match spec.executor.read_output_file(task).await {
        Ok(None) => return Ok(()),
        Ok(Some(bytes)) => {
            let (outputs, mut notes) = crate::outputs::read(&bytes);
            if let Ok(mut all) = task.outputs.lock() {
                all.extend(outputs);
                notes.extend(crate::outputs::fit(&mut all));
            }
            notes
        }
        Err(e) => {
            // The readers' errors say what was read (`Setup` only says
            // it is not a step's).
            let error = match &e {
                ExecutorError::Setup { message } => message.clone(),
                e => chain(e),
            };
            warn!(%error, "reading $CAPSTAN_OUTPUT failed; the task keeps its success, without its own outputs");
            vec![format!(
                "warning: $CAPSTAN_OUTPUT could not be read ({error}): the task succeeded, but without the outputs its steps wrote"
            )]
        }
    };
    log_notes(spec, task, spool, &notes).await
}

/// Takes the outputs whose values hold a secret out of the task's report,
/// saying so in its log after the last step ([`crate::outputs::withhold_secrets`]),
/// whatever the outcome: a report carries its outputs in any case.
pub(super) async fn withhold_secret_outputs(
    spec: &AttemptSpec,
    task: &TaskContext,
    spool: &Arc<Spool>,
) {
    let notes = match task.outputs.lock() {
        Ok(mut outputs) => crate::outputs::withhold_secrets(&mut outputs, &spec.mask),
        Err(_) => return,
    };
    if !notes.is_empty() {
        warn!(
            withheld = notes.len(),
            "outputs that may contain a secret were not reported"
        );
    }
    if let Err(e) = log_notes(spec, task, spool, &notes).await {
        warn!(error = %chain(&e), "storing the withheld outputs' warnings failed");
    }
}

/// Writes `notes`, one a line, into the task's log after its last step,
/// through the same cap and masking as a step's output.
async fn log_notes(
    spec: &AttemptSpec,
    task: &TaskContext,
    spool: &Arc<Spool>,
    notes: &[String],
) -> Result<(), ExecutorError> {
    if notes.is_empty() {
        return Ok(());
    }
    let index = u32::try_from(task.task.steps.len()).unwrap_or(u32::MAX);
    let writer = spool.writer(index);
    let capped = CappedSink::new(&writer, spec.step_log_cap);
    let masked = MaskingSink::new(&capped, &spec.mask);
    let text: String = notes.iter().map(|n| format!("{n}\n")).collect();
    let written = async {
        masked.write(text.as_bytes()).await?;
        masked.flush().await?;
        capped.finish().await
    }
    .await;
    written.map_err(|source| ExecutorError::Output { index, source })
}

/// Writes the output of the task's services into its log, after the last
/// step, through the same cap and masking as a step's.
pub(super) async fn log_services(spec: &AttemptSpec, task: &TaskContext, spool: &Arc<Spool>) {
    let index = u32::try_from(task.task.steps.len()).unwrap_or(u32::MAX);
    let writer = spool.writer(index);
    let capped = CappedSink::new(&writer, spec.step_log_cap);
    let masked = MaskingSink::new(&capped, &spec.mask);
    let written = spec.executor.write_service_logs(task, &masked).await;
    let flushed = async {
        masked.flush().await?;
        capped.finish().await
    }
    .await;
    if let Err(e) = written {
        warn!(error = %chain(&e), "writing the services' output failed");
    }
    if let Err(e) = flushed {
        warn!(error = %chain(&e), "storing the services' output failed");
    }
}

/// What every step of the attempt runs with.
struct StepRunner<'a> {
    spec: &'a AttemptSpec,
    task: &'a TaskContext,
    gitops: &'a Arc<GitOps>,
    spool: &'a Arc<Spool>,
}

impl StepRunner<'_> {
    /// Runs the step at position `i` to its end: `None` when it succeeded,
    /// else the attempt's outcome.
    async fn step(&self, i: usize, step: &Step, task_deadline: Option<Instant>) -> Option<Outcome> {
        let (spec, task) = (self.spec, self.task);
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        let label = format!("step {} ({})", i + 1, step_label(step));
        let report = StepReport::new(spec, task, index, step);
        report.send(StepState::Running, None, "");
        let deadline = Deadline::new(step, i + 1, task, task_deadline);
        let started = Instant::now();
        let (result, logged) = self
            .run_logged(&report.span, index, step, deadline.at)
            .await;
        crate::metrics::get().step_ran(step_kind_name(step), started.elapsed().as_secs_f64());
        if let Err(e) = logged {
            let message = chain(&e);
            report.send(StepState::Failed, None, &message);
            return Some(Outcome::new(AttemptOutcome::Error, None, message));
        }
        if let Err(e) = spec.executor.destroy_step(task, index).await {
            warn!(step = index, error = %chain(&e), "executor step teardown failed");
        }
        match result {
            Ok(end) => conclude(&report, end, &label, &deadline),
            Err(e) => {
                let message = format!("{label} could not run: {}", chain(&e));
                report.send(StepState::Failed, None, &message);
                Some(Outcome::new(AttemptOutcome::Error, None, message))
            }
        }
    }

    /// Runs the step with its output going through the step's log chain
    /// (the `$ command` header, secret masking, the cap, the spool's
    /// writer), then flushes the chain: the step's result, and whether its
    /// log was stored.
    async fn run_logged(
        &self,
        span: &tracing::Span,
        index: u32,
        step: &Step,
        deadline: Option<Instant>,
    ) -> (Result<StepEnd, ExecutorError>, std::io::Result<()>) {
        let spec = self.spec;
        let writer = self.spool.writer(index);
        let capped = CappedSink::new(&writer, spec.step_log_cap);
        let masked = MaskingSink::new(&capped, &spec.mask);
        let output = HeaderFirst::new(&masked, header(step));
        let ctx = StepContext {
            index,
            step,
            cancel: spec.cancel.clone(),
            deadline,
            output: &output,
        };
        let result = run_step(spec, self.task, self.gitops, ctx)
            .instrument(span.clone())
            .await;
        let logged = async {
            output.finish().await?;
            masked.flush().await?;
            capped.finish().await
        }
        .await;
        (result, logged)
    }
}

/// A step's span (one per step, never per log chunk: README "Tracing") and
/// the `StepStateChanged` reports to the agent.
struct StepReport<'a> {
    spec: &'a AttemptSpec,
    task: &'a TaskContext,
    index: u32,
    span: tracing::Span,
}

impl<'a> StepReport<'a> {
    fn new(spec: &'a AttemptSpec, task: &'a TaskContext, index: u32, step: &Step) -> Self {
        // Exported as `step <n> <name>`, numbered from 1 like the messages.
        let number = index + 1;
        let span = info_span!(
            "step",
            otel.name = %format!("step {number} {}", step_label(step)),
            capstan.step.number = i64::from(number),
            capstan.step.name = %step_label(step),
            capstan.step.kind = step_kind_name(step),
            capstan.step.status = tracing::field::Empty,
            capstan.step.exit_code = tracing::field::Empty,
        );
        Self {
            spec,
            task,
            index,
            span,
        }
    }

    /// Reports the step's `state`; a terminal one also goes on the span,
    /// with `why` the step failed.
    fn send(&self, state: StepState, exit_code: Option<i32>, why: &str) {
        if state != StepState::Running {
            self.span.record("capstan.step.status", state.as_str_name());
            if let Some(code) = exit_code {
                self.span.record("capstan.step.exit_code", code);
            }
            // A cancelled step did not fail.
            mark_span(&self.span, state != StepState::Failed, why);
        }
        let _ = self.spec.events.send(AttemptEvent::Step(StepStateChanged {
            attempt_id: self.task.attempt_id.to_string(),
            step_index: self.index,
            state: state.into(),
            exit_code,
        }));
    }
}

/// When a step is stopped: at its own timeout or the task's, whichever
/// comes first.
struct Deadline {
    at: Option<Instant>,
    task: Option<Instant>,
    /// The step's position (1-based) and timeout, for the message.
    number: usize,
    step_timeout: u64,
    /// What the task's timeout says when it fired.
    task_timed_out: String,
}

impl Deadline {
    fn new(step: &Step, number: usize, task: &TaskContext, task_deadline: Option<Instant>) -> Self {
        let step_deadline = (step.timeout_seconds > 0)
            .then(|| Instant::now() + Duration::from_secs(step.timeout_seconds));
        let at = match (step_deadline, task_deadline) {
            (Some(s), Some(t)) => Some(s.min(t)),
            (s, t) => s.or(t),
        };
        Self {
            at,
            task: task_deadline,
            number,
            step_timeout: step.timeout_seconds,
            task_timed_out: task_timed_out(task),
        }
    }

    /// Why a step stopped at this deadline failed.
    fn timed_out(&self) -> String {
        let task_fired = self.task.is_some() && self.at == self.task;
        if task_fired {
            self.task_timed_out.clone()
        } else {
            format!(
                "step {} timed out after {}s",
                self.number, self.step_timeout
            )
        }
    }
}

fn task_timed_out(task: &TaskContext) -> String {
    format!("task timed out after {}s", task.task.timeout_seconds)
}

/// What the end of a step that ran means: `None` when it succeeded (the
/// attempt goes on), else the attempt's outcome. The step's terminal state
/// is reported either way.
fn conclude(
    report: &StepReport<'_>,
    end: StepEnd,
    label: &str,
    deadline: &Deadline,
) -> Option<Outcome> {
    let failed = |exit_code, message: String| {
        report.send(StepState::Failed, exit_code, &message);
        Some(Outcome::new(AttemptOutcome::Failed, exit_code, message))
    };
    match end {
        StepEnd::Exited(0) => {
            report.send(StepState::Succeeded, Some(0), "");
            None
        }
        StepEnd::Exited(code) => failed(Some(code), format!("{label} exited with {code}")),
        StepEnd::OutOfMemory { exit_code } => failed(
            Some(exit_code),
            format!("{label} ran out of memory (exit code {exit_code})"),
        ),
        StepEnd::Failed { message } => failed(None, format!("{label}: {message}")),
        StepEnd::TimedOut => failed(None, deadline.timed_out()),
        StepEnd::Cancelled => {
            report.send(StepState::Cancelled, None, "");
            Some(Outcome::new(AttemptOutcome::Cancelled, None, "cancelled"))
        }
    }
}

/// Runs one step: the runner's built-in kinds (`set-image`, `git-push`)
/// here, with git2, the same under every executor; the rest through the
/// executor, which only runs processes and containers.
async fn run_step(
    spec: &AttemptSpec,
    task: &TaskContext,
    gitops: &Arc<GitOps>,
    ctx: StepContext<'_>,
) -> Result<StepEnd, ExecutorError> {
    if !spec.executor.simulates_builtin_steps() {
        match &ctx.step.kind {
            Some(step::Kind::SetImage(s)) => {
                return gitops::run_set_image(gitops, task, &ctx, s).await;
            }
            Some(step::Kind::GitPush(g)) => {
                return gitops::run_git_push(gitops, task, &ctx, g).await;
            }
            _ => {}
        }
    }
    spec.executor.run_step(task, ctx).await
}

/// A `run` step's log starts with `$ <first line of its script>`.
fn header(step: &Step) -> Vec<u8> {
    match &step.kind {
        Some(step::Kind::Run(run)) => {
            format!("$ {}\n", run.script.lines().next().unwrap_or_default()).into_bytes()
        }
        _ => Vec::new(),
    }
}

/// A step's output sink that puts `header` before the first byte of output
/// (in the same write), or writes it alone in [`HeaderFirst::finish`]: so
/// that no file write delays the start of the step's process.
struct HeaderFirst<'a> {
    inner: &'a dyn OutputSink,
    /// Still to write; held across that write so that a concurrent writer
    /// (stdout and stderr) cannot get in before it.
    header: tokio::sync::Mutex<Vec<u8>>,
}

impl<'a> HeaderFirst<'a> {
    fn new(inner: &'a dyn OutputSink, header: Vec<u8>) -> Self {
        Self {
            inner,
            header: tokio::sync::Mutex::new(header),
        }
    }

    /// Writes the header if no output did.
    async fn finish(&self) -> std::io::Result<()> {
        self.write(&[]).await
    }
}

#[async_trait::async_trait]
impl OutputSink for HeaderFirst<'_> {
    async fn write(&self, data: &[u8]) -> std::io::Result<()> {
        let mut header = self.header.lock().await;
        if header.is_empty() {
            drop(header);
            if data.is_empty() {
                return Ok(());
            }
            return self.inner.write(data).await;
        }
        header.extend_from_slice(data);
        self.inner.write(&header).await?;
        header.clear();
        Ok(())
    }
}

/// The step's display name: its `name`, else its kind.
fn step_label(step: &Step) -> String {
    if step.name.is_empty() {
        step_kind_name(step).to_owned()
    } else {
        step.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::Executor;
    use crate::executor::fake::FakeExecutor;
    use crate::step::{MAX_OUTPUT_BYTES, OUTPUT_FILE, testing};
    use capstan_proto::pipeline::v1::PushStep;
    use std::collections::BTreeMap;

    /// Every step succeeds; the output file cannot be read.
    struct Unreadable;

    #[async_trait::async_trait]
    impl Executor for Unreadable {
        async fn setup_task(&self, _: &TaskContext) -> Result<(), ExecutorError> {
            Ok(())
        }
        async fn run_step(
            &self,
            _: &TaskContext,
            _: StepContext<'_>,
        ) -> Result<StepEnd, ExecutorError> {
            Ok(StepEnd::Exited(0))
        }
        async fn destroy_step(&self, _: &TaskContext, _: u32) -> Result<(), ExecutorError> {
            Ok(())
        }
        async fn destroy_task(&self, _: &TaskContext) -> Result<(), ExecutorError> {
            Ok(())
        }
        async fn read_output_file(
            &self,
            _: &TaskContext,
        ) -> Result<Option<Vec<u8>>, ExecutorError> {
            Err(ExecutorError::Setup {
                message: "the helper container is gone".into(),
            })
        }
    }

    /// Runs `steps` with `file` as the workspace's output file: the
    /// outcome, the task's outputs and its log.
    async fn run(
        executor: impl Executor + 'static,
        steps: Vec<Step>,
        file: Option<&[u8]>,
    ) -> (Outcome, BTreeMap<String, String>, String) {
        run_with_secrets(executor, steps, file, &[]).await
    }

    /// [`run`] on a runner with `secrets`, and the report's outputs as
    /// `run_prepared` takes them (what may hold a secret withheld).
    async fn run_with_secrets(
        executor: impl Executor + 'static,
        steps: Vec<Step>,
        file: Option<&[u8]>,
        secrets: &[&str],
    ) -> (Outcome, BTreeMap<String, String>, String) {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = super::super::tests::spec(dir.path(), Arc::new(executor));
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        spec.mask = Arc::new(crate::logs::mask::patterns(&secrets));
        let task = testing::task(dir.path().join("ws"), steps);
        std::fs::create_dir_all(&task.workspace).unwrap();
        if let Some(file) = file {
            std::fs::write(task.workspace.join(OUTPUT_FILE), file).unwrap();
        }
        let spool = Spool::create(spec.work_dir.spool_dir(), "att-1")
            .await
            .unwrap();
        let outcome = run_steps(&spec, &task, &Arc::default(), &spool, None).await;
        withhold_secret_outputs(&spec, &task, &spool).await;
        let mut log = Vec::new();
        loop {
            let chunk = spool.read_at(log.len() as u64, 1 << 20).await.unwrap();
            if chunk.is_empty() {
                break;
            }
            log.extend_from_slice(&chunk);
        }
        let outputs = task.outputs.lock().unwrap().clone();
        (outcome, outputs, String::from_utf8_lossy(&log).into_owned())
    }

    #[tokio::test]
    async fn an_unreadable_output_file_is_a_warning_and_the_task_succeeds() {
        let steps = vec![testing::run_step("echo wrote k=v")];
        let (outcome, outputs, log) = run(Unreadable, steps, None).await;
        assert_eq!(
            outcome.outcome,
            AttemptOutcome::Succeeded,
            "{}",
            outcome.message
        );
        assert!(outputs.is_empty(), "{outputs:?}");
        assert!(
            log.contains(
                "warning: $CAPSTAN_OUTPUT could not be read (the helper container is gone): the task succeeded"
            ),
            "{log}"
        );
    }

    #[tokio::test]
    async fn a_task_without_run_steps_reads_no_output_file() {
        let push = Step {
            kind: Some(step::Kind::Push(PushStep {
                image: "r/app:1".into(),
                ..PushStep::default()
            })),
            ..Step::default()
        };
        // Neither a file there (from the checkout, say) nor a failing reader.
        let (outcome, outputs, log) =
            run(FakeExecutor, vec![push.clone()], Some(b"k=v\nbad line\n")).await;
        assert_eq!(outcome.outcome, AttemptOutcome::Succeeded);
        assert!(outputs.is_empty(), "{outputs:?}");
        assert!(!log.contains("CAPSTAN_OUTPUT"), "{log}");
        let (outcome, _, log) = run(Unreadable, vec![push], None).await;
        assert_eq!(outcome.outcome, AttemptOutcome::Succeeded);
        assert!(log.is_empty(), "{log}");
        // With a `run` step it is read.
        let steps = vec![testing::run_step("exit 0")];
        let (_, outputs, _) = run(FakeExecutor, steps, Some(b"k=v\n")).await;
        assert_eq!(outputs["k"], "v");
    }

    #[tokio::test]
    async fn an_output_file_over_the_limit_is_said_in_the_log() {
        let big = "x".repeat(MAX_OUTPUT_BYTES);
        let file = format!("first=1\nbig={big}\nlast=2\n");
        let steps = vec![testing::run_step("exit 0")];
        let (outcome, outputs, log) = run(FakeExecutor, steps, Some(file.as_bytes())).await;
        assert_eq!(outcome.outcome, AttemptOutcome::Succeeded);
        assert_eq!(outputs.keys().collect::<Vec<_>>(), ["first"], "{outputs:?}");
        assert!(
            log.contains("$CAPSTAN_OUTPUT is larger than its limit of 64 KiB"),
            "{log}"
        );
    }

    #[tokio::test]
    async fn an_output_holding_a_secret_does_not_leave_the_runner() {
        let steps = vec![testing::run_step("exit 0")];
        let file = b"version=1.2\nurl=https://ci:s3cret-token@git.example/r.git\n";
        let (outcome, outputs, log) =
            run_with_secrets(FakeExecutor, steps, Some(file), &["s3cret-token"]).await;
        assert_eq!(outcome.outcome, AttemptOutcome::Succeeded);
        assert_eq!(
            outputs.keys().collect::<Vec<_>>(),
            ["version"],
            "{outputs:?}"
        );
        assert!(
            log.contains("warning: skip output `url` since it may contain a secret"),
            "{log}"
        );
        assert!(!log.contains("s3cret-token"), "{log}");
    }

    #[tokio::test]
    async fn the_runners_own_outputs_can_push_the_files_last_ones_out() {
        let steps = vec![testing::run_step("exit 0")];
        let file: String = (0..capstan_proto::outputs::MAX_OUTPUTS)
            .map(|i| format!("k{i:03}=v\n"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let spec = super::super::tests::spec(dir.path(), Arc::new(FakeExecutor));
        let task = testing::task(dir.path().join("ws"), steps);
        std::fs::create_dir_all(&task.workspace).unwrap();
        std::fs::write(task.workspace.join(OUTPUT_FILE), &file).unwrap();
        task.set_output("steps.1.image", "r/app@sha256:ab");
        let spool = Spool::create(spec.work_dir.spool_dir(), "att-1")
            .await
            .unwrap();
        run_steps(&spec, &task, &Arc::default(), &spool, None).await;
        let outputs = task.outputs.lock().unwrap().clone();
        assert_eq!(outputs.len(), capstan_proto::outputs::MAX_OUTPUTS);
        assert!(outputs.contains_key("steps.1.image"));
        assert!(!outputs.contains_key("k099"), "the last in key order");
    }
}
