//! End-to-end test harness: a [`TestCluster`] runs the real
//! `capstan-coordinator`, `capstan-runner` and `capstan` binaries as separate
//! processes talking gRPC over loopback, and hands back handles to kill,
//! restart and query them. The benchmarks (`capstan-bench`) use it too.
//!
//! The binaries are found next to the test executable's `deps/` directory
//! (`$CARGO_TARGET_DIR/debug/`), or in `$CAPSTAN_BIN_DIR`. Build them first:
//! `cargo build --workspace --bins` (the test command in the README does).
//!
//! Layout (each module may import the ones above it in this list):
//! - [`wait`]: the wait helpers (poll a probe under a deadline);
//! - [`process`]: [`Proc`], the one way to spawn, signal and stop a child
//!   process, with its output in `<dir>/<name>.log`;
//! - [`bins`], [`net`], [`runs`]: where the binaries are; free ports and a
//!   plain HTTP GET; reading a run's state;
//! - [`certs`]: test certificates (a CA, server and client certificates);
//! - [`etcd`]: a real etcd cluster;
//! - [`faults`]: a loopback TCP proxy that stalls (a partition with no
//!   RST), resumes or cuts the connections through it;
//! - [`fleet`]: a fleet in containers on a private network, and its faults;
//! - [`compose`]: the `deploy/compose` cluster, up and down by its scripts;
//! - [`cluster`]: [`TestCluster`] and its [`Builder`] (standalone, or
//!   replicas on etcd);
//! - [`forge_api`]: a recording stand-in for a forge's status API, and
//!   webhook deliveries as forges sign them;
//! - [`browser`]: headless Chromium over WebDriver (the dashboard's tests);
//! - [`git_server`], [`ssh_server`], [`otlp`], [`testbed`]: the outside
//!   systems tests talk to (a git smart-HTTP server, sshd, an OTLP
//!   receiver, the Docker test bed).

pub mod bins;
pub mod browser;
pub mod certs;
pub mod cluster;
pub mod compose;
pub mod etcd;
pub mod faults;
pub mod fleet;
pub mod forge_api;
pub mod git_server;
pub mod metrics;
pub mod net;
pub mod otlp;
pub mod process;
pub mod runs;
pub mod ssh_server;
pub mod testbed;
pub mod wait;

pub use bins::{bin, bin_dir};
pub use cluster::{Builder, Replica, TestCluster};
pub use net::{endpoint, free_port, http_get, https_get};
pub use process::{Proc, tail_logs, wait_exit};
pub use runs::{is_finished, run_state, task, task_state};
pub use wait::{eventually, poll_until};

pub use capstan_proto::api::v1::pipeline_service_client::PipelineServiceClient;
