//! The `fake` executor: fault injection for tests. Runs no processes; a `run`
//! step's script is a list of directives, one per line (blank lines and
//! `#` comments are skipped):
//!
//! | directive     | effect |
//! |---------------|--------|
//! | `echo TEXT`   | writes `TEXT\n` to the log |
//! | `sleep MS`    | waits MS milliseconds (cancel and timeout interrupt it) |
//! | `exit N`      | the step ends with exit code N |
//! | `fail-setup`  | (anywhere in the task) setting up the task fails: outcome ERROR |
//! | `fail-start`  | the step cannot be started: outcome ERROR |
//! | `oom`         | the step is killed for memory: exit code 137 |
//! | `output BYTES`| writes BYTES bytes of [`output_pattern`] in 64 KiB writes |
//! | `hang`        | waits until cancelled or timed out |
//! | `panic`       | panics (a bug in the runner): the attempt reports ERROR |
//!
//! A script that runs off its end exits 0. An unknown directive fails the
//! step. Other step kinds succeed with a "fake: would ..." log line.

use async_trait::async_trait;
use capstan_proto::pipeline::v1::{Step, step};
use tokio::time::{Duration, Instant};

use super::{Executor, ExecutorError};
use crate::step::{StepContext, StepEnd, TaskContext, sleep_until_deadline};

/// Exit code of a step killed for memory (128 + SIGKILL), as Docker reports it.
pub(crate) const OOM_EXIT_CODE: i32 = 137;
const WRITE_SIZE: usize = 64 * 1024;
const PATTERN: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-\n";

/// Byte `i` of the `output` directive's stream is `output_pattern(i)`; e2e
/// tests use this to check a shipped log byte for byte.
pub(crate) fn output_pattern(i: u64) -> u8 {
    // The modulo keeps the index below PATTERN.len().
    #[allow(clippy::cast_possible_truncation)]
    PATTERN[(i % PATTERN.len() as u64) as usize]
}

#[derive(Debug, Default)]
pub(crate) struct FakeExecutor;

impl FakeExecutor {
    pub(crate) fn new() -> Self {
        Self
    }
}

fn directives(step: &Step) -> impl Iterator<Item = &str> {
    let script = match &step.kind {
        Some(step::Kind::Run(run)) => run.script.as_str(),
        _ => "",
    };
    script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

enum Waited {
    Done,
    Stopped(StepEnd),
}

async fn wait(ctx: &StepContext<'_>, until: Option<Instant>) -> Waited {
    tokio::select! {
        () = ctx.cancel.cancelled() => Waited::Stopped(StepEnd::Cancelled),
        () = sleep_until_deadline(ctx.deadline) => Waited::Stopped(StepEnd::TimedOut),
        () = sleep_until_deadline(until) => Waited::Done,
    }
}

#[async_trait]
impl Executor for FakeExecutor {
    async fn setup_task(&self, task: &TaskContext) -> Result<(), ExecutorError> {
        if task
            .task
            .steps
            .iter()
            .any(|s| directives(s).any(|d| d == "fail-setup"))
        {
            return Err(ExecutorError::Setup {
                message: "fake: fail-setup".into(),
            });
        }
        Ok(())
    }

    async fn run_step(
        &self,
        _task: &TaskContext,
        ctx: StepContext<'_>,
    ) -> Result<StepEnd, ExecutorError> {
        if let Some(line) = simulated(ctx.step) {
            write(&ctx, format!("{line}\n").into_bytes()).await?;
            return Ok(StepEnd::Exited(0));
        }
        if ctx.cancel.is_cancelled() {
            return Ok(StepEnd::Cancelled);
        }
        for directive in directives(ctx.step) {
            if let Some(end) = run_directive(&ctx, directive).await? {
                return Ok(end);
            }
        }
        Ok(StepEnd::Exited(0))
    }

    async fn destroy_step(&self, _task: &TaskContext, _index: u32) -> Result<(), ExecutorError> {
        Ok(())
    }

    async fn destroy_task(&self, _task: &TaskContext) -> Result<(), ExecutorError> {
        Ok(())
    }

    fn simulates_builtin_steps(&self) -> bool {
        true
    }
}

/// The log line of a step kind other than `run`, which succeeds without
/// doing anything; `None` for a `run` step.
fn simulated(step: &Step) -> Option<String> {
    match &step.kind {
        Some(step::Kind::Run(_)) => None,
        Some(step::Kind::Build(b)) => Some(format!(
            "fake: would build {} from {} ({})",
            b.tag, b.context, b.dockerfile
        )),
        Some(step::Kind::Push(p)) => Some(format!("fake: would push {}", p.image)),
        Some(step::Kind::SetImage(s)) => Some(format!(
            "fake: would set image {} in {} of {}",
            s.image,
            s.files.join(", "),
            s.repo
        )),
        Some(step::Kind::GitPush(g)) => {
            Some(format!("fake: would commit and push \"{}\"", g.message))
        }
        None => Some("fake: empty step".to_owned()),
    }
}

async fn write(ctx: &StepContext<'_>, data: Vec<u8>) -> Result<(), ExecutorError> {
    ctx.output
        .write(&data)
        .await
        .map_err(|source| ExecutorError::Output {
            index: ctx.index,
            source,
        })
}

/// Runs one directive (see the module docs): `Some` when it ended the step.
async fn run_directive(
    ctx: &StepContext<'_>,
    directive: &str,
) -> Result<Option<StepEnd>, ExecutorError> {
    let (word, arg) = directive
        .split_once(char::is_whitespace)
        .map_or((directive, ""), |(w, a)| (w, a.trim()));
    match (word, arg.parse::<u64>()) {
        ("echo", _) => write(ctx, format!("{arg}\n").into_bytes()).await?,
        ("sleep", Ok(ms)) => {
            let until = Instant::now() + Duration::from_millis(ms);
            if let Waited::Stopped(end) = wait(ctx, Some(until)).await {
                return Ok(Some(end));
            }
        }
        ("exit", _) => match arg.parse::<i32>() {
            Ok(code) => return Ok(Some(StepEnd::Exited(code))),
            Err(_) => return Ok(Some(bad_directive(directive))),
        },
        ("fail-setup", _) => {}
        ("panic", _) => panic!("fake: panic directive"),
        ("fail-start", _) => {
            return Err(ExecutorError::Start {
                index: ctx.index,
                message: "fake: fail-start".into(),
            });
        }
        ("oom", _) => {
            return Ok(Some(StepEnd::OutOfMemory {
                exit_code: OOM_EXIT_CODE,
            }));
        }
        ("output", Ok(total)) => {
            let mut written = 0u64;
            while written < total {
                let n = (total - written).min(WRITE_SIZE as u64);
                let data = (written..written + n).map(output_pattern).collect();
                write(ctx, data).await?;
                written += n;
                if ctx.cancel.is_cancelled() {
                    return Ok(Some(StepEnd::Cancelled));
                }
            }
        }
        ("hang", _) => {
            if let Waited::Stopped(end) = wait(ctx, None).await {
                return Ok(Some(end));
            }
        }
        _ => return Ok(Some(bad_directive(directive))),
    }
    Ok(None)
}

fn bad_directive(directive: &str) -> StepEnd {
    StepEnd::Failed {
        message: format!(
            "fake executor: unknown directive `{directive}` (known: echo TEXT, sleep MS, exit N, \
             fail-setup, fail-start, oom, output BYTES, hang, panic)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::sink::testing::VecSink;
    use crate::step::testing::{run_step, task};
    use capstan_proto::pipeline::v1::PushStep;
    use tokio_util::sync::CancellationToken;

    async fn run_with(
        step: Step,
        cancel: CancellationToken,
        deadline: Option<Instant>,
    ) -> (Result<StepEnd, ExecutorError>, VecSink) {
        let sink = VecSink::default();
        let task = task("/nonexistent".into(), vec![step.clone()]);
        let end = FakeExecutor::new()
            .run_step(
                &task,
                StepContext {
                    index: 0,
                    step: &step,
                    cancel,
                    deadline,
                    output: &sink,
                },
            )
            .await;
        (end, sink)
    }

    async fn run(script: &str) -> (Result<StepEnd, ExecutorError>, VecSink) {
        run_with(run_step(script), CancellationToken::new(), None).await
    }

    #[tokio::test]
    async fn echo_and_exit() {
        let (end, sink) = run("echo hello world\n# comment\n\necho two").await;
        assert_eq!(end.unwrap(), StepEnd::Exited(0));
        assert_eq!(sink.text(), "hello world\ntwo\n");
        let (end, sink) = run("echo a\nexit 3\necho never").await;
        assert_eq!(end.unwrap(), StepEnd::Exited(3));
        assert_eq!(sink.text(), "a\n");
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_waits_and_times_out() {
        let start = Instant::now();
        let (end, _) = run("sleep 1500").await;
        assert_eq!(end.unwrap(), StepEnd::Exited(0));
        assert!(start.elapsed() >= Duration::from_millis(1500));
        let (end, _) = run_with(
            run_step("sleep 10000"),
            CancellationToken::new(),
            Some(Instant::now() + Duration::from_millis(100)),
        )
        .await;
        assert_eq!(end.unwrap(), StepEnd::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn hang_until_cancelled_or_timed_out() {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            trigger.cancel();
        });
        let (end, _) = run_with(run_step("hang"), cancel, None).await;
        assert_eq!(end.unwrap(), StepEnd::Cancelled);
        let (end, _) = run_with(
            run_step("hang"),
            CancellationToken::new(),
            Some(Instant::now() + Duration::from_secs(5)),
        )
        .await;
        assert_eq!(end.unwrap(), StepEnd::TimedOut);
    }

    #[tokio::test]
    async fn fail_setup_fails_the_task_setup() {
        let task = task("/nonexistent".into(), vec![run_step("echo x\nfail-setup")]);
        let err = FakeExecutor::new().setup_task(&task).await.unwrap_err();
        assert!(matches!(err, ExecutorError::Setup { .. }));
        let ok = crate::step::testing::task("/x".into(), vec![run_step("echo x")]);
        FakeExecutor::new().setup_task(&ok).await.unwrap();
    }

    #[tokio::test]
    async fn fail_start_is_an_error() {
        let (end, _) = run("fail-start").await;
        assert!(matches!(end, Err(ExecutorError::Start { index: 0, .. })));
    }

    #[tokio::test]
    async fn oom_ends_with_137() {
        let (end, _) = run("echo allocating\noom").await;
        assert_eq!(end.unwrap(), StepEnd::OutOfMemory { exit_code: 137 });
    }

    #[tokio::test]
    async fn output_writes_the_pattern() {
        let total = 200 * 1024 + 17;
        let (end, sink) = run(&format!("output {total}")).await;
        assert_eq!(end.unwrap(), StepEnd::Exited(0));
        assert_eq!(sink.len(), total);
        let data = sink.0.lock().unwrap().clone();
        assert!(
            data.iter()
                .enumerate()
                .all(|(i, b)| *b == output_pattern(i as u64))
        );
    }

    #[tokio::test]
    async fn unknown_directive_fails_the_step() {
        let (end, _) = run("frobnicate 3").await;
        match end.unwrap() {
            StepEnd::Failed { message } => assert!(message.contains("frobnicate"), "{message}"),
            other => panic!("unexpected {other:?}"),
        }
        let (end, _) = run("sleep soon").await;
        assert!(matches!(end.unwrap(), StepEnd::Failed { .. }));
    }

    #[tokio::test]
    async fn other_kinds_succeed_with_a_log_line() {
        let step = Step {
            kind: Some(step::Kind::Push(PushStep {
                image: "reg/app:1".into(),
                credentials: "harbor".into(),
                force: false,
            })),
            ..Step::default()
        };
        let (end, sink) = run_with(step, CancellationToken::new(), None).await;
        assert_eq!(end.unwrap(), StepEnd::Exited(0));
        assert_eq!(sink.text(), "fake: would push reg/app:1\n");
    }
}
