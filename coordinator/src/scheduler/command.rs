//! What the API layer may ask of the scheduler loop ([`Command`]), and how
//! each answer comes back ([`Reply`]). The loop (`super`) applies them.

use super::lease;
use super::state::{self, RunnerTx, StateError};
use crate::model::*;
use capstan_proto::api::v1 as api;
use capstan_proto::ids::{AttemptId, RunId, RunnerId};
use capstan_proto::runner::v1 as rpb;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{oneshot, watch};

/// Where the scheduler sends a command's answer.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, StateError>>;

/// What an attempt's log looks like to a reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AttemptLogInfo {
    pub(crate) task: String,
    pub(crate) attempt: AttemptId,
    pub(crate) number: u32,
    /// The attempt ended; its log will not grow (beyond what the runner
    /// still flushes for a cancelled attempt).
    pub(crate) finished: bool,
}

/// A request to the scheduler loop.
pub(crate) enum Command {
    /// Refused beyond `quota` for the run's token.
    Submit {
        run: Box<RunRecord>,
        quota: crate::limits::Quota,
        reply: Reply<RunId>,
    },
    GetRun {
        id: RunId,
        reply: Reply<api::Run>,
    },
    /// The newest `limit + 1` held runs that match (`reads` merges them
    /// with the history's), and the seq the next submitted run gets.
    ListRuns {
        query: super::listing::RunQuery,
        reply: Reply<(Vec<RunRecord>, u64)>,
    },
    /// With `owner`, only a run that token submitted may be cancelled.
    CancelRun {
        id: RunId,
        owner: Option<String>,
        reply: Reply<api::Run>,
    },
    WatchRun {
        id: RunId,
        reply: Reply<watch::Receiver<api::Run>>,
    },
    /// Approve or reject a task at its gate, as the token `by` with `scope`.
    DecideApproval {
        id: RunId,
        decision: Box<state::Decide>,
        reply: Reply<api::Run>,
    },
    /// The attempts of a run's tasks (all tasks if `task` is None), in order.
    Attempts {
        id: RunId,
        task: Option<String>,
        reply: Reply<(Vec<AttemptLogInfo>, bool)>,
    },
    /// Refused for a name already registered unless `takeover` allows it.
    Register {
        name: String,
        takeover: state::Takeover,
        labels: BTreeMap<String, String>,
        capacity: u32,
        version: String,
        /// Its client certificate's subject, under mTLS.
        identity: Option<String>,
        /// One task, then gone; `Some(true)`: with its single-use token's
        /// labels, which no hello changes.
        ephemeral: Option<bool>,
        reply: Reply<(RunnerId, String)>,
    },
    /// Replies with the connection id and the lease its reader renews.
    Attach {
        hello: rpb::Hello,
        /// The connection's client certificate subject, under mTLS.
        identity: Option<String>,
        tx: RunnerTx,
        reply: Reply<(u64, Arc<lease::ConnLease>)>,
    },
    Detach {
        runner: RunnerId,
        conn: u64,
    },
    /// A message from a runner's Control stream. Heartbeats that change
    /// nothing are not sent (see [`lease`]).
    RunnerMessage {
        runner: RunnerId,
        conn: u64,
        kind: rpb::runner_message::Kind,
    },
    /// May `runner` (with `secret`) write the log of `attempt`?
    AuthorizeLog {
        ask: AttemptAsk,
        reply: Reply<()>,
    },
    /// [`Command::AuthorizeLog`], answering with the attempt's task spec
    /// and its run's repository (what the attempt may act on).
    AttemptTask {
        ask: AttemptAsk,
        reply: Reply<(capstan_proto::pipeline::v1::TaskSpec, String)>,
    },
    ListRunners {
        reply: Reply<Vec<api::Runner>>,
    },
    /// Queued and running tasks by label set, and the runners' free slots.
    Demand {
        reply: Reply<state::DemandSnapshot>,
    },
    Drain {
        runner: String,
        reply: Reply<api::Runner>,
    },
    Resume {
        runner: String,
        reply: Reply<api::Runner>,
    },
    /// The log store's attempts, listed at the start of the leadership:
    /// those no run names any more are deleted (see `orphan_logs`).
    OrphanLogs(Vec<AttemptId>),
    /// These settled runs are in the history now (`history::archiver`):
    /// the loop lets them go.
    Archived(Vec<RunId>),
}

/// A runner's claim to act for one of its attempts.
#[derive(Debug)]
pub(crate) struct AttemptAsk {
    pub(crate) runner: RunnerId,
    pub(crate) secret: String,
    /// The client certificate's subject under mTLS: it must be the one
    /// the runner registered with, as on its Control stream.
    pub(crate) identity: Option<String>,
    pub(crate) attempt: AttemptId,
}
