//! The Capstan coordinator.
//!
//! Layout:
//! - [`api`]: thin tonic handlers for the runner, pipeline and cluster services;
//! - [`scheduler`]: the single task that owns the state (runs, tasks,
//!   attempts, runners), the state machine in [`scheduler::state`];
//! - [`store`]: durable key-value state (`memory`, `redb`);
//! - [`logs`]: durable task logs (`local`, `memory`) and [`log_feed`] for live followers;
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`;
//! - [`config`]: flags, environment and TOML.
//!
//! [`run`] serves on listeners the caller bound, so tests bind `127.0.0.1:0`.

pub mod api;
pub mod config;
pub mod http;
pub mod log_feed;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod scheduler;
pub mod store;

pub use config::CoordinatorConfig;

use anyhow::Context as _;
use capstan_shared::proto::{api::v1 as apipb, cluster::v1 as clusterpb, runner::v1 as runnerpb};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest gRPC message accepted (pipeline files are capped at 1 MiB, log chunks at 64 KiB).
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Runs a standalone coordinator until `shutdown` is cancelled or the
/// scheduler fails. `http` is optional so embedders can skip the side port.
pub async fn run(
    config: CoordinatorConfig,
    grpc: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let state_path = config.data_dir.join("state.redb");
    tracing::warn!(
        data_dir = %config.data_dir.display(),
        "standalone mode: only one coordinator may use this data dir"
    );
    let store: Arc<dyn store::Store> = Arc::new(store::redb::RedbStore::open(&state_path)?);
    let logs: Arc<dyn logs::LogStore> = Arc::new(logs::local::LocalLogStore::open(
        &config.data_dir.join("logs"),
    )?);
    let metrics = Arc::new(metrics::Metrics::default());
    let (scheduler, handle) =
        scheduler::start(store, config.timing.clone(), metrics.clone()).await?;
    let epoch = scheduler.epoch();
    let local = grpc.local_addr()?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));

    let tracker = TaskTracker::new();
    let inner = shutdown.child_token();
    let ready = Arc::new(AtomicBool::new(false));
    let shared = api::Shared {
        scheduler: handle,
        logs,
        feed: Arc::new(log_feed::LogFeed::default()),
        metrics: metrics.clone(),
        registration_token: config.registration_token.clone().into(),
        advertise: advertise.clone().into(),
        epoch,
        shutdown: inner.clone(),
    };

    let sched_token = inner.clone();
    let scheduler_task = tracker.spawn(async move { scheduler.run(sched_token).await });

    if let Some(http) = http {
        let addr = http.local_addr()?;
        let state = http::HttpState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        };
        let token = inner.clone();
        tracker.spawn(async move {
            if let Err(e) = http::serve(http, state, token).await {
                tracing::error!(error = %e, "HTTP side port failed");
            }
        });
        tracing::info!(%addr, "HTTP side port listening");
    }

    let server = tonic::transport::Server::builder()
        .add_service(
            runnerpb::runner_service_server::RunnerServiceServer::new(api::runner::RunnerApi(
                shared.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            apipb::pipeline_service_server::PipelineServiceServer::new(api::pipeline::PipelineApi(
                shared.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            clusterpb::cluster_service_server::ClusterServiceServer::new(api::cluster::ClusterApi(
                shared.clone(),
            )),
        );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
    ready.store(true, Ordering::Release);
    tracing::info!(%local, %advertise, epoch, "coordinator serving");

    // The scheduler ending (store failure) must stop the whole process.
    let server_token = inner.clone();
    let result = tokio::select! {
        r = server.serve_with_incoming_shutdown(incoming, server_token.cancelled_owned()) => {
            r.context("gRPC server failed")
        }
        r = scheduler_task => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("scheduler stopped")),
            Err(e) => Err(anyhow::anyhow!("scheduler task panicked: {e}")),
        },
    };
    inner.cancel();
    tracker.close();
    if tokio::time::timeout(std::time::Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some coordinator tasks did not stop within 5 s");
    }
    result
}
