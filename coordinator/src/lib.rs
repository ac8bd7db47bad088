//! The Capstan coordinator.
//!
//! Layout:
//! - `server`: [`run`] serves one replica: the store and the election, the
//!   gRPC server, the HTTP side port and the leadership loop;
//! - `api`: thin tonic handlers for the runner, pipeline and cluster services;
//! - `scheduler`: the single task that owns the state (runs, tasks,
//!   attempts, runners) and commits its changes; the state machine in
//!   `scheduler::state`, the matching of tasks to runners in
//!   `scheduler::dispatch`;
//! - [`store`]: durable key-value state (`memory`, `redb`, `etcd`);
//! - `election`: who leads (`standalone`, `etcd`);
//! - `logs`: durable task logs (`local`, `memory`) and `logs::feed` for live followers;
//! - `model`: the records the store holds;
//! - `http`: `/healthz`, `/readyz`, `/metrics`, with `metrics`; `demand`,
//!   the autoscalers' signal (`/api/v1/demand`, `capstan_demand_*`);
//!   `http_auth`, API tokens on the HTTP port;
//! - [`config`]: flags, environment and TOML;
//! - `tls`: the TLS listeners of both ports (handshakes off the accept loop);
//! - `trace`: the run's spans in its OpenTelemetry trace (off unless configured);
//! - `tokens`: API tokens in the store (make, look up, list, revoke); their
//!   check on each call is `api::auth`;
//! - `runner_tokens`: single-use registration tokens for ephemeral runners;
//! - [`admin`]: the binary's offline commands (`token create`);
//! - `forge`: repositories, push webhooks, commit statuses, schedules (issue 22).
//!
//! The facade: [`run`], [`CoordinatorConfig`], [`Timing`], and [`store`]
//! (the bench writes to a redb store; the end-to-end tests run the store
//! conformance suite, feature `testing`, on etcd).
//!
//! [`run`] serves on listeners the caller bound, so tests bind `127.0.0.1:0`.

pub mod admin;
pub(crate) mod api;
pub mod config;
pub(crate) mod dashboard;
pub(crate) mod demand;
pub(crate) mod election;
pub(crate) mod forge;
pub(crate) mod health;
pub(crate) mod http;
pub(crate) mod http_auth;
pub(crate) mod idle;
pub(crate) mod limits;
pub(crate) mod logs;
pub(crate) mod metrics;
pub(crate) mod model;
pub(crate) mod private;
pub(crate) mod runner_tokens;
pub(crate) mod scheduler;
pub(crate) mod seal;
mod server;
pub mod store;
pub(crate) mod tls;
pub(crate) mod tokens;
pub(crate) mod trace;

pub use config::{CoordinatorConfig, ForgeSettings, TlsSettings};
pub use limits::Limits;
pub use scheduler::state::Timing;
pub use server::run;
