//! Noticing a silent coordinator: the [`Watchdog`] over one Control stream.
//!
//! A partitioned coordinator sends no RST; its stream just goes quiet. The
//! coordinator answers every heartbeat (`HeartbeatAck`, when its welcome
//! says `acks_heartbeats`), so from the first heartbeat that goes
//! unanswered the agent waits [`capstan_proto::liveness::silence_bound`]
//! (three heartbeat intervals) for any message, then drops the stream and
//! reconnects elsewhere. Its attempts keep running meanwhile and are
//! re-attached by the next leader, whose grace is derived from the same
//! bound. HTTP/2 keepalive (connect.rs) covers the same ground below gRPC.
//!
//! Imports nothing of the agent.

use std::time::Duration;

use tokio::time::Instant;

/// When the current stream counts as dead.
#[derive(Debug)]
pub(super) struct Watchdog {
    /// `None`: the coordinator does not answer heartbeats (an older one);
    /// the watchdog never fires and keepalive alone guards the stream.
    bound: Option<Duration>,
    /// When the oldest heartbeat not followed by any coordinator message
    /// was sent.
    unanswered_since: Option<Instant>,
}

impl Watchdog {
    /// A watchdog for a stream whose welcome announced `heartbeat` and
    /// whether the coordinator `acks_heartbeats`.
    pub(super) fn new(heartbeat: Duration, acks_heartbeats: bool) -> Self {
        Self {
            bound: acks_heartbeats.then(|| capstan_proto::liveness::silence_bound(heartbeat)),
            unanswered_since: None,
        }
    }

    /// A heartbeat went out at `now`.
    pub(super) fn heartbeat_sent(&mut self, now: Instant) {
        if self.bound.is_some() && self.unanswered_since.is_none() {
            self.unanswered_since = Some(now);
        }
    }

    /// Something came on the stream: the coordinator is alive.
    pub(super) fn heard(&mut self) {
        self.unanswered_since = None;
    }

    /// When the stream is to be dropped, if nothing comes before.
    pub(super) fn deadline(&self) -> Option<Instant> {
        Some(self.unanswered_since? + self.bound?)
    }

    /// How long the coordinator has been silent at `now` since the oldest
    /// unanswered heartbeat, for the log line.
    pub(super) fn silent_for(&self, now: Instant) -> Duration {
        self.unanswered_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn fires_three_intervals_after_the_first_unanswered_heartbeat() {
        let mut w = Watchdog::new(H, true);
        assert_eq!(w.deadline(), None, "nothing sent, nothing awaited");
        let t0 = Instant::now();
        w.heartbeat_sent(t0);
        // Later heartbeats do not push the deadline out.
        w.heartbeat_sent(t0 + H);
        w.heartbeat_sent(t0 + H * 2);
        assert_eq!(w.deadline(), Some(t0 + H * 3));
        assert_eq!(w.silent_for(t0 + H * 2), H * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn any_message_rearms_it() {
        let mut w = Watchdog::new(H, true);
        let t0 = Instant::now();
        w.heartbeat_sent(t0);
        w.heard();
        assert_eq!(w.deadline(), None);
        w.heartbeat_sent(t0 + H * 5);
        assert_eq!(w.deadline(), Some(t0 + H * 8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_coordinator_that_sends_no_acks_is_never_judged_silent() {
        let mut w = Watchdog::new(H, false);
        w.heartbeat_sent(Instant::now());
        assert_eq!(w.deadline(), None);
    }
}
