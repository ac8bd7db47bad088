//! Runs one task attempt from start to final report.
//!
//! Order of events, which the "logs complete when a run is seen finished"
//! guarantee depends on:
//! 0. create the workspace and the log spool and start the spool's
//!    shipper; for a tentative offer, then wait for the agent's word that
//!    the coordinator confirmed it: if the agent drops it instead (the
//!    Control stream ended, or a cancel came first), remove all of that and
//!    end here, with no report: nothing of the attempt ran;
//! 1. check out the run's repository into the workspace (if the run has
//!    one);
//! 2. executor setup, then each step: `StepStateChanged` RUNNING, run,
//!    terminal `StepStateChanged`; a `run` step's log starts with a
//!    `$ <first line>` header, written with its first output (or when it
//!    ends, if it printed nothing) so that no file write delays the start of
//!    its process; the first step that does not succeed ends the attempt;
//!    then the services' output into the log (a task with services),
//!    then executor teardown (also after a panic in setup or a step)
//!    ([`steps`] runs the steps);
//! 3. wait until the coordinator acknowledged every log byte;
//! 4. empty the attempt's work dir and keep it as the next attempt's spare
//!    (or remove it; see [`WorkDir::retire_attempt_dir`]);
//! 5. hand the `TaskFinished` report to the agent, which delivers it.

mod steps;

use std::sync::Arc;
use std::time::Duration;

use capstan_proto::ids::{AttemptId, RunId};
use capstan_proto::runner::v1::{AttemptOutcome, Offer, StepStateChanged, TaskFinished};
use capstan_telemetry::OpenTelemetrySpanExt as _;
use futures::FutureExt as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, info_span, warn};

use crate::error::chain;
use crate::executor::Executor;
use crate::gitops::GitOps;
use crate::logs::LogTarget;
use crate::logs::mask::MaskingSink;
use crate::logs::shipper::ShipperHandle;
use crate::logs::sink::OutputSink;
use crate::logs::spool::Spool;
use crate::secrets::Secrets;
use crate::step::TaskContext;
use crate::workdir::WorkDir;

/// What an attempt tells the agent.
#[derive(Debug)]
pub(crate) enum AttemptEvent {
    Step(StepStateChanged),
    Finished(TaskFinished),
}

/// Everything one attempt needs.
pub(crate) struct AttemptSpec {
    pub offer: Offer,
    /// Where its dir and log spool go.
    pub work_dir: Arc<WorkDir>,
    pub executor: Arc<dyn Executor>,
    pub cancel: CancellationToken,
    /// For a tentative offer: fires when the coordinator confirmed it;
    /// closed unfired when the agent drops the attempt. `None`: run at once.
    pub confirmed: Option<oneshot::Receiver<()>>,
    pub events: mpsc::UnboundedSender<AttemptEvent>,
    pub log_target: watch::Receiver<Option<LogTarget>>,
    /// The runner's secrets (repository credentials).
    pub secrets: Arc<Secrets>,
    /// What is masked in the output ([`crate::logs::mask::patterns`]).
    pub mask: Arc<Vec<Vec<u8>>>,
    /// Name of the secret for fetching the repository, if any.
    pub git_credentials: Option<String>,
    /// Who `git-push` commits as (`--git-author`).
    pub git_author: crate::gitops::Author,
    /// How much of each step's output the log keeps.
    pub step_log_cap: crate::logs::cap::StepLogCap,
    /// The memory budget of the attempt's log spool
    /// ([`crate::logs::spool::budget_for`] the runner's capacity).
    pub log_memory: u64,
}

struct Outcome {
    outcome: AttemptOutcome,
    exit_code: Option<i32>,
    message: String,
}

impl Outcome {
    fn new(outcome: AttemptOutcome, exit_code: Option<i32>, message: impl Into<String>) -> Self {
        Self {
            outcome,
            exit_code,
            message: message.into(),
        }
    }
}

/// Runs the attempt and sends its [`AttemptEvent::Finished`] (none for an
/// attempt dropped before its confirm).
///
/// A panic anywhere in the attempt (a runner bug) is reported as an
/// infrastructure error instead of leaving the attempt "running" with its
/// slot taken until the task's timeout: the coordinator retries it elsewhere.
pub(crate) async fn run(mut spec: AttemptSpec) {
    let confirmed = spec.confirmed.take();
    let report = match std::panic::AssertUnwindSafe(execute(&spec, confirmed))
        .catch_unwind()
        .await
    {
        Ok(Some(report)) => report,
        Ok(None) => {
            make_spares_after(&spec).await;
            return;
        }
        Err(panic) => {
            let o = panicked(panic.as_ref());
            TaskFinished {
                attempt_id: spec.offer.attempt_id.clone(),
                outcome: o.outcome.into(),
                exit_code: o.exit_code,
                message: o.message,
                log_length: 0,
                outputs: Default::default(),
            }
        }
    };
    info!(
        outcome = report.outcome().as_str_name(),
        message = %report.message,
        log_bytes = report.log_length,
        "attempt finished"
    );
    let span = tracing::Span::current();
    span.record("capstan.attempt.outcome", report.outcome().as_str_name());
    let failed = matches!(
        report.outcome(),
        AttemptOutcome::Failed | AttemptOutcome::Error
    );
    mark_span(&span, !failed, &report.message);
    let _ = spec.events.send(AttemptEvent::Finished(report));
    // After the report, so the run's end does not wait for them.
    make_spares_after(&spec).await;
}

/// Replaces the attempt-dir spare if the attempt's dir did not become it
/// ([`WorkDir::replace_dir_spare`]).
async fn make_spares_after(spec: &AttemptSpec) {
    spec.work_dir
        .replace_dir_spare(&spec.offer.attempt_id)
        .await;
}

/// The outcome of an attempt that panicked: an infrastructure error, so the
/// coordinator retries the task (on this runner or another).
fn panicked(panic: &(dyn std::any::Any + Send)) -> Outcome {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned());
    tracing::error!(panic = %what, "the attempt panicked");
    Outcome::new(
        AttemptOutcome::Error,
        None,
        format!("runner bug: the attempt panicked ({what}); retried as an infrastructure failure"),
    )
}

/// What an attempt sets up before it may run: its work dir, its log spool
/// with the spool's shipper, and the executor's view of the task.
struct Prepared {
    /// Whether the work dir (with its `workspace`) could be made.
    made: std::io::Result<()>,
    /// The spool and its shipper, or the outcome when the spool could not
    /// be created.
    log: Result<(Arc<Spool>, ShipperHandle), Outcome>,
    task: TaskContext,
    /// The settings of the `set-image` and `git-push` steps and the
    /// write-back a `set-image` leaves for the task's `git-push`.
    gitops: Arc<GitOps>,
}

/// Runs the attempt; `None` when it was dropped before its confirm (see
/// the module docs), after removing what it had prepared.
async fn execute(
    spec: &AttemptSpec,
    confirmed: Option<oneshot::Receiver<()>>,
) -> Option<TaskFinished> {
    let prepared = prepare(spec);
    match confirm(confirmed, &spec.cancel).await {
        Waited::Go => Some(run_prepared(spec, prepared).await),
        Waited::Dropped => {
            info!("dropped before the coordinator confirmed the offer; nothing ran");
            abandon(spec, prepared).await;
            None
        }
        // The coordinator holds the attempt (and the runner's slot) until
        // it hears how it ended.
        Waited::Cancelled => {
            info!("cancelled before the coordinator confirmed the offer; nothing ran");
            abandon(spec, prepared).await;
            Some(TaskFinished {
                attempt_id: spec.offer.attempt_id.clone(),
                outcome: AttemptOutcome::Cancelled.into(),
                exit_code: None,
                message: "cancelled before it started".into(),
                log_length: 0,
                outputs: Default::default(),
            })
        }
    }
}

/// How the wait for a tentative offer's confirm ended.
enum Waited {
    /// Confirmed (or no confirm to wait for): run it.
    Go,
    /// The agent dropped it (the Control stream ended): run nothing and
    /// report nothing; the next hello leaves it out.
    Dropped,
    /// Cancelled first: run nothing, report it cancelled.
    Cancelled,
}

/// Waits for the confirm of a tentative offer, if there is one to wait for.
async fn confirm(confirmed: Option<oneshot::Receiver<()>>, cancel: &CancellationToken) -> Waited {
    let Some(confirmed) = confirmed else {
        return Waited::Go;
    };
    tokio::select! {
        // A confirm and then a cancel: the attempt starts and is cancelled
        // (and says so), as any confirmed attempt.
        biased;
        fired = confirmed => match fired {
            Ok(()) => Waited::Go,
            // The agent cancels before it lets go of the confirm's sender.
            Err(_) if cancel.is_cancelled() => Waited::Cancelled,
            Err(_) => Waited::Dropped,
        },
        () = cancel.cancelled() => Waited::Cancelled,
    }
}

/// Makes the attempt's work dir and log spool and starts the shipper.
fn prepare(spec: &AttemptSpec) -> Prepared {
    let attempt_id = spec.offer.attempt_id.clone();
    let made = spec.work_dir.start_attempt(&attempt_id);
    let spool_dir = spec.work_dir.spool_dir();
    let log = match Spool::create_with_budget(spool_dir, &attempt_id, spec.log_memory) {
        Ok(spool) => {
            let shipper = ShipperHandle::spawn(Arc::clone(&spool), spec.log_target.clone());
            Ok((spool, shipper))
        }
        Err(e) => Err(Outcome::new(
            AttemptOutcome::Error,
            None,
            format!("runner could not create the log spool: {}", chain(&e)),
        )),
    };
    let task = TaskContext {
        run_id: RunId::from_string(spec.offer.run_id.clone()),
        task_name: spec.offer.task_name.clone(),
        workspace: spec.work_dir.workspace(&attempt_id),
        task: spec.offer.task.clone().unwrap_or_default(),
        repo: spec.offer.repo.clone(),
        rev: spec.offer.rev.clone(),
        outputs: Arc::default(),
        pushed: spec.offer.pushed_digests.clone().into_iter().collect(),
        attempt_id: AttemptId::from_string(attempt_id.clone()),
        cancel: spec.cancel.clone(),
    };
    let pull_requests = crate::gitops::pull_request::Coordinator {
        target: spec.log_target.clone(),
    };
    let gitops = Arc::new(
        GitOps::new(
            Arc::clone(&spec.secrets),
            spec.git_author.clone(),
            spec.git_credentials.clone(),
            Some(spec.work_dir.manifests_dir(&attempt_id)),
        )
        .with_pull_requests(Arc::new(pull_requests)),
    );
    Prepared {
        made,
        log,
        task,
        gitops,
    }
}

/// Removes what [`prepare`] made, for an attempt that never ran.
async fn abandon(spec: &AttemptSpec, prepared: Prepared) {
    if let Ok((_, shipper)) = prepared.log {
        // Nothing was written, so nothing waits to be shipped.
        shipper.finish().await;
    }
    spec.work_dir.discard(&spec.offer.attempt_id).await;
}

/// Runs a prepared (and, if tentative, confirmed) attempt to its report.
async fn run_prepared(spec: &AttemptSpec, prepared: Prepared) -> TaskFinished {
    let Prepared {
        made,
        log,
        task,
        gitops,
    } = prepared;
    let report = |o: Outcome, log_length, outputs: std::collections::BTreeMap<String, String>| {
        TaskFinished {
            attempt_id: task.attempt_id.to_string(),
            outcome: o.outcome.into(),
            exit_code: o.exit_code,
            message: o.message,
            log_length,
            outputs: outputs.into_iter().collect(),
        }
    };
    let (spool, shipper) = match log {
        Ok(log) => log,
        Err(o) => {
            spec.work_dir
                .retire_attempt_dir(task.attempt_id.as_str())
                .await;
            return report(o, 0, Default::default());
        }
    };
    let outcome = match made {
        // A panic (say in the checkout) still finishes the log shipping
        // below, so the report waits for the log and the spool is released.
        Ok(()) => std::panic::AssertUnwindSafe(run_task(spec, &task, &gitops, &spool))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| panicked(panic.as_ref())),
        Err(e) => Outcome::new(
            AttemptOutcome::Error,
            None,
            format!(
                "runner could not create workspace {}: {e}",
                task.workspace.display()
            ),
        ),
    };
    steps::withhold_secret_outputs(spec, &task, &spool).await;
    let outputs = task.outputs.lock().map(|o| o.clone()).unwrap_or_default();
    log_outputs(&outputs);
    let log_length = shipper.finish().await;
    spec.work_dir
        .retire_attempt_dir(task.attempt_id.as_str())
        .await;
    report(outcome, log_length, outputs)
}

/// Says which outputs the report carries: their names only, at info; a
/// value may be anything a script wrote, so none is in the runner's own log.
fn log_outputs(outputs: &std::collections::BTreeMap<String, String>) {
    if !outputs.is_empty() {
        let keys: Vec<&str> = outputs.keys().map(String::as_str).collect();
        info!(?keys, "task outputs");
    }
}

async fn run_task(
    spec: &AttemptSpec,
    task: &TaskContext,
    gitops: &Arc<GitOps>,
    spool: &Arc<Spool>,
) -> Outcome {
    let started = Instant::now();
    let task_timeout = task.task.timeout_seconds;
    let task_deadline = (task_timeout > 0).then(|| started + Duration::from_secs(task_timeout));
    if !task.repo.is_empty() {
        let span = info_span!(
            "git.checkout",
            capstan.repo = %capstan_proto::redact::redact_url(&task.repo),
            capstan.commit = %task.rev,
        );
        let checked_out = checkout(spec, task, spool).instrument(span.clone()).await;
        if let Err(outcome) = checked_out {
            mark_span(&span, false, &outcome.message);
            return outcome;
        }
        mark_span(&span, true, "");
    }
    let executor = &spec.executor;
    // A panic in setup or in a step (a runner bug) must not skip the
    // teardown: the task's containers, volumes and network would outlive the
    // attempt until the runner restarts and reaps them.
    let outcome = std::panic::AssertUnwindSafe(async {
        match executor.setup_task(task).await {
            Ok(()) => steps::run_steps(spec, task, gitops, spool, task_deadline).await,
            // A setup that gave up on a cancel (a service's probes).
            Err(_) if spec.cancel.is_cancelled() => {
                Outcome::new(AttemptOutcome::Cancelled, None, "cancelled")
            }
            Err(e) => Outcome::new(AttemptOutcome::Error, None, chain(&e)),
        }
    })
    .catch_unwind()
    .await
    .unwrap_or_else(|panic| panicked(panic.as_ref()));
    if !task.task.services.is_empty() {
        steps::log_services(spec, task, spool).await;
    }
    if let Err(e) = executor.destroy_task(task).await {
        warn!(error = %chain(&e), "executor teardown failed");
    }
    outcome
}

/// Checks the run's repository out into the workspace; the log says so
/// (under the first step). `Err` is the attempt's outcome.
async fn checkout(
    spec: &AttemptSpec,
    task: &TaskContext,
    spool: &Arc<Spool>,
) -> Result<(), Outcome> {
    let writer = spool.writer(0);
    let masked = MaskingSink::new(&writer, &spec.mask);
    let rev = if task.rev.is_empty() {
        "HEAD"
    } else {
        &task.rev
    };
    let note = |text: String| async move {
        let _ = masked.write(text.as_bytes()).await;
        let _ = masked.flush().await;
    };
    let credentials = match &spec.git_credentials {
        Some(name) => match spec.secrets.get(name) {
            Ok(secret) => Some(secret.clone()),
            Err(e) => {
                note(format!("checkout failed: {e}\n")).await;
                return Err(Outcome::new(AttemptOutcome::Failed, None, e.to_string()));
            }
        },
        None => None,
    };
    match crate::git::checkout(&task.repo, rev, &task.workspace, credentials).await {
        Ok(id) => {
            let repo = capstan_proto::redact::redact_url(&task.repo);
            note(format!("checked out {repo} at {id}\n")).await;
            Ok(())
        }
        Err(e) => {
            let message = format!(
                "checkout failed: {}",
                capstan_proto::redact::redact_urls(&chain(&e))
            );
            note(format!("{message}\n")).await;
            // A wrong password or revision is the user's to fix; anything
            // else (network, disk) is retried as an infrastructure failure.
            let outcome = match e {
                crate::git::GitError::Auth { .. }
                | crate::git::GitError::Refused { .. }
                | crate::git::GitError::BadSource(_)
                | crate::git::GitError::RevNotFound { .. } => AttemptOutcome::Failed,
                _ => AttemptOutcome::Error,
            };
            Err(Outcome::new(outcome, None, message))
        }
    }
}

/// Sets a span's OpenTelemetry status: OK, or an error saying `message`.
/// Does nothing when trace export is off.
fn mark_span(span: &tracing::Span, ok: bool, message: &str) {
    if !capstan_telemetry::enabled() {
        return;
    }
    span.set_status(if ok {
        capstan_telemetry::opentelemetry::trace::Status::Ok
    } else {
        capstan_telemetry::opentelemetry::trace::Status::error(message.to_owned())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::ExecutorError;
    use crate::step::{StepContext, StepEnd, testing};
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Panics where it is told to and counts its teardowns.
    #[derive(Default)]
    struct Panicky {
        in_setup: bool,
        torn_down: AtomicUsize,
    }

    #[async_trait]
    impl Executor for Panicky {
        async fn setup_task(&self, _task: &TaskContext) -> Result<(), ExecutorError> {
            assert!(!self.in_setup, "bug in setup");
            Ok(())
        }
        async fn run_step(
            &self,
            _task: &TaskContext,
            _ctx: StepContext<'_>,
        ) -> Result<StepEnd, ExecutorError> {
            panic!("bug in a step")
        }
        async fn destroy_step(
            &self,
            _task: &TaskContext,
            _index: u32,
        ) -> Result<(), ExecutorError> {
            Ok(())
        }
        async fn destroy_task(&self, _task: &TaskContext) -> Result<(), ExecutorError> {
            self.torn_down.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// The spec of attempt `att-1` with its work dir in `dir`: no
    /// repository, no secrets, nobody listening to its events.
    pub(super) fn spec(dir: &std::path::Path, executor: Arc<dyn Executor>) -> AttemptSpec {
        let (events, _) = mpsc::unbounded_channel();
        let (_, log_target) = watch::channel(None);
        AttemptSpec {
            offer: Offer {
                attempt_id: "att-1".into(),
                ..Offer::default()
            },
            work_dir: Arc::new(WorkDir::new(dir)),
            executor,
            cancel: CancellationToken::new(),
            confirmed: None,
            events,
            log_target,
            secrets: Arc::default(),
            mask: Arc::default(),
            git_credentials: None,
            git_author: crate::gitops::Author::default(),
            step_log_cap: crate::logs::cap::StepLogCap::default(),
            log_memory: crate::logs::spool::MEMORY_BUDGET,
        }
    }

    async fn run_panicky(executor: Arc<Panicky>) -> Outcome {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path(), executor);
        let task = testing::task(dir.path().join("ws"), vec![testing::run_step("true")]);
        let spool = Spool::create(spec.work_dir.spool_dir(), "att-1")
            .await
            .unwrap();
        run_task(&spec, &task, &Arc::default(), &spool).await
    }

    #[test]
    fn the_runners_log_names_outputs_but_holds_no_value() {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        let outputs = [("version".to_owned(), "value-of-an-output".to_owned())].into();
        tracing::subscriber::with_default(subscriber, || log_outputs(&outputs));
        let logged = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(logged.contains("version"), "{logged}");
        assert!(!logged.contains("value-of-an-output"), "{logged}");
    }

    #[tokio::test]
    async fn a_panicking_step_still_tears_the_task_down() {
        let executor = Arc::new(Panicky::default());
        let o = run_panicky(Arc::clone(&executor)).await;
        assert_eq!(o.outcome, AttemptOutcome::Error);
        assert!(o.message.contains("bug in a step"), "{}", o.message);
        assert_eq!(executor.torn_down.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_panicking_setup_still_tears_the_task_down() {
        let executor = Arc::new(Panicky {
            in_setup: true,
            ..Panicky::default()
        });
        let o = run_panicky(Arc::clone(&executor)).await;
        assert_eq!(o.outcome, AttemptOutcome::Error);
        assert!(o.message.contains("bug in setup"), "{}", o.message);
        assert_eq!(executor.torn_down.load(Ordering::SeqCst), 1);
    }
}
