//! Issue 18, what reaches the coordinator's ports that is not a good call:
//! bytes that are no protobuf message are INVALID_ARGUMENT naming the
//! message (on the client API and on the runner service), and connections
//! that say nothing (or stop halfway through a handshake) are closed after
//! `--idle-timeout`, on both ports, plaintext and TLS, while live clients
//! keep theirs; over real sockets to real coordinator processes.

use bytes::{Buf, BufMut};
use capstan_tests::*;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// A codec that sends its bytes as they are and reads any reply as bytes:
/// a gRPC call whose message is whatever the test says.
#[derive(Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// Field 1, length-delimited, claiming 100 bytes it does not have.
const TRUNCATED: &[u8] = &[0x0a, 100, b'x'];
/// A field with wire type 7, which does not exist.
const BAD_WIRE_TYPE: &[u8] = &[0x0f, 0x00];

fn decode_error(message: &str, prost: &str) -> String {
    format!(
        "the request is not a valid {message} message (failed to decode Protobuf message: \
         {prost}); send the protobuf message the RPC takes (proto/capstan/)"
    )
}

/// A unary call of `path` with `body` on `channel`: its status.
async fn unary<T>(channel: T, path: &'static str, body: &[u8]) -> tonic::Status
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        panic!("the channel to the coordinator is not ready");
    }
    let uri = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    match grpc
        .unary(tonic::Request::new(body.to_vec()), uri, Raw)
        .await
    {
        Ok(reply) => panic!("{path} took garbage and answered {:?}", reply.into_inner()),
        Err(status) => status,
    }
}

/// `status` is INVALID_ARGUMENT with the decode error of `message` and
/// its `cause`.
fn assert_invalid(status: tonic::Status, message: &str, cause: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), decode_error(message, cause));
}

async fn garbage_is_invalid_argument(c: &TestCluster) -> anyhow::Result<()> {
    let channel = c.admin_channel(&c.url()).await?;
    assert_invalid(
        unary(
            channel.clone(),
            "/capstan.api.v1.PipelineService/SubmitRun",
            TRUNCATED,
        )
        .await,
        "SubmitRunRequest",
        "SubmitRunRequest.pipeline_yaml: buffer underflow",
    );
    assert_invalid(
        unary(
            channel.clone(),
            "/capstan.api.v1.PipelineService/GetRun",
            BAD_WIRE_TYPE,
        )
        .await,
        "GetRunRequest",
        "invalid wire type value: 7",
    );

    // The runner service: no bearer token there (a runner has none).
    let runner = c.channel_to(&c.url()).await?;
    assert_invalid(
        unary(
            runner.clone(),
            "/capstan.runner.v1.RunnerService/Register",
            TRUNCATED,
        )
        .await,
        "RegisterRequest",
        "RegisterRequest.registration_token: buffer underflow",
    );
    // A stream: its first message does not decode.
    let mut grpc = tonic::client::Grpc::new(runner);
    grpc.ready().await?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/capstan.runner.v1.RunnerService/PushLogs",
    );
    let chunks = tokio_stream::iter([BAD_WIRE_TYPE.to_vec()]);
    let status = grpc
        .client_streaming(tonic::Request::new(chunks), path, Raw)
        .await
        .expect_err("PushLogs took garbage");
    assert_invalid(status, "LogChunk", "invalid wire type value: 7");
    // And the coordinator still serves a good call.
    let out = c.cli(&["runners"]);
    assert!(out.status.success(), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_messages_are_invalid_argument_in_plaintext_and_over_tls() -> anyhow::Result<()> {
    let plain = TestCluster::builder().runners(0).start().await?;
    garbage_is_invalid_argument(&plain).await?;
    let tls = TestCluster::builder().runners(0).tls().start().await?;
    garbage_is_invalid_argument(&tls).await
}

/// How long the server took to close `sock` (read 0 or an error), which
/// sent `first` and then nothing (with `first`); panics past `limit`.
async fn closed_within(
    mut sock: tokio::net::TcpStream,
    first: &[u8],
    limit: std::time::Duration,
) -> (Vec<u8>, std::time::Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    sock.write_all(first).await.expect("write the first bytes");
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            sock.read(&mut buf),
        )
        .await
        {
            Err(_) => panic!(
                "a connection to {:?} that sent {first:?} is still open after {limit:?}",
                sock.peer_addr()
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (first.to_vec(), started.elapsed()),
            // The server's own preface or an alert; keep reading until it closes.
            Ok(Ok(_)) => {}
        }
    }
}

/// What a stalled client sends first on the gRPC and the HTTP port
/// (plaintext, TLS): nothing, or the start of what the port speaks (half
/// an HTTP/2 preface or an HTTP/1 request, half a TLS ClientHello).
/// Bytes the port does not speak are refused at once, not stalls.
fn stalls(tls: bool) -> [[&'static [u8]; 2]; 2] {
    const HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    if tls {
        [[b"", HELLO], [b"", HELLO]]
    } else {
        [
            [b"", b"PRI * HTTP/2.0\r\n"],
            [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"],
        ]
    }
}

async fn silent_connections_are_closed(c: &TestCluster) -> anyhow::Result<()> {
    let r = &c.replicas[0];
    // Many silent sockets on both ports...
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(tokio::net::TcpStream::connect(r.grpc).await?);
        silent.push(tokio::net::TcpStream::connect(r.http).await?);
    }
    // ...do not stop a client.
    let out = c.cli(&["runners"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(c.http_get("/healthz")?.0, 200);
    let limit = std::time::Duration::from_secs(6);
    let mut waits = Vec::new();
    for (addr, firsts) in [r.grpc, r.http].into_iter().zip(stalls(r.tls)) {
        for first in firsts {
            let sock = tokio::net::TcpStream::connect(addr).await?;
            waits.push(tokio::spawn(async move {
                closed_within(sock, first, limit).await
            }));
        }
    }
    for sock in silent.drain(..) {
        waits.push(tokio::spawn(async move {
            closed_within(sock, b"", limit).await
        }));
    }
    for w in waits {
        let (first, took) = w.await?;
        // --idle-timeout 2s: not before it (the bound is the peer's silence).
        assert!(
            took >= std::time::Duration::from_millis(1500),
            "a connection that sent {first:?} was closed after {took:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_connections_are_closed_on_both_ports_and_live_ones_are_not() -> anyhow::Result<()> {
    let args = ["--idle-timeout", "2s"];
    let plain = TestCluster::builder()
        .runners(1)
        .coordinator_args(&args)
        .start()
        .await?;
    silent_connections_are_closed(&plain).await?;
    let tls = TestCluster::builder()
        .runners(1)
        .coordinator_args(&args)
        .tls()
        .start()
        .await?;
    silent_connections_are_closed(&tls).await?;
    // The runners' Control streams (idle: a heartbeat every 5 s, beyond the
    // 2 s bound) were kept alive by the server's pings: attached once.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    for c in [&plain, &tls] {
        let logs = c.all_logs();
        assert_eq!(logs.matches("runner attached").count(), 1, "{logs}");
    }
    Ok(())
}
