//! The agent's link to the coordinators: which URL to try next (the
//! configured ones in turn, or the leader a follower named), registering,
//! opening the Control stream (hello, then the welcome within a timeout
//! derived from the last heartbeat interval, 10 s before any), the
//! stream's sending side ([`Conn`]), and the leader epoch that fences
//! messages of older leaders ([`Epoch`]).
//!
//! It imports nothing of the agent; `agent/mod.rs` and `attempts.rs` use it.

use std::path::PathBuf;
use std::time::Duration;

use capstan_proto::ids::RunnerId;
use capstan_proto::liveness;
use capstan_proto::runner::v1::runner_service_client::RunnerServiceClient;
use capstan_proto::runner::v1::{
    CoordinatorMessage, Hello, RegisterRequest, RunnerMessage, Welcome, coordinator_message,
    runner_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::credentials::{self, Credentials};
use crate::error::chain;
use crate::workdir::WorkDir;
use crate::{Error, RunnerConfig};

/// The heartbeat assumed until a welcome announces one: the timeouts it
/// gives (`capstan_proto::liveness`) are 5 s to connect and 10 s for the
/// welcome.
const FIRST_HEARTBEAT: Duration = Duration::from_secs(5);
const OUTBOX: usize = 256;
/// Wait before asking again after a follower's answer.
pub(super) const NOT_LEADER_RETRY: Duration = Duration::from_millis(200);

/// A Control stream just opened and welcomed.
pub(super) struct Session {
    pub(super) conn: Conn,
    pub(super) inbound: Streaming<CoordinatorMessage>,
    pub(super) welcome: Welcome,
    /// The Control stream's connection, held for as long as the stream.
    pub(super) client: RunnerServiceClient<Channel>,
    /// For `PushLogs` (and `ForgeService`): its own HTTP/2 connection (see
    /// [`Connector::connect`]).
    pub(super) log_channel: Channel,
    pub(super) credentials: Credentials,
}

/// The sending side of the current Control stream.
pub(super) struct Conn {
    tx: mpsc::Sender<RunnerMessage>,
}

impl Conn {
    /// False when the stream is gone.
    pub(super) async fn send(&self, kind: runner_message::Kind) -> bool {
        self.tx
            .send(RunnerMessage { kind: Some(kind) })
            .await
            .is_ok()
    }
}

pub(super) enum ConnectError {
    Retry(String),
    /// A coordinator answered but cannot take us now (a follower, or no
    /// leader is elected yet): it is alive, so retry soon, not after a
    /// growing backoff — a failover would otherwise wait out seconds of it.
    NotLeader(String),
    Fatal(Error),
}

/// The newest leader epoch seen, from welcomes and messages. `Offer`,
/// `ConfirmOffer`, `Cancel` and `Drain` of an older epoch are ignored.
#[derive(Default)]
pub(super) struct Epoch {
    newest: u64,
}

impl Epoch {
    pub(super) fn newest(&self) -> u64 {
        self.newest
    }

    /// The leader that welcomed us sets the epoch: it may be lower than
    /// one seen before if the coordinators' state was rebuilt; an offer
    /// runs only once durable (sent after a fenced write succeeded, or
    /// confirmed after one), so a stale leader cannot use this to get work
    /// run.
    pub(super) fn welcomed(&mut self, epoch: u64) {
        self.newest = epoch;
    }

    /// A later welcome on the same stream.
    pub(super) fn seen(&mut self, epoch: u64) {
        self.newest = self.newest.max(epoch);
    }

    /// True (and logged) when `epoch` is older than the newest seen.
    pub(super) fn fenced(&mut self, epoch: u64, what: &str) -> bool {
        if epoch < self.newest {
            info!(
                epoch,
                newest = self.newest,
                what,
                "ignoring a message from an older leader epoch"
            );
            return true;
        }
        self.newest = epoch;
        false
    }
}

/// The configured coordinator URLs, tried in turn, and the leader a
/// follower named, tried next.
struct Coordinators {
    urls: Vec<String>,
    next: usize,
    leader_hint: Option<String>,
}

impl Coordinators {
    fn next_url(&mut self) -> String {
        if let Some(hint) = self.leader_hint.take() {
            return hint;
        }
        let url = self.urls[self.next % self.urls.len()].clone();
        self.next = self.next.wrapping_add(1);
        url
    }
}

/// Connects to the coordinators (see the module docs) and registers when
/// this runner has no credential or the cached one is rejected.
pub(super) struct Connector {
    coordinators: Coordinators,
    /// What `Register` says of this runner.
    registration: RegisterRequest,
    /// Where the credential from `Register` is cached.
    credentials_file: PathBuf,
    credentials: Option<Credentials>,
    /// Registered again after a rejected credential (once per process).
    reregistered: bool,
    /// `--ca-cert` and the client certificate, for `https://` URLs.
    tls: capstan_tls::ClientTls,
    /// The URL of the current connection, for errors.
    url: String,
    /// The heartbeat interval of the last welcome: the connect, welcome and
    /// keepalive timeouts are derived from it (`capstan_proto::liveness`).
    heartbeat: Duration,
}

impl Connector {
    pub(super) fn new(
        config: &RunnerConfig,
        work_dir: &WorkDir,
        credentials: Option<Credentials>,
    ) -> Self {
        Self {
            coordinators: Coordinators {
                urls: config.coordinators.clone(),
                next: 0,
                leader_hint: None,
            },
            registration: RegisterRequest {
                registration_token: config.registration_token.clone(),
                name: config.name.clone(),
                labels: config.labels.clone().into_iter().collect(),
                capacity: config.capacity,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                ephemeral: config.ephemeral,
                ..RegisterRequest::default()
            },
            credentials_file: work_dir.credentials_file(),
            credentials,
            reregistered: false,
            tls: config.tls.clone(),
            url: String::new(),
            heartbeat: FIRST_HEARTBEAT,
        }
    }

    /// A welcome announced `heartbeat`: later connections time out by it.
    pub(super) fn set_heartbeat(&mut self, heartbeat: Duration) {
        self.heartbeat = heartbeat;
    }

    /// The URL to connect to next: the leader a follower named, else the
    /// next configured one.
    pub(super) fn next_url(&mut self) -> String {
        self.coordinators.next_url()
    }

    /// Follows a `capstan-leader` hint on an error status (a follower's
    /// answer), if it has one.
    pub(super) fn follow_hint(&mut self, status: &tonic::Status) {
        if let Some(leader) = capstan_proto::leader::hint(status) {
            info!(%leader, "coordinator is a follower; following its leader hint");
            self.coordinators.leader_hint = Some(leader.to_owned());
        }
    }

    /// A `LeaderMoved` message: `endpoint` (if any) is tried next.
    pub(super) fn leader_moved(&mut self, endpoint: String) {
        if !endpoint.is_empty() {
            self.coordinators.leader_hint = Some(endpoint);
        }
    }

    /// A hello saying what the agent's attempts are (see
    /// [`Connector::connect`] for the credential).
    pub(super) fn hello(
        &self,
        running_attempts: Vec<String>,
        dropped_attempts: Vec<String>,
        last_epoch: u64,
    ) -> Hello {
        Hello {
            runner_id: String::new(),
            runner_secret: String::new(),
            protocol_version: capstan_proto::PROTOCOL_VERSION,
            running_attempts,
            capacity: self.registration.capacity,
            labels: self.registration.labels.clone(),
            version: self.registration.version.clone(),
            last_epoch,
            confirms_offers: true,
            dropped_attempts,
            wants_heartbeat_acks: true,
        }
    }

    /// Connects to `url` and opens the Control stream with `hello`, to
    /// which it adds the runner's credential (registering first if there is
    /// none, and once more if the coordinator rejects it).
    pub(super) async fn connect(
        &mut self,
        url: &str,
        hello: Hello,
    ) -> Result<Session, ConnectError> {
        info!(%url, "connecting to coordinator");
        self.url = url.to_owned();
        let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|source| {
            ConnectError::Retry(format!("invalid coordinator URL: {}", chain(&source)))
        })?;
        // `https://` is TLS or nothing (tonic refuses it without a config).
        let endpoint = if url.starts_with("https://") {
            let config = self
                .tls
                .tonic_config()
                .map_err(|e| ConnectError::Fatal(e.into()))?;
            endpoint
                .tls_config(config)
                .map_err(|e| ConnectError::Retry(chain(&e)))?
        } else {
            endpoint
        };
        // A partitioned coordinator sends no RST: keepalive pings, answered
        // within a bound tied to the heartbeat, find the dead connection
        // (the Control stream's watchdog finds it too; the log connection
        // has only this).
        let (ping_every, ping_timeout) = liveness::keepalive(self.heartbeat);
        let endpoint = endpoint
            .connect_timeout(liveness::connect_timeout(self.heartbeat))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(ping_every)
            .keep_alive_timeout(ping_timeout)
            .keep_alive_while_idle(true);
        let channel = endpoint.connect().await.map_err(|e| {
            self.tls_failure(&e)
                .unwrap_or_else(|| ConnectError::Retry(chain(&e)))
        })?;
        let mut client = RunnerServiceClient::new(channel);
        let credentials = match self.credentials.clone() {
            Some(c) => c,
            None => self.register(&mut client).await?,
        };
        let wait = liveness::welcome_timeout(self.heartbeat);
        let opened = match open_control(&mut client, signed(&hello, &credentials), wait).await {
            Err(status) if status.code() == tonic::Code::Unauthenticated && !self.reregistered => {
                warn!("the coordinator rejected this runner's credentials; registering again");
                self.reregistered = true;
                let credentials = self.register(&mut client).await?;
                open_control(&mut client, signed(&hello, &credentials), wait)
                    .await
                    .map(|opened| (opened, credentials))
            }
            opened => opened.map(|opened| (opened, credentials)),
        };
        let ((conn, inbound, welcome), credentials) =
            opened.map_err(|status| self.control_error(&status))?;
        let log_channel = log_channel(&endpoint, &welcome, self.heartbeat);
        Ok(Session {
            conn,
            inbound,
            welcome,
            client,
            log_channel,
            credentials,
        })
    }

    fn retry(&mut self, what: &str, status: &tonic::Status) -> ConnectError {
        self.follow_hint(status);
        let reason = format!("{what}: {:?}: {}", status.code(), status.message());
        if status.code() == tonic::Code::Unavailable {
            ConnectError::NotLeader(reason)
        } else {
            ConnectError::Retry(reason)
        }
    }

    /// A connection refused for TLS reasons (under TLS 1.3 a refused
    /// client certificate shows on the first call, not at connect).
    fn tls_failure(&self, err: &(dyn std::error::Error + 'static)) -> Option<ConnectError> {
        let failure = capstan_tls::classify(err)?;
        Some(ConnectError::Fatal(Error::Tls {
            url: self.url.clone(),
            failure,
        }))
    }

    fn control_error(&mut self, status: &tonic::Status) -> ConnectError {
        if let Some(fatal) = self.tls_failure(status) {
            return fatal;
        }
        match status.code() {
            tonic::Code::PermissionDenied => ConnectError::Fatal(Error::ConnectionRefused {
                message: status.message().to_owned(),
            }),
            tonic::Code::Unauthenticated => ConnectError::Fatal(Error::CredentialsRejected {
                message: status.message().to_owned(),
            }),
            tonic::Code::FailedPrecondition => ConnectError::Fatal(Error::ProtocolRejected {
                message: status.message().to_owned(),
            }),
            _ => self.retry("control stream", status),
        }
    }

    async fn register(
        &mut self,
        client: &mut RunnerServiceClient<Channel>,
    ) -> Result<Credentials, ConnectError> {
        // The cached credential, if any, proves this runner owns its name:
        // an existing name is refused to the registration token alone.
        let mut request = self.registration.clone();
        if let Some(c) = &self.credentials {
            request.runner_id = c.runner_id.to_string();
            request.runner_secret = c.runner_secret.clone();
        }
        let response = match client.register(request).await {
            Ok(response) => response.into_inner(),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                return Err(ConnectError::Fatal(Error::RegistrationRejected {
                    message: status.message().to_owned(),
                }));
            }
            Err(status) if let Some(fatal) = self.tls_failure(&status) => return Err(fatal),
            Err(status) => return Err(self.retry("register", &status)),
        };
        let credentials = Credentials {
            runner_id: RunnerId::from_string(response.runner_id),
            runner_secret: response.runner_secret,
        };
        credentials::save(&self.credentials_file, &credentials)
            .await
            .map_err(|e| ConnectError::Fatal(e.into()))?;
        info!(runner_id = %credentials.runner_id, name = %self.registration.name, "registered with coordinator");
        self.credentials = Some(credentials.clone());
        Ok(credentials)
    }
}

/// `hello` with the runner's credential.
fn signed(hello: &Hello, credentials: &Credentials) -> Hello {
    Hello {
        runner_id: credentials.runner_id.to_string(),
        runner_secret: credentials.runner_secret.clone(),
        ..hello.clone()
    }
}

/// Opens the Control stream: sends `hello`, expects `Welcome` first, each
/// within `wait`.
async fn open_control(
    client: &mut RunnerServiceClient<Channel>,
    hello: Hello,
    wait: Duration,
) -> Result<(Conn, Streaming<CoordinatorMessage>, Welcome), tonic::Status> {
    let (tx, rx) = mpsc::channel(OUTBOX);
    tx.send(RunnerMessage {
        kind: Some(runner_message::Kind::Hello(hello)),
    })
    .await
    .map_err(|_| tonic::Status::internal("control outbox closed"))?;
    let mut inbound = tokio::time::timeout(wait, client.control(ReceiverStream::new(rx)))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer to hello in time"))??
        .into_inner();
    let first = tokio::time::timeout(wait, inbound.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no welcome in time"))??;
    match first.and_then(|m| m.kind) {
        Some(coordinator_message::Kind::Welcome(welcome)) => Ok((Conn { tx }, inbound, welcome)),
        Some(other) => Err(tonic::Status::internal(format!(
            "expected welcome, got {other:?}"
        ))),
        None => Err(tonic::Status::unavailable(
            "control stream ended before welcome",
        )),
    }
}

/// The client of the runner's log connection, made on first use.
///
/// Logs go over a second connection: on one connection, log streams the
/// coordinator is slow to read (a log waiting for its attempt's
/// authorization or for a gap to fill) hold the connection's HTTP/2
/// flow-control window, and the Control stream's heartbeats would wait
/// behind them: a runner shipping a big log could be judged lost while
/// healthy. Its keepalive comes from `welcome`'s heartbeat (the log
/// connection has no watchdog of its own), not from `assumed`, the interval
/// taken before the first welcome.
fn log_channel(endpoint: &Endpoint, welcome: &Welcome, assumed: Duration) -> Channel {
    let heartbeat = match welcome.heartbeat_interval_ms {
        0 => assumed,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let (ping_every, ping_timeout) = liveness::keepalive(heartbeat);
    endpoint
        .clone()
        .http2_keep_alive_interval(ping_every)
        .keep_alive_timeout(ping_timeout)
        .connect_lazy()
}
