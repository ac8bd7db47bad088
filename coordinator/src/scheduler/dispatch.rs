//! Which runner gets which task, and the offer that tells it.
//!
//! Pure: the state machine (`state::offers`) hands in the queued tasks in
//! order, the runners' free slots and a label check, and applies the plan
//! this returns. Doors: it imports the records (`crate::model`) and the
//! trace context (`crate::trace`), never the state.

use crate::model::{RunRecord, StoredTaskState};
use capstan_proto::ids::{AttemptId, RunnerId};
use capstan_proto::runner::v1 as rpb;
use std::collections::HashMap;
use std::time::Duration;

/// True if every `runs-on` label is among the runner's labels with the same value.
pub(crate) fn labels_match(
    runs_on: &HashMap<String, String>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    runs_on.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One dispatch pass: each queued task, in order, to the first runner with
/// a free slot that `fits` it, while any runner has one. Returns the
/// (task, runner) pairs to offer.
///
/// The free slots are built once per pass: scanning every runner for every
/// queued task made a burst of queued tasks over a big fleet take seconds
/// (docs/decisions.md).
pub(crate) fn plan<'a, K: Clone + 'a>(
    queued: impl IntoIterator<Item = &'a K>,
    mut free: FreeSlots,
    fits: impl Fn(&K, &RunnerId) -> bool,
) -> Vec<(K, RunnerId)> {
    let mut offered = Vec::new();
    for key in queued {
        if free.is_empty() {
            break;
        }
        let Some(runner) = free.take(|id| fits(key, id)) else {
            continue;
        };
        offered.push((key.clone(), runner));
    }
    offered
}

/// The offer of attempt `number` (id `attempt`) of task `i` of `run`, with
/// the task's trace context.
pub(crate) fn offer_message(
    epoch: u64,
    run: &RunRecord,
    i: usize,
    attempt: &AttemptId,
    offer_timeout: Duration,
) -> rpb::Offer {
    let t = &run.tasks[i];
    let number = t.attempts.len() as u32;
    let runner_name = t.attempts.last().map_or("", |x| x.runner_name.as_str());
    let trace = crate::trace::dispatch(run, t, attempt.as_str(), number, runner_name);
    let spec = offered_spec(run, i);
    rpb::Offer {
        leader_epoch: epoch,
        attempt_id: attempt.to_string(),
        run_id: run.id.to_string(),
        task_name: t.name.clone(),
        attempt_number: number,
        task: Some(spec),
        repo: run.repo.clone(),
        rev: run.rev.clone(),
        offer_timeout_ms: offer_timeout.as_millis() as u32,
        traceparent: trace.traceparent,
        tracestate: trace.tracestate,
        // Set when it leaves early (`Effects::take_tentative_offers`).
        tentative: false,
        pushed_digests: pushed_digests(run),
    }
}

/// Task `i`'s spec as its attempts get it: with the outputs of the tasks
/// it needs filled in (all there: checked when it was ready,
/// `state::outputs`). A `finally` task is not checked: an output its
/// producer did not record (it failed, was skipped, or never wrote it) is
/// the empty string, GitHub's value for a missing output, so that cleanup
/// still runs.
pub(crate) fn offered_spec(run: &RunRecord, i: usize) -> capstan_proto::pipeline::v1::TaskSpec {
    let mut spec = run.tasks[i].spec.clone();
    let finally = run.tasks[i].finally;
    capstan_pipeline::outputs::fill(&mut spec, |task, key| {
        let produced = (run.tasks.iter())
            .find(|t| t.name == task && t.state == StoredTaskState::Succeeded)
            .and_then(|t| t.outputs.get(key).cloned());
        produced.or_else(|| finally.then(String::new))
    });
    spec
}

/// What the run's succeeded tasks pushed: their `image` and `digest`
/// outputs (a `push` records both), for `set-image` with `pin: digest`.
fn pushed_digests(run: &RunRecord) -> HashMap<String, String> {
    run.tasks
        .iter()
        .filter(|t| t.state == StoredTaskState::Succeeded)
        .filter_map(|t| Some((t.outputs.get("image")?, t.outputs.get("digest")?)))
        .map(|(image, digest)| (image.clone(), digest.clone()))
        .collect()
}

/// The runners that accept work, most free slots first (ties: the smallest
/// id, so choices are deterministic), for one dispatch pass.
pub(crate) struct FreeSlots {
    /// (free slots, runner), sorted as described.
    order: Vec<(u32, RunnerId)>,
}

impl FreeSlots {
    /// From the runners that accept work, with their free slots.
    pub(crate) fn new(runners: impl Iterator<Item = (u32, RunnerId)>) -> Self {
        let mut order: Vec<(u32, RunnerId)> = runners.filter(|(free, _)| *free > 0).collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        Self { order }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Takes one slot of the first runner `fits` accepts, keeping the order.
    pub(crate) fn take(&mut self, fits: impl Fn(&RunnerId) -> bool) -> Option<RunnerId> {
        let pos = self.order.iter().position(|(_, id)| fits(id))?;
        let id = self.order[pos].1.clone();
        if self.order[pos].0 <= 1 {
            self.order.remove(pos);
        } else {
            self.order[pos].0 -= 1;
            // Move it behind the runners that now have more free slots.
            let mut p = pos;
            while p + 1 < self.order.len() && {
                let (next, cur) = (&self.order[p + 1], &self.order[p]);
                next.0 > cur.0 || (next.0 == cur.0 && next.1 < cur.1)
            } {
                self.order.swap(p, p + 1);
                p += 1;
            }
        }
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Runner `id` with `capacity` slots, `active` of them taken.
    fn slot(id: &str, capacity: u32, active: u32) -> (u32, RunnerId) {
        (capacity - active, RunnerId::from_string(id))
    }

    #[test]
    fn free_slots_spread_work_over_the_emptiest_runners() {
        let runners = [slot("a", 2, 0), slot("b", 3, 0), slot("c", 1, 1)];
        let mut free = FreeSlots::new(runners.iter().cloned());
        let mut got = Vec::new();
        while let Some(id) = free.take(|_| true) {
            got.push(id.to_string());
        }
        // b(3) a(2) b(2) a(1) b(1); c is full.
        assert_eq!(got, ["b", "a", "b", "a", "b"]);
        let mut free = FreeSlots::new(runners.iter().cloned());
        assert_eq!(free.take(|id| id.as_str() == "a").unwrap().as_str(), "a");
        assert!(free.take(|id| id.as_str() == "c").is_none());
    }

    #[test]
    fn subset_match() {
        let labels: BTreeMap<_, _> = [("os".to_string(), "linux".to_string())].into();
        let mut want = HashMap::new();
        assert!(labels_match(&want, &labels));
        want.insert("os".to_string(), "linux".to_string());
        assert!(labels_match(&want, &labels));
        want.insert("gpu".to_string(), "yes".to_string());
        assert!(!labels_match(&want, &labels));
        let wrong: HashMap<_, _> = [("os".to_string(), "mac".to_string())].into();
        assert!(!labels_match(&wrong, &labels));
    }
}
