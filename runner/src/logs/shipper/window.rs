//! One window of `PushLogs` streams to one target (step 2 of the
//! shipper's module docs): sends from `acked` on with up to
//! `max_in_flight` streams awaiting their acks, takes the acks in order and
//! moves `acked`; the first failure drops the window, and [`Failure`] says
//! why. Imports the spool and the shipper's limits, nothing else.

use std::collections::VecDeque;

use capstan_proto::runner::v1::LogChunk;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use super::{CALL_TIMEOUT, FLUSH_INTERVAL, Limits, STREAM_MAX_AGE};
use crate::logs::LogTarget;
use crate::logs::spool::{Spool, SpoolError, SpoolState};

/// Why a window of streams was dropped.
#[derive(Debug)]
pub(super) enum Failure {
    /// A stream's ack says the coordinator holds less than the stream sent.
    Short,
    /// The spool no longer holds the bytes to send (released after an
    /// acknowledgement); no retry can help.
    Gone(SpoolError),
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
pub(super) struct Window<'a> {
    pub(super) spool: &'a Spool,
    pub(super) target: &'a LogTarget,
    pub(super) acked: &'a mut u64,
    pub(super) acked_tx: &'a watch::Sender<u64>,
    pub(super) limits: Limits,
}

impl Window<'_> {
    /// Sends from `acked` on, with up to `limits.max_in_flight` streams awaiting their
    /// acks, until everything in the spool is sent and acknowledged (`Ok`),
    /// or until the oldest stream fails. Whatever is in flight then is
    /// dropped (the next call resends from `acked`).
    pub(super) async fn push(
        &mut self,
        state: &mut watch::Receiver<SpoolState>,
    ) -> Result<(), Failure> {
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
