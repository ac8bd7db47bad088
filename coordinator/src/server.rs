//! Serving one coordinator replica: opening the store and the election,
//! the gRPC server and the HTTP side port, and the leadership loop that
//! starts a scheduler each time this replica wins and stops it when the
//! leadership ends.
//!
//! Doors: it wires the other modules together (`api`, `election`, `http`,
//! `idle`, `logs`, `scheduler`, `store`, `tls`); nothing imports it but `lib.rs`.

use crate::config::CoordinatorConfig;
use crate::{api, dashboard, election, forge, http, logs, metrics, scheduler, store, tls};
use anyhow::Context as _;
use capstan_proto::{api::v1 as apipb, cluster::v1 as clusterpb, runner::v1 as runnerpb};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// HTTP/2 ping interval on idle connections; rare enough to cost nothing
/// next to the runners' heartbeats at 10,000 connections. At most a third
/// of `--idle-timeout`, so a live client's PING ACKs keep its connection
/// from being reaped as silent (`idle.rs`).
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A connection whose ping is not answered within this is closed.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control windows the server grants (hyper's default is 1 MB
/// for a connection and each stream): a runner shipping a big log keeps
/// several 1 MiB chunks in flight, so sending and writing the log overlap
/// instead of taking turns (measurements: docs/decisions.md). The
/// connection window leaves room beside one log stream for the runner's
/// other calls; the cost is up to 16 MiB unread per connection while the
/// coordinator falls behind.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame peers may send us (default 16 KiB): a 1 MiB log
/// chunk in 4 frames instead of 64.
const MAX_FRAME: u32 = 256 * 1024;
/// Bound on waiting for the replica's tasks at shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a coordinator until `shutdown` is cancelled: standalone on redb, or
/// one replica of several on etcd (`config.etcd_endpoints`). `http` is
/// optional so embedders can skip the side port.
///
/// The replica serves gRPC at once. Until it leads, every call but the
/// ClusterService is answered UNAVAILABLE with the leader's URL; once it
/// leads it loads the state and schedules until leadership is lost (then it
/// campaigns again) or `shutdown` (then it resigns, so another replica takes
/// over at once).
pub async fn run(
    config: CoordinatorConfig,
    grpc: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::private::private_dir(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let local = grpc.local_addr()?;
    // Read now: a bad certificate, key or CA fails the start.
    let tls = match &config.tls {
        Some(t) => Some(capstan_tls::ServerConfigs::load(&t.files)?),
        None => None,
    };
    let advertise = advertised_url(&config, local, tls.is_some());
    let standalone = config.etcd_endpoints.is_empty();
    let metrics = Arc::new(metrics::Metrics::default());
    let (store, election) = open_state(&config, &advertise, &metrics).await?;
    let log_dir = log_dir(&config, &metrics)?;

    let tracker = TaskTracker::new();
    let inner = shutdown.child_token();
    let ready = Arc::new(AtomicBool::new(false));
    let (role_tx, role_rx) = watch::channel(api::Role::Follower);
    let shared = api::Shared {
        role: role_rx,
        election: election.clone(),
        feed: Arc::new(logs::feed::LogFeed::default()),
        metrics: metrics.clone(),
        registration_token: config.registration_token.clone().into(),
        advertise: advertise.clone().into(),
        tokens: Arc::new(crate::tokens::Tokens::new(store.clone())),
        runner_tokens: Arc::new(crate::runner_tokens::RunnerTokens::new(store.clone())),
        limits: config.limits,
        mtls: mtls_policy(&config, tls.as_ref()),
    };
    if let Some(token) = &config.dev_admin_token {
        install_dev_token(&shared.tokens, token).await?;
    }
    // Seals repository secrets and run URLs' passwords at rest; it must
    // load, or the start fails.
    let sealer = crate::seal::Sealer::load(config.forge.key_file.as_deref(), &config.data_dir)?;
    let forges = forge::Forges::open(
        store.clone(),
        &config,
        http.as_ref(),
        sealer.clone(),
        shared.metrics.clone(),
    );
    let forges = forge::start(forges, &shared, &tracker, &inner);

    let idle = config.limits.idle; // both ports close connections silent that long
    let (grpc, http) = ((grpc, idle), http.map(|h| (h, idle)));
    if let Some(http) = http {
        let dash = dashboard::router(&shared, store.clone(), tls.is_some());
        let extra = forge::webhook::router(&shared, &forges).merge(dash);
        let state = http_state(&shared, &ready, &config, extra);
        spawn_http(&tracker, http, tls.as_ref(), state, inner.clone())?;
    }
    let routes = grpc_server(shared, forges);
    let server_task = spawn_grpc(&tracker, routes, grpc, tls.as_ref(), &inner);
    ready.store(true, Ordering::Release);
    tracing::info!(%local, %advertise, standalone, tls = tls.is_some(), "coordinator serving");

    let lead = lead_loop(LeadLoop {
        store,
        log_dir,
        election: election.clone(),
        timing: config.timing.clone(),
        metrics,
        sealer,
        role: role_tx,
        standalone,
        shutdown: inner.clone(),
    });
    let result = until_either(lead, server_task).await;
    stop(&inner, &*election, &tracker).await;
    result
}

/// The leadership loop's end or the gRPC server's, whichever comes first:
/// either one ending stops the coordinator.
async fn until_either(
    lead: impl std::future::Future<Output = anyhow::Result<()>>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) -> anyhow::Result<()> {
    tokio::select! {
        r = lead => r,
        r = server => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("gRPC server failed")),
            Err(e) => Err(anyhow::anyhow!("gRPC server task panicked: {e}")),
        },
    }
}

/// What the HTTP side port serves from.
fn http_state(
    shared: &api::Shared,
    ready: &Arc<AtomicBool>,
    config: &CoordinatorConfig,
    extra: axum::Router,
) -> http::HttpState {
    http::HttpState {
        metrics: shared.metrics.clone(),
        ready: ready.clone(),
        role: shared.role.clone(),
        extra,
        demand: crate::demand::DemandState {
            role: shared.role.clone(),
            tokens: shared.tokens.clone(),
            runner_tokens: shared.runner_tokens.clone(),
            pools: Arc::new(config.runner_pools.clone()),
        },
    }
}

/// The URL clients and runners are told to use: `--advertise`, else this
/// listener's address, `https://` when the port speaks TLS (clients pick
/// TLS from the URL).
fn advertised_url(config: &CoordinatorConfig, local: std::net::SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local}"))
}

/// Serves gRPC on `grpc` (with TLS if `tls`) until `token` is cancelled,
/// closing connections silent for `idle`.
fn spawn_grpc(
    tracker: &TaskTracker,
    server: tonic::transport::server::Router,
    (grpc, idle): (tokio::net::TcpListener, Duration),
    tls: Option<&capstan_tls::ServerConfigs>,
    token: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let shut = token.clone().cancelled_owned();
    match tls {
        None => {
            let incoming = tokio_stream::StreamExt::map(nodelay_incoming(grpc), move |conn| {
                conn.map(|c| crate::idle::Idle::new(c, idle))
            });
            tracker.spawn(server.serve_with_incoming_shutdown(incoming, shut))
        }
        Some(tls) => {
            let incoming = tls::accept(grpc, tls.grpc.clone(), token.clone(), idle);
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::ReceiverStream::new(incoming),
                Ok::<_, std::io::Error>,
            );
            tracker.spawn(server.serve_with_incoming_shutdown(incoming, shut))
        }
    }
}

/// The runner service's mTLS policy: with `--tls-client-ca`.
fn mtls_policy(
    config: &CoordinatorConfig,
    tls: Option<&capstan_tls::ServerConfigs>,
) -> Option<api::Mtls> {
    let ca = tls?.client_ca.clone()?;
    Some(api::Mtls {
        ca,
        require_name_match: config.tls.as_ref().is_some_and(|t| t.require_name_match),
    })
}

/// Stops the replica's tasks and resigns (so another replica takes over
/// at once), waiting a bounded time for the tasks.
async fn stop(inner: &CancellationToken, election: &dyn election::Election, tracker: &TaskTracker) {
    inner.cancel();
    election.resign().await;
    tracker.close();
    if tokio::time::timeout(STOP_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some coordinator tasks did not stop within 5 s");
    }
}

/// Serves the HTTP side port on `listener` (with TLS if `tls`) until
/// `token` is cancelled, closing connections silent for `idle`.
fn spawn_http(
    tracker: &TaskTracker,
    (listener, idle): (tokio::net::TcpListener, Duration),
    tls: Option<&capstan_tls::ServerConfigs>,
    state: http::HttpState,
    token: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let served = match tls {
        None => {
            let listener = crate::idle::IdleListener {
                listener,
                bound: idle,
            };
            tracker.spawn(http::serve(listener, state, token))
        }
        Some(tls) => {
            let listener = tls::TlsListener {
                incoming: tls::accept(listener, tls.http.clone(), token.clone(), idle),
                local: addr,
            };
            tracker.spawn(http::serve(listener, state, token))
        }
    };
    tracker.spawn(async move {
        if let Ok(Err(e)) = served.await {
            tracing::error!(error = %e, "HTTP side port failed");
        }
    });
    tracing::info!(%addr, tls = tls.is_some(), "HTTP side port listening");
    Ok(())
}

/// `capstan dev`'s admin token, stored like any other (in its throw-away
/// data dir) under the name `dev`.
async fn install_dev_token(tokens: &crate::tokens::Tokens, token: &str) -> anyhow::Result<()> {
    tokens
        .install(
            token,
            "dev",
            crate::tokens::Scope::Admin,
            crate::model::now_ms(),
        )
        .await
        .context("cannot store the dev admin token")?;
    Ok(())
}

/// The state store and the election: redb and a standalone election
/// without etcd endpoints, else both on etcd.
async fn open_state(
    config: &CoordinatorConfig,
    advertise: &str,
    metrics: &metrics::Metrics,
) -> anyhow::Result<(Arc<dyn store::Store>, Arc<dyn election::Election>)> {
    if config.etcd_endpoints.is_empty() {
        tracing::warn!(
            data_dir = %config.data_dir.display(),
            "standalone mode: only one coordinator may use this data dir"
        );
        let store: Arc<dyn store::Store> =
            Arc::new(store::redb::RedbStore::open_in(&config.data_dir)?);
        let election = Arc::new(election::standalone::StandaloneElection::new(
            store.clone(),
            advertise.to_string(),
        ));
        return Ok((store, election));
    }
    let pool = store::etcd::connect(&config.etcd_endpoints).await?;
    pool.observe(metrics.etcd_observer());
    let etcd_store = store::etcd::EtcdStore::new(pool.clone(), &config.etcd_prefix);
    let election = Arc::new(election::etcd::EtcdElection::new(
        pool,
        &config.etcd_prefix,
        advertise.to_string(),
        config.election_ttl,
        etcd_store.clone(),
    ));
    tracing::info!(endpoints = ?config.etcd_endpoints, prefix = %config.etcd_prefix, "state in etcd");
    Ok((Arc::new(etcd_store), election))
}

/// The gRPC server with the runner, pipeline, cluster and token services.
fn grpc_server(
    shared: api::Shared,
    forges: Arc<forge::Forges>,
) -> tonic::transport::server::Router {
    let limits = shared.limits;
    tonic::transport::Server::builder()
        // A runner host that vanishes without closing its connection (power
        // loss, a partition) would otherwise keep its stream task until TCP
        // gives up, minutes later; HTTP/2 pings find it in seconds. The lease
        // requeues its work either way.
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL.min(limits.idle / 3)))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(HTTP2_KEEPALIVE_INTERVAL))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .add_service(
            runnerpb::runner_service_server::RunnerServiceServer::new(api::runner::RunnerApi(
                shared.clone(),
            ))
            .max_decoding_message_size(limits.request_bytes),
        )
        .add_service(
            apipb::pipeline_service_server::PipelineServiceServer::new(api::pipeline::PipelineApi(
                shared.clone(),
            ))
            .max_decoding_message_size(limits.request_bytes),
        )
        .add_service(
            clusterpb::cluster_service_server::ClusterServiceServer::new(api::cluster::ClusterApi(
                shared.clone(),
            )),
        )
        .add_service(runnerpb::forge_service_server::ForgeServiceServer::new(
            api::pulls::ForgeApi {
                shared: shared.clone(),
                forges: forges.clone(),
            },
        ))
        .add_service(apipb::repo_service_server::RepoServiceServer::new(
            api::repos::RepoApi {
                shared: shared.clone(),
                forges,
            },
        ))
        .add_service(apipb::token_service_server::TokenServiceServer::new(
            api::tokens::TokenApi(shared),
        ))
}

/// The log dir (`--log-dir`, else `DATA_DIR/logs`), opened once here so a
/// bad directory fails the start (each leadership opens it anew), and
/// watched for the log store metrics.
fn log_dir(config: &CoordinatorConfig, metrics: &metrics::Metrics) -> anyhow::Result<PathBuf> {
    let log_dir = config
        .log_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("logs"));
    logs::local::LocalLogStore::open(&log_dir)?;
    metrics.log_store.watch(&log_dir);
    Ok(log_dir)
}

struct LeadLoop {
    store: Arc<dyn store::Store>,
    log_dir: PathBuf,
    election: Arc<dyn election::Election>,
    timing: scheduler::state::Timing,
    metrics: Arc<metrics::Metrics>,
    sealer: crate::seal::Sealer,
    role: watch::Sender<api::Role>,
    standalone: bool,
    shutdown: CancellationToken,
}

/// Campaign, lead until leadership is lost, step down, campaign again.
async fn lead_loop(l: LeadLoop) -> anyhow::Result<()> {
    loop {
        l.role.send_replace(api::Role::Follower);
        let Some(lead) = l.election.campaign(&l.shutdown).await? else {
            return Ok(());
        };
        let logs: Arc<dyn logs::LogStore> = Arc::new(logs::local::LocalLogStore::open(&l.log_dir)?);
        let started = scheduler::start(
            l.store.clone(),
            logs.clone(),
            l.timing.clone(),
            l.metrics.clone(),
            l.sealer.clone(),
            lead.epoch,
        )
        .await;
        let (scheduler, handle) = match started {
            Ok(s) => s,
            Err(e) if !l.standalone => {
                tracing::warn!(error = %e, "could not load state as the new leader; stepping down");
                l.election.resign().await;
                continue;
            }
            Err(e) => return Err(anyhow::Error::new(e).context("cannot load the state")),
        };
        let token = l.shutdown.child_token();
        l.role.send_replace(api::Role::Leader(api::LeaderCtx {
            scheduler: handle,
            token: token.clone(),
            logs,
        }));
        l.metrics.leading(lead.epoch);
        tracing::info!(epoch = lead.epoch, "leading");
        // The scheduler gets its own task, on a worker thread: in the
        // caller's future it ran wherever that is polled, which under
        // `#[tokio::main]` is the main thread, outside the worker pool, so
        // every command from an API handler and every offer out crossed
        // threads with a futex wake-up. Aborted (and waited for) when
        // leadership is lost or this future is dropped.
        let mut task =
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(scheduler.run(token.clone())));
        let outcome = tokio::select! {
            r = &mut task => match r {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => Err(format!("the scheduler task was cancelled: {e}")),
            },
            _ = lead.lost.cancelled() => {
                task.abort();
                // Stopped before anything else happens: no write of this
                // leadership may land after the next one starts.
                let _ = (&mut task).await;
                Err("leadership lost".to_string())
            }
        };
        token.cancel();
        l.role.send_replace(api::Role::Follower);
        l.metrics.stopped_leading();
        if l.shutdown.is_cancelled() {
            return Ok(());
        }
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if l.standalone => anyhow::bail!("scheduler stopped: {e}"),
            Err(e) => {
                tracing::warn!(epoch = lead.epoch, reason = %e, "stepping down");
                l.election.resign().await;
            }
        }
    }
}

/// The gRPC listener's connections, each with TCP_NODELAY set.
///
/// Without it, Nagle holds a small frame (an offer's confirm, a unary
/// reply) while an earlier one to the same peer is unacknowledged, until
/// the peer's delayed ACK, which multiplied the submit -> offer latency
/// (docs/decisions.md). gRPC servers set it on every connection;
/// tonic does for listeners it binds itself, and this one is bound by the
/// caller.
fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            if let Ok(stream) = &conn
                && let Err(e) = stream.set_nodelay(true)
            {
                tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
            }
            conn
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_accepted_connection_has_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = std::pin::pin!(nodelay_incoming(listener));
        for _ in 0..2 {
            let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let accepted = tokio_stream::StreamExt::next(&mut incoming)
                .await
                .unwrap()
                .unwrap();
            assert!(accepted.nodelay().unwrap(), "Nagle is on for {addr}");
        }
    }
}
