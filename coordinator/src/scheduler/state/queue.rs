//! The ready queue: the tasks waiting for a runner, in dispatch order
//! (higher priority first, then submit order, then task order).

use capstan_proto::ids::RunId;
use std::cmp::Reverse;
use std::collections::BTreeSet;

/// A queued task: (priority, run's submit sequence, run, task index).
pub(super) type QueueKey = (Reverse<i32>, u64, RunId, usize);

#[derive(Default)]
pub(super) struct ReadyQueue {
    keys: BTreeSet<QueueKey>,
}

impl ReadyQueue {
    /// Queues task `task` of run `run` (of `priority`, submitted as `seq`).
    pub(super) fn insert(&mut self, priority: i32, seq: u64, run: &RunId, task: usize) {
        self.keys
            .insert((Reverse(priority), seq, run.clone(), task));
    }

    pub(super) fn remove(&mut self, priority: i32, seq: u64, run: &RunId, task: usize) {
        self.keys
            .remove(&(Reverse(priority), seq, run.clone(), task));
    }

    pub(super) fn remove_key(&mut self, key: &QueueKey) {
        self.keys.remove(key);
    }

    /// In dispatch order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &QueueKey> {
        self.keys.iter()
    }

    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priority_first_then_submit_order_then_task_order() {
        let (a, b) = (RunId::from_string("run-a"), RunId::from_string("run-b"));
        let mut q = ReadyQueue::default();
        q.insert(0, 1, &a, 1);
        q.insert(0, 1, &a, 0);
        q.insert(0, 0, &b, 2);
        q.insert(5, 2, &b, 0);
        let order: Vec<(u64, usize)> = q.iter().map(|(_, seq, _, i)| (*seq, *i)).collect();
        assert_eq!(order, [(2, 0), (0, 2), (1, 0), (1, 1)]);
        q.remove(0, 1, &a, 0);
        assert_eq!(q.len(), 3);
        assert!(!q.is_empty());
    }
}
