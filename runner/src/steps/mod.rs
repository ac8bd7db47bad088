//! Built-in step kinds beyond `run`: [`build`] (an image from a Dockerfile
//! in the workspace) and [`push`] (to a registry with credentials from a
//! runner secret), executed by the docker executor; [`set_image`] (a
//! structured edit of image references in Kubernetes YAML) and
//! [`git_push`] (the GitOps write-back: the `set-image` and `git-push` step
//! kinds, run inside the runner with git2 under every executor but `fake`).

pub mod git_push;
pub mod set_image;

/// Splits an image reference into (repository, tag); `latest` when no tag.
/// A digest reference (`name@sha256:...`) keeps the digest as its "tag".
pub fn split_reference(image: &str) -> (&str, &str) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name, digest);
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], &image[last_slash + i + 1..]),
        None => (image, "latest"),
    }
}

/// The registry host of a repository, as Docker reads it: the first path
/// component when it looks like a host (has `.` or `:`, or is `localhost`).
pub fn registry_host(repository: &str) -> Option<&str> {
    let (first, rest) = repository.split_once('/')?;
    (!rest.is_empty() && (first.contains('.') || first.contains(':') || first == "localhost"))
        .then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_references() {
        assert_eq!(
            split_reference("127.0.0.1:5000/a/b:v1"),
            ("127.0.0.1:5000/a/b", "v1")
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/a/b"),
            ("127.0.0.1:5000/a/b", "latest")
        );
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
        assert_eq!(split_reference("x/y@sha256:ab"), ("x/y", "sha256:ab"));
        assert_eq!(registry_host("127.0.0.1:5000/a/b"), Some("127.0.0.1:5000"));
        assert_eq!(registry_host("library/busybox"), None);
        assert_eq!(registry_host("busybox"), None);
    }
}
