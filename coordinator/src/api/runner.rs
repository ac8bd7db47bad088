//! RunnerService: registration, the Control stream and log ingestion.

use super::{Shared, status};
use crate::model::{now_ms, secrets_equal};
use crate::runner_tokens::{Claim, RunnerTokenError, RunnerTokens};
use crate::scheduler::lease::HeartbeatFilter;
use crate::scheduler::state::Takeover;
use crate::scheduler::{AttemptAsk, Command};
use crate::tokens::Scope;
use capstan_proto::ids::{AttemptId, RunnerId};
use capstan_proto::runner::v1::*;
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub(crate) struct RunnerApi(pub Shared);

/// How long a new Control stream may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest accepted runner name.
const MAX_NAME: usize = 128;

#[tonic::async_trait]
impl runner_service_server::RunnerService for RunnerApi {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let identity = self.identity(&req)?;
        // An admin API token (a bad one is refused as such) lets an existing
        // name register again without its credential.
        let admin = match super::auth::bearer(&req) {
            Some(_) => Some(self.0.authorize(&req, Scope::Admin).await?),
            None => None,
        };
        let req = req.into_inner();
        let claim = self.registration_token(&req).await?;
        let name = req.name.trim().to_string();
        if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "runner name must be 1 to {MAX_NAME} printable characters"
            )));
        }
        if let (Some(mtls), Some(identity)) = (&self.0.mtls, &identity)
            && mtls.require_name_match
            && *identity != name
        {
            tracing::warn!(%name, %identity, "registration refused: certificate names another runner");
            return Err(Status::permission_denied(format!(
                "this runner's client certificate is for `{identity}` but its --name is `{name}`; \
                 the coordinator requires them to match (--tls-require-name-match)"
            )));
        }
        let takeover = match (&admin, req.runner_id.is_empty()) {
            (Some(_), _) => Takeover::Admin,
            (None, false) => Takeover::Credential {
                id: RunnerId::from_string(req.runner_id),
                secret: req.runner_secret,
            },
            (None, true) => Takeover::Nothing,
        };
        // A single-use token's labels are the runner's, whatever it asks.
        let (labels, ephemeral) = match &claim {
            Some(c) => (c.labels().clone(), Some(true)),
            None => (
                req.labels.into_iter().collect(),
                req.ephemeral.then_some(false),
            ),
        };
        let (id, secret) = self
            .0
            .ask(|reply| Command::Register {
                name: name.clone(),
                takeover,
                labels,
                capacity: req.capacity,
                version: req.version,
                identity: identity.clone(),
                ephemeral,
                reply,
            })
            .await?;
        if let Some(claim) = claim {
            self.0
                .runner_tokens
                .mark_used(claim, &name, now_ms())
                .await
                .map_err(|e| runner_token_refusal(&name, e))?;
        }
        tracing::info!(runner = %id, %name, tls_identity = ?identity, "runner registered");
        if let Some(caller) = admin {
            tracing::info!(target: "audit", token = %caller.name, action = "runner register", runner = %id, %name, "runner registered with an admin token");
        }
        Ok(Response::new(RegisterResponse {
            runner_id: id.to_string(),
            runner_secret: secret,
        }))
    }

    type ControlStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

    async fn control(
        &self,
        req: Request<Streaming<RunnerMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let identity = self.identity(&req)?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let Some(RunnerMessage {
            kind: Some(runner_message::Kind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of a Control stream must be hello",
            ));
        };
        let runner = RunnerId::from_string(hello.runner_id.clone());
        let acks_heartbeats = hello.wants_heartbeat_acks;
        let (tx, rx) = mpsc::unbounded_channel();
        // Weak: the scheduler dropping its sender must still end the stream.
        let acks = tx.downgrade();
        let leader = self.0.leader().await?;
        let (conn, lease) = leader
            .ask(|reply| Command::Attach {
                hello,
                identity,
                tx,
                reply,
            })
            .await?;
        tracing::info!(%runner, conn, "runner attached");
        let scheduler = leader.scheduler.clone();
        let r = runner.clone();
        tokio::spawn(async move {
            // Renews the lease here; only heartbeats that change something
            // cost a trip through the scheduler loop.
            let mut filter = HeartbeatFilter::new(lease);
            loop {
                match inbound.message().await {
                    Ok(Some(RunnerMessage { kind: Some(kind) })) => {
                        if acks_heartbeats && matches!(kind, runner_message::Kind::Heartbeat(_)) {
                            ack_heartbeat(&acks);
                        }
                        if filter.pass(&kind, tokio::time::Instant::now()) {
                            scheduler.tell(Command::RunnerMessage {
                                runner: r.clone(),
                                conn,
                                kind,
                            });
                        }
                    }
                    Ok(Some(RunnerMessage { kind: None })) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(runner = %r, error = %e, "control stream broke");
                        break;
                    }
                }
            }
            tracing::info!(runner = %r, conn, "runner detached");
            scheduler.tell(Command::Detach { runner: r, conn });
        });
        // A deposed leader ends the stream: the runner reconnects and is sent on.
        let shutdown = leader.token.clone().cancelled_owned();
        Ok(Response::new(Box::pin(
            UnboundedReceiverStream::new(rx).take_until(shutdown),
        )))
    }

    async fn push_logs(
        &self,
        req: Request<Streaming<LogChunk>>,
    ) -> Result<Response<PushLogsAck>, Status> {
        let identity = self.identity(&req)?;
        let leader = self.0.leader().await?;
        let mut chunks = req.into_inner();
        // When each attempt was last authorized: a long stream asks again
        // for each batch once that is older than [`AUTH_FRESH`], so that
        // the lines a superseded attempt wrote during a partition, arriving
        // after it healed, are refused like its late report (issue 25).
        let mut allowed: HashMap<AttemptId, tokio::time::Instant> = HashMap::new();
        let mut durable: HashMap<AttemptId, u64> = HashMap::new();
        // A chunk taken off the stream that did not fit the last batch.
        let mut carried: Option<LogChunk> = None;
        let mut ended = false;
        while !ended {
            let chunk = match carried.take() {
                Some(chunk) => chunk,
                None => match chunks.message().await? {
                    Some(chunk) => chunk,
                    None => break,
                },
            };
            // A deposed leader must not write beside the new one.
            if leader.token.is_cancelled() {
                return Err(Status::unavailable(
                    "this coordinator is no longer the leader; reconnect",
                ));
            }
            let attempt = AttemptId::from_string(chunk.attempt_id);
            let now = tokio::time::Instant::now();
            if allowed
                .get(&attempt)
                .is_none_or(|at| now.duration_since(*at) > AUTH_FRESH)
            {
                let runner = (chunk.runner_id, chunk.runner_secret);
                authorize(&leader, runner, identity.clone(), &attempt).await?;
                allowed.insert(attempt.clone(), now);
            }
            let offset = chunk.offset;
            let (parts, stop) = gather(&mut chunks, &attempt, offset, chunk.data);
            (carried, ended) = (stop.carried, stop.ended);
            let len = self
                .store(&leader, &durable, &attempt, offset, parts)
                .await?;
            durable.insert(attempt, len);
            if let Some(status) = stop.broke {
                return Err(status);
            }
        }
        for attempt in durable.keys() {
            leader.logs.sync(attempt).await.map_err(status::from_log)?;
        }
        Ok(Response::new(PushLogsAck {
            durable: durable
                .into_iter()
                .map(|(a, n)| (a.to_string(), n))
                .collect(),
        }))
    }
}

/// Answers a heartbeat on the stream whose sender `acks` is, so that the
/// runner can tell a silent (partitioned) coordinator from a quiet one
/// (`HeartbeatAck` in runner.proto). Nothing once the scheduler has closed
/// the stream.
fn ack_heartbeat(acks: &mpsc::WeakUnboundedSender<Result<CoordinatorMessage, Status>>) {
    if let Some(tx) = acks.upgrade() {
        let _ = tx.send(Ok(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::HeartbeatAck(HeartbeatAck {})),
        }));
    }
}

/// Asks the scheduler whether `runner` (its id and secret, and under mTLS
/// the certificate's `identity`) may write `attempt`'s log (and, by the same
/// rule, act for it: `api::pulls`).
pub(super) async fn authorize(
    leader: &super::LeaderCtx,
    runner: (String, String),
    identity: Option<String>,
    attempt: &AttemptId,
) -> Result<(), Status> {
    let ask = attempt_ask(runner, identity, attempt);
    leader
        .ask(|reply| Command::AuthorizeLog { ask, reply })
        .await
}

/// [`authorize`], answering with the attempt's task spec and its run's
/// repository.
pub(super) async fn attempt_task(
    leader: &super::LeaderCtx,
    runner: (String, String),
    identity: Option<String>,
    attempt: &AttemptId,
) -> Result<(capstan_proto::pipeline::v1::TaskSpec, String), Status> {
    let ask = attempt_ask(runner, identity, attempt);
    leader
        .ask(|reply| Command::AttemptTask { ask, reply })
        .await
}

fn attempt_ask(
    (runner, secret): (String, String),
    identity: Option<String>,
    attempt: &AttemptId,
) -> AttemptAsk {
    AttemptAsk {
        runner: RunnerId::from_string(runner),
        secret,
        identity,
        attempt: attempt.clone(),
    }
}

/// What ended a [`gather`] short of [`APPEND_BATCH`].
#[derive(Default)]
struct Stop {
    /// A chunk of another log, or not following on: the next batch's first.
    carried: Option<LogChunk>,
    /// The stream ended.
    ended: bool,
    /// The stream broke (returned once the batch is stored).
    broke: Option<Status>,
}

/// The chunks of `attempt`'s log that follow on from the one at `offset`
/// (its `first` bytes) and have already arrived, taken off `chunks` without
/// waiting, so they go to the store in the same call.
fn gather(
    chunks: &mut Streaming<LogChunk>,
    attempt: &AttemptId,
    offset: u64,
    first: bytes::Bytes,
) -> (Vec<bytes::Bytes>, Stop) {
    let mut end = offset + first.len() as u64;
    let mut size = first.len();
    let mut parts = vec![first];
    let mut stop = Stop::default();
    while size < APPEND_BATCH {
        match futures::FutureExt::now_or_never(chunks.message()) {
            Some(Ok(Some(next))) if next.attempt_id == attempt.as_str() && next.offset == end => {
                end += next.data.len() as u64;
                size += next.data.len();
                parts.push(next.data);
            }
            Some(Ok(Some(next))) => {
                stop.carried = Some(next);
                break;
            }
            Some(Ok(None)) => {
                stop.ended = true;
                break;
            }
            Some(Err(status)) => {
                stop.broke = Some(status);
                break;
            }
            None => break,
        }
    }
    (parts, stop)
}

/// How long one authorization of an attempt's log on a `PushLogs` stream
/// holds. An attempt is superseded only after its runner was silent for a
/// lease (seconds), so bytes that arrive after that are checked again; a
/// round trip through the scheduler per batch of a busy log would cost
/// more than this bound buys.
const AUTH_FRESH: Duration = Duration::from_millis(200);

/// Most bytes of one stream handed to the log store in one call.
const APPEND_BATCH: usize = 2 * 1024 * 1024;

/// How long data past the end of a log waits for the gap to fill. A runner
/// sends its next `PushLogs` stream without waiting for the previous one's
/// ack, so a stream's first chunk can arrive while the stream before it is
/// still being appended; only if the gap stays is it refused (`OUT_OF_RANGE`).
const GAP_WAIT: Duration = Duration::from_secs(5);

impl RunnerApi {
    /// See [`identity`].
    fn identity<T>(&self, req: &Request<T>) -> Result<Option<String>, Status> {
        identity(&self.0, req)
    }

    /// Appends `parts` to `attempt`'s log at `offset` and counts the bytes
    /// this call added (`durable`: the lengths this stream already saw).
    /// Returns the log's new length.
    async fn store(
        &self,
        leader: &super::LeaderCtx,
        durable: &HashMap<AttemptId, u64>,
        attempt: &AttemptId,
        offset: u64,
        parts: Vec<bytes::Bytes>,
    ) -> Result<u64, Status> {
        let before = match durable.get(attempt) {
            Some(&n) => n,
            None => leader.logs.len(attempt).await.map_err(status::from_log)?,
        };
        let end = offset + parts.iter().map(|p| p.len() as u64).sum::<u64>();
        let limit = self.0.limits.task_log_bytes;
        if end > limit {
            // PERMISSION_DENIED: the runner's shipper stops sending this
            // log once the attempt has ended, and the report goes out.
            return Err(Status::permission_denied(format!(
                "the log of attempt {attempt} would be {end} bytes; the limit is {limit} \
                 (--max-task-log on the coordinator): the rest is not stored"
            )));
        }
        let len = self.append(leader, attempt, offset, parts).await?;
        // Bytes this call added (a chunk that waited for a gap starts
        // where the other stream left the log).
        let before = before.max(offset);
        if len > before {
            self.0.metrics.log_bytes.inc_by(len - before);
            self.0.feed.publish();
        }
        Ok(len)
    }

    /// Appends `parts` at `offset`, waiting up to [`GAP_WAIT`] for the log to
    /// reach `offset` (see there). Returns the log's new length.
    async fn append(
        &self,
        leader: &super::LeaderCtx,
        attempt: &AttemptId,
        offset: u64,
        parts: Vec<bytes::Bytes>,
    ) -> Result<u64, Status> {
        // Subscribed before the first try: an append that fills the gap
        // after it moves the feed.
        let mut feed = self.0.feed.subscribe();
        let deadline = tokio::time::Instant::now() + GAP_WAIT;
        loop {
            match leader
                .logs
                .append_parts(attempt, offset, parts.clone())
                .await
            {
                Err(crate::logs::LogError::Gap { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::select! {
                        changed = feed.changed() => if changed.is_err() {
                            return Err(Status::unavailable("the coordinator is shutting down"));
                        },
                        () = tokio::time::sleep_until(deadline) => {}
                        () = leader.token.cancelled() => return Err(Status::unavailable(
                            "this coordinator is no longer the leader; reconnect",
                        )),
                    }
                }
                result => return result.map_err(status::from_log),
            }
        }
    }
}

impl RunnerApi {
    /// Checks a Register's token: the fleet's shared one (`None`), or a
    /// single-use one, claimed until the registration is written.
    async fn registration_token(&self, req: &RegisterRequest) -> Result<Option<Claim<'_>>, Status> {
        if RunnerTokens::is_runner_token(&req.registration_token) {
            return self
                .0
                .runner_tokens
                .claim(&req.registration_token, now_ms())
                .await
                .map(Some)
                .map_err(|e| runner_token_refusal(&req.name, e));
        }
        if !secrets_equal(&req.registration_token, &self.0.registration_token) {
            tracing::warn!(name = %req.name, "registration refused: wrong registration token");
            return Err(Status::unauthenticated(
                "registration token rejected: check the runner's --registration-token",
            ));
        }
        Ok(None)
    }
}

fn runner_token_refusal(name: &str, e: RunnerTokenError) -> Status {
    match e {
        RunnerTokenError::Unknown | RunnerTokenError::Expired => {
            tracing::warn!(%name, reason = %e, "registration refused: single-use token");
            Status::unauthenticated(e.to_string())
        }
        RunnerTokenError::Used { .. } => {
            tracing::warn!(%name, reason = %e, "registration refused: single-use token");
            Status::permission_denied(e.to_string())
        }
        RunnerTokenError::Store(crate::store::StoreError::Fenced) => {
            Status::unavailable(e.to_string())
        }
        e => {
            tracing::error!(error = %e, "runner token store failure");
            Status::internal("the coordinator could not access its runner tokens; see its log")
        }
    }
}

/// Under mTLS, the subject of the caller's client certificate once it is
/// checked against `--tls-client-ca` (the handshake accepts any:
/// `capstan_tls::client_ca` says why), or the refusal of a caller without a
/// good one; `None` without mTLS.
pub(super) fn identity<T>(shared: &Shared, req: &Request<T>) -> Result<Option<String>, Status> {
    let Some(mtls) = &shared.mtls else {
        return Ok(None);
    };
    let certs = req.peer_certs();
    let chain = certs.as_deref().map(Vec::as_slice).unwrap_or_default();
    let Some(leaf) = chain.first() else {
        return Err(Status::unauthenticated(
            "this coordinator requires runners to present a client certificate \
                 (--tls-client-ca): start the runner with --tls-client-cert and --tls-client-key",
        ));
    };
    if let Err(e) = mtls.ca.verify(chain) {
        return Err(Status::unauthenticated(format!(
            "the runner's client certificate is not one this coordinator trusts ({e}): \
                 issue it from the CA given to the coordinator's --tls-client-ca"
        )));
    }
    capstan_tls::identity(leaf.as_ref()).map(Some).ok_or_else(|| {
            Status::unauthenticated(
                "the runner's client certificate names no one: give it a subject CN or a DNS subjectAltName",
            )
        })
}
