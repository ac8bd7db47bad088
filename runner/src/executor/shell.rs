//! The `shell` executor: runs `run` steps as host processes in the attempt's
//! workspace. No isolation; opt-in (and the default of `capstan dev`).
//!
//! Each step is `/bin/sh -ec SCRIPT` (a multi-line script stops at the first
//! failing line, like GitLab), in its own process group so that a timeout or
//! cancel can stop every process the script started. The runner's own
//! environment is not inherited: a step starts from the allow-list of
//! [`super::host_env`] (`PATH`, `HOME`, `LANG`, ...; never the runner's
//! credentials), with the step's variables on top.
//!
//! A step usually starts in a *warm* shell: one `/bin/sh -es` started ahead
//! of time, blocked reading its script from stdin (see [`WarmShell`]). At
//! the step's start the runner writes `cd WORKSPACE; export VARS; SCRIPT`
//! to it in one atomic pipe write and closes the pipe, so the fork, the
//! exec and the shell's own start-up (most of a pickup's process start)
//! happened before the task arrived. The step cannot tell
//! the difference: same shell, same `-e`, `$0` and line numbers, and stdin
//! at end of file. What a warm shell cannot express exactly (a script over
//! one pipe write, a variable the shell treats specially) starts cold, as
//! `/bin/sh -ec SCRIPT`.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsFd;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use capstan_proto::pipeline::v1::step;
use futures::FutureExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tracing::debug;

use super::{Executor, ExecutorError, host_env, step_env};
use crate::logs::sink::OutputSink;
use crate::step::{StepContext, StepEnd, TaskContext, sleep_until_deadline, step_kind_name};

/// Time between SIGTERM and SIGKILL when a step is stopped.
const KILL_GRACE: Duration = Duration::from_secs(2);
const SHELL: &str = "/bin/sh";

/// Runs steps as host processes. Every step's processes are gone when
/// `run_step` returns; between steps it keeps one idle warm shell.
#[derive(Debug, Default)]
pub(crate) struct ShellExecutor {
    /// The next step's shell, started ahead. One, not one per slot: it is
    /// refilled when a step ends, which covers a runner's usual case (one
    /// task at a time, steps one after another); concurrent steps beyond it
    /// start cold.
    warm: std::sync::Mutex<Option<WarmShell>>,
    /// `/bin/sh` is dash ([`warm_capable`]) and this executor was made by
    /// [`ShellExecutor::new`] in a runtime; else every step starts cold.
    warm_enabled: bool,
}

impl ShellExecutor {
    /// Starts the first warm shell when called inside a Tokio runtime (the
    /// runner); elsewhere the first step starts cold.
    pub(crate) fn new() -> Self {
        let executor = Self {
            warm: Default::default(),
            warm_enabled: tokio::runtime::Handle::try_current().is_ok() && warm_capable(),
        };
        executor.refill();
        executor
    }

    /// Starts a warm shell if none is waiting. Best effort: without one the
    /// next step starts cold.
    fn refill(&self) {
        if !self.warm_enabled {
            return;
        }
        let Ok(mut slot) = self.warm.lock() else {
            return;
        };
        if slot.is_none() {
            match WarmShell::start() {
                Ok(shell) => *slot = Some(shell),
                Err(e) => debug!(error = %e, "could not start a warm shell"),
            }
        }
    }

    /// Hands `script` to the waiting warm shell and returns it as the
    /// step's process, or `None` (the caller starts a cold shell) when
    /// there is none, it died, or the script cannot be written exactly.
    fn start_warm(
        &self,
        workspace: &std::path::Path,
        env: &BTreeMap<String, String>,
        script: &str,
    ) -> Option<Child> {
        // A missing workspace is the runner's error (a cold spawn reports
        // it as such), not a step's failed `cd`.
        if !workspace.is_dir() {
            return None;
        }
        let text = warm_script(workspace, env, script)?;
        let mut shell = self.warm.lock().ok()?.take()?;
        if !matches!(shell.child.try_wait(), Ok(None)) {
            return None;
        }
        // At most PIPE_BUF bytes into an empty pipe: one write, whole or
        // not at all, so the shell never sees half a script. A failure
        // drops the shell, which kills it.
        match nix::unistd::write(&shell.stdin, text.as_bytes()) {
            Ok(n) if n == text.len() => {
                drop(shell.stdin);
                Some(shell.child)
            }
            _ => None,
        }
    }
}

/// `/bin/sh -es` started ahead of its step, in its own process group,
/// stdout and stderr piped, blocked reading stdin. Its script arrives in one
/// write followed by end of file: the shell reads it all before it runs the
/// first command, so a command that reads stdin gets end of file, as with
/// `/dev/null` in a cold shell. If the runner dies, the shell reads end of
/// file and exits having run nothing.
#[derive(Debug)]
struct WarmShell {
    child: Child,
    stdin: tokio::process::ChildStdin,
}

impl WarmShell {
    fn start() -> io::Result<Self> {
        let mut child = Command::new(SHELL)
            .arg("-es")
            // Not the workspace: the script `cd`s there, and an idle shell
            // should hold no attempt's directory.
            .current_dir("/")
            .env_clear()
            .envs(host_env::base())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("warm shell has no stdin"))?;
        Ok(Self { child, stdin })
    }
}

/// Whether `/bin/sh` is dash, the shell the warm path is written and
/// tested for. bash as `sh` rejects `set +s` and reads a script from a
/// pipe byte by byte (a command reading stdin would eat the rest of the
/// script), so any other shell starts every step cold.
fn warm_capable() -> bool {
    std::fs::canonicalize(SHELL)
        .ok()
        .and_then(|p| p.file_name().map(|n| n == "dash"))
        .unwrap_or(false)
}

/// Largest script handed to a warm shell: one atomic pipe write (POSIX
/// PIPE_BUF on Linux).
const WARM_MAX: usize = 4096;

/// Variables a shell sets or ignores at start-up rather than taking from
/// the environment: exporting them in the script would differ from a cold
/// shell started with them in its environment.
const WARM_RESERVED: [&str; 5] = ["IFS", "OLDPWD", "OPTIND", "PPID", "PWD"];

/// The warm shell's script: `set +s`, `cd` to the workspace (physical path, as a
/// cold shell's `$PWD`), no `OLDPWD` (a cold shell has none), each variable
/// exported, then the step's script, all on the script's first line so
/// that line numbers in the shell's messages are the script's own. `None`
/// when that is not exact: a name that is not a plain shell name or is in
/// [`WARM_RESERVED`], a newline in a value or the workspace, a
/// NUL byte (a cold spawn reports it), a non-UTF-8 workspace,
/// or more than [`WARM_MAX`] bytes.
fn warm_script(
    workspace: &std::path::Path,
    env: &BTreeMap<String, String>,
    script: &str,
) -> Option<String> {
    fn quote(out: &mut String, value: &str) {
        out.push('\'');
        out.push_str(&value.replace('\'', "'\\''"));
        out.push('\'');
    }
    let plain = |name: &str| {
        name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !WARM_RESERVED.contains(&name)
    };
    let mut text = String::with_capacity(script.len() + 256);
    // `-s` (script from stdin) would show in `$-`; a cold shell has only
    // `e`. Then stdin becomes `/dev/null`, as a cold shell's: the shell has
    // the whole script in its buffer by now (one read of one atomic write).
    text.push_str("set +s; exec </dev/null; cd -P -- ");
    quote(&mut text, workspace.to_str()?);
    // A cold shell has no `OLDPWD` (not in the allow-list); the `cd` set one.
    text.push_str(" || exit; unset OLDPWD; ");
    for (name, value) in env {
        if !plain(name) {
            return None;
        }
        text.push_str("export ");
        text.push_str(name);
        text.push('=');
        quote(&mut text, value);
        text.push_str("; ");
    }
    // A newline in the prefix would move the script off line 1, and the
    // shell's messages would name the wrong line.
    if text.contains('\n') {
        return None;
    }
    text.push_str(script);
    text.push('\n');
    (text.len() <= WARM_MAX && !text.contains('\0')).then_some(text)
}

enum Stop {
    Cancelled,
    TimedOut,
}

#[async_trait]
impl Executor for ShellExecutor {
    async fn setup_task(&self, task: &TaskContext) -> Result<(), ExecutorError> {
        match task.task.services.first() {
            None => Ok(()),
            Some(s) => Err(ExecutorError::Setup {
                message: format!(
                    "the task has services (`{}`), which only the docker executor runs: \
                     send it to a docker runner with `runs-on`",
                    s.name
                ),
            }),
        }
    }

    async fn run_step(
        &self,
        task: &TaskContext,
        ctx: StepContext<'_>,
    ) -> Result<StepEnd, ExecutorError> {
        let script = match &ctx.step.kind {
            Some(step::Kind::Run(run)) => run.script.clone(),
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
        let env = step_env(task, ctx.step);
        let script = exec_simple(&script);
        let child = match self.start_warm(&task.workspace, &env, &script) {
            Some(child) => child,
            None => Command::new(SHELL)
                .arg("-ec")
                .arg(script.as_ref())
                .current_dir(&task.workspace)
                .env_clear()
                .envs(host_env::base())
                .envs(&env)
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
                })?,
        };
        let end = supervise(child, &ctx).await;
        // After the step, off its start: the next step's shell.
        self.refill();
        end
    }

    async fn destroy_step(&self, _task: &TaskContext, _index: u32) -> Result<(), ExecutorError> {
        Ok(())
    }

    async fn destroy_task(&self, _task: &TaskContext) -> Result<(), ExecutorError> {
        Ok(())
    }
}

/// Pumps the step's output to its sink until both pipes close, and waits
/// for the shell, stopping its process group on cancel or deadline.
async fn supervise(mut child: Child, ctx: &StepContext<'_>) -> Result<StepEnd, ExecutorError> {
    let index = ctx.index;
    let pgid = child.id().and_then(|id| i32::try_from(id).ok());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let pump_all = async { tokio::try_join!(pump(stdout, ctx.output), pump(stderr, ctx.output)) };
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
    use crate::logs::sink::testing::VecSink;
    use crate::step::testing::{run_step, task};
    use capstan_proto::pipeline::v1::{BuildStep, Step};
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    async fn run(
        workspace: &std::path::Path,
        step: Step,
        cancel: CancellationToken,
        deadline: Option<Instant>,
    ) -> (StepEnd, VecSink) {
        run_with(&ShellExecutor::new(), workspace, step, cancel, deadline).await
    }

    #[tokio::test]
    async fn a_task_with_services_is_refused_naming_the_docker_executor() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = task(dir.path().to_owned(), vec![run_step("true")]);
        t.task.services.push(capstan_proto::pipeline::v1::Service {
            name: "db".into(),
            image: "postgres:16".into(),
            ..Default::default()
        });
        let e = ShellExecutor::new().setup_task(&t).await.unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("services (`db`)") && text.contains("docker executor"),
            "{text}"
        );
    }

    /// Runs `step` with `executor` in `workspace`: its end and its output.
    pub(super) async fn run_with(
        executor: &ShellExecutor,
        workspace: &std::path::Path,
        step: Step,
        cancel: CancellationToken,
        deadline: Option<Instant>,
    ) -> (StepEnd, VecSink) {
        let task = task(workspace.to_owned(), vec![step.clone()]);
        let (end, sink) = run_in_task(executor, &task, &step, cancel, deadline).await;
        (end.unwrap(), sink)
    }

    /// Runs `step` as step 0 of `task`: what `run_step` returned, and the
    /// output.
    pub(super) async fn run_in_task(
        executor: &ShellExecutor,
        task: &TaskContext,
        step: &Step,
        cancel: CancellationToken,
        deadline: Option<Instant>,
    ) -> (Result<StepEnd, ExecutorError>, VecSink) {
        let sink = VecSink::default();
        let end = executor
            .run_step(
                task,
                StepContext {
                    index: 0,
                    step,
                    cancel,
                    deadline,
                    output: &sink,
                },
            )
            .await;
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
        let mut task = task(dir.path().canonicalize().unwrap(), vec![step.clone()]);
        task.task.env.insert("TASK_VAR".into(), "task".into());
        task.task.env.insert("SHARED".into(), "from-task".into());
        let (end, sink) = run_in_task(
            &ShellExecutor::new(),
            &task,
            &step,
            CancellationToken::new(),
            None,
        )
        .await;
        assert_eq!(end.unwrap(), StepEnd::Exited(0));
        assert_eq!(
            sink.text(),
            "task step from-step run-1 test att-1\nin-workspace\n"
        );
    }

    /// The runner's environment holds its credentials; a step sees only
    /// the allow-list, its own variables and the attempt's, warm or cold.
    #[tokio::test]
    async fn a_step_never_sees_the_runners_environment() {
        // This test's own process stands for the runner: cargo and nextest
        // put variables in its environment that no allow-list has.
        let outside: Vec<String> = std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| !host_env::passed(k))
            .collect();
        assert!(
            outside.iter().any(|k| k.starts_with("CARGO")),
            "{outside:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut step = run_step("env | sort");
        step.env.insert("STEP_VAR".into(), "step".into());
        for executor in [ShellExecutor::new(), ShellExecutor::default()] {
            let (end, sink) = run_with(
                &executor,
                dir.path(),
                step.clone(),
                CancellationToken::new(),
                None,
            )
            .await;
            assert_eq!(end, StepEnd::Exited(0));
            let text = sink.text();
            assert!(!text.contains("leak"), "{text}");
            let names: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split_once('=').map(|(k, _)| k))
                .filter(|k| !host_env::passed(k))
                .collect();
            assert_eq!(
                names,
                [
                    "CAPSTAN_ATTEMPT_ID",
                    "CAPSTAN_OUTPUT",
                    "CAPSTAN_RUN_ID",
                    "CAPSTAN_TASK",
                    "CAPSTAN_WORKSPACE",
                    "PWD",
                    "STEP_VAR"
                ],
                "{text}"
            );
        }
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

#[cfg(test)]
mod warm_tests {
    use super::*;
    use crate::step::testing::run_step;
    use tokio_util::sync::CancellationToken;

    /// Runs `script` with `executor` in `workspace`; exit and output.
    async fn step_in(
        executor: &ShellExecutor,
        workspace: &std::path::Path,
        script: &str,
        env: &[(&str, &str)],
    ) -> (StepEnd, String) {
        let mut step = run_step(script);
        for (k, v) in env {
            step.env.insert((*k).into(), (*v).into());
        }
        let (end, sink) =
            super::tests::run_with(executor, workspace, step, CancellationToken::new(), None).await;
        (end, sink.text())
    }

    fn warm_pid(executor: &ShellExecutor) -> Option<u32> {
        let slot = executor.warm.lock().unwrap();
        slot.as_ref().and_then(|w| w.child.id())
    }

    /// A warm shell must be indistinguishable from a cold one: each script
    /// runs in both and must give the same exit code and output.
    #[tokio::test]
    async fn a_warm_shell_runs_a_step_exactly_as_a_cold_one() {
        assert!(
            warm_capable(),
            "these tests expect /bin/sh to be dash (Debian)"
        );
        let dir = tempfile::tempdir().unwrap();
        let scripts: &[(&str, &[(&str, &str)])] = &[
            ("echo \"$0 $LINENO $-\"; pwd; echo \"[$OLDPWD]\"", &[]),
            ("env | grep -v '^CAPSTAN_WORKSPACE=' | sort", &[("A", "x")]),
            (
                "printf '%s|' \"$Q\" \"$N\" \"$D\"",
                &[
                    ("Q", "it's \"q\""),
                    ("N", "two\nlines"),
                    ("D", "$HOME `x` \\"),
                ],
            ),
            ("exec 2>&1\necho one\nno-such-command-here\necho never", &[]),
            ("read line || echo stdin-at-eof; cat; echo after", &[]),
            // One stream each: the order between two pipes is not fixed.
            ("echo out; exit 3", &[]),
            ("echo err >&2; exit 4", &[]),
            (
                "test \"$CAPSTAN_WORKSPACE\" = \"$(pwd)\" && echo in-workspace",
                &[],
            ),
            ("# a comment first\necho $LINENO", &[]),
            ("false", &[]),
            (
                "[ -p /dev/stdin ] && echo pipe || echo not-a-pipe; stat -L -c %F /proc/self/fd/0",
                &[],
            ),
            // A newline in a value: the warm path starts it cold, so the
            // line numbers in the shell's messages stay the script's.
            (
                "exec 2>&1\nno-such-command-here",
                &[("PEM", "line 1\nline 2")],
            ),
            (
                "echo \"$IFS\" | od -c; echo \"$OPTIND\"",
                &[("IFS", ":"), ("OPTIND", "4")],
            ),
        ];
        for (script, env) in scripts {
            let cold = ShellExecutor::default();
            let cold_ws = dir.path().join("cold");
            std::fs::create_dir_all(&cold_ws).unwrap();
            let warm = ShellExecutor::new();
            let warm_ws = dir.path().join("warm");
            std::fs::create_dir_all(&warm_ws).unwrap();
            assert!(warm_pid(&warm).is_some(), "new() starts a warm shell");
            assert!(warm_pid(&cold).is_none());
            let (cold_end, cold_out) = step_in(&cold, &cold_ws, script, env).await;
            let (warm_end, warm_out) = step_in(&warm, &warm_ws, script, env).await;
            let warm_out = warm_out.replace("/warm", "/cold");
            assert_eq!(cold_end, warm_end, "{script:?}\n{cold_out}\n{warm_out}");
            assert_eq!(cold_out, warm_out, "{script:?}");
            std::fs::remove_dir_all(&cold_ws).unwrap();
            std::fs::remove_dir_all(&warm_ws).unwrap();
        }
    }

    #[tokio::test]
    async fn a_step_runs_in_the_warm_shell_and_the_next_one_is_started_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let executor = ShellExecutor::new();
        let first = warm_pid(&executor).expect("a warm shell");
        let (end, out) = step_in(&executor, dir.path(), "echo $$", &[]).await;
        assert_eq!(end, StepEnd::Exited(0));
        assert_eq!(out.trim(), first.to_string(), "the step is the warm shell");
        let second = warm_pid(&executor).expect("refilled after the step");
        assert_ne!(first, second);
        let (_, out) = step_in(&executor, dir.path(), "echo $$", &[]).await;
        assert_eq!(out.trim(), second.to_string());
        // A script the warm shell cannot take exactly starts cold and
        // leaves the warm shell for the next step.
        let third = warm_pid(&executor).unwrap();
        let long = format!("echo $$ # {}", "x".repeat(WARM_MAX));
        let (end, out) = step_in(&executor, dir.path(), &long, &[]).await;
        assert_eq!(end, StepEnd::Exited(0));
        assert_ne!(out.trim(), third.to_string());
        assert_eq!(warm_pid(&executor), Some(third));
        let (_, out) = step_in(&executor, dir.path(), "echo $$", &[("PWD", "/x")]).await;
        assert_ne!(out.trim(), third.to_string(), "PWD is reserved: cold");
    }

    #[tokio::test]
    async fn a_missing_workspace_is_a_spawn_error_warm_or_cold() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let step = run_step("echo never");
        let task = crate::step::testing::task(gone, vec![step.clone()]);
        for executor in [ShellExecutor::new(), ShellExecutor::default()] {
            let (end, sink) =
                super::tests::run_in_task(&executor, &task, &step, CancellationToken::new(), None)
                    .await;
            assert!(
                matches!(end, Err(ExecutorError::Spawn { .. })),
                "{end:?} {:?}",
                sink.text()
            );
        }
    }

    #[tokio::test]
    async fn a_dead_warm_shell_is_replaced_by_a_cold_one() {
        let dir = tempfile::tempdir().unwrap();
        let executor = ShellExecutor::new();
        let pid = warm_pid(&executor).unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // Until it is reaped, the write may still succeed into a pipe
        // nobody reads; wait until the kernel shows it gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while executor
            .warm
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|w| matches!(w.child.try_wait(), Ok(None)))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "warm shell not killed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (end, out) = step_in(&executor, dir.path(), "echo ran", &[]).await;
        assert_eq!(end, StepEnd::Exited(0));
        assert_eq!(out, "ran\n");
    }

    #[test]
    fn the_warm_script_quotes_values_and_refuses_what_it_cannot_express() {
        let ws = std::path::Path::new("/w/it's");
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        let text = warm_script(ws, &env(&[("A_1", "a'b")]), "echo hi").unwrap();
        assert!(
            text.starts_with(
                "set +s; exec </dev/null; cd -P -- '/w/it'\\''s' || exit; unset OLDPWD; "
            ),
            "{text}"
        );
        assert!(text.ends_with("export A_1='a'\\''b'; echo hi\n"), "{text}");
        assert_eq!(text.lines().count(), 1, "the script's line 1 stays line 1");
        for bad in [
            "1A", "A-B", "A.B", "", "IFS", "PWD", "OLDPWD", "PPID", "OPTIND",
        ] {
            assert_eq!(warm_script(ws, &env(&[(bad, "v")]), "true"), None, "{bad}");
        }
        assert_eq!(warm_script(ws, &env(&[("A", "a\0b")]), "true"), None);
        assert_eq!(
            warm_script(ws, &env(&[("PEM", "line 1\nline 2")]), "true"),
            None
        );
        let ws_newline = std::path::Path::new("/w/two\nlines");
        assert_eq!(warm_script(ws_newline, &env(&[]), "true"), None);
        assert_eq!(warm_script(ws, &env(&[]), &"x".repeat(WARM_MAX)), None);
    }
}
