//! ForgeService: what a runner asks of the forges the coordinator knows.
//! Only the runner that holds a live attempt may ask for it (the check of
//! its log writes), and only for a `capstan/` branch, so a runner's
//! credential opens no pull request of a person's branch.

use super::Shared;
use super::runner::{authorize, identity};
use crate::forge::Forges;
use crate::forge::pulls::{self, Ask, PullError};
use capstan_proto::ids::AttemptId;
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
        authorize(&leader, (r.runner_id, r.runner_secret), identity, &attempt).await?;
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
    use super::asks_for_ours;

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
