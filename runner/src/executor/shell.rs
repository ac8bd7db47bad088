//! The `shell` executor: runs `run` steps as host processes in the attempt's
//! workspace. No isolation; opt-in (and the default of `capstan dev`).
//!
//! Each step is `/bin/sh -ec SCRIPT` (a multi-line script stops at the first
//! failing line, like GitLab), in its own process group so that a timeout or
//! cancel can stop every process the script started. The runner's own
//! environment is inherited, with the step's variables on top.

use std::io;
use std::os::fd::AsFd;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use capstan_shared::proto::pipeline::v1::step;
use futures::FutureExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use super::{
    Executor, ExecutorError, OutputSink, StepContext, StepEnd, TaskContext, sleep_until_deadline,
    step_env, step_kind_name,
};

/// Time between SIGTERM and SIGKILL when a step is stopped.
const KILL_GRACE: Duration = Duration::from_secs(2);
const SHELL: &str = "/bin/sh";

/// Runs steps as host processes. Stateless: every step's processes are
/// gone when `run_step` returns.
#[derive(Debug, Default)]
pub struct ShellExecutor;

impl ShellExecutor {
    pub fn new() -> Self {
        Self
    }
}

enum Stop {
    Cancelled,
    TimedOut,
}

#[async_trait]
impl Executor for ShellExecutor {
    async fn setup_task(&self, _task: &TaskContext) -> Result<(), ExecutorError> {
        Ok(())
    }

    async fn run_step(
        &self,
        task: &TaskContext,
        ctx: StepContext<'_>,
    ) -> Result<StepEnd, ExecutorError> {
        let script = match &ctx.step.kind {
            Some(step::Kind::Run(run)) => run.script.clone(),
            // Run inside the runner with git2, the same under every executor.
            Some(step::Kind::SetImage(s)) => {
                return crate::steps::git_push::run_set_image(task, &ctx, s).await;
            }
            Some(step::Kind::GitPush(g)) => {
                return crate::steps::git_push::run_git_push(task, &ctx, g).await;
            }
            _ => {
                return Ok(StepEnd::Failed {
                    message: format!(
                        "step kind `{}` needs the docker executor",
                        step_kind_name(ctx.step)
                    ),
                });
            }
        };
        let index = ctx.index;
        let mut child = Command::new(SHELL)
            .arg("-ec")
            .arg(exec_simple(&script).as_ref())
            .current_dir(&task.workspace)
            .envs(step_env(task, ctx.step))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ExecutorError::Spawn {
                index,
                program: SHELL.into(),
                source,
            })?;
        let pgid = child.id().and_then(|id| i32::try_from(id).ok());
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let pump_all =
            async { tokio::try_join!(pump(stdout, ctx.output), pump(stderr, ctx.output)) };
        let supervise = async {
            let stop = tokio::select! {
                status = child.wait() => {
                    // The script is done; anything it left running in the
                    // background would hold the output pipes open.
                    kill_group(pgid, Signal::SIGKILL);
                    return status.map(exit_code);
                }
                () = ctx.cancel.cancelled() => Stop::Cancelled,
                () = sleep_until_deadline(ctx.deadline) => Stop::TimedOut,
            };
            terminate(&mut child, pgid).await?;
            Ok::<_, io::Error>(match stop {
                Stop::Cancelled => StepEnd::Cancelled,
                Stop::TimedOut => StepEnd::TimedOut,
            })
        };
        let (pumped, end) = tokio::join!(pump_all, supervise);
        let end = end.map_err(|source| ExecutorError::Wait { index, source })?;
        pumped.map_err(|source| ExecutorError::Output { index, source })?;
        Ok(end)
    }

    async fn destroy_step(&self, _task: &TaskContext, _index: u32) -> Result<(), ExecutorError> {
        Ok(())
    }

    async fn destroy_task(&self, _task: &TaskContext) -> Result<(), ExecutorError> {
        Ok(())
    }
}

/// `exec CMD` for a script that is one simple command, so that the shell
/// becomes the command instead of forking it (bash does this by itself, dash
/// does not): one fork and wait less per step, and the command is the
/// step's process. Anything else is left alone: several commands, pipes,
/// lists, subshells, groups, substitutions, escapes, and a first word that
/// is an assignment, a keyword or a builtin (`exec echo` would run
/// `/bin/echo`, `exec cd` fails).
fn exec_simple(script: &str) -> std::borrow::Cow<'_, str> {
    // Shell keywords, then dash's and bash's builtins.
    const NOT_EXTERNAL: &str = "! case do done elif else esac fi for function if in select then \
        time until while [[ ]] { } \
        . : [ alias bg bind break builtin caller cd chdir command compgen complete compopt \
        continue declare dirs disown echo enable eval exec exit export false fc fg getopts hash \
        help history jobs kill let local logout mapfile popd printf pushd pwd read readarray \
        readonly return set shift shopt source suspend test times trap true type typeset ulimit \
        umask unalias unset wait";
    let line = script.trim();
    let first = line.split_ascii_whitespace().next().unwrap_or_default();
    let simple = !line.is_empty()
        && !line.contains(|c| {
            matches!(
                c,
                '\n' | '\r' | ';' | '&' | '|' | '(' | ')' | '{' | '}' | '`' | '\\'
            )
        })
        && first
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '+' | '-'))
        && !first.starts_with('-')
        && !NOT_EXTERNAL.split_ascii_whitespace().any(|w| w == first);
    if simple {
        format!("exec {line}").into()
    } else {
        script.into()
    }
}

fn exit_code(status: std::process::ExitStatus) -> StepEnd {
    use std::os::unix::process::ExitStatusExt;
    StepEnd::Exited(
        status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1),
    )
}

/// SIGTERM to the group, SIGKILL after [`KILL_GRACE`], then reap the child.
async fn terminate(child: &mut Child, pgid: Option<i32>) -> io::Result<()> {
    kill_group(pgid, Signal::SIGTERM);
    if tokio::time::timeout(KILL_GRACE, child.wait())
        .await
        .is_err()
    {
        kill_group(pgid, Signal::SIGKILL);
        child.wait().await?;
    }
    // Whatever ignored SIGTERM but outlived the shell goes too.
    kill_group(pgid, Signal::SIGKILL);
    Ok(())
}

fn kill_group(pgid: Option<i32>, signal: Signal) {
    if let Some(pgid) = pgid {
        // ESRCH: the group is already gone, which is what we want.
        let _ = killpg(Pid::from_raw(pgid), signal);
    }
}

/// Most output handed to the sink in one write.
const PUMP_BATCH: usize = 1024 * 1024;
/// Pipe buffer asked for (1 MiB: the unprivileged maximum by default).
const PIPE_SIZE: i32 = 1024 * 1024;

/// Copies `reader` to `sink` until end of file. Each sink write takes what
/// the pipe holds at that moment (up to [`PUMP_BATCH`]), not one read's
/// worth: a fast writer costs one spool append per batch instead of one per
/// 4 to 64 KiB read.
async fn pump(
    reader: Option<impl AsyncRead + AsFd + Unpin>,
    sink: &dyn OutputSink,
) -> io::Result<()> {
    let Some(mut reader) = reader else {
        return Ok(());
    };
    // Best effort: with a pipe larger than Linux's default 64 KiB a fast
    // writer runs on while the previous batch is stored, so batches are
    // bigger and the writer blocks less.
    let _ = nix::fcntl::fcntl(&reader, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    loop {
        let mut buf = Vec::with_capacity(PUMP_BATCH);
        if reader.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        let mut end = Ok(false);
        while buf.len() < PUMP_BATCH {
            match reader.read_buf(&mut buf).now_or_never() {
                Some(Ok(0)) => {
                    end = Ok(true);
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    end = Err(e);
                    break;
                }
                // Nothing more for now.
                None => break,
            }
        }
        sink.write_owned(buf).await?;
        if end? {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::testing::{VecSink, run_step, task};
    use capstan_shared::proto::pipeline::v1::{BuildStep, Step};
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    async fn run(
        workspace: &std::path::Path,
        step: Step,
        cancel: CancellationToken,
        deadline: Option<Instant>,
    ) -> (StepEnd, VecSink) {
        let sink = VecSink::default();
        let task = task(workspace.to_owned(), vec![step.clone()]);
        let end = ShellExecutor::new()
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
            .await
            .unwrap();
        (end, sink)
    }

    #[tokio::test]
    async fn reports_exit_code_and_stops_at_first_failing_line() {
        let dir = tempfile::tempdir().unwrap();
        let (end, sink) = run(
            dir.path(),
            run_step("echo before\nfalse\necho after"),
            CancellationToken::new(),
            None,
        )
        .await;
        assert_eq!(end, StepEnd::Exited(1));
        assert_eq!(sink.text(), "before\n");
        let (end, _) = run(
            dir.path(),
            run_step("exit 7"),
            CancellationToken::new(),
            None,
        )
        .await;
        assert_eq!(end, StepEnd::Exited(7));
        let (end, _) = run(dir.path(), run_step("true"), CancellationToken::new(), None).await;
        assert_eq!(end, StepEnd::Exited(0));
    }

    #[tokio::test]
    async fn captures_stdout_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let (end, sink) = run(
            dir.path(),
            run_step("echo out; echo err >&2; printf 'raw\\001bytes'"),
            CancellationToken::new(),
            None,
        )
        .await;
        assert_eq!(end, StepEnd::Exited(0));
        let text = sink.text();
        assert!(text.contains("out\n"), "{text:?}");
        assert!(text.contains("err\n"), "{text:?}");
        assert!(text.contains("raw\u{1}bytes"), "{text:?}");
    }

    #[tokio::test]
    async fn sets_env_and_runs_in_the_workspace() {
        let dir = tempfile::tempdir().unwrap();
        let mut step = run_step(
            "echo \"$TASK_VAR $STEP_VAR $SHARED $CAPSTAN_RUN_ID $CAPSTAN_TASK $CAPSTAN_ATTEMPT_ID\"; \
             test \"$CAPSTAN_WORKSPACE\" = \"$(pwd)\" && echo in-workspace",
        );
        step.env.insert("STEP_VAR".into(), "step".into());
        step.env.insert("SHARED".into(), "from-step".into());
        let sink = VecSink::default();
        let mut task = task(dir.path().canonicalize().unwrap(), vec![step.clone()]);
        task.task.env.insert("TASK_VAR".into(), "task".into());
        task.task.env.insert("SHARED".into(), "from-task".into());
        let end = ShellExecutor::new()
            .run_step(
                &task,
                StepContext {
                    index: 0,
                    step: &step,
                    cancel: CancellationToken::new(),
                    deadline: None,
                    output: &sink,
                },
            )
            .await
            .unwrap();
        assert_eq!(end, StepEnd::Exited(0));
        assert_eq!(
            sink.text(),
            "task step from-step run-1 test att-1\nin-workspace\n"
        );
    }

    fn process_gone(pid: &str) -> bool {
        // A zombie (state Z) counts as gone: it runs nothing and holds nothing.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(false),
        }
    }

    async fn assert_child_killed(dir: &std::path::Path) {
        let pid = std::fs::read_to_string(dir.join("pid")).unwrap();
        let pid = pid.trim();
        let until = std::time::Duration::from_secs(3);
        let start = Instant::now();
        while !process_gone(pid) {
            assert!(start.elapsed() < until, "child {pid} still alive");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let (end, _) = run(
            dir.path(),
            run_step("sleep 100 &\necho $! > pid\nwait"),
            CancellationToken::new(),
            Some(Instant::now() + std::time::Duration::from_millis(500)),
        )
        .await;
        assert_eq!(end, StepEnd::TimedOut);
        assert!(started.elapsed() < std::time::Duration::from_secs(4));
        assert_child_killed(dir.path()).await;
    }

    #[tokio::test]
    async fn cancel_kills_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            trigger.cancel();
        });
        let (end, _) = run(
            dir.path(),
            run_step("sleep 100 &\necho $! > pid\nwait"),
            cancel,
            None,
        )
        .await;
        assert_eq!(end, StepEnd::Cancelled);
        assert_child_killed(dir.path()).await;
    }

    #[tokio::test]
    async fn background_leftovers_do_not_hang_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let (end, _) = run(
            dir.path(),
            run_step("sleep 100 &\necho $! > pid\necho done"),
            CancellationToken::new(),
            None,
        )
        .await;
        assert_eq!(end, StepEnd::Exited(0));
        assert!(started.elapsed() < std::time::Duration::from_secs(3));
        assert_child_killed(dir.path()).await;
    }

    #[tokio::test]
    async fn other_step_kinds_need_docker() {
        let dir = tempfile::tempdir().unwrap();
        let step = Step {
            kind: Some(step::Kind::Build(BuildStep::default())),
            ..Step::default()
        };
        let (end, _) = run(dir.path(), step, CancellationToken::new(), None).await;
        assert_eq!(
            end,
            StepEnd::Failed {
                message: "step kind `build` needs the docker executor".into()
            }
        );
    }

    #[test]
    fn only_one_simple_command_is_execed() {
        for (script, want) in [
            ("date +%s%N > /tmp/x", "exec date +%s%N > /tmp/x"),
            ("  cargo test --locked \n", "exec cargo test --locked"),
            (
                "./build.sh \"$TARGET\" 'a b'",
                "exec ./build.sh \"$TARGET\" 'a b'",
            ),
        ] {
            assert_eq!(exec_simple(script), want, "{script:?}");
        }
        for script in [
            "echo hi",
            "cd sub",
            "exit 3",
            "true",
            "A=1 env",
            "a; b",
            "a && b",
            "a | b",
            "a &",
            "make\nmake install",
            "(cd x)",
            "{ a; }",
            "ls `pwd`",
            "ls $(pwd)",
            "if x",
            "\"quoted cmd\" x",
            "a \\",
            "",
        ] {
            assert_eq!(exec_simple(script), script, "{script:?}");
        }
    }

    #[tokio::test]
    async fn an_execed_command_keeps_exit_code_output_redirects_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let (end, _) = run(
            dir.path(),
            run_step("sh -c 'exit 5'"),
            CancellationToken::new(),
            None,
        )
        .await;
        assert_eq!(end, StepEnd::Exited(5));
        let mut step = run_step("env");
        step.env.insert("STEP_VAR".into(), "step".into());
        let (end, sink) = run(dir.path(), step, CancellationToken::new(), None).await;
        assert_eq!(end, StepEnd::Exited(0));
        assert!(sink.text().contains("STEP_VAR=step\n"), "{:?}", sink.text());
        let (end, _) = run(
            dir.path(),
            run_step("date +%s > stamp"),
            CancellationToken::new(),
            None,
        )
        .await;
        assert_eq!(end, StepEnd::Exited(0));
        assert!(dir.path().join("stamp").exists(), "ran in the workspace");
        let (end, sink) = run(
            dir.path(),
            run_step("no-such-command-here x"),
            CancellationToken::new(),
            None,
        )
        .await;
        assert_eq!(end, StepEnd::Exited(127));
        assert!(sink.text().contains("not found"), "{:?}", sink.text());
    }
}
