//! The `set-image` step: point image references in Kubernetes YAML at a new
//! tag or digest.
//!
//! The edit is structural, not textual: each file is parsed with
//! `saphyr-parser-bw` (which reports the source span of every scalar), the
//! documents are walked along the known workload paths, and only the byte
//! ranges of the image scalars that name the same repository are replaced.
//! Everything else — comments, key order, indentation, quoting, line endings,
//! the trailing newline — stays byte-for-byte identical.
//!
//! Paths edited, per document, by `kind`:
//! - `Pod`: `spec.{containers,initContainers,ephemeralContainers}[].image`
//! - `Deployment`, `StatefulSet`, `DaemonSet`, `ReplicaSet`, `Job`,
//!   `ReplicationController`: `spec.template.spec.<containers>[].image`
//! - `PodTemplate`: `template.spec.<containers>[].image`
//! - `CronJob`: `spec.jobTemplate.spec.template.spec.<containers>[].image`
//! - `List`: each of `items[]` as above
//! - `Kustomization` / `Component` (or a document without `kind` that has a
//!   top-level `images:` list, as most `kustomization.yaml` files are):
//!   `images[]` entries whose `newName` (or, without one, `name`) is the
//!   repository get `newTag` or `digest` set, the key added when absent.
//!
//! A reference keeps its repository spelling (`nginx` stays `nginx` even when
//! the new image is written `docker.io/library/nginx:1.27`); only the tag and
//! digest change. A new image with only a tag drops an old digest, since a
//! digest would otherwise keep pinning the old image.
//!
//! The step (this file) picks the repository, makes the edit, logs each
//! changed line and records the write-back `git-push` takes
//! ([`super::Pending`]). The edit itself is pure and lives below it:
//! - `files`: [`set_image_in_files`], the paths of one edit inside a
//!   checkout, edited in memory first and written atomically;
//! - `plan`: which references one text has and the byte splices that
//!   update them ([`edit_text`] here checks that the result reads back);
//! - `yaml_tree`: the YAML tree with source positions the plan walks.
//!
//! Doors: `crate::image_ref` for references, [`crate::git`] for the clone,
//! the parent for the pending write-back. Inside, `files` calls
//! [`edit_text`], which asks `plan`, which walks a `yaml_tree`; nothing
//! below this file knows about git or steps.

mod files;
mod plan;
#[cfg(test)]
mod tests;
mod yaml_tree;

use std::path::{Path, PathBuf};

use capstan_proto::pipeline::v1::SetImageStep;

use self::plan::{Plan, apply, plan};
use super::{Done, GitOps, GitOpsError, Pending, PendingEdit, branch_of, head_commit, open};
use crate::git::Op;
use crate::git::remote::Remote;
use crate::image_ref::ImageRef;

use self::files::set_image_in_files;

/// Why a `set-image` edit failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetImageError {
    /// The image given to the step is not a valid reference.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidImage { reference: String, reason: String },
    /// The file is not valid YAML.
    #[error("YAML syntax error at line {line}, column {column}: {message}")]
    Yaml {
        line: usize,
        column: usize,
        message: String,
    },
    /// A matching reference is written in a form this step cannot edit safely.
    #[error("cannot edit image reference at line {line}, column {column}: {reason}")]
    Unsupported {
        line: usize,
        column: usize,
        reason: String,
    },
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

/// The outcome of editing one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Edit {
    /// The edited text (equal to the input when `changed == 0`).
    pub(crate) text: String,
    /// References to the repository found, including up-to-date ones.
    pub(crate) matched: usize,
    /// References that were changed.
    pub(crate) changed: usize,
}

/// The new text (0 changed = none matched or all already up to date;
/// the caller decides if that is an error) and how many references
/// changed: [`edit_text`] without the count of up-to-date ones.
#[cfg(test)] // the step goes through `set_image_in_files`, which wants the counts
pub(crate) fn set_image(text: &str, new_image: &str) -> Result<(String, usize), SetImageError> {
    let edit = edit_text(text, new_image)?;
    Ok((edit.text, edit.changed))
}

/// Replace the tag/digest of every image reference whose repository equals
/// `new_image`'s repository, counting the references found (up-to-date
/// ones included) and those changed.
///
/// # Errors
/// An invalid `new_image`, a YAML syntax error, or a matching reference
/// written in a form that cannot be edited safely (block scalar, multi-line
/// plain scalar, alias of a scalar).
pub(crate) fn edit_text(text: &str, new_image: &str) -> Result<Edit, SetImageError> {
    let new_ref = ImageRef::parse(new_image).map_err(|reason| SetImageError::InvalidImage {
        reference: new_image.to_owned(),
        reason,
    })?;
    if new_ref.tag.is_none() && new_ref.digest.is_none() {
        return Err(SetImageError::InvalidImage {
            reference: new_image.to_owned(),
            reason: "it needs a tag (`:v1`) or a digest (`@sha256:...`)".to_owned(),
        });
    }
    let Plan {
        matched,
        changed,
        splices,
    } = plan(text, &new_ref)?;
    if splices.is_empty() {
        return Ok(Edit {
            text: text.to_owned(),
            matched,
            changed: 0,
        });
    }
    let out = apply(text, splices);
    // The edit must read back as done: same references found, none left to change.
    match plan(&out, &new_ref) {
        Ok(again) if again.matched == matched && again.splices.is_empty() => {}
        _ => {
            return Err(SetImageError::Unsupported {
                line: 1,
                column: 1,
                reason: "the edited file did not read back as expected; edit it by hand".to_owned(),
            });
        }
    }
    Ok(Edit {
        text: out,
        matched,
        changed,
    })
}

/// The `set-image` step on a blocking thread: the manifests repository
/// (the pending one, the run's checkout, or a fresh clone), the edit, its
/// log, and the pending write-back for `git-push`.
pub(super) fn set_image_blocking(
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
        None if source => in_checkout(workspace, url, credentials, &mut log)?,
        None => fresh_clone(gitops, workspace, url, credentials, &mut log)?,
    };
    let edit = PendingEdit {
        files: step.files.clone(),
        image: step.image.clone(),
        allow_no_match: step.allow_no_match,
    };
    log.push_str(&apply_edit(&pending.dir, &edit)?);
    pending.edits.push(edit);
    gitops.set_pending(pending);
    Ok(Done {
        log,
        outputs: Vec::new(),
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
    log.push_str(&format!("cloned {url} ({branch} at {base})\n"));
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

fn same_repo(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let s = s.trim().trim_end_matches('/');
        s.strip_suffix(".git").unwrap_or(s).to_owned()
    };
    norm(a) == norm(b)
}
