//! Source checkout: the run's repository at the exact commit, with git2.
//!
//! The checkout goes into the attempt's local workspace directory; the
//! docker executor copies that directory into the task's workspace volume
//! through the engine's API (no bind mount), the shell executor runs in it.

use std::path::{Path, PathBuf};

use crate::git_auth::Failure;
use crate::secrets::Secret;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("fetching {repo}: authentication failed (check the repository credentials secret)")]
    Auth {
        repo: String,
        #[source]
        source: git2::Error,
    },
    #[error("fetching {repo}: {message}")]
    Refused { repo: String, message: String },
    #[error("fetching {repo}")]
    Fetch {
        repo: String,
        #[source]
        source: git2::Error,
    },
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
    #[error("the checkout task failed: {0}")]
    Join(String),
}

/// Clones `repo` into `dest` (an empty or missing directory) and checks out
/// `rev` (a commit id, or anything `git rev-parse` understands such as a
/// branch or tag) as a detached HEAD. Returns the commit id checked out.
pub async fn checkout(
    repo: &str,
    rev: &str,
    dest: &Path,
    credentials: Option<Secret>,
) -> Result<String, GitError> {
    let (repo, rev, dest) = (repo.to_owned(), rev.to_owned(), dest.to_owned());
    tokio::task::spawn_blocking(move || checkout_blocking(&repo, &rev, &dest, credentials.as_ref()))
        .await
        .map_err(|e| GitError::Join(e.to_string()))?
}

fn checkout_blocking(
    repo_url: &str,
    rev: &str,
    dest: &Path,
    credentials: Option<&Secret>,
) -> Result<String, GitError> {
    let report = crate::git_auth::AuthReport::default();
    let mut fetch = git2::FetchOptions::new();
    fetch.remote_callbacks(crate::git_auth::callbacks(
        repo_url,
        credentials,
        None,
        &report,
    ));
    let repo = git2::build::RepoBuilder::new()
        .fetch_options(fetch)
        .clone(repo_url, dest)
        .map_err(|source| {
            let repo = repo_url.to_owned();
            match report.classify(source) {
                Failure::Refused(message) => GitError::Refused { repo, message },
                Failure::Auth(source) => GitError::Auth { repo, source },
                Failure::Other(source) => GitError::Fetch { repo, source },
            }
        })?;
    let spec = if rev.is_empty() { "HEAD" } else { rev };
    let object = repo
        .revparse_single(spec)
        .or_else(|_| repo.revparse_single(&format!("origin/{spec}")))
        .map_err(|source| GitError::RevNotFound {
            repo: repo_url.to_owned(),
            rev: spec.to_owned(),
            source,
        })?;
    let checkout_err = |source| GitError::Checkout {
        rev: spec.to_owned(),
        path: dest.to_owned(),
        source,
    };
    let commit = object.peel_to_commit().map_err(checkout_err)?;
    repo.checkout_tree(
        commit.as_object(),
        Some(git2::build::CheckoutBuilder::new().force()),
    )
    .map_err(checkout_err)?;
    repo.set_head_detached(commit.id()).map_err(checkout_err)?;
    Ok(commit.id().to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A repository with two commits; returns (path, first id, second id).
    pub(crate) fn two_commit_repo(dir: &Path) -> (PathBuf, String, String) {
        let path = dir.join("origin");
        let repo = git2::Repository::init(&path).unwrap();
        let sig = git2::Signature::now("test", "test@example.com").unwrap();
        let mut ids = Vec::new();
        for content in ["one\n", "two\n"] {
            std::fs::write(path.join("file.txt"), content).unwrap();
            let mut index = repo.index().unwrap();
            index.add_path(Path::new("file.txt")).unwrap();
            index.write().unwrap();
            let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
            let parents: Vec<git2::Commit> = repo
                .head()
                .ok()
                .and_then(|h| h.peel_to_commit().ok())
                .into_iter()
                .collect();
            let parents: Vec<&git2::Commit> = parents.iter().collect();
            let id = repo
                .commit(Some("HEAD"), &sig, &sig, content, &tree, &parents)
                .unwrap();
            ids.push(id.to_string());
        }
        (path, ids[0].clone(), ids[1].clone())
    }

    #[tokio::test]
    async fn checks_out_the_exact_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (origin, first, second) = two_commit_repo(dir.path());
        let url = origin.display().to_string();
        let dest = dir.path().join("ws1");
        let id = checkout(&url, &first, &dest, None).await.unwrap();
        assert_eq!(id, first);
        assert_eq!(
            std::fs::read_to_string(dest.join("file.txt")).unwrap(),
            "one\n"
        );
        let dest = dir.path().join("ws2");
        let id = checkout(&url, "", &dest, None).await.unwrap();
        assert_eq!(id, second);
        let err = checkout(&url, "0123456789abcdef", &dir.path().join("ws3"), None)
            .await
            .unwrap_err();
        assert!(matches!(err, GitError::RevNotFound { .. }), "{err:?}");
    }
}
