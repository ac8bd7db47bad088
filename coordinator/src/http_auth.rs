//! API tokens on the HTTP port: the `Authorization: Bearer` header checked
//! exactly as a gRPC call's (`api::auth`), and its refusals as HTTP
//! answers (401 no or bad token, 403 scope too small, 503 store down),
//! with the same one-line messages.

use crate::api::auth::{Caller, bearer_token, check};
use crate::tokens::{Scope, Tokens};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Why a request was refused.
pub(crate) struct Refusal {
    status: StatusCode,
    message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = (self.status, format!("{}\n", self.message)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"capstan\""),
            );
        }
        r
    }
}

/// The token of a request's `Authorization: Bearer` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    bearer_token(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

/// The caller of a request with these headers, if its token has `need`.
pub(crate) async fn caller(
    tokens: &Tokens,
    headers: &HeaderMap,
    need: Scope,
) -> Result<Caller, Refusal> {
    check(tokens, bearer(headers), need)
        .await
        .map_err(|s| Refusal {
            status: match s.code() {
                tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            },
            message: s.message().to_string(),
        })
}
