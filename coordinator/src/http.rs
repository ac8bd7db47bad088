//! The HTTP side port: `/healthz`, `/readyz`, `/metrics`, and the demand
//! signal (`crate::demand`).
//! The HTTP side port: `/healthz`, `/readyz`, `/metrics`, and the routes
//! other modules own (the forge webhooks: `forge::webhook`).

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
    /// `/api/v1/demand`, and the demand gauges of each scrape.
    pub(crate) demand: crate::demand::DemandState,
    /// Routes of other modules, merged in (the forge webhooks).
    pub(crate) extra: Router,
}

pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state.clone())
        .merge(crate::demand::routes(state.demand))
        .merge(state.extra)
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
    // The demand figures are read from the scheduler at each scrape (a
    // follower has none), not kept up to date on every dispatch.
    let demand = s.demand.current().await;
    crate::demand::publish(&s.metrics, demand.as_ref());
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
