//! The leader-aware client of the coordinator's client API, used by the CLI.
//!
//! [`Client::connect`] opens a channel to the leader among the given
//! coordinator URLs (asking them all at once), else to a follower that
//! answered. Every convenience method (`submit_run`, `get_run`, ...)
//! goes through one retry loop:
//!
//! - a follower answers with `UNAVAILABLE` and the leader's URL in the
//!   `capstan-leader` metadata: the client connects there and retries the call
//!   at once (one hint per backoff round, so two replicas pointing at each
//!   other cannot loop);
//! - `UNAVAILABLE` without a hint (a coordinator restarting, an election in
//!   progress, a dropped connection), or a connection that broke during the
//!   call (tonic reports that as `UNKNOWN: transport error`): retry with
//!   exponential backoff, rotating over the configured servers, until
//!   [`ClientOptions::retry_for`] is spent;
//! - any other status is returned at once as [`ClientError::Status`].
//!
//! `https://` servers are reached over TLS only (trusting
//! [`ClientOptions::tls`]'s `--ca-cert`, else the system's roots), never in
//! plaintext; a handshake that fails is [`ClientError::Tls`], which says
//! what to fix and is not retried.
//!
//! The client is cheap to clone; clones share the current connection, so a
//! leader found by one call is used by every later call.
//!
//! Streaming calls (`watch_run`, `read_logs`) are retried only until the
//! stream is open; a stream that breaks later is the caller's to reopen.
//!
//! Every call carries [`ClientOptions::token`] (module [`auth`]); the token
//! calls are in `tokens`.

pub mod auth;
mod connect;
mod error;
mod repos;
mod tokens;

pub use auth::{AuthChannel, Bearer};
use connect::{Connection, connect_any, connect_one, endpoint};
pub use error::{ClientError, code_name};

use std::error::Error as StdError;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;
use tonic::{Code, Status};

use capstan_proto::api::v1::pipeline_service_client::PipelineServiceClient;
use capstan_proto::api::v1::{
    CancelRunRequest, DecideApprovalRequest, DrainRunnerRequest, GetRunRequest, ListRunnersRequest,
    ListRunsRequest, LogData, ReadLogsRequest, ResumeRunnerRequest, Run, RunEvent, Runner,
    SubmitRunRequest, WatchRunRequest,
};
use capstan_proto::cluster::v1::cluster_service_client::ClusterServiceClient;
use capstan_proto::cluster::v1::{
    AskLeaderRequest, AskLeaderResponse, ListMembersRequest, ListMembersResponse,
};
use capstan_proto::ids::RunId;

/// Timeouts and retry budgets of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Limit on opening the connection to one server (TCP and HTTP/2 handshake).
    pub connect_timeout: Duration,
    /// How long [`Client::connect`] keeps retrying when no server is
    /// reachable, after a first round over every server. Short, because a
    /// user who forgot to start the coordinator should hear so quickly.
    pub connect_retry_for: Duration,
    /// How long a call keeps retrying `UNAVAILABLE` answers, over all servers.
    pub retry_for: Duration,
    /// Limit on each unary call (streams have none).
    pub request_timeout: Duration,
    /// The API token sent on every call (`authorization: Bearer`).
    pub token: Bearer,
    /// What `https://` servers are trusted with (`--ca-cert`); `http://`
    /// ones are plaintext.
    pub tls: capstan_tls::ClientTls,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            connect_retry_for: Duration::from_secs(2),
            retry_for: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            token: Bearer::default(),
            tls: capstan_tls::ClientTls::default(),
        }
    }
}

/// Adds `http://` to a bare `host:port`.
pub fn normalize_server(server: &str) -> String {
    let s = server.trim().trim_end_matches('/');
    if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

/// The leader URL a follower named in its `UNAVAILABLE` answer.
fn leader_hint(status: &Status) -> Option<String> {
    capstan_proto::leader::hint(status).map(normalize_server)
}

/// True if the status was made on this side from a connection failure,
/// rather than sent by a server (which never carries a local error source).
pub(crate) fn is_connection_failure(status: &Status) -> bool {
    StdError::source(status).is_some()
}

/// True if the call failed in the transport (the connection broke, e.g.
/// `Unknown: transport error` when the server died mid-call) rather than
/// with a status the server sent: the server may or may not have acted.
pub fn is_transport_failure(status: &Status) -> bool {
    let mut source = StdError::source(status);
    while let Some(err) = source {
        if err.is::<tonic::transport::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

struct Inner {
    servers: Vec<String>,
    options: ClientOptions,
    current: Mutex<Connection>,
}

/// A connection to the coordinator cluster that follows the leader.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("servers", &self.inner.servers)
            .field("current", &self.current_url())
            .finish()
    }
}

impl Client {
    /// Connects to the first reachable of `servers` with default options.
    pub async fn connect(servers: &[String]) -> Result<Client, ClientError> {
        Self::connect_with(servers, ClientOptions::default()).await
    }

    /// [`Self::connect`] with an API token on every call.
    pub async fn connect_with_token(
        servers: &[String],
        token: Option<&str>,
    ) -> Result<Client, ClientError> {
        let token = Bearer::new(token)
            .map_err(|e| ClientError::Status(Status::invalid_argument(e.to_string())))?;
        Self::connect_with(
            servers,
            ClientOptions {
                token,
                ..ClientOptions::default()
            },
        )
        .await
    }

    /// Connects to the first reachable of `servers` (URLs like
    /// `http://127.0.0.1:7700`; a bare `host:port` gets `http://`).
    pub async fn connect_with(
        servers: &[String],
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let servers: Vec<String> = servers
            .iter()
            .map(|s| normalize_server(s))
            .filter(|s| s != "http://")
            .collect();
        if servers.is_empty() {
            return Err(ClientError::Unreachable {
                servers,
                source: "no coordinator address given".into(),
            });
        }
        // Reject malformed addresses before trying any of them.
        for url in &servers {
            endpoint(url, &options)?;
        }
        let deadline = Instant::now() + options.connect_retry_for;
        let mut delays = backoff();
        let connection = loop {
            match connect_any(&servers, 0, &options).await {
                Ok((c, _)) => break c,
                // A certificate will not become trusted by waiting.
                Err(e @ (ClientError::Tls { .. } | ClientError::TlsConfig(_))) => return Err(e),
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(1));
                    if Instant::now() + delay > deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        };
        Ok(Client {
            inner: Arc::new(Inner {
                servers,
                options,
                current: Mutex::new(connection),
            }),
        })
    }

    /// The servers this client was given, normalized.
    pub fn servers(&self) -> &[String] {
        &self.inner.servers
    }

    /// URL of the coordinator the client talks to now.
    pub fn current_url(&self) -> String {
        self.current().url
    }

    /// Raw access to the pipeline API on the current connection (no retries).
    pub fn pipeline(&self) -> PipelineServiceClient<AuthChannel> {
        PipelineServiceClient::new(self.current().channel)
    }

    /// Raw access to the cluster API on the current connection (no retries).
    pub fn cluster(&self) -> ClusterServiceClient<AuthChannel> {
        ClusterServiceClient::new(self.current().channel)
    }

    /// Queues a run; `INVALID_ARGUMENT` lists every validation error.
    ///
    /// Retried on UNAVAILABLE like every call; a request without an
    /// `idempotency_key` gets a fresh one first, so a retry after a lost
    /// reply (the leader died after writing the run) returns the run
    /// instead of queuing it twice.
    pub async fn submit_run(&self, request: SubmitRunRequest) -> Result<RunId, ClientError> {
        self.submit_run_in_trace(request, &capstan_telemetry::TraceHeaders::default())
            .await
    }

    /// [`Self::submit_run`], with `parent` (if not empty) sent as W3C
    /// `traceparent` / `tracestate` metadata: the run's trace becomes part
    /// of the caller's.
    pub async fn submit_run_in_trace(
        &self,
        mut request: SubmitRunRequest,
        parent: &capstan_telemetry::TraceHeaders,
    ) -> Result<RunId, ClientError> {
        if request.idempotency_key.is_empty() {
            request.idempotency_key = uuid::Uuid::now_v7().simple().to_string();
        }
        let metadata: Vec<(&'static str, tonic::metadata::MetadataValue<_>)> = [
            ("traceparent", &parent.traceparent),
            ("tracestate", &parent.tracestate),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
        let response = self
            .unary(request, move |ch, mut req| {
                for (k, v) in &metadata {
                    req.metadata_mut().insert(*k, v.clone());
                }
                async move { PipelineServiceClient::new(ch).submit_run(req).await }
            })
            .await?;
        Ok(RunId::from_string(response.run_id))
    }

    /// One run with its tasks.
    pub async fn get_run(&self, run: &RunId) -> Result<Run, ClientError> {
        let request = GetRunRequest {
            run_id: run.to_string(),
        };
        self.unary(request, |ch, req| async move {
            PipelineServiceClient::new(ch).get_run(req).await
        })
        .await
    }

    /// Up to `limit` runs (0: the server's default), newest first.
    pub async fn list_runs(&self, limit: u32) -> Result<Vec<Run>, ClientError> {
        let response = self
            .unary(
                ListRunsRequest {
                    limit,
                    ..Default::default()
                },
                |ch, req| async move { PipelineServiceClient::new(ch).list_runs(req).await },
            )
            .await?;
        Ok(response.runs)
    }

    /// One page of runs, newest first, matching the request's filters
    /// (`next_cursor` asks for the next page).
    pub async fn list_runs_page(
        &self,
        request: ListRunsRequest,
    ) -> Result<capstan_proto::api::v1::ListRunsResponse, ClientError> {
        self.unary(request, |ch, req| async move {
            PipelineServiceClient::new(ch).list_runs(req).await
        })
        .await
    }

    /// Cancels every unfinished task of a run; returns the run afterwards.
    pub async fn cancel_run(&self, run: &RunId) -> Result<Run, ClientError> {
        let request = CancelRunRequest {
            run_id: run.to_string(),
        };
        self.unary(request, |ch, req| async move {
            PipelineServiceClient::new(ch).cancel_run(req).await
        })
        .await
    }

    /// Approves (`approve`) or rejects the task `task` of `run` at its
    /// approval gate, with `reason` shown beside the decision.
    pub async fn decide_approval(
        &self,
        run: &RunId,
        task: &str,
        approve: bool,
        reason: &str,
    ) -> Result<Run, ClientError> {
        let request = DecideApprovalRequest {
            run_id: run.to_string(),
            task: task.to_owned(),
            approve,
            reason: reason.to_owned(),
        };
        self.unary(request, |ch, req| async move {
            PipelineServiceClient::new(ch).decide_approval(req).await
        })
        .await
    }

    /// The run as it is now, then one event per change until the run ends.
    pub async fn watch_run(&self, run: &RunId) -> Result<tonic::Streaming<RunEvent>, ClientError> {
        let request = WatchRunRequest {
            run_id: run.to_string(),
        };
        self.call(move |ch| {
            let req = request.clone();
            async move { PipelineServiceClient::new(ch).watch_run(req).await }
        })
        .await
    }

    /// Log bytes of a run's tasks (`task: None` for every task); with
    /// `follow` the stream stays open until the tasks end.
    pub async fn read_logs(
        &self,
        run: &RunId,
        task: Option<&str>,
        follow: bool,
    ) -> Result<tonic::Streaming<LogData>, ClientError> {
        let request = ReadLogsRequest {
            run_id: run.to_string(),
            task: task.unwrap_or_default().to_string(),
            follow,
        };
        self.call(move |ch| {
            let req = request.clone();
            async move { PipelineServiceClient::new(ch).read_logs(req).await }
        })
        .await
    }

    /// Registered runners.
    pub async fn list_runners(&self) -> Result<Vec<Runner>, ClientError> {
        let response = self
            .unary(ListRunnersRequest {}, |ch, req| async move {
                PipelineServiceClient::new(ch).list_runners(req).await
            })
            .await?;
        Ok(response.runners)
    }

    /// Drains a runner given by id or name; returns it afterwards.
    pub async fn drain_runner(&self, runner: &str) -> Result<Runner, ClientError> {
        let request = DrainRunnerRequest {
            runner: runner.to_string(),
        };
        let response = self
            .unary(request, |ch, req| async move {
                PipelineServiceClient::new(ch).drain_runner(req).await
            })
            .await?;
        response
            .runner
            .ok_or_else(|| ClientError::Status(Status::internal("DrainRunner answered no runner")))
    }

    /// Undoes [`Client::drain_runner`] for a runner given by id or name;
    /// returns it afterwards.
    pub async fn resume_runner(&self, runner: &str) -> Result<Runner, ClientError> {
        let request = ResumeRunnerRequest {
            runner: runner.to_string(),
        };
        let response = self
            .unary(request, |ch, req| async move {
                PipelineServiceClient::new(ch).resume_runner(req).await
            })
            .await?;
        response
            .runner
            .ok_or_else(|| ClientError::Status(Status::internal("ResumeRunner answered no runner")))
    }

    /// Who leads now, as the current server sees it (followers answer too).
    pub async fn ask_leader(&self) -> Result<AskLeaderResponse, ClientError> {
        self.unary(AskLeaderRequest {}, |ch, req| async move {
            ClusterServiceClient::new(ch).ask_leader(req).await
        })
        .await
    }

    /// Every coordinator replica known to the cluster.
    pub async fn list_members(&self) -> Result<ListMembersResponse, ClientError> {
        self.unary(ListMembersRequest {}, |ch, req| async move {
            ClusterServiceClient::new(ch).list_members(req).await
        })
        .await
    }

    fn current(&self) -> Connection {
        self.inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_current(&self, connection: Connection) {
        *self
            .inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = connection;
    }

    /// A unary call of any service: `rpc` sends the request (with the
    /// client's deadline) on the channel [`Self::call`] gives it, under the
    /// same leader-following and retry policy.
    async fn unary<Req, Resp, F, Fut>(&self, request: Req, rpc: F) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(AuthChannel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let timeout = self.inner.options.request_timeout;
        self.call(move |ch| rpc(ch, unary(request.clone(), timeout)))
            .await
    }

    /// Runs `f` on the current channel with the leader-following and
    /// `UNAVAILABLE` retry policy described in the module docs.
    async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut(AuthChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let options = &self.inner.options;
        let started = Instant::now();
        let mut delays = backoff();
        let mut hint_followed = false;
        // The leader a follower named and why it could not be reached, as
        // of the last hint: what the final error says if no leader answers.
        let mut unreachable_hint: Option<(String, ClientError)> = None;
        let mut current = self.current();
        loop {
            let status = match f(current.channel.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                // A broken connection (a leader killed mid-call) is as
                // retryable as UNAVAILABLE: every call here may be repeated
                // (a submit keeps its idempotency key).
                Err(status)
                    if status.code() == Code::Unavailable || is_transport_failure(&status) =>
                {
                    status
                }
                Err(status) => return Err(ClientError::Status(status)),
            };
            if !hint_followed {
                unreachable_hint = None;
            }
            if !hint_followed && let Some(leader) = leader_hint(&status) {
                hint_followed = true;
                if leader != current.url {
                    match self.follow_hint(&leader, &current).await {
                        Ok(c) => {
                            self.set_current(c.clone());
                            current = c;
                            continue;
                        }
                        Err(error) => unreachable_hint = Some((leader, error)),
                    }
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(1));
            if started.elapsed() + delay > options.retry_for {
                return Err(match unreachable_hint {
                    Some((leader, source)) => ClientError::LeaderUnreachable {
                        servers: self.inner.servers.clone(),
                        leader,
                        source: Box::new(source),
                    },
                    None => self.gave_up(status, started.elapsed()),
                });
            }
            tracing::debug!(url = %current.url, message = status.message(), ?delay, "coordinator unavailable; retrying");
            tokio::time::sleep(delay).await;
            hint_followed = false;
            // Prefer another server next: this one may be down for good.
            let start = self
                .inner
                .servers
                .iter()
                .position(|s| *s == current.url)
                .map_or(0, |i| i + 1);
            if let Ok((c, _)) = connect_any(&self.inner.servers, start, options).await {
                self.set_current(c.clone());
                current = c;
            }
        }
    }

    /// A connection to the leader a follower named in its hint, else to a
    /// leader among the given servers. The hint is the address the leader
    /// advertises, which may be one only the cluster's own network reaches
    /// (a container's name, a private IP): a client outside it reaches the
    /// same leader through the address it was given (a published port), so
    /// it asks those at once instead of waiting out a backoff round. The
    /// error is why the hinted address failed.
    async fn follow_hint(
        &self,
        leader: &str,
        current: &Connection,
    ) -> Result<Connection, ClientError> {
        let options = &self.inner.options;
        tracing::debug!(from = %current.url, to = %leader, "following the leader hint");
        let error = match connect_one(leader, options).await {
            Ok(c) => return Ok(c),
            Err(error) => error,
        };
        tracing::debug!(%leader, %error, "cannot reach the hinted leader; asking the given servers");
        match connect_any(&self.inner.servers, 0, options).await {
            Ok((c, true)) if c.url != current.url => Ok(c),
            _ => Err(error),
        }
    }

    fn gave_up(&self, status: Status, retried_for: Duration) -> ClientError {
        if let Some(failure) = capstan_tls::classify(&status) {
            return ClientError::Tls {
                url: self.current_url(),
                failure,
            };
        }
        let servers = self.inner.servers.clone();
        if is_connection_failure(&status) {
            ClientError::Unreachable {
                servers,
                source: Box::new(status),
            }
        } else {
            ClientError::NoLeader {
                servers,
                retried_for,
                source: status,
            }
        }
    }
}

fn unary<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::cluster::v1::Member;
    use capstan_proto::cluster::v1::cluster_service_server::{
        ClusterService, ClusterServiceServer,
    };
    use std::sync::atomic::{AtomicU32, Ordering};
    use tonic::transport::Server;

    /// A cluster service that is either the leader or a follower naming one,
    /// and that answers `UNAVAILABLE` without a hint `flaky` times first.
    struct Fake {
        url: String,
        leader_hint: Option<String>,
        flaky: AtomicU32,
        /// A leader that answers its first `AskLeader` late and as a
        /// follower (it is still being elected).
        late_leader: bool,
        asks: AtomicU32,
    }

    impl Fake {
        fn answer(&self) -> Result<(), Status> {
            if self
                .flaky
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Status::unavailable("electing"));
            }
            if let Some(leader) = &self.leader_hint {
                let mut status = Status::unavailable("not the leader");
                status
                    .metadata_mut()
                    .insert(capstan_proto::leader::METADATA_KEY, leader.parse().unwrap());
                return Err(status);
            }
            Ok(())
        }
    }

    #[tonic::async_trait]
    impl ClusterService for Fake {
        async fn ask_leader(
            &self,
            _: tonic::Request<AskLeaderRequest>,
        ) -> Result<tonic::Response<AskLeaderResponse>, Status> {
            let first = self.asks.fetch_add(1, Ordering::SeqCst) == 0;
            if self.late_leader && first {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(tonic::Response::new(AskLeaderResponse {
                leader: self.leader_hint.clone().unwrap_or_else(|| self.url.clone()),
                epoch: 7,
                is_leader: self.leader_hint.is_none() && !(self.late_leader && first),
            }))
        }

        async fn list_members(
            &self,
            _: tonic::Request<ListMembersRequest>,
        ) -> Result<tonic::Response<ListMembersResponse>, Status> {
            self.answer()?;
            Ok(tonic::Response::new(ListMembersResponse {
                members: vec![Member {
                    endpoint: self.url.clone(),
                    is_leader: true,
                }],
                leader: self.url.clone(),
                epoch: 7,
            }))
        }
    }

    async fn serve(leader_hint: Option<String>, flaky: u32) -> String {
        serve_fake(leader_hint, flaky, false).await
    }

    async fn serve_fake(leader_hint: Option<String>, flaky: u32, late_leader: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = Fake {
            url: url.clone(),
            leader_hint,
            flaky: AtomicU32::new(flaky),
            late_leader,
            asks: AtomicU32::new(0),
        };
        let incoming = futures::stream::unfold(listener, |l| async move {
            let conn = l.accept().await.map(|(s, _)| s);
            Some((conn, l))
        });
        tokio::spawn(
            Server::builder()
                .add_service(ClusterServiceServer::new(fake))
                .serve_with_incoming(incoming),
        );
        url
    }

    #[test]
    fn normalizes_bare_addresses() {
        assert_eq!(normalize_server("127.0.0.1:7700"), "http://127.0.0.1:7700");
        assert_eq!(normalize_server("https://c:7700/"), "https://c:7700");
    }

    #[tokio::test]
    async fn follows_the_leader_hint() {
        let leader = serve(None, 0).await;
        let follower = serve(Some(leader.clone()), 0).await;
        let client = Client::connect(std::slice::from_ref(&follower))
            .await
            .unwrap();
        assert_eq!(client.current_url(), follower);
        let members = client.list_members().await.unwrap();
        assert_eq!(members.leader, leader);
        assert_eq!(client.current_url(), leader, "later calls go to the leader");
    }

    #[tokio::test]
    async fn retries_transient_unavailable() {
        let server = serve(None, 2).await;
        let client = Client::connect(std::slice::from_ref(&server))
            .await
            .unwrap();
        let members = client.list_members().await.unwrap();
        assert_eq!(members.leader, server);
    }

    #[tokio::test]
    async fn gives_up_when_no_leader_answers() {
        let server = serve(None, u32::MAX).await;
        let options = ClientOptions {
            retry_for: Duration::from_millis(500),
            ..ClientOptions::default()
        };
        let client = Client::connect_with(&[server], options).await.unwrap();
        let err = client.list_members().await.unwrap_err();
        assert!(matches!(err, ClientError::NoLeader { .. }), "{err}");
        assert!(err.is_unreachable());
    }

    /// The client starts on a follower (the leader was still being
    /// elected when it connected) whose hint names an address this client
    /// cannot reach; the leader is among its servers. It switches to it at
    /// once: `retry_for` is shorter than the first backoff delay, so only
    /// the immediate fallback can succeed.
    #[tokio::test]
    async fn an_unreachable_hint_falls_back_at_once_to_the_leader_among_the_servers() {
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let advertised = format!("http://{}", gone.local_addr().unwrap());
        drop(gone);
        let leader = serve_fake(None, 0, true).await;
        let follower = serve(Some(advertised), 0).await;
        let options = ClientOptions {
            retry_for: Duration::from_millis(50),
            ..ClientOptions::default()
        };
        let client = Client::connect_with(&[leader.clone(), follower.clone()], options)
            .await
            .unwrap();
        assert_eq!(client.current_url(), follower, "no leader at connect");
        let members = client.list_members().await.unwrap();
        assert_eq!(members.leader, leader);
        assert_eq!(client.current_url(), leader, "later calls go to the leader");
    }

    /// The leader advertises an address only its own network reaches (a
    /// container's name), and no given server leads: the error says so and
    /// what to give instead, rather than "try again shortly".
    #[tokio::test]
    async fn an_unreachable_hint_and_no_leader_among_the_servers_says_what_to_give() {
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let leader = format!("http://{}", gone.local_addr().unwrap());
        drop(gone);
        let follower = serve(Some(leader.clone()), 0).await;
        let options = ClientOptions {
            retry_for: Duration::from_millis(500),
            ..ClientOptions::default()
        };
        let client = Client::connect_with(std::slice::from_ref(&follower), options)
            .await
            .unwrap();
        let err = client.list_members().await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ClientError::LeaderUnreachable { .. }),
            "{msg}"
        );
        assert!(err.is_unreachable());
        assert!(
            msg.starts_with(&format!(
                "no coordinator at {follower} is the leader, and the leader they name, {leader}, cannot be reached from here ("
            )),
            "{msg}"
        );
        assert!(msg.contains("Connection refused"), "{msg}");
        assert!(msg.ends_with("to --server or CAPSTAN_SERVER"), "{msg}");
    }

    #[tokio::test]
    async fn unreachable_names_every_server() {
        // Bind then drop: a port nobody listens on.
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = a.local_addr().unwrap();
        drop(a);
        let options = ClientOptions {
            connect_retry_for: Duration::ZERO,
            ..ClientOptions::default()
        };
        let servers = vec![addr.to_string(), format!("http://{addr}")];
        let err = Client::connect_with(&servers, options).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{msg}");
        assert!(
            msg.starts_with(&format!(
                "cannot reach the coordinator at http://{addr},http://{addr}: "
            )),
            "{msg}"
        );
        assert!(
            msg.ends_with("is it running? set --server or CAPSTAN_SERVER"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn other_statuses_show_code_and_message() {
        let err = ClientError::Status(Status::not_found("no run x"));
        assert_eq!(err.to_string(), "not found: no run x");
        assert_eq!(err.code(), Some(Code::NotFound));
    }

    /// A coordinator that writes the run and dies before it answers: the
    /// first `SubmitRun` closes the connection from the server side (as a
    /// killed leader's kernel does); the next one answers with the run the
    /// key names.
    struct DiesBeforeReplying {
        keys: Mutex<Vec<String>>,
        sockets: Arc<Mutex<Vec<std::net::TcpStream>>>,
    }

    #[tonic::async_trait]
    impl capstan_proto::api::v1::pipeline_service_server::PipelineService for DiesBeforeReplying {
        async fn submit_run(
            &self,
            req: tonic::Request<SubmitRunRequest>,
        ) -> Result<tonic::Response<capstan_proto::api::v1::SubmitRunResponse>, Status> {
            let key = req.into_inner().idempotency_key;
            let first = {
                let mut keys = self.keys.lock().unwrap();
                keys.push(key.clone());
                keys.len() == 1
            };
            if first {
                for s in self.sockets.lock().unwrap().drain(..) {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                std::future::pending::<()>().await;
            }
            Ok(tonic::Response::new(
                capstan_proto::api::v1::SubmitRunResponse {
                    run_id: format!("run-{key}"),
                },
            ))
        }
        async fn get_run(
            &self,
            _: tonic::Request<GetRunRequest>,
        ) -> Result<tonic::Response<Run>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn list_runs(
            &self,
            _: tonic::Request<ListRunsRequest>,
        ) -> Result<tonic::Response<capstan_proto::api::v1::ListRunsResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn cancel_run(
            &self,
            _: tonic::Request<CancelRunRequest>,
        ) -> Result<tonic::Response<Run>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn decide_approval(
            &self,
            _: tonic::Request<DecideApprovalRequest>,
        ) -> Result<tonic::Response<Run>, Status> {
            Err(Status::unimplemented(""))
        }
        type WatchRunStream = futures::stream::Empty<Result<RunEvent, Status>>;
        async fn watch_run(
            &self,
            _: tonic::Request<WatchRunRequest>,
        ) -> Result<tonic::Response<Self::WatchRunStream>, Status> {
            Err(Status::unimplemented(""))
        }
        type ReadLogsStream = futures::stream::Empty<Result<LogData, Status>>;
        async fn read_logs(
            &self,
            _: tonic::Request<ReadLogsRequest>,
        ) -> Result<tonic::Response<Self::ReadLogsStream>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn list_runners(
            &self,
            _: tonic::Request<ListRunnersRequest>,
        ) -> Result<tonic::Response<capstan_proto::api::v1::ListRunnersResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn drain_runner(
            &self,
            _: tonic::Request<DrainRunnerRequest>,
        ) -> Result<tonic::Response<capstan_proto::api::v1::DrainRunnerResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn resume_runner(
            &self,
            _: tonic::Request<ResumeRunnerRequest>,
        ) -> Result<tonic::Response<capstan_proto::api::v1::ResumeRunnerResponse>, Status> {
            Err(Status::unimplemented(""))
        }
    }

    /// The case the idempotency key is for: the leader wrote the run and
    /// died before replying. The client must retry with the same key (and
    /// get the run back) instead of reporting a failure, after which the
    /// user or a relay submits again and the pipeline runs twice.
    #[tokio::test]
    async fn submit_retries_with_its_key_when_the_leader_dies_before_replying() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let sockets: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let service = Arc::new(DiesBeforeReplying {
            keys: Mutex::default(),
            sockets: Arc::clone(&sockets),
        });
        let incoming = futures::stream::unfold(listener, move |l| {
            let sockets = Arc::clone(&sockets);
            async move {
                let conn = l.accept().await.map(|(s, _)| {
                    let std = s.into_std().unwrap();
                    sockets.lock().unwrap().push(std.try_clone().unwrap());
                    tokio::net::TcpStream::from_std(std).unwrap()
                });
                Some((conn, l))
            }
        });
        let fake = Fake {
            url: url.clone(),
            leader_hint: None,
            flaky: AtomicU32::new(0),
            late_leader: false,
            asks: AtomicU32::new(0),
        };
        tokio::spawn(
            Server::builder()
                .add_service(ClusterServiceServer::new(fake))
                .add_service(
                    capstan_proto::api::v1::pipeline_service_server::PipelineServiceServer::from_arc(
                        Arc::clone(&service),
                    ),
                )
                .serve_with_incoming(incoming),
        );
        let client = Client::connect(std::slice::from_ref(&url)).await.unwrap();
        let result = client.submit_run(SubmitRunRequest::default()).await;
        let keys = service.keys.lock().unwrap().clone();
        let run = result.unwrap_or_else(|e| {
            panic!(
                "submit failed after the server wrote the run ({} call(s)): {e:?}",
                keys.len()
            )
        });
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_eq!(keys[0], keys[1], "the retry kept the key");
        assert_eq!(run.to_string(), format!("run-{}", keys[0]));
    }
}
