//! `POST /hooks/github`, `/hooks/gitea`, `/hooks/gitlab`: push events in
//! each forge's format start runs of the registered repository's pipeline
//! at the pushed commit.
//!
//! In order: this replica must lead (503, the forge redelivers); the event
//! must be a push (a ping answers 200, anything else 202 and is ignored);
//! a delivery id is required (400) and is the idempotency key, so a
//! redelivery queues nothing; the body must be a push (400); its URLs must
//! name a registered repository (404); the signature must verify with that
//! repository's secret (401: HMAC-SHA256 of the body for GitHub and Gitea,
//! the token for GitLab, each compared in constant time); a deleted ref or
//! a branch no pattern matches is ignored (202); the pipeline file must be
//! at the pushed commit (422), fetched (502/504) and valid (422, and a
//! failure status with the parse error). Every answer is one structured
//! log line (`target: "webhook"`).

use super::Forges;
use super::fetch::{FetchError, Hit, Source};
use super::payload::{self, Event, Push};
use super::repos::RepoRecord;
use super::status::{self, Owed, State, Status};
use super::submit::{RunOf, submit};
use super::{Forge, repos::RepoSecrets};
use crate::api::Shared;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

/// Largest delivery read.
const MAX_BODY: usize = 25 * 1024 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct HookState {
    pub(crate) shared: Shared,
    pub(crate) forges: Arc<Forges>,
}

pub(crate) fn router(shared: &Shared, forges: &Arc<Forges>) -> Router {
    let state = HookState {
        shared: shared.clone(),
        forges: forges.clone(),
    };
    Router::new()
        .route("/hooks/{forge}", post(hook))
        // GitHub caps a delivery at 25 MB (a push of many commits); larger
        // bodies are refused with 413 before they are read.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// An answer and its log line.
struct Outcome {
    code: StatusCode,
    body: serde_json::Value,
}

fn answer(code: StatusCode, message: impl Into<String>) -> Outcome {
    Outcome {
        code,
        body: json!({ "message": message.into() }),
    }
}

async fn hook(
    AxState(s): AxState<HookState>,
    Path(forge): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let Some(forge) = Forge::parse(&forge) else {
        s.shared
            .metrics
            .webhook_answered(StatusCode::NOT_FOUND.as_u16());
        return (
            StatusCode::NOT_FOUND,
            "no such webhook: use /hooks/github, /hooks/gitea or /hooks/gitlab\n",
        )
            .into_response();
    };
    let delivery = payload::header(&headers, payload::headers(forge).delivery);
    let out = handle(&s, forge, &headers, &delivery, &body).await;
    let message = out.body["message"].as_str().unwrap_or("").to_string();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    s.shared.metrics.webhook_answered(out.code.as_u16());
    if out.code.is_success() {
        tracing::info!(target: "webhook", forge = forge.as_str(), %delivery, status = out.code.as_u16(),
            elapsed_ms, %message, "webhook handled");
    } else {
        tracing::warn!(target: "webhook", forge = forge.as_str(), %delivery, status = out.code.as_u16(),
            elapsed_ms, %message, "webhook refused");
    }
    (out.code, axum::Json(out.body)).into_response()
}

async fn handle(
    s: &HookState,
    forge: Forge,
    headers: &HeaderMap,
    delivery: &str,
    body: &[u8],
) -> Outcome {
    let push = match check(s, forge, headers, delivery, body).await {
        Ok(p) => p,
        Err(out) => return out,
    };
    let verified = match verified_repos(s, forge, headers, &push, body).await {
        Ok(v) => v,
        Err(out) => return out,
    };
    if push.deleted {
        return answer(
            StatusCode::ACCEPTED,
            format!("ignored: {} was deleted", push.git_ref),
        );
    }
    let mut runs = Vec::new();
    let mut failure = None;
    for (repo, secrets) in &verified {
        match push.branch() {
            Some(b) if repo.wants(b) => {}
            _ => {
                runs.push(json!({"repo": repo.name,
                    "ignored": format!("{} matches none of {:?}", push.git_ref, repo.branches)}));
                continue;
            }
        }
        match start(s, repo, secrets, &push, delivery).await {
            Ok(v) => runs.push(v),
            Err(out) => {
                failure.get_or_insert(out);
            }
        }
    }
    let mut out = match failure {
        Some(out) => out,
        None if runs.iter().all(|r| r.get("run").is_none()) => answer(
            StatusCode::ACCEPTED,
            format!("ignored: no repository builds {}", push.git_ref),
        ),
        None => answer(StatusCode::ACCEPTED, "queued"),
    };
    out.body["runs"] = json!(runs);
    out
}

/// The leader, the event, the delivery id and the payload.
async fn check(
    s: &HookState,
    forge: Forge,
    headers: &HeaderMap,
    delivery: &str,
    body: &[u8],
) -> Result<Push, Outcome> {
    if let Err(e) = s.shared.leader().await {
        return Err(answer(StatusCode::SERVICE_UNAVAILABLE, e.message()));
    }
    match payload::event(forge, headers) {
        Event::Push => {}
        Event::Ping => return Err(answer(StatusCode::OK, "pong")),
        Event::Other(name) => {
            return Err(answer(
                StatusCode::ACCEPTED,
                format!("ignored: `{name}` is not a push event"),
            ));
        }
    }
    if delivery.is_empty() || delivery.len() > 64 {
        let h = payload::headers(forge).delivery;
        return Err(answer(
            StatusCode::BAD_REQUEST,
            format!("the {h} header (1 to 64 characters) is required: it makes redeliveries safe"),
        ));
    }
    payload::parse(forge, body).map_err(|e| answer(StatusCode::BAD_REQUEST, e))
}

/// The registered repositories the payload names whose secret verifies it.
async fn verified_repos(
    s: &HookState,
    forge: Forge,
    headers: &HeaderMap,
    push: &Push,
    body: &[u8],
) -> Result<Vec<(RepoRecord, RepoSecrets)>, Outcome> {
    let candidates = s.forges.repos.by_url(&push.urls).await.map_err(|e| {
        tracing::error!(error = %e, "cannot read the repositories");
        answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot read the repositories; see the coordinator's log",
        )
    })?;
    if candidates.is_empty() {
        return Err(answer(
            StatusCode::NOT_FOUND,
            format!(
                "no repository is registered with any of the URLs {:?}: `capstan repo add NAME --url URL`",
                push.urls
            ),
        ));
    }
    let signature = payload::header(headers, payload::headers(forge).signature);
    let mut verified = Vec::new();
    for repo in candidates {
        match s.forges.repos.secrets(&repo) {
            Ok(secrets) if verify(forge, &secrets, &signature, body) => {
                verified.push((repo, secrets));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(repo = %repo.name, error = %e, "cannot open the webhook secret")
            }
        }
    }
    if verified.is_empty() {
        return Err(answer(
            StatusCode::UNAUTHORIZED,
            format!(
                "the {} header does not verify with the repository's webhook secret",
                payload::headers(forge).signature
            ),
        ));
    }
    Ok(verified)
}

/// GitHub: `sha256=<hex>`; Gitea: `<hex>`; both HMAC-SHA256 of the body.
/// GitLab: the secret itself. Constant time either way.
fn verify(forge: Forge, secrets: &RepoSecrets, signature: &str, body: &[u8]) -> bool {
    match forge {
        Forge::Gitlab => {
            let a = Sha256::digest(signature.as_bytes());
            let b = Sha256::digest(secrets.webhook.as_bytes());
            !signature.is_empty() && bool::from(a.ct_eq(&b))
        }
        Forge::Github | Forge::Gitea => {
            let hexed = match forge {
                Forge::Github => signature.strip_prefix("sha256="),
                _ => Some(signature),
            };
            let Some(Ok(sig)) = hexed.map(hex::decode) else {
                return false;
            };
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secrets.webhook.as_bytes()) else {
                return false;
            };
            mac.update(body);
            mac.verify_slice(&sig).is_ok()
        }
    }
}

/// Fetches the pipeline file and queues the run of one repository.
async fn start(
    s: &HookState,
    repo: &RepoRecord,
    secrets: &RepoSecrets,
    push: &Push,
    delivery: &str,
) -> Result<serde_json::Value, Outcome> {
    let src = Source {
        url: &repo.url,
        login: &secrets.fetch_login,
        sha: &push.after,
        git_ref: &push.git_ref,
    };
    let fetch_started = Instant::now();
    let (yaml, hit) = s
        .forges
        .fetcher
        .file(&src, &repo.pipeline)
        .await
        .map_err(|e| fetch_failure(repo, e))?;
    let fetch_ms = fetch_started.elapsed().as_secs_f64() * 1000.0;
    if yaml.contains("schedules") {
        let branch = push.branch().unwrap_or("");
        super::schedule::record_pipeline_schedules(&s.forges, repo, branch, &yaml).await;
    }
    let queued = submit(
        &s.shared,
        RunOf {
            repo,
            yaml,
            sha: &push.after,
            git_ref: &push.git_ref,
            key: format!("hook:{delivery}:{}", repo.name),
            by: "hook",
        },
    )
    .await;
    let queued = match queued {
        Ok(q) => q,
        Err(e) => return Err(submit_failure(s, repo, &push.after, e)),
    };
    if queued.new {
        let leader = s
            .shared
            .leader()
            .await
            .map_err(|e| answer(StatusCode::SERVICE_UNAVAILABLE, e.message()))?;
        let owed = Owed {
            run: queued.run.clone(),
            repo: repo.name.clone(),
            sha: push.after.clone(),
            context: format!("capstan/{}", queued.pipeline),
            posted: None,
        };
        if repo.forge.is_some() {
            status::owe(s.forges.clone(), leader, owed).await;
        }
    }
    tracing::info!(target: "webhook", repo = %repo.name, run = %queued.run, new = queued.new,
        sha = %push.after, git_ref = %push.git_ref, cached = (hit == Hit::Cached), fetch_ms, "run of a push");
    Ok(json!({
        "repo": repo.name,
        "run": queued.run,
        "new": queued.new,
        "pipeline_cached": hit == Hit::Cached,
        "fetch_ms": fetch_ms,
    }))
}

fn fetch_failure(repo: &RepoRecord, e: FetchError) -> Outcome {
    let code = match &e {
        FetchError::Missing { .. } | FetchError::NotText { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        FetchError::NoCommit { .. } | FetchError::Fetch { .. } => StatusCode::BAD_GATEWAY,
        FetchError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
    };
    let mut msg = e.to_string();
    if matches!(e, FetchError::Missing { .. }) {
        msg.push_str(&format!(
            ": add it, or register the repository with --pipeline PATH (now {})",
            repo.pipeline
        ));
    }
    answer(code, msg)
}

/// A refused submit; an invalid pipeline file also posts a failure status.
fn submit_failure(s: &HookState, repo: &RepoRecord, sha: &str, e: tonic::Status) -> Outcome {
    use tonic::Code;
    let code = match e.code() {
        Code::InvalidArgument => StatusCode::UNPROCESSABLE_ENTITY,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if e.code() == Code::InvalidArgument && repo.forge.is_some() {
        let (forges, repo, sha) = (s.forges.clone(), repo.clone(), sha.to_string());
        let description = e.message().to_string();
        tokio::spawn(async move {
            let context = format!("capstan/{}", repo.name);
            let status = Status {
                sha: &sha,
                state: State::Failure,
                context: &context,
                description: &description,
                target_url: &forges.public_url,
            };
            status::post(&forges, &repo, &status).await;
        });
    }
    answer(code, format!("{}: {}", repo.pipeline, e.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(s: &str) -> RepoSecrets {
        RepoSecrets {
            webhook: s.into(),
            status_token: String::new(),
            fetch_login: String::new(),
        }
    }

    #[test]
    fn signatures_verify_only_with_the_secret() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(body);
        let sig = hex::encode(mac.finalize().into_bytes());
        let good = secrets("s3cret");
        assert!(verify(Forge::Github, &good, &format!("sha256={sig}"), body));
        assert!(
            !verify(Forge::Github, &good, &sig, body),
            "GitHub's needs the prefix"
        );
        assert!(verify(Forge::Gitea, &good, &sig, body));
        assert!(!verify(Forge::Gitea, &secrets("other"), &sig, body));
        assert!(!verify(Forge::Gitea, &good, &sig, b"tampered"));
        assert!(!verify(Forge::Github, &good, "sha256=zz", body));
        assert!(!verify(Forge::Github, &good, "", body));
        assert!(verify(Forge::Gitlab, &good, "s3cret", body));
        assert!(!verify(Forge::Gitlab, &good, "s3cre", body));
        assert!(!verify(Forge::Gitlab, &secrets(""), "", body));
    }
}
