//! The live view of a run (`submit --follow`, `dev`).
//!
//! Subscribes to `WatchRun`; for every task that starts (or is already
//! finished), opens its log with `ReadLogs(follow)` and prints its lines to
//! stdout as `[task] line`. State changes go to stderr as plain lines
//! ("▶ build started on runner dev"); on a terminal stderr there is also one
//! spinner per task. stdout carries only the logs, so
//! `capstan submit --follow p.yaml > build.log` captures the build's output.
//!
//! With `-o json`, stdout carries JSON lines instead: `{"event": "log", ...}`
//! per log line, `{"event": "task", ...}` per state change and a final
//! `{"event": "run", ...}`.
//!
//! Ctrl-C stops following (the run goes on) and exits 130.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::time::Duration;

use capstan_client::{Client, ClientError};
use capstan_proto::api::v1::{LogData, Run, Task};
use capstan_proto::ids::RunId;
use capstan_proto::pipeline::v1::{RunState, TaskState};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::exit::{Exit, Failure};
use crate::log_printer::{LogMode, LogPrinter};
use crate::output::{
    Format, format_duration_ms, run_finished, run_json, run_state_name, task_finished, task_json,
    task_state_name,
};

/// How long to wait for the last log bytes once the run has ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Times a broken watch or log stream is reopened before giving up.
const MAX_REOPENS: u32 = 5;

enum LogEvent {
    Data(LogData),
    Ended { task: String },
    Failed { task: String, error: String },
}

/// Follows `run` until it ends; the exit is the run's result. `resumable`:
/// the run outlives this process (not so under `capstan dev`), so Ctrl-C
/// says how to pick it up again.
pub(crate) async fn follow(
    client: &Client,
    run: &RunId,
    format: Format,
    resumable: bool,
) -> Result<Exit, Failure> {
    let mut view = View::new(format);
    let mut watch = client
        .watch_run(run)
        .await
        .map_err(|e| Failure::for_run(e, run.as_str()))?;
    let started = Instant::now();
    let (log_tx, mut log_rx) = mpsc::channel::<LogEvent>(256);
    let mut tasks = Tasks {
        readers: JoinSet::new(),
        reading: HashSet::new(),
        seen: HashMap::new(),
        log_tx,
    };
    let mut reopens = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    let last = loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                view.interrupted(run, resumable);
                tasks.readers.abort_all();
                return Ok(Exit::Interrupted);
            }
            Some(event) = log_rx.recv() => view.log(event),
            message = watch.message() => {
                let failure = match message {
                    Ok(Some(event)) => {
                        let Some(current) = event.run else { continue };
                        tasks.update(&mut view, client, run, &current);
                        if run_finished(current.state) {
                            break current;
                        }
                        reopens = 0;
                        continue;
                    }
                    Ok(None) => "the coordinator closed the watch before the run ended".to_string(),
                    Err(status) => ClientError::Status(status).to_string(),
                };
                reopens += 1;
                if reopens > MAX_REOPENS {
                    view.finish_progress();
                    return Err(Failure::failed(format!(
                        "lost the watch on run {run}: {failure}; see `capstan status {run}`"
                    )));
                }
                tracing::debug!(%failure, "reopening the watch");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(reopens))).await;
                watch = client.watch_run(run).await.map_err(|e| Failure::for_run(e, run.as_str()))?;
            }
        }
    };

    // The run has ended: print what is left of the logs.
    tasks.drain(&mut view, &mut log_rx).await;
    view.finish_logs();
    view.summary(&last, started.elapsed());
    Ok(Exit::of_run(
        RunState::try_from(last.state).unwrap_or(RunState::Failed),
    ))
}

/// The tasks of the followed run: the last state seen of each, and one log
/// reader per task that has a log.
struct Tasks {
    readers: JoinSet<()>,
    reading: HashSet<String>,
    seen: HashMap<String, Task>,
    /// Where the readers send ([`Tasks::drain`] drops it).
    log_tx: mpsc::Sender<LogEvent>,
}

impl Tasks {
    /// Once the run has ended: prints what is left of the logs, waiting up
    /// to [`DRAIN_TIMEOUT`] for the log streams to end.
    async fn drain(self, view: &mut View, log_rx: &mut mpsc::Receiver<LogEvent>) {
        let Tasks {
            mut readers,
            log_tx,
            ..
        } = self;
        // Closes the log channel once every reader has ended.
        drop(log_tx);
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(event) = log_rx.recv().await {
                view.log(event);
            }
        })
        .await;
        if drained.is_err() {
            readers.abort_all();
            view.note("(some log output may be missing: the log streams did not end in time)");
        }
    }

    /// Shows what changed in `current` and starts reading the log of every
    /// task that has one now (running, or finished after an attempt).
    fn update(&mut self, view: &mut View, client: &Client, run: &RunId, current: &Run) {
        view.widen(&current.tasks);
        for task in &current.tasks {
            let previous = self.seen.insert(task.name.clone(), task.clone());
            view.task_changed(previous.as_ref(), task);
            let has_log = task.state == TaskState::Running as i32
                || (task_finished(task.state) && task.attempts > 0);
            if has_log && self.reading.insert(task.name.clone()) {
                self.readers.spawn(read_task_logs(
                    client.clone(),
                    run.clone(),
                    task.name.clone(),
                    self.log_tx.clone(),
                ));
            }
        }
    }
}

/// Forwards one task's log; reopens a broken stream (the printer skips
/// bytes it already printed).
async fn read_task_logs(client: Client, run: RunId, task: String, tx: mpsc::Sender<LogEvent>) {
    let mut failures: u32 = 0;
    loop {
        let result: Result<(), ClientError> = async {
            let mut stream = client.read_logs(&run, Some(&task), true).await?;
            while let Some(chunk) = stream.message().await.map_err(ClientError::Status)? {
                if tx.send(LogEvent::Data(chunk)).await.is_err() {
                    break;
                }
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                let _ = tx.send(LogEvent::Ended { task }).await;
                return;
            }
            Err(e) => {
                failures += 1;
                if failures > MAX_REOPENS || e.code() == Some(tonic::Code::NotFound) {
                    let error = e.to_string();
                    let _ = tx.send(LogEvent::Failed { task, error }).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
            }
        }
    }
}

/// Where the follow output goes: stdout for logs, stderr for states, a
/// spinner per task when stderr is a terminal.
struct View {
    format: Format,
    printer: LogPrinter,
    progress: Option<Progress>,
}

struct Progress {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    width: usize,
}

impl View {
    fn new(format: Format) -> Self {
        let progress =
            (format == Format::Text && std::io::stderr().is_terminal()).then(|| Progress {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                bars: HashMap::new(),
                width: 0,
            });
        let mode = match format {
            Format::Text => LogMode::Prefixed,
            Format::Json => LogMode::Json,
        };
        Self {
            format,
            printer: LogPrinter::new(mode),
            progress,
        }
    }

    fn stdout(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let write = || {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        };
        match &self.progress {
            Some(p) => p.multi.suspend(write),
            None => write(),
        }
    }

    fn stderr_line(&self, line: &str) {
        match &self.progress {
            Some(p) => {
                let _ = p.multi.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// A line for the user that is not part of any log.
    fn note(&self, line: &str) {
        self.stderr_line(line);
    }

    fn log(&mut self, event: LogEvent) {
        let mut out = Vec::new();
        match event {
            LogEvent::Data(chunk) => self.printer.push(&chunk, &mut out),
            LogEvent::Ended { task } => self.printer.finish_task(&task, &mut out),
            LogEvent::Failed { task, error } => {
                self.printer.finish_task(&task, &mut out);
                self.stderr_line(&format!("! cannot read the log of {task}: {error}"));
            }
        }
        self.stdout(&out);
    }

    fn finish_logs(&mut self) {
        let mut out = Vec::new();
        self.printer.finish(&mut out);
        self.stdout(&out);
    }

    fn widen(&mut self, tasks: &[Task]) {
        if let Some(progress) = &mut self.progress {
            progress.widen(tasks);
        }
    }

    fn task_changed(&mut self, previous: Option<&Task>, task: &Task) {
        if previous.is_some_and(|p| p.state == task.state && p.attempts == task.attempts) {
            return;
        }
        if let Some(progress) = &mut self.progress {
            progress.update(task);
        }
        if self.format == Format::Json {
            let mut value = task_json(task);
            value["event"] = json!("task");
            self.stdout(format!("{value}\n").as_bytes());
            return;
        }
        if let Some(line) = transition_line(previous, task) {
            self.stderr_line(&line);
        }
    }

    fn summary(&mut self, run: &Run, elapsed: Duration) {
        self.finish_progress();
        if self.format == Format::Json {
            let mut value = run_json(run);
            value["event"] = json!("run");
            self.stdout(format!("{value}\n").as_bytes());
            return;
        }
        let took = if run.created_at_ms > 0 && run.finished_at_ms >= run.created_at_ms {
            run.finished_at_ms - run.created_at_ms
        } else {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        };
        eprintln!(
            "run {} {} in {}",
            run.id,
            run_state_name(run.state),
            format_duration_ms(took)
        );
    }

    fn interrupted(&mut self, run: &RunId, resumable: bool) {
        self.finish_logs();
        self.finish_progress();
        if !resumable {
            eprintln!("interrupted; stopping run {run} with the embedded coordinator and runner");
            return;
        }
        eprintln!(
            "stopped following; run {run} goes on. Resume with `capstan logs {run} --follow`, \
             check it with `capstan status {run}`, stop it with `capstan cancel {run}`"
        );
    }

    fn finish_progress(&mut self) {
        if let Some(progress) = self.progress.take() {
            for bar in progress.bars.values() {
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
        }
    }
}

impl Progress {
    /// Aligns the task names of every bar.
    fn widen(&mut self, tasks: &[Task]) {
        let width = tasks
            .iter()
            .map(|t| t.name.chars().count())
            .max()
            .unwrap_or(0);
        self.width = self.width.max(width);
    }

    fn update(&mut self, task: &Task) {
        let finished = task_finished(task.state);
        let mut message = task_state_name(task.state).to_string();
        if !task.runner.is_empty() && task.state == TaskState::Running as i32 {
            message.push_str(&format!(" on {}", task.runner));
        }
        if task.attempts > 1 {
            message.push_str(&format!(" (attempt {})", task.attempts));
        }
        if finished && !task.message.is_empty() && task.state != TaskState::Succeeded as i32 {
            message.push_str(&format!(": {}", task.message));
        }
        let bar = match self.bars.get(&task.name) {
            Some(bar) => bar.clone(),
            None => {
                // Hidden until added, so nothing is drawn outside the MultiProgress.
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix} {wide_msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(format!("{:<w$}", task.name, w = self.width));
                bar.set_message(message.clone());
                let bar = self.multi.add(bar);
                bar.enable_steady_tick(Duration::from_millis(120));
                self.bars.insert(task.name.clone(), bar.clone());
                bar
            }
        };
        if finished {
            bar.set_style(
                ProgressStyle::with_template("{prefix} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(format!(
                "{} {:<w$}",
                symbol(task.state),
                task.name,
                w = self.width
            ));
            bar.finish_with_message(message);
        } else {
            bar.set_message(message);
        }
    }
}

fn symbol(state: i32) -> &'static str {
    match TaskState::try_from(state) {
        Ok(TaskState::Succeeded) => "✔",
        Ok(TaskState::Failed) => "✘",
        Ok(TaskState::Cancelled | TaskState::Skipped) => "⊘",
        Ok(TaskState::Running) => "▶",
        _ => "·",
    }
}

/// The plain line for a task's state change, if it is worth one.
pub(crate) fn transition_line(previous: Option<&Task>, task: &Task) -> Option<String> {
    let name = &task.name;
    let was = previous.map(|p| p.state);
    let state = TaskState::try_from(task.state).ok()?;
    let reason = |default: &str| {
        let m = task.message.trim();
        if m.is_empty() {
            default.to_string()
        } else {
            format!(": {m}")
        }
    };
    let line = match state {
        TaskState::Running => {
            let mut line = format!("▶ {name} started");
            if !task.runner.is_empty() {
                line.push_str(&format!(" on runner {}", task.runner));
            }
            if task.attempts > 1 {
                line.push_str(&format!(" (attempt {})", task.attempts));
            }
            line
        }
        TaskState::Succeeded => {
            let mut line = format!("✔ {name} succeeded");
            if task.started_at_ms > 0 && task.finished_at_ms >= task.started_at_ms {
                line.push_str(&format!(
                    " in {}",
                    format_duration_ms(task.finished_at_ms - task.started_at_ms)
                ));
            }
            line
        }
        TaskState::Failed => {
            let default = task
                .exit_code
                .map(|c| format!(": exit code {c}"))
                .unwrap_or_default();
            format!("✘ {name} failed{}", reason(&default))
        }
        TaskState::Cancelled => format!("⊘ {name} cancelled"),
        TaskState::Skipped => {
            let m = task.message.trim();
            let m = m.strip_prefix("skipped:").unwrap_or(m).trim();
            if m.is_empty() {
                format!("⊘ {name} skipped")
            } else {
                format!("⊘ {name} skipped: {m}")
            }
        }
        TaskState::Queued if was == Some(TaskState::Running as i32) => {
            format!("↻ {name} requeued{}", reason(""))
        }
        _ => return None,
    };
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: TaskState) -> Task {
        Task {
            name: "build".into(),
            state: state as i32,
            attempts: 1,
            runner: "dev".into(),
            ..Task::default()
        }
    }

    #[test]
    fn transition_lines() {
        let running = task(TaskState::Running);
        assert_eq!(
            transition_line(None, &running).unwrap(),
            "▶ build started on runner dev"
        );
        let mut failed = task(TaskState::Failed);
        failed.message = "step 1 exited with 3".into();
        assert_eq!(
            transition_line(Some(&running), &failed).unwrap(),
            "✘ build failed: step 1 exited with 3"
        );
        let mut skipped = task(TaskState::Skipped);
        skipped.message = "skipped: test failed".into();
        assert_eq!(
            transition_line(None, &skipped).unwrap(),
            "⊘ build skipped: test failed"
        );
        let mut ok = task(TaskState::Succeeded);
        ok.started_at_ms = 1_000;
        ok.finished_at_ms = 3_500;
        assert_eq!(
            transition_line(Some(&running), &ok).unwrap(),
            "✔ build succeeded in 2.5s"
        );
        assert_eq!(transition_line(None, &task(TaskState::Queued)), None);
        assert_eq!(
            transition_line(Some(&running), &task(TaskState::Queued)).unwrap(),
            "↻ build requeued"
        );
    }
}
