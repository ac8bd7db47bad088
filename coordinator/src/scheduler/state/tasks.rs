//! Transitions of runs and tasks: submit, cancel, an attempt that starts
//! running or is lost, a task's end and what it means for the tasks that
//! need it and for its run, and retention.

use super::{LossReason, RetryClass, RunOutcome, SchedulerState, StateError, TaskOutcome};
use crate::model::*;
use capstan_proto::ids::{AttemptId, RunId};
use capstan_proto::runner::v1 as rpb;
use rpb::coordinator_message::Kind as Down;
use tokio::time::Instant;

impl SchedulerState {
    /// Adds a validated run. `tasks` are in file order with `needs` as indexes.
    /// Queues `run`, or returns the run an earlier submit with the same
    /// idempotency key queued (`false`: nothing new was queued).
    pub(crate) fn submit(&mut self, mut run: RunRecord) -> (RunId, bool) {
        if !run.idempotency_key.is_empty()
            && let Some(id) = self.runs.by_key(&run.idempotency_key)
        {
            return (id.clone(), false);
        }
        run.seq = self.runs.take_seq();
        let id = run.id.clone();
        run.held = self.admit_to_group(&run);
        for t in &mut run.tasks {
            t.state = StoredTaskState::Waiting;
        }
        let held = run.held;
        self.runs.insert(run);
        if !held {
            self.queue_roots(&id);
        }
        self.fx.touch_run(&id);
        (id, true)
    }

    /// Queues the tasks of a run that need none.
    pub(super) fn queue_roots(&mut self, id: &RunId) {
        let now = now_ms();
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        let (priority, seq) = (run.priority, run.seq);
        let (mut queued, mut held) = (Vec::new(), Vec::new());
        for (i, t) in run.tasks.iter_mut().enumerate() {
            if t.needs.is_empty() && t.state == StoredTaskState::Waiting {
                if let Some(deadline) = super::approvals::gate(t, now) {
                    held.push((i, deadline));
                    continue;
                }
                t.state = StoredTaskState::Queued;
                t.queued_at_ms = now;
                queued.push(i);
            }
        }
        for i in queued {
            self.queue.insert(priority, seq, id, i);
        }
        self.hold_at_gates(id, held);
    }

    /// [`Self::submit`] within `quota`: refused when the token that
    /// submits `run` (`submitted_by`) would have more unfinished runs or
    /// tasks than it allows. A repeat of an earlier submit (same
    /// idempotency key) is never refused: it queues nothing.
    pub(crate) fn submit_within(
        &mut self,
        run: RunRecord,
        quota: &crate::limits::Quota,
    ) -> Result<(RunId, bool), StateError> {
        let repeat =
            !run.idempotency_key.is_empty() && self.runs.by_key(&run.idempotency_key).is_some();
        if !repeat {
            let open = self.runs.open(&run.submitted_by);
            quota
                .admits(&run.submitted_by, (open.runs, open.tasks), run.tasks.len())
                .map_err(StateError::QuotaExceeded)?;
        }
        Ok(self.submit(run))
    }

    /// Cancels a run; with `owner`, only if that token submitted it.
    pub(crate) fn cancel_run(&mut self, id: &RunId, owner: Option<&str>) -> Result<(), StateError> {
        let run = self
            .runs
            .get_mut(id)
            .ok_or_else(|| StateError::UnknownRun(id.to_string()))?;
        if let Some(owner) = owner
            && run.submitted_by != owner
        {
            return Err(StateError::NotYourRun {
                run: id.to_string(),
                submitted_by: run.submitted_by.clone(),
            });
        }
        if run.state.is_terminal() {
            return Ok(());
        }
        run.cancel_requested = true;
        let n = run.tasks.len();
        for i in 0..n {
            self.cancel_task(id, i, "cancelled by user", TaskOutcome::Cancelled);
        }
        self.finish_run_if_done(id);
        Ok(())
    }

    /// Ends a task as cancelled, telling its runner to stop an active
    /// attempt; `outcome` is what the metrics count it as (a timeout's
    /// caller marks the task failed).
    pub(super) fn cancel_task(
        &mut self,
        run_id: &RunId,
        i: usize,
        why: &str,
        outcome: TaskOutcome,
    ) {
        let epoch = self.epoch;
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let (priority, seq) = (run.priority, run.seq);
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
        self.queue.remove(priority, seq, run_id, i);
        self.fx.touch_run(run_id);
        self.fx.task_finished(outcome, None);
        if let Some((runner, attempt)) = notify {
            // An offer's timer stays: if the runner rejects or ignores it,
            // its expiry frees the slot.
            self.clocks.stop_running(&attempt);
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

    /// Marks the run finished once every task is.
    pub(super) fn finish_run_if_done(&mut self, id: &RunId) {
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        if run.state.is_terminal() || !run.tasks.iter().all(|t| t.state.is_terminal()) {
            return;
        }
        let max_infra = self.timing.max_infra_retries;
        let outcome = if run.cancel_requested {
            RunOutcome::Cancelled
        } else if run
            .tasks
            .iter()
            .all(|t| t.state == StoredTaskState::Succeeded)
        {
            RunOutcome::Succeeded
        } else if run
            .tasks
            .iter()
            .any(|t| t.state == StoredTaskState::Failed && t.infra_failures > max_infra)
        {
            RunOutcome::InfraFailed
        } else {
            RunOutcome::Failed
        };
        run.state = match outcome {
            RunOutcome::Cancelled => StoredRunState::Cancelled,
            RunOutcome::Succeeded => StoredRunState::Succeeded,
            RunOutcome::Failed | RunOutcome::InfraFailed => StoredRunState::Failed,
        };
        run.finished_at_ms = now_ms();
        let group = run.group.clone();
        self.runs.finished(id);
        self.fx.run_finished(id, outcome);
        self.fx.touch_run(id);
        if let Some(g) = group {
            self.release_group(&g.name);
        }
    }

    /// A task succeeded: queue the dependents whose needs all succeeded.
    /// A task failed: skip everything that (transitively) needs it.
    pub(super) fn propagate(&mut self, run_id: &RunId, done: usize) {
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
                    self.fx.task_finished(TaskOutcome::Skipped, None);
                }
            }
        }
        let mut held = Vec::new();
        for i in to_queue {
            if let Some(deadline) = super::approvals::gate(&mut run.tasks[i], now) {
                held.push((i, deadline));
                continue;
            }
            run.tasks[i].state = StoredTaskState::Queued;
            run.tasks[i].queued_at_ms = now;
            self.queue.insert(run.priority, run.seq, run_id, i);
        }
        self.hold_at_gates(run_id, held);
        self.fx.touch_run(run_id);
    }

    pub(super) fn requeue(&mut self, run_id: &RunId, i: usize) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let t = &mut run.tasks[i];
        t.state = StoredTaskState::Queued;
        t.queued_at_ms = now_ms();
        self.queue.insert(run.priority, run.seq, run_id, i);
        self.fx.touch_run(run_id);
    }

    /// The runner started attempt `a` (of task `i` of `run_id`) at `now`.
    pub(super) fn mark_running(&mut self, run_id: &RunId, i: usize, a: &AttemptId, now: Instant) {
        self.clocks.started(a, now);
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
            self.fx.pickup((now_ms - t.queued_at_ms).max(0) as f64);
        }
        self.fx.touch_run(run_id);
    }

    /// The attempt ended through no fault of its script: free its slot and
    /// requeue the task (or fail it after too many infrastructure failures).
    pub(super) fn lose_attempt(&mut self, a: &AttemptId, why: LossReason, now: Instant) {
        let Some((run_id, i)) = self.runs.locate(a) else {
            return;
        };
        self.clocks.forget(a);
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
        let number = att.number;
        if let Some(slot) = self.runners.get_mut(&runner) {
            slot.release(a);
        }
        self.fx.touch_run(&run_id);
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
            self.fx.task_finished(TaskOutcome::InfraFailed, None);
            self.propagate(&run_id, i);
            self.finish_run_if_done(&run_id);
        } else {
            let name = t.name.clone();
            self.fx.requeued(why, &run_id, &name, number);
            if counts {
                self.fx.retried(RetryClass::Infra);
            }
            // A first loss goes to another runner at once (the lost runner
            // was the failing part, and the loss already waited out the
            // disconnect grace); a task that keeps losing its runners backs
            // off like any infrastructure retry.
            if counts && t.infra_failures > 1 {
                self.requeue_backed_off(&run_id, i, now);
            } else {
                self.requeue(&run_id, i);
            }
        }
    }

    /// Retention: forgets up to `max` runs that finished at or before
    /// `cutoff_ms` and have no attempt still active (a cancel not yet
    /// confirmed by its runner keeps the run): their records, idempotency
    /// keys and attempt index entries. Returns them, so the caller deletes
    /// their stored records and logs.
    pub(crate) fn expire_runs(&mut self, cutoff_ms: i64, max: usize) -> Vec<RunRecord> {
        let out = self.runs.expire(cutoff_ms, max);
        for run in &out {
            for a in run.tasks.iter().flat_map(|t| &t.attempts) {
                self.clocks.forget(&a.id);
            }
            self.fx.forget_run(&run.id);
        }
        out
    }
}
