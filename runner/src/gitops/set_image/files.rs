//! The files of one `set-image` edit: each path resolved inside the
//! checkout (absolute paths, `..` escapes, `.git` and symlinks that lead
//! outside are refused), every file edited in memory first, and only the
//! changed ones written, each atomically (a temporary file and a rename),
//! so a bad file leaves nothing half-written.

use std::fs;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};

use capstan_manifest::image_ref::ImageRef;
use capstan_manifest::{EditError, edit_text_keeping};

use super::SetImageError;

/// Files larger than this are refused rather than parsed.
pub(crate) const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// What [`set_image_in_files`] did to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileReport {
    /// The path as given in the step.
    pub(crate) path: String,
    /// References to the repository found, including up-to-date ones.
    pub(crate) matched: usize,
    /// References changed (the file was rewritten iff this is non-zero).
    pub(crate) changed: usize,
    /// References left alone on purpose (pin comment, `order: monotonic`).
    pub(crate) kept: Vec<capstan_manifest::Kept>,
}

/// What [`set_image_in_files`] did, file by file, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SetImageReport {
    pub(crate) files: Vec<FileReport>,
}

impl SetImageReport {
    /// References found across all files.
    #[must_use]
    pub(crate) fn matched(&self) -> usize {
        self.files.iter().map(|f| f.matched).sum()
    }

    /// References changed across all files; 0 with `matched() > 0` means
    /// everything was already up to date.
    #[must_use]
    #[cfg(test)] // the step logs per file
    pub(crate) fn changed(&self) -> usize {
        self.files.iter().map(|f| f.changed).sum()
    }
}

/// Edit `files` (paths relative to `root`, a checked-out repository) in place.
///
/// Each path must stay inside `root`: absolute paths, `..` escapes and
/// symlinks resolving outside `root` are refused. Every file is read and
/// edited in memory before any is written; only changed files are written,
/// each through a temporary file and a rename.
///
/// # Errors
/// A path problem, a missing file, an edit error (wrapped in
/// [`SetImageError::InFile`]), an I/O error, or — unless `allow_no_match` —
/// [`SetImageError::NoMatch`] when no listed file references the repository.
#[cfg(test)]
pub(crate) fn set_image_in_files(
    root: &Path,
    files: &[String],
    new_image: &str,
    allow_no_match: bool,
) -> Result<SetImageReport, SetImageError> {
    set_image_in_files_keeping(root, files, new_image, allow_no_match, &|_| None)
}

/// [`set_image_in_files`] with `keep` (see `capstan_manifest::edit_text_keeping`).
pub(crate) fn set_image_in_files_keeping(
    root: &Path,
    files: &[String],
    new_image: &str,
    allow_no_match: bool,
    keep: &dyn Fn(&ImageRef<'_>) -> Option<String>,
) -> Result<SetImageReport, SetImageError> {
    let new_ref = ImageRef::parse(new_image).map_err(|reason| EditError::InvalidImage {
        reference: new_image.to_owned(),
        reason,
    })?;
    let root = fs::canonicalize(root).map_err(|source| SetImageError::Io {
        op: "resolving repository root",
        path: root.display().to_string(),
        source,
    })?;

    let mut report = SetImageReport::default();
    let mut writes: Vec<(PathBuf, String)> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    for rel in files {
        let path = resolve_inside(&root, rel)?;
        if seen.contains(&path) {
            report.files.push(FileReport {
                path: rel.clone(),
                matched: 0,
                changed: 0,
                kept: Vec::new(),
            });
            continue;
        }
        seen.push(path.clone());
        let text = read_manifest(&path, rel)?;
        let edit =
            edit_text_keeping(&text, new_image, keep).map_err(|e| SetImageError::InFile {
                path: rel.clone(),
                source: Box::new(e.into()),
            })?;
        if edit.changed > 0 {
            writes.push((path, edit.text));
        }
        report.files.push(FileReport {
            path: rel.clone(),
            matched: edit.matched,
            changed: edit.changed,
            kept: edit.kept,
        });
    }
    if report.matched() == 0 && !allow_no_match {
        return Err(SetImageError::NoMatch {
            repository: new_ref.name.to_owned(),
            files: files.to_vec(),
        });
    }
    for (path, text) in writes {
        write_atomically(&path, text.as_bytes())?;
    }
    Ok(report)
}

/// The text of the manifest at `path` (`rel` in the step), refusing files
/// over [`MAX_FILE_BYTES`] and files that are not UTF-8.
fn read_manifest(path: &Path, rel: &str) -> Result<String, SetImageError> {
    let io = |source| SetImageError::Io {
        op: "reading",
        path: rel.to_owned(),
        source,
    };
    let size = fs::metadata(path).map_err(io)?.len();
    if size > MAX_FILE_BYTES {
        return Err(SetImageError::TooLarge {
            path: rel.to_owned(),
            size,
            max: MAX_FILE_BYTES,
        });
    }
    let bytes = fs::read(path).map_err(io)?;
    String::from_utf8(bytes).map_err(|_| SetImageError::InFile {
        path: rel.to_owned(),
        source: Box::new(SetImageError::Edit(EditError::Yaml {
            line: 1,
            column: 1,
            message: "the file is not UTF-8".to_owned(),
        })),
    })
}

/// Resolve `rel` under the canonical `root`, refusing anything that lands
/// outside it.
fn resolve_inside(root: &Path, rel: &str) -> Result<PathBuf, SetImageError> {
    let unsafe_path = |reason: &str| SetImageError::UnsafePath {
        path: rel.to_owned(),
        reason: reason.to_owned(),
    };
    if rel.is_empty() {
        return Err(unsafe_path("the path is empty"));
    }
    let rel_path = Path::new(rel);
    let mut depth: usize = 0;
    for component in rel_path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => {
                return Err(unsafe_path(
                    "absolute paths are not allowed; give a path relative to the repository",
                ));
            }
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| unsafe_path("`..` leads outside the repository"))?;
            }
            Component::Normal(name) if name == ".git" => {
                return Err(unsafe_path("files inside `.git` are not manifests"));
            }
            Component::Normal(_) => depth += 1,
        }
    }
    let joined = root.join(rel_path);
    let resolved = match fs::canonicalize(&joined) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A dangling symlink also lands here; say which it is.
            if fs::symlink_metadata(&joined).is_ok() {
                return Err(unsafe_path("it is a symlink to a missing target"));
            }
            return Err(SetImageError::NotFound {
                path: rel.to_owned(),
            });
        }
        Err(source) => {
            return Err(SetImageError::Io {
                op: "resolving",
                path: rel.to_owned(),
                source,
            });
        }
    };
    if !resolved.starts_with(root) {
        return Err(unsafe_path(
            "it resolves (through a symlink) to outside the repository",
        ));
    }
    if !resolved.is_file() {
        return Err(unsafe_path("it is not a regular file"));
    }
    Ok(resolved)
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), SetImageError> {
    let io = |op: &'static str| {
        let path = path.display().to_string();
        move |source| SetImageError::Io { op, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.capstan-set-image.{}", std::process::id()));
    let permissions = fs::metadata(path).map_err(io("reading"))?.permissions();
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("creating a temporary file for"))?;
        file.write_all(contents).map_err(io("writing"))?;
        file.sync_all().map_err(io("writing"))?;
        fs::set_permissions(&tmp, permissions).map_err(io("setting permissions of"))?;
        fs::rename(&tmp, path).map_err(io("replacing"))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
