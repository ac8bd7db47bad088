//! A small in-process coordinator for the runner's own tests: `Register`
//! checks the token, `Control` hands every runner message to the test and
//! sends what the test pushes, `PushLogs` stores logs with the coordinator's
//! exactly-once rules (skip bytes already held, OUT_OF_RANGE on a gap) and
//! can inject faults.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use capstan_shared::proto::runner::v1::runner_service_client::RunnerServiceClient;
use capstan_shared::proto::runner::v1::runner_service_server::{
    RunnerService, RunnerServiceServer,
};
use capstan_shared::proto::runner::v1::{
    CoordinatorMessage, LogChunk, PushLogsAck, RegisterRequest, RegisterResponse, RunnerMessage,
    Welcome, coordinator_message,
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
    pub out_of_range_sent: usize,
    pub streams: usize,
}

type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

pub(crate) struct FakeCoordinator {
    pub logs: Mutex<LogState>,
    to_test: mpsc::UnboundedSender<RunnerMessage>,
    outbound: Arc<Mutex<Option<Outbound>>>,
    pub heartbeat_ms: u32,
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

    pub(crate) async fn client(&self) -> RunnerServiceClient<Channel> {
        RunnerServiceClient::connect(self.url()).await.unwrap()
    }

    /// Sends a message down the current Control stream.
    pub(crate) async fn send(&self, kind: coordinator_message::Kind) {
        let tx = self.coordinator.outbound.lock().unwrap().clone();
        tx.expect("no control stream")
            .send(Ok(CoordinatorMessage { kind: Some(kind) }))
            .await
            .unwrap();
    }
}

pub(crate) async fn start() -> Handle {
    let (to_test, from_runner) = mpsc::unbounded_channel();
    let coordinator = Arc::new(FakeCoordinator {
        logs: Mutex::new(LogState::default()),
        to_test,
        outbound: Arc::new(Mutex::new(None)),
        heartbeat_ms: 100,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = RunnerServiceServer::from_arc(Arc::clone(&coordinator));
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Handle {
        addr,
        coordinator,
        from_runner,
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
                lease_ms: 10 * self.heartbeat_ms,
                reattached: Vec::new(),
                acknowledged: Vec::new(),
            })),
        }))
        .await
        .unwrap();
        *self.outbound.lock().unwrap() = Some(tx);
        let to_test = self.to_test.clone();
        let outbound = Arc::clone(&self.outbound);
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let _ = to_test.send(message);
            }
            // The runner ended its side: end ours.
            outbound.lock().unwrap().take();
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
        self.logs.lock().unwrap().streams += 1;
        while let Some(chunk) = stream.message().await? {
            let mut st = self.logs.lock().unwrap();
            if chunk.runner_id != RUNNER_ID || chunk.runner_secret != SECRET {
                return Err(Status::unauthenticated("bad runner credential"));
            }
            if st.fail_after_chunks == Some(chunks) {
                st.fail_after_chunks = None;
                return Err(Status::unavailable("injected failure"));
            }
            chunks += 1;
            let held = st.logs.get(&chunk.attempt_id).map_or(0, Vec::len) as u64;
            if chunk.offset > held {
                st.out_of_range_sent += 1;
                return Err(Status::out_of_range(format!("durable offset is {held}")));
            }
            let end = chunk.offset + chunk.data.len() as u64;
            if end > held {
                let skip = usize::try_from(held - chunk.offset).unwrap();
                let new = &chunk.data[skip..];
                st.appended += new.len() as u64;
                st.logs
                    .entry(chunk.attempt_id.clone())
                    .or_default()
                    .extend_from_slice(new);
                st.steps
                    .entry(chunk.attempt_id.clone())
                    .or_default()
                    .extend(std::iter::repeat_n(chunk.step_index, new.len()));
            }
            touched.insert(chunk.attempt_id);
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
