//! Kubernetes manifests as text: point the image references of a YAML text
//! at a new tag or digest ([`edit_text`], the heart of the runner's
//! `set-image` step), and read image references ([`image_ref`]).
//!
//! The edit is structural, not textual: the text is parsed with
//! `saphyr-parser-bw` (which reports the source span of every scalar), the
//! documents are walked along the known workload paths, and only the byte
//! ranges of the image scalars that name the same repository are replaced.
//! Everything else (comments, key order, indentation, quoting, line endings,
//! the trailing newline) stays byte-for-byte identical.
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
//! - any other document without `kind` (Helm values, compose files):
//!   `image:` strings and `repository:`/`tag:` mappings at any depth
//!   (`helm`).
//!
//! A reference on a line with a `# capstan: pin` comment is never changed,
//! nor one the caller's `keep` judges (`order: monotonic`: a newer image);
//! [`Edit::kept`] lists them.
//!
//! A reference keeps its repository spelling (`nginx` stays `nginx` even when
//! the new image is written `docker.io/library/nginx:1.27`); only the tag and
//! digest change. A new image with only a tag drops an old digest, since a
//! digest would otherwise keep pinning the old image.
//!
//! # Layout
//! - `edit`: [`edit_text`], [`Edit`], [`EditError`]: plan, apply, check the
//!   result reads back.
//! - `plan`: which references one text has and the byte splices that update
//!   them. Walks a `yaml_tree`.
//! - `helm`: the walk of a document without `kind`.
//! - `yaml_tree`: a YAML stream as a tree of nodes with source positions.
//! - [`image_ref`]: the one image-reference parser (Docker's grammar).
//!
//! Pure (no I/O, no git, no async): its own crate so the runner's
//! `gitops::set_image` (files, git, the step) and the fuzz target
//! `set_image` (`fuzz/`) share it, the latter without building the
//! runner's dependencies (docs/decisions.md, "Fuzzing").

mod edit;
mod helm;
pub mod image_ref;
mod plan;
#[cfg(test)]
mod tests;
mod yaml_tree;

pub use edit::{Edit, EditError, edit_text, edit_text_keeping};
pub use plan::{Kept, PIN_COMMENT};
