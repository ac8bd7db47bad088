//! ClusterService for a standalone coordinator: it is always the leader and
//! the only member.

use super::Shared;
use capstan_shared::proto::cluster::v1::*;
use tonic::{Request, Response, Status};

pub struct ClusterApi(pub Shared);

#[tonic::async_trait]
impl cluster_service_server::ClusterService for ClusterApi {
    async fn ask_leader(
        &self,
        _: Request<AskLeaderRequest>,
    ) -> Result<Response<AskLeaderResponse>, Status> {
        Ok(Response::new(AskLeaderResponse {
            leader: self.0.advertise.to_string(),
            epoch: self.0.epoch,
            is_leader: true,
        }))
    }

    async fn list_members(
        &self,
        _: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        Ok(Response::new(ListMembersResponse {
            members: vec![Member {
                endpoint: self.0.advertise.to_string(),
                is_leader: true,
            }],
            leader: self.0.advertise.to_string(),
            epoch: self.0.epoch,
        }))
    }
}
