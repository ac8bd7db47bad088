//! The agent's book of attempts and what it does with them: the attempts
//! holding a slot (with the confirm a tentative offer waits for), the
//! finished ones whose report awaits its acknowledgement (resent on every
//! new stream), the unconfirmed ones dropped when a stream ended (named in
//! the next hello), the step events kept while disconnected; offers,
//! confirms and cancels; and the [`Launcher`] that starts an accepted
//! offer's attempt task.
//!
//! Imports `connect` (for [`Conn`]), `attempt`, `workdir` and `logs`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use capstan_proto::ids::AttemptId;
use capstan_proto::runner::v1::{
    Cancel, ConfirmOffer, Offer, OfferAccepted, OfferRejected, StepStateChanged, TaskFinished,
    runner_message,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::connect::Conn;
use crate::RunnerConfig;
use crate::attempt::{self, AttemptEvent, AttemptSpec};
use crate::executor::Executor;
use crate::logs::LogTarget;
use crate::secrets::Secrets;
use crate::workdir::{WorkDir, valid_attempt_id};

/// An attempt holding one of this runner's slots.
struct Held {
    /// Stops the attempt (a `Cancel`, or the agent failing).
    cancel: CancellationToken,
    /// Set while a tentative offer waits for its `ConfirmOffer`: sending
    /// lets the attempt run; dropping it unsent drops the attempt (see the
    /// agent's module docs).
    confirm: Option<oneshot::Sender<()>>,
}

/// The attempts this runner knows of (see the module docs).
pub(super) struct Attempts {
    capacity: u32,
    running: HashMap<AttemptId, Held>,
    /// Unconfirmed attempts dropped when a stream ended, for the next hello
    /// (the coordinator requeues them without counting a failure).
    dropped: Vec<AttemptId>,
    /// Final reports not acknowledged yet.
    finished: BTreeMap<AttemptId, TaskFinished>,
    /// Step events that came while disconnected.
    pending_steps: VecDeque<StepStateChanged>,
    launcher: Launcher,
}

impl Attempts {
    pub(super) fn new(
        config: &RunnerConfig,
        work_dir: Arc<WorkDir>,
        executor: Arc<dyn Executor>,
        events: mpsc::UnboundedSender<AttemptEvent>,
    ) -> Self {
        Self {
            capacity: config.capacity,
            running: HashMap::new(),
            dropped: Vec::new(),
            finished: BTreeMap::new(),
            pending_steps: VecDeque::new(),
            launcher: Launcher {
                work_dir,
                executor,
                secrets: Arc::default(),
                mask: Arc::new(crate::logs::mask::patterns(std::slice::from_ref(
                    &config.registration_token,
                ))),
                own: vec![config.registration_token.clone()],
                git_credentials: config.git_credentials.clone(),
                git_author: config.git_author.clone(),
                step_log_cap: config.step_log_cap,
                log_memory: crate::logs::spool::budget_for(config.capacity),
                events,
                log_target: watch::Sender::new(None),
                tracker: TaskTracker::new(),
            },
        }
    }

    /// The runner's secrets: resolved for the steps that name them, and
    /// masked in every step's output.
    pub(super) fn set_secrets(&mut self, secrets: Arc<Secrets>) {
        self.launcher.secrets = secrets;
        self.launcher.remask();
    }

    /// The runner's own credential (its secret from `Register`): masked
    /// like a secret in the output of every attempt started from now on,
    /// next to the registration token, which always is.
    pub(super) fn mask_runner_secret(&mut self, runner_secret: &str) {
        if self.launcher.own.get(1).map(String::as_str) != Some(runner_secret) {
            self.launcher.own.truncate(1);
            self.launcher.own.push(runner_secret.to_owned());
            self.launcher.remask();
        }
    }

    /// Attempts holding a slot.
    pub(super) fn running(&self) -> usize {
        self.running.len()
    }

    /// Slots an offer could take now.
    pub(super) fn free_slots(&self) -> u32 {
        let running = u32::try_from(self.running.len()).unwrap_or(u32::MAX);
        self.capacity.saturating_sub(running)
    }

    /// No attempt runs and no report waits for its acknowledgement.
    pub(super) fn all_done(&self) -> bool {
        self.running.is_empty() && self.finished.is_empty()
    }

    /// What the hello lists as running: those holding a slot and those
    /// whose report is not acknowledged yet.
    pub(super) fn hello_attempts(&self) -> Vec<String> {
        self.running
            .keys()
            .chain(self.finished.keys())
            .map(ToString::to_string)
            .collect()
    }

    /// What the hello lists as dropped.
    pub(super) fn dropped(&self) -> Vec<String> {
        self.dropped.iter().map(ToString::to_string).collect()
    }

    /// A welcome answered a hello that listed the dropped ones.
    pub(super) fn clear_dropped(&mut self) {
        self.dropped.clear();
    }

    /// Drops every attempt still waiting for its `ConfirmOffer`: its task
    /// cleans up and ends without a report, and its slot is free now.
    pub(super) fn drop_unconfirmed(&mut self, why: &str) {
        let dropped = &mut self.dropped;
        self.running.retain(|id, held| {
            if held.confirm.is_some() {
                info!(attempt = %id, reason = why, "dropping an attempt whose offer was never confirmed; nothing of it ran");
                dropped.push(id.clone());
            }
            held.confirm.is_none()
        });
        self.count_slots();
    }

    /// Updates the slot gauges after `running` changed.
    fn count_slots(&self) {
        let busy = u32::try_from(self.running.len()).unwrap_or(u32::MAX);
        crate::metrics::get().slots(busy, self.capacity);
    }

    /// Stops every attempt (the agent is failing).
    pub(super) fn cancel_all(&self) {
        for held in self.running.values() {
            held.cancel.cancel();
        }
    }

    /// Waits for every attempt task to end.
    pub(super) async fn wait(&self) {
        self.launcher.tracker.close();
        self.launcher.tracker.wait().await;
    }

    /// Where attempts ship their logs from now on (after every welcome).
    pub(super) fn publish(&self, target: LogTarget) {
        self.launcher.log_target.send_replace(Some(target));
    }

    /// On a new stream: sends the step events kept while disconnected and
    /// every final report not acknowledged yet. False when the stream is
    /// gone.
    pub(super) async fn resend(&mut self, conn: &Conn) -> bool {
        while let Some(step) = self.pending_steps.pop_front() {
            if !conn.send(runner_message::Kind::Step(step)).await {
                return false;
            }
        }
        for report in self.finished.values() {
            if !conn
                .send(runner_message::Kind::Finished(report.clone()))
                .await
            {
                return false;
            }
        }
        true
    }

    /// Forgets the acknowledged reports and retires their log spools.
    pub(super) async fn forget_acknowledged(&mut self, ids: &[String]) {
        for id in ids {
            if self
                .finished
                .remove(&AttemptId::from_string(id.clone()))
                .is_some()
            {
                debug!(attempt = %id, "final report acknowledged");
                let work_dir = &self.launcher.work_dir;
                if let Err(e) = work_dir.retire_spool(id).await {
                    let spool = work_dir.spool_path(id);
                    warn!(path = %spool.display(), error = %e, "could not remove log spool");
                }
            }
        }
    }

    /// Handles an attempt's event; `conn` is `None` while disconnected.
    /// False when the stream is gone.
    pub(super) async fn on_event(&mut self, event: AttemptEvent, conn: Option<&Conn>) -> bool {
        match event {
            AttemptEvent::Step(step) => match conn {
                Some(conn) => conn.send(runner_message::Kind::Step(step)).await,
                None => {
                    self.pending_steps.push_back(step);
                    true
                }
            },
            AttemptEvent::Finished(report) => {
                let id = AttemptId::from_string(report.attempt_id.clone());
                self.running.remove(&id);
                self.count_slots();
                self.finished.insert(id.clone(), report);
                match conn {
                    Some(conn) => {
                        let report = self.finished[&id].clone();
                        conn.send(runner_message::Kind::Finished(report)).await
                    }
                    None => true,
                }
            }
        }
    }

    /// Accepts (and starts) or rejects an offer whose epoch is current.
    /// False when the stream is gone.
    pub(super) async fn offer(&mut self, offer: Offer, draining: bool, conn: &Conn) -> bool {
        let id = AttemptId::from_string(offer.attempt_id.clone());
        if self.running.contains_key(&id) {
            // A repeated offer of what already runs here: confirm it again.
            return conn.send(accept(&id)).await;
        }
        if let Some(reason) = self.refusal(&id, draining) {
            info!(attempt = %id, reason, "rejected offer");
            return conn
                .send(runner_message::Kind::Reject(OfferRejected {
                    attempt_id: id.into(),
                    reason: reason.to_owned(),
                }))
                .await;
        }
        if !conn.send(accept(&id)).await {
            return false;
        }
        info!(
            attempt = %id,
            run = %offer.run_id,
            task = %offer.task_name,
            attempt_number = offer.attempt_number,
            tentative = offer.tentative,
            "accepted offer"
        );
        let cancel = CancellationToken::new();
        let (confirm, confirmed) = if offer.tentative {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.running.insert(
            id,
            Held {
                cancel: cancel.clone(),
                confirm,
            },
        );
        self.count_slots();
        self.launcher.launch(offer, cancel, confirmed);
        true
    }

    /// Why an offer of `id`, not running here, is rejected, if it is.
    fn refusal(&self, id: &AttemptId, draining: bool) -> Option<&'static str> {
        let capacity = usize::try_from(self.capacity).unwrap_or(usize::MAX);
        if draining {
            Some("draining")
        } else if !valid_attempt_id(id.as_str()) {
            Some("invalid attempt id")
        } else if self.finished.contains_key(id) {
            Some("attempt already finished on this runner")
        } else if self.running.len() >= capacity {
            Some("no free slot")
        } else {
            None
        }
    }

    /// Lets a tentative offer's attempt run.
    pub(super) fn confirm(&mut self, confirm: ConfirmOffer) {
        let waiting = self
            .running
            .get_mut(&AttemptId::from_string(confirm.attempt_id.clone()))
            .and_then(|held| held.confirm.take());
        match waiting {
            Some(go) => {
                debug!(attempt = %confirm.attempt_id, "offer confirmed; starting the attempt");
                // Fails only if the attempt task is gone: it panicked while
                // preparing, and reported that itself.
                let _ = go.send(());
            }
            None => {
                debug!(attempt = %confirm.attempt_id, "confirm for an attempt not waiting for one here");
            }
        }
    }

    /// Stops an attempt; one still waiting for its confirm is dropped
    /// (nothing of it ran, nothing is reported).
    pub(super) fn cancel(&mut self, cancel: Cancel) {
        let id = AttemptId::from_string(cancel.attempt_id.clone());
        let Some(held) = self.running.get_mut(&id) else {
            debug!(attempt = %cancel.attempt_id, "cancel for an attempt not running here");
            return;
        };
        if held.confirm.is_some() {
            // It reports itself cancelled (nothing of it ran): the
            // coordinator keeps the attempt, and this runner's slot, until
            // it hears so. No longer waiting for a confirm, it outlives the
            // stream like any running attempt.
            info!(attempt = %cancel.attempt_id, reason = %cancel.reason, "cancelling an unconfirmed attempt; nothing of it ran");
            held.cancel.cancel();
            held.confirm = None;
        } else {
            info!(attempt = %cancel.attempt_id, reason = %cancel.reason, "cancelling attempt");
            held.cancel.cancel();
        }
    }
}

fn accept(id: &AttemptId) -> runner_message::Kind {
    runner_message::Kind::Accept(OfferAccepted {
        attempt_id: id.to_string(),
    })
}

/// What every attempt task is started with, and the tasks themselves.
struct Launcher {
    work_dir: Arc<WorkDir>,
    executor: Arc<dyn Executor>,
    secrets: Arc<Secrets>,
    /// Byte patterns masked in every step's output (from `secrets` and
    /// `own`).
    mask: Arc<Vec<Vec<u8>>>,
    /// The runner's own credentials: the registration token, then the
    /// runner secret once known.
    own: Vec<String>,
    git_credentials: Option<String>,
    git_author: crate::gitops::Author,
    step_log_cap: crate::logs::cap::StepLogCap,
    log_memory: u64,
    events: mpsc::UnboundedSender<AttemptEvent>,
    log_target: watch::Sender<Option<LogTarget>>,
    tracker: TaskTracker,
}

impl Launcher {
    fn remask(&mut self) {
        let mut values = self.secrets.values();
        values.extend(self.own.iter().cloned());
        self.mask = Arc::new(crate::logs::mask::patterns(&values));
    }

    /// Starts the attempt task of an accepted offer, in a span that joins
    /// the run's trace.
    fn launch(
        &self,
        offer: Offer,
        cancel: CancellationToken,
        confirmed: Option<oneshot::Receiver<()>>,
    ) {
        // `otel.name`: the exported span is called `attempt <task>`.
        let span = info_span!(
            "attempt",
            otel.name = %format!("attempt {}", offer.task_name),
            capstan.run.id = %offer.run_id,
            capstan.task = %offer.task_name,
            capstan.attempt.id = %offer.attempt_id,
            capstan.attempt.number = i64::from(offer.attempt_number),
            capstan.attempt.outcome = tracing::field::Empty,
        );
        // The coordinator's dispatch span (README "Tracing"): this attempt
        // joins the run's trace.
        capstan_telemetry::TraceHeaders {
            traceparent: offer.traceparent.clone(),
            tracestate: offer.tracestate.clone(),
        }
        .set_parent_of(&span);
        // A password in the run's repository URL is masked like a secret.
        let url_passwords = capstan_proto::redact::url_passwords(&offer.repo);
        let mask = if url_passwords.is_empty() {
            Arc::clone(&self.mask)
        } else {
            let mut patterns = (*self.mask).clone();
            patterns.extend(crate::logs::mask::patterns(&url_passwords));
            Arc::new(patterns)
        };
        let spec = AttemptSpec {
            offer,
            work_dir: Arc::clone(&self.work_dir),
            executor: Arc::clone(&self.executor),
            cancel,
            confirmed,
            events: self.events.clone(),
            log_target: self.log_target.subscribe(),
            secrets: Arc::clone(&self.secrets),
            mask,
            git_credentials: self.git_credentials.clone(),
            git_author: self.git_author.clone(),
            step_log_cap: self.step_log_cap,
            log_memory: self.log_memory,
        };
        self.tracker.spawn(attempt::run(spec).instrument(span));
    }
}
