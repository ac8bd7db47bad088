//! Transitions for what a runner reports on its Control stream: heartbeats,
//! accepts and rejects of offers, step states, an attempt's end, going away.

use super::{LossReason, RetryClass, SchedulerState, StateError, TaskOutcome};
use crate::model::*;
use capstan_proto::ids::{AttemptId, RunId, RunnerId};
use capstan_proto::runner::v1 as rpb;
use rpb::coordinator_message::Kind as Down;
use tokio::time::Instant;

impl SchedulerState {
    /// Handles one message from the runner on connection `conn_id`.
    pub(crate) fn on_runner_message(
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
        if !slot.is_on(conn_id) {
            // A message from a replaced connection: the new one speaks for the runner.
            return Ok(());
        }
        slot.heard(now, now_ms());
        match m {
            Up::Hello(_) => {}
            Up::Heartbeat(hb) => slot.heartbeat(hb.draining, now),
            Up::Accept(acc) => {
                let a = AttemptId::from_string(acc.attempt_id);
                let (run_id, i) = self.runs.owned(runner, &a)?;
                match self.runs.attempt_state(&a) {
                    Some(AttemptState::Offered) => {
                        self.runners.slot_mut(runner).offer_accepted();
                        if self.runners.slot_mut(runner).spend() {
                            self.fx.touch_runner(runner);
                        }
                        self.mark_running(&run_id, i, &a, now)
                    }
                    Some(s) if !s.is_active() => self.cancel_stale(runner, &a),
                    _ => {}
                }
            }
            Up::Reject(rej) => {
                let a = AttemptId::from_string(rej.attempt_id);
                self.runs.owned(runner, &a)?;
                tracing::info!(%runner, attempt = %a, reason = %rej.reason, "offer rejected");
                if let Some(slot) = self.runners.get_mut(runner) {
                    slot.pause(now);
                }
                // A cancelled task's offer frees its slot on rejection too.
                if matches!(
                    self.runs.attempt_state(&a),
                    Some(AttemptState::Offered | AttemptState::Cancelling)
                ) {
                    self.lose_attempt(&a, LossReason::OfferRejected, now);
                }
            }
            Up::Step(step) => {
                let a = AttemptId::from_string(step.attempt_id);
                self.runs.owned(runner, &a)?;
                if self.runs.attempt_state(&a).is_some_and(|s| !s.is_active()) {
                    self.cancel_stale(runner, &a);
                }
                tracing::debug!(attempt = %a, step = step.step_index, state = step.state, "step state");
            }
            Up::Finished(fin) => self.on_finished(runner, fin, now)?,
            Up::GoingAway(g) => {
                tracing::info!(%runner, reason = %g.reason, "runner going away");
                self.runners.slot_mut(runner).drop_conn();
                self.forget_ephemeral(runner);
            }
        }
        Ok(())
    }

    /// An attempt ended on its runner: acknowledge the report, end the
    /// attempt and judge its task (done, retried, or failed for good).
    fn on_finished(
        &mut self,
        runner: &RunnerId,
        fin: rpb::TaskFinished,
        now: Instant,
    ) -> Result<(), StateError> {
        let a = AttemptId::from_string(fin.attempt_id.clone());
        let (run_id, i) = self.runs.owned(runner, &a)?;
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
        let Some(state) = self.runs.attempt_state(&a) else {
            return Ok(());
        };
        if !state.is_active() {
            return Ok(()); // a repeat, or the attempt was superseded meanwhile
        }
        self.runners.slot_mut(runner).release(&a);
        self.clocks.forget(&a);
        let now_ms = now_ms();
        let Some(ended) = self.end_attempt(&run_id, i, &a, &fin, state, now_ms) else {
            return Ok(()); // the task already ended (cancel, timeout)
        };
        let max_infra = self.timing.max_infra_retries;
        let t = self.runs.task_mut(&run_id, i);
        let duration = (now_ms - t.started_at_ms).max(0) as f64 / 1000.0;
        let requeue = judge(t, ended, &fin, max_infra);
        let (class, outcome) = match ended {
            AttemptState::Succeeded => (RetryClass::Script, TaskOutcome::Succeeded),
            AttemptState::Failed => (RetryClass::Script, TaskOutcome::Failed),
            _ => (RetryClass::Infra, TaskOutcome::InfraFailed),
        };
        if requeue {
            self.fx.retried(class);
            match class {
                RetryClass::Infra => {
                    self.requeue_backed_off(&run_id, i, now);
                }
                RetryClass::Script => self.requeue(&run_id, i),
            }
        } else {
            self.runs.task_mut(&run_id, i).finished_at_ms = now_ms;
            self.fx.task_finished(outcome, Some(duration));
            self.propagate(&run_id, i);
            self.finish_run_if_done(&run_id);
        }
        Ok(())
    }

    /// Ends attempt `a` (of task `i` of `run_id`, in state `was`) with the
    /// outcome `fin` reports. Returns its new state, or `None` if its task
    /// had already ended (a cancel, a timeout), which the outcome leaves be.
    fn end_attempt(
        &mut self,
        run_id: &RunId,
        i: usize,
        a: &AttemptId,
        fin: &rpb::TaskFinished,
        was: AttemptState,
        now_ms: i64,
    ) -> Option<AttemptState> {
        let outcome =
            rpb::AttemptOutcome::try_from(fin.outcome).unwrap_or(rpb::AttemptOutcome::Unspecified);
        let t = self.runs.task_mut(run_id, i);
        let att = t.attempts.iter_mut().find(|x| &x.id == a).expect("indexed");
        att.finished_at_ms = now_ms;
        att.log_length = fin.log_length;
        att.state = match outcome {
            rpb::AttemptOutcome::Succeeded => AttemptState::Succeeded,
            rpb::AttemptOutcome::Failed => AttemptState::Failed,
            rpb::AttemptOutcome::Cancelled => AttemptState::Cancelled,
            _ => AttemptState::Lost,
        };
        let ended = att.state;
        let task_ended = t.state.is_terminal();
        self.fx.touch_run(run_id);
        (was != AttemptState::Cancelling && !task_ended).then_some(ended)
    }

    /// Tells a runner to stop an attempt it reports on but that is no longer
    /// its to run (expired offer, requeued after a lost lease).
    pub(super) fn cancel_stale(&mut self, runner: &RunnerId, a: &AttemptId) {
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
}

/// What task `t`'s attempt ending in `ended` (as `fin` reports) makes of the
/// task: succeeded, failed, or (returns true) to be run again while retries
/// of that kind are left.
fn judge(t: &mut TaskRecord, ended: AttemptState, fin: &rpb::TaskFinished, max_infra: u32) -> bool {
    match ended {
        AttemptState::Succeeded => {
            t.state = StoredTaskState::Succeeded;
            t.exit_code = Some(0);
            let (outputs, dropped) = super::outputs::kept(fin.outputs.clone());
            if let Some(note) = &dropped {
                tracing::warn!(task = %t.name, "{note}");
            }
            t.message = dropped.unwrap_or_default();
            t.outputs = outputs;
            false
        }
        AttemptState::Failed => {
            t.script_failures += 1;
            t.exit_code = fin.exit_code;
            t.message = capstan_proto::redact::redact_urls(&fin.message).into_owned();
            if t.script_failures <= t.retries {
                return true;
            }
            t.state = StoredTaskState::Failed;
            false
        }
        _ => {
            // Cancelled on the runner's own initiative, or an executor
            // error: the infrastructure failed, not the script.
            t.infra_failures += 1;
            let said = capstan_proto::redact::redact_urls(&fin.message);
            t.message = format!("runner error: {said}");
            if t.infra_failures <= max_infra {
                return true;
            }
            t.state = StoredTaskState::Failed;
            t.message = format!(
                "gave up after {} infrastructure failures; last: {said}",
                t.infra_failures
            );
            false
        }
    }
}
