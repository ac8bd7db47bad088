//! TokenService: create, list and revoke API tokens (admin scope), on the
//! leader only, so that every write goes through its fenced store.

use super::Shared;
use super::auth::Caller;
use crate::model::now_ms;
use crate::runner_tokens::RunnerTokenError;
use crate::tokens::{Scope, TokenError, TokenRecord};
use capstan_proto::api::v1::*;
use std::time::Duration;
use tonic::{Request, Response, Status};

pub(crate) struct TokenApi(pub Shared);

fn to_proto(scope: Scope) -> TokenScope {
    match scope {
        Scope::Read => TokenScope::Read,
        Scope::Submit => TokenScope::Submit,
        Scope::Admin => TokenScope::Admin,
    }
}

fn from_proto(scope: i32) -> Result<Scope, Status> {
    match TokenScope::try_from(scope) {
        Ok(TokenScope::Read) => Ok(Scope::Read),
        Ok(TokenScope::Submit) => Ok(Scope::Submit),
        Ok(TokenScope::Admin) => Ok(Scope::Admin),
        _ => Err(Status::invalid_argument(
            "a token needs a scope: read, submit or admin",
        )),
    }
}

fn info(r: &TokenRecord) -> TokenInfo {
    TokenInfo {
        name: r.name.clone(),
        scope: to_proto(r.scope).into(),
        created_at_ms: r.created_at_ms,
        expires_at_ms: r.expires_at_ms,
    }
}

fn status(e: TokenError) -> Status {
    match e {
        TokenError::BadName(_) | TokenError::BadScope(_) => Status::invalid_argument(e.to_string()),
        TokenError::Exists(_) => Status::already_exists(e.to_string()),
        TokenError::Unknown(_) => Status::not_found(e.to_string()),
        TokenError::Store(crate::store::StoreError::Fenced) => Status::unavailable(e.to_string()),
        TokenError::Store(_) | TokenError::Corrupt { .. } => {
            tracing::error!(error = %e, "token store failure");
            Status::internal("the coordinator could not access its token store; see its log")
        }
    }
}

impl TokenApi {
    /// An admin caller on the leader, or why not.
    async fn admin<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let caller = self.0.authorize(req, Scope::Admin).await?;
        self.0.leader().await?;
        Ok(caller)
    }
}

#[tonic::async_trait]
impl token_service_server::TokenService for TokenApi {
    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let caller = self.admin(&req).await?;
        let req = req.into_inner();
        let scope = from_proto(req.scope)?;
        let expires = (req.expires_in_secs > 0).then(|| Duration::from_secs(req.expires_in_secs));
        let (token, record) = self
            .0
            .tokens
            .create(&req.name, scope, expires, now_ms())
            .await
            .map_err(status)?;
        tracing::info!(
            target: "audit",
            token = %caller.name,
            action = "token create",
            name = %record.name,
            scope = %record.scope,
            expires_at_ms = record.expires_at_ms,
            "token created"
        );
        Ok(Response::new(CreateTokenResponse {
            token,
            info: Some(info(&record)),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        self.admin(&req).await?;
        let tokens = self.0.tokens.list().await.map_err(status)?;
        Ok(Response::new(ListTokensResponse {
            tokens: tokens.iter().map(info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let caller = self.admin(&req).await?;
        let name = req.into_inner().name;
        let record = self
            .0
            .tokens
            .revoke(&name, now_ms())
            .await
            .map_err(status)?;
        tracing::info!(
            target: "audit",
            token = %caller.name,
            action = "token revoke",
            name = %record.name,
            "token revoked"
        );
        Ok(Response::new(RevokeTokenResponse {
            info: Some(info(&record)),
        }))
    }

    async fn create_runner_token(
        &self,
        req: Request<CreateRunnerTokenRequest>,
    ) -> Result<Response<CreateRunnerTokenResponse>, Status> {
        let caller = self.admin(&req).await?;
        let req = req.into_inner();
        let now = now_ms();
        let runner_tokens = &self.0.runner_tokens;
        let (token, record) = runner_tokens
            .create(
                req.labels.into_iter().collect(),
                Duration::from_secs(req.expires_in_secs),
                req.ephemeral,
                now,
            )
            .await
            .map_err(runner_token_status)?;
        // Making one is when old ones are cleared: bounded by how many are made.
        if let Err(e) = runner_tokens.sweep(now).await {
            tracing::warn!(error = %e, "could not delete old runner tokens");
        }
        tracing::info!(
            target: "audit",
            token = %caller.name,
            action = "runner-token create",
            labels = ?record.labels,
            expires_at_ms = record.expires_at_ms,
            "single-use runner token created"
        );
        Ok(Response::new(CreateRunnerTokenResponse {
            token,
            expires_at_ms: record.expires_at_ms,
        }))
    }
}

fn runner_token_status(e: RunnerTokenError) -> Status {
    match e {
        RunnerTokenError::NotEphemeral
        | RunnerTokenError::BadTtl
        | RunnerTokenError::BadLabel(_) => Status::invalid_argument(e.to_string()),
        RunnerTokenError::Store(crate::store::StoreError::Fenced) => {
            Status::unavailable(e.to_string())
        }
        e => {
            tracing::error!(error = %e, "runner token store failure");
            Status::internal("the coordinator could not access its runner tokens; see its log")
        }
    }
}
