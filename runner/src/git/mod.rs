//! Git, with git2: the run's source checkout and the GitOps write-back's
//! clone, fetch and push, over one remote path with one error type.
//!
//! Layout:
//! - `checkout`: [`checkout()`], the run's repository at an exact commit in
//!   the attempt's workspace.
//! - `remote`: clone, fetch and push against a URL with a runner secret,
//!   and the one mapping of their failures to [`GitError`].
//! - `auth`: the git2 callbacks behind every remote operation: HTTP(S)
//!   basic auth from a login or token secret, SSH with a key secret and the
//!   server's host key checked against `known_hosts` (the secret's, else
//!   `~/.ssh/known_hosts`), as `StrictHostKeyChecking yes` does.
//!
//! Doors: `checkout` uses `remote`, `remote` uses `auth`; all use
//! [`crate::secrets`]. Nothing here knows about steps: `crate::gitops` and
//! the attempt call in.

mod auth;
mod checkout;
pub(crate) mod remote;

use std::path::PathBuf;

pub use checkout::checkout;

/// A failed git operation. How a network failure reads depends on what it
/// was for ([`Op`]); the variants sort it the same way everywhere.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The remote did not accept the credentials, or wanted some.
    #[error("{}", .op.auth_failed(.url, .secret.as_deref()))]
    Auth {
        op: Op,
        url: String,
        /// The secret's name, when the operation has one to point at.
        secret: Option<String>,
        #[source]
        source: git2::Error,
    },
    /// The runner refused the remote before authenticating: its host key,
    /// or a secret of the wrong kind for its scheme. `message` says what to do.
    #[error("{}: {message}", .op.subject(.url))]
    Refused {
        op: Op,
        url: String,
        message: String,
    },
    /// Any other failure of a network operation (network, missing
    /// repository, ...).
    #[error("{}", .op.failed(.url))]
    Remote {
        op: Op,
        url: String,
        #[source]
        source: git2::Error,
    },
    /// The run's `--repo` or `--rev` is not one git may be handed (the
    /// coordinator refuses them at submit; this is the second check).
    #[error("{0}")]
    BadSource(String),
    #[error("revision `{rev}` not found in {repo}")]
    RevNotFound {
        repo: String,
        rev: String,
        #[source]
        source: git2::Error,
    },
    #[error("checking out {rev} into {path}")]
    Checkout {
        rev: String,
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    /// A step of an operation on a repository of `url` (`op` says which).
    #[error("{op} ({url})")]
    Git {
        op: &'static str,
        url: String,
        #[source]
        source: git2::Error,
    },
    #[error("the checkout task failed: {0}")]
    Join(String),
}

/// What a network operation was for: its errors name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The run's source checkout.
    Checkout,
    /// `set-image`'s clone of a separate manifests repository.
    CloneManifests,
    /// `git-push`'s push.
    Push,
    /// `git-push`'s fetch of its branch after a rejected push.
    FetchBranch,
}

impl Op {
    /// What the message of a refused remote starts with.
    fn subject(self, url: &str) -> String {
        let url = &*capstan_proto::redact::redact_url(url);
        match self {
            Op::Checkout => format!("fetching {url}"),
            Op::CloneManifests | Op::Push | Op::FetchBranch => url.to_owned(),
        }
    }

    fn auth_failed(self, url: &str, secret: Option<&str>) -> String {
        let url = &*capstan_proto::redact::redact_url(url);
        match self {
            Op::Checkout => format!(
                "fetching {url}: authentication failed (check the repository credentials secret)"
            ),
            Op::CloneManifests => format!(
                "cloning {url}: authentication failed; check the secret {}",
                secret_name(secret)
            ),
            Op::Push | Op::FetchBranch => format!(
                "git push to {url} rejected: authentication failed; check the secret {}",
                secret_name(secret)
            ),
        }
    }

    fn failed(self, url: &str) -> String {
        let url = &*capstan_proto::redact::redact_url(url);
        match self {
            Op::Checkout => format!("fetching {url}"),
            Op::CloneManifests => format!("cloning the manifests repository ({url})"),
            Op::Push => format!("pushing ({url})"),
            Op::FetchBranch => format!("fetching the branch after a rejected push ({url})"),
        }
    }
}

fn secret_name(secret: Option<&str>) -> String {
    match secret {
        Some(name) => format!("`{name}`"),
        None => "(none is configured: set `credentials` on the git-push step)".to_owned(),
    }
}
