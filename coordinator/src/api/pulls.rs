//! ForgeService: what a runner asks of the forges the coordinator knows.
//! Only the runner that holds a live attempt may ask for it (the check of
//! its log writes), only for a task with a pull-request `git-push`, only
//! from that pipeline's `capstan/<pipeline>/` branches and only in a
//! repository the task's `set-image` edits, so a runner's credential opens
//! no pull request of a person's branch or of another repository.

use super::Shared;
use super::runner::{attempt_task, identity};
use crate::forge::Forges;
use crate::forge::pulls::{self, Ask, PullError};
use crate::forge::repos::normalize;
use capstan_proto::ids::AttemptId;
use capstan_proto::pipeline::v1::{TaskSpec, step::Kind};
use capstan_proto::runner::v1::{
    OpenPullRequestRequest, OpenPullRequestResponse, forge_service_server::ForgeService,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The branches a runner may open pull requests from.
pub(crate) const BRANCH_PREFIX: &str = "capstan/";
/// Longest title and body passed on (GitHub refuses a title over 256).
const MAX_TITLE: usize = 256;
const MAX_BODY: usize = 16 * 1024;

pub(crate) struct ForgeApi {
    pub(crate) shared: Shared,
    pub(crate) forges: Arc<Forges>,
}

#[tonic::async_trait]
impl ForgeService for ForgeApi {
    async fn open_pull_request(
        &self,
        req: Request<OpenPullRequestRequest>,
    ) -> Result<Response<OpenPullRequestResponse>, Status> {
        let identity = identity(&self.shared, &req)?;
        let leader = self.shared.leader().await?;
        let r = req.into_inner();
        let attempt = AttemptId::from_string(r.attempt_id);
        let (spec, run_repo) =
            attempt_task(&leader, (r.runner_id, r.runner_secret), identity, &attempt).await?;
        if let Err(why) = task_may_ask(&spec, &run_repo, &r.repo, &r.head) {
            tracing::warn!(%attempt, repo = %r.repo, head = %r.head, %why, "pull request refused");
            return Err(Status::permission_denied(why));
        }
        if !asks_for_ours(&r.head, &r.base, &r.repo) {
            return Err(Status::invalid_argument(format!(
                "a pull request needs a repository, a base branch and a head branch under \
                 `{BRANCH_PREFIX}` (got head `{}`, base `{}`)",
                r.head, r.base
            )));
        }
        let ask = Ask {
            repo: r.repo,
            head: r.head,
            base: r.base,
            title: r.title.chars().take(MAX_TITLE).collect(),
            body: r.body.chars().take(MAX_BODY).collect(),
        };
        match pulls::open(&self.forges, &ask).await {
            Ok(o) => Ok(Response::new(OpenPullRequestResponse {
                url: o.url,
                created: o.created,
                forge: o.forge.as_str().to_owned(),
            })),
            Err(e @ PullError::NoForge(_)) => Err(Status::not_found(e.to_string())),
            Err(
                e @ (PullError::Failed { .. }
                | PullError::Repo(crate::forge::repos::RepoError::Store(_))),
            ) => Err(Status::unavailable(e.to_string())),
            Err(e) => Err(Status::failed_precondition(e.to_string())),
        }
    }
}

/// May the attempt of task `spec` (of a run of `run_repo`) ask for a pull
/// request from `head` in `repo`? Its `git-push` must be in pull-request
/// mode, `head` that pipeline's branch, and `repo` one its `set-image`
/// steps edit (an empty `repo` there: the run's own).
fn task_may_ask(spec: &TaskSpec, run_repo: &str, repo: &str, head: &str) -> Result<(), String> {
    let push = spec.steps.iter().find_map(|s| match &s.kind {
        Some(Kind::GitPush(g)) if g.mode == "pull-request" => Some(g),
        _ => None,
    });
    let Some(push) = push else {
        return Err(format!(
            "task `{}` has no `git-push` in pull-request mode",
            spec.name
        ));
    };
    let prefix = format!("{BRANCH_PREFIX}{}/", push.pipeline);
    if !head.starts_with(&prefix) {
        return Err(format!(
            "task `{}` opens pull requests from `{prefix}...` only",
            spec.name
        ));
    }
    let wanted = normalize(repo);
    let edits = spec.steps.iter().any(|s| match &s.kind {
        Some(Kind::SetImage(si)) => {
            normalize(if si.repo.is_empty() {
                run_repo
            } else {
                &si.repo
            }) == wanted
        }
        _ => false,
    });
    if !edits {
        return Err(format!("task `{}` edits no repository {repo}", spec.name));
    }
    Ok(())
}

/// A pull request a runner may ask for: from a `capstan/` branch into a
/// branch, both names git accepts, of a named repository.
fn asks_for_ours(head: &str, base: &str, repo: &str) -> bool {
    let branch = |b: &str| {
        !b.is_empty()
            && !b.contains("..")
            && !b.starts_with('-')
            && !b.ends_with('/')
            && b.chars()
                .all(|c| c.is_ascii_graphic() && !"~^:?*[\\".contains(c))
    };
    head.starts_with(BRANCH_PREFIX) && branch(head) && branch(base) && !repo.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::pipeline::v1::{GitPushStep, SetImageStep, Step};

    fn spec(set_image_repo: &str, mode: &str) -> TaskSpec {
        let step = |kind| Step {
            kind: Some(kind),
            ..Step::default()
        };
        TaskSpec {
            name: "deploy".into(),
            steps: vec![
                step(Kind::SetImage(SetImageStep {
                    repo: set_image_repo.into(),
                    ..SetImageStep::default()
                })),
                step(Kind::GitPush(GitPushStep {
                    mode: mode.into(),
                    pipeline: "promote".into(),
                    ..GitPushStep::default()
                })),
            ],
            ..TaskSpec::default()
        }
    }

    #[test]
    fn only_the_task_that_edits_a_repository_asks_for_its_pull_request() {
        let m = "https://git.example/acme/manifests";
        let head = "capstan/promote/deploy/abc";
        assert_eq!(
            task_may_ask(&spec(m, "pull-request"), "", &format!("{m}.git"), head),
            Ok(())
        );
        // `set-image` without `repo` edits the run's repository.
        let src = "https://bot:***@git.example/acme/app";
        assert_eq!(
            task_may_ask(
                &spec("", "pull-request"),
                src,
                "https://git.example/acme/app",
                head
            ),
            Ok(())
        );
        let other = task_may_ask(
            &spec(m, "pull-request"),
            "",
            "https://git.example/acme/other",
            head,
        );
        assert!(other.unwrap_err().contains("edits no repository"));
        let direct = task_may_ask(&spec(m, "direct"), "", m, head);
        assert!(
            direct
                .unwrap_err()
                .contains("no `git-push` in pull-request mode")
        );
        let foreign = task_may_ask(&spec(m, "pull-request"), "", m, "capstan/other/deploy/abc");
        assert!(
            foreign
                .unwrap_err()
                .contains("from `capstan/promote/...` only")
        );
    }

    #[test]
    fn only_capstan_branches_with_valid_names() {
        let repo = "https://git.example/acme/app";
        assert!(asks_for_ours("capstan/promote/deploy/abc", "main", repo));
        assert!(
            !asks_for_ours("feature/x", "main", repo),
            "a person's branch"
        );
        assert!(!asks_for_ours("capstan/a/../b", "main", repo));
        assert!(!asks_for_ours("capstan/a b", "main", repo));
        assert!(!asks_for_ours("capstan/x", "main:other", repo));
        assert!(!asks_for_ours("capstan/x", "", repo));
        assert!(!asks_for_ours("capstan/x", "main", ""));
    }
}
