//! The records the coordinator persists, one JSON document per key:
//!
//! - `runs/<run_id>`: a [`RunRecord`] with its tasks and their attempts;
//! - `runners/<runner_id>`: a [`RunnerRecord`];
//! - `meta/epoch`: the last leader epoch, as decimal text.
//!
//! Which attempts a runner holds is not stored twice: it is derived from the
//! runs when the state is loaded.

use capstan_proto::ids::{AttemptId, RunId, RunnerId};
use capstan_proto::pipeline::v1::{RunState, TaskSpec, TaskState};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const RUNS_PREFIX: &str = "runs/";
pub const RUNNERS_PREFIX: &str = "runners/";
pub const EPOCH_KEY: &str = "meta/epoch";

pub fn run_key(id: &RunId) -> String {
    format!("{RUNS_PREFIX}{id}")
}

pub fn runner_key(id: &RunnerId) -> String {
    format!("{RUNNERS_PREFIX}{id}")
}

/// Milliseconds since the Unix epoch, for display and ordering of records.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: RunId,
    pub pipeline: String,
    pub state: StoredRunState,
    pub priority: i32,
    /// Submission order, for FIFO within a priority.
    pub seq: u64,
    pub created_at_ms: i64,
    pub finished_at_ms: i64,
    pub repo: String,
    pub rev: String,
    pub cancel_requested: bool,
    pub tasks: Vec<TaskRecord>,
    /// The submitter's key for safe retries (see `SubmitRunRequest`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub idempotency_key: String,
    /// W3C trace context of the run's root span (empty: not traced), kept
    /// with the run so that whichever leader dispatches its tasks continues
    /// the same trace. Before the scheduler accepts the run it holds the
    /// submitter's context, if the request carried one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tracestate: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskRecord {
    pub name: String,
    /// Indexes into the run's `tasks`.
    pub needs: Vec<usize>,
    /// The resolved task, prost-encoded (hex) so the wire type is the one source of truth.
    #[serde(with = "spec_hex")]
    pub spec: TaskSpec,
    pub state: StoredTaskState,
    /// Script-failure retries the pipeline allows.
    pub retries: u32,
    pub script_failures: u32,
    pub infra_failures: u32,
    pub attempts: Vec<AttemptRecord>,
    pub message: String,
    pub exit_code: Option<i32>,
    /// What the succeeded attempt reported (pushed digest, commit, ...).
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    pub queued_at_ms: i64,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
}

impl TaskRecord {
    pub fn current_attempt(&self) -> Option<&AttemptRecord> {
        self.attempts.last()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub id: AttemptId,
    pub number: u32,
    pub runner: RunnerId,
    pub runner_name: String,
    pub state: AttemptState,
    pub offered_at_ms: i64,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    pub log_length: u64,
}

/// Where one attempt is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptState {
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
    pub fn is_active(self) -> bool {
        matches!(self, Self::Offered | Self::Running | Self::Cancelling)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoredRunState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl StoredRunState {
    pub fn is_terminal(self) -> bool {
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
pub enum StoredTaskState {
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
    pub fn is_terminal(self) -> bool {
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
pub struct RunnerRecord {
    pub id: RunnerId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: u32,
    /// SHA-256 of the runner secret, hex. The secret itself is never stored.
    pub secret_hash: String,
    pub version: String,
    pub draining: bool,
    pub registered_at_ms: i64,
}

mod spec_hex {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(spec: &TaskSpec, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(spec.encode_to_vec()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TaskSpec, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        TaskSpec::decode(bytes.as_slice()).map_err(serde::de::Error::custom)
    }
}

/// SHA-256 of a secret, hex-encoded.
pub fn hash_secret(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}
