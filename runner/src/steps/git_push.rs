//! The GitOps write-back: the git half of `set-image` (clone the manifests
//! repository, remember the edit) and the `git-push` step (commit as the
//! runner's bot identity and push, re-applying the edit on a race).
//!
//! Both run inside the runner with git2, never in a container, so they
//! behave the same under every executor. Per attempt:
//!
//! 1. `set-image` picks the repository: the run's own checkout (the
//!    attempt's local workspace) when the step's `repo` is empty or equals
//!    the run's repository, else a fresh clone into the attempt's
//!    `manifests` directory. Clone credentials: the secret named by the
//!    task's next `git-push` step, else the runner's `--git-credentials`.
//!    It edits the files ([`super::set_image::set_image_in_files`]), logs
//!    each changed line, and records a [`Pending`] write-back on the
//!    attempt's [`GitOps`].
//! 2. `git-push` takes the pending write-back, commits the listed files
//!    (nothing else) on top of the base commit and pushes that commit to
//!    `refs/heads/<branch>` (the branch the clone came from, `main` for a
//!    detached checkout) with an explicit refspec, never forced. A rejected
//!    ref (reported through `push_update_reference`) or a non-fast-forward
//!    is a race with another writer: fetch the branch, reset onto its head,
//!    re-apply every edit and try again, at most [`MAX_TRIES`] times with
//!    jittered exponential backoff. When the edit is already on the branch,
//!    the step logs "already up to date" and makes no commit.
//!
//! The pushed (or current) commit id is the task output `commit`, the
//! repository URL the output `repo`.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use capstan_proto::pipeline::v1::{GitPushStep, SetImageStep, step};

use super::set_image::{SetImageError, set_image_in_files};
use crate::executor::ExecutorError;
use crate::git_auth::{self, AuthReport, Failure};
use crate::secrets::{Secret, Secrets, SecretsError};
use crate::step::{StepContext, StepEnd, TaskContext, sleep_until_deadline};

/// Default of `--git-author`.
pub const DEFAULT_AUTHOR: &str = "Capstan Bot <capstan@localhost>";
/// The branch pushed to when the manifests checkout is not on a branch.
pub const DEFAULT_BRANCH: &str = "main";
/// Push attempts before a run of non-fast-forward rejections is an error.
pub const MAX_TRIES: usize = 5;

/// The identity write-back commits are made as (author and committer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Author {
    pub name: String,
    pub email: String,
}

impl std::str::FromStr for Author {
    type Err = String;
    /// `Name <email>`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not `Name <email>`, e.g. `{DEFAULT_AUTHOR}`");
        let (name, rest) = s.split_once('<').ok_or_else(bad)?;
        let email = rest.strip_suffix('>').ok_or_else(bad)?.trim();
        let name = name.trim();
        if name.is_empty() || email.is_empty() || email.contains(['<', '>']) {
            return Err(bad());
        }
        Ok(Self {
            name: name.to_owned(),
            email: email.to_owned(),
        })
    }
}

impl Default for Author {
    fn default() -> Self {
        DEFAULT_AUTHOR
            .parse()
            .unwrap_or_else(|_| unreachable!("the default author parses"))
    }
}

impl std::fmt::Display for Author {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} <{}>", self.name, self.email)
    }
}

/// The runner-wide settings of the write-back steps plus the attempt's
/// pending write-back. One per attempt, shared by its steps.
#[derive(Debug, Default)]
pub struct GitOps {
    /// The runner's secrets (credentials are resolved here, on the runner).
    pub secrets: Arc<Secrets>,
    /// Who commits (`--git-author`).
    pub author: Author,
    /// The runner's `--git-credentials`: clone credentials when the task has
    /// no `git-push` step that names a secret.
    pub checkout_credentials: Option<String>,
    /// Where a separate manifests repository is cloned; `None` puts it
    /// beside the workspace (`<workspace>.manifests`).
    pub manifests_dir: Option<PathBuf>,
    pending: Mutex<Option<Pending>>,
}

/// What `set-image` left for `git-push`.
#[derive(Clone, Debug)]
pub struct Pending {
    /// The working tree of the manifests repository on the runner.
    pub dir: PathBuf,
    /// Where it came from and where the commit goes.
    pub repo_url: String,
    /// `refs/heads/<branch>` is pushed.
    pub branch: String,
    /// The commit the edits sit on.
    pub base: git2::Oid,
    /// Every edit made, in order: re-applied after a race.
    pub edits: Vec<PendingEdit>,
    /// The secret the repository was cloned with, if any.
    pub credentials: Option<String>,
}

/// One `set-image` edit.
#[derive(Clone, Debug)]
pub struct PendingEdit {
    pub files: Vec<String>,
    pub image: String,
    /// No matching reference is not an error (`allow-no-match: true`).
    pub allow_no_match: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GitOpsError {
    #[error(
        "`set-image` has no `repo` and the run has no repository (--repo): name the manifests repository"
    )]
    NoRepository,
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
    #[error("cloning {url}: authentication failed; check the secret {}", secret_name(.secret))]
    CloneAuth {
        url: String,
        secret: Option<String>,
        #[source]
        source: git2::Error,
    },
    #[error("git push to {url} rejected: authentication failed; check the secret {}", secret_name(.secret))]
    PushAuth {
        url: String,
        secret: Option<String>,
        #[source]
        source: git2::Error,
    },
    /// The runner refused the remote before authenticating: its host key,
    /// or a secret of the wrong kind for its scheme.
    #[error("{url}: {message}")]
    Refused { url: String, message: String },
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
    #[error("{op} ({url})")]
    Git {
        op: &'static str,
        url: String,
        #[source]
        source: git2::Error,
    },
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
}

fn secret_name(secret: &Option<String>) -> String {
    match secret {
        Some(name) => format!("`{name}`"),
        None => "(none is configured: set `credentials` on the git-push step)".to_owned(),
    }
}

impl GitOps {
    /// The write-back settings of one attempt, with nothing pending.
    pub fn new(
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
            pending: Mutex::new(None),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Option<Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pending write-back, if a `set-image` made one and no `git-push`
    /// took it yet.
    pub fn peek(&self) -> Option<Pending> {
        self.pending().clone()
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
}

/// Runs a `set-image` step (see the module docs).
pub async fn run_set_image(
    gitops: &Arc<GitOps>,
    task: &TaskContext,
    ctx: &StepContext<'_>,
    step: &SetImageStep,
) -> Result<StepEnd, ExecutorError> {
    let credentials = clone_credentials(gitops, task, ctx.index);
    let gitops = Arc::clone(gitops);
    let step = step.clone();
    let task_repo = task.repo.clone();
    let workspace = task.workspace.clone();
    let work = move || {
        set_image_blocking(
            &gitops,
            &step,
            &task_repo,
            &workspace,
            credentials.as_deref(),
        )
    };
    finish(task, ctx, work).await
}

/// Runs a `git-push` step (see the module docs).
pub async fn run_git_push(
    gitops: &Arc<GitOps>,
    task: &TaskContext,
    ctx: &StepContext<'_>,
    step: &GitPushStep,
) -> Result<StepEnd, ExecutorError> {
    let gitops = Arc::clone(gitops);
    let step = step.clone();
    finish(task, ctx, move || git_push_blocking(&gitops, &step)).await
}

/// Runs `work` on a blocking thread, honouring cancel and deadline, and
/// turns its result into the step's log, outputs and end.
async fn finish(
    task: &TaskContext,
    ctx: &StepContext<'_>,
    work: impl FnOnce() -> Result<Done, GitOpsError> + Send + 'static,
) -> Result<StepEnd, ExecutorError> {
    let index = ctx.index;
    let handle = tokio::task::spawn_blocking(work);
    // A cancelled git operation finishes in the background; the attempt's
    // directory is removed after it, and nothing is pushed half-way.
    let result = tokio::select! {
        r = handle => r.map_err(|e| GitOpsError::Join(e.to_string())).and_then(|r| r),
        () = ctx.cancel.cancelled() => return Ok(StepEnd::Cancelled),
        () = sleep_until_deadline(ctx.deadline) => return Ok(StepEnd::TimedOut),
    };
    let write = |text: String| async move {
        ctx.output
            .write(text.as_bytes())
            .await
            .map_err(|source| ExecutorError::Output { index, source })
    };
    match result {
        Ok(done) => {
            write(done.log).await?;
            for (key, value) in done.outputs {
                task.set_output(key, &value);
            }
            Ok(StepEnd::Exited(0))
        }
        Err(e) => {
            let message = crate::error::chain(&e);
            write(format!("{message}\n")).await?;
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

fn same_repo(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let s = s.trim().trim_end_matches('/');
        s.strip_suffix(".git").unwrap_or(s).to_owned()
    };
    norm(a) == norm(b)
}

fn set_image_blocking(
    gitops: &GitOps,
    step: &SetImageStep,
    task_repo: &str,
    workspace: &Path,
    credentials: Option<&str>,
) -> Result<Done, GitOpsError> {
    let source =
        step.repo.is_empty() || (!task_repo.is_empty() && same_repo(&step.repo, task_repo));
    let url = if step.repo.is_empty() {
        task_repo
    } else {
        &step.repo
    };
    if url.is_empty() {
        return Err(GitOpsError::NoRepository);
    }
    let mut log = String::new();
    let existing = gitops.peek();
    if let Some(p) = &existing
        && !same_repo(&p.repo_url, url)
    {
        return Err(GitOpsError::OtherRepository {
            pending: p.repo_url.clone(),
            requested: url.to_owned(),
        });
    }
    let mut pending = match existing {
        Some(p) => p,
        None if source => {
            let repo = open(workspace, url)?;
            log.push_str(&format!(
                "editing the run's checkout of {url} (the manifests live in the source repository)\n"
            ));
            let base = head_commit(&repo, url)?;
            Pending {
                dir: workspace.to_owned(),
                repo_url: url.to_owned(),
                branch: branch_of(&repo),
                base,
                edits: Vec::new(),
                credentials: credentials.map(str::to_owned),
            }
        }
        None => {
            let dir = gitops
                .manifests_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{}.manifests", workspace.display())));
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|source| GitOpsError::Read {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
            let secret = gitops.secret(credentials)?;
            let repo = clone(url, &dir, secret.as_ref(), credentials)?;
            let base = head_commit(&repo, url)?;
            let branch = branch_of(&repo);
            log.push_str(&format!("cloned {url} ({branch} at {base})\n"));
            Pending {
                dir,
                repo_url: url.to_owned(),
                branch,
                base,
                edits: Vec::new(),
                credentials: credentials.map(str::to_owned),
            }
        }
    };
    let edit = PendingEdit {
        files: step.files.clone(),
        image: step.image.clone(),
        allow_no_match: step.allow_no_match,
    };
    log.push_str(&apply_edit(&pending.dir, &edit)?);
    pending.edits.push(edit);
    *gitops.pending() = Some(pending);
    Ok(Done {
        log,
        outputs: Vec::new(),
    })
}

/// Applies one edit and describes it: `file:line: old -> new` per changed
/// line, or that the file already had the image.
fn apply_edit(dir: &Path, edit: &PendingEdit) -> Result<String, GitOpsError> {
    // Only for the log: set_image_in_files reports missing and unsafe paths.
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    let before: Vec<String> = edit.files.iter().map(|f| read(f)).collect();
    let report = set_image_in_files(dir, &edit.files, &edit.image, edit.allow_no_match)?;
    let mut log = String::new();
    for ((file, old), r) in edit.files.iter().zip(&before).zip(&report.files) {
        if r.changed == 0 {
            if r.matched > 0 {
                log.push_str(&format!("{file}: already {}\n", edit.image));
            }
            continue;
        }
        let new = read(file);
        for (n, (a, b)) in old.lines().zip(new.lines()).enumerate() {
            if a != b {
                log.push_str(&format!("{file}:{}: {} -> {}\n", n + 1, a.trim(), b.trim()));
            }
        }
    }
    Ok(log)
}

fn open(dir: &Path, url: &str) -> Result<git2::Repository, GitOpsError> {
    git2::Repository::open(dir).map_err(|source| GitOpsError::Git {
        op: "opening the run's checkout",
        url: url.to_owned(),
        source,
    })
}

fn head_commit(repo: &git2::Repository, url: &str) -> Result<git2::Oid, GitOpsError> {
    repo.head()
        .and_then(|h| h.peel_to_commit())
        .map(|c| c.id())
        .map_err(|source| GitOpsError::Git {
            op: "reading the checkout's HEAD commit",
            url: url.to_owned(),
            source,
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

/// A failed git2 call against `url`, as the callbacks explain it: the
/// remote refused before authenticating ([`GitOpsError::Refused`]), or the
/// credentials were refused (`auth`). `Err` hands any other failure back.
fn auth_error(
    report: &AuthReport,
    url: &str,
    source: git2::Error,
    auth: impl FnOnce(git2::Error) -> GitOpsError,
) -> Result<GitOpsError, git2::Error> {
    match report.classify(source) {
        Failure::Refused(message) => Ok(GitOpsError::Refused {
            url: url.to_owned(),
            message,
        }),
        Failure::Auth(source) => Ok(auth(source)),
        Failure::Other(source) => Err(source),
    }
}

fn clone(
    url: &str,
    dir: &Path,
    secret: Option<&Secret>,
    secret_name: Option<&str>,
) -> Result<git2::Repository, GitOpsError> {
    let report = AuthReport::default();
    let mut fetch = git2::FetchOptions::new();
    fetch.remote_callbacks(git_auth::callbacks(url, secret, secret_name, &report));
    git2::build::RepoBuilder::new()
        .fetch_options(fetch)
        .clone(url, dir)
        .map_err(|source| {
            auth_error(&report, url, source, |source| GitOpsError::CloneAuth {
                url: url.to_owned(),
                secret: secret_name.map(str::to_owned),
                source,
            })
            .unwrap_or_else(|source| GitOpsError::Git {
                op: "cloning the manifests repository",
                url: url.to_owned(),
                source,
            })
        })
}

/// `files` as index paths (`./k8s/a.yaml` -> `k8s/a.yaml`); set-image has
/// already refused anything outside the repository.
fn index_path(file: &str) -> PathBuf {
    Path::new(file)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

/// How one push went.
enum Pushed {
    Done,
    /// The remote branch moved under us.
    Raced,
}

fn git_push_blocking(gitops: &GitOps, step: &GitPushStep) -> Result<Done, GitOpsError> {
    let Some(mut pending) = gitops.pending().take() else {
        return Err(GitOpsError::NothingPending);
    };
    let url = pending.repo_url.clone();
    let secret_name = if step.credentials.is_empty() {
        pending.credentials.clone()
    } else {
        Some(step.credentials.clone())
    };
    let secret = gitops.secret(secret_name.as_deref())?;
    let git = |op: &'static str| {
        let url = url.clone();
        move |source| GitOpsError::Git { op, url, source }
    };
    let repo = open(&pending.dir, &url)?;
    let sig = git2::Signature::now(&gitops.author.name, &gitops.author.email)
        .map_err(git("making the commit signature"))?;
    let refname = format!("refs/heads/{}", pending.branch);
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .with_max_times(MAX_TRIES)
        .build();
    let mut log = String::new();
    for attempt in 1..=MAX_TRIES {
        if attempt > 1 {
            std::thread::sleep(delays.next().unwrap_or(Duration::from_millis(500)));
            let head = fetch_branch(&repo, &url, &pending.branch, secret.as_ref(), &secret_name)?;
            let commit = repo
                .find_commit(head)
                .map_err(git("reading the fetched head"))?;
            repo.reset(commit.as_object(), git2::ResetType::Hard, None)
                .map_err(git("resetting onto the fetched head"))?;
            pending.base = head;
            log.push_str(&format!(
                "{} moved to {head}; re-applying the edit\n",
                pending.branch
            ));
            for edit in &pending.edits {
                log.push_str(&apply_edit(&pending.dir, edit)?);
            }
        }
        let base = repo
            .find_commit(pending.base)
            .map_err(git("reading the base commit"))?;
        let mut index = repo.index().map_err(git("reading the index"))?;
        for edit in &pending.edits {
            for file in &edit.files {
                index
                    .add_path(&index_path(file))
                    .map_err(git("staging the edited files"))?;
            }
        }
        index.write().map_err(git("writing the index"))?;
        let tree_id = index.write_tree().map_err(git("writing the tree"))?;
        if tree_id == base.tree_id() {
            log.push_str(&format!(
                "already up to date: {} has the image at {}\n",
                pending.branch, pending.base
            ));
            return Ok(Done {
                log,
                outputs: vec![("commit", pending.base.to_string()), ("repo", url)],
            });
        }
        let tree = repo.find_tree(tree_id).map_err(git("reading the tree"))?;
        let commit = repo
            .commit(None, &sig, &sig, &step.message, &tree, &[&base])
            .map_err(git("committing"))?;
        repo.set_head_detached(commit)
            .map_err(git("moving HEAD to the new commit"))?;
        match push(&repo, &url, commit, &refname, secret.as_ref(), &secret_name)? {
            Pushed::Done => {
                log.push_str(&format!(
                    "pushed {commit} to {url} {} as {}\n",
                    pending.branch, gitops.author
                ));
                return Ok(Done {
                    log,
                    outputs: vec![("commit", commit.to_string()), ("repo", url)],
                });
            }
            Pushed::Raced => {
                log.push_str(&format!(
                    "push {attempt}/{MAX_TRIES} rejected: {} moved (non-fast-forward)\n",
                    pending.branch
                ));
            }
        }
    }
    Err(GitOpsError::Contended {
        url,
        tries: MAX_TRIES,
    })
}

/// Pushes `commit` to `refname`, never forced. A non-fast-forward is
/// [`Pushed::Raced`]; so is a ref the server refused when the branch has
/// moved since `commit`'s parent (found by fetching); any other refusal is
/// [`GitOpsError::Rejected`].
fn push(
    repo: &git2::Repository,
    url: &str,
    commit: git2::Oid,
    refname: &str,
    secret: Option<&Secret>,
    secret_name: &Option<String>,
) -> Result<Pushed, GitOpsError> {
    const LOCAL: &str = "refs/capstan/push";
    let git = |op: &'static str| {
        move |source| GitOpsError::Git {
            op,
            url: url.to_owned(),
            source,
        }
    };
    repo.reference(LOCAL, commit, true, "capstan git-push")
        .map_err(git("creating the push ref"))?;
    let report = AuthReport::default();
    let rejected: Mutex<Option<(String, String)>> = Mutex::new(None);
    let result = {
        let mut callbacks = git_auth::callbacks(url, secret, secret_name.as_deref(), &report);
        callbacks.push_update_reference(|name, status| {
            if let Some(message) = status
                && let Ok(mut r) = rejected.lock()
            {
                *r = Some((name.to_owned(), message.to_owned()));
            }
            Ok(())
        });
        let mut options = git2::PushOptions::new();
        options.remote_callbacks(callbacks);
        let mut remote = repo
            .remote_anonymous(url)
            .map_err(git("preparing the remote"))?;
        remote.push(&[format!("{LOCAL}:{refname}")], Some(&mut options))
    };
    if let Err(source) = result {
        let auth = |source| GitOpsError::PushAuth {
            url: url.to_owned(),
            secret: secret_name.clone(),
            source,
        };
        return match auth_error(&report, url, source, auth) {
            Ok(error) => Err(error),
            Err(source) if source.code() == git2::ErrorCode::NotFastForward => Ok(Pushed::Raced),
            Err(source) => Err(git("pushing")(source)),
        };
    }
    let rejected = rejected.lock().ok().and_then(|mut r| r.take());
    let Some((name, message)) = rejected else {
        return Ok(Pushed::Done);
    };
    // The server said no. If the branch moved since our parent, that is the
    // race a retry resolves; otherwise (a hook, a protected branch) it is final.
    let parent = repo
        .find_commit(commit)
        .and_then(|c| c.parent_id(0))
        .map_err(git("reading the pushed commit"))?;
    let branch = refname.strip_prefix("refs/heads/").unwrap_or(refname);
    let head = fetch_branch(repo, url, branch, secret, secret_name)?;
    if head == parent {
        return Err(GitOpsError::Rejected {
            url: url.to_owned(),
            refname: name,
            message,
        });
    }
    Ok(Pushed::Raced)
}

/// Fetches `branch` and returns its head.
fn fetch_branch(
    repo: &git2::Repository,
    url: &str,
    branch: &str,
    secret: Option<&Secret>,
    secret_name: &Option<String>,
) -> Result<git2::Oid, GitOpsError> {
    let tracking = format!("refs/remotes/origin/{branch}");
    let report = AuthReport::default();
    let mut options = git2::FetchOptions::new();
    options.remote_callbacks(git_auth::callbacks(
        url,
        secret,
        secret_name.as_deref(),
        &report,
    ));
    let mut remote = repo
        .remote_anonymous(url)
        .map_err(|source| GitOpsError::Git {
            op: "preparing the remote",
            url: url.to_owned(),
            source,
        })?;
    remote
        .fetch(
            &[format!("+refs/heads/{branch}:{tracking}")],
            Some(&mut options),
            None,
        )
        .map_err(|source| {
            auth_error(&report, url, source, |source| GitOpsError::PushAuth {
                url: url.to_owned(),
                secret: secret_name.clone(),
                source,
            })
            .unwrap_or_else(|source| GitOpsError::Git {
                op: "fetching the branch after a rejected push",
                url: url.to_owned(),
                source,
            })
        })?;
    repo.refname_to_id(&tracking)
        .map_err(|source| GitOpsError::Git {
            op: "reading the fetched branch",
            url: url.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::sink::testing::VecSink;
    use crate::step::testing::task;
    use capstan_proto::pipeline::v1::Step;
    use tokio_util::sync::CancellationToken;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app # the app\nspec:\n  containers:\n    - name: app\n      image: \"127.0.0.1:5000/demo/app:old\" # bumped by CI\n";

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(["-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A bare `main` repository with k8s/pod.yaml and k8s/other.yaml.
    fn origin(dir: &Path) -> PathBuf {
        let bare = dir.join("origin.git");
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "--bare", "-b", "main"]);
        let seed = dir.join("seed");
        std::fs::create_dir_all(seed.join("k8s")).unwrap();
        git(&seed, &["init", "-b", "main"]);
        std::fs::write(seed.join("k8s/pod.yaml"), POD).unwrap();
        std::fs::write(seed.join("k8s/other.yaml"), "a: 1\n").unwrap();
        git(&seed, &["add", "."]);
        git(&seed, &["commit", "-m", "seed"]);
        git(&seed, &["push", bare.to_str().unwrap(), "main"]);
        bare
    }

    fn set_image(repo: &str, file: &str, image: &str) -> Step {
        Step {
            kind: Some(step::Kind::SetImage(SetImageStep {
                repo: repo.into(),
                files: vec![file.into()],
                image: image.into(),
                allow_no_match: false,
            })),
            ..Step::default()
        }
    }

    fn git_push(message: &str) -> Step {
        Step {
            kind: Some(step::Kind::GitPush(GitPushStep {
                message: message.into(),
                credentials: String::new(),
            })),
            ..Step::default()
        }
    }

    /// Runs every step of `t` as one attempt does.
    async fn run_all(t: &TaskContext) -> (Vec<StepEnd>, String) {
        let gitops = Arc::<GitOps>::default();
        let sink = VecSink::default();
        let mut ends = Vec::new();
        for (i, s) in t.task.steps.iter().enumerate() {
            let ctx = StepContext {
                index: u32::try_from(i).unwrap(),
                step: s,
                cancel: CancellationToken::new(),
                deadline: None,
                output: &sink,
            };
            let end = match &s.kind {
                Some(step::Kind::SetImage(si)) => {
                    run_set_image(&gitops, t, &ctx, si).await.unwrap()
                }
                Some(step::Kind::GitPush(gp)) => run_git_push(&gitops, t, &ctx, gp).await.unwrap(),
                _ => unreachable!(),
            };
            ends.push(end);
        }
        (ends, sink.text())
    }

    fn new_task(dir: &Path, name: &str, steps: Vec<Step>) -> TaskContext {
        let ws = dir.join(name);
        std::fs::create_dir_all(&ws).unwrap();
        task(ws, steps)
    }

    #[tokio::test]
    async fn commits_as_the_bot_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let bare = origin(dir.path());
        let url = bare.display().to_string();
        let image = "127.0.0.1:5000/demo/app:abc123";
        let steps = vec![
            set_image(&url, "k8s/pod.yaml", image),
            git_push("deploy abc123"),
        ];
        let t = new_task(dir.path(), "a", steps.clone());
        let (ends, log) = run_all(&t).await;
        assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
        let head = git(&bare, &["rev-parse", "main"]);
        assert_eq!(
            t.outputs.lock().unwrap().get("commit"),
            Some(&head),
            "{log}"
        );
        assert_eq!(
            git(&bare, &["log", "-1", "--format=%an <%ae>|%s"]),
            "Capstan Bot <capstan@localhost>|deploy abc123"
        );
        let new = git(&bare, &["show", "main:k8s/pod.yaml"]);
        assert_eq!(
            format!("{new}\n"),
            POD.replace("127.0.0.1:5000/demo/app:old", image)
        );
        assert!(log.contains("k8s/pod.yaml:8:"), "{log}");

        // Same image again: no commit.
        let t = new_task(dir.path(), "b", steps);
        let (ends, log) = run_all(&t).await;
        assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
        assert!(log.contains("already up to date"), "{log}");
        assert_eq!(git(&bare, &["rev-parse", "main"]), head);
        assert_eq!(t.outputs.lock().unwrap().get("commit"), Some(&head));
    }

    #[tokio::test]
    async fn a_race_is_fetched_reapplied_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let bare = origin(dir.path());
        let url = bare.display().to_string();
        let t = new_task(
            dir.path(),
            "a",
            vec![
                set_image(&url, "k8s/pod.yaml", "127.0.0.1:5000/demo/app:v2"),
                git_push("deploy v2"),
            ],
        );
        // set-image first, then someone else pushes, then git-push.
        let gitops = Arc::<GitOps>::default();
        let sink = VecSink::default();
        let ctx = |i: u32| StepContext {
            index: i,
            step: &t.task.steps[i as usize],
            cancel: CancellationToken::new(),
            deadline: None,
            output: &sink,
        };
        let Some(step::Kind::SetImage(si)) = &t.task.steps[0].kind else {
            unreachable!()
        };
        assert_eq!(
            run_set_image(&gitops, &t, &ctx(0), si).await.unwrap(),
            StepEnd::Exited(0)
        );
        let other = dir.path().join("other");
        git(
            dir.path(),
            &["clone", url.as_str(), other.to_str().unwrap()],
        );
        std::fs::write(other.join("k8s/other.yaml"), "a: 2\n").unwrap();
        git(&other, &["commit", "-am", "other change"]);
        git(&other, &["push", "origin", "main"]);
        let Some(step::Kind::GitPush(gp)) = &t.task.steps[1].kind else {
            unreachable!()
        };
        assert_eq!(
            run_git_push(&gitops, &t, &ctx(1), gp).await.unwrap(),
            StepEnd::Exited(0),
            "{}",
            sink.text()
        );
        assert_eq!(
            git(&bare, &["log", "--format=%s", "main"]),
            "deploy v2\nother change\nseed"
        );
        assert_eq!(
            git(&bare, &["show", "main:k8s/other.yaml"]),
            "a: 2",
            "the other change is kept"
        );
        assert!(sink.text().contains("re-applying"), "{}", sink.text());
    }

    #[tokio::test]
    async fn git_push_without_set_image_and_a_missing_match_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let bare = origin(dir.path());
        let url = bare.display().to_string();
        let t = new_task(dir.path(), "a", vec![git_push("m")]);
        let (ends, log) = run_all(&t).await;
        assert!(
            matches!(&ends[0], StepEnd::Failed { message } if message.contains("needs a `set-image`")),
            "{log}"
        );
        let t = new_task(
            dir.path(),
            "b",
            vec![set_image(
                &url,
                "k8s/other.yaml",
                "127.0.0.1:5000/demo/app:v2",
            )],
        );
        let (ends, log) = run_all(&t).await;
        assert!(
            matches!(&ends[0], StepEnd::Failed { message } if message.contains("no image reference")),
            "{log}"
        );
        // Unless the step allows it: then it succeeds and changes nothing.
        let mut lenient = set_image(&url, "k8s/other.yaml", "127.0.0.1:5000/demo/app:v2");
        if let Some(step::Kind::SetImage(si)) = lenient.kind.as_mut() {
            si.allow_no_match = true;
        }
        let t = new_task(dir.path(), "c", vec![lenient]);
        let (ends, log) = run_all(&t).await;
        assert_eq!(ends[0], StepEnd::Exited(0), "{log}");
    }

    #[test]
    fn parses_authors() {
        let a: Author = "Deploy Bot <deploy@example.com>".parse().unwrap();
        assert_eq!(a.name, "Deploy Bot");
        assert_eq!(a.email, "deploy@example.com");
        assert_eq!(Author::default().to_string(), DEFAULT_AUTHOR);
        assert!("no email".parse::<Author>().is_err());
        assert!("<x@y>".parse::<Author>().is_err());
    }
}
