//! The agent: the connection to the coordinator and the Control message loop.
//!
//! One agent task owns all runner state (running attempts, unacknowledged
//! final reports, the leader epoch, draining); attempts run in their own
//! tasks and talk to it through an [`AttemptEvent`] channel, so no state is
//! shared behind locks.
//!
//! # Connection
//! Coordinator URLs are tried in turn; a `capstan-leader` metadata hint on an
//! error (a follower's answer) or a `LeaderMoved` message names the URL to
//! try next. Between attempts the agent waits a jittered exponential backoff
//! (100 ms doubling to 5 s, reset after each welcome) and keeps handling
//! attempt events meanwhile: attempts keep running while disconnected.
//! Each connection: `Register` if there is no cached credential, then
//! `Control` with `Hello`, then `Welcome` within 10 s.
//!
//! # Final reports and their acknowledgement
//! A finished attempt's `TaskFinished` is kept until acknowledged and resent
//! after every (re)connect (the coordinator treats repeats as no-ops). It is
//! acknowledged when a `Welcome` lists it in `acknowledged`: the coordinator
//! sends one right after the report is durable (and in every welcome of a
//! new stream for reports it already has). Writing the report to a stream
//! proves nothing — it may sit in a send queue while the connection dies.
//!
//! Acknowledged reports are forgotten and their log spool deleted. Until
//! then the attempt is listed in `Hello.running_attempts`.
//!
//! # Drain
//! `shutdown` cancelled or a `Drain` message: offers are rejected with
//! "draining" and heartbeats say `draining`; once no attempt runs, the agent
//! sends `GoingAway`, ends its side of the stream and waits (up to 5 s) for
//! the coordinator to end its side, which shows everything sent before
//! arrived. Then [`Agent::run`] returns.
//!
//! # Tentative offers
//! The hello says `confirms_offers`, so the coordinator may send an offer
//! before it is durable (`Offer.tentative`). Such an attempt is accepted and
//! its task prepares (work dir, log spool, shipper) and then waits on a
//! oneshot the agent keeps in [`Held::confirm`]; the agent fires it when the
//! `ConfirmOffer` arrives. Until then nothing of it runs. When the Control
//! stream ends first (any session end) or a `Cancel` for it comes first, the
//! agent drops the sender: the attempt removes its files and ends without a
//! report, and its slot is free at once. It is not in the next hello, so a
//! coordinator that did write the offer requeues it as lost.
//!
//! # Fencing
//! `Offer`, `ConfirmOffer`, `Cancel` and `Drain` carrying a leader epoch
//! older than the newest seen (from welcomes and messages) are ignored.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use capstan_shared::ids::RunnerId;
use capstan_shared::proto::runner::v1::runner_service_client::RunnerServiceClient;
use capstan_shared::proto::runner::v1::{
    Cancel, ConfirmOffer, CoordinatorMessage, GoingAway, Heartbeat, Hello, Offer, OfferAccepted,
    OfferRejected, RegisterRequest, RunnerMessage, StepStateChanged, TaskFinished, Welcome,
    coordinator_message, runner_message,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::attempt::{self, AttemptEvent, AttemptSpec, chain};
use crate::backoff::Backoff;
use crate::credentials::{self, Credentials};
use crate::executor::Executor;
use crate::logs::LogTarget;
use crate::workdir::{WorkDir, valid_attempt_id};
use crate::{Error, RunnerConfig};

/// Metadata key a follower uses to name the leader.
pub(crate) const LEADER_METADATA: &str = "capstan-leader";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
const GOING_AWAY_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
const OUTBOX: usize = 256;

struct Session {
    tx: mpsc::Sender<RunnerMessage>,
    inbound: Streaming<CoordinatorMessage>,
    welcome: Welcome,
    /// The Control stream's connection, held for as long as the stream.
    client: RunnerServiceClient<Channel>,
    /// For `PushLogs`: its own HTTP/2 connection (see `connect`).
    log_client: RunnerServiceClient<Channel>,
    credentials: Credentials,
}

/// The sending side of the current Control stream.
struct Conn {
    tx: mpsc::Sender<RunnerMessage>,
    /// Which stream this is (increments per connection).
    generation: u64,
    /// Heartbeats sent on it so far.
    heartbeats: u64,
}

impl Conn {
    /// False when the stream is gone.
    async fn send(&self, kind: runner_message::Kind) -> bool {
        self.tx
            .send(RunnerMessage { kind: Some(kind) })
            .await
            .is_ok()
    }
}

enum SessionEnd {
    Reconnect,
    Drained,
}

enum ConnectError {
    Retry(String),
    /// A coordinator answered but cannot take us now (a follower, or no
    /// leader is elected yet): it is alive, so retry soon, not after a
    /// growing backoff — a failover would otherwise wait out seconds of it.
    NotLeader(String),
    Fatal(Error),
}

/// Wait before asking again after a follower's answer.
const NOT_LEADER_RETRY: Duration = Duration::from_millis(200);

/// An attempt holding one of this runner's slots.
struct Held {
    /// Stops the attempt (a `Cancel`, or the agent failing).
    cancel: CancellationToken,
    /// Set while a tentative offer waits for its `ConfirmOffer`: sending
    /// lets the attempt run; dropping it unsent drops the attempt (see the
    /// module docs).
    confirm: Option<oneshot::Sender<()>>,
}

struct FinishedAttempt {
    report: TaskFinished,
    /// (stream generation, heartbeats sent on it) when last written.
    sent: Option<(u64, u64)>,
}

pub(crate) struct Agent {
    config: RunnerConfig,
    work_dir: Arc<WorkDir>,
    executor: Arc<dyn Executor>,
    credentials: Option<Credentials>,
    reregistered: bool,
    shutdown: CancellationToken,
    draining: bool,
    epoch: u64,
    running: HashMap<String, Held>,
    /// Unconfirmed attempts dropped when a stream ended, for the next hello
    /// (the coordinator requeues them without counting a failure).
    dropped: Vec<String>,
    finished: BTreeMap<String, FinishedAttempt>,
    pending_steps: VecDeque<StepStateChanged>,
    events_tx: mpsc::UnboundedSender<AttemptEvent>,
    events_rx: mpsc::UnboundedReceiver<AttemptEvent>,
    log_target: watch::Sender<Option<LogTarget>>,
    tracker: TaskTracker,
    generation: u64,
    next_url: usize,
    leader_hint: Option<String>,
    secrets: Arc<crate::secrets::Secrets>,
    /// Byte patterns masked in every step's output (from `secrets`).
    mask: Arc<Vec<Vec<u8>>>,
}

impl Agent {
    pub(crate) fn new(
        config: RunnerConfig,
        work_dir: WorkDir,
        executor: Arc<dyn Executor>,
        credentials: Option<Credentials>,
        shutdown: CancellationToken,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Self {
            config,
            work_dir: Arc::new(work_dir),
            executor,
            credentials,
            reregistered: false,
            shutdown,
            draining: false,
            epoch: 0,
            running: HashMap::new(),
            finished: BTreeMap::new(),
            pending_steps: VecDeque::new(),
            events_tx,
            events_rx,
            log_target: watch::Sender::new(None),
            tracker: TaskTracker::new(),
            generation: 0,
            next_url: 0,
            leader_hint: None,
            dropped: Vec::new(),
            secrets: Arc::default(),
            mask: Arc::default(),
        }
    }

    /// The runner's secrets: resolved for the steps that name them, and
    /// masked in every step's output.
    pub(crate) fn with_secrets(mut self, secrets: Arc<crate::secrets::Secrets>) -> Self {
        self.mask = Arc::new(crate::logs::mask::patterns(&secrets.values()));
        self.secrets = secrets;
        self
    }

    /// Runs until drained (Ok) or a fatal error. On an error, running
    /// attempts are cancelled and awaited.
    pub(crate) async fn run(mut self) -> Result<(), Error> {
        let result = self.run_loop().await;
        if result.is_err() {
            for held in self.running.values() {
                held.cancel.cancel();
            }
        }
        self.tracker.close();
        self.tracker.wait().await;
        result
    }

    fn nothing_left(&self) -> bool {
        self.draining && self.running.is_empty() && self.finished.is_empty()
    }

    async fn run_loop(&mut self) -> Result<(), Error> {
        let mut backoff = Backoff::new();
        loop {
            if self.nothing_left() {
                info!("drained: no attempt running and no report to deliver");
                return Ok(());
            }
            let url = self.next_url();
            match self.connect(&url).await {
                Ok(session) => {
                    backoff.reset();
                    let end = self.serve(session).await;
                    // No confirm can come for them any more.
                    self.drop_unconfirmed("the control stream ended");
                    if let SessionEnd::Drained = end? {
                        return Ok(());
                    }
                }
                Err(ConnectError::Fatal(e)) => return Err(e),
                Err(ConnectError::NotLeader(reason)) => {
                    info!(%url, %reason, "coordinator cannot take this runner now; retrying soon");
                    backoff.reset();
                    self.wait_offline(NOT_LEADER_RETRY.mul_f64(rand::random_range(0.8..=1.2)))
                        .await;
                    continue;
                }
                Err(ConnectError::Retry(reason)) => {
                    warn!(%url, %reason, "could not connect to the coordinator; retrying");
                }
            }
            self.wait_offline(backoff.next_delay()).await;
        }
    }

    fn next_url(&mut self) -> String {
        if let Some(hint) = self.leader_hint.take() {
            return hint;
        }
        let urls = &self.config.coordinators;
        let url = urls[self.next_url % urls.len()].clone();
        self.next_url = self.next_url.wrapping_add(1);
        url
    }

    /// Waits `delay` while disconnected, still handling attempt events and
    /// shutdown. Returns early once a drain has nothing left to do.
    async fn wait_offline(&mut self, delay: Duration) {
        let until = Instant::now() + delay;
        loop {
            if self.nothing_left() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                () = self.shutdown.cancelled(), if !self.draining => {
                    self.start_drain("shutdown requested");
                }
                Some(event) = self.events_rx.recv() => {
                    self.handle_event(event, None).await;
                }
            }
        }
    }

    /// Drops every attempt still waiting for its `ConfirmOffer`: its task
    /// cleans up and ends without a report, and its slot is free now.
    fn drop_unconfirmed(&mut self, why: &str) {
        let dropped = &mut self.dropped;
        self.running.retain(|id, held| {
            if held.confirm.is_some() {
                info!(attempt = %id, reason = why, "dropping an attempt whose offer was never confirmed; nothing of it ran");
                dropped.push(id.clone());
            }
            held.confirm.is_none()
        });
    }

    fn start_drain(&mut self, why: &str) {
        if !self.draining {
            info!(
                reason = why,
                running = self.running.len(),
                "draining: accepting no new attempts"
            );
            self.draining = true;
        }
    }

    fn note_leader_hint(&mut self, status: &tonic::Status) {
        if let Some(leader) = status
            .metadata()
            .get(LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
        {
            info!(%leader, "coordinator is a follower; following its leader hint");
            self.leader_hint = Some(leader.to_owned());
        }
    }

    fn retry(&mut self, what: &str, status: &tonic::Status) -> ConnectError {
        self.note_leader_hint(status);
        let reason = format!("{what}: {:?}: {}", status.code(), status.message());
        if status.code() == tonic::Code::Unavailable {
            ConnectError::NotLeader(reason)
        } else {
            ConnectError::Retry(reason)
        }
    }

    async fn connect(&mut self, url: &str) -> Result<Session, ConnectError> {
        info!(%url, "connecting to coordinator");
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|source| {
                ConnectError::Retry(format!("invalid coordinator URL: {}", chain(&source)))
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ConnectError::Retry(chain(&e)))?;
        let mut client = RunnerServiceClient::new(channel);
        // Logs go over a second connection, made on first use. On one
        // connection, log streams the coordinator is slow to read (a log
        // waiting for its attempt's authorization or for a gap to fill) hold
        // the connection's HTTP/2 flow-control window, and the Control
        // stream's heartbeats would wait behind them: a runner shipping a
        // big log could be judged lost while healthy.
        let log_client = RunnerServiceClient::new(endpoint.connect_lazy());
        let credentials = match self.credentials.clone() {
            Some(c) => c,
            None => self.register(&mut client).await?,
        };
        match open_control(&mut client, self.hello(&credentials)).await {
            Ok((tx, inbound, welcome)) => Ok(Session {
                tx,
                inbound,
                welcome,
                client,
                log_client,
                credentials,
            }),
            Err(status) if status.code() == tonic::Code::Unauthenticated && !self.reregistered => {
                warn!("the coordinator rejected this runner's credentials; registering again");
                self.reregistered = true;
                let credentials = self.register(&mut client).await?;
                match open_control(&mut client, self.hello(&credentials)).await {
                    Ok((tx, inbound, welcome)) => Ok(Session {
                        tx,
                        inbound,
                        welcome,
                        client,
                        log_client,
                        credentials,
                    }),
                    Err(status) => Err(self.control_error(&status)),
                }
            }
            Err(status) => Err(self.control_error(&status)),
        }
    }

    fn control_error(&mut self, status: &tonic::Status) -> ConnectError {
        match status.code() {
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
        let request = RegisterRequest {
            registration_token: self.config.registration_token.clone(),
            name: self.config.name.clone(),
            labels: self.config.labels.clone().into_iter().collect(),
            capacity: self.config.capacity,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let response = match client.register(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                return Err(ConnectError::Fatal(Error::RegistrationRejected));
            }
            Err(status) => return Err(self.retry("register", &status)),
        };
        let credentials = Credentials {
            runner_id: RunnerId::from_string(response.runner_id),
            runner_secret: response.runner_secret,
        };
        credentials::save(&self.work_dir.credentials_file(), &credentials)
            .await
            .map_err(|e| ConnectError::Fatal(e.into()))?;
        info!(runner_id = %credentials.runner_id, name = %self.config.name, "registered with coordinator");
        self.credentials = Some(credentials.clone());
        Ok(credentials)
    }

    fn hello(&self, credentials: &Credentials) -> Hello {
        Hello {
            runner_id: credentials.runner_id.to_string(),
            runner_secret: credentials.runner_secret.clone(),
            protocol_version: capstan_shared::PROTOCOL_VERSION,
            running_attempts: self
                .running
                .keys()
                .chain(self.finished.keys())
                .cloned()
                .collect(),
            capacity: self.config.capacity,
            labels: self.config.labels.clone().into_iter().collect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            last_epoch: self.epoch,
            confirms_offers: true,
            dropped_attempts: self.dropped.clone(),
        }
    }

    async fn serve(&mut self, session: Session) -> Result<SessionEnd, Error> {
        let Session {
            tx,
            mut inbound,
            welcome,
            client: _control_client,
            log_client,
            credentials,
        } = session;
        // The welcome answered a hello that listed them.
        self.dropped.clear();
        self.generation += 1;
        let mut conn = Conn {
            tx,
            generation: self.generation,
            heartbeats: 0,
        };
        // The leader that welcomed us sets the epoch: it may be lower than
        // one seen before if the coordinators' state was rebuilt; an offer
        // runs only once durable (sent after a fenced write succeeded, or
        // confirmed after one), so a stale leader cannot use this to get
        // work run.
        self.epoch = welcome.leader_epoch;
        let interval = match welcome.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        // Idle, the runner holds no lease: heartbeat rarely (an older
        // coordinator sends 0: the one interval).
        let idle_interval =
            Duration::from_millis(u64::from(welcome.idle_heartbeat_interval_ms)).max(interval);
        info!(
            epoch = welcome.leader_epoch,
            heartbeat_ms = interval.as_millis(),
            idle_heartbeat_ms = idle_interval.as_millis(),
            reattached = ?welcome.reattached,
            acknowledged = ?welcome.acknowledged,
            "welcomed by coordinator"
        );
        self.log_target.send_replace(Some(LogTarget {
            client: log_client,
            credentials,
        }));
        self.forget_acknowledged(&welcome.acknowledged).await;
        while let Some(step) = self.pending_steps.pop_front() {
            if !conn.send(runner_message::Kind::Step(step)).await {
                return Ok(SessionEnd::Reconnect);
            }
        }
        let unacknowledged: Vec<String> = self.finished.keys().cloned().collect();
        for id in unacknowledged {
            if !self.send_finished(&conn, &id).await {
                return Ok(SessionEnd::Reconnect);
            }
        }
        // The first heartbeat after any coordinator message or attempt event
        // comes within the busy interval: an accepted offer starts a lease,
        // and a runner paused for a rejected offer is un-paused by it.
        let period = |agent: &Self| {
            if agent.running.is_empty() {
                idle_interval
            } else {
                interval
            }
        };
        let mut next_beat = tokio::time::Instant::now() + period(self);
        loop {
            if self.draining && self.running.is_empty() {
                return Ok(self.finish_drain(conn, inbound).await);
            }
            tokio::select! {
                () = self.shutdown.cancelled(), if !self.draining => {
                    self.start_drain("shutdown requested");
                    if !self.heartbeat(&mut conn).await {
                        return Ok(SessionEnd::Reconnect);
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if let Some(end) = self.handle_message(message, &mut conn).await {
                            return Ok(end);
                        }
                        next_beat = next_beat.min(tokio::time::Instant::now() + interval);
                    }
                    Ok(None) => {
                        warn!("coordinator closed the control stream; reconnecting");
                        return Ok(SessionEnd::Reconnect);
                    }
                    Err(status) => {
                        self.note_leader_hint(&status);
                        warn!(code = ?status.code(), message = status.message(), "control stream failed; reconnecting");
                        return Ok(SessionEnd::Reconnect);
                    }
                },
                Some(event) = self.events_rx.recv() => {
                    if !self.handle_event(event, Some(&conn)).await {
                        return Ok(SessionEnd::Reconnect);
                    }
                    next_beat = next_beat.min(tokio::time::Instant::now() + interval);
                }
                () = tokio::time::sleep_until(next_beat) => {
                    if !self.heartbeat(&mut conn).await {
                        return Ok(SessionEnd::Reconnect);
                    }
                    next_beat = tokio::time::Instant::now() + period(self);
                }
            }
        }
    }

    /// Sends a heartbeat and acknowledges the reports this stream has now
    /// carried for a full interval (see the module docs).
    async fn heartbeat(&mut self, conn: &mut Conn) -> bool {
        let running = u32::try_from(self.running.len()).unwrap_or(u32::MAX);
        let beat = Heartbeat {
            free_slots: if self.draining {
                0
            } else {
                self.config.capacity.saturating_sub(running)
            },
            load: load_average(),
            draining: self.draining,
        };
        if !conn.send(runner_message::Kind::Heartbeat(beat)).await {
            return false;
        }
        conn.heartbeats += 1;
        true
    }

    async fn forget_acknowledged(&mut self, ids: &[String]) {
        for id in ids {
            if self.finished.remove(id).is_some() {
                debug!(attempt = %id, "final report acknowledged");
                if let Err(e) = self.work_dir.retire_spool(id).await {
                    let spool = self.work_dir.spool_path(id);
                    warn!(path = %spool.display(), error = %e, "could not remove log spool");
                }
            }
        }
    }

    async fn send_finished(&mut self, conn: &Conn, id: &str) -> bool {
        let Some(finished) = self.finished.get_mut(id) else {
            return true;
        };
        if !conn
            .send(runner_message::Kind::Finished(finished.report.clone()))
            .await
        {
            return false;
        }
        finished.sent = Some((conn.generation, conn.heartbeats));
        true
    }

    /// Handles an attempt's event; `conn` is `None` while disconnected.
    /// False when the stream is gone.
    async fn handle_event(&mut self, event: AttemptEvent, conn: Option<&Conn>) -> bool {
        match event {
            AttemptEvent::Step(step) => match conn {
                Some(conn) => conn.send(runner_message::Kind::Step(step)).await,
                None => {
                    self.pending_steps.push_back(step);
                    true
                }
            },
            AttemptEvent::Finished(report) => {
                let id = report.attempt_id.clone();
                self.running.remove(&id);
                self.finished
                    .insert(id.clone(), FinishedAttempt { report, sent: None });
                match conn {
                    Some(conn) => self.send_finished(conn, &id).await,
                    None => true,
                }
            }
        }
    }

    /// Handles one coordinator message; `Some` ends the session.
    async fn handle_message(
        &mut self,
        message: CoordinatorMessage,
        conn: &mut Conn,
    ) -> Option<SessionEnd> {
        use coordinator_message::Kind;
        let alive = match message.kind {
            Some(Kind::Welcome(welcome)) => {
                self.epoch = self.epoch.max(welcome.leader_epoch);
                self.forget_acknowledged(&welcome.acknowledged).await;
                true
            }
            Some(Kind::Offer(offer)) => self.handle_offer(offer, conn).await,
            Some(Kind::Confirm(confirm)) => {
                self.handle_confirm(confirm);
                true
            }
            Some(Kind::Cancel(cancel)) => {
                self.handle_cancel(cancel);
                true
            }
            Some(Kind::Drain(drain)) => {
                if self.fenced(drain.leader_epoch, "drain") {
                    return None;
                }
                self.start_drain("the coordinator asked this runner to drain");
                self.heartbeat(conn).await
            }
            Some(Kind::LeaderMoved(moved)) => {
                info!(endpoint = %moved.endpoint, "leader moved; reconnecting");
                if !moved.endpoint.is_empty() {
                    self.leader_hint = Some(moved.endpoint);
                }
                return Some(SessionEnd::Reconnect);
            }
            None => true,
        };
        (!alive).then_some(SessionEnd::Reconnect)
    }

    /// True (and logged) when `epoch` is older than the newest seen.
    fn fenced(&mut self, epoch: u64, what: &str) -> bool {
        if epoch < self.epoch {
            info!(
                epoch,
                newest = self.epoch,
                what,
                "ignoring a message from an older leader epoch"
            );
            return true;
        }
        self.epoch = epoch;
        false
    }

    /// Lets a tentative offer's attempt run.
    fn handle_confirm(&mut self, confirm: ConfirmOffer) {
        if self.fenced(confirm.leader_epoch, "confirm") {
            return;
        }
        let waiting = self
            .running
            .get_mut(&confirm.attempt_id)
            .and_then(|held| held.confirm.take());
        match waiting {
            Some(go) => {
                debug!(attempt = %confirm.attempt_id, "offer confirmed; starting the attempt");
                // Fails only if the attempt task is gone: it panicked while
                // preparing, and reported that itself.
                let _ = go.send(());
            }
            None => {
                debug!(attempt = %confirm.attempt_id, "confirm for an attempt not waiting for one here");
            }
        }
    }

    /// Stops an attempt; one still waiting for its confirm is dropped
    /// (nothing of it ran, nothing is reported).
    fn handle_cancel(&mut self, cancel: Cancel) {
        if self.fenced(cancel.leader_epoch, "cancel") {
            return;
        }
        let unconfirmed = match self.running.get(&cancel.attempt_id) {
            Some(held) => held.confirm.is_some(),
            None => {
                debug!(attempt = %cancel.attempt_id, "cancel for an attempt not running here");
                return;
            }
        };
        if unconfirmed {
            // It reports itself cancelled (nothing of it ran): the
            // coordinator keeps the attempt, and this runner's slot, until
            // it hears so. No longer waiting for a confirm, it outlives the
            // stream like any running attempt.
            info!(attempt = %cancel.attempt_id, reason = %cancel.reason, "cancelling an unconfirmed attempt; nothing of it ran");
            if let Some(held) = self.running.get_mut(&cancel.attempt_id) {
                held.cancel.cancel();
                held.confirm = None;
            }
        } else {
            info!(attempt = %cancel.attempt_id, reason = %cancel.reason, "cancelling attempt");
            self.running[&cancel.attempt_id].cancel.cancel();
        }
    }

    async fn handle_offer(&mut self, offer: Offer, conn: &Conn) -> bool {
        if self.fenced(offer.leader_epoch, "offer") {
            return true;
        }
        let id = offer.attempt_id.clone();
        if self.running.contains_key(&id) {
            // A repeated offer of what already runs here: confirm it again.
            return conn
                .send(runner_message::Kind::Accept(OfferAccepted {
                    attempt_id: id,
                }))
                .await;
        }
        let capacity = usize::try_from(self.config.capacity).unwrap_or(usize::MAX);
        let reject = if self.draining {
            Some("draining")
        } else if !valid_attempt_id(&id) {
            Some("invalid attempt id")
        } else if self.finished.contains_key(&id) {
            Some("attempt already finished on this runner")
        } else if self.running.len() >= capacity {
            Some("no free slot")
        } else {
            None
        };
        if let Some(reason) = reject {
            info!(attempt = %id, reason, "rejected offer");
            return conn
                .send(runner_message::Kind::Reject(OfferRejected {
                    attempt_id: id,
                    reason: reason.to_owned(),
                }))
                .await;
        }
        if !conn
            .send(runner_message::Kind::Accept(OfferAccepted {
                attempt_id: id.clone(),
            }))
            .await
        {
            return false;
        }
        info!(
            attempt = %id,
            run = %offer.run_id,
            task = %offer.task_name,
            attempt_number = offer.attempt_number,
            tentative = offer.tentative,
            "accepted offer"
        );
        let cancel = CancellationToken::new();
        let (confirm, confirmed) = if offer.tentative {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.running.insert(
            id.clone(),
            Held {
                cancel: cancel.clone(),
                confirm,
            },
        );
        let span = info_span!(
            "attempt",
            run = %offer.run_id,
            task = %offer.task_name,
            attempt = %id,
            capstan.attempt.number = offer.attempt_number,
            capstan.attempt.outcome = tracing::field::Empty,
        );
        // The coordinator's dispatch span (README "Tracing"): this attempt
        // joins the run's trace.
        capstan_shared::telemetry::TraceHeaders {
            traceparent: offer.traceparent.clone(),
            tracestate: offer.tracestate.clone(),
        }
        .set_parent_of(&span);
        let spec = AttemptSpec {
            offer,
            work_dir: Arc::clone(&self.work_dir),
            executor: Arc::clone(&self.executor),
            cancel,
            confirmed,
            events: self.events_tx.clone(),
            log_target: self.log_target.subscribe(),
            secrets: Arc::clone(&self.secrets),
            mask: Arc::clone(&self.mask),
            git_credentials: self.config.git_credentials.clone(),
            git_author: self.config.git_author.clone(),
            step_log_cap: self.config.step_log_cap,
            log_memory: crate::logs::spool::budget_for(self.config.capacity),
        };
        self.tracker.spawn(attempt::run(spec).instrument(span));
        true
    }

    /// All attempts are done: say goodbye and wait for the coordinator to
    /// close the stream, which shows everything sent before it arrived.
    async fn finish_drain(
        &mut self,
        conn: Conn,
        mut inbound: Streaming<CoordinatorMessage>,
    ) -> SessionEnd {
        info!("drain complete; sending GoingAway");
        let going_away = GoingAway {
            reason: "drained".into(),
        };
        if !conn.send(runner_message::Kind::GoingAway(going_away)).await {
            return SessionEnd::Reconnect;
        }
        drop(conn);
        let closed = tokio::time::timeout(GOING_AWAY_TIMEOUT, async {
            loop {
                match inbound.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return true,
                    Err(_) => return false,
                }
            }
        })
        .await;
        match closed {
            Ok(true) => SessionEnd::Drained,
            Ok(false) => SessionEnd::Reconnect,
            Err(_) => {
                warn!(
                    "the coordinator did not close the control stream after GoingAway; exiting anyway"
                );
                SessionEnd::Drained
            }
        }
    }
}

/// Opens the Control stream: sends `hello`, expects `Welcome` first.
async fn open_control(
    client: &mut RunnerServiceClient<Channel>,
    hello: Hello,
) -> Result<
    (
        mpsc::Sender<RunnerMessage>,
        Streaming<CoordinatorMessage>,
        Welcome,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(OUTBOX);
    tx.send(RunnerMessage {
        kind: Some(runner_message::Kind::Hello(hello)),
    })
    .await
    .map_err(|_| tonic::Status::internal("control outbox closed"))?;
    let mut inbound =
        tokio::time::timeout(WELCOME_TIMEOUT, client.control(ReceiverStream::new(rx)))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no answer to hello in time"))??
            .into_inner();
    let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no welcome in time"))??;
    match first.and_then(|m| m.kind) {
        Some(coordinator_message::Kind::Welcome(welcome)) => Ok((tx, inbound, welcome)),
        Some(other) => Err(tonic::Status::internal(format!(
            "expected welcome, got {other:?}"
        ))),
        None => Err(tonic::Status::unavailable(
            "control stream ended before welcome",
        )),
    }
}

/// One-minute load average from /proc/loadavg (0 where unavailable).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod agent_tests {
    use super::*;
    use crate::testing::{self, RUNNER_ID, TOKEN};
    use crate::{ExecutorKind, RunnerConfig};
    use capstan_shared::proto::pipeline::v1::{RunStep, Step, StepState, TaskSpec, step};
    use capstan_shared::proto::runner::v1::{AttemptOutcome, Cancel};
    use coordinator_message::Kind as Down;
    use runner_message::Kind as Up;
    use std::path::{Path, PathBuf};

    fn config(url: String, token: &str, work_dir: &Path) -> RunnerConfig {
        RunnerConfig {
            coordinators: vec![url],
            registration_token: token.into(),
            name: "r1".into(),
            labels: BTreeMap::from([("os".into(), "linux".into())]),
            capacity: 1,
            executor: ExecutorKind::Fake,
            work_dir: work_dir.to_owned(),
            ..RunnerConfig::default()
        }
    }

    fn offer(id: &str, scripts: &[&str]) -> Down {
        Down::Offer(Offer {
            leader_epoch: 1,
            attempt_id: id.into(),
            run_id: "run-1".into(),
            task_name: "t".into(),
            attempt_number: 1,
            task: Some(TaskSpec {
                name: "t".into(),
                steps: scripts
                    .iter()
                    .map(|s| Step {
                        kind: Some(step::Kind::Run(RunStep {
                            script: (*s).into(),
                            image: String::new(),
                        })),
                        ..Step::default()
                    })
                    .collect(),
                ..TaskSpec::default()
            }),
            offer_timeout_ms: 5000,
            ..Offer::default()
        })
    }

    /// The next runner message that is not a heartbeat.
    async fn next(server: &mut testing::Handle) -> Up {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), server.from_runner.recv())
                .await
                .expect("runner went quiet")
                .expect("channel closed");
            match m.kind {
                Some(Up::Heartbeat(_)) => {}
                Some(kind) => return kind,
                None => panic!("empty runner message"),
            }
        }
    }

    /// Idle, the runner heartbeats at the welcome's idle interval (500 ms
    /// with the fake's 100 ms heartbeat); running an attempt, at the busy
    /// one, from the offer on.
    /// Heartbeats the runner sends within `window`; other messages are dropped.
    async fn count_beats(server: &mut testing::Handle, window: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + window;
        let mut beats = 0;
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, server.from_runner.recv()).await {
            if matches!(m.kind, Some(Up::Heartbeat(_))) {
                beats += 1;
            }
        }
        beats
    }

    #[tokio::test]
    async fn heartbeats_are_rare_when_idle_and_frequent_when_busy() {
        let (mut r, _) = TestRunner::start_on(testing::start().await, ExecutorKind::Fake).await;
        let idle = count_beats(&mut r.server, Duration::from_millis(1600)).await;
        assert!((2..=4).contains(&idle), "{idle} heartbeats in 1.6 s idle");
        r.server.send(offer("att-busy", &["sleep 1600"])).await;
        let busy = count_beats(&mut r.server, Duration::from_millis(1500)).await;
        assert!(busy >= 10, "{busy} heartbeats in 1.5 s busy");
        r.stop().await;
    }

    /// A coordinator that stops reading a log (here: 30 s per chunk) must
    /// not stop the runner's heartbeats: logs have their own connection, so
    /// the unread bytes do not hold the Control stream's flow-control window.
    #[tokio::test]
    async fn heartbeats_go_on_while_the_coordinator_stalls_on_a_log() {
        let server = testing::start_with_window(1 << 20).await;
        server.coordinator.logs.lock().unwrap().chunk_delay = Duration::from_secs(30);
        let (r, _) = TestRunner::start_on(server, ExecutorKind::Fake).await;
        // The work dir lives as long as the test.
        let TestRunner {
            mut server,
            work: _work,
            shutdown,
            task: runner,
            ..
        } = r;
        // Far more than the fake's 1 MiB HTTP/2 windows (stream and
        // connection alike, so the stalled stream fills the connection's).
        server
            .send(offer("att-big", &["output 16000000\nsleep 5000"]))
            .await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(
            server.coordinator.logs.lock().unwrap().streams >= 1,
            "the log was not being shipped"
        );
        let busy = count_beats(&mut server, Duration::from_millis(1500)).await;
        assert!(busy >= 8, "{busy} heartbeats in 1.5 s with a stalled log");
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), runner).await;
    }

    #[tokio::test]
    async fn runs_offers_reports_and_drains() {
        let (r, hello) = TestRunner::start_on(testing::start().await, ExecutorKind::Fake).await;
        let TestRunner {
            mut server,
            work: dir,
            shutdown,
            task: runner,
            ..
        } = r;
        assert_eq!(hello.runner_id, RUNNER_ID);
        assert_eq!(hello.protocol_version, capstan_shared::PROTOCOL_VERSION);
        assert!(dir.path().join("runner.json").exists());

        server
            .send(offer(
                "att-1",
                &["echo hello\nsleep 300", "echo bye\nexit 3", "echo never"],
            ))
            .await;
        assert!(matches!(next(&mut server).await, Up::Accept(a) if a.attempt_id == "att-1"));
        // Full: a second offer is rejected while att-1 runs.
        server.send(offer("att-2", &["echo x"])).await;
        let mut steps = Vec::new();
        let finished = loop {
            match next(&mut server).await {
                Up::Reject(r) => {
                    assert_eq!(r.attempt_id, "att-2");
                    assert_eq!(r.reason, "no free slot");
                }
                Up::Step(s) => steps.push((s.step_index, s.state(), s.exit_code)),
                Up::Finished(f) => break f,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(
            steps,
            [
                (0, StepState::Running, None),
                (0, StepState::Succeeded, Some(0)),
                (1, StepState::Running, None),
                (1, StepState::Failed, Some(3)),
            ]
        );
        assert_eq!(finished.outcome(), AttemptOutcome::Failed);
        assert_eq!(finished.exit_code, Some(3));
        assert_eq!(finished.message, "step 2 (run) exited with 3");
        let expected = "$ echo hello\nhello\n$ echo bye\nbye\n";
        assert_eq!(finished.log_length, expected.len() as u64);
        {
            let logs = server.coordinator.logs.lock().unwrap();
            assert_eq!(String::from_utf8_lossy(&logs.logs["att-1"]), expected);
        }
        assert!(!dir.path().join("attempts/att-1").exists());

        // A cancelled attempt.
        server.send(offer("att-3", &["echo start\nhang"])).await;
        assert!(matches!(next(&mut server).await, Up::Accept(_)));
        assert!(matches!(next(&mut server).await, Up::Step(_)));
        server
            .send(Down::Cancel(Cancel {
                leader_epoch: 1,
                attempt_id: "att-3".into(),
                reason: "run cancelled".into(),
            }))
            .await;
        let finished = loop {
            match next(&mut server).await {
                Up::Step(s) => assert_ne!(s.state(), StepState::Succeeded),
                Up::Finished(f) => break f,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(finished.outcome(), AttemptOutcome::Cancelled);

        // Drain: GoingAway, then run returns Ok.
        shutdown.cancel();
        assert!(matches!(next(&mut server).await, Up::GoingAway(_)));
        tokio::time::timeout(Duration::from_secs(10), runner)
            .await
            .expect("runner did not stop")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn wrong_registration_token_is_a_clear_error() {
        let server = testing::start().await;
        let dir = tempfile::tempdir().unwrap();
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            crate::run(
                config(server.url(), "wrong", dir.path()),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("runner kept retrying");
        let text = format!("{:#}", result.unwrap_err());
        assert!(
            text.contains("registration token rejected by the coordinator"),
            "{text}"
        );
    }

    /// A tentative offer of one `touch MARKER` step, for the shell executor.
    fn tentative_touch(id: &str, epoch: u64, marker: &Path) -> Down {
        let Down::Offer(mut offer) = offer(id, &[&format!("touch {}", marker.display())]) else {
            unreachable!("offer() makes offers")
        };
        offer.leader_epoch = epoch;
        offer.tentative = true;
        Down::Offer(offer)
    }

    fn confirm(id: &str, epoch: u64) -> Down {
        Down::Confirm(ConfirmOffer {
            leader_epoch: epoch,
            attempt_id: id.into(),
        })
    }

    /// The runner messages other than heartbeats sent within `window`.
    async fn quiet_for(server: &mut testing::Handle, window: Duration) -> Vec<Up> {
        let deadline = tokio::time::Instant::now() + window;
        let mut said = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, server.from_runner.recv()).await {
            match m.kind {
                Some(Up::Heartbeat(_)) | None => {}
                Some(kind) => said.push(kind),
            }
        }
        said
    }

    /// Waits (up to 10 s) until `done` holds.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A shell runner with one slot, started, past its first hello.
    /// A real runner (`crate::run`) against the fake coordinator.
    struct TestRunner {
        server: testing::Handle,
        work: tempfile::TempDir,
        /// Where the steps leave their marker files.
        marks: tempfile::TempDir,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl TestRunner {
        /// A runner with `executor` connected to `server`, past its hello.
        async fn start_on(mut server: testing::Handle, executor: ExecutorKind) -> (Self, Hello) {
            let work = tempfile::tempdir().unwrap();
            let marks = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            let mut config = config(server.url(), TOKEN, work.path());
            config.executor = executor;
            let task = tokio::spawn(crate::run(config, shutdown.clone()));
            let Up::Hello(hello) = next(&mut server).await else {
                panic!("expected hello")
            };
            let runner = Self {
                server,
                work,
                marks,
                shutdown,
                task,
            };
            (runner, hello)
        }

        /// A shell-executor runner on a fresh fake coordinator.
        async fn shell() -> Self {
            let (runner, hello) = Self::start_on(testing::start().await, ExecutorKind::Shell).await;
            assert!(hello.confirms_offers, "the runner confirms offers");
            runner
        }

        fn marker(&self, name: &str) -> PathBuf {
            self.marks.path().join(name)
        }

        /// The entries of the work dir's `sub` dir, spares left out.
        fn leftovers(&self, sub: &str) -> Vec<String> {
            testing::dir_names(&self.work.path().join(sub))
                .into_iter()
                .filter(|n| !n.starts_with(crate::workdir::SPARE))
                .collect()
        }

        /// Offers `id` at once (not tentative) and checks it runs: so the
        /// runner's one slot is free.
        async fn runs_another(&mut self, id: &str) {
            let marker = self.marker(id);
            let Down::Offer(mut o) = tentative_touch(id, 1, &marker) else {
                unreachable!()
            };
            o.tentative = false;
            self.server.send(Down::Offer(o)).await;
            assert!(
                matches!(next(&mut self.server).await, Up::Accept(a) if a.attempt_id == id),
                "the slot was not free"
            );
            let finished = loop {
                match next(&mut self.server).await {
                    Up::Step(_) => {}
                    Up::Finished(f) => break f,
                    other => panic!("unexpected {other:?}"),
                }
            };
            assert_eq!(finished.attempt_id, id);
            assert_eq!(finished.outcome(), AttemptOutcome::Succeeded);
            assert!(marker.exists());
        }

        /// Offers a tentative `touch` step as `id` and waits until the
        /// runner accepted and prepared it; the file the step would make.
        async fn prepared_tentative(&mut self, id: &str, epoch: u64) -> PathBuf {
            let marker = self.marker("ran");
            self.server.send(tentative_touch(id, epoch, &marker)).await;
            assert!(matches!(next(&mut self.server).await, Up::Accept(a) if a.attempt_id == id));
            let prepared = self.work.path().join("attempts").join(id).join("workspace");
            eventually("the attempt is prepared", || prepared.is_dir()).await;
            marker
        }

        /// A dropped attempt: even confirmed now, nothing of it runs or is
        /// reported, its files go, and its slot takes the next offer.
        async fn assert_dropped(&mut self, id: &str, marker: &Path) {
            self.server.send(confirm(id, 1)).await;
            let said = quiet_for(&mut self.server, Duration::from_millis(500)).await;
            assert!(said.is_empty(), "reported {said:?} for a dropped attempt");
            assert!(!marker.exists(), "the dropped attempt ran");
            eventually("the dropped attempt's files are gone", || {
                self.leftovers("attempts").is_empty() && self.leftovers("spool").is_empty()
            })
            .await;
            self.runs_another("att-next").await;
            assert!(!marker.exists());
        }

        async fn stop(self) {
            self.shutdown.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        }
    }

    #[tokio::test]
    async fn an_acknowledged_attempts_spool_becomes_the_spool_spare() {
        use std::os::unix::fs::MetadataExt;
        let (mut r, _) = TestRunner::start_on(testing::start().await, ExecutorKind::Fake).await;
        r.server.send(offer("att-1", &["echo hello"])).await;
        assert!(matches!(next(&mut r.server).await, Up::Accept(a) if a.attempt_id == "att-1"));
        let spools = r.work.path().join("spool");
        let spool = spools.join("att-1.log");
        eventually("the spool is made", || spool.exists()).await;
        let ino = std::fs::metadata(&spool).unwrap().ino();
        while !matches!(next(&mut r.server).await, Up::Finished(_)) {}
        r.server
            .send(Down::Welcome(Welcome {
                leader_epoch: 1,
                acknowledged: vec!["att-1".into()],
                ..Default::default()
            }))
            .await;
        // The same inode, emptied, and nothing else: no new file was made.
        eventually("the acknowledged spool becomes the spare", || {
            testing::dir_names(&spools) == [crate::workdir::SPARE]
                && std::fs::metadata(spools.join(crate::workdir::SPARE))
                    .is_ok_and(|m| m.ino() == ino && m.len() == 0)
        })
        .await;
        r.stop().await;
    }

    #[tokio::test]
    async fn a_tentative_offer_runs_nothing_until_its_confirm() {
        let mut r = TestRunner::shell().await;
        // Epoch 2: the runner now ignores anything of epoch 1.
        let marker = r.prepared_tentative("att-t", 2).await;
        // A confirm from an older leader is fenced.
        r.server.send(confirm("att-t", 1)).await;
        let said = quiet_for(&mut r.server, Duration::from_millis(500)).await;
        assert!(said.is_empty(), "said {said:?} before the confirm");
        assert!(!marker.exists(), "the step ran before the confirm");

        r.server.send(confirm("att-t", 2)).await;
        let finished = loop {
            match next(&mut r.server).await {
                Up::Step(_) => {}
                Up::Finished(f) => break f,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(finished.outcome(), AttemptOutcome::Succeeded);
        assert!(marker.exists(), "the step did not run after the confirm");
        r.stop().await;
    }

    #[tokio::test]
    async fn an_unconfirmed_attempt_is_dropped_when_the_stream_ends() {
        let mut r = TestRunner::shell().await;
        let marker = r.prepared_tentative("att-d", 1).await;

        r.server.end_stream();
        // It reconnects without the attempt: a coordinator that did write
        // the offer requeues it as lost.
        let Up::Hello(hello) = next(&mut r.server).await else {
            panic!("expected a new hello")
        };
        assert!(hello.running_attempts.is_empty(), "{hello:?}");
        assert_eq!(
            hello.dropped_attempts,
            ["att-d"],
            "so it is requeued uncounted"
        );
        // A confirm that comes too late (on the new stream) runs nothing.
        r.assert_dropped("att-d", &marker).await;
        r.stop().await;
    }

    #[tokio::test]
    async fn a_cancel_before_the_confirm_runs_nothing_and_reports_it_cancelled() {
        let mut r = TestRunner::shell().await;
        let marker = r.marker("ran");
        r.server.send(tentative_touch("att-c", 1, &marker)).await;
        assert!(matches!(next(&mut r.server).await, Up::Accept(_)));
        r.server
            .send(Down::Cancel(Cancel {
                leader_epoch: 1,
                attempt_id: "att-c".into(),
                reason: "run cancelled".into(),
            }))
            .await;
        // The coordinator holds the attempt and the slot until it hears.
        let Up::Finished(finished) = next(&mut r.server).await else {
            panic!("expected the cancelled attempt's report, and nothing before it")
        };
        assert_eq!(finished.attempt_id, "att-c");
        assert_eq!(finished.outcome(), AttemptOutcome::Cancelled);
        assert_eq!(finished.log_length, 0);
        r.assert_dropped("att-c", &marker).await;
        r.stop().await;
    }
}
