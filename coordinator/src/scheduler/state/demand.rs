//! What the fleet is asked for and what it has, read for autoscalers
//! (`GET /api/v1/demand`, the `capstan_demand_*` gauges): the queued and
//! running tasks by `runs-on` label set, and every registered runner's
//! labels and free slots. The figures are made from this in
//! [`crate::demand`], which owns no state.

use super::SchedulerState;
use std::collections::{BTreeMap, HashMap};

/// Tasks of one `runs-on` label set.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct TaskDemand {
    pub(crate) queued: u32,
    /// Offered to or running on a runner.
    pub(crate) running: u32,
    /// When the longest-waiting queued task was queued (ms since the epoch; 0: none queued).
    pub(crate) oldest_queued_at_ms: i64,
}

/// One registered runner as an autoscaler sees it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Supply {
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) connected: bool,
    /// Slots it would take work in now (0 unless it accepts work).
    pub(crate) free_slots: u32,
}

/// A read of the demand and supply at one moment.
#[derive(Clone, Debug, Default)]
pub(crate) struct DemandSnapshot {
    pub(crate) tasks: BTreeMap<BTreeMap<String, String>, TaskDemand>,
    pub(crate) runners: Vec<Supply>,
}

fn label_set(runs_on: &HashMap<String, String>) -> BTreeMap<String, String> {
    runs_on
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl SchedulerState {
    /// The queued tasks (the ready queue) and running ones (every runner's
    /// held attempts) by label set, and the runners: the cost is the queue,
    /// the running attempts and the runners, never the finished history.
    pub(crate) fn demand(&self) -> DemandSnapshot {
        let mut snap = DemandSnapshot::default();
        for (_, _, run, i) in self.queue.iter() {
            let t = self.runs.task(run, *i);
            let d = snap.tasks.entry(label_set(&t.spec.runs_on)).or_default();
            d.queued += 1;
            if d.oldest_queued_at_ms == 0 || t.queued_at_ms < d.oldest_queued_at_ms {
                d.oldest_queued_at_ms = t.queued_at_ms;
            }
        }
        for slot in self.runners.values() {
            for a in slot.active() {
                if let Some((run, i)) = self.runs.locate(a) {
                    let t = self.runs.task(&run, i);
                    snap.tasks
                        .entry(label_set(&t.spec.runs_on))
                        .or_default()
                        .running += 1;
                }
            }
            snap.runners.push(Supply {
                labels: slot.record().labels.clone(),
                connected: slot.is_connected(),
                free_slots: if slot.accepts_work() {
                    slot.free_slots()
                } else {
                    0
                },
            });
        }
        snap
    }
}
