//! Source checkout: the run's repository at the exact commit.
//!
//! The checkout goes into the attempt's local workspace directory; the
//! docker executor copies that directory into the task's workspace volume
//! through the engine's API (no bind mount), the shell executor runs in it.

use std::path::Path;

use super::remote::Remote;
use super::{GitError, Op};
use crate::secrets::Secret;

/// Clones `repo` into `dest` (an empty or missing directory) and checks out
/// `rev` (a commit id, or anything `git rev-parse` understands such as a
/// branch or tag) as a detached HEAD. Returns the commit id checked out.
pub async fn checkout(
    repo: &str,
    rev: &str,
    dest: &Path,
    credentials: Option<Secret>,
) -> Result<String, GitError> {
    capstan_proto::source::check_repo(repo).map_err(GitError::BadSource)?;
    if !rev.is_empty() {
        capstan_proto::source::check_rev(rev).map_err(GitError::BadSource)?;
    }
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
    let remote = Remote {
        url: repo_url,
        secret: credentials,
        secret_name: None,
    };
    let repo = remote.clone_into(dest, Op::Checkout)?;
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
    use std::path::PathBuf;

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

    #[tokio::test]
    async fn a_rev_or_repo_git_must_not_see_is_refused_before_git_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (origin, ..) = two_commit_repo(dir.path());
        let url = origin.display().to_string();
        let dest = dir.path().join("ws");
        let err = checkout(&url, "HEAD~1", &dest, None).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "--rev `HEAD~1` is not a commit SHA or a valid ref name: it contains `~`"
        );
        let err = checkout("--upload-pack=touch x", "main", &dest, None)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--repo `--upload-pack=touch x` is not a repository URL: it starts with `-`"
        );
        assert!(!dest.exists(), "nothing was cloned");
    }
}
