//! The loop's group commit: every record a batch of commands changed goes
//! to the store in one write, and what the batch produced (offers, cancels,
//! replies, watch updates) is delivered around it, in an order that never
//! tells anyone of a change that is not durable.
//!
//! Tentative offers leave before the write, so the runner prepares the
//! attempt while the write's fsync runs; their confirms leave after the
//! write succeeded, ahead of the rest of the outbox. A failed write
//! returns before any confirm (the scheduler stops, its runner streams
//! end and the runners drop what they prepared). A leadership that ends
//! meanwhile sends none either: with etcd the write is fenced by the
//! leader's lease and fails, and the scheduler future is aborted at the
//! write's await, or at the yield before it. (redb runs the write inside
//! one poll, on this thread, so an abort cannot stop it between the
//! write and the confirms; redb is standalone-only, where leadership
//! ends only at shutdown, and the runner streams end with it.) Accepts of
//! tentative offers that arrive meanwhile wait in the channel for the
//! next turn, which sees the offer as written.

use super::state::{Effects, Outgoing, RunnerTx};
use super::{Scheduler, view};
use crate::model::{run_key, runner_key};
use crate::store::{Op, StoreError};
use capstan_proto::ids::AttemptId;
use capstan_proto::runner::v1 as rpb;
use tokio::time::Instant;

impl Scheduler {
    /// Persists every dirty record in one batch, then delivers messages,
    /// replies and watch updates (see the module docs).
    pub(super) async fn commit(&mut self) -> Result<(), StoreError> {
        let mut fx = self.state.take_effects();
        let tentative = fx.take_tentative_offers();
        let any_tentative = !tentative.is_empty();
        let confirms = send_early(tentative);
        let batch = self.dirty_records(&fx);
        if any_tentative || !batch.is_empty() {
            // What this turn woke runs now, before a store that writes on
            // this thread (redb) blocks it for the fsync: the offers' runner
            // streams, and the handlers of commands answered at once (reads,
            // log authorizations), of which the last woken sits in this
            // worker's LIFO slot, which no other worker may take. Only this
            // task changes the state, so the batch above still holds.
            tokio::task::yield_now().await;
        }
        if !batch.is_empty() {
            let started = Instant::now();
            let written = self.store.apply(batch).await;
            self.metrics
                .store_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            if let Err(e) = written {
                tracing::error!(error = %e, "state write failed; stopping the scheduler");
                return Err(e);
            }
        }
        self.state
            .restart_offer_clocks(fx.offered(), Instant::now());
        for r in self.replies.drain(..) {
            r();
        }
        self.update_watchers(&fx);
        // Runners' messages go last, confirms first among them (a runner's
        // stream keeps the order they are sent in): the task woken last
        // takes this worker's LIFO slot and runs first once the loop
        // yields, and a confirm is what a runner waits for to start a step,
        // while a reply or a watcher's update can wait for it. (Something
        // in the outbox too would go first; a commit that confirms an offer
        // rarely has any.)
        for (tx, m) in confirms {
            let _ = tx.send(Ok(m));
        }
        for out in fx.take_outbox() {
            out.deliver();
        }
        self.observe(&fx);
        // Settled by this (durable) commit: to the archiver, which moves
        // them into the history; the loop evicts them when it is told.
        for id in fx.dirty_runs() {
            if let Some(run) = self.state.run(id)
                && run.is_settled()
                && self.archiving.insert(id.clone())
                && self.archive.send(run.clone()).is_err()
            {
                tracing::error!(run = %id, "the archiver is gone: the run stays in memory");
            }
        }
        self.metrics.runs_held.set(self.state.runs_held() as i64);
        Ok(())
    }

    /// The store write of the records `fx` made dirty.
    fn dirty_records(&self, fx: &Effects) -> Vec<Op> {
        let mut batch = Vec::new();
        for id in fx.dirty_runs() {
            if let Some(run) = self.state.run(id) {
                batch.push(Op::Put {
                    key: run_key(id),
                    value: super::stored::encode(run, &self.sealer),
                });
            }
        }
        for id in fx.dirty_runners() {
            batch.push(match self.state.runner(id) {
                Some(r) => Op::Put {
                    key: runner_key(id),
                    value: serde_json::to_vec(r.record()).expect("records serialize"),
                },
                // Deleted this batch (an ephemeral runner that left).
                None => Op::Delete {
                    key: runner_key(id),
                },
            });
        }
        batch
    }

    /// Sends the changed runs' views to their watchers; a watcher of a
    /// finished run, or one nobody listens to any more, is dropped.
    fn update_watchers(&mut self, fx: &Effects) {
        for id in fx.dirty_runs() {
            let Some(run) = self.state.run(id) else {
                continue;
            };
            if let Some(w) = self.watchers.get(id) {
                w.send_replace(view::run(run));
                if run.state.is_terminal() || w.receiver_count() == 0 {
                    self.watchers.remove(id);
                }
            }
        }
    }

    /// Metrics and trace spans of what the batch did.
    fn observe(&mut self, fx: &Effects) {
        for &ms in fx.pickups_ms() {
            self.metrics.pickup_seconds.observe(ms / 1000.0);
        }
        // Requeues first: a run that ends in the same batch carries them.
        for r in &fx.tally().requeues {
            self.run_spans
                .requeued(&r.run, &r.task, r.attempt, r.why.label());
        }
        let epoch = self.state.epoch();
        let mut ended = Vec::new();
        for id in fx.runs_finished() {
            if let Some(run) = self.state.run(id) {
                self.run_spans.finished(run, epoch);
                ended.extend(logged_attempts(run));
            }
        }
        self.seal_logs(ended);
        self.metrics.count(fx.tally());
        self.metrics
            .queue_depth
            .set(self.state.queue_depth() as i64);
    }
}

/// The attempts of `run` that have a log.
pub(super) fn logged_attempts(
    run: &crate::model::RunRecord,
) -> impl Iterator<Item = AttemptId> + '_ {
    run.tasks
        .iter()
        .flat_map(|t| t.attempts.iter())
        .filter(|a| a.log_length > 0)
        .map(|a| a.id.clone())
}

/// Sends the tentative offers and returns their confirms, to send once the
/// write succeeded.
fn send_early(tentative: Vec<Outgoing>) -> Vec<(RunnerTx, rpb::CoordinatorMessage)> {
    let mut confirms = Vec::with_capacity(tentative.len());
    for out in tentative {
        confirms.extend(out.confirm());
        out.deliver();
    }
    confirms
}
