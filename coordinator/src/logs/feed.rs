//! Wakes live log followers when any log grows.
//!
//! One generation counter for all logs: a follower re-reads the logs it
//! follows whenever the counter moves. Cheap to publish, and a follower never
//! misses an append that happened after it subscribed.

use tokio::sync::watch;

pub(crate) struct LogFeed {
    generation: watch::Sender<u64>,
}

impl Default for LogFeed {
    fn default() -> Self {
        Self {
            generation: watch::channel(0).0,
        }
    }
}

impl LogFeed {
    /// Some log grew.
    pub(crate) fn publish(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
