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
        if !r.head.starts_with(BRANCH_PREFIX) || r.base.is_empty() || r.repo.is_empty() {
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
            Err(e @ PullError::Failed { .. }) => Err(Status::unavailable(e.to_string())),
            Err(e) => Err(Status::failed_precondition(e.to_string())),
        }
    }
}
