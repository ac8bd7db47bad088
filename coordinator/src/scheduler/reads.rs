//! What the API asks about runs, answered by the loop for the runs it
//! holds and by the history for the finished ones it has let go
//! (`history`): one place, so no handler has to know where a run lives.

use super::history::History;
use super::listing::{self, RunQuery};
use super::state::{self, StateError};
use super::{AttemptLogInfo, Command, SchedulerGone, SchedulerHandle, view};
use crate::model::RunRecord;
use capstan_proto::api::v1 as api;
use capstan_proto::ids::RunId;
use tokio::sync::watch;

/// The scheduler's answer: the loop may be gone, or refuse.
pub(crate) type Answer<T> = Result<Result<T, StateError>, SchedulerGone>;

impl SchedulerHandle {
    /// Submits `run`; a repeat of a finished run's idempotency key names
    /// that run (the loop knows only the keys of the runs it holds).
    pub(crate) async fn submit(
        &self,
        run: RunRecord,
        quota: crate::limits::Quota,
    ) -> Answer<RunId> {
        if !run.idempotency_key.is_empty() {
            let found = match self.history.by_key(&run.idempotency_key).await {
                Ok(found) => found,
                Err(e) => return Ok(Err(StateError::History(e.to_string()))),
            };
            // A key whose run is gone (a retention pass cut by a crash
            // before it deleted the key) names nothing: a new run.
            if let Some(id) = found {
                match self.history.get(&id).await {
                    Ok(Some(_)) => return Ok(Ok(id)),
                    Ok(None) => {}
                    Err(e) => return Ok(Err(StateError::History(e.to_string()))),
                }
            }
        }
        self.ask(|reply| Command::Submit {
            run: Box::new(run),
            quota,
            reply,
        })
        .await
    }

    pub(crate) async fn get_run(&self, id: RunId) -> Answer<api::Run> {
        let asked = self
            .ask(|reply| Command::GetRun {
                id: id.clone(),
                reply,
            })
            .await;
        or_history(&self.history, &id, asked, |run| Ok(view::run(run))).await
    }

    /// A page of runs and the next page's cursor: the loop's newest
    /// matches, then the history's, merged.
    pub(crate) async fn list_runs(
        &self,
        query: RunQuery,
    ) -> Answer<(Vec<api::Run>, Option<String>)> {
        let (live, next_seq) = match self
            .ask(|reply| Command::ListRuns {
                query: query.clone(),
                reply,
            })
            .await?
        {
            Ok(live) => live,
            Err(e) => return Ok(Err(e)),
        };
        // Read after the loop answered: a run it no longer held then was
        // archived by a commit that is durable by now.
        let finished = match self.history.page(&query, next_seq).await {
            Ok(f) => f,
            Err(e) => return Ok(Err(StateError::History(e.to_string()))),
        };
        let (page, next) = listing::merge(live, finished.runs, finished.more, &query);
        Ok(Ok((page.iter().map(view::run).collect(), next)))
    }

    /// A receiver of the run's view; a finished run's has its final view
    /// and no sender.
    pub(crate) async fn watch_run(&self, id: RunId) -> Answer<watch::Receiver<api::Run>> {
        let asked = self
            .ask(|reply| Command::WatchRun {
                id: id.clone(),
                reply,
            })
            .await;
        or_history(&self.history, &id, asked, |run| {
            Ok(watch::channel(view::run(run)).1)
        })
        .await
    }

    /// The attempts of a run's tasks (all if `task` is None), and whether
    /// every task named has ended.
    pub(crate) async fn attempts(
        &self,
        id: RunId,
        task: Option<String>,
    ) -> Answer<(Vec<AttemptLogInfo>, bool)> {
        let asked = self
            .ask(|reply| Command::Attempts {
                id: id.clone(),
                task: task.clone(),
                reply,
            })
            .await;
        or_history(&self.history, &id, asked, |run| {
            attempt_infos(run, task.as_deref())
        })
        .await
    }

    /// Cancels a run (with `owner`, only one that token submitted); a
    /// finished run is answered as it is.
    pub(crate) async fn cancel_run(&self, id: RunId, owner: Option<String>) -> Answer<api::Run> {
        let who = owner.clone();
        let asked = self
            .ask(|reply| Command::CancelRun {
                id: id.clone(),
                owner,
                reply,
            })
            .await;
        or_history(&self.history, &id, asked, |run| {
            if let Some(owner) = who
                && run.submitted_by != owner
            {
                return Err(StateError::NotYourRun {
                    run: id.to_string(),
                    submitted_by: run.submitted_by.clone(),
                });
            }
            Ok(view::run(run))
        })
        .await
    }

    /// Approves or rejects a task at its gate; a finished run's gate is
    /// judged as the loop would (a repeat of its decision is answered with
    /// the run, anything else says why not).
    pub(crate) async fn decide(&self, id: RunId, d: state::Decide) -> Answer<api::Run> {
        let asked_for = d.clone();
        let asked = self
            .ask(|reply| Command::DecideApproval {
                id: id.clone(),
                decision: Box::new(d),
                reply,
            })
            .await;
        or_history(&self.history, &id, asked, |run| {
            state::decidable(run, &asked_for).map(|_| view::run(run))
        })
        .await
    }
}

/// `asked`, or, when the loop does not hold run `id`, `f` of its record
/// in the history.
async fn or_history<T>(
    history: &History,
    id: &RunId,
    asked: Answer<T>,
    f: impl FnOnce(&RunRecord) -> Result<T, StateError>,
) -> Answer<T> {
    match asked? {
        Err(StateError::UnknownRun(_)) => Ok(match history.get(id).await {
            Ok(Some(run)) => f(&run),
            Ok(None) => Err(StateError::UnknownRun(id.to_string())),
            Err(e) => Err(StateError::History(e.to_string())),
        }),
        other => Ok(other),
    }
}

/// The attempts of `run`'s tasks (all if `task` is None), in order, and
/// whether every task named has ended.
pub(super) fn attempt_infos(
    run: &RunRecord,
    task: Option<&str>,
) -> Result<(Vec<AttemptLogInfo>, bool), StateError> {
    if let Some(name) = task
        && !run.tasks.iter().any(|t| t.name == name)
    {
        return Err(StateError::UnknownTask {
            run: run.id.to_string(),
            task: name.to_string(),
        });
    }
    let mut out = Vec::new();
    let mut all_done = true;
    for t in run
        .tasks
        .iter()
        .filter(|t| task.is_none_or(|name| t.name == name))
    {
        all_done &= t.state.is_terminal();
        for a in &t.attempts {
            out.push(AttemptLogInfo {
                task: t.name.clone(),
                attempt: a.id.clone(),
                number: a.number,
                finished: !a.state.is_active() || t.state.is_terminal(),
            });
        }
    }
    Ok((out, all_done))
}
