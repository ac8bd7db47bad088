//! The dashboard's calls into the API: the very handlers gRPC clients reach
//! (`api::pipeline`, `api::cluster`), called in-process with the viewer's
//! token, so a page is authorized, audited and answered exactly as the
//! CLI's call would be.

use crate::api::Shared;
use crate::api::auth::{Caller, Delegated};
use crate::api::cluster::ClusterApi;
use crate::api::pipeline::PipelineApi;
use capstan_proto::api::v1::pipeline_service_server::PipelineService;
use capstan_proto::api::v1::*;
use capstan_proto::cluster::v1::cluster_service_server::ClusterService;
use capstan_proto::cluster::v1::{
    AskLeaderRequest, AskLeaderResponse, ListMembersRequest, ListMembersResponse,
};
use futures::Stream;
use tonic::{Request, Status};

/// The API as one viewer.
pub(crate) struct Api<'a> {
    shared: &'a Shared,
    caller: &'a Caller,
}

impl<'a> Api<'a> {
    pub(crate) fn new(shared: &'a Shared, caller: &'a Caller) -> Self {
        Self { shared, caller }
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.extensions_mut().insert(Delegated(self.caller.clone()));
        req
    }

    fn pipeline(&self) -> PipelineApi {
        PipelineApi(self.shared.clone())
    }

    pub(crate) async fn run(&self, id: &str) -> Result<Run, Status> {
        let req = self.req(GetRunRequest {
            run_id: id.to_string(),
        });
        Ok(self.pipeline().get_run(req).await?.into_inner())
    }

    pub(crate) async fn runs(&self, query: ListRunsRequest) -> Result<ListRunsResponse, Status> {
        Ok(self
            .pipeline()
            .list_runs(self.req(query))
            .await?
            .into_inner())
    }

    pub(crate) async fn cancel(&self, id: &str) -> Result<Run, Status> {
        let req = self.req(CancelRunRequest {
            run_id: id.to_string(),
        });
        Ok(self.pipeline().cancel_run(req).await?.into_inner())
    }

    /// Approves or rejects the approval gate of `task`.
    pub(crate) async fn decide(
        &self,
        id: &str,
        task: &str,
        approve: bool,
        reason: &str,
    ) -> Result<Run, Status> {
        let req = self.req(DecideApprovalRequest {
            run_id: id.to_string(),
            task: task.to_string(),
            approve,
            reason: reason.to_string(),
        });
        Ok(self.pipeline().decide_approval(req).await?.into_inner())
    }

    /// The run now, then after every change, until it ends.
    pub(crate) async fn watch(
        &self,
        id: &str,
    ) -> Result<impl Stream<Item = Result<RunEvent, Status>> + use<>, Status> {
        let req = self.req(WatchRunRequest {
            run_id: id.to_string(),
        });
        Ok(self.pipeline().watch_run(req).await?.into_inner())
    }

    pub(crate) async fn runners(&self) -> Result<Vec<Runner>, Status> {
        let req = self.req(ListRunnersRequest {});
        Ok(self
            .pipeline()
            .list_runners(req)
            .await?
            .into_inner()
            .runners)
    }

    pub(crate) async fn drain(&self, runner: &str) -> Result<(), Status> {
        let req = self.req(DrainRunnerRequest {
            runner: runner.to_string(),
        });
        self.pipeline().drain_runner(req).await.map(|_| ())
    }

    pub(crate) async fn resume(&self, runner: &str) -> Result<(), Status> {
        let req = self.req(ResumeRunnerRequest {
            runner: runner.to_string(),
        });
        self.pipeline().resume_runner(req).await.map(|_| ())
    }

    pub(crate) async fn cluster(&self) -> Result<(AskLeaderResponse, ListMembersResponse), Status> {
        let api = ClusterApi(self.shared.clone());
        let leader = api.ask_leader(self.req(AskLeaderRequest {})).await?;
        let members = api.list_members(self.req(ListMembersRequest {})).await?;
        Ok((leader.into_inner(), members.into_inner()))
    }
}
