//! ClusterService: every replica answers it, leader or not.

use super::Shared;
use crate::tokens::Scope;
use capstan_proto::cluster::v1::*;
use tonic::{Request, Response, Status};

pub(crate) struct ClusterApi(pub Shared);

impl ClusterApi {
    async fn leader_info(&self) -> Result<crate::election::LeaderInfo, Status> {
        self.0
            .election
            .leader()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }
}

#[tonic::async_trait]
impl cluster_service_server::ClusterService for ClusterApi {
    async fn ask_leader(
        &self,
        req: Request<AskLeaderRequest>,
    ) -> Result<Response<AskLeaderResponse>, Status> {
        self.0.authorize(&req, Scope::Read).await?;
        let info = self.leader_info().await?;
        let is_leader = matches!(&*self.0.role.borrow(), super::Role::Leader(_));
        Ok(Response::new(AskLeaderResponse {
            leader: info.endpoint,
            epoch: info.epoch,
            is_leader,
        }))
    }

    async fn list_members(
        &self,
        req: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        self.0.authorize(&req, Scope::Read).await?;
        let info = self.leader_info().await?;
        let members = self
            .0
            .election
            .members()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ListMembersResponse {
            members: members
                .into_iter()
                .map(|endpoint| Member {
                    is_leader: endpoint == info.endpoint,
                    endpoint,
                })
                .collect(),
            leader: info.endpoint,
            epoch: info.epoch,
        }))
    }
}
