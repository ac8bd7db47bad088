//! How tasks and runs ended, and why attempts were run again: what the
//! transitions record for the outcome metrics (`capstan_tasks_finished_total`,
//! `capstan_runs_finished_total`, `capstan_task_requeues_total`,
//! `capstan_task_retries_total`). Each value is a bounded label value: no
//! ids, no names.

use super::LossReason;

/// How a task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TaskOutcome {
    Succeeded,
    /// Its script failed (non-zero exit, or a timeout) with no retry left.
    Failed,
    /// The infrastructure failed it (runner lost, checkout, image, engine)
    /// more often than the retry limit allows.
    InfraFailed,
    Cancelled,
    /// A task it needs did not succeed; it never ran.
    Skipped,
}

impl TaskOutcome {
    pub(crate) const ALL: [Self; 5] = [
        Self::Succeeded,
        Self::Failed,
        Self::InfraFailed,
        Self::Cancelled,
        Self::Skipped,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            TaskOutcome::Succeeded => "succeeded",
            TaskOutcome::Failed => "failed",
            TaskOutcome::InfraFailed => "infra_failed",
            TaskOutcome::Cancelled => "cancelled",
            TaskOutcome::Skipped => "skipped",
        }
    }
}

/// How a run ended: its state, with a failed run whose failure is the
/// infrastructure's (a task gave up after infrastructure failures) told
/// apart as `infra_failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunOutcome {
    Succeeded,
    Failed,
    InfraFailed,
    Cancelled,
}

impl RunOutcome {
    pub(crate) const ALL: [Self; 4] = [
        Self::Succeeded,
        Self::Failed,
        Self::InfraFailed,
        Self::Cancelled,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            RunOutcome::Succeeded => "succeeded",
            RunOutcome::Failed => "failed",
            RunOutcome::InfraFailed => "infra_failed",
            RunOutcome::Cancelled => "cancelled",
        }
    }
}

/// Why a task is run again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryClass {
    /// Its script failed and the pipeline allows `retries`.
    Script,
    /// The infrastructure failed it (an executor error reported by the
    /// runner, or the runner lost).
    Infra,
}

impl RetryClass {
    pub(crate) const ALL: [Self; 2] = [Self::Script, Self::Infra];

    pub(crate) fn label(self) -> &'static str {
        match self {
            RetryClass::Script => "script",
            RetryClass::Infra => "infra",
        }
    }
}

impl LossReason {
    pub(crate) const ALL: [Self; 4] = [
        Self::RunnerLost,
        Self::OfferExpired,
        Self::OfferRejected,
        Self::OfferDropped,
    ];

    /// The `reason` of `capstan_task_requeues_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            LossReason::RunnerLost => "runner_lost",
            LossReason::OfferExpired => "offer_timeout",
            LossReason::OfferRejected => "offer_rejected",
            LossReason::OfferDropped => "offer_dropped",
        }
    }
}

/// An attempt that ended without a report and was queued again.
pub(crate) struct Requeue {
    pub(crate) why: LossReason,
    pub(crate) run: capstan_proto::ids::RunId,
    pub(crate) task: String,
    /// The attempt's number.
    pub(crate) attempt: u32,
}

/// What a batch of transitions tallied, read by the commit's metrics.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) tasks: Vec<TaskOutcome>,
    /// Run times in seconds of the tasks that ended on a runner's report.
    pub(crate) task_seconds: Vec<f64>,
    pub(crate) runs: Vec<RunOutcome>,
    pub(crate) requeues: Vec<Requeue>,
    pub(crate) retries: Vec<RetryClass>,
}
