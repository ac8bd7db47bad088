//! Reading a run as the API returns it: its state, whether it ended, a task.

use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::{RunState, TaskState};

pub fn run_state(r: &api::Run) -> RunState {
    RunState::try_from(r.state).unwrap_or(RunState::Unspecified)
}

pub fn is_finished(r: &api::Run) -> bool {
    matches!(
        run_state(r),
        RunState::Succeeded | RunState::Failed | RunState::Cancelled
    )
}

/// The task `name` of the run; panics (with the run) if there is none.
pub fn task<'a>(r: &'a api::Run, name: &str) -> &'a api::Task {
    r.tasks
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no task {name} in {r:#?}"))
}

pub fn task_state(r: &api::Run, name: &str) -> TaskState {
    TaskState::try_from(task(r, name).state).unwrap_or(TaskState::Unspecified)
}
