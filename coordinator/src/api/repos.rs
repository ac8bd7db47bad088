//! RepoService: add, list and remove the repositories whose pushes start
//! runs (admin scope), on the leader only, as the token calls are.

use super::Shared;
use super::auth::Caller;
use crate::forge::repos::{NewRepo, RepoError, RepoRecord};
use crate::forge::{Forge, Forges};
use crate::model::now_ms;
use crate::tokens::Scope;
use capstan_proto::api::v1 as pb;
use capstan_proto::api::v1::repo_service_server::RepoService;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub(crate) struct RepoApi {
    pub(crate) shared: Shared,
    pub(crate) forges: Arc<Forges>,
}

fn to_proto(f: Option<Forge>) -> pb::Forge {
    match f {
        None => pb::Forge::Unspecified,
        Some(Forge::Github) => pb::Forge::Github,
        Some(Forge::Gitea) => pb::Forge::Gitea,
        Some(Forge::Gitlab) => pb::Forge::Gitlab,
    }
}

fn info(r: &RepoRecord) -> pb::RepoInfo {
    pb::RepoInfo {
        name: r.name.clone(),
        url: r.url.clone(),
        pipeline: r.pipeline.clone(),
        branches: r.branches.clone(),
        forge: to_proto(r.forge).into(),
        api_url: r.api_url.clone(),
        has_status_token: !r.sealed_status_token.is_empty(),
        schedules: r.schedules.clone(),
        created_at_ms: r.created_at_ms,
    }
}

fn status(e: RepoError) -> Status {
    match e {
        RepoError::BadName(_) | RepoError::Invalid(_) => Status::invalid_argument(e.to_string()),
        RepoError::Exists(_) => Status::already_exists(e.to_string()),
        RepoError::Unknown(_) => Status::not_found(e.to_string()),
        RepoError::Store(crate::store::StoreError::Fenced) => Status::unavailable(e.to_string()),
        RepoError::Seal(_) => Status::failed_precondition(e.to_string()),
        RepoError::Store(_) | RepoError::Corrupt { .. } => {
            tracing::error!(error = %e, "repository store failure");
            Status::internal("the coordinator could not access its repositories; see its log")
        }
    }
}

impl RepoApi {
    async fn admin<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let caller = self.shared.authorize(req, Scope::Admin).await?;
        self.shared.leader().await?;
        Ok(caller)
    }
}

#[tonic::async_trait]
impl RepoService for RepoApi {
    async fn add_repo(
        &self,
        req: Request<pb::AddRepoRequest>,
    ) -> Result<Response<pb::AddRepoResponse>, Status> {
        let caller = self.admin(&req).await?;
        let r = req.into_inner();
        let forge = match pb::Forge::try_from(r.forge) {
            Ok(pb::Forge::Unspecified) => None,
            Ok(pb::Forge::Github) => Some(Forge::Github),
            Ok(pb::Forge::Gitea) => Some(Forge::Gitea),
            Ok(pb::Forge::Gitlab) => Some(Forge::Gitlab),
            Err(_) => {
                return Err(Status::invalid_argument(
                    "forge: use github, gitea or gitlab",
                ));
            }
        };
        let new = NewRepo {
            name: r.name,
            url: r.url,
            pipeline: r.pipeline,
            branches: r.branches,
            forge,
            api_url: r.api_url,
            status_token: r.status_token,
            schedules: r.schedules,
        };
        let (secret, record) = self.forges.repos.add(new, now_ms()).await.map_err(status)?;
        tracing::info!(target: "audit", token = %caller.name, action = "repo add",
            name = %record.name, url = %record.url, "repository added");
        Ok(Response::new(pb::AddRepoResponse {
            webhook_secret: secret,
            info: Some(info(&record)),
        }))
    }

    async fn list_repos(
        &self,
        req: Request<pb::ListReposRequest>,
    ) -> Result<Response<pb::ListReposResponse>, Status> {
        self.admin(&req).await?;
        let repos = self.forges.repos.list().await.map_err(status)?;
        Ok(Response::new(pb::ListReposResponse {
            repos: repos.iter().map(info).collect(),
        }))
    }

    async fn remove_repo(
        &self,
        req: Request<pb::RemoveRepoRequest>,
    ) -> Result<Response<pb::RemoveRepoResponse>, Status> {
        let caller = self.admin(&req).await?;
        let name = req.into_inner().name;
        let record = self.forges.repos.remove(&name).await.map_err(status)?;
        tracing::info!(target: "audit", token = %caller.name, action = "repo remove",
            name = %record.name, "repository removed");
        Ok(Response::new(pb::RemoveRepoResponse {
            info: Some(info(&record)),
        }))
    }
}
