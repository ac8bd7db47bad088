//! The TokenService calls of [`Client`] (an admin token is needed for each).

use crate::{Client, ClientError};
use capstan_proto::api::v1::token_service_client::TokenServiceClient;
use capstan_proto::api::v1::{
    CreateRunnerTokenRequest, CreateRunnerTokenResponse, CreateTokenRequest, CreateTokenResponse,
    ListTokensRequest, RevokeTokenRequest, TokenInfo, TokenScope,
};
use std::time::Duration;

impl Client {
    /// Makes a token; the answer holds its secret, shown this once.
    pub async fn create_token(
        &self,
        name: &str,
        scope: TokenScope,
        expires_in: Option<Duration>,
    ) -> Result<CreateTokenResponse, ClientError> {
        let request = CreateTokenRequest {
            name: name.to_string(),
            scope: scope.into(),
            expires_in_secs: expires_in.map_or(0, |d| d.as_secs().max(1)),
        };
        self.unary(request, |ch, req| async move {
            TokenServiceClient::new(ch).create_token(req).await
        })
        .await
    }

    /// Makes a single-use registration token for one ephemeral runner with
    /// `labels`, valid for `ttl`; the answer holds it, shown this once.
    pub async fn create_runner_token(
        &self,
        labels: std::collections::HashMap<String, String>,
        ttl: Duration,
    ) -> Result<CreateRunnerTokenResponse, ClientError> {
        let request = CreateRunnerTokenRequest {
            labels,
            expires_in_secs: ttl.as_secs().max(1),
            ephemeral: true,
        };
        self.unary(request, |ch, req| async move {
            TokenServiceClient::new(ch).create_runner_token(req).await
        })
        .await
    }

    /// Every live token, without secrets.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        let response = self
            .unary(ListTokensRequest {}, |ch, req| async move {
                TokenServiceClient::new(ch).list_tokens(req).await
            })
            .await?;
        Ok(response.tokens)
    }

    /// Revokes the token named `name`.
    pub async fn revoke_token(&self, name: &str) -> Result<TokenInfo, ClientError> {
        let request = RevokeTokenRequest {
            name: name.to_string(),
        };
        let response = self
            .unary(request, |ch, req| async move {
                TokenServiceClient::new(ch).revoke_token(req).await
            })
            .await?;
        Ok(response.info.unwrap_or_default())
    }
}
