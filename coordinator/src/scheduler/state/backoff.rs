//! Infrastructure retries wait before they run again: a task whose
//! attempt failed for infrastructure reasons (runner lost, executor error
//! such as a refused checkout) is queued again only after a jittered
//! exponential delay, so a failing dependency is not hammered and a
//! transient one has time to recover.
//!
//! The delay before retry `n` (1-based) is `d = min(base * 2^(n-1), max)`
//! with "equal jitter": uniformly in `[d/2, d]`. It never exceeds `max`.
//! The task is `queued` meanwhile, with `retry_at_ms` set and a message
//! saying when it retries (`capstan status` shows it); a new leader that
//! loads it waits out what is left.

use super::SchedulerState;
use crate::model::{StoredTaskState, now_ms};
use capstan_proto::ids::RunId;
use tokio::time::{Duration, Instant};

/// The delay before infrastructure retry `n` (1-based), `jitter` in `[0, 1]`.
pub(crate) fn infra_delay(base: Duration, max: Duration, n: u32, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << n.saturating_sub(1).min(20));
    let d = exp.min(max);
    d.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Tasks waiting out their backoff: when each is due.
#[derive(Default)]
pub(crate) struct Backoffs(Vec<(Instant, RunId, usize)>);

impl Backoffs {
    pub(crate) fn wait(&mut self, due: Instant, run: RunId, task: usize) {
        self.0.push((due, run, task));
    }

    /// Takes the entries due at `now`.
    fn due(&mut self, now: Instant) -> Vec<(RunId, usize)> {
        let (due, waiting) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.0 = waiting;
        due.into_iter().map(|(_, r, i)| (r, i)).collect()
    }
}

impl SchedulerState {
    /// Queues task `i` of `run_id` again after its `n`th infrastructure
    /// failure, once the backoff is over; returns the delay.
    pub(super) fn requeue_backed_off(
        &mut self,
        run_id: &RunId,
        i: usize,
        now: Instant,
    ) -> Duration {
        let n = self.runs.task(run_id, i).infra_failures;
        let delay = infra_delay(
            self.timing.infra_backoff,
            self.timing.infra_backoff_max,
            n,
            rand::random::<f64>(),
        );
        if delay.is_zero() {
            self.requeue(run_id, i);
            return delay;
        }
        let t = self.runs.task_mut(run_id, i);
        t.state = StoredTaskState::Queued;
        t.retry_at_ms = now_ms() + delay.as_millis() as i64;
        t.message = format!(
            "{}; retrying in {:.1}s (infrastructure failure {n})",
            t.message,
            delay.as_secs_f64()
        );
        self.fx.touch_run(run_id);
        self.backoffs.wait(now + delay, run_id.clone(), i);
        delay
    }

    /// Queues the tasks whose backoff is over (a task cancelled meanwhile
    /// is no longer queued and stays as it is).
    pub(super) fn release_backed_off(&mut self, now: Instant) {
        for (run_id, i) in self.backoffs.due(now) {
            let Some(run) = self.runs.get_mut(&run_id) else {
                continue;
            };
            let (priority, seq) = (run.priority, run.seq);
            let t = &mut run.tasks[i];
            if t.state != StoredTaskState::Queued || t.retry_at_ms == 0 {
                continue;
            }
            t.retry_at_ms = 0;
            // Pickup latency counts from here, not from the failure.
            t.queued_at_ms = now_ms();
            self.queue.insert(priority, seq, &run_id, i);
            self.fx.touch_run(&run_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_stay_under_the_cap_and_jitter_halves_at_most() {
        let (base, max) = (Duration::from_millis(500), Duration::from_secs(4));
        let at = |n, j| infra_delay(base, max, n, j);
        assert_eq!(at(1, 1.0), Duration::from_millis(500));
        assert_eq!(at(1, 0.0), Duration::from_millis(250));
        assert_eq!(at(2, 1.0), Duration::from_secs(1));
        assert_eq!(at(3, 1.0), Duration::from_secs(2));
        assert_eq!(at(4, 1.0), Duration::from_secs(4));
        assert_eq!(at(9, 1.0), Duration::from_secs(4));
        assert_eq!(at(60, 0.0), Duration::from_secs(2));
        assert_eq!(infra_delay(Duration::ZERO, max, 3, 1.0), Duration::ZERO);
    }
}
