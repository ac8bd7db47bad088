//! PipelineService: what the CLI talks to.

use super::{Shared, status};
use crate::limits::{Limits, MAX_ERROR_MESSAGE_BYTES};
use crate::model::*;
use crate::scheduler::{AttemptLogInfo, Command};
use crate::tokens::Scope;
use capstan_proto::api::v1::*;
use capstan_proto::ids::{AttemptId, RunId};
use capstan_telemetry::TraceHeaders;
use futures::Stream;
use std::collections::HashMap;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub(crate) struct PipelineApi(pub Shared);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Largest stored run record (tasks and attempts, as JSON).
const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// Largest piece of log sent in one `LogData`.
const READ_CHUNK: usize = 1024 * 1024;

fn run_id(s: String) -> Result<RunId, Status> {
    if s.trim().is_empty() {
        return Err(Status::invalid_argument("a run id is required"));
    }
    Ok(RunId::from_string(s))
}

/// Longest `SubmitRunRequest.idempotency_key` accepted.
pub(crate) const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// The run's idempotency key, `--rev` and `--repo`. Values reach scripts only as variables
/// whatever they are, but a rev that is an option or a revision expression
/// has no business in git.
fn check_source(req: &SubmitRunRequest) -> Result<(), Status> {
    if req.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(Status::invalid_argument(format!(
            "idempotency_key is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY_BYTES} (a UUID is plenty)",
            req.idempotency_key.len()
        )));
    }
    if !req.rev.is_empty() {
        capstan_proto::source::check_rev(&req.rev).map_err(Status::invalid_argument)?;
    }
    if !req.repo.is_empty() {
        capstan_proto::source::check_repo(&req.repo).map_err(Status::invalid_argument)?;
    }
    if !req.git_ref.is_empty() {
        capstan_proto::source::check_rev(&req.git_ref)
            .map_err(|e| Status::invalid_argument(e.replace("--rev", "git_ref")))?;
    }
    Ok(())
}

/// [`build_run_within`] the default limits.
#[cfg(test)]
pub(crate) fn build_run(req: SubmitRunRequest) -> Result<RunRecord, Status> {
    build_run_within(req, &crate::limits::Limits::default())
}

/// `s` without control characters, cut to at most `max` bytes.
fn one_line(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// Turns a submit request into a run record, or every validation error
/// (as many as [`MAX_ERROR_MESSAGE_BYTES`] holds).
pub(crate) fn build_run_within(
    req: SubmitRunRequest,
    limits: &Limits,
) -> Result<RunRecord, Status> {
    limits.check_submit(&req)?;
    check_source(&req)?;
    let file = if req.file_name.is_empty() {
        "pipeline.yaml".to_string()
    } else {
        req.file_name.clone()
    };
    let invalid = |e: capstan_pipeline::ValidationErrors| {
        Status::invalid_argument(e.summary(MAX_ERROR_MESSAGE_BYTES))
    };
    let parsed = capstan_pipeline::parse(&file, &req.pipeline_yaml).map_err(invalid)?;
    limits.check_tasks(&file, parsed.tasks.len())?;
    let id = RunId::generate();
    let ctx = capstan_pipeline::Context {
        params: req.params.into_iter().collect(),
        git_sha: (!req.rev.is_empty()).then(|| req.rev.clone()),
        // Redacted: the substituted value is stored with the task and
        // reaches the step's environment; the runner checks out itself.
        git_repo: (!req.repo.is_empty())
            .then(|| capstan_proto::redact::redact_url(&req.repo).into_owned()),
        git_ref: (!req.git_ref.is_empty()).then(|| req.git_ref.clone()),
        run_id: Some(id.to_string()),
    };
    let resolved = capstan_pipeline::resolve(&file, &parsed, &ctx).map_err(invalid)?;
    // Again with the matrices expanded.
    limits.check_tasks(&file, resolved.tasks.len())?;
    let tasks = task_records(&resolved);
    let record = RunRecord {
        id,
        pipeline: resolved.name.clone(),
        state: StoredRunState::Queued,
        priority: req.priority,
        seq: 0,
        created_at_ms: now_ms(),
        finished_at_ms: 0,
        repo: req.repo,
        rev: req.rev,
        cancel_requested: false,
        tasks,
        idempotency_key: req.idempotency_key,
        traceparent: String::new(),
        tracestate: String::new(),
        repo_password: String::new(),
        run_span: false,
        parent_span_id: String::new(),
        submitted_by: String::new(),
        group: run_group(&resolved),
        held: false,
    };
    // etcd refuses requests over ~1.5 MiB: a run that could not be stored
    // must be refused here, not knock the leader over when it is written.
    let stored = serde_json::to_vec(&record).map_or(0, |v| v.len());
    if stored > MAX_RECORD_BYTES {
        return Err(Status::invalid_argument(format!(
            "{file}: the resolved run takes {stored} bytes to store; the limit is {MAX_RECORD_BYTES}: \
             make the pipeline smaller (move long scripts into files of the repository)"
        )));
    }
    Ok(record)
}

/// The run's tasks as stored, waiting, with `needs` as indexes.
fn task_records(resolved: &capstan_pipeline::Pipeline) -> Vec<TaskRecord> {
    let index: HashMap<&str, usize> = resolved
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    resolved
        .tasks
        .iter()
        .map(|t| TaskRecord {
            name: t.name.clone(),
            needs: t.needs.iter().map(|n| index[n.as_str()]).collect(),
            spec: capstan_pipeline::task_spec(&resolved.name, t),
            state: StoredTaskState::Waiting,
            retries: t.retries,
            script_failures: 0,
            infra_failures: 0,
            attempts: Vec::new(),
            message: String::new(),
            exit_code: None,
            outputs: Default::default(),
            queued_at_ms: 0,
            started_at_ms: 0,
            finished_at_ms: 0,
            retry_at_ms: 0,
            approval: t.approval.as_ref().map(|a| ApprovalRecord {
                prompt: a.prompt.clone(),
                by: a.by.clone(),
                timeout_ms: a
                    .timeout
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                ..ApprovalRecord::default()
            }),
            condition: t.condition.clone(),
            finally: t.finally,
            benign_skip: false,
        })
        .collect()
}

/// The resolved pipeline's `concurrency:` group.
fn run_group(resolved: &capstan_pipeline::Pipeline) -> Option<RunGroup> {
    resolved.concurrency.as_ref().map(|c| RunGroup {
        name: c.group.clone(),
        cancel_in_progress: c.cancel_in_progress,
    })
}

/// A submit to parse, and where its answer goes.
type ParseJob = (
    SubmitRunRequest,
    Limits,
    tokio::sync::oneshot::Sender<Result<RunRecord, Status>>,
);

/// [`build_run_within`] on the one thread that parses every submit.
///
/// Parsing a large pipeline file takes tens of MB for a moment, and glibc
/// keeps what a thread freed in that thread's arena: parsed on the runtime's
/// workers, each rejected 900 KB submit left ~30 MB more resident (one arena
/// after another, up to 8 per core). On one thread the most the process
/// keeps is one parse's worth, however many submits come; and parsing, which
/// is CPU work, stays off the runtime's workers.
pub(crate) async fn build_on_parser_thread(
    req: SubmitRunRequest,
    limits: Limits,
) -> Result<RunRecord, Status> {
    static PARSER: std::sync::OnceLock<std::sync::mpsc::Sender<ParseJob>> =
        std::sync::OnceLock::new();
    let parser = PARSER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<ParseJob>();
        let spawned = std::thread::Builder::new()
            .name("capstan-parse".into())
            .spawn(move || {
                for (req, limits, reply) in rx {
                    // A parser bug must cost one submit, not every later one.
                    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        build_run_within(req, &limits)
                    }))
                    .unwrap_or_else(|_| {
                        Err(Status::internal(
                            "the coordinator failed parsing this pipeline; see its log",
                        ))
                    });
                    let _ = reply.send(built);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the parser thread");
        }
        tx
    });
    let (reply, answer) = tokio::sync::oneshot::channel();
    let unavailable = || Status::unavailable("the coordinator's parser is not running; retry");
    parser
        .send((req, limits, reply))
        .map_err(|_| unavailable())?;
    answer.await.map_err(|_| unavailable())?
}

#[tonic::async_trait]
impl pipeline_service_server::PipelineService for PipelineApi {
    async fn submit_run(
        &self,
        req: Request<SubmitRunRequest>,
    ) -> Result<Response<SubmitRunResponse>, Status> {
        let caller = self.0.authorize(&req, Scope::Submit).await?;
        // A submitter's trace (W3C `traceparent` metadata) becomes the
        // parent of the run's span; the scheduler replaces it with the run's
        // own. Parsed and re-encoded, so a malformed header is dropped here
        // instead of being stored and handed to runners.
        let header = |name| {
            req.metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .unwrap_or_default()
        };
        let parent = TraceHeaders {
            traceparent: header("traceparent"),
            tracestate: header("tracestate"),
        };
        let parent = if parent.is_empty() {
            parent
        } else {
            TraceHeaders::of(&parent.context())
        };
        let mut run = build_on_parser_thread(req.into_inner(), self.0.limits).await?;
        run.traceparent = parent.traceparent;
        run.tracestate = parent.tracestate;
        run.submitted_by = caller.name;
        let leader = self.0.leader().await?;
        let id = status::flatten(leader.scheduler.submit(run, self.0.limits.quota).await)?;
        tracing::info!(run = %id, "run submitted");
        Ok(Response::new(SubmitRunResponse {
            run_id: id.to_string(),
        }))
    }

    async fn get_run(&self, req: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        self.0.authorize(&req, Scope::Read).await?;
        let id = run_id(req.into_inner().run_id)?;
        let run = status::flatten(self.0.leader().await?.scheduler.get_run(id).await)?;
        Ok(Response::new(run))
    }

    async fn list_runs(
        &self,
        req: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        self.0.authorize(&req, Scope::Read).await?;
        let query = crate::scheduler::listing::RunQuery::from_request(req.get_ref())
            .map_err(Status::invalid_argument)?;
        let leader = self.0.leader().await?;
        let (runs, next) = status::flatten(leader.scheduler.list_runs(query).await)?;
        Ok(Response::new(ListRunsResponse {
            runs,
            next_cursor: next.unwrap_or_default(),
        }))
    }

    async fn decide_approval(
        &self,
        req: Request<DecideApprovalRequest>,
    ) -> Result<Response<Run>, Status> {
        // Which scopes may decide is the gate's: the scheduler checks it.
        let caller = self.0.authorize(&req, Scope::Read).await?;
        let r = req.into_inner();
        let id = run_id(r.run_id)?;
        let decision = crate::scheduler::state::Decide {
            task: r.task.clone(),
            approve: r.approve,
            by: caller.name.clone(),
            scope: caller.scope.as_str().to_owned(),
            reason: one_line(&r.reason, 500),
        };
        let leader = self.0.leader().await?;
        let run = status::flatten(leader.scheduler.decide(id, decision).await)?;
        tracing::info!(target: "audit", token = %caller.name, scope = caller.scope.as_str(),
            action = if r.approve { "approve" } else { "reject" }, run = %run.id, task = %r.task,
            submitted_by = %run.submitted_by, reason = %one_line(&r.reason, 500), "approval decided");
        Ok(Response::new(run))
    }

    async fn cancel_run(&self, req: Request<CancelRunRequest>) -> Result<Response<Run>, Status> {
        let caller = self.0.authorize(&req, Scope::Submit).await?;
        let id = run_id(req.into_inner().run_id)?;
        let owner = (!caller.is_admin()).then(|| caller.name.clone());
        let leader = self.0.leader().await?;
        let run = status::flatten(leader.scheduler.cancel_run(id, owner).await)?;
        if caller.is_admin() && run.submitted_by != caller.name {
            tracing::info!(
                target: "audit",
                token = %caller.name,
                action = "cancel",
                run = %run.id,
                submitted_by = %run.submitted_by,
                "run of another token cancelled"
            );
        }
        Ok(Response::new(run))
    }

    type WatchRunStream = BoxStream<RunEvent>;

    async fn watch_run(
        &self,
        req: Request<WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        self.0.authorize(&req, Scope::Read).await?;
        let id = run_id(req.into_inner().run_id)?;
        let leader = self.0.leader().await?;
        let mut rx = status::flatten(leader.scheduler.watch_run(id).await)?;
        let (tx, out) = mpsc::channel(16);
        let shutdown = leader.token.clone();
        tokio::spawn(async move {
            loop {
                let run = rx.borrow_and_update().clone();
                let done = is_terminal(&run);
                if tx.send(Ok(RunEvent { run: Some(run) })).await.is_err() || done {
                    return;
                }
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            // The scheduler dropped the watch after the final state.
                            let run = rx.borrow().clone();
                            let _ = tx.send(Ok(RunEvent { run: Some(run) })).await;
                            return;
                        }
                    }
                    _ = shutdown.cancelled() => return,
                    // The client went away: a run that never changes again
                    // would otherwise keep this task and its watch forever.
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    type ReadLogsStream = BoxStream<LogData>;

    async fn read_logs(
        &self,
        req: Request<ReadLogsRequest>,
    ) -> Result<Response<Self::ReadLogsStream>, Status> {
        self.0.authorize(&req, Scope::Read).await?;
        let req = req.into_inner();
        let id = run_id(req.run_id)?;
        let task = (!req.task.is_empty()).then_some(req.task);
        // Fail fast on an unknown run or task, before the stream starts.
        let probe_id = id.clone();
        let probe_task = task.clone();
        let leader = self.0.leader().await?;
        status::flatten(leader.scheduler.attempts(probe_id, probe_task).await)?;
        // Up to READ_CHUNK each: a slow client holds this much (plus HTTP/2
        // buffers) in memory, not the whole backlog.
        let (tx, out) = mpsc::channel(4);
        let shared = self.0.clone();
        tokio::spawn(async move {
            if let Err(e) = stream_logs(shared, leader, id, task, req.follow, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn list_runners(
        &self,
        req: Request<ListRunnersRequest>,
    ) -> Result<Response<ListRunnersResponse>, Status> {
        self.0.authorize(&req, Scope::Read).await?;
        let runners = self.0.ask(|reply| Command::ListRunners { reply }).await?;
        Ok(Response::new(ListRunnersResponse { runners }))
    }

    async fn drain_runner(
        &self,
        req: Request<DrainRunnerRequest>,
    ) -> Result<Response<DrainRunnerResponse>, Status> {
        let caller = self.0.authorize(&req, Scope::Admin).await?;
        let runner = req.into_inner().runner;
        let r = self.0.ask(|reply| Command::Drain { runner, reply }).await?;
        tracing::info!(target: "audit", token = %caller.name, action = "drain", runner = %r.name, "runner draining");
        Ok(Response::new(DrainRunnerResponse { runner: Some(r) }))
    }

    async fn resume_runner(
        &self,
        req: Request<ResumeRunnerRequest>,
    ) -> Result<Response<ResumeRunnerResponse>, Status> {
        let caller = self.0.authorize(&req, Scope::Admin).await?;
        let runner = req.into_inner().runner;
        let r = self
            .0
            .ask(|reply| Command::Resume { runner, reply })
            .await?;
        tracing::info!(target: "audit", token = %caller.name, action = "resume", runner = %r.name, "runner resumed");
        Ok(Response::new(ResumeRunnerResponse { runner: Some(r) }))
    }
}

fn is_terminal(run: &Run) -> bool {
    use capstan_proto::pipeline::v1::RunState;
    matches!(
        RunState::try_from(run.state),
        Ok(RunState::Succeeded | RunState::Failed | RunState::Cancelled)
    )
}

/// Sends the logs of the run's tasks, attempt by attempt; with `follow`,
/// keeps going until every selected task has ended and its logs are sent.
async fn stream_logs(
    shared: Shared,
    leader: super::LeaderCtx,
    id: RunId,
    task: Option<String>,
    follow: bool,
    tx: &mpsc::Sender<Result<LogData, Status>>,
) -> Result<(), Status> {
    let mut sent: HashMap<AttemptId, u64> = HashMap::new();
    let mut feed = shared.feed.subscribe();
    let mut refresh = true;
    let (mut attempts, mut all_done) = (Vec::new(), false);
    // One timer for the whole stream, so busy logs elsewhere (which move the
    // feed constantly) cannot starve the state re-check.
    let mut recheck = tokio::time::interval(std::time::Duration::from_millis(200));
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    recheck.tick().await;
    loop {
        feed.borrow_and_update();
        // The attempt list changes only with task state: asking the
        // scheduler on every log append cost a round trip per chunk.
        if refresh {
            (attempts, all_done) =
                status::flatten(leader.scheduler.attempts(id.clone(), task.clone()).await)?;
        }
        for info in &attempts {
            if !send_new_bytes(&leader, info, &mut sent, tx).await? {
                return Ok(()); // the client went away
            }
        }
        if !follow || (all_done && attempts.iter().all(|a| a.finished)) {
            return Ok(());
        }
        tokio::select! {
            _ = feed.changed() => refresh = false,
            // State changes (a task ended, a new attempt) do not move the feed.
            _ = recheck.tick() => refresh = true,
            // Not a clean end: that tells the client the log is complete.
            // UNAVAILABLE makes it reopen the stream at the next leader.
            _ = leader.token.cancelled() => return Err(Status::unavailable(
                "this coordinator is no longer the leader; reopen the log at the leader",
            )),
            _ = tx.closed() => return Ok(()),
        }
    }
}

async fn send_new_bytes(
    leader: &super::LeaderCtx,
    info: &AttemptLogInfo,
    sent: &mut HashMap<AttemptId, u64>,
    tx: &mpsc::Sender<Result<LogData, Status>>,
) -> Result<bool, Status> {
    let offset = sent.entry(info.attempt.clone()).or_insert(0);
    loop {
        let data = leader
            .logs
            .read(&info.attempt, *offset, READ_CHUNK)
            .await
            .map_err(status::from_log)?;
        if data.is_empty() {
            return Ok(true);
        }
        let n = data.len() as u64;
        let msg = LogData {
            task: info.task.clone(),
            attempt_id: info.attempt.to_string(),
            attempt_number: info.number,
            offset: *offset,
            data,
        };
        if tx.send(Ok(msg)).await.is_err() {
            return Ok(false);
        }
        *offset += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_too_large_to_store_is_refused_clearly() {
        let script = "x".repeat(700 * 1024);
        let yaml =
            format!("version: 1\nname: big\ntasks:\n  t:\n    steps:\n      - run: {script}\n");
        let err = build_run(SubmitRunRequest {
            pipeline_yaml: yaml,
            file_name: "big.yaml".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("big.yaml") && err.message().contains("limit"),
            "{}",
            err.message()
        );
        let ok = build_run(SubmitRunRequest {
            pipeline_yaml: "version: 1\nname: s\ntasks:\n  t:\n    steps: [ { run: x } ]\n".into(),
            file_name: "s.yaml".into(),
            ..Default::default()
        });
        assert!(ok.is_ok());
    }

    #[test]
    fn a_bad_rev_or_repo_is_refused_at_submit() {
        let submit = |repo: &str, rev: &str| {
            build_run(SubmitRunRequest {
                pipeline_yaml: "version: 1\nname: s\ntasks:\n  t:\n    steps: [ { run: x } ]\n"
                    .into(),
                repo: repo.into(),
                rev: rev.into(),
                ..Default::default()
            })
        };
        let err = submit("", "main;$(touch f) x").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "--rev `main;$(touch f) x` is not a commit SHA or a valid ref name: it contains ' '"
        );
        let err = submit("--upload-pack=touch f", "main").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "--repo `--upload-pack=touch f` is not a repository URL: it starts with `-`"
        );
        assert!(submit("https://git.example.com/a.git", "main").is_ok());
    }

    /// A follower (`capstan logs --follow`, `submit --follow`) of a task
    /// that still runs must not see a clean end of its stream when this
    /// replica stops leading (failover, or a restart of the coordinator):
    /// the CLI takes a clean end as "the task's log is complete" and stops
    /// printing, exit 0, with the rest of the log missing. It must see
    /// UNAVAILABLE, which it reopens at the new leader.
    #[tokio::test]
    async fn a_log_follower_is_told_to_reconnect_when_the_leadership_ends() {
        use crate::scheduler::Command;
        use std::sync::Arc;
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::memory::MemoryStore::new());
        let logs: Arc<dyn crate::logs::LogStore> =
            Arc::new(crate::logs::memory::MemoryLogStore::new());
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let (scheduler, handle) = crate::scheduler::start(
            Arc::clone(&store),
            Arc::clone(&logs),
            crate::scheduler::state::Timing::default(),
            Arc::clone(&metrics),
            crate::seal::Sealer::from_key(&[1; 32]),
            1,
        )
        .await
        .unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        tokio::spawn(scheduler.run(token.child_token()));
        let run = build_run(SubmitRunRequest {
            pipeline_yaml: "version: 1\nname: s\ntasks:\n  t:\n    steps: [ { run: x } ]\n".into(),
            file_name: "s.yaml".into(),
            ..Default::default()
        })
        .unwrap();
        let id = crate::api::status::flatten(
            handle
                .ask(|reply| Command::Submit {
                    run: Box::new(run),
                    quota: crate::limits::Quota::UNLIMITED,
                    reply,
                })
                .await,
        )
        .unwrap();
        let leader = super::super::LeaderCtx {
            scheduler: handle,
            token: token.clone(),
            logs,
        };
        let (_role_tx, role) =
            tokio::sync::watch::channel(super::super::Role::Leader(leader.clone()));
        let shared = Shared {
            mtls: None,
            role,
            election: Arc::new(crate::election::standalone::StandaloneElection::new(
                store.clone(),
                "http://127.0.0.1:1".into(),
            )),
            feed: Arc::default(),
            metrics,
            registration_token: "t".into(),
            advertise: "http://127.0.0.1:1".into(),
            tokens: Arc::new(crate::tokens::Tokens::new(store.clone())),
            runner_tokens: Arc::new(crate::runner_tokens::RunnerTokens::new(store.clone())),
            limits: Default::default(),
        };
        let (tx, _rx) = mpsc::channel(4);
        let follower =
            tokio::spawn(async move { stream_logs(shared, leader, id, None, true, &tx).await });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!follower.is_finished(), "the task has not even started");
        token.cancel();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), follower)
            .await
            .expect("the follower ends with the leadership")
            .unwrap();
        let status = ended.expect_err("a clean end tells the CLI the log is complete");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
}
