//! Who is looking: the login page, the session cookie and CSRF.
//!
//! Logging in with an API token opens a session (`sessions`: a random
//! secret in an HttpOnly, SameSite=Strict cookie, `Secure` and `__Host-`
//! named behind TLS; the store keeps its hash, the token's hash and a
//! 12-hour expiry). Every request looks the session's token up again (a
//! revocation ends its sessions at once, on every replica); logging out
//! deletes the session. Scripts may send `Authorization: Bearer TOKEN`
//! instead (not ambient, so no CSRF to fear). Every form of a session
//! carries a CSRF token derived from the session's secret (a keyed hash:
//! unguessable without the HttpOnly cookie); the login form, which has no
//! session yet, a random nonce that must match a cookie set with the form
//! (double submit), so no other site can log a browser in.

use super::{Dash, layout};
use crate::api::auth::{Caller, check, check_record};
use crate::http_auth::bearer;
use crate::model::now_ms;
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
/// The name behind TLS: a `__Host-` cookie is only accepted Secure, for
/// this host, path `/` (no sibling host or plain-HTTP page can plant one).
const SECURE_SESSION: &str = "__Host-capstan_session";
const LOGIN_NONCE: &str = "capstan_login";

/// A request's viewer: who that is and the CSRF token of their session.
#[derive(Clone)]
pub(crate) struct Viewer {
    pub(crate) caller: Caller,
    pub(crate) csrf: String,
    /// Authenticated by a bearer header, not a cookie: no CSRF check.
    bearer: bool,
}

impl Viewer {
    pub(crate) fn may(&self, scope: Scope) -> bool {
        self.caller.scope >= scope
    }

    /// The refusal of a POST whose form does not carry this session's CSRF
    /// token; None when it does (or the caller sent its token itself).
    pub(crate) fn csrf_refusal(&self, sent: &str) -> Option<Response> {
        if self.bearer || bool::from(sent.as_bytes().ct_eq(self.csrf.as_bytes())) {
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
fn csrf_for(secret: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"capstan-dashboard-csrf\0")
        .chain_update(secret.as_bytes())
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

/// Whether the browser talks TLS to us: this port serves it, or the proxy
/// in front of it says so (`X-Forwarded-Proto: https`).
fn over_tls(dash: &Dash, headers: &HeaderMap) -> bool {
    dash.secure
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// Why the login page is shown: a fixed reason, never text from the URL.
#[derive(Clone, Copy)]
enum Why {
    NoSession,
    Expired,
    TokenGone,
}

impl Why {
    fn code(self) -> &'static str {
        match self {
            Why::NoSession => "login",
            Why::Expired => "expired",
            Why::TokenGone => "token",
        }
    }

    fn text(code: &str) -> &'static str {
        match code {
            "expired" => "your session has ended: log in again",
            "token" => {
                "the token of your session was revoked or has expired: log in with a valid one"
            }
            _ => "log in with an API token to see this page",
        }
    }
}

impl FromRequestParts<Dash> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, dash: &Dash) -> Result<Self, Response> {
        let json = super::wants_json(&parts.headers);
        if let Some(token) = bearer(&parts.headers) {
            return match check(&dash.shared.tokens, Some(token), Scope::Read).await {
                Ok(caller) => Ok(Viewer {
                    caller,
                    csrf: String::new(),
                    bearer: true,
                }),
                Err(status) => Err(super::refusal(&status, json)),
            };
        }
        let secret = cookie_value(&parts.headers, SECURE_SESSION)
            .or_else(|| cookie_value(&parts.headers, SESSION));
        let Some(secret) = secret else {
            return Err(to_login(parts, json, Why::NoSession));
        };
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "cannot look up a dashboard session");
            let status = tonic::Status::unavailable(
                "the coordinator cannot check sessions now (its state store failed); retry shortly",
            );
            super::refusal(&status, json)
        };
        let hash = match dash.sessions.lookup(secret, now_ms()).await {
            Ok(Some(hash)) => hash,
            Ok(None) => return Err(to_login(parts, json, Why::Expired)),
            Err(e) => return Err(unavailable(&e)),
        };
        let record = match dash.shared.tokens.lookup_hash(&hash).await {
            Ok(Some(record)) => record,
            Ok(None) => return Err(to_login(parts, json, Why::TokenGone)),
            Err(e) => return Err(unavailable(&e)),
        };
        match check_record(record, Scope::Read) {
            Ok(caller) => Ok(Viewer {
                caller,
                csrf: csrf_for(secret),
                bearer: false,
            }),
            Err(_) => Err(to_login(parts, json, Why::TokenGone)),
        }
    }
}

/// No (live) session: JSON callers get 401, browsers the login page, and
/// then back where they were (a GET of the page a form was on).
fn to_login(parts: &Parts, json: bool, why: Why) -> Response {
    if json {
        let body = serde_json::json!({ "error": Why::text(why.code()) });
        return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    }
    let next = if parts.method == axum::http::Method::GET {
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    } else {
        "/"
    };
    let target = format!("/login?next={}&why={}", url_encode(next), why.code());
    Redirect::to(&target).into_response()
}

fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Only a path of this site: `/`, then printable ASCII without `\`, not
/// `//` (another host). Browsers drop tabs and newlines from URLs, so
/// `/\t/evil` would become `//evil`: no control character passes.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') =>
        {
            n
        }
        _ => "/",
    }
}

#[derive(Deserialize)]
pub(crate) struct LoginQuery {
    next: Option<String>,
    why: Option<String>,
}

fn login_nonce_cookie(value: &str, secure: bool, age: cookie::time::Duration) -> String {
    Cookie::build((LOGIN_NONCE, value.to_string()))
        .path("/login")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(age)
        .build()
        .to_string()
}

pub(crate) async fn login_form(
    State(dash): State<Dash>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let nonce = crate::tokens::random_secret("");
    let cookie = login_nonce_cookie(
        &nonce,
        over_tls(&dash, &headers),
        cookie::time::Duration::minutes(30),
    );
    let next = safe_next(q.next.as_deref());
    let why = q.why.as_deref().map(Why::text);
    let page = layout::login_page(next, &nonce, why);
    ([(header::SET_COOKIE, cookie)], page).into_response()
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    nonce: String,
    next: Option<String>,
}

/// A refused token said for a person at a login form (not the CLI's words).
fn login_refusal(status: &tonic::Status) -> String {
    let m = status.message();
    if m.contains("revoked") {
        "this token was revoked: ask an admin for a new one".into()
    } else if m.contains("expired") {
        "this token has expired: ask an admin for a new one".into()
    } else if status.code() == tonic::Code::Unauthenticated {
        "this coordinator does not know that token: paste one `capstan token create` printed".into()
    } else {
        m.to_string()
    }
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
        let why = login_refusal(&status);
        return (code, layout::login_page(&next, &form.nonce, Some(&why))).into_response();
    }
    let secret = match dash.sessions.open(token, now_ms()).await {
        Ok(secret) => secret,
        Err(e) => {
            tracing::error!(error = %e, "cannot store a dashboard session");
            let status = tonic::Status::unavailable(
                "the coordinator cannot store sessions now (its state store failed); retry shortly",
            );
            return super::refusal(&status, false);
        }
    };
    let secure = over_tls(&dash, &headers);
    let name = if secure { SECURE_SESSION } else { SESSION };
    let session = Cookie::build((name, secret))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(cookie::time::Duration::milliseconds(
            super::sessions::SESSION_MS,
        ))
        .build();
    let spent = login_nonce_cookie("", secure, cookie::time::Duration::ZERO);
    let mut res = Redirect::to(&next).into_response();
    let h = res.headers_mut();
    for c in [session.to_string(), spent] {
        if let Ok(v) = c.parse() {
            h.append(header::SET_COOKIE, v);
        }
    }
    res
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    /// Missing is the same as wrong: 403, not a form error.
    #[serde(default)]
    pub(crate) csrf: String,
}

pub(crate) async fn logout(
    State(dash): State<Dash>,
    viewer: Viewer,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = viewer.csrf_refusal(&form.csrf) {
        return refused;
    }
    let secret = cookie_value(&headers, SECURE_SESSION).or_else(|| cookie_value(&headers, SESSION));
    if let Some(secret) = secret
        && let Err(e) = dash.sessions.close(secret).await
    {
        tracing::error!(error = %e, "cannot delete a dashboard session");
        let status = tonic::Status::unavailable(
            "the coordinator could not end the session (its state store failed); retry shortly",
        );
        return super::refusal(&status, false);
    }
    let mut res = Redirect::to("/login").into_response();
    for name in [SESSION, SECURE_SESSION] {
        let gone = Cookie::build((name, ""))
            .path("/")
            .secure(name == SECURE_SESSION)
            .max_age(cookie::time::Duration::ZERO)
            .build();
        if let Ok(v) = gone.to_string().parse() {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
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
        assert_eq!(safe_next(Some("/\t/evil.example")), "/");
        assert_eq!(safe_next(Some("/\n/evil.example")), "/");
        assert_eq!(safe_next(Some("/ /x")), "/");
        assert_eq!(
            safe_next(Some("/runs?state=failed&pipeline=a")),
            "/runs?state=failed&pipeline=a"
        );
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
