//! The GitOps write-back: the `set-image` step (clone the manifests
//! repository, edit image references, remember the edit) and the `git-push`
//! step (commit as the runner's bot identity and push, re-applying the edit
//! on a race). The attempt calls [`run_set_image`] and [`run_git_push`].
//!
//! Both run inside the runner with git2, never in a container, so they
//! behave the same under every executor. Per attempt:
//!
//! 1. `set-image` picks the repository: the run's own checkout (the
//!    attempt's local workspace) when the step's `repo` is empty or equals
//!    the run's repository, else a fresh clone into the attempt's
//!    `manifests` directory. Clone credentials: the secret named by the
//!    task's next `git-push` step, else the runner's `--git-credentials`.
//!    It edits the files (`set_image::set_image_in_files`), logs
//!    each changed line, and records a [`Pending`] write-back on the
//!    attempt's [`GitOps`].
//! 2. `git-push` takes the pending write-back, commits the listed files
//!    (nothing else) on top of the base commit and pushes that commit to
//!    `refs/heads/<branch>` (the branch the clone came from, `main` for a
//!    detached checkout) with an explicit refspec, never forced. A rejected
//!    ref (reported through `push_update_reference`) or a non-fast-forward
//!    is a race with another writer: fetch the branch, reset onto its head,
//!    re-apply every edit and try again, at most `git_push::MAX_TRIES`
//!    times with jittered exponential backoff. When the edit is already on
//!    the branch, the step logs "already up to date" and makes no commit.
//!
//!    `branch:` names another branch to push to (the edit is re-applied
//!    on its head first). With `mode: pull-request` the commit goes to
//!    `capstan/<pipeline>/<task>/<run's sha>` instead, and the step asks the
//!    coordinator to open (or find) the pull request into the branch
//!    (`pull_request`); its URL is the output `pull-request`.
//!
//! The pushed (or current) commit id is the task output `commit`, the
//! repository URL the output `repo`.
//!
//! Layout:
//! - this file: the entry points, the attempt's [`GitOps`] with the
//!   [`Pending`] write-back, and [`GitOpsError`];
//! - `author`: [`Author`], who commits (`--git-author`);
//! - `set_image/`: the `set-image` step and the structural YAML edit;
//! - `git_push`: the `git-push` step: commit, push, retry a race;
//! - `pull_request`: who opens pull requests ([`pull_request::PullRequests`]).
//!
//! Doors: [`crate::git`] (its one remote path) for clone, fetch and push,
//! `capstan_manifest` for the edit and references, [`crate::secrets`] for credentials,
//! [`crate::step`] and `ExecutorError` for the step vocabulary. Only the
//! attempt calls in. Inside, `git_push` uses `set_image::apply_edit` to
//! re-apply after a race, never the other way.

mod author;
mod git_push;
pub(crate) mod pull_request;
#[cfg(test)]
mod pull_request_tests;
mod set_image;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use capstan_proto::pipeline::v1::{GitPushStep, SetImageStep, step};

pub use self::author::{Author, DEFAULT_AUTHOR};
use self::pull_request::PullRequests;
use self::set_image::SetImageError;
use crate::executor::{ExecutorError, step_log};
use crate::git::GitError;
use crate::secrets::{Secret, Secrets, SecretsError};
use crate::step::{StepContext, StepEnd, TaskContext, sleep_until_deadline};

/// The branch pushed to when the manifests checkout is not on a branch.
pub(crate) const DEFAULT_BRANCH: &str = "main";

/// The runner-wide settings of the write-back steps plus the attempt's
/// pending write-back. One per attempt, shared by its steps.
#[derive(Debug, Default)]
pub(crate) struct GitOps {
    /// The runner's secrets (credentials are resolved here, on the runner).
    pub(crate) secrets: Arc<Secrets>,
    /// Who commits (`--git-author`).
    pub(crate) author: Author,
    /// The runner's `--git-credentials`: clone credentials when the task has
    /// no `git-push` step that names a secret.
    pub(crate) checkout_credentials: Option<String>,
    /// Where a separate manifests repository is cloned; `None` puts it
    /// beside the workspace (`<workspace>.manifests`).
    pub(crate) manifests_dir: Option<PathBuf>,
    /// Who opens the pull requests of `mode: pull-request`; `None`: no
    /// forge (the branch is pushed and printed).
    pull_requests: Option<Arc<dyn PullRequests>>,
    pending: Mutex<Option<Pending>>,
}

/// What `set-image` left for `git-push`.
#[derive(Clone, Debug)]
pub(crate) struct Pending {
    /// The working tree of the manifests repository on the runner.
    pub(crate) dir: PathBuf,
    /// Where it came from and where the commit goes.
    pub(crate) repo_url: String,
    /// `refs/heads/<branch>` is pushed.
    pub(crate) branch: String,
    /// The commit the edits sit on.
    pub(crate) base: git2::Oid,
    /// Every edit made, in order: re-applied after a race.
    pub(crate) edits: Vec<PendingEdit>,
    /// The secret the repository was cloned with, if any.
    pub(crate) credentials: Option<String>,
}

/// One `set-image` edit.
#[derive(Clone, Debug)]
pub(crate) struct PendingEdit {
    pub(crate) files: Vec<String>,
    pub(crate) image: String,
    /// No matching reference is not an error (`allow-no-match: true`).
    pub(crate) allow_no_match: bool,
    /// `order: monotonic`: the run's source checkout and commit; a
    /// reference built from a descendant of that commit stays.
    pub(crate) monotonic: Option<(PathBuf, String)>,
}

/// Why a `set-image` or `git-push` step failed; the message is the step's.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GitOpsError {
    #[error(
        "`set-image` has no `repo` and the run has no repository (--repo): name the manifests repository"
    )]
    NoRepository,
    #[error(
        "`order: monotonic` compares commits in the run's repository: submit the run with \
         --repo and --rev (its checkout is what is compared)"
    )]
    MonotonicWithoutSource,
    #[error(
        "`git-push` needs a `set-image` step before it in the same task (there is nothing to commit)"
    )]
    NothingPending,
    #[error(
        "this task already edits {pending}; push it with `git-push` before editing {requested}"
    )]
    OtherRepository { pending: String, requested: String },
    #[error(transparent)]
    Secret(#[from] SecretsError),
    /// Clone, fetch, push or a local repository operation.
    #[error(transparent)]
    Git(#[from] GitError),
    #[error("git push to {url} rejected: {refname}: {message}")]
    Rejected {
        url: String,
        refname: String,
        message: String,
    },
    #[error(
        "git push to {url} was rejected as non-fast-forward {tries} times (others keep pushing); giving up"
    )]
    Contended { url: String, tries: usize },
    #[error(transparent)]
    Edit(#[from] SetImageError),
    #[error("reading {path} to log the change")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the git task failed: {0}")]
    Join(String),
    #[error("unknown `mode: {0}` of `git-push`: use direct or pull-request")]
    BadMode(String),
    #[error(
        "`{0}` is not a branch name git accepts: fix the step's `branch` (or, for a pull \
         request's branch, the pipeline's name)"
    )]
    BadBranch(String),
}

impl GitOps {
    /// The write-back settings of one attempt, with nothing pending.
    pub(crate) fn new(
        secrets: Arc<Secrets>,
        author: Author,
        checkout_credentials: Option<String>,
        manifests_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            secrets,
            author,
            checkout_credentials,
            manifests_dir,
            pull_requests: None,
            pending: Mutex::new(None),
        }
    }

    /// Pull requests are opened through `p`.
    pub(crate) fn with_pull_requests(mut self, p: Arc<dyn PullRequests>) -> Self {
        self.pull_requests = Some(p);
        self
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Option<Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pending write-back, if a `set-image` made one and no `git-push`
    /// took it yet.
    pub(crate) fn peek(&self) -> Option<Pending> {
        self.pending().clone()
    }

    /// Records the write-back the next `git-push` takes.
    fn set_pending(&self, pending: Pending) {
        *self.pending() = Some(pending);
    }

    /// Takes the pending write-back (a `git-push` step).
    fn take_pending(&self) -> Option<Pending> {
        self.pending().take()
    }

    fn secret(&self, name: Option<&str>) -> Result<Option<Secret>, GitOpsError> {
        name.map(|n| self.secrets.get(n).cloned())
            .transpose()
            .map_err(GitOpsError::from)
    }
}

/// What a finished step wants logged and recorded.
struct Done {
    log: String,
    outputs: Vec<(&'static str, String)>,
    /// Pull-request mode: the pushed branch and the one it merges into.
    pull_request: Option<(String, String)>,
}

/// Runs a `set-image` step (see the module docs).
pub(crate) async fn run_set_image(
    gitops: &Arc<GitOps>,
    task: &TaskContext,
    ctx: &StepContext<'_>,
    step: &SetImageStep,
) -> Result<StepEnd, ExecutorError> {
    let credentials = clone_credentials(gitops, task, ctx.index);
    let gitops = Arc::clone(gitops);
    let mut step = step.clone();
    let pinned = match pinned_image(task, &step) {
        Ok(p) => p,
        Err(e) => return Ok(StepEnd::Failed { message: e }),
    };
    if let Some((image, how)) = pinned {
        step_log(ctx, &format!("pinning {} to {image} ({how})\n", step.image)).await?;
        step.image = image;
    }
    let task_repo = task.repo.clone();
    let task_rev = task.rev.clone();
    let workspace = task.workspace.clone();
    let work = move || {
        set_image::set_image_blocking(
            &gitops,
            &step,
            &task_repo,
            &task_rev,
            &workspace,
            credentials.as_deref(),
        )
    };
    finish(task, ctx, work).await
}

/// For `pin: digest`, the reference to write (`image@sha256:...`) and where
/// its digest came from: the step's `digest`, this task's push of the
/// image, or another task of the run. None without a pin. The error says
/// what to do when no digest is known.
fn pinned_image(
    task: &TaskContext,
    step: &SetImageStep,
) -> Result<Option<(String, &'static str)>, String> {
    if step.pin != "digest" {
        return Ok(None);
    }
    if step.image.contains('@') {
        return Err(format!(
            "`pin: digest` with `image: {}`, which already has a digest: drop one of them",
            step.image
        ));
    }
    let own = task.outputs.lock().ok().and_then(|o| {
        (o.get("image") == Some(&step.image))
            .then(|| o.get("digest").cloned())
            .flatten()
    });
    let (digest, how) = if !step.digest.is_empty() {
        (step.digest.clone(), "the step's `digest`")
    } else if let Some(d) = own {
        (d, "pushed by this task")
    } else if let Some(d) = task.pushed.get(&step.image) {
        (d.clone(), "pushed by an earlier task of this run")
    } else {
        return Err(format!(
            "`pin: digest` needs the digest of {}: no task of this run pushed it; push it in \
             this run (in this task or one it needs) or give `digest:`",
            step.image
        ));
    };
    Ok(Some((format!("{}@{digest}", step.image), how)))
}

/// Runs a `git-push` step (see the module docs); in pull-request mode it
/// then asks for the pull request, whose URL is the output `pull-request`.
pub(crate) async fn run_git_push(
    gitops: &Arc<GitOps>,
    task: &TaskContext,
    ctx: &StepContext<'_>,
    step: &GitPushStep,
) -> Result<StepEnd, ExecutorError> {
    let worker = Arc::clone(gitops);
    let gstep = step.clone();
    let pull_request = step.mode == "pull-request";
    let (repo, workspace, name) = (
        task.repo.clone(),
        task.workspace.clone(),
        task.task_name.clone(),
    );
    let result = blocking(ctx, move || {
        // The run's commit names the pull request's branch: its checkout's
        // HEAD, so a `--rev main` names the commit it was.
        let sha = (pull_request && !repo.is_empty())
            .then(|| open(&workspace, &repo).and_then(|r| head_commit(&r, &repo)))
            .transpose()?
            .map(|oid| oid.to_string());
        git_push::git_push_blocking(&worker, &gstep, &git_push::Origin { task: name, sha })
    })
    .await;
    let mut done = match result {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return report(task, ctx, Err(e)).await,
        Err(end) => return Ok(end),
    };
    let Some((head, base)) = done.pull_request.take() else {
        return report(task, ctx, Ok(done)).await;
    };
    // What was pushed is logged and recorded whatever the forge says.
    let repo_url = done
        .outputs
        .iter()
        .find(|(k, _)| *k == "repo")
        .map(|(_, v)| pull_request::bare_url(v))
        .unwrap_or_default();
    report(task, ctx, Ok(done)).await?;
    let (title, body) =
        pull_request::title_and_body(&step.message, task.run_id.as_str(), &task.task_name);
    let ask = pull_request::Ask {
        repo: repo_url,
        head,
        base,
        title,
        body,
    };
    let opened = match &gitops.pull_requests {
        Some(p) => tokio::select! {
            r = p.open(&task.attempt_id, &ask) => r,
            () = ctx.cancel.cancelled() => return Ok(StepEnd::Cancelled),
            () = sleep_until_deadline(ctx.deadline) => return Ok(StepEnd::TimedOut),
        },
        None => Ok(None),
    };
    let (line, end) = match opened {
        Ok(Some(o)) => {
            let verb = if o.created { "opened" } else { "already open:" };
            task.set_output("pull-request", &o.url);
            (
                format!("pull request {verb} {}\n", o.url),
                StepEnd::Exited(0),
            )
        }
        Ok(None) => (
            format!(
                "no forge is registered for {}: open a pull request from {} into {} by hand\n",
                ask.repo, ask.head, ask.base
            ),
            StepEnd::Exited(0),
        ),
        Err(message) => (format!("{message}\n"), StepEnd::Failed { message }),
    };
    step_log(ctx, &line).await?;
    Ok(end)
}

/// Runs `work` on a blocking thread, honouring cancel and deadline, and
/// turns its result into the step's log, outputs and end.
async fn finish(
    task: &TaskContext,
    ctx: &StepContext<'_>,
    work: impl FnOnce() -> Result<Done, GitOpsError> + Send + 'static,
) -> Result<StepEnd, ExecutorError> {
    match blocking(ctx, work).await {
        Ok(result) => report(task, ctx, result).await,
        Err(end) => Ok(end),
    }
}

/// Runs `work` on a blocking thread; `Err` is the step's end when it was
/// cancelled or timed out first.
async fn blocking(
    ctx: &StepContext<'_>,
    work: impl FnOnce() -> Result<Done, GitOpsError> + Send + 'static,
) -> Result<Result<Done, GitOpsError>, StepEnd> {
    let handle = tokio::task::spawn_blocking(work);
    // A cancelled git operation finishes in the background; the attempt's
    // directory is removed after it, and nothing is pushed half-way.
    tokio::select! {
        r = handle => Ok(r.map_err(|e| GitOpsError::Join(e.to_string())).and_then(|r| r)),
        () = ctx.cancel.cancelled() => Err(StepEnd::Cancelled),
        () = sleep_until_deadline(ctx.deadline) => Err(StepEnd::TimedOut),
    }
}

/// Logs and records what a step did, or its failure.
async fn report(
    task: &TaskContext,
    ctx: &StepContext<'_>,
    result: Result<Done, GitOpsError>,
) -> Result<StepEnd, ExecutorError> {
    match result {
        Ok(done) => {
            step_log(ctx, &done.log).await?;
            for (key, value) in done.outputs {
                task.set_output(key, &value);
            }
            Ok(StepEnd::Exited(0))
        }
        Err(e) => {
            let message = crate::error::chain(&e);
            step_log(ctx, &format!("{message}\n")).await?;
            Ok(StepEnd::Failed { message })
        }
    }
}

/// The secret a `set-image` clones with: the next `git-push` step's, else
/// the runner's checkout credentials.
fn clone_credentials(gitops: &GitOps, task: &TaskContext, index: u32) -> Option<String> {
    let next = usize::try_from(index).map_or(0, |i| i + 1);
    task.task
        .steps
        .iter()
        .skip(next)
        .find_map(|s| match &s.kind {
            Some(step::Kind::GitPush(g)) => Some(g.credentials.clone()),
            _ => None,
        })
        .filter(|c| !c.is_empty())
        .or_else(|| gitops.checkout_credentials.clone())
}

fn open(dir: &Path, url: &str) -> Result<git2::Repository, GitOpsError> {
    git2::Repository::open(dir).map_err(|source| {
        GitError::Git {
            op: "opening the run's checkout",
            url: url.to_owned(),
            source,
        }
        .into()
    })
}

fn head_commit(repo: &git2::Repository, url: &str) -> Result<git2::Oid, GitOpsError> {
    repo.head()
        .and_then(|h| h.peel_to_commit())
        .map(|c| c.id())
        .map_err(|source| {
            GitError::Git {
                op: "reading the checkout's HEAD commit",
                url: url.to_owned(),
                source,
            }
            .into()
        })
}

/// The branch HEAD is on, else [`DEFAULT_BRANCH`] (a detached checkout).
fn branch_of(repo: &git2::Repository) -> String {
    repo.head()
        .ok()
        .filter(git2::Reference::is_branch)
        .and_then(|h| h.shorthand().ok().map(str::to_owned))
        .unwrap_or_else(|| DEFAULT_BRANCH.to_owned())
}
