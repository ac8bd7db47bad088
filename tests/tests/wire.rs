//! Issue 18, what reaches the coordinator's ports that is not a good call:
//! bytes that are no protobuf message are INVALID_ARGUMENT naming the
//! message (on the client API and on the runner service), over real
//! sockets to a real coordinator process.

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

async fn garbage_is_invalid_argument(c: &TestCluster) -> anyhow::Result<()> {
    let channel = c.admin_channel(&c.url()).await?;
    let status = unary(
        channel.clone(),
        "/capstan.api.v1.PipelineService/SubmitRun",
        TRUNCATED,
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        decode_error(
            "SubmitRunRequest",
            "SubmitRunRequest.pipeline_yaml: buffer underflow"
        ),
    );
    let status = unary(
        channel.clone(),
        "/capstan.api.v1.PipelineService/GetRun",
        BAD_WIRE_TYPE,
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        decode_error("GetRunRequest", "invalid wire type value: 7"),
    );

    // The runner service: no bearer token there (a runner has none).
    let runner = c.channel_to(&c.url()).await?;
    let status = unary(
        runner.clone(),
        "/capstan.runner.v1.RunnerService/Register",
        TRUNCATED,
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        decode_error(
            "RegisterRequest",
            "RegisterRequest.registration_token: buffer underflow"
        ),
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
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        decode_error("LogChunk", "invalid wire type value: 7"),
    );
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
