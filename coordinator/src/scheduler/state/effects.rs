//! The effects of a batch of transitions: which records changed (to be
//! written), which messages go down which runner connection (sent after the
//! write, or before it for a tentative offer), and what metrics and traces
//! observe.
//!
//! The transitions record into an [`Effects`]; the loop's commit takes it
//! whole ([`super::SchedulerState::take_effects`]) and reads it through the
//! accessors. Nothing else writes it.

use super::LossReason;
use super::outcome::{RetryClass, RunOutcome, Tally, TaskOutcome};
use capstan_proto::ids::{AttemptId, RunId, RunnerId};
use capstan_proto::runner::v1 as rpb;
use rpb::coordinator_message::Kind as Down;
use std::collections::HashSet;
use tokio::sync::mpsc;

/// The sending half of a runner's Control stream.
pub(crate) type RunnerTx = mpsc::UnboundedSender<Result<rpb::CoordinatorMessage, tonic::Status>>;

pub(super) fn msg(kind: Down) -> rpb::CoordinatorMessage {
    rpb::CoordinatorMessage { kind: Some(kind) }
}

/// A message for one runner connection, waiting in the outbox.
pub(crate) struct Outgoing {
    /// The connection it goes down.
    conn: u64,
    tx: RunnerTx,
    msg: rpb::CoordinatorMessage,
    /// The connection's runner confirms offers (its hello said so).
    confirms_offers: bool,
}

impl Outgoing {
    pub(super) fn new(
        conn: u64,
        tx: RunnerTx,
        msg: rpb::CoordinatorMessage,
        confirms_offers: bool,
    ) -> Self {
        Self {
            conn,
            tx,
            msg,
            confirms_offers,
        }
    }

    #[cfg(test)]
    pub(crate) fn msg(&self) -> &rpb::CoordinatorMessage {
        &self.msg
    }

    /// Sends it (a connection already gone drops it).
    pub(crate) fn deliver(self) {
        let _ = self.tx.send(Ok(self.msg));
    }

    /// The confirm of the tentative offer this holds, for the same
    /// connection (`None` if it holds no offer).
    pub(crate) fn confirm(&self) -> Option<(RunnerTx, rpb::CoordinatorMessage)> {
        let Some(Down::Offer(offer)) = &self.msg.kind else {
            return None;
        };
        let confirm = Down::Confirm(rpb::ConfirmOffer {
            leader_epoch: offer.leader_epoch,
            attempt_id: offer.attempt_id.clone(),
        });
        Some((self.tx.clone(), msg(confirm)))
    }
}

#[derive(Default)]
pub(crate) struct Effects {
    dirty_runs: HashSet<RunId>,
    dirty_runners: HashSet<RunnerId>,
    /// Messages for runners, in the order they were made.
    outbox: Vec<Outgoing>,
    /// Attempts offered in this batch: their offer clock starts when the
    /// batch is durable and the offer actually leaves.
    offered: Vec<AttemptId>,
    /// Pickup latencies (queued -> accepted) observed, for metrics.
    pickups_ms: Vec<f64>,
    /// How tasks and runs ended, requeues and retries (for metrics).
    tally: Tally,
    /// Runs that reached a final state in this batch (their trace span ends).
    runs_finished: Vec<RunId>,
}

/// Recording, by the transitions.
impl Effects {
    pub(super) fn touch_run(&mut self, id: &RunId) {
        self.dirty_runs.insert(id.clone());
    }

    pub(super) fn touch_runner(&mut self, id: &RunnerId) {
        self.dirty_runners.insert(id.clone());
    }

    pub(super) fn send(&mut self, out: Outgoing) {
        self.outbox.push(out);
    }

    pub(super) fn offer_made(&mut self, attempt: AttemptId) {
        self.offered.push(attempt);
    }

    pub(super) fn pickup(&mut self, ms: f64) {
        self.pickups_ms.push(ms);
    }

    /// A task ended; `secs`: its run time, when a runner's report ended it.
    pub(super) fn task_finished(&mut self, outcome: TaskOutcome, secs: Option<f64>) {
        self.tally.tasks.push(outcome);
        self.tally.task_seconds.extend(secs);
    }

    pub(super) fn run_finished(&mut self, id: &RunId, outcome: RunOutcome) {
        self.runs_finished.push(id.clone());
        self.tally.runs.push(outcome);
    }

    /// An attempt ended without a report and its task was queued again.
    pub(super) fn requeued(&mut self, why: LossReason, run: &RunId, task: &str, attempt: u32) {
        self.tally.requeues.push(super::outcome::Requeue {
            why,
            run: run.clone(),
            task: task.to_owned(),
            attempt,
        });
    }

    /// A task failed and is run again.
    pub(super) fn retried(&mut self, class: RetryClass) {
        self.tally.retries.push(class);
    }
}

/// Reading, by the commit.
impl Effects {
    pub(crate) fn dirty_runs(&self) -> impl Iterator<Item = &RunId> {
        self.dirty_runs.iter()
    }

    pub(crate) fn dirty_runners(&self) -> impl Iterator<Item = &RunnerId> {
        self.dirty_runners.iter()
    }

    #[cfg(test)]
    pub(crate) fn is_runner_dirty(&self, id: &RunnerId) -> bool {
        self.dirty_runners.contains(id)
    }

    pub(crate) fn offered(&self) -> &[AttemptId] {
        &self.offered
    }

    #[cfg(test)]
    pub(crate) fn outbox(&self) -> &[Outgoing] {
        &self.outbox
    }

    /// The messages that leave after the write, in order.
    pub(crate) fn take_outbox(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outbox)
    }

    pub(crate) fn pickups_ms(&self) -> &[f64] {
        &self.pickups_ms
    }

    /// How the batch's tasks and runs ended, and what it ran again.
    pub(crate) fn tally(&self) -> &Tally {
        &self.tally
    }

    pub(crate) fn runs_finished(&self) -> &[RunId] {
        &self.runs_finished
    }

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
    pub(crate) fn take_tentative_offers(&mut self) -> Vec<Outgoing> {
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
