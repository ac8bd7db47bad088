//! The `set-image` step: point image references in Kubernetes YAML at a new
//! tag or digest, in the manifests repository, for `git-push` to write back.
//!
//! The step (this file) picks the repository (the pending one, the run's
//! checkout, or a fresh clone), makes the edit, logs each changed line and
//! records the write-back `git-push` takes ([`super::Pending`]).
//! `files`: [`set_image_in_files`], the paths of one edit inside a checkout,
//! edited in memory first and written atomically. The edit of one text
//! (which paths, which references, the byte splices, the read-back check)
//! is `capstan_manifest::edit_text`: pure, in its own crate (see its docs).
//!
//! Doors: `capstan_manifest` for the edit and references, [`crate::git`] for
//! the clone, the parent for the pending write-back. Nothing in `files`
//! knows about git or steps.

mod files;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use capstan_manifest::EditError;
use capstan_proto::pipeline::v1::SetImageStep;

use super::{Done, GitOps, GitOpsError, Pending, PendingEdit, branch_of, head_commit, open};
use crate::git::Op;
use crate::git::remote::Remote;

use self::files::set_image_in_files_keeping;
use capstan_manifest::image_ref::ImageRef;

/// Why a `set-image` edit failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetImageError {
    /// The image is invalid, a file is not YAML, or a reference cannot be
    /// edited safely (the edit of one text).
    #[error(transparent)]
    Edit(#[from] EditError),
    /// An error in one file of a [`set_image_in_files`] call.
    #[error("{path}: {source}")]
    InFile {
        path: String,
        #[source]
        source: Box<SetImageError>,
    },
    /// A file path that is absolute, escapes the repository, or resolves
    /// (through a symlink) outside it.
    #[error("refusing path {path:?}: {reason}")]
    UnsafePath { path: String, reason: String },
    /// A listed file does not exist in the repository.
    #[error("file {path:?} not found in the repository")]
    NotFound { path: String },
    /// A listed file is bigger than [`files::MAX_FILE_BYTES`].
    #[error("file {path:?} is {size} bytes, over the {max}-byte limit")]
    TooLarge { path: String, size: u64, max: u64 },
    /// Reading or writing a file failed.
    #[error("{op} {path:?}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// No reference to the repository was found in any listed file.
    #[error(
        "no image reference to {repository} found in {files:?}; check the step's `files` and \
         `image`, or allow no match"
    )]
    NoMatch {
        repository: String,
        files: Vec<String>,
    },
}

/// The `set-image` step on a blocking thread: the manifests repository
/// (the pending one, the run's checkout, or a fresh clone), the edit, its
/// log, and the pending write-back for `git-push`.
pub(super) fn set_image_blocking(
    gitops: &GitOps,
    step: &SetImageStep,
    task_repo: &str,
    task_rev: &str,
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
        None if source => in_checkout(workspace, url, credentials, &mut log)?,
        None => fresh_clone(gitops, workspace, url, credentials, &mut log)?,
    };
    let monotonic = match step.order.as_str() {
        "monotonic" if task_rev.is_empty() => return Err(GitOpsError::MonotonicWithoutSource),
        "monotonic" => {
            refresh_source(gitops, workspace, task_repo, &mut log)?;
            Some((workspace.to_path_buf(), task_rev.to_owned()))
        }
        _ => None,
    };
    let edit = PendingEdit {
        files: step.files.clone(),
        image: step.image.clone(),
        allow_no_match: step.allow_no_match,
        monotonic,
    };
    log.push_str(&apply_edit(&pending.dir, &edit)?);
    pending.edits.push(edit);
    gitops.set_pending(pending);
    Ok(Done {
        log,
        outputs: Vec::new(),
        pull_request: None,
    })
}

/// A write-back in the run's own checkout (the manifests live in the
/// source repository).
fn in_checkout(
    workspace: &Path,
    url: &str,
    credentials: Option<&str>,
    log: &mut String,
) -> Result<Pending, GitOpsError> {
    let repo = open(workspace, url)?;
    log.push_str(&format!(
        "editing the run's checkout of {url} (the manifests live in the source repository)\n"
    ));
    let base = head_commit(&repo, url)?;
    Ok(Pending {
        dir: workspace.to_owned(),
        repo_url: url.to_owned(),
        branch: branch_of(&repo),
        base,
        edits: Vec::new(),
        credentials: credentials.map(str::to_owned),
    })
}

/// A write-back in a fresh clone of `url`, in the attempt's manifests
/// directory (emptied first).
fn fresh_clone(
    gitops: &GitOps,
    workspace: &Path,
    url: &str,
    credentials: Option<&str>,
    log: &mut String,
) -> Result<Pending, GitOpsError> {
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
    let remote = Remote {
        url,
        secret: secret.as_ref(),
        secret_name: credentials,
    };
    let repo = remote.clone_into(&dir, Op::CloneManifests)?;
    let base = head_commit(&repo, url)?;
    let branch = branch_of(&repo);
    let shown = capstan_proto::redact::redact_url(url);
    log.push_str(&format!("cloned {shown} ({branch} at {base})\n"));
    Ok(Pending {
        dir,
        repo_url: url.to_owned(),
        branch,
        base,
        edits: Vec::new(),
        credentials: credentials.map(str::to_owned),
    })
}

/// Applies one edit and describes it: `file:line: old -> new` per changed
/// line, or that the file already had the image.
pub(super) fn apply_edit(dir: &Path, edit: &PendingEdit) -> Result<String, GitOpsError> {
    // Only for the log: set_image_in_files reports missing and unsafe paths.
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    let before: Vec<String> = edit.files.iter().map(|f| read(f)).collect();
    let newer = Newer::open(edit.monotonic.as_ref())?;
    let keep = |old: &ImageRef<'_>| newer.as_ref().and_then(|n| n.newer(old));
    let report =
        set_image_in_files_keeping(dir, &edit.files, &edit.image, edit.allow_no_match, &keep)?;
    let mut log = String::new();
    for ((file, old), r) in edit.files.iter().zip(&before).zip(&report.files) {
        for k in &r.kept {
            log.push_str(&format!(
                "{file}:{}: left {} alone: {}\n",
                k.line, k.reference, k.why
            ));
        }
        if r.changed == 0 {
            if r.matched > r.kept.len() {
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

/// Fetches the source repository's branches into the run's checkout, so
/// that `order: monotonic` knows the commits pushed since the checkout (a
/// newer run may have deployed one of them).
fn refresh_source(
    gitops: &GitOps,
    workspace: &Path,
    url: &str,
    log: &mut String,
) -> Result<(), GitOpsError> {
    let repo =
        git2::Repository::open(workspace).map_err(|_| GitOpsError::MonotonicWithoutSource)?;
    let name = gitops.checkout_credentials.as_deref();
    let secret = gitops.secret(name)?;
    let remote = Remote {
        url,
        secret: secret.as_ref(),
        secret_name: name,
    };
    remote.fetch_branches(&repo)?;
    log.push_str(&format!(
        "fetched {}'s branches to compare commits (order: monotonic)\n",
        super::pull_request::bare_url(url)
    ));
    Ok(())
}

/// `order: monotonic`'s judge: the run's source repository and commit.
struct Newer {
    repo: git2::Repository,
    rev: git2::Oid,
}

impl Newer {
    fn open(monotonic: Option<&(PathBuf, String)>) -> Result<Option<Self>, GitOpsError> {
        let Some((source, rev)) = monotonic else {
            return Ok(None);
        };
        let repo =
            git2::Repository::open(source).map_err(|_| GitOpsError::MonotonicWithoutSource)?;
        let rev = repo
            .revparse_single(rev)
            .and_then(|o| o.peel_to_commit())
            .map_err(|_| GitOpsError::MonotonicWithoutSource)?
            .id();
        Ok(Some(Self { repo, rev }))
    }

    /// Why `old` stays: its tag names a commit of the source repository
    /// that descends from (is newer than) the run's. A tag that is no
    /// commit here (a version, another repository's SHA) says nothing.
    fn newer(&self, old: &ImageRef<'_>) -> Option<String> {
        let tag = old.tag?;
        if !(7..=40).contains(&tag.len()) || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let built = self
            .repo
            .revparse_single(tag)
            .ok()?
            .peel_to_commit()
            .ok()?
            .id();
        (built != self.rev && self.repo.graph_descendant_of(built, self.rev).ok()?).then(|| {
            format!(
                "newer image already deployed (built from {tag}, which descends from this \
                 run's {}; order: monotonic)",
                self.rev
            )
        })
    }
}

fn same_repo(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let s = s.trim().trim_end_matches('/');
        s.strip_suffix(".git").unwrap_or(s).to_owned()
    };
    norm(a) == norm(b)
}
