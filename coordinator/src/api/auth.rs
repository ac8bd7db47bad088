//! Who is calling: the `authorization: Bearer <token>` of a client call,
//! looked up in the store on every call (a revocation holds from the next
//! call, on every replica), and whether its scope covers the call.
//!
//! Every PipelineService, ClusterService and TokenService handler asks
//! [`authorize`] first, followers included (they read the same store), so an
//! unauthenticated caller learns nothing, not even who leads. The
//! RunnerService has its own credentials (registration token, runner
//! secret).

use crate::model::now_ms;
use crate::tokens::{Scope, Tokens};
use tonic::{Request, Status};

/// The metadata key of the bearer token.
const AUTHORIZATION: &str = "authorization";

/// The token a call was made with.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub(crate) name: String,
    pub(crate) scope: Scope,
}

impl Caller {
    pub(crate) fn is_admin(&self) -> bool {
        self.scope == Scope::Admin
    }
}

/// The bearer token of a request, if it carries one.
pub(crate) fn bearer<T>(req: &Request<T>) -> Option<&str> {
    bearer_token(req.metadata().get(AUTHORIZATION)?.to_str().ok()?)
}

/// The token of an `authorization` value `Bearer <token>` (gRPC metadata
/// and HTTP headers alike).
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The caller of `req` if its token is live and has at least `need`;
/// otherwise UNAUTHENTICATED (no, unknown, expired or revoked token) or
/// PERMISSION_DENIED (a scope too small), each saying what to do.
///
/// A call the dashboard makes in-process carries its viewer, already
/// authenticated, as a [`Delegated`] extension instead of a token (a remote
/// peer cannot set extensions); only the scope is checked then.
pub(crate) async fn authorize<T>(
    tokens: &Tokens,
    req: &Request<T>,
    need: Scope,
) -> Result<Caller, Status> {
    if let Some(Delegated(caller)) = req.extensions().get::<Delegated>() {
        return in_scope(caller.clone(), need);
    }
    check(tokens, bearer(req), need).await
}

/// The viewer of a dashboard request, on the API calls it makes for them.
#[derive(Clone, Debug)]
pub(crate) struct Delegated(pub(crate) Caller);

/// [`authorize`] for a token got some other way (the dashboard's bearer
/// header): the same answers, word for word.
pub(crate) async fn check(
    tokens: &Tokens,
    token: Option<&str>,
    need: Scope,
) -> Result<Caller, Status> {
    let Some(token) = token else {
        return Err(Status::unauthenticated(
            "this call needs an API token: pass --token or set CAPSTAN_TOKEN",
        ));
    };
    let record = match tokens.lookup(token).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            return Err(Status::unauthenticated(
                "the API token is not known to this coordinator: pass a valid one with --token or CAPSTAN_TOKEN",
            ));
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot look up an API token");
            return Err(Status::unavailable(
                "the coordinator cannot check API tokens now (its state store failed); retry shortly",
            ));
        }
    };
    check_record(record, need)
}

/// The caller a token's record makes, if it is live and has at least
/// `need` (the dashboard's sessions name their token by its record).
pub(crate) fn check_record(
    record: crate::tokens::TokenRecord,
    need: Scope,
) -> Result<Caller, Status> {
    let name = &record.name;
    if record.revoked_at_ms != 0 {
        return Err(Status::unauthenticated(format!(
            "the API token `{name}` was revoked: ask an admin for a new one"
        )));
    }
    if record.expired(now_ms()) {
        return Err(Status::unauthenticated(format!(
            "the API token `{name}` has expired: ask an admin for a new one"
        )));
    }
    in_scope(
        Caller {
            name: record.name,
            scope: record.scope,
        },
        need,
    )
}

fn in_scope(caller: Caller, need: Scope) -> Result<Caller, Status> {
    if caller.scope < need {
        return Err(Status::permission_denied(format!(
            "this call needs a token with the `{need}` scope; the token `{}` has `{}`",
            caller.name, caller.scope
        )));
    }
    Ok(caller)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use std::sync::Arc;
    use std::time::Duration;

    fn with_token(token: &str) -> Request<()> {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        req
    }

    async fn denied(tokens: &Tokens, req: Request<()>, need: Scope) -> (tonic::Code, String) {
        let s = authorize(tokens, &req, need).await.unwrap_err();
        (s.code(), s.message().to_string())
    }

    #[tokio::test]
    async fn every_way_a_token_fails_says_so() {
        use tonic::Code::{PermissionDenied, Unauthenticated};
        let tokens = Tokens::new(Arc::new(MemoryStore::new()));
        let now = now_ms();
        let (reader, _) = tokens.create("r", Scope::Read, None, now).await.unwrap();
        let (old, _) = tokens
            .create(
                "old",
                Scope::Admin,
                Some(Duration::from_secs(1)),
                now - 5000,
            )
            .await
            .unwrap();
        let (gone, _) = tokens
            .create("gone", Scope::Admin, None, now)
            .await
            .unwrap();
        tokens.revoke("gone", now).await.unwrap();

        let (code, msg) = denied(&tokens, Request::new(()), Scope::Read).await;
        assert_eq!(code, Unauthenticated);
        assert_eq!(
            msg,
            "this call needs an API token: pass --token or set CAPSTAN_TOKEN"
        );
        let (code, msg) = denied(&tokens, with_token("capstan_wrong"), Scope::Read).await;
        assert_eq!(code, Unauthenticated);
        assert_eq!(
            msg,
            "the API token is not known to this coordinator: pass a valid one with --token or CAPSTAN_TOKEN"
        );
        let (code, msg) = denied(&tokens, with_token(&old), Scope::Read).await;
        assert_eq!(code, Unauthenticated);
        assert_eq!(
            msg,
            "the API token `old` has expired: ask an admin for a new one"
        );
        let (code, msg) = denied(&tokens, with_token(&gone), Scope::Read).await;
        assert_eq!(code, Unauthenticated);
        assert_eq!(
            msg,
            "the API token `gone` was revoked: ask an admin for a new one"
        );
        let (code, msg) = denied(&tokens, with_token(&reader), Scope::Submit).await;
        assert_eq!(code, PermissionDenied);
        assert_eq!(
            msg,
            "this call needs a token with the `submit` scope; the token `r` has `read`"
        );
        let caller = authorize(&tokens, &with_token(&reader), Scope::Read)
            .await
            .unwrap();
        assert_eq!((caller.name.as_str(), caller.is_admin()), ("r", false));
    }
}
