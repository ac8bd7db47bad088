//! Concurrency groups (`concurrency:` in the pipeline file): at most one
//! run of a group has queued or running tasks. A new run of a busy group
//! either waits, held with every task `waiting`, until the group's run
//! in progress ends (then the oldest held run goes), or, with
//! `cancel-in-progress`, cancels the group's unfinished runs and goes at
//! once. Held runs are stored as such, so a new leader keeps them held;
//! their release is written in the same batch as the end that caused it.

use super::SchedulerState;
use crate::model::*;
use capstan_proto::ids::RunId;

impl SchedulerState {
    /// Whether `run` (not yet inserted) must be held; cancels the group's
    /// unfinished runs first when it asks to.
    pub(super) fn admit_to_group(&mut self, run: &RunRecord) -> bool {
        let Some(group) = &run.group else {
            return false;
        };
        let unfinished: Vec<RunId> = self
            .runs
            .values()
            .filter(|r| !r.state.is_terminal() && in_group(r, &group.name))
            .map(|r| r.id.clone())
            .collect();
        if unfinished.is_empty() {
            return false;
        }
        if !group.cancel_in_progress {
            return true;
        }
        for id in unfinished {
            let why = format!("cancelled: a newer run of group `{}` started", group.name);
            if let Some(r) = self.runs.get_mut(&id) {
                r.cancel_requested = true;
                // Held runs must not be released by their own cancellation.
                r.held = false;
            }
            let n = self.runs.get(&id).map_or(0, |r| r.tasks.len());
            for i in 0..n {
                self.cancel_task(&id, i, &why);
            }
            self.finish_run_if_done(&id);
        }
        false
    }

    /// After a run of `group` ended: the oldest held run goes, unless
    /// another run of the group is still in progress.
    pub(super) fn release_group(&mut self, group: &str) {
        let busy = self
            .runs
            .values()
            .any(|r| !r.state.is_terminal() && !r.held && in_group(r, group));
        if busy {
            return;
        }
        let next = self
            .runs
            .values()
            .filter(|r| !r.state.is_terminal() && r.held && in_group(r, group))
            .min_by_key(|r| r.seq)
            .map(|r| r.id.clone());
        let Some(id) = next else {
            return;
        };
        if let Some(r) = self.runs.get_mut(&id) {
            r.held = false;
        }
        self.queue_roots(&id);
        self.fx.touch_run(&id);
    }
}

fn in_group(r: &RunRecord, group: &str) -> bool {
    r.group.as_ref().is_some_and(|g| g.name == group)
}
