//! API tokens on the HTTP port: the `Authorization: Bearer` header checked
//! exactly as a gRPC call's (`api::auth`), and its refusals as HTTP
//! answers (401 no or bad token, 403 scope too small, 503 store down),
//! with the same one-line messages.

use crate::api::auth::{Caller, authorize};
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

/// The caller of a request with these headers, if its token has `need`.
pub(crate) async fn caller(
    tokens: &Tokens,
    headers: &HeaderMap,
    need: Scope,
) -> Result<Caller, Refusal> {
    let mut req = tonic::Request::new(());
    if let Some(value) = headers.get(header::AUTHORIZATION)
        && let Ok(value) = tonic::metadata::MetadataValue::try_from(value.as_bytes())
    {
        req.metadata_mut().insert("authorization", value);
    }
    authorize(tokens, &req, need).await.map_err(|s| Refusal {
        status: match s.code() {
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        },
        message: s.message().to_string(),
    })
}
