//! How runs, tasks, runners and the cluster are shown to people and
//! programs: state names, times and durations, and the JSON that
//! `capstan ... -o json` prints and the coordinator's dashboard serves for
//! `Accept: application/json` (one definition, so the two cannot drift).
//!
//! JSON field names and state names are part of the command line contract
//! (DESIGN.md): states are lower case without the enum prefix.

use crate::api::v1::{Attempt, Run, Runner, Task};
use crate::cluster::v1::{AskLeaderResponse, ListMembersResponse};
use crate::pipeline::v1::{RunState, TaskState};
use serde_json::{Value, json};

/// "queued", "running", "succeeded", "failed", "cancelled".
pub fn run_state_name(state: i32) -> &'static str {
    match RunState::try_from(state) {
        Ok(RunState::Queued) => "queued",
        Ok(RunState::Running) => "running",
        Ok(RunState::Succeeded) => "succeeded",
        Ok(RunState::Failed) => "failed",
        Ok(RunState::Cancelled) => "cancelled",
        Ok(RunState::Unspecified) | Err(_) => "unknown",
    }
}

/// "waiting", "queued", "offered", "running", "succeeded", "failed",
/// "cancelled", "skipped".
pub fn task_state_name(state: i32) -> &'static str {
    match TaskState::try_from(state) {
        Ok(TaskState::Waiting) => "waiting",
        Ok(TaskState::Queued) => "queued",
        Ok(TaskState::Offered) => "offered",
        Ok(TaskState::Running) => "running",
        Ok(TaskState::Succeeded) => "succeeded",
        Ok(TaskState::Failed) => "failed",
        Ok(TaskState::Cancelled) => "cancelled",
        Ok(TaskState::Skipped) => "skipped",
        Ok(TaskState::Unspecified) | Err(_) => "unknown",
    }
}

/// True for the states a run ends in.
pub fn run_finished(state: i32) -> bool {
    matches!(
        RunState::try_from(state),
        Ok(RunState::Succeeded | RunState::Failed | RunState::Cancelled)
    )
}

/// True for the states a task ends in.
pub fn task_finished(state: i32) -> bool {
    matches!(
        TaskState::try_from(state),
        Ok(TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled | TaskState::Skipped)
    )
}

fn opt_ms(ms: i64) -> Value {
    if ms > 0 { json!(ms) } else { Value::Null }
}

fn opt_str(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

pub fn task_json(task: &Task) -> Value {
    json!({
        "name": task.name,
        "state": task_state_name(task.state),
        "attempts": task.attempts,
        "runner": opt_str(&task.runner),
        "message": opt_str(&task.message),
        "exit_code": task.exit_code,
        "outputs": task.outputs.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "needs": task.needs,
        "attempt_id": opt_str(&task.attempt_id),
        "started_at_ms": opt_ms(task.started_at_ms),
        "finished_at_ms": opt_ms(task.finished_at_ms),
        "history": task.history.iter().map(attempt_json).collect::<Vec<_>>(),
        "approval": task.approval.as_ref().map(|a| json!({
            "prompt": a.prompt,
            "by": a.by,
            "asked_at_ms": opt_ms(a.asked_at_ms),
            "timeout_ms": a.timeout_ms,
            "decision": a.decided.then(|| json!({
                "approved": a.approved,
                "by": a.decided_by,
                "at_ms": opt_ms(a.decided_at_ms),
                "reason": opt_str(&a.reason),
            })),
        })),
    })
}

/// Why an attempt ended badly: `script` (a step failed), `infrastructure`
/// (runner lost, offer expired, executor error); `None` for the others.
pub fn failure_class(attempt: &Attempt) -> Option<&'static str> {
    match attempt.state.as_str() {
        "failed" => Some("script"),
        "lost" => Some("infrastructure"),
        _ => None,
    }
}

fn attempt_json(a: &Attempt) -> Value {
    json!({
        "id": a.id,
        "number": a.number,
        "runner": opt_str(&a.runner),
        "state": a.state,
        "failure": failure_class(a),
        "offered_at_ms": opt_ms(a.offered_at_ms),
        "started_at_ms": opt_ms(a.started_at_ms),
        "finished_at_ms": opt_ms(a.finished_at_ms),
        "log_bytes": a.log_bytes,
    })
}

/// `status RUN -o json`.
pub fn run_json(run: &Run) -> Value {
    json!({
        "id": run.id,
        "pipeline": run.pipeline,
        "state": run_state_name(run.state),
        "repo": opt_str(&run.repo),
        "rev": opt_str(&run.rev),
        "priority": run.priority,
        "submitted_by": opt_str(&run.submitted_by),
        "created_at_ms": opt_ms(run.created_at_ms),
        "created": if run.created_at_ms > 0 { json!(format_time(run.created_at_ms)) } else { Value::Null },
        "finished_at_ms": opt_ms(run.finished_at_ms),
        "tasks": run.tasks.iter().map(task_json).collect::<Vec<_>>(),
    })
}

pub fn runner_json(runner: &Runner) -> Value {
    // BTreeMap so labels come out sorted.
    let labels: std::collections::BTreeMap<_, _> = runner.labels.iter().collect();
    json!({
        "id": runner.id,
        "name": runner.name,
        "labels": labels,
        "capacity": runner.capacity,
        "busy": runner.busy,
        "connected": runner.connected,
        "draining": runner.draining,
        "version": opt_str(&runner.version),
        "last_seen_ms": opt_ms(runner.last_seen_ms),
        "tls_identity": opt_str(&runner.tls_identity),
    })
}

/// `cluster -o json`: `{"leader", "epoch", "members": [URL...]}` plus who answered.
pub fn cluster_json(leader: &AskLeaderResponse, members: &ListMembersResponse) -> Value {
    json!({
        "leader": opt_str(&leader.leader),
        "epoch": leader.epoch,
        "members": members.members.iter().map(|m| m.endpoint.as_str()).collect::<Vec<_>>(),
    })
}

/// `2025-01-02T03:04:05Z` from milliseconds since the Unix epoch (UTC).
pub fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `850ms`, `4.2s`, `3m07s`, `1h02m`.
pub fn format_duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000)
    }
}
