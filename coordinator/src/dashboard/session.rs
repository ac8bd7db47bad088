//! Who is looking: the login page, the session cookie and CSRF.
//!
//! The session cookie holds the API token itself (HttpOnly, SameSite=Strict,
//! Secure on a TLS port), looked up in the store on every request exactly as
//! a gRPC call's bearer token is (`api::auth::check`): a revocation holds
//! from the next request, on every replica, and no session table has to be
//! kept or replicated. `Authorization: Bearer` works too (scripts reading the
//! JSON). Every POST carries a CSRF token derived from the session's token
//! (a keyed hash: unguessable without the HttpOnly cookie); the login form,
//! which has no session yet, a random nonce that must match a cookie set
//! with the form (double submit), so no other site can log a browser in.

use super::{Dash, layout};
use crate::api::auth::{Caller, check};
use crate::tokens::Scope;
use axum::extract::{Form, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use cookie::{Cookie, SameSite};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const SESSION: &str = "capstan_session";
const LOGIN_NONCE: &str = "capstan_login";
/// A browser session lasts at most this long (the token may expire sooner).
const SESSION_SECS: i64 = 12 * 3600;

/// A request's viewer: its token, who that is, and its CSRF token.
#[derive(Clone)]
pub(crate) struct Viewer {
    pub(crate) token: String,
    pub(crate) caller: Caller,
    pub(crate) csrf: String,
}

impl Viewer {
    pub(crate) fn may(&self, scope: Scope) -> bool {
        self.caller.scope >= scope
    }

    /// The refusal of a POST whose form does not carry this session's CSRF
    /// token; None when it does.
    pub(crate) fn csrf_refusal(&self, sent: &str) -> Option<Response> {
        if bool::from(sent.as_bytes().ct_eq(self.csrf.as_bytes())) {
            return None;
        }
        Some((
            StatusCode::FORBIDDEN,
            layout::error_page(
                StatusCode::FORBIDDEN,
                "this form is stale or came from another site (its CSRF token does not match your session): reload the page and try again",
                None,
            ),
        )
            .into_response())
    }
}

/// The CSRF token of a session: a hash keyed by the session's secret.
fn csrf_for(token: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"capstan-dashboard-csrf\0")
        .chain_update(token.as_bytes())
        .finalize();
    hex::encode(&digest[..16])
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl FromRequestParts<Dash> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, dash: &Dash) -> Result<Self, Response> {
        let token = bearer(&parts.headers).or_else(|| cookie_value(&parts.headers, SESSION));
        let json = super::wants_json(&parts.headers);
        let Some(token) = token else {
            return Err(to_login(parts, json, None));
        };
        match check(&dash.shared.tokens, Some(token), Scope::Read).await {
            Ok(caller) => Ok(Viewer {
                csrf: csrf_for(token),
                token: token.to_string(),
                caller,
            }),
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                Err(to_login(parts, json, Some(status.message())))
            }
            Err(status) => Err(super::refusal(&status, json)),
        }
    }
}

/// No (live) session: JSON callers get 401, browsers the login page, and
/// then back where they were.
fn to_login(parts: &Parts, json: bool, why: Option<&str>) -> Response {
    let why = why.unwrap_or("log in with an API token to see this page");
    if json {
        let body = serde_json::json!({ "error": why });
        return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    }
    let next = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let target = format!("/login?next={}&why={}", url_encode(&next), url_encode(why));
    Redirect::to(&target).into_response()
}

fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Only a path of this site (not `//host`): no open redirect.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/",
    }
}

#[derive(Deserialize)]
pub(crate) struct LoginQuery {
    next: Option<String>,
    why: Option<String>,
}

pub(crate) async fn login_form(State(dash): State<Dash>, Query(q): Query<LoginQuery>) -> Response {
    let nonce = crate::tokens::random_secret("");
    let cookie = Cookie::build((LOGIN_NONCE, nonce.clone()))
        .path("/login")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(dash.secure)
        .max_age(cookie::time::Duration::minutes(30))
        .build();
    let next = safe_next(q.next.as_deref());
    let page = layout::login_page(next, &nonce, q.why.as_deref());
    ([(header::SET_COOKIE, cookie.to_string())], page).into_response()
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    token: String,
    nonce: String,
    next: Option<String>,
}

pub(crate) async fn login(
    State(dash): State<Dash>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref()).to_string();
    let expected = cookie_value(&headers, LOGIN_NONCE).unwrap_or("");
    if expected.is_empty() || !bool::from(expected.as_bytes().ct_eq(form.nonce.as_bytes())) {
        let why = "the login form expired or came from another site: try again";
        return (
            StatusCode::FORBIDDEN,
            layout::login_page(&next, "", Some(why)),
        )
            .into_response();
    }
    let token = form.token.trim();
    if let Err(status) = check(&dash.shared.tokens, Some(token), Scope::Read).await {
        let code = match status.code() {
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        // The same nonce stays valid for another try.
        return (
            code,
            layout::login_page(&next, &form.nonce, Some(status.message())),
        )
            .into_response();
    }
    let session = Cookie::build((SESSION, token.to_string()))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(dash.secure)
        .max_age(cookie::time::Duration::seconds(SESSION_SECS))
        .build();
    let spent = Cookie::build((LOGIN_NONCE, ""))
        .path("/login")
        .max_age(cookie::time::Duration::ZERO)
        .build();
    let mut res = Redirect::to(&next).into_response();
    let h = res.headers_mut();
    for c in [session.to_string(), spent.to_string()] {
        if let Ok(v) = c.parse() {
            h.append(header::SET_COOKIE, v);
        }
    }
    res
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    pub(crate) csrf: String,
}

pub(crate) async fn logout(viewer: Viewer, Form(form): Form<CsrfForm>) -> Response {
    if let Some(refused) = viewer.csrf_refusal(&form.csrf) {
        return refused;
    }
    let gone = Cookie::build((SESSION, ""))
        .path("/")
        .max_age(cookie::time::Duration::ZERO)
        .build();
    (
        [(header::SET_COOKIE, gone.to_string())],
        Redirect::to("/login"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_differ_per_session_and_are_stable() {
        assert_eq!(csrf_for("capstan_a"), csrf_for("capstan_a"));
        assert_ne!(csrf_for("capstan_a"), csrf_for("capstan_b"));
        assert_eq!(csrf_for("capstan_a").len(), 32);
    }

    #[test]
    fn next_is_only_a_local_path() {
        assert_eq!(safe_next(Some("/runs/x")), "/runs/x");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn cookies_and_bearer_are_read() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; capstan_session=tok; b=2".parse().unwrap(),
        );
        assert_eq!(cookie_value(&h, SESSION), Some("tok"));
        assert_eq!(cookie_value(&h, LOGIN_NONCE), None);
        h.insert(header::AUTHORIZATION, "Bearer  xyz ".parse().unwrap());
        assert_eq!(bearer(&h), Some("xyz"));
    }
}
