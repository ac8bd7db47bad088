//! Container image references, read one way for the whole runner: the
//! `push` step finds the registry its credentials are for, `set-image` finds
//! the references to one repository in Kubernetes YAML.
//!
//! The grammar is Docker's (`distribution/reference`):
//! `[domain[:port]/]path[:tag][@algorithm:hex]`.
//! - The first `/`-separated component is a registry domain when it has a
//!   `.` or a `:`, is `localhost`, or has an upper-case letter (a path
//!   component never has one); otherwise the image is on Docker Hub.
//! - A `:` after the last `/` starts the tag, so the port of
//!   `127.0.0.1:5000/app` is not a tag; `@` starts the digest, which may
//!   follow a tag (`app:v1@sha256:...`).
//!
//! [`ImageRef::split`] only cuts a reference into those parts (the `push`
//! step leaves judging it to the engine); [`ImageRef::parse`] also checks
//! every part (`set-image` edits only what it understands).
//!
//! Doors: imports nothing of the crate; `gitops::set_image` and the docker
//! executor's `push` step import it.

/// A reference cut into its parts; `name` is the repository as written,
/// domain included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef<'a> {
    pub name: &'a str,
    pub tag: Option<&'a str>,
    pub digest: Option<&'a str>,
}

impl<'a> ImageRef<'a> {
    /// Cuts `s` into name, tag and digest, checking nothing.
    pub fn split(s: &'a str) -> Self {
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest)),
            None => (s, None),
        };
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&rest[..colon], Some(&rest[colon + 1..]))
            }
            _ => (rest, None),
        };
        ImageRef { name, tag, digest }
    }

    /// Parses `[host[:port]/]path[:tag][@algo:hex]` (the distribution
    /// grammar); the error says which part is wrong.
    pub fn parse(s: &'a str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("it is empty".to_owned());
        }
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("it contains {c:?}"));
        }
        let parsed = Self::split(s);
        if let Some(digest) = parsed.digest {
            validate_digest(digest)?;
        }
        if let Some(tag) = parsed.tag {
            validate_tag(tag)?;
        }
        validate_name(parsed.name)?;
        Ok(parsed)
    }

    /// The repository with Docker Hub's implicit parts spelled out, so
    /// `nginx`, `library/nginx` and `docker.io/library/nginx` compare equal.
    pub fn canonical_repository(&self) -> String {
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
    pub fn retagged(&self, new: &ImageRef<'_>) -> String {
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

/// Splits an image reference into (repository, tag); `latest` when it has
/// neither tag nor digest. A digest reference (`name[:tag]@sha256:...`)
/// keeps the digest as its "tag".
pub fn split_reference(image: &str) -> (&str, &str) {
    let parsed = ImageRef::split(image);
    (
        parsed.name,
        parsed.digest.or(parsed.tag).unwrap_or("latest"),
    )
}

/// The registry host of a repository, as Docker reads it (see the module
/// docs); `None` for Docker Hub's short forms.
pub fn registry_host(repository: &str) -> Option<&str> {
    split_domain(repository).0
}

/// (domain, path) of a repository name.
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
        validate_domain(domain)?;
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

fn validate_domain(domain: &str) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

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

    #[test]
    fn registry_port_is_not_a_tag() {
        let text = format!("localhost:5000/a/b:c@{DIGEST}");
        let r = ImageRef::parse(&text).unwrap();
        assert_eq!((r.name, r.tag), ("localhost:5000/a/b", Some("c")));
        let r = ImageRef::parse("127.0.0.1:5000/demo-ns/app").unwrap();
        assert_eq!(
            (r.name, r.tag, r.digest),
            ("127.0.0.1:5000/demo-ns/app", None, None)
        );
    }

    /// Corner cases where a looser reading goes wrong; Docker's grammar
    /// decides (docs/decisions.md has the history).
    #[test]
    fn tags_before_digests_upper_case_hosts_and_bare_hosts() {
        // A tag before the digest belongs to neither the repository nor the
        // digest.
        assert_eq!(
            split_reference(&format!("x/y:v1@{DIGEST}")),
            ("x/y", DIGEST)
        );
        // An upper-case first component is a host: paths are lower-case.
        assert_eq!(registry_host("MyRegistry/app"), Some("MyRegistry"));
        assert_eq!(
            ImageRef::parse("MyRegistry/app:v1")
                .unwrap()
                .canonical_repository(),
            "MyRegistry/app"
        );
        // A host with nothing after it is still a host; such a reference
        // is invalid either way.
        assert_eq!(registry_host("localhost/"), Some("localhost"));
        assert!(ImageRef::parse("localhost/:v1").is_err());
    }

    #[test]
    fn docker_hub_spellings_are_one_repository() {
        for spelling in [
            "nginx:1",
            "library/nginx",
            "docker.io/library/nginx:1.27",
            "index.docker.io/library/nginx",
            "registry-1.docker.io/library/nginx",
        ] {
            assert_eq!(
                ImageRef::parse(spelling).unwrap().canonical_repository(),
                "docker.io/library/nginx",
                "{spelling}"
            );
        }
        assert_eq!(
            ImageRef::parse("localhost/app")
                .unwrap()
                .canonical_repository(),
            "localhost/app"
        );
        assert_eq!(
            ImageRef::parse("org/app").unwrap().canonical_repository(),
            "docker.io/org/app"
        );
    }

    #[test]
    fn invalid_references_say_which_part() {
        for (bad, part) in [
            ("", "empty"),
            ("app:v 1", "contains"),
            ("App:v1", "path component"),
            ("app:", "tag"),
            ("app@sha256:xyz", "digest"),
            ("host:port/app:v1", "registry port"),
            ("-app:v1", "path component"),
            ("bad_host.io/app", "registry host"),
        ] {
            let err = ImageRef::parse(bad).unwrap_err();
            assert!(err.contains(part), "{bad:?}: {err}");
        }
    }

    #[test]
    fn retagged_keeps_the_spelling() {
        let old = ImageRef::parse("nginx:1.25").unwrap();
        let text = format!("docker.io/library/nginx:1.27@{DIGEST}");
        let new = ImageRef::parse(&text).unwrap();
        assert_eq!(old.retagged(&new), format!("nginx:1.27@{DIGEST}"));
    }
}
