//! Clone, fetch and push against one remote URL with a runner secret: the
//! only network path of the source checkout and the GitOps write-back, and
//! the only place their failures become [`GitError`]s (refused before
//! authenticating, credentials not accepted, anything else).

use std::path::Path;
use std::sync::Mutex;

use super::auth::{self, AuthReport, Failure};
use super::{GitError, Op};
use crate::secrets::Secret;

/// A remote repository and the credentials to reach it with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Remote<'a> {
    pub(crate) url: &'a str,
    pub(crate) secret: Option<&'a Secret>,
    /// The secret's name for messages; `None` when the caller has none to
    /// point at.
    pub(crate) secret_name: Option<&'a str>,
}

/// How a push went, when the remote answered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    Done,
    /// The remote branch is not an ancestor of the pushed commit.
    NonFastForward,
    /// The server refused the ref (reported through
    /// `push_update_reference`): a hook, a protected branch, or a race the
    /// server words its own way.
    RefRejected {
        refname: String,
        message: String,
    },
}

/// The local ref a push sends from.
const PUSH_REF: &str = "refs/capstan/push";

impl Remote<'_> {
    /// Clones the remote into `dest` (an empty or missing directory).
    pub(crate) fn clone_into(&self, dest: &Path, op: Op) -> Result<git2::Repository, GitError> {
        let report = AuthReport::default();
        let mut fetch = git2::FetchOptions::new();
        fetch.remote_callbacks(self.callbacks(&report));
        git2::build::RepoBuilder::new()
            .fetch_options(fetch)
            .clone(self.url, dest)
            .map_err(|source| self.error(op, &report, source))
    }

    /// Fetches `branch` into `refs/remotes/origin/<branch>` of `repo` and
    /// returns its head.
    pub(crate) fn fetch_branch(
        &self,
        repo: &git2::Repository,
        branch: &str,
    ) -> Result<git2::Oid, GitError> {
        let tracking = format!("refs/remotes/origin/{branch}");
        let report = AuthReport::default();
        let mut options = git2::FetchOptions::new();
        options.remote_callbacks(self.callbacks(&report));
        self.anonymous(repo)?
            .fetch(
                &[format!("+refs/heads/{branch}:{tracking}")],
                Some(&mut options),
                None,
            )
            .map_err(|source| self.error(Op::FetchBranch, &report, source))?;
        repo.refname_to_id(&tracking)
            .map_err(self.git("reading the fetched branch"))
    }

    /// Fetches every branch into `refs/remotes/origin/*` of `repo`.
    pub(crate) fn fetch_branches(&self, repo: &git2::Repository) -> Result<(), GitError> {
        let report = AuthReport::default();
        let mut options = git2::FetchOptions::new();
        options.remote_callbacks(self.callbacks(&report));
        self.anonymous(repo)?
            .fetch(
                &["+refs/heads/*:refs/remotes/origin/*"],
                Some(&mut options),
                None,
            )
            .map_err(|source| self.error(Op::FetchBranch, &report, source))
    }

    /// Fetches `branch` like [`Remote::fetch_branch`]; `None` when the
    /// remote has no such branch.
    pub(crate) fn fetch_branch_if_any(
        &self,
        repo: &git2::Repository,
        branch: &str,
    ) -> Result<Option<git2::Oid>, GitError> {
        // A fetch of a missing branch fetches nothing and fails nothing, so
        // a tracking ref left from before must not answer for it.
        let tracking = format!("refs/remotes/origin/{branch}");
        if let Ok(mut old) = repo.find_reference(&tracking) {
            old.delete()
                .map_err(self.git("clearing the tracking ref"))?;
        }
        match self.fetch_branch(repo, branch) {
            Ok(oid) => Ok(Some(oid)),
            Err(GitError::Git { source, .. }) if source.code() == git2::ErrorCode::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Pushes `commit` to `refname`, never forced.
    pub(crate) fn push(
        &self,
        repo: &git2::Repository,
        commit: git2::Oid,
        refname: &str,
    ) -> Result<Pushed, GitError> {
        self.push_with(repo, commit, refname, false)
    }

    /// Pushes `commit` to `refname` whatever the remote's ref holds: only
    /// for a branch Capstan owns (a pull request's `capstan/...`).
    pub(crate) fn push_forced(
        &self,
        repo: &git2::Repository,
        commit: git2::Oid,
        refname: &str,
    ) -> Result<Pushed, GitError> {
        self.push_with(repo, commit, refname, true)
    }

    fn push_with(
        &self,
        repo: &git2::Repository,
        commit: git2::Oid,
        refname: &str,
        force: bool,
    ) -> Result<Pushed, GitError> {
        repo.reference(PUSH_REF, commit, true, "capstan git-push")
            .map_err(self.git("creating the push ref"))?;
        let report = AuthReport::default();
        let rejected: Mutex<Option<(String, String)>> = Mutex::new(None);
        let result = {
            let mut callbacks = self.callbacks(&report);
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
            self.anonymous(repo)?.push(
                &[format!(
                    "{}{PUSH_REF}:{refname}",
                    if force { "+" } else { "" }
                )],
                Some(&mut options),
            )
        };
        if let Err(source) = result {
            return match self.error(Op::Push, &report, source) {
                GitError::Remote { source, .. }
                    if source.code() == git2::ErrorCode::NotFastForward =>
                {
                    Ok(Pushed::NonFastForward)
                }
                error => Err(error),
            };
        }
        Ok(match rejected.lock().ok().and_then(|mut r| r.take()) {
            Some((refname, message)) => Pushed::RefRejected { refname, message },
            None => Pushed::Done,
        })
    }

    fn callbacks<'a>(&'a self, report: &'a AuthReport) -> git2::RemoteCallbacks<'a> {
        auth::callbacks(self.url, self.secret, self.secret_name, report)
    }

    fn anonymous<'r>(&self, repo: &'r git2::Repository) -> Result<git2::Remote<'r>, GitError> {
        repo.remote_anonymous(self.url)
            .map_err(self.git("preparing the remote"))
    }

    /// A failed step `op` of an operation on this remote's repository.
    fn git(&self, op: &'static str) -> impl FnOnce(git2::Error) -> GitError + '_ {
        move |source| GitError::Git {
            op,
            url: self.url.to_owned(),
            source,
        }
    }

    /// The failure of network operation `op`, as the callbacks explain it.
    fn error(&self, op: Op, report: &AuthReport, source: git2::Error) -> GitError {
        let url = self.url.to_owned();
        match report.classify(source) {
            Failure::Refused(message) => GitError::Refused { op, url, message },
            Failure::Auth(source) => GitError::Auth {
                op,
                url,
                secret: self.secret_name.map(str::to_owned),
                source,
            },
            Failure::Other(source) => GitError::Remote { op, url, source },
        }
    }
}
