//! Which runner gets a task.

use super::state::RunnerSlot;
use capstan_shared::ids::RunnerId;
use std::collections::HashMap;

/// True if every `runs-on` label is among the runner's labels with the same value.
pub fn labels_match(
    runs_on: &HashMap<String, String>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    runs_on.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Among runners that accept work and carry the task's labels, the one with
/// the most free slots (ties: the smallest id, so the choice is deterministic).
pub fn best_runner<'a>(
    runners: impl Iterator<Item = &'a RunnerSlot>,
    runs_on: &HashMap<String, String>,
) -> Option<&'a RunnerId> {
    runners
        .filter(|r| r.accepts_work() && labels_match(runs_on, &r.record.labels))
        .max_by(|a, b| {
            a.free_slots()
                .cmp(&b.free_slots())
                .then_with(|| b.record.id.cmp(&a.record.id))
        })
        .map(|r| &r.record.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

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
