//! `if:` conditions, judged when a task is ready: the condition as stored
//! (the submit's values already folded in) is read against the states of
//! the tasks it needs. False skips the task; a condition that cannot be
//! read fails it, saying why.

use crate::model::*;
use capstan_pipeline::cond::{self, Ref};

/// What a ready task's condition says.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Run,
    Skip(String),
    Fail(String),
}

/// Judges task `i` of `run`.
pub(super) fn judge(run: &RunRecord, i: usize) -> Verdict {
    let Some(text) = &run.tasks[i].condition else {
        return Verdict::Run;
    };
    let state = |r: &Ref| match r {
        Ref::TaskState(name) => state_of(run, name),
        _ => None,
    };
    match cond::parse(text).and_then(|c| c.eval(&state)) {
        Ok(true) => Verdict::Run,
        Ok(false) => Verdict::Skip(format!("skipped: `if` is false: {text}")),
        Err(e) => Verdict::Fail(format!("its `if` could not be judged ({e}): {text}")),
    }
}

/// The state of task `name`, as a condition reads it; a matrix task's is
/// that of its expansions together (failed if any failed, then cancelled,
/// then skipped, else succeeded).
fn state_of(run: &RunRecord, name: &str) -> Option<String> {
    if let Some(t) = run.tasks.iter().find(|t| t.name == name) {
        return Some(word(t.state).to_owned());
    }
    let prefix = format!("{name}[");
    let states: Vec<StoredTaskState> = (run.tasks.iter())
        .filter(|t| t.name.starts_with(&prefix))
        .map(|t| t.state)
        .collect();
    if states.is_empty() {
        return None;
    }
    let worst = [
        StoredTaskState::Failed,
        StoredTaskState::Cancelled,
        StoredTaskState::Skipped,
    ]
    .into_iter()
    .find(|s| states.contains(s))
    .unwrap_or(StoredTaskState::Succeeded);
    Some(word(worst).to_owned())
}

fn word(s: StoredTaskState) -> &'static str {
    match s {
        StoredTaskState::Waiting => "waiting",
        StoredTaskState::Queued => "queued",
        StoredTaskState::Offered => "offered",
        StoredTaskState::Running => "running",
        StoredTaskState::Succeeded => "succeeded",
        StoredTaskState::Failed => "failed",
        StoredTaskState::Cancelled => "cancelled",
        StoredTaskState::Skipped => "skipped",
    }
}
