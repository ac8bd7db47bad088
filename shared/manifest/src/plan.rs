//! Planning one edit: walk a text's YAML documents along the workload paths
//! (see the parent module's docs), find the image references to the new
//! image's repository, and list the byte splices that update them in the
//! scalar's own style. Nothing is written here: [`plan`] lists, [`apply`]
//! makes the splices.

use saphyr_parser_bw::ScalarStyle;

use crate::EditError;
use crate::image_ref::ImageRef;
use crate::yaml_tree::{NodeKind, Tree, parse_tree};

/// A matching reference left as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// 1-based line of the reference.
    pub line: usize,
    /// The reference as written.
    pub reference: String,
    /// Why: the line's `# capstan: pin` comment, or the caller's reason.
    pub why: String,
}

/// The comment that pins a reference: `set-image` leaves its line alone
/// (a rollback someone made by hand stays until they remove it).
pub const PIN_COMMENT: &str = "capstan: pin";

/// Replace `start..end` (byte offsets) of the text with `with`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Splice {
    start: usize,
    end: usize,
    with: String,
}

const CONTAINER_LISTS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];

pub(crate) struct Planner<'a> {
    pub(crate) text: &'a str,
    pub(crate) tree: &'a Tree,
    pub(crate) new: &'a ImageRef<'a>,
    pub(crate) keep: &'a dyn Fn(&ImageRef<'_>) -> Option<String>,
    pub(crate) kept: Vec<Kept>,
    pub(crate) repository: String,
    pub(crate) matched: usize,
    /// References that needed at least one splice.
    pub(crate) changed: usize,
    pub(crate) splices: Vec<Splice>,
    /// Nodes already visited through another alias, so each counts once.
    pub(crate) done: Vec<usize>,
}

/// The references found in a text and the splices that update them.
pub(crate) struct Plan {
    pub(crate) matched: usize,
    pub(crate) changed: usize,
    pub(crate) splices: Vec<Splice>,
    pub(crate) kept: Vec<Kept>,
}

/// Find the references and the splices that update them, leaving those
/// `keep` or a pin comment keeps (see [`crate::edit_text_keeping`]).
pub(crate) fn plan(
    text: &str,
    new: &ImageRef<'_>,
    keep: &dyn Fn(&ImageRef<'_>) -> Option<String>,
) -> Result<Plan, EditError> {
    let tree = parse_tree(text)?;
    let mut planner = Planner {
        text,
        tree: &tree,
        new,
        keep,
        kept: Vec::new(),
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
        return Err(EditError::Unsupported {
            line: line_of(text, w[1].start),
            column: 1,
            reason: "two edits overlap".to_owned(),
        });
    }
    Ok(Plan {
        matched: planner.matched,
        changed: planner.changed,
        splices,
        kept: planner.kept,
    })
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// `text` with `splices` (sorted, not overlapping) made.
pub(crate) fn apply(text: &str, splices: Vec<Splice>) -> String {
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
    pub(crate) fn unsupported(&self, node: usize, reason: impl Into<String>) -> EditError {
        let pos = self.tree.nodes[node].start;
        EditError::Unsupported {
            line: pos.line,
            column: pos.col + 1,
            reason: reason.into(),
        }
    }

    fn document(&mut self, doc: usize, depth: usize) -> Result<(), EditError> {
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
            None if depth == 0 => return self.helm_values(doc),
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
    pub(crate) fn matching_ref(&mut self, node: usize) -> Option<(usize, ImageRef<'a>)> {
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

    /// The text of 1-based `line` (YAML's line breaks, lone CR included).
    fn line_text(&self, line: usize) -> &'a str {
        let starts = &self.tree.line_starts;
        let Some(&start) = starts.get(line.saturating_sub(1)) else {
            return "";
        };
        let end = starts.get(line).copied().unwrap_or(self.text.len());
        self.text.get(start..end).unwrap_or("")
    }

    /// Whether the reference `old`, written in the scalars `nodes` (the
    /// first names it), stays as it is: a pin comment on a line of any of
    /// them, or the caller's `keep`. Records it if so.
    pub(crate) fn kept(&mut self, nodes: &[usize], old: &ImageRef<'_>) -> bool {
        let node = nodes[0];
        let line = self.tree.nodes[node].start.line;
        let pinned = nodes.iter().any(|&n| {
            self.line_text(self.tree.nodes[n].start.line)
                .split('#')
                .skip(1)
                .any(|c| c.trim_start().starts_with(PIN_COMMENT))
        });
        let why = if pinned {
            Some(format!("pinned by its `# {PIN_COMMENT}` comment"))
        } else {
            (self.keep)(old)
        };
        let Some(why) = why else {
            return false;
        };
        let reference = self.tree.scalar(node).unwrap_or_default().to_owned();
        self.kept.push(Kept {
            line,
            reference,
            why,
        });
        true
    }

    pub(crate) fn container_image(&mut self, node: usize) -> Result<(), EditError> {
        let Some((target, old)) = self.matching_ref(node) else {
            return Ok(());
        };
        self.matched += 1;
        if self.kept(&[node], &old) {
            return Ok(());
        }
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
    pub(crate) fn replace_scalar(&mut self, node: usize, wanted: &str) -> Result<(), EditError> {
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
    fn locate(&self, node: usize) -> Result<(usize, usize), EditError> {
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

    fn kustomization(&mut self, doc: usize) -> Result<(), EditError> {
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
            let Some((_, old)) = self.matching_ref(name_node) else {
                continue;
            };
            self.matched += 1;
            // A pin comment on the entry's name, tag or digest line holds;
            // its tag is the old reference's.
            let tag = t.get(entry, "newTag").and_then(|n| t.scalar(n));
            let old = ImageRef {
                tag: tag.or(old.tag),
                ..old
            };
            let lines: Vec<usize> = std::iter::once(name_node)
                .chain(t.get(entry, "newTag"))
                .chain(t.get(entry, "digest"))
                .collect();
            if self.kept(&lines, &old) {
                continue;
            }
            let before = self.splices.len();
            self.kustomize_entry(entry, name_node)?;
            if self.splices.len() > before {
                self.changed += 1;
            }
        }
        Ok(())
    }

    fn kustomize_entry(&mut self, entry: usize, name_node: usize) -> Result<(), EditError> {
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
    ) -> Result<(), EditError> {
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
        let splice = self.insert_line(t.nodes[after].end.line, &format!("{indent}{key}: {value}"));
        self.splices.push(splice);
        Ok(())
    }

    /// The splice that puts `content` on a line of its own after `line`,
    /// ending it the way that line ends.
    fn insert_line(&self, line: usize, content: &str) -> Splice {
        match self.next_line_start(line) {
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
                    with: format!("{content}{eol}"),
                }
            }
            None => Splice {
                start: self.text.len(),
                end: self.text.len(),
                with: format!("{}{content}", line_ending(self.text)),
            },
        }
    }

    /// Remove the line holding `key: value` from a block mapping.
    fn remove_pair(&mut self, entry: usize, key: usize, value: usize) -> Result<(), EditError> {
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
