//! The `git-push` step: commit the pending write-back's files (nothing
//! else) on its base commit as the runner's author, and push that commit to
//! its branch, never forced. A race with another writer (a non-fast-forward,
//! or a refused ref while the branch moved) fetches the branch, resets onto
//! its head, re-applies every edit and tries again, at most [`MAX_TRIES`]
//! times with jittered exponential backoff.
//!
//! In pull-request mode the commit goes to the task's own branch,
//! `capstan/<pipeline>/<task>/<sha>`, instead: pushed forced (the branch is
//! Capstan's, rewritten when the base moved), or not at all when it already
//! holds the same tree (a rerun). The pull request itself is opened by the
//! caller ([`super::pull_request`]), which holds the coordinator's line.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use capstan_proto::pipeline::v1::GitPushStep;

use super::set_image::apply_edit;
use super::{Done, GitOps, GitOpsError, Pending, open};
use crate::git::GitError;
use crate::git::remote::{Pushed, Remote};

/// Push attempts before a run of non-fast-forward rejections is an error.
pub(crate) const MAX_TRIES: usize = 5;

/// How one push went.
enum Outcome {
    Done,
    /// The remote branch moved under us.
    Raced,
}

/// The branch a pull request goes from: the task's in the run's commit, so
/// a rerun of the same commit finds its own and two tasks of one run (a
/// matrix, a staging and a prod bump) never share one. Characters git
/// refuses in a ref (a matrix task's `[`, `=`, `,`) become `-`.
pub(crate) fn pull_request_branch(pipeline: &str, task: &str, sha: &str) -> String {
    let task: String = task
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "{}{pipeline}/{}/{sha}",
        super::pull_request::BRANCH_PREFIX,
        task.trim_matches('-')
    )
}

/// Where a `git-push` in pull-request mode names its branch after.
pub(super) struct Origin {
    pub(super) task: String,
    /// The run's commit; `None` (no source repository): the manifests'
    /// base commit.
    pub(super) sha: Option<String>,
}

/// The `git-push` step on a blocking thread.
pub(super) fn git_push_blocking(
    gitops: &GitOps,
    step: &GitPushStep,
    origin: &Origin,
) -> Result<Done, GitOpsError> {
    let Some(mut pending) = gitops.take_pending() else {
        return Err(GitOpsError::NothingPending);
    };
    let pull_request = match step.mode.as_str() {
        "" | "direct" => false,
        "pull-request" => true,
        other => return Err(GitOpsError::BadMode(other.to_owned())),
    };
    if !step.branch.is_empty() && !valid_branch(&step.branch) {
        return Err(GitOpsError::BadBranch(step.branch.clone()));
    }
    let url = pending.repo_url.clone();
    let secret_name = if step.credentials.is_empty() {
        pending.credentials.clone()
    } else {
        Some(step.credentials.clone())
    };
    let secret = gitops.secret(secret_name.as_deref())?;
    let remote = Remote {
        url: &url,
        secret: secret.as_ref(),
        secret_name: secret_name.as_deref(),
    };
    let repo = open(&pending.dir, &url)?;
    let sig = git2::Signature::now(&gitops.author.name, &gitops.author.email)
        .map_err(git(&url, "making the commit signature"))?;
    let mut log = String::new();
    if !step.branch.is_empty() && step.branch != pending.branch {
        pending.branch = step.branch.clone();
        reapply_on_head(&repo, &remote, &mut pending, &mut log)?;
    }
    if pull_request {
        let sha = origin
            .sha
            .clone()
            .unwrap_or_else(|| pending.base.to_string());
        let head = pull_request_branch(&step.pipeline, &origin.task, &sha);
        if !valid_branch(&head) {
            return Err(GitOpsError::BadBranch(head));
        }
        return push_pull_request(&repo, &remote, &pending, &sig, step, head, log);
    }
    let who = gitops.author.to_string();
    push_direct(&repo, &remote, pending, (&sig, &who), &step.message, log)
}

/// Direct mode: commits the edits and pushes them to the branch, again on
/// its new head after each race.
fn push_direct(
    repo: &git2::Repository,
    remote: &Remote<'_>,
    mut pending: Pending,
    (sig, who): (&git2::Signature<'_>, &str),
    message: &str,
    mut log: String,
) -> Result<Done, GitOpsError> {
    let url = remote.url.to_owned();
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .with_max_times(MAX_TRIES)
        .build();
    for attempt in 1..=MAX_TRIES {
        if attempt > 1 {
            std::thread::sleep(delays.next().unwrap_or(Duration::from_millis(500)));
            reapply_on_head(repo, remote, &mut pending, &mut log)?;
        }
        let Some(commit) = commit_edits(repo, &pending, sig, message)? else {
            log.push_str(&format!(
                "already up to date: {} has the image at {}\n",
                pending.branch, pending.base
            ));
            return Ok(Done {
                log,
                outputs: vec![("commit", pending.base.to_string()), ("repo", url)],
                pull_request: None,
            });
        };
        let refname = format!("refs/heads/{}", pending.branch);
        match push(repo, remote, commit, &refname)? {
            Outcome::Done => {
                log.push_str(&format!(
                    "pushed {commit} to {url} {} as {who}\n",
                    pending.branch
                ));
                return Ok(Done {
                    log,
                    outputs: vec![("commit", commit.to_string()), ("repo", url)],
                    pull_request: None,
                });
            }
            Outcome::Raced => log.push_str(&format!(
                "push {attempt}/{MAX_TRIES} rejected: {} moved (non-fast-forward)\n",
                pending.branch
            )),
        }
    }
    Err(GitOpsError::Contended {
        url,
        tries: MAX_TRIES,
    })
}

/// Pull-request mode: commits the edits on the base and puts that on
/// `head`, unless `head` already has the same tree (then its commit is
/// kept). Nothing to commit: no branch and no pull request.
fn push_pull_request(
    repo: &git2::Repository,
    remote: &Remote<'_>,
    pending: &Pending,
    sig: &git2::Signature<'_>,
    step: &GitPushStep,
    head: String,
    mut log: String,
) -> Result<Done, GitOpsError> {
    let url = remote.url.to_owned();
    let Some(commit) = commit_edits(repo, pending, sig, &step.message)? else {
        log.push_str(&format!(
            "already up to date: {} has the image at {}; no pull request\n",
            pending.branch, pending.base
        ));
        return Ok(Done {
            log,
            outputs: vec![("commit", pending.base.to_string()), ("repo", url)],
            pull_request: None,
        });
    };
    let tree = |oid| {
        repo.find_commit(oid)
            .map(|c| c.tree_id())
            .map_err(git(remote.url, "reading a commit's tree"))
    };
    let pushed = match remote.fetch_branch_if_any(repo, &head)? {
        Some(there) if tree(there)? == tree(commit)? => {
            log.push_str(&format!("{head} already has this change at {there}\n"));
            there
        }
        _ => {
            let refname = format!("refs/heads/{head}");
            let rejected = match remote.push_forced(repo, commit, &refname)? {
                Pushed::Done => None,
                // A forced push is never judged a fast-forward; a server
                // that says so refuses forced pushes to the branch.
                Pushed::NonFastForward => Some((refname, "non-fast-forward".to_owned())),
                Pushed::RefRejected { refname, message } => Some((refname, message)),
            };
            if let Some((refname, message)) = rejected {
                return Err(GitOpsError::Rejected {
                    url,
                    refname,
                    message,
                });
            }
            log.push_str(&format!("pushed {commit} to {url} {head}\n"));
            commit
        }
    };
    Ok(Done {
        log,
        outputs: vec![
            ("commit", pushed.to_string()),
            ("repo", url),
            ("branch", head.clone()),
        ],
        pull_request: Some((head, pending.branch.clone())),
    })
}

/// After a race: fetches the branch, resets the working tree onto its head
/// and applies every edit again.
fn reapply_on_head(
    repo: &git2::Repository,
    remote: &Remote<'_>,
    pending: &mut Pending,
    log: &mut String,
) -> Result<(), GitOpsError> {
    let head = remote.fetch_branch(repo, &pending.branch)?;
    let commit = repo
        .find_commit(head)
        .map_err(git(remote.url, "reading the fetched head"))?;
    repo.reset(commit.as_object(), git2::ResetType::Hard, None)
        .map_err(git(remote.url, "resetting onto the fetched head"))?;
    pending.base = head;
    log.push_str(&format!(
        "{} moved to {head}; re-applying the edit\n",
        pending.branch
    ));
    for edit in &pending.edits {
        log.push_str(&apply_edit(&pending.dir, edit)?);
    }
    Ok(())
}

/// Commits the edited files on the base commit and moves HEAD there;
/// `None` when the tree is the base's (the branch already has the edit).
fn commit_edits(
    repo: &git2::Repository,
    pending: &Pending,
    sig: &git2::Signature<'_>,
    message: &str,
) -> Result<Option<git2::Oid>, GitOpsError> {
    let url = pending.repo_url.as_str();
    let base = repo
        .find_commit(pending.base)
        .map_err(git(url, "reading the base commit"))?;
    let mut index = repo.index().map_err(git(url, "reading the index"))?;
    for edit in &pending.edits {
        for file in &edit.files {
            index
                .add_path(&index_path(file))
                .map_err(git(url, "staging the edited files"))?;
        }
    }
    index.write().map_err(git(url, "writing the index"))?;
    let tree_id = index.write_tree().map_err(git(url, "writing the tree"))?;
    if tree_id == base.tree_id() {
        return Ok(None);
    }
    let tree = repo
        .find_tree(tree_id)
        .map_err(git(url, "reading the tree"))?;
    let commit = repo
        .commit(None, sig, sig, message, &tree, &[&base])
        .map_err(git(url, "committing"))?;
    repo.set_head_detached(commit)
        .map_err(git(url, "moving HEAD to the new commit"))?;
    Ok(Some(commit))
}

/// Pushes `commit` to `refname`. A non-fast-forward is a race; so is a ref
/// the server refused when the branch has moved since `commit`'s parent
/// (found by fetching); any other refusal (a hook, a protected branch) is
/// [`GitOpsError::Rejected`].
fn push(
    repo: &git2::Repository,
    remote: &Remote<'_>,
    commit: git2::Oid,
    refname: &str,
) -> Result<Outcome, GitOpsError> {
    let (name, message) = match remote.push(repo, commit, refname)? {
        Pushed::Done => return Ok(Outcome::Done),
        Pushed::NonFastForward => return Ok(Outcome::Raced),
        Pushed::RefRejected { refname, message } => (refname, message),
    };
    let parent = repo
        .find_commit(commit)
        .and_then(|c| c.parent_id(0))
        .map_err(git(remote.url, "reading the pushed commit"))?;
    let branch = refname.strip_prefix("refs/heads/").unwrap_or(refname);
    let head = remote.fetch_branch(repo, branch)?;
    if head == parent {
        return Err(GitOpsError::Rejected {
            url: remote.url.to_owned(),
            refname: name,
            message,
        });
    }
    Ok(Outcome::Raced)
}

fn valid_branch(name: &str) -> bool {
    git2::Reference::is_valid_name(&format!("refs/heads/{name}"))
}

/// `files` as index paths (`./k8s/a.yaml` -> `k8s/a.yaml`); set-image has
/// already refused anything outside the repository.
fn index_path(file: &str) -> PathBuf {
    Path::new(file)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

/// A failed step `op` of an operation on the repository of `url`.
fn git<'a>(url: &'a str, op: &'static str) -> impl FnOnce(git2::Error) -> GitOpsError + 'a {
    move |source| {
        GitError::Git {
            op,
            url: url.to_owned(),
            source,
        }
        .into()
    }
}
