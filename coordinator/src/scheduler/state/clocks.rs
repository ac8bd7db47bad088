//! The in-memory clocks of active attempts: when each offer left (for the
//! offer timeout) and when each attempt started running (for the server-side
//! task timeout). Never persisted: a new leader restarts them from its load.

use capstan_proto::ids::AttemptId;
use std::collections::HashMap;
use tokio::time::{Duration, Instant};

#[derive(Default)]
pub(super) struct Clocks {
    offered_at: HashMap<AttemptId, Instant>,
    started_at: HashMap<AttemptId, Instant>,
}

impl Clocks {
    pub(super) fn offered(&mut self, attempt: AttemptId, at: Instant) {
        self.offered_at.insert(attempt, at);
    }

    /// The attempt runs from `at`: its offer clock stops.
    pub(super) fn started(&mut self, attempt: &AttemptId, at: Instant) {
        self.offered_at.remove(attempt);
        self.started_at.insert(attempt.clone(), at);
    }

    /// The run clock stops (a cancel was sent); an offer's clock stays.
    pub(super) fn stop_running(&mut self, attempt: &AttemptId) {
        self.started_at.remove(attempt);
    }

    /// The attempt ended: both clocks stop.
    pub(super) fn forget(&mut self, attempt: &AttemptId) {
        self.offered_at.remove(attempt);
        self.started_at.remove(attempt);
    }

    /// The offers out for `timeout` or longer at `now`.
    pub(super) fn expired_offers(&self, now: Instant, timeout: Duration) -> Vec<AttemptId> {
        self.offered_at
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= timeout)
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// The running attempts with when they started.
    pub(super) fn running(&self) -> impl Iterator<Item = (&AttemptId, Instant)> {
        self.started_at.iter().map(|(a, at)| (a, *at))
    }

    /// Restarts the offer clocks of `offered` at `now`.
    pub(super) fn restart_offers(&mut self, offered: &[AttemptId], now: Instant) {
        for a in offered {
            if let Some(at) = self.offered_at.get_mut(a) {
                *at = now;
            }
        }
    }
}
