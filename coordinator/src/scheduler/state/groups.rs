//! Concurrency groups (`concurrency:` in the pipeline file): at most one
//! run of a group has queued or running tasks. A new run of a busy group
//! either waits, held with every task `waiting`, until the group's run
//! in progress ends (then the oldest held run goes), or, with
//! `cancel-in-progress`, cancels the group's unfinished runs and goes at
//! once. Held runs are stored as such, so a new leader keeps them held;
//! their release is written in the same batch as the end that caused it.

use super::{SchedulerState, TaskOutcome};
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
                self.cancel_task(&id, i, &why, TaskOutcome::Cancelled);
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

#[cfg(test)]
mod tests {
    use super::super::Timing;
    use super::*;
    use crate::api::pipeline::build_run;
    use capstan_proto::api::v1::SubmitRunRequest;

    fn run(cancel: bool) -> RunRecord {
        build_run(SubmitRunRequest {
            pipeline_yaml: format!(
                "version: 1\nname: g\nconcurrency: {{ group: deploy, cancel-in-progress: {cancel} }}\n\
                 tasks:\n  t: {{ steps: [ {{ run: x }} ] }}\n"
            ),
            file_name: "g.yaml".into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn task(st: &SchedulerState, id: &RunId) -> StoredTaskState {
        st.run(id).unwrap().tasks[0].state
    }

    #[test]
    fn a_held_run_goes_when_the_first_ends_also_after_a_reload() {
        let mut st = SchedulerState::new(1, Timing::default());
        let (a, _) = st.submit(run(false));
        let (b, _) = st.submit(run(false));
        let (c, _) = st.submit(run(false));
        assert_eq!(task(&st, &a), StoredTaskState::Queued);
        assert!(st.run(&b).unwrap().held && st.run(&c).unwrap().held);
        assert_eq!(task(&st, &b), StoredTaskState::Waiting);
        // A new leader loads the records as they were stored.
        let records: Vec<RunRecord> = st.runs().cloned().collect();
        let mut st = SchedulerState::load(
            2,
            Timing::default(),
            records,
            vec![],
            tokio::time::Instant::now(),
        );
        assert!(st.run(&b).unwrap().held);
        assert_eq!(task(&st, &b), StoredTaskState::Waiting);
        st.cancel_run(&a, None).unwrap();
        // The oldest held run goes; the next stays held.
        assert!(!st.run(&b).unwrap().held);
        assert_eq!(task(&st, &b), StoredTaskState::Queued);
        assert!(st.run(&c).unwrap().held);
        // Cancelling a held run releases nothing while b is in progress.
        st.cancel_run(&c, None).unwrap();
        assert_eq!(task(&st, &b), StoredTaskState::Queued);
    }

    #[test]
    fn cancel_in_progress_cancels_every_unfinished_run_of_the_group() {
        let mut st = SchedulerState::new(1, Timing::default());
        let (a, _) = st.submit(run(false));
        let (b, _) = st.submit(run(false));
        let (c, _) = st.submit(run(true));
        for old in [&a, &b] {
            let r = st.run(old).unwrap();
            assert_eq!(r.state, StoredRunState::Cancelled, "{old}");
            assert!(r.tasks[0].message.contains("newer run of group `deploy`"));
        }
        assert!(!st.run(&c).unwrap().held);
        assert_eq!(task(&st, &c), StoredTaskState::Queued);
    }
}
