//! The pull request of a `git-push` step in pull-request mode, asked of the
//! coordinator (`ForgeService.OpenPullRequest`): the forge's token is in
//! the repository's registration there and never reaches a runner.
//!
//! Doors: [`crate::logs::LogTarget`] (the connection to the leader and the
//! runner's credential) for [`Coordinator`]; the step calls
//! [`PullRequests::open`].

use std::time::Duration;

use capstan_proto::ids::AttemptId;
use capstan_proto::runner::v1::OpenPullRequestRequest;
use tokio::sync::watch;

use crate::logs::LogTarget;

/// Every pull request branch starts here; the coordinator opens none other.
pub(crate) const BRANCH_PREFIX: &str = "capstan/";

/// Tries of a call the leader did not answer: 1 s apart, longer than a
/// failover with the default flags takes (the step's deadline still holds).
const TRIES: u32 = 30;
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// One call: the coordinator's two forge requests at their 10 s bound each.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What the step asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ask {
    /// The repository's URL, without user info.
    pub(crate) repo: String,
    pub(crate) head: String,
    pub(crate) base: String,
    pub(crate) title: String,
    pub(crate) body: String,
}

/// The pull request the step got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Opened {
    pub(crate) url: String,
    /// False: it was already open (a rerun).
    pub(crate) created: bool,
}

/// Opens pull requests for the `git-push` step.
///
/// Contract: `Ok(Some)` is the open pull request from `ask.head` into
/// `ask.base` (found or created; asking twice never opens two); `Ok(None)`
/// means no forge is known for `ask.repo`, so the step only pushes the
/// branch; `Err` is a message for the step's failure that says what to do.
#[async_trait::async_trait]
pub(crate) trait PullRequests: Send + Sync + std::fmt::Debug {
    async fn open(&self, attempt: &AttemptId, ask: &Ask) -> Result<Option<Opened>, String>;
}

/// [`PullRequests`] through the leader the runner is connected to.
#[derive(Debug)]
pub(crate) struct Coordinator {
    pub(crate) target: watch::Receiver<Option<LogTarget>>,
}

#[async_trait::async_trait]
impl PullRequests for Coordinator {
    async fn open(&self, attempt: &AttemptId, ask: &Ask) -> Result<Option<Opened>, String> {
        let mut last = "not connected to a coordinator".to_owned();
        for _ in 0..TRIES {
            let Some(target) = self.target.borrow().clone() else {
                tokio::time::sleep(RETRY_DELAY).await;
                continue;
            };
            let request = OpenPullRequestRequest {
                runner_id: target.credentials.runner_id.to_string(),
                runner_secret: target.credentials.runner_secret.clone(),
                attempt_id: attempt.to_string(),
                repo: ask.repo.clone(),
                head: ask.head.clone(),
                base: ask.base.clone(),
                title: ask.title.clone(),
                body: ask.body.clone(),
            };
            let mut request = tonic::Request::new(request);
            request.set_timeout(CALL_TIMEOUT);
            match target.forge.clone().open_pull_request(request).await {
                Ok(r) => {
                    let r = r.into_inner();
                    return Ok(Some(Opened {
                        url: r.url,
                        created: r.created,
                    }));
                }
                Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) =>
                {
                    last = s.message().to_owned();
                    tokio::time::sleep(RETRY_DELAY).await;
                }
                Err(s) => return Err(format!("no pull request: {}", s.message())),
            }
        }
        Err(format!(
            "no pull request: the coordinator did not answer in {TRIES} tries ({last}); \
             the branch is pushed: retry the task"
        ))
    }
}

/// The pull request's title and body: the commit message's first line,
/// and the rest with where it came from.
pub(crate) fn title_and_body(message: &str, run: &str, task: &str) -> (String, String) {
    let mut lines = message.trim().splitn(2, '\n');
    let title = lines.next().unwrap_or_default().trim().to_owned();
    let rest = lines.next().unwrap_or_default().trim();
    let mut body = String::new();
    if !rest.is_empty() {
        body.push_str(rest);
        body.push_str("\n\n");
    }
    body.push_str(&format!("Opened by Capstan: run {run}, task {task}."));
    (title, body)
}

/// `url` without user info (what the coordinator matches registrations on,
/// and all that may leave the runner).
pub(crate) fn bare_url(url: &str) -> String {
    match url::Url::parse(url) {
        // ssh's user (`git@`) is part of the address, kept as registered.
        Ok(mut u)
            if u.scheme() != "ssh" && (!u.username().is_empty() || u.password().is_some()) =>
        {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_title_is_the_first_line_and_the_body_says_where_it_came_from() {
        let (t, b) = title_and_body("deploy abc\n\nbecause tests passed\n", "r1", "deploy");
        assert_eq!(t, "deploy abc");
        assert_eq!(
            b,
            "because tests passed\n\nOpened by Capstan: run r1, task deploy."
        );
        let (t, b) = title_and_body("one line", "r2", "t");
        assert_eq!(
            (t.as_str(), b.as_str()),
            ("one line", "Opened by Capstan: run r2, task t.")
        );
    }

    #[test]
    fn user_info_never_leaves_the_runner() {
        assert_eq!(
            bare_url("http://bot:s3cret@127.0.0.1:9418/app.git"),
            "http://127.0.0.1:9418/app.git"
        );
        assert_eq!(bare_url("git@host:acme/app.git"), "git@host:acme/app.git");
        assert_eq!(
            bare_url("ssh://git@host/acme/app"),
            "ssh://git@host/acme/app"
        );
        assert_eq!(bare_url("/srv/git/app"), "/srv/git/app");
    }
}
