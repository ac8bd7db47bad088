//! Which runner gets a task.

use super::state::RunnerSlot;
use capstan_proto::ids::RunnerId;
use std::collections::HashMap;

/// True if every `runs-on` label is among the runner's labels with the same value.
pub fn labels_match(
    runs_on: &HashMap<String, String>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    runs_on.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The runners that accept work, most free slots first (ties: the smallest
/// id, so choices are deterministic), for one dispatch pass.
pub struct FreeSlots {
    /// (free slots, runner), sorted as described.
    order: Vec<(u32, RunnerId)>,
}

impl FreeSlots {
    pub fn new<'a>(runners: impl Iterator<Item = &'a RunnerSlot>) -> Self {
        let mut order: Vec<(u32, RunnerId)> = runners
            .filter(|r| r.accepts_work())
            .map(|r| (r.free_slots(), r.record.id.clone()))
            .collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        Self { order }
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Takes one slot of the first runner `fits` accepts, keeping the order.
    pub fn take(&mut self, fits: impl Fn(&RunnerId) -> bool) -> Option<RunnerId> {
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

    fn slot(id: &str, capacity: u32, active: usize) -> RunnerSlot {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        RunnerSlot {
            record: crate::model::RunnerRecord {
                id: RunnerId::from_string(id),
                name: id.into(),
                labels: BTreeMap::new(),
                capacity,
                secret_hash: String::new(),
                version: String::new(),
                draining: false,
                registered_at_ms: 0,
            },
            conn: Some(super::super::state::Conn {
                id: 1,
                tx,
                lease: std::sync::Arc::new(super::super::lease::ConnLease::new(
                    tokio::time::Instant::now(),
                )),
                confirms_offers: false,
            }),
            last_seen: tokio::time::Instant::now(),
            last_seen_ms: 0,
            detached_at: None,
            active: (0..active)
                .map(|i| capstan_proto::ids::AttemptId::from_string(format!("{id}-{i}")))
                .collect(),
            paused: false,
            self_draining: false,
        }
    }

    #[test]
    fn free_slots_spread_work_over_the_emptiest_runners() {
        let runners = [slot("a", 2, 0), slot("b", 3, 0), slot("c", 1, 1)];
        let mut free = FreeSlots::new(runners.iter());
        let mut got = Vec::new();
        while let Some(id) = free.take(|_| true) {
            got.push(id.to_string());
        }
        // b(3) a(2) b(2) a(1) b(1); c is full.
        assert_eq!(got, ["b", "a", "b", "a", "b"]);
        let mut free = FreeSlots::new(runners.iter());
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
