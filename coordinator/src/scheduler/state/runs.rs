//! The runs the state holds: their records (with their tasks and attempts),
//! the idempotency keys they were submitted with, the index from each
//! attempt to its task, and the next submit sequence number.

use super::StateError;
use crate::model::*;
use capstan_proto::ids::{AttemptId, RunId, RunnerId};
use std::collections::HashMap;

#[derive(Default)]
pub(super) struct Runs {
    runs: HashMap<RunId, RunRecord>,
    /// Idempotency key -> the run submitted with it.
    keys: HashMap<String, RunId>,
    /// Attempt -> (run, task index), for every attempt of every run held.
    attempts: HashMap<AttemptId, (RunId, usize)>,
    /// Per token name (`submitted_by`): its unfinished runs and their
    /// tasks, for the per-token quotas. Derived from the records: counted
    /// when a run is inserted or restored unfinished, uncounted once, when
    /// it finishes ([`Runs::finished`]); a finished run is never counted.
    open: HashMap<String, Open>,
    next_seq: u64,
}

/// What one token has submitted that has not finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Open {
    pub(super) runs: usize,
    pub(super) tasks: usize,
}

impl Runs {
    pub(super) fn get(&self, id: &RunId) -> Option<&RunRecord> {
        self.runs.get(id)
    }

    pub(super) fn get_mut(&mut self, id: &RunId) -> Option<&mut RunRecord> {
        self.runs.get_mut(id)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &RunRecord> {
        self.runs.values()
    }

    /// Task `i` of run `run`, which must exist.
    pub(super) fn task(&self, run: &RunId, i: usize) -> &TaskRecord {
        &self.runs[run].tasks[i]
    }

    /// Task `i` of run `run`, which must exist.
    pub(super) fn task_mut(&mut self, run: &RunId, i: usize) -> &mut TaskRecord {
        &mut self.runs.get_mut(run).expect("indexed").tasks[i]
    }

    /// The run an earlier submit with idempotency key `key` made.
    pub(super) fn by_key(&self, key: &str) -> Option<&RunId> {
        self.keys.get(key)
    }

    /// The sequence number of the next submitted run.
    pub(super) fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// The unfinished runs and tasks `token` submitted.
    pub(super) fn open(&self, token: &str) -> Open {
        self.open.get(token).copied().unwrap_or_default()
    }

    /// Run `id` has just finished: it no longer counts for its token.
    pub(super) fn finished(&mut self, id: &RunId) {
        let Some(run) = self.runs.get(id) else {
            return;
        };
        if let Some(open) = self.open.get_mut(&run.submitted_by) {
            open.runs = open.runs.saturating_sub(1);
            open.tasks = open.tasks.saturating_sub(run.tasks.len());
            if open.runs == 0 {
                self.open.remove(&run.submitted_by);
            }
        }
    }

    /// Adds a new run (it has no attempts yet).
    pub(super) fn insert(&mut self, run: RunRecord) {
        if !run.state.is_terminal() {
            let open = self.open.entry(run.submitted_by.clone()).or_default();
            open.runs += 1;
            open.tasks += run.tasks.len();
        }
        if !run.idempotency_key.is_empty() {
            self.keys
                .insert(run.idempotency_key.clone(), run.id.clone());
        }
        self.runs.insert(run.id.clone(), run);
    }

    /// Adds a run loaded from the store, indexing its attempts.
    pub(super) fn restore(&mut self, run: RunRecord) {
        self.next_seq = self.next_seq.max(run.seq + 1);
        for (i, t) in run.tasks.iter().enumerate() {
            for a in &t.attempts {
                self.attempts.insert(a.id.clone(), (run.id.clone(), i));
            }
        }
        self.insert(run);
    }

    /// Indexes a new attempt of task `i` of `run`.
    pub(super) fn index_attempt(&mut self, attempt: AttemptId, run: RunId, i: usize) {
        self.attempts.insert(attempt, (run, i));
    }

    pub(super) fn knows_attempt(&self, attempt: &AttemptId) -> bool {
        self.attempts.contains_key(attempt)
    }

    /// The run and task index of `attempt`.
    pub(super) fn locate(&self, attempt: &AttemptId) -> Option<(RunId, usize)> {
        self.attempts.get(attempt).cloned()
    }

    pub(super) fn attempt(&self, attempt: &AttemptId) -> Option<&AttemptRecord> {
        let (run, i) = self.attempts.get(attempt)?;
        self.attempt_in(run, *i, attempt)
    }

    /// `attempt` among the attempts of task `i` of `run`.
    pub(super) fn attempt_in(
        &self,
        run: &RunId,
        i: usize,
        attempt: &AttemptId,
    ) -> Option<&AttemptRecord> {
        self.runs
            .get(run)?
            .tasks
            .get(i)?
            .attempts
            .iter()
            .find(|x| &x.id == attempt)
    }

    pub(super) fn attempt_state(&self, attempt: &AttemptId) -> Option<AttemptState> {
        self.attempt(attempt).map(|x| x.state)
    }

    /// The attempt's place, if `runner` owns it (fencing: a runner may report
    /// only on attempts assigned to it).
    pub(super) fn owned(
        &self,
        runner: &RunnerId,
        a: &AttemptId,
    ) -> Result<(RunId, usize), StateError> {
        let not_yours = || StateError::NotYourAttempt {
            runner: runner.to_string(),
            attempt: a.to_string(),
        };
        let (run, i) = self.attempts.get(a).ok_or_else(not_yours)?;
        let att = self.runs[run].tasks[*i]
            .attempts
            .iter()
            .find(|x| &x.id == a)
            .ok_or_else(not_yours)?;
        if &att.runner != runner {
            return Err(not_yours());
        }
        Ok((run.clone(), *i))
    }

    /// Removes up to `max` runs that finished at or before `cutoff_ms` and
    /// have no attempt still active, with their idempotency keys and attempt
    /// index entries, and returns them.
    pub(super) fn expire(&mut self, cutoff_ms: i64, max: usize) -> Vec<RunRecord> {
        let expired: Vec<RunId> = self
            .runs
            .values()
            .filter(|r| {
                r.state.is_terminal()
                    && r.finished_at_ms <= cutoff_ms
                    && r.tasks
                        .iter()
                        .flat_map(|t| &t.attempts)
                        .all(|a| !a.state.is_active())
            })
            .take(max)
            .map(|r| r.id.clone())
            .collect();
        let mut out = Vec::with_capacity(expired.len());
        for id in expired {
            let Some(run) = self.runs.remove(&id) else {
                continue;
            };
            if !run.idempotency_key.is_empty() {
                self.keys.remove(&run.idempotency_key);
            }
            for a in run.tasks.iter().flat_map(|t| &t.attempts) {
                self.attempts.remove(&a.id);
            }
            out.push(run);
        }
        out
    }
}
