//! Ships one attempt's spool to the coordinator with `PushLogs`.
//!
//! The shipper keeps `acked`, the durable length the coordinator last
//! acknowledged, and loops:
//!
//! 1. wait until the spool holds bytes past `acked` (or is closed and fully
//!    acked: done);
//! 2. send the bytes from `acked` on over a series of `PushLogs` streams, in
//!    chunks of at most 1 MiB that never span two steps; a partial chunk
//!    waits at most 50 ms for more output before it goes. A stream ends after
//!    ~1 s or 16 MiB, or when the closed spool is fully sent; its response
//!    (sent by the coordinator after its fsync) carries the durable offset.
//!    The next stream starts at once, where the previous one ended, without
//!    waiting for that response: up to [`MAX_IN_FLIGHT`] streams and
//!    [`MAX_UNACKED`] bytes may await their acks (a sliding window; the
//!    coordinator waits briefly for a log to reach a chunk's offset when an
//!    earlier stream is still being appended). Responses are taken in order
//!    and move `acked`, and the spool frees the memory of what they
//!    acknowledged ([`Spool::release`]);
//! 3. on an error (the oldest stream of the window failed), drop the whole
//!    window, wait (jittered backoff, cut short when the agent publishes a
//!    new target: a new leader) and go to 1: the next stream resends from
//!    `acked`. A new target also ends a window still pushing to the old one
//!    (a dead leader's host may never reset the connection). The
//!    coordinator skips bytes it already holds, so a resend never
//!    duplicates.
//!
//! `OUT_OF_RANGE` on a stream that started at `acked` (nothing before it
//! was unacknowledged when it was opened) means the coordinator holds fewer
//! bytes than `acked` (it lost some it had fsynced: a replaced disk, a new
//! leader without the old one's log dir). We do not parse the durable
//! offset out of the status message (its text is not a contract): if the
//! spool still holds the whole log (it keeps a log whole up to
//! [`spool::KEEP_WHOLE`], 4 MiB, or a quarter of a smaller memory
//! budget, which covers almost every CI log), the
//! shipper resends from offset 0 and the coordinator skips what it has. A
//! longer log's acknowledged bytes were dropped as the acks came, so no
//! resend can fill the gap: the shipper says so and stops, instead of
//! holding the attempt forever.
//!
//! `OUT_OF_RANGE` on a stream that started past
//! `acked` (opened while the streams before it awaited their acks) means it
//! overtook the stream before it at a coordinator that does not wait for
//! gaps (an older version), or that waited in vain: the shipper retries from
//! `acked` and sends one stream at a time from then on. (Judging by `acked`
//! when the failure is taken would not do: the acks of the streams before
//! it, taken first, have moved `acked` up to its start by then.)
//!
//! `PERMISSION_DENIED` means the coordinator no longer takes this attempt's
//! log: it was superseded (requeued after a lost lease) or its run expired.
//! No resend can change that. While the attempt runs the shipper keeps
//! retrying (the agent gets a Cancel for a superseded attempt, which ends
//! it); once the spool is closed, [`GIVE_UP_AFTER_REFUSALS`] refusals in a
//! row end the shipping with the rest unsent, so the attempt can finish and
//! free its slot instead of retrying forever.
//!
//! Layout: this file holds [`ShipperHandle`] and the loop between windows
//! (waiting for bytes and a target, the retries and what each failure
//! means); `window.rs` sends one window of streams and takes its acks.

#[cfg(test)]
mod tests;
mod window;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, warn};

use self::window::{Failure, Window};
use crate::backoff::Backoff;
use crate::logs::LogTarget;
use crate::logs::spool::{self, Spool};

/// Largest chunk sent (the coordinator accepts messages up to 4 MiB).
pub const MAX_CHUNK: usize = 1024 * 1024;
/// A partial chunk waits at most this long for more output.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// A stream is ended (to get an ack) after this long...
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(1);
/// ... or after this many bytes: a quarter of the spool's memory budget,
/// so that acks free memory while a fast step still has room to write
/// (with streams as large as the budget, a step that outran the shipper
/// would wait for each stream's ack in turn).
pub const STREAM_MAX_BYTES: u64 = spool::MEMORY_BUDGET / 4;
/// Streams sent whose ack has not come back yet, at most. With one (a
/// stop-and-wait protocol) the runner waits for the coordinator's fsync
/// after every stream.
pub const MAX_IN_FLIGHT: usize = 16;
/// Bytes sent but not acknowledged yet, at most: what a resend after an
/// error may cost. The spool holds them (in memory up to its budget, past
/// that in its file).
pub const MAX_UNACKED: u64 = 1024 * 1024 * 1024;

/// A `PushLogs` call that takes longer than this is abandoned and retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The window's limits; tests use small ones.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_chunk: usize,
    pub stream_max_bytes: u64,
    pub max_in_flight: usize,
    pub max_unacked: u64,
    /// The first retry's delay after an error (then doubling, see
    /// [`Backoff`]).
    pub first_retry: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_chunk: MAX_CHUNK,
            stream_max_bytes: STREAM_MAX_BYTES,
            max_in_flight: MAX_IN_FLIGHT,
            max_unacked: MAX_UNACKED,
            first_retry: crate::backoff::MIN,
        }
    }
}

/// A running shipper. Drop it only after [`ShipperHandle::finish`].
#[derive(Debug)]
pub struct ShipperHandle {
    spool: Arc<Spool>,
    acked: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl ShipperHandle {
    /// Starts shipping `spool` to whatever `target` holds (waiting while it
    /// holds `None`).
    pub fn spawn(spool: Arc<Spool>, target: watch::Receiver<Option<LogTarget>>) -> Self {
        Self::spawn_with(spool, target, Limits::default())
    }

    pub(crate) fn spawn_with(
        spool: Arc<Spool>,
        target: watch::Receiver<Option<LogTarget>>,
        limits: Limits,
    ) -> Self {
        let (acked_tx, acked) = watch::channel(0);
        let task = tokio::spawn(
            ship_with(Arc::clone(&spool), target, acked_tx, limits)
                .instrument(tracing::Span::current()),
        );
        Self { spool, acked, task }
    }

    /// The durable length the coordinator acknowledged last.
    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// Closes the spool and waits until the coordinator acknowledged every
    /// byte of it, or the shipper gave up (the attempt is not this
    /// runner's any more, or the coordinator lost bytes the spool no longer
    /// holds). Returns the log's total length.
    pub async fn finish(self) -> u64 {
        self.spool.close();
        if let Err(e) = self.task.await {
            warn!(error = %e, "log shipper task failed");
        }
        self.spool.state().len
    }
}

/// Refusals in a row (`PERMISSION_DENIED`) after which a closed spool's
/// remaining bytes are given up. More than one, so a single refusal from
/// something in between (a proxy answering 403) does not lose a log.
const GIVE_UP_AFTER_REFUSALS: u32 = 3;

/// The shipper loop (see the module docs). Returns when the spool is closed
/// and fully acknowledged, when the shipper gives up, or when every sender
/// of `target` is gone while it waits for a first target.
async fn ship_with(
    spool: Arc<Spool>,
    target: watch::Receiver<Option<LogTarget>>,
    acked_tx: watch::Sender<u64>,
    mut limits: Limits,
) {
    // However the shipping ends (done, given up, aborted), later appends
    // must not wait for memory that no acknowledgement will free.
    let _abandon = AbandonOnExit(&spool);
    // Streams end at a quarter of the spool's memory, so acks free it
    // before appends have to wait (see [`STREAM_MAX_BYTES`]).
    limits.stream_max_bytes = limits.stream_max_bytes.min((spool.budget() / 4).max(1));
    let mut shipper = Shipper {
        spool: Arc::clone(&spool),
        target,
        acked: 0,
        acked_tx,
        limits,
        backoff: Backoff::starting_at(limits.first_retry),
        refusals: 0,
    };
    shipper.run().await;
}

/// One spool's shipping: what the loop keeps between windows.
struct Shipper {
    spool: Arc<Spool>,
    target: watch::Receiver<Option<LogTarget>>,
    /// The durable length the coordinator last acknowledged.
    acked: u64,
    acked_tx: watch::Sender<u64>,
    limits: Limits,
    backoff: Backoff,
    /// `PERMISSION_DENIED`s in a row.
    refusals: u32,
}

impl Shipper {
    async fn run(&mut self) {
        let mut state = self.spool.subscribe();
        loop {
            let now = *state.borrow_and_update();
            if self.acked >= now.len {
                if now.closed {
                    return;
                }
                if state.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let current = self.target.borrow_and_update().clone();
            let Some(current) = current else {
                if self.target.changed().await.is_err() {
                    return;
                }
                continue;
            };
            let before = self.acked;
            let mut window = Window {
                spool: &self.spool,
                target: &current,
                acked: &mut self.acked,
                acked_tx: &self.acked_tx,
                limits: self.limits,
            };
            let result = tokio::select! {
                result = window.push(&mut state) => result,
                // A new target (the agent was welcomed again, maybe by a new
                // leader) while a push is under way: drop the window and
                // resend from `acked` to the new one. A push to a leader
                // whose host died, or that was cut off, gets no reset: it
                // would otherwise wait for the connection's keepalive or
                // `CALL_TIMEOUT` (20-30 s), and the attempt's slot with it.
                // A window to a healthy coordinator is dropped too (a
                // welcome means the control stream broke, mostly with the
                // log connection); the coordinator skips what it already
                // holds.
                Ok(()) = self.target.changed() => {
                    self.backoff.reset();
                    continue;
                }
            };
            if self.acked > before {
                self.backoff.reset();
                self.refusals = 0;
            }
            if let Err(failure) = result
                && self.failed(failure).await.is_break()
            {
                return;
            }
        }
    }

    /// After a dropped window: waits before the next one, or (`Break`)
    /// stops shipping.
    async fn failed(&mut self, failure: Failure) -> ControlFlow<()> {
        let acked = self.acked;
        match failure {
            Failure::Short => {
                // The coordinator took less than was sent: do not spin.
                retry_after(&mut self.target, &mut self.backoff).await;
            }
            Failure::Status { status, overtook }
                if status.code() == tonic::Code::OutOfRange && !overtook =>
            {
                return self.lost(&status);
            }
            Failure::Gone(e) => {
                // Cannot happen while the spool releases only what was
                // acknowledged (`release` follows `acked`, `rewind` resets
                // both): a guard against a coordinator that acknowledged
                // bytes it did not hold.
                warn!(
                    attempt = self.spool.attempt_id(),
                    acked,
                    error = %e.source,
                    "the spool no longer holds bytes the coordinator needs; the rest of the log \
                     is not sent"
                );
                return ControlFlow::Break(());
            }
            Failure::Status { status, .. } if status.code() == tonic::Code::OutOfRange => {
                // A stream overtook the one before it at a coordinator that
                // does not wait for gaps: no pipelining with this one.
                if self.limits.max_in_flight > 1 {
                    warn!(
                        attempt = self.spool.attempt_id(),
                        "coordinator refused a pipelined log stream; sending one at a time"
                    );
                    self.limits.max_in_flight = 1;
                }
            }
            Failure::Status { status, .. } if status.code() == tonic::Code::PermissionDenied => {
                return self.refused(&status).await;
            }
            Failure::Status { status, .. } => {
                debug!(attempt = self.spool.attempt_id(), code = ?status.code(), message = status.message(),
                    "pushing logs failed; retrying");
                retry_after(&mut self.target, &mut self.backoff).await;
            }
        }
        ControlFlow::Continue(())
    }

    /// `OUT_OF_RANGE` on a stream that started at `acked`: the coordinator
    /// lost bytes it had acknowledged. Resends from 0 if the spool still
    /// holds them all, else (`Break`) stops (see the module docs).
    fn lost(&mut self, status: &tonic::Status) -> ControlFlow<()> {
        let first_held = self.spool.first_held();
        if first_held > 0 {
            // The bytes it lost were released when it acknowledged them: no
            // resend can fill the gap, and retrying would hold the attempt
            // forever.
            warn!(
                attempt = self.spool.attempt_id(),
                acked = self.acked,
                first_held,
                message = status.message(),
                "the coordinator lost log bytes it had acknowledged, and this runner no \
                 longer holds them; the rest of the log is not sent"
            );
            return ControlFlow::Break(());
        }
        warn!(
            attempt = self.spool.attempt_id(),
            acked = self.acked,
            message = status.message(),
            "coordinator holds less of the log than acknowledged; resending from 0"
        );
        self.acked = 0;
        self.spool.rewind();
        self.acked_tx.send_replace(self.acked);
        ControlFlow::Continue(())
    }

    /// `PERMISSION_DENIED`: the coordinator no longer takes this attempt's
    /// log. Retries while the attempt runs; gives up (`Break`) after
    /// [`GIVE_UP_AFTER_REFUSALS`] in a row once the spool is closed.
    async fn refused(&mut self, status: &tonic::Status) -> ControlFlow<()> {
        self.refusals += 1;
        if self.spool.state().closed && self.refusals >= GIVE_UP_AFTER_REFUSALS {
            warn!(
                attempt = self.spool.attempt_id(),
                acked = self.acked,
                len = self.spool.state().len,
                message = status.message(),
                "the coordinator no longer takes this attempt's log (superseded or \
                 expired); the rest is not sent"
            );
            return ControlFlow::Break(());
        }
        retry_after(&mut self.target, &mut self.backoff).await;
        ControlFlow::Continue(())
    }
}

/// Waits before the next try after a failed push: the backoff's next delay,
/// or less if a new target is published meanwhile. The agent publishes one
/// after each welcome, so after a leader failover the shipper tries the new
/// leader at once and starts its backoff over, instead of sleeping out a
/// delay that grew (up to 5 s) while the leader was gone. Until then the
/// attempt cannot report that it finished, and its slot stays taken.
async fn retry_after(target: &mut watch::Receiver<Option<LogTarget>>, backoff: &mut Backoff) {
    let delay = backoff.next_delay();
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        // With every sender gone (the agent is gone) this branch is
        // disabled, and the delay holds.
        Ok(()) = target.changed() => backoff.reset(),
    }
}

/// Calls [`Spool::abandon`] when dropped.
struct AbandonOnExit<'a>(&'a Spool);

impl Drop for AbandonOnExit<'_> {
    fn drop(&mut self) {
        self.0.abandon();
    }
}
