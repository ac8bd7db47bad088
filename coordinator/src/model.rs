//! The records the coordinator persists, one JSON document per key:
//!
//! - `runs/<run_id>`: a [`RunRecord`] with its tasks and their attempts;
//! - `runners/<runner_id>`: a [`RunnerRecord`];
//! - `meta/epoch`: the last leader epoch, as decimal text;
//! - `tokens/...` and `token-names/...`: API tokens, owned by `crate::tokens`
//!   (the scheduler never loads them).
//!
//! Which attempts a runner holds is not stored twice: it is derived from the
//! runs when the state is loaded.

use capstan_proto::ids::{AttemptId, RunId, RunnerId};
use capstan_proto::pipeline::v1::{RunState, TaskSpec, TaskState};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub(crate) const RUNS_PREFIX: &str = "runs/";
pub(crate) const RUNNERS_PREFIX: &str = "runners/";
pub(crate) const EPOCH_KEY: &str = "meta/epoch";

pub(crate) fn run_key(id: &RunId) -> String {
    format!("{RUNS_PREFIX}{id}")
}

pub(crate) fn runner_key(id: &RunnerId) -> String {
    format!("{RUNNERS_PREFIX}{id}")
}

/// Milliseconds since the Unix epoch, for display and ordering of records.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    pub(crate) id: RunId,
    pub(crate) pipeline: String,
    pub(crate) state: StoredRunState,
    pub(crate) priority: i32,
    /// Submission order, for FIFO within a priority.
    pub(crate) seq: u64,
    pub(crate) created_at_ms: i64,
    pub(crate) finished_at_ms: i64,
    pub(crate) repo: String,
    pub(crate) rev: String,
    pub(crate) cancel_requested: bool,
    pub(crate) tasks: Vec<TaskRecord>,
    /// The submitter's key for safe retries (see `SubmitRunRequest`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) idempotency_key: String,
    /// W3C trace context of the run's root span (empty: not traced), kept
    /// with the run so that whichever leader dispatches its tasks continues
    /// the same trace. Before the scheduler accepts the run it holds the
    /// submitter's context, if the request carried one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) traceparent: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) tracestate: String,
    /// Stored records only: the sealed password of `repo`, whose URL then
    /// has `***` in its place (`scheduler/stored.rs`). Empty in memory once
    /// opened.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) repo_password: String,
    /// The `run` span's ids in `traceparent` were chosen by the scheduler
    /// (export on at submit): the leader that ends the run emits it. False:
    /// `traceparent` is the submitter's own context, or the record predates
    /// spans emitted at the end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) run_span: bool,
    /// The submitter's span (16 hex digits), the `run` span's parent; empty:
    /// the run span is a root. The span is emitted when the run ends.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) parent_span_id: String,
    /// Name of the API token that submitted the run (empty: stored before
    /// tokens existed). A `submit` token may cancel only its own runs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) submitted_by: String,
    /// The pipeline's `concurrency:` group, resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<RunGroup>,
    /// Waiting for the run in progress of its group: no task is queued yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) held: bool,
}

impl RunRecord {
    /// Finished, with no attempt still active (a cancel its runner has not
    /// confirmed keeps a run going): nothing will change it any more.
    pub(crate) fn is_settled(&self) -> bool {
        self.state.is_terminal()
            && self
                .tasks
                .iter()
                .flat_map(|t| &t.attempts)
                .all(|a| !a.state.is_active())
    }
}

/// A run's concurrency group: one run of a group at a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunGroup {
    pub(crate) name: String,
    /// A new run cancels the group's unfinished ones instead of waiting.
    pub(crate) cancel_in_progress: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct TaskRecord {
    pub(crate) name: String,
    /// Indexes into the run's `tasks`.
    pub(crate) needs: Vec<usize>,
    /// The resolved task, prost-encoded (hex) so the wire type is the one source of truth.
    #[serde(with = "spec_hex")]
    pub(crate) spec: TaskSpec,
    pub(crate) state: StoredTaskState,
    /// Script-failure retries the pipeline allows.
    pub(crate) retries: u32,
    pub(crate) script_failures: u32,
    pub(crate) infra_failures: u32,
    pub(crate) attempts: Vec<AttemptRecord>,
    pub(crate) message: String,
    pub(crate) exit_code: Option<i32>,
    /// What the succeeded attempt reported (pushed digest, commit, ...).
    #[serde(default)]
    pub(crate) outputs: BTreeMap<String, String>,
    pub(crate) queued_at_ms: i64,
    pub(crate) started_at_ms: i64,
    pub(crate) finished_at_ms: i64,
    /// While an infrastructure retry waits out its backoff: when it is
    /// queued for a runner (0: not waiting).
    #[serde(default)]
    pub(crate) retry_at_ms: i64,
    /// Its `approval:` gate, if it has one (`scheduler::state::approvals`).
    #[serde(default)]
    pub(crate) approval: Option<ApprovalRecord>,
    /// Its `if:` with the submit's values folded in: only task states
    /// are left to read (`scheduler::state::conditions`).
    #[serde(default)]
    pub(crate) condition: Option<String>,
    /// `finally: true`: ready once its needs have ended in any state; not
    /// counted for the run's state.
    #[serde(default)]
    pub(crate) finally: bool,
    /// Skipped with nothing failed: by its `if:`, or because a task it
    /// needs was (such a skip fails no run).
    #[serde(default)]
    pub(crate) benign_skip: bool,
}

/// A task's approval gate as stored: what it asks, and what was decided.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ApprovalRecord {
    pub(crate) prompt: String,
    /// The token scopes that may decide (an admin token always may).
    pub(crate) by: Vec<String>,
    /// 0: no timeout.
    pub(crate) timeout_ms: i64,
    /// When the task reached the gate (its needs all succeeded); 0: not yet.
    pub(crate) asked_at_ms: i64,
    pub(crate) decision: Option<Decision>,
}

/// Who decided a gate, how and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Decision {
    pub(crate) approved: bool,
    /// The token's name, or `timeout`.
    pub(crate) by: String,
    pub(crate) at_ms: i64,
    pub(crate) reason: String,
}

impl ApprovalRecord {
    /// Waiting at the gate for a decision.
    pub(crate) fn pending(&self) -> bool {
        self.asked_at_ms > 0 && self.decision.is_none()
    }
}

impl TaskRecord {
    pub(crate) fn current_attempt(&self) -> Option<&AttemptRecord> {
        self.attempts.last()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct AttemptRecord {
    pub(crate) id: AttemptId,
    pub(crate) number: u32,
    pub(crate) runner: RunnerId,
    pub(crate) runner_name: String,
    pub(crate) state: AttemptState,
    pub(crate) offered_at_ms: i64,
    pub(crate) started_at_ms: i64,
    pub(crate) finished_at_ms: i64,
    pub(crate) log_length: u64,
}

/// Where one attempt is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AttemptState {
    Offered,
    Running,
    /// The coordinator asked the runner to stop it; the slot stays taken
    /// until the runner reports or its lease runs out.
    Cancelling,
    Succeeded,
    Failed,
    Cancelled,
    /// Ended by the infrastructure: runner lost, offer expired or rejected,
    /// executor error.
    Lost,
}

impl AttemptState {
    /// The attempt holds a slot on its runner.
    pub(crate) fn is_active(self) -> bool {
        matches!(self, Self::Offered | Self::Running | Self::Cancelling)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StoredRunState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl StoredRunState {
    pub(crate) fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl From<StoredRunState> for RunState {
    fn from(s: StoredRunState) -> Self {
        match s {
            StoredRunState::Queued => RunState::Queued,
            StoredRunState::Running => RunState::Running,
            StoredRunState::Succeeded => RunState::Succeeded,
            StoredRunState::Failed => RunState::Failed,
            StoredRunState::Cancelled => RunState::Cancelled,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StoredTaskState {
    Waiting,
    Queued,
    Offered,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Skipped,
}

impl StoredTaskState {
    pub(crate) fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Skipped
        )
    }
}

impl From<StoredTaskState> for TaskState {
    fn from(s: StoredTaskState) -> Self {
        match s {
            StoredTaskState::Waiting => TaskState::Waiting,
            StoredTaskState::Queued => TaskState::Queued,
            StoredTaskState::Offered => TaskState::Offered,
            StoredTaskState::Running => TaskState::Running,
            StoredTaskState::Succeeded => TaskState::Succeeded,
            StoredTaskState::Failed => TaskState::Failed,
            StoredTaskState::Cancelled => TaskState::Cancelled,
            StoredTaskState::Skipped => TaskState::Skipped,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RunnerRecord {
    pub(crate) id: RunnerId,
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) capacity: u32,
    /// SHA-256 of the runner secret, hex. The secret itself is never stored.
    pub(crate) secret_hash: String,
    pub(crate) version: String,
    pub(crate) draining: bool,
    pub(crate) registered_at_ms: i64,
    /// The subject (CN, else first DNS SAN) of the client certificate it
    /// registered with under mTLS (`--tls-client-ca`); its Control
    /// streams must present the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_identity: Option<String>,
    /// Takes one task and leaves (`--ephemeral`, or a single-use token):
    /// offered nothing once `spent`, deleted when it goes away or is lost.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) ephemeral: bool,
    /// Its labels came from its single-use token: a hello cannot change them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) fixed_labels: bool,
    /// An ephemeral runner accepted its one task.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) spent: bool,
}

mod spec_hex {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(spec: &TaskSpec, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(spec.encode_to_vec()))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TaskSpec, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        TaskSpec::decode(bytes.as_slice()).map_err(serde::de::Error::custom)
    }
}

/// SHA-256 of a secret, hex-encoded.
pub(crate) fn hash_secret(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// Does `secret` hash to `hash` (hex)? Constant time, the length of the
/// secret included: both sides are fixed-length hashes when compared.
pub(crate) fn secret_matches(hash: &str, secret: &str) -> bool {
    use subtle::ConstantTimeEq;
    hash_secret(secret).as_bytes().ct_eq(hash.as_bytes()).into()
}

/// Are two secrets equal? Constant time, the lengths included (each is
/// hashed first, so the comparison is always of 64 bytes).
pub(crate) fn secrets_equal(a: &str, b: &str) -> bool {
    secret_matches(&hash_secret(b), a)
}
