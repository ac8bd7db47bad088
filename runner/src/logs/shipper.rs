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
//! [`super::spool::KEEP_WHOLE`], 4 MiB, or a quarter of a smaller memory
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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use capstan_proto::runner::v1::LogChunk;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, debug, warn};

use super::LogTarget;
use super::spool::{Spool, SpoolState};
use crate::backoff::Backoff;

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
pub const STREAM_MAX_BYTES: u64 = super::spool::MEMORY_BUDGET / 4;
/// Streams sent whose ack has not come back yet, at most. With one (a
/// stop-and-wait protocol) a 1 GiB log went at ~100 MB/s: every 64 MiB the
/// runner waited for the coordinator to fsync.
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

/// The shipper loop (see the module docs). Returns when the spool is closed
/// and fully acknowledged, or when every sender of `target` is gone while
/// it waits for a first target.
pub async fn ship(
    spool: Arc<Spool>,
    target: watch::Receiver<Option<LogTarget>>,
    acked_tx: watch::Sender<u64>,
) {
    ship_with(spool, target, acked_tx, Limits::default()).await;
}

/// Refusals in a row (`PERMISSION_DENIED`) after which a closed spool's
/// remaining bytes are given up. More than one, so a single refusal from
/// something in between (a proxy answering 403) does not lose a log.
const GIVE_UP_AFTER_REFUSALS: u32 = 3;

async fn ship_with(
    spool: Arc<Spool>,
    mut target: watch::Receiver<Option<LogTarget>>,
    acked_tx: watch::Sender<u64>,
    mut limits: Limits,
) {
    // However the shipping ends (done, given up, aborted), later appends
    // must not wait for memory that no acknowledgement will free.
    let _abandon = AbandonOnExit(&spool);
    // Streams end at a quarter of the spool's memory, so acks free it
    // before appends have to wait (see [`STREAM_MAX_BYTES`]).
    limits.stream_max_bytes = limits.stream_max_bytes.min((spool.budget() / 4).max(1));
    let mut state = spool.subscribe();
    let mut acked = 0u64;
    let mut backoff = Backoff::starting_at(limits.first_retry);
    let mut refusals = 0u32;
    loop {
        let now = *state.borrow_and_update();
        if acked >= now.len {
            if now.closed {
                return;
            }
            if state.changed().await.is_err() {
                return;
            }
            continue;
        }
        let current = target.borrow_and_update().clone();
        let Some(current) = current else {
            if target.changed().await.is_err() {
                return;
            }
            continue;
        };
        let before = acked;
        let mut window_state = Window {
            spool: &spool,
            target: &current,
            acked: &mut acked,
            acked_tx: &acked_tx,
            limits,
        };
        let result = tokio::select! {
            result = window_state.push(&mut state) => result,
            // A new target (the agent was welcomed again, maybe by a new
            // leader) while a push is under way: drop the window and resend
            // from `acked` to the new one. A push to a leader whose host
            // died, or that was cut off, gets no reset: it would otherwise
            // wait for the connection's keepalive or `CALL_TIMEOUT` (20-30
            // s), and the attempt's slot with it. A window to a healthy
            // coordinator is dropped too (a welcome means the control
            // stream broke, mostly with the log connection); the
            // coordinator skips what it already holds.
            Ok(()) = target.changed() => {
                backoff.reset();
                continue;
            }
        };
        if acked > before {
            backoff.reset();
            refusals = 0;
        }
        match result {
            Ok(()) => {}
            Err(Failure::Short) => {
                // The coordinator took less than was sent: do not spin.
                retry_after(&mut target, &mut backoff).await;
            }
            Err(Failure::Status { status, overtook })
                if status.code() == tonic::Code::OutOfRange && !overtook =>
            {
                let first_held = spool.first_held();
                if first_held > 0 {
                    // The bytes it lost were released when it acknowledged
                    // them: no resend can fill the gap, and retrying would
                    // hold the attempt forever.
                    warn!(
                        attempt = spool.attempt_id(),
                        acked,
                        first_held,
                        message = status.message(),
                        "the coordinator lost log bytes it had acknowledged, and this runner no \
                         longer holds them; the rest of the log is not sent"
                    );
                    return;
                }
                warn!(
                    attempt = spool.attempt_id(),
                    acked,
                    message = status.message(),
                    "coordinator holds less of the log than acknowledged; resending from 0"
                );
                acked = 0;
                spool.rewind();
                acked_tx.send_replace(acked);
            }
            Err(Failure::Gone(e)) => {
                // Cannot happen while the spool releases only what was
                // acknowledged (`release` follows `acked`, `rewind` resets
                // both): a guard against a coordinator that acknowledged
                // bytes it did not hold.
                warn!(
                    attempt = spool.attempt_id(),
                    acked,
                    error = %e.source,
                    "the spool no longer holds bytes the coordinator needs; the rest of the log \
                     is not sent"
                );
                return;
            }
            Err(Failure::Status { status, .. }) if status.code() == tonic::Code::OutOfRange => {
                // A stream overtook the one before it at a coordinator that
                // does not wait for gaps: no pipelining with this one.
                if limits.max_in_flight > 1 {
                    warn!(
                        attempt = spool.attempt_id(),
                        "coordinator refused a pipelined log stream; sending one at a time"
                    );
                    limits.max_in_flight = 1;
                }
            }
            Err(Failure::Status { status, .. })
                if status.code() == tonic::Code::PermissionDenied =>
            {
                refusals += 1;
                if spool.state().closed && refusals >= GIVE_UP_AFTER_REFUSALS {
                    warn!(
                        attempt = spool.attempt_id(),
                        acked,
                        len = spool.state().len,
                        message = status.message(),
                        "the coordinator no longer takes this attempt's log (superseded or \
                         expired); the rest is not sent"
                    );
                    return;
                }
                retry_after(&mut target, &mut backoff).await;
            }
            Err(Failure::Status { status, .. }) => {
                debug!(attempt = spool.attempt_id(), code = ?status.code(), message = status.message(),
                    "pushing logs failed; retrying");
                retry_after(&mut target, &mut backoff).await;
            }
        }
    }
}

/// Waits before the next try after a failed push: the backoff's next delay,
/// or less if a new target is published meanwhile. The agent publishes one
/// after each welcome, so after a leader failover the shipper tries the new
/// leader at once and starts its backoff over, instead of sleeping out a
/// delay that grew (up to 5 s) while the leader was gone. Until then the
/// attempt cannot report that it finished, and its slot stays taken (seen
/// in the bench's failover scenario: runs waited 1.3 s for a slot held by
/// an attempt that had ended seconds before).
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

/// Why a window of streams was dropped.
#[derive(Debug)]
enum Failure {
    /// A stream's ack says the coordinator holds less than the stream sent.
    Short,
    /// The spool no longer holds the bytes to send (released after an
    /// acknowledgement); no retry can help.
    Gone(super::spool::SpoolError),
    /// A stream failed; `overtook`: it was opened past `acked`, while the
    /// streams before it awaited their acks.
    Status {
        status: tonic::Status,
        overtook: bool,
    },
}

/// The stream being sent.
struct Open {
    tx: mpsc::Sender<LogChunk>,
    start: u64,
    /// Opened past `acked` (see [`Failure::Status`]).
    overtook: bool,
    opened: Instant,
    seq: u64,
    response: AbortOnDropHandle<Result<u64, tonic::Status>>,
}

/// A stream sent, awaiting its ack (aborted if dropped).
struct Sent {
    overtook: bool,
    end: u64,
    response: AbortOnDropHandle<Result<u64, tonic::Status>>,
}

/// One window of streams to one target.
struct Window<'a> {
    spool: &'a Spool,
    target: &'a LogTarget,
    acked: &'a mut u64,
    acked_tx: &'a watch::Sender<u64>,
    limits: Limits,
}

impl Window<'_> {
    /// Sends from `acked` on, with up to `limits.max_in_flight` streams awaiting their
    /// acks, until everything in the spool is sent and acknowledged (`Ok`),
    /// or until the oldest stream fails. Whatever is in flight then is
    /// dropped (the next call resends from `acked`).
    async fn push(&mut self, state: &mut watch::Receiver<SpoolState>) -> Result<(), Failure> {
        let Limits {
            max_chunk,
            stream_max_bytes,
            max_in_flight,
            max_unacked,
            ..
        } = self.limits;
        let mut next = *self.acked;
        let mut open: Option<Open> = None;
        let mut sent: VecDeque<Sent> = VecDeque::new();
        let mut partial_deadline: Option<Instant> = None;
        loop {
            // The acks that came back, oldest first.
            while sent.front().is_some_and(|s| s.response.is_finished()) {
                let s = sent.pop_front().expect("a front");
                let result = s.response.await;
                self.settle(s.overtook, s.end, result)?;
            }
            // An ack may report more than was sent (streams dropped after an
            // error had been appended): no need to send that again.
            next = next.max(*self.acked);
            let now = *state.borrow_and_update();
            if let Some(o) = &open {
                let done = now.closed && next >= now.len;
                if done
                    || next - o.start >= stream_max_bytes
                    || o.opened.elapsed() >= STREAM_MAX_AGE
                {
                    let o = open.take().expect("an open stream");
                    drop(o.tx);
                    sent.push_back(Sent {
                        overtook: o.overtook,
                        end: next,
                        response: o.response,
                    });
                    continue;
                }
            }
            let room =
                next - *self.acked < max_unacked && (open.is_some() || sent.len() < max_in_flight);
            let mut wait_for_output = !now.closed;
            let mut flush_at = None;
            if next < now.len && room {
                let available = now.len - next;
                let deadline =
                    *partial_deadline.get_or_insert_with(|| Instant::now() + FLUSH_INTERVAL);
                if available >= max_chunk as u64 || now.closed || Instant::now() >= deadline {
                    partial_deadline = None;
                    next = self.send_chunk(&mut open, &mut sent, next).await?;
                    continue;
                }
                // Batch small writes: wait up to FLUSH_INTERVAL for a full chunk.
                flush_at = Some(deadline);
            } else if next < now.len {
                // The window is full: only an ack makes room.
                wait_for_output = false;
            } else if open.is_none() && sent.is_empty() {
                return Ok(());
            }
            let age_limit = open.as_ref().map(|o| o.opened + STREAM_MAX_AGE);
            tokio::select! {
                result = async { (&mut sent.front_mut().expect("a front").response).await },
                    if !sent.is_empty() =>
                {
                    let s = sent.pop_front().expect("a front");
                    self.settle(s.overtook, s.end, result)?;
                }
                r = state.changed(), if wait_for_output => if r.is_err() { return Ok(()) },
                () = sleep_until_some(age_limit), if age_limit.is_some() => {}
                () = sleep_until_some(flush_at), if flush_at.is_some() => {}
            }
        }
    }

    /// Sends the chunk at `next` on the open stream (opening one if there is
    /// none). Returns where the next chunk starts.
    async fn send_chunk(
        &mut self,
        open: &mut Option<Open>,
        sent: &mut VecDeque<Sent>,
        next: u64,
    ) -> Result<u64, Failure> {
        let overtook = next > *self.acked;
        let o = open.get_or_insert_with(|| {
            open_stream(self.target, self.spool.attempt_id(), next, overtook)
        });
        let (step_index, segment_end) = self.spool.step_at(next);
        let limit = segment_end.unwrap_or(u64::MAX).saturating_sub(next);
        let max_chunk = self.limits.max_chunk;
        let max = usize::try_from(limit).unwrap_or(max_chunk).min(max_chunk);
        let data = self
            .spool
            .read_at(next, max)
            .await
            .map_err(|e| match e.source.kind() {
                std::io::ErrorKind::NotFound => Failure::Gone(e),
                _ => Failure::Status {
                    status: tonic::Status::internal(e.to_string()),
                    overtook: o.overtook,
                },
            })?;
        let len = data.len() as u64;
        let chunk = LogChunk {
            runner_id: self.target.credentials.runner_id.to_string(),
            runner_secret: self.target.credentials.runner_secret.clone(),
            attempt_id: self.spool.attempt_id().to_owned(),
            step_index,
            offset: next,
            seq: o.seq,
            data,
        };
        if o.tx.send(chunk).await.is_ok() {
            o.seq += 1;
            return Ok(next + len);
        }
        // The call ended early; its response says why. Take the acks of the
        // streams before it first, in order.
        let o = open.take().expect("an open stream");
        sent.push_back(Sent {
            overtook: o.overtook,
            end: next,
            response: o.response,
        });
        while let Some(s) = sent.pop_front() {
            let result = s.response.await;
            self.settle(s.overtook, s.end, result)?;
        }
        Ok(next)
    }

    /// Takes the response of the stream that sent up to `end`.
    fn settle(
        &mut self,
        overtook: bool,
        end: u64,
        result: Result<Result<u64, tonic::Status>, tokio::task::JoinError>,
    ) -> Result<(), Failure> {
        let durable = result
            .unwrap_or_else(|e| Err(tonic::Status::internal(e.to_string())))
            .map_err(|status| Failure::Status { status, overtook })?;
        if durable > *self.acked {
            *self.acked = durable;
            // Released first: whoever sees the new `acked` sees its memory freed.
            self.spool.release(durable);
            self.acked_tx.send_replace(durable);
        }
        if durable < end {
            return Err(Failure::Short);
        }
        Ok(())
    }
}

/// Opens a `PushLogs` stream whose first chunk starts at `start`; the call
/// runs as its own task, so that its response (the ack, after the
/// coordinator's fsync) can come back while the next stream is sent.
fn open_stream(target: &LogTarget, attempt: &str, start: u64, overtook: bool) -> Open {
    let (tx, rx) = mpsc::channel::<LogChunk>(2);
    let mut client = target.client.clone();
    let attempt = attempt.to_owned();
    let call = async move {
        let call = client.push_logs(ReceiverStream::new(rx));
        let response = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("PushLogs took too long"))??;
        Ok(response
            .into_inner()
            .durable
            .get(&attempt)
            .copied()
            .unwrap_or(start))
    };
    Open {
        tx,
        start,
        overtook,
        opened: Instant::now(),
        seq: 0,
        response: AbortOnDropHandle::new(tokio::spawn(call.instrument(tracing::Span::current()))),
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Credentials;
    use crate::testing::{self, RUNNER_ID, SECRET};
    use capstan_proto::ids::RunnerId;

    async fn target(
        server: &testing::Handle,
    ) -> (
        watch::Sender<Option<LogTarget>>,
        watch::Receiver<Option<LogTarget>>,
    ) {
        let target = LogTarget {
            client: server.client().await,
            credentials: Credentials {
                runner_id: RunnerId::from_string(RUNNER_ID),
                runner_secret: SECRET.into(),
            },
        };
        watch::channel(Some(target))
    }

    fn data(i: usize, size: usize) -> Vec<u8> {
        (0..size).map(|j| ((i * 31 + j) % 251) as u8).collect()
    }

    /// A new spool with `budget` bytes of memory and its shipper to the test
    /// coordinator. Keep the dir and the target's sender until the end:
    /// dropping either ends the shipping early.
    async fn shipping(
        server: &testing::Handle,
        attempt: &str,
        budget: u64,
        limits: Limits,
    ) -> (
        tempfile::TempDir,
        watch::Sender<Option<LogTarget>>,
        Arc<Spool>,
        ShipperHandle,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create_with_budget(dir.path(), attempt, budget).unwrap();
        let (target_tx, target_rx) = target(server).await;
        let shipper = ShipperHandle::spawn_with(Arc::clone(&spool), target_rx, limits);
        (dir, target_tx, spool, shipper)
    }

    /// Waits until the coordinator acknowledged `n` bytes, then makes it
    /// lose every log it holds (a restart that lost acknowledged data).
    async fn lose_after_ack(server: &testing::Handle, shipper: &ShipperHandle, n: u64) {
        while shipper.acked() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut st = server.coordinator.logs.lock().unwrap();
        st.logs.clear();
        st.steps.clear();
    }

    /// Small streams, so that a test sees many of them.
    const SMALL: Limits = Limits {
        max_chunk: 16 * 1024,
        stream_max_bytes: 100_000,
        max_in_flight: 4,
        max_unacked: 1 << 30,
        first_retry: crate::backoff::MIN,
    };

    /// Appends 300 chunks of 1 to 20,000 bytes over three steps, pausing
    /// now and then; returns what was written and each byte's step.
    async fn produce(spool: &Spool) -> (Vec<u8>, Vec<u32>) {
        let mut produced = Vec::new();
        let mut steps = Vec::new();
        for i in 0..300 {
            let step = u32::try_from(i / 100).unwrap();
            let chunk = data(i, 1 + (i * 7919) % 20_000);
            spool.append(step, &chunk).await.unwrap();
            steps.extend(std::iter::repeat_n(step, chunk.len()));
            produced.extend_from_slice(&chunk);
            if i % 40 == 0 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
        (produced, steps)
    }

    async fn ship_and_check(
        server: &testing::Handle,
        attempt: &str,
        limits: Limits,
    ) -> testing::LogStats {
        let (_dir, _target, spool, shipper) =
            shipping(server, attempt, crate::logs::spool::MEMORY_BUDGET, limits).await;
        let (produced, steps) = produce(&spool).await;
        let total = shipper.finish().await;
        assert_eq!(total, produced.len() as u64);
        let st = server.coordinator.logs.lock().unwrap();
        assert!(st.logs[attempt] == produced, "log differs");
        assert_eq!(
            st.appended,
            produced.len() as u64,
            "a byte was written twice"
        );
        assert!(st.steps[attempt] == steps, "step indexes differ");
        st.stats()
    }

    #[tokio::test]
    async fn ships_every_byte_once_in_order_across_a_dropped_stream() {
        let server = testing::start().await;
        server.coordinator.logs.lock().unwrap().fail_after_chunks = Some(2);
        let stats = ship_and_check(&server, "att-ship", Limits::default()).await;
        assert!(stats.fault_injected, "the fault was not injected");
        assert!(stats.streams >= 2, "streams: {}", stats.streams);
    }

    #[tokio::test]
    async fn keeps_several_streams_in_flight() {
        let server = testing::start().await;
        // Acks come back slowly (the coordinator's fsync).
        server.coordinator.logs.lock().unwrap().ack_delay = Duration::from_millis(100);
        let stats = ship_and_check(&server, "att-window", SMALL).await;
        assert!(stats.streams >= 10, "streams: {}", stats.streams);
        assert!(
            (2..=SMALL.max_in_flight).contains(&stats.max_in_flight),
            "streams in flight at once: {}",
            stats.max_in_flight
        );
    }

    #[tokio::test]
    async fn resends_after_an_error_mid_window() {
        let server = testing::start().await;
        {
            let mut st = server.coordinator.logs.lock().unwrap();
            st.ack_delay = Duration::from_millis(100);
            // Streams that already sent their chunks wait for their acks
            // when the fourth one fails after its first chunk.
            st.fail_stream = Some(4);
        }
        let stats = ship_and_check(&server, "att-midwin", SMALL).await;
        assert!(stats.fault_injected, "the fault was not injected");
        assert!(stats.max_in_flight >= 2, "{}", stats.max_in_flight);
    }

    #[tokio::test]
    async fn a_stream_that_overtakes_waits_at_the_coordinator() {
        let server = testing::start().await;
        {
            let mut st = server.coordinator.logs.lock().unwrap();
            // A slow coordinator: the next stream's first chunk arrives while
            // the one before is still being appended.
            st.chunk_delay = Duration::from_millis(5);
        }
        let stats = ship_and_check(&server, "att-overtake", SMALL).await;
        assert_eq!(stats.out_of_range_sent, 0);
    }

    #[tokio::test]
    async fn one_stream_at_a_time_with_a_coordinator_that_refuses_gaps() {
        let server = testing::start().await;
        {
            let mut st = server.coordinator.logs.lock().unwrap();
            st.chunk_delay = Duration::from_millis(5);
            st.refuse_gaps = true;
        }
        let stats = ship_and_check(&server, "att-nogap", SMALL).await;
        // The overtaking stream was refused, the shipper fell back to one
        // stream at a time and did not resend from 0.
        assert!(stats.out_of_range_sent >= 1);
        assert_eq!(
            stats.restarts_from_zero, 0,
            "an overtaking stream's OUT_OF_RANGE was taken for a coordinator that lost data: \
             the whole log was resent from 0 (and the shipper kept pipelining)"
        );
    }

    #[tokio::test]
    async fn resends_from_zero_after_out_of_range() {
        let server = testing::start().await;
        let (_dir, _target, spool, shipper) = shipping(
            &server,
            "att-oor",
            crate::logs::spool::MEMORY_BUDGET,
            Limits::default(),
        )
        .await;
        let first = data(1, 100_000);
        spool.append(0, &first).await.unwrap();
        lose_after_ack(&server, &shipper, first.len() as u64).await;
        let second = data(2, 100_000);
        spool.append(1, &second).await.unwrap();
        let total = shipper.finish().await;
        assert_eq!(total, 200_000);
        let st = server.coordinator.logs.lock().unwrap();
        assert!(st.out_of_range_sent >= 1);
        let mut produced = first.clone();
        produced.extend_from_slice(&second);
        assert!(st.logs["att-oor"] == produced, "log differs");
    }

    /// While no coordinator can be reached, a log past the spool's memory
    /// budget goes to the spool's file; once one can, every byte is shipped
    /// once, in order, from memory and file alike.
    #[tokio::test]
    async fn ships_what_was_spilled_while_the_coordinator_was_away() {
        let server = testing::start().await;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create_with_budget(dir.path(), "att-away", 200_000).unwrap();
        let (target_tx, target_rx) = watch::channel(None);
        let shipper = ShipperHandle::spawn_with(Arc::clone(&spool), target_rx, SMALL);
        let mut produced = Vec::new();
        for i in 0..6 {
            let chunk = data(i, 100_000);
            spool.append(0, &chunk).await.unwrap();
            produced.extend_from_slice(&chunk);
        }
        let spilled = std::fs::metadata(spool.path()).unwrap().len();
        assert!(
            spilled > 200_000,
            "nothing went to the file ({spilled} bytes)"
        );
        let (_tx, reachable) = target(&server).await;
        target_tx.send_replace(reachable.borrow().clone());
        let more = data(9, 300_000);
        spool.append(1, &more).await.unwrap();
        produced.extend_from_slice(&more);
        let total = shipper.finish().await;
        assert_eq!(total, produced.len() as u64);
        let st = server.coordinator.logs.lock().unwrap();
        assert!(st.logs["att-away"] == produced, "log differs");
        assert_eq!(
            st.appended,
            produced.len() as u64,
            "a byte was written twice"
        );
        // Streams end at a quarter of the spool's budget (50 KB; at most
        // one 16 KiB chunk past it), not at the limits' 100 KB.
        assert!(
            st.streams >= produced.len() / (50_000 + 16 * 1024),
            "{} streams for {} bytes",
            st.streams,
            produced.len()
        );
    }

    /// A coordinator that lost a long log it had acknowledged cannot be sent
    /// it again (the runner dropped the acknowledged bytes): the shipper
    /// stops instead of resending forever, and the attempt can finish.
    #[tokio::test]
    async fn stops_when_the_coordinator_lost_what_was_released() {
        let server = testing::start().await;
        // Refused at once instead of after the test server's gap wait.
        server.coordinator.logs.lock().unwrap().refuse_gaps = true;
        let (_dir, _target, spool, shipper) = shipping(&server, "att-lost", 160_000, SMALL).await;
        let first = data(1, 100_000);
        spool.append(0, &first).await.unwrap();
        while shipper.acked() < first.len() as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            spool.first_held(),
            100_000,
            "the acknowledged bytes were kept"
        );
        lose_after_ack(&server, &shipper, 100_000).await;
        spool.append(0, &data(2, 1000)).await.unwrap();
        let total = tokio::time::timeout(Duration::from_secs(20), shipper.finish())
            .await
            .expect("the shipper kept resending what it no longer holds");
        assert_eq!(total, 101_000);
        let st = server.coordinator.logs.lock().unwrap();
        assert!(st.out_of_range_sent >= 1);
        assert!(!st.logs.contains_key("att-lost"), "sent bytes past a gap");
    }

    /// A short log the coordinator lost is sent again from byte 0, and
    /// keeps being sent whole while it grows past what the spool keeps
    /// whole: the acknowledgements of the resend, not the ones before the
    /// loss, decide what the spool may drop.
    #[tokio::test]
    async fn resends_a_lost_short_log_whole_while_it_grows() {
        let server = testing::start().await;
        server.coordinator.logs.lock().unwrap().refuse_gaps = true;
        // Small streams, each read only after the ack of the one before.
        let limits = Limits {
            stream_max_bytes: 20_000,
            max_in_flight: 1,
            ..SMALL
        };
        // The spool keeps a log whole up to 100 KB (a quarter of 400 KB).
        let (_dir, _target, spool, shipper) =
            shipping(&server, "att-regrow", 400_000, limits).await;
        let mut produced = data(1, 70_000);
        spool.append(0, &produced).await.unwrap();
        lose_after_ack(&server, &shipper, 70_000).await;
        // The resend takes a while: the log grows past 100 KB meanwhile.
        server.coordinator.logs.lock().unwrap().ack_delay = Duration::from_millis(50);
        // Still short when the shipper finds out what was lost...
        let more = data(2, 20_000);
        spool.append(0, &more).await.unwrap();
        produced.extend_from_slice(&more);
        // (Until the resend has begun: a log that grows past 100 KB before
        // the shipper learns of the loss has dropped what it acknowledged.)
        while !server
            .coordinator
            .logs
            .lock()
            .unwrap()
            .logs
            .contains_key("att-regrow")
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // ... and past what the spool keeps whole during the resend.
        for i in 3..7 {
            let more = data(i, 70_000);
            spool.append(0, &more).await.unwrap();
            produced.extend_from_slice(&more);
        }
        let total = tokio::time::timeout(Duration::from_secs(20), shipper.finish())
            .await
            .expect("the shipper did not finish");
        assert_eq!(total, produced.len() as u64);
        let st = server.coordinator.logs.lock().unwrap();
        assert!(st.out_of_range_sent >= 1, "the loss was not noticed");
        let held = st.logs.get("att-regrow").map_or(0, Vec::len);
        assert!(
            st.logs["att-regrow"] == produced,
            "the coordinator holds {held} of {} bytes",
            produced.len()
        );
    }

    /// The coordinator says the attempt is not this runner's (it forgot a
    /// run past its retention while a runner that had lost its lease still
    /// ran a superseded attempt): no resend can ever be taken. Once the
    /// attempt ended, the shipper gives up instead of retrying forever (which
    /// held the attempt's slot and spool until the runner restarted).
    #[tokio::test]
    async fn gives_up_when_the_attempt_is_not_the_runners() {
        let server = testing::start().await;
        server.coordinator.logs.lock().unwrap().refuse_attempts = true;
        let (_dir, _target, spool, shipper) = shipping(
            &server,
            "att-gone",
            crate::logs::spool::MEMORY_BUDGET,
            Limits::default(),
        )
        .await;
        spool
            .append(0, b"output of a superseded attempt\n")
            .await
            .unwrap();
        // While the attempt runs, refusals do not end the shipping.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !shipper.task.is_finished(),
            "gave up while the attempt still ran"
        );
        let total = tokio::time::timeout(Duration::from_secs(20), shipper.finish())
            .await
            .expect("the shipper retried a refusal that cannot change, forever");
        assert_eq!(total, 31);
    }

    /// Ships one line while a coordinator on loopback port `old_port` is
    /// the target, publishes a working coordinator as the new target 300 ms
    /// later (after the push to the old one failed or while it still
    /// waits), and returns whether the line reached the new one within
    /// `within`.
    async fn moves_to_a_new_target(old_port: u16, limits: Limits, within: Duration) -> bool {
        use capstan_proto::runner::v1::runner_service_client::RunnerServiceClient;
        let credentials = || Credentials {
            runner_id: RunnerId::from_string(RUNNER_ID),
            runner_secret: SECRET.into(),
        };
        let old = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{old_port}"))
            .unwrap()
            .connect_lazy();
        let (target_tx, target_rx) = watch::channel(Some(LogTarget {
            client: RunnerServiceClient::new(old),
            credentials: credentials(),
        }));
        let dir = tempfile::tempdir().unwrap();
        let spool =
            Spool::create_with_budget(dir.path(), "att-moved", crate::logs::spool::MEMORY_BUDGET)
                .unwrap();
        let shipper = ShipperHandle::spawn_with(Arc::clone(&spool), target_rx, limits);
        let line = b"written while the leader was gone\n";
        spool.append(0, line).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(shipper.acked(), 0, "acknowledged by the old target");
        let server = testing::start().await;
        target_tx.send_replace(Some(LogTarget {
            client: server.client().await,
            credentials: credentials(),
        }));
        let Ok(total) = tokio::time::timeout(within, shipper.finish()).await else {
            return false;
        };
        assert_eq!(total, line.len() as u64);
        assert!(server.coordinator.logs.lock().unwrap().logs["att-moved"] == line);
        true
    }

    /// After a leader failover the agent publishes the new leader as the
    /// target. A shipper waiting out its backoff after failed pushes to the
    /// old leader must try the new one at once: its attempt cannot report
    /// that it finished before its log is acknowledged, so the wait held the
    /// attempt's slot (1.3 s more before the next task, in the bench's
    /// failover scenario).
    #[tokio::test]
    async fn a_new_target_is_tried_without_waiting_out_the_backoff() {
        // The old leader was killed: its port refuses connections.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Waiting out the backoff would take a minute.
        let limits = Limits {
            first_retry: Duration::from_secs(60),
            ..Limits::default()
        };
        assert!(
            moves_to_a_new_target(port, limits, Duration::from_secs(20)).await,
            "the shipper waited out its backoff instead of trying the new leader"
        );
    }

    /// The old leader's host died or was cut off: nothing resets the
    /// connection, and the push to it would wait for `CALL_TIMEOUT` (30 s).
    #[tokio::test]
    async fn a_new_target_ends_a_push_still_waiting_on_the_old_one() {
        // Connections complete (the kernel accepts them) and nothing answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        assert!(
            moves_to_a_new_target(port, Limits::default(), Duration::from_secs(10)).await,
            "the shipper kept waiting on the old leader after the new one was published"
        );
        drop(silent);
    }
}
