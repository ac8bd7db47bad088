//! The ready queue: the tasks waiting for a runner, in dispatch order
//! (higher priority first, then submit order, then task order).

use capstan_shared::ids::RunId;
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
