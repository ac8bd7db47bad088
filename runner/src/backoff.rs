//! Jittered exponential backoff between reconnects: 100 ms doubling to 5 s,
//! each delay scaled by a random factor in [0.8, 1.2].
//!
//! A tiny struct rather than `backon` because the callers are loops that do
//! other work (handle attempt events, watch shutdown) while they wait, which
//! a retry combinator around one future does not fit.

use std::time::Duration;

pub(crate) const MIN: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct Backoff {
    first: Duration,
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self::starting_at(MIN)
    }

    /// A backoff whose first delay is `first` (tests use a long one, to see
    /// what does not wait for it), doubling to 5 s or to `first` if longer.
    /// At least 1 ms: a zero delay would never grow, and its callers would
    /// spin.
    pub(crate) fn starting_at(first: Duration) -> Self {
        let first = first.max(Duration::from_millis(1));
        Self {
            first,
            next: first,
            cap: MAX,
        }
    }

    /// Caps the delays at `cap` from now on (the agent derives it from the
    /// coordinator's heartbeat: `capstan_proto::liveness::backoff_cap`, so
    /// that a new leader's re-attach grace covers the wait). Never below
    /// the first delay.
    pub(crate) fn cap_at(&mut self, cap: Duration) {
        self.cap = cap;
        self.next = self.next.min(self.cap.max(self.first));
    }

    /// The delay to wait now; the one after it is twice as long (up to 5 s,
    /// or the first delay if that is longer).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(self.cap.max(self.first));
        base.mul_f64(rand::random_range(0.8..=1.2))
    }

    /// Call after a success: the next failure waits the first delay again.
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(6), "{d:?}");
        }
        assert!(b.next_delay() >= Duration::from_secs(4));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }

    #[test]
    fn a_cap_limits_the_delays() {
        let mut b = Backoff::new();
        b.cap_at(Duration::from_secs(2));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(2400), "{d:?}");
        }
        assert!(b.next_delay() >= Duration::from_millis(1600));
    }

    #[test]
    fn a_zero_first_delay_still_waits_and_grows() {
        let mut b = Backoff::starting_at(Duration::ZERO);
        assert!(b.next_delay() > Duration::ZERO);
        let later: Duration = (0..10).map(|_| b.next_delay()).last().unwrap();
        assert!(later >= Duration::from_millis(400), "{later:?}");
    }

    #[test]
    fn a_long_first_delay_is_its_own_cap() {
        let mut b = Backoff::starting_at(Duration::from_secs(60));
        for _ in 0..3 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_secs(48) && d <= Duration::from_secs(72),
                "{d:?}"
            );
        }
    }
}
