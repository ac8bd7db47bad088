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

#[cfg(test)]
mod tests {
    use super::super::{SchedulerState, Timing};
    use crate::api::pipeline::build_run;
    use crate::model::*;
    use capstan_proto::api::v1::SubmitRunRequest;

    fn run(yaml: &str) -> RunRecord {
        build_run(SubmitRunRequest {
            pipeline_yaml: yaml.into(),
            file_name: "c.yaml".into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn state(st: &SchedulerState, run: &RunRecord, name: &str) -> StoredTaskState {
        let r = st.run(&run.id).unwrap();
        r.tasks.iter().find(|t| t.name == name).unwrap().state
    }

    #[test]
    fn a_false_condition_skips_without_failing_and_finally_still_starts() {
        let r = run("version: 1\nname: c\nparams: {env: dev}\ntasks:\n  \
             deploy: { if: \"params.env == 'prod'\", steps: [ { run: x } ] }\n  \
             after: { needs: [deploy], steps: [ { run: x } ] }\n  \
             report: { needs: [deploy], finally: true, steps: [ { run: x } ] }\n");
        let mut st = SchedulerState::new(1, Timing::default());
        st.submit(r.clone());
        assert_eq!(state(&st, &r, "deploy"), StoredTaskState::Skipped);
        assert_eq!(state(&st, &r, "after"), StoredTaskState::Skipped);
        assert_eq!(state(&st, &r, "report"), StoredTaskState::Queued);
        // Everything skipped by the condition: nothing failed.
        let r2 = run("version: 1\nname: c\ntasks:\n  \
             deploy: { if: \"false\", steps: [ { run: x } ] }\n");
        st.submit(r2.clone());
        assert_eq!(st.run(&r2.id).unwrap().state, StoredRunState::Succeeded);
    }

    #[test]
    fn a_task_skipped_after_a_failed_finally_task_fails_the_run() {
        let mut r = run(
            "version: 1\nname: c\ntasks:\n  t: { steps: [ { run: x } ] }\n  \
             cleanup: { needs: [t], finally: true, steps: [ { run: x } ] }\n  \
             report: { needs: [cleanup], steps: [ { run: x } ] }\n",
        );
        // cleanup's condition cannot be read: it fails, report is skipped.
        r.tasks[0].condition = Some("false".into());
        r.tasks[1].condition = Some("(".into());
        let mut st = SchedulerState::new(1, Timing::default());
        st.submit(r.clone());
        assert_eq!(state(&st, &r, "t"), StoredTaskState::Skipped);
        assert_eq!(state(&st, &r, "cleanup"), StoredTaskState::Failed);
        assert_eq!(state(&st, &r, "report"), StoredTaskState::Skipped);
        assert_eq!(st.run(&r.id).unwrap().state, StoredRunState::Failed);
    }

    #[test]
    fn a_condition_that_cannot_be_read_fails_the_task_saying_why() {
        let mut r = run(
            "version: 1\nname: c\ntasks:\n  t: { steps: [ { run: x } ] }\n  \
             u: { needs: [t], steps: [ { run: x } ] }\n",
        );
        r.tasks[0].condition = Some("tasks.gone.state == 'failed' || (".into());
        let mut st = SchedulerState::new(1, Timing::default());
        st.submit(r.clone());
        let t = &st.run(&r.id).unwrap().tasks[0];
        assert_eq!(t.state, StoredTaskState::Failed);
        assert!(
            t.message.starts_with("its `if` could not be judged"),
            "{}",
            t.message
        );
        assert_eq!(state(&st, &r, "u"), StoredTaskState::Skipped);
        assert_eq!(st.run(&r.id).unwrap().state, StoredRunState::Failed);
    }
}
