//! The RepoService calls of [`Client`] (an admin token is needed for each).

use crate::{Client, ClientError};
use capstan_proto::api::v1::repo_service_client::RepoServiceClient;
use capstan_proto::api::v1::{
    AddRepoRequest, AddRepoResponse, ListReposRequest, RemoveRepoRequest, RepoInfo,
};

impl Client {
    /// Registers a repository; the answer holds its webhook secret, shown this once.
    pub async fn add_repo(&self, request: AddRepoRequest) -> Result<AddRepoResponse, ClientError> {
        self.unary(request, |ch, req| async move {
            RepoServiceClient::new(ch).add_repo(req).await
        })
        .await
    }

    /// Every repository, without secrets.
    pub async fn list_repos(&self) -> Result<Vec<RepoInfo>, ClientError> {
        let response = self
            .unary(ListReposRequest {}, |ch, req| async move {
                RepoServiceClient::new(ch).list_repos(req).await
            })
            .await?;
        Ok(response.repos)
    }

    /// Forgets the repository named `name`.
    pub async fn remove_repo(&self, name: &str) -> Result<RepoInfo, ClientError> {
        let request = RemoveRepoRequest {
            name: name.to_string(),
        };
        let response = self
            .unary(request, |ch, req| async move {
                RepoServiceClient::new(ch).remove_repo(req).await
            })
            .await?;
        Ok(response.info.unwrap_or_default())
    }
}
