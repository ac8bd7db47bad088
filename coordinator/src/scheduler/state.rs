//! The scheduler's state machine, with no I/O.
//!
//! Every method mutates the in-memory state and records its effects: which
//! records became dirty (to be persisted) and which messages go to which
//! runner connection. The actor in `super` persists the dirty records and only
//! then delivers the messages, so nobody hears of a change that is not durable.
//! The one exception is a tentative offer ([`Effects::take_tentative_offers`]):
//! it leaves before the write, and the runner runs nothing of it until the
//! `ConfirmOffer` sent after the write.
//! Time is passed in (`now`) so tests can drive leases and offer timeouts.

use super::lease::ConnLease;
use super::matching::{FreeSlots, labels_match};
use crate::model::*;
use capstan_shared::ids::{AttemptId, RunId, RunnerId};
use capstan_shared::proto::runner::v1 as rpb;
use rpb::coordinator_message::Kind as Down;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};

/// The sending half of a runner's Control stream.
pub type RunnerTx = mpsc::UnboundedSender<Result<rpb::CoordinatorMessage, tonic::Status>>;

/// How often an idle runner heartbeats by default: with 10,000 runners at
/// one heartbeat a second, receiving them took a quarter of a core, and an
/// idle runner's heartbeat renews no lease.
pub const DEFAULT_IDLE_HEARTBEAT: Duration = Duration::from_secs(5);

/// How long finished runs and their logs are kept by default: GitLab's
/// default for job artifacts, and long enough to look back over a month.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Timings and limits of the scheduler.
#[derive(Clone, Debug)]
pub struct Timing {
    /// How often runners heartbeat while they run attempts.
    pub heartbeat: Duration,
    /// How often idle runners heartbeat. They hold no lease; offers to them
    /// are covered by the offer timeout.
    pub idle_heartbeat: Duration,
    /// A runner silent for this long loses its attempts (requeued).
    pub lease: Duration,
    /// An offer not accepted within this goes back to the queue.
    pub offer_timeout: Duration,
    /// Infrastructure failures (lost runner, executor error) retried per task.
    pub max_infra_retries: u32,
    /// Grace past a task's own timeout before the coordinator fails it itself.
    pub timeout_grace: Duration,
    /// Extra time, on top of one lease, that a newly started leader gives
    /// runners to re-attach before it requeues their attempts. It covers a
    /// runner's reconnect backoff (at most 5 s) while no leader was elected.
    pub reattach_grace: Duration,
    /// A runner whose Control stream broke (process killed, connection
    /// reset) and that has not reconnected within this loses its attempts,
    /// without waiting out the whole lease. Covers its first reconnects.
    pub disconnect_grace: Duration,
    /// Finished runs older than this are deleted with their logs; `None`
    /// keeps everything.
    pub retention: Option<Duration>,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(1),
            idle_heartbeat: DEFAULT_IDLE_HEARTBEAT,
            lease: Duration::from_secs(5),
            offer_timeout: Duration::from_secs(5),
            max_infra_retries: 3,
            timeout_grace: Duration::from_secs(30),
            reattach_grace: Duration::from_secs(6),
            disconnect_grace: Duration::from_millis(2500),
            retention: Some(DEFAULT_RETENTION),
        }
    }
}

/// A runner's current Control stream.
pub struct Conn {
    pub id: u64,
    pub tx: RunnerTx,
    /// Stamped by the stream's reader on every message (see [`super::lease`]).
    pub lease: Arc<ConnLease>,
    /// The runner's hello said `confirms_offers`: its offers may leave
    /// before they are durable (see [`Effects::take_tentative_offers`]).
    pub confirms_offers: bool,
}

/// A message for one runner connection, waiting in [`Effects::outbox`].
pub struct Outgoing {
    /// The connection it goes down ([`Conn::id`]).
    pub conn: u64,
    pub tx: RunnerTx,
    pub msg: rpb::CoordinatorMessage,
    /// The connection's [`Conn::confirms_offers`].
    pub confirms_offers: bool,
}

/// A runner as the scheduler sees it.
pub struct RunnerSlot {
    pub record: RunnerRecord,
    pub conn: Option<Conn>,
    /// When the scheduler last heard from it; [`RunnerSlot::seen`] also
    /// counts what its stream's reader saw.
    pub last_seen: Instant,
    pub last_seen_ms: i64,
    /// When its Control stream ended, while it has not reconnected.
    pub detached_at: Option<Instant>,
    /// Attempts holding a slot on this runner.
    pub active: BTreeSet<AttemptId>,
    /// No offers until its next heartbeat (it rejected or ignored one).
    pub paused: bool,
    /// The runner itself said it drains (SIGTERM). In memory only: a
    /// restarted runner is not draining; `capstan drain` sets the record's flag.
    pub self_draining: bool,
}

impl RunnerSlot {
    pub fn free_slots(&self) -> u32 {
        self.record
            .capacity
            .saturating_sub(self.active.len() as u32)
    }

    /// When the runner was last heard from: by the scheduler, or by the
    /// reader of its current stream (heartbeats that change nothing stop
    /// there). Leases are judged by this.
    pub fn seen(&self) -> Instant {
        match &self.conn {
            Some(c) => self.last_seen.max(c.lease.last_seen()),
            None => self.last_seen,
        }
    }

    /// [`RunnerSlot::seen`] as wall-clock milliseconds, for display.
    pub fn seen_ms(&self) -> i64 {
        let later = self.seen().saturating_duration_since(self.last_seen);
        self.last_seen_ms + i64::try_from(later.as_millis()).unwrap_or(i64::MAX)
    }

    /// No offers until its next heartbeat, which its stream's reader is
    /// told to forward.
    pub fn pause(&mut self) {
        self.paused = true;
        if let Some(c) = &self.conn {
            c.lease.want_heartbeat();
        }
    }

    pub fn accepts_work(&self) -> bool {
        self.conn.is_some()
            && !self.record.draining
            && !self.self_draining
            && !self.paused
            && self.free_slots() > 0
    }
}

/// Queue order: higher priority first, then submit order, then task order.
type QueueKey = (Reverse<i32>, u64, RunId, usize);

/// Why an attempt ended early, for the task's message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    RunnerLost,
    OfferExpired,
    OfferRejected,
    /// The runner dropped a tentative offer unrun (its stream ended before
    /// the confirm) and said so in its next hello.
    OfferDropped,
}

/// Errors the state machine reports to the API layer.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no run `{0}` (list runs with `capstan runs`)")]
    UnknownRun(String),
    #[error("no task `{task}` in run `{run}`")]
    UnknownTask { run: String, task: String },
    #[error("no runner `{0}` (list runners with `capstan runners`)")]
    UnknownRunner(String),
    #[error("runner credentials rejected: re-register the runner")]
    BadRunnerCredentials,
    #[error(
        "runner speaks protocol version {got}; this coordinator speaks {want}: upgrade the older side"
    )]
    ProtocolVersion { got: u32, want: u32 },
    #[error("runner {runner} reported on attempt {attempt}, which is not assigned to it")]
    NotYourAttempt { runner: String, attempt: String },
}

#[derive(Default)]
pub struct Effects {
    pub dirty_runs: HashSet<RunId>,
    pub dirty_runners: HashSet<RunnerId>,
    /// Messages for runners, in the order they were made.
    pub outbox: Vec<Outgoing>,
    /// Attempts offered in this batch: their offer clock starts when the
    /// batch is durable and the offer actually leaves.
    pub offered: Vec<AttemptId>,
    /// Pickup latencies (queued -> accepted) observed, for metrics.
    pub pickups_ms: Vec<f64>,
    pub tasks_finished: Vec<(String, f64)>,
    /// Runs that reached a final state in this batch (their trace span ends).
    pub runs_finished: Vec<RunId>,
}

impl Effects {
    /// Takes out of the outbox the offers that may leave before this
    /// batch is durable, marked `tentative`; what stays leaves after the
    /// write. The runner of a tentative offer prepares it but runs nothing
    /// until the `ConfirmOffer` the caller sends once the write succeeded
    /// (never if it failed), so no user code runs for a run that is not
    /// durable, while the write's fsync overlaps the runner's preparation.
    ///
    /// An offer goes early only to a connection whose runner confirms
    /// offers, and only while nothing before it in the outbox for the same
    /// connection stays behind: each connection still gets its messages in
    /// the order they were made (a new stream's `Welcome` first, and a
    /// `Welcome` acknowledging a report is never overtaken).
    pub fn take_tentative_offers(&mut self) -> Vec<Outgoing> {
        let mut held_back = HashSet::new();
        let mut early = Vec::new();
        let mut late = Vec::with_capacity(self.outbox.len());
        for mut out in self.outbox.drain(..) {
            let may_go_early = out.confirms_offers && !held_back.contains(&out.conn);
            match &mut out.msg.kind {
                Some(Down::Offer(offer)) if may_go_early => {
                    offer.tentative = true;
                    early.push(out);
                }
                _ => {
                    held_back.insert(out.conn);
                    late.push(out);
                }
            }
        }
        self.outbox = late;
        early
    }
}

/// The confirm of a tentative offer in `out`, for the same connection
/// (`None` if `out` holds no offer).
pub fn confirm_of(out: &Outgoing) -> Option<(RunnerTx, rpb::CoordinatorMessage)> {
    let Some(Down::Offer(offer)) = &out.msg.kind else {
        return None;
    };
    let confirm = Down::Confirm(rpb::ConfirmOffer {
        leader_epoch: offer.leader_epoch,
        attempt_id: offer.attempt_id.clone(),
    });
    Some((out.tx.clone(), msg(confirm)))
}

pub struct SchedulerState {
    pub epoch: u64,
    pub timing: Timing,
    pub runs: HashMap<RunId, RunRecord>,
    /// Idempotency key -> the run submitted with it.
    run_keys: HashMap<String, RunId>,
    pub runners: HashMap<RunnerId, RunnerSlot>,
    /// Attempt -> (run, task index), for every attempt of every loaded run.
    attempts: HashMap<AttemptId, (RunId, usize)>,
    queue: BTreeSet<QueueKey>,
    /// When each offered attempt was offered (in-memory only).
    offered_at: HashMap<AttemptId, Instant>,
    /// When each running attempt started (in-memory only), for server-side timeouts.
    started_at: HashMap<AttemptId, Instant>,
    next_seq: u64,
    next_conn: u64,
    pub fx: Effects,
}

fn msg(kind: Down) -> rpb::CoordinatorMessage {
    rpb::CoordinatorMessage { kind: Some(kind) }
}

impl SchedulerState {
    pub fn new(epoch: u64, timing: Timing) -> Self {
        Self {
            epoch,
            timing,
            runs: HashMap::new(),
            run_keys: HashMap::new(),
            runners: HashMap::new(),
            attempts: HashMap::new(),
            queue: BTreeSet::new(),
            offered_at: HashMap::new(),
            started_at: HashMap::new(),
            next_seq: 0,
            next_conn: 0,
            fx: Effects::default(),
        }
    }

    /// Rebuilds the state from persisted records. Attempts that were offered
    /// or running stay assigned: their runners get one lease plus
    /// `reattach_grace` (counted from `now`) to re-attach before the
    /// attempts are requeued.
    pub fn load(
        epoch: u64,
        timing: Timing,
        runs: Vec<RunRecord>,
        runners: Vec<RunnerRecord>,
        now: Instant,
    ) -> Self {
        let seen = now + timing.reattach_grace;
        let mut st = Self::new(epoch, timing);
        let now_ms = now_ms();
        for r in runners {
            st.runners.insert(
                r.id.clone(),
                RunnerSlot {
                    record: r,
                    conn: None,
                    last_seen: seen,
                    last_seen_ms: now_ms,
                    detached_at: None,
                    active: BTreeSet::new(),
                    paused: false,
                    self_draining: false,
                },
            );
        }
        for run in runs {
            st.next_seq = st.next_seq.max(run.seq + 1);
            for (i, t) in run.tasks.iter().enumerate() {
                for a in &t.attempts {
                    st.attempts.insert(a.id.clone(), (run.id.clone(), i));
                    if a.state.is_active() {
                        if let Some(slot) = st.runners.get_mut(&a.runner) {
                            slot.active.insert(a.id.clone());
                        }
                        match a.state {
                            AttemptState::Offered => {
                                st.offered_at.insert(a.id.clone(), seen);
                            }
                            AttemptState::Running => {
                                st.started_at.insert(a.id.clone(), now);
                            }
                            _ => {}
                        }
                    }
                }
                if t.state == StoredTaskState::Queued {
                    st.queue
                        .insert((Reverse(run.priority), run.seq, run.id.clone(), i));
                }
            }
            if !run.idempotency_key.is_empty() {
                st.run_keys
                    .insert(run.idempotency_key.clone(), run.id.clone());
            }
            st.runs.insert(run.id.clone(), run);
        }
        st
    }

    fn touch_run(&mut self, id: &RunId) {
        self.fx.dirty_runs.insert(id.clone());
    }

    // ----- runs -------------------------------------------------------------

    /// Adds a validated run. `tasks` are in file order with `needs` as indexes.
    /// Queues `run`, or returns the run an earlier submit with the same
    /// idempotency key queued (`false`: nothing new was queued).
    pub fn submit(&mut self, mut run: RunRecord) -> (RunId, bool) {
        if !run.idempotency_key.is_empty() {
            if let Some(id) = self.run_keys.get(&run.idempotency_key) {
                return (id.clone(), false);
            }
            self.run_keys
                .insert(run.idempotency_key.clone(), run.id.clone());
        }
        run.seq = self.next_seq;
        self.next_seq += 1;
        let id = run.id.clone();
        let now = now_ms();
        for (i, t) in run.tasks.iter_mut().enumerate() {
            if t.needs.is_empty() {
                t.state = StoredTaskState::Queued;
                t.queued_at_ms = now;
                self.queue
                    .insert((Reverse(run.priority), run.seq, id.clone(), i));
            } else {
                t.state = StoredTaskState::Waiting;
            }
        }
        self.runs.insert(id.clone(), run);
        self.touch_run(&id);
        (id, true)
    }

    pub fn cancel_run(&mut self, id: &RunId) -> Result<(), StateError> {
        let run = self
            .runs
            .get_mut(id)
            .ok_or_else(|| StateError::UnknownRun(id.to_string()))?;
        if run.state.is_terminal() {
            return Ok(());
        }
        run.cancel_requested = true;
        let n = run.tasks.len();
        for i in 0..n {
            self.cancel_task(id, i, "cancelled by user");
        }
        self.finish_run_if_done(id);
        Ok(())
    }

    /// Ends a task as cancelled, telling its runner to stop an active attempt.
    fn cancel_task(&mut self, run_id: &RunId, i: usize, why: &str) {
        let epoch = self.epoch;
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let priority = run.priority;
        let seq = run.seq;
        let t = &mut run.tasks[i];
        if t.state.is_terminal() {
            return;
        }
        t.state = StoredTaskState::Cancelled;
        t.message = why.to_string();
        t.finished_at_ms = now_ms();
        let mut notify = None;
        if let Some(a) = t.attempts.last_mut()
            && matches!(a.state, AttemptState::Offered | AttemptState::Running)
        {
            a.state = AttemptState::Cancelling;
            notify = Some((a.runner.clone(), a.id.clone()));
        }
        self.queue
            .remove(&(Reverse(priority), seq, run_id.clone(), i));
        self.touch_run(run_id);
        if let Some((runner, attempt)) = notify {
            // An offer's timer stays: if the runner rejects or ignores it,
            // its expiry frees the slot.
            self.started_at.remove(&attempt);
            self.send_to(
                &runner,
                Down::Cancel(rpb::Cancel {
                    leader_epoch: epoch,
                    attempt_id: attempt.to_string(),
                    reason: why.to_string(),
                }),
            );
        }
    }

    /// Queues `kind` for the runner's current connection, if it has one.
    fn send_to(&mut self, runner: &RunnerId, kind: Down) {
        if let Some(slot) = self.runners.get(runner)
            && let Some(c) = &slot.conn
        {
            self.fx.outbox.push(Outgoing {
                conn: c.id,
                tx: c.tx.clone(),
                msg: msg(kind),
                confirms_offers: c.confirms_offers,
            });
        }
    }

    /// Marks the run finished once every task is.
    fn finish_run_if_done(&mut self, id: &RunId) {
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        if run.state.is_terminal() || !run.tasks.iter().all(|t| t.state.is_terminal()) {
            return;
        }
        run.state = if run.cancel_requested {
            StoredRunState::Cancelled
        } else if run
            .tasks
            .iter()
            .all(|t| t.state == StoredTaskState::Succeeded)
        {
            StoredRunState::Succeeded
        } else {
            StoredRunState::Failed
        };
        run.finished_at_ms = now_ms();
        self.fx.runs_finished.push(id.clone());
        self.touch_run(id);
    }

    /// A task succeeded: queue the dependents whose needs all succeeded.
    /// A task failed: skip everything that (transitively) needs it.
    fn propagate(&mut self, run_id: &RunId, done: usize) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let now = now_ms();
        let succeeded = run.tasks[done].state == StoredTaskState::Succeeded;
        let mut to_queue = Vec::new();
        let mut to_skip = vec![done];
        if succeeded {
            for (i, t) in run.tasks.iter().enumerate() {
                if t.state == StoredTaskState::Waiting
                    && t.needs.contains(&done)
                    && t.needs
                        .iter()
                        .all(|&n| run.tasks[n].state == StoredTaskState::Succeeded)
                {
                    to_queue.push(i);
                }
            }
            to_skip.clear();
        }
        while let Some(failed) = to_skip.pop() {
            let name = run.tasks[failed].name.clone();
            for i in 0..run.tasks.len() {
                let t = &mut run.tasks[i];
                if t.state == StoredTaskState::Waiting && t.needs.contains(&failed) {
                    t.state = StoredTaskState::Skipped;
                    t.message = format!("skipped: `{name}` did not succeed");
                    t.finished_at_ms = now;
                    to_skip.push(i);
                }
            }
        }
        for i in to_queue {
            run.tasks[i].state = StoredTaskState::Queued;
            run.tasks[i].queued_at_ms = now;
            self.queue
                .insert((Reverse(run.priority), run.seq, run_id.clone(), i));
        }
        self.touch_run(run_id);
    }

    fn requeue(&mut self, run_id: &RunId, i: usize) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let t = &mut run.tasks[i];
        t.state = StoredTaskState::Queued;
        t.queued_at_ms = now_ms();
        self.queue
            .insert((Reverse(run.priority), run.seq, run_id.clone(), i));
        self.touch_run(run_id);
    }

    // ----- runners ----------------------------------------------------------

    /// Registers a runner, or re-registers one with the same name: the id is
    /// kept and the secret rotated. Returns (id, secret).
    pub fn register(
        &mut self,
        name: &str,
        labels: BTreeMap<String, String>,
        capacity: u32,
        version: &str,
        now: Instant,
    ) -> (RunnerId, String) {
        let secret = format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        let existing = self
            .runners
            .values()
            .find(|r| r.record.name == name)
            .map(|r| r.record.id.clone());
        let id = existing.unwrap_or_else(RunnerId::generate);
        let record = RunnerRecord {
            id: id.clone(),
            name: name.to_string(),
            labels,
            capacity: capacity.max(1),
            secret_hash: hash_secret(&secret),
            version: version.to_string(),
            draining: false,
            registered_at_ms: now_ms(),
        };
        match self.runners.get_mut(&id) {
            Some(slot) => slot.record = record,
            None => {
                self.runners.insert(
                    id.clone(),
                    RunnerSlot {
                        record,
                        conn: None,
                        last_seen: now,
                        last_seen_ms: now_ms(),
                        detached_at: None,
                        active: BTreeSet::new(),
                        paused: false,
                        self_draining: false,
                    },
                );
            }
        }
        self.fx.dirty_runners.insert(id.clone());
        (id, secret)
    }

    /// Checks a runner's credentials.
    pub fn authenticate(&self, id: &RunnerId, secret: &str) -> Result<(), StateError> {
        match self.runners.get(id) {
            Some(r) if r.record.secret_hash == hash_secret(secret) => Ok(()),
            _ => Err(StateError::BadRunnerCredentials),
        }
    }

    /// A runner opened its Control stream. Re-attaches the attempts it still
    /// runs, requeues the ones it lost, and cancels the ones it should not
    /// have. Returns the connection id and the lease its reader stamps; the
    /// welcome is already in the outbox.
    pub fn attach(
        &mut self,
        hello: rpb::Hello,
        tx: RunnerTx,
        now: Instant,
    ) -> Result<(u64, Arc<ConnLease>), StateError> {
        let id = RunnerId::from_string(hello.runner_id.clone());
        self.authenticate(&id, &hello.runner_secret)?;
        if hello.protocol_version != capstan_shared::PROTOCOL_VERSION {
            return Err(StateError::ProtocolVersion {
                got: hello.protocol_version,
                want: capstan_shared::PROTOCOL_VERSION,
            });
        }
        self.next_conn += 1;
        let conn_id = self.next_conn;
        let reported: BTreeSet<AttemptId> = hello
            .running_attempts
            .iter()
            .map(|a| AttemptId::from_string(a.clone()))
            .collect();
        let dropped: BTreeSet<AttemptId> = hello
            .dropped_attempts
            .iter()
            .map(|a| AttemptId::from_string(a.clone()))
            .collect();
        let slot = self.runners.get_mut(&id).expect("authenticated");
        let lease = Arc::new(ConnLease::new(now));
        slot.conn = Some(Conn {
            id: conn_id,
            tx,
            lease: Arc::clone(&lease),
            confirms_offers: hello.confirms_offers,
        });
        slot.detached_at = None;
        slot.self_draining = false;
        slot.last_seen = now;
        slot.last_seen_ms = now_ms();
        slot.paused = false;
        if hello.capacity > 0 {
            slot.record.capacity = hello.capacity;
        }
        if !hello.labels.is_empty() {
            slot.record.labels = hello.labels.into_iter().collect();
        }
        if !hello.version.is_empty() {
            slot.record.version = hello.version;
        }
        self.fx.dirty_runners.insert(id.clone());
        let held: Vec<AttemptId> = slot.active.iter().cloned().collect();

        let mut reattached = Vec::new();
        let mut recancel = Vec::new();
        for a in held {
            if reported.contains(&a) {
                reattached.push(a.to_string());
                // A cancel sent on the old connection may never have arrived.
                if self.attempt_state(&a) == Some(AttemptState::Cancelling) {
                    recancel.push(a.clone());
                }
                // An accept may have been lost with the old connection.
                if let Some((run_id, i)) = self.attempts.get(&a).cloned()
                    && let Some(att) = self.attempt_mut(&run_id, i, &a)
                    && att.state == AttemptState::Offered
                {
                    self.mark_running(&run_id, i, &a, now);
                }
            } else if dropped.contains(&a) {
                self.lose_attempt(&a, LossReason::OfferDropped, now);
            } else {
                self.lose_attempt(&a, LossReason::RunnerLost, now);
            }
        }
        let mut acknowledged = Vec::new();
        let mut stale = Vec::new();
        for a in &reported {
            if reattached.iter().any(|r| r == a.as_str()) {
                continue;
            }
            match self.attempt_state(a) {
                // Ended by the runner's own report: it may forget it.
                Some(AttemptState::Succeeded | AttemptState::Failed | AttemptState::Cancelled) => {
                    acknowledged.push(a.to_string())
                }
                // Superseded (requeued elsewhere) or unknown: stop it, and
                // let the runner forget its report once it has one.
                _ => {
                    acknowledged.push(a.to_string());
                    stale.push(a.clone());
                }
            }
        }
        // All of it goes down the connection just made.
        let epoch = self.epoch;
        let welcome = Down::Welcome(rpb::Welcome {
            leader_epoch: epoch,
            heartbeat_interval_ms: self.timing.heartbeat.as_millis() as u32,
            idle_heartbeat_interval_ms: self.timing.idle_heartbeat.as_millis() as u32,
            lease_ms: self.timing.lease.as_millis() as u32,
            reattached,
            acknowledged,
        });
        self.send_to(&id, welcome);
        for a in recancel {
            let cancel = Down::Cancel(rpb::Cancel {
                leader_epoch: epoch,
                attempt_id: a.to_string(),
                reason: "cancelled".into(),
            });
            self.send_to(&id, cancel);
        }
        for a in stale {
            self.cancel_stale(&id, &a);
        }
        if self
            .runners
            .get(&id)
            .is_some_and(|slot| slot.record.draining)
        {
            self.send_to(
                &id,
                Down::Drain(rpb::Drain {
                    leader_epoch: epoch,
                }),
            );
        }
        Ok((conn_id, lease))
    }

    /// The Control stream `conn_id` of `runner` ended. Its attempts keep their
    /// lease: the runner may reconnect in time.
    pub fn detach(&mut self, runner: &RunnerId, conn_id: u64, now: Instant) {
        if let Some(slot) = self.runners.get_mut(runner)
            && slot.conn.as_ref().is_some_and(|c| c.id == conn_id)
        {
            // The reader's stamp dies with the connection: keep what it saw
            // (plain heartbeats never reached `last_seen`), or a runner busy
            // for longer than a lease would lose its attempts at once
            // instead of after the disconnect grace.
            slot.last_seen_ms = slot.seen_ms();
            slot.last_seen = slot.seen();
            slot.conn = None;
            slot.detached_at = Some(now);
        }
    }

    pub fn drain(&mut self, who: &str) -> Result<RunnerId, StateError> {
        let id = self.find_runner(who)?;
        let epoch = self.epoch;
        let slot = self.runners.get_mut(&id).expect("found");
        slot.record.draining = true;
        self.fx.dirty_runners.insert(id.clone());
        self.send_to(
            &id,
            Down::Drain(rpb::Drain {
                leader_epoch: epoch,
            }),
        );
        Ok(id)
    }

    /// `capstan resume`: undoes `capstan drain` (persisted). Nothing is sent
    /// to the runner: an agent that got the drain finishes it and exits (the
    /// protocol has no "undrain"), and its heartbeats keep saying
    /// `draining` until then; started again, it is offered work.
    pub fn resume(&mut self, who: &str) -> Result<RunnerId, StateError> {
        let id = self.find_runner(who)?;
        let slot = self.runners.get_mut(&id).expect("found");
        if slot.record.draining {
            slot.record.draining = false;
            self.fx.dirty_runners.insert(id.clone());
        }
        Ok(id)
    }

    /// The runner with id or name `who`.
    fn find_runner(&self, who: &str) -> Result<RunnerId, StateError> {
        self.runners
            .values()
            .find(|r| r.record.id.as_str() == who || r.record.name == who)
            .map(|r| r.record.id.clone())
            .ok_or_else(|| StateError::UnknownRunner(who.to_string()))
    }

    /// Handles one message from the runner on connection `conn_id`.
    pub fn on_runner_message(
        &mut self,
        runner: &RunnerId,
        conn_id: u64,
        m: rpb::runner_message::Kind,
        now: Instant,
    ) -> Result<(), StateError> {
        use rpb::runner_message::Kind as Up;
        let Some(slot) = self.runners.get_mut(runner) else {
            return Err(StateError::BadRunnerCredentials);
        };
        if slot.conn.as_ref().is_none_or(|c| c.id != conn_id) {
            // A message from a replaced connection: the new one speaks for the runner.
            return Ok(());
        }
        slot.last_seen = now;
        slot.last_seen_ms = now_ms();
        match m {
            Up::Hello(_) => {}
            Up::Heartbeat(hb) => {
                slot.paused = false;
                slot.self_draining = hb.draining;
            }
            Up::Accept(acc) => {
                let a = AttemptId::from_string(acc.attempt_id);
                let (run_id, i) = self.owned_attempt(runner, &a)?;
                match self.attempt_state(&a) {
                    Some(AttemptState::Offered) => self.mark_running(&run_id, i, &a, now),
                    Some(s) if !s.is_active() => self.cancel_stale(runner, &a),
                    _ => {}
                }
            }
            Up::Reject(rej) => {
                let a = AttemptId::from_string(rej.attempt_id);
                self.owned_attempt(runner, &a)?;
                tracing::info!(%runner, attempt = %a, reason = %rej.reason, "offer rejected");
                if let Some(slot) = self.runners.get_mut(runner) {
                    slot.pause();
                }
                // A cancelled task's offer frees its slot on rejection too.
                if matches!(
                    self.attempt_state(&a),
                    Some(AttemptState::Offered | AttemptState::Cancelling)
                ) {
                    self.lose_attempt(&a, LossReason::OfferRejected, now);
                }
            }
            Up::Step(step) => {
                let a = AttemptId::from_string(step.attempt_id);
                self.owned_attempt(runner, &a)?;
                if self.attempt_state(&a).is_some_and(|s| !s.is_active()) {
                    self.cancel_stale(runner, &a);
                }
                tracing::debug!(attempt = %a, step = step.step_index, state = step.state, "step state");
            }
            Up::Finished(fin) => self.on_finished(runner, fin, now)?,
            Up::GoingAway(g) => {
                tracing::info!(%runner, reason = %g.reason, "runner going away");
                slot_mut(&mut self.runners, runner).conn = None;
            }
        }
        Ok(())
    }

    fn on_finished(
        &mut self,
        runner: &RunnerId,
        fin: rpb::TaskFinished,
        now: Instant,
    ) -> Result<(), StateError> {
        let a = AttemptId::from_string(fin.attempt_id.clone());
        let (run_id, i) = self.owned_attempt(runner, &a)?;
        // The runner keeps the report until told it is durable: tell it
        // (delivered after this batch is written), repeats included.
        let epoch = self.epoch;
        self.send_to(
            runner,
            Down::Welcome(rpb::Welcome {
                leader_epoch: epoch,
                acknowledged: vec![a.to_string()],
                ..Default::default()
            }),
        );
        let Some(state) = self.attempt_state(&a) else {
            return Ok(());
        };
        if !state.is_active() {
            return Ok(()); // a repeat, or the attempt was superseded meanwhile
        }
        slot_mut(&mut self.runners, runner).active.remove(&a);
        self.offered_at.remove(&a);
        self.started_at.remove(&a);
        let outcome =
            rpb::AttemptOutcome::try_from(fin.outcome).unwrap_or(rpb::AttemptOutcome::Unspecified);
        let now_ms = now_ms();
        let run = self.runs.get_mut(&run_id).expect("indexed");
        let max_infra = self.timing.max_infra_retries;
        let t = &mut run.tasks[i];
        let att = t.attempts.iter_mut().find(|x| x.id == a).expect("indexed");
        att.finished_at_ms = now_ms;
        att.log_length = fin.log_length;
        let was_cancelling = state == AttemptState::Cancelling;
        att.state = match outcome {
            rpb::AttemptOutcome::Succeeded => AttemptState::Succeeded,
            rpb::AttemptOutcome::Failed => AttemptState::Failed,
            rpb::AttemptOutcome::Cancelled => AttemptState::Cancelled,
            _ => AttemptState::Lost,
        };
        let att_state = att.state;
        self.fx.dirty_runs.insert(run_id.clone());
        if was_cancelling || t.state.is_terminal() {
            return Ok(()); // the task already ended (cancel, timeout)
        }
        let duration = (now_ms - t.started_at_ms).max(0) as f64 / 1000.0;
        let mut requeue = false;
        match att_state {
            AttemptState::Succeeded => {
                t.state = StoredTaskState::Succeeded;
                t.exit_code = Some(0);
                t.message.clear();
                t.outputs = fin.outputs.clone().into_iter().collect();
            }
            AttemptState::Failed => {
                t.script_failures += 1;
                t.exit_code = fin.exit_code;
                t.message = fin.message.clone();
                if t.script_failures <= t.retries {
                    requeue = true;
                } else {
                    t.state = StoredTaskState::Failed;
                }
            }
            _ => {
                // Cancelled on the runner's own initiative, or an executor
                // error: the infrastructure failed, not the script.
                t.infra_failures += 1;
                t.message = format!("runner error: {}", fin.message);
                if t.infra_failures <= max_infra {
                    requeue = true;
                } else {
                    t.state = StoredTaskState::Failed;
                    t.message = format!(
                        "gave up after {} infrastructure failures; last: {}",
                        t.infra_failures, fin.message
                    );
                }
            }
        }
        let name = t.name.clone();
        if requeue {
            self.requeue(&run_id, i);
        } else {
            self.runs.get_mut(&run_id).expect("indexed").tasks[i].finished_at_ms = now_ms;
            self.fx.tasks_finished.push((name, duration));
            self.propagate(&run_id, i);
            self.finish_run_if_done(&run_id);
        }
        let _ = now;
        Ok(())
    }

    /// Tells a runner to stop an attempt it reports on but that is no longer
    /// its to run (expired offer, requeued after a lost lease).
    fn cancel_stale(&mut self, runner: &RunnerId, a: &AttemptId) {
        let epoch = self.epoch;
        self.send_to(
            runner,
            Down::Cancel(rpb::Cancel {
                leader_epoch: epoch,
                attempt_id: a.to_string(),
                reason: "this attempt is no longer assigned to this runner".into(),
            }),
        );
    }

    fn mark_running(&mut self, run_id: &RunId, i: usize, a: &AttemptId, now: Instant) {
        self.offered_at.remove(a);
        self.started_at.insert(a.clone(), now);
        let now_ms = now_ms();
        let run = self.runs.get_mut(run_id).expect("indexed");
        if run.state == StoredRunState::Queued {
            run.state = StoredRunState::Running;
        }
        let t = &mut run.tasks[i];
        if let Some(att) = t.attempts.iter_mut().find(|x| &x.id == a) {
            att.state = AttemptState::Running;
            att.started_at_ms = now_ms;
        }
        if t.state == StoredTaskState::Offered {
            t.state = StoredTaskState::Running;
            if t.started_at_ms == 0 {
                t.started_at_ms = now_ms;
            }
            self.fx
                .pickups_ms
                .push((now_ms - t.queued_at_ms).max(0) as f64);
        }
        self.touch_run(run_id);
    }

    /// The attempt ended through no fault of its script: free its slot and
    /// requeue the task (or fail it after too many infrastructure failures).
    fn lose_attempt(&mut self, a: &AttemptId, why: LossReason, _now: Instant) {
        let Some((run_id, i)) = self.attempts.get(a).cloned() else {
            return;
        };
        self.offered_at.remove(a);
        self.started_at.remove(a);
        let max_infra = self.timing.max_infra_retries;
        let run = self.runs.get_mut(&run_id).expect("indexed");
        let t = &mut run.tasks[i];
        let Some(att) = t.attempts.iter_mut().find(|x| &x.id == a) else {
            return;
        };
        let prev = att.state;
        if !prev.is_active() {
            return;
        }
        att.state = AttemptState::Lost;
        att.finished_at_ms = now_ms();
        let runner = att.runner.clone();
        let runner_name = att.runner_name.clone();
        if let Some(slot) = self.runners.get_mut(&runner) {
            slot.active.remove(a);
        }
        self.fx.dirty_runs.insert(run_id.clone());
        if prev == AttemptState::Cancelling || t.state.is_terminal() {
            return;
        }
        let counts = why == LossReason::RunnerLost;
        if counts {
            t.infra_failures += 1;
            t.message = format!("runner {runner_name} lost; retrying");
        }
        if t.infra_failures > max_infra {
            t.state = StoredTaskState::Failed;
            t.message = format!(
                "gave up after {} infrastructure failures (runner lost)",
                t.infra_failures
            );
            t.finished_at_ms = now_ms();
            self.propagate(&run_id, i);
            self.finish_run_if_done(&run_id);
        } else {
            self.requeue(&run_id, i);
        }
    }

    fn attempt_mut(&mut self, run: &RunId, i: usize, a: &AttemptId) -> Option<&mut AttemptRecord> {
        self.runs
            .get_mut(run)?
            .tasks
            .get_mut(i)?
            .attempts
            .iter_mut()
            .find(|x| &x.id == a)
    }

    fn attempt_state(&self, a: &AttemptId) -> Option<AttemptState> {
        let (run, i) = self.attempts.get(a)?;
        self.runs
            .get(run)?
            .tasks
            .get(*i)?
            .attempts
            .iter()
            .find(|x| &x.id == a)
            .map(|x| x.state)
    }

    /// The attempt's place, if `runner` owns it (fencing: a runner may report
    /// only on attempts assigned to it).
    pub fn owned_attempt(
        &self,
        runner: &RunnerId,
        a: &AttemptId,
    ) -> Result<(RunId, usize), StateError> {
        let not_yours = || StateError::NotYourAttempt {
            runner: runner.to_string(),
            attempt: a.to_string(),
        };
        let (run, i) = self.attempts.get(a).ok_or_else(not_yours)?;
        let att = self.runs[run].tasks[*i]
            .attempts
            .iter()
            .find(|x| &x.id == a)
            .ok_or_else(not_yours)?;
        if &att.runner != runner {
            return Err(not_yours());
        }
        Ok((run.clone(), *i))
    }

    // ----- dispatch and timers ---------------------------------------------

    /// Offers queued tasks to runners with free slots, highest priority and
    /// oldest first. Called after every batch of events.
    pub fn dispatch(&mut self, now: Instant) {
        if self.queue.is_empty() {
            return;
        }
        // Built once per call: scanning every runner for every queued task
        // made a burst of 10,000 tasks over 10,000 runners take seconds.
        let mut free = FreeSlots::new(self.runners.values());
        let mut offered = Vec::new();
        for key in self.queue.iter() {
            if free.is_empty() {
                break;
            }
            let (_, _, run_id, i) = key;
            let runs_on = &self.runs[run_id].tasks[*i].spec.runs_on;
            let runners = &self.runners;
            let Some(runner) = free.take(|id| labels_match(runs_on, &runners[id].record.labels))
            else {
                continue;
            };
            offered.push((key.clone(), runner));
        }
        for (key, runner) in offered {
            self.queue.remove(&key);
            let (_, _, run_id, i) = key;
            self.offer(&run_id, i, &runner, AttemptId::generate(), now);
        }
    }

    fn offer(&mut self, run_id: &RunId, i: usize, runner: &RunnerId, a: AttemptId, now: Instant) {
        let epoch = self.epoch;
        let offer_timeout = self.timing.offer_timeout;
        let slot = self
            .runners
            .get_mut(runner)
            .expect("offered to a known runner");
        slot.active.insert(a.clone());
        // An idle runner heartbeats rarely (`idle_heartbeat`) and may not
        // have been heard from for longer than a lease: the lease of what it
        // is offered starts now. The offer timeout covers a runner that is
        // gone; its accept renews the lease.
        slot.last_seen = slot.last_seen.max(now);
        let runner_name = slot.record.name.clone();
        let run = self.runs.get_mut(run_id).expect("queued run exists");
        let (repo, rev) = (run.repo.clone(), run.rev.clone());
        let t = &mut run.tasks[i];
        let number = t.attempts.len() as u32 + 1;
        t.attempts.push(AttemptRecord {
            id: a.clone(),
            number,
            runner: runner.clone(),
            runner_name,
            state: AttemptState::Offered,
            offered_at_ms: now_ms(),
            started_at_ms: 0,
            finished_at_ms: 0,
            log_length: 0,
        });
        t.state = StoredTaskState::Offered;
        let t = &run.tasks[i];
        let runner_name = t.attempts.last().map_or("", |x| x.runner_name.as_str());
        let trace = crate::trace::dispatch(run, t, a.as_str(), number, runner_name);
        let offer = rpb::Offer {
            leader_epoch: epoch,
            attempt_id: a.to_string(),
            run_id: run_id.to_string(),
            task_name: t.name.clone(),
            attempt_number: number,
            task: Some(t.spec.clone()),
            repo,
            rev,
            offer_timeout_ms: offer_timeout.as_millis() as u32,
            traceparent: trace.traceparent,
            tracestate: trace.tracestate,
            // Set when it leaves early (`Effects::take_tentative_offers`).
            tentative: false,
        };
        self.attempts.insert(a.clone(), (run_id.clone(), i));
        self.offered_at.insert(a.clone(), now);
        self.fx.offered.push(a);
        self.touch_run(run_id);
        self.send_to(runner, Down::Offer(offer));
    }

    /// Expires offers, requeues the attempts of runners past their lease and
    /// fails tasks far past their own timeout.
    pub fn sweep(&mut self, now: Instant) {
        let expired: Vec<AttemptId> = self
            .offered_at
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= self.timing.offer_timeout)
            .map(|(a, _)| a.clone())
            .collect();
        for a in expired {
            tracing::warn!(attempt = %a, "offer expired; requeueing");
            if let Some((run, i)) = self.attempts.get(&a).cloned()
                && let Some(r) = self.runs.get(&run)
                && let Some(att) = r.tasks[i].attempts.iter().find(|x| x.id == a)
                && let Some(slot) = self.runners.get_mut(&att.runner.clone())
            {
                slot.pause();
            }
            self.lose_attempt(&a, LossReason::OfferExpired, now);
        }

        let lease = self.timing.lease;
        let grace = self.timing.disconnect_grace;
        let lost: Vec<(RunnerId, Vec<AttemptId>)> = self
            .runners
            .values()
            .filter(|r| {
                !r.active.is_empty()
                    && (now.saturating_duration_since(r.seen()) >= lease
                        || r.detached_at
                            .is_some_and(|d| now.duration_since(d) >= grace))
            })
            .map(|r| (r.record.id.clone(), r.active.iter().cloned().collect()))
            .collect();
        for (runner, attempts) in lost {
            tracing::warn!(%runner, attempts = attempts.len(), "runner lease expired; requeueing its attempts");
            if let Some(slot) = self.runners.get_mut(&runner) {
                // Force a reconnect: its next hello sorts out what it still runs.
                slot.conn = None;
            }
            for a in attempts {
                self.lose_attempt(&a, LossReason::RunnerLost, now);
            }
        }

        let grace = self.timing.timeout_grace;
        let overdue: Vec<AttemptId> = self
            .started_at
            .iter()
            .filter_map(|(a, at)| {
                let (run, i) = self.attempts.get(a)?;
                let limit = self.runs[run].tasks[*i].spec.timeout_seconds;
                (limit > 0 && now.duration_since(*at) >= Duration::from_secs(limit) + grace)
                    .then(|| a.clone())
            })
            .collect();
        for a in overdue {
            if let Some((run, i)) = self.attempts.get(&a).cloned() {
                let limit = self.runs[&run].tasks[i].spec.timeout_seconds;
                self.cancel_task(&run, i, "");
                let r = self.runs.get_mut(&run).expect("indexed");
                let t = &mut r.tasks[i];
                t.state = StoredTaskState::Failed;
                t.message = format!(
                    "timed out after {limit}s (the runner did not stop it; failed by the coordinator)"
                );
                self.propagate(&run, i);
                self.finish_run_if_done(&run);
            }
        }
    }

    /// Restarts the offer timeout of `offered` at `now` (after a slow write,
    /// an offer must not expire before it was even sent).
    pub fn restart_offer_clocks(&mut self, offered: &[AttemptId], now: Instant) {
        for a in offered {
            if let Some(at) = self.offered_at.get_mut(a) {
                *at = now;
            }
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.fx)
    }
}

fn slot_mut<'a>(
    runners: &'a mut HashMap<RunnerId, RunnerSlot>,
    id: &RunnerId,
) -> &'a mut RunnerSlot {
    runners.get_mut(id).expect("runner exists")
}

impl SchedulerState {
    /// Whether `attempt` belongs to a run the state holds.
    pub fn knows_attempt(&self, attempt: &AttemptId) -> bool {
        self.attempts.contains_key(attempt)
    }

    /// Retention: forgets up to `max` runs that finished at or before
    /// `cutoff_ms` and have no attempt still active (a cancel not yet
    /// confirmed by its runner keeps the run): their records, idempotency
    /// keys and attempt index entries. Returns them, so the caller deletes
    /// their stored records and logs.
    pub fn expire_runs(&mut self, cutoff_ms: i64, max: usize) -> Vec<RunRecord> {
        let expired: Vec<RunId> = self
            .runs
            .values()
            .filter(|r| {
                r.state.is_terminal()
                    && r.finished_at_ms <= cutoff_ms
                    && r.tasks
                        .iter()
                        .flat_map(|t| &t.attempts)
                        .all(|a| !a.state.is_active())
            })
            .take(max)
            .map(|r| r.id.clone())
            .collect();
        let mut out = Vec::with_capacity(expired.len());
        for id in expired {
            let Some(run) = self.runs.remove(&id) else {
                continue;
            };
            if !run.idempotency_key.is_empty() {
                self.run_keys.remove(&run.idempotency_key);
            }
            for a in run.tasks.iter().flat_map(|t| &t.attempts) {
                self.attempts.remove(&a.id);
                self.offered_at.remove(&a.id);
                self.started_at.remove(&a.id);
            }
            self.fx.dirty_runs.remove(&id);
            out.push(run);
        }
        out
    }
}
