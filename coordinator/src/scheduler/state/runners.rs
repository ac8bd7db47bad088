//! The runners registry: every registered runner's record, its current
//! Control stream, when it was last heard from and the attempts holding its
//! slots.

use super::StateError;
use super::effects::{Outgoing, RunnerTx, msg};
use crate::model::RunnerRecord;
use crate::scheduler::lease::ConnLease;
use capstan_proto::ids::{AttemptId, RunnerId};
use capstan_proto::runner::v1 as rpb;
use rpb::coordinator_message::Kind as Down;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tokio::time::{Duration, Instant};

/// A runner's current Control stream.
pub(crate) struct Conn {
    id: u64,
    tx: RunnerTx,
    /// Stamped by the stream's reader on every message (see [`crate::scheduler::lease`]).
    lease: Arc<ConnLease>,
    /// The runner's hello said `confirms_offers`: its offers may leave
    /// before they are durable (see [`super::Effects::take_tentative_offers`]).
    confirms_offers: bool,
}

impl Conn {
    pub(super) fn new(id: u64, tx: RunnerTx, lease: Arc<ConnLease>, confirms_offers: bool) -> Self {
        Self {
            id,
            tx,
            lease,
            confirms_offers,
        }
    }
}

/// A runner as the scheduler sees it.
pub(crate) struct RunnerSlot {
    record: RunnerRecord,
    conn: Option<Conn>,
    /// When the scheduler last heard from it; [`RunnerSlot::seen`] also
    /// counts what its stream's reader saw.
    last_seen: Instant,
    last_seen_ms: i64,
    /// When its Control stream ended, while it has not reconnected.
    detached_at: Option<Instant>,
    /// Attempts holding a slot on this runner.
    active: BTreeSet<AttemptId>,
    /// No offers until its next heartbeat (it rejected or ignored one),
    /// and not before `paused_until`.
    paused: bool,
    /// Offers it rejected or let expire since it last accepted one.
    offer_failures: u32,
    /// The end of the backoff of a runner that keeps failing offers.
    paused_until: Option<Instant>,
    /// The runner itself said it drains (SIGTERM). In memory only: a
    /// restarted runner is not draining; `capstan drain` sets the record's flag.
    self_draining: bool,
}

/// The longest a runner that keeps failing offers waits between them.
const MAX_OFFER_BACKOFF: Duration = Duration::from_secs(30);

/// The backoff after `failures` offer failures in a row: none after the
/// first (the heartbeat gate suffices), then 1 s, 2 s, 4 s ... up to
/// [`MAX_OFFER_BACKOFF`].
fn offer_backoff(failures: u32) -> Option<Duration> {
    let doublings = failures.checked_sub(2)?;
    let secs = 1u64.checked_shl(doublings.min(16)).unwrap_or(u64::MAX);
    Some(Duration::from_secs(secs).min(MAX_OFFER_BACKOFF))
}

impl RunnerSlot {
    /// A runner without a connection, last heard from at `last_seen`.
    pub(super) fn new(record: RunnerRecord, last_seen: Instant, last_seen_ms: i64) -> Self {
        Self {
            record,
            conn: None,
            last_seen,
            last_seen_ms,
            detached_at: None,
            active: BTreeSet::new(),
            paused: false,
            offer_failures: 0,
            paused_until: None,
            self_draining: false,
        }
    }

    pub(crate) fn record(&self) -> &RunnerRecord {
        &self.record
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// How many attempts hold a slot.
    pub(crate) fn busy(&self) -> usize {
        self.active.len()
    }

    pub(crate) fn self_draining(&self) -> bool {
        self.self_draining
    }

    #[cfg(test)]
    pub(crate) fn is_paused(&self) -> bool {
        self.paused
    }

    #[cfg(test)]
    pub(crate) fn last_seen(&self) -> Instant {
        self.last_seen
    }

    #[cfg(test)]
    pub(crate) fn last_seen_ms(&self) -> i64 {
        self.last_seen_ms
    }

    pub(crate) fn free_slots(&self) -> u32 {
        self.record
            .capacity
            .saturating_sub(self.active.len() as u32)
    }

    /// When the runner was last heard from: by the scheduler, or by the
    /// reader of its current stream (heartbeats that change nothing stop
    /// there). Leases are judged by this.
    pub(crate) fn seen(&self) -> Instant {
        match &self.conn {
            Some(c) => self.last_seen.max(c.lease.last_seen()),
            None => self.last_seen,
        }
    }

    /// [`RunnerSlot::seen`] as wall-clock milliseconds, for display.
    pub(crate) fn seen_ms(&self) -> i64 {
        let later = self.seen().saturating_duration_since(self.last_seen);
        self.last_seen_ms + i64::try_from(later.as_millis()).unwrap_or(i64::MAX)
    }

    pub(crate) fn accepts_work(&self) -> bool {
        let spent = self.record.ephemeral && self.record.spent;
        self.conn.is_some()
            && !self.record.draining
            && !self.self_draining
            && !self.paused
            && !spent
            && self.free_slots() > 0
    }

    /// The attempts holding a slot.
    pub(super) fn active(&self) -> impl Iterator<Item = &AttemptId> {
        self.active.iter()
    }

    /// Past its lease at `now`, or detached for longer than `grace`, while
    /// it holds attempts.
    pub(super) fn lost(&self, now: Instant, lease: Duration, grace: Duration) -> bool {
        !self.active.is_empty()
            && (now.saturating_duration_since(self.seen()) >= lease
                || self
                    .detached_at
                    .is_some_and(|d| now.duration_since(d) >= grace))
    }

    /// Whether `conn_id` is its current connection.
    pub(super) fn is_on(&self, conn_id: u64) -> bool {
        self.conn.as_ref().is_some_and(|c| c.id == conn_id)
    }

    /// `kind` for its current connection, if it has one.
    pub(super) fn outgoing(&self, kind: Down) -> Option<Outgoing> {
        let c = self.conn.as_ref()?;
        Some(Outgoing::new(
            c.id,
            c.tx.clone(),
            msg(kind),
            c.confirms_offers,
        ))
    }

    /// It rejected or let expire an offer at `now`: no offers until its
    /// next heartbeat, which its stream's reader is told to forward, and,
    /// from the second failure in a row, not before a backoff of 1 s
    /// doubling to [`MAX_OFFER_BACKOFF`]: a runner that heartbeats but
    /// cannot take work must not be offered every task again each second.
    pub(super) fn pause(&mut self, now: Instant) {
        if self.paused {
            // Another offer of the same stall (say, all of a runner's
            // slots expiring in one sweep): one failure, not several.
            return;
        }
        self.paused = true;
        self.offer_failures += 1;
        self.paused_until = offer_backoff(self.offer_failures).map(|d| now + d);
        if let Some(c) = &self.conn {
            c.lease.want_heartbeat();
        }
    }

    /// It accepted an offer: its backoff is over.
    pub(super) fn offer_accepted(&mut self) {
        self.offer_failures = 0;
        self.paused_until = None;
    }

    fn backing_off(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|t| now < t)
    }

    /// Re-registered: a new record (the secret rotated).
    pub(super) fn set_record(&mut self, record: RunnerRecord) {
        self.record = record;
    }

    /// `capstan drain` (true) or `capstan resume`; true if the flag changed.
    pub(super) fn set_draining(&mut self, draining: bool) -> bool {
        let changed = self.record.draining != draining;
        self.record.draining = draining;
        changed
    }

    /// A new Control stream, opened at `now`: the runner is heard from,
    /// no longer detached, paused or draining by itself.
    pub(super) fn connect(&mut self, conn: Conn, now: Instant, now_ms: i64) {
        self.conn = Some(conn);
        self.detached_at = None;
        self.self_draining = false;
        self.last_seen = now;
        self.last_seen_ms = now_ms;
        self.paused = self.backing_off(now);
        if self.paused
            && let Some(c) = &self.conn
        {
            // Its reader forwards no plain heartbeat unless asked: without
            // this, one that reconnects while backing off stays paused.
            c.lease.want_heartbeat();
        }
    }

    /// What its hello says about it (empty or zero: unchanged).
    pub(super) fn update_from_hello(
        &mut self,
        capacity: u32,
        labels: HashMap<String, String>,
        version: String,
    ) {
        // An ephemeral runner runs one task at a time whatever it says.
        if capacity > 0 && !self.record.ephemeral {
            self.record.capacity = capacity;
        }
        if !labels.is_empty() && !self.record.fixed_labels {
            self.record.labels = labels.into_iter().collect::<BTreeMap<_, _>>();
        }
        if !version.is_empty() {
            self.record.version = version;
        }
    }

    /// The Control stream `conn_id` ended at `now` (an older one's end
    /// changes nothing).
    pub(super) fn disconnect(&mut self, conn_id: u64, now: Instant) {
        if !self.is_on(conn_id) {
            return;
        }
        // The reader's stamp dies with the connection: keep what it saw
        // (plain heartbeats never reached `last_seen`), or a runner busy
        // for longer than a lease would lose its attempts at once
        // instead of after the disconnect grace.
        self.last_seen_ms = self.seen_ms();
        self.last_seen = self.seen();
        self.conn = None;
        self.detached_at = Some(now);
    }

    /// An ephemeral runner accepted its one task: it is offered no other.
    /// True if that changed its record.
    pub(super) fn spend(&mut self) -> bool {
        let change = self.record.ephemeral && !self.record.spent;
        self.record.spent |= self.record.ephemeral;
        change
    }

    /// Forgets its connection (it goes away, or must reconnect).
    pub(super) fn drop_conn(&mut self) {
        self.conn = None;
    }

    /// Heard from at `now`.
    pub(super) fn heard(&mut self, now: Instant, now_ms: i64) {
        self.last_seen = now;
        self.last_seen_ms = now_ms;
    }

    /// A heartbeat that reached the scheduler at `now`; it ends a pause
    /// unless the backoff runs on (then the next one is asked for).
    pub(super) fn heartbeat(&mut self, draining: bool, now: Instant) {
        self.self_draining = draining;
        if !self.backing_off(now) {
            self.paused = false;
        } else if let Some(c) = &self.conn {
            c.lease.want_heartbeat();
        }
    }

    /// An offer to it at `now`.
    pub(super) fn offered(&mut self, attempt: AttemptId, now: Instant) {
        self.active.insert(attempt);
        self.last_seen = self.last_seen.max(now);
    }

    /// A loaded attempt that holds a slot.
    pub(super) fn hold(&mut self, attempt: AttemptId) {
        self.active.insert(attempt);
    }

    /// The attempt no longer holds a slot.
    pub(super) fn release(&mut self, attempt: &AttemptId) {
        self.active.remove(attempt);
    }
}

#[derive(Default)]
pub(super) struct Runners {
    slots: HashMap<RunnerId, RunnerSlot>,
}

impl Runners {
    pub(super) fn get(&self, id: &RunnerId) -> Option<&RunnerSlot> {
        self.slots.get(id)
    }

    pub(super) fn get_mut(&mut self, id: &RunnerId) -> Option<&mut RunnerSlot> {
        self.slots.get_mut(id)
    }

    /// The slot of `id`, which must exist.
    pub(super) fn slot(&self, id: &RunnerId) -> &RunnerSlot {
        &self.slots[id]
    }

    /// The slot of `id`, which must exist.
    pub(super) fn slot_mut(&mut self, id: &RunnerId) -> &mut RunnerSlot {
        self.slots.get_mut(id).expect("runner exists")
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &RunnerSlot> {
        self.slots.values()
    }

    pub(super) fn remove(&mut self, id: &RunnerId) {
        self.slots.remove(id);
    }

    pub(super) fn insert(&mut self, slot: RunnerSlot) {
        self.slots.insert(slot.record.id.clone(), slot);
    }

    /// The runner registered as `name`.
    pub(super) fn by_name(&self, name: &str) -> Option<RunnerId> {
        self.slots
            .values()
            .find(|r| r.record.name == name)
            .map(|r| r.record.id.clone())
    }

    /// The runner with id or name `who`.
    pub(super) fn find(&self, who: &str) -> Result<RunnerId, StateError> {
        self.slots
            .values()
            .find(|r| r.record.id.as_str() == who || r.record.name == who)
            .map(|r| r.record.id.clone())
            .ok_or_else(|| StateError::UnknownRunner(who.to_string()))
    }

    /// The runners that accept work, with their free slots.
    pub(super) fn free(&self) -> impl Iterator<Item = (u32, RunnerId)> {
        self.slots
            .values()
            .filter(|r| r.accepts_work())
            .map(|r| (r.free_slots(), r.record.id.clone()))
    }

    pub(super) fn connected(&self) -> usize {
        self.slots.values().filter(|r| r.conn.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offer_backoff_doubles_to_its_bound() {
        assert_eq!(offer_backoff(1), None);
        assert_eq!(offer_backoff(2), Some(Duration::from_secs(1)));
        assert_eq!(offer_backoff(4), Some(Duration::from_secs(4)));
        assert_eq!(offer_backoff(7), Some(MAX_OFFER_BACKOFF));
        assert_eq!(offer_backoff(u32::MAX), Some(MAX_OFFER_BACKOFF));
    }
}
