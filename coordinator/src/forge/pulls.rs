//! Pull requests (merge requests on GitLab) for a runner's `git-push` step
//! in pull-request mode. The step pushed `head`; the coordinator, which
//! holds the repository's forge token, asks for an open pull request from
//! `head` and opens one into `base` only when there is none. Asking first is
//! what makes a rerun of the same commit (same branch) open nothing new; a
//! create refused because one already exists (another attempt won the race)
//! asks again.
//!
//! Doors: `repos` (the registration and its sealed token), `client` (the
//! HTTP exchange); the runner API (`api::pulls`) calls [`open`].

use super::client::{Answer, get_json, post_json, snippet};
use super::repos::{RepoError, RepoRecord};
use super::{Forge, Forges};

/// Open pull requests read when looking for one from `head` on Gitea,
/// whose list cannot filter by branch.
const GITEA_PAGE: usize = 50;

/// What the step asks for.
#[derive(Clone, Debug)]
pub(crate) struct Ask {
    /// The repository's URL, without user info.
    pub(crate) repo: String,
    pub(crate) head: String,
    pub(crate) base: String,
    pub(crate) title: String,
    pub(crate) body: String,
}

/// The pull request the step gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Opened {
    pub(crate) url: String,
    /// False: it was already open.
    pub(crate) created: bool,
    pub(crate) forge: Forge,
}

/// Why no pull request; each says what to do.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PullError {
    #[error(
        "no repository with a forge is registered for {0}: register it with `capstan repo add \
         --forge ... --api-url ... --status-token ...` to have pull requests opened"
    )]
    NoForge(String),
    #[error(
        "repository `{0}` has no --status-token: the coordinator cannot open pull requests \
         without a forge token (remove it and add it again with --status-token)"
    )]
    NoToken(String),
    #[error(
        "the forge refused to {what} a pull request for `{repo}` (HTTP {code}: {body}); check \
         the repository's --status-token (it needs write access to pull requests) and --api-url"
    )]
    Refused {
        what: &'static str,
        repo: String,
        code: u16,
        body: String,
    },
    #[error("the forge of `{repo}` did not answer ({why}); the branch is pushed: retry the task")]
    Failed { repo: String, why: String },
    #[error("the forge's answer about `{repo}`'s pull requests is not what its API returns: {why}")]
    Unreadable { repo: String, why: String },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl PullError {
    /// The `capstan_pull_requests_total` result this error counts as, if it
    /// got as far as the forge.
    fn result(&self) -> Option<&'static str> {
        match self {
            PullError::Refused { .. } => Some("refused"),
            PullError::Failed { .. } | PullError::Unreadable { .. } => Some("failed"),
            _ => None,
        }
    }
}

/// Finds the open pull request from `ask.head` into `ask.base` of the
/// registered repository at `ask.repo`, or opens it.
pub(crate) async fn open(forges: &Forges, ask: &Ask) -> Result<Opened, PullError> {
    let repo = forges
        .repos
        .by_url(std::slice::from_ref(&ask.repo))
        .await?
        .into_iter()
        .find(|r| r.forge.is_some())
        .ok_or_else(|| PullError::NoForge(ask.repo.clone()))?;
    let forge = repo.forge.expect("found with a forge");
    if repo.sealed_status_token.is_empty() {
        return Err(PullError::NoToken(repo.name.clone()));
    }
    let token = forges.repos.secrets(&repo)?.status_token;
    let result = find_or_create(&repo, forge, &token, ask).await;
    match &result {
        Ok(o) => {
            forges
                .metrics
                .pull_request(if o.created { "opened" } else { "existing" });
            tracing::info!(repo = %repo.name, head = %ask.head, base = %ask.base, url = %o.url,
                created = o.created, "pull request for a git-push");
        }
        Err(e) => {
            if let Some(r) = e.result() {
                forges.metrics.pull_request(r);
            }
            tracing::warn!(repo = %repo.name, head = %ask.head, error = %e, "no pull request");
        }
    }
    result
}

async fn find_or_create(
    repo: &RepoRecord,
    forge: Forge,
    token: &str,
    ask: &Ask,
) -> Result<Opened, PullError> {
    if let Some(url) = find(repo, forge, token, ask).await? {
        return Ok(Opened {
            url,
            created: false,
            forge,
        });
    }
    let (url, body) = create_request(repo, forge, ask);
    match post_json(&url, &forge.auth(token), body).await {
        Answer::Status(code, body) if (200..300).contains(&code) => Ok(Opened {
            url: web_url(repo, forge, &parse(repo, &body)?)?,
            created: true,
            forge,
        }),
        // GitHub answers 422, Gitea and GitLab 409, when one is already
        // open: another attempt opened it since we looked.
        Answer::Status(code @ (409 | 422), body) => match find(repo, forge, token, ask).await? {
            Some(url) => Ok(Opened {
                url,
                created: false,
                forge,
            }),
            None => Err(refused(repo, "open", code, &body)),
        },
        answer => Err(failure(repo, "open", answer)),
    }
}

/// The open pull request from `ask.head` into `ask.base`, if there is one.
async fn find(
    repo: &RepoRecord,
    forge: Forge,
    token: &str,
    ask: &Ask,
) -> Result<Option<String>, PullError> {
    let url = find_request(repo, forge, ask);
    let body = match get_json(&url, &forge.auth(token)).await {
        Answer::Status(code, body) if (200..300).contains(&code) => body,
        answer => return Err(failure(repo, "look for", answer)),
    };
    let list = parse(repo, &body)?;
    let Some(items) = list.as_array() else {
        return Err(unreadable(repo, "not a list"));
    };
    ours(forge, items, ask)
        .map(|pr| web_url(repo, forge, pr))
        .transpose()
}

/// The pull request of `items` from `ask.head` into `ask.base` of the
/// repository itself: a fork's from a branch of the same name (the SHA is
/// public) is not ours.
fn ours<'a>(
    forge: Forge,
    items: &'a [serde_json::Value],
    ask: &Ask,
) -> Option<&'a serde_json::Value> {
    let (head_key, base_key, [from, to]) = match forge {
        Forge::Gitlab => (
            "/source_branch",
            "/target_branch",
            ["/source_project_id", "/target_project_id"],
        ),
        Forge::Github | Forge::Gitea => (
            "/head/ref",
            "/base/ref",
            ["/head/repo/full_name", "/base/repo/full_name"],
        ),
    };
    let text = |pr: &serde_json::Value, key: &str| {
        pr.pointer(key).and_then(|v| v.as_str()).map(str::to_owned)
    };
    items.iter().find(|pr| {
        text(pr, head_key).as_deref() == Some(ask.head.as_str())
            && text(pr, base_key).as_deref() == Some(ask.base.as_str())
            && pr.pointer(from).is_some()
            && pr.pointer(from) == pr.pointer(to)
    })
}

/// The GET that lists the open pull requests from `ask.head` (all open ones
/// on Gitea, filtered by [`find`]).
fn find_request(repo: &RepoRecord, forge: Forge, ask: &Ask) -> String {
    let root = repo.api_root(forge);
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    match forge {
        Forge::Github => {
            let owner = repo.forge_path();
            let owner = owner.split('/').next().unwrap_or_default();
            query
                .append_pair("state", "open")
                .append_pair("head", &format!("{owner}:{}", ask.head))
                .append_pair("base", &ask.base);
            format!("{root}/pulls?{}", query.finish())
        }
        Forge::Gitea => {
            query
                .append_pair("state", "open")
                .append_pair("limit", &GITEA_PAGE.to_string());
            format!("{root}/pulls?{}", query.finish())
        }
        Forge::Gitlab => {
            query
                .append_pair("state", "opened")
                .append_pair("source_branch", &ask.head)
                .append_pair("target_branch", &ask.base);
            format!("{root}/merge_requests?{}", query.finish())
        }
    }
}

/// The POST that opens the pull request: URL and JSON body.
fn create_request(repo: &RepoRecord, forge: Forge, ask: &Ask) -> (String, String) {
    let root = repo.api_root(forge);
    match forge {
        Forge::Github | Forge::Gitea => (
            format!("{root}/pulls"),
            serde_json::json!({"title": ask.title, "head": ask.head, "base": ask.base,
                "body": ask.body})
            .to_string(),
        ),
        Forge::Gitlab => (
            format!("{root}/merge_requests"),
            serde_json::json!({"title": ask.title, "source_branch": ask.head,
                "target_branch": ask.base, "description": ask.body,
                "remove_source_branch": true})
            .to_string(),
        ),
    }
}

/// Where a person sees `pr`.
fn web_url(repo: &RepoRecord, forge: Forge, pr: &serde_json::Value) -> Result<String, PullError> {
    let key = match forge {
        Forge::Gitlab => "web_url",
        Forge::Github | Forge::Gitea => "html_url",
    };
    pr.get(key)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| unreadable(repo, &format!("a pull request without `{key}`")))
}

fn parse(repo: &RepoRecord, body: &str) -> Result<serde_json::Value, PullError> {
    serde_json::from_str(body).map_err(|e| unreadable(repo, &e.to_string()))
}

fn unreadable(repo: &RepoRecord, why: &str) -> PullError {
    PullError::Unreadable {
        repo: repo.name.clone(),
        why: why.to_owned(),
    }
}

fn refused(repo: &RepoRecord, what: &'static str, code: u16, body: &str) -> PullError {
    PullError::Refused {
        what,
        repo: repo.name.clone(),
        code,
        body: snippet(body),
    }
}

/// A forge's answer that is not a success: refused (4xx) or failed.
fn failure(repo: &RepoRecord, what: &'static str, answer: Answer) -> PullError {
    match answer {
        Answer::Status(code, body) if code != 429 && code < 500 => refused(repo, what, code, &body),
        Answer::Status(code, body) => PullError::Failed {
            repo: repo.name.clone(),
            why: format!("HTTP {code}: {}", snippet(&body)),
        },
        Answer::Failed(why) => PullError::Failed {
            repo: repo.name.clone(),
            why,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(forge: Forge) -> RepoRecord {
        RepoRecord {
            name: "app".into(),
            url: "https://forge.example/acme/app.git".into(),
            pipeline: ".capstan.yaml".into(),
            branches: vec![],
            forge: Some(forge),
            api_url: "https://api.example".into(),
            schedules: vec![],
            created_at_ms: 0,
            sealed_webhook_secret: String::new(),
            sealed_status_token: String::new(),
            sealed_fetch_login: String::new(),
        }
    }

    fn ask() -> Ask {
        Ask {
            repo: "https://forge.example/acme/app".into(),
            head: "capstan/deploy/abc".into(),
            base: "main".into(),
            title: "deploy abc".into(),
            body: "by run r1".into(),
        }
    }

    #[test]
    fn each_forge_is_asked_for_the_branch_then_sent_its_own_create() {
        let gh = find_request(&repo(Forge::Github), Forge::Github, &ask());
        assert_eq!(
            gh,
            "https://api.example/repos/acme/app/pulls?state=open&head=acme%3Acapstan%2Fdeploy%2Fabc&base=main"
        );
        let gl = find_request(&repo(Forge::Gitlab), Forge::Gitlab, &ask());
        assert_eq!(
            gl,
            "https://api.example/api/v4/projects/acme%2Fapp/merge_requests?state=opened&source_branch=capstan%2Fdeploy%2Fabc&target_branch=main"
        );
        let gt = find_request(&repo(Forge::Gitea), Forge::Gitea, &ask());
        assert_eq!(
            gt,
            "https://api.example/api/v1/repos/acme/app/pulls?state=open&limit=50"
        );
        let (url, body) = create_request(&repo(Forge::Gitlab), Forge::Gitlab, &ask());
        assert_eq!(
            url,
            "https://api.example/api/v4/projects/acme%2Fapp/merge_requests"
        );
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["source_branch"], "capstan/deploy/abc");
        assert_eq!(body["target_branch"], "main");
        assert_eq!(body["description"], "by run r1");
        let (url, body) = create_request(&repo(Forge::Gitea), Forge::Gitea, &ask());
        assert_eq!(url, "https://api.example/api/v1/repos/acme/app/pulls");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (body["head"].as_str(), body["base"].as_str()),
            (Some("capstan/deploy/abc"), Some("main"))
        );
    }

    #[test]
    fn a_forks_pull_request_from_a_branch_of_the_same_name_is_not_ours() {
        let a = ask();
        let gh = |url: &str, from: &str, base: &str| {
            serde_json::json!({"html_url": url,
            "head": {"ref": "capstan/deploy/abc", "repo": {"full_name": from}},
            "base": {"ref": base, "repo": {"full_name": "acme/app"}}})
        };
        let items = [
            gh("fork", "mallory/app", "main"),
            gh("release", "acme/app", "release"),
            gh("ours", "acme/app", "main"),
        ];
        assert_eq!(
            ours(Forge::Github, &items, &a).map(|p| &p["html_url"]),
            Some(&"ours".into())
        );
        assert!(ours(Forge::Gitea, &items[..2], &a).is_none());
        let gl = |url: &str, from: u64| {
            serde_json::json!({"web_url": url, "source_branch": "capstan/deploy/abc",
            "target_branch": "main", "source_project_id": from, "target_project_id": 7})
        };
        let items = [gl("fork", 8), gl("ours", 7)];
        assert_eq!(
            ours(Forge::Gitlab, &items, &a).map(|p| &p["web_url"]),
            Some(&"ours".into())
        );
        assert!(ours(Forge::Gitlab, &items[..1], &a).is_none());
    }

    #[test]
    fn web_urls_and_unreadable_answers() {
        let pr = serde_json::json!({"html_url": "https://f/pull/1", "web_url": "https://f/mr/1"});
        let r = repo(Forge::Github);
        assert_eq!(web_url(&r, Forge::Github, &pr).unwrap(), "https://f/pull/1");
        assert_eq!(web_url(&r, Forge::Gitlab, &pr).unwrap(), "https://f/mr/1");
        let e = web_url(&r, Forge::Gitea, &serde_json::json!({})).unwrap_err();
        assert!(e.to_string().contains("html_url"), "{e}");
        let e = parse(&repo(Forge::Github), "<html>").unwrap_err();
        assert!(e.to_string().contains("`app`"), "{e}");
    }

    #[test]
    fn a_4xx_is_refused_and_a_5xx_or_silence_failed() {
        let r = repo(Forge::Github);
        let e = failure(&r, "open", Answer::Status(401, "bad creds".into()));
        assert!(matches!(e, PullError::Refused { code: 401, .. }), "{e}");
        assert!(e.to_string().contains("--status-token"), "{e}");
        let e = failure(&r, "open", Answer::Status(502, String::new()));
        assert!(matches!(e, PullError::Failed { .. }), "{e}");
        let e = failure(&r, "open", Answer::Status(429, String::new()));
        assert!(matches!(e, PullError::Failed { .. }), "{e}");
        let e = failure(&r, "open", Answer::Failed("connect refused".into()));
        assert!(e.to_string().contains("retry the task"), "{e}");
    }
}
