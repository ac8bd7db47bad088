//! Helm values files (and any other YAML document without `kind`): the
//! image references a chart's templates read, wherever they sit.
//!
//! - every `image: <reference>` string, at any depth;
//! - every mapping with `repository:` and `tag:` (and optionally
//!   `registry:`, prefixed to the repository as Bitnami's charts do) whose
//!   repository is the new image's: `tag:` gets the new tag, and a new
//!   digest goes into `digest:` when the mapping has one, else after the
//!   tag (`tag: <sha>@sha256:...`, which a `repo:tag` template turns into
//!   a pinned reference).
//!
//! Only the scalars are spliced, so comments, anchors and indentation stay.

use crate::EditError;
use crate::image_ref::ImageRef;
use crate::plan::Planner;
use crate::yaml_tree::NodeKind;
use std::collections::HashSet;

/// Deeper than any values file; stops a pathological nesting.
const MAX_DEPTH: usize = 64;

impl Planner<'_> {
    pub(crate) fn helm_values(&mut self, doc: usize) -> Result<(), EditError> {
        self.walk(doc, 0, &mut HashSet::new())
    }

    /// Each mapping and sequence once (`seen`: resolved ids), whatever
    /// aliases point at it: `a: &a [*a, *a]` would otherwise never end.
    fn walk(
        &mut self,
        node: usize,
        depth: usize,
        seen: &mut HashSet<usize>,
    ) -> Result<(), EditError> {
        let t = self.tree;
        let id = t.resolve(node);
        if depth > MAX_DEPTH || !seen.insert(id) {
            return Ok(());
        }
        match &t.nodes[id].kind {
            NodeKind::Mapping { .. } => {
                if let (Some(repo), Some(tag)) = (t.get(node, "repository"), t.get(node, "tag")) {
                    self.repository_and_tag(node, repo, tag)?;
                }
                for &(key, value) in t.pairs(node) {
                    match (t.scalar(key), &t.nodes[t.resolve(value)].kind) {
                        (Some("image"), NodeKind::Scalar { .. }) => self.container_image(value)?,
                        (_, NodeKind::Scalar { .. }) => {}
                        _ => self.walk(value, depth + 1, seen)?,
                    }
                }
            }
            NodeKind::Sequence(items) => {
                for &item in items {
                    self.walk(item, depth + 1, seen)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn repository_and_tag(&mut self, map: usize, repo: usize, tag: usize) -> Result<(), EditError> {
        let t = self.tree;
        let Some(repository) = t.scalar(repo) else {
            return Ok(());
        };
        let full = match t.get(map, "registry").and_then(|r| t.scalar(r)) {
            Some(registry) if !registry.is_empty() => format!("{registry}/{repository}"),
            _ => repository.to_owned(),
        };
        let Ok(parsed) = ImageRef::parse(&full) else {
            return Ok(());
        };
        if parsed.canonical_repository() != self.repository || self.done.contains(&tag) {
            return Ok(());
        }
        self.done.push(tag);
        self.matched += 1;
        // `tag: <sha>@sha256:...` is how a pin without `digest:` is written.
        let (old_tag, old_digest) = match t.scalar(tag).map(|s| s.split_once('@')) {
            Some(Some((tag, digest))) => (Some(tag), Some(digest)),
            Some(None) => (t.scalar(tag), None),
            None => (None, None),
        };
        let old = ImageRef {
            name: repository,
            tag: old_tag,
            digest: old_digest,
        };
        let digest_node = t.get(map, "digest");
        let lines: Vec<usize> = [tag, repo].into_iter().chain(digest_node).collect();
        if self.kept(&lines, &old) {
            return Ok(());
        }
        let new = self.new;
        let wanted_tag = match (new.tag, new.digest, digest_node) {
            (Some(tag), Some(d), None) => format!("{tag}@{d}"),
            (Some(tag), _, _) => tag.to_owned(),
            (None, _, _) => {
                return Err(self.unsupported(
                    tag,
                    "a `repository:`/`tag:` pair needs a new image with a tag",
                ));
            }
        };
        let before = self.splices.len();
        self.replace_scalar(tag, &wanted_tag)?;
        if let Some(node) = digest_node {
            // A new image without a digest clears the old one, which would
            // otherwise keep pinning the old image (as for kustomize).
            self.replace_scalar(node, new.digest.unwrap_or(""))?;
        }
        if self.splices.len() > before {
            self.changed += 1;
        }
        Ok(())
    }
}
