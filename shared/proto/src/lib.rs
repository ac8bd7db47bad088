//! Capstan's protocol: what every process says to another.
//!
//! - [`pipeline`], [`runner`], [`api`], [`cluster`]: the generated gRPC code
//!   for `proto/capstan/<package>/v1`, one module per proto package;
//! - [`codec`]: the servers' codec (decode errors are INVALID_ARGUMENT);
//! - [`ids`]: id newtypes (`RunId`, `AttemptId`, `RunnerId`, ...);
//! - [`leader`]: the `capstan-leader` hint a follower answers with;
//! - [`outputs`]: the budget of one task's outputs, which runner and
//!   coordinator both keep to;
//! - [`liveness`]: the timeouts both ends of a Control stream derive from
//!   the heartbeat interval (runner watchdog, leader's re-attach grace);
//! - [`render`]: state names, times and the `-o json` JSON of runs, tasks,
//!   runners and the cluster (the CLI's and the dashboard's);
//! - [`source`]: what a run's `--repo` and `--rev` may be (checked by the CLI,
//!   at submit and before the runner's checkout);
//! - [`units`]: memory sizes and durations as users write them, parsed once
//!   for pipeline files and daemon flags alike.
//!
//! Imports nothing of Capstan's; every other crate may import it.

pub mod codec;
pub mod ids;
pub mod labels;
pub mod leader;
pub mod liveness;
pub mod outputs;
pub mod redact;
pub mod render;
pub mod source;
pub mod units;

/// Version of the runner Connect protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
/// Default gRPC port.
pub const DEFAULT_GRPC_PORT: u16 = 7700;
/// Default HTTP side port.
pub const DEFAULT_HTTP_PORT: u16 = 7701;

/// `capstan.pipeline.v1`: the resolved task spec a runner is given.
#[allow(clippy::all, missing_docs)]
pub mod pipeline {
    pub mod v1 {
        tonic::include_proto!("capstan.pipeline.v1");
    }
}
/// `capstan.runner.v1`: registration, the Control stream, logs.
#[allow(clippy::all, missing_docs)]
pub mod runner {
    pub mod v1 {
        tonic::include_proto!("capstan.runner.v1");
        include!(concat!(env!("OUT_DIR"), "/servers/capstan.runner.v1.rs"));
    }
}
/// `capstan.api.v1`: the client API (submit, status, logs, runners).
#[allow(clippy::all, missing_docs)]
pub mod api {
    pub mod v1 {
        tonic::include_proto!("capstan.api.v1");
        include!(concat!(env!("OUT_DIR"), "/servers/capstan.api.v1.rs"));
    }
}
/// `capstan.cluster.v1`: the replicas and who leads.
#[allow(clippy::all, missing_docs)]
pub mod cluster {
    pub mod v1 {
        tonic::include_proto!("capstan.cluster.v1");
        include!(concat!(env!("OUT_DIR"), "/servers/capstan.cluster.v1.rs"));
    }
}
