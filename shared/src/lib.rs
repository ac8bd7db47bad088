//! Code shared by every Capstan process.
//!
//! - [`proto`]: the generated gRPC code for `proto/capstan/...`.
//! - [`ids`]: id newtypes (`RunId`, `AttemptId`, `RunnerId`).
//! - [`pipeline`]: the pipeline file model, parser, validator and substitution.
//! - [`client`]: the client used by the CLI: connects, follows the leader, maps errors.
pub mod client;
pub mod ids;
pub mod pipeline;
pub mod proto;

/// Version of the runner Connect protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
/// Default gRPC port.
pub const DEFAULT_GRPC_PORT: u16 = 7700;
/// Default HTTP side port.
pub const DEFAULT_HTTP_PORT: u16 = 7701;
