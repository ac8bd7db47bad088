//! Records as the client API shows them.

use super::state::RunnerSlot;
use crate::model::{ApprovalRecord, AttemptRecord, AttemptState, RunRecord, StoredTaskState};
use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::{RunState, TaskState};

pub(crate) fn run(r: &RunRecord) -> api::Run {
    api::Run {
        id: r.id.to_string(),
        pipeline: r.pipeline.clone(),
        state: RunState::from(r.state) as i32,
        tasks: r
            .tasks
            .iter()
            .map(|t| {
                let cur = t.current_attempt();
                let active = !t.state.is_terminal() || t.state == StoredTaskState::Succeeded;
                api::Task {
                    name: t.name.clone(),
                    state: TaskState::from(t.state) as i32,
                    attempts: t.attempts.len() as u32,
                    runner: cur
                        .filter(|_| active || t.state.is_terminal())
                        .map(|a| a.runner_name.clone())
                        .unwrap_or_default(),
                    attempt_id: cur.map(|a| a.id.to_string()).unwrap_or_default(),
                    message: t.message.clone(),
                    needs: t.needs.iter().map(|&n| r.tasks[n].name.clone()).collect(),
                    exit_code: t.exit_code,
                    started_at_ms: t.started_at_ms,
                    finished_at_ms: t.finished_at_ms,
                    outputs: t.outputs.clone().into_iter().collect(),
                    approval: t.approval.as_ref().map(approval),
                    history: t.attempts.iter().map(attempt).collect(),
                }
            })
            .collect(),
        created_at_ms: r.created_at_ms,
        finished_at_ms: r.finished_at_ms,
        repo: capstan_proto::redact::redact_url(&r.repo).into_owned(),
        rev: r.rev.clone(),
        priority: r.priority,
        submitted_by: r.submitted_by.clone(),
    }
}

pub(crate) fn runner(r: &RunnerSlot) -> api::Runner {
    api::Runner {
        id: r.record().id.to_string(),
        name: r.record().name.clone(),
        labels: r.record().labels.clone().into_iter().collect(),
        capacity: r.record().capacity,
        busy: r.busy() as u32,
        connected: r.is_connected(),
        // `capstan drain` (persisted) or the runner's own (SIGTERM).
        draining: r.record().draining || (r.is_connected() && r.self_draining()),
        version: r.record().version.clone(),
        last_seen_ms: r.seen_ms(),
        tls_identity: r.record().tls_identity.clone().unwrap_or_default(),
    }
}

fn attempt(a: &AttemptRecord) -> api::Attempt {
    api::Attempt {
        id: a.id.to_string(),
        number: a.number,
        runner: a.runner_name.clone(),
        state: attempt_state_name(a.state).to_string(),
        offered_at_ms: a.offered_at_ms,
        started_at_ms: a.started_at_ms,
        finished_at_ms: a.finished_at_ms,
        log_bytes: a.log_length,
    }
}

/// The names `api::Attempt.state` documents.
fn attempt_state_name(s: AttemptState) -> &'static str {
    match s {
        AttemptState::Offered => "offered",
        AttemptState::Running => "running",
        AttemptState::Cancelling => "cancelling",
        AttemptState::Succeeded => "succeeded",
        AttemptState::Failed => "failed",
        AttemptState::Cancelled => "cancelled",
        AttemptState::Lost => "lost",
    }
}

fn approval(a: &ApprovalRecord) -> api::Approval {
    let d = a.decision.as_ref();
    api::Approval {
        prompt: a.prompt.clone(),
        by: a.by.clone(),
        asked_at_ms: a.asked_at_ms,
        timeout_ms: a.timeout_ms,
        decided: d.is_some(),
        approved: d.is_some_and(|d| d.approved),
        decided_by: d.map(|d| d.by.clone()).unwrap_or_default(),
        decided_at_ms: d.map_or(0, |d| d.at_ms),
        reason: d.map(|d| d.reason.clone()).unwrap_or_default(),
    }
}
