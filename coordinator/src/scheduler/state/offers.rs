//! Dispatch: queued tasks offered to runners with free slots. Which runner
//! gets which task is [`crate::scheduler::dispatch`]'s; this applies it.

use super::SchedulerState;
use crate::model::*;
use crate::scheduler::dispatch::{FreeSlots, labels_match, offer_message, plan};
use capstan_proto::ids::{AttemptId, RunId, RunnerId};
use capstan_proto::runner::v1 as rpb;
use rpb::coordinator_message::Kind as Down;
use tokio::time::Instant;

impl SchedulerState {
    /// Offers queued tasks to runners with free slots, highest priority and
    /// oldest first. Called after every batch of events.
    pub(crate) fn dispatch(&mut self, now: Instant) {
        if self.queue.is_empty() {
            return;
        }
        let (runs, runners) = (&self.runs, &self.runners);
        let offered = plan(
            self.queue.iter(),
            FreeSlots::new(runners.free()),
            |(_, _, run_id, i), runner| {
                labels_match(
                    &runs.task(run_id, *i).spec.runs_on,
                    &runners.slot(runner).record().labels,
                )
            },
        );
        for (key, runner) in offered {
            self.queue.remove_key(&key);
            let (_, _, run_id, i) = key;
            self.offer(&run_id, i, &runner, AttemptId::generate(), now);
        }
    }

    fn offer(&mut self, run_id: &RunId, i: usize, runner: &RunnerId, a: AttemptId, now: Instant) {
        let slot = self
            .runners
            .get_mut(runner)
            .expect("offered to a known runner");
        // An idle runner heartbeats rarely (`idle_heartbeat`) and may not
        // have been heard from for longer than a lease: the lease of what it
        // is offered starts now. The offer timeout covers a runner that is
        // gone; its accept renews the lease.
        slot.offered(a.clone(), now);
        let runner_name = slot.record().name.clone();
        let run = self.runs.get_mut(run_id).expect("queued run exists");
        let t = &mut run.tasks[i];
        let number = t.attempts.len() as u32 + 1;
        t.attempts.push(AttemptRecord {
            id: a.clone(),
            number,
            runner: runner.clone(),
            runner_name,
            state: AttemptState::Offered,
            offered_at_ms: now_ms(),
            started_at_ms: 0,
            finished_at_ms: 0,
            log_length: 0,
        });
        t.state = StoredTaskState::Offered;
        let offer = offer_message(self.epoch, run, i, &a, self.timing.offer_timeout);
        self.runs.index_attempt(a.clone(), run_id.clone(), i);
        self.clocks.offered(a.clone(), now);
        self.fx.offer_made(a);
        self.fx.touch_run(run_id);
        self.send_to(runner, Down::Offer(offer));
    }
}
