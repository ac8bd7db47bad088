//! Lease renewal off the scheduler loop.
//!
//! Every message on a runner's Control stream renews the leases of the
//! attempts it holds, and a command through the scheduler loop per
//! heartbeat (a cross-thread wake-up and a loop turn each) costs most of
//! the coordinator's idle CPU with a big fleet (docs/decisions.md).
//! Instead, the stream's reader task stamps [`ConnLease`] (one atomic store)
//! and [`HeartbeatFilter`] forwards to the scheduler only the heartbeats that
//! change something there:
//! - the runner's `draining` flag changed;
//! - the scheduler asked for the next one ([`ConnLease::want_heartbeat`]):
//!   the runner is paused (it rejected or ignored an offer) and a heartbeat
//!   un-pauses it;
//! - any other message came on the stream since the last heartbeat forwarded
//!   (so a heartbeat that follows a reject is ordered after it, as before).
//!
//! The scheduler's sweep judges a runner's lease by the later of its own
//! `last_seen` and the lease stamp of its current connection
//! ([`super::state::RunnerSlot::seen`]); a replaced or dropped connection's
//! stamp no longer counts, as its messages did not.

use capstan_proto::runner::v1::runner_message::Kind;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::time::{Duration, Instant};

/// The last-seen stamp of one Control stream, shared between its reader task
/// and the scheduler.
#[derive(Debug)]
pub(crate) struct ConnLease {
    base: Instant,
    /// Nanoseconds after `base` of the newest message on the stream.
    seen_ns: AtomicU64,
    /// The scheduler wants to see the next heartbeat.
    want: AtomicBool,
}

impl ConnLease {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            base: now,
            seen_ns: AtomicU64::new(0),
            want: AtomicBool::new(false),
        }
    }

    /// A message arrived at `now`. Only the stream's reader stamps, in
    /// order: a plain store, no read-modify-write per heartbeat.
    pub(crate) fn renew(&self, now: Instant) {
        let ns =
            u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        self.seen_ns.store(ns, Ordering::Relaxed);
    }

    /// When the newest message arrived (the connection's start if none did).
    pub(crate) fn last_seen(&self) -> Instant {
        self.base + Duration::from_nanos(self.seen_ns.load(Ordering::Relaxed))
    }

    /// Forward the stream's next heartbeat to the scheduler.
    pub(crate) fn want_heartbeat(&self) {
        self.want.store(true, Ordering::Release);
    }

    fn take_want(&self) -> bool {
        // Read first: the swap (a locked instruction) only when it is set.
        self.want.load(Ordering::Acquire) && self.want.swap(false, Ordering::AcqRel)
    }
}

/// Per Control stream, in its reader task: renews the lease on every message
/// and says which messages the scheduler must see (see the module docs).
#[derive(Debug)]
pub(crate) struct HeartbeatFilter {
    lease: Arc<ConnLease>,
    /// `draining` of the last heartbeat forwarded (a new stream starts not
    /// draining: attach clears it).
    draining: bool,
    /// A message other than a heartbeat was forwarded since the last heartbeat was.
    after_other: bool,
}

impl HeartbeatFilter {
    pub(crate) fn new(lease: Arc<ConnLease>) -> Self {
        Self {
            lease,
            draining: false,
            after_other: false,
        }
    }

    /// Renews the lease at `now`; true if the scheduler must see `kind`.
    pub(crate) fn pass(&mut self, kind: &Kind, now: Instant) -> bool {
        self.lease.renew(now);
        let Kind::Heartbeat(hb) = kind else {
            self.after_other = true;
            return true;
        };
        // All three evaluated: each consumes its reason.
        let changed = std::mem::replace(&mut self.draining, hb.draining) != hb.draining;
        let after_other = std::mem::take(&mut self.after_other);
        let wanted = self.lease.take_want();
        changed | after_other | wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::runner::v1 as rpb;

    fn beat(draining: bool) -> Kind {
        Kind::Heartbeat(rpb::Heartbeat {
            free_slots: 1,
            load: 0.0,
            draining,
        })
    }

    #[test]
    fn plain_heartbeats_only_renew() {
        let t0 = Instant::now();
        let lease = Arc::new(ConnLease::new(t0));
        assert_eq!(lease.last_seen(), t0);
        let mut f = HeartbeatFilter::new(lease.clone());
        for s in 1..=5 {
            assert!(!f.pass(&beat(false), t0 + Duration::from_secs(s)));
        }
        assert_eq!(lease.last_seen(), t0 + Duration::from_secs(5));
    }

    #[test]
    fn state_changing_heartbeats_are_forwarded() {
        let t0 = Instant::now();
        let lease = Arc::new(ConnLease::new(t0));
        let mut f = HeartbeatFilter::new(lease.clone());
        // draining flips: forwarded once each way.
        assert!(f.pass(&beat(true), t0));
        assert!(!f.pass(&beat(true), t0));
        assert!(f.pass(&beat(false), t0));
        assert!(!f.pass(&beat(false), t0));
        // The scheduler asks (a paused runner): the next one only.
        lease.want_heartbeat();
        assert!(f.pass(&beat(false), t0));
        assert!(!f.pass(&beat(false), t0));
        // Any other message: it and the heartbeat after it.
        let accept = Kind::Accept(rpb::OfferAccepted {
            attempt_id: "a".into(),
        });
        assert!(f.pass(&accept, t0));
        assert!(f.pass(&beat(false), t0));
        assert!(!f.pass(&beat(false), t0));
    }
}
