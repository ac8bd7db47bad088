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

    /// Starts the tasks of a run that need none.
    pub(super) fn queue_roots(&mut self, id: &RunId) {
        let Some(run) = self.runs.get(id) else {
            return;
        };
        let roots: Vec<usize> = (run.tasks.iter().enumerate())
            .filter(|(_, t)| t.needs.is_empty() && t.state == StoredTaskState::Waiting)
            .map(|(i, _)| i)
            .collect();
        self.start_ready(id, roots);
    }

    /// Tasks whose needs are met: each is skipped or failed by its `if:`,
    /// failed for an output it uses that is missing, held at its approval
    /// gate, or queued.
    fn start_ready(&mut self, id: &RunId, ready: Vec<usize>) {
        let now = now_ms();
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        let (priority, seq) = (run.priority, run.seq);
        let (mut queued, mut held, mut ended) = (Vec::new(), Vec::new(), Vec::new());
        for i in ready {
            let verdict = match super::conditions::judge(run, i) {
                super::conditions::Verdict::Run => super::outputs::missing(run, i).map_or(
                    super::conditions::Verdict::Run,
                    super::conditions::Verdict::Fail,
                ),
                other => other,
            };
            let t = &mut run.tasks[i];
            let (state, message, outcome) = match verdict {
                super::conditions::Verdict::Run => {
                    if let Some(deadline) = super::approvals::gate(t, now) {
                        held.push((i, deadline));
                    } else {
                        t.state = StoredTaskState::Queued;
                        t.queued_at_ms = now;
                        queued.push(i);
                    }
                    continue;
                }
                super::conditions::Verdict::Skip(m) => {
                    (StoredTaskState::Skipped, m, TaskOutcome::Skipped)
                }
                super::conditions::Verdict::Fail(m) => {
                    (StoredTaskState::Failed, m, TaskOutcome::Failed)
                }
            };
            t.benign_skip = state == StoredTaskState::Skipped;
            t.state = state;
            t.message = message;
            t.finished_at_ms = now;
            self.fx.task_finished(outcome, None);
            ended.push(i);
        }
        for i in queued {
            self.queue.insert(priority, seq, id, i);
        }
        self.hold_at_gates(id, held);
        self.fx.touch_run(id);
        for i in &ended {
            self.propagate(id, *i);
        }
        if !ended.is_empty() {
            self.finish_run_if_done(id);
        }
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
        } else if counted(&run.tasks).all(|t| {
            t.state == StoredTaskState::Succeeded
                || (t.state == StoredTaskState::Skipped && t.benign_skip)
        }) {
            RunOutcome::Succeeded
        } else if counted(&run.tasks)
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

    /// Task `done` ended: the dependents whose needs are now met start
    /// (all succeeded; for a `finally` task, all ended), and, when it did
    /// not succeed, everything else that (transitively) needs it is skipped.
    pub(super) fn propagate(&mut self, run_id: &RunId, done: usize) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let now = now_ms();
        let mut ready = Vec::new();
        let mut ended = vec![done];
        while let Some(e) = ended.pop() {
            let ok = run.tasks[e].state == StoredTaskState::Succeeded;
            let benign = run.tasks[e].state == StoredTaskState::Skipped && run.tasks[e].benign_skip;
            let name = run.tasks[e].name.clone();
            for i in 0..run.tasks.len() {
                let t = &run.tasks[i];
                if t.state != StoredTaskState::Waiting
                    || !t.needs.contains(&e)
                    || ready.contains(&i)
                {
                    continue;
                }
                if !ok && !t.finally {
                    let t = &mut run.tasks[i];
                    t.state = StoredTaskState::Skipped;
                    t.benign_skip = benign;
                    t.message = format!("skipped: `{name}` did not succeed");
                    t.finished_at_ms = now;
                    ended.push(i);
                    self.fx.task_finished(TaskOutcome::Skipped, None);
                    continue;
                }
                let met = |n: &usize| {
                    let s = run.tasks[*n].state;
                    if t.finally {
                        s.is_terminal()
                    } else {
                        s == StoredTaskState::Succeeded
                    }
                };
                if t.needs.iter().all(met) {
                    ready.push(i);
                }
            }
        }
        self.fx.touch_run(run_id);
        self.start_ready(run_id, ready);
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

    /// Evicts those of `ids` that are settled (their archive is durable):
    /// their records, attempt index entries and offer clocks. Returns them.
    pub(crate) fn evict_settled<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a RunId>,
        now: Instant,
    ) -> Vec<RunRecord> {
        let settled: Vec<RunId> = ids
            .into_iter()
            .filter(|id| self.runs.settled(id))
            .cloned()
            .collect();
        let mut out = Vec::with_capacity(settled.len());
        for id in settled {
            let Some(run) = self.runs.evict(&id, now) else {
                continue;
            };
            for a in run.tasks.iter().flat_map(|t| &t.attempts) {
                self.clocks.forget(&a.id);
            }
            out.push(run);
        }
        out
    }
}

/// The tasks that decide a run's state: all but the `finally` ones (all of
/// them when every task is `finally`).
fn counted(tasks: &[TaskRecord]) -> impl Iterator<Item = &TaskRecord> {
    let all_finally = tasks.iter().all(|t| t.finally);
    tasks.iter().filter(move |t| all_finally || !t.finally)
}
