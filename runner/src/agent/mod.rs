//! The agent: the connection to the coordinator and the Control message loop.
//!
//! One agent task owns all runner state (running attempts, unacknowledged
//! final reports, the leader epoch, draining); attempts run in their own
//! tasks and talk to it through an [`AttemptEvent`] channel, so no state is
//! shared behind locks.
//!
//! Layout: this file holds [`Agent`] (the reconnect loop, the session loop
//! that routes coordinator messages and attempt events, heartbeats and
//! drain), composed of
//! - `connect`: [`connect::Connector`] (coordinator URLs and leader hints,
//!   `Register`, opening the Control stream) and the leader
//!   [`connect::Epoch`];
//! - `liveness`: [`liveness::Watchdog`], which drops a stream whose
//!   coordinator answered no heartbeat for three intervals (a partition
//!   sends no RST);
//! - `attempts`: [`attempts::Attempts`], the book of held, finished and
//!   dropped attempts (offers, confirms, cancels, report redelivery) and the
//!   launcher of attempt tasks.
//!
//! # Connection
//! Coordinator URLs are tried in turn; a `capstan-leader` metadata hint on an
//! error (a follower's answer) or a `LeaderMoved` message names the URL to
//! try next. Between attempts the agent waits a jittered exponential backoff
//! (100 ms doubling to 5 s, or to the cap the last welcome's heartbeat
//! gives, `capstan_proto::liveness::backoff_cap`; reset after each welcome) and keeps handling
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
//! oneshot the agent keeps in its attempt book; the agent fires it when the
//! `ConfirmOffer` arrives. Until then nothing of it runs. When the Control
//! stream ends first (any session end) or a `Cancel` for it comes first, the
//! agent drops the sender: the attempt removes its files and ends without a
//! report, and its slot is free at once. It is not in the next hello, so a
//! coordinator that did write the offer requeues it as lost.
//!
//! # Fencing
//! `Offer`, `ConfirmOffer`, `Cancel` and `Drain` carrying a leader epoch
//! older than the newest seen (from welcomes and messages) are ignored.

mod attempts;
mod connect;
mod liveness;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use capstan_proto::runner::v1::{
    CoordinatorMessage, GoingAway, Heartbeat, Hello, Welcome, coordinator_message, runner_message,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::{info, warn};

use self::attempts::Attempts;
use self::connect::{Conn, ConnectError, Connector, Epoch, NOT_LEADER_RETRY, Session};
use self::liveness::Watchdog;
use crate::attempt::AttemptEvent;
use crate::backoff::Backoff;
use crate::credentials::Credentials;
use crate::executor::Executor;
use crate::logs::LogTarget;
use crate::workdir::WorkDir;
use crate::{Error, RunnerConfig};

const GOING_AWAY_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

enum SessionEnd {
    Reconnect,
    Drained,
}

pub(crate) struct Agent {
    connector: Connector,
    attempts: Attempts,
    events: mpsc::UnboundedReceiver<AttemptEvent>,
    epoch: Epoch,
    shutdown: CancellationToken,
    draining: bool,
    /// One task, then drain and leave (`--ephemeral`).
    ephemeral: bool,
}

impl Agent {
    pub(crate) fn new(
        config: RunnerConfig,
        work_dir: WorkDir,
        executor: Arc<dyn Executor>,
        credentials: Option<Credentials>,
        shutdown: CancellationToken,
    ) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let connector = Connector::new(&config, &work_dir, credentials);
        let ephemeral = config.ephemeral;
        Self {
            connector,
            attempts: Attempts::new(&config, Arc::new(work_dir), executor, events_tx),
            events,
            epoch: Epoch::default(),
            shutdown,
            draining: false,
            ephemeral,
        }
    }

    /// The runner's secrets: resolved for the steps that name them, and
    /// masked in every step's output.
    pub(crate) fn with_secrets(mut self, secrets: Arc<crate::secrets::Secrets>) -> Self {
        self.attempts.set_secrets(secrets);
        self
    }

    /// Runs until drained (Ok) or a fatal error. On an error, running
    /// attempts are cancelled and awaited.
    pub(crate) async fn run(mut self) -> Result<(), Error> {
        let result = self.run_loop().await;
        if result.is_err() {
            self.attempts.cancel_all();
        }
        self.attempts.wait().await;
        result
    }

    fn nothing_left(&self) -> bool {
        self.draining && self.attempts.all_done()
    }

    async fn run_loop(&mut self) -> Result<(), Error> {
        let mut backoff = Backoff::new();
        loop {
            if self.nothing_left() {
                info!("drained: no attempt running and no report to deliver");
                return Ok(());
            }
            let url = self.connector.next_url();
            let hello = self.hello();
            match self.connector.connect(&url, hello).await {
                Ok(session) => {
                    crate::metrics::get().connected();
                    backoff.reset();
                    // Reconnects must fit the next leader's re-attach grace.
                    let heartbeat = Beats::of(&session.welcome).busy;
                    backoff.cap_at(capstan_proto::liveness::backoff_cap(heartbeat));
                    let end = self.serve(session).await;
                    // No confirm can come for them any more.
                    self.attempts.drop_unconfirmed("the control stream ended");
                    if let SessionEnd::Drained = end {
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

    /// The next hello, without the credential (the connector adds it).
    fn hello(&self) -> Hello {
        self.connector.hello(
            self.attempts.hello_attempts(),
            self.attempts.dropped(),
            self.epoch.newest(),
        )
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
                Some(event) = self.events.recv() => {
                    self.after_ephemeral_task(&event);
                    self.attempts.on_event(event, None).await;
                }
            }
        }
    }

    /// An ephemeral runner drains once its one task has finished: the
    /// report and log are still delivered, then it says GoingAway (the
    /// coordinator deletes its record) and [`Agent::run`] returns Ok.
    fn after_ephemeral_task(&mut self, event: &AttemptEvent) {
        if self.ephemeral && matches!(event, AttemptEvent::Finished(_)) {
            self.start_drain("ephemeral: its one task finished");
        }
    }

    fn start_drain(&mut self, why: &str) {
        if !self.draining {
            info!(
                reason = why,
                running = self.attempts.running(),
                "draining: accepting no new attempts"
            );
            self.draining = true;
        }
    }

    /// Runs one Control stream until it ends or the drain completes.
    async fn serve(&mut self, session: Session) -> SessionEnd {
        let Session {
            conn,
            mut inbound,
            welcome,
            client: _control_client,
            log_channel,
            credentials,
        } = session;
        self.attempts.mask_runner_secret(&credentials.runner_secret);
        let target = LogTarget::new(log_channel, credentials);
        let beats = self.welcomed(&welcome, target).await;
        let mut watchdog = Watchdog::new(beats.busy, welcome.acks_heartbeats);
        if !self.attempts.resend(&conn).await {
            return SessionEnd::Reconnect;
        }
        // The first heartbeat after any coordinator message or attempt event
        // comes within the busy interval: an accepted offer starts a lease,
        // and a runner paused for a rejected offer is un-paused by it.
        let mut next_beat = Instant::now() + beats.period(self.attempts.running());
        loop {
            if self.draining && self.attempts.running() == 0 {
                return self.finish_drain(conn, inbound).await;
            }
            let silent = watchdog.deadline();
            tokio::select! {
                () = self.shutdown.cancelled(), if !self.draining => {
                    self.start_drain("shutdown requested");
                    if !self.heartbeat(&conn).await {
                        return SessionEnd::Reconnect;
                    }
                    watchdog.heartbeat_sent(Instant::now());
                }
                () = sleep_until_some(silent), if silent.is_some() => {
                    warn!(
                        silent_ms = watchdog.silent_for(Instant::now()).as_millis(),
                        "the coordinator answered no heartbeat in time; dropping the control stream and reconnecting"
                    );
                    return SessionEnd::Reconnect;
                }
                message = inbound.message() => {
                    watchdog.heard();
                    if let Some(end) = self.on_inbound(message, &conn).await {
                        return end;
                    }
                    next_beat = next_beat.min(Instant::now() + beats.busy);
                }
                Some(event) = self.events.recv() => {
                    self.after_ephemeral_task(&event);
                    if !self.attempts.on_event(event, Some(&conn)).await {
                        return SessionEnd::Reconnect;
                    }
                    next_beat = next_beat.min(Instant::now() + beats.busy);
                }
                () = tokio::time::sleep_until(next_beat) => {
                    if !self.heartbeat(&conn).await {
                        return SessionEnd::Reconnect;
                    }
                    watchdog.heartbeat_sent(Instant::now());
                    next_beat = Instant::now() + beats.period(self.attempts.running());
                }
            }
        }
    }

    /// Takes a new stream's welcome: its epoch, where logs go now, the
    /// reports it acknowledges. Returns the heartbeat intervals it sets.
    async fn welcomed(&mut self, welcome: &Welcome, target: LogTarget) -> Beats {
        // The welcome answered a hello that listed them.
        self.attempts.clear_dropped();
        self.epoch.welcomed(welcome.leader_epoch);
        let beats = Beats::of(welcome);
        self.connector.set_heartbeat(beats.busy);
        info!(
            epoch = welcome.leader_epoch,
            heartbeat_ms = beats.busy.as_millis(),
            idle_heartbeat_ms = beats.idle.as_millis(),
            reattached = ?welcome.reattached,
            acknowledged = ?welcome.acknowledged,
            "welcomed by coordinator"
        );
        self.attempts.publish(target);
        self.attempts
            .forget_acknowledged(&welcome.acknowledged)
            .await;
        beats
    }

    /// Handles what the Control stream brought; `Some` ends the session.
    async fn on_inbound(
        &mut self,
        message: Result<Option<CoordinatorMessage>, tonic::Status>,
        conn: &Conn,
    ) -> Option<SessionEnd> {
        match message {
            Ok(Some(message)) => self.handle_message(message, conn).await,
            Ok(None) => {
                warn!("coordinator closed the control stream; reconnecting");
                Some(SessionEnd::Reconnect)
            }
            Err(status) => {
                self.connector.follow_hint(&status);
                warn!(code = ?status.code(), message = status.message(), "control stream failed; reconnecting");
                Some(SessionEnd::Reconnect)
            }
        }
    }

    /// Sends a heartbeat. False when the stream is gone.
    async fn heartbeat(&self, conn: &Conn) -> bool {
        let beat = Heartbeat {
            free_slots: if self.draining {
                0
            } else {
                self.attempts.free_slots()
            },
            load: load_average(),
            draining: self.draining,
        };
        conn.send(runner_message::Kind::Heartbeat(beat)).await
    }

    /// Handles one coordinator message; `Some` ends the session.
    async fn handle_message(
        &mut self,
        message: CoordinatorMessage,
        conn: &Conn,
    ) -> Option<SessionEnd> {
        use coordinator_message::Kind;
        let alive = match message.kind {
            Some(Kind::Welcome(welcome)) => {
                self.epoch.seen(welcome.leader_epoch);
                self.attempts
                    .forget_acknowledged(&welcome.acknowledged)
                    .await;
                true
            }
            Some(Kind::Offer(offer)) => {
                self.epoch.fenced(offer.leader_epoch, "offer")
                    || self.attempts.offer(offer, self.draining, conn).await
            }
            Some(Kind::Confirm(confirm)) => {
                if !self.epoch.fenced(confirm.leader_epoch, "confirm") {
                    self.attempts.confirm(confirm);
                }
                true
            }
            Some(Kind::Cancel(cancel)) => {
                if !self.epoch.fenced(cancel.leader_epoch, "cancel") {
                    self.attempts.cancel(cancel);
                }
                true
            }
            Some(Kind::Drain(drain)) => {
                if self.epoch.fenced(drain.leader_epoch, "drain") {
                    return None;
                }
                self.start_drain("the coordinator asked this runner to drain");
                self.heartbeat(conn).await
            }
            Some(Kind::LeaderMoved(moved)) => {
                info!(endpoint = %moved.endpoint, "leader moved; reconnecting");
                self.connector.leader_moved(moved.endpoint);
                return Some(SessionEnd::Reconnect);
            }
            // Its arrival already fed the watchdog.
            Some(Kind::HeartbeatAck(_)) | None => true,
        };
        (!alive).then_some(SessionEnd::Reconnect)
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

/// The heartbeat intervals a welcome sets.
struct Beats {
    /// While an attempt runs (it holds a lease).
    busy: Duration,
    /// Idle, the runner holds no lease: heartbeat rarely.
    idle: Duration,
}

impl Beats {
    fn of(welcome: &Welcome) -> Self {
        let busy = match welcome.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        // An older coordinator sends 0: the one interval.
        let idle = Duration::from_millis(u64::from(welcome.idle_heartbeat_interval_ms)).max(busy);
        Self { busy, idle }
    }

    /// The interval with `running` attempts.
    fn period(&self, running: usize) -> Duration {
        if running == 0 { self.idle } else { self.busy }
    }
}

/// Sleeps until `at`; `None` never wakes (the caller's guard keeps it
/// from being polled).
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One-minute load average from /proc/loadavg (0 where unavailable).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
