//! Ships one attempt's spool to the coordinator with `PushLogs`.
//!
//! The shipper keeps `acked`, the durable length the coordinator last
//! acknowledged, and loops:
//!
//! 1. wait until the spool holds bytes past `acked` (or is closed and fully
//!    acked: done);
//! 2. open one `PushLogs` stream and send chunks from `acked` on, each at
//!    most 64 KiB and never spanning two steps; a partial chunk waits at most
//!    50 ms for more output before it goes;
//! 3. end the stream after ~1 s or 64 MiB, or when the closed spool is fully
//!    sent, and take the response's durable offset as the new `acked`;
//! 4. on an error, wait (jittered backoff) and go to 1: the next stream
//!    resends from `acked`. The coordinator skips bytes it already holds, so
//!    a resend never duplicates.
//!
//! `OUT_OF_RANGE` means the coordinator holds fewer bytes than `acked` (it
//! lost some, e.g. a restart without fsync). We do not parse the durable
//! offset out of the status message (its text is not a contract): the
//! shipper resends from offset 0 and the coordinator skips what it has.
//! That is why the spool is kept until the attempt is forgotten.

use std::sync::Arc;
use std::time::Duration;

use capstan_shared::proto::runner::v1::LogChunk;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument, debug, warn};

use super::LogTarget;
use super::spool::{Spool, SpoolState};
use crate::backoff::Backoff;

/// Largest chunk sent.
pub const MAX_CHUNK: usize = 64 * 1024;
/// A partial chunk waits at most this long for more output.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// A stream is ended (to get an ack) after this long...
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(1);
/// ... or after this many bytes. Each stream end waits for the coordinator's
/// fsync and ack before the next stream starts, so this is the window of a
/// stop-and-wait protocol: 4 MiB held a 1 GiB log to ~50 MB/s, 64 MiB gives
/// ~100 MB/s (`capstan-bench --scenario logs`); a resend after an error is at
/// most this much (or one second of output).
pub const STREAM_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// A `PushLogs` call that takes longer than this is abandoned and retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

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
        let (acked_tx, acked) = watch::channel(0);
        let task = tokio::spawn(
            ship(Arc::clone(&spool), target, acked_tx).instrument(tracing::Span::current()),
        );
        Self { spool, acked, task }
    }

    /// The durable length the coordinator acknowledged last.
    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// Closes the spool and waits until the coordinator acknowledged every
    /// byte of it. Returns the log's total length.
    pub async fn finish(self) -> u64 {
        self.spool.close();
        if let Err(e) = self.task.await {
            warn!(error = %e, "log shipper task failed");
        }
        self.spool.state().len
    }
}

/// The shipper loop (see the module docs). Returns when the spool is closed
/// and fully acknowledged, or when every sender of `target` is gone.
pub async fn ship(
    spool: Arc<Spool>,
    mut target: watch::Receiver<Option<LogTarget>>,
    acked_tx: watch::Sender<u64>,
) {
    let mut state = spool.subscribe();
    let mut acked = 0u64;
    let mut backoff = Backoff::new();
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
        match push_once(&spool, &mut state, &current, acked).await {
            Ok(durable) if durable > acked => {
                acked = durable;
                acked_tx.send_replace(acked);
                backoff.reset();
            }
            Ok(durable) => {
                // No progress (nothing durable yet): do not spin.
                acked = durable;
                acked_tx.send_replace(acked);
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(status) if status.code() == tonic::Code::OutOfRange => {
                warn!(
                    attempt = spool.attempt_id(),
                    acked,
                    message = status.message(),
                    "coordinator holds less of the log than acknowledged; resending from 0"
                );
                acked = 0;
                acked_tx.send_replace(acked);
            }
            Err(status) => {
                let delay = backoff.next_delay();
                debug!(attempt = spool.attempt_id(), code = ?status.code(), message = status.message(),
                    ?delay, "pushing logs failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One `PushLogs` stream starting at `from`. Returns the durable offset.
async fn push_once(
    spool: &Spool,
    state: &mut watch::Receiver<SpoolState>,
    target: &LogTarget,
    from: u64,
) -> Result<u64, tonic::Status> {
    let (tx, rx) = mpsc::channel::<LogChunk>(4);
    let mut client = target.client.clone();
    let call = client.push_logs(ReceiverStream::new(rx));
    let send = async move {
        let opened = Instant::now();
        let mut offset = from;
        let mut seq = 0u64;
        loop {
            let mut now = *state.borrow_and_update();
            if offset >= now.len {
                if now.closed {
                    break;
                }
                tokio::select! {
                    r = state.changed() => if r.is_err() { break },
                    () = tokio::time::sleep_until(opened + STREAM_MAX_AGE) => break,
                }
                continue;
            }
            // Batch small writes: wait up to FLUSH_INTERVAL for a full chunk.
            let flush_at = Instant::now() + FLUSH_INTERVAL;
            while !now.closed && now.len - offset < MAX_CHUNK as u64 {
                tokio::select! {
                    r = state.changed() => if r.is_err() { break },
                    () = tokio::time::sleep_until(flush_at) => break,
                }
                now = *state.borrow_and_update();
            }
            let (step_index, segment_end) = spool.step_at(offset);
            let limit = segment_end.unwrap_or(u64::MAX).saturating_sub(offset);
            let max = usize::try_from(limit).unwrap_or(MAX_CHUNK).min(MAX_CHUNK);
            let data = spool
                .read_at(offset, max)
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            let len = data.len() as u64;
            let chunk = LogChunk {
                runner_id: target.credentials.runner_id.to_string(),
                runner_secret: target.credentials.runner_secret.clone(),
                attempt_id: spool.attempt_id().to_owned(),
                step_index,
                offset,
                seq,
                data,
            };
            if tx.send(chunk).await.is_err() {
                // The call ended early; its status says why.
                break;
            }
            offset += len;
            seq += 1;
            if offset - from >= STREAM_MAX_BYTES || opened.elapsed() >= STREAM_MAX_AGE {
                break;
            }
        }
        drop(tx);
        Ok::<_, tonic::Status>(())
    };
    let (response, sent) = tokio::time::timeout(CALL_TIMEOUT, async { tokio::join!(call, send) })
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("PushLogs took too long"))?;
    sent?;
    let ack = response?.into_inner();
    Ok(ack.durable.get(spool.attempt_id()).copied().unwrap_or(from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Credentials;
    use crate::testing::{self, RUNNER_ID, SECRET};
    use capstan_shared::ids::RunnerId;

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

    #[tokio::test]
    async fn ships_every_byte_once_in_order_across_a_dropped_stream() {
        let server = testing::start().await;
        server.coordinator.logs.lock().unwrap().fail_after_chunks = Some(5);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create(dir.path(), "att-ship").await.unwrap();
        let (_target_tx, target_rx) = target(&server).await;
        let shipper = ShipperHandle::spawn(Arc::clone(&spool), target_rx);
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
        let total = shipper.finish().await;
        assert_eq!(total, produced.len() as u64);
        let st = server.coordinator.logs.lock().unwrap();
        assert!(st.fail_after_chunks.is_none(), "the fault was not injected");
        assert!(st.streams >= 2, "streams: {}", st.streams);
        assert!(st.logs["att-ship"] == produced, "log differs");
        assert_eq!(
            st.appended,
            produced.len() as u64,
            "a byte was written twice"
        );
        assert!(st.steps["att-ship"] == steps, "step indexes differ");
    }

    #[tokio::test]
    async fn resends_from_zero_after_out_of_range() {
        let server = testing::start().await;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create(dir.path(), "att-oor").await.unwrap();
        let (_target_tx, target_rx) = target(&server).await;
        let shipper = ShipperHandle::spawn(Arc::clone(&spool), target_rx);
        let first = data(1, 100_000);
        spool.append(0, &first).await.unwrap();
        while shipper.acked() < first.len() as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The coordinator "restarts" and loses what it acknowledged.
        {
            let mut st = server.coordinator.logs.lock().unwrap();
            st.logs.clear();
            st.steps.clear();
        }
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
}
