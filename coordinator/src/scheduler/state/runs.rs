//! The runs the state holds: their records (with their tasks and attempts),
//! the idempotency keys they were submitted with, the index from each
//! attempt to its task, and the next submit sequence number.
//!
//! Only runs still going are held: a settled run (finished, no attempt
//! active) is evicted once the commit that archived it is durable
//! (`scheduler::history`). Its idempotency key stays a minute more
//! ([`RECENT_KEYS`]): a repeated submit checks the history before it
//! reaches the loop, and a run that settled in between is still caught
//! here.

use super::StateError;
use crate::model::*;
use capstan_proto::ids::{AttemptId, RunId, RunnerId};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// How long an evicted run's idempotency key is still answered from memory.
pub(super) const RECENT_KEYS: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(super) struct Runs {
    runs: HashMap<RunId, RunRecord>,
    /// Idempotency key -> the run submitted with it (held runs, and those
    /// evicted in the last [`RECENT_KEYS`]).
    keys: HashMap<String, RunId>,
    /// The keys of evicted runs, oldest first, with when they were evicted.
    evicted_keys: VecDeque<(Instant, String)>,
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

    /// Finished, with no attempt still active (a cancel its runner has not
    /// confirmed keeps the run going): nothing will change it any more.
    pub(super) fn settled(&self, id: &RunId) -> bool {
        self.runs.get(id).is_some_and(RunRecord::is_settled)
    }

    /// Forgets settled run `id` (archived by a durable commit) and returns
    /// it; its key is kept for [`RECENT_KEYS`] from `now`.
    pub(super) fn evict(&mut self, id: &RunId, now: Instant) -> Option<RunRecord> {
        while let Some((at, _)) = self.evicted_keys.front()
            && now.duration_since(*at) > RECENT_KEYS
        {
            let (_, key) = self.evicted_keys.pop_front().expect("front exists");
            if self
                .keys
                .get(&key)
                .is_some_and(|r| !self.runs.contains_key(r))
            {
                self.keys.remove(&key);
            }
        }
        let run = self.runs.remove(id)?;
        if !run.idempotency_key.is_empty() {
            self.evicted_keys
                .push_back((now, run.idempotency_key.clone()));
        }
        for a in run.tasks.iter().flat_map(|t| &t.attempts) {
            self.attempts.remove(&a.id);
        }
        Some(run)
    }

    /// Runs are numbered from `next` on at least (the history's newest is
    /// `next - 1`).
    pub(super) fn number_from(&mut self, next: u64) {
        self.next_seq = self.next_seq.max(next);
    }

    pub(super) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub(super) fn len(&self) -> usize {
        self.runs.len()
    }
}
