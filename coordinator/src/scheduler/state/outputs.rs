//! The outputs a ready task uses (`${{ tasks.NAME.outputs.KEY }}`), checked
//! when it is ready: each must have been produced by its task, which
//! succeeded; otherwise the task fails at once, naming what is missing. The
//! values are filled in when it is offered (`dispatch::offer_message`).

use crate::model::*;

/// Why task `i` of `run` cannot run for want of an output, if it cannot.
pub(super) fn missing(run: &RunRecord, i: usize) -> Option<String> {
    let refs = capstan_pipeline::outputs::references(&run.tasks[i].spec);
    let mut problems = Vec::new();
    for (task, key) in refs {
        let expr = format!("${{{{ tasks.{task}.outputs.{key} }}}}");
        let Some(t) = run.tasks.iter().find(|t| t.name == task) else {
            problems.push(format!("`{expr}`: this run has no task `{task}`"));
            continue;
        };
        if t.state != StoredTaskState::Succeeded {
            problems.push(format!(
                "`{expr}`: task `{task}` did not succeed, so it has no outputs"
            ));
        } else if !t.outputs.contains_key(&key) {
            let had: Vec<&str> = t.outputs.keys().map(String::as_str).collect();
            let had = if had.is_empty() {
                "none".to_owned()
            } else {
                had.join(", ")
            };
            problems.push(format!(
                "`{expr}`: task `{task}` did not produce output `{key}` (its outputs: {had})"
            ));
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}
