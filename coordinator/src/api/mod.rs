//! Thin tonic handlers. Each unwraps its request, asks the scheduler (or the
//! log store) and maps errors to `tonic::Status` in one place ([`status`]).
//! Every client handler (pipeline, cluster, tokens) asks [`auth`] who calls
//! before anything else.

pub(crate) mod auth;
pub(crate) mod cluster;
pub(crate) mod pipeline;
pub(crate) mod pulls;
pub(crate) mod repos;
pub(crate) mod runner;
pub(crate) mod status;
pub(crate) mod tokens;

use crate::election::Election;
use crate::logs::LogStore;
use crate::logs::feed::LogFeed;
use crate::metrics::Metrics;
use crate::scheduler::{Command, Reply, SchedulerHandle};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What this replica is right now.
#[derive(Clone)]
pub(crate) enum Role {
    Follower,
    Leader(LeaderCtx),
}

/// Handles valid while this replica leads.
#[derive(Clone)]
pub(crate) struct LeaderCtx {
    pub(crate) scheduler: SchedulerHandle,
    /// Cancelled when the leadership ends: leader-only streams stop with it.
    pub(crate) token: CancellationToken,
    /// The log store, opened anew for each leadership: another replica may
    /// have appended to the shared directory meanwhile, so nothing cached by
    /// an earlier leadership of this replica can be trusted.
    pub(crate) logs: Arc<dyn LogStore>,
}

/// What every handler needs.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) role: tokio::sync::watch::Receiver<Role>,
    pub(crate) election: Arc<dyn Election>,
    pub(crate) feed: Arc<LogFeed>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) registration_token: Arc<str>,
    pub(crate) advertise: Arc<str>,
    /// The API tokens, in the same store as the state (every replica reads it).
    pub(crate) tokens: Arc<crate::tokens::Tokens>,
    /// Single-use registration tokens (ephemeral runners), same store.
    pub(crate) runner_tokens: Arc<crate::runner_tokens::RunnerTokens>,
    pub(crate) limits: crate::limits::Limits,
    /// Runners must present a client certificate (`--tls-client-ca`).
    pub(crate) mtls: Option<Mtls>,
}

/// The mTLS policy of the runner service.
#[derive(Clone, Debug)]
pub(crate) struct Mtls {
    /// What runners' certificates must chain to (`--tls-client-ca`).
    pub(crate) ca: Arc<capstan_tls::ClientCa>,
    /// The certificate must name the runner (`--tls-require-name-match`).
    pub(crate) require_name_match: bool,
}

impl LeaderCtx {
    /// Asks the scheduler; both ways it can fail become a `Status`.
    pub(crate) async fn ask<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, tonic::Status> {
        status::flatten(self.scheduler.ask(make).await)
    }
}

impl Shared {
    /// The caller of `req`, if its API token has at least `need` (see [`auth`]).
    pub(crate) async fn authorize<T>(
        &self,
        req: &tonic::Request<T>,
        need: crate::tokens::Scope,
    ) -> Result<auth::Caller, tonic::Status> {
        auth::authorize(&self.tokens, req, need).await
    }

    /// Asks the leader's scheduler, or answers as a follower does.
    pub(crate) async fn ask<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, tonic::Status> {
        self.leader().await?.ask(make).await
    }

    /// The leader's handles, or the UNAVAILABLE answer a follower gives:
    /// it names the leader in the `capstan-leader` metadata when it knows it.
    pub(crate) async fn leader(&self) -> Result<LeaderCtx, tonic::Status> {
        if let Role::Leader(ctx) = &*self.role.borrow() {
            return Ok(ctx.clone());
        }
        let info = self.election.leader().await.unwrap_or_default();
        let known = !info.endpoint.is_empty() && *info.endpoint != *self.advertise;
        let mut status = tonic::Status::unavailable(if known {
            format!(
                "this coordinator is not the leader; the leader is {}",
                info.endpoint
            )
        } else {
            "this coordinator is not the leader and no leader is elected yet; retry shortly"
                .to_string()
        });
        if known {
            capstan_proto::leader::add_hint(&mut status, &info.endpoint);
        }
        Err(status)
    }
}
