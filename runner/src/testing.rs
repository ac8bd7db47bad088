//! A small in-process coordinator for the runner's own tests: `Register`
//! checks the token, `Control` hands every runner message to the test and
//! sends what the test pushes, `PushLogs` stores logs with the coordinator's
//! exactly-once rules (skip bytes already held, OUT_OF_RANGE on a gap) and
//! can inject faults.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use capstan_proto::runner::v1::runner_service_server::{RunnerService, RunnerServiceServer};
use capstan_proto::runner::v1::{
    CoordinatorMessage, HeartbeatAck, LogChunk, PushLogsAck, RegisterRequest, RegisterResponse,
    RunnerMessage, Welcome, coordinator_message, runner_message,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status, Streaming};

pub(crate) const TOKEN: &str = "test-token";
pub(crate) const RUNNER_ID: &str = "rnr-test";
pub(crate) const SECRET: &str = "secret-1";

#[derive(Default)]
pub(crate) struct LogState {
    /// Durable log per attempt.
    pub logs: HashMap<String, Vec<u8>>,
    /// Step index of every durable byte, per attempt.
    pub steps: HashMap<String, Vec<u32>>,
    /// Bytes appended in total (a byte written twice counts twice).
    pub appended: u64,
    /// Fail the next stream after this many chunks (once).
    pub fail_after_chunks: Option<usize>,
    /// Fail the stream with this number (1 = the first) after its first
    /// chunk.
    pub fail_stream: Option<usize>,
    /// Failures injected so far.
    pub faults: usize,
    pub out_of_range_sent: usize,
    pub streams: usize,
    /// Streams open now, and the most open at once.
    pub in_flight: usize,
    pub max_in_flight: usize,
    /// Time taken per chunk, and before each response (the fsync).
    pub chunk_delay: std::time::Duration,
    pub ack_delay: std::time::Duration,
    /// Refuse a chunk past the end of the log at once (as coordinators
    /// before pipelined log streams did) instead of waiting up to 5 s (as
    /// the coordinator's `GAP_WAIT`) for an earlier stream to fill the gap.
    pub refuse_gaps: bool,
    /// The offset of each stream's first chunk, in arrival order.
    pub stream_starts: Vec<u64>,
    /// Answer every stream as the coordinator does for an attempt that is
    /// not (or no longer) this runner's: PERMISSION_DENIED.
    pub refuse_attempts: bool,
}

/// What a test checks of [`LogState`] after the fact.
#[derive(Debug)]
pub(crate) struct LogStats {
    pub streams: usize,
    pub max_in_flight: usize,
    pub out_of_range_sent: usize,
    pub fault_injected: bool,
    /// Streams after the first that started at offset 0 (a resend of the
    /// whole log).
    pub restarts_from_zero: usize,
}

impl LogState {
    pub(crate) fn stats(&self) -> LogStats {
        LogStats {
            streams: self.streams,
            max_in_flight: self.max_in_flight,
            out_of_range_sent: self.out_of_range_sent,
            fault_injected: self.faults > 0,
            restarts_from_zero: self
                .stream_starts
                .iter()
                .skip(1)
                .filter(|&&o| o == 0)
                .count(),
        }
    }
}

type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

pub(crate) struct FakeCoordinator {
    pub logs: Mutex<LogState>,
    to_test: mpsc::UnboundedSender<RunnerMessage>,
    outbound: Arc<Mutex<Option<Outbound>>>,
    pub heartbeat_ms: u32,
    /// Welcomes say `acks_heartbeats` and every heartbeat is answered, as
    /// the real coordinator does (off by default: the tests of other
    /// things see only what they send).
    pub acks_heartbeats: AtomicBool,
    /// Stops answering heartbeats while still welcoming with
    /// `acks_heartbeats`: a partitioned coordinator, as the runner sees it.
    pub muted: Arc<AtomicBool>,
}

pub(crate) struct Handle {
    pub addr: SocketAddr,
    pub coordinator: Arc<FakeCoordinator>,
    /// Every message runners sent on Control, in order.
    pub from_runner: mpsc::UnboundedReceiver<RunnerMessage>,
}

impl Handle {
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A lazy connection to the server.
    pub(crate) fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("the server's URL parses")
            .connect_lazy()
    }

    /// Sends a message down the current Control stream. A stream whose
    /// hello the test has seen may still be opening: it waits a moment
    /// for it.
    pub(crate) async fn send(&self, kind: coordinator_message::Kind) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let tx = loop {
            if let Some(tx) = self.coordinator.outbound.lock().unwrap().clone() {
                break tx;
            }
            assert!(tokio::time::Instant::now() < deadline, "no control stream");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        tx.send(Ok(CoordinatorMessage { kind: Some(kind) }))
            .await
            .unwrap();
    }

    /// Ends the current Control stream from the coordinator's side, as a
    /// coordinator that stops or loses its leadership does.
    pub(crate) fn end_stream(&self) {
        self.coordinator.outbound.lock().unwrap().take();
    }
}

/// The names in directory `dir`, sorted.
pub(crate) fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = dir
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

pub(crate) async fn start() -> Handle {
    start_with(Server::builder()).await
}

/// [`start`] with HTTP/2 windows of `window` bytes for each stream and for
/// the whole connection, as a coordinator whose window one stream can fill.
pub(crate) async fn start_with_window(window: u32) -> Handle {
    start_with(
        Server::builder()
            .initial_stream_window_size(window)
            .initial_connection_window_size(window),
    )
    .await
}

async fn start_with(mut server: Server) -> Handle {
    let (to_test, from_runner) = mpsc::unbounded_channel();
    let coordinator = Arc::new(FakeCoordinator {
        logs: Mutex::new(LogState::default()),
        to_test,
        outbound: Arc::new(Mutex::new(None)),
        heartbeat_ms: 100,
        acks_heartbeats: AtomicBool::new(false),
        muted: Arc::new(AtomicBool::new(false)),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = RunnerServiceServer::from_arc(Arc::clone(&coordinator));
    tokio::spawn(
        server
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Handle {
        addr,
        coordinator,
        from_runner,
    }
}

impl FakeCoordinator {
    /// Like the coordinator, waits a little for an earlier stream to fill a
    /// gap before `chunk` (unless it refuses gaps at once).
    async fn wait_for_gap(&self, chunk: &LogChunk, refuse_gaps: bool) {
        let waited = std::time::Instant::now();
        loop {
            let held = self
                .logs
                .lock()
                .unwrap()
                .logs
                .get(&chunk.attempt_id)
                .map_or(0, Vec::len) as u64;
            if chunk.offset <= held
                || refuse_gaps
                // The coordinator's GAP_WAIT: a loaded machine can take
                // well over 200 ms to append the stream before.
                || waited.elapsed() >= std::time::Duration::from_secs(5)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
}

impl LogState {
    /// Takes `chunk`, the one after `chunks` others on stream `number`, with
    /// the coordinator's rules (skip what is held, OUT_OF_RANGE past the
    /// end) and the faults the test asked for.
    fn take(&mut self, chunk: &LogChunk, number: usize, chunks: usize) -> Result<(), Status> {
        if chunk.runner_id != RUNNER_ID || chunk.runner_secret != SECRET {
            return Err(Status::unauthenticated("bad runner credential"));
        }
        if self.refuse_attempts {
            return Err(Status::permission_denied(format!(
                "runner {RUNNER_ID} reported on attempt {}, which is not assigned to it",
                chunk.attempt_id
            )));
        }
        if self.fail_after_chunks == Some(chunks) {
            self.fail_after_chunks = None;
            self.faults += 1;
            return Err(Status::unavailable("injected failure"));
        }
        if self.fail_stream == Some(number) && chunks == 1 {
            self.fail_stream = None;
            self.faults += 1;
            return Err(Status::unavailable("injected failure"));
        }
        let held = self.logs.get(&chunk.attempt_id).map_or(0, Vec::len) as u64;
        if chunk.offset > held {
            self.out_of_range_sent += 1;
            return Err(Status::out_of_range(format!("durable offset is {held}")));
        }
        let end = chunk.offset + chunk.data.len() as u64;
        if end > held {
            let skip = usize::try_from(held - chunk.offset).unwrap();
            let new = &chunk.data[skip..];
            self.appended += new.len() as u64;
            self.logs
                .entry(chunk.attempt_id.clone())
                .or_default()
                .extend_from_slice(new);
            self.steps
                .entry(chunk.attempt_id.clone())
                .or_default()
                .extend(std::iter::repeat_n(chunk.step_index, new.len()));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl RunnerService for FakeCoordinator {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        if request.get_ref().registration_token != TOKEN {
            return Err(Status::unauthenticated("bad registration token"));
        }
        Ok(Response::new(RegisterResponse {
            runner_id: RUNNER_ID.into(),
            runner_secret: SECRET.into(),
        }))
    }

    type ControlStream =
        Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send + 'static>>;

    async fn control(
        &self,
        request: Request<Streaming<RunnerMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no hello"))?;
        let _ = self.to_test.send(hello);
        let (tx, rx) = mpsc::channel(64);
        tx.send(Ok(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Welcome(Welcome {
                leader_epoch: 1,
                heartbeat_interval_ms: self.heartbeat_ms,
                idle_heartbeat_interval_ms: 5 * self.heartbeat_ms,
                lease_ms: 10 * self.heartbeat_ms,
                reattached: Vec::new(),
                acknowledged: Vec::new(),
                acks_heartbeats: self.acks_heartbeats.load(Ordering::SeqCst),
            })),
        }))
        .await
        .unwrap();
        // Weak: the stream ends once the test drops the sender (`end_stream`).
        let mine = tx.downgrade();
        *self.outbound.lock().unwrap() = Some(tx);
        let to_test = self.to_test.clone();
        let outbound = Arc::clone(&self.outbound);
        let acks = self.acks_heartbeats.load(Ordering::SeqCst);
        let muted = Arc::clone(&self.muted);
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let heartbeat = matches!(message.kind, Some(runner_message::Kind::Heartbeat(_)));
                if heartbeat
                    && acks
                    && !muted.load(Ordering::SeqCst)
                    && let Some(tx) = mine.upgrade()
                {
                    let ack = coordinator_message::Kind::HeartbeatAck(HeartbeatAck {});
                    let _ = tx.try_send(Ok(CoordinatorMessage { kind: Some(ack) }));
                }
                let _ = to_test.send(message);
            }
            // The runner ended its side: end ours, unless a newer stream
            // replaced it meanwhile.
            let mut current = outbound.lock().unwrap();
            let still_mine = mine
                .upgrade()
                .is_some_and(|mine| current.as_ref().is_some_and(|c| c.same_channel(&mine)));
            if still_mine {
                current.take();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn push_logs(
        &self,
        request: Request<Streaming<LogChunk>>,
    ) -> Result<Response<PushLogsAck>, Status> {
        let mut stream = request.into_inner();
        let mut touched = HashSet::new();
        let mut chunks = 0usize;
        let (number, chunk_delay, ack_delay, refuse_gaps) = {
            let mut st = self.logs.lock().unwrap();
            st.streams += 1;
            st.in_flight += 1;
            st.max_in_flight = st.max_in_flight.max(st.in_flight);
            (st.streams, st.chunk_delay, st.ack_delay, st.refuse_gaps)
        };
        // Counts the stream out however the call ends (also when dropped).
        struct InFlight<'a>(&'a Mutex<LogState>);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap().in_flight -= 1;
            }
        }
        let _in_flight = InFlight(&self.logs);
        while let Some(chunk) = stream.message().await? {
            if chunks == 0 {
                self.logs.lock().unwrap().stream_starts.push(chunk.offset);
            }
            if !chunk_delay.is_zero() {
                tokio::time::sleep(chunk_delay).await;
            }
            self.wait_for_gap(&chunk, refuse_gaps).await;
            self.logs.lock().unwrap().take(&chunk, number, chunks)?;
            chunks += 1;
            touched.insert(chunk.attempt_id);
        }
        if !ack_delay.is_zero() {
            // The coordinator's fsync.
            tokio::time::sleep(ack_delay).await;
        }
        let st = self.logs.lock().unwrap();
        let durable = touched
            .into_iter()
            .map(|id| {
                let len = st.logs.get(&id).map_or(0, Vec::len) as u64;
                (id, len)
            })
            .collect();
        Ok(Response::new(PushLogsAck { durable }))
    }
}
