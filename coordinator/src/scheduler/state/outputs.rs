//! A task's outputs in the record: what it keeps of what its runner
//! reported ([`kept`], at most [`capstan_proto::outputs`]' budget), and
//! the outputs a ready task uses (`${{ tasks.NAME.outputs.KEY }}`), checked
//! when it is ready: each must have been produced by its task, which
//! succeeded; otherwise the task fails at once, naming what is missing. A
//! `finally` task is not failed: a missing output is the empty string for
//! it (GitHub's behaviour), so cleanup still runs. The values are filled in
//! when it is offered (`dispatch::offer_message`).

use std::collections::BTreeMap;

use capstan_proto::outputs::{MAX_OUTPUT_BYTES, MAX_OUTPUTS, within_budget};

use crate::model::*;

/// Most dropped names a task's message lists, and the longest shown.
const NAMED: usize = 10;
const NAME_CHARS: usize = capstan_pipeline::MAX_OUTPUT_KEY_LEN;

/// What a task keeps of the outputs its runner reported: the runner keeps
/// to the same budget, but an older or hostile one must not grow the run
/// record past the store's record limit. Beyond the budget nothing is kept;
/// the note (for the task's message) names what was dropped.
pub(super) fn kept(
    reported: impl IntoIterator<Item = (String, String)>,
) -> (BTreeMap<String, String>, Option<String>) {
    let (kept, dropped) = within_budget(reported);
    if dropped.is_empty() {
        return (kept, None);
    }
    let mut names: Vec<String> = (dropped.iter().take(NAMED))
        .map(|k| {
            let short: String = k.chars().take(NAME_CHARS).collect();
            let cut = if short.len() < k.len() { "..." } else { "" };
            format!("`{short}{cut}`")
        })
        .collect();
    if dropped.len() > NAMED {
        names.push(format!("and {} more", dropped.len() - NAMED));
    }
    let note = format!(
        "the runner reported more outputs than a task keeps (at most {MAX_OUTPUTS}, {} KiB of keys \
         and values): {} dropped: {}",
        MAX_OUTPUT_BYTES / 1024,
        dropped.len(),
        names.join(", ")
    );
    (kept, Some(note))
}

/// Why task `i` of `run` cannot run for want of an output, if it cannot
/// (never for a `finally` task).
pub(super) fn missing(run: &RunRecord, i: usize) -> Option<String> {
    if run.tasks[i].finally {
        return None;
    }
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
