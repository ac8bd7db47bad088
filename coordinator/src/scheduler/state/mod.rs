//! The scheduler's state machine, with no I/O.
//!
//! Every transition mutates the in-memory state and records its effects:
//! which records became dirty (to be persisted) and which messages go to
//! which runner connection. The actor in `super` persists the dirty records
//! and only then delivers the messages, so nobody hears of a change that is
//! not durable. The one exception is a tentative offer
//! ([`Effects::take_tentative_offers`]): it leaves before the write, and the
//! runner runs nothing of it until the `ConfirmOffer` sent after the write.
//! Time is passed in (`now`) so tests can drive leases and offer timeouts.
//!
//! Layout: [`SchedulerState`] (here) is composed of small owners, each with
//! private fields, that the transitions ask:
//! - `runs`: the run records, idempotency keys and the attempt index;
//! - `runners`: the runners registry ([`RunnerSlot`], its connection);
//! - `queue`: the ready queue, in dispatch order;
//! - `clocks`: when offers left and attempts started (in memory only);
//! - `effects`: what a batch of transitions produced ([`Effects`]).
//!
//! The transitions, as `impl SchedulerState` blocks by what they act on:
//! - `tasks`: submit, cancel, task outcomes and their propagation, retention;
//! - `connection`: register, attach (a runner's hello), detach, drain;
//! - `reports`: the messages a runner sends on its Control stream;
//! - `offers`: dispatching queued tasks (matching in [`super::dispatch`]);
//! - `sweep`: the timers (offer timeouts, leases, task timeouts);
//! - `demand`: a read of queued and running tasks and runners, for autoscalers.

mod approvals;
pub(crate) use approvals::{Decide, decidable};
mod backoff;
mod clocks;
mod conditions;
mod connection;
mod demand;
mod effects;
mod groups;
mod offers;
mod outcome;
mod outputs;
mod queue;
mod reports;
mod runners;
mod runs;
mod sweep;
mod tasks;

pub(crate) use connection::Takeover;
pub(crate) use demand::DemandSnapshot;
#[cfg(test)]
pub(crate) use demand::{Supply, TaskDemand};
pub(crate) use effects::{Effects, Outgoing, RunnerTx};
pub(crate) use outcome::{RetryClass, RunOutcome, Tally, TaskOutcome};
pub(crate) use runners::RunnerSlot;

use crate::model::*;
use capstan_proto::ids::{AttemptId, RunId, RunnerId};
use capstan_proto::runner::v1 as rpb;
use clocks::Clocks;
use queue::ReadyQueue;
use rpb::coordinator_message::Kind as Down;
use runners::Runners;
use runs::Runs;
use tokio::time::{Duration, Instant};

/// How often an idle runner heartbeats by default: an idle runner's
/// heartbeat renews no lease, and receiving one a second from every runner
/// of a big fleet costs a real share of a core (docs/decisions.md).
pub(crate) const DEFAULT_IDLE_HEARTBEAT: Duration = Duration::from_secs(5);

/// How long finished runs and their logs are kept by default: GitLab's
/// default for job artifacts, and long enough to look back over a month.
pub(crate) const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

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
    /// The wait before the first infrastructure retry; it doubles with
    /// each further one, jittered (`state/backoff.rs`).
    pub infra_backoff: Duration,
    /// The longest wait before an infrastructure retry.
    pub infra_backoff_max: Duration,
    /// Grace past a task's own timeout before the coordinator fails it itself.
    pub timeout_grace: Duration,
    /// Extra time, on top of one lease, that a newly started leader gives
    /// runners to re-attach before it requeues their attempts: the runner's
    /// detection of the old leader's silence plus its reconnect, both derived
    /// from `heartbeat` ([`capstan_proto::liveness::reattach_grace`],
    /// docs/decisions.md "issue 25").
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
        let heartbeat = Duration::from_secs(1);
        Self {
            heartbeat,
            idle_heartbeat: DEFAULT_IDLE_HEARTBEAT,
            lease: Duration::from_secs(5),
            offer_timeout: Duration::from_secs(5),
            max_infra_retries: 3,
            infra_backoff: Duration::from_secs(1),
            infra_backoff_max: Duration::from_secs(30),
            timeout_grace: Duration::from_secs(30),
            reattach_grace: capstan_proto::liveness::reattach_grace(heartbeat),
            disconnect_grace: capstan_proto::liveness::disconnect_grace(heartbeat),
            retention: Some(DEFAULT_RETENTION),
        }
    }
}

/// Why an attempt ended early, for the task's message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LossReason {
    RunnerLost,
    OfferExpired,
    OfferRejected,
    /// The runner dropped a tentative offer unrun (its stream ended before
    /// the confirm) and said so in its next hello.
    OfferDropped,
}

/// Errors the state machine reports to the API layer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
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
    #[error(
        "this runner registered with a client certificate for `{registered}`, this connection presents `{presented}`"
    )]
    TlsIdentity {
        registered: String,
        presented: String,
    },
    #[error("runner {runner} reported on attempt {attempt}, which is not assigned to it")]
    NotYourAttempt { runner: String, attempt: String },
    #[error(
        "run {run} was submitted by token `{submitted_by}`: a `submit` token may cancel only its own runs (an `admin` token may cancel any)"
    )]
    NotYourRun { run: String, submitted_by: String },
    #[error(
        "a runner named `{0}` is already registered: registering it again needs its current credential (its runner.json) or an admin API token; give a new runner another --name"
    )]
    NameTaken(String),
    /// Reading a finished run from the store failed.
    #[error("could not read finished runs from the state store ({0}); retry")]
    History(String),
    #[error("attempt {0} has finished: its log takes no more bytes")]
    AttemptFinished(String),
    /// A per-token quota (`crate::limits::Quota::admits` words it).
    #[error("{0}")]
    QuotaExceeded(String),
    /// A decision on a task that is not waiting at its gate.
    #[error("{0}")]
    NotAtGate(String),
    #[error(
        "the approval of task `{task}` may be decided by a token with scope {allowed}; this token has `{scope}`"
    )]
    MayNotDecide {
        task: String,
        allowed: String,
        scope: String,
    },
}

pub(crate) struct SchedulerState {
    epoch: u64,
    timing: Timing,
    runs: Runs,
    runners: Runners,
    queue: ReadyQueue,
    clocks: Clocks,
    next_conn: u64,
    fx: Effects,
    backoffs: backoff::Backoffs,
    /// Tasks waiting at their approval gate -> when it times out (ms since
    /// the epoch; `i64::MAX`: never).
    gates: std::collections::HashMap<(RunId, usize), i64>,
}

impl SchedulerState {
    pub(crate) fn new(epoch: u64, timing: Timing) -> Self {
        Self {
            epoch,
            timing,
            runs: Runs::default(),
            runners: Runners::default(),
            queue: ReadyQueue::default(),
            clocks: Clocks::default(),
            next_conn: 0,
            fx: Effects::default(),
            backoffs: backoff::Backoffs::default(),
            gates: Default::default(),
        }
    }

    /// Rebuilds the state from persisted records. Attempts that were offered
    /// or running stay assigned: their runners get one lease plus
    /// `reattach_grace` (counted from `now`) to re-attach before the
    /// attempts are requeued.
    pub(crate) fn load(
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
            st.runners.insert(RunnerSlot::new(r, seen, now_ms));
        }
        for run in runs {
            for (i, t) in run.tasks.iter().enumerate() {
                for a in t.attempts.iter().filter(|a| a.state.is_active()) {
                    if let Some(slot) = st.runners.get_mut(&a.runner) {
                        slot.hold(a.id.clone());
                    }
                    match a.state {
                        AttemptState::Offered => st.clocks.offered(a.id.clone(), seen),
                        AttemptState::Running => st.clocks.started(&a.id, now),
                        _ => {}
                    }
                }
                if t.state == StoredTaskState::Waiting
                    && let Some(a) = t.approval.as_ref().filter(|a| a.pending())
                {
                    let deadline = approvals::deadline(a);
                    if deadline < i64::MAX {
                        st.gates.insert((run.id.clone(), i), deadline);
                    }
                }
                if t.state == StoredTaskState::Queued && t.retry_at_ms > now_ms {
                    let left = Duration::from_millis((t.retry_at_ms - now_ms) as u64);
                    st.backoffs.wait(now + left, run.id.clone(), i);
                } else if t.state == StoredTaskState::Queued {
                    st.queue.insert(run.priority, run.seq, &run.id, i);
                }
            }
            st.runs.restore(run);
        }
        st
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn timing(&self) -> &Timing {
        &self.timing
    }

    pub(crate) fn run(&self, id: &RunId) -> Option<&RunRecord> {
        self.runs.get(id)
    }

    /// Finished with no attempt still active: archived at the next commit,
    /// then evicted.
    #[cfg(test)]
    pub(crate) fn settled(&self, id: &RunId) -> bool {
        self.runs.settled(id)
    }

    /// Runs are numbered from `next` on at least: the history's newest run
    /// is not loaded, yet no new run may share its number.
    pub(crate) fn number_from(&mut self, next: u64) {
        self.runs.number_from(next);
    }

    /// The seq the next submitted run gets: every run has a lower one.
    pub(crate) fn next_seq(&self) -> u64 {
        self.runs.next_seq()
    }

    /// How many runs the state holds (the unfinished, and the settled not
    /// yet evicted).
    pub(crate) fn runs_held(&self) -> usize {
        self.runs.len()
    }

    pub(crate) fn runs(&self) -> impl Iterator<Item = &RunRecord> {
        self.runs.values()
    }

    /// Lets `f` add to a run's record what the state machine never reads
    /// (its trace context); the record is written with the batch.
    pub(crate) fn annotate_run(&mut self, id: &RunId, f: impl FnOnce(&mut RunRecord)) {
        if let Some(run) = self.runs.get_mut(id) {
            f(run);
            self.fx.touch_run(id);
        }
    }

    pub(crate) fn runner(&self, id: &RunnerId) -> Option<&RunnerSlot> {
        self.runners.get(id)
    }

    pub(crate) fn runners(&self) -> impl Iterator<Item = &RunnerSlot> {
        self.runners.values()
    }

    /// How many runners have a Control stream open.
    pub(crate) fn connected_runners(&self) -> usize {
        self.runners.connected()
    }

    /// Whether `attempt` belongs to a run the state holds.
    pub(crate) fn knows_attempt(&self, attempt: &AttemptId) -> bool {
        self.runs.knows_attempt(attempt)
    }

    /// Whether `attempt` belongs to a run that has ended.
    pub(crate) fn attempt_run_ended(&self, attempt: &AttemptId) -> bool {
        self.runs
            .locate(attempt)
            .and_then(|(run, _)| self.runs.get(&run))
            .is_some_and(|r| r.state.is_terminal())
    }

    /// The attempt's place, if `runner` owns it (fencing: a runner may report
    /// only on attempts assigned to it).
    /// May `runner` append to `a`'s log? Only while the attempt is its own
    /// and still active: a runner sends an attempt's final report after its
    /// log is durable, so nothing legitimate comes after the end (a runner
    /// the coordinator gave up on keeps running and is refused here).
    pub(crate) fn log_writable(&self, runner: &RunnerId, a: &AttemptId) -> Result<(), StateError> {
        self.runs.owned(runner, a)?;
        match self.runs.attempt_state(a) {
            Some(state) if state.is_active() => Ok(()),
            _ => Err(StateError::AttemptFinished(a.to_string())),
        }
    }

    /// The task spec of attempt `a` as it was offered (outputs filled in)
    /// and the run's repository.
    pub(crate) fn attempt_task(
        &self,
        a: &AttemptId,
    ) -> Option<(capstan_proto::pipeline::v1::TaskSpec, &str)> {
        let (run, i) = self.runs.locate(a)?;
        let r = self.runs.get(&run)?;
        r.tasks.get(i)?;
        Some((
            crate::scheduler::dispatch::offered_spec(r, i),
            r.repo.as_str(),
        ))
    }

    pub(crate) fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// The effects recorded so far, without taking them.
    #[cfg(test)]
    pub(crate) fn effects(&self) -> &Effects {
        &self.fx
    }

    pub(crate) fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.fx)
    }

    /// Queues `kind` for the runner's current connection, if it has one.
    fn send_to(&mut self, runner: &RunnerId, kind: Down) {
        if let Some(out) = self.runners.get(runner).and_then(|s| s.outgoing(kind)) {
            self.fx.send(out);
        }
    }
}
