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
//!    then executor teardown (also after a panic in setup or a step)
//!    ([`steps`] runs the steps);
//! 3. wait until the coordinator acknowledged every log byte;
//! 4. empty the attempt's work dir and keep it as the next attempt's spare
//!    (or remove it; see [`recycle_dir`]);
//! 5. hand the `TaskFinished` report to the agent, which delivers it.

mod steps;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use capstan_proto::ids::{AttemptId, RunId};
use capstan_proto::runner::v1::{AttemptOutcome, Offer, StepStateChanged, TaskFinished};
use capstan_telemetry::OpenTelemetrySpanExt as _;
use futures::FutureExt as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

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

/// What an attempt tells the agent.
#[derive(Debug)]
pub(crate) enum AttemptEvent {
    Step(StepStateChanged),
    Finished(TaskFinished),
}

/// Everything one attempt needs.
pub(crate) struct AttemptSpec {
    pub offer: Offer,
    /// `<work_dir>/attempts`
    pub attempts_dir: PathBuf,
    /// `<work_dir>/spool`
    pub spool_dir: PathBuf,
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

/// Replaces the attempt-dir spare if the attempt's dir did not become it,
/// off the runtime's workers. The spool spare comes back when the spool is
/// no longer needed ([`retire_spool`], once the coordinator has the final
/// report); until then an attempt that starts makes its own spool file.
async fn make_spares_after(spec: &AttemptSpec) {
    let attempts = spec.attempts_dir.clone();
    let tag = spec.offer.attempt_id.clone();
    let _ = tokio::task::spawn_blocking(move || make_dir_spare(&attempts, &tag)).await;
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
    /// `<attempts_dir>/<attempt id>`
    dir: PathBuf,
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
    let dir = spec.attempts_dir.join(&attempt_id);
    let workspace = dir.join("workspace");
    // Made inline on this worker: pickup waits for them, and a trip to the
    // blocking pool and back (two cross-thread wake-ups) cost more than the
    // calls themselves. Both come from the spares when there are some.
    let made = match std::fs::rename(spec.attempts_dir.join(SPARE), &dir) {
        Ok(()) => Ok(()),
        Err(_) => make_workspace(&dir, &workspace),
    };
    let _ = std::fs::rename(spec.spool_dir.join(SPARE), spool_path(spec));
    let log = match Spool::create_with_budget(&spec.spool_dir, &attempt_id, spec.log_memory) {
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
        attempt_id: AttemptId::from_string(attempt_id),
        workspace,
        task: spec.offer.task.clone().unwrap_or_default(),
        repo: spec.offer.repo.clone(),
        rev: spec.offer.rev.clone(),
        outputs: Arc::default(),
    };
    let gitops = Arc::new(GitOps::new(
        Arc::clone(&spec.secrets),
        spec.git_author.clone(),
        spec.git_credentials.clone(),
        Some(dir.join("manifests")),
    ));
    Prepared {
        dir,
        made,
        log,
        task,
        gitops,
    }
}

/// `<spool_dir>/<attempt id>.log`
fn spool_path(spec: &AttemptSpec) -> PathBuf {
    spec.spool_dir
        .join(format!("{}.log", spec.offer.attempt_id))
}

/// Removes what [`prepare`] made, for an attempt that never ran.
async fn abandon(spec: &AttemptSpec, prepared: Prepared) {
    if let Ok((_, shipper)) = prepared.log {
        // Nothing was written, so nothing waits to be shipped.
        shipper.finish().await;
    }
    let path = spool_path(spec);
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || retire_spool(&path)).await {
        warn!(error = %e, "could not remove the dropped attempt's log spool");
    }
    retire_dir(spec, &prepared.dir).await;
}

/// Empties the attempt's dir and keeps it as the next attempt's spare
/// ([`recycle_dir`]), or else removes it.
async fn retire_dir(spec: &AttemptSpec, dir: &std::path::Path) {
    let (attempts, dir) = (spec.attempts_dir.clone(), dir.to_path_buf());
    let removed = tokio::task::spawn_blocking(move || {
        match recycle_dir(&attempts, &dir) {
            Ok(()) => return Ok(()),
            Err(e) => debug!(
                dir = %dir.display(),
                error = %e,
                "removing the attempt's dir instead of keeping it as the spare"
            ),
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err((dir, e)),
            _ => Ok(()),
        }
    })
    .await;
    if let Ok(Err((dir, e))) = removed {
        warn!(dir = %dir.display(), error = %e, "could not remove the attempt's work dir");
    }
}

/// Turns a finished attempt's dir back into the [`SPARE`]: removes
/// everything in it but its `workspace`, and everything in that, then
/// renames it. The two directories' inodes are kept for the next attempt
/// instead of being freed and allocated again: on ext4 without a journal
/// every inode freed in the last minute slows each allocation in its group
/// (see [`make_spares`]), the step's own files included, so an attempt that
/// deletes its dirs makes the next one's steps slower to create files.
///
/// Refused (the caller removes the dir) when there already is a spare,
/// when either directory is not as [`make_spares`] would make it (a
/// symlink, or another mode or owner than the attempts dir: a step may
/// have changed them), or when the workspace is not empty after emptying
/// (something still writes there).
///
/// With the shell executor a process that left the step's process group
/// (`setsid`, a daemon) outlives the step, and one whose working directory
/// is the workspace now sits in the next attempt's. That executor isolates
/// nothing (such a process can write anywhere the runner can), and GitLab
/// Runner's shell executor and Buildbot's worker reuse build dirs the same
/// way; the docker executor's processes are gone with their containers.
fn recycle_dir(attempts_dir: &std::path::Path, dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let spare = attempts_dir.join(SPARE);
    if std::fs::symlink_metadata(&spare).is_ok() {
        return Err(std::io::Error::other("there already is a spare"));
    }
    let template = std::fs::metadata(attempts_dir)?;
    let workspace = dir.join("workspace");
    for d in [dir, workspace.as_path()] {
        let meta = std::fs::symlink_metadata(d)?;
        if !meta.is_dir()
            || meta.mode() & 0o7777 != template.mode() & 0o7777
            || (meta.uid(), meta.gid()) != (template.uid(), template.gid())
        {
            return Err(std::io::Error::other("not as a spare is made"));
        }
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() != "workspace" {
            remove_entry(&entry)?;
        }
    }
    for entry in std::fs::read_dir(&workspace)? {
        remove_entry(&entry?)?;
    }
    if std::fs::read_dir(&workspace)?.next().is_some() {
        return Err(std::io::Error::other(
            "the workspace filled again while it was emptied",
        ));
    }
    // Fails if another attempt's dir became the spare meanwhile (a spare is
    // never empty: it holds its workspace).
    std::fs::rename(dir, spare)
}

fn remove_entry(entry: &std::fs::DirEntry) -> std::io::Result<()> {
    if entry.file_type()?.is_dir() {
        std::fs::remove_dir_all(entry.path())
    } else {
        std::fs::remove_file(entry.path())
    }
}

/// Runs a prepared (and, if tentative, confirmed) attempt to its report.
async fn run_prepared(spec: &AttemptSpec, prepared: Prepared) -> TaskFinished {
    let Prepared {
        dir,
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
            retire_dir(spec, &dir).await;
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
    let outputs = task.outputs.lock().map(|o| o.clone()).unwrap_or_default();
    if !outputs.is_empty() {
        info!(?outputs, "task outputs");
    }
    let log_length = shipper.finish().await;
    retire_dir(spec, &dir).await;
    report(outcome, log_length, outputs)
}

/// Name of the spare attempt dir (with its empty `workspace`) in the
/// attempts dir and of the spare (empty) spool file in the spool dir. An
/// attempt id never starts with a dot, so it cannot be one.
pub(crate) const SPARE: &str = ".spare";

/// Makes the spares the next attempt starts with, if they are missing.
///
/// Allocating an inode is the slowest part of an attempt's start: on ext4 it
/// scans the group's inode bitmap, and without a journal it also skips every
/// inode freed in the last few seconds, reading each one's inode-table
/// block (measured here: 200 us for the two mkdirs and the spool's create,
/// 50 us for two renames and an open, in a dir where attempts come and go).
/// So they are made at start and kept between attempts off the pickup
/// path (a finished attempt's dir and, once acknowledged, its spool become
/// the next spares: [`recycle_dir`], [`retire_spool`]), and an attempt's
/// start renames them into place: a rename allocates no inode. Each is
/// built under a temporary name and renamed to [`SPARE`]
/// only when complete, so a spare dir always holds its `workspace`, and
/// attempts that start together each take a whole spare or none (the loser
/// of the rename makes its own). Best effort: without spares, attempts
/// create their dir and spool as before.
pub(crate) fn make_spares(attempts_dir: &std::path::Path, spool_dir: &std::path::Path, tag: &str) {
    make_dir_spare(attempts_dir, tag);
    make_spool_spare(spool_dir, tag);
}

/// The attempt-dir half of [`make_spares`].
fn make_dir_spare(attempts_dir: &std::path::Path, tag: &str) {
    let spare = attempts_dir.join(SPARE);
    if std::fs::symlink_metadata(&spare).is_err() {
        let tmp = attempts_dir.join(format!("{SPARE}-{tag}"));
        let made = std::fs::create_dir(&tmp)
            .and_then(|()| std::fs::create_dir(tmp.join("workspace")))
            .and_then(|()| std::fs::rename(&tmp, &spare));
        if made.is_err() {
            // Another attempt made one meanwhile (the rename onto its
            // non-empty dir fails), or the dir is gone.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
}

/// The spool half of [`make_spares`].
fn make_spool_spare(spool_dir: &std::path::Path, tag: &str) {
    let spare = spool_dir.join(SPARE);
    if std::fs::symlink_metadata(&spare).is_err() {
        let tmp = spool_dir.join(format!("{SPARE}-{tag}"));
        let made = std::fs::File::create(&tmp).and_then(|_| std::fs::rename(&tmp, &spare));
        if made.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// Empties a spool file that is no longer needed and keeps it as the spool
/// [`SPARE`] if there is none, or else removes it: the inode is kept for
/// the next attempt instead of being freed (see [`recycle_dir`] for why).
/// The spare, beside it in the spool dir, is made by a hard link, which
/// unlike a rename never replaces one that is there already, and the
/// spool's own name is then removed.
pub(crate) fn retire_spool(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Not through a symlink: only a regular file the runner made is kept.
    let _kept = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .and_then(|file| {
            if file.metadata()?.is_file() {
                file.set_len(0)
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        })
        .and_then(|()| std::fs::hard_link(path, path.with_file_name(SPARE)));
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `<attempt dir>/workspace`: two mkdirs where `create_dir_all` makes
/// three calls (it tries the leaf first); the whole path only if the
/// attempts dir itself is gone.
fn make_workspace(dir: &std::path::Path, workspace: &std::path::Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::create_dir(workspace),
        Err(_) => std::fs::create_dir_all(workspace),
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
            capstan.repo = %task.repo,
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
            Err(e) => Outcome::new(AttemptOutcome::Error, None, chain(&e)),
        }
    })
    .catch_unwind()
    .await
    .unwrap_or_else(|panic| panicked(panic.as_ref()));
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
            note(format!("checked out {} at {id}\n", task.repo)).await;
            Ok(())
        }
        Err(e) => {
            let message = format!("checkout failed: {}", chain(&e));
            note(format!("{message}\n")).await;
            // A wrong password or revision is the user's to fix; anything
            // else (network, disk) is retried as an infrastructure failure.
            let outcome = match e {
                crate::git::GitError::Auth { .. }
                | crate::git::GitError::Refused { .. }
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
    use crate::testing::dir_names as names;
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

    async fn run_panicky(executor: Arc<Panicky>) -> Outcome {
        let dir = tempfile::tempdir().unwrap();
        let (events, _events_rx) = mpsc::unbounded_channel();
        let (_target_tx, log_target) = watch::channel(None);
        let spec = AttemptSpec {
            offer: Offer {
                attempt_id: "att-1".into(),
                ..Offer::default()
            },
            attempts_dir: dir.path().join("attempts"),
            spool_dir: dir.path().join("spool"),
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
        };
        let task = testing::task(dir.path().join("ws"), vec![testing::run_step("true")]);
        let spool = Spool::create(&spec.spool_dir, "att-1").await.unwrap();
        run_task(&spec, &task, &Arc::default(), &spool).await
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

    #[test]
    fn spares_are_made_once_whole_and_taken_by_rename() {
        let root = tempfile::tempdir().unwrap();
        let (attempts, spool) = (root.path().join("attempts"), root.path().join("spool"));
        std::fs::create_dir(&attempts).unwrap();
        std::fs::create_dir(&spool).unwrap();
        make_spares(&attempts, &spool, "att-1");
        assert_eq!(names(&attempts), [SPARE]);
        assert_eq!(names(&spool), [SPARE]);
        // A file written into the spare before a second call survives it:
        // an existing spare is kept, and no temporary is left behind.
        std::fs::write(attempts.join(SPARE).join("workspace/mark"), b"x").unwrap();
        make_spares(&attempts, &spool, "att-2");
        assert_eq!(names(&attempts), [SPARE]);
        assert!(attempts.join(SPARE).join("workspace/mark").exists());
        std::fs::remove_file(attempts.join(SPARE).join("workspace/mark")).unwrap();

        // What an attempt's start does with them.
        std::fs::rename(attempts.join(SPARE), attempts.join("att-3")).unwrap();
        std::fs::rename(spool.join(SPARE), spool.join("att-3.log")).unwrap();
        assert!(attempts.join("att-3/workspace").is_dir());
        let log = Spool::create_now(&spool, "att-3").unwrap();
        assert_eq!(log.path(), spool.join("att-3.log"));
        assert_eq!(names(&attempts), ["att-3"]);
        assert_eq!(names(&spool), ["att-3.log"]);
        // Gone spares are made again.
        make_spares(&attempts, &spool, "att-3");
        assert_eq!(names(&attempts), [SPARE, "att-3"]);
        assert_eq!(names(&spool), [SPARE, "att-3.log"]);
    }
}

/// Attempt dirs and spools kept as the next attempt's spares.
#[cfg(test)]
mod spare_tests {
    use super::*;
    use crate::testing::dir_names as names;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// An attempts dir holding a finished attempt's dir `att-1`, with files
    /// in its workspace and beside it.
    fn finished_attempt() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let attempts = root.path().join("attempts");
        std::fs::create_dir(&attempts).unwrap();
        let dir = attempts.join("att-1");
        make_workspace(&dir, &dir.join("workspace")).unwrap();
        std::fs::create_dir_all(dir.join("workspace/src/deep")).unwrap();
        std::fs::write(dir.join("workspace/src/deep/f"), b"x").unwrap();
        std::fs::write(dir.join("workspace/top"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("workspace/link")).unwrap();
        std::fs::create_dir(dir.join("manifests")).unwrap();
        std::fs::write(dir.join("manifests/m.yaml"), b"x").unwrap();
        (root, attempts, dir)
    }

    #[test]
    fn a_finished_attempts_dir_becomes_the_empty_spare() {
        let (_root, attempts, dir) = finished_attempt();
        let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
        let (dir_ino, ws_ino) = (ino(&dir), ino(&dir.join("workspace")));
        recycle_dir(&attempts, &dir).unwrap();
        assert_eq!(names(&attempts), [SPARE]);
        let spare = attempts.join(SPARE);
        assert_eq!(names(&spare), ["workspace"]);
        assert!(names(&spare.join("workspace")).is_empty());
        // The same inodes, not new ones; the symlink's target is untouched.
        assert_eq!(
            (ino(&spare), ino(&spare.join("workspace"))),
            (dir_ino, ws_ino)
        );
        assert!(std::path::Path::new("/etc").is_dir());
        // The next attempt takes it as it takes any spare.
        std::fs::rename(&spare, attempts.join("att-2")).unwrap();
        assert!(attempts.join("att-2/workspace").is_dir());
    }

    #[test]
    fn a_dir_is_not_recycled_over_an_existing_spare() {
        let (root, attempts, dir) = finished_attempt();
        let spool = root.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        make_spares(&attempts, &spool, "x");
        std::fs::write(attempts.join(SPARE).join("workspace/mark"), b"x").unwrap();
        assert!(recycle_dir(&attempts, &dir).is_err());
        // Both left as they were: the caller removes the attempt's dir.
        assert!(dir.join("workspace/top").exists());
        assert!(attempts.join(SPARE).join("workspace/mark").exists());
    }

    #[test]
    fn a_workspace_a_step_changed_is_not_recycled() {
        let (_root, attempts, dir) = finished_attempt();
        let ws = dir.join("workspace");
        std::fs::set_permissions(&ws, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(recycle_dir(&attempts, &dir).is_err());
        assert!(ws.join("top").exists(), "nothing removed before the check");
        // A workspace replaced by a symlink is refused too.
        let (_root, attempts, dir) = finished_attempt();
        let ws = dir.join("workspace");
        std::fs::remove_dir_all(&ws).unwrap();
        std::os::unix::fs::symlink("/tmp", &ws).unwrap();
        assert!(recycle_dir(&attempts, &dir).is_err());
        assert!(std::path::Path::new("/tmp").is_dir());
    }

    #[test]
    fn a_spool_no_longer_needed_becomes_the_empty_spare() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("att-1.log");
        std::fs::write(&spool, vec![b'x'; 10_000]).unwrap();
        let ino = std::fs::metadata(&spool).unwrap().ino();
        retire_spool(&spool).unwrap();
        assert_eq!(names(dir.path()), [SPARE]);
        let spare = std::fs::metadata(dir.path().join(SPARE)).unwrap();
        assert_eq!((spare.ino(), spare.len(), spare.nlink()), (ino, 0, 1));
    }

    #[test]
    fn a_spool_is_removed_when_there_is_a_spare_already() {
        let dir = tempfile::tempdir().unwrap();
        make_spool_spare(dir.path(), "x");
        std::fs::write(dir.path().join(SPARE), b"mark").unwrap();
        let spool = dir.path().join("att-1.log");
        std::fs::write(&spool, b"log").unwrap();
        retire_spool(&spool).unwrap();
        assert_eq!(names(dir.path()), [SPARE]);
        // The spare there is kept, not replaced.
        assert_eq!(std::fs::read(dir.path().join(SPARE)).unwrap(), b"mark");
        // A spool already gone is no error.
        retire_spool(&spool).unwrap();
    }

    #[test]
    fn a_symlinked_spool_is_removed_and_its_target_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"keep me").unwrap();
        let spool = dir.path().join("att-1.log");
        std::os::unix::fs::symlink(&target, &spool).unwrap();
        retire_spool(&spool).unwrap();
        assert_eq!(names(dir.path()), ["elsewhere"]);
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    }
}
