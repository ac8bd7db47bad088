//! The timers, judged on every sweep: offers not accepted in time, runners
//! past their lease, tasks far past their own timeout, and approval gates
//! past theirs.

use super::{LossReason, SchedulerState, TaskOutcome};
use crate::model::*;
use capstan_proto::ids::{AttemptId, RunnerId};
use tokio::time::{Duration, Instant};

impl SchedulerState {
    /// Expires offers, requeues the attempts of runners past their lease and
    /// fails tasks far past their own timeout.
    pub(crate) fn sweep(&mut self, now: Instant) {
        self.release_backed_off(now);
        self.expire_offers(now);
        self.expire_leases(now);
        self.fail_overdue(now);
        self.expire_gates(now_ms());
    }

    /// Restarts the offer timeout of `offered` at `now` (after a slow write,
    /// an offer must not expire before it was even sent).
    pub(crate) fn restart_offer_clocks(&mut self, offered: &[AttemptId], now: Instant) {
        self.clocks.restart_offers(offered, now);
    }

    fn expire_offers(&mut self, now: Instant) {
        let expired = self.clocks.expired_offers(now, self.timing.offer_timeout);
        for a in expired {
            tracing::warn!(attempt = %a, "offer expired; requeueing");
            if let Some(att) = self.runs.attempt(&a)
                && let Some(slot) = self.runners.get_mut(&att.runner)
            {
                slot.pause(now);
            }
            self.lose_attempt(&a, LossReason::OfferExpired, now);
        }
    }

    fn expire_leases(&mut self, now: Instant) {
        let lease = self.timing.lease;
        let grace = self.timing.disconnect_grace;
        let lost: Vec<(RunnerId, Vec<AttemptId>)> = self
            .runners
            .values()
            .filter(|r| r.lost(now, lease, grace))
            .map(|r| (r.record().id.clone(), r.active().cloned().collect()))
            .collect();
        for (runner, attempts) in lost {
            tracing::warn!(%runner, attempts = attempts.len(), "runner lease expired; requeueing its attempts");
            if let Some(slot) = self.runners.get_mut(&runner) {
                // Force a reconnect: its next hello sorts out what it still runs.
                slot.drop_conn();
            }
            for a in attempts {
                self.lose_attempt(&a, LossReason::RunnerLost, now);
            }
            // An ephemeral runner does not come back for another task.
            self.forget_ephemeral(&runner);
        }
    }

    fn fail_overdue(&mut self, now: Instant) {
        let grace = self.timing.timeout_grace;
        let overdue: Vec<AttemptId> = self
            .clocks
            .running()
            .filter_map(|(a, at)| {
                let (run, i) = self.runs.locate(a)?;
                let limit = self.runs.task(&run, i).spec.timeout_seconds;
                (limit > 0 && now.duration_since(at) >= Duration::from_secs(limit) + grace)
                    .then(|| a.clone())
            })
            .collect();
        for a in overdue {
            if let Some((run, i)) = self.runs.locate(&a) {
                let limit = self.runs.task(&run, i).spec.timeout_seconds;
                self.cancel_task(&run, i, "", TaskOutcome::Failed);
                let t = self.runs.task_mut(&run, i);
                t.state = StoredTaskState::Failed;
                t.message = format!(
                    "timed out after {limit}s (the runner did not stop it; failed by the coordinator)"
                );
                self.propagate(&run, i);
                self.finish_run_if_done(&run);
            }
        }
    }
}
