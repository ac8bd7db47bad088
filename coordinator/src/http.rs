//! The HTTP side port: `/healthz`, `/readyz`, `/metrics`.

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::Role;

#[derive(Clone)]
pub(crate) struct HttpState {
    pub(crate) metrics: Arc<Metrics>,
    /// True once the gRPC server accepts calls.
    pub(crate) ready: Arc<AtomicBool>,
    /// Whether this replica leads (and so serves the API) right now.
    pub(crate) role: watch::Receiver<Role>,
}

pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// 200 only on the replica that leads: a follower answers every API call
/// with "not the leader", so a load balancer or a Kubernetes Service should
/// send nothing to it (as Vault's and Consul's health checks do for standbys).
/// `/healthz` is the liveness check, 200 on every replica.
async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if !s.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n");
    }
    match &*s.role.borrow() {
        Role::Leader(_) => (StatusCode::OK, "ready: leader\n"),
        Role::Follower => (
            StatusCode::SERVICE_UNAVAILABLE,
            "follower: the leader serves the API\n",
        ),
    }
}

/// OpenMetrics or Prometheus text 0.0.4, as the `Accept` header prefers.
async fn metrics(State(s): State<HttpState>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = capstan_telemetry::exposition::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        s.metrics.render(format),
    )
}

/// Serves on `listener` (TCP, or `tls::TlsListener`) until `shutdown`.
pub(crate) async fn serve<L>(
    listener: L,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
