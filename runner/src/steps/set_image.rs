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
//! [`set_image`] is pure (text in, text out); [`set_image_in_files`] resolves
//! paths inside a checkout, edits every file in memory first, and writes only
//! files that changed, each atomically, so a bad file leaves nothing
//! half-written.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};

use saphyr_parser_bw::{Event, Parser, ScalarStyle, ScanError, Span};

/// Files larger than this are refused rather than parsed.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Nesting deeper than this is refused (guards the recursive walk).
const MAX_DEPTH: usize = 512;

/// Why a `set-image` edit failed.
#[derive(Debug, thiserror::Error)]
pub enum SetImageError {
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
    /// A listed file is bigger than [`MAX_FILE_BYTES`].
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
pub struct Edit {
    /// The edited text (equal to the input when `changed == 0`).
    pub text: String,
    /// References to the repository found, including up-to-date ones.
    pub matched: usize,
    /// References that were changed.
    pub changed: usize,
}

/// What [`set_image_in_files`] did to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    /// The path as given in the step.
    pub path: String,
    /// References to the repository found, including up-to-date ones.
    pub matched: usize,
    /// References changed (the file was rewritten iff this is non-zero).
    pub changed: usize,
}

/// What [`set_image_in_files`] did, file by file, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetImageReport {
    pub files: Vec<FileReport>,
}

impl SetImageReport {
    /// References found across all files.
    #[must_use]
    pub fn matched(&self) -> usize {
        self.files.iter().map(|f| f.matched).sum()
    }

    /// References changed across all files; 0 with `matched() > 0` means
    /// everything was already up to date.
    #[must_use]
    pub fn changed(&self) -> usize {
        self.files.iter().map(|f| f.changed).sum()
    }
}

/// Replace the tag/digest of every image reference whose repository equals
/// `new_image`'s repository.
///
/// Returns the new text and how many references changed (0 = none matched or
/// all already up to date; the caller decides if that's an error — use
/// [`edit_text`] to tell the two apart).
///
/// # Errors
/// An invalid `new_image`, a YAML syntax error, or a matching reference
/// written in a form that cannot be edited safely (block scalar, multi-line
/// plain scalar, alias of a scalar).
pub fn set_image(text: &str, new_image: &str) -> Result<(String, usize), SetImageError> {
    let edit = edit_text(text, new_image)?;
    Ok((edit.text, edit.changed))
}

/// Like [`set_image`], also counting references that were already up to date.
///
/// # Errors
/// As [`set_image`].
pub fn edit_text(text: &str, new_image: &str) -> Result<Edit, SetImageError> {
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
pub fn set_image_in_files(
    root: &Path,
    files: &[String],
    new_image: &str,
    allow_no_match: bool,
) -> Result<SetImageReport, SetImageError> {
    let new_ref = ImageRef::parse(new_image).map_err(|reason| SetImageError::InvalidImage {
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
            });
            continue;
        }
        seen.push(path.clone());
        let size = fs::metadata(&path)
            .map_err(|source| SetImageError::Io {
                op: "reading",
                path: rel.clone(),
                source,
            })?
            .len();
        if size > MAX_FILE_BYTES {
            return Err(SetImageError::TooLarge {
                path: rel.clone(),
                size,
                max: MAX_FILE_BYTES,
            });
        }
        let bytes = fs::read(&path).map_err(|source| SetImageError::Io {
            op: "reading",
            path: rel.clone(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| SetImageError::InFile {
            path: rel.clone(),
            source: Box::new(SetImageError::Yaml {
                line: 1,
                column: 1,
                message: "the file is not UTF-8".to_owned(),
            }),
        })?;
        let edit = edit_text(&text, new_image).map_err(|e| SetImageError::InFile {
            path: rel.clone(),
            source: Box::new(e),
        })?;
        if edit.changed > 0 {
            writes.push((path, edit.text));
        }
        report.files.push(FileReport {
            path: rel.clone(),
            matched: edit.matched,
            changed: edit.changed,
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

// ---------------------------------------------------------------------------
// Image references

/// A parsed image reference; `name` is the repository as written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ImageRef<'a> {
    name: &'a str,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

impl<'a> ImageRef<'a> {
    /// Parse `[host[:port]/]path[:tag][@algo:hex]` (the distribution grammar).
    fn parse(s: &'a str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("it is empty".to_owned());
        }
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("it contains {c:?}"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest)?;
                (rest, Some(digest))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&rest[..colon], Some(&rest[colon + 1..]))
            }
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag)?;
        }
        validate_name(name)?;
        Ok(ImageRef { name, tag, digest })
    }

    /// The repository with Docker Hub's implicit parts spelled out, so
    /// `nginx`, `library/nginx` and `docker.io/library/nginx` compare equal.
    fn canonical_repository(&self) -> String {
        let (domain, path) = split_domain(self.name);
        let domain = match domain {
            None | Some("index.docker.io" | "registry-1.docker.io") => "docker.io",
            Some(d) => d,
        };
        if domain == "docker.io" && !path.contains('/') {
            format!("docker.io/library/{path}")
        } else {
            format!("{domain}/{path}")
        }
    }

    /// `name` with `new`'s tag and digest.
    fn retagged(&self, new: &ImageRef<'_>) -> String {
        let mut out = self.name.to_owned();
        if let Some(tag) = new.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = new.digest {
            out.push('@');
            out.push_str(digest);
        }
        out
    }
}

fn split_domain(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the repository name is empty".to_owned());
    }
    if name.len() > 255 {
        return Err("the repository name is longer than 255 characters".to_owned());
    }
    let (domain, path) = split_domain(name);
    if let Some(domain) = domain {
        let (host, port) = match domain.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        };
        let host_ok = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !host_ok {
            return Err(format!("registry host {host:?} is not a valid host name"));
        }
        if let Some(port) = port
            && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) || port.len() > 5)
        {
            return Err(format!("registry port {port:?} is not a number"));
        }
    }
    for component in path.split('/') {
        let ok = !component.is_empty()
            && component.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
            && component.starts_with(|c: char| c.is_ascii_alphanumeric())
            && component.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return Err(format!(
                "path component {component:?} must be lowercase letters and digits separated by `.`, `_` or `-`"
            ));
        }
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must be 1-128 letters, digits, `_`, `.` or `-`, not starting with `.` or `-`"
        ))
    }
}

fn validate_digest(digest: &str) -> Result<(), String> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(format!("digest {digest:?} must look like `sha256:<hex>`"));
    };
    let algorithm_ok = !algorithm.is_empty()
        && algorithm.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '.' | '_' | '-')
        });
    let hex_ok = hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit());
    if !algorithm_ok || !hex_ok {
        return Err(format!("digest {digest:?} must look like `sha256:<hex>`"));
    }
    if algorithm == "sha256" && (hex.len() != 64 || hex.chars().any(|c| c.is_ascii_uppercase())) {
        return Err(format!(
            "digest {digest:?}: a sha256 digest is 64 lowercase hex digits"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// A YAML tree with source positions

/// A position as the parser reports it. The parser's character index and
/// column drift on lines with non-ASCII text (some paths count bytes, others
/// characters), so only the line is trusted; the column is a hint that
/// [`Planner::locate`] checks against the text.
#[derive(Debug, Clone, Copy)]
struct Pos {
    /// 1-based line.
    line: usize,
    /// 0-based column (a hint).
    col: usize,
}

#[derive(Debug)]
enum NodeKind {
    Scalar {
        value: String,
        style: ScalarStyle,
    },
    Sequence(Vec<usize>),
    Mapping {
        pairs: Vec<(usize, usize)>,
        flow: bool,
    },
    Alias(usize),
}

#[derive(Debug)]
struct Node {
    kind: NodeKind,
    start: Pos,
    end: Pos,
}

struct Tree {
    nodes: Vec<Node>,
    line_starts: Vec<usize>,
    documents: Vec<usize>,
    anchors: HashMap<usize, usize>,
}

/// Byte offsets of the start of each line; YAML breaks lines at CRLF, LF
/// and a lone CR.
fn line_starts(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut starts = vec![0];
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => starts.push(i + 1),
            b'\r' if bytes.get(i + 1) != Some(&b'\n') => starts.push(i + 1),
            _ => {}
        }
        i += 1;
    }
    starts
}

fn yaml_error(e: &ScanError) -> SetImageError {
    SetImageError::Yaml {
        line: e.marker().line(),
        column: e.marker().col() + 1,
        message: e.info().to_owned(),
    }
}

struct Builder<'t> {
    parser: Parser<'t, saphyr_parser_bw::StrInput<'t>>,
    tree: Tree,
}

impl<'t> Builder<'t> {
    fn pos(&self, span: &Span, end: bool) -> Pos {
        let m = if end { span.end } else { span.start };
        Pos {
            line: m.line(),
            col: m.col(),
        }
    }

    fn next(&mut self) -> Result<(Event<'t>, Span), SetImageError> {
        match self.parser.next_event() {
            Some(Ok(ev)) => Ok(ev),
            Some(Err(e)) => Err(yaml_error(&e)),
            None => Err(SetImageError::Yaml {
                line: 0,
                column: 0,
                message: "unexpected end of input".to_owned(),
            }),
        }
    }

    fn build(mut self) -> Result<Tree, SetImageError> {
        loop {
            let (ev, span) = self.next()?;
            match ev {
                Event::StreamEnd => return Ok(self.tree),
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::DocumentStart(_) => {
                    let (ev, span) = self.next()?;
                    if matches!(ev, Event::DocumentEnd) {
                        continue;
                    }
                    let root = self.node(ev, span, 0)?;
                    self.tree.documents.push(root);
                }
                other => {
                    return Err(SetImageError::Yaml {
                        line: span.start.line(),
                        column: span.start.col() + 1,
                        message: format!("unexpected {other:?} outside a document"),
                    });
                }
            }
        }
    }

    fn push(&mut self, kind: NodeKind, start: Pos, end: Pos, anchor: usize) -> usize {
        let id = self.tree.nodes.len();
        self.tree.nodes.push(Node { kind, start, end });
        if anchor != 0 {
            self.tree.anchors.insert(anchor, id);
        }
        id
    }

    fn node(&mut self, ev: Event<'t>, span: Span, depth: usize) -> Result<usize, SetImageError> {
        if depth > MAX_DEPTH {
            return Err(SetImageError::Yaml {
                line: span.start.line(),
                column: span.start.col() + 1,
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
            });
        }
        let start = self.pos(&span, false);
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                let end = self.pos(&span, true);
                Ok(self.push(
                    NodeKind::Scalar {
                        value: value.into_owned(),
                        style,
                    },
                    start,
                    end,
                    anchor,
                ))
            }
            Event::Alias(anchor) => {
                let end = self.pos(&span, true);
                Ok(self.push(NodeKind::Alias(anchor), start, end, 0))
            }
            Event::SequenceStart(anchor, _tag) => {
                // Register the anchor before the children so a (self-)alias
                // inside resolves; the node is filled in at the end.
                let id = self.push(NodeKind::Sequence(Vec::new()), start, start, anchor);
                let mut items = Vec::new();
                loop {
                    let (ev, span) = self.next()?;
                    if matches!(ev, Event::SequenceEnd) {
                        self.tree.nodes[id].end = self.pos(&span, true);
                        break;
                    }
                    items.push(self.node(ev, span, depth + 1)?);
                }
                self.tree.nodes[id].kind = NodeKind::Sequence(items);
                Ok(id)
            }
            Event::MappingStart(anchor, _tag) => {
                let flow = !span.is_empty();
                let id = self.push(
                    NodeKind::Mapping {
                        pairs: Vec::new(),
                        flow,
                    },
                    start,
                    start,
                    anchor,
                );
                let mut pairs = Vec::new();
                loop {
                    let (ev, span) = self.next()?;
                    if matches!(ev, Event::MappingEnd) {
                        self.tree.nodes[id].end = self.pos(&span, true);
                        break;
                    }
                    let key = self.node(ev, span, depth + 1)?;
                    let (ev, span) = self.next()?;
                    let value = self.node(ev, span, depth + 1)?;
                    pairs.push((key, value));
                }
                self.tree.nodes[id].kind = NodeKind::Mapping { pairs, flow };
                Ok(id)
            }
            other => Err(SetImageError::Yaml {
                line: span.start.line(),
                column: span.start.col() + 1,
                message: format!("unexpected {other:?}"),
            }),
        }
    }
}

fn parse_tree(text: &str) -> Result<Tree, SetImageError> {
    Builder {
        parser: Parser::new_from_str(text),
        tree: Tree {
            nodes: Vec::new(),
            line_starts: line_starts(text),
            documents: Vec::new(),
            anchors: HashMap::new(),
        },
    }
    .build()
}

impl Tree {
    /// Follow aliases (bounded, in case of a cycle).
    fn resolve(&self, mut id: usize) -> usize {
        for _ in 0..64 {
            match self.nodes[id].kind {
                NodeKind::Alias(anchor) => match self.anchors.get(&anchor) {
                    Some(&target) => id = target,
                    None => return id,
                },
                _ => return id,
            }
        }
        id
    }

    fn scalar(&self, id: usize) -> Option<&str> {
        match &self.nodes[self.resolve(id)].kind {
            NodeKind::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    fn pairs(&self, id: usize) -> &[(usize, usize)] {
        match &self.nodes[self.resolve(id)].kind {
            NodeKind::Mapping { pairs, .. } => pairs,
            _ => &[],
        }
    }

    fn items(&self, id: usize) -> &[usize] {
        match &self.nodes[self.resolve(id)].kind {
            NodeKind::Sequence(items) => items,
            _ => &[],
        }
    }

    /// The last pair whose key is the scalar `key` (YAML forbids duplicates;
    /// the last wins in most loaders).
    fn pair(&self, map: usize, key: &str) -> Option<(usize, usize)> {
        self.pairs(map)
            .iter()
            .rev()
            .find(|(k, _)| self.scalar(*k) == Some(key))
            .copied()
    }

    fn get(&self, map: usize, key: &str) -> Option<usize> {
        self.pair(map, key).map(|(_, v)| v)
    }

    fn path(&self, mut node: usize, keys: &[&str]) -> Option<usize> {
        for key in keys {
            node = self.get(node, key)?;
        }
        Some(node)
    }
}

// ---------------------------------------------------------------------------
// Planning the edit

#[derive(Debug, Clone, PartialEq, Eq)]
struct Splice {
    start: usize,
    end: usize,
    with: String,
}

const CONTAINER_LISTS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];

struct Planner<'a> {
    text: &'a str,
    tree: &'a Tree,
    new: &'a ImageRef<'a>,
    repository: String,
    matched: usize,
    /// References that needed at least one splice.
    changed: usize,
    splices: Vec<Splice>,
    /// Nodes already visited through another alias, so each counts once.
    done: Vec<usize>,
}

/// The references found in a text and the splices that update them.
struct Plan {
    matched: usize,
    changed: usize,
    splices: Vec<Splice>,
}

/// Find the references and the splices that update them.
fn plan(text: &str, new: &ImageRef<'_>) -> Result<Plan, SetImageError> {
    let tree = parse_tree(text)?;
    let mut planner = Planner {
        text,
        tree: &tree,
        new,
        repository: new.canonical_repository(),
        matched: 0,
        changed: 0,
        splices: Vec::new(),
        done: Vec::new(),
    };
    for &doc in &tree.documents {
        planner.document(doc, 0)?;
    }
    let mut splices = planner.splices;
    splices.sort_by_key(|s| (s.start, s.end));
    splices.dedup();
    if let Some(w) = splices.windows(2).find(|w| w[0].end > w[1].start) {
        return Err(SetImageError::Unsupported {
            line: line_of(text, w[1].start),
            column: 1,
            reason: "two edits overlap".to_owned(),
        });
    }
    Ok(Plan {
        matched: planner.matched,
        changed: planner.changed,
        splices,
    })
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn apply(text: &str, splices: Vec<Splice>) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut at = 0;
    for s in splices {
        out.push_str(&text[at..s.start]);
        out.push_str(&s.with);
        at = s.end;
    }
    out.push_str(&text[at..]);
    out
}

impl<'a> Planner<'a> {
    fn unsupported(&self, node: usize, reason: impl Into<String>) -> SetImageError {
        let pos = self.tree.nodes[node].start;
        SetImageError::Unsupported {
            line: pos.line,
            column: pos.col + 1,
            reason: reason.into(),
        }
    }

    fn document(&mut self, doc: usize, depth: usize) -> Result<(), SetImageError> {
        let t = self.tree;
        let kind = t.get(doc, "kind").and_then(|k| t.scalar(k));
        let pod_spec: &[&str] = match kind {
            Some("Pod") => &["spec"],
            Some(
                "Deployment"
                | "StatefulSet"
                | "DaemonSet"
                | "ReplicaSet"
                | "Job"
                | "ReplicationController",
            ) => &["spec", "template", "spec"],
            Some("PodTemplate") => &["template", "spec"],
            Some("CronJob") => &["spec", "jobTemplate", "spec", "template", "spec"],
            Some("List") if depth == 0 => {
                if let Some(items) = t.get(doc, "items") {
                    for &item in t.items(items) {
                        self.document(item, depth + 1)?;
                    }
                }
                return Ok(());
            }
            Some("Kustomization" | "Component") => return self.kustomization(doc),
            None if t.get(doc, "images").is_some() => return self.kustomization(doc),
            _ => return Ok(()),
        };
        let Some(spec) = t.path(doc, pod_spec) else {
            return Ok(());
        };
        for list in CONTAINER_LISTS {
            if let Some(containers) = t.get(spec, list) {
                for &container in t.items(containers) {
                    if let Some(image) = t.get(container, "image") {
                        self.container_image(image)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether a (resolved) scalar names the repository; visits each node once.
    fn matching_ref(&mut self, node: usize) -> Option<(usize, ImageRef<'a>)> {
        let t: &'a Tree = self.tree;
        let target = t.resolve(node);
        if self.done.contains(&target) {
            return None;
        }
        let NodeKind::Scalar { value, style } = &t.nodes[target].kind else {
            return None;
        };
        // A block scalar keeps its final line break; match it anyway so the
        // edit is refused rather than silently skipped.
        let value = match style {
            ScalarStyle::Literal | ScalarStyle::Folded => value.trim(),
            _ => value.as_str(),
        };
        // Not a reference, or another repository: not ours to judge.
        let parsed = ImageRef::parse(value).ok()?;
        if parsed.canonical_repository() != self.repository {
            return None;
        }
        self.done.push(target);
        Some((target, parsed))
    }

    fn container_image(&mut self, node: usize) -> Result<(), SetImageError> {
        let Some((target, old)) = self.matching_ref(node) else {
            return Ok(());
        };
        self.matched += 1;
        let wanted = old.retagged(self.new);
        if target != node {
            if self.tree.scalar(target) == Some(wanted.as_str()) {
                return Ok(());
            }
            return Err(self.unsupported(
                node,
                "the image is an alias (`*name`) of a scalar; write the reference out in full",
            ));
        }
        let before = self.splices.len();
        self.replace_scalar(target, &wanted)?;
        if self.splices.len() > before {
            self.changed += 1;
        }
        Ok(())
    }

    /// Splice `wanted` over the scalar `node` in the scalar's own style.
    fn replace_scalar(&mut self, node: usize, wanted: &str) -> Result<(), SetImageError> {
        let n = &self.tree.nodes[node];
        let NodeKind::Scalar { value, style } = &n.kind else {
            return Ok(());
        };
        if value == wanted {
            return Ok(());
        }
        let (start, end) = self.locate(node)?;
        let with = match style {
            ScalarStyle::Plain => {
                if needs_quotes(wanted) {
                    format!("\"{wanted}\"")
                } else {
                    wanted.to_owned()
                }
            }
            ScalarStyle::SingleQuoted => format!("'{wanted}'"),
            ScalarStyle::DoubleQuoted => format!("\"{wanted}\""),
            ScalarStyle::Literal | ScalarStyle::Folded => {
                return Err(self.unsupported(
                    node,
                    "a block scalar (`|` or `>`); write the reference as a plain or quoted scalar",
                ));
            }
        };
        self.splices.push(Splice { start, end, with });
        Ok(())
    }

    /// The byte range of a one-line scalar's source text, quotes included.
    fn locate(&self, node: usize) -> Result<(usize, usize), SetImageError> {
        let n = &self.tree.nodes[node];
        let NodeKind::Scalar { value, style } = &n.kind else {
            return Err(self.unsupported(node, "expected a scalar"));
        };
        let expected = match style {
            ScalarStyle::Plain => value.clone(),
            ScalarStyle::SingleQuoted => format!("'{}'", value.replace('\'', "''")),
            ScalarStyle::DoubleQuoted
                if !value.contains(['"', '\\']) && !value.chars().any(char::is_control) =>
            {
                format!("\"{value}\"")
            }
            ScalarStyle::DoubleQuoted => {
                return Err(self.unsupported(
                    node,
                    "a double-quoted scalar with escapes; write it without escapes",
                ));
            }
            ScalarStyle::Literal | ScalarStyle::Folded => {
                return Err(self.unsupported(
                    node,
                    "a block scalar (`|` or `>`); write the value as a plain or quoted scalar",
                ));
            }
        };
        let several_lines = || {
            self.unsupported(
                node,
                "a scalar spread over several lines; put it on one line",
            )
        };
        if n.start.line != n.end.line || expected.is_empty() {
            return Err(several_lines());
        }
        let starts = &self.tree.line_starts;
        let line_start = starts[(n.start.line - 1).min(starts.len() - 1)];
        let line_end = starts.get(n.start.line).copied().unwrap_or(self.text.len());
        let line = &self.text[line_start..line_end];
        // The column is exact on ASCII lines; otherwise fall back to the one
        // occurrence on the line, or refuse.
        let at = if line
            .get(n.start.col..)
            .is_some_and(|rest| rest.starts_with(&expected))
        {
            n.start.col
        } else {
            let mut found = line.match_indices(&expected);
            match (found.next(), found.next()) {
                (Some((at, _)), None) => at,
                _ if *style == ScalarStyle::DoubleQuoted => {
                    return Err(self.unsupported(
                        node,
                        "a double-quoted scalar with escapes; write it without escapes",
                    ));
                }
                _ => {
                    return Err(self.unsupported(
                        node,
                        "cannot locate the value in its line; edit it by hand",
                    ));
                }
            }
        };
        Ok((line_start + at, line_start + at + expected.len()))
    }

    /// Byte offset of the start of the line after `line` (the text's end for the last).
    fn next_line_start(&self, line: usize) -> Option<usize> {
        self.tree.line_starts.get(line).copied()
    }

    fn kustomization(&mut self, doc: usize) -> Result<(), SetImageError> {
        let t = self.tree;
        let Some(images) = t.get(doc, "images") else {
            return Ok(());
        };
        for &entry in t.items(images) {
            let entry = t.resolve(entry);
            // kustomize deploys `newName` when set, else `name`.
            let Some(name_node) = t.get(entry, "newName").or_else(|| t.get(entry, "name")) else {
                continue;
            };
            if self.matching_ref(name_node).is_none() {
                continue;
            }
            self.matched += 1;
            let before = self.splices.len();
            self.kustomize_entry(entry, name_node)?;
            if self.splices.len() > before {
                self.changed += 1;
            }
        }
        Ok(())
    }

    fn kustomize_entry(&mut self, entry: usize, name_node: usize) -> Result<(), SetImageError> {
        let t = self.tree;
        let new = self.new;
        let tag = t.pair(entry, "newTag");
        let digest = t.pair(entry, "digest");
        for (_, v) in tag.iter().chain(digest.iter()) {
            if matches!(t.nodes[*v].kind, NodeKind::Alias(_)) {
                return Err(
                    self.unsupported(*v, "the value is an alias (`*name`); write it out in full")
                );
            }
        }
        if let Some(d) = new.digest {
            match digest {
                Some((_, v)) => self.replace_scalar(v, d)?,
                None => self.add_key(entry, name_node, "digest", d)?,
            }
        }
        match (new.tag, tag) {
            (Some(nt), Some((_, v))) => self.replace_scalar(v, nt)?,
            // With a digest set the tag is only informational; don't add one.
            (Some(nt), None) if new.digest.is_none() => {
                self.add_key(entry, name_node, "newTag", nt)?
            }
            _ => {}
        }
        if new.digest.is_none()
            && let Some((k, v)) = digest
        {
            self.remove_pair(entry, k, v)?;
        }
        Ok(())
    }

    /// Add `key: value` to the mapping `entry`, after its last one-line pair.
    fn add_key(
        &mut self,
        entry: usize,
        name_node: usize,
        key: &str,
        value: &str,
    ) -> Result<(), SetImageError> {
        let t = self.tree;
        let value = if needs_quotes(value) {
            format!("\"{value}\"")
        } else {
            value.to_owned()
        };
        let NodeKind::Mapping { pairs, flow } = &t.nodes[entry].kind else {
            return Err(self.unsupported(entry, "an `images:` entry that is not a mapping"));
        };
        let Some(&(first_key, last_value)) = pairs
            .first()
            .zip(pairs.last())
            .map(|(f, l)| (f.0, l.1))
            .as_ref()
        else {
            return Err(self.unsupported(entry, "an empty `images:` entry"));
        };
        let by_hand = || {
            self.unsupported(
                entry,
                format!("cannot tell where to add `{key}:`; add it by hand"),
            )
        };
        if *flow {
            let (_, end) = self.locate(last_value).map_err(|_| by_hand())?;
            self.splices.push(Splice {
                start: end,
                end,
                with: format!(", {key}: {value}"),
            });
            return Ok(());
        }
        let one_line = |id: usize| {
            let n = &t.nodes[id];
            matches!(n.kind, NodeKind::Scalar { style, .. } if !matches!(style, ScalarStyle::Literal | ScalarStyle::Folded))
                && n.start.line == n.end.line
        };
        let after = if one_line(last_value) {
            last_value
        } else if one_line(name_node) {
            name_node
        } else {
            return Err(by_hand());
        };
        let (key_start, _) = self.locate(first_key).map_err(|_| by_hand())?;
        let line_start = t.line_starts[t.nodes[first_key].start.line - 1];
        let prefix = &self.text[line_start..key_start];
        if !prefix.chars().all(|c| matches!(c, ' ' | '\t' | '-')) {
            return Err(by_hand());
        }
        // `- name: x` → the entry's keys sit under `name`, two columns in.
        let indent: String = prefix
            .chars()
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let splice = match self.next_line_start(t.nodes[after].end.line) {
            Some(at) => {
                let before = &self.text[..at];
                let eol = if before.ends_with("\r\n") {
                    "\r\n"
                } else if before.ends_with('\r') {
                    "\r"
                } else {
                    "\n"
                };
                Splice {
                    start: at,
                    end: at,
                    with: format!("{indent}{key}: {value}{eol}"),
                }
            }
            None => Splice {
                start: self.text.len(),
                end: self.text.len(),
                with: format!("{}{indent}{key}: {value}", line_ending(self.text)),
            },
        };
        self.splices.push(splice);
        Ok(())
    }

    /// Remove the line holding `key: value` from a block mapping.
    fn remove_pair(&mut self, entry: usize, key: usize, value: usize) -> Result<(), SetImageError> {
        let t = self.tree;
        let refuse = || {
            self.unsupported(
                key,
                "the old `digest:` would keep pinning the old image, and it cannot be removed safely here; \
                 remove it by hand",
            )
        };
        if let NodeKind::Mapping { flow: true, .. } = t.nodes[entry].kind {
            return Err(refuse());
        }
        let line = t.nodes[key].start.line;
        if t.nodes[value].end.line != line {
            return Err(refuse());
        }
        let (key_start, _) = self.locate(key).map_err(|_| refuse())?;
        let (_, value_end) = self.locate(value).map_err(|_| refuse())?;
        let line_start = t.line_starts[line - 1];
        if !self.text[line_start..key_start]
            .chars()
            .all(|c| c == ' ' || c == '\t')
        {
            // `- digest: ...` opens the entry; removing the line would break it.
            return Err(refuse());
        }
        let (start, end) = match self.next_line_start(line) {
            Some(next) => (line_start, next),
            // The last line, without a line break: take the break before it instead.
            None => {
                let before = &self.text[..line_start];
                let eol = if before.ends_with("\r\n") {
                    2
                } else {
                    usize::from(line_start > 0)
                };
                (line_start - eol, self.text.len())
            }
        };
        let rest = self.text[value_end..end].trim();
        if !(rest.is_empty() || rest.starts_with('#')) {
            return Err(refuse());
        }
        self.splices.push(Splice {
            start,
            end,
            with: String::new(),
        });
        Ok(())
    }
}

fn line_ending(text: &str) -> &'static str {
    match text.find('\n') {
        Some(i) if text[..i].ends_with('\r') => "\r\n",
        _ => "\n",
    }
}

/// Whether a plain scalar with this text would load as something other than
/// a string (a number, bool or null) in YAML 1.1 or 1.2.
fn needs_quotes(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "" | "~" | "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n"
    ) {
        return true;
    }
    let digits = lower.replace('_', "");
    if digits.parse::<f64>().is_ok() || digits.parse::<i128>().is_ok() {
        return true;
    }
    if let Some(rest) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0o"))
        .or_else(|| digits.strip_prefix("0b"))
    {
        return rest.chars().all(|c| c.is_ascii_hexdigit());
    }
    // Sexagesimal (1.1): 1:30, and `.inf`/`.nan` forms.
    lower.starts_with('.')
        || (lower.contains(':')
            && lower
                .split(':')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = "127.0.0.1:5000/demo-ns/app:v2";
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// `out` is `input` with the single occurrence of `from` replaced by `to`.
    #[track_caller]
    fn assert_only(input: &str, out: &str, from: &str, to: &str) {
        assert_eq!(
            input.matches(from).count(),
            1,
            "{from:?} must occur once in the input"
        );
        assert_eq!(out, input.replace(from, to));
    }

    #[track_caller]
    fn edit(input: &str, image: &str) -> Edit {
        edit_text(input, image).unwrap_or_else(|e| panic!("edit failed: {e}"))
    }

    #[test]
    fn pod_containers_init_and_ephemeral() {
        let input = "\
apiVersion: v1
kind: Pod
metadata:
  name: p
spec:
  initContainers:
    - name: init
      image: 127.0.0.1:5000/demo-ns/app:v1
  containers:
    - name: main
      image: 127.0.0.1:5000/demo-ns/app:v1
    - name: sidecar
      image: 127.0.0.1:5000/demo-ns/sidecar:v1
  ephemeralContainers:
  - name: debug
    image: 127.0.0.1:5000/demo-ns/app:v1
";
        let e = edit(input, NEW);
        assert_eq!((e.matched, e.changed), (3, 3));
        assert_eq!(e.text, input.replace("demo-ns/app:v1", "demo-ns/app:v2"));
    }

    #[test]
    fn every_workload_kind() {
        for kind in [
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "ReplicaSet",
            "Job",
            "ReplicationController",
        ] {
            let input = format!(
                "apiVersion: apps/v1\nkind: {kind}\nmetadata:\n  name: w\nspec:\n  replicas: 1\n  template:\n    metadata:\n      labels: {{app: w}}\n    spec:\n      initContainers:\n      - name: i\n        image: 127.0.0.1:5000/demo-ns/app:v1\n      containers:\n      - name: c\n        image: 127.0.0.1:5000/demo-ns/app:v1\n"
            );
            let e = edit(&input, NEW);
            assert_eq!((e.matched, e.changed), (2, 2), "{kind}");
            assert_eq!(e.text, input.replace(":v1", ":v2"), "{kind}");
        }
    }

    #[test]
    fn cronjob_and_pod_template_and_list() {
        let cron = "\
kind: CronJob
spec:
  schedule: '*/5 * * * *'
  jobTemplate:
    spec:
      template:
        spec:
          containers:
          - name: c
            image: 127.0.0.1:5000/demo-ns/app:v1
";
        assert_only(cron, &edit(cron, NEW).text, "app:v1", "app:v2");

        let template = "kind: PodTemplate\ntemplate:\n  spec:\n    containers:\n    - {name: c, image: 127.0.0.1:5000/demo-ns/app:v1}\n";
        assert_only(template, &edit(template, NEW).text, "app:v1", "app:v2");

        let list = "kind: List\nitems:\n- kind: Pod\n  spec:\n    containers:\n    - name: c\n      image: 127.0.0.1:5000/demo-ns/app:v1\n";
        assert_only(list, &edit(list, NEW).text, "app:v1", "app:v2");
    }

    #[test]
    fn job_template_in_a_deployment_path_is_not_confused() {
        // A CronJob's pod spec is not at spec.template.spec; a Pod's is not at spec.template.
        let input = "kind: Pod\nspec:\n  template:\n    spec:\n      containers:\n      - image: 127.0.0.1:5000/demo-ns/app:v1\n";
        let e = edit(input, NEW);
        assert_eq!((e.matched, e.changed, e.text.as_str()), (0, 0, input));
    }

    #[test]
    fn multi_document_file() {
        let input = "\
# first
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  ports: [{port: 80}]
---
kind: Deployment
spec:
  template:
    spec:
      containers:
      - name: a
        image: 127.0.0.1:5000/demo-ns/app:v1
---
kind: Pod
spec:
  containers:
  - name: b
    image: \"127.0.0.1:5000/demo-ns/app:v1\"
...
";
        let e = edit(input, NEW);
        assert_eq!((e.matched, e.changed), (2, 2));
        assert_eq!(e.text, input.replace("app:v1", "app:v2"));
    }

    #[test]
    fn kustomization_existing_new_tag() {
        let input = "\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - deployment.yaml
images:
  - name: 127.0.0.1:5000/demo-ns/other
    newTag: v1
  - name: 127.0.0.1:5000/demo-ns/app
    newTag: v1 # pinned by CI
";
        let e = edit(input, NEW);
        assert_eq!((e.matched, e.changed), (1, 1));
        assert_only(input, &e.text, "newTag: v1 #", "newTag: v2 #");
    }

    #[test]
    fn kustomization_missing_new_tag_is_added_with_the_entry_indentation() {
        let input = "resources:\n- pod.yaml\nimages:\n- name: 127.0.0.1:5000/demo-ns/app\n  newName: 127.0.0.1:5000/demo-ns/app\n- name: nginx\n";
        let e = edit(input, NEW);
        assert_eq!((e.matched, e.changed), (1, 1));
        assert_only(
            input,
            &e.text,
            "  newName: 127.0.0.1:5000/demo-ns/app\n",
            "  newName: 127.0.0.1:5000/demo-ns/app\n  newTag: v2\n",
        );

        // Deeper indentation, CRLF, no trailing newline.
        let input = "images:\r\n    -   name: 127.0.0.1:5000/demo-ns/app";
        let e = edit(input, NEW);
        assert_eq!(
            e.text,
            "images:\r\n    -   name: 127.0.0.1:5000/demo-ns/app\r\n        newTag: v2"
        );

        // Flow style entry.
        let input = "images: [{name: 127.0.0.1:5000/demo-ns/app}]\n";
        assert_eq!(
            edit(input, NEW).text,
            "images: [{name: 127.0.0.1:5000/demo-ns/app, newTag: v2}]\n"
        );
    }

    #[test]
    fn kustomization_tags_that_look_like_numbers_are_quoted() {
        let input = "images:\n- name: app\n  newTag: v1\n";
        assert_only(
            input,
            &edit(input, "app:1.10").text,
            "newTag: v1",
            "newTag: \"1.10\"",
        );
        let input = "images:\n- name: app\n";
        assert_eq!(
            edit(input, "app:1234567").text,
            "images:\n- name: app\n  newTag: \"1234567\"\n"
        );
        let input = "images:\n- name: app\n  newTag: '1.0'\n";
        assert_only(input, &edit(input, "app:2.0").text, "'1.0'", "'2.0'");
    }

    #[test]
    fn kustomization_digest() {
        // Added when absent (the tag is left as it was).
        let input = "kind: Kustomization\nimages:\n- name: app\n  newTag: v1\n";
        let e = edit(input, &format!("app@{DIGEST}"));
        assert_eq!(
            e.text,
            format!(
                "kind: Kustomization\nimages:\n- name: app\n  newTag: v1\n  digest: {DIGEST}\n"
            )
        );
        // Replaced when present.
        let old = format!("sha256:{}", "f".repeat(64));
        let input = format!("images:\n- name: app\n  digest: \"{old}\"\n");
        let e = edit(&input, &format!("app@{DIGEST}"));
        assert_eq!((e.matched, e.changed), (1, 1));
        assert_only(&input, &e.text, &old, DIGEST);
        // A tag-only image drops the old digest, which would keep pinning.
        let input =
            format!("images:\n- name: app # the app\n  digest: {old} # pinned\n  newName: app\n");
        let e = edit(&input, "app:v2");
        assert_eq!((e.matched, e.changed), (1, 1));
        assert_eq!(
            e.text,
            "images:\n- name: app # the app\n  newName: app\n  newTag: v2\n"
        );
        // The last line, without a line break.
        let input = format!("images:\r\n- name: app\r\n  newTag: v1\r\n  digest: {old}");
        assert_eq!(
            edit(&input, "app:v2").text,
            "images:\r\n- name: app\r\n  newTag: v2"
        );
    }

    #[test]
    fn kustomization_matches_new_name_not_the_placeholder_name() {
        let input = "images:\n- name: placeholder\n  newName: 127.0.0.1:5000/demo-ns/app\n  newTag: v1\n- name: 127.0.0.1:5000/demo-ns/app\n  newName: elsewhere/app\n  newTag: v1\n";
        let e = edit(input, NEW);
        assert_eq!((e.matched, e.changed), (1, 1));
        assert_eq!(
            e.text,
            "images:\n- name: placeholder\n  newName: 127.0.0.1:5000/demo-ns/app\n  newTag: v2\n- name: 127.0.0.1:5000/demo-ns/app\n  newName: elsewhere/app\n  newTag: v1\n"
        );
    }

    #[test]
    fn comments_quotes_indentation_and_crlf_are_preserved() {
        let input = "# leading comment\r\nkind: Deployment   # trailing\r\nspec:\r\n    template:\r\n        spec:\r\n            containers:\r\n                -   name: \"c\"\r\n                    # the image\r\n                    image:    \"127.0.0.1:5000/demo-ns/app:v1\"   # keep me\r\n                    args: ['--x', \"y\"]\r\n                -   name: d\r\n                    image: '127.0.0.1:5000/demo-ns/app@sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff'\r\n# end without newline";
        let e = edit(input, NEW);
        assert_eq!((e.matched, e.changed), (2, 2));
        let once = input.replace(
            "\"127.0.0.1:5000/demo-ns/app:v1\"",
            "\"127.0.0.1:5000/demo-ns/app:v2\"",
        );
        assert_ne!(once, input);
        let twice = once.replace(
            "'127.0.0.1:5000/demo-ns/app@sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff'",
            "'127.0.0.1:5000/demo-ns/app:v2'",
        );
        assert_eq!(e.text, twice);
    }

    #[test]
    fn registry_port_is_not_a_tag() {
        let input = "kind: Pod\nspec:\n  containers:\n  - image: 127.0.0.1:5000/demo-ns/app\n  - image: 127.0.0.1:5001/demo-ns/app:v1\n  - image: 127.0.0.1:5000/demo-ns/app-x:v1\n  - image: 127.0.0.1:5000/app:v1\n";
        let e = edit(input, NEW);
        assert_eq!((e.matched, e.changed), (1, 1));
        assert_only(
            input,
            &e.text,
            "5000/demo-ns/app\n",
            "5000/demo-ns/app:v2\n",
        );

        let r = ImageRef::parse("localhost:5000/a/b:c@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!((r.name, r.tag), ("localhost:5000/a/b", Some("c")));
        let r = ImageRef::parse("127.0.0.1:5000/demo-ns/app").unwrap();
        assert_eq!(
            (r.name, r.tag, r.digest),
            ("127.0.0.1:5000/demo-ns/app", None, None)
        );
    }

    #[test]
    fn non_matching_repositories_are_untouched() {
        let input = "kind: Pod\nspec:\n  containers:\n  - image: nginx:1.27\n  - image: 127.0.0.1:5000/demo-ns/other:v1\n  - image: \"not a reference\"\n  - image:\n  - image: [a, b]\n";
        let (out, changed) = set_image(input, NEW).unwrap();
        assert_eq!((out.as_str(), changed), (input, 0));
    }

    #[test]
    fn already_up_to_date_counts_as_zero_changes() {
        let input = "kind: Pod\nspec:\n  containers:\n  - image: 127.0.0.1:5000/demo-ns/app:v2\n";
        let e = edit(input, NEW);
        assert_eq!((e.matched, e.changed, e.text.as_str()), (1, 0, input));
        assert_eq!(set_image(input, NEW).unwrap(), (input.to_owned(), 0));
        let input = "images:\n- name: 127.0.0.1:5000/demo-ns/app\n  newTag: v2\n";
        let e = edit(input, NEW);
        assert_eq!((e.matched, e.changed, e.text.as_str()), (1, 0, input));
    }

    #[test]
    fn image_keys_outside_the_container_paths_are_untouched() {
        let input = "\
kind: Deployment
metadata:
  annotations:
    image: 127.0.0.1:5000/demo-ns/app:v1
spec:
  image: 127.0.0.1:5000/demo-ns/app:v1
  template:
    metadata:
      labels:
        image: 127.0.0.1:5000/demo-ns/app:v1
    spec:
      containers:
      - name: c
        image: 127.0.0.1:5000/demo-ns/app:v1
        env:
        - name: image
          value: 127.0.0.1:5000/demo-ns/app:v1
---
kind: ConfigMap
data:
  image: 127.0.0.1:5000/demo-ns/app:v1
";
        let e = edit(input, NEW);
        assert_eq!((e.matched, e.changed), (1, 1));
        assert_only(
            input,
            &e.text,
            "- name: c\n        image: 127.0.0.1:5000/demo-ns/app:v1",
            "- name: c\n        image: 127.0.0.1:5000/demo-ns/app:v2",
        );
    }

    #[test]
    fn docker_hub_spellings_match_and_keep_their_spelling() {
        let input = "kind: Pod\nspec:\n  containers:\n  - image: nginx:1.25\n  - image: docker.io/library/nginx\n  - image: library/nginx:1@sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff\n";
        let e = edit(input, "docker.io/library/nginx:1.27");
        assert_eq!(
            e.text,
            "kind: Pod\nspec:\n  containers:\n  - image: nginx:1.27\n  - image: docker.io/library/nginx:1.27\n  - image: library/nginx:1.27\n"
        );
    }

    #[test]
    fn digest_and_tag_with_digest() {
        let input = "kind: Pod\nspec:\n  containers:\n  - image: app:v1\n";
        let e = edit(input, &format!("app:v2@{DIGEST}"));
        assert_only(input, &e.text, "app:v1", &format!("app:v2@{DIGEST}"));
        let e = edit(input, &format!("app@{DIGEST}"));
        assert_only(input, &e.text, "app:v1", &format!("app@{DIGEST}"));
    }

    #[test]
    fn flow_style_containers() {
        let input = "kind: Pod\nspec: {containers: [{name: a, image: app:v1}, {name: b, image: 'app'}, {name: \"é\", image: \"app:v0\"}]}\n";
        let e = edit(input, "app:v2");
        assert_eq!((e.matched, e.changed), (3, 3));
        assert_eq!(
            e.text,
            "kind: Pod\nspec: {containers: [{name: a, image: app:v2}, {name: b, image: 'app:v2'}, {name: \"é\", image: \"app:v2\"}]}\n"
        );
    }

    #[test]
    fn non_ascii_text_before_the_edit() {
        let input = "# déploiement — ünïcode ✓\nkind: Pod\nmetadata:\n  annotations: {note: \"日本語\"}\nspec:\n  containers:\n  - image: app:v1 # ✓\n";
        assert_only(input, &edit(input, "app:v2").text, "app:v1", "app:v2");
    }

    #[test]
    fn unsafe_forms_are_refused_clearly() {
        let block = "kind: Pod\nspec:\n  containers:\n  - image: |\n      app:v1\n";
        let err = set_image(block, "app:v2").unwrap_err();
        assert!(
            matches!(err, SetImageError::Unsupported { line: 5, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("block scalar"), "{err}");

        let alias = "x: &img app:v1\nkind: Pod\nspec:\n  containers:\n  - image: *img\n";
        let err = set_image(alias, "app:v2").unwrap_err();
        assert!(err.to_string().contains("alias"), "{err}");

        // Folded over two lines with an escaped line break.
        let multi_line = "kind: Pod\nspec:\n  containers:\n  - image: \"app:\\\n      v1\"\n";
        let err = set_image(multi_line, "app:v2").unwrap_err();
        assert!(
            matches!(err, SetImageError::Unsupported { line: 4, .. }),
            "{err}"
        );
        // On the next line is fine.
        let next_line = "kind: Pod\nspec:\n  containers:\n  - image:\n      app:v1\n";
        assert_only(
            next_line,
            &set_image(next_line, "app:v2").unwrap().0,
            "app:v1",
            "app:v2",
        );

        let escaped = "kind: Pod\nspec:\n  containers:\n  - image: \"app:\\x76\\x31\"\n";
        let err = set_image(escaped, "app:v2").unwrap_err();
        assert!(err.to_string().contains("escapes"), "{err}");
    }

    #[test]
    fn invalid_images_and_yaml_errors() {
        for bad in [
            "",
            "app",
            "App:v1",
            "app:",
            "app:v 1",
            "app@sha256:xyz",
            "host:port/app:v1",
            "-app:v1",
        ] {
            let err = set_image("kind: Pod\n", bad).unwrap_err();
            assert!(
                matches!(err, SetImageError::InvalidImage { .. }),
                "{bad:?}: {err}"
            );
        }
        let err =
            set_image("kind: Pod\nspec:\n  containers: [a, b\n  x: y\n", "app:v2").unwrap_err();
        let SetImageError::Yaml { line, column, .. } = &err else {
            panic!("{err}")
        };
        assert!(*line >= 3 && *column >= 1, "{err}");
        assert!(
            err.to_string().starts_with("YAML syntax error at line"),
            "{err}"
        );
        let err = set_image("a: b\n c: d\n", "app:v2").unwrap_err();
        assert!(matches!(err, SetImageError::Yaml { line: 2, .. }), "{err}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let err = set_image(&deep, "app:v2").unwrap_err();
        assert!(matches!(err, SetImageError::Yaml { .. }), "{err}");
    }

    #[test]
    fn a_thousand_documents_are_quick() {
        let doc = "kind: Deployment\nmetadata:\n  name: d{i}\nspec:\n  template:\n    spec:\n      containers:\n      - name: c\n        image: 127.0.0.1:5000/demo-ns/app:v1 # c\n      - name: s\n        image: nginx:1\n";
        let input: String = (0..1000)
            .map(|i| format!("---\n{}", doc.replace("{i}", &i.to_string())))
            .collect();
        let started = std::time::Instant::now();
        let e = edit(&input, NEW);
        let took = started.elapsed();
        assert_eq!((e.matched, e.changed), (1000, 1000));
        assert_eq!(e.text, input.replace("app:v1", "app:v2"));
        assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
    }

    fn repo_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        dir
    }

    const POD: &str = "kind: Pod\nspec:\n  containers:\n  - image: app:v1\n";

    #[test]
    fn files_are_edited_in_place_and_reported() {
        let dir = repo_with(&[
            ("k8s/pod.yaml", POD),
            ("k8s/other.yaml", "kind: Pod\n"),
            ("k8s/up.yaml", "images:\n- name: app\n  newTag: v2\n"),
        ]);
        let files = ["k8s/pod.yaml", "./k8s/../k8s/other.yaml", "k8s/up.yaml"].map(String::from);
        let report = set_image_in_files(dir.path(), &files, "app:v2", false).unwrap();
        assert_eq!((report.matched(), report.changed()), (2, 1));
        assert_eq!(
            report.files[0],
            FileReport {
                path: files[0].clone(),
                matched: 1,
                changed: 1
            }
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("k8s/pod.yaml")).unwrap(),
            POD.replace("v1", "v2")
        );
        // Only the real files remain (no temporary files left behind).
        assert_eq!(fs::read_dir(dir.path().join("k8s")).unwrap().count(), 3);
        // Running again: everything is up to date.
        let report = set_image_in_files(dir.path(), &files, "app:v2", false).unwrap();
        assert_eq!((report.matched(), report.changed()), (2, 0));
    }

    #[test]
    fn no_match_is_an_error_unless_allowed() {
        let dir = repo_with(&[("pod.yaml", POD)]);
        let files = vec!["pod.yaml".to_owned()];
        let err = set_image_in_files(dir.path(), &files, "other:v2", false).unwrap_err();
        assert!(matches!(err, SetImageError::NoMatch { .. }), "{err}");
        let report = set_image_in_files(dir.path(), &files, "other:v2", true).unwrap();
        assert_eq!((report.matched(), report.changed()), (0, 0));
    }

    #[test]
    fn a_bad_file_leaves_every_file_unwritten() {
        let dir = repo_with(&[("a.yaml", POD), ("b.yaml", "kind: Pod\nspec: [\n")]);
        let files = vec!["a.yaml".to_owned(), "b.yaml".to_owned()];
        let err = set_image_in_files(dir.path(), &files, "app:v2", false).unwrap_err();
        assert!(
            matches!(&err, SetImageError::InFile { path, source } if path == "b.yaml" && matches!(**source, SetImageError::Yaml { .. })),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("b.yaml: YAML syntax error at line"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(dir.path().join("a.yaml")).unwrap(), POD);
    }

    #[test]
    fn paths_outside_the_repository_are_refused() {
        let outside = repo_with(&[("secret.yaml", POD)]);
        let dir = repo_with(&[("pod.yaml", POD), ("sub/x.yaml", POD)]);
        let abs = outside.path().join("secret.yaml").display().to_string();
        std::os::unix::fs::symlink(
            outside.path().join("secret.yaml"),
            dir.path().join("link.yaml"),
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linkdir")).unwrap();
        std::os::unix::fs::symlink("pod.yaml", dir.path().join("inside-link.yaml")).unwrap();
        std::os::unix::fs::symlink("missing.yaml", dir.path().join("dangling.yaml")).unwrap();
        let name = outside.path().file_name().unwrap().to_str().unwrap();
        for bad in [
            abs.as_str(),
            ".git/config",
            "../x.yaml",
            &format!("../{name}/secret.yaml"),
            "sub/../../x.yaml",
            "link.yaml",
            "linkdir/secret.yaml",
            "dangling.yaml",
            "sub",
            "",
        ] {
            let err =
                set_image_in_files(dir.path(), &[bad.to_owned()], "app:v2", true).unwrap_err();
            assert!(
                matches!(err, SetImageError::UnsafePath { .. }),
                "{bad:?}: {err}"
            );
        }
        assert_eq!(
            fs::read_to_string(outside.path().join("secret.yaml")).unwrap(),
            POD
        );

        let err =
            set_image_in_files(dir.path(), &["nope.yaml".to_owned()], "app:v2", true).unwrap_err();
        assert!(matches!(err, SetImageError::NotFound { .. }), "{err}");

        // A symlink that stays inside is followed, and the target is edited.
        let report = set_image_in_files(
            dir.path(),
            &["inside-link.yaml".to_owned()],
            "app:v2",
            false,
        )
        .unwrap();
        assert_eq!(report.changed(), 1);
        assert_eq!(
            fs::read_to_string(dir.path().join("pod.yaml")).unwrap(),
            POD.replace("v1", "v2")
        );
        assert!(
            fs::symlink_metadata(dir.path().join("inside-link.yaml"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
}
