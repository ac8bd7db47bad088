//! The pipeline file of a repository at one commit, fetched with git2 into
//! a bare cache repository per registered URL (`DATA_DIR/forge-cache/`):
//! a shallow fetch (depth 1) of the pushed ref, or of the SHA itself when
//! the ref has moved on, then the file read from that commit's tree. Files
//! already read are kept in memory by (URL, SHA, path): a commit never
//! changes, so a redelivery or a second pipeline of the same push reads
//! nothing from the network.
//!
//! Fetching is blocking libgit2 work: it runs on tokio's blocking pool,
//! one fetch at a time per cache repository.

use sha2::Digest as _;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Pipeline files kept in memory.
const CACHE_ENTRIES: usize = 512;
/// A fetch that takes longer is answered 504 (the forge redelivers later).
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the file could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("fetching {sha} from {url} failed: {message}")]
    Fetch {
        url: String,
        sha: String,
        message: String,
    },
    #[error("{url} has no commit {sha}")]
    NoCommit { url: String, sha: String },
    #[error("the commit {sha} has no file {path}")]
    Missing { path: String, sha: String },
    #[error("{path} at {sha} is not UTF-8 text")]
    NotText { path: String, sha: String },
    #[error("fetching {sha} from {url} took longer than {secs} s", secs = FETCH_TIMEOUT.as_secs())]
    Timeout { url: String, sha: String },
}

/// Where a file comes from.
#[derive(Clone, Debug)]
pub(crate) struct Source<'a> {
    pub(crate) url: &'a str,
    /// `user:password`, or empty.
    pub(crate) login: &'a str,
    pub(crate) sha: &'a str,
    /// The ref to fetch the commit by (`refs/heads/main`), or empty.
    pub(crate) git_ref: &'a str,
}

type Key = (String, String, String);

/// The cache of fetched pipeline files.
pub(crate) struct Fetcher {
    dir: PathBuf,
    files: Mutex<(HashMap<Key, String>, VecDeque<Key>)>,
    /// One fetch at a time per cache repository.
    locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
}

/// Whether a file came from memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hit {
    Cached,
    Fetched,
}

impl Fetcher {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: Mutex::default(),
            locks: Mutex::default(),
        }
    }

    /// The text of `path` at `src.sha`.
    pub(crate) async fn file(
        &self,
        src: &Source<'_>,
        path: &str,
    ) -> Result<(String, Hit), FetchError> {
        let key: Key = (src.url.into(), src.sha.into(), path.into());
        if let Some(text) = lock(&self.files).0.get(&key) {
            return Ok((text.clone(), Hit::Cached));
        }
        let repo_dir = self.dir.join(format!(
            "{}.git",
            &hex::encode(sha2::Sha256::digest(src.url.as_bytes()))[..24]
        ));
        let repo_lock = lock(&self.locks)
            .entry(repo_dir.clone())
            .or_default()
            .clone();
        let owned = (
            src.url.to_string(),
            src.login.to_string(),
            src.sha.to_string(),
            src.git_ref.to_string(),
            path.to_string(),
        );
        let job = tokio::task::spawn_blocking(move || {
            let _one = lock(&repo_lock);
            let (url, login, sha, git_ref, path) = owned;
            read_at(&repo_dir, &url, &login, &sha, &git_ref, &path)
        });
        let text = match tokio::time::timeout(FETCH_TIMEOUT, job).await {
            Err(_) => {
                return Err(FetchError::Timeout {
                    url: src.url.into(),
                    sha: src.sha.into(),
                });
            }
            Ok(Err(e)) => {
                return Err(FetchError::Fetch {
                    url: src.url.into(),
                    sha: src.sha.into(),
                    message: format!("the fetch task failed: {e}"),
                });
            }
            Ok(Ok(r)) => r?,
        };
        let mut files = lock(&self.files);
        if files.1.len() >= CACHE_ENTRIES
            && let Some(old) = files.1.pop_front()
        {
            files.0.remove(&old);
        }
        files.1.push_back(key.clone());
        files.0.insert(key, text.clone());
        Ok((text, Hit::Fetched))
    }

    /// The commit `git_ref` points at now (for schedules).
    pub(crate) async fn head(
        &self,
        url: &str,
        login: &str,
        git_ref: &str,
    ) -> Result<String, FetchError> {
        let repo_dir = self.dir.join(format!(
            "{}.git",
            &hex::encode(sha2::Sha256::digest(url.as_bytes()))[..24]
        ));
        let repo_lock = lock(&self.locks)
            .entry(repo_dir.clone())
            .or_default()
            .clone();
        let (url, login, git_ref) = (url.to_string(), login.to_string(), git_ref.to_string());
        let err_url = url.clone();
        let job = tokio::task::spawn_blocking(move || {
            let _one = lock(&repo_lock);
            let repo = open_cache(&repo_dir, &url)?;
            fetch(&repo, &url, &login, &git_ref, &git_ref)?;
            repo.refname_to_id(FETCHED)
                .map(|id| id.to_string())
                .map_err(|e| FetchError::Fetch {
                    url: url.clone(),
                    sha: git_ref.clone(),
                    message: e.message().to_string(),
                })
        });
        match tokio::time::timeout(FETCH_TIMEOUT, job).await {
            Ok(Ok(r)) => r,
            _ => Err(FetchError::Timeout {
                url: err_url,
                sha: String::new(),
            }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

const FETCHED: &str = "refs/capstan/fetched";

fn open_cache(dir: &Path, url: &str) -> Result<git2::Repository, FetchError> {
    let fail = |e: git2::Error| FetchError::Fetch {
        url: url.to_string(),
        sha: String::new(),
        message: format!(
            "cannot open the cache repository {}: {}",
            dir.display(),
            e.message()
        ),
    };
    if dir.exists() {
        git2::Repository::open_bare(dir).map_err(fail)
    } else {
        if let Some(parent) = dir.parent() {
            let _ = crate::private::private_dir(parent);
        }
        git2::Repository::init_bare(dir).map_err(fail)
    }
}

/// Fetches `what` (a ref or a SHA) into [`FETCHED`], depth 1.
fn fetch(
    repo: &git2::Repository,
    url: &str,
    login: &str,
    what: &str,
    sha: &str,
) -> Result<(), FetchError> {
    let mut callbacks = git2::RemoteCallbacks::new();
    let mut offered = false;
    callbacks.credentials(move |_url, _user, allowed| {
        // Offered once: libgit2 asks again after a refusal, forever.
        if offered
            || login.is_empty()
            || !allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT)
        {
            return Err(git2::Error::from_str(
                "the server wants credentials: register the URL with user:token in it",
            ));
        }
        offered = true;
        let (user, pass) = login.split_once(':').unwrap_or((login, ""));
        git2::Cred::userpass_plaintext(user, pass)
    });
    let mut options = git2::FetchOptions::new();
    options.remote_callbacks(callbacks);
    // libgit2's local transport (file://, paths) cannot fetch shallow.
    let local = url.starts_with("file://") || url.starts_with('/') || url.starts_with('.');
    if !local {
        options.depth(1);
    }
    let mut remote = repo.remote_anonymous(url).map_err(|e| FetchError::Fetch {
        url: url.into(),
        sha: sha.into(),
        message: e.message().into(),
    })?;
    remote
        .fetch(&[format!("+{what}:{FETCHED}")], Some(&mut options), None)
        .map_err(|e| FetchError::Fetch {
            url: url.into(),
            sha: sha.into(),
            message: e.message().into(),
        })
}

fn read_at(
    dir: &Path,
    url: &str,
    login: &str,
    sha: &str,
    git_ref: &str,
    path: &str,
) -> Result<String, FetchError> {
    let repo = open_cache(dir, url)?;
    let oid = git2::Oid::from_str(sha).map_err(|_| FetchError::NoCommit {
        url: url.into(),
        sha: sha.into(),
    })?;
    if repo.find_commit(oid).is_err() {
        let by_ref = !git_ref.is_empty() && fetch(&repo, url, login, git_ref, sha).is_ok();
        if !by_ref || repo.find_commit(oid).is_err() {
            // The ref moved on (or there is none): ask for the commit itself.
            fetch(&repo, url, login, sha, sha)?;
        }
    }
    let commit = repo.find_commit(oid).map_err(|_| FetchError::NoCommit {
        url: url.into(),
        sha: sha.into(),
    })?;
    let missing = || FetchError::Missing {
        path: path.into(),
        sha: sha.into(),
    };
    let tree = commit.tree().map_err(|_| missing())?;
    let entry = tree
        .get_path(Path::new(path.trim_start_matches("./")))
        .map_err(|_| missing())?;
    let blob = repo.find_blob(entry.id()).map_err(|_| missing())?;
    String::from_utf8(blob.content().to_vec()).map_err(|_| FetchError::NotText {
        path: path.into(),
        sha: sha.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .current_dir(dir)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    #[tokio::test]
    async fn reads_a_file_at_a_commit_then_from_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q"]);
        std::fs::write(work.join(".capstan.yaml"), "one").unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "1"]);
        let first = git(&work, &["rev-parse", "HEAD"]);
        std::fs::write(work.join(".capstan.yaml"), "two").unwrap();
        git(&work, &["commit", "-q", "-am", "2"]);
        let url = format!("file://{}", work.display());
        let f = Fetcher::new(tmp.path().join("cache"));
        let src = |sha: &'static str| Source {
            url: Box::leak(url.clone().into_boxed_str()),
            login: "",
            sha,
            git_ref: "refs/heads/main",
        };
        let first: &'static str = Box::leak(first.into_boxed_str());
        // The ref has moved on: the commit is fetched by its SHA.
        let (text, hit) = f.file(&src(first), ".capstan.yaml").await.unwrap();
        assert_eq!((text.as_str(), hit), ("one", Hit::Fetched));
        let (_, hit) = f.file(&src(first), ".capstan.yaml").await.unwrap();
        assert_eq!(hit, Hit::Cached);
        let err = f.file(&src(first), "nope.yaml").await.unwrap_err();
        assert!(matches!(err, FetchError::Missing { .. }), "{err}");
        let err = f
            .file(&src("0123456789012345678901234567890123456789"), "x")
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Fetch { .. }), "{err}");
        let head = f.head(&url, "", "refs/heads/main").await.unwrap();
        assert_eq!(head, git(&work, &["rev-parse", "HEAD"]));
    }
}
