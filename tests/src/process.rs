//! One way to run a child process of a test or a benchmark: [`Proc`]
//! spawns a command with its stdout and stderr appended to
//! `<dir>/<name>.log`, stops it with SIGKILL or SIGTERM (under a deadline),
//! pauses it with SIGSTOP, and kills and reaps it on drop. Also the log
//! helpers the failure messages use ([`tail_logs`]).

use crate::wait::{poll_until, poll_until_blocking};
use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A child process we started; killed (SIGKILL) and reaped on drop.
pub struct Proc {
    name: String,
    /// The process; tests wait on it ([`wait_exit`]).
    pub child: Child,
    /// Stopped with SIGSTOP: it accepts connections but never answers.
    paused: AtomicBool,
}

/// Opens `<dir>/<name>.log` for appending.
pub fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    let path = dir.join(format!("{name}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))
}

impl Proc {
    /// Spawns `cmd` (stdin from /dev/null) with its output appended to
    /// `<dir>/<name>.log`.
    pub fn spawn(mut cmd: Command, dir: &Path, name: &str) -> anyhow::Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file(dir, name)?)
            .stderr(log_file(dir, name)?)
            .spawn()
            .with_context(|| format!("spawn {}", cmd.get_program().to_string_lossy()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            paused: AtomicBool::new(false),
        })
    }

    /// The name its log file is called after.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` (errors ignored: the process may be gone).
    pub fn signal(&self, sig: Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// kill -9 and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for the exit (blocking the
    /// thread) and returns how long it took; past the deadline it is killed
    /// and the error names it.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.signal(Signal::SIGTERM);
        let exited = poll_until_blocking(timeout, Duration::from_millis(20), || {
            Ok(self.child.try_wait()?.map(|_| ()))
        })?;
        if exited.is_none() {
            self.kill();
            bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
        }
        Ok(started.elapsed())
    }

    /// SIGSTOP: the process keeps its sockets and answers nothing.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
        self.paused.store(true, Ordering::SeqCst);
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
        self.paused.store(false, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_paused() {
            self.resume();
        }
        self.kill();
    }
}

/// Waits until `child` exits, polling; fails naming `what` after `timeout`.
pub async fn wait_exit(
    child: &mut Child,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<ExitStatus> {
    let status = poll_until(timeout, Duration::from_millis(20), async || {
        Ok(child.try_wait()?)
    })
    .await?;
    status.with_context(|| format!("{what} within {timeout:?}"))
}

/// The last `lines` lines of every `*.log` file in `dir`, sorted by name,
/// for failure messages.
pub fn tail_logs(dir: &Path, lines: usize) -> String {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    let mut out = String::new();
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        out.push_str(&format!(
            "----- {} (last {lines} lines) -----\n{tail}\n",
            p.display()
        ));
    }
    out
}
