//! The runner's optional HTTP port (`--http-listen`): `/healthz` (200 while
//! the process runs) and `/metrics` (OpenMetrics or Prometheus text 0.0.4,
//! as the `Accept` header prefers). Nothing else: no run data, no control.

use axum::Router;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;

fn router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
}

async fn metrics(headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = capstan_telemetry::exposition::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        crate::metrics::get().render(format),
    )
}

/// Binds `addr` (a taken port fails the start) and serves until the
/// returned handle is dropped: when the agent returns, so a draining
/// runner still answers scrapes.
pub(crate) async fn spawn(
    addr: SocketAddr,
) -> Result<tokio_util::task::AbortOnDropHandle<()>, crate::Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::HttpListen { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %local, "HTTP port (/healthz, /metrics) listening");
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP port failed");
        }
    });
    Ok(tokio_util::task::AbortOnDropHandle::new(task))
}
