//! Push events as GitHub, Gitea and GitLab send them: the headers that
//! name the event, the delivery and the signature, and the few payload
//! fields Capstan reads. The repository URLs of a payload only pick which
//! registered repository it claims to be; its secret then decides, and
//! every fetch uses the registered URL.

use super::Forge;
use axum::http::HeaderMap;
use serde::Deserialize;

/// The headers of one forge.
pub(crate) struct Headers {
    pub(crate) event: &'static str,
    pub(crate) delivery: &'static str,
    pub(crate) signature: &'static str,
}

pub(crate) fn headers(forge: Forge) -> Headers {
    match forge {
        Forge::Github => Headers {
            event: "x-github-event",
            delivery: "x-github-delivery",
            signature: "x-hub-signature-256",
        },
        Forge::Gitea => Headers {
            event: "x-gitea-event",
            delivery: "x-gitea-delivery",
            signature: "x-gitea-signature",
        },
        Forge::Gitlab => Headers {
            event: "x-gitlab-event",
            delivery: "x-gitlab-event-uuid",
            signature: "x-gitlab-token",
        },
    }
}

/// What kind of event a delivery is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    Push,
    /// GitHub's and Gitea's test delivery when a hook is made.
    Ping,
    Other(String),
}

pub(crate) fn event(forge: Forge, h: &HeaderMap) -> Event {
    let name = header(h, headers(forge).event);
    match (forge, name.as_str()) {
        (Forge::Github | Forge::Gitea, "push") | (Forge::Gitlab, "Push Hook") => Event::Push,
        (Forge::Github | Forge::Gitea, "ping") => Event::Ping,
        _ => Event::Other(name),
    }
}

pub(crate) fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// A push, as Capstan reads it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Push {
    /// `refs/heads/main`
    pub(crate) git_ref: String,
    /// The pushed commit; all zeros when the ref was deleted.
    pub(crate) after: String,
    pub(crate) deleted: bool,
    /// Every URL the payload gives for the repository.
    pub(crate) urls: Vec<String>,
}

impl Push {
    /// `main` for `refs/heads/main`; None for tags and other refs.
    pub(crate) fn branch(&self) -> Option<&str> {
        self.git_ref.strip_prefix("refs/heads/")
    }
}

#[derive(Deserialize)]
struct GithubPush {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: GithubRepo,
}

#[derive(Deserialize)]
struct GithubRepo {
    clone_url: Option<String>,
    ssh_url: Option<String>,
    git_url: Option<String>,
    html_url: Option<String>,
}

#[derive(Deserialize)]
struct GitlabPush {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    checkout_sha: Option<String>,
    project: GitlabProject,
}

#[derive(Deserialize)]
struct GitlabProject {
    git_http_url: Option<String>,
    git_ssh_url: Option<String>,
    web_url: Option<String>,
}

fn is_zero(sha: &str) -> bool {
    !sha.is_empty() && sha.bytes().all(|b| b == b'0')
}

/// The push in `body`, or what is wrong with it (for a 400).
pub(crate) fn parse(forge: Forge, body: &[u8]) -> Result<Push, String> {
    let bad =
        |e: serde_json::Error| format!("the body is not a {} push event: {e}", forge.as_str());
    let push = match forge {
        Forge::Github | Forge::Gitea => {
            let p: GithubPush = serde_json::from_slice(body).map_err(bad)?;
            let r = p.repository;
            Push {
                deleted: p.deleted || is_zero(&p.after),
                git_ref: p.git_ref,
                after: p.after,
                urls: [r.clone_url, r.ssh_url, r.git_url, r.html_url]
                    .into_iter()
                    .flatten()
                    .collect(),
            }
        }
        Forge::Gitlab => {
            let p: GitlabPush = serde_json::from_slice(body).map_err(bad)?;
            let r = p.project;
            Push {
                deleted: p.checkout_sha.is_none() || is_zero(&p.after),
                git_ref: p.git_ref,
                after: p.after,
                urls: [r.git_http_url, r.git_ssh_url, r.web_url]
                    .into_iter()
                    .flatten()
                    .collect(),
            }
        }
    };
    let full_sha = push.after.len() == 40 && push.after.bytes().all(|b| b.is_ascii_hexdigit());
    if !full_sha {
        return Err(format!(
            "`after` is `{}`, not a 40-digit commit SHA",
            push.after.escape_debug()
        ));
    }
    capstan_proto::source::check_rev(&push.git_ref)
        .map_err(|e| format!("`ref`: {}", e.replace("--rev ", "")))?;
    Ok(push)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c";

    #[test]
    fn github_gitea_and_gitlab_pushes() {
        let gh = format!(
            r#"{{"ref":"refs/heads/main","before":"{z}","after":"{SHA}","created":false,"deleted":false,
            "repository":{{"full_name":"o/r","clone_url":"https://github.com/o/r.git","ssh_url":"git@github.com:o/r.git","git_url":"git://github.com/o/r.git","html_url":"https://github.com/o/r"}},
            "pusher":{{"name":"o"}},"head_commit":{{"id":"{SHA}"}}}}"#,
            z = "0".repeat(40)
        );
        let p = parse(Forge::Github, gh.as_bytes()).unwrap();
        assert_eq!(p.branch(), Some("main"));
        assert_eq!(p.after, SHA);
        assert!(!p.deleted);
        assert_eq!(p.urls.len(), 4);
        let gl = format!(
            r#"{{"object_kind":"push","ref":"refs/heads/dev","before":"{SHA}","after":"{SHA}","checkout_sha":"{SHA}",
            "project":{{"id":15,"path_with_namespace":"g/p","git_http_url":"https://gitlab.example.com/g/p.git","git_ssh_url":"git@gitlab.example.com:g/p.git","web_url":"https://gitlab.example.com/g/p"}}}}"#
        );
        let p = parse(Forge::Gitlab, gl.as_bytes()).unwrap();
        assert_eq!(p.branch(), Some("dev"));
        let deleted = format!(
            r#"{{"ref":"refs/heads/old","after":"{}","deleted":true,"repository":{{"clone_url":"x"}}}}"#,
            "0".repeat(40)
        );
        assert!(parse(Forge::Gitea, deleted.as_bytes()).unwrap().deleted);
        let tag = format!(r#"{{"ref":"refs/tags/v1","after":"{SHA}","repository":{{}}}}"#);
        assert_eq!(parse(Forge::Github, tag.as_bytes()).unwrap().branch(), None);
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        let err = parse(Forge::Github, b"{not json").unwrap_err();
        assert!(err.contains("not a github push event"), "{err}");
        let err = parse(
            Forge::Gitea,
            br#"{"ref":"refs/heads/main","after":"abc","repository":{}}"#,
        )
        .unwrap_err();
        assert!(err.contains("not a 40-digit commit SHA"), "{err}");
        let bad_ref = format!(r#"{{"ref":"main;rm -rf","after":"{SHA}","repository":{{}}}}"#);
        assert!(parse(Forge::Github, bad_ref.as_bytes()).is_err());
    }
}
