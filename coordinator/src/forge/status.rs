//! Commit statuses back to the forge.
//!
//! A run started by a push owes its commit a status at each change of its
//! state: `forge-status/<run id>` in the store records what is owed (repo,
//! SHA, context) and what was last posted, so a new leader resumes the
//! watch where the old one stopped ([`resume`]). Each run's watch is its
//! own task beside the scheduler (it asks `WatchRun` like any client):
//! a forge that is down or slow delays only its statuses, never a run.
//!
//! A POST that fails (no answer within the timeout, 429 or 5xx) is retried
//! with exponential backoff, [`ATTEMPTS`] times in all; then the status is
//! given up with a log line. A 4xx (a bad token, an unknown repository) is
//! not retried.

use super::client::{Answer, post_json, snippet};
use super::repos::RepoRecord;
use super::{Forge, Forges};
use crate::api::LeaderCtx;
use crate::metrics::StatusResult;
use crate::store::{Op, Store};
use capstan_proto::api::v1 as api;
use capstan_proto::ids::RunId;
use capstan_proto::pipeline::v1::{RunState, TaskState};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const RECORDS: &str = "forge-status/";
/// POSTs per status before it is given up.
pub(crate) const ATTEMPTS: u32 = 5;
/// The first retry's delay; doubled each time (0.5, 1, 2, 4 s).
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// GitHub refuses longer descriptions.
const MAX_DESCRIPTION: usize = 140;

/// A commit status, in Capstan's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum State {
    Pending,
    Running,
    Success,
    Failure,
    Error,
}

impl State {
    /// The word the forge's API takes.
    pub(crate) fn wire(self, forge: Forge) -> &'static str {
        match (forge, self) {
            (Forge::Gitlab, State::Pending) => "pending",
            (Forge::Gitlab, State::Running) => "running",
            (Forge::Gitlab, State::Success) => "success",
            (Forge::Gitlab, State::Failure) => "failed",
            (Forge::Gitlab, State::Error) => "canceled",
            (_, State::Pending | State::Running) => "pending",
            (_, State::Success) => "success",
            (_, State::Failure) => "failure",
            (_, State::Error) => "error",
        }
    }

    fn of(run: &api::Run) -> State {
        match RunState::try_from(run.state) {
            Ok(RunState::Running) => State::Running,
            Ok(RunState::Succeeded) => State::Success,
            Ok(RunState::Failed) => State::Failure,
            Ok(RunState::Cancelled) => State::Error,
            _ => State::Pending,
        }
    }

    fn terminal(self) -> bool {
        matches!(self, State::Success | State::Failure | State::Error)
    }
}

/// What a run owes its commit (stored).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Owed {
    pub(crate) run: String,
    pub(crate) repo: String,
    pub(crate) sha: String,
    pub(crate) context: String,
    /// The wire state last posted (or given up), if any.
    #[serde(default)]
    pub(crate) posted: Option<String>,
}

/// One status to post.
pub(crate) struct Status<'a> {
    pub(crate) sha: &'a str,
    pub(crate) state: State,
    pub(crate) context: &'a str,
    pub(crate) description: &'a str,
    pub(crate) target_url: &'a str,
}

/// The owed statuses in the store, and the runs watched on this replica.
pub(crate) struct Statuses {
    store: Arc<dyn Store>,
    watching: Mutex<HashSet<String>>,
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// The URL, headers and body of `status` for `repo`'s forge.
pub(crate) fn request(
    repo: &RepoRecord,
    forge: Forge,
    token: &str,
    s: &Status<'_>,
) -> (String, Vec<(&'static str, String)>, String) {
    let description = truncate(s.description, MAX_DESCRIPTION);
    let state = s.state.wire(forge);
    // GitLab calls the context `name`.
    let context_key = if forge == Forge::Gitlab {
        "name"
    } else {
        "context"
    };
    let mut body = serde_json::json!({"state": state, "target_url": s.target_url,
        "description": description});
    body[context_key] = s.context.into();
    (
        format!("{}/statuses/{}", repo.api_root(forge), s.sha),
        forge.auth(token),
        body.to_string(),
    )
}

impl Statuses {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            watching: Mutex::default(),
        }
    }

    async fn save(&self, owed: &Owed) {
        let op = Op::Put {
            key: format!("{RECORDS}{}", owed.run),
            value: serde_json::to_vec(owed).expect("an owed status serializes"),
        };
        if let Err(e) = self.store.apply(vec![op]).await {
            tracing::warn!(run = %owed.run, error = %e, "cannot record the owed commit status");
        }
    }

    async fn done(&self, run: &str) {
        let op = Op::Delete {
            key: format!("{RECORDS}{run}"),
        };
        if let Err(e) = self.store.apply(vec![op]).await {
            tracing::warn!(%run, error = %e, "cannot forget the posted commit status");
        }
    }
}

/// Posts `status` to `repo`'s forge, retrying; false when given up.
/// A repository without a forge owes nothing (true).
pub(crate) async fn post(forges: &Forges, repo: &RepoRecord, status: &Status<'_>) -> bool {
    let Some(forge) = repo.forge else {
        return true;
    };
    let result = send(forges, repo, forge, status).await;
    forges.metrics.commit_status(result);
    result == StatusResult::Posted
}

async fn send(
    forges: &Forges,
    repo: &RepoRecord,
    forge: Forge,
    status: &Status<'_>,
) -> StatusResult {
    let token = match forges.repos.secrets(repo) {
        Ok(s) => s.status_token,
        Err(e) => {
            tracing::error!(repo = %repo.name, error = %e, "cannot open the status token; no status posted");
            return StatusResult::Failed;
        }
    };
    let (url, headers, body) = request(repo, forge, &token, status);
    let headers: Vec<(&str, String)> = headers.into_iter().collect();
    let mut delay = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let answer = post_json(&url, &headers, body.clone()).await;
        let why = match &answer {
            Answer::Status(code, _) if (200..300).contains(code) => {
                tracing::info!(repo = %repo.name, sha = %status.sha, state = status.state.wire(forge),
                    context = %status.context, attempt, "commit status posted");
                return StatusResult::Posted;
            }
            Answer::Status(code, body) if *code != 429 && *code < 500 => {
                tracing::error!(repo = %repo.name, sha = %status.sha, %url, code, body = %snippet(body),
                    "the forge refused the commit status (check --status-token and --api-url); not retried");
                return StatusResult::Refused;
            }
            Answer::Status(code, _) => format!("HTTP {code}"),
            Answer::Failed(e) => e.clone(),
        };
        if attempt == ATTEMPTS {
            tracing::error!(repo = %repo.name, sha = %status.sha, %url, attempts = ATTEMPTS, last = %why,
                "giving up on the commit status");
            return StatusResult::Failed;
        }
        tracing::warn!(repo = %repo.name, %url, attempt, error = %why, retry_in_ms = delay.as_millis() as u64,
            "commit status not accepted; retrying");
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    StatusResult::Failed
}

/// The description of a run's state: what ended it, for a failure.
fn describe(run: &api::Run, state: State) -> String {
    let failed = run.tasks.iter().find(|t| {
        matches!(
            TaskState::try_from(t.state),
            Ok(TaskState::Failed | TaskState::Cancelled)
        )
    });
    match (state, failed) {
        (State::Pending, _) => "queued".into(),
        (State::Running, _) => "running".into(),
        (State::Success, _) => "succeeded".into(),
        (_, Some(t)) if !t.message.is_empty() => format!("{}: {}", t.name, t.message),
        (State::Failure, _) => "failed".into(),
        _ => "cancelled".into(),
    }
}

/// Starts watching a run that owes statuses (stored first, so a new leader
/// finds it).
pub(crate) async fn owe(forges: Arc<Forges>, leader: LeaderCtx, owed: Owed) {
    forges.statuses.save(&owed).await;
    spawn_watch(forges, leader, owed);
}

fn spawn_watch(forges: Arc<Forges>, leader: LeaderCtx, owed: Owed) {
    if !forges
        .statuses
        .watching
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(owed.run.clone())
    {
        return;
    }
    tokio::spawn(async move {
        let run = owed.run.clone();
        let token = leader.token.clone();
        tokio::select! {
            _ = watch(&forges, &leader, owed) => {}
            _ = token.cancelled() => {}
        }
        forges
            .statuses
            .watching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&run);
    });
}

/// The owed statuses of runs that the last leader did not finish posting.
pub(crate) async fn resume(forges: Arc<Forges>, leader: LeaderCtx) {
    let records = match forges.statuses.store.scan_prefix(RECORDS).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the owed commit statuses");
            return;
        }
    };
    for (key, value) in records {
        match serde_json::from_slice::<Owed>(&value) {
            Ok(owed) => spawn_watch(forges.clone(), leader.clone(), owed),
            Err(e) => tracing::warn!(%key, error = %e, "unreadable owed commit status; skipped"),
        }
    }
}

async fn watch(forges: &Forges, leader: &LeaderCtx, mut owed: Owed) {
    let repo = match forges.repos.list().await {
        Ok(list) => list.into_iter().find(|r| r.name == owed.repo),
        Err(_) => None,
    };
    let Some(repo) = repo else {
        forges.statuses.done(&owed.run).await; // the repository was removed
        return;
    };
    let id = RunId::from_string(owed.run.clone());
    let mut rx = loop {
        match crate::api::status::flatten(leader.scheduler.watch_run(id.clone()).await) {
            Ok(rx) => break rx,
            // A finished run is read from the store: a failed read is tried
            // again (the status is still owed); a run that is gone is not.
            Err(e) if e.code() == tonic::Code::Unavailable && !leader.token.is_cancelled() => {
                tracing::warn!(run = %owed.run, error = %e, "cannot watch the run yet; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::warn!(run = %owed.run, error = %e, "cannot watch the run; its commit status stops");
                forges.statuses.done(&owed.run).await;
                return;
            }
        }
    };
    let w = Watched {
        forges,
        forge: repo.forge.unwrap_or(Forge::Github),
        target: forges.run_url(&owed.run),
        repo: &repo,
    };
    loop {
        let run = rx.borrow_and_update().clone();
        if w.advance(&mut owed, &run).await {
            return;
        }
        if rx.changed().await.is_err() {
            // The scheduler dropped the watch after the final state.
            let last = rx.borrow().clone();
            w.advance(&mut owed, &last).await;
            forges.statuses.done(&owed.run).await;
            return;
        }
    }
}

/// One run's watch: what it posts to.
struct Watched<'a> {
    forges: &'a Forges,
    repo: &'a RepoRecord,
    forge: Forge,
    target: String,
}

impl Watched<'_> {
    /// Posts what changed since `owed.posted`; true once the final state is posted.
    async fn advance(&self, owed: &mut Owed, run: &api::Run) -> bool {
        let state = State::of(run);
        if owed.posted.is_none() && state.terminal() {
            // Every run shows pending first, however fast it ends.
            self.post(owed, run, State::Pending).await;
        }
        if owed.posted.as_deref() != Some(state.wire(self.forge)) {
            self.post(owed, run, state).await;
        }
        if state.terminal() {
            self.forges.statuses.done(&owed.run).await;
            return true;
        }
        self.forges.statuses.save(owed).await;
        false
    }

    async fn post(&self, owed: &mut Owed, run: &api::Run, state: State) {
        let description = describe(run, state);
        let status = Status {
            sha: &owed.sha,
            state,
            context: &owed.context,
            description: &description,
            target_url: &self.target,
        };
        post(self.forges, self.repo, &status).await;
        owed.posted = Some(state.wire(self.forge).to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(forge: Forge) -> RepoRecord {
        RepoRecord {
            name: "app".into(),
            url: "https://git.example.com/group/app.git".into(),
            pipeline: ".capstan.yaml".into(),
            branches: vec![],
            forge: Some(forge),
            api_url: "https://api.example.com".into(),
            schedules: vec![],
            created_at_ms: 0,
            sealed_webhook_secret: String::new(),
            sealed_status_token: String::new(),
            sealed_fetch_login: String::new(),
        }
    }

    #[test]
    fn each_forge_gets_its_own_shape() {
        let s = Status {
            sha: "abc",
            state: State::Failure,
            context: "capstan/app",
            description: &"x".repeat(300),
            target_url: "https://ci/runs/1",
        };
        let (url, headers, body) = request(&repo(Forge::Github), Forge::Github, "T", &s);
        assert_eq!(url, "https://api.example.com/repos/group/app/statuses/abc");
        assert_eq!(headers[0], ("authorization", "Bearer T".to_string()));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["state"], "failure");
        assert_eq!(v["context"], "capstan/app");
        assert_eq!(v["description"].as_str().unwrap().chars().count(), 140);
        let (url, headers, _) = request(&repo(Forge::Gitea), Forge::Gitea, "T", &s);
        assert_eq!(
            url,
            "https://api.example.com/api/v1/repos/group/app/statuses/abc"
        );
        assert_eq!(headers[0], ("authorization", "token T".to_string()));
        let (url, headers, body) = request(&repo(Forge::Gitlab), Forge::Gitlab, "T", &s);
        assert_eq!(
            url,
            "https://api.example.com/api/v4/projects/group%2Fapp/statuses/abc"
        );
        assert_eq!(headers[0], ("private-token", "T".to_string()));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["state"].as_str(), v["name"].as_str()),
            (Some("failed"), Some("capstan/app"))
        );
        assert_eq!(State::Error.wire(Forge::Gitlab), "canceled");
        assert_eq!(State::Running.wire(Forge::Github), "pending");
    }
}
