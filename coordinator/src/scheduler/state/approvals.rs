//! Approval gates. A task with `approval:` whose needs have all succeeded
//! is not queued: it stays `Waiting`, holding no runner slot, with the
//! moment it reached the gate in its record, until a token the gate allows
//! approves it (then it is queued) or rejects it (then it fails and what
//! needs it is skipped), or the gate's timeout rejects it. Everything is
//! in the task's record, so a new leader resumes the gate where the old
//! one left it (`load` rebuilds the deadlines).

use super::{SchedulerState, StateError, TaskOutcome};
use crate::model::*;
use capstan_proto::ids::RunId;

/// Who rejects a gate that timed out.
pub(crate) const TIMEOUT: &str = "timeout";

/// When `a` times out (ms since the epoch), or never.
pub(super) fn deadline(a: &ApprovalRecord) -> i64 {
    match a.timeout_ms {
        0 => i64::MAX,
        t => a.asked_at_ms.saturating_add(t),
    }
}

/// Task `t` is ready to queue at `now_ms`: `Some(deadline)` when its gate
/// holds it instead (asked now, the first time).
pub(super) fn gate(t: &mut TaskRecord, now_ms: i64) -> Option<i64> {
    let a = t.approval.as_mut()?;
    match &a.decision {
        Some(d) if d.approved => return None,
        Some(_) => return Some(i64::MAX),
        None => {}
    }
    if a.asked_at_ms == 0 {
        a.asked_at_ms = now_ms;
        t.message = format!("waiting for approval: {}", a.prompt);
    }
    Some(deadline(a))
}

/// A decision on a gate (it travels to the scheduler in a command).
#[derive(Clone, Debug)]
pub(crate) struct Decide {
    pub(crate) task: String,
    pub(crate) approve: bool,
    /// The deciding token's name and scope.
    pub(crate) by: String,
    pub(crate) scope: String,
    pub(crate) reason: String,
}

impl SchedulerState {
    /// Records the held tasks of a run at their gates.
    /// (A gate without a timeout needs no clock.)
    pub(super) fn hold_at_gates(&mut self, run: &RunId, held: Vec<(usize, i64)>) {
        for (i, deadline) in held.into_iter().filter(|&(_, d)| d < i64::MAX) {
            self.gates.insert((run.clone(), i), deadline);
        }
    }

    /// Approves or rejects the gate of task `d.task` of `run_id`.
    pub(crate) fn decide(&mut self, run_id: &RunId, d: &Decide) -> Result<(), StateError> {
        let run = self
            .runs
            .get_mut(run_id)
            .ok_or_else(|| StateError::UnknownRun(run_id.to_string()))?;
        let Some(i) = decidable(run, d)? else {
            return Ok(());
        };
        let a = run.tasks[i].approval.as_mut().expect("checked: a gate");
        let now = now_ms();
        a.decision = Some(Decision {
            approved: d.approve,
            by: d.by.clone(),
            at_ms: now,
            reason: d.reason.clone(),
        });
        self.gates.remove(&(run_id.clone(), i));
        self.decided(run_id, i, now);
        Ok(())
    }

    /// Rejects the gates whose timeout has passed at `now_ms`.
    pub(super) fn expire_gates(&mut self, now_ms: i64) {
        let due: Vec<(RunId, usize)> = self
            .gates
            .iter()
            .filter(|&(_, &at)| at <= now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for (run, i) in due {
            self.gates.remove(&(run.clone(), i));
            // Cancelled, or the run deleted, since it was held.
            let Some(t) = self.runs.get_mut(&run).and_then(|r| r.tasks.get_mut(i)) else {
                continue;
            };
            if t.state != StoredTaskState::Waiting {
                continue;
            }
            let Some(a) = t.approval.as_mut().filter(|a| a.pending()) else {
                continue;
            };
            let secs = a.timeout_ms / 1000;
            tracing::info!(target: "audit", run = %run, task = %t.name, action = "reject",
                token = TIMEOUT, "approval timed out");
            a.decision = Some(Decision {
                approved: false,
                by: TIMEOUT.to_owned(),
                at_ms: now_ms,
                reason: format!("no decision within {secs}s"),
            });
            self.decided(&run, i, now_ms);
        }
    }

    /// Acts on the decision just recorded on task `i`'s gate.
    fn decided(&mut self, run_id: &RunId, i: usize, now: i64) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let (priority, seq) = (run.priority, run.seq);
        let t = &mut run.tasks[i];
        let Some(d) = t.approval.as_ref().and_then(|a| a.decision.clone()) else {
            return;
        };
        if d.approved {
            t.message = format!("approved by {}", d.by);
            t.state = StoredTaskState::Queued;
            t.queued_at_ms = now;
            self.queue.insert(priority, seq, run_id, i);
        } else {
            t.state = StoredTaskState::Failed;
            t.finished_at_ms = now;
            t.message = match d.reason.as_str() {
                "" => format!("rejected by {}", d.by),
                why => format!("rejected by {}: {why}", d.by),
            };
            self.fx.task_finished(TaskOutcome::Failed, None);
            self.propagate(run_id, i);
            self.finish_run_if_done(run_id);
        }
        self.fx.touch_run(run_id);
    }
}

/// Whether `d` may be applied to `run`: `Some(i)`, the gate's task index;
/// `None`, a repeat of the decision already recorded (a client retrying a
/// call whose answer was lost with a leader: what was asked is done);
/// else why not. Pure: the decision of a finished run, read from the
/// history, is judged by it too.
pub(crate) fn decidable(run: &RunRecord, d: &Decide) -> Result<Option<usize>, StateError> {
    let unknown = || StateError::UnknownTask {
        run: run.id.to_string(),
        task: d.task.clone(),
    };
    let i = run
        .tasks
        .iter()
        .position(|t| t.name == d.task)
        .ok_or_else(unknown)?;
    let t = &run.tasks[i];
    let waiting = t.state == StoredTaskState::Waiting;
    let Some(a) = t.approval.as_ref() else {
        return Err(StateError::NotAtGate(format!(
            "task `{}` has no `approval:` gate",
            d.task
        )));
    };
    if let Some(done) = &a.decision {
        if done.approved == d.approve && done.by == d.by {
            return Ok(None);
        }
        let verb = if done.approved {
            "approved"
        } else {
            "rejected"
        };
        return Err(StateError::NotAtGate(format!(
            "task `{}` was already {verb} by {}",
            d.task, done.by
        )));
    }
    if a.asked_at_ms == 0 || !waiting {
        let why = if waiting {
            "it waits for the tasks it needs (see `capstan status`)"
        } else {
            "it has ended"
        };
        return Err(StateError::NotAtGate(format!(
            "task `{}` is not at its approval gate: {why}",
            d.task
        )));
    }
    // Each scope includes the ones before it (`crate::tokens::Scope`).
    const SCOPES: [&str; 3] = ["read", "submit", "admin"];
    let rank = |s: &str| SCOPES.iter().position(|x| *x == s);
    let least = a.by.iter().filter_map(|s| rank(s)).min().unwrap_or(2);
    if rank(&d.scope).is_none_or(|r| r < least) {
        return Err(StateError::MayNotDecide {
            task: d.task.clone(),
            allowed: match least {
                2 => "admin".to_owned(),
                _ => format!("{} or above", SCOPES[least]),
            },
            scope: d.scope.clone(),
        });
    }
    Ok(Some(i))
}

#[cfg(test)]
mod tests {
    use super::super::Timing;
    use super::*;
    use crate::api::pipeline::build_run;
    use capstan_proto::api::v1::SubmitRunRequest;

    fn run(gate: &str) -> RunRecord {
        build_run(SubmitRunRequest {
            pipeline_yaml: format!(
                "version: 1\nname: g\ntasks:\n  a: {{ steps: [ {{ run: x }} ] }}\n  \
                 d: {{ needs: [a], approval: {gate}, steps: [ {{ run: x }} ] }}\n  \
                 root: {{ approval: {gate}, steps: [ {{ run: x }} ] }}\n"
            ),
            file_name: "g.yaml".into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn decide(task: &str, approve: bool, scope: &str) -> Decide {
        Decide {
            task: task.into(),
            approve,
            by: "alice".into(),
            scope: scope.into(),
            reason: String::new(),
        }
    }

    fn task<'a>(st: &'a SchedulerState, id: &RunId, name: &str) -> &'a TaskRecord {
        let run = st.run(id).unwrap();
        run.tasks.iter().find(|t| t.name == name).unwrap()
    }

    #[test]
    fn a_root_gate_holds_until_approved_and_a_later_gate_waits_for_its_needs() {
        let mut st = SchedulerState::new(1, Timing::default());
        let (id, _) = st.submit(run("{ by: [read] }"));
        assert_eq!(task(&st, &id, "root").state, StoredTaskState::Waiting);
        assert!(task(&st, &id, "root").approval.as_ref().unwrap().pending());
        assert_eq!(st.queue_depth(), 1, "only `a` is queued");
        let early = st.decide(&id, &decide("d", true, "admin")).unwrap_err();
        assert!(
            early.to_string().contains("waits for the tasks it needs"),
            "{early}"
        );
        // `by: [read]`: a submit token is above read.
        st.decide(&id, &decide("root", true, "submit")).unwrap();
        assert_eq!(task(&st, &id, "root").state, StoredTaskState::Queued);
        assert_eq!(st.queue_depth(), 2);
        st.decide(&id, &decide("root", true, "submit")).unwrap();
        assert_eq!(st.queue_depth(), 2, "a repeat changes nothing");
        let other = st.decide(&id, &decide("root", false, "admin")).unwrap_err();
        assert!(
            other.to_string().contains("already approved by alice"),
            "{other}"
        );
    }

    #[test]
    fn a_cancelled_gate_never_times_out_into_a_failure() {
        let mut st = SchedulerState::new(1, Timing::default());
        let (id, _) = st.submit(run("{ timeout: 1s }"));
        st.cancel_run(&id, None).unwrap();
        st.expire_gates(now_ms() + 5_000);
        let root = task(&st, &id, "root");
        assert_eq!(root.state, StoredTaskState::Cancelled);
        assert!(root.approval.as_ref().unwrap().decision.is_none());
        assert_eq!(st.run(&id).unwrap().state, StoredRunState::Cancelled);
    }

    #[test]
    fn a_new_leader_times_out_a_gate_whose_deadline_passed_meanwhile() {
        let mut st = SchedulerState::new(1, Timing::default());
        let (id, _) = st.submit(run("{ timeout: 1s }"));
        let records: Vec<RunRecord> = st.runs().cloned().collect();
        let mut st = SchedulerState::load(
            2,
            Timing::default(),
            records,
            vec![],
            tokio::time::Instant::now(),
        );
        st.expire_gates(now_ms() + 5_000);
        let root = task(&st, &id, "root");
        assert_eq!(root.state, StoredTaskState::Failed);
        assert_eq!(root.message, "rejected by timeout: no decision within 1s");
        // Without a timeout a gate keeps no clock at all.
        let (open, _) = st.submit(run("{}"));
        st.expire_gates(i64::MAX - 1);
        assert!(
            task(&st, &open, "root")
                .approval
                .as_ref()
                .unwrap()
                .pending()
        );
    }
}
