//! The scheduler: one task that owns all coordinator state.
//!
//! API handlers talk to it through [`SchedulerHandle`] (a channel of
//! [`Command`]s). The loop takes a batch of commands, applies them to
//! [`state::SchedulerState`], dispatches queued tasks, writes every changed
//! record through the [`Store`] in one atomic batch (group commit), and only
//! then delivers offers, cancels and replies. A failed write stops the
//! scheduler: memory would no longer match the store, so the process exits and
//! a restart loads the durable state.
//!
//! Offers to runners that confirm offers are the exception: they leave
//! before the write, tentative, and a `ConfirmOffer` for each follows the
//! write (see `commit`).
//!
//! Layout: the loop (here); `command` (what the API may ask of it, and
//! how it is answered); `commit` (the group commit:
//! what leaves before the write and what after); `state/` (the state
//! machine, composed of small owners); `dispatch` (which runner gets which
//! task); `lease` (a connection's lease, stamped off the loop); `view`
//! (records as the client API shows them). Doors: the API layer reaches
//! the loop only through [`SchedulerHandle`] (and a Control stream's reader
//! uses `lease`); the loop reaches the state only through
//! [`state::SchedulerState`]'s methods; `dispatch` and `view` are private.

mod command;
mod commit;
pub(crate) mod dispatch;
pub(crate) mod history;
pub(crate) mod lease;
pub(crate) mod listing;
mod reads;
pub(crate) mod state;
mod stored;
mod view;

use crate::logs::LogStore;
use crate::metrics::Metrics;
use crate::model::*;
use crate::store::{Store, StoreError};
use capstan_proto::api::v1 as api;
use capstan_proto::ids::{AttemptId, RunId, RunnerId};
pub(crate) use command::{AttemptAsk, AttemptLogInfo, Command, Reply};
use history::History;
use state::{SchedulerState, StateError, Timing};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The API side's way to reach the scheduler loop. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Command>,
    /// The finished runs the loop no longer holds (`reads`).
    history: History,
}

/// The scheduler loop stopped (shutdown or a fatal store error).
#[derive(Debug, thiserror::Error)]
#[error("the scheduler is not running (the coordinator is shutting down)")]
pub(crate) struct SchedulerGone;

impl SchedulerHandle {
    /// Sends a command built around a fresh reply channel and waits for the answer.
    pub(crate) async fn ask<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<Result<T, StateError>, SchedulerGone> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| SchedulerGone)?;
        rx.await.map_err(|_| SchedulerGone)
    }

    /// Sends a command that has no reply.
    pub(crate) fn tell(&self, cmd: Command) {
        let _ = self.tx.send(cmd);
    }
}

/// Loads the state from `store` for a leadership of `epoch` and returns the
/// loop (to run) and its handle.
pub(crate) async fn start(
    store: Arc<dyn Store>,
    logs: Arc<dyn LogStore>,
    timing: Timing,
    metrics: Arc<Metrics>,
    sealer: crate::seal::Sealer,
    epoch: u64,
) -> Result<(Scheduler, SchedulerHandle), StoreError> {
    let history = History::new(Arc::clone(&store), sealer.clone());
    let (mut runs, mut settled) = (Vec::new(), Vec::new());
    for (key, value) in store.scan_prefix(RUNS_PREFIX).await? {
        match stored::decode(&value, &sealer) {
            Ok(r) if r.is_settled() => settled.push(r),
            Ok(r) => runs.push(r),
            Err(e) => tracing::error!(%key, error = %e, "skipping an unreadable run record"),
        }
    }
    history.archive_found(&settled).await?;
    let next_seq = history.next_seq().await?;
    let mut runners = Vec::new();
    for (key, value) in store.scan_prefix(RUNNERS_PREFIX).await? {
        match serde_json::from_slice::<RunnerRecord>(&value) {
            Ok(r) => runners.push(r),
            Err(e) => tracing::error!(%key, error = %e, "skipping an unreadable runner record"),
        }
    }
    tracing::info!(
        epoch,
        runs = runs.len(),
        archived = settled.len(),
        runners = runners.len(),
        "scheduler state loaded"
    );
    let mut state = SchedulerState::load(epoch, timing, runs, runners, Instant::now());
    state.number_from(next_seq);
    metrics.runs_held.set(state.runs_held() as i64);
    let mut run_spans = crate::trace::RunSpans::default();
    if capstan_telemetry::enabled() {
        for run in state.runs() {
            run_spans.resumed(run, epoch);
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (archive, settled) = mpsc::unbounded_channel();
    {
        // Listed off the loop (a big log directory takes a while), judged
        // in it: orphans deleted, the ended runs' logs not yet sealed sealed.
        let (logs, tx) = (Arc::clone(&logs), tx.clone());
        tokio::spawn(async move {
            match logs.list().await {
                Ok(listed) => {
                    let _ = tx.send(Command::OrphanLogs(listed));
                }
                Err(e) => tracing::warn!(error = %e, "could not list the logs to sweep orphans"),
            }
        });
    }
    Ok((
        Scheduler {
            state,
            store,
            logs,
            rx,
            watchers: HashMap::new(),
            replies: Vec::new(),
            metrics,
            sealer,
            run_spans,
            history: history.clone(),
            archive,
            archiving: Default::default(),
            settled: Some(settled),
            loop_tx: tx.downgrade(),
        },
        SchedulerHandle { tx, history },
    ))
}

/// The scheduler loop; see the module docs.
pub(crate) struct Scheduler {
    state: SchedulerState,
    store: Arc<dyn Store>,
    /// Sealing ended runs' logs, deleting orphans, and retention's deletes.
    logs: Arc<dyn LogStore>,
    rx: mpsc::UnboundedReceiver<Command>,
    watchers: HashMap<RunId, watch::Sender<api::Run>>,
    replies: Vec<Box<dyn FnOnce() + Send>>,
    metrics: Arc<Metrics>,
    /// Seals the password of a run's repository URL in the stored record.
    sealer: crate::seal::Sealer,
    /// Trace spans of the unfinished runs (empty unless export is on).
    run_spans: crate::trace::RunSpans,
    /// The finished runs: the orphan-log sweep asks which attempts they name.
    history: History,
    /// Settled runs, to the archiver (`history::archiver`).
    archive: mpsc::UnboundedSender<RunRecord>,
    /// What the archiver has and has not answered for yet.
    archiving: std::collections::HashSet<RunId>,
    /// The archiver's end of `archive`, taken when the loop starts it.
    settled: Option<mpsc::UnboundedReceiver<RunRecord>>,
    /// The loop's own channel, for the archiver's answers (weak: the loop
    /// still ends when every handle is gone).
    loop_tx: mpsc::WeakUnboundedSender<Command>,
}

/// How long after its run ended an attempt's log is sealed: a reader that
/// was following it has read its end by then (a read is never refused, but
/// a sealed log costs a frame's decompression per read).
const SEAL_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// Most commands applied before one commit.
const MAX_BATCH: usize = 1024;

impl Scheduler {
    /// Runs until `shutdown` or a store failure.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let mut sweep = tokio::time::interval(std::time::Duration::from_millis(100));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Off the loop, and gone with them (an abort of this future included).
        let mut archiver = self.settled.take().map(|settled| {
            let archiver = history::archiver::run(
                self.history.clone(),
                settled,
                self.loop_tx.clone(),
                shutdown.clone(),
            );
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(archiver))
        });
        let _retention = self.state.timing().retention.map(|retention| {
            let task = history::retention::Retention {
                history: self.history.clone(),
                logs: Arc::clone(&self.logs),
                metrics: Arc::clone(&self.metrics),
                retention,
            };
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(task.run(shutdown.clone())))
        });
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                // It ends early only when its writes are fenced or it
                // panicked: settled runs would pile up in memory unseen.
                ended = async { archiver.as_mut().expect("guarded").await }, if archiver.is_some() => {
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    tracing::error!(?ended, "the archiver of finished runs stopped; stopping the scheduler");
                    return Err(StoreError::Write("the archiver of finished runs stopped".into()));
                }
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { return Ok(()) };
                    self.handle(cmd);
                    for _ in 1..MAX_BATCH {
                        match self.rx.try_recv() {
                            Ok(cmd) => self.handle(cmd),
                            Err(_) => break,
                        }
                    }
                }
                // Unconditional: a guard evaluated on every loop turn cost
                // O(runners) per heartbeat (measured: docs/decisions.md).
                _ = sweep.tick() => {
                    // Heartbeats already queued count before leases are
                    // judged: after a slow write they may be waiting here.
                    for _ in 0..MAX_BATCH {
                        match self.rx.try_recv() {
                            Ok(cmd) => self.handle(cmd),
                            Err(_) => break,
                        }
                    }
                    self.state.sweep(Instant::now());
                    self.metrics
                        .runners_connected
                        .set(self.state.connected_runners() as i64);
                }
            }
            self.state.dispatch(Instant::now());
            self.commit().await?;
            // The tasks the commit woke (runner streams carrying confirms
            // and offers, replies) run before this loop takes the next
            // batch: with redb its write would hold this thread, and them,
            // for another fsync.
            tokio::task::yield_now().await;
        }
    }

    fn reply<T: Send + 'static>(&mut self, to: Reply<T>, value: Result<T, StateError>) {
        self.replies.push(Box::new(move || {
            let _ = to.send(value);
        }));
    }

    /// Applies one command; what it answers goes after the next commit
    /// (through [`Scheduler::reply`]) unless it changes nothing (reads).
    /// Long because it is the one match over every command, so a reader sees
    /// them all in one place; each arm is a call or two.
    fn handle(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Submit { run, quota, reply } => self.submit(*run, &quota, reply),
            Command::GetRun { id, reply } => {
                let _ = reply.send(self.run_view(&id));
            }
            Command::ListRuns { query, reply } => {
                let newest = listing::newest(self.state.runs(), &query);
                let live = newest.into_iter().cloned().collect();
                let _ = reply.send(Ok((live, self.state.next_seq())));
            }
            Command::CancelRun { id, owner, reply } => {
                let r = self
                    .state
                    .cancel_run(&id, owner.as_deref())
                    .and_then(|()| self.run_view(&id));
                self.reply(reply, r);
            }
            Command::WatchRun { id, reply } => {
                let _ = reply.send(self.watch_run(id));
            }
            Command::DecideApproval {
                id,
                decision,
                reply,
            } => {
                let r = (self.state.decide(&id, &decision)).and_then(|()| self.run_view(&id));
                self.reply(reply, r);
            }
            Command::Attempts { id, task, reply } => {
                let _ = reply.send(self.attempts(&id, task.as_deref()));
            }
            Command::Register {
                name,
                takeover,
                labels,
                capacity,
                version,
                identity,
                ephemeral,
                reply,
            } => {
                let r = self.state.may_register(&name, &takeover).map(|()| {
                    let r = self.state.register(&name, labels, capacity, &version, now);
                    self.state.set_tls_identity(&r.0, identity);
                    if let Some(fixed_labels) = ephemeral {
                        self.state.set_ephemeral(&r.0, fixed_labels);
                    }
                    r
                });
                self.reply(reply, r);
            }
            Command::Attach {
                hello,
                identity,
                tx,
                reply,
            } => {
                let id = RunnerId::from_string(hello.runner_id.clone());
                let r = self
                    .state
                    .check_tls_identity(&id, identity.as_deref())
                    .and_then(|()| self.state.attach(hello, tx, now));
                self.reply(reply, r);
            }
            Command::Detach { runner, conn } => self.state.detach(&runner, conn, now),
            Command::RunnerMessage { runner, conn, kind } => {
                if let Err(e) = self.state.on_runner_message(&runner, conn, kind, now) {
                    tracing::warn!(%runner, error = %e, "refused a runner report");
                }
            }
            Command::AuthorizeLog { ask, reply } => {
                let _ = reply.send(self.check_attempt(&ask));
            }
            Command::AttemptTask { ask, reply } => {
                let _ = reply.send(self.attempt_task(&ask));
            }
            Command::ListRunners { reply } => {
                let _ = reply.send(Ok(self.list_runners()));
            }
            Command::Demand { reply } => {
                let _ = reply.send(Ok(self.state.demand()));
            }
            Command::Drain { runner, reply } => {
                let r = self.state.drain(&runner).map(|id| self.runner_view(&id));
                self.reply(reply, r);
            }
            Command::OrphanLogs(listed) => self.orphan_logs(listed),
            Command::Archived(ids) => self.archived(&ids, now),
            Command::Resume { runner, reply } => {
                let r = self.state.resume(&runner).map(|id| self.runner_view(&id));
                self.reply(reply, r);
            }
        }
    }

    /// The archiver moved these settled runs into the history: forget them.
    fn archived(&mut self, ids: &[RunId], now: Instant) {
        for id in ids {
            self.archiving.remove(id);
            self.watchers.remove(id);
        }
        self.state.evict_settled(ids, now);
        self.metrics.runs_held.set(self.state.runs_held() as i64);
    }

    /// Does `ask`'s runner (its secret, and its certificate under mTLS)
    /// hold the attempt, still live?
    fn check_attempt(&self, ask: &AttemptAsk) -> Result<(), StateError> {
        self.state.authenticate(&ask.runner, &ask.secret)?;
        self.state
            .check_tls_identity(&ask.runner, ask.identity.as_deref())?;
        self.state.log_writable(&ask.runner, &ask.attempt)
    }

    /// The task spec and run repository of the attempt, after
    /// [`Self::check_attempt`].
    fn attempt_task(
        &self,
        ask: &AttemptAsk,
    ) -> Result<(capstan_proto::pipeline::v1::TaskSpec, String), StateError> {
        self.check_attempt(ask)?;
        let (spec, repo) = self.state.attempt_task(&ask.attempt).unzip();
        Ok((
            spec.unwrap_or_default(),
            repo.unwrap_or_default().to_owned(),
        ))
    }

    fn submit(&mut self, run: RunRecord, quota: &crate::limits::Quota, reply: Reply<RunId>) {
        let (id, new) = match self.state.submit_within(run, quota) {
            Ok(submitted) => submitted,
            Err(e) => return self.reply(reply, Err(e)),
        };
        if new {
            self.metrics.runs_submitted.inc();
            if capstan_telemetry::enabled() {
                // Before the commit, so the record is stored with its trace context.
                let epoch = self.state.epoch();
                let spans = &mut self.run_spans;
                self.state
                    .annotate_run(&id, |run| spans.submitted(run, epoch));
            }
        }
        // A repeat is answered after the next commit too, so it
        // never names a run that is not yet durable.
        self.reply(reply, Ok(id));
    }

    /// A receiver of the run's view, updated after every commit that changes it.
    fn watch_run(&mut self, id: RunId) -> Result<watch::Receiver<api::Run>, StateError> {
        let view = self.run_view(&id)?;
        Ok(self
            .watchers
            .entry(id)
            .or_insert_with(|| watch::channel(view).0)
            .subscribe())
    }

    /// Every runner, by name.
    fn list_runners(&self) -> Vec<api::Runner> {
        let mut out: Vec<api::Runner> = self.state.runners().map(view::runner).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn runner_view(&self, id: &RunnerId) -> api::Runner {
        view::runner(self.state.runner(id).expect("found"))
    }

    fn run_view(&self, id: &RunId) -> Result<api::Run, StateError> {
        self.state
            .run(id)
            .map(view::run)
            .ok_or_else(|| StateError::UnknownRun(id.to_string()))
    }

    fn attempts(
        &self,
        id: &RunId,
        task: Option<&str>,
    ) -> Result<(Vec<AttemptLogInfo>, bool), StateError> {
        let run = self
            .state
            .run(id)
            .ok_or_else(|| StateError::UnknownRun(id.to_string()))?;
        reads::attempt_infos(run, task)
    }

    /// Deletes the logs of attempts no run names: retention deletes a run's
    /// record before its log files, so a crash in between leaves them
    /// behind. A log file is only ever made for an attempt the leader
    /// authorized, so every file listed at the start of this leadership
    /// belongs to an attempt of a run held here, of one in the history, or
    /// of one deleted with its run; the last are the ones deleted.
    ///
    /// The logs of runs that ended are sealed (a crash or a leader change
    /// may have come between a run's end and its seal; sealing a sealed log
    /// is a no-op).
    ///
    /// The history is read after this partition: a run this loop held
    /// when it judged was archived, if at all, by a commit before the read.
    fn orphan_logs(&mut self, listed: Vec<AttemptId>) {
        let (unknown, known): (Vec<AttemptId>, Vec<AttemptId>) = listed
            .into_iter()
            .partition(|a| !self.state.knows_attempt(a));
        let ended = known
            .into_iter()
            .filter(|a| self.state.attempt_run_ended(a))
            .collect();
        self.seal_logs(ended);
        if unknown.is_empty() {
            return;
        }
        let (history, logs, metrics) = (
            self.history.clone(),
            Arc::clone(&self.logs),
            Arc::clone(&self.metrics),
        );
        tokio::spawn(async move {
            let finished = match history.finished_attempts(&unknown).await {
                Ok(f) => f,
                Err(e) => {
                    return tracing::warn!(error = %e, "could not read the history to sweep orphan logs");
                }
            };
            let (archived, orphans): (Vec<AttemptId>, Vec<AttemptId>) =
                unknown.into_iter().partition(|a| finished.contains(a));
            if !orphans.is_empty() {
                tracing::info!(logs = orphans.len(), "deleting the logs of deleted runs");
            }
            delete_logs(&*logs, orphans).await;
            seal_now(&*logs, &metrics, archived).await;
        });
    }

    /// Seals these ended attempts' logs off the loop, [`SEAL_DELAY`] from
    /// now; a failure is logged (the next leadership tries again).
    fn seal_logs(&self, attempts: Vec<AttemptId>) {
        if attempts.is_empty() {
            return;
        }
        let (logs, metrics) = (Arc::clone(&self.logs), Arc::clone(&self.metrics));
        tokio::spawn(async move {
            tokio::time::sleep(SEAL_DELAY).await;
            seal_now(&*logs, &metrics, attempts).await;
        });
    }
}

/// Deletes these attempts' logs; a failure is logged (the next
/// leadership's orphan sweep tries again).
async fn delete_logs(logs: &dyn LogStore, attempts: Vec<AttemptId>) {
    for attempt in attempts {
        if let Err(e) = logs.delete(&attempt).await {
            tracing::warn!(%attempt, error = %e, "could not delete a log");
        }
    }
}

/// Seals these ended attempts' logs; a failure is logged (the next
/// leadership tries again).
async fn seal_now(logs: &dyn LogStore, metrics: &Metrics, attempts: Vec<AttemptId>) {
    for attempt in attempts {
        match logs.seal(&attempt).await {
            Ok(Some(stats)) => metrics.sealed(stats),
            Ok(None) => {}
            Err(e) => tracing::warn!(%attempt, error = %e, "could not seal a log"),
        }
    }
}

#[cfg(test)]
mod commit_tests;
#[cfg(test)]
mod tests;
