//! The web dashboard on the HTTP side port: runs, a run's DAG, live logs,
//! the runners and the cluster, server-rendered (maud) with a little plain
//! JavaScript for live updates (Server-Sent Events); every asset is in the
//! binary. Every page answers `Accept: application/json` with the JSON the
//! CLI's `-o json` prints (`capstan_proto::render`).
//!
//! Rooms: `session` (login, the session cookie, CSRF), `sessions` (their
//! records in the state store), `client` (the API
//! handlers called in-process with the viewer's token), `layout` (the page
//! frame and small pieces), `runs`, `run`, `dag` (the SVG), `log` (the log
//! page and raw download), `log_stream` (its live lines), `fleet` (runners
//! and cluster), `live` (the SSE refresh of the other pages).
//!
//! A follower has no scheduler: its pages answer 503 naming the leader
//! (docs/decisions.md, "Dashboard").

mod client;
mod dag;
mod fleet;
mod layout;
mod live;
mod log;
mod log_stream;
mod run;
mod runs;
mod session;
mod sessions;

use crate::api::Shared;
use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub(crate) use session::Viewer;

/// What every dashboard handler gets.
#[derive(Clone)]
pub(crate) struct Dash {
    pub(crate) shared: Shared,
    pub(crate) sessions: std::sync::Arc<sessions::Sessions>,
    pub(crate) line_counts: std::sync::Arc<log::LineCounts>,
    /// The HTTP port serves TLS: the session cookie is `Secure`.
    pub(crate) secure: bool,
}

pub(crate) fn router(
    shared: &Shared,
    store: std::sync::Arc<dyn crate::store::Store>,
    secure: bool,
) -> Router {
    let state = Dash {
        shared: shared.clone(),
        sessions: std::sync::Arc::new(sessions::Sessions::new(store)),
        line_counts: std::sync::Arc::default(),
        secure,
    };
    Router::new()
        .route("/", get(runs::page))
        .route("/events", get(live::runs))
        .route("/login", get(session::login_form).post(session::login))
        .route("/logout", post(session::logout))
        .route("/runs/{id}", get(run::page))
        .route("/runs/{id}/events", get(live::run))
        .route("/runs/{id}/cancel", post(run::cancel))
        .route("/runs/{id}/tasks/{task}", get(log::page))
        .route("/runs/{id}/tasks/{task}/raw", get(log::raw))
        .route("/runs/{id}/tasks/{task}/events", get(log_stream::events))
        .route("/runs/{id}/tasks/{task}/approve", post(run::approve))
        .route("/runs/{id}/tasks/{task}/reject", post(run::reject))
        .route("/runners", get(fleet::runners))
        .route("/runners/events", get(live::runners))
        .route("/runners/{name}/drain", post(fleet::drain))
        .route("/runners/{name}/resume", post(fleet::resume))
        .route("/cluster", get(fleet::cluster))
        .route("/cluster/events", get(live::cluster))
        .route("/assets/dashboard.js", get(script))
        .route("/assets/dashboard.css", get(style))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// Scripts and styles only from this origin, no framing, no sniffing: a
/// log line that smuggled markup past the escaping still could not run.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    res
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/dashboard.js"),
    )
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/dashboard.css"),
    )
}

/// The caller asked for JSON (`Accept: application/json` before any HTML).
pub(crate) fn wants_json(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let json = accept.find("application/json");
    let html = accept.find("text/html");
    match (json, html) {
        (Some(j), Some(h)) => j < h,
        (Some(_), None) => true,
        _ => false,
    }
}

/// A page or its JSON, as the caller asked.
pub(crate) fn answer(json: bool, value: serde_json::Value, page: maud::Markup) -> Response {
    if json {
        axum::Json(value).into_response()
    } else {
        page.into_response()
    }
}

/// An API refusal as the HTTP status that means the same, with its message
/// (a page, or `{"error": ...}`); a follower's answer names the leader.
pub(crate) fn refusal(status: &tonic::Status, json: bool) -> Response {
    use tonic::Code;
    let code = match status.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let leader = capstan_proto::leader::hint(status);
    if json {
        let body = serde_json::json!({ "error": status.message(), "leader": leader });
        return (code, axum::Json(body)).into_response();
    }
    (code, layout::error_page(code, status.message(), leader)).into_response()
}
